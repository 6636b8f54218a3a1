"""plait-bench: nccl-tests style microbenchmarks of torch.distributed collectives, several backends at once.

    plait-bench --op all_reduce -b 8 -e 256M -f 4 --backend plait,gloo        # spawns 2 local ranks
    plait-bench --op all_reduce,all_gather --algo ring,tree,direct --nproc 4
    torchrun --standalone --nproc-per-node 2 -m plait.bench --op broadcast -b 1K -e 1M
    plait-bench --device cuda --share-gpu --nproc 4 --backend plait,gloo -b 4 -e 1G -f 4   # 4 ranks on one GPU
    plait-bench ddp                                                            # DDP step time, plait vs gloo
    plait-bench --backend plait --compression none,int8,int4 -b 1M -e 64M     # compressed all-reduce, vNMSE column

Method (nccl-tests conventions). Every backend (and every forced plait algorithm) gets its own process group
in the same processes; the default group is gloo and carries only control traffic. For each op and size,
every implementation is first checked for exact correctness (-c rounds, integer-valued data), then timed,
one implementation after another at the same size (interleaved), so they all see the same machine state.
Each iteration is timed on its own; after the timed loop the per-iteration times are all-reduced with MAX
across ranks on the control group, and the reported time is the median over iterations of that maximum.
algbw = bytes / time; busbw = algbw * factor (all_reduce 2(n-1)/n; all_gather, reduce_scatter, all_to_all
(n-1)/n; broadcast, reduce 1). sendrecv is a ping-pong between ranks 0 and 1: time is half the round trip
(one-way latency) and busbw = algbw. "bytes" is the whole buffer: the all_reduce buffer, the all_gather
output, the reduce_scatter input, the all_to_all send buffer, the broadcast/reduce buffer, the message.

Compression (--compression none,int8,int4,fp8,bf16; all_reduce only): every value adds a plait row labelled
"plait/<codec>" that calls plait.all_reduce(..., compression=<codec>) on the plait group (per-call override; no
plain "plait" row then). Codec rows cannot be exact, so their check fills every rank with seeded Gaussian values
(the same on every rank for a given rank index), computes the exact reduction in float64 from all ranks' inputs
(as rounded to the dtype) and reports vNMSE = ||result - exact||^2 / ||exact||^2 over the -c rounds (worst round);
the row counts as wrong (#wrong 1) when vNMSE exceeds the codec's bound in VNMSE_BOUND. "plait/none" keeps the
exact integer check. time/algbw/busbw use the uncompressed buffer size, so a codec's speed-up shows in busbw.

CUDA (--device cuda): buffers live on cuda:LOCAL_RANK, or on cuda:0 for every rank with --share-gpu or when there
are more local ranks than GPUs (plait and gloo allow several ranks per GPU; nccl does not). Every timed iteration
ends with torch.cuda.synchronize() before the clock is read (a CUDA collective returns once it is enqueued), so a
time is the collective's completion on the GPU as seen by the host; the correctness check synchronizes too.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time

from .sizes import fmt_bw, human, parse_size, size_range

OPS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "reduce", "all_to_all", "sendrecv")
DTYPES = ("float32", "float64", "float16", "bfloat16", "int32", "int64", "int8", "uint8")
REDOPS = ("sum", "prod", "min", "max", "avg")
ALGOS = ("auto", "ring", "tree", "direct", "hier", "hier_ring", "hier_tree")
REDUCING = ("all_reduce", "reduce_scatter", "reduce")
CORRUPT_ENV = "PLAIT_BENCH_CORRUPT"
CODECS = ("none", "int8", "int4", "fp8", "bf16")
# Loose sanity bounds on the check's vNMSE (Gaussian inputs, two quantizations per element, default blocks):
# far above what a working codec gives (see docs/compression-error.md), far below a broken one (~1).
VNMSE_BOUND = {"int8": 1e-3, "int4": 5e-2, "fp8": 1e-2, "bf16": 1e-4}
COLUMNS = ("bytes", "count", "type", "redop", "backend", "time(us)", "algbw(GB/s)", "busbw(GB/s)", "#wrong",
           "ratio")


def bus_factor(op, world):
    if op == "all_reduce":
        return 2 * (world - 1) / world
    if op in ("all_gather", "reduce_scatter", "all_to_all"):
        return (world - 1) / world
    return 1.0


def _list(values, allowed, what):
    out = []
    for v in values or []:
        for item in v.split(","):
            item = item.strip()
            if not item:
                continue
            if allowed is not None and item not in allowed:
                raise argparse.ArgumentTypeError(f"{what}: unknown {item!r} (choose from {', '.join(allowed)})")
            if item not in out:
                out.append(item)
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="plait-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", action="append", help=f"operation(s), comma list or repeated: {', '.join(OPS)} "
                                                 "(default all_reduce)")
    p.add_argument("-b", "--minbytes", default="8", help="smallest size in bytes, K/M/G suffixes (default 8)")
    p.add_argument("-e", "--maxbytes", default="32M", help="largest size in bytes (default 32M)")
    p.add_argument("-f", "--stepfactor", type=int, default=2, help="multiply the size by this (default 2)")
    p.add_argument("-i", "--stepbytes", default="0", help="add this many bytes instead of -f (default 0: use -f)")
    p.add_argument("--sizes", default=None, help="comma-separated sizes in bytes (K/M/G suffixes); overrides "
                                                 "-b/-e/-f/-i")
    p.add_argument("-n", "--iters", type=int, default=0, help="timed iterations per size (0 = by size: 200 up "
                                                              "to 64K, fewer above)")
    p.add_argument("-w", "--warmup", type=int, default=-1, help="untimed iterations per size (-1 = by size)")
    p.add_argument("-c", "--check", type=int, default=1, help="correctness rounds before timing (0 = none)")
    p.add_argument("-d", "--dtype", default="float32", choices=DTYPES)
    p.add_argument("-o", "--redop", default="sum", choices=REDOPS)
    p.add_argument("--backend", action="append", help="backends, comma list: plait, gloo, nccl (CUDA only); "
                                                      "default plait,gloo")
    p.add_argument("--algo", action="append", help="plait algorithm(s) to force, each in its own group: "
                                                   "auto, ring, tree, direct, hier, hier_ring, hier_tree (default auto)")
    p.add_argument("--compression", action="append",
                   help="all_reduce: plait per-call compression(s), comma list of none, int8, int4, fp8, bf16; each "
                        "runs as its own row 'plait/<codec>' (vNMSE check for codecs; busbw from the uncompressed "
                        "size)")
    p.add_argument("--timing", default="iter", choices=("iter", "loop"),
                   help="iter: median over iterations of the per-iteration max across ranks (default); loop: "
                        "nccl-tests' average over back-to-back iterations, max across ranks")
    p.add_argument("--transport", default="auto", choices=("auto", "shm", "tcp"), help="plait transport")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--share-gpu", action="store_true", help="--device cuda: every rank uses cuda:0 (default: "
                                                             "cuda:LOCAL_RANK, or cuda:0 when ranks outnumber GPUs)")
    p.add_argument("--nproc", type=int, default=2, help="ranks to spawn when not launched by torchrun")
    p.add_argument("--json", default=None, help="write meta and all results to this JSON file")
    p.add_argument("--csv", default=None, help="write all result rows to this CSV file")
    p.add_argument("--plot", default=None, help="write a PNG: busbw vs size and small-size latency per op")
    p.add_argument("--progress", default="auto", choices=("auto", "on", "off"),
                   help="progress bar on stderr (auto: when stderr is a terminal and the sweep is long)")
    p.add_argument("--_corrupt", action="store_true", help=argparse.SUPPRESS)  # test hook: one wrong element
    p.add_argument("--_status", default=None, help=argparse.SUPPRESS)  # spawn mode: rank 0 writes exit code
    args = p.parse_args(argv)
    try:
        args.ops = _list(args.op or ["all_reduce"], OPS, "--op")
        args.backends = _list(args.backend or ["plait,gloo"], ("plait", "gloo", "nccl", "mpi"), "--backend")
        args.algos = _list(args.algo or ["auto"], ALGOS, "--algo")
        args.compressions = _list(args.compression, CODECS, "--compression")
        if args.sizes:
            args.sizes = sorted({parse_size(x) for x in args.sizes.split(",") if x.strip()})
            if not args.sizes or args.sizes[0] <= 0:
                raise ValueError(f"--sizes: no positive sizes in {args.sizes!r}")
        else:
            args.sizes = size_range(args.minbytes, args.maxbytes, args.stepfactor, parse_size(args.stepbytes))
    except (argparse.ArgumentTypeError, ValueError) as e:
        p.error(str(e))
    if args.iters < 0:
        p.error("--iters must be >= 0")
    if "nccl" in args.backends and args.device != "cuda":
        p.error("--backend nccl needs --device cuda")
    if "nccl" in args.backends and args.share_gpu:
        p.error("--backend nccl cannot share one GPU between ranks (NCCL refuses duplicate GPUs); drop --share-gpu")
    if args.compressions and "plait" not in args.backends:
        p.error("--compression needs the plait backend")
    if args.compressions and args.device != "cpu":
        p.error("--compression: plait compresses host (cpu) tensors only")
    args.corrupt = args._corrupt or os.environ.get(CORRUPT_ENV, "0") not in ("", "0")
    return args


def default_iters(nbytes):
    if nbytes <= 1 << 16:
        return 200
    if nbytes <= 1 << 20:
        return 40
    if nbytes <= 1 << 24:
        return 10
    if nbytes <= 1 << 26:
        return 5
    return 3


def default_warmup(nbytes):
    return 5 if nbytes <= 1 << 20 else 1


# --------------------------------------------------------------------------------------------- data
# Integer-valued patterns small enough to be exact in every dtype (int8 and bfloat16 included) for any
# reduction over up to ~60 ranks; the expected result is computed in int32 and cast to the dtype.
def _pattern(kind, n, rank, world, start=0):
    import torch

    i = torch.arange(start, start + n, dtype=torch.int32)
    if kind == "data":  # non-reducing ops: value depends on rank and position
        return (i * 3 + rank).remainder_(11)
    if kind == "sum":
        return (i + rank).remainder_(3)
    if kind == "avg":  # multiples of world size, so the average is an exact integer
        return (i + rank).remainder_(3).mul_(world)
    if kind == "prod":  # one rank contributes 2 at most positions, all others 1
        return torch.where(i.remainder_(world + 1) == rank, 2, 1).to(torch.int32)
    return (i + 2 * rank).remainder_(5)  # min, max


def _reduced(redop, n, world, start=0):
    import torch

    acc = _pattern(redop, n, 0, world, start)
    for r in range(1, world):
        x = _pattern(redop, n, r, world, start)
        if redop in ("sum", "avg"):
            acc += x
        elif redop == "prod":
            acc *= x
        elif redop == "min":
            torch.minimum(acc, x, out=acc)
        else:
            torch.maximum(acc, x, out=acc)
    if redop == "avg":
        acc //= world
    return acc


def _all_gather(out, inp, group):
    import torch.distributed as dist

    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in newer torch
    fn(out, inp, group=group)


def _reduce_scatter(out, inp, op, group):
    import torch.distributed as dist

    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, inp, op=op, group=group)


class Case:
    """Buffers for one op at one size; run(group) does one collective, check(group) returns wrong elements."""

    def __init__(self, op, nbytes, world, rank, dtype, redop, device):
        import torch
        import torch.distributed as dist

        self.op, self.world, self.rank, self.redop = op, world, rank, redop
        self.dtype, self.device = dtype, device
        es = torch.empty((), dtype=dtype).element_size()
        count = max(1, nbytes // es)
        if op in ("all_gather", "reduce_scatter", "all_to_all"):
            count = max(world, count - count % world)
        self.count, self.nbytes, self.chunk = count, count * es, count // world
        self.rop = {"sum": dist.ReduceOp.SUM, "prod": dist.ReduceOp.PRODUCT, "min": dist.ReduceOp.MIN,
                    "max": dist.ReduceOp.MAX, "avg": dist.ReduceOp.AVG}[redop]
        if op == "all_gather":
            self.inp = torch.empty(self.chunk, dtype=dtype, device=device)
            self.out = torch.empty(count, dtype=dtype, device=device)
        elif op == "reduce_scatter":
            self.inp = torch.empty(count, dtype=dtype, device=device)
            self.out = torch.empty(self.chunk, dtype=dtype, device=device)
        elif op in ("all_to_all", "sendrecv"):
            self.inp = torch.empty(count, dtype=dtype, device=device)
            self.out = torch.empty(count, dtype=dtype, device=device)
        else:
            self.inp = self.out = torch.empty(count, dtype=dtype, device=device)

    def zero(self):
        self.inp.zero_()
        self.out.zero_()

    def run(self, group, compression=None):
        import torch.distributed as dist

        op = self.op
        if op == "all_reduce" and compression is not None:
            import plait

            plait.all_reduce(self.inp, op=self.rop, group=group, compression=compression)
        elif op == "all_reduce":
            dist.all_reduce(self.inp, op=self.rop, group=group)
        elif op == "all_gather":
            _all_gather(self.out, self.inp, group=group)
        elif op == "reduce_scatter":
            _reduce_scatter(self.out, self.inp, op=self.rop, group=group)
        elif op == "broadcast":
            dist.broadcast(self.inp, src=0, group=group)
        elif op == "reduce":
            dist.reduce(self.inp, dst=0, op=self.rop, group=group)
        elif op == "all_to_all":
            dist.all_to_all_single(self.out, self.inp, group=group)
        elif op == "sendrecv":  # ping-pong: 0 -> 1 -> 0
            if self.rank == 0:
                dist.send(self.inp, dst=1, group=group)
                dist.recv(self.out, src=1, group=group)
            elif self.rank == 1:
                dist.recv(self.out, src=0, group=group)
                dist.send(self.inp, dst=0, group=group)

    def check(self, group, corrupt=False, compression=None):
        """Fill with a pattern, run once, compare exactly. Returns the number of wrong elements on this rank."""
        import torch

        op, world, rank, n = self.op, self.world, self.rank, self.count
        kind = self.redop if op in REDUCING else "data"

        def put(t, v):
            t.copy_(v.to(self.dtype))

        if op == "all_gather":
            put(self.inp, _pattern("data", self.chunk, rank, world))
            want = torch.cat([_pattern("data", self.chunk, r, world) for r in range(world)])
        elif op == "reduce_scatter":
            put(self.inp, _pattern(kind, n, rank, world))
            want = _reduced(kind, self.chunk, world, start=rank * self.chunk)
        elif op == "all_to_all":
            put(self.inp, _pattern("data", n, rank, world))
            want = torch.cat([_pattern("data", self.chunk, r, world, start=rank * self.chunk)
                              for r in range(world)])
        elif op == "broadcast":
            put(self.inp, _pattern("data", n, rank, world))
            want = _pattern("data", n, 0, world)
        elif op in ("all_reduce", "reduce"):
            put(self.inp, _pattern(kind, n, rank, world))
            want = _reduced(kind, n, world) if (op == "all_reduce" or rank == 0) else None
        else:  # sendrecv: rank 1 receives rank 0's data, rank 0 gets rank 1's back
            put(self.inp, _pattern("data", n, rank, world))
            self.out.zero_()
            want = _pattern("data", n, 1 - rank, world) if rank < 2 else None
        self.run(group, compression if op == "all_reduce" else None)
        if self.device != "cpu":
            torch.cuda.synchronize()
        if want is None:
            return 0
        got = self.out
        if corrupt:
            got.view(-1)[0] += 1
        return int((got.cpu() != want.to(self.dtype)).sum().item())

    def vnmse(self, group, compression, seed=0):
        """Compressed all_reduce check: seeded Gaussian inputs, vNMSE of the result against the exact (float64)
        reduction of every rank's input as rounded to the dtype."""
        import torch

        def inp(r):
            g = torch.Generator().manual_seed(1000003 * (seed + 1) + r)
            return torch.randn(self.count, generator=g).to(self.dtype)

        self.inp.copy_(inp(self.rank))
        self.run(group, compression)
        exact = torch.zeros(self.count, dtype=torch.float64)
        for r in range(self.world):
            exact += inp(r).double()
        if self.redop == "avg":
            exact /= self.world
        err = (self.out.double() - exact).pow_(2).sum().item()
        ref = exact.pow_(2).sum().item()
        return err / ref if ref > 0 else float(err > 0)


