#!/usr/bin/env bash
# The main job: trains residual, HC and mHC language models on the default preset and writes
# report/index.html. Extra arguments go to `torchmhc compare` (e.g. --preset stress).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
ensure_venv train,plots
exec .venv/bin/torchmhc compare "$@"
