"""OpenMPI all-reduce peer for plait's benchmark: float32 on CPU via mpi4py (shared memory on one host).

Measured the same way as ``bench/allreduce.py``: an exact correctness check first (integer-valued data),
then per-iteration timings, max across ranks per iteration, median over iterations; algbw and
busbw = algbw * 2(n-1)/n.

One-time set-up (not needed by CI or the tests):

    apt-get update && apt-get install -y openmpi-bin libopenmpi-dev
    .venv/bin/pip install mpi4py

Run (as root inside a container you need both flags):

    mpirun --allow-run-as-root --oversubscribe -np 2 .venv/bin/python bench/mpi_allreduce.py
    mpirun ... bench/mpi_allreduce.py --sizes 4,1K,1M --json mpi.json
"""
import argparse
import json
import statistics
import sys
import time

import numpy as np
from mpi4py import MPI

from _sizes import DEFAULT_SIZES, fmt_bw, human, parse_size  # bench/_sizes.py









def default_iters(nbytes):
    if nbytes <= 1 << 16:
        return 200
    if nbytes <= 1 << 20:
        return 50
    if nbytes <= 1 << 24:
        return 10
    return 4


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=DEFAULT_SIZES, help="comma-separated byte sizes (K/M/G suffixes)")
    p.add_argument("--iters", type=int, default=0, help="timed iterations per size (0 = by size)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", default=None, help="write results to this file (rank 0)")
    args = p.parse_args()

    comm = MPI.COMM_WORLD
    rank, n = comm.Get_rank(), comm.Get_size()
    results = []
    for nbytes in [parse_size(s) for s in args.sizes.split(",") if s.strip()]:
        count = max(1, nbytes // 4)
        nbytes = count * 4
        # Correctness: rank r contributes (i % 7) + r; the sum is exact in float32.
        x = (np.arange(count, dtype=np.int64) % 7).astype(np.float32) + rank
        y = np.empty_like(x)
        comm.Allreduce(x, y, op=MPI.SUM)
        want = (np.arange(count, dtype=np.int64) % 7).astype(np.float32) * n + n * (n - 1) / 2
        ok = bool(np.array_equal(y, want))
        if not comm.allreduce(ok, op=MPI.LAND):
            if rank == 0:
                print(f"mpi all-reduce WRONG at {human(nbytes)}", file=sys.stderr)
            sys.exit(1)

        for _ in range(args.warmup):
            comm.Allreduce(x, y, op=MPI.SUM)
        iters = args.iters or default_iters(nbytes)
        times = np.empty(iters, dtype=np.float64)
        comm.Barrier()
        for i in range(iters):
            t0 = time.perf_counter()
            comm.Allreduce(x, y, op=MPI.SUM)
            times[i] = time.perf_counter() - t0
        tmax = np.empty_like(times)
        comm.Allreduce(times, tmax, op=MPI.MAX)  # outside the timed loop
        t = statistics.median(tmax.tolist())
        algbw = nbytes / t / 1e9
        results.append({"bytes": nbytes, "iters": iters, "us": t * 1e6, "algbw_GBps": algbw,
                        "busbw_GBps": algbw * 2 * (n - 1) / n})

    if rank == 0:
        print(f"{MPI.Get_library_version().split(',')[0].strip()}, world size {n}, float32 sum\n")
        print("| size | mpi us | mpi algbw GB/s | mpi busbw GB/s |")
        print("| ---: | ---: | ---: | ---: |")
        for r in results:
            print(f"| {human(r['bytes'])} | {r['us']:.1f} | {fmt_bw(r['algbw_GBps'])} | {fmt_bw(r['busbw_GBps'])} |")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"peer": "mpi", "world_size": n, "dtype": "float32", "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
