"""All-reduce across emulated hosts: plait beside Gloo, with the cost model's predictions.

Brings up an emulated cluster (network namespaces on a bridge, every host's link shaped with tc tbf; see
``plait.testing.cluster``), runs ``plait-bench`` under ``torchrun`` on every host (plait and gloo interleaved size
by size in the same processes), and prints per size: plait's time, the algorithm the cost model chose and the time
it predicted, Gloo's time, both busbw as a fraction of the link rate, and Gloo/plait latency. Needs root.

    python bench/cluster.py --hosts 4 --nproc-per-host 1 --rate 1gbit
    python bench/cluster.py --matrix --json docs/cluster-bench.json     # 4x1 and 2x2 at 1 and 10 Gbit/s
    python bench/cluster.py --backend plait --compression none,int8,int4 -b 64M -e 64M -n 3   # compressed rows
    python bench/cluster.py --servers 0,2,4 -b 1M -e 64M        # summation servers: one launch per K

--servers K[,K...]: the cluster gets max(K) server hosts (shaped like the worker hosts) and every configuration is
run once per K, each a separate launch on the same cluster, with plait-server on the first K server hosts and
PLAIT_SERVERS=K on the workers (K=0: no servers, plain plait); the JSON has "servers" in each configuration and in
each plait row (with the share the planner chose, "server_share"), the tables say K in their heading and show the
share in the plan column ("servers S + ring").

Targets (issue 4): large-message busbw >= 90% of the link rate, small-message latency at least 5x below Gloo's,
predicted time within 15% of measured at every size.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))

from plait.bench.sizes import human  # noqa: E402
from plait.testing.cluster import Cluster, available  # noqa: E402


def rate_gbytes(rate: str) -> float:
    m = re.fullmatch(r"([\d.]+)\s*([kmg]?)bit", rate.lower())
    if not m:
        raise SystemExit(f"cannot parse rate {rate!r} (e.g. 1gbit, 100mbit)")
    return float(m.group(1)) * {"": 1e-9, "k": 1e-6, "m": 1e-3, "g": 1.0}[m.group(2)] / 8


def _launch(c, hosts, nproc, rate, argv, out, port, timeout, servers):
    """One plait-bench launch on cluster c (with plait-server on the first `servers` server hosts)."""
    env = {"OMP_NUM_THREADS": "1"}
    t0 = time.time()
    what = f"{hosts}x{nproc} at {rate}" + (f" with {servers} server(s)" if servers else "")
    procs = c.torchrun(nproc, argv, env=env, port=port, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, servers=servers)
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        if c.last_servers is not None:
            c.last_servers.stop()
        raise SystemExit(f"{what}: timed out after {timeout} s")
    srv = c.last_servers.wait(120) if c.last_servers is not None else []
    if any(p.returncode for p in procs) or not os.path.exists(out) or any(r.returncode for r in srv):
        sys.stderr.write("\n".join(logs[-2:])[-6000:])
        for j, r in enumerate(srv):
            sys.stderr.write(f"\n--- server {j} (exit {r.returncode}):\n{r.output[-2000:]}\n")
        raise SystemExit(f"{what}: plait-bench failed")
    with open(out) as f:
        data = json.load(f)
    for r in data["results"]:
        if r.get("backend", "").startswith("plait"):
            r.setdefault("servers", servers)
    data["config"] = {"hosts": hosts, "nproc_per_host": nproc, "rate": rate, "link_GBps": rate_gbytes(rate),
                      "servers": servers, "wall_s": time.time() - t0,
                      "server_stats": [r.stats for r in srv]}
    return data


def run_config(hosts, nproc, rate, sizes, backends, iters, port, timeout, timing="loop", compression=None,
               dtype="float32", servers=(0,)):
    """Every K in `servers` is a separate launch on one cluster with max(servers) server hosts; a list of results."""
    argv = ["-m", "plait.bench", "--op", "all_reduce", "-b", sizes[0], "-e", sizes[1], "-f", sizes[2],
            "--backend", backends, "--progress", "off", "--timing", timing]
    if iters:
        argv += ["-n", str(iters)]
    if compression:
        argv += ["--compression", compression]
    if dtype != "float32":
        argv += ["-d", dtype]
    every = []
    with tempfile.TemporaryDirectory(prefix="plait_cluster_bench_") as tmp, \
            Cluster(hosts=hosts, rate=rate, servers=max(servers)) as c:
        for k in servers:
            out = os.path.join(tmp, f"r{k}.json")
            every.append(_launch(c, hosts, nproc, rate, argv + ["--json", out], out, port, timeout, k))
    return every


def table(data) -> str:
    cfg = data["config"]
    link = cfg["link_GBps"]
    rows = {}
    for r in data["results"]:
        rows.setdefault(r["bytes"], {})[r["backend"]] = r
    srv = f", {cfg['servers']} summation server(s)" if cfg.get("servers") else ""
    lines = [f"### {cfg['hosts']} hosts x {cfg['nproc_per_host']} rank(s), {cfg['rate']} links{srv} "
             f"(world {data['meta']['world_size']})", "",
             "| size | plait algo | plait µs | model µs | model err | Gloo µs | plait busbw | Gloo busbw | "
             "Gloo/plait time |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for nbytes in sorted(rows):
        p, g = rows[nbytes].get("plait"), rows[nbytes].get("gloo")
        if not p:
            continue
        err = (p["predicted_us"] - p["time_us"]) / p["time_us"] * 100 if p.get("predicted_us") else float("nan")
        pb = f"{p['busbw']:.3f} GB/s ({p['busbw'] / link * 100:.0f}%)" if nbytes >= 1 << 20 else "–"
        gb = f"{g['busbw']:.3f} GB/s ({g['busbw'] / link * 100:.0f}%)" if g and nbytes >= 1 << 20 else "–"
        lines.append(f"| {human(nbytes)} | {p.get('plan', '?')} | {p['time_us']:.1f} | "
                     f"{p.get('predicted_us', float('nan')):.1f} | {err:+.0f}% | "
                     f"{g['time_us']:.1f} | {pb} | {gb} | {g['time_us'] / p['time_us']:.1f}x |"
                     if g else
                     f"| {human(nbytes)} | {p.get('plan', '?')} | {p['time_us']:.1f} | "
                     f"{p.get('predicted_us', float('nan')):.1f} | {err:+.0f}% | – | {pb} | – | – |")
    if any(r.get("wrong") for r in data["results"]):
        lines.append("\n**WRONG RESULTS**: " + ", ".join(f"{r['backend']} {human(r['bytes'])}"
                                                         for r in data["results"] if r.get("wrong")))
    return "\n".join(lines)


def compression_table(data) -> str:
    """Compressed rows (--compression): effective busbw (uncompressed size) and speed-up over plait/none."""
    cfg = data["config"]
    link = cfg["link_GBps"]
    rows = {}
    for r in data["results"]:
        rows.setdefault(r["bytes"], {})[r["backend"]] = r
    srv = f", {cfg['servers']} summation server(s)" if cfg.get("servers") else ""
    lines = [f"### {cfg['hosts']} hosts x {cfg['nproc_per_host']} rank(s), {cfg['rate']} links{srv}, "
             f"{data['meta']['dtype']} (world {data['meta']['world_size']})", "",
             "| size | variant | plan | time ms | busbw (uncompressed size) | vs plait/none | vNMSE |",
             "|---:|---|---|---:|---:|---:|---:|"]
    for nbytes in sorted(rows):
        base = rows[nbytes].get("plait/none")
        for label, r in rows[nbytes].items():
            ratio = f"{base['time_us'] / r['time_us']:.2f}x" if base else "–"
            v = f"{r['vnmse']:.2e}" if "vnmse" in r else "–"
            lines.append(f"| {human(nbytes)} | {label} | {r.get('plan', '?')} | {r['time_us'] / 1e3:.1f} | "
                         f"{r['busbw']:.3f} GB/s ({r['busbw'] / link * 100:.0f}% of link) | {ratio} | {v} |")
    if any(r.get("wrong") for r in data["results"]):
        lines.append("\n**WRONG RESULTS**: " + ", ".join(f"{r['backend']} {human(r['bytes'])}"
                                                          for r in data["results"] if r.get("wrong")))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, default=4)
    ap.add_argument("--nproc-per-host", type=int, default=1)
    ap.add_argument("--rate", default="1gbit", help="tc rate of every host's link (e.g. 1gbit, 10gbit)")
    ap.add_argument("--matrix", action="store_true", help="4x1 and 2x2 at 1gbit and 10gbit")
    ap.add_argument("-b", default="4")
    ap.add_argument("-e", default="256M")
    ap.add_argument("-f", default="4")
    ap.add_argument("-n", type=int, default=0, help="timed iterations per size (0: plait-bench's default)")
    ap.add_argument("--backend", default="plait,gloo")
    ap.add_argument("--timing", default="loop", choices=("loop", "iter"),
                    help="loop (default): nccl-tests' average over back-to-back iterations; iter: median of "
                         "per-iteration maxima (plait-bench's default, includes rank skew)")
    ap.add_argument("--compression", default=None, help="passed to plait-bench: comma list of none, int8, int4, "
                                                         "fp8, bf16 (plait/<codec> rows; table of speed-ups)")
    ap.add_argument("-d", "--dtype", default="float32", help="passed to plait-bench")
    ap.add_argument("--config", action="append", default=None,
                    help="HOSTSxNPROC@RATE, repeatable (e.g. 4x1@1gbit); overrides --hosts/--nproc-per-host/--rate")
    ap.add_argument("--servers", default="0",
                    help="K[,K...]: run every configuration once per K with K summation servers (plait-server on K "
                         "extra emulated hosts, PLAIT_SERVERS=K); 0 = none (default)")
    ap.add_argument("--port", type=int, default=29411)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--json", default=None, help="write every configuration's results here")
    a = ap.parse_args(argv)
    ok, why = available()
    if not ok:
        raise SystemExit(f"the emulated cluster is not available here: {why}")
    configs = ([(4, 1, "1gbit"), (2, 2, "1gbit"), (4, 1, "10gbit"), (2, 2, "10gbit")] if a.matrix
               else [(a.hosts, a.nproc_per_host, a.rate)])
    if a.config:
        configs = []
        for c in a.config:
            m = re.fullmatch(r"(\d+)x(\d+)@(\S+)", c)
            if not m:
                raise SystemExit(f"--config: cannot parse {c!r} (e.g. 4x1@1gbit)")
            configs.append((int(m.group(1)), int(m.group(2)), m.group(3)))
    try:
        servers = [int(x) for x in a.servers.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--servers: expected K[,K...], got {a.servers!r}") from None
    if not servers or min(servers) < 0:
        raise SystemExit(f"--servers: expected K[,K...] with K >= 0, got {a.servers!r}")
    every = []
    for hosts, nproc, rate in configs:
        for d in run_config(hosts, nproc, rate, (a.b, a.e, a.f), a.backend, a.n, a.port, a.timeout, a.timing,
                            a.compression, a.dtype, servers):
            every.append(d)
            print(compression_table(d) if a.compression else table(d), flush=True)
            print(flush=True)
            if a.json:
                with open(a.json, "w") as f:
                    json.dump(every, f, indent=1)


if __name__ == "__main__":
    main()
