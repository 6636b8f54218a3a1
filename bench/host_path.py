"""The host path for device tensors, measured without a GPU (emulated device, emulated cluster).

Two measurements; both use PLAIT_DEVICE=emulate (CPU tensors take the device-tensor code path) and so check the
*machinery* (pipelining, overlap, the planner's choices) on CPU-emulated copies and sums: they say nothing about the
speed of real GPUs, PCIe or NICs.

1. Across hosts (needs root: ``plait.testing.cluster``, network namespaces on a bridge, every host's link shaped
   with tc tbf), 2 hosts x 2 ranks at 1 and 10 Gbit/s by default. A 16 MiB and a 64 MiB float32 all_reduce in
   these configurations, one launch of all ranks each (plait reads its env knobs once per process), interleaved
   round by round on the same cluster:
     link-only   CPU tensors on plain plait (no PLAIT_DEVICE): the time the link alone needs;
     copy-all    PLAIT_DEVICE=emulate, PLAIT_EMU_PCIE_GBPS=<pcie>, PLAIT_HOST_CHUNK_BYTES=1 GiB (larger than the
                 buffer: one chunk, i.e. download everything, then all_reduce over the host engine, then upload
                 everything: the staging before the pipelined host path);
     pipe-4M     the same with 4 MiB chunks (download of chunk i+1 and upload of chunk i-1 overlap the host
                 engine's all_reduce of chunk i; the default before these measurements);
     pipe-1M     the same with 1 MiB chunks (the default since: the first download and the last upload are not
                 hidden, and 4 MiB of them showed at 1 Gbit/s).
   <pcie> is the emulated PCIe rate of each rank's (each GPU's) link to its host per direction, in GB/s: by default
   --pcie-ratio (2) times the host's link rate in GB/s, i.e. 0.25 GB/s at 1 Gbit/s and 2.5 GB/s at 10 Gbit/s. The
   ratio 2 is a host with one 100 Gbit/s NIC (12.5 GB/s) shared by PCIe 4.0 x16 GPUs (~25 GB/s each): copies are
   significant next to the link (copy-all adds about the link time again), so that the pipelining is what decides
   whether the copies are hidden. Goal (issue 13): pipelined time <= 1.10 x link-only time.
   The emulated copy engines memmove and then sleep off the rest of bytes/rate: unlike a GPU's DMA engines, the
   memmove uses the host's cores, which on a small machine compete with the TCP stack and the host engine.

2. One host (no cluster; 2 and 4 ranks on this machine): a 64 MiB all_reduce through the device engine only
   (PLAIT_HOST_PATH=off), through the host path only (PLAIT_HOST_PATH=force), half and half (PLAIT_HOST_SHARE=0.5)
   and auto (the planner's share from the rates measured at the first large device all_reduce; the share, the
   predicted times and topology()["host_path"] are recorded), each without and with PLAIT_EMU_PCIE_GBPS.

Timing: every iteration starts after a 4-byte all_reduce (a barrier), each rank times its dist.all_reduce (the
emulated device finishes its copies before returning); per iteration the maximum across ranks is taken, and the
median over iterations (all rounds) is reported. Before timing: one correctness check (sum of rank+1 values,
exact) and --warmup untimed iterations per launch. algbw = bytes / time, busbw = algbw * 2(n-1)/n (nccl-tests).

    python bench/host_path.py --out docs/host_path_emulated.json                 # both parts, defaults
    python bench/host_path.py --part cluster --rates 1gbit --sizes 64M -n 5
    python bench/host_path.py --part single --nproc 2,4 --single-pcie-gbps 2.5
    python bench/host_path.py --part cluster --rates 10gbit --nproc-per-host 1   # 2 x 1: half the CPU load

At 10 Gbit/s a 2-core machine is CPU-bound: the kernel's TCP at 10 Gbit/s, the host engine, and the emulated copy
engines' memmoves (each rank's downloads and uploads at PLAIT_EMU_PCIE_GBPS, both directions at once) share two
cores, so the copies the pipeline should hide slow the link down instead; 2 hosts x 1 rank halves that load.

Exit status 1 when a result was wrong or a launch failed. The cluster is torn down however the run ends.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "python"))

from _sizes import human, parse_size  # noqa: E402  (bench/_sizes.py)

BIG_CHUNK = 1 << 30  # PLAIT_HOST_CHUNK_BYTES for copy-all: larger than any buffer here


# ------------------------------------------------------------------------------------------------------------------
# worker (one rank; started by the driver below with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT and the knobs set)


def worker(spec: dict) -> None:
    import torch
    import torch.distributed as dist

    import plait

    torch.set_num_threads(1)
    t_start = time.time()
    rank, ws = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("plait", rank=rank, world_size=ws, timeout=datetime.timedelta(seconds=spec["pg_timeout"]))
    out = {"rank": rank, "world_size": ws, "host": os.environ.get("BENCH_HOST", ""), "sizes": {},
           "phase_s": {"import": t_start - float(os.environ.get("BENCH_T0", t_start)), "init": time.time() - t_start}}
    bar = torch.zeros(1)
    for nbytes in spec["sizes"]:
        n = nbytes // 4
        t = torch.full((n,), float(rank + 1))
        dist.all_reduce(t)  # correctness, exact (small integers in float32)
        want = ws * (ws + 1) / 2
        wrong = int((t != want).sum().item())
        rec = {"wrong": wrong}
        if spec.get("record_plan"):  # after the first large device all_reduce: the measured rates and the split
            p = plait.plan_allreduce(nbytes, device=True)
            topo = plait.topology()
            rec["plan"] = {"host_share": p.host_share, "host_path_us": p.host_path_us,
                           "device_only_us": p.device_only_us, "host_only_us": p.host_only_us,
                           "why": p.host_path_why, "algo": p.algo}
            rec["host_path"] = topo.get("host_path")
        times = []
        for it in range(spec["warmup"] + spec["iters"]):
            t.fill_(1.0)
            dist.all_reduce(bar)
            t0 = time.perf_counter()
            dist.all_reduce(t)
            dt = time.perf_counter() - t0
            if it >= spec["warmup"]:
                times.append(dt * 1e6)
        rec["times_us"] = times
        out["sizes"][str(nbytes)] = rec
        out["phase_s"][str(nbytes)] = time.time() - t_start
    # What the cost model picks on this group for CPU tensors, at the sizes measured and at the host path's chunks
    # (a pipelined device all-reduce runs one host-engine all-reduce per chunk).
    out["plans"] = {}
    for nb in sorted(set(spec["sizes"]) | {1 << 20, 4 << 20}):
        p = plait.plan_allreduce(nb)
        out["plans"][str(nb)] = {"algo": p.algo, "one_shot": p.one_shot, "predicted_us": p.predicted_us}
    out["device_engine"] = plait.topology().get("device_engine", "")
    out["nhosts"] = plait.topology().get("nhosts")
    dist.barrier()
    out["phase_s"]["barrier"] = time.time() - t_start
    dist.destroy_process_group()
    out["phase_s"]["destroyed"] = time.time() - t_start
    with open(os.path.join(spec["outdir"], f"rank{rank}.json"), "w") as f:
        json.dump(out, f)


# ------------------------------------------------------------------------------------------------------------------
# driver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rate_gbytes(rate: str) -> float:
    m = re.fullmatch(r"([\d.]+)\s*([kmg]?)bit", rate.lower())
    if not m:
        raise SystemExit(f"cannot parse rate {rate!r} (e.g. 1gbit, 100mbit)")
    return float(m.group(1)) * {"": 1e-9, "k": 1e-6, "m": 1e-3, "g": 1.0}[m.group(2)] / 8


def base_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLAIT_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.path.join(ROOT, "python") + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def launch(spec: dict, knobs: dict, ranks: list[tuple[int, int]], master: str, port: int, timeout: float,
           popen=None) -> dict:
    """Start one process per (host, local rank) in ``ranks`` (rank = index), wait, collect rank files.

    popen(host, argv, env) starts a process on a host (the cluster's), else subprocess.Popen here."""
    with tempfile.TemporaryDirectory(prefix="plait_host_path_") as tmp:
        spec = dict(spec, outdir=tmp)
        argv = [sys.executable, os.path.abspath(__file__), "--_worker", json.dumps(spec)]
        procs = []
        ws = len(ranks)
        nloc = {}
        for h, _ in ranks:
            nloc[h] = nloc.get(h, 0) + 1
        t0 = time.time()
        try:
            for r, (h, lr) in enumerate(ranks):
                env = base_env()
                env.update({k: str(v) for k, v in knobs.items()})
                env.update(RANK=str(r), WORLD_SIZE=str(ws), LOCAL_RANK=str(lr), LOCAL_WORLD_SIZE=str(nloc[h]),
                           MASTER_ADDR=master, MASTER_PORT=str(port), BENCH_HOST=str(h), BENCH_T0=repr(time.time()))
                if popen is not None:
                    env.update(GLOO_SOCKET_IFNAME="eth0")
                    procs.append(popen(h, argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True))
                else:
                    procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                  text=True))
            logs = []
            deadline = time.time() + timeout
            for p in procs:
                try:
                    logs.append(p.communicate(timeout=max(1.0, deadline - time.time()))[0])
                except subprocess.TimeoutExpired:
                    logs.append("(timed out)")
            t_exit = time.time()
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        res = []
        for r in range(ws):
            path = os.path.join(tmp, f"rank{r}.json")
            if os.path.exists(path):
                with open(path) as f:
                    res.append(json.load(f))
        if len(res) != ws or any(p.returncode for p in procs):
            tail = "\n".join(f"--- rank {r} (rc {p.returncode}) ---\n{(logs[r] if r < len(logs) else '')[-3000:]}"
                             for r, p in enumerate(procs))
            return {"ok": False, "log": tail, "wall_s": time.time() - t0}
        return {"ok": True, "ranks": res, "wall_s": time.time() - t0, "exited_s": t_exit - t0,
                "loadavg_1m_after": os.getloadavg()[0]}


