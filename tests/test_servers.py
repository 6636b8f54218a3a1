"""Summation servers (README "Summation servers"): plait-server processes beside fake hosts (PLAIT_HOST_ID per
rank, no root needed), the mixed partition's exact results, bitwise identity across workers, faults, the planner."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import signal
import struct
import subprocess
import sys
import threading
import time

import pytest

import _harness
from _harness import free_port, run_world, shm_files

HERE = os.path.dirname(os.path.abspath(__file__))
pytestmark = pytest.mark.plait_only


@contextlib.contextmanager
def servers(port: int, k: int, tmp_path, env: dict | None = None, args: tuple = ()):
    """k plait-server processes against the store at 127.0.0.1:port; yields their Popen objects and log paths.
    Every one must exit 0 on SIGTERM at the end (unless already gone)."""
    procs, logs = [], []
    e = dict(os.environ)
    e.update(env or {})
    for i in range(k):
        log = tmp_path / f"server{i}.log"
        f = open(log, "wb")
        procs.append(subprocess.Popen([sys.executable, "-m", "plait.server", f"127.0.0.1:{port}", "--store-grace",
                                       "600", *args], stdout=f, stderr=subprocess.STDOUT, env=e,
                                      start_new_session=True))
        f.close()
        logs.append(log)
    ok = False
    try:
        yield procs, logs
        ok = True
    finally:
        termed = []
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                termed.append(p)
        for p, log in zip(procs, logs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                raise AssertionError(f"plait-server did not stop on SIGTERM:\n{log.read_text()[-3000:]}")
            if ok and p in termed:
                assert p.returncode == 0, f"plait-server exited {p.returncode} on SIGTERM:\n{log.read_text()[-3000:]}"


def fake_hosts(world: int, per_host: int = 1) -> dict:
    return {r: {"PLAIT_HOST_ID": f"fakehost{r // per_host}"} for r in range(world)}


def w_exact(rank, world, sizes, dtypes):
    import torch
    import torch.distributed as dist

    import plait

    out = {}
    for name in dtypes:
        dt = getattr(torch, name)
        for n in sizes:
            x = ((torch.arange(n, dtype=torch.float64) * (rank + 1) + rank) % 61 - 30).to(dt)
            want = sum(((torch.arange(n, dtype=torch.float64) * (r + 1) + r) % 61 - 30) for r in range(world)).to(dt)
            dist.all_reduce(x)
            assert torch.equal(x, want), (name, n, (x - want).abs().max())
            out[(name, n)] = hashlib.sha256(x.numpy().tobytes() if name != "bfloat16"
                                            else x.view(torch.int16).numpy().tobytes()).hexdigest()
    # random float data: bitwise identical on every rank
    g = torch.Generator().manual_seed(1234 + rank)
    for name in dtypes:
        if name.startswith("int"):
            continue
        x = torch.randn(300_007, generator=g).to(getattr(torch, name))
        dist.all_reduce(x)
        raw = x.view(torch.int16) if x.element_size() == 2 else x.view(torch.int32)
        out[("random", name)] = hashlib.sha256(raw.numpy().tobytes()).hexdigest()
    topo = plait.topology()
    out["servers"] = topo["servers"]
    out["plan"] = plait.plan_allreduce(4 * 1_000_003)
    return out


@pytest.mark.parametrize("world,k,per_host", [(2, 1, 1), (3, 3, 1), (4, 4, 1), (5, 4, 1), (4, 2, 2)])
def test_exact_and_identical(tmp_path, world, k, per_host):
    port = free_port()
    env = {"PLAIT_SERVERS": str(k), "PLAIT_SERVER_SHARE": "0.6", "PLAIT_SERVER_SEGMENT_BYTES": "65536",
           "PLAIT_SERVER_GBPS": "10"}
    with servers(port, k, tmp_path):
        res = run_world(w_exact, world, [1, 7, 4099, 100_003], ["float32", "bfloat16", "float16", "int32"],
                        init="tcp", port=port, env=env, rank_env=fake_hosts(world, per_host), timeout_s=300)
    for key in res[0]:
        if key in ("servers", "plan"):
            continue
        assert all(r[key] == res[0][key] for r in res), key
    for r in res:
        assert r["servers"]["count"] == k
        assert r["servers"]["server_bytes"] > 0
        assert r["plan"].server_share == pytest.approx(0.6)


# ---------------------------------------------------------------------------------------------------------------
# helpers

HELLO = struct.Struct("<IHHiiiiq16s16s")  # csrc/plait/server/protocol.h Hello (64 bytes)
HELLO_MAGIC, CHALL_MAGIC, ACCEPT_MAGIC, REFUSE_MAGIC = 0x504c5348, 0x504c5343, 0x504c534b, 0x504c5352
JOIN = 1
assert HELLO.size == 64


def wait_serving(logs, timeout_s: float = 60.0) -> list[str]:
    """Waits until every server log says it is serving; returns their addresses (in log order)."""
    deadline = time.monotonic() + timeout_s
    addrs = [None] * len(logs)
    while None in addrs:
        for i, log in enumerate(logs):
            m = re.search(r"serving the job at \S+ on (\S+) \(registry entry \d+\)", log.read_text())
            if m:
                addrs[i] = m.group(1)
        if None in addrs:
            assert time.monotonic() < deadline, "servers not up:\n" + "\n".join(l.read_text()[-2000:] for l in logs)
            time.sleep(0.1)
    return addrs


def final_stats(log) -> tuple[str, dict]:
    """The server's final line: (why it stopped, its counters)."""
    lines = [l for l in log.read_text().splitlines() if " stopping: " in l]
    assert lines, f"no final line in the server's log:\n{log.read_text()[-3000:]}"
    m = re.search(r" stopping: (.*); (\{.*\})$", lines[-1])
    assert m, lines[-1]
    return m.group(1), json.loads(m.group(2))


