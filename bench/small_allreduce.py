"""Small-message all-reduce cost, as a new user would measure it: loops of back-to-back synchronous calls on a
4-byte float32 tensor, best of several loops, microseconds per call.

Rows: ``plait.all_reduce(t)`` (plait's direct entry, no torch Python wrapper), ``dist.all_reduce(t)`` on the plait
group, the backend object's ``allreduce([t]).wait()``, and ``dist.all_reduce(t)`` on a Gloo group created in the same
processes. Every rank runs the same loops in the same order; a barrier separates them.

    python bench/small_allreduce.py                 # 2 ranks, 20000 calls per loop, best of 3
    python bench/small_allreduce.py --nproc 1 --calls 20000
"""
import argparse
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank, world, path, calls, loops, out):
    import plait
    dist.init_process_group("plait", init_method=f"file://{path}", rank=rank, world_size=world)
    gloo = dist.new_group(backend="gloo")
    t = torch.ones(1)
    backend = dist.group.WORLD._get_backend(torch.device("cpu"))
    cases = {
        "plait.all_reduce (plait)": lambda: plait.all_reduce(t),
        "dist.all_reduce (plait)": lambda: dist.all_reduce(t),
        "backend.allreduce([t]).wait() (plait)": lambda: backend.allreduce([t]).wait(),
        "dist.all_reduce (gloo)": lambda: dist.all_reduce(t, group=gloo),
    }
    res = {}
    for name, fn in cases.items():
        for _ in range(200):
            fn()
        best = float("inf")
        for _ in range(loops):
            dist.barrier(group=gloo)
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            best = min(best, (time.perf_counter() - t0) / calls * 1e6)
        res[name] = best
    if rank == 0:
        out.update(res)
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--calls", type=int, default=20000)
    p.add_argument("--loops", type=int, default=3)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        mgr = mp.Manager()
        out = mgr.dict()
        mp.start_processes(worker, args=(a.nproc, os.path.join(d, "store"), a.calls, a.loops, out), nprocs=a.nproc,
                           start_method="spawn")
        print(f"# 4-byte float32 all-reduce, world {a.nproc}, {a.calls} back-to-back calls per loop, best of "
              f"{a.loops}, rank 0's time per call")
        print("| call | µs per call |\n|---|---:|")
        for k, v in out.items():
            print(f"| {k} | {v:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
