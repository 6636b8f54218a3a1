"""The flight recorder (PLAIT_TRACE_BUFFER / PLAIT_TRACE_DIR, plait.trace_dump(), python -m plait.trace).

Every test asserts what the record holds (ops, sequence numbers, sizes, states, errors) or what the analysis says
(who entered, who is missing), against a world where that is known.
"""

import datetime
import json
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

import _harness as H

pytestmark = pytest.mark.skipif(not H.IS_PLAIT, reason="plait's flight recorder")


def worker_basic(rank, ws):
    import plait

    t0 = time.time()
    t = torch.arange(1000, dtype=torch.float32) * (rank + 1)
    dist.all_reduce(t)
    b = torch.arange(5, dtype=torch.int64) if rank == 1 else torch.zeros(5, dtype=torch.int64)
    dist.broadcast(b, src=1)
    out = [torch.empty(3, dtype=torch.int32) for _ in range(ws)]
    dist.all_gather(out, torch.full((3,), rank, dtype=torch.int32))
    dist.barrier()
    if rank == 0:
        dist.send(torch.ones(7), dst=1, tag=5)
    else:
        r = torch.empty(7)
        dist.recv(r, src=0, tag=5)
    recs = plait.trace_records()
    return recs, t0, time.time()


def test_the_record_holds_each_collective_in_order():
    res = H.run_world(worker_basic, 2)
    for rank, (recs, t0, t1) in enumerate(res):
        assert len(recs) == 1, recs
        r = recs[0]
        assert r["rank"] == rank and r["size"] == 2 and r["format"] == "plait-trace-1"
        assert r["capacity"] == 2048
        es = r["entries"]
        colls = [e for e in es if e["op"] not in ("send", "recv")]
        ops = [e["op"] for e in colls]
        # init may run a barrier of its own: the user's collectives are the last four, in order.
        assert ops[-4:] == ["all_reduce", "broadcast", "all_gather", "barrier"], ops
        seqs = [e["seq"] for e in colls]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
        ar, bc = colls[-4], colls[-3]
        assert ar["dtype"] == "float32" and ar["count"] == 1000 and ar["bytes"] == 4000 and ar["reduce_op"] == "sum"
        assert ar["algorithm"], ar  # the schedule it ran (ring / tree / direct / ...)
        assert ar["waited_on"] == [1 - rank], ar
        assert bc["root"] == 1 and bc["bytes"] == 40, bc
        assert all(e["state"] == "completed" for e in colls), colls
        user = colls[-4:]
        assert all(t0 * 1e6 <= e["start_us"] <= t1 * 1e6 for e in user), (t0, user)
        assert all(0 <= e["duration_us"] <= (t1 - t0) * 1e6 for e in user), user
        assert [e["start_us"] for e in user] == sorted(e["start_us"] for e in user)
        p2p = [e for e in es if e["op"] in ("send", "recv")]
        assert len(p2p) == 1, p2p
        assert p2p[0]["op"] == ("send" if rank == 0 else "recv") and p2p[0]["peer"] == 1 - rank
        assert p2p[0]["tag"] == 5 and p2p[0]["bytes"] == 28 and p2p[0]["state"] == "completed", p2p


def worker_capacity(rank, ws, n):
    import plait

    for i in range(n):
        t = torch.full((4,), float(i))
        dist.all_reduce(t)
    return plait.trace_records()


def test_the_buffer_keeps_the_last_n():
    res = H.run_world(worker_capacity, 2, 40, env={"PLAIT_TRACE_BUFFER": "16"})
    for recs in res:
        (r,) = recs
        assert r["capacity"] == 16 and r["recorded"] >= 40
        es = r["entries"]
        assert len(es) == 16
        assert [e["id"] for e in es] == list(range(r["recorded"] - 16, r["recorded"]))
        assert all(e["op"] == "all_reduce" for e in es)


def test_buffer_zero_turns_it_off():
    res = H.run_world(worker_capacity, 2, 3, env={"PLAIT_TRACE_BUFFER": "0"})
    assert res == [[], []]


