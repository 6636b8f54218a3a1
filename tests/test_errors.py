"""Error paths: every failure is a Python exception (RuntimeError or a subclass), raised on every rank within the
group timeout, with a message that says what went wrong; nothing hangs and no shared memory is left behind.

The group timeout in these tests is PG_TIMEOUT_S; a rank "raised in bounded time" when fn ended with an exception
within PG_TIMEOUT_S + SLACK_S (generous: 8 processes share 2 cores). This bounds hangs; it is not a perf check.
"""

from __future__ import annotations

import os
import re
import time

import pytest
import torch
import torch.distributed as dist

import _harness as H

PG_TIMEOUT_S = 10
SLACK_S = 25


def _is_runtime_error(res) -> bool:
    return "RuntimeError" in res.exc_mro


def _explain(results) -> str:
    out = []
    for r in results:
        out.append(r.describe() + (f" after {r.elapsed_s:.1f}s" if r.elapsed_s is not None else ""))
        if r.tb and not r.ok:
            out.append("    " + r.tb.strip().splitlines()[-1][:500])
    return "\n".join(out)


def _assert_raised_in_bound(results, ranks):
    for r in results:
        if r.rank not in ranks:
            continue
        assert r.reported, f"rank {r.rank} did not report:\n{_explain(results)}\n{r.log[-3000:]}"
        assert not r.ok, f"rank {r.rank} did not raise:\n{_explain(results)}"
        assert _is_runtime_error(r), f"rank {r.rank} raised {r.exc_type}, not a RuntimeError:\n{r.tb}"
        assert r.elapsed_s < PG_TIMEOUT_S + SLACK_S, f"rank {r.rank} took {r.elapsed_s:.1f}s to raise"


def _run_error_world(fn, ws, *args, **kw):
    kw.setdefault("pg_timeout_s", PG_TIMEOUT_S)
    kw.setdefault("timeout_s", PG_TIMEOUT_S + SLACK_S + 60)
    kw.setdefault("shutdown_grace_s", 20)
    return H.run_world(fn, ws, *args, expect_fail=True, **kw)


# ------------------------------------------------------------------------------------------------------------------
# local argument errors (every rank passes the same bad argument): raise, and the group stays usable




def worker_bad_args(rank, ws):
    msgs = {}
    pg = dist.distributed_c10d._get_default_group()
    for dt in [torch.float8_e4m3fn, torch.float8_e5m2]:
        t = torch.zeros(8, dtype=dt)
        msgs[f"all_reduce {dt}"] = H.expect_raise(lambda: dist.all_reduce(t), "dtype")
        msgs[f"broadcast {dt}"] = H.expect_raise(lambda: dist.broadcast(t, src=0), "dtype")
    # complex tensors are viewed as real by torch.distributed's Python layer; call the backend directly
    c = torch.zeros(8, dtype=torch.complex64)
    msgs["pg.allreduce complex64"] = H.expect_raise(lambda: pg.allreduce([c]), "dtype")
    msgs["pg.broadcast complex128"] = H.expect_raise(
        lambda: pg.broadcast([torch.zeros(4, dtype=torch.complex128)], dist.BroadcastOptions()), "dtype")
    # sparse all-reduce is supported (SUM, as gloo); other ops on sparse tensors are refused
    sp = torch.sparse_coo_tensor(torch.tensor([[0, 3]]), torch.tensor([1.0, 2.0]), (8,))
    dist.all_reduce(sp)
    want = torch.zeros(8)
    want[0], want[3] = 1.0 * ws, 2.0 * ws
    assert torch.equal(sp.to_dense(), want), sp.to_dense()
    sp2 = torch.sparse_coo_tensor(torch.tensor([[0, 3]]), torch.tensor([1.0, 2.0]), (8,))
    msgs["all_reduce sparse max"] = H.expect_raise(lambda: dist.all_reduce(sp2, op=dist.ReduceOp.MAX), "sparse")
    # wrong output sizes
    msgs["all_gather_into_tensor size"] = H.expect_raise(
        lambda: dist.all_gather_into_tensor(torch.empty(ws * 8 + 1), torch.ones(8)), "size")
    msgs["reduce_scatter_tensor size"] = H.expect_raise(
        lambda: dist.reduce_scatter_tensor(torch.empty(9), torch.ones(ws * 8)), "size")
    # the group still works after rejected calls
    x = torch.full((7,), float(rank))
    dist.all_reduce(x)
    assert torch.equal(x, torch.full((7,), float(sum(range(ws))))), f"group unusable after rejected calls: {x}"
    return msgs


