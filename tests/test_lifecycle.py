"""Group lifecycle: destroy with work in flight, thousands of groups created and destroyed, re-initialising after a
failure, a restart while a peer host is unreachable; each without leaked threads, file descriptors, sockets,
listening ports or shared memory (tests/_resources.py counts them from /proc).

Resource counts are compared exactly after a warm-up cycle (torch and plait start a few things once per process).
The many-groups test runs LIFECYCLE_GROUPS cycles (default 300 for CI; bench/elastic.py --groups 2000 runs the full
count and reports the store's growth and RSS per group).
"""

from __future__ import annotations

import datetime
import os
import threading
import time

import pytest
import torch
import torch.distributed as dist

import _harness as H
import _resources as R

pytestmark = pytest.mark.plait_only

GROUPS = int(os.environ.get("LIFECYCLE_GROUPS", "300"))


def _init(rank, ws, store_name, timeout_s=60.0, **kw):
    H.init_process_group(rank, ws, init_method=f"file://{H.CTX.workdir}/{store_name}",
                         timeout=datetime.timedelta(seconds=timeout_s), **kw)


def _check_sum(x, want, what):
    assert torch.equal(x, want), f"{what}: got {x[:8].tolist()}, expected {want[:8].tolist()}"


# ------------------------------------------------------------------------------------------------------------------
# 1. destroy_process_group() with work in flight


SIZES = [1, 1003, 65536, 1 << 20]  # the last is 4 MiB: several chunks, still running when destroy is called