def merge(runs: list[dict], sizes: list[int]) -> dict:
    """Per size: per-iteration max across ranks, all launches of a configuration pooled; median."""
    out = {}
    for nbytes in sizes:
        its, wrong, extra = [], 0, {}
        for run in runs:
            recs = [r["sizes"][str(nbytes)] for r in run["ranks"]]
            wrong += sum(x["wrong"] for x in recs)
            its += [max(v) for v in zip(*[x["times_us"] for x in recs])]
            if "plan" in recs[0]:
                extra = {"plan": recs[0]["plan"], "host_path": recs[0]["host_path"]}
        out[nbytes] = {"median_us": statistics.median(its) if its else float("nan"), "iters_us": its,
                       "wrong": wrong, **extra}
    return out


def busbw(nbytes: int, us: float, n: int) -> tuple[float, float]:
    alg = nbytes / us / 1e3  # GB/s
    return alg, alg * 2 * (n - 1) / n


# ---- part 1: across hosts ----------------------------------------------------------------------------------------


def cluster_configs(pcie: float, chunks: list[int]) -> list[tuple[str, dict]]:
    cfgs = [("link-only", {}),
            ("copy-all", {"PLAIT_DEVICE": "emulate", "PLAIT_EMU_PCIE_GBPS": pcie, "PLAIT_HOST_CHUNK_BYTES": BIG_CHUNK})]
    for c in chunks:
        cfgs.append((f"pipe-{human(c).replace(' MiB', 'M').replace(' KiB', 'K')}",
                     {"PLAIT_DEVICE": "emulate", "PLAIT_EMU_PCIE_GBPS": pcie, "PLAIT_HOST_CHUNK_BYTES": c}))
    return cfgs


