"""All-reduce on one GPU shared by N ranks: plait's device engine beside gloo's CUDA path and the HBM bound.

A thin driver over plait-bench (``python -m plait.bench --device cuda --share-gpu``), which for each N spawns N
ranks that all use cuda:0, gives plait and gloo each their own process group in the same processes, checks both for
exact correctness at every size first (integer-valued data), then times them interleaved at each size: every
iteration ends with torch.cuda.synchronize() before the clock is read, the per-iteration maximum across ranks is
taken outside the timed loop, and the median over iterations is reported (200 iterations up to 64 KiB, fewer
above, 3 at 256 MiB and up). algbw = bytes / time, busbw = algbw * 2(n-1)/n. This script adds:

- the HBM bound. All ranks share one GPU's memory, so the bound is the time to move, through HBM, the bytes that
  plait's device engine moves for all ranks: n * moved_per_rank / HBM bandwidth, where, for B bytes per rank,
      moved_per_rank = 4B                       copy into staging (read B, write B) and back out (read B, write B)
                     + 5B(n-1)/n                ring (also tree and two-shot direct, on average per rank):
                                                reduce-scatter pulls read 2 and write 1 per byte of (n-1)/n B,
                                                all-gather pulls read 1 and write 1 per byte of (n-1)/n B
                     (or + 3B(n-1) for one-shot direct: every rank pulls and reduces every peer's whole buffer)
  and HBM bandwidth = 2 * bytes / time of a large device-to-device copy, measured in the same run before the
  ranks start. The algorithm is the one plait's cost model picked for that size (plait.plan_allreduce(device=True),
  recorded by plait-bench), or the forced one with --algo. "% bound" = bound time / plait's time;
- the small-message latency: a 4-byte all_reduce through dist.all_reduce, synchronizing after each call, median
  of --latency-iters calls (1000), max across ranks;
- the gloo/plait ratio (> 1: plait is faster).

    python bench/gpu_allreduce.py                          # N = 2 then 4, 4 B .. 1 GiB, factor 4
    python bench/gpu_allreduce.py --nproc 4 --sizes 4,1M,256M --json out.json
    python bench/gpu_allreduce.py -b 1K -e 64M -f 2 --algo ring,direct

Without a CUDA device it says so and exits 0 (nothing to measure). Exit status 1 when a result was wrong or a run
failed.
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

from _sizes import fmt_bw, human, parse_size  # bench/_sizes.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", default="2,4", help="rank counts to run one after the other, comma list (default 2,4)")
    p.add_argument("--sizes", default=None, help="comma-separated sizes in bytes (K/M/G); overrides -b/-e/-f")
    p.add_argument("-b", "--minbytes", default="4", help="smallest size (default 4)")
    p.add_argument("-e", "--maxbytes", default="1G", help="largest size (default 1G)")
    p.add_argument("-f", "--stepfactor", type=int, default=4, help="size factor between steps (default 4)")
    p.add_argument("-n", "--iters", type=int, default=0, help="timed iterations per size (0: plait-bench's default "
                                                              "by size)")
    p.add_argument("--backend", default="plait,gloo", help="backends, comma list (default plait,gloo)")
    p.add_argument("--algo", default=None, help="plait algorithms to force, comma list (default: the cost model's)")
    p.add_argument("--latency-iters", type=int, default=1000, help="4-byte all_reduce calls for the latency "
                                                                   "(default 1000; 0 skips it)")
    p.add_argument("--hbm-bytes", default="1G", help="buffer size of the device-to-device copy that measures HBM "
                                                     "bandwidth (default 1G)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds allowed for each plait-bench run")
    p.add_argument("--json", metavar="PATH", help="write meta and all results to this JSON file")
    args = p.parse_args(argv)
    try:
        args.nprocs = [int(x) for x in args.nproc.split(",") if x.strip()]
        if args.sizes:
            args.size_list = sorted({parse_size(x) for x in args.sizes.split(",") if x.strip()})
        else:
            lo, hi = parse_size(args.minbytes), parse_size(args.maxbytes)
            if lo <= 0 or hi < lo or args.stepfactor < 2:
                raise ValueError(f"bad size range {args.minbytes}..{args.maxbytes} x{args.stepfactor}")
            args.size_list, n = [], lo
            while n <= hi:
                args.size_list.append(n)
                n *= args.stepfactor
        args.hbm = parse_size(args.hbm_bytes)
    except ValueError as e:
        p.error(str(e))
    if not args.nprocs or min(args.nprocs) < 1:
        p.error("--nproc: rank counts must be >= 1")
    return args


# ------------------------------------------------------------------------------------------------------ the model
def moved_per_rank(nbytes, n, algo, one_shot=False):
    """Bytes one rank's device engine reads and writes in HBM for an all-reduce of nbytes (see the docstring)."""
    if n <= 1:
        return 0.0
    copies = 4.0 * nbytes
    if algo == "direct" and one_shot:
        return copies + 3.0 * nbytes * (n - 1)
    return copies + 5.0 * nbytes * (n - 1) / n


