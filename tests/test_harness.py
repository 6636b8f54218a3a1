"""Self-tests of the launcher: failures, hangs and return values are reported, nothing outlives a test."""

from __future__ import annotations

import os
import time

import pytest

import _harness as H


def worker_value(rank, ws):
    return {"rank": rank, "ws": ws, "ctx_rank": H.CTX.rank}


def worker_raise_on_1(rank, ws):
    if rank == 1:
        raise ValueError("deliberate failure on rank 1")
    return rank


def worker_hang_on_2(rank, ws):
    if rank == 2:
        time.sleep(600)
    return rank


def worker_pid(rank, ws):
    return os.getpid()


@pytest.mark.timeout(60)
def test_return_values():
    assert H.run_world(worker_value, 3, init=None) == [{"rank": r, "ws": 3, "ctx_rank": r} for r in range(3)]


@pytest.mark.timeout(60)
def test_rank_exception_fails_test_with_traceback():
    with pytest.raises(pytest.fail.Exception) as ei:
        H.run_world(worker_raise_on_1, 3, init=None)
    msg = str(ei.value)
    assert "rank 1: raised builtins.ValueError: deliberate failure on rank 1" in msg
    assert "worker_raise_on_1" in msg  # the traceback
    res = H.run_world(worker_raise_on_1, 2, init=None, expect_fail=True)
    assert res[0].ok and res[0].value == 0 and not res[1].ok and "ValueError" in res[1].exc_mro


@pytest.mark.timeout(60)
def test_hang_is_killed_and_reported():
    t0 = time.monotonic()
    with pytest.raises(pytest.fail.Exception) as ei:
        H.run_world(worker_hang_on_2, 3, init=None, timeout_s=8)
    assert time.monotonic() - t0 < 30
    msg = str(ei.value)
    assert "rank 2: HUNG" in msg
    assert "worker_hang_on_2" in msg  # faulthandler's stack of the hung rank


@pytest.mark.timeout(60)
def test_children_are_gone():
    pids = H.run_world(worker_pid, 2, init=None)
    time.sleep(0.2)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
