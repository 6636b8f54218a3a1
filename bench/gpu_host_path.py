"""The host path (issue 13) on one GPU shared by N ranks: link rate, all-reduce time by mode, planner prediction.

Every rank uses cuda:0 (torch.cuda.set_device(0)). Each (N, PLAIT_HOST_PATH mode) is a separate set of N fresh
processes, since plait reads its knobs once per process; the default group is gloo and carries only control traffic
(barriers, the max across ranks), a plait group carries the measured all-reduces, like plait-bench. Three parts:

1. Link rate. Plain pinned copies, timed with CUDA events: a device tensor .copy_ into a pinned CPU tensor
   (non_blocking=True) on a side stream (D2H), a pinned tensor into a device tensor on another side stream (H2D), and
   both at once on the two streams ("both": the rate is per direction), at 8 MiB and 64 MiB. Measured (a) by this
   process alone before the ranks start (the whole link of the GPU), and (b) by the N ranks of the auto run at the
   same time, after a barrier before each copy, max across ranks, median of the iterations: the same method as the
   host path's own measurement (every local rank copies 8 MiB both ways at once, best of two, slowest rank), which
   is reported as topology(g)["host_path"]["pcie_gbps"] after the first auto-mode device all-reduce of 1 MiB or
   more. ratio = host path pcie_gbps / plain "both" rate of the same N ranks (goal >= 0.85). With N ranks on one
   GPU each rank gets about 1/N of the link when their copies overlap, hence the comparison with (b), not (a).
2. all_reduce (float32 sum, CUDA tensors) at each size on a plait group with PLAIT_HOST_PATH=off (device engine
   only), auto (the planner's split: host_share and host_path_why from plait.plan_allreduce(nbytes, device=True))
   and force (everything through the host path). The off run goes first and again last, so the table shows the
   run-to-run spread of the same configuration next to auto/off (goal: auto/off <= 1.03 at every size; off = the
   mean of the two off runs). Each size: an exact check first (integer-valued data), then warmup, then timed
   iterations, each ending with torch.cuda.synchronize() before the clock (time.perf_counter) is read; max across
   ranks per iteration, median over iterations. algbw = bytes / time, busbw = algbw * 2(N-1)/N.
3. The planner on a host that this run does not have: G GPUs (--plan-gpus, 8) whose only links are PCIe, each its
   own, so the device path is a PCIe ring: device_gbps = pcie * G / (2(G-1)) (a ring moves 2(G-1)/G of the buffer
   over each GPU's link per direction; NVLink-less, P2P through the root complex at the link rate, assumed).
   plait.plan_host_path(nbytes, pcie_gbps, sum_gbps, device_gbps, host_call_us, device_call_us) with sum_gbps and
   the fixed costs as the N-rank auto run measured them (the CPU's sum of N buffers, not G; path_gbps not given),
   for two link figures: "measured" (the host path's pcie_gbps of that run: a per-rank share of one GPU's link) and
   "whole link" (this process's plain "both" rate at 64 MiB: one GPU's link to itself). Reports the share and the
   predicted speed-up device_only_us / predicted_us, at 64 MiB and 256 MiB.

    python bench/gpu_host_path.py --quick                    # N = 2 then 4; sizes 1M,16M,256M
    python bench/gpu_host_path.py --ranks 2,4 --sizes 1M,4M,16M,64M,256M --json host_path.json
    python bench/gpu_host_path.py --emulate --sizes 1M,4M --ranks 2 --iters 3   # no GPU: CPU tensors, smoke test

--emulate runs every part on CPU tensors with PLAIT_DEVICE=emulate (plait's emulated device engine; with
PLAIT_EMU_PCIE_GBPS set, its copies model a link of that rate): the code path, not a measurement of any hardware;
the "plain copies" are then CPU memcpy. Without a CUDA device (and without --emulate) it says so and exits 0.
Exit status 1 when a result was wrong or a run failed (not when a goal is missed: the goals are reported).
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from _sizes import fmt_bw, human, parse_size  # bench/_sizes.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("off", "auto", "force")
QUICK_SIZES = "1M,16M,256M"
FULL_SIZES = "1M,4M,16M,64M,256M"
COPY_SIZES = (8 << 20, 64 << 20)  # the host path measures its link with 8 MiB copies
PLAN_SIZES = (64 << 20, 256 << 20)
LINK_GOAL = 0.85  # host path pcie_gbps / plain copies
AUTO_GOAL = 1.03  # auto time / off time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", default="2,4", help="rank counts (all on cuda:0), comma list (default 2,4)")
    p.add_argument("--sizes", default=None, help=f"all_reduce sizes in bytes (K/M/G), comma list (default "
                                                 f"{FULL_SIZES}; --quick: {QUICK_SIZES})")
    p.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES} unless --sizes is given")
    p.add_argument("--iters", type=int, default=0, help="timed iterations per size and per copy (0: by size: 40 up "
                                                        "to 1 MiB, 20 to 16 MiB, 10 to 64 MiB, 8 above)")
    p.add_argument("--plan-gpus", type=int, default=8, help="GPUs of the PCIe-only host in part 3 (default 8)")
    p.add_argument("--emulate", action="store_true", help="CPU tensors with PLAIT_DEVICE=emulate (no GPU needed)")
    p.add_argument("--timeout", type=int, default=300, help="seconds allowed for each set of ranks (default 300)")
    p.add_argument("--json", metavar="PATH", help="write meta and all results to this JSON file")
    args = p.parse_args(argv)
    try:
        args.rank_list = [int(x) for x in args.ranks.split(",") if x.strip()]
        spec = args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)
        args.size_list = sorted({parse_size(x) // 4 * 4 for x in spec.split(",") if x.strip()})
    except ValueError as e:
        p.error(str(e))
    if not args.rank_list or min(args.rank_list) < 2:
        p.error("--ranks: rank counts must be >= 2 (a world of 1 does not all-reduce)")
    if not args.size_list or args.size_list[0] < 4:
        p.error("--sizes: sizes must be >= 4 bytes (float32)")
    if args.iters < 0 or args.plan_gpus < 2:
        p.error("--iters must be >= 0 and --plan-gpus >= 2")
    return args


def default_iters(nbytes):
    return 40 if nbytes <= 1 << 20 else 20 if nbytes <= 1 << 24 else 10 if nbytes <= 1 << 26 else 8


def default_warmup(nbytes):
    return 3 if nbytes <= 1 << 26 else 2


# ------------------------------------------------------------------------------------------------------ measuring
def plain_copies(sizes, iters, emulate, barrier=lambda: None, maxall=lambda v: v):
    """Plain copies between device memory and pinned host memory: {bytes: {d2h, h2d, both: {time_us, gbps}}}.

    CUDA: one iteration = record an event on the current stream; side stream 1 copies device -> pinned (D2H) and/or
    side stream 2 pinned -> device (H2D), each after waiting on the current stream; the current stream waits on both
    and records the end event; elapsed = end - start (GPU time). gbps = bytes / time per direction ("both" runs one
    copy each way at once). barrier() runs before each iteration (outside the timed part); maxall(list) takes the
    per-iteration max across ranks after the loop; the median is reported. Emulated: CPU tensors, perf_counter.
    """
    import torch

    out = {}
    for nbytes in sizes:
        n_it = iters or default_iters(nbytes)
        if emulate:
            d, h2 = torch.ones(nbytes, dtype=torch.uint8), torch.ones(nbytes, dtype=torch.uint8)
            d2, h = torch.empty(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
        else:
            d = torch.ones(nbytes, dtype=torch.uint8, device="cuda")
            d2 = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
            h = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            h2 = torch.ones(nbytes, dtype=torch.uint8, pin_memory=True)
            s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()

        def once(kind):
            down, up = kind in ("d2h", "both"), kind in ("h2d", "both")
            if emulate:
                t0 = time.perf_counter()
                if down:
                    h.copy_(d)
                if up:
                    d2.copy_(h2)
                return time.perf_counter() - t0
            cur = torch.cuda.current_stream()
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(cur)
            if down:
                s1.wait_stream(cur)
                with torch.cuda.stream(s1):
                    h.copy_(d, non_blocking=True)
            if up:
                s2.wait_stream(cur)
                with torch.cuda.stream(s2):
                    d2.copy_(h2, non_blocking=True)
            cur.wait_stream(s1)
            cur.wait_stream(s2)
            stop.record(cur)
            stop.synchronize()
            return start.elapsed_time(stop) / 1e3

        row = {}
        for kind in ("d2h", "h2d", "both"):
            h.zero_()
            d2.zero_()
            times = []
            for i in range(2 + n_it):
                barrier()
                t = once(kind)
                if i >= 2:
                    times.append(t)
            times = maxall(times)
            t = statistics.median(times)
            ok = True
            if kind in ("d2h", "both"):
                ok = ok and bool((h[:4096] == 1).all())
            if kind in ("h2d", "both"):
                ok = ok and bool((d2[:4096] == 1).all().item())
            row[kind] = {"time_us": t * 1e6, "gbps": nbytes / t / 1e9, "iters": n_it, "ok": ok}
        out[nbytes] = row
        del d, d2, h, h2
    if not emulate:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return out


def rank_worker(job_path, rank):
    """One rank of one (N, mode) run: all_reduce sizes on a plait group; in the auto run, plain copies too."""
    with open(job_path) as f:
        job = json.load(f)
    import torch
    import torch.distributed as dist

    import plait

    world, emulate = job["world"], job["emulate"]
    if emulate:
        dev = torch.device("cpu")

        def sync():
            return None
    else:
        torch.cuda.set_device(0)
        dev = torch.device("cuda", 0)
        sync = torch.cuda.synchronize
    timeout = datetime.timedelta(seconds=job["pg_timeout_s"])
    dist.init_process_group("gloo", init_method="file://" + job["store"], rank=rank, world_size=world,
                            timeout=timeout)
    ctl = dist.group.WORLD
    g = dist.new_group(backend="plait", timeout=timeout)

    def reduce_ctl(values, op):
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=op, group=ctl)
        return t.tolist()

    def maxall(values):
        return reduce_ctl(values, dist.ReduceOp.MAX)

    rows = []
    for nbytes in job["sizes"]:
        count = nbytes // 4
        # Check first: integer-valued data, exact in float32.
        base = (torch.arange(count, device=dev) % 61).to(torch.float32)
        x = base + float(rank + 1)
        dist.all_reduce(x, group=g)
        sync()
        want = base.mul_(world).add_(world * (world + 1) / 2)
        wrong = int((x != want).sum().item())
        del base, want
        wrong = int(reduce_ctl([wrong], dist.ReduceOp.SUM)[0])
        plan = plait.plan_allreduce(nbytes, group=g, device=True)
        iters = job["iters"] or default_iters(nbytes)
        x.zero_()  # values that stay finite however many iterations run
        for _ in range(default_warmup(nbytes)):
            dist.all_reduce(x, group=g)
        sync()
        times = []
        dist.barrier(group=ctl)
        for _ in range(iters):
            t0 = time.perf_counter()
            dist.all_reduce(x, group=g)
            sync()
            times.append(time.perf_counter() - t0)
        times = maxall(times)  # max across ranks per iteration, outside the timed loop
        del x
        t = statistics.median(times)
        algbw = nbytes / t / 1e9
        rows.append({"bytes": nbytes, "time_us": t * 1e6, "min_us": min(times) * 1e6, "algbw": algbw,
                     "busbw": algbw * 2 * (world - 1) / world, "iters": iters, "wrong": wrong,
                     "host_share": plan.host_share, "host_path_us": plan.host_path_us,
                     "device_only_us": plan.device_only_us, "host_only_us": plan.host_only_us,
                     "host_path_why": plan.host_path_why, "algo": plan.algo})
        if not emulate:
            torch.cuda.empty_cache()
    topo = plait.topology(g)
    doc = {"world": world, "mode": job["mode"], "rows": rows, "device_engine": topo.get("device_engine"),
           "host_path": topo.get("host_path")}
    if job["copies"]:
        doc["plain_copies"] = {str(k): v for k, v in plain_copies(job["copy_sizes"], job["iters"], emulate,
                                                                 lambda: dist.barrier(group=ctl), maxall).items()}
    dist.barrier(group=ctl)
    if rank == 0:
        with open(job["out"], "w") as f:
            json.dump(doc, f)
    dist.destroy_process_group()


def run_ranks(world, mode, args, tmp, copies):
    """Starts `world` rank processes with PLAIT_HOST_PATH=mode; returns (exit status, rank 0's document or None)."""
    tag = f"{world}-{mode}-{len(os.listdir(tmp))}"
    job = {"world": world, "mode": mode, "emulate": args.emulate, "sizes": args.size_list, "iters": args.iters,
           "copies": copies, "copy_sizes": list(COPY_SIZES), "pg_timeout_s": max(60, args.timeout // 2),
           "store": os.path.join(tmp, f"store-{tag}"), "out": os.path.join(tmp, f"out-{tag}.json")}
    job_path = os.path.join(tmp, f"job-{tag}.json")
    with open(job_path, "w") as f:
        json.dump(job, f)
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "PLAIT_HOST_SHARE"):  # a fixed share would replace auto's choice
        env.pop(k, None)
    env["PLAIT_HOST_PATH"] = mode
    if args.emulate:
        env["PLAIT_DEVICE"] = "emulate"
    print(f"# {world} ranks, PLAIT_HOST_PATH={mode}{' (emulated device)' if args.emulate else ''} ...", flush=True)
    procs, logs = [], []
    t0 = time.monotonic()
    for r in range(world):
        log = open(os.path.join(tmp, f"log-{tag}-rank{r}.txt"), "w+")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "--rank-worker", job_path, str(r)],
                                      env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
    # Wait for all; once one rank fails the others get a short grace, then everyone left is killed.
    rc, deadline = 0, t0 + args.timeout
    while any(p.poll() is None for p in procs):
        if time.monotonic() > deadline:
            rc = rc or 124
            break
        bad = [p.returncode for p in procs if p.returncode not in (None, 0)]
        if bad and not rc:
            rc, deadline = bad[0], min(deadline, time.monotonic() + 20)
        time.sleep(0.05)
    rc = rc or next((p.returncode for p in procs if p.returncode not in (None, 0)), 0)
    if rc != 0:
        for r, p in enumerate(procs):
            killed = p.poll() is None
            if killed:
                p.kill()
                p.wait()
            logs[r].seek(0)
            text = logs[r].read()
            print(f"# rank {r} ({'killed: still running' if killed else f'exit {p.returncode}'}), last "
                  "lines:\n" + "\n".join("#   " + line for line in text.splitlines()[-25:]), flush=True)
    for log in logs:
        log.close()
    doc = None
    try:
        with open(job["out"]) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        pass
    if doc is not None:
        doc["wall_s"] = time.monotonic() - t0
    return rc, doc