def bound_us(nbytes, n, algo, one_shot, hbm_gbps):
    return n * moved_per_rank(nbytes, n, algo, one_shot) / (hbm_gbps * 1e9) * 1e6


def plan_of(row):
    """(algo, one_shot) plait ran for a plait-bench row: the forced algo, or the cost model's plan."""
    plan = row.get("plan") or ""
    algo = row.get("algo") or "auto"
    if algo == "auto" and plan:
        algo = plan.split()[0]
    return algo, "one-shot" in plan


# ------------------------------------------------------------------------------------------------------ measuring
def measure_hbm(nbytes, iters=20):
    """HBM bandwidth (GB/s) = 2 * nbytes / median time of a device-to-device copy_ (CUDA events)."""
    import torch

    free, _ = torch.cuda.mem_get_info()
    while nbytes > 1 << 20 and 2 * nbytes > free * 0.8:
        nbytes //= 2
    x = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    y = torch.ones(nbytes, dtype=torch.uint8, device="cuda")
    for _ in range(3):
        x.copy_(y)
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        x.copy_(y)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    ok = bool(torch.equal(x[:4096], y[:4096]))
    del x, y
    torch.cuda.empty_cache()
    t = statistics.median(times)
    return 2 * nbytes / t / 1e9, nbytes, t, ok


def run_bench(nproc, sizes, args, iters, warmup=None, label=""):
    """One plait-bench run on nproc ranks sharing cuda:0; returns (exit status, parsed JSON or None)."""
    fd, path = tempfile.mkstemp(prefix=f"plait-gpu-allreduce-{nproc}-", suffix=".json")
    os.close(fd)
    cmd = [sys.executable, "-m", "plait.bench", "--device", "cuda", "--share-gpu", "--nproc", str(nproc),
           "--op", "all_reduce", "--backend", args.backend, "--sizes", ",".join(str(s) for s in sizes),
           "--progress", "off", "--json", path]
    if args.algo:
        cmd += ["--algo", args.algo]
    if iters:
        cmd += ["-n", str(iters)]
    if warmup is not None:
        cmd += ["-w", str(warmup)]
    print(f"\n# {label}: {' '.join(cmd[1:])}", flush=True)
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)
    try:
        rc = subprocess.run(cmd, env=env, cwd=ROOT, timeout=args.timeout).returncode
    except subprocess.TimeoutExpired:
        print(f"# {label}: plait-bench did not finish within {args.timeout} s", flush=True)
        rc = 124
    doc = None
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        pass
    finally:
        os.unlink(path)
    return rc, doc


# ------------------------------------------------------------------------------------------------------ reporting
def summarize(nproc, results, hbm_gbps, backends):
    """Adds the bound to plait rows; prints one line per size and plait implementation; returns the rows."""
    by_size = {}
    for r in results:
        by_size.setdefault(r["bytes"], {})[r["backend"]] = r
    gloo_label = "gloo" if "gloo" in backends else None
    print(f"\n# all_reduce float32 sum, {nproc} ranks on one GPU; HBM {hbm_gbps:.0f} GB/s (D2D copy); "
          f"busbw = algbw*2(n-1)/n; gloo/plait = time ratio; bound = {nproc} x moved per rank / HBM bandwidth")
    cols = ("bytes", "impl", "plan", "time(us)", "algbw", "busbw", "gloo(us)", "gloo/plait", "bound(us)", "%bound",
            "#wrong")
    widths = (11, 14, 16, 11, 9, 9, 11, 11, 11, 10, 7)
    print("#" + "".join(f"{c:>{w}}" for c, w in zip(cols, widths))[1:])
    for nbytes in sorted(by_size):
        rows = by_size[nbytes]
        gloo = rows.get(gloo_label) if gloo_label else None
        for label, r in rows.items():
            if not label.startswith("plait"):
                continue
            algo, one_shot = plan_of(r)
            b = bound_us(nbytes, nproc, algo, one_shot, hbm_gbps)
            r.update(hbm_bound_us=b, hbm_bound_algo=algo + (" one-shot" if one_shot else ""),
                     bytes_moved_per_rank=moved_per_rank(nbytes, nproc, algo, one_shot),
                     pct_of_bound=100.0 * b / r["time_us"] if r["time_us"] > 0 else None)
            if gloo is not None and r["time_us"] > 0:
                r["gloo_over_plait"] = gloo["time_us"] / r["time_us"]
            cells = (nbytes, label, r.get("plan") or algo, f"{r['time_us']:.1f}", fmt_bw(r["algbw"]),
                     fmt_bw(r["busbw"]), f"{gloo['time_us']:.1f}" if gloo else "-",
                     f"{r['gloo_over_plait']:.2f}" if "gloo_over_plait" in r else "-", f"{b:.3g}",
                     f"{r['pct_of_bound']:.3g}" if r.get("pct_of_bound") is not None else "-",
                     "N/A" if r.get("wrong") is None else r["wrong"])
            print("".join(f"{str(c):>{w}}" for c, w in zip(cells, widths)))
    return results


