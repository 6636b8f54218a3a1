"""Bytes from the network that a plait rank or a plait-server must survive (regressions of what fuzzing found or
hardened; the fuzz targets themselves are in fuzz/ and run by tests/test_fuzz.py).

- A flood of silent connections on a rank's TCP listener while the group forms: at most 256 handshakes are held at
  once (the oldest is refused beyond that), so a flood cannot use up the rank's file descriptors, and the real peer
  still connects.
- The same flood on a plait-server, which then still answers a ping.
"""

import datetime
import socket
import threading
import time

import torch
import torch.distributed as dist

import _harness as H


def _find(store, suffix, timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        keys = [k for k in store.list_keys() if k.endswith(suffix)]
        if keys:
            return keys[0]
        time.sleep(0.02)
    raise TimeoutError(suffix)


def _flood(store, report, n):
    info_key = _find(store, "plait/0/info/0")
    _find(store, "plait/0/info/1")  # rank 1 published too: rank 0 is accepting, rank 1 holds back its dial
    host, port = store.get(info_key).decode().split("\n")[3].rsplit(":", 1)
    socks = []
    for _ in range(n):
        socks.append(socket.create_connection((host, int(port)), timeout=20))
    report["opened"] = len(socks)
    # Held open until the group formed (the main thread closes them).
    report["socks"] = socks


def worker_flood(rank, ws, port, n):
    import plait  # noqa: F401

    store = dist.TCPStore("127.0.0.1", port, ws, rank == 0, timeout=datetime.timedelta(seconds=60))
    report = {}
    th = None
    if rank == 1:
        th = threading.Thread(target=_flood, args=(store, report, n))
        th.start()
    dist.init_process_group("plait", store=store, rank=rank, world_size=ws, timeout=datetime.timedelta(seconds=60))
    if th is not None:
        th.join(timeout=60)
        assert not th.is_alive(), "the flood hung"
    t = torch.arange(1001, dtype=torch.int64) * (rank + 1)
    dist.all_reduce(t)
    ok = torch.equal(t, torch.arange(1001, dtype=torch.int64) * 3)
    for s in report.pop("socks", []):
        s.close()
    dist.destroy_process_group()
    return ok, report.get("opened", 0)


def test_tcp_listener_caps_handshakes_and_the_job_goes_on():
    port = H.free_port()
    env = {"PLAIT_TRANSPORT": "tcp"}
    rank_env = {1: {"PLAIT_TEST_DIAL_DELAY_MS": "3000"}}
    res = H.run_world(worker_flood, 2, port, 300, init=None, env=env, rank_env=rank_env, expect_fail=True)
    assert all(r.ok for r in res), "\n".join(f"{r.describe()}\n{r.tb}\n{r.log[-3000:]}" for r in res)
    assert all(r.value[0] for r in res), "all_reduce result changed"
    assert res[1].value[1] == 300
    # 300 silent connections, at most 256 held: the 44 oldest (at least) were refused for that reason.
    capped = res[0].log.count("too many connections in their handshake")
    assert capped >= 44, res[0].log[-3000:]
