#!/usr/bin/env bash
# Runs the CUDA kernel tests (tests/test_cuda_kernels.py) under compute-sanitizer, once with memcheck (out-of-bounds
# and misaligned accesses, errors from CUDA calls) and once with racecheck (shared-memory hazards), each failing the
# script on the first error found:
#
#   bash scripts/gpu_sanitize.sh                 # both tools
#   bash scripts/gpu_sanitize.sh -k pull         # extra arguments go to pytest
#   PYTHON=/path/to/python bash scripts/gpu_sanitize.sh
#
# Exit status: 0 clean (or no CUDA device: nothing to check, said so), 1 a sanitizer or test failure,
# 2 compute-sanitizer not found (it ships with the CUDA toolkit: $CUDA_HOME/bin or /usr/local/cuda/bin).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[[ -x "$PY" ]] || PY="$(command -v python3)"

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_sanitize: no CUDA device (torch.cuda.is_available() is False with $PY); nothing to sanitize."
  exit 0
fi

SAN="$(command -v compute-sanitizer || true)"
for d in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda /usr/local/cuda-*; do
  [[ -z "$SAN" && -n "$d" && -x "$d/bin/compute-sanitizer" ]] && SAN="$d/bin/compute-sanitizer"
done
if [[ -z "$SAN" ]]; then
  echo "gpu_sanitize: compute-sanitizer not found (not on PATH, nor in \$CUDA_HOME/bin or /usr/local/cuda*/bin)." >&2
  echo "gpu_sanitize: install the CUDA toolkit's compute-sanitizer (e.g. the cuda-sanitizer package) and retry." >&2
  exit 2
fi

status=0
for tool in memcheck racecheck; do
  echo "gpu_sanitize: compute-sanitizer --tool $tool ($SAN)"
  if "$SAN" --tool "$tool" --error-exitcode 1 --target-processes all \
      "$PY" -m pytest tests/test_cuda_kernels.py -q -x -p no:cacheprovider "$@"; then
    echo "gpu_sanitize: $tool clean"
  else
    echo "gpu_sanitize: $tool FAILED" >&2
    status=1
  fi
done
exit $status