def master_store(port: int):
    from datetime import timedelta

    import torch.distributed as dist

    return dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))


def server_time(n, k, bw_gbps, bs_gbps, alpha_us, m, seg, s):
    """README "Summation servers" / cost_model.cc serverTime, by hand: (share, us, ring_us, worker_bytes,
    server_bytes). Rates in Gbit/s -> bytes per microsecond = gbps * 1e3 / 8."""
    bw, bs = bw_gbps * 1e3 / 8, bs_gbps * 1e3 / 8
    ring_bytes = 2 * (n - 1) / n * m if n > 1 else 0.0
    ring_us = 2 * (n - 1) * alpha_us + ring_bytes / bw if n > 1 else 0.0
    if s <= 0 or k <= 0:
        return 0.0, ring_us, ring_us, ring_bytes, 0.0
    wb = (2 * (n - 1) / n * (1 - s) * m if n > 1 else 0.0) + s * m
    sb = n * s * m / k
    fixed_ring = 2 * (n - 1) * alpha_us if s < 1 and n > 1 else 0.0
    fixed_srv = 2 * alpha_us + n * min(seg, s * m / k) / bs
    return s, max(fixed_ring, fixed_srv) + max(wb / bw, sb / bs), ring_us, wb, sb


def plan_split(n, k, bw_gbps, bs_gbps, alpha_us, m, seg):
    """The planner's choice, by hand: s* = 2(n-1)k B_s / (n^2 B_w + k(n-2) B_s) clamped to [0, 1], taken only when
    it beats the ring."""
    ring = server_time(n, k, bw_gbps, bs_gbps, alpha_us, m, seg, 0)
    if k <= 0:
        return ring
    s = 1.0 if n < 2 else 2 * (n - 1) * k * bs_gbps / (n * n * bw_gbps + k * (n - 2) * bs_gbps)
    s = min(1.0, max(0.0, s))
    mixed = server_time(n, k, bw_gbps, bs_gbps, alpha_us, m, seg, s)
    return mixed if s > 0 and mixed[1] < ring[1] else ring


def plan_fields(plan) -> tuple:
    return (plan.server_share, plan.servers_us, plan.servers_ring_us, plan.servers_worker_bytes,
            plan.servers_server_bytes)


def wait_registered(store, k: int, timeout_s: float = 120.0):
    """Waits (in a worker) until k servers registered at the store (started by the test, maybe still importing)."""
    deadline = time.monotonic() + timeout_s
    while store.add("plait/servers/count", 0) < k:
        assert time.monotonic() < deadline, f"fewer than {k} servers registered within {timeout_s} s"
        time.sleep(0.05)


def job_id() -> str:
    """The group's job id (the incarnation id the servers know it by): rank 0 writes it under the backend's store."""
    import torch.distributed as dist

    st = dist.PrefixStore("cpu/", dist.distributed_c10d._get_default_store())
    return st.get("plait/0/uuid").decode()


def pattern(n: int, rank: int, dt):
    import torch

    return ((torch.arange(n, dtype=torch.float64) * (rank + 1) + rank) % 61 - 30).to(dt)


# ---------------------------------------------------------------------------------------------------------------
# 1. the planner by hand


M = 1_000_000  # bytes; 10 Gbit/s = 1250 bytes/us: the ring of n = 4 takes 1.5 M / 1250 = 1200 us


def test_planner_equal_rates_by_hand():
    import plait

    p = plait.plan_servers(4, 10, 10, M)
    assert p.k_saturate == pytest.approx(4.0)
    assert p.ring_us == pytest.approx(1200.0)
    assert [r.k for r in p.rows] == [0, 1, 2, 3, 4, 5]  # default: one past saturation
    # k: (s*, time) by hand: s* = 6k / (16 + 2k); t = M (1.5 - 0.5 s) / 1250
    want = {0: (0.0, 1200.0, 1.0), 1: (1 / 3, 1066.0 + 2 / 3, 1.125), 2: (0.6, 960.0, 1.25), 4: (1.0, 800.0, 1.5)}
    for k, (s, us, speedup) in want.items():
        r = p.rows[k]
        assert r.k == k
        assert r.share == pytest.approx(s, rel=1e-12, abs=1e-15)
        assert r.predicted_us == pytest.approx(us, rel=1e-12)
        assert r.speedup == pytest.approx(speedup, rel=1e-12)
        assert r.speedup == pytest.approx(1 + k * (4 - 2) / 16, rel=1e-12)
        # W(s) = (2(n-1)/n)(1-s)M + sM per worker, V(s) = n s M / k per server
        assert r.worker_bytes == pytest.approx(1.5 * (1 - s) * M + s * M, rel=1e-12)
        assert r.server_bytes == pytest.approx(4 * s * M / k if k else 0.0, rel=1e-12, abs=1e-9)
    # beyond saturation: nothing more (M / B_w)
    assert p.rows[5].share == 1.0 and p.rows[5].predicted_us == pytest.approx(800.0)
    assert p.k_useful == 4 and p.best.k == 4
    # a balanced split: each link's time is the same
    for r in p.rows[1:5]:
        assert r.worker_bytes / 1250 == pytest.approx(r.server_bytes / 1250, rel=1e-12)