# ----------------------------------------------------------------------------------------- progress
class Progress:
    def __init__(self, total, enabled):
        self.total, self.done, self.enabled = total, 0, enabled
        self.t0 = time.perf_counter()

    def step(self, label):
        self.done += 1
        if not self.enabled:
            return
        width = 30
        fill = int(width * self.done / max(1, self.total))
        el = time.perf_counter() - self.t0
        sys.stderr.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} {el:5.0f}s {label:<40}")
        sys.stderr.flush()

    def close(self):
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


# ------------------------------------------------------------------------------------------ measuring
def _timed(case, group, iters, warmup, ctl, sync, loop=False, compression=None):
    import torch
    import torch.distributed as dist

    case.zero()
    if compression not in (None, "none"):
        case.inp.normal_()  # realistic values for the codec (all-zero blocks could take shortcuts)
    for _ in range(warmup):
        case.run(group, compression)
    sync()
    if loop:
        # nccl-tests' method: the iterations back to back, total time / iterations, max across ranks.
        dist.barrier(group=ctl)
        t0 = time.perf_counter()
        for _ in range(iters):
            case.run(group, compression)
        sync()
        total = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(total, op=dist.ReduceOp.MAX, group=ctl)
        return [total.item() / iters]
    times = torch.zeros(iters, dtype=torch.float64)
    dist.barrier(group=ctl)
    for i in range(iters):
        t0 = time.perf_counter()
        case.run(group, compression)
        sync()
        times[i] = time.perf_counter() - t0
    dist.all_reduce(times, op=dist.ReduceOp.MAX, group=ctl)  # max across ranks, outside the timed loop
    return times.tolist()


