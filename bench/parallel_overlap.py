"""Overlap of ColumnParallelLinear's input-gradient all-reduce with its weight-gradient GEMM.

    torchrun --standalone --nproc-per-node 2 bench/parallel_overlap.py             # plait
    BK=gloo torchrun --standalone --nproc-per-node 2 bench/parallel_overlap.py     # gloo

Backward of ColumnParallelLinear(1024, 4096) on 1024 tokens, TP = world size, one thread per rank: "async" is the
layer as shipped (the all-reduce is started, the weight gradient computed, then the all-reduce waited); "sync" swaps
``dist.all_reduce`` for one that completes before returning, so nothing overlaps. Alternating rounds, median of 20
backward passes each.
"""
import os, statistics, time

import torch
import torch.distributed as dist

import plait  # noqa: F401  (registers the backend)
from plait.parallel import ColumnParallelLinear
torch.set_num_threads(1)
dist.init_process_group(os.environ.get("BK", "plait"))
r = dist.get_rank()
layer = ColumnParallelLinear(1024, 4096)
x = torch.randn(1024, 1024, requires_grad=True)
orig = dist.all_reduce
class Done:
    def wait(self): return True
def sync_ar(t, *a, async_op=False, **k):
    orig(t, *a, **k)
    return Done() if async_op else None
res = {}
for mode in ["async", "sync"] * 4:  # alternate, 4 rounds of 5
    dist.all_reduce = orig if mode == "async" else sync_ar
    ts = []
    for _ in range(5):
        y = layer(x)
        dist.barrier()
        t0 = time.perf_counter()
        y.backward(torch.ones_like(y))
        ts.append(time.perf_counter() - t0)
        layer.zero_grad(); x.grad = None
    res.setdefault(mode, []).extend(ts)
dist.all_reduce = orig
if r == 0:
    for m, ts in res.items():
        print(m, f"median backward {statistics.median(ts)*1e3:.1f} ms")
dist.destroy_process_group()