def run_cluster(a, rate: str, pcie: float, log) -> dict:
    from plait.testing.cluster import Cluster

    spec = {"sizes": a.sizes, "iters": a.iters, "warmup": a.warmup, "pg_timeout": a.timeout}
    cfgs = cluster_configs(pcie, a.chunks)
    if a.configs:
        want = a.configs.split(",")
        cfgs = [c for c in cfgs if c[0] in want]
    ranks = [(h, lr) for h in range(a.hosts) for lr in range(a.nproc_per_host)]
    runs: dict[str, list] = {name: [] for name, _ in cfgs}
    failures = []
    t0 = time.time()
    port = a.port
    with Cluster(hosts=a.hosts, rate=rate) as c:
        bw = c.measure_bandwidth(0, 1, seconds=1.0)
        log(f"[{rate}] cluster {c.name} up; one TCP stream host0->host1: {bw['mbit_s']:.0f} Mbit/s")
        for rnd in range(a.rounds):
            order = cfgs if rnd % 2 == 0 else cfgs[::-1]  # alternate the order: no configuration always first
            for name, knobs in order:
                port += 1
                res = launch(spec, knobs, ranks, c.addr(0), port, a.timeout, popen=c.popen)
                if not res["ok"]:
                    failures.append({"rate": rate, "config": name, "round": rnd, "log": res["log"]})
                    log(f"[{rate}] {name} round {rnd}: FAILED\n{res['log']}")
                    continue
                runs[name].append(res)
                eng = res["ranks"][0]["device_engine"] or "(cpu)"
                med = {human(s): round(statistics.median(
                    [max(v) for v in zip(*[r["sizes"][str(s)]["times_us"] for r in res["ranks"]])]) / 1e3, 1)
                    for s in a.sizes}
                ph = {k: round(max(r["phase_s"][k] for r in res["ranks"]), 1) for k in res["ranks"][0]["phase_s"]}
                log(f"[{rate}] round {rnd} {name:10s} engine={eng:18s} median ms {med}  ({res['wall_s']:.1f} s, "
                    f"exited at {res['exited_s']:.1f} s, load {res['loadavg_1m_after']:.1f}; "
                    f"phases s {ph})")
    results = {}
    for name, knobs in cfgs:
        results[name] = {"knobs": {k: str(v) for k, v in knobs.items()},
                         "launches": [{"wall_s": r["wall_s"], "loadavg_1m_after": r["loadavg_1m_after"],
                                       "phase_s": {k: max(x["phase_s"][k] for x in r["ranks"])
                                                   for k in r["ranks"][0]["phase_s"]}} for r in runs[name]],
                         "device_engine": runs[name][0]["ranks"][0]["device_engine"] if runs[name] else None,
                         "plans": runs[name][0]["ranks"][0]["plans"] if runs[name] else None,
                         "sizes": merge(runs[name], a.sizes) if runs[name] else {}}
    return {"rate": rate, "link_GBps": rate_gbytes(rate), "pcie_GBps": pcie, "hosts": a.hosts,
            "nproc_per_host": a.nproc_per_host, "world_size": len(ranks), "tcp_stream_mbit_s": bw["mbit_s"],
            "configs": results, "failures": failures, "wall_s": time.time() - t0}