def main(argv=None):
    args = parse_args(argv)
    try:
        import torch
    except ImportError as e:
        print(f"gpu_allreduce: torch is not importable ({e}); nothing measured.")
        return 0
    if not torch.cuda.is_available():
        print("gpu_allreduce: no CUDA device (torch.cuda.is_available() is False); nothing measured.")
        return 0
    try:
        import plait
    except ImportError as e:
        print(f"gpu_allreduce: plait is not importable ({e}); build it first.", file=sys.stderr)
        return 1
    if not plait.cuda_available():
        print("gpu_allreduce: plait was built without CUDA or its runtime sees no device (plait.cuda_available() is "
              "False); rebuild on this machine with the CUDA toolkit on PATH.", file=sys.stderr)
        return 1

    name = torch.cuda.get_device_name(0)
    hbm_gbps, hbm_bytes, hbm_s, hbm_ok = measure_hbm(args.hbm)
    print(f"# {name}: device-to-device copy of {human(hbm_bytes)}: {hbm_s * 1e3:.3f} ms -> HBM {hbm_gbps:.0f} GB/s "
          f"(2 x bytes / time){'' if hbm_ok else ' (COPY WRONG)'}")
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    status = 0 if hbm_ok else 1
    runs = []
    for nproc in args.nprocs:
        rc, doc = run_bench(nproc, args.size_list, args, args.iters, label=f"{nproc} ranks, sizes")
        run = {"nproc": nproc, "status": rc, "bench_meta": doc and doc.get("meta"), "results": [], "latency": None}
        if rc != 0 or doc is None:
            print(f"# {nproc} ranks: plait-bench failed (exit status {rc})")
            status = 1
        if doc is not None:
            run["results"] = summarize(nproc, doc["results"], hbm_gbps, backends)
        if args.latency_iters > 0:
            rc2, lat = run_bench(nproc, [4], args, args.latency_iters, warmup=50, label=f"{nproc} ranks, 4 B latency")
            if rc2 != 0 or lat is None:
                print(f"# {nproc} ranks: latency run failed (exit status {rc2})")
                status = 1
            if lat is not None:
                run["latency"] = {r["backend"]: {"time_us": r["time_us"], "iters": r["iters"], "wrong": r["wrong"]}
                                  for r in lat["results"]}
                print(f"# {nproc} ranks: 4-byte all_reduce latency (median of {args.latency_iters} calls, each "
                      "synchronized, max across ranks): "
                      + ", ".join(f"{k} {v['time_us']:.1f} us" for k, v in run["latency"].items()))
        runs.append(run)

    if args.json:
        doc = {
            "bench": "gpu_allreduce",
            "meta": {"device": name, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                     "plait_version": getattr(plait, "__version__", None), "host": platform.node(),
                     "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     "argv": list(sys.argv), "hbm_gbps": hbm_gbps, "hbm_copy_bytes": hbm_bytes,
                     "method": "plait-bench --device cuda --share-gpu: exact check first, then per-iteration "
                               "time (synchronize before reading the clock), max across ranks, median over "
                               "iterations; HBM bound = n * moved_per_rank / HBM bandwidth (D2D copy)"},
            "runs": runs,
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"# wrote {args.json}")
    return status


if __name__ == "__main__":
    sys.exit(main())
