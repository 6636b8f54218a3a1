#!/usr/bin/env bash
# Everything owed on a GPU machine, in one command, after plait is built there against the machine's CUDA torch
# (offline: `pip install --no-build-isolation --no-deps -e .` with nvcc, cmake and ninja present). Needs no internet.
#
#   bash scripts/gpu_checks.sh                     # all steps
#   bash scripts/gpu_checks.sh --quick             # shorter benchmarks (fewer sizes, 200 latency calls)
#   bash scripts/gpu_checks.sh --skip sanitize     # skip a step (repeatable): kernels, codec, parallel, host-path,
#                                                  #   gpu-tests, sanitize, bench-kernels, bench-allreduce, bench-host-path
#   bash scripts/gpu_checks.sh --only gpu-tests    # run only these steps (repeatable)
#   PYTEST_ADDOPTS="-k 'stream or ddp'" bash scripts/gpu_checks.sh --only gpu-tests   # a part of the GPU tests
#   OUT=/tmp/gpu PYTHON=/path/to/python bash scripts/gpu_checks.sh
#
# Where one command may run only so long, run the steps one by one with --only (and split gpu-tests with
# PYTEST_ADDOPTS=-k ...); outputs of earlier steps stay in $OUT.
#
# Steps (in order: the quickest checks first), each logged to $OUT/<step>.log (OUT defaults to build/gpu):
#   kernels          pytest tests/test_cuda_kernels.py         (junit: $OUT/test_cuda_kernels.xml)
#   codec            pytest -m gpu tests/test_codec.py         (CUDA codec bytes == CPU bytes; junit: $OUT/test_codec_gpu.xml)
#   parallel         pytest -m gpu tests/test_parallel_layers.py (plait.parallel layers on CUDA tensors == dense;
#                    junit: $OUT/test_parallel_gpu.xml)
#   host-path        pytest tests/test_gpu.py -k host_path     (the host path forced / split / auto on CUDA tensors;
#                    junit: $OUT/test_host_path_gpu.xml)
#   gpu-tests        pytest tests/test_gpu.py                  (junit: $OUT/test_gpu.xml)
#   sanitize         scripts/gpu_sanitize.sh (compute-sanitizer memcheck + racecheck over the kernel tests)
#   bench-kernels    bench/gpu_kernels.py --json $OUT/gpu_kernels.json
#   bench-allreduce  bench/gpu_allreduce.py --json $OUT/gpu_allreduce.json (2 and 4 ranks on one GPU vs gloo)
#   bench-host-path  bench/gpu_host_path.py --json $OUT/gpu_host_path.json (pinned copies through the host path vs
#                    plain copies; all-reduce off / auto / force; the planner's share)
# plus $OUT/env.txt (GPU, driver, torch, plait) and $OUT/summary.txt (the table printed at the end).
#
# Exit status: 0 every step passed (or no CUDA device: nothing to check, said so), 1 a step failed, 2 usage or
# plait unusable on this GPU (not built, or built without CUDA).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[[ -x "$PY" ]] || PY="$(command -v python3)"

QUICK=0
SKIP=" "
ONLY=" "
while (($#)); do
  case "$1" in
    --quick) QUICK=1 ;;
    --skip) shift; SKIP+="${1:-} " ;;
    --skip=*) SKIP+="${1#--skip=} " ;;
    --only) shift; ONLY+="${1:-} " ;;
    --only=*) ONLY+="${1#--only=} " ;;
    -h|--help) sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_checks: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export PYTHONUNBUFFERED=1

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_checks: no CUDA device (torch.cuda.is_available() is False with $PY); nothing to check."
  exit 0
fi
OUT="${OUT:-build/gpu}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(hostname)"
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1 || true
  "$PY" - <<'EOF' 2>&1
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"{torch.cuda.device_count()} device(s): {torch.cuda.get_device_name(0)}, "
      f"capability {torch.cuda.get_device_capability(0)}")
import plait
print(f"plait {plait.__version__} from {plait.__file__}: cuda_compiled={plait._C.cuda_compiled()}, "
      f"cuda_device_count={plait._C.cuda_device_count()}")
EOF
} | tee "$OUT/env.txt"

if ! "$PY" -c 'import sys, plait; sys.exit(0 if plait.cuda_available() else 1)' 2>/dev/null; then
  echo "gpu_checks: plait is not importable, or was built without CUDA, or its CUDA runtime sees no device (see" >&2
  echo "gpu_checks: $OUT/env.txt). Build it here first: $PY -m pip install --no-build-isolation --no-deps -e ." >&2
  exit 2
