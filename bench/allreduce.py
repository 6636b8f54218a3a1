"""All-reduce latency and bandwidth: plait beside Gloo, measured in one run, float32 on CPU.

Both backends live in the same processes: the default process group is plait and a second group is
created with ``dist.new_group(backend="gloo")``. For every size the script first checks both for exact
correctness (integer-valued data), then times plait and then Gloo back to back, so the two see the same
machine state. With ``--algo`` each listed plait algorithm gets its own group,
``dist.new_group(backend="plait", pg_options=plait.Options(algo=...))``, and its own columns.

Method (nccl-tests conventions): every iteration is timed on its own; after the timed loop the vector of
per-iteration times is all-reduced with MAX across ranks (outside the timed loop), and the reported time
is the median over iterations of that per-iteration maximum. algbw = bytes / time,
busbw = algbw * 2(n-1)/n. Timing runs on zero-filled buffers so repeated in-place sums cannot overflow.

Run it either way:

    python bench/allreduce.py                                   # spawns 2 local ranks itself
    python bench/allreduce.py --nproc 4 --algo ring,tree,direct,auto
    torchrun --standalone --nproc-per-node 2 bench/allreduce.py --sizes 4,1K,1M --json out.json

Sizes accept K/M/G suffixes (powers of two): ``--sizes 4,1K,64K,1M,16M,64M,256M`` is the default.
"""
import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist

from _sizes import DEFAULT_SIZES, fmt_bw, human, parse_size  # bench/_sizes.py

SCRIPT_KNOBS = ("PLAIT_SKIP_", "PLAIT_BENCH_", "PLAIT_SETUP_", "PLAIT_FORCE_")  # scripts/*.sh, not the library
ALGOS = ("auto", "ring", "tree", "direct")
TRANSPORTS = ("auto", "shm", "tcp")


# --------------------------------------------------------------------------------------------- helpers
# Iteration counts by size are plait-bench's (short by design: the default sweep takes well under a minute).
from plait.bench.cli import default_iters, default_warmup  # noqa: E402


