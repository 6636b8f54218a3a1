"""The device engine on machines without a GPU: PLAIT_DEVICE=emulate puts every collective on CPU tensors through
the same code path as CUDA tensors (plait/device.h): staging buffers that local peers map, descriptors and ready /
ack flags in shared memory, write-after-read waits, sends hoisted ahead of receives, slicing and collective
growth of the staging buffer; with ranks on several (fake) hosts, the path that stages device buffers through host
memory. The emulated device runs each stream operation at once on the calling thread (one valid execution of the
stream's order), so these tests check the protocol and the schedules over it, exactly, against torch references.
The CUDA kernels and stream operations themselves are tested on a GPU (tests/test_gpu.py, test_cuda_kernels.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import _collcheck as C
import _harness as H

pytestmark = pytest.mark.skipif(not H.IS_PLAIT, reason="the device engine is plait's")

COUNTS = [0, 1, 7, 1003, 2500]  # 2500 x 8 B > the 4 KiB staging buffer: several slices, and growth for the others
ALGOS = ["auto", "ring", "tree", "direct"]
EMULATE = {"PLAIT_DEVICE": "emulate", "PLAIT_DEVICE_BUFFER_BYTES": "4096"}


def worker_device(rank, ws, dtypes):
    import plait

    failures, checks, engines = [], 0, {}
    for algo in ALGOS:
        g = dist.new_group(backend="plait", pg_options=plait.Options(algo=algo))
        c = C.Checker(label=f"ws={ws} algo={algo}: ")
        C.check_all_reduce(c, g, rank, ws, dtypes, COUNTS)
        C.check_all_reduce(c, g, rank, ws, [torch.int32], [5, 3001], async_batch=False)
        C.check_all_reduce_coalesced(c, g, rank, ws, dtypes[:2], [1, 7, 0, 1003])
        if algo in ("auto", "ring"):  # the other collectives pick their schedule from the group's algo
            C.check_other_collectives(c, g, rank, ws, dtypes[:3], COUNTS)
        engines[algo] = plait.topology(g)["device_engine"]
        failures += c.failures
        checks += c.checks
    return dict(failures=failures, checks=checks, engines=engines)


@pytest.mark.parametrize("ws", [1, 2, 3, 4])
def test_device_engine_all_collectives(ws):
    dts = C.ALL_DTYPES if ws in (2, 3) else [torch.float32, torch.int64, torch.bfloat16, torch.uint8]
    res = H.run_world(worker_device, ws, dts, env=EMULATE, timeout_s=600)
    for v in res:
        assert v["failures"] == [], v["failures"][:10]
        assert v["checks"] > 100
        want = "emulated" if ws > 1 else ""
        assert set(v["engines"].values()) <= {want, "emulated"}, v["engines"]
        if ws > 1:
            assert set(v["engines"].values()) == {"emulated"}


@pytest.mark.parametrize("layout", [(0, 0, 1), (0, 1, 0, 1)], ids=lambda l: "hosts" + "".join(map(str, l)))
def test_device_buffers_across_hosts_stage_through_host_memory(layout):
    env = {r: {"PLAIT_HOST_ID": f"fakehost{h}"} for r, h in enumerate(layout)}
    res = H.run_world(worker_device, len(layout), [torch.float32, torch.int64, torch.float16], env=EMULATE,
                      rank_env=env, timeout_s=600)
    for v in res:
        assert v["failures"] == [], v["failures"][:10]
        assert set(v["engines"].values()) == {"emulated via host"}, v["engines"]


def worker_mismatch(rank, ws):
    t = torch.ones(10 + 3 * rank)
    dist.all_reduce(t)
    dist.all_reduce(torch.ones(4))  # a mismatch flagged by the device surfaces here at the latest
    return "no error"


def test_device_size_mismatch_is_loud():
    res = H.run_world(worker_mismatch, 2, env=EMULATE, expect_fail=True, pg_timeout_s=30, timeout_s=120)
    # every rank raises (not only the first to notice), naming the size disagreement and the peer
    for r in res:
        assert r.reported and not r.ok, f"rank {r.rank}: {r.describe()}"
        assert "different number of bytes" in (r.exc_msg or ""), [x.exc_msg for x in res]
        assert "peer rank" in (r.exc_msg or ""), r.exc_msg


def worker_plan(rank, ws):
    import plait

    dist.all_reduce(torch.zeros(1))
    return {n: plait.plan_allreduce(n, device=True) for n in (4, 1 << 12, 1 << 20, 1 << 28)}


def test_device_cost_model_is_consistent_and_named():
    res = H.run_world(worker_plan, 4, timeout_s=120)
    plans = res
    assert all(p == plans[0] for p in plans), "ranks disagree on the device plan"
    for n, (algo, one_shot, us, why) in plans[0].items():
        assert algo in ("ring", "tree", "direct"), algo
        assert us > 0 and "device engine" in why, why
    assert plans[0][1 << 28][0] in ("ring", "direct") and not plans[0][1 << 28][1], "large: not one-shot"


def worker_dead_peer(rank, ws):
    import os

    t = torch.ones(1000)
    dist.all_reduce(t)
    if rank == ws - 1:
        os._exit(0)  # gone without a word, while the others wait for it on device flags
    dist.all_reduce(t)
    return "no error"


def test_device_dead_peer_is_loud():
    res = H.run_world(worker_dead_peer, 3, env=EMULATE, expect_fail=True, pg_timeout_s=60, timeout_s=120)
    for r in res[:-1]:
        assert not r.ok, "a survivor finished a collective with a dead peer"
        assert "rank 2" in (r.exc_msg or ""), r.exc_msg
