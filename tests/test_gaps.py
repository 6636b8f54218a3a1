"""Gaps closed in issue 15 (item 6), each with a test that fails without its fix:

- Ranks that disagree on the root of a broadcast (e.g. two ranks that both believe they are the root) raise on every
  rank, at that broadcast, naming the disagreement, on the host engine (shared memory and TCP) and on the device
  engine (PLAIT_DEVICE=emulate), instead of returning different data.
- Device work waiting on a live peer that never calls ends at the group's timeout with an error naming the
  collective, its sequence number and the peer waited on.
- Ranks calling different collectives with equal byte counts on the device engine raise a mismatch error naming
  both collectives (the device descriptors carry the collective), as the host engine's headers do.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

import _harness as H

pytestmark = pytest.mark.skipif(not H.IS_PLAIT, reason="plait's error reporting")

EMULATE = {"PLAIT_DEVICE": "emulate", "PLAIT_DEVICE_BUFFER_BYTES": "4096"}
TCP = {"PLAIT_TRANSPORT": "tcp"}


# ---- broadcast roots ------------------------------------------------------------------------------------------------


def worker_roots(rank, ws, roots, numel):
    t = torch.full((numel,), float(rank + 1))
    dist.all_reduce(torch.ones(1))  # the group is set up; the broadcast below is the second collective
    try:
        dist.broadcast(t, src=roots[rank])
    except Exception as e:  # noqa: BLE001
        return dict(at="broadcast", err=str(e))
    try:
        dist.all_reduce(torch.ones(1))
    except Exception as e:  # noqa: BLE001
        return dict(at="next", err=str(e))
    return dict(at=None, err=None)


# (beliefs of the root per rank, elements, the ranks that must raise at the broadcast itself). With one message per
# rank from its predecessor in rank order, a disagreement is seen by the ranks next to it at the broadcast; ranks
# whose neighbours agree with them finish it and raise at their next collective on the group (peers were told).
ROOT_CASES = [
    ([0, 1], 1, [0, 1]),  # two ranks, each believes it is the root
    ([0, 1], 3000, [0, 1]),  # the same, large enough to be sliced on the emulated device (4 KiB staging)
    ([0, 0, 2], 4, [0, 2]),  # world 3, one rank believes it is the root
    ([0, 0, 0, 3], 4, [0, 3]),  # world 4, one rank believes it is the root
    ([1, 1, 1, 0], 4, [0, 3]),  # world 4, one rank names another root that agrees with the majority
    ([0, 2, 2, 0], 4, [1, 3]),  # two camps
]


@pytest.mark.parametrize("env", [{}, TCP, EMULATE], ids=["shm", "tcp", "emulate"])
@pytest.mark.parametrize("roots,numel,first", ROOT_CASES)
def test_broadcast_root_disagreement_raises_on_every_rank(env, roots, numel, first):
    ws = len(roots)
    res = H.run_world(worker_roots, ws, roots, numel, env=env, expect_fail=True, pg_timeout_s=30, timeout_s=120)
    for r in res:
        assert r.reported and r.ok, r.describe()
    out = [r.value for r in res]
    for rank, v in enumerate(out):
        assert v["err"], f"rank {rank} never raised although the ranks disagree on the root ({roots}): {out}"
        assert "mismatch" in v["err"] and "Timed out" not in v["err"], (rank, v)
        # every message names the disagreement: a broadcast's header with another root than this rank's
        # (or, for a rank that finished the broadcast and raised at its next call: the disagreeing rank's broadcast
        # arrived there first, over TCP, before the abort did; that message names the broadcast it got)
        assert (names_root(v["err"], roots[rank]) or "aborted because peer rank" in v["err"] or
                (v["at"] == "next" and "sent broadcast(seq" in v["err"])), (rank, v)
    for rank in first:
        assert out[rank]["at"] == "broadcast", f"rank {rank} did not raise at the broadcast itself: {out}"
    # The rank that noticed names both beliefs.
    assert any(all(names_root(v["err"], x) for x in set(roots)) for v in out if v["at"] == "broadcast"), out


def names_root(msg, root):
    """The message names `root` as a root: "root 1" (a header) or "the root is 1" / "says 1" (a disagreement)."""
    import re

    return re.search(rf"(root (is )?|says ){root}\b", msg) is not None


def worker_roots_agree(rank, ws, root, numel):
    t = torch.arange(numel, dtype=torch.float32) + (100 if rank == root else 0)
    for _ in range(3):
        dist.broadcast(t, src=root)
    return t[:3].tolist()


@pytest.mark.parametrize("env", [{}, EMULATE], ids=["shm", "emulate"])
@pytest.mark.parametrize("ws", [2, 3, 5])
def test_broadcast_agreeing_roots_still_work(env, ws):
    for root in {0, ws - 1}:
        res = H.run_world(worker_roots_agree, ws, root, 3000, env=env, pg_timeout_s=30, timeout_s=120)
        assert res == [[100.0, 101.0, 102.0]] * ws, res


# ---- device work waiting on a live peer that never calls ------------------------------------------------------------


def worker_never_calls(rank, ws, op):
    from datetime import timedelta

    t = torch.ones(1000)
    dist.all_reduce(t)  # every rank has the device engine up (made under the 60 s timeout of init)
    # the group's timeout from now on (torch's _set_pg_timeout knows only gloo and nccl)
    dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu")).set_timeout(timedelta(seconds=3))
    if rank == 1:
        time.sleep(20)  # alive, but never calls
        return "slept"
    t0 = time.monotonic()
    try:
        if op == "all_reduce":
            dist.all_reduce(t)
        else:
            dist.broadcast(t, src=1)
        err = None
    except Exception as e:  # noqa: BLE001
        err = str(e)
    return dict(err=err, s=time.monotonic() - t0)


@pytest.mark.parametrize("op", ["all_reduce", "broadcast"])
def test_device_wait_on_live_silent_peer_times_out(op):
    import re

    res = H.run_world(worker_never_calls, 2, op, env=EMULATE, expect_fail=True, pg_timeout_s=60, timeout_s=120)
    r0 = res[0]
    assert r0.reported and r0.ok, r0.describe()
    err, s = r0.value["err"], r0.value["s"]
    assert err, "rank 0's device collective returned although its peer never called"
    # the group's timeout as it is now (not as it was when the device engine was made), the collective, its
    # sequence number and the peer waited on
    assert "3000 ms" in err and re.search(rf"{op} seq \d+ \(device\)", err) and "peer rank 1" in err, err
    assert s < 12, f"raised after {s:.1f} s (group timeout 3 s)"


# ---- different collectives with equal byte counts on the device engine ----------------------------------------------


def worker_other_coll(rank, ws, ops):
    n = 8
    op = ops[rank]
    try:
        if op == "all_reduce":  # two-shot: a block of n to and from the peer, as the others exchange
            dist.all_reduce(torch.ones(n * ws))
        elif op == "all_gather":
            dist.all_gather_into_tensor(torch.zeros(n * ws), torch.ones(n))
        elif op == "reduce_scatter":
            dist.reduce_scatter_tensor(torch.zeros(n), torch.ones(n * ws))
    except Exception as e:  # noqa: BLE001
        return str(e)
    return None


@pytest.mark.parametrize(
    "ops", [["all_reduce", "all_gather"], ["all_reduce", "reduce_scatter"], ["all_gather", "reduce_scatter"]]
)
def test_device_different_collectives_equal_bytes_raise(ops):
    res = H.run_world(worker_other_coll, 2, ops, env=EMULATE, expect_fail=True, pg_timeout_s=30, timeout_s=120)
    errs = [r.value if r.ok else r.exc_msg for r in res]
    for rank, e in enumerate(errs):
        # raised by the mismatched collective itself, on every rank
        assert e, f"rank {rank} completed {ops[rank]} although its peer called {ops[1 - rank]}: {errs}"
        assert "collective mismatch" in e, (rank, e)
        assert ops[0] in e and ops[1] in e, (rank, e)
