"""Pipeline bubble: a step's measured time against the schedule's ideal, for plait.parallel.pipeline's GPipe and
1F1B (and torch.distributed.pipelining's ScheduleGPipe / Schedule1F1B on the same stages), on the plait backend.

S stages (one rank each), M micro-batches. First every rank measures its stage *alone* (no communication): the
forward + backward time of one micro-batch, ``t_f + t_b`` (median of repeats). Then, with ``t = max over stages``:

- ideal step   = (M + S - 1) * t   (the schedule's fill and drain: the bubble of S - 1 slots; GPipe and 1F1B alike)
- no-bubble    =  M * t            (what a perfect pipeline without fill/drain would take)
- measured     = median over N steps of the wall time of ``Pipeline.step`` (all ranks start together after a barrier;
                 the step ends when the loss broadcast returns on every rank, the slowest rank's time is taken)

``measured / ideal`` is the schedule's overhead beyond its inherent bubble (messages, headers, Python).

This machine has 2 cores for 4 ranks, so CPU-bound stages would compete for cores and the "ideal" (measured alone)
would not hold when all four run at once. The default work is therefore **sleep-bound**: each stage is a layer whose
forward sleeps ``--fwd-ms`` and whose backward sleeps ``--bwd-ms`` (a custom autograd Function around a tiny
Linear), which occupies wall time but no core, as a stage on its own accelerator would. ``--work cpu`` runs
CPU-bound Linear+Tanh stages instead and reports the same columns; there the measured time reflects 4 processes
sharing 2 cores (the honest result on this machine, not a property of the schedule).

    python bench/parallel_pipeline.py                          # 4 stages, 8 micro-batches, sleep-bound, 20 steps
    python bench/parallel_pipeline.py --work cpu --hidden 256  # CPU-bound stages
    python bench/parallel_pipeline.py --stages 4 --micro 8 --steps 30 --fwd-ms 10 --bwd-ms 20
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F


class _SleepFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fwd_s, bwd_s):
        ctx.bwd_s = bwd_s
        time.sleep(fwd_s)
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        time.sleep(ctx.bwd_s)
        return g, None, None


class SleepLayer(nn.Module):
    """A Linear whose forward additionally sleeps fwd_s and whose backward sleeps bwd_s (wall time, no core)."""

    def __init__(self, width, fwd_s, bwd_s):
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.fwd_s, self.bwd_s = fwd_s, bwd_s

    def forward(self, x):
        return _SleepFn.apply(self.lin(x), self.fwd_s, self.bwd_s)


def build_model(a):
    torch.manual_seed(0)
    layers = []
    for _ in range(a.stages):
        if a.work == "sleep":
            layers.append(SleepLayer(a.hidden, a.fwd_ms / 1e3, a.bwd_ms / 1e3))
        else:
            for _ in range(a.cpu_layers):
                layers += [nn.Linear(a.hidden, a.hidden), nn.Tanh()]
    return nn.Sequential(*layers)


def worker(rank, world, path, a, out):
    import plait  # noqa: F401  (registers the backend)
    from plait.parallel.pipeline import Pipeline

    torch.set_num_threads(1)
    dist.init_process_group("plait", init_method=f"file://{path}", rank=rank, world_size=world)
    M, S = a.micro, world
    per = len(build_model(a)) // S
    g = torch.Generator().manual_seed(1)
    x = torch.randn(M * a.mb_size, a.hidden, generator=g)
    y = torch.randn(M * a.mb_size, a.hidden, generator=g)

    # 1. this stage alone: forward + backward of one micro-batch (the input gradient too, as in the pipeline)
    pipe = Pipeline(build_model(a), balance=[per] * S)
    xs = torch.randn(a.mb_size, a.hidden, generator=g)
    alone = []
    for i in range(a.warmup + a.steps):
        xin = xs.clone().requires_grad_(rank > 0)
        t0 = time.perf_counter()
        o = pipe.stage(xin)
        o.backward(torch.ones_like(o))
        if i >= a.warmup:
            alone.append(time.perf_counter() - t0)
    t_alone = torch.tensor([statistics.median(alone)], dtype=torch.float64)
    all_alone = [torch.zeros(1, dtype=torch.float64) for _ in range(S)]
    dist.all_gather(all_alone, t_alone)
    pipe.zero_grad()

    def timed(step_fn):
        times = []
        for i in range(a.warmup + a.steps):
            dist.barrier()
            t0 = time.perf_counter()
            step_fn()
            dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            if i >= a.warmup:
                times.append(float(dt))
        return statistics.median(times)

    res = {"alone": [float(t) for t in all_alone]}
    for sched in ("gpipe", "1f1b"):
        res[f"plait.parallel {sched}"] = timed(lambda: pipe.step(x if rank == 0 else None,
                                                                 y if rank == S - 1 else None,
                                                                 loss_fn=F.mse_loss, chunks=M, schedule=sched))
    if a.torch_pipelining:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        for name, cls in (("gpipe", ScheduleGPipe), ("1f1b", Schedule1F1B)):
            stage = PipelineStage(pipe.stage, rank, S, torch.device("cpu"))
            sch = cls(stage, n_microbatches=M, loss_fn=F.mse_loss)

            def run():
                if rank == 0:
                    sch.step(x)
                elif rank == S - 1:
                    sch.step(target=y, losses=[])
                else:
                    sch.step()

            res[f"torch.distributed.pipelining {name}"] = timed(run)
    if rank == 0:
        out.update(res)
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--mb-size", type=int, default=4, help="samples per micro-batch")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--work", choices=["sleep", "cpu"], default="sleep")
    p.add_argument("--fwd-ms", type=float, default=10.0)
    p.add_argument("--bwd-ms", type=float, default=20.0)
    p.add_argument("--cpu-layers", type=int, default=4, help="Linear+Tanh pairs per stage with --work cpu")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-torch-pipelining", dest="torch_pipelining", action="store_false")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        mgr = mp.Manager()
        out = mgr.dict()
        mp.start_processes(worker, args=(a.stages, os.path.join(d, "store"), a, out), nprocs=a.stages, join=True,
                           start_method="spawn")
        res = dict(out)
    S, M = a.stages, a.micro
    t = max(res.pop("alone"))
    ideal, perfect = (M + S - 1) * t, M * t
    work = (f"sleep-bound: forward {a.fwd_ms:g} ms + backward {a.bwd_ms:g} ms per stage and micro-batch"
            if a.work == "sleep" else
            f"CPU-bound: {a.cpu_layers} x (Linear({a.hidden}, {a.hidden}) + Tanh) per stage, "
            f"{a.mb_size} samples per micro-batch, {S} ranks on {os.cpu_count()} cores")
    print(f"{S} stages, {M} micro-batches, {work}; median of {a.steps} steps\n")
    print(f"max stage t_f + t_b alone: {t * 1e3:.2f} ms; ideal (M + S - 1) * t = {ideal * 1e3:.1f} ms; "
          f"no-bubble M * t = {perfect * 1e3:.1f} ms; ideal bubble fraction (S - 1) / (M + S - 1) = "
          f"{(S - 1) / (M + S - 1):.1%}\n")
    print("| schedule | measured step (ms) | ideal (ms) | measured / ideal | measured / no-bubble |")
    print("|---|---:|---:|---:|---:|")
    for name, v in res.items():
        print(f"| {name} | {v * 1e3:.1f} | {ideal * 1e3:.1f} | {v / ideal:.3f} | {v / perfect:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
