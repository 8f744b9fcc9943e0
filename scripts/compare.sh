#!/usr/bin/env bash
# The main job: trains residual, HC and mHC language models on the default preset and writes
# report/index.html. Extra arguments go to `torchmhc compare` (e.g. --preset stress).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
extras=train,plots
case " $* " in
    *hf-llama*) extras=train,plots,hf ;;  # a transformers Llama as the subject: the 'hf' extra too
esac
ensure_venv "$extras"
# OpenMP threads wait for the next op: PyTorch's default (spin ~3 ms, then sleep) made steps
# 2-11x slower on cores shared with busy processes; sleeping at once (PASSIVE alone) costs a wake-up
# per op, 1.2-1.6x slower steps of the tiny model on 2 cores. A short spin, then sleep, did neither.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
export GOMP_SPINCOUNT="${GOMP_SPINCOUNT:-10000}"
exec .venv/bin/torchmhc compare "$@"