def _make_groups(args, world):
    import datetime as dt

    import torch.distributed as dist

    impls = []  # (label, backend, algo, group, compression)
    timeout = dt.timedelta(seconds=120)
    for b in args.backends:
        if b == "plait":
            import plait

            for a in args.algos:
                label = "plait" if args.algos == ["auto"] else f"plait[{a}]"
                opts = plait.Options(algo=a, transport=args.transport)
                group = dist.new_group(backend="plait", pg_options=opts, timeout=timeout)
                if args.compressions:  # one row per per-call compression, same group
                    impls += [(f"{label}/{c}", "plait", a, group, c) for c in args.compressions]
                else:
                    impls.append((label, "plait", a, group, None))
        else:
            impls.append((b, b, None, dist.new_group(backend=b, timeout=timeout), None))
    return impls


def cuda_placement(share_gpu, local_rank, local_world, ngpus):
    """(device index, shared) for a rank: cuda:LOCAL_RANK, or cuda:0 for every rank when asked to share or when the
    local ranks outnumber the GPUs."""
    if ngpus < 1:
        raise RuntimeError("plait-bench: --device cuda but no CUDA device is visible (torch.cuda.device_count() is 0)")
    shared = bool(share_gpu) or local_world > ngpus
    return (0 if shared else local_rank), shared


