"""plait's CPU reduction kernels (``plait._C.reduce(op, dst, src)``: dst = dst op src, in place) against torch.

Sizes straddle every plausible vector width (8/16/32/64 lanes) and the tails after them; unaligned views (offset
by one element) exercise unaligned loads and stores. fp16 / bf16 are computed in float32 and rounded once.
Single process, no process group.
"""

from __future__ import annotations

import zlib

import pytest
import torch

import _harness as H

SIZES = [0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 1000, 4099, 65537]
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
INTS = [torch.int8, torch.uint8, torch.int32, torch.int64]


def _kernels():
    if not H.IS_PLAIT:
        pytest.skip(f"kernel tests need plait (backend under test is {H.BACKEND})")
    try:
        import plait._C as C
    except ImportError as e:
        pytest.skip(f"plait._C not importable: {e}")
    if not hasattr(C, "reduce"):
        pytest.skip("plait._C exposes no `reduce` kernel entry point")
    return C


def _rand(dtype, n, op, g):
    if dtype == torch.bool:
        return torch.randint(0, 2, (n,), generator=g).bool()
    if dtype.is_floating_point:
        if op == "prod":
            x = torch.rand(n, generator=g, dtype=torch.float64) * 4 - 2
        else:
            x = torch.randn(n, generator=g, dtype=torch.float64) * 100
        return x.to(dtype)
    info = torch.iinfo(dtype)
    if op == "sum":  # no overflow: stay within half the range
        lo, hi = max(info.min // 2, -(1 << 40)), min(info.max // 2, 1 << 40)
    elif op == "prod":  # no overflow
        lo, hi = (-11, 12) if info.min < 0 else (0, 16)
        if dtype in (torch.int32, torch.int64):
            lo, hi = (-40000, 40000)
    else:
        lo, hi = max(info.min, -(1 << 40)), min(info.max, 1 << 40)
    return torch.randint(lo, hi, (n,), generator=g, dtype=torch.int64).to(dtype)


def _expected(op, a, b):
    dt = a.dtype
    if dt in (torch.float16, torch.bfloat16):
        a, b = a.float(), b.float()
    if op == "sum":
        r = a + b if dt != torch.bool else (a | b)
    elif op == "prod":
        r = a * b if dt != torch.bool else (a & b)
    elif op == "min":
        r = torch.minimum(a, b)
    elif op == "max":
        r = torch.maximum(a, b)
    elif op == "band":
        r = a & b
    elif op == "bor":
        r = a | b
    elif op == "bxor":
        r = a ^ b
    return r.to(dt)


def _ops_for(dt):
    if dt == torch.bool:
        return ["min", "max"]
    ops = ["sum", "prod", "min", "max"]
    return ops


@pytest.mark.parametrize("dtype", FLOATS + INTS + [torch.bool], ids=lambda d: str(d).replace("torch.", ""))
def test_reduce_kernel(dtype):
    C = _kernels()
    failures = []
    for op in _ops_for(dtype):
        for n in SIZES:
            for offset in (0, 1):
                g = torch.Generator().manual_seed(zlib.crc32(repr((op, n, offset, str(dtype))).encode()))
                a_full = _rand(dtype, n + offset, op, g)
                b_full = _rand(dtype, n + offset, op, g)
                a = a_full[offset:]
                b = b_full[offset:]
                exp = _expected(op, a, b)
                dst_full = a_full.clone()
                dst = dst_full[offset:]  # offset 1: an unaligned view
                src_before = b.clone()
                out = C.reduce(op, dst, b)
                if out is not None and isinstance(out, torch.Tensor):
                    assert out.data_ptr() == dst.data_ptr() or n == 0
                if not torch.equal(dst, exp):
                    bad = (dst != exp).nonzero().reshape(-1)
                    i = int(bad[0])
                    failures.append(f"{op} {dtype} n={n} offset={offset}: {bad.numel()} wrong, first [{i}]: "
                                    f"{a[i].item()} {op} {b[i].item()} -> {dst[i].item()}, expected {exp[i].item()}")
                if not torch.equal(b, src_before):
                    failures.append(f"{op} {dtype} n={n}: src modified")
                if offset == 1 and not torch.equal(dst_full[:1], a_full[:1]):
                    failures.append(f"{op} {dtype} n={n}: wrote before the start of an unaligned dst")
    assert not failures, "\n".join(failures[:30])


def test_reduce_kernel_does_not_write_out_of_bounds():
    C = _kernels()
    for dtype in FLOATS + INTS:
        for n in [1, 7, 17, 33, 65, 129]:
            buf = torch.full((n + 64,), 3, dtype=dtype)
            dst = buf[32:32 + n]
            src = torch.full((n,), 2, dtype=dtype)
            C.reduce("sum", dst, src)
            assert torch.equal(dst, torch.full((n,), 5, dtype=dtype)), (dtype, n, dst)
            assert torch.equal(buf[:32], torch.full((32,), 3, dtype=dtype)), f"{dtype} n={n}: wrote before dst"
            assert torch.equal(buf[32 + n:], torch.full((32,), 3, dtype=dtype)), f"{dtype} n={n}: wrote after dst"


@pytest.mark.parametrize("dtype", INTS, ids=lambda d: str(d).replace("torch.", ""))
def test_bitwise_kernels(dtype):
    C = _kernels()
    g = torch.Generator().manual_seed(7)
    for op in ["band", "bor", "bxor"]:
        for n in [1, 31, 33, 1000]:
            a = _rand(dtype, n, "max", g)
            b = _rand(dtype, n, "max", g)
            dst = a.clone()
            C.reduce(op, dst, b)
            assert torch.equal(dst, _expected(op, a, b)), (op, dtype, n)


def test_half_special_values():
    """Infinities and signed zeros survive fp16 / bf16 / fp32 sum, min and max."""
    C = _kernels()
    for dtype in [torch.float16, torch.bfloat16, torch.float32]:
        a = torch.tensor([float("inf"), -float("inf"), 0.0, -0.0, 1.0, 65504.0 if dtype == torch.float16 else 3e38] * 7,
                         dtype=dtype)
        b = torch.tensor([1.0, 1.0, -0.0, -0.0, -1.0, 1.0] * 7, dtype=dtype)
        for op in ["sum", "min", "max"]:
            dst = a.clone()
            C.reduce(op, dst, b)
            exp = _expected(op, a, b)
            assert torch.equal(dst, exp), (dtype, op, dst, exp)


def test_unknown_op_and_mismatched_args_raise():
    C = _kernels()
    with pytest.raises((ValueError, RuntimeError, TypeError)):
        C.reduce("bogus", torch.ones(4), torch.ones(4))
    with pytest.raises((ValueError, RuntimeError, TypeError)):
        C.reduce("sum", torch.ones(4), torch.ones(5))
    with pytest.raises((ValueError, RuntimeError, TypeError)):
        C.reduce("sum", torch.ones(4), torch.ones(4, dtype=torch.float64))


def test_large_threaded_reduce():
    """Big buffers may be split across threads (PLAIT_THREADS): result must still be exact."""
    C = _kernels()
    n = (1 << 22) + 13
    a = torch.arange(n, dtype=torch.int64) % 1000
    b = (torch.arange(n, dtype=torch.int64) * 7) % 1000
    dst = a.clone()
    C.reduce("sum", dst, b)
    assert torch.equal(dst, a + b)
    af = a.to(torch.float32)
    dst = af.clone()
    C.reduce("max", dst, b.to(torch.float32))
    assert torch.equal(dst, torch.maximum(af, b.to(torch.float32)))