def test_planner_two_workers_and_one():
    import plait

    # n = 2: the ring already moves M per worker; the servers cannot beat it for any k
    p = plait.plan_servers(2, 10, 10, M, max_servers=6)
    assert p.ring_us == pytest.approx(M / 1250)
    for r in p.rows:
        assert r.share == 0.0 and r.speedup == pytest.approx(1.0) and r.server_bytes == 0.0
        assert r.predicted_us == pytest.approx(800.0)
    assert p.k_useful == 0 and p.best.k == 0
    # n = 1: nothing crosses a link
    p = plait.plan_servers(1, 10, 10, M, max_servers=2)
    assert p.ring_us == 0.0 and all(r.share == 0.0 and r.predicted_us == 0.0 for r in p.rows)


def test_planner_unequal_rates_by_hand():
    import plait

    n, bw, bs = 4, 10.0, 5.0
    p = plait.plan_servers(n, bw, bs, M)
    assert p.k_saturate == pytest.approx(8.0)  # n B_w / B_s
    assert len(p.rows) == 10  # k = 0..9
    bwu = bw * 1e3 / 8
    for r in p.rows:
        k = r.k
        if k == 0:
            assert r.share == 0 and r.predicted_us == pytest.approx(1200.0)
            continue
        s = min(1.0, 2 * (n - 1) * k * bs / (n * n * bw + k * (n - 2) * bs))  # 3k / (16 + k)
        assert s == pytest.approx(min(1.0, 3 * k / (16 + k)))
        assert r.share == pytest.approx(s, rel=1e-12)
        t = 2 * n * (n - 1) * M / (n * n * bw + k * (n - 2) * bs) / 1e3 * 8 if k <= 8 else M / bwu
        assert r.predicted_us == pytest.approx(t, rel=1e-12), k
        assert r.worker_bytes == pytest.approx(1.5 * (1 - s) * M + s * M, rel=1e-12)
        assert r.server_bytes == pytest.approx(n * s * M / k, rel=1e-12)
    assert p.rows[8].predicted_us == pytest.approx(M / bwu) and p.rows[9].predicted_us == pytest.approx(M / bwu)
    assert p.k_useful == 8


def test_planner_fixed_costs_by_hand():
    import plait

    # alpha = 10 us, segments of 64 KiB, n = 4, k = 2, equal rates: s = 0.6; ring fixed 2(n-1)alpha = 60 us;
    # servers' fixed 2 alpha + n min(seg, sM/k) / B_s = 20 + 4 * 65536 / 1250 = 229.7152 us; + 960 us
    p = plait.plan_servers(4, 10, 10, M, max_servers=2, alpha_us=10, segment_bytes=65536)
    assert p.ring_us == pytest.approx(1260.0)
    assert p.rows[2].share == pytest.approx(0.6)
    assert p.rows[2].predicted_us == pytest.approx(20 + 4 * 65536 / 1250 + 960.0)
    # a small buffer: the ring's 2(n-1) latencies (300 us) dominate; the servers' fill is sM/k = 1228.8 bytes
    q = plait.plan_servers(4, 10, 10, 4096, max_servers=2, alpha_us=50, segment_bytes=65536)
    assert q.ring_us == pytest.approx(300 + 1.5 * 4096 / 1250)
    assert q.rows[2].share == pytest.approx(0.6)
    assert q.rows[2].predicted_us == pytest.approx(300 + 1.2 * 4096 / 1250)
    # share 1 (k >= n): no ring latencies; 2 alpha + n min(seg, M/k) / B_s + M / B_w
    r4 = plait.plan_servers(4, 10, 10, 4096, max_servers=4, alpha_us=50, segment_bytes=512).rows[4]
    assert r4.share == 1.0 and r4.predicted_us == pytest.approx(100 + 4 * 512 / 1250 + 4096 / 1250)
    for args in [(4, 10, 10, M), (3, 25, 4, 12345678), (7, 1, 100, 999)]:
        for k in range(5):
            want = plan_split(args[0], k, args[1], args[2], 7.5, args[3], 32768)
            r = plait.plan_servers(*args, max_servers=4, alpha_us=7.5, segment_bytes=32768).rows[k]
            assert (r.share, r.predicted_us, r.worker_bytes, r.server_bytes) == pytest.approx(
                (want[0], want[1], want[3], want[4]), rel=1e-12), (args, k)


@pytest.mark.parametrize("kwargs", [dict(n_workers=0), dict(worker_gbps=0), dict(server_gbps=-1),
                                    dict(nbytes=0), dict(alpha_us=-1), dict(segment_bytes=-1),
                                    dict(max_servers=-1), dict(worker_gbps=float("nan"))])