def worker(args):
    import torch
    import torch.distributed as dist

    import plait  # noqa: F401  registers the backend

    torch.set_num_threads(1)  # ranks share the cores
    local = int(os.environ.get("LOCAL_RANK", "0"))
    args.gpu = None
    if args.device == "cuda":
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        index, shared = cuda_placement(args.share_gpu, local, local_world, torch.cuda.device_count())
        if shared and "nccl" in args.backends:
            raise SystemExit(f"plait-bench: {local_world} local ranks share cuda:0, which nccl refuses; drop "
                             "--backend nccl or run one rank per GPU")
        torch.cuda.set_device(index)
        args.gpu = {"index": index, "shared": shared, "name": torch.cuda.get_device_name(index),
                    "count": torch.cuda.device_count()}
        sync = torch.cuda.synchronize
    else:
        def sync():
            return None
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    rank, world = dist.get_rank(), dist.get_world_size()
    ctl = dist.group.WORLD
    impls = _make_groups(args, world)
    dtype = getattr(torch, args.dtype)
    ops = [o for o in args.ops if o != "sendrecv" or world >= 2]
    if len(ops) < len(args.ops) and rank == 0:
        print("sendrecv needs at least 2 ranks: skipped", file=sys.stderr)

    steps = len(ops) * len(args.sizes) * len(impls)
    show = args.progress == "on" or (args.progress == "auto" and sys.stderr.isatty() and steps >= 8)
    prog = Progress(steps, rank == 0 and show)
    results, unsupported = [], set()
    corrupt_pending = args.corrupt
    for op in ops:
        for size in args.sizes:
            case = Case(op, size, world, rank, dtype, args.redop, args.device)
            iters = args.iters or default_iters(case.nbytes)
            warmup = args.warmup if args.warmup >= 0 else default_warmup(case.nbytes)
            wrong, vnmse = {}, {}
            for label, _, _, group, comp in impls:  # correctness first, every implementation
                if (op, label) in unsupported:
                    continue
                bad, err = 0, ""
                coded = comp not in (None, "none") and op == "all_reduce"
                try:
                    for k in range(args.check):
                        if coded:  # vNMSE against the exact reduction instead of exact equality
                            v = case.vnmse(group, comp, seed=k)
                            vnmse[label] = max(vnmse.get(label, 0.0), v)
                            bad += int(not v <= VNMSE_BOUND[comp])
                        else:
                            bad += case.check(group, corrupt=corrupt_pending and rank == 0, compression=comp)
                            corrupt_pending = False
                except Exception as e:  # e.g. gloo has no AVG: agree across ranks, then skip it
                    err = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    bad = -1
                flags = torch.tensor([max(bad, 0), 1 if bad < 0 else 0], dtype=torch.int64)
                dist.all_reduce(flags, group=ctl)
                if flags[1].item():
                    unsupported.add((op, label))
                    if rank == 0:
                        print(f"{label}: {op} {args.dtype} {args.redop} not supported, skipped ({err or 'on another rank'})",
                              file=sys.stderr, flush=True)
                    continue
                wrong[label] = int(flags[0].item()) if args.check > 0 else None
            for label, backend, algo, group, comp in impls:  # then timing, interleaved at this size
                if (op, label) in unsupported:
                    prog.step(f"{op} {human(case.nbytes)} {label}")
                    continue
                times = _timed(case, group, iters, warmup, ctl, sync, loop=args.timing == "loop",
                               compression=comp if op == "all_reduce" else None)
                t = statistics.median(times)
                if op == "sendrecv":
                    t /= 2  # one way
                algbw = case.nbytes / t / 1e9 if t > 0 else 0.0
                row = {"op": op, "backend": label, "algo": algo, "bytes": case.nbytes,
                       "count": case.count, "dtype": args.dtype, "redop": args.redop if op in REDUCING
                       else None, "time_us": t * 1e6, "algbw": algbw,
                       "busbw": algbw * bus_factor(op, world), "wrong": wrong[label], "iters": iters}
                if comp is not None:
                    row["compression"] = comp
                    if label in vnmse:  # the worst round's vNMSE on this rank, max across ranks (identical results)
                        v = torch.tensor([vnmse[label]], dtype=torch.float64)
                        dist.all_reduce(v, op=dist.ReduceOp.MAX, group=ctl)
                        row["vnmse"] = v.item()
                if backend == "plait" and op == "all_reduce":
                    # What plait's cost model chose for this size and the time it predicted (for CUDA tensors: the
                    # device engine's model, which applies to groups on one host).
                    try:
                        p = plait.plan_allreduce(case.nbytes, group=group, device=args.device == "cuda",
                                                 dtype=dtype, compression=comp)
                        ran, one_shot, predicted, _ = p
                        row.update(plan=ran + (" one-shot" if ran == "direct" and one_shot else ""),
                                   predicted_us=predicted)
                        nserv = plait.topology(group)["servers"]["count"]
                        if nserv:  # summation servers (PLAIT_SERVERS): the mixed partition's share and model
                            row["servers"] = nserv
                            row["server_share"] = p.server_share
                            if p.server_share > 0:
                                row.update(plan=f"servers {p.server_share:.2f} + ring", predicted_us=p.servers_us)
                    except Exception:  # noqa: BLE001  (a model that does not apply: leave the plan out)
                        pass
                results.append(row)
                prog.step(f"{op} {human(case.nbytes)} {label}")
            del case
    prog.close()

    status = 1 if any(r["wrong"] for r in results) else 0
    if rank == 0:
        labels = [impl[0] for impl in impls]
        for op in ops:
            print_table(op, [r for r in results if r["op"] == op], labels, world, args)
        meta = _meta(args, world)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "results": results}, f, indent=2)
            print(f"# wrote {args.json}")
        if args.csv:
            write_csv(args.csv, results)
            print(f"# wrote {args.csv}")
        if args.plot:
            from .plot import plot

            plot(args.plot, results, meta)
            print(f"# wrote {args.plot}")
        if status:
            print(f"# FAILED: {sum(r['wrong'] for r in results if r['wrong'])} wrong element(s)")
        sys.stdout.flush()
        if args._status:
            with open(args._status, "w") as f:
                f.write(str(status))
    dist.barrier(group=ctl)  # nobody exits (and gets a launcher to kill rank 0) before the outputs are written
    dist.destroy_process_group()
    return status