# ------------------------------------------------------------------------------------------------------ reporting
def md_table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    print("\n".join(lines))


def f3(v):
    return "-" if v is None else f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"


def part1(single, runs, emulate):
    print("\n## 1. Link rate: host path measurement vs plain pinned copies"
          + (" (EMULATED: CPU memcpy, no link)" if emulate else ""))
    print("\nPlain copies, this process alone (the whole link), GB/s per direction (median, "
          + ("perf_counter" if emulate else "CUDA events") + "):\n")
    md_table(["bytes", "D2H", "H2D", "both (each way)", "both (sum)"],
             [[human(int(b)), fmt_bw(r["d2h"]["gbps"]), fmt_bw(r["h2d"]["gbps"]), fmt_bw(r["both"]["gbps"]),
               fmt_bw(2 * r["both"]["gbps"])] for b, r in single.items()])
    out, rows = [], []
    for n, doc in runs.items():
        hp = (doc or {}).get("host_path") or {}
        cp = (doc or {}).get("plain_copies") or {}
        if not hp.get("measured") or not cp:
            rows.append([n, "not measured", "-", "-", "-", "-", "-", "-"])
            out.append({"ranks": n, "measured": False})
            continue
        pcie = hp["pcie_gbps"]
        p8, p64 = cp.get(str(COPY_SIZES[0]), {}), cp.get(str(COPY_SIZES[1]), {})
        r8 = pcie / p8["both"]["gbps"] if p8 else None
        r64 = pcie / p64["both"]["gbps"] if p64 else None
        s64 = single.get(COPY_SIZES[1])
        agg = n * pcie / s64["both"]["gbps"] if s64 else None
        goal = "-" if r8 is None else ("ok" if r8 >= LINK_GOAL else "BELOW")
        rows.append([n, fmt_bw(pcie), fmt_bw(p8["both"]["gbps"]) if p8 else "-", f3(r8),
                     fmt_bw(p64["both"]["gbps"]) if p64 else "-", f3(r64), f3(agg), goal])
        out.append({"ranks": n, "measured": True, "host_path_pcie_gbps": pcie, "plain_copies_same_ranks": cp,
                    "ratio_vs_plain_8M": r8, "ratio_vs_plain_64M": r64, "aggregate_ratio_vs_single_64M": agg,
                    "goal": LINK_GOAL, "goal_met": None if r8 is None else r8 >= LINK_GOAL})
    print(f"\nN ranks at once on one GPU, GB/s per direction per rank, both directions at once; ratio = host path / "
          f"plain (goal >= {LINK_GOAL}); aggregate = N x host path / this process's plain both at 64 MiB:\n")
    md_table(["ranks", "host path pcie_gbps", "plain 8 MiB", "ratio 8 MiB", "plain 64 MiB", "ratio 64 MiB",
              "aggregate", "goal (8 MiB)"], rows)
    return out