@pytest.mark.plait_only
@pytest.mark.timeout(120)
@pytest.mark.parametrize("ws", [1, 2])
def test_invalid_arguments(ws):
    res = _run_error_world(worker_bad_args, ws)
    bad = [r for r in res if not r.ok]
    assert not bad, "\n".join(f"{r.describe()}\n{r.tb}" for r in bad)


def worker_unsupported_device(rank, ws):
    # plait takes CPU and CUDA tensors (CUDA: tests/test_gpu.py). A tensor on another device must be refused with a
    # message naming the device. torch.distributed's dispatcher runs collectives on 'meta' tensors itself (shapes
    # only, the backend is never called), so the backend object is called directly, as the dispatch of a device
    # that plait does not support would call it.
    be = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
    m = torch.ones(4, device="meta")
    msgs = {}
    msgs["allreduce"] = H.expect_raise(lambda: be.allreduce([m]), "device meta", "CPU and CUDA")
    msgs["allreduce mixed"] = H.expect_raise(lambda: be.allreduce([torch.ones(4), m]), "meta")
    msgs["broadcast"] = H.expect_raise(lambda: be.broadcast([m], dist.BroadcastOptions()), "device meta")
    msgs["_allgather_base"] = H.expect_raise(lambda: be._allgather_base(torch.empty(ws * 4), m), "device meta")
    # the group still works after the rejected calls
    x = torch.full((7,), float(rank))
    dist.all_reduce(x)
    assert torch.equal(x, torch.full((7,), float(sum(range(ws))))), f"group unusable after rejected calls: {x}"
    return msgs


@pytest.mark.plait_only
@pytest.mark.timeout(120)
@pytest.mark.parametrize("ws", [1, 2])
def test_unsupported_device_rejected(ws):
    res = _run_error_world(worker_unsupported_device, ws)
    assert all(r.ok for r in res), _explain(res) + "\n" + "\n".join(r.tb or "" for r in res)
    for what, msg in res[0].value.items():
        assert msg.startswith("plait:"), f"{what}: {msg!r}"