def _in_flight_cycle(rank, ws, store_name):
    """Async all-reduces not waited for, an irecv nobody matches (and a thread blocked in its wait), then
    destroy_process_group(). Returns what happened."""
    _init(rank, ws, store_name)
    xs = [torch.full((n,), float(rank + 1)) for n in SIZES for _ in range(3)]
    works = [dist.all_reduce(x, async_op=True) for x in xs]
    buf = torch.full((16,), -1.0)
    rw = dist.irecv(buf, src=(rank + 1) % ws, tag=7)  # the peer never sends
    waited = {}

    def waiter():
        t = time.monotonic()
        try:
            rw.wait()
            waited["msg"] = "no error"
        except RuntimeError as e:
            waited["msg"] = str(e)
        waited["at"] = time.monotonic() - t

    th = threading.Thread(target=waiter, daemon=True)
    th.start()
    t0 = time.monotonic()
    dist.destroy_process_group()
    destroy_s = time.monotonic() - t0
    th.join(timeout=30)
    out = dict(destroy_s=destroy_s, waiter_alive=th.is_alive(), waited=dict(waited),
               completed=[w.is_completed() for w in works], irecv_completed=rw.is_completed(),
               buf_untouched=bool((buf == -1.0).all()))
    want = float(ws * (ws + 1) // 2)
    out["exact"] = all(torch.equal(x, torch.full_like(x, want)) for x in xs)
    errs = []
    for w in works:
        try:
            w.wait()
        except RuntimeError as e:
            errs.append(str(e))
    out["all_reduce_errors"] = errs
    return out


def worker_destroy_in_flight(rank, ws):
    _in_flight_cycle(rank, ws, "warm")  # one full cycle first: what torch / plait start once per process
    base = R.snapshot()
    res = _in_flight_cycle(rank, ws, "store")
    time.sleep(0.2)
    res["leaks"] = R.diff(base, R.snapshot())
    res["initialized_after"] = dist.is_initialized()
    return res


@pytest.mark.timeout(180)
def test_destroy_with_work_in_flight_returns_promptly_and_fails_pending_transfers():
    shm_before = R.shm_entries()
    res = H.run_world(worker_destroy_in_flight, 3, init=None, timeout_s=150)
    print("\ndestroy with work in flight: " + ", ".join(f"rank {i} {r['destroy_s']:.2f} s" for i, r in enumerate(res)))
    for rank, r in enumerate(res):
        # destroy drains the queued collectives (every rank issued them: they complete, exact), gives the
        # unmatched receive a grace of at most 1 s, then fails it; nothing waits for the 60 s group timeout.
        assert r["destroy_s"] < 10, (rank, r["destroy_s"])
        assert all(r["completed"]) and r["exact"] and not r["all_reduce_errors"], (rank, r)
        assert r["irecv_completed"] and r["buf_untouched"], (rank, r)
        assert not r["waiter_alive"], f"rank {rank}: the thread waiting on the irecv is still blocked"
        assert r["waited"]["msg"].startswith(f"plait: rank {rank}: ") and r["waited"]["msg"].endswith(
            "the process group was shut down with this operation pending"), (rank, r["waited"])
        assert r["waited"]["at"] < 10, (rank, r["waited"])
        assert not r["leaks"], f"rank {rank}: {r['leaks']}"
        assert not r["initialized_after"]
    time.sleep(0.2)
    assert not (R.shm_entries() - shm_before), sorted(R.shm_entries() - shm_before)


def worker_destroy_unmatched_collective(rank, ws):
    """Rank 0 has a collective in flight that rank 1 never issues; rank 1 stays alive (idle) for 3 s, then
    destroys. Rank 0's destroy must not wait for the 60 s group timeout."""
    _init(rank, ws, "store")
    x = torch.ones(8)
    dist.all_reduce(x)
    t0 = time.monotonic()
    if rank == 1:
        time.sleep(3)
        dist.destroy_process_group()
        return dict(destroy_s=time.monotonic() - t0)
    w = dist.all_reduce(torch.ones(1 << 16), async_op=True)
    dist.destroy_process_group()
    destroy_s = time.monotonic() - t0
    try:
        w.wait()
        msg = "no error"
    except RuntimeError as e:
        msg = str(e)
    return dict(destroy_s=destroy_s, msg=msg, completed=w.is_completed())


@pytest.mark.timeout(120)
def test_destroy_with_an_unmatched_collective_ends_when_the_peer_leaves():
    res = H.run_world(worker_destroy_unmatched_collective, 2, init=None, timeout_s=100)
    r0 = res[0]
    print(f"\nrank 0: destroy with an unmatched all_reduce took {r0['destroy_s']:.2f} s (rank 1 left after 3 s); "
          f"the Work: {r0['msg']}")
    assert r0["completed"], r0
    assert r0["destroy_s"] < 3 + 10, r0
    assert "rank 1" in r0["msg"], r0["msg"]


# ------------------------------------------------------------------------------------------------------------------
# 2. many groups created and destroyed in one process


def _subsets(ws):
    return [list(range(ws)), [0, 1], [ws - 2, ws - 1], list(range(1, ws))]


def _group_cycle(rank, ws, i, transport):
    ranks = _subsets(ws)[i % 4]
    import plait

    g = dist.new_group(ranks, backend="plait", pg_options=plait.Options(transport=transport))
    if rank not in ranks:
        return
    x = torch.full((1003,), float(rank + i))
    dist.all_reduce(x, group=g)
    _check_sum(x, torch.full((1003,), float(sum(ranks) + len(ranks) * i)), f"group #{i} {ranks}")
    dist.destroy_process_group(g)


def worker_many_groups(rank, ws, n, warm):
    store = dist.distributed_c10d._get_default_store()
    snaps = []
    for i in range(warm):
        _group_cycle(rank, ws, i, "shm" if i % 2 else "tcp")
    dist.barrier()
    before = R.snapshot()
    keys0 = store.num_keys()
    t0 = time.monotonic()
    for i in range(warm, warm + n):
        _group_cycle(rank, ws, i, "shm" if i % 2 else "tcp")
        if (i - warm) % max(1, n // 4) == 0:
            snaps.append(R.snapshot())
    dist.barrier()
    elapsed = time.monotonic() - t0
    after = R.snapshot()
    keys1 = store.num_keys()
    return dict(leaks=R.diff(before, after), mid=[R.diff(before, s) for s in snaps], before=before, after=after,
                rss_growth_kib=after["rss_kib"] - before["rss_kib"], store_keys_per_group=(keys1 - keys0) / n,
                per_group_ms=1000 * elapsed / n, pg_map=len(dist.distributed_c10d._world.pg_map))


@pytest.mark.timeout(400)
def test_many_groups_created_and_destroyed_leak_nothing():
    shm_before = R.shm_entries()
    res = H.run_world(worker_many_groups, 4, GROUPS, 12, init="tcp", timeout_s=380)
    for rank, r in enumerate(res):
        # Threads, descriptors, sockets, listening ports and shm mappings: exactly as many after the loop as before.
        assert not r["leaks"], f"rank {rank} after {GROUPS} groups: {r['leaks']}"
        assert r["pg_map"] == 1, r["pg_map"]  # only the default group is left
        # and at every quarter of the way (each sample taken after this rank's last destroy): nothing grows
        assert r["mid"] == [{}] * len(r["mid"]) and len(r["mid"]) >= 4, f"rank {rank}: {r['mid']}"
    print(f"\n{GROUPS} groups x 4 ranks: {res[0]['per_group_ms']:.1f} ms per group, RSS growth "
          f"{[r['rss_growth_kib'] for r in res]} KiB, store keys per group {res[0]['store_keys_per_group']:.1f}")
    time.sleep(0.2)
    assert not (R.shm_entries() - shm_before), sorted(R.shm_entries() - shm_before)


# ------------------------------------------------------------------------------------------------------------------
# 3. re-initialising after a failure, in the same processes


def worker_reinit_after_abort(rank, ws):
    """Cycle: init over a new store, collectives, rank ws-1 aborts the group, the others' next collective fails
    naming the abort, every rank destroys, next cycle. Three cycles; resources compared from the second on."""
    out = []
    base = None
    for cycle in range(3):
        _init(rank, ws, f"store{cycle}")
        x = torch.arange(4099, dtype=torch.float64) * (rank + 1)
        dist.all_reduce(x)
        _check_sum(x, torch.arange(4099, dtype=torch.float64) * (ws * (ws + 1) // 2), f"cycle {cycle}")
        dist.barrier()
        msg = ""
        if rank == ws - 1:
            dist.distributed_c10d._abort_process_group()
            time.sleep(1.0)  # alive: the others must hear of the abort, not of a dead process
        else:
            t0 = time.monotonic()
            try:
                dist.all_reduce(torch.ones(16))
                msg = "no error"
            except RuntimeError as e:
                msg = str(e)
            out.append(dict(cycle=cycle, msg=msg, s=time.monotonic() - t0))
        if dist.is_initialized():  # torch's _abort_process_group() removed the aborting rank's group already
            dist.destroy_process_group()
        assert not dist.is_initialized()
        time.sleep(0.2)
        if cycle == 0:
            base = R.snapshot()
        else:
            out.append(dict(cycle=cycle, leaks=R.diff(base, R.snapshot())))
    # and a last group that works, on a store with a new prefix
    _init(rank, ws, "store_final")
    y = torch.full((77,), rank, dtype=torch.int64)
    dist.all_reduce(y, op=dist.ReduceOp.MAX)
    _check_sum(y, torch.full((77,), ws - 1, dtype=torch.int64), "after the aborts")
    dist.destroy_process_group()
    return out


@pytest.mark.timeout(180)
def test_reinit_after_abort_in_the_same_processes():
    res = H.run_world(worker_reinit_after_abort, 3, init=None, timeout_s=150)
    print("\nafter rank 2's abort, rank 0 saw: " + res[0][0]["msg"])
    for rank, r in enumerate(res):
        errors = [e for e in r if "msg" in e]
        leaks = [e for e in r if "leaks" in e]
        if rank < 2:
            assert [e["cycle"] for e in errors] == [0, 1, 2], errors
            for e in errors:
                assert "rank 2" in e["msg"] and "abort" in e["msg"], e
                assert e["s"] < 10, e
        assert [e["leaks"] for e in leaks] == [{}, {}], f"rank {rank}: {leaks}"


def worker_survivors_reinit(rank, ws):
    """World of 3; rank 2's process dies mid-job. The survivors see an error naming rank 2, destroy, and form a
    new group of 2 over the same store under a new prefix; collectives there are exact and nothing leaks."""
    _init(rank, ws, "store", timeout_s=20)
    x = torch.ones(1003)
    dist.all_reduce(x)
    _check_sum(x, torch.full((1003,), 3.0), "before the death")
    if rank == 2:
        os._exit(9)
    base = None
    t0 = time.monotonic()
    try:
        for _ in range(1000):
            dist.all_reduce(torch.ones(1003))
        msg = "no error"
    except RuntimeError as e:
        msg = str(e)
    fail_s = time.monotonic() - t0
    store = dist.distributed_c10d._get_default_store()
    dist.destroy_process_group()
    results = []
    for attempt in range(2):
        prefix = dist.PrefixStore(f"survivors/{attempt}", store)
        dist.init_process_group("plait", store=prefix, rank=rank, world_size=2,
                                timeout=datetime.timedelta(seconds=30))
        y = torch.arange(100003, dtype=torch.int64) * (rank + 2)
        dist.all_reduce(y)
        results.append(torch.equal(y, torch.arange(100003, dtype=torch.int64) * 5))
        sub = dist.new_group([0, 1], backend="plait")
        z = torch.full((5,), float(rank))
        dist.broadcast(z, src=1, group=sub)
        results.append(torch.equal(z, torch.full((5,), 1.0)))
        dist.destroy_process_group()
        time.sleep(0.2)
        if attempt == 0:
            base = R.snapshot()
    return dict(msg=msg, fail_s=fail_s, results=results, leaks=R.diff(base, R.snapshot()))


@pytest.mark.timeout(180)
def test_survivors_reinit_after_a_peer_died():
    res = H.run_world(worker_survivors_reinit, 3, init=None, timeout_s=150, expect_fail=True)
    assert not res[2].reported and res[2].returncode == 9, res[2].describe()
    print(f"\nrank 0 after rank 2 died: {res[0].value['msg'] if res[0].ok else res[0].describe()}")
    for r in res[:2]:
        assert r.reported and r.ok, r.describe() + "\n" + (r.tb or "") + r.log[-3000:]
        v = r.value
        assert "rank 2" in v["msg"], v["msg"]
        assert v["fail_s"] < 20, v
        assert v["results"] == [True] * 4, v["results"]
        assert not v["leaks"], f"rank {r.rank}: {v['leaks']}"


def worker_failed_init(rank, ws):
    """Rank 0 tries twice to form a group of 2 that rank 1 never joins (each init times out after 2 s);
    every failed attempt must give back what it took."""
    if rank == 1:
        return {}
    _init(0, 1, "warm_solo")  # a group of 1 first: what torch / plait start once per process
    dist.all_reduce(torch.ones(2))
    dist.destroy_process_group()
    base, base_fds = R.snapshot(), R.fd_targets()
    msgs = []
    for i in range(2):
        try:
            _init(rank, ws, f"lonely{i}", timeout_s=2.0)
            msgs.append("no error")
        except RuntimeError as e:
            msgs.append(str(e))
    time.sleep(0.2)
    leaks = R.diff(base, R.snapshot())
    if leaks:
        leaks["new_fds"] = sorted(v for k, v in R.fd_targets().items() if base_fds.get(k) != v)
    return dict(msgs=msgs, leaks=leaks, initialized=dist.is_initialized())


@pytest.mark.timeout(120)
def test_failed_init_leaks_nothing():
    # (A constructor that throws runs no destructor: the communicator's eventfd, made before the bootstrap, leaked
    # once per failed init until csrc/plait/comm.cc made it after the bootstrap.)
    res = H.run_world(worker_failed_init, 2, init=None, timeout_s=100)
    r = res[0]
    assert not r["initialized"]
    for m in r["msgs"]:
        assert m.startswith("Timeout waiting for key: ") and m.endswith("/plait/0/info/1 after 2000 ms"), m
    assert not r["leaks"], r["leaks"]


def worker_abort_message(rank, ws):
    _init(rank, ws, "store")
    buf = torch.zeros(4)
    w = dist.irecv(buf, src=1 - rank, tag=3)  # never matched
    dist.destroy_process_group()
    try:
        w.wait()
        return "no error"
    except RuntimeError as e:
        return str(e)


@pytest.mark.timeout(60)
def test_pending_transfer_error_names_the_rank_once():
    # (The torch layer's stop() message was prefixed "plait: rank N: " twice: once there, once by Comm::checkAbort.)
    msgs = H.run_world(worker_abort_message, 2, init=None, timeout_s=50)
    for rank, m in enumerate(msgs):
        assert m == f"plait: rank {rank}: the process group was shut down with this operation pending", m


# ------------------------------------------------------------------------------------------------------------------
# 4. a restart while a peer host is unreachable (emulated hosts: network namespaces; needs root and iproute2)


def _read_json(path):
    import json

    with open(path) as f:
        return json.load(f)


def _wait_for(out, names, procs, limit):
    end = time.time() + limit
    while not all(os.path.exists(os.path.join(out, n)) for n in names):
        dead = [p for p in procs if p.poll() is not None]
        if dead or time.time() > end:
            logs = [p.communicate(timeout=5)[0][-3000:] if p.poll() is not None else "(running)" for p in procs]
            pytest.fail(f"waiting for {names}: " + ("a rank exited" if dead else "timed out") + "\n" +
                        "\n----\n".join(logs))
        time.sleep(0.05)


@pytest.mark.cluster
@pytest.mark.timeout(300)
def test_restart_while_a_peer_host_is_unreachable(cluster_factory, tmp_path):
    import subprocess
    import sys

    c = cluster_factory(2, rate="1gbit")
    out = str(tmp_path)
    worker = os.path.join(H.TESTS_DIR, "_lifecycle_cluster_worker.py")
    # The rendezvous is a FileStore (the namespaces share the file system: the store stays reachable while host 1's
    # network is down), so there is no MASTER_ADDR to route towards: each rank is told its address.
    env = {"OMP_NUM_THREADS": "1", "PLAIT_TCP_DEAD_PEER_S": "3"}
    procs = [c.popen(h, [sys.executable, worker, out, str(h)], env=dict(env, PLAIT_SOCKET_ADDR=c.addr(h)),
                     stdout=subprocess.PIPE,
                     stderr=subprocess.STDOUT, text=True) for h in range(2)]
    try:
        _wait_for(out, ["ready0-0.json", "ready0-1.json"], procs, 120)
        for r in range(2):
            v = _read_json(os.path.join(out, f"ready0-{r}.json"))
            assert v == {"ok": True, "nhosts": 2}, v
        c.run(1, ["ip", "link", "set", "eth0", "down"], check=True)  # host 1 unreachable; its rank lives on
        t_down = time.time()
        with open(os.path.join(out, "down"), "w"):
            pass
        _wait_for(out, ["fail1-0.json", "fail1-1.json"], procs, 90)
        fails = [_read_json(os.path.join(out, f"fail1-{r}.json")) for r in range(2)]
        c.run(1, ["ip", "link", "set", "eth0", "up"], check=True)
        with open(os.path.join(out, "up"), "w"):
            pass
        _wait_for(out, ["done-0.json", "done-1.json"], procs, 120)
        done = [_read_json(os.path.join(out, f"done-{r}.json")) for r in range(2)]
        for p in procs:
            p.communicate(timeout=30)
            assert p.returncode == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    unnamed = []
    for r, f in enumerate(fails):
        peer = 1 - r
        print(f"\nrank {r}: collective failed after {f['fail_s']:.1f} s: {f['fail_msg']}\n"
              f"rank {r}: destroy {f['destroy_s']:.2f} s; re-init failed after {f['init_s']:.1f} s: {f['init_msg']}")
        # The collective in flight when the link went down fails naming the peer (keepalive: 3 s, not 8).
        assert f"peer rank {peer}" in f["fail_msg"], f
        assert f["fail_s"] < 8 + 5, f
        assert f["destroy_s"] < 5, f
        # The re-init while the peer is unreachable raises within the group timeout (8 s), not a hang, and leaves
        # nothing behind.
        assert f["init_msg"].startswith(f"DistBackendError: plait: rank {r}: ") and not f["initialized"], f
        assert f["init_s"] < 8 + 5, f
        assert not f["leaks_after_failed_init"], f"rank {r}: the failed init left {f['leaks_after_failed_init']}"
        if f"rank {peer}" not in f["init_msg"]:
            unnamed.append(f"rank {r}: {f['init_msg']}")
    # Rank 1 dials rank 0 and names it; rank 0 (the listener) must name who never connected.
    assert f"plait: rank 1: peer rank 0: cannot connect to {c.addr(0)}:" in fails[1]["init_msg"], fails[1]
    assert fails[1]["init_msg"].endswith("Network is unreachable"), fails[1]["init_msg"]
    for r, d in enumerate(done):
        assert d["ok"], d
        # three groups formed and destroyed (one of them failed): the process holds what it held before the first
        assert not d["leaks"] and not d["leaks_since_failed_init"], f"rank {r}: {d}"
        print(f"rank {r}: re-init after the link came back: {d['reinit_s']:.2f} s, exact")
    # The listener's timeout names the peers that never connected (csrc/plait/transport/tcp.cc connectAll).
    assert not unnamed, "; ".join(unnamed)