def copy_model_ms(name: str, knobs: dict, nbytes: int, link_ms: float | None, pcie: float) -> str:
    if link_ms is None or name == "link-only":
        return "–"
    copy_ms = nbytes / pcie / 1e6
    chunk = min(int(knobs.get("PLAIT_HOST_CHUNK_BYTES", 1 << 20)), nbytes)
    if chunk >= nbytes:
        return f"{link_ms + 2 * copy_ms:.1f}"
    return f"{max(link_ms, copy_ms) + 2 * chunk / pcie / 1e6:.1f}"


def cluster_table(d: dict) -> str:
    n = d["world_size"]
    lines = [f"#### {d['hosts']} hosts x {d['nproc_per_host']} ranks, {d['rate']} links "
             f"(one TCP stream: {d['tcp_stream_mbit_s']:.0f} Mbit/s), PLAIT_EMU_PCIE_GBPS={d['pcie_GBps']:g}", "",
             "| size | configuration | engine | time ms | algbw GB/s | busbw GB/s | vs link-only | goal <= 1.10 | "
             "copy model ms |",
             "|---:|---|---|---:|---:|---:|---:|---|---:|"]
    cfgs = d["configs"]
    for nbytes in sorted({int(s) for c in cfgs.values() for s in c["sizes"]}):
        base = cfgs.get("link-only", {}).get("sizes", {}).get(nbytes)
        for name, c in cfgs.items():
            r = c["sizes"].get(nbytes)
            if not r:
                continue
            alg, bus = busbw(nbytes, r["median_us"], n)
            ratio = r["median_us"] / base["median_us"] if base else float("nan")
            goal = "–" if name in ("link-only", "copy-all") else ("met" if ratio <= 1.10 else "**not met**")
            wrong = " **WRONG**" if r["wrong"] else ""
            model = copy_model_ms(name, c["knobs"], nbytes, base["median_us"] / 1e3 if base else None, d["pcie_GBps"])
            lines.append(f"| {human(nbytes)} | {name}{wrong} | {c['device_engine'] or 'cpu'} | "
                         f"{r['median_us'] / 1e3:.1f} | {alg:.3f} | {bus:.3f} | {ratio:.2f}x | {goal} | {model} |")
    lines += ["", "copy model: what the emulated copies alone add to the measured link-only time t: copy-all "
              "t + 2 M/pcie (download everything, then upload everything); pipelined with chunk C: "
              "max(t, M/pcie) + 2 C/pcie (the first chunk's download and the last chunk's upload are not hidden)."]
    return "\n".join(lines)


# ---- part 2: one host --------------------------------------------------------------------------------------------