def worker_bad_options(rank, ws):
    import plait

    msgs = {}
    for field, value, needle in [("algo", "bogus", "unknown algorithm 'bogus'"),
                                 ("transport", "carrier-pigeon", "unknown transport 'carrier-pigeon'")]:
        # the dataclass refuses the value at once...
        try:
            plait.Options(**{field: value})
        except ValueError as e:
            assert f"{field} must be one of" in str(e) and repr(value) in str(e), e
        else:
            raise AssertionError(f"plait.Options({field}={value!r}) was accepted")
        # ...and the core refuses it too when the dataclass check is bypassed (fields assigned after construction)
        o = plait.Options()
        setattr(o, field, value)
        msgs[field] = H.expect_raise(lambda: dist.new_group(backend="plait", pg_options=o), needle)
    # the default group still works
    x = torch.full((3,), float(rank + 1))
    dist.all_reduce(x)
    assert torch.equal(x, torch.full((3,), float(ws * (ws + 1) // 2))), x
    return msgs


@pytest.mark.plait_only
@pytest.mark.timeout(120)
@pytest.mark.parametrize("ws", [1, 2])
def test_invalid_options_rejected(ws):
    res = _run_error_world(worker_bad_options, ws)
    assert all(r.ok for r in res), _explain(res) + "\n" + "\n".join(r.tb or "" for r in res)
    for r in res:
        assert set(r.value) == {"algo", "transport"}, r.value


def worker_bad_env_knob(rank, ws):
    # not reached when the knob is refused: the harness creates the default (plait) group first, and that raises
    return "accepted"


@pytest.mark.plait_only
@pytest.mark.timeout(120)
@pytest.mark.parametrize("knob,value,needle", [
    ("PLAIT_ALGO", "bogus", "unknown algorithm 'bogus'"),
    ("PLAIT_TRANSPORT", "carrier-pigeon", "unknown transport 'carrier-pigeon'"),
    ("PLAIT_KERNELS", "avx512", "PLAIT_KERNELS=avx512 is not one of auto, scalar"),
    ("PLAIT_DEVICE", "tpu", "PLAIT_DEVICE=tpu is not one of auto, emulate"),
])
def test_invalid_env_knobs_rejected_by_the_core(knob, value, needle):
    """The environment knobs bypass plait.Options: the C++ core checks them, on every rank."""
    res = _run_error_world(worker_bad_env_knob, 2, env={knob: value})
    for r in res:
        assert r.reported and not r.ok, f"{knob}={value} was accepted:\n{_explain(res)}"
        assert _is_runtime_error(r), f"rank {r.rank} raised {r.exc_type}, not a RuntimeError:\n{r.tb}"
        assert needle in r.exc_msg, f"rank {r.rank}'s error does not say {needle!r}: {r.exc_msg!r}"


# ------------------------------------------------------------------------------------------------------------------
# ranks disagreeing on a collective


def worker_mismatch(rank, ws, kind, opts):
    g = None
    if opts is not None:
        g = dist.new_group(backend="plait", pg_options=H.make_options(opts))
    warm = torch.ones(4)
    dist.all_reduce(warm, group=g)  # connections up, then disagree
    odd = rank == 1
    if kind == "count":
        dist.all_reduce(torch.ones(16 if odd else 8), group=g)
    elif kind == "dtype":
        dist.all_reduce(torch.ones(8, dtype=torch.float64 if odd else torch.float32), group=g)
    elif kind == "op":
        dist.all_reduce(torch.ones(8), op=dist.ReduceOp.MAX if odd else dist.ReduceOp.SUM, group=g)
    elif kind == "collective":
        if odd:
            dist.broadcast(torch.ones(8), src=0, group=g)
        else:
            dist.all_reduce(torch.ones(8), group=g)
    elif kind == "root":
        dist.broadcast(torch.ones(8), src=1 if odd else 0, group=g)
    # if the disagreement went unnoticed, a follow-up collective must not succeed silently either
    x = torch.ones(4)
    dist.all_reduce(x, group=g)
    return x.tolist()


@pytest.mark.plait_only  # gloo aborts the process (std::terminate) on a size mismatch
@pytest.mark.timeout(150)
@pytest.mark.parametrize("ws", [2, 3])
@pytest.mark.parametrize("kind", ["count", "dtype", "op", "collective", "root"])
def test_mismatch(kind, ws):
    res = _run_error_world(worker_mismatch, ws, kind, None)
    _assert_raised_in_bound(res, range(ws))
    _assert_every_rank_names_the_mismatch(res, ws)


def _assert_every_rank_names_the_mismatch(res, ws):
    """Every rank raises, and every rank's error names the collective mismatch and rank 1 (the odd one out),
    beside a rank that disagreed with it."""
    for r in res:
        m = r.exc_msg or ""
        assert "collective mismatch between rank" in m, \
            f"rank {r.rank}'s error does not name the collective mismatch:\n{_explain(res)}"
        named = {int(x) for x in re.findall(r"\brank (\d+)", m)}
        assert 1 in named and named - {1}, f"rank {r.rank}'s error does not name rank 1 and a rank that " \
                                           f"disagreed with it (names {sorted(named)}):\n{_explain(res)}"
        assert named <= set(range(ws)), f"rank {r.rank}'s error names ranks outside the group: {m}"


@pytest.mark.plait_only
@pytest.mark.timeout(150)
@pytest.mark.parametrize("algo,transport", [("ring", "tcp"), ("tree", "shm"), ("direct", "shm")])
def test_mismatch_forced_config(algo, transport):
    res = _run_error_world(worker_mismatch, 3, "count", dict(algo=algo, transport=transport, chunk_bytes=64))
    _assert_raised_in_bound(res, range(3))
    _assert_every_rank_names_the_mismatch(res, 3)


# ------------------------------------------------------------------------------------------------------------------
# a peer that dies, a peer that never shows up


def _mark_raised(rank):
    open(os.path.join(H.CTX.workdir, f"raised{rank}"), "w").close()


def _wait_raised(ranks, timeout_s):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not all(
            os.path.exists(os.path.join(H.CTX.workdir, f"raised{r}")) for r in ranks):
        time.sleep(0.05)


def _absent_until_others_raised(others):
    """Stay away from the next collective until every rank in `others` has raised (bounded), then leave."""
    _wait_raised(others, PG_TIMEOUT_S + SLACK_S + 10)
    os._exit(0)


def _hold_error_until_survivors_raised(rank, survivors, fn):
    """Run fn; if it raises, keep this process alive until every survivor has raised too (or a deadline), so
    that one survivor exiting does not become another survivor's error; then re-raise."""
    try:
        return fn()
    except BaseException:
        _mark_raised(rank)
        _wait_raised(survivors, PG_TIMEOUT_S + SLACK_S)
        raise


def worker_peer_dies(rank, ws, when, opts):
    g = None
    if opts is not None:
        g = dist.new_group(backend="plait", pg_options=H.make_options(opts))
    survivors = [r for r in range(ws) if r != 1]

    def job():
        if when == "before-first":
            if rank == 1:
                os._exit(1)
            dist.all_reduce(torch.ones(1003), group=g)
        elif when == "mid-job":
            for i in range(5):
                x = torch.ones(1003)
                dist.all_reduce(x, group=g)
            if rank == 1:
                os._exit(1)
            for i in range(5):
                dist.all_reduce(torch.ones(1 << 18), group=g)
        elif when == "mid-collective":
            dist.all_reduce(torch.ones(8), group=g)
            w = dist.all_reduce(torch.ones(1 << 20), group=g, async_op=True)
            if rank == 1:
                os._exit(1)
            w.wait()
            dist.all_reduce(torch.ones(1 << 20), group=g)
        return "survived"

    return _hold_error_until_survivors_raised(rank, survivors, job)


@pytest.mark.timeout(150)
@pytest.mark.parametrize(
    "ws,when,opts",
    [
        (2, "before-first", None),
        (3, "mid-job", None),
        (4, "mid-collective", None),
        (3, "mid-job", dict(algo="ring", transport="tcp", chunk_bytes=4096)),
        (3, "mid-job", dict(algo="tree", transport="shm", chunk_bytes=4096)),
        (3, "mid-collective", dict(algo="direct", transport="shm")),
    ],
)
def test_peer_dies(ws, when, opts):
    if opts is not None and not H.IS_PLAIT:
        pytest.skip("plait-only options")
    before = H.shm_files()
    res = _run_error_world(worker_peer_dies, ws, when, opts)
    dead = res[1]
    assert not dead.reported and dead.returncode == 1, _explain(res)
    survivors = [r for r in range(ws) if r != 1]
    _assert_raised_in_bound(res, survivors)
    if H.IS_PLAIT:
        for r in survivors:
            assert "rank 1" in res[r].exc_msg, f"rank {r}'s error does not name the dead peer:\n{_explain(res)}"
    for r in res:
        assert not r.hung, _explain(res)
    time.sleep(0.5)
    leaked = H.shm_files() - before
    assert not leaked, f"/dev/shm files left after a peer died: {sorted(leaked)}"


def worker_absent_peer(rank, ws):
    dist.all_reduce(torch.ones(4))
    if rank == 1:
        _absent_until_others_raised([0])  # never joins the next collective
    try:
        dist.all_reduce(torch.ones(4))
    finally:
        _mark_raised(rank)
    return "no error"


@pytest.mark.timeout(150)
def test_absent_peer_times_out():
    res = _run_error_world(worker_absent_peer, 2)
    _assert_raised_in_bound(res, [0])
    # raised by the deadline, not because rank 1 eventually left
    assert res[0].elapsed_s < PG_TIMEOUT_S + 15, _explain(res)
    if H.IS_PLAIT:
        assert "rank 1" in res[0].exc_msg, f"timeout error does not name the peer waited for:\n{_explain(res)}"


# ------------------------------------------------------------------------------------------------------------------
# plait.monitored_barrier (torch's dist.monitored_barrier is gloo-only): names the ranks that did not arrive


def worker_monitored_barrier_missing(rank, ws, absent, wait_all):
    import datetime

    import plait

    plait.monitored_barrier(timeout=datetime.timedelta(seconds=30))  # everyone arrives
    if rank in absent:
        _absent_until_others_raised([r for r in range(ws) if r not in absent])
    try:
        plait.monitored_barrier(timeout=datetime.timedelta(seconds=5), wait_all_ranks=wait_all)
    finally:
        _mark_raised(rank)
    return "no error"


@pytest.mark.plait_only
@pytest.mark.timeout(150)
@pytest.mark.parametrize("ws,absent,wait_all", [(3, [2], False), (4, [1, 3], True)])
def test_monitored_barrier_names_missing_ranks(ws, absent, wait_all):
    res = _run_error_world(worker_monitored_barrier_missing, ws, absent, wait_all)
    present = [r for r in range(ws) if r not in absent]
    _assert_raised_in_bound(res, present)
    msg = res[0].exc_msg
    # "plait: monitored_barrier: rank 2 failed to pass the barrier within 5000 ms (seen by rank 0, seq 2)", or
    # "rank(s) 1, 3 failed ..." with wait_all_ranks: exactly the absent ranks (all of them, or the first one), read
    # from the list itself (other numbers in the message, like the sequence number, do not count)
    m = re.search(r"monitored_barrier: rank(?:\(s\))? (\d+(?:, \d+)*) failed to pass the barrier", msg)
    assert m, f"rank 0's monitored_barrier error does not list the missing ranks:\n{_explain(res)}"
    named = [int(x) for x in m.group(1).split(", ")]
    want = sorted(absent) if wait_all else sorted(absent)[:1]
    assert named == want, f"rank 0's monitored_barrier error names ranks {named}, expected {want}:\n{_explain(res)}"