fi

names=()
declare -A status secs notes

run_step() {  # run_step NAME COMMAND...: logs to $OUT/NAME.log, records status and duration
  local name="$1"; shift
  names+=("$name")
  if [[ "$SKIP" == *" $name "* ]] || [[ "$ONLY" != " " && "$ONLY" != *" $name "* ]]; then
    status[$name]="SKIPPED"; secs[$name]=0; notes[$name]="not selected (--skip / --only)"
    return
  fi
  printf '\n=== %s: %s ===\n' "$name" "$*"
  local t0=$SECONDS rc
  "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  secs[$name]=$((SECONDS - t0))
  if ((rc == 0)); then status[$name]="PASS"; else status[$name]="FAIL (exit $rc)"; fi
  # the pytest closing line or the script's last line, as a note
  notes[$name]="$(grep -E '^(=+ )?[0-9]+ (passed|failed|skipped|error)' "$OUT/$name.log" | tail -1 |
    sed 's/=//g; s/^ *//')"
  [[ -n "${notes[$name]}" ]] || notes[$name]="$(grep -v '^\s*$' "$OUT/$name.log" | tail -1 | cut -c1-100)"
}

PYTEST=("$PY" -m pytest -q -rs -p no:cacheprovider --durations=15)

run_step kernels "${PYTEST[@]}" tests/test_cuda_kernels.py --junitxml="$OUT/test_cuda_kernels.xml"
run_step codec "${PYTEST[@]}" -m gpu tests/test_codec.py --junitxml="$OUT/test_codec_gpu.xml"
run_step parallel "${PYTEST[@]}" -m gpu tests/test_parallel_layers.py --junitxml="$OUT/test_parallel_gpu.xml"
run_step host-path "${PYTEST[@]}" tests/test_gpu.py -k host_path --junitxml="$OUT/test_host_path_gpu.xml"
run_step gpu-tests "${PYTEST[@]}" tests/test_gpu.py -k "not host_path" --junitxml="$OUT/test_gpu.xml"
run_step sanitize env PYTHON="$PY" bash scripts/gpu_sanitize.sh
if [[ "${status[sanitize]}" == "FAIL (exit 2)" ]]; then
  status[sanitize]="NOT RUN"  # compute-sanitizer not installed: said in the log, not a failure of plait
fi
if ((QUICK)); then
  run_step bench-kernels "$PY" bench/gpu_kernels.py --sizes 1M,16M,256M --json "$OUT/gpu_kernels.json"
  run_step bench-allreduce "$PY" bench/gpu_allreduce.py --sizes 4,1K,64K,1M,16M,256M --latency-iters 200 \
    --json "$OUT/gpu_allreduce.json"
  run_step bench-host-path "$PY" bench/gpu_host_path.py --quick --json "$OUT/gpu_host_path.json"
else
  run_step bench-kernels "$PY" bench/gpu_kernels.py --json "$OUT/gpu_kernels.json"
  run_step bench-allreduce "$PY" bench/gpu_allreduce.py --json "$OUT/gpu_allreduce.json"
  run_step bench-host-path "$PY" bench/gpu_host_path.py --json "$OUT/gpu_host_path.json"
fi

failed=0
for n in "${names[@]}"; do
  [[ "${status[$n]}" == FAIL* ]] && failed=1
done
{
  printf '\n=== gpu_checks summary (%s; outputs in %s) ===\n' "$(grep -m1 '^python ' "$OUT/env.txt" || hostname)" "$OUT"
  printf '%-16s %-16s %6s  %s\n' step status seconds note
  for n in "${names[@]}"; do
    printf '%-16s %-16s %6s  %s\n' "$n" "${status[$n]}" "${secs[$n]}" "${notes[$n]}"
  done
  for f in test_cuda_kernels.xml test_codec_gpu.xml test_parallel_gpu.xml test_host_path_gpu.xml test_gpu.xml gpu_kernels.json gpu_allreduce.json gpu_host_path.json; do
    [[ -f "$OUT/$f" ]] && echo "wrote $OUT/$f"
  done
  if [[ -f "$OUT/bench-allreduce.log" ]]; then
    grep -E '^# [0-9]+ ranks: 4-byte' "$OUT/bench-allreduce.log" || true
  fi
  ((failed)) && echo "RESULT: FAILED" || echo "RESULT: all steps passed"
} | tee "$OUT/summary.txt"
exit $failed