def part2(n, docs):
    """docs: {mode: doc} with 'off' and 'off2'. Prints the table; returns the rows."""
    print(f"\n## 2. all_reduce float32 sum, {n} ranks on one GPU: PLAIT_HOST_PATH off / auto / force\n")
    print("time = median over iterations of the max across ranks (us); busbw GB/s; off = mean of the off runs "
          f"before and after (spread = |off1 - off2| / off); goal auto/off <= {AUTO_GOAL}\n")
    by = {m: {r["bytes"]: r for r in (d or {}).get("rows", [])} for m, d in docs.items()}
    sizes = sorted(set().union(*[set(v) for v in by.values()]))
    rows, out = [], []
    for b in sizes:
        o1, o2, a, fo = (by.get(m, {}).get(b) for m in ("off", "off2", "auto", "force"))
        offs = [r["time_us"] for r in (o1, o2) if r]
        off = sum(offs) / len(offs) if offs else None
        spread = abs(offs[0] - offs[1]) / off if len(offs) == 2 else None
        ratio = a["time_us"] / off if a and off else None
        fratio = fo["time_us"] / off if fo and off else None
        wrong = sum(r["wrong"] for r in (o1, o2, a, fo) if r)
        goal = "-" if ratio is None else ("ok" if ratio <= AUTO_GOAL else "SLOWER")
        rows.append([human(b), f3(off), f3(spread), fmt_bw(b / off / 1e3 * 2 * (n - 1) / n) if off else "-",
                     f3(a and a["time_us"]), f3(ratio), f3(a and a["host_share"]), f3(fo and fo["time_us"]),
                     fmt_bw(fo["busbw"]) if fo else "-", f3(fratio), wrong, goal])
        out.append({"bytes": b, "off_us": off, "off_spread": spread, "auto_us": a and a["time_us"],
                    "auto_over_off": ratio, "auto_host_share": a and a["host_share"],
                    "auto_host_path_why": a and a["host_path_why"], "force_us": fo and fo["time_us"],
                    "force_busbw": fo and fo["busbw"], "force_over_off": fratio, "wrong": wrong,
                    "goal": AUTO_GOAL, "goal_met": None if ratio is None else ratio <= AUTO_GOAL})
    md_table(["bytes", "off us", "off spread", "off busbw", "auto us", "auto/off", "auto share", "force us",
              "force busbw", "force/off", "#wrong", "goal"], rows)
    print()
    for r in out:
        if r["auto_host_path_why"]:
            print(f"- auto, {human(r['bytes'])}: {r['auto_host_path_why']}")
    engines = {m: (d or {}).get("device_engine") for m, d in docs.items()}
    print(f"- device_engine by run: {engines}")
    return out


