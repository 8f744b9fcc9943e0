#!/usr/bin/env bash
# The main job: trains residual, HC and mHC language models on the default preset and writes
# report/index.html. Extra arguments go to `torchmhc compare` (e.g. --preset stress).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
ensure_venv train,plots
# PyTorch's OpenMP threads otherwise spin while waiting for a busy core (2-11x slower steps).
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
exec .venv/bin/torchmhc compare "$@"
