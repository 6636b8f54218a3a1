#!/usr/bin/env bash
# The main job: set up, train a small model with DDP on plait (2 processes via torchrun), then benchmark
# all-reduce on plait beside Gloo in the same run. Takes about 1-3 minutes on a 2-core machine.
#
#   bash scripts/main.sh
#
# Results (JSON) go to build/bench/. Knobs: PLAIT_SKIP_SETUP=1 (skip scripts/setup.sh), PLAIT_BENCH_SIZES
# (default 4,1K,64K,1M,16M,64M,256M), PLAIT_BENCH_ALGOS=0 (skip the forced-algorithm sweep),
# PLAIT_BENCH_MPI=0 (skip the OpenMPI peer, which runs only when mpirun and mpi4py are installed; see
# bench/mpi_allreduce.py).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
[[ "${PLAIT_SKIP_SETUP:-0}" == "1" ]] || bash scripts/setup.sh

PY="$ROOT/.venv/bin/python"
TORCHRUN="$ROOT/.venv/bin/torchrun"
OUT="$ROOT/build/bench"
mkdir -p "$OUT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # also silences torchrun's warning about it
SIZES="${PLAIT_BENCH_SIZES:-4,1K,64K,1M,16M,64M,256M}"
section() { printf '\n=== %s ===\n' "$*"; }

section "DDP training, 2 ranks, backend plait (examples/ddp_train.py)"
"$TORCHRUN" --standalone --nproc-per-node 2 examples/ddp_train.py --backend plait

section "same script on gloo, for comparison (checksums agree up to float rounding)"
"$TORCHRUN" --standalone --nproc-per-node 2 examples/ddp_train.py --backend gloo

section "all_reduce: plait beside gloo, 2 ranks, float32 (bench/allreduce.py)"
"$TORCHRUN" --standalone --nproc-per-node 2 bench/allreduce.py \
  --sizes "$SIZES" --json "$OUT/allreduce.json"

if [[ "${PLAIT_BENCH_ALGOS:-1}" != "0" ]]; then
  section "all_reduce: plait with each algorithm forced (plait.Options(algo=...)), up to 16 MiB"
  "$TORCHRUN" --standalone --nproc-per-node 2 bench/allreduce.py \
    --sizes 4,1K,64K,1M,16M --algo ring,tree,direct,auto --json "$OUT/allreduce_algos.json"
fi

if [[ "${PLAIT_BENCH_MPI:-1}" != "0" ]] && command -v mpirun >/dev/null && "$PY" -c 'import mpi4py' 2>/dev/null; then
  section "peer: OpenMPI all_reduce via mpi4py, 2 ranks (bench/mpi_allreduce.py)"
  mpirun --allow-run-as-root --oversubscribe -np 2 "$PY" bench/mpi_allreduce.py \
    --sizes "$SIZES" --json "$OUT/mpi_allreduce.json" \
    || echo "(OpenMPI peer failed; it is optional)"
fi

section "done; JSON results in build/bench/"