def part3(runs, single, gpus, emulate):
    import plait

    ring = gpus / (2 * (gpus - 1))
    print(f"\n## 3. Planner on a {gpus}-GPU PCIe-only host, from the measured figures"
          + (" (EMULATED figures)" if emulate else "") + "\n")
    print(f"Assumed: each GPU has its own PCIe link of rate pcie (per direction, both at once); the device path is a "
          f"ring over PCIe at device_gbps = pcie x {gpus}/(2x{gpus - 1}) = {ring:.3f} x pcie (algbw); sum_gbps and "
          f"the fixed costs as the N-rank auto run measured them (CPU sum of N buffers, not {gpus}); path_gbps not "
          "given. pcie basis 'measured' = the host path's pcie_gbps of that run (a per-rank share of one GPU's link);"
          " 'whole link' = this process's plain both-directions rate at 64 MiB.\n")
    whole = single.get(COPY_SIZES[1], {}).get("both", {}).get("gbps")
    rows, out = [], []
    for n, doc in runs.items():
        hp = (doc or {}).get("host_path") or {}
        if not hp.get("measured"):
            continue
        for basis, pcie in (("measured", hp["pcie_gbps"]), ("whole link", whole)):
            if not pcie:
                continue
            for b in PLAN_SIZES:
                kw = dict(pcie_gbps=pcie, sum_gbps=hp["sum_gbps"], device_gbps=pcie * ring,
                          host_call_us=hp["host_call_us"], device_call_us=hp["device_call_us"])
                p = plait.plan_host_path(b, **kw)
                speed = p.device_only_us / p.predicted_us if p.predicted_us > 0 else None
                rows.append([n, basis, human(b), fmt_bw(pcie), fmt_bw(hp["sum_gbps"]), fmt_bw(pcie * ring),
                             f3(hp["host_call_us"]), f3(hp["device_call_us"]), f3(p.share), f3(p.predicted_us),
                             f3(p.device_only_us), f3(speed)])
                out.append({"ranks": n, "basis": basis, "bytes": b, **kw, "gpus": gpus, "share": p.share,
                            "predicted_us": p.predicted_us, "device_only_us": p.device_only_us,
                            "host_only_us": p.host_only_us, "speedup": speed, "why": p.why})
    if not rows:
        print("(no run measured the host path: nothing to plan from)")
        return out
    md_table(["figures from", "pcie basis", "bytes", "pcie", "sum", "device (assumed)", "host call us",
              "device call us", "share", "predicted us", "device only us", "speed-up"], rows)
    print()
    for r in out:
        print(f"- {r['ranks']} ranks, {r['basis']}, {human(r['bytes'])}: {r['why']}")
    return out