def plait_env():
    """The PLAIT_* library knobs in effect (recorded with the results)."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("PLAIT_") and not k.startswith(SCRIPT_KNOBS)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=DEFAULT_SIZES, help="comma-separated message sizes in bytes (K/M/G)")
    p.add_argument("--iters", type=int, default=0, help="timed iterations per size (0 = by size, short)")
    p.add_argument("--iters-scale", type=float, default=1.0, help="multiply the by-size iteration counts")
    p.add_argument("--warmup", type=int, default=-1, help="untimed iterations per size (-1 = by size)")
    p.add_argument("--algo", default=None,
                   help="comma list of plait algorithms to force, each in its own group: ring,tree,direct,auto")
    p.add_argument("--transport", default=None, choices=TRANSPORTS,
                   help="plait transport for the --algo groups (plait.Options(transport=...))")
    p.add_argument("--no-gloo", action="store_true", help="measure plait only")
    p.add_argument("--nproc", type=int, default=2, help="ranks to spawn when not launched by torchrun")
    p.add_argument("--json", default=None, help="write all results to this JSON file (rank 0)")
    args = p.parse_args(argv)
    args.size_list = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    args.algo_list = [a.strip() for a in args.algo.split(",") if a.strip()] if args.algo else []
    for a in args.algo_list:
        if a not in ALGOS:
            p.error(f"--algo: unknown algorithm {a!r} (choose from {', '.join(ALGOS)})")
    if args.transport and not args.algo_list:
        args.algo_list = ["auto"]
    return args


# ------------------------------------------------------------------------------------------ measuring
def fill_pattern(x, rank):
    """x[i] = (i % 7) + rank, computed without float rounding (exact for any length)."""
    idx = torch.arange(x.numel(), dtype=torch.int32)
    idx.remainder_(7)
    x.copy_(idx)
    x.add_(rank)


def check(x, group, rank, world, label, ctl):
    fill_pattern(x, rank)
    dist.all_reduce(x, group=group)
    want = torch.empty_like(x)
    fill_pattern(want, 0)
    want.mul_(world).add_(world * (world - 1) // 2)
    ok = torch.equal(x, want)
    bad = torch.tensor([0 if ok else 1], dtype=torch.int32)
    if not ok:
        diff = (x != want).nonzero()
        i = diff[0].item()
        print(f"[rank {rank}] {label}: WRONG result for {x.numel() * 4} B: {diff.numel()} elements differ, "
              f"first at {i}: got {x[i].item()} want {want[i].item()}", file=sys.stderr, flush=True)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=ctl)
    return bad.item() == 0


def time_allreduce(x, group, iters, warmup, ctl):
    x.zero_()
    for _ in range(warmup):
        dist.all_reduce(x, group=group)
    times = torch.empty(iters, dtype=torch.float64)
    dist.barrier(group=ctl)
    for i in range(iters):
        t0 = time.perf_counter()
        dist.all_reduce(x, group=group)
        times[i] = time.perf_counter() - t0
    dist.all_reduce(times, op=dist.ReduceOp.MAX, group=ctl)  # max across ranks, outside the timed loop
    return times.tolist()


def run(args):
    import plait  # registers the "plait" backend with torch.distributed

    torch.set_num_threads(1)  # ranks share the cores; the buffers are filled by torch ops
    dist.init_process_group("plait")
    rank, world = dist.get_rank(), dist.get_world_size()

    ctl = dist.new_group(backend="gloo")  # reference implementation, also used to gather timings
    impls = []  # (label, group, algo)
    if args.algo_list:
        for a in args.algo_list:
            opts = plait.Options(algo=a, transport=args.transport or "auto")
            label = f"plait[{a}]" if not args.transport else f"plait[{a},{args.transport}]"
            impls.append((label, dist.new_group(backend="plait", pg_options=opts), a))
    else:
        impls.append(("plait", dist.group.WORLD, os.environ.get("PLAIT_ALGO", "auto")))
    plait_labels = [label for label, _, _ in impls]
    if not args.no_gloo:
        impls.append(("gloo", ctl, None))

    results = []
    failed = False
    for nbytes in args.size_list:
        count = max(1, nbytes // 4)
        nbytes = count * 4
        x = torch.empty(count, dtype=torch.float32)
        for label, group, _ in impls:
            if not check(x, group, rank, world, label, ctl):
                failed = True
                if rank == 0:
                    print(f"{label}: all-reduce of {human(nbytes)} is WRONG", file=sys.stderr, flush=True)
        if failed:
            break
        iters = args.iters or max(1, round(default_iters(nbytes) * args.iters_scale))
        warmup = args.warmup if args.warmup >= 0 else default_warmup(nbytes)
        for label, group, algo in impls:  # interleaved: plait variant(s), then gloo, at this size
            times = time_allreduce(x, group, iters, warmup, ctl)
            t = statistics.median(times)
            algbw = nbytes / t / 1e9
            results.append({"impl": label, "algo": algo, "bytes": nbytes, "iters": iters, "us": t * 1e6,
                            "us_min": min(times) * 1e6, "us_max": max(times) * 1e6, "algbw_GBps": algbw,
                            "busbw_GBps": algbw * 2 * (world - 1) / world})
        del x

    if rank == 0 and results:
        print_table(results, plait_labels, None if args.no_gloo else "gloo", world)
        if args.json:
            meta = {"world_size": world, "dtype": "float32", "torch": torch.__version__,
                    "host": socket.gethostname(), "cpus": os.cpu_count(), "machine": platform.machine(),
                    "env": plait_env(),
                    "method": "median over iterations of per-iteration max across ranks",
                    "results": results}
            with open(args.json, "w") as f:
                json.dump(meta, f, indent=2)
            print(f"\nwrote {args.json}")
    dist.destroy_process_group()
    if failed:
        raise SystemExit(1)




def print_table(results, plait_labels, ref, world):
    by = {(r["impl"], r["bytes"]): r for r in results}
    sizes = sorted({r["bytes"] for r in results})
    impls = plait_labels + ([ref] if ref else [])
    env = " ".join(f"{k}={v}" for k, v in plait_env().items())
    print(f"\nall_reduce float32 sum, world size {world}, torch {torch.__version__}"
          f"{', ' + env if env else ''}; median of per-iteration max across ranks\n")
    head = ["size"] + [f"{i} us" for i in impls] + [f"{i} busbw GB/s" for i in impls]
    if ref:
        head += ["speedup" if len(plait_labels) == 1 else f"speedup {i}" for i in plait_labels]
    print("| " + " | ".join(head) + " |")
    print("| " + " | ".join(["---:"] * len(head)) + " |")
    for b in sizes:
        row = [human(b)]
        row += [f"{by[(i, b)]['us']:.1f}" if (i, b) in by else "-" for i in impls]
        row += [fmt_bw(by[(i, b)]['busbw_GBps']) if (i, b) in by else "-" for i in impls]
        if ref:
            for i in plait_labels:
                if (i, b) in by and (ref, b) in by:
                    row.append(f"{by[(ref, b)]['us'] / by[(i, b)]['us']:.2f}x")
                else:
                    row.append("-")
        print("| " + " | ".join(row) + " |")
    sys.stdout.flush()


# ------------------------------------------------------------------------------------------ launching
def _spawn_entry(rank, world, port, args):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    run(args)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    args = parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun (or similar)
        run(args)
        return
    import torch.multiprocessing as mp

    mp.spawn(_spawn_entry, args=(args.nproc, _free_port(), args), nprocs=args.nproc, join=True)


if __name__ == "__main__":
    main()
