"""Summation servers on the emulated cluster (issue 14): time, speed-up against the planner, bytes per link, DDP,
server memory.

An emulated cluster (``plait.testing.cluster``, network namespaces on a bridge; needs root) of 4 worker hosts and 4
server hosts, every link shaped with tc tbf (default 1 Gbit/s each way). Each configuration is a separate torchrun
launch (plait reads its knobs once per process) on the same cluster, with ``plait-server`` on the first k server
hosts (``Cluster.torchrun(servers=k)``: the servers get the workers' store, the workers PLAIT_SERVERS=k); the
configurations are interleaved round by round (the order alternates), so that slow phases of the machine hit all.

a. 4 worker hosts x 1 rank, a 64 MiB float32 all_reduce with k = 0 (plain ring), 1, 2, 4 servers, PLAIT_SERVER_SHARE
   unset (the planner picks the share from the rates it measured; the share is reported). Per configuration: the
   time (median over iterations of the maximum across ranks; every iteration starts after a 4-byte all_reduce as
   a barrier), busbw = algbw * 2(n-1)/n (n = ranks, nccl-tests' convention), the speed-up over k = 0 measured in
   the same run, the planner's prediction (``plait.plan_allreduce(M)``: ``servers_us`` and the speed-up
   ``servers_ring_us / servers_us``, as the workers' group sees it; and ``plait.plan_servers`` with the rates the
   group measured, pure bandwidth formulas and with the fixed costs), the ratio measured / predicted speed-up (goal
   >= 0.95), predicted / measured time (goal within 10%), and the ideal 1 + k(n-2)/n^2 (1.125, 1.25, 1.5).
b. Bytes per host over the timed iterations (4 worker hosts x 1 of part a), from the counters of the bridge-side
   end of every host's veth (read from /proc/<driver pid>/net/dev by rank 0 right before the first and right after
   the last timed iteration, both after a barrier; the bridge end's rx is what the host sent). Formula per
   iteration and direction: a worker host W(s) = (2(n-1)/n)(1-s)M + sM, a server V(s) = n s M / k (s: the share
   actually used, floor(count * share) / count). The counters hold frames: payload plus an Ethernet + IPv4 + TCP
   header per frame (14 + 20 + 32 with TCP timestamps, net.ipv4.tcp_timestamps is read from a host) and the
   frames that carry only ACKs (payload 0, sent for what the host receives) and the barriers. The veths pass GSO
   frames of up to 64 KiB, so frames are fewer than MSS segments: "payload" = bytes - frames * header is exact if
   every frame has a plain 66-byte header (SACK blocks in a few ACKs add a little). Both the raw counter and that
   payload are reported against the formula (goal: payload within 3%).
c. The same (a and b) with 2 worker hosts x 2 ranks (torchrun on hosts 0 and 1; shared memory inside a host, the
   host leaders on the links and the servers). With n = 2 hosts the servers save nothing at equal rates (1 + k(n-2)/
   n^2 = 1) and the planner keeps the ring; forced shares (PLAIT_SERVER_SHARE) show what the servers then cost and
   check the byte formulas through the hierarchy.
d. A DDP step (``plait-bench ddp --backend plait --model mlp``: ~25M parameters, ~100 MB of gradients per step) on 4
   worker hosts x 1 with k = 0 and k = 4 (PLAIT_SERVER_SHARE unset): step time, compute time (same step under
   no_sync), exposed communication.
e. A server's memory for a 256 MiB all-reduce (k = 2, 4 worker hosts x 1, PLAIT_SERVER_SHARE unset): rank 0 reads
   /proc/<server pid>/status (the servers run in the same PID namespace): VmRSS idle (when the server printed that
   it serves, before any worker connected) and with the job connected, resets the peak (``echo 5 >
   /proc/PID/clear_refs``), runs the all-reduces, reads VmHWM; plus the server's own stats (peak_buffer_bytes).

    python bench/servers.py                                   # everything, 1 Gbit/s, writes docs/servers_emulated.json
    python bench/servers.py --parts a --rounds 2 -n 5         # part a (and b) only
    python bench/servers.py --parts c --json /tmp/c.json
    python bench/servers.py --parts a --env PLAIT_SERVER_SEGMENT_BYTES=2097152 --json /tmp/seg2m.json
    python bench/servers.py --parts a --a-shares 4:1.0 --tcp-cc reno --json docs/servers_emulated_reno.json
    python bench/servers.py --from-json docs/servers_emulated.json        # the tables of a saved run again

Per configuration the tables also give the machine's CPU split over the timed window (/proc/stat: user, sys +
softirq, idle), the processes' CPU time per iteration (the ranks', the servers'), and the TCP retransmissions and
RTO timeouts of every host's namespace (/proc/PID/net/snmp, netstat) over the timed window. The namespaces inherit
the machine's TCP congestion control (bbr on the VM these numbers come from; a namespace may only pick one of
net.ipv4.tcp_allowed_congestion_control, here reno or bbr: --tcp-cc). Experiments: --tbf-limit (deeper queues),
--env (knobs), --server-arg (plait-server options), --a-shares / --c-shares (forced shares). Before each launch
the driver waits (--quiet-wait) until other jobs leave the CPUs idle: the machine has 2 cores and every emulated
host's TCP stack runs on them.

PLAIT_* variables of the caller's environment are not passed on (--env adds knobs to every launch). Exit status 1 when
a result was wrong or a launch failed. The cluster is torn down however the run ends.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
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

HDR = 14 + 20 + 20  # Ethernet + IPv4 + TCP without options; + 12 with TCP timestamps


# ------------------------------------------------------------------------------------------------------------------
# worker (one rank, started by torchrun on a worker host)


def _netdev(pid: int) -> dict:
    """{iface: [rx_bytes, rx_packets, tx_bytes, tx_packets]} of the network namespace of process ``pid``."""
    out = {}
    with open(f"/proc/{pid}/net/dev") as f:
        for line in f.readlines()[2:]:
            name, rest = line.split(":", 1)
            v = rest.split()
            out[name.strip()] = [int(v[0]), int(v[1]), int(v[8]), int(v[9])]
    return out


_CPU_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def _cpu() -> list[int]:
    """The machine's CPU time so far (/proc/stat "cpu" line): the fields of _CPU_FIELDS."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:1 + len(_CPU_FIELDS)]]