def worker_bad_knob(rank, ws):
    return None


def test_a_bad_buffer_size_raises():
    res = H.run_world(worker_bad_knob, 2, env={"PLAIT_TRACE_BUFFER": "lots"}, expect_fail=True)
    assert all(not r.ok for r in res)
    assert all("PLAIT_TRACE_BUFFER=lots is not a number of collectives" in (r.exc_msg or "") for r in res), res[0].exc_msg


def worker_hang(rank, ws, tdir):
    """Ranks 0 and 1 enter an all_reduce that rank 2 (alive) never calls."""
    t = torch.ones(256, dtype=torch.int32)
    dist.all_reduce(t)  # seq k: everyone
    if rank == 2:
        # alive, doing something else: it must still write its record when its peers fail
        deadline = time.time() + 8
        while time.time() < deadline and (not os.path.isdir(tdir) or
                                          len([f for f in os.listdir(tdir) if f.endswith(".json")]) < 3):
            time.sleep(0.1)
        time.sleep(0.5)
        return sorted(os.listdir(tdir))
    try:
        dist.all_reduce(t)
    except Exception as e:  # noqa: BLE001
        return str(e)
    return "no error"


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "plait.trace", *args], capture_output=True, text=True, timeout=60)


def test_a_hang_is_diagnosed_who_is_missing(tmp_path):
    tdir = str(tmp_path / "trace")
    res = H.run_world(worker_hang, 3, tdir, env={"PLAIT_TRACE_DIR": tdir}, pg_timeout_s=2, expect_fail=True)
    assert all(r.ok for r in res), "\n".join(r.describe() for r in res)
    assert "Timed out" in res[0].value and "Timed out" in res[1].value, (res[0].value, res[1].value)
    files = sorted(f for f in os.listdir(tdir) if f.endswith(".json"))
    assert len(files) == 3, files  # rank 2 wrote its record on its peers' request
    import plait.trace as T

    recs = T.load(tdir)
    reasons = {r["rank"]: r["reason"] for r in recs}
    assert "requested by a peer" in reasons[2], reasons
    (v,) = T.analyze(recs)
    assert v["entered"] == [0, 1] and v["missing"] == [2] and v["no_record"] == [], v
    assert v["states"] == {0: "failed", 1: "failed"}, v
    assert "Timed out" in v["errors"][0], v
    assert v["collective"].startswith(f"all_reduce seq {v['seq']} (int32 x 256"), v
    assert v["last_entered"][2].startswith(f"all_reduce seq {v['seq'] - 1} ") and \
        v["last_entered"][2].endswith("completed"), v
    p = _run_cli(tdir)
    assert p.returncode == 0, p.stderr
    assert "entered by ranks 0, 1; MISSING: rank 2 (never entered it)" in p.stdout, p.stdout
    assert f"last entered: all_reduce seq {v['seq'] - 1}" in p.stdout and "    rank 2 (" in p.stdout, p.stdout
    pj = _run_cli(tdir, "--json")
    assert json.loads(pj.stdout)[0]["missing"] == [2]


def worker_disagree(rank, ws, tdir):
    t = torch.zeros(64, dtype=torch.int64)
    try:
        if rank == 0:
            dist.all_reduce(t)
        else:
            dist.broadcast(t, src=0)
    except Exception as e:  # noqa: BLE001
        return str(e)
    return "no error"


def test_ranks_that_called_different_collectives_are_named(tmp_path):
    tdir = str(tmp_path / "t")
    res = H.run_world(worker_disagree, 2, tdir, env={"PLAIT_TRACE_DIR": tdir}, pg_timeout_s=5)
    assert all(r != "no error" for r in res), res
    import plait.trace as T

    (v,) = T.analyze(T.load(tdir))
    assert v["entered"] == [0, 1], v
    assert set(v["disagree"]) == {"0", "1"}, v
    assert any(w.startswith("all_reduce") for w in v["disagree"].values())
    assert any(w.startswith("broadcast") for w in v["disagree"].values())
    p = _run_cli(tdir)
    assert "DISAGREE: ranks 0 called all_reduce" in p.stdout and "DISAGREE: ranks 1 called broadcast" in p.stdout, \
        p.stdout


