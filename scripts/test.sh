#!/usr/bin/env bash
# The test suite on the CPU: Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1);
# GPU tests are skipped without CUDA. Extra arguments go to pytest (e.g. -k sinkhorn).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
ensure_venv test
# PyTorch's OpenMP threads otherwise spin while waiting for a busy core (2-11x slower steps).
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
export TRITON_INTERPRET=1
exec .venv/bin/python -m pytest -q "$@"
