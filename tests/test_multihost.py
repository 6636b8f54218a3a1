"""Several hosts without root: ranks told they live on different hosts (PLAIT_HOST_ID) use shared memory inside a
"host" and authenticated TCP between hosts, exactly as on a real cluster. Covers the hierarchical all-reduce
(every layout, contiguous or interleaved, exact on integer data, bitwise-identical floats), every other
collective across hosts, the cost model's inputs and choice, the link measurement, and the TCP handshake against
rogue clients (no secret, wrong secret, garbage, replayed proof, a silent connection). The same paths across real
network namespaces are in test_cluster.py.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct
import threading
import time

import pytest
import torch
import torch.distributed as dist

import _collcheck as C
import _harness as H

pytestmark = pytest.mark.skipif(not H.IS_PLAIT, reason="plait-only: host layout and TCP handshake")

ALGOS = ["auto", "ring", "tree", "direct", "hier", "hier_ring", "hier_tree"]
COUNTS = [0, 1, 7, 1003]


def _host_env(layout):
    return {r: {"PLAIT_HOST_ID": f"fakehost{h}"} for r, h in enumerate(layout)}


def worker_layout(rank, ws, layout):
    import plait

    vgroup = dist.new_group(backend="gloo")
    topo = plait.topology()
    failures, checks = [], 0
    for algo in ALGOS:
        g = dist.new_group(backend="plait", pg_options=plait.Options(algo=algo, chunk_bytes=64, shm_ring_bytes=256))
        c = C.Checker(label=f"layout={layout} algo={algo}: ")
        dts = C.ALL_DTYPES if algo.startswith("hier") else [torch.float32, torch.int64, torch.bfloat16]
        C.check_all_reduce(c, g, rank, ws, dts, COUNTS)
        C.check_all_reduce(c, g, rank, ws, [torch.int32], [5, 1003], async_batch=False)
        C.check_random_float_consistency(c, g, vgroup, rank, ws, [1003, 4099])
        failures += c.failures
        checks += c.checks
    # The other collectives across hosts on the default group.
    c = C.Checker(label=f"layout={layout} default: ")
    dts = [torch.float32, torch.int8, torch.float16]
    C.check_other_collectives(c, None, rank, ws, dts, COUNTS)
    failures += c.failures
    checks += c.checks
    return dict(failures=failures, checks=checks, topo=topo)


@pytest.mark.parametrize(
    "layout",
    [(0, 0, 1, 1), (0, 1, 0, 1), (0, 1, 1), (0, 0, 0, 1, 1), (0, 0, 1, 1, 2, 2), (0, 1, 1, 1, 2)],
    ids=lambda l: "hosts" + "".join(map(str, l)),
)
def test_hierarchical_and_all_collectives_across_hosts(layout):
    ws = len(layout)
    res = H.run_world(worker_layout, ws, layout, rank_env=_host_env(layout), timeout_s=300)
    bad = [f for r in res for f in r["failures"]]
    assert not bad, "\n".join(bad[:30])
    assert all(r["checks"] > 100 for r in res)
    t = res[0]["topo"]
    assert t["nhosts"] == len(set(layout)) and t["nranks"] == ws and not t["all_shm"]
    assert t["max_local"] == max(layout.count(h) for h in set(layout))
    assert t["link_gbps"] > 0 and t["link_alpha_us"] > 0 and "measured" in t["link_source"]
    assert all(r["topo"] == t for r in res), "ranks disagree about the topology / link measurement"


def worker_plan(rank, ws):
    import plait

    out = {}
    for nbytes in [4, 1 << 10, 1 << 20, 64 << 20, 256 << 20]:
        algo, one_shot, us, why = plait.plan_allreduce(nbytes)
        out[nbytes] = (algo, us, why)
    forced = {}
    for a in ["ring", "tree", "hier", "hier_ring", "hier_tree"]:
        g = dist.new_group(backend="plait", pg_options=plait.Options(algo=a))
        forced[a] = plait.plan_allreduce(64 << 20, group=g)[0]
    return out, forced, plait.topology()


def test_cost_model_across_hosts_uses_the_link_and_picks_hierarchical_for_bulk():
    # 2 hosts x 2 ranks behind a 1 Gbit/s link (set, not probed, so the choice is deterministic).
    env = {"PLAIT_LINK_GBPS": "1", "PLAIT_LINK_ALPHA_US": "50"}
    res = H.run_world(worker_plan, 4, rank_env=_host_env((0, 0, 1, 1)), env=env)
    plans, forced, topo = res[0]
    assert all(r[0] == plans for r in res), "ranks planned differently"
    assert topo["link_source"] == "PLAIT_LINK_GBPS" and abs(topo["link_gbps"] - 1) < 1e-9
    # Bulk: the hierarchical ring moves N through each host's link, the flat ring 1.5 N.
    assert plans[256 << 20][0] == "hier_ring", plans[256 << 20]
    algo_small, us_small, _ = plans[4]
    assert algo_small in ("direct", "hier_tree", "tree", "hier_ring"), plans[4]
    # 256 MiB over 1 Gbit/s at N bytes per host link: about 2.1 s.
    assert 2.0e6 < plans[256 << 20][1] < 2.6e6, plans[256 << 20]
    assert "1 GB/s" not in plans[4][2] and "hier_ring" in plans[4][2]
    assert forced == {"ring": "ring", "tree": "tree", "hier": "hier_ring", "hier_ring": "hier_ring",
                      "hier_tree": "hier_tree"}


def test_hmac_matches_the_standard():
    import plait

    for key, msg in [(b"", b""), (b"k" * 20, b"hi"), (os.urandom(32), os.urandom(1000)), (b"x" * 100, b"y" * 64)]:
        assert plait._C._hmac_sha256(key, msg) == hmac.new(key, msg, hashlib.sha256).digest()


# ---- rogue clients against the TCP handshake ---------------------------------------------------------------------

HELLO = struct.Struct("<IHHii16s")  # magic, version, stream, from, to, nonce
CHALLENGE = struct.Struct("<II16s32s")
HELLO_MAGIC, CHALL_MAGIC = 0x504C5441, 0x504C5443


def _find(store, suffix, timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        keys = [k for k in store.list_keys() if k.endswith(suffix)]
        if keys:
            return keys[0]
        time.sleep(0.02)
    raise TimeoutError(suffix)


def _recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def attack(store, report, last_rank=2):
    """Rogue clients against rank 0's listener while the group forms. Fills report[name] = what happened.

    Waits until `last_rank` has published its address (every rank has then, and rank 0 is accepting while
    last_rank holds back its dial with PLAIT_TEST_DIAL_DELAY_MS).
    """
    info_key = _find(store, "plait/0/info/0")
    base = info_key[: -len("info/0")]  # ".../plait/<epoch>/"
    _find(store, f"plait/0/info/{last_rank}")
    host, port = store.get(info_key).decode().split("\n")[3].rsplit(":", 1)
    port = int(port)
    secret = bytes.fromhex(store.get(base + "secret").decode())
    job = (base[base.index("plait/"):] + store.get(base + "uuid").decode()).encode()

    def conn():
        s = socket.create_connection((host, port), timeout=20)
        s.settimeout(20)
        return s

    def outcome(s):
        try:
            data = s.recv(4)
            return "accepted" if data == struct.pack("<I", 0x504C544B) else "refused"
        except (ConnectionResetError, socket.timeout):
            return "refused"

    silent = conn()  # connects and says nothing: must not hold up the real peer
    hello = HELLO.pack(HELLO_MAGIC, 1, 0, last_rank, 0, os.urandom(16))  # claims to be the missing rank

    # garbage bytes
    s = conn()
    s.sendall(os.urandom(200))
    report["garbage"] = outcome(s)
    # no secret: a well-formed hello, then a proof made of zeros
    s = conn()
    s.sendall(hello)
    ch = _recv_exact(s, CHALLENGE.size)
    s.sendall(b"\0" * 32)
    report["no_secret"] = outcome(s)
    # wrong secret: a correctly computed proof under another key
    s = conn()
    s.sendall(hello)
    magic, _, nonce, _ = CHALLENGE.unpack(_recv_exact(s, CHALLENGE.size))
    s.sendall(hmac.new(os.urandom(32), b"D" + job + hello + nonce, hashlib.sha256).digest())
    report["wrong_secret"] = outcome(s)
    # replay: a valid proof recorded for one connection's challenge, played back on a new connection
    s = conn()
    s.sendall(hello)
    magic, _, nonce1, _ = CHALLENGE.unpack(_recv_exact(s, CHALLENGE.size))
    recorded = hmac.new(secret, b"D" + job + hello + nonce1, hashlib.sha256).digest()
    s.close()
    s = conn()
    s.sendall(hello)
    magic, _, nonce2, server_mac = CHALLENGE.unpack(_recv_exact(s, CHALLENGE.size))
    report["listener_proof_valid"] = hmac.compare_digest(
        server_mac, hmac.new(secret, b"L" + job + hello + nonce2, hashlib.sha256).digest())
    report["fresh_nonce"] = nonce1 != nonce2
    s.sendall(recorded)
    report["replay"] = outcome(s)
    silent.close()


def worker_rogue(rank, ws, port):
    import plait  # noqa: F401

    store = dist.TCPStore("127.0.0.1", port, ws, rank == 0, timeout=__import__("datetime").timedelta(seconds=60))
    report = {}
    th = None
    if rank == ws - 1:
        # A rogue client in the last rank's process knocks on rank 0's listener while the group forms: the last
        # rank publishes its address and then waits (PLAIT_TEST_DIAL_DELAY_MS) before dialing, so rank 0 is
        # accepting and still missing a peer.
        th = threading.Thread(target=attack, args=(store, report))
        th.start()
    dist.init_process_group("plait", store=store, rank=rank, world_size=ws,
                            timeout=__import__("datetime").timedelta(seconds=60))
    if th is not None:
        th.join(timeout=60)
        assert not th.is_alive(), "the rogue client hung"
    t = torch.arange(1003, dtype=torch.int64) * (rank + 1)
    dist.all_reduce(t)
    expected = torch.arange(1003, dtype=torch.int64) * sum(range(1, ws + 1))
    ok = torch.equal(t, expected)
    dist.destroy_process_group()
    return ok, report


def test_rogue_tcp_clients_are_refused_and_the_job_goes_on():
    port = H.free_port()
    rank_env = _host_env((0, 1, 2))
    rank_env[2]["PLAIT_TEST_DIAL_DELAY_MS"] = "3000"
    res = H.run_world(worker_rogue, 3, port, init=None, rank_env=rank_env, expect_fail=True)
    assert all(r.ok for r in res), "\n".join(f"{r.describe()}\n{r.tb}\n{r.log[-3000:]}" for r in res)
    assert all(r.value[0] for r in res), "all_reduce result changed"
    report = res[-1].value[1]
    assert report == {"garbage": "refused", "no_secret": "refused", "wrong_secret": "refused",
                      "listener_proof_valid": True, "fresh_nonce": True, "replay": "refused"}, report
    refusals = res[0].log.count("refused a TCP connection")
    assert refusals >= 5, res[0].log[-3000:]


def worker_streams(rank, ws):
    import plait

    failures = []
    for algo in ["ring", "direct", "hier"]:
        g = dist.new_group(backend="plait", pg_options=plait.Options(algo=algo))
        for n in [1, 70_001, 1_000_003]:  # up to 8 MB: the byte stream crosses many 128 KiB stripes
            t = torch.arange(n, dtype=torch.int64) * (rank + 1)
            dist.all_reduce(t, group=g)
            if not torch.equal(t, torch.arange(n, dtype=torch.int64) * (ws * (ws + 1) // 2)):
                failures.append(f"{algo} n={n}")
    out = [torch.empty(300_001, dtype=torch.int32) for _ in range(ws)]
    dist.all_gather(out, torch.full((300_001,), rank, dtype=torch.int32))
    if not all(torch.equal(o, torch.full_like(o, r)) for r, o in enumerate(out)):
        failures.append("all_gather")
    return failures


def test_several_tcp_streams_per_pair_stripe_exactly():
    env = {"PLAIT_TCP_STREAMS": "3"}
    res = H.run_world(worker_streams, 3, rank_env=_host_env((0, 1, 1)), env=env)
    assert res == [[], [], []], res