def worker_on_demand(rank, ws, tdir):
    import plait

    g = dist.new_group([0, 1], backend="plait")  # a second group
    t = torch.ones(10)
    dist.all_reduce(t, group=g)
    dist.all_reduce(t)
    work = None
    if rank == 1:
        work = dist.irecv(torch.empty(3), src=0, tag=9)  # never sent
    dist.barrier()
    paths = plait.trace_dump(tdir)
    dist.barrier()
    if rank == 0:
        dist.send(torch.ones(3), dst=1, tag=9)
    if work is not None:
        work.wait()
    return sorted(os.path.basename(p) for p in paths)


def test_trace_dump_writes_every_group_on_demand(tmp_path):
    tdir = str(tmp_path / "d")
    res = H.run_world(worker_on_demand, 2, tdir)
    assert all(len(p) == 2 for p in res), res  # the default group and "side"
    import plait.trace as T

    recs = T.load(tdir)
    assert len(recs) == 4
    assert len({r["group_id"] for r in recs}) == 2 and len({r["group"] for r in recs}) == 2
    assert all(r["reason"] == "plait.trace_dump()" for r in recs)
    vs = T.analyze(recs)
    assert all(v["missing"] == [] and v["no_record"] == [] for v in vs), vs
    pend = [p for v in vs for p in v["pending_p2p"]]
    assert pend == [{"rank": 1, "what": "recv from rank 0 (tag 9, 12 bytes)", "state": "started"}], pend
    p = _run_cli(tdir, "--entries", "3")
    assert p.returncode == 0 and "rank 1: recv from rank 0 (tag 9, 12 bytes) started" in p.stdout, p.stdout


def test_cli_on_an_empty_or_bad_directory(tmp_path):
    p = _run_cli(str(tmp_path))
    assert p.returncode == 1 and "no flight records" in p.stderr
    (tmp_path / "plait-trace.x.0.json").write_text("{not json")
    p = _run_cli(str(tmp_path))
    assert p.returncode == 2 and "cannot read the flight record" in p.stderr and "plait-trace.x.0.json" in p.stderr


def worker_device(rank, ws):
    import plait

    t = torch.arange(8, dtype=torch.float32)
    dist.all_reduce(t)
    (r,) = plait.trace_records()
    return [(e["op"], e["device"], e["state"]) for e in r["entries"]][-1], t.tolist()


def test_device_work_is_recorded_as_enqueued():
    res = H.run_world(worker_device, 2, env={"PLAIT_DEVICE": "emulate"})
    for last, vals in res:
        assert last == ("all_reduce", True, "enqueued"), last
        assert vals == [2.0 * i for i in range(8)]