# ------------------------------------------------------------------------------------------------------ main
def main(argv=None):
    args = parse_args(argv)
    try:
        import torch
    except ImportError as e:
        print(f"gpu_host_path: torch is not importable ({e}); nothing measured.")
        return 0
    if not args.emulate and not torch.cuda.is_available():
        print("gpu_host_path: no CUDA device (torch.cuda.is_available() is False); nothing measured "
              "(--emulate runs the code path on CPU tensors).")
        return 0
    try:
        import plait
    except ImportError as e:
        print(f"gpu_host_path: plait is not importable ({e}); build it first.", file=sys.stderr)
        return 1
    if not args.emulate and not plait.cuda_available():
        print("gpu_host_path: plait was built without CUDA or its runtime sees no device (plait.cuda_available() is "
              "False); rebuild on this machine with the CUDA toolkit on PATH.", file=sys.stderr)
        return 1

    t_start = time.monotonic()
    name = "emulated (CPU tensors, PLAIT_DEVICE=emulate)" if args.emulate else torch.cuda.get_device_name(0)
    print(f"# gpu_host_path: {name}; ranks {args.rank_list}; sizes {[human(s) for s in args.size_list]}; "
          f"iters {args.iters or 'by size'}")
    single = plain_copies(COPY_SIZES, args.iters, args.emulate)
    status = 0
    if not all(k["ok"] for r in single.values() for k in r.values()):
        print("# plain copies in this process: WRONG data after a copy")
        status = 1
    runs, p2 = {}, {}
    with tempfile.TemporaryDirectory(prefix="plait-gpu-host-path-") as tmp:
        for n in args.rank_list:
            docs = {}
            for mode, label in (("off", "off"), ("auto", "auto"), ("force", "force"), ("off", "off2")):
                rc, doc = run_ranks(n, mode, args, tmp, copies=(mode == "auto"))
                if rc != 0 or doc is None:
                    print(f"# {n} ranks, {label}: failed (exit status {rc})")
                    status = 1
                elif any(r["wrong"] for r in doc["rows"]) or not all(
                        k["ok"] for r in (doc.get("plain_copies") or {}).values() for k in r.values()):
                    print(f"# {n} ranks, {label}: WRONG results")
                    status = 1
                docs[label] = doc
            runs[n] = docs.get("auto")
            p2[n] = {"runs": docs}
    p1 = part1(single, runs, args.emulate)
    for n, v in p2.items():
        v["table"] = part2(n, v["runs"])
    p3 = part3(runs, single, args.plan_gpus, args.emulate)

    ratios1 = [r["ratio_vs_plain_8M"] for r in p1 if r.get("ratio_vs_plain_8M") is not None]
    ratios2 = [r["auto_over_off"] for v in p2.values() for r in v["table"] if r["auto_over_off"] is not None]
    print("\n## Summary\n")
    print(f"- link: host path / plain (8 MiB, same ranks): "
          + (f"min {min(ratios1):.3f} (goal >= {LINK_GOAL}: {'met' if min(ratios1) >= LINK_GOAL else 'MISSED'})"
             if ratios1 else "not measured"))
    print(f"- all_reduce: auto / off: "
          + (f"max {max(ratios2):.3f} (goal <= {AUTO_GOAL}: {'met' if max(ratios2) <= AUTO_GOAL else 'MISSED'})"
             if ratios2 else "not measured"))
    sp = [(r["ranks"], r["basis"], r["bytes"], r["share"], r["speedup"]) for r in p3]
    for n, basis, b, share, s in sp:
        print(f"- planner, {args.plan_gpus} PCIe-only GPUs, figures of {n} ranks ({basis}), {human(b)}: share "
              f"{share:.3f}, predicted speed-up {f3(s)}x")
    print(f"- wall time {time.monotonic() - t_start:.0f} s; exit status {status}")

    if args.json:
        doc = {
            "bench": "gpu_host_path",
            "meta": {"device": name, "emulate": args.emulate, "torch": torch.__version__,
                     "torch_cuda": torch.version.cuda, "plait_version": getattr(plait, "__version__", None),
                     "host": platform.node(),
                     "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     "argv": list(sys.argv), "ranks": args.rank_list, "sizes": args.size_list, "iters": args.iters,
                     "plan_gpus": args.plan_gpus, "wall_s": time.monotonic() - t_start,
                     "method": "every rank on cuda:0; one process set per (ranks, PLAIT_HOST_PATH); all_reduce: "
                               "exact check, then per-iteration time (synchronize before perf_counter), max across "
                               "ranks, median; plain copies: "
                               + ("perf_counter (emulated)" if args.emulate else "CUDA events")
                               + ", barrier before each, max across ranks, median; off runs before and after "
                                 "auto/force",
                     "assumptions_part3": f"device_gbps = pcie * G/(2(G-1)), G={args.plan_gpus}; sum_gbps and fixed "
                                          "costs as measured by the N-rank auto run; path_gbps not given"},
            "part1_link": {"single_process": {str(k): v for k, v in single.items()}, "ranks": p1},
            "part2_allreduce": {str(n): v for n, v in p2.items()},
            "part3_planner": p3,
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"# wrote {args.json}")
    return status


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--rank-worker":
        rank_worker(sys.argv[2], int(sys.argv[3]))
        sys.exit(0)
    sys.exit(main())