SINGLE_MODES = [("device-only", {"PLAIT_HOST_PATH": "off"}), ("host path (force)", {"PLAIT_HOST_PATH": "force"}),
                ("share 0.5", {"PLAIT_HOST_SHARE": "0.5"}), ("auto", {})]


def run_single(a, log) -> list[dict]:
    spec = {"sizes": [a.single_size], "iters": a.iters, "warmup": a.warmup, "pg_timeout": a.timeout}
    out = []
    for nproc in a.nproc:
        for pcie in (0.0, a.single_pcie_gbps):
            runs: dict[str, list] = {m: [] for m, _ in SINGLE_MODES}
            for rnd in range(a.single_rounds):
                order = SINGLE_MODES if rnd % 2 == 0 else SINGLE_MODES[::-1]
                for mode, knobs in order:
                    k = {"PLAIT_DEVICE": "emulate", **knobs}
                    if pcie > 0:
                        k["PLAIT_EMU_PCIE_GBPS"] = pcie
                    s = dict(spec, record_plan=(mode == "auto"))
                    res = launch(s, k, [(0, r) for r in range(nproc)], "127.0.0.1", free_port(), a.timeout)
                    if not res["ok"]:
                        log(f"[one host, {nproc} ranks, pcie {pcie:g}] {mode}: FAILED\n{res['log']}")
                        out.append({"nproc": nproc, "pcie_GBps": pcie, "mode": mode, "failed": res["log"]})
                        continue
                    runs[mode].append(res)
                    m = merge([res], spec["sizes"])[a.single_size]
                    log(f"[one host, {nproc} ranks, pcie {pcie:g}] round {rnd} {mode:18s} "
                        f"engine={res['ranks'][0]['device_engine']:20s} {m['median_us'] / 1e3:.1f} ms "
                        f"({res['wall_s']:.1f} s, load {res['loadavg_1m_after']:.1f})")
            for mode, knobs in SINGLE_MODES:
                if runs[mode]:
                    m = merge(runs[mode], spec["sizes"])[a.single_size]
                    out.append({"nproc": nproc, "pcie_GBps": pcie, "mode": mode, "knobs": knobs,
                                "loadavg_1m_after": [r["loadavg_1m_after"] for r in runs[mode]],
                                "device_engine": runs[mode][0]["ranks"][0]["device_engine"], **m})
    return out