def test_planner_bad_arguments(kwargs):
    import plait

    a = dict(n_workers=4, worker_gbps=10, server_gbps=10, nbytes=M)
    a.update(kwargs)
    with pytest.raises(ValueError, match=next(iter(kwargs)).replace("_us", "").replace("_bytes", "")):
        plait.plan_servers(**a)


def test_options_servers_argument():
    import plait

    for bad in (-1, "2", 1.0, True, 1025):
        with pytest.raises(ValueError, match="servers"):
            plait.Options(servers=bad)
    assert plait.Options(servers=0).servers == 0 and plait.Options(servers=3).servers == 3


# ---------------------------------------------------------------------------------------------------------------
# 2 + 3. the measured link rate; ops and dtypes; hosts of 2 ranks


def w_ops(rank, world, sizes):
    import torch
    import torch.distributed as dist

    import plait

    R = dist.ReduceOp
    checked = 0
    for name in ("int32", "int64", "float32", "float64"):
        dt = getattr(torch, name)
        for n in sizes:
            base = [pattern(n, r, dt) for r in range(world)]
            # small values for PRODUCT: -1, 1 or 2 (products of 6 stay exact in every dtype)
            small = [(torch.arange(n, dtype=torch.int64) * (r + 3) + r) % 3 for r in range(world)]
            small = [torch.where(v == 0, torch.full_like(v, -1), v).to(dt) for v in small]
            s = sum(b.to(torch.float64) for b in base).to(dt)
            want = {R.SUM: (base, s),
                    R.MAX: (base, torch.stack(base).amax(0)),
                    R.MIN: (base, torch.stack(base).amin(0)),
                    R.PRODUCT: (small, torch.stack(small).prod(0).to(dt)),
                    R.AVG: (base, s / world if dt.is_floating_point else torch.div(s, world, rounding_mode="trunc"))}
            for op, (inputs, expect) in want.items():
                x = inputs[rank].clone()
                dist.all_reduce(x, op=op)
                assert x.dtype == dt and torch.equal(x, expect), (name, n, op, (x - expect).abs().max())
                checked += 1
    topo = plait.topology()
    return {"servers": topo["servers"], "checked": checked, "link_gbps": topo["link_gbps"],
            "alpha": topo["link_alpha_us"], "nhosts": topo["nhosts"],
            "plans": {nb: plan_fields(plait.plan_allreduce(nb)) for nb in (4096, 1 << 20, 12_345_678)}}


def test_measured_rate_ops_dtypes_two_per_host(tmp_path):
    """6 ranks on 3 fake hosts of 2, 2 servers, the servers' link rate measured (no PLAIT_SERVER_GBPS), half of
    every buffer through the servers in 16 KiB segments: SUM / MAX / MIN / PRODUCT / AVG on integer and float
    dtypes of odd sizes are exact; the measured rate is the same on every rank, and so is the plan."""
    world, k, seg = 6, 2, 16384
    port = free_port()
    env = {"PLAIT_SERVERS": str(k), "PLAIT_SERVER_SHARE": "0.5", "PLAIT_SERVER_SEGMENT_BYTES": str(seg)}
    sizes = [1, 3, 4099, 65537]
    with servers(port, k, tmp_path) as (procs, logs):
        res = run_world(w_ops, world, sizes, init="tcp", port=port, env=env, rank_env=fake_hosts(world, 2),
                        timeout_s=240)
        addrs = wait_serving(logs)
    r0 = res[0]
    assert r0["checked"] == 4 * len(sizes) * 5
    srv = r0["servers"]
    assert srv["count"] == k and sorted(srv["addresses"]) == sorted(addrs)
    assert srv["gbps"] > 0 and srv["source"].startswith("measured"), srv
    assert srv["server_bytes"] > 0 and srv["worker_bytes"] > 0
    for r in res:
        assert r["servers"]["gbps"] == srv["gbps"] and r["servers"]["source"] == srv["source"]
        assert r["servers"]["addresses"] == srv["addresses"]
        assert r["plans"] == r0["plans"]
        # every rank counts what its all-reduces sent each way: the same bytes on every rank
        assert r["servers"]["server_bytes"] == srv["server_bytes"]
    # the plan with the share forced: the formulas at s = 0.5 with the group's rates
    assert r0["nhosts"] == 3
    for nb, got in r0["plans"].items():
        want = server_time(3, k, r0["link_gbps"], srv["gbps"], r0["alpha"], nb, seg, 0.5)
        assert got == pytest.approx(want, rel=1e-9), nb


# ---------------------------------------------------------------------------------------------------------------
# 4. forced shares; 6. the server's memory; 5c. rogue clients


def w_exact_share(rank, world, sizes):
    import torch
    import torch.distributed as dist

    import plait

    for n in sizes:
        x = pattern(n, rank, torch.float32)
        dist.all_reduce(x)
        assert torch.equal(x, sum(pattern(n, r, torch.float64) for r in range(world)).to(torch.float32)), n
    return {"servers": plait.topology()["servers"], "plan": plait.plan_allreduce(1 << 20)}


