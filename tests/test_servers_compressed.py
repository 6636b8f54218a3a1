"""Summation servers with the compressed all-reduce (README "Summation servers", "Compressed all-reduce"): with
the whole buffer through the servers the result must equal, bit for bit, a single-process reference built from
plait's own codec (each worker quantizes its part once, the server sums the decoded parts in worker order in float32
and quantizes the sum once); with a split, every rank must get the same bits and the error must stay within the
codec's usual bound."""

from __future__ import annotations

import pytest

from _harness import free_port, run_world
from test_servers import fake_hosts, servers

pytestmark = pytest.mark.plait_only

N = 50_001
K = 2


def _inputs(world, dtype):
    import torch

    return [(torch.randn(N, generator=torch.Generator().manual_seed(100 + r)) * (r + 1)).to(dtype)
            for r in range(world)]


def _parts(count, k):
    base, extra = divmod(count, k)
    out, off = [], 0
    for j in range(k):
        n = base + (1 if j < extra else 0)
        out.append((off, n))
        off += n
    return out


def _reference(world, dtype, codec, average):
    """What the servers compute for the whole buffer: per server part, every worker's values (divided by the world
    size for AVG) quantized once, decoded and summed in worker order in float32, the sum quantized once."""
    import torch

    from plait import _C

    xs = _inputs(world, dtype)
    out = torch.empty(N, dtype=dtype)
    for off, n in _parts(N, K):
        acc = torch.zeros(n, dtype=torch.float32)
        for x in xs:
            enc = _C.codec_encode(codec, 0, x[off:off + n].contiguous(), float(world) if average else 1.0)
            acc = acc + _C.codec_decode(codec, 0, enc, n, torch.float32)
        out[off:off + n] = _C.codec_decode(codec, 0, _C.codec_encode(codec, 0, acc, 1.0), n, dtype)
    return out


def w_compressed(rank, world, cases):
    import torch
    import torch.distributed as dist

    import plait

    out = []
    for dtype_name, codec, average in cases:
        dtype = getattr(torch, dtype_name)
        before = plait.topology()["servers"]
        x = _inputs(world, dtype)[rank].clone()
        plait.all_reduce(x, op=dist.ReduceOp.AVG if average else dist.ReduceOp.SUM, compression=codec)
        t = plait.topology()["servers"]
        raw = x.view(torch.int16) if x.element_size() == 2 else x.view(torch.int32)
        out.append((raw.clone(), t["server_bytes"] - before["server_bytes"], t["worker_bytes"] - before["worker_bytes"]))
    return out


CASES = [("float32", "int8", False), ("float32", "int4", True), ("bfloat16", "fp8", False), ("float16", "bf16", True)]


def test_whole_buffer_matches_reference(tmp_path):
    import torch

    world = 3
    port = free_port()
    env = {"PLAIT_SERVERS": str(K), "PLAIT_SERVER_SHARE": "1", "PLAIT_SERVER_GBPS": "10",
           "PLAIT_SERVER_SEGMENT_BYTES": "8192"}
    with servers(port, K, tmp_path):
        res = run_world(w_compressed, world, CASES, init="tcp", port=port, env=env, rank_env=fake_hosts(world),
                        timeout_s=180)
    for i, (dtype, codec, average) in enumerate(CASES):
        ref = _reference(world, getattr(torch, dtype), codec, average)
        ref_raw = ref.view(torch.int16) if ref.element_size() == 2 else ref.view(torch.int32)
        for rank_out in res:
            raw, server_bytes, worker_bytes = rank_out[i]
            assert torch.equal(raw, ref_raw), (codec, dtype, int((raw != ref_raw).sum()))
            assert server_bytes == N * torch.empty((), dtype=getattr(torch, dtype)).element_size()
            assert worker_bytes == 0


@pytest.mark.parametrize("per_host", [1, 2])
def test_split_identical_and_close(tmp_path, per_host):
    import torch

    world = 4
    port = free_port()
    env = {"PLAIT_SERVERS": str(K), "PLAIT_SERVER_SHARE": "0.5", "PLAIT_SERVER_GBPS": "10",
           "PLAIT_SERVER_SEGMENT_BYTES": "8192"}
    with servers(port, K, tmp_path):
        res = run_world(w_compressed, world, [("float32", "int8", False)], init="tcp", port=port, env=env,
                        rank_env=fake_hosts(world, per_host), timeout_s=180)
    res = [r[0] for r in res]
    assert all(torch.equal(r[0], res[0][0]) for r in res)
    got = res[0][0].view(torch.float32)
    exact = sum(x.double() for x in _inputs(world, torch.float32))
    vnmse = float(((got.double() - exact) ** 2).sum() / (exact ** 2).sum())
    assert vnmse < 1e-3, vnmse
    assert all(r[1] > 0 and r[2] > 0 for r in res)


def w_avg_fp16_two_per_host(rank, world):
    import torch
    import torch.distributed as dist

    import plait

    # Values near float16's limit: a host sum (2 ranks) would overflow if the division came after it.
    x = torch.full((20_003,), 30000.0 - 7 * rank, dtype=torch.float16)
    plait.all_reduce(x, op=dist.ReduceOp.AVG, compression="int8")
    return x.view(torch.int16).clone(), bool(torch.isfinite(x).all()), float(x.float().mean())


def test_avg_two_per_host_no_overflow(tmp_path):
    import torch

    world = 4
    port = free_port()
    env = {"PLAIT_SERVERS": str(K), "PLAIT_SERVER_SHARE": "0.5", "PLAIT_SERVER_GBPS": "10",
           "PLAIT_SERVER_SEGMENT_BYTES": "8192"}
    with servers(port, K, tmp_path):
        res = run_world(w_avg_fp16_two_per_host, world, init="tcp", port=port, env=env,
                        rank_env=fake_hosts(world, 2), timeout_s=180)
    assert all(torch.equal(r[0], res[0][0]) for r in res)
    want = sum(30000.0 - 7 * r for r in range(world)) / world
    for raw, finite, mean in res:
        assert finite
        assert abs(mean - want) / want < 2e-2, (mean, want)
