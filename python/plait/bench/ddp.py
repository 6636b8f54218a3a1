"""plait-bench ddp: DDP training-step time of comm-heavy models, plait beside gloo, in the same processes.

Models: an MLP of ~25M parameters (1024 -> 4096 -> 4096 -> 1024, ~100 MB of float32 gradients per step)
and a small transformer (nn.TransformerEncoder, 4 layers, d_model 256, 4 heads, ff 1024, ~3.2M parameters).
Each model is wrapped once per backend (DistributedDataParallel(process_group=...), same initial weights).

Method. One step = zero_grad, forward, loss, backward (DDP all-reduces the gradient buckets, overlapped with
the backward pass), SGD step. Per backend: --warmup untimed steps, then --steps timed steps with gradient sync
and --steps timed steps inside ``ddp.no_sync()`` (identical compute, no communication). Each step is timed on
its own, the per-step max across ranks is taken on a gloo control group outside the timed loop, and the median
is reported. comm share = 1 - compute / step: the part of the step that gradient synchronisation adds, i.e.
the communication that is NOT hidden behind the backward pass (exposed communication). Backends are
interleaved step-block by step-block (plait, gloo, plait, gloo, ...) so both see the same machine state.

--compression int8[,int4,...]: the plait backend runs once per codec, labelled "plait/<codec>", with
plait.hooks.compressed_allreduce_hook registered (CompressionState(compression=<codec>, start_iter=0), error
feedback on, default min_bytes); "none" is plait without a hook.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import time


def parse_args(argv):
    p = argparse.ArgumentParser(prog="plait-bench ddp", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", help="mlp, transformer (comma list; default both)")
    p.add_argument("--backend", default="plait,gloo", help="comma list of backends (speed-up column: vs gloo, "
                                                          "or vs uncompressed plait when gloo is not run)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per backend and mode (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per backend first (default 2)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved blocks per backend (steps split across them)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--compression", default=None, help="comma list of none, int8, int4, fp8, bf16: plait rows "
                                                         "with the compressed DDP hook (start_iter=0)")
    p.add_argument("--nproc", type=int, default=2, help="ranks to spawn when not launched by torchrun")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--_status", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    models = []
    for m in args.model or ["mlp,transformer"]:
        for x in m.split(","):
            x = x.strip()
            if x and x not in ("mlp", "transformer"):
                p.error(f"--model: unknown {x!r}")
            if x and x not in models:
                models.append(x)
    args.models = models
    args.backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    comps = [c.strip() for c in (args.compression or "").split(",") if c.strip()]
    for c in comps:
        if c not in ("none", "int8", "int4", "fp8", "bf16"):
            p.error(f"--compression: unknown {c!r}")
    if comps and "plait" not in args.backends:
        p.error("--compression needs the plait backend")
    # (label, backend, codec or None); codec rows replace the plain plait row
    args.variants = []
    for b in args.backends:
        if b == "plait" and comps:
            args.variants += [("plait" if c == "none" else f"plait/{c}", b, None if c == "none" else c)
                              for c in comps]
        else:
            args.variants.append((b, b, None))
    return args


def build(name, seed=0):
    import torch
    import torch.nn as nn

    torch.manual_seed(seed)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),
                              nn.Linear(4096, 1024))

        def batch(bs, gen):
            return torch.randn(bs, 1024, generator=gen), torch.randn(bs, 1024, generator=gen)

        return model, batch, nn.MSELoss()

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            layer = nn.TransformerEncoderLayer(256, 4, dim_feedforward=1024, dropout=0.0, batch_first=True)
            self.enc = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
            self.head = nn.Linear(256, 256)

        def forward(self, x):
            return self.head(self.enc(x))

    def batch(bs, gen):
        return torch.randn(bs, 64, 256, generator=gen), torch.randn(bs, 64, 256, generator=gen)

    return Tiny(), batch, nn.MSELoss()


def worker(args):
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import plait  # noqa: F401

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    rank, world = dist.get_rank(), dist.get_world_size()
    ctl = dist.group.WORLD
    groups = {}
    for b in args.backends:
        groups[b] = dist.new_group(backend=b, timeout=datetime.timedelta(seconds=120))

    def timed_steps(ddp, opt, loss_fn, data, n, sync):
        times = []
        for i in range(n):
            x, y = data[i % len(data)]
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            if sync:
                loss_fn(ddp(x), y).backward()
            else:
                with ddp.no_sync():
                    loss_fn(ddp(x), y).backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        return times

    rows = []
    labels = [v[0] for v in args.variants]
    for name in args.models:
        gen = torch.Generator().manual_seed(1234 + rank)
        wrapped = {}
        for label, b, codec in args.variants:
            model, make_batch, loss_fn = build(name)
            ddp = DDP(model, process_group=groups[b])
            if codec is not None:
                ddp.register_comm_hook(plait.hooks.CompressionState(compression=codec, start_iter=0,
                                                                    process_group=groups[b]),
                                       plait.hooks.compressed_allreduce_hook)
            opt = torch.optim.SGD(ddp.parameters(), lr=1e-4)
            wrapped[label] = (ddp, opt, loss_fn)
        data = [make_batch(args.batch, gen) for _ in range(4)]
        nparams = sum(p.numel() for p in model.parameters())
        for b in labels:  # warm-up
            ddp, opt, loss_fn = wrapped[b]
            timed_steps(ddp, opt, loss_fn, data, args.warmup, True)
            timed_steps(ddp, opt, loss_fn, data, 1, False)
        per = {b: {"step": [], "compute": []} for b in labels}
        rounds = max(1, min(args.rounds, args.steps))
        for r in range(rounds):
            n = args.steps // rounds + (1 if r < args.steps % rounds else 0)
            for b in labels:
                ddp, opt, loss_fn = wrapped[b]
                dist.barrier(group=ctl)
                per[b]["step"] += timed_steps(ddp, opt, loss_fn, data, n, True)
                dist.barrier(group=ctl)
                per[b]["compute"] += timed_steps(ddp, opt, loss_fn, data, n, False)
        for b in labels:
            out = {}
            for mode, ts in per[b].items():
                t = torch.tensor(ts, dtype=torch.float64)
                dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ctl)  # per-step max across ranks
                out[mode] = statistics.median(t.tolist())
            rows.append({"model": name, "params": nparams, "backend": b, "step_ms": out["step"] * 1e3,
                         "compute_ms": out["compute"] * 1e3,
                         "comm_share": max(0.0, 1 - out["compute"] / out["step"]), "steps": args.steps,
                         "batch": args.batch})
        del wrapped

    if rank == 0:
        # speed-up reference: gloo when it ran, else uncompressed plait (not the last codec row)
        ref = "gloo" if "gloo" in labels else "plait" if "plait" in labels else labels[-1]
        print(f"\n# plait-bench ddp: world {world}, batch {args.batch}, {args.steps} steps, host {socket.gethostname()}, "
              f"torch {torch.__version__}")
        print("# step = median per-step max across ranks (zero_grad+fwd+bwd+SGD); compute = same step under "
              "no_sync(); comm share = 1 - compute/step (exposed communication)")
        widths = (13, 12, 12, 10, 12, 12, 12)
        head = ("model", "params", "backend", "step(ms)", "compute(ms)", "comm share", f"vs {ref}")
        print("#" + "".join(f"{c:>{w}}" for c, w in zip(head, widths))[1:])
        for r in rows:
            base = next(x for x in rows if x["model"] == r["model"] and x["backend"] == ref)
            r["speedup_vs_" + ref] = base["step_ms"] / r["step_ms"]
            cells = (r["model"], f"{r['params'] / 1e6:.1f}M", r["backend"], f"{r['step_ms']:.1f}",
                     f"{r['compute_ms']:.1f}", f"{100 * r['comm_share']:.0f}%", f"{base['step_ms'] / r['step_ms']:.2f}x")
            print("".join(f"{str(c):>{w}}" for c, w in zip(cells, widths)))
        sys.stdout.flush()
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": {"host": socket.gethostname(), "torch_version": torch.__version__,
                                    "plait_version": plait.__version__, "world_size": world,
                                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                                    "argv": list(sys.argv)}, "results": rows}, f, indent=2)
        if args._status:
            with open(args._status, "w") as f:
                f.write("0")
    dist.barrier(group=ctl)
    dist.destroy_process_group()
    return 0


def _spawn_entry(rank, world, port, args):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    worker(args)


def main(argv=None):
    from .cli import launch

    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return worker(args)
    return launch(_spawn_entry, args, args.nproc)