def test_share_zero_servers_unused(tmp_path):
    """PLAIT_SERVER_SHARE=0: the servers are connected (the job starts on them) but sum nothing."""
    world, port, stats = 3, free_port(), tmp_path / "stats.json"
    env = {"PLAIT_SERVERS": "1", "PLAIT_SERVER_SHARE": "0", "PLAIT_SERVER_GBPS": "10",
           "PLAIT_SERVER_SEGMENT_BYTES": "8192"}
    with servers(port, 1, tmp_path, args=("--stats", str(stats))) as (procs, logs):
        res = run_world(w_exact_share, world, [1, 4099, 300_001], init="tcp", port=port, env=env,
                        rank_env=fake_hosts(world), timeout_s=120)
    for r in res:
        assert r["servers"]["count"] == 1 and r["servers"]["source"] == "PLAIT_SERVER_GBPS"
        assert r["servers"]["gbps"] == pytest.approx(10.0)
        assert r["servers"]["server_bytes"] == 0
        assert r["plan"].server_share == 0.0 and r["plan"].servers_server_bytes == 0.0
        assert "PLAIT_SERVER_SHARE=0" in r["plan"].servers_why
    st = json.loads(stats.read_text())
    assert st["jobs_started"] == 1 and st["segments"] == 0 and st["bytes_in"] == 0, st
    assert "3 worker(s) joined" in logs[0].read_text()


def _rogue(addr: str, job: str, nworkers: int) -> list:
    """Three connections a summation server must refuse; returns what each saw."""
    host, port = addr.rsplit(":", 1)
    seen = []

    def drain(s):
        data = b""
        while True:
            try:
                b = s.recv(4096)
            except ConnectionResetError:
                break
            if not b:
                break
            data += b
        return data

    # garbage
    with socket.create_connection((host, int(port)), timeout=15) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n".ljust(64, b"x"))
        seen.append(drain(s))
    # a well-formed join for a job the store does not know: refused with a reason
    with socket.create_connection((host, int(port)), timeout=15) as s:
        s.sendall(HELLO.pack(HELLO_MAGIC, 1, JOIN, 0, nworkers, 0, 0, 5000, os.urandom(8).hex().encode(),
                             os.urandom(16)))
        data = drain(s)
        magic, n = struct.unpack("<II", data[:8])
        assert magic == REFUSE_MAGIC, data
        seen.append(data[8:8 + n].decode())
    # the real job, but no secret: a challenge, then a wrong proof -> closed
    with socket.create_connection((host, int(port)), timeout=15) as s:
        s.sendall(HELLO.pack(HELLO_MAGIC, 1, JOIN, 0, nworkers, 0, 0, 5000, job.encode(), os.urandom(16)))
        chall = b""
        while len(chall) < 56:
            b = s.recv(56 - len(chall))
            assert b, "closed before the challenge"
            chall += b
        assert struct.unpack("<I", chall[:4])[0] == CHALL_MAGIC
        s.sendall(os.urandom(32))
        seen.append(drain(s))
    return seen


def w_share_one(rank, world, nbig):
    import torch
    import torch.distributed as dist

    import plait

    x = pattern(4099, rank, torch.float32)
    dist.all_reduce(x)
    assert torch.equal(x, sum(pattern(4099, r, torch.float64) for r in range(world)).to(torch.float32))
    rogue = None
    if rank == 0:
        rogue = _rogue(plait.topology()["servers"]["addresses"][0], job_id(), plait.topology()["nhosts"])
    dist.barrier()
    # a 64 MiB all-reduce, all through the server after the rogues: integer-valued, exact
    x = ((torch.arange(nbig, dtype=torch.int64) % 1001) * (rank + 1) - 500).to(torch.float32)
    dist.all_reduce(x)
    want = sum((torch.arange(nbig, dtype=torch.int64) % 1001) * (r + 1) - 500 for r in range(world))
    assert torch.equal(x, want.to(torch.float32))
    return {"servers": plait.topology()["servers"], "plan": plait.plan_allreduce(1 << 20), "rogue": rogue}


def test_share_one_memory_and_rogue_clients(tmp_path):
    """PLAIT_SERVER_SHARE=1: every byte through the server (the workers' ring sends nothing); a 64 MiB all-reduce
    with 2 workers keeps the server's buffers to a few segments per worker; garbage, an unknown job and a wrong
    proof are refused and logged while the job goes on."""
    world, port, stats, seg, depth = 2, free_port(), tmp_path / "stats.json", 65536, 4
    nbig = (64 << 20) // 4
    env = {"PLAIT_SERVERS": "1", "PLAIT_SERVER_SHARE": "1", "PLAIT_SERVER_GBPS": "10",
           "PLAIT_SERVER_SEGMENT_BYTES": str(seg)}
    with servers(port, 1, tmp_path, args=("--stats", str(stats), "--depth", str(depth))) as (procs, logs):
        res = run_world(w_share_one, world, nbig, init="tcp", port=port, env=env, rank_env=fake_hosts(world),
                        timeout_s=180)
    for r in res:
        assert r["servers"]["worker_bytes"] == 0 and r["servers"]["server_bytes"] == 4 * (4099 + nbig)
        assert r["plan"].server_share == 1.0 and r["plan"].servers_server_bytes == pytest.approx(2 * (1 << 20))
    garbage, unknown, wrong_proof = res[0]["rogue"]
    assert garbage == b"" and wrong_proof == b""  # closed without a word
    assert "is unknown at this server's store" in unknown
    log = logs[0].read_text()
    refusals = [l for l in log.splitlines() if "refused a connection from 127.0.0.1:" in l]
    assert len(refusals) == 3, log
    assert "not a plait worker's handshake" in refusals[0]
    assert "is unknown at this server's store" in refusals[1]
    assert "failed the challenge" in refusals[2]
    st = json.loads(stats.read_text())
    assert st["refused"] == 3 and st["jobs_started"] == 1 and st["jobs_aborted"] == 0, st
    assert st["bytes_in"] == world * 4 * (4099 + nbig), st
    # buffers: at most a few segments per worker (in, out and the pool), far below the 64 MiB all-reduce
    assert 0 < st["peak_buffer_bytes"] <= 2 * (world + 1) * depth * seg, st