def _mem(pid: int) -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS", "VmHWM")):
                    k, v = line.split(":")
                    out[k] = int(v.split()[0]) * 1024
    except OSError as e:
        out["error"] = str(e)
    return out


_TCP_KEYS = {"Tcp": ("RetransSegs", "OutSegs", "InSegs"),
             "TcpExt": ("TCPTimeouts", "TCPLossProbes", "TCPFastRetrans", "TCPSlowStartRetrans", "TCPSackRecovery",
                        "TCPLostRetransmit", "TCPSpuriousRTOs", "TCPDSACKRecv")}


def _tcpstats(pid: int) -> dict:
    """Selected TCP counters of the network namespace of process ``pid`` (/proc/PID/net/snmp and netstat)."""
    out = {}
    for fn in ("snmp", "netstat"):
        try:
            with open(f"/proc/{pid}/net/{fn}") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        for head, vals in zip(lines[::2], lines[1::2]):
            proto, names = head.split(":", 1)
            if proto in _TCP_KEYS:
                for name, v in zip(names.split(), vals.split(":", 1)[1].split()):
                    if name in _TCP_KEYS[proto]:
                        out[name] = int(v)
    return out


def _proc_cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            v = f.read().rsplit(")", 1)[1].split()
        return (int(v[11]) + int(v[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def _read_pids(path: str) -> dict:
    for _ in range(600):
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        time.sleep(0.1)
    return {"servers": [], "agents": []}


def worker(spec: dict) -> None:
    import torch
    import torch.distributed as dist

    import plait

    torch.set_num_threads(1)
    t_start = time.time()
    dist.init_process_group("plait", timeout=datetime.timedelta(seconds=spec["pg_timeout"]))
    rank, ws = dist.get_rank(), dist.get_world_size()
    out = {"rank": rank, "world_size": ws, "phase_s": {"init": time.time() - t_start}}
    nbytes = spec["bytes"]
    n = nbytes // 4
    t = torch.full((n,), float(rank + 1))
    bar = torch.zeros(1)
    server_pids, ns_pids = [], []
    if rank == 0:
        pids = _read_pids(spec["pid_file"])  # one process per namespace: the agents, then the servers
        ns_pids = [("worker", h, p) for h, p in pids["agents"]] + [("server", h, p) for h, p in pids["servers"]]
        server_pids = [p for _, p in pids["servers"]] if spec.get("rss") else []
    if server_pids:
        out["server_mem_connected"] = [_mem(p) for p in server_pids]
        for p in server_pids:
            with open(f"/proc/{p}/clear_refs", "w") as f:
                f.write("5")  # reset the peak resident set (VmHWM) to the current RSS
        out["server_mem_reset"] = [_mem(p) for p in server_pids]
    dist.all_reduce(t)  # correctness, exact (small integers in float32)
    want = ws * (ws + 1) / 2
    out["wrong"] = int((t != want).sum().item())
    burst = [t] + [t.clone() for _ in range(spec.get("burst", 1) - 1)]

    def one():  # one timed iteration: the tensors all_reduced back to back (async, as DDP issues its buckets)
        if len(burst) == 1:
            dist.all_reduce(t)
            return
        for w in [dist.all_reduce(x, async_op=True) for x in burst]:
            w.wait()

    for _ in range(spec["warmup"]):
        one()
    dist.all_reduce(bar)
    all_servers = [p for role, _, p in ns_pids if role == "server"]
    if rank == 0:
        srv_cpu0 = [_proc_cpu_s(p) for p in all_servers]
    my_cpu0 = time.process_time()
    if rank == 0:
        tcp0 = [_tcpstats(p) for _, _, p in ns_pids]
        c0, cpu0, t0w = _netdev(spec["driver_pid"]), _cpu(), time.perf_counter()
    times = []
    for _ in range(spec["iters"]):
        dist.all_reduce(bar)
        t0 = time.perf_counter()
        one()
        times.append((time.perf_counter() - t0) * 1e6)
    dist.all_reduce(bar)
    my_cpu = torch.tensor([time.process_time() - my_cpu0], dtype=torch.float64)
    if rank == 0:
        c1, cpu1, wall = _netdev(spec["driver_pid"]), _cpu(), time.perf_counter() - t0w
        out["server_cpu_s"] = [_proc_cpu_s(p) - a for p, a in zip(all_servers, srv_cpu0)]
        out["counters"] = {k: [b - a for a, b in zip(c0[k], c1[k])] for k in spec["veths"] if k in c0 and k in c1}
        d = [b - a for a, b in zip(cpu0, cpu1)]
        out["cpu"] = {k: v / max(1, sum(d)) for k, v in zip(_CPU_FIELDS, d)}  # shares of all CPU time
        out["cpu_busy"] = 1 - out["cpu"]["idle"] - out["cpu"]["iowait"]
        out["window_s"] = wall
        out["tcp"] = [{"role": role, "host": h, **{k: b.get(k, 0) - a.get(k, 0) for k in b}}
                      for (role, h, _), a, b in zip(ns_pids, tcp0, [_tcpstats(p) for _, _, p in ns_pids])]
        if server_pids:
            out["server_mem_after"] = [_mem(p) for p in server_pids]
    tt = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(tt, op=dist.ReduceOp.MAX)
    dist.all_reduce(my_cpu)
    out["workers_cpu_s"] = float(my_cpu)  # all ranks' process CPU time over the timed window (user + system)
    out["times_us"] = tt.tolist()  # per iteration, max across ranks
    if rank == 0:
        topo = plait.topology()
        p = plait.plan_allreduce(nbytes)
        out["topology"] = {k: topo.get(k) for k in ("nhosts", "max_local", "link_gbps", "link_alpha_us",
                                                     "link_source", "servers")}
        out["plan"] = {"algo": p[0], "predicted_us": p[2], "why": p[3], "server_share": p.server_share,
                       "servers_us": p.servers_us, "servers_ring_us": p.servers_ring_us,
                       "servers_worker_bytes": p.servers_worker_bytes,
                       "servers_server_bytes": p.servers_server_bytes, "servers_why": p.servers_why}
        srv = topo.get("servers") or {}
        k = srv.get("count") or 0
        if k and topo.get("link_gbps") and srv.get("gbps"):
            nh = topo["nhosts"]
            seg = int(os.environ.get("PLAIT_SERVER_SEGMENT_BYTES", 512 << 10))
            for label, alpha, sb in (("formula", 0.0, 0), ("fixed_costs", topo.get("link_alpha_us") or 0.0, seg)):
                ps = plait.plan_servers(nh, topo["link_gbps"], srv["gbps"], nbytes, max_servers=max(4, k),
                                        alpha_us=alpha, segment_bytes=sb)
                out.setdefault("plan_servers", {})[label] = {
                    "alpha_us": alpha, "segment_bytes": sb, "ring_us": ps.ring_us, "k_saturate": ps.k_saturate,
                    "k_useful": ps.k_useful,
                    "rows": [{"k": r.k, "share": r.share, "predicted_us": r.predicted_us, "speedup": r.speedup,
                              "worker_bytes": r.worker_bytes, "server_bytes": r.server_bytes} for r in ps.rows]}
    dist.destroy_process_group()
    if rank == 0:
        with open(os.path.join(spec["outdir"], "rank0.json"), "w") as f:
            json.dump(out, f)


# ------------------------------------------------------------------------------------------------------------------
# driver


def ideal(n: int, k: int) -> float:
    return 1 + k * (n - 2) / n**2


class Runner:
    def __init__(self, c, a, log):
        self.c, self.a, self.log = c, a, log
        self.failures = []
        self.port = a.port

    def env(self, extra: dict) -> dict:
        e = {"OMP_NUM_THREADS": "1"}
        e.update(self.a.env_knobs)
        e.update({k: str(v) for k, v in extra.items()})
        return e

    def _torchrun(self, nproc, hosts, argv, k, env, timeout, on_started=None):
        self.port += 1
        idle = {}

        def on_line(j, line):  # a server's idle RSS: when it serves, before any worker has connected
            if line.startswith("plait-server: serving") and self.c.last_servers is not None:
                idle[j] = _mem(self.c.last_servers.pids[j])

        procs = self.c.torchrun(nproc, argv, env=env, port=self.port, hosts=hosts, servers=k,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                server_on_line=on_line, server_args=self.a.server_arg)
        group = self.c.last_servers
        if on_started is not None:
            on_started(group, procs)
        logs, deadline = [], time.time() + timeout
        for p in procs:
            try:
                logs.append(p.communicate(timeout=max(1.0, deadline - time.time()))[0] or "")
            except subprocess.TimeoutExpired:
                logs.append("(timed out)")
                for q in procs:
                    q.kill()
        servers = group.wait(120) if group is not None else []
        ok = all(p.returncode == 0 for p in procs) and all(r.returncode == 0 for r in servers)
        log = "\n".join(f"--- host {h} (rc {p.returncode}) ---\n{l[-2500:]}"
                        for h, p, l in zip(hosts or range(self.c.hosts), procs, logs))
        log += "".join(f"\n--- server {j} (rc {r.returncode}) ---\n{r.output[-2500:]}" for j, r in enumerate(servers))
        return ok, log, servers, [idle.get(j) for j in range(len(servers))]

    def background(self) -> float:
        """The machine's busy share over 1 s with nothing of ours running (other jobs on the machine); waits up to
        --quiet-wait seconds for it to drop below 15%."""
        deadline = time.time() + self.a.quiet_wait
        said = False
        while True:
            c0 = _cpu()
            time.sleep(1.0)
            d = [b - a for a, b in zip(c0, _cpu())]
            busy = 1 - (d[3] + d[4]) / max(1, sum(d))
            if busy <= 0.15 or time.time() > deadline:
                return busy
            if not said:
                self.log(f"  (the machine is {busy:.0%} busy with other jobs: waiting up to {self.a.quiet_wait:.0f} s)")
                said = True
            time.sleep(4.0)

    def allreduce(self, label, nproc, hosts, k, share, nbytes, iters, warmup, rss=False):
        """One launch of the worker above; its rank-0 record with the servers' stats, or None if it failed."""
        bg = self.background()
        if bg > 0.15:
            self.log(f"  (the machine is still {bg:.0%} busy before {label}: other jobs are running)")
        with tempfile.TemporaryDirectory(prefix="plait_servers_bench_") as tmp:
            veths = [self.c.veth(i) for i in range(self.c.nodes)]
            spec = {"bytes": nbytes, "iters": iters, "warmup": warmup, "pg_timeout": self.a.pg_timeout,
                    "burst": self.a.burst,
                    "outdir": tmp, "driver_pid": os.getpid(), "veths": veths, "rss": rss,
                    "pid_file": os.path.join(tmp, "pids.json")}
            spec_path = os.path.join(tmp, "spec.json")
            with open(spec_path, "w") as f:
                json.dump(spec, f)
            extra = {} if share is None else {"PLAIT_SERVER_SHARE": share}

            def started(group, procs):
                pids = {"agents": [[h, p.pid] for h, p in zip(hosts or range(self.c.hosts), procs)],
                        "servers": [[h, p] for h, p in zip(group.hosts, group.pids)] if group is not None else []}
                with open(spec["pid_file"] + ".tmp", "w") as f:
                    json.dump(pids, f)
                os.replace(spec["pid_file"] + ".tmp", spec["pid_file"])

            t0 = time.time()
            ok, log, servers, idle = self._torchrun(nproc, hosts, [os.path.abspath(__file__), "--_worker", spec_path],
                                                    k, self.env(extra), self.a.timeout, started)
            path = os.path.join(tmp, "rank0.json")
            if not ok or not os.path.exists(path):
                self.failures.append({"config": label, "log": log})
                self.log(f"{label}: FAILED\n{log}")
                return None
            with open(path) as f:
                rec = json.load(f)
        rec.update(label=label, k=k, forced_share=share, nproc=nproc, hosts=hosts, wall_s=time.time() - t0,
                   burst=self.a.burst,
                   background_busy=bg, loadavg_before=os.getloadavg()[0],
                   server_stats=[r.stats for r in servers], server_hosts=[r.host for r in servers],
                   server_mem_idle=idle, veth_names=veths)
        med = statistics.median(rec["times_us"]) / 1e3
        rt = sum(t.get("RetransSegs", 0) for t in rec.get("tcp", []))
        rto = sum(t.get("TCPTimeouts", 0) for t in rec.get("tcp", []))
        cpu = rec["cpu"]
        self.log(f"  {label:14s} median {med:8.1f} ms  share {rec['plan']['server_share']:.3f}  cpu user "
                 f"{cpu['user']:.0%} sys {cpu['system']:.0%} softirq {cpu['softirq']:.0%} idle {cpu['idle']:.0%}  "
                 f"retrans {rt} RTOs {rto}  wrong {rec['wrong']}  ({rec['wall_s']:.0f} s)")
        return rec

    def ddp(self, label, k, steps):
        bg = self.background()
        with tempfile.TemporaryDirectory(prefix="plait_servers_ddp_") as tmp:
            out = os.path.join(tmp, "ddp.json")
            argv = ["-m", "plait.bench", "ddp", "--backend", "plait", "--model", "mlp", "--steps", str(steps),
                    "--rounds", "1", "--warmup", "2", "--batch", str(self.a.ddp_batch), "--json", out]
            t0 = time.time()
            ok, log, servers, _ = self._torchrun(1, None, argv, k, self.env({}), self.a.timeout)
            if not ok or not os.path.exists(out):
                self.failures.append({"config": label, "log": log})
                self.log(f"{label}: FAILED\n{log}")
                return None
            with open(out) as f:
                d = json.load(f)
        row = d["results"][0]
        row.update(label=label, k=k, wall_s=time.time() - t0, server_stats=[r.stats for r in servers],
                   background_busy=bg)
        self.log(f"  {label:14s} step {row['step_ms']:8.1f} ms  compute {row['compute_ms']:8.1f} ms  "
                 f"({row['wall_s']:.0f} s)")
        return row


def rounds_of(r: Runner, configs, rounds, **kw):
    """configs: [(label, nproc, hosts, k, share)]; interleaved rounds, alternating order."""
    runs = {c[0]: [] for c in configs}
    for rnd in range(rounds):
        r.log(f" round {rnd + 1}/{rounds}")
        order = configs if rnd % 2 == 0 else configs[::-1]
        for label, nproc, hosts, k, share in order:
            rec = r.allreduce(label, nproc, hosts, k, share, **kw)
            if rec is not None:
                runs[label].append(rec)
    return runs


def formulas(nbytes: int, n: int, k: int, share: float) -> tuple[float, float, float]:
    """(s actually used, W(s), V(s)) per iteration and direction for an all-reduce of nbytes float32 on n hosts."""
    count = nbytes // 4
    s = (int(count * share) / count) if k else 0.0
    return s, 2 * (n - 1) / n * (1 - s) * nbytes + s * nbytes, (n * s * nbytes / k if k else 0.0)


def summarize(worker_hosts: int, runs: dict, nbytes: int, nhosts: int, world: int, hdr: int,
              rate_bps: int) -> list[dict]:
    """Rows for a table from the launches of each configuration (each launch's own share for the byte formulas)."""
    rows = []
    base = None
    for label, recs in runs.items():
        if not recs:
            continue
        its = [t for r in recs for t in r["times_us"]]
        med = statistics.median(its)
        burst = recs[0].get("burst", 1)
        k = recs[0]["k"]
        plan = recs[-1]["plan"]
        share = statistics.median(r["plan"]["server_share"] for r in recs)
        alg = burst * nbytes / med / 1e3
        row = {"label": label, "k": k, "burst": burst, "forced_share": recs[0]["forced_share"], "share": share,
               "shares_seen": sorted({r["plan"]["server_share"] for r in recs}), "launches": len(recs),
               "iters": len(its), "median_us": med, "min_us": min(its), "max_us": max(its),
               "algbw_GBps": alg, "busbw_GBps": alg * 2 * (world - 1) / world,
               "busbw_of_link": alg * 2 * (world - 1) / world / (rate_bps / 8e9) if rate_bps else None,
               "wrong": sum(r["wrong"] for r in recs), "cpu_busy": statistics.median(r["cpu_busy"] for r in recs),
               "cpu": {f: statistics.median(r["cpu"][f] for r in recs) for f in recs[0]["cpu"]},
               "link_gbps": statistics.median(r["topology"]["link_gbps"] for r in recs),
               "plan_algo": plan["algo"], "plan_why": plan["servers_why"] if k else plan["why"]}
        srv = recs[-1]["topology"].get("servers") or {}
        if k:
            row["server_gbps"] = statistics.median(r["topology"]["servers"]["gbps"] for r in recs)
            row["server_rate_source"] = srv.get("source")
            pred = burst * statistics.median(r["plan"]["servers_us"] for r in recs)  # the tensors one after another
            ring = burst * statistics.median(r["plan"]["servers_ring_us"] for r in recs)
            row.update(predicted_us=pred, predicted_ring_us=ring, predicted_speedup=ring / pred if pred else None)
            ps = recs[-1].get("plan_servers")
            if ps:
                for lab, p in ps.items():
                    rk = p["rows"][k] if k < len(p["rows"]) else None
                    if rk:
                        row[f"plan_servers_{lab}"] = {"share": rk["share"], "predicted_us": rk["predicted_us"],
                                                      "speedup": rk["speedup"], "ring_us": p["ring_us"]}
        else:
            row.update(predicted_us=burst * statistics.median(r["plan"]["predicted_us"] for r in recs),
                       predicted_speedup=1.0)
        row["ideal_speedup"] = ideal(nhosts, k)
        # bytes (per timed iteration, per direction) against the formulas, with each launch's share
        s_used, w_formula, v_formula = formulas(nbytes, nhosts, k, share)
        per_host = []
        for rec in recs:
            iters = len(rec["times_us"])
            _, w_launch, v_launch = formulas(nbytes, nhosts, k, rec["plan"]["server_share"])
            w_launch, v_launch = w_launch * burst, v_launch * burst
            for i, name in enumerate(rec["veth_names"]):
                cnt = rec["counters"].get(name)
                if cnt is None:
                    continue
                is_server = i >= worker_hosts
                used = (i - worker_hosts) < k if is_server else (rec["hosts"] is None or i in rec["hosts"])
                if not used:
                    continue
                rx_b, rx_p, tx_b, tx_p = cnt  # bridge side: rx = what the host sent
                formula = (v_launch if is_server else w_launch) * iters
                per_host.append({"host": i, "role": "server" if is_server else "worker", "iters": iters,
                                 "sent_bytes": rx_b, "sent_frames": rx_p, "sent_payload": rx_b - rx_p * hdr,
                                 "recv_bytes": tx_b, "recv_frames": tx_p, "recv_payload": tx_b - tx_p * hdr,
                                 "formula": formula})
        agg = {}
        for h in per_host:
            a = agg.setdefault(h["host"], {"host": h["host"], "role": h["role"], "sent_bytes": 0, "sent_payload": 0,
                                           "sent_frames": 0, "recv_payload": 0, "formula": 0, "iters": 0})
            for key in ("sent_bytes", "sent_payload", "sent_frames", "recv_payload", "formula", "iters"):
                a[key] += h[key]
        for a in agg.values():
            f = a["formula"]
            a["payload_vs_formula"] = a["sent_payload"] / f - 1 if f else None
            a["raw_vs_formula"] = a["sent_bytes"] / f - 1 if f else None
            a["recv_payload_vs_formula"] = a["recv_payload"] / f - 1 if f else None
        tcp = {}
        for rec in recs:
            for t in rec.get("tcp", []):
                a = tcp.setdefault((t["role"], t["host"]), {"role": t["role"], "host": t["host"]})
                for key, v in t.items():
                    if key not in ("role", "host"):
                        a[key] = a.get(key, 0) + v
        row["tcp"] = sorted(tcp.values(), key=lambda x: x["host"])
        row["retrans_segs"] = sum(t.get("RetransSegs", 0) for t in row["tcp"])
        row["rto_timeouts"] = sum(t.get("TCPTimeouts", 0) for t in row["tcp"])
        row["out_segs"] = sum(t.get("OutSegs", 0) for t in row["tcp"])
        if all("workers_cpu_s" in rec for rec in recs):
            row["workers_cpu_s_per_iter"] = statistics.median(rec["workers_cpu_s"] / len(rec["times_us"])
                                                              for rec in recs)
            row["servers_cpu_s_per_iter"] = statistics.median(sum(rec["server_cpu_s"]) / len(rec["times_us"])
                                                              for rec in recs)
        row["share_used"] = s_used
        row["W_formula_per_iter"] = w_formula
        row["V_formula_per_iter"] = v_formula
        row["bytes"] = sorted(agg.values(), key=lambda x: x["host"])
        if recs[0].get("server_stats"):
            row["server_peak_buffer_bytes"] = [max((r["server_stats"][j] or {}).get("peak_buffer_bytes", 0)
                                                   for r in recs) for j in range(k)]
        rows.append(row)
        if k == 0 and row["forced_share"] is None:
            base = row
    for row in rows:
        if base:
            row["measured_speedup"] = base["median_us"] / row["median_us"]
            if row.get("predicted_speedup"):
                row["speedup_ratio"] = row["measured_speedup"] / row["predicted_speedup"]
        if row.get("predicted_us"):
            row["predicted_over_measured"] = row["predicted_us"] / row["median_us"]
    return rows


def table_times(title: str, rows: list[dict], link_GBps: float) -> str:
    lines = [f"#### {title}", "",
             "| config | k | share | time ms | busbw GB/s (of link) | speed-up | predicted ms | predicted speed-up | "
             "plan_servers speed-up (formula / fixed costs) | measured/predicted speed-up (goal >= 0.95) | "
             "predicted/measured time (goal 0.9-1.1) | ideal | CPU user / sys+softirq / idle | TCP retrans segs / RTOs | "
             "process CPU s per iteration: workers / servers |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ps = " / ".join(f"{r[key]['speedup']:.3f}" for key in ("plan_servers_formula", "plan_servers_fixed_costs")
                        if key in r) or "–"
        ratio = r.get("speedup_ratio")
        pm = r.get("predicted_over_measured")
        goal1 = "–" if not r["k"] or ratio is None else f"{ratio:.3f} " + ("met" if ratio >= 0.95 else "**not met**")
        goal2 = "–" if pm is None else f"{pm:.3f} " + ("met" if 0.9 <= pm <= 1.1 else "**not met**")
        wrong = " **WRONG**" if r["wrong"] else ""
        seen = r.get("shares_seen") or [r["share"]]
        share = f"{r['share']:.3f}" + (f" ({min(seen):.3f}-{max(seen):.3f})" if max(seen) - min(seen) > 5e-4 else "")
        lines.append(
            f"| {r['label']}{wrong} | {r['k']} | {share} | {r['median_us'] / 1e3:.1f} | "
            f"{r['busbw_GBps']:.4f} ({r['busbw_GBps'] / link_GBps:.0%}) | {r.get('measured_speedup', float('nan')):.3f} | "
            f"{r['predicted_us'] / 1e3:.1f} | {r['predicted_speedup']:.3f} | {ps} | {goal1} | {goal2} | "
            f"{r['ideal_speedup']:.3f} | {r['cpu']['user']:.0%} / {r['cpu']['system'] + r['cpu']['softirq']:.0%} / "
            f"{r['cpu']['idle']:.0%} | {r['retrans_segs']} / {r['rto_timeouts']} | "
            + (f"{r['workers_cpu_s_per_iter']:.2f} / {r['servers_cpu_s_per_iter']:.2f} |"
               if "workers_cpu_s_per_iter" in r else "– |"))
    return "\n".join(lines)


def table_bytes(title: str, rows: list[dict], hdr: int) -> str:
    lines = [f"#### {title}", "",
             f"Per host, sent over the timed iterations (all launches of the configuration), bridge-side veth counters; "
             f"payload = bytes - frames x {hdr} B of headers.", "",
             "| config | host | role | formula MiB | counter MiB | vs formula | payload MiB | vs formula (goal +-3%) | "
             "frames | received payload vs formula |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        for b in r["bytes"]:
            pv = b["payload_vs_formula"]
            goal = "–" if pv is None else f"{pv:+.2%} " + ("met" if abs(pv) <= 0.03 else "**not met**")
            lines.append(f"| {r['label']} | {b['host']} | {b['role']} | {b['formula'] / 2**20:.1f} | "
                         f"{b['sent_bytes'] / 2**20:.1f} | "
                         f"{'–' if b['raw_vs_formula'] is None else format(b['raw_vs_formula'], '+.2%')} | "
                         f"{b['sent_payload'] / 2**20:.1f} | {goal} | {b['sent_frames']} | "
                         f"{'–' if b['recv_payload_vs_formula'] is None else format(b['recv_payload_vs_formula'], '+.2%')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="a,c,d,e", help="comma list of a (with b), c, d, e")
    ap.add_argument("--rate", default="1gbit")
    ap.add_argument("--hosts", type=int, default=4)
    ap.add_argument("--ks", default="0,1,2,4", help="server counts for parts a and c")
    ap.add_argument("--size", default="64M")
    ap.add_argument("-n", "--iters", type=int, default=8, help="timed iterations per launch")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--a-shares", default="", help="part a: forced (k:share) configurations besides ks, e.g. 4:1.0")
    ap.add_argument("--c-shares", default="2:0.5,4:1.0", help="part c: forced (k:share) configurations besides ks")
    ap.add_argument("--burst", type=int, default=1,
                    help="parts a and c: all_reduce this many tensors of --size per iteration, issued back to back "
                         "with async_op (DDP's bucket pattern); times and bytes are per iteration")
    ap.add_argument("--ddp-steps", type=int, default=8)
    ap.add_argument("--ddp-rounds", type=int, default=2)
    ap.add_argument("--ddp-batch", type=int, default=8, help="plait-bench ddp --batch (per rank)")
    ap.add_argument("--rss-size", default="256M")
    ap.add_argument("--env", action="append", default=[], help="KEY=VALUE knob for every launch (repeatable)")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="an extra plait-server argument for every launch, repeatable (e.g. --server-arg=--depth=16)")
    ap.add_argument("--tbf-limit", default=None,
                    help="experiment: replace every tbf's queue limit (bytes, K/M suffixes) after the cluster is up "
                         "(default: the harness's burst + 5 ms of rate)")
    ap.add_argument("--quiet-wait", type=float, default=900,
                    help="before each launch, wait up to this many seconds for other jobs to leave the CPUs idle")
    ap.add_argument("--tcp-cc", default=None,
                    help="experiment: net.ipv4.tcp_congestion_control in every host's namespace (default: what a new "
                         "namespace inherits, reported)")
    ap.add_argument("--port", type=int, default=29700)
    ap.add_argument("--pg-timeout", type=float, default=300)
    ap.add_argument("--timeout", type=float, default=900, help="per launch")
    ap.add_argument("--json", default=os.path.join(ROOT, "docs", "servers_emulated.json"))
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--from-json", default=None,
                    help="recompute the rows and print the tables of a saved result (rewrites it when --json names it)")
    a = ap.parse_args(argv)
    if a._worker:
        with open(a._worker) as f:
            worker(json.load(f))
        return 0
    if a.from_json:
        with open(a.from_json) as f:
            result = json.load(f)
        m = result["meta"]
        if "rate_bps" not in m:  # results written before these fields were recorded
            from plait.testing.cluster import parse_rate

            m["rate_bps"] = parse_rate(m["rate"])
        for p in result["parts"].values():
            if "launches" in p and isinstance(p["launches"], dict) and "worker_hosts" not in p:
                p["worker_hosts"] = int(re.search(r"hosts=(\d+)", m["cluster"]).group(1))
        for part in result["parts"]:
            summarize_part(result, part)
        if a.json and os.path.abspath(a.json) == os.path.abspath(a.from_json):
            with open(a.json, "w") as f:
                json.dump(result, f, indent=1)
        print("\n\n".join(t for part in result["parts"] for t in render(result, part)))
        return 0

    from plait.testing.cluster import Cluster, available, parse_rate

    ok, why = available()
    if not ok:
        raise SystemExit(f"the emulated cluster is not available here: {why}")
    for k in [k for k in os.environ if k.startswith("PLAIT_")]:
        del os.environ[k]
    a.env_knobs = dict(kv.split("=", 1) for kv in a.env)
    parts = [p.strip() for p in a.parts.split(",") if p.strip()]
    ks = [int(x) for x in a.ks.split(",")]
    nbytes = parse_size(a.size)
    rate_bps = parse_rate(a.rate)
    t_start = time.time()

    def log(msg):
        print(f"[{time.time() - t_start:6.0f} s] {msg}", flush=True)

    result = {"meta": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "host": platform.node(), "cpus": os.cpu_count(), "kernel": platform.release(),
                       "argv": sys.argv, "rate": a.rate, "env": a.env_knobs, "server_args": a.server_arg,
                       "iters": a.iters, "warmup": a.warmup,
                       "rounds": a.rounds, "bytes": nbytes, "rate_bps": rate_bps},
              "parts": {}, "failures": []}
    with Cluster(hosts=a.hosts, rate=a.rate, servers=max(ks + [4]), tcp_cc=a.tcp_cc) as c:
        if a.tbf_limit:
            st = c._state["tbf"]
            tbf = ["root", "tbf", "rate", f"{rate_bps}bit", "burst", str(st["burst"]), "limit",
                   str(parse_size(a.tbf_limit))]
            for i in range(c.nodes):
                subprocess.run(["tc", "qdisc", "change", "dev", c.veth(i), *tbf], check=True)
                c.run(i, ["tc", "qdisc", "change", "dev", "eth0", *tbf], check=True)
            result["meta"]["tbf_limit"] = parse_size(a.tbf_limit)
        result["meta"]["tbf"] = c._state["tbf"]
        result["meta"]["tcp_congestion_control"] = c.run(
            0, ["cat", "/proc/sys/net/ipv4/tcp_congestion_control"]).stdout.strip()
        ts = c.run(0, ["cat", "/proc/sys/net/ipv4/tcp_timestamps"]).stdout.strip()
        hdr = HDR + (12 if ts in ("1", "2") else 0)
        bw = c.measure_bandwidth(0, 1, seconds=1.0)
        bws = c.measure_bandwidth(0, c.server_host(0), seconds=1.0)
        result["meta"].update(tcp_timestamps=ts, header_bytes=hdr, cluster=repr(c),
                              tcp_stream_mbit_s={"worker_to_worker": bw["mbit_s"], "worker_to_server": bws["mbit_s"]})
        log(f"cluster {c!r}; one TCP stream h0->h1 {bw['mbit_s']:.0f} Mbit/s, h0->server {bws['mbit_s']:.0f} Mbit/s; "
            f"frame header {hdr} B; TCP congestion control {result['meta']['tcp_congestion_control']}")
        r = Runner(c, a, log)
        if "a" in parts:
            log(f"part a/b: {a.hosts} worker hosts x 1, {human(nbytes)}, k = {ks}")
            cfgs = [(f"k={k}", 1, None, k, None) for k in ks]
            for kv in [x for x in a.a_shares.split(",") if x]:
                k, s = kv.split(":")
                cfgs.append((f"k={k} s={s}", 1, None, int(k), s))
            runs = rounds_of(r, cfgs, a.rounds, nbytes=nbytes, iters=a.iters, warmup=a.warmup)
            result["parts"]["a"] = {"worker_hosts": c.hosts, "hosts": a.hosts, "nproc_per_host": 1, "launches": runs}
            summarize_part(result, "a")
            print("\n\n".join(render(result, "a")) + "\n", flush=True)
        if "c" in parts:
            log(f"part c: 2 worker hosts x 2, {human(nbytes)}")
            cfgs = [(f"k={k}", 2, [0, 1], k, None) for k in ks]
            for kv in [x for x in a.c_shares.split(",") if x]:
                k, s = kv.split(":")
                cfgs.append((f"k={k} s={s}", 2, [0, 1], int(k), s))
            runs = rounds_of(r, cfgs, a.rounds, nbytes=nbytes, iters=a.iters, warmup=a.warmup)
            result["parts"]["c"] = {"worker_hosts": c.hosts, "hosts": 2, "nproc_per_host": 2, "launches": runs}
            summarize_part(result, "c")
            print("\n\n".join(render(result, "c")) + "\n", flush=True)
        if "d" in parts:
            log("part d: DDP (plait-bench ddp, mlp) k = 0 and 4")
            rows = {"k=0": [], "k=4": []}
            for rnd in range(a.ddp_rounds):
                for label in (["k=0", "k=4"] if rnd % 2 == 0 else ["k=4", "k=0"]):
                    row = r.ddp(label, int(label[2:]), a.ddp_steps)
                    if row:
                        rows[label].append(row)
            result["parts"]["d"] = {"launches": rows}
            summarize_part(result, "d")
            print("\n\n".join(render(result, "d")) + "\n", flush=True)
        if "e" in parts:
            rb = parse_size(a.rss_size)
            log(f"part e: server memory, {human(rb)} all_reduce, k = 2")
            rec = r.allreduce("rss k=2", 1, None, 2, None, nbytes=rb, iters=2, warmup=0, rss=True)
            if rec:
                result["parts"]["e"] = {"bytes": rb, "launch": rec}
                summarize_part(result, "e")
                print("\n\n".join(render(result, "e")) + "\n", flush=True)
        result["failures"] = r.failures
    result["meta"]["wall_s"] = time.time() - t_start
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
        log(f"wrote {a.json}")
    print("\n\n".join(t for part in result["parts"] for t in render(result, part)))
    wrong = any(row.get("wrong") for p in result["parts"].values() for row in p.get("rows", []) if isinstance(row, dict))
    return 1 if r.failures or wrong else 0


def summarize_part(result: dict, part: str) -> None:
    """(Re)compute the rows of a part from its launches (also for a saved JSON: --from-json)."""
    m, p = result["meta"], result["parts"][part]
    rate_bps = m.get("rate_bps") or 0
    if part in ("a", "c"):
        nhosts, world = p["hosts"], p["hosts"] * p["nproc_per_host"]
        p["rows"] = summarize(p["worker_hosts"], p["launches"], m["bytes"], nhosts, world, m["header_bytes"], rate_bps)
    elif part == "d":
        summ = []
        for label, rs in p["launches"].items():
            if rs:
                summ.append({"label": label, "k": rs[0]["k"], "launches": len(rs),
                             "step_ms": statistics.median(x["step_ms"] for x in rs),
                             "compute_ms": statistics.median(x["compute_ms"] for x in rs),
                             "step_ms_each": [x["step_ms"] for x in rs], "params": rs[0]["params"],
                             "batch": rs[0]["batch"], "steps": rs[0]["steps"]})
        for row in summ:
            row["exposed_comm_ms"] = row["step_ms"] - row["compute_ms"]
            if summ[0]["label"] == "k=0":
                row["speedup_vs_k0"] = summ[0]["step_ms"] / row["step_ms"]
        p["rows"] = summ
    elif part == "e":
        rec, rb = p["launch"], p["bytes"]
        k = rec["k"]
        p["rows"] = [{"server": j, "idle_rss": (rec["server_mem_idle"][j] or {}).get("VmRSS"),
                      "connected_rss": rec["server_mem_connected"][j].get("VmRSS"),
                      "peak_hwm_after_reset": rec["server_mem_after"][j].get("VmHWM"),
                      "rss_after": rec["server_mem_after"][j].get("VmRSS"),
                      "peak_buffer_bytes": (rec["server_stats"][j] or {}).get("peak_buffer_bytes"),
                      "share": rec["plan"]["server_share"],
                      "server_part_bytes": rec["plan"]["server_share"] * rb / k} for j in range(k)]


def render(result: dict, part: str) -> list[str]:
    m, p = result["meta"], result["parts"][part]
    nbytes = m["bytes"]
    link_GBps = (m.get("rate_bps") or 0) / 8e9 or float("nan")
    env = "".join(f", {k}={v}" for k, v in sorted((m.get("env") or {}).items()))
    extra = (f"TCP {m.get('tcp_congestion_control', '?')}" + env
             + (f", server args {' '.join(m['server_args'])}" if m.get("server_args") else "")
             + (f", tbf limit {m['tbf_limit']} B" if m.get("tbf_limit") else ""))
    if part == "a":
        return [table_times(f"a. {p['hosts']} worker hosts x 1 rank, {human(nbytes)} float32 all_reduce, {m['rate']} "
                            f"links ({extra})", p["rows"], link_GBps),
                table_bytes(f"b. bytes per host, {p['hosts']} x 1, {human(nbytes)}", p["rows"], m["header_bytes"])]
    if part == "c":
        return [table_times(f"c. 2 worker hosts x 2 ranks (hierarchical), {human(nbytes)}, {m['rate']} links "
                            f"({extra})", p["rows"], link_GBps),
                table_bytes(f"c. bytes per host, 2 x 2, {human(nbytes)}", p["rows"], m["header_bytes"])]
    if part == "d":
        batch = p["rows"][0]["batch"] if p["rows"] else "?"
        lines = [f"#### d. DDP step, plait-bench ddp --model mlp --batch {batch}, 4 worker hosts x 1 ({extra})", "",
                 "| config | params | launches | step ms (each launch) | compute ms (no_sync) | exposed comm ms | "
                 "step speed-up vs k=0 |",
                 "|---|---:|---:|---:|---:|---:|---:|"]
        for row in p["rows"]:
            each = ", ".join(f"{x:.0f}" for x in row.get("step_ms_each", []))
            lines.append(f"| {row['label']} | {row['params'] / 1e6:.1f}M | {row['launches']} | {row['step_ms']:.0f} "
                         f"({each}) | {row['compute_ms']:.0f} | {row['exposed_comm_ms']:.0f} | "
                         f"{row.get('speedup_vs_k0', float('nan')):.3f} |")
        return ["\n".join(lines)]
    if part == "e":
        rec = p["launch"]

        def mib(v):
            return "–" if v is None else f"{v / 2**20:.1f}"

        lines = [f"#### e. plait-server memory, {human(p['bytes'])} all_reduce, k = {rec['k']}, 4 worker hosts x 1, "
                 f"share {rec['plan']['server_share']:.3f}", "",
                 "| server | idle RSS MiB | RSS with job MiB | peak (VmHWM) MiB | peak - idle MiB | "
                 "stats peak_buffer_bytes MiB | its part of the tensor MiB (per worker) |",
                 "|---:|---:|---:|---:|---:|---:|---:|"]
        for row in p["rows"]:
            lines.append(f"| {row['server']} | {mib(row['idle_rss'])} | {mib(row['connected_rss'])} | "
                         f"{mib(row['peak_hwm_after_reset'])} | "
                         f"{mib((row['peak_hwm_after_reset'] or 0) - (row['idle_rss'] or 0))} | "
                         f"{mib(row['peak_buffer_bytes'])} | {mib(row['server_part_bytes'])} |")
        return ["\n".join(lines)]
    return []


if __name__ == "__main__":
    sys.exit(main())