def single_table(rows: list[dict], nbytes: int) -> str:
    lines = ["| ranks | PLAIT_EMU_PCIE_GBPS | mode | engine | time ms | algbw GB/s | busbw GB/s | vs device-only | "
             "auto: share, predicted ms (device-only / host-only), why |",
             "|---:|---:|---|---|---:|---:|---:|---:|---|"]
    base = {}
    for r in rows:
        if r.get("mode") == "device-only" and "median_us" in r:
            base[(r["nproc"], r["pcie_GBps"])] = r["median_us"]
    for r in rows:
        pc = f"{r['pcie_GBps']:g}" if r["pcie_GBps"] > 0 else "unset"
        if "median_us" not in r:
            lines.append(f"| {r['nproc']} | {pc} | {r['mode']} | FAILED | | | | | |")
            continue
        alg, bus = busbw(nbytes, r["median_us"], r["nproc"])
        b = base.get((r["nproc"], r["pcie_GBps"]))
        extra = ""
        if "plan" in r:
            p, hp = r["plan"], r.get("host_path") or {}
            extra = (f"share {p['host_share']:.2f}, {p['host_path_us'] / 1e3:.1f} ({p['device_only_us'] / 1e3:.1f} / "
                     f"{p['host_only_us'] / 1e3:.1f}); {p['why']}; rates GB/s: pcie {hp.get('pcie_gbps', 0):.2f} "
                     f"sum {hp.get('sum_gbps', 0):.2f} path {hp.get('path_gbps', 0):.2f} "
                     f"device {hp.get('device_gbps', 0):.2f}")
        wrong = " **WRONG**" if r["wrong"] else ""
        lines.append(f"| {r['nproc']} | {pc} | {r['mode']}{wrong} | {r['device_engine']} | {r['median_us'] / 1e3:.1f} "
                     f"| {alg:.3f} | {bus:.3f} | {r['median_us'] / b:.2f}x | {extra} |" if b else
                     f"| {r['nproc']} | {pc} | {r['mode']}{wrong} | {r['device_engine']} | "
                     f"{r['median_us'] / 1e3:.1f} | {alg:.3f} | {bus:.3f} | – | {extra} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--_worker":
        worker(json.loads(sys.argv[2]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", default="cluster,single", help="comma list: cluster, single (default both)")
    ap.add_argument("--rates", default="1gbit,10gbit", help="link rates of the cluster part (default 1gbit,10gbit)")
    ap.add_argument("--hosts", type=int, default=2)
    ap.add_argument("--nproc-per-host", type=int, default=2)
    ap.add_argument("--sizes", default="16M,64M", help="all_reduce sizes of the cluster part (default 16M,64M)")
    ap.add_argument("--chunks", default="4M,1M", help="PLAIT_HOST_CHUNK_BYTES of the pipelined configurations")
    ap.add_argument("--configs", default=None, help="cluster part: only these configurations, comma list of "
                                                    "link-only, copy-all, pipe-<chunk> (default all)")
    ap.add_argument("--pcie-ratio", type=float, default=2.0,
                    help="PLAIT_EMU_PCIE_GBPS = this x the link rate in GB/s (default 2: 0.25 at 1gbit, 2.5 at 10gbit)")
    ap.add_argument("--pcie-gbps", default=None, help="explicit PLAIT_EMU_PCIE_GBPS per rate, e.g. "
                                                      "1gbit=0.5,10gbit=2 (overrides --pcie-ratio)")
    ap.add_argument("-n", "--iters", type=int, default=5, help="timed iterations per launch and size (default 5)")
    ap.add_argument("-w", "--warmup", type=int, default=1, help="untimed iterations per launch and size (default 1)")
    ap.add_argument("--rounds", type=int, default=2, help="cluster part: launches per configuration, interleaved "
                                                          "(default 2)")
    ap.add_argument("--nproc", default="2,4", help="one-host part: rank counts (default 2,4)")
    ap.add_argument("--single-size", default="64M", help="one-host part: all_reduce size (default 64M)")
    ap.add_argument("--single-pcie-gbps", type=float, default=2.5,
                    help="one-host part: PLAIT_EMU_PCIE_GBPS of the 'set' rows (default 2.5)")
    ap.add_argument("--single-rounds", type=int, default=2, help="one-host part: launches per mode, interleaved "
                                                                 "(default 2)")
    ap.add_argument("--port", type=int, default=29611, help="first MASTER_PORT of the cluster part")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per launch before its ranks are killed")
    ap.add_argument("--out", default=None, help="write everything (every iteration's time) to this JSON file")
    a = ap.parse_args(argv)
    a.sizes = [parse_size(s) for s in a.sizes.split(",")]
    a.chunks = [parse_size(s) for s in a.chunks.split(",") if s]
    a.nproc = [int(x) for x in a.nproc.split(",") if x]
    a.single_size = parse_size(a.single_size)
    parts = set(a.part.split(","))
    explicit = dict(kv.split("=") for kv in a.pcie_gbps.split(",")) if a.pcie_gbps else {}

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    t0 = time.time()
    data = {"meta": {"argv": sys.argv[1:], "host": platform.node(), "cpus": os.cpu_count(),
                     "loadavg_at_start": os.getloadavg(),
                     "note": "emulated device (PLAIT_DEVICE=emulate): CPU-emulated copies and sums; checks the "
                             "machinery, not GPU performance"}, "cluster": [], "single": []}

    def save():
        data["meta"]["wall_s"] = time.time() - t0
        if a.out:
            with open(a.out, "w") as f:
                json.dump(data, f, indent=1)

    bad = False
    if "cluster" in parts:
        from plait.testing.cluster import available

        ok, why = available()
        if not ok:
            raise SystemExit(f"the emulated cluster is not available here: {why}")
        for rate in a.rates.split(","):
            pcie = float(explicit[rate]) if rate in explicit else a.pcie_ratio * rate_gbytes(rate)
            d = run_cluster(a, rate, pcie, log)
            data["cluster"].append(d)
            save()
            print(cluster_table(d), "\n", flush=True)
            bad |= bool(d["failures"]) or any(r["wrong"] for c in d["configs"].values() for r in c["sizes"].values())
    if "single" in parts:
        rows = run_single(a, log)
        data["single"] = rows
        save()
        print(f"#### one host, all_reduce {human(a.single_size)} float32, emulated device\n")
        print(single_table(rows, a.single_size), flush=True)
        bad |= any("failed" in r or r.get("wrong") for r in rows)
    save()
    log(f"total {time.time() - t0:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