def _meta(args, world):
    import torch

    import plait

    return {"host": socket.gethostname(), "torch_version": torch.__version__, "plait_version": plait.__version__,
            "world_size": world, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "dtype": args.dtype, "redop": args.redop, "device": args.device,
            "argv": list(sys.argv), "cpus": os.cpu_count(), "machine": platform.machine(),
            "gpu": getattr(args, "gpu", None),
            "method": ("average over back-to-back iterations, max across ranks" if args.timing == "loop" else
                       "median over iterations of the per-iteration max across ranks")}


def write_csv(path, results):
    fields = ["op", "backend", "algo", "bytes", "count", "dtype", "redop", "time_us", "algbw", "busbw", "wrong",
              "iters"]
    if any("compression" in r for r in results):
        fields += ["compression", "vnmse"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in results:
            w.writerow({k: r.get(k) for k in fields})


def print_table(op, rows, labels, world, args):
    if not rows:
        return
    first = labels[0]
    ref = {r["bytes"]: r["time_us"] for r in rows if r["backend"] == first}
    import torch

    gpu = getattr(args, "gpu", None)
    where = args.device if not gpu else (f"cuda:{gpu['index']} ({gpu['name']}"
                                         f"{', shared by all ranks' if gpu['shared'] else ''})")
    print(f"\n# plait-bench {op}: world {world}, dtype {args.dtype}"
          f"{', redop ' + args.redop if op in REDUCING else ''}, device {where}, host {socket.gethostname()}, "
          f"torch {torch.__version__}")
    print(f"# time = median over iters of the per-iteration max across ranks"
          f"{' (one-way: half the 0<->1 round trip)' if op == 'sendrecv' else ''}; busbw = algbw * "
          f"{ {'all_reduce': '2(n-1)/n', 'all_gather': '(n-1)/n', 'reduce_scatter': '(n-1)/n', 'all_to_all': '(n-1)/n'}.get(op, '1')}; "
          f"ratio = time({first}) / time")
    widths = (12, 11, 9, 6, 14, 11, 12, 12, 7, 7)
    columns = COLUMNS
    coded = any("compression" in r for r in rows)
    if coded:
        columns, widths = columns + ("vNMSE",), widths + (10,)
        print("# plait/<codec>: plait.all_reduce(compression=<codec>); busbw from the uncompressed size; vNMSE = "
              "||result - exact||^2 / ||exact||^2 on Gaussian inputs (codec rows; #wrong 1 = above the bound)")
    print("#" + "".join(f"{c:>{w}}" for c, w in zip(columns, widths))[1:])
    order = {label: i for i, label in enumerate(labels)}
    for r in sorted(rows, key=lambda r: (r["bytes"], order.get(r["backend"], 99))):
        ratio = f"{ref[r['bytes']] / r['time_us']:.2f}" if r["bytes"] in ref and r["time_us"] > 0 else "-"
        cells = (r["bytes"], r["count"], r["dtype"], r["redop"] or "none", r["backend"], f"{r['time_us']:.1f}",
                 fmt_bw(r["algbw"]), fmt_bw(r["busbw"]), "N/A" if r["wrong"] is None else r["wrong"], ratio)
        if coded:
            cells += (f"{r['vnmse']:.2e}" if "vnmse" in r else "-",)
        print("".join(f"{str(c):>{w}}" for c, w in zip(cells, widths)))


# ------------------------------------------------------------------------------------------ launching
def _spawn_entry(rank, world, port, args):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    worker(args)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(entry, args, nproc):
    """Run entry(rank, world, port, args) on nproc spawned local ranks; rank 0 writes the exit status."""
    import torch.multiprocessing as mp

    fd, path = tempfile.mkstemp(prefix="plait-bench-status-")
    os.close(fd)
    args._status = path
    try:
        mp.spawn(entry, args=(nproc, free_port(), args), nprocs=nproc, join=True)
        with open(path) as f:
            text = f.read().strip()
        return int(text) if text else 1
    except Exception as e:  # a rank died: the launcher already printed its traceback
        print(f"plait-bench: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        os.unlink(path)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "ddp":
        from .ddp import main as ddp_main

        return ddp_main(argv[1:])
    args = parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("plait-bench: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
            return 2
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun (or similar)
        return worker(args)
    if args.nproc < 1:
        print("plait-bench: --nproc must be >= 1", file=sys.stderr)
        return 2
    if args.device == "cuda" and "nccl" in args.backends and args.nproc > torch.cuda.device_count():
        print(f"plait-bench: {args.nproc} ranks on {torch.cuda.device_count()} GPU(s) share a GPU, which nccl "
              "refuses; drop --backend nccl or use fewer ranks", file=sys.stderr)
        return 2
    return launch(_spawn_entry, args, args.nproc)


if __name__ == "__main__":
    raise SystemExit(main())