# ---------------------------------------------------------------------------------------------------------------
# 5. faults


def w_loop_until_error(rank, world, marker, n, limit_s):
    """All-reduces until one raises (or limit_s passes); then one more call, which must raise too."""
    import torch
    import torch.distributed as dist

    import plait

    topo = plait.topology()
    plan = plait.plan_allreduce(4 * n)
    want = sum(pattern(n, r, torch.float64) for r in range(world)).to(torch.float32)
    base = pattern(n, rank, torch.float32)
    it, first, t_err = 0, None, None
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        x = base.clone()
        try:
            dist.all_reduce(x)
        except RuntimeError as e:
            first, t_err = str(e), time.monotonic()
            break
        assert torch.equal(x, want), it
        it += 1
        if it == 3 and rank == 0:
            open(marker, "w").close()
    second = None
    if first is not None:
        try:
            dist.all_reduce(base.clone())
        except RuntimeError as e:
            second = str(e)
    return {"first": first, "second": second, "iterations": it, "t_err": t_err, "plan": plan_fields(plan),
            "link_gbps": topo["link_gbps"], "alpha": topo["link_alpha_us"], "servers": topo["servers"],
            "server_bytes": plait.topology()["servers"]["server_bytes"]}


def test_server_killed_mid_job(tmp_path):
    """SIGKILL one of 2 servers while 3 workers loop 4 MiB all-reduces (share from the planner): every worker raises
    naming that server's address (the connection closed, not a timeout), and a later call raises too."""
    world, k, seg, n = 3, 2, 65536, 1 << 20
    port, marker = free_port(), str(tmp_path / "running")
    # The link between (fake) hosts pinned below the servers' rate, so the planner sends a share to the servers
    # whatever loopback measures.
    env = {"PLAIT_SERVERS": str(k), "PLAIT_SERVER_GBPS": "10", "PLAIT_SERVER_SEGMENT_BYTES": str(seg),
           "PLAIT_LINK_GBPS": "2", "PLAIT_LINK_ALPHA_US": "50"}
    out = {}
    with servers(port, k, tmp_path) as (procs, logs):
        th = threading.Thread(target=lambda: out.update(res=run_world(
            w_loop_until_error, world, marker, n, 90.0, init="tcp", port=port, env=env, rank_env=fake_hosts(world),
            pg_timeout_s=30, timeout_s=180, expect_fail=True)))
        th.start()
        deadline = time.monotonic() + 120
        while not os.path.exists(marker) and th.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        addrs = wait_serving(logs)
        killed = time.monotonic()  # CLOCK_MONOTONIC: the workers' clock too
        procs[0].kill()
        th.join()
    res = out["res"]
    assert all(r.reported and r.ok and r.returncode == 0 and not r.shutdown_hung for r in res), \
        "\n".join(f"{r.describe()} exit {r.returncode}\n{r.log[-3000:]}" for r in res)
    for r in res:
        v = r.value
        assert v["iterations"] >= 3 and v["server_bytes"] > 0, v
        assert v["first"] is not None, f"rank {r.rank} never saw the server die: {v}"
        assert f"at {addrs[0]}" in v["first"] and "timed out" not in v["first"], (r.rank, v["first"])
        assert "closed the connection" in v["first"] or "connection lost" in v["first"], (r.rank, v["first"])
        assert v["second"] is not None, f"rank {r.rank}: the call after the failure did not raise"
        assert "unusable" in v["second"] and addrs[0] in v["second"], v["second"]
        assert v["t_err"] > killed  # it failed because of the kill, not before
        # the planner's choice with the group's rates (same on every rank)
        assert v["plan"] == res[0].value["plan"]
        want = plan_split(world, k, v["link_gbps"], 10.0, v["alpha"], 4 * n, seg)
        assert v["plan"] == pytest.approx(want, rel=1e-9)
        assert v["plan"][0] > 0


