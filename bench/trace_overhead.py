"""The flight recorder's cost on the smallest collective: 4-byte all-reduce latency with PLAIT_TRACE_BUFFER=0 (off)
against the default (2048), side by side.

The buffer size is read once per process, so each setting is its own launch of the same 2 ranks; the launches
alternate (off, on, then on, off, ...: which goes first alternates too) for --rounds rounds, and each launch reports the median over --loops loops of
--calls back-to-back synchronous calls. The table gives the median over rounds of each setting and the ratio.

    python bench/trace_overhead.py                       # 2 ranks, 6 rounds of 20000 calls
    python bench/trace_overhead.py --json docs/trace_overhead.json
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

WORKER = r"""
import os, sys, time, statistics
import torch, torch.distributed as dist
import plait
rank, world, path, calls, loops, api = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
dist.init_process_group("plait", init_method=f"file://{path}", rank=rank, world_size=world)
t = torch.ones(1)
fn = (lambda: plait.all_reduce(t)) if api == "plait" else (lambda: dist.all_reduce(t))
for _ in range(500):
    fn()
per = []
for _ in range(loops):
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    per.append((time.perf_counter() - t0) / calls * 1e6)
recs = plait.trace_records()
n = recs[0]["recorded"] if recs else 0
if rank == 0:
    print("RESULT", statistics.median(per), n, flush=True)
dist.destroy_process_group()
"""


def launch(buf: str, world: int, calls: int, loops: int, api: str) -> tuple[float, int]:
    fd, path = tempfile.mkstemp(prefix="plait_trace_bench_")
    os.close(fd)
    os.unlink(path)
    env = dict(os.environ, PLAIT_TRACE_BUFFER=buf)
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(r), str(world), path, str(calls), str(loops), api],
                              env=env, stdout=subprocess.PIPE, text=True) for r in range(world)]
    out = [p.communicate(timeout=600)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a rank failed (PLAIT_TRACE_BUFFER={buf}): {[p.returncode for p in procs]}")
    line = next(ln for ln in out[0].splitlines() if ln.startswith("RESULT"))
    _, us, n = line.split()
    return float(us), int(n)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--loops", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--api", choices=["plait", "dist"], default="plait",
                    help="plait.all_reduce (the fast path) or dist.all_reduce")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    runs = {"0": [], "2048": []}
    recorded = {}
    for r in range(a.rounds):
        for buf in (("0", "2048") if r % 2 == 0 else ("2048", "0")):  # alternate which goes first
            us, n = launch(buf, a.world, a.calls, a.loops, a.api)
            runs[buf].append(us)
            recorded[buf] = n
            print(f"round {r}: PLAIT_TRACE_BUFFER={buf:>4}: {us:.2f} us/call", flush=True)
    off, on = statistics.median(runs["0"]), statistics.median(runs["2048"])
    print(f"\n{a.world} ranks, 4-byte all_reduce ({a.api}), median of {a.rounds} rounds x median of {a.loops} loops "
          f"of {a.calls} calls")
    print("| PLAIT_TRACE_BUFFER | us/call (median) | entries recorded |")
    print("|---|---:|---:|")
    print(f"| 0 (off) | {off:.2f} | {recorded['0']} |")
    print(f"| 2048 (default) | {on:.2f} | {recorded['2048']} |")
    print(f"overhead: {100 * (on / off - 1):+.1f}% (goal: under 2%)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"world": a.world, "api": a.api, "calls": a.calls, "loops": a.loops, "rounds": a.rounds,
                       "us_off": runs["0"], "us_on": runs["2048"], "median_off": off, "median_on": on,
                       "overhead_pct": 100 * (on / off - 1), "recorded": recorded,
                       "when": time.strftime("%Y-%m-%d %H:%M:%S")}, f, indent=1)


if __name__ == "__main__":
    main()