def worker_dump_race(rank, ws, tdir):
    import threading

    import plait

    for i in range(300):
        dist.all_reduce(torch.ones(2))
    errors = []

    def dumper():
        for _ in range(60):
            plait.trace_dump(tdir)

    def reader():
        for _ in range(200):
            for f in os.listdir(tdir) if os.path.isdir(tdir) else []:
                if f.endswith(".json"):
                    try:
                        with open(os.path.join(tdir, f)) as fh:
                            json.load(fh)
                    except FileNotFoundError:
                        pass
                    except ValueError as e:
                        errors.append(str(e))

    ths = [threading.Thread(target=dumper) for _ in range(2)] + [threading.Thread(target=reader)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    return errors, sorted(f for f in os.listdir(tdir) if ".tmp" in f)


def test_concurrent_dumps_never_publish_a_torn_file(tmp_path):
    res = H.run_world(worker_dump_race, 1, str(tmp_path / "r"))
    errors, tmps = res[0]
    assert errors == [] and tmps == [], (errors[:3], tmps)


def worker_cross_group(rank, ws, tdir):
    """Rank 2 is stuck in subgroup [1, 2] (rank 1 calls it late); ranks 0 and 1 wait for rank 2 in the world."""
    sub = dist.new_group([1, 2], backend="plait", timeout=datetime.timedelta(seconds=60))
    dist.all_reduce(torch.ones(4))
    if rank == 2:
        t = torch.ones(16, dtype=torch.int64)
        dist.all_reduce(t, group=sub)  # blocks until rank 1 joins it
        return t.tolist()
    err = None
    try:
        dist.all_reduce(torch.ones(4))
    except Exception as e:  # noqa: BLE001
        err = str(e)
    if rank == 1:
        deadline = time.time() + 10  # let rank 2 answer the request, then release it
        while time.time() < deadline and len([f for f in os.listdir(tdir) if f.endswith(".json")]) < 5:
            time.sleep(0.1)
        t = torch.ones(16, dtype=torch.int64)
        dist.all_reduce(t, group=sub)
    return err


def test_a_rank_stuck_in_another_group_shows_where(tmp_path):
    tdir = str(tmp_path / "x")
    res = H.run_world(worker_cross_group, 3, tdir, env={"PLAIT_TRACE_DIR": tdir}, pg_timeout_s=2, expect_fail=True)
    assert all(r.ok for r in res), "\n".join(r.describe() for r in res)
    assert "Timed out" in res[0].value and res[2].value == [2] * 16, (res[0].value, res[2].value)
    import plait.trace as T

    vs = {len(v["ranks_with_records"]): v for v in T.analyze(T.load(tdir))}
    world, sub = vs[3], vs[2]
    assert world["missing"] == [2], world
    # rank 2's record of the subgroup (written on the world's request) shows it inside the subgroup's all_reduce
    # (group ranks: global rank 2 is the subgroup's rank 1; global rank 1, its rank 0, had not called it yet)
    assert sub["global_ranks"] == [1, 2], sub
    assert sub["collective"].startswith("all_reduce") and sub["entered"] == [1] and sub["states"][1] == "started", sub
    assert sub["missing"] == [0] and sub["where"][1].startswith("global rank 2, "), sub


def _rec(rank, size, entries, gid="g", reason="r", when=1):
    return {"format": "plait-trace-1", "rank": rank, "size": size, "group": "", "group_id": gid, "host": "h",
            "pid": 100 + rank, "dumped_at_us": when, "reason": reason, "capacity": 4, "recorded": len(entries),
            "entries": entries}


def _e(seq, op="all_reduce", state="completed", **kw):
    e = {"id": seq, "seq": seq, "op": op, "dtype": "float32", "reduce_op": "sum", "root": 0, "count": 4, "bytes": 16,
         "algorithm": "ring", "device": False, "state": state, "waited_on": [], "start_us": seq}
    e.update(kw)
    return e


def test_analyzer_cases():
    import plait.trace as T

    # point-to-point only: nobody is "missing" a collective
    p2p = [_rec(r, 2, [_e(1, op="send" if r == 0 else "recv", peer=1 - r, tag=0, state="started")]) for r in (0, 1)]
    (v,) = T.analyze(p2p)
    assert v["missing"] == [] and v["collective"] is None and len(v["pending_p2p"]) == 2, v
    # a rank whose buffer wrapped past the stuck collective is not called missing
    recs = [_rec(0, 2, [_e(5, state="failed", error="Timed out")]), _rec(1, 2, [_e(9), _e(10)])]
    (v,) = T.analyze(recs)
    assert v["seq"] == 5 and v["missing"] == [] and v["wrapped"] == [1], v
    # a rank that answered a request and failed later keeps its requested record for the verdict
    recs = [_rec(0, 2, [_e(1), _e(2, state="failed", error="Timed out")]), _rec(1, 2, [_e(1)], when=5)]
    late = _rec(1, 2, [_e(1), _e(2, state="failed", error="aborted")], when=9)
    late["_failure"] = True
    (v,) = T.analyze(recs + [late])
    assert v["missing"] == [1] and 1 in v["late"], v