def w_job(rank, world, port, name, die_rank, n):
    """One job on the servers of the store at 127.0.0.1:port (hosted by the test): its own namespace in the store,
    its own process group. die_rank >= 0: that rank dies (os._exit) after a few all-reduces; the others loop until
    an all-reduce raises."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    import plait

    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=30))
    wait_registered(store, 1)
    dist.init_process_group("plait", store=dist.PrefixStore(name, store), rank=rank, world_size=world,
                            timeout=timedelta(seconds=_harness.CTX.pg_timeout_s))
    want = sum(pattern(n, r, torch.float64) for r in range(world)).to(torch.float32)
    out = {"error": None, "iterations": 0}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if rank == die_rank and out["iterations"] == 3:
            sys.stdout.flush()
            os._exit(7)
        x = pattern(n, rank, torch.float32)
        try:
            dist.all_reduce(x)
        except RuntimeError as e:
            out["error"] = str(e)
            break
        assert torch.equal(x, want)
        out["iterations"] += 1
        if die_rank < 0 and out["iterations"] == 5:
            break
    out["servers"] = plait.topology()["servers"]
    if out["error"] is None:
        dist.destroy_process_group()
    return out


def test_worker_dies_server_serves_next_job(tmp_path):
    """With every byte through the server (share 1), rank 2 dies mid job: the others raise naming worker / rank 2,
    the server drops the job (and says so) but stays up, and serves the next job on the same store; its registry
    entry is not duplicated."""
    world, port, n = 3, free_port(), 200_003
    env = {"PLAIT_SERVERS": "1", "PLAIT_SERVER_SHARE": "1", "PLAIT_SERVER_GBPS": "10",
           "PLAIT_SERVER_SEGMENT_BYTES": "16384"}
    master = master_store(port)
    with servers(port, 1, tmp_path) as (procs, logs):
        res = run_world(w_job, world, port, "job1", 2, n, init=None, env=env, rank_env=fake_hosts(world),
                        pg_timeout_s=15, timeout_s=120, expect_fail=True)
        addr = wait_serving(logs)[0]
        assert not res[2].reported and res[2].returncode == 7, res[2].describe()
        for r in res[:2]:
            assert r.reported and r.ok and r.returncode == 0 and not r.shutdown_hung, \
                f"{r.describe()} exit {r.returncode}\n{r.log[-3000:]}"
            err = r.value["error"]
            assert err is not None and r.value["iterations"] == 3, r.value
            assert "timed out" not in err, err
            assert ("dropped job" in err and "worker 2" in err) or "rank 2" in err, err
        log = logs[0].read_text()
        assert re.search(r"dropped job [0-9a-f]{16}: worker 2 \(\S+\) closed its connection", log), log
        assert procs[0].poll() is None, "the server died with the job"
        res2 = run_world(w_job, world, port, "job2", -1, n, init=None, env=env, rank_env=fake_hosts(world),
                         pg_timeout_s=15, timeout_s=120)
        for r in res2:
            assert r["error"] is None and r["iterations"] == 5
            assert r["servers"]["addresses"] == [addr] and r["servers"]["server_bytes"] == 5 * 4 * n
        assert master.add("plait/servers/count", 0) == 1
        assert master.get("plait/servers/0").decode().split("\t")[0] == addr
        assert not master.check(["plait/servers/1"])
    why, st = final_stats(logs[0])
    assert why == "signal SIGTERM"
    assert st["jobs_started"] == 2 and st["jobs_aborted"] == 1 and st["jobs_active"] == 0, st
    del master


def w_init_failures(rank, world, port_a, port_b):
    """Group creations that must fail, one after the other in the same processes (each in its own namespace of
    the stores): PLAIT_SERVERS=abc; ranks that disagree on PLAIT_SERVERS (rank_env); 2 servers asked, 1 running
    (store A); none registered (store B); then one that works (Options(servers=1) on store A)."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    import plait

    a = dist.TCPStore("127.0.0.1", port_a, is_master=False, timeout=timedelta(seconds=30))
    b = dist.TCPStore("127.0.0.1", port_b, is_master=False, timeout=timedelta(seconds=30))
    to = timedelta(seconds=_harness.CTX.pg_timeout_s)
    mine = os.environ["PLAIT_SERVERS"]

    def attempt(store, name, **kw):
        t0 = time.monotonic()
        try:
            dist.init_process_group("plait", store=dist.PrefixStore(name, store), rank=rank, world_size=world,
                                    timeout=to, **kw)
        except RuntimeError as e:
            return str(e), time.monotonic() - t0
        dist.destroy_process_group()
        return None, time.monotonic() - t0

    out = {}
    os.environ["PLAIT_SERVERS"] = "abc"  # the knobs are read at the first group creation (and kept once valid)
    out["abc"] = attempt(a, "t0")
    os.environ["PLAIT_SERVERS"] = mine
    out["disagree"] = attempt(a, "t1")
    wait_registered(a, 1)
    out["fewer"] = attempt(a, "t2", pg_options=plait.Options(servers=2))
    out["none"] = attempt(b, "t3", pg_options=plait.Options(servers=1))
    dist.init_process_group("plait", store=dist.PrefixStore("t4", a), rank=rank, world_size=world, timeout=to,
                            pg_options=plait.Options(servers=1))
    x = pattern(5000, rank, torch.float32)
    dist.all_reduce(x)
    assert torch.equal(x, sum(pattern(5000, r, torch.float64) for r in range(world)).to(torch.float32))
    out["works"] = plait.topology()["servers"]
    dist.destroy_process_group()
    return out


def test_init_failures(tmp_path):
    """Group creation with servers fails on every rank, naming why: a bad PLAIT_SERVERS, ranks that disagree on it,
    fewer servers than asked (naming the store and how many answered), none registered; after all that the
    processes still make a working group."""
    world, port_a, port_b = 2, free_port(), free_port()
    a, b = master_store(port_a), master_store(port_b)
    env = {"PLAIT_SERVER_GBPS": "10", "PLAIT_SERVER_SHARE": "0.5"}
    rank_env = fake_hosts(world)
    rank_env[0]["PLAIT_SERVERS"], rank_env[1]["PLAIT_SERVERS"] = "1", "2"
    with servers(port_a, 1, tmp_path) as (procs, logs):
        res = run_world(w_init_failures, world, port_a, port_b, init=None, env=env, rank_env=rank_env,
                        pg_timeout_s=5, timeout_s=120)
    addr = wait_serving(logs)[0]
    for rank, r in enumerate(res):
        assert "PLAIT_SERVERS=abc" in r["abc"][0], r["abc"]
        assert "ranks disagree on servers (PLAIT_SERVERS / Options.servers)" in r["disagree"][0], r["disagree"]
        msg = r["fewer"][0]
        assert msg and "needs 2 summation server(s)" in msg and "only 1 answered" in msg, msg
        assert f"127.0.0.1:{port_a}" in msg and addr in msg, msg
        msg = r["none"][0]
        assert msg and "only 0 answered" in msg and "none registered" in msg and f"127.0.0.1:{port_b}" in msg, msg
        assert r["works"]["count"] == 1 and r["works"]["addresses"] == [addr]
        assert r["works"]["server_bytes"] > 0
    del a, b


def test_stop_and_store_grace(tmp_path):
    """`python -m plait.server HOST:PORT --stop` stops every server of that store (exit 0, 'told to stop'); a
    server whose store goes away exits 0 after --store-grace."""
    port_a, port_b = free_port(), free_port()
    a, b = master_store(port_a), master_store(port_b)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with servers(port_a, 2, tmp_path / "a") as (procs, logs), \
            servers(port_b, 1, tmp_path / "b", args=("--store-grace", "1")) as (procs_b, logs_b):
        wait_serving(logs + logs_b)
        stop = subprocess.run([sys.executable, "-m", "plait.server", f"127.0.0.1:{port_a}", "--stop"],
                              capture_output=True, text=True, timeout=60)
        assert stop.returncode == 0 and "told the servers of" in stop.stdout, (stop.stdout, stop.stderr)
        del b  # the job's store goes away
        for p, log in zip(procs + procs_b, logs + logs_b):
            try:
                rc = p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"the server did not exit:\n{log.read_text()[-3000:]}")
            assert rc == 0, log.read_text()[-3000:]
    for log in logs:
        assert final_stats(log)[0] == "told to stop (plait-server --stop)"
    why = final_stats(logs_b[0])[0]
    assert why == f"the job's store at 127.0.0.1:{port_b} is gone (the job ended)", why
    # the registry says they stopped
    assert a.add("plait/servers/count", 0) == 2
    assert a.get("plait/servers/0") == b"" and a.get("plait/servers/1") == b""
    del a


def w_one_host_group(rank, world):
    import plait

    return plait.topology()["servers"]["count"]


def test_one_host_group_needs_no_servers():
    """PLAIT_SERVERS set, every rank on one host, no server running: the group is created at once without servers
    (nothing of it crosses a link)."""
    res = run_world(w_one_host_group, 2, init="tcp", env={"PLAIT_SERVERS": "2"}, pg_timeout_s=10, timeout_s=120)
    assert res == [0, 0]


def test_registry_stale_and_duplicate_entries(tmp_path):
    """The registry holds, before the real server registers: a dead address, an entry that was counted but never
    written, and an empty (stopped) one; after it registers, the same address is registered again (a restart on the
    same port). The group skips what is dead, picks the live server once, and works."""
    world, port, n = 2, free_port(), 30_001
    master = master_store(port)
    master.add("plait/servers/count", 3)
    master.set("plait/servers/0", f"127.0.0.1:{free_port()}\tgone\t1")
    # entry 1 counted, never written
    master.set("plait/servers/2", "")
    live_port = free_port()
    env = {"PLAIT_SERVERS": "1", "PLAIT_SERVER_SHARE": "1", "PLAIT_SERVER_GBPS": "10",
           "PLAIT_SERVER_SEGMENT_BYTES": "16384"}
    with servers(port, 1, tmp_path, args=("--port", str(live_port))) as (procs, logs):
        addr = wait_serving(logs)[0]
        i = master.add("plait/servers/count", 1) - 1
        master.set(f"plait/servers/{i}", f"{addr}\tagain\t2")
        res = run_world(w_job, world, port, "jobr", -1, n, init=None, env=env, rank_env=fake_hosts(world),
                        pg_timeout_s=20, timeout_s=120)
    for r in res:
        assert r["error"] is None and r["iterations"] == 5, r
        assert r["servers"]["addresses"] == [addr], r["servers"]
        assert r["servers"]["server_bytes"] == 5 * 4 * n
