"""plait's CPU reduction kernels (``plait._C.reduce(op, dst, src, threads=1)``: dst = dst op src, in place) against
torch.

Sizes straddle every plausible vector width (8/16/32/64 lanes) and the tails after them; unaligned views (offset
by one element) exercise unaligned loads and stores. fp16 / bf16 are computed in float32 and rounded once.
Single process, no process group.

Both implementations run: the kernels are chosen once per process (AVX2/F16C when the CPU has them, else scalar;
``PLAIT_KERNELS=scalar`` forces scalar), so ``test_whole_file_on_the_scalar_path`` runs this file again in a child
process with ``PLAIT_KERNELS=scalar``, and ``test_scalar_and_avx2_paths_agree_bitwise`` compares the two paths bit
for bit (NaN payloads, infinities, denormals included). Floating-point kernels run in a fixed IEEE mode whatever the
calling thread's MXCSR says: ``test_denormals_exact_when_the_caller_flushes_denormals``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import zlib

import pytest
import torch

import _harness as H

KNOB = os.environ.get("PLAIT_KERNELS", "auto")
# Tests that start a child process with PLAIT_KERNELS=scalar; deselected inside that child (no recursion).
spawns_child = pytest.mark.kernel_child

SIZES = [0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 1000, 4099, 65537]
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
INTS = [torch.int8, torch.uint8, torch.int32, torch.int64]


def _kernels():
    if not H.IS_PLAIT:
        pytest.skip(f"kernel tests need plait (backend under test is {H.BACKEND})")
    try:
        import plait._C as C
    except ImportError as e:
        pytest.fail(f"plait._C not importable: {e}", pytrace=False)
    for name in ("reduce", "kernel_isa"):
        if not hasattr(C, name):
            pytest.fail(f"plait._C exposes no `{name}` kernel entry point", pytrace=False)
    return C


def _cpu_has_avx2_path() -> bool:
    """What reduce.cc checks: AVX2, F16C and FMA (read from /proc/cpuinfo, independently of plait)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return {"avx2", "f16c", "fma"} <= set(flags)


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


@pytest.mark.parametrize("threads", [1, 3])
def test_large_threaded_reduce(threads):
    """Big buffers are split across the calling thread and helper threads: the result must still be exact."""
    C = _kernels()
    n = (1 << 22) + 13
    a = torch.arange(n, dtype=torch.int64) % 1000
    b = (torch.arange(n, dtype=torch.int64) * 7) % 1000
    dst = a.clone()
    C.reduce("sum", dst, b, threads=threads)
    assert torch.equal(dst, a + b)
    af = a.to(torch.float32)
    dst = af.clone()
    C.reduce("max", dst, b.to(torch.float32), threads=threads)
    assert torch.equal(dst, torch.maximum(af, b.to(torch.float32)))
    hb = b.to(torch.float16)
    dst = a.to(torch.float16)
    C.reduce("sum", dst, hb, threads=threads)
    assert torch.equal(dst, (a + b).to(torch.float16))  # integers below 2048 are exact in fp16
    with pytest.raises(RuntimeError, match="threads must be >= 1"):
        C.reduce("sum", dst, hb, threads=0)


# ---- which implementation runs ---------------------------------------------------------------------------------

def test_kernel_isa_follows_the_cpu_and_the_knob():
    C = _kernels()
    if KNOB == "scalar":
        want = "scalar"
    else:
        want = "avx2" if _cpu_has_avx2_path() else "scalar"
    assert C.kernel_isa() == want, f"PLAIT_KERNELS={KNOB}, AVX2 path available: {_cpu_has_avx2_path()}"


def _child_env(**extra):
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


@spawns_child
@pytest.mark.timeout(900)
def test_whole_file_on_the_scalar_path():
    """Knobs are read once per process: run every other test of this file in a child with PLAIT_KERNELS=scalar."""
    _kernels()
    here = os.path.abspath(__file__)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", here, "-q", "-rs", "-p", "no:cacheprovider", "-m", "not kernel_child"],
        env=_child_env(PLAIT_KERNELS="scalar"), cwd=os.path.dirname(here), capture_output=True, text=True,
        timeout=850)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"test_kernels.py under PLAIT_KERNELS=scalar failed (rc {proc.returncode}):\n" \
                                 f"{out[-6000:]}"
    summary = out.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary) and "skipped" not in summary and "deselected" in summary, \
        f"unexpected summary of the scalar run: {summary!r}\n{out[-3000:]}"


_BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
         torch.bfloat16: torch.int16}


def _special_inputs(dtype, n, g):
    """Random values mixed with NaNs of random payloads and signs (quiet and signalling), infinities, signed zeros
    and denormals, as raw bit patterns of `dtype`."""
    bits = _BITS[dtype]
    x = (torch.randn(n, generator=g, dtype=torch.float64) * 100).to(dtype).view(bits).clone()
    kind = torch.randint(0, 8, (n,), generator=g)
    nbits = {torch.float32: 32, torch.float64: 64, torch.float16: 16, torch.bfloat16: 16}[dtype]
    man_bits = {torch.float32: 23, torch.float64: 52, torch.float16: 10, torch.bfloat16: 7}[dtype]
    exp_all = ((1 << (nbits - 1 - man_bits)) - 1) << man_bits  # exponent all ones
    sign = 1 << (nbits - 1) if nbits < 64 else -(1 << 63)
    rnd = torch.randint(0, 1 << min(man_bits, 40), (n,), generator=g, dtype=torch.int64)
    quiet = torch.randint(0, 2, (n,), generator=g, dtype=torch.int64) << (man_bits - 1)
    payload = (rnd % ((1 << man_bits) - 1) + 1) | quiet  # nonzero mantissa: a NaN (signalling without `quiet`)
    signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.int64) * sign
    nan = signs | exp_all | payload
    inf = signs | exp_all
    denorm = signs | (rnd % ((1 << man_bits) - 1) + 1)
    zero = signs
    as_int = x.to(torch.int64) & ((1 << nbits) - 1) if nbits < 64 else x.to(torch.int64)
    picked = torch.where(kind == 0, nan, torch.where(kind == 1, inf, torch.where(kind == 2, denorm,
                         torch.where(kind == 3, zero, as_int))))
    if nbits < 64:  # back to the signed integer view of the same bits
        picked = torch.where(picked >= (1 << (nbits - 1)), picked - (1 << nbits), picked)
    return picked.to(bits).view(dtype)


_AGREE_SIZES = [1, 7, 8, 9, 31, 33, 1000]


def _special_cases():
    cases = []
    for dtype in [torch.float32, torch.float64, torch.float16, torch.bfloat16]:
        for op in ["sum", "prod", "min", "max"]:
            for n in _AGREE_SIZES:
                g = torch.Generator().manual_seed(zlib.crc32(repr(("special", str(dtype), op, n)).encode()))
                cases.append((op, dtype, n, _special_inputs(dtype, n, g), _special_inputs(dtype, n, g)))
    return cases


def _run_cases(C, cases):
    out = []
    for op, dtype, n, a, b in cases:
        dst = a.clone()
        C.reduce(op, dst, b)
        out.append(dst.view(_BITS[dtype]).clone())
    return out


@spawns_child
@pytest.mark.timeout(300)
def test_scalar_and_avx2_paths_agree_bitwise():
    """Every float op on data full of NaNs (random payloads, quiet and signalling, both signs), infinities, signed
    zeros and denormals: the AVX2/F16C kernels (this process) and the scalar kernels (a child with
    PLAIT_KERNELS=scalar) produce the same bits, NaN payloads included, in vector bodies and tails alike."""
    C = _kernels()
    if C.kernel_isa() != "avx2":
        pytest.skip(f"this process runs the {C.kernel_isa()} kernels (no AVX2/F16C/FMA here, or "
                    f"PLAIT_KERNELS={KNOB}): there is no second implementation to compare with")
    cases = _special_cases()
    with tempfile.TemporaryDirectory(prefix="plait_kernels_") as d:
        path = os.path.join(d, "cases.pt")
        torch.save(cases, path)
        code = ("import sys, torch, plait._C as C\n"
                "assert C.kernel_isa() == 'scalar', C.kernel_isa()\n"
                "cases = torch.load(sys.argv[1])\n"
                "out = []\n"
                "for op, dt, n, a, b in cases:\n"
                "    dst = a.clone(); C.reduce(op, dst, b); out.append(dst)\n"
                "torch.save(out, sys.argv[2])\n")
        res = subprocess.run([sys.executable, "-c", code, path, path + ".out"], env=_child_env(PLAIT_KERNELS="scalar"),
                             capture_output=True, text=True, timeout=240)
        assert res.returncode == 0, res.stdout + res.stderr
        scalar = torch.load(path + ".out")
    mine = _run_cases(C, cases)
    failures = []
    for (op, dtype, n, a, b), got, ref in zip(cases, mine, scalar):
        ref = ref.view(_BITS[dtype])
        if not torch.equal(got, ref):
            i = int((got != ref).nonzero()[0])
            ab, bb = a.view(_BITS[dtype]), b.view(_BITS[dtype])
            failures.append(f"{op} {dtype} n={n}: [{i}] {int(ab[i]):#x} {op} {int(bb[i]):#x}: avx2 {int(got[i]):#x}, "
                            f"scalar {int(ref[i]):#x}")
    assert not failures, "\n".join(failures[:30])


def _nan_halves(dtype):
    """Every NaN bit pattern of a 16-bit float type, as int16 bits: (sign, exponent all ones, nonzero mantissa)."""
    man_bits = 10 if dtype == torch.float16 else 7
    exp_all = ((1 << (15 - man_bits)) - 1) << man_bits
    man = torch.arange(1, 1 << man_bits, dtype=torch.int64)
    u = torch.cat([exp_all | man, 0x8000 | exp_all | man])
    return torch.where(u >= 0x8000, u - 0x10000, u).to(torch.int16), man_bits


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d).replace("torch.", ""))
def test_half_nan_payloads_survive_as_f16c_converts_them(dtype):
    """NaN + 1, 1 + NaN, NaN * 1, max(NaN, x): the NaN's sign and payload come through, made quiet (the top mantissa
    bit set), exactly as F16C converts (VCVTPH2PS / VCVTPS2PH), whichever implementation runs and whether the element
    falls in a vector body or a tail (the counts are not multiples of 8)."""
    C = _kernels()
    nans, man_bits = _nan_halves(dtype)
    quiet = 1 << (man_bits - 1)
    want = nans | quiet
    one = torch.ones(nans.numel(), dtype=dtype)
    for n in [nans.numel(), nans.numel() - 5, 13, 1]:
        x, w, o = nans[:n].view(dtype), want[:n], one[:n]
        for op, first_nan in [("sum", True), ("sum", False), ("prod", True), ("max", True), ("min", True)]:
            dst = x.clone() if first_nan else o.clone()
            C.reduce(op, dst, o if first_nan else x)
            got = dst.view(torch.int16)
            if not torch.equal(got, w):
                i = int((got != w).nonzero()[0])
                raise AssertionError(f"{op} {dtype} n={n} NaN {'first' if first_nan else 'second'}: "
                                     f"{int(x.view(torch.int16)[i]) & 0xffff:#06x} -> {int(got[i]) & 0xffff:#06x}, "
                                     f"expected {int(w[i]) & 0xffff:#06x} ({C.kernel_isa()} kernels)")


# ---- floating-point mode ---------------------------------------------------------------------------------------

def _denormal_cases():
    """(dtype, a, b, exact a+b, min, max, a*2^k and 2^k): a and b denormal (integer multiples of the smallest
    denormal), computed before any flushing mode is set. Half types reduce in float32: bf16 denormals are float32
    denormals; fp16 ones are normal in float32 but exercise the conversions."""
    out = []
    lowest = {torch.float32: -149, torch.float64: -1074, torch.bfloat16: -133, torch.float16: -24}
    span = {torch.float32: 1 << 20, torch.float64: 1 << 40, torch.bfloat16: 1 << 6, torch.float16: 1 << 9}
    for dtype in [torch.float32, torch.float64, torch.bfloat16, torch.float16]:
        g = torch.Generator().manual_seed(zlib.crc32(str(dtype).encode()))
        k = span[dtype]
        n = (1 << 19) + 7 if dtype in (torch.float32, torch.float64) else 4099  # float32/64: > 1 MiB, threads
        ka = torch.randint(-k, k, (n,), generator=g, dtype=torch.int64)
        kb = torch.randint(-k, k, (n,), generator=g, dtype=torch.int64)
        scale = 2.0 ** lowest[dtype]
        a = (ka.to(torch.float64) * scale).to(dtype)
        b = (kb.to(torch.float64) * scale).to(dtype)
        ref = {"sum": ((ka + kb).to(torch.float64) * scale).to(dtype),
               "min": (torch.minimum(ka, kb).to(torch.float64) * scale).to(dtype),
               "max": (torch.maximum(ka, kb).to(torch.float64) * scale).to(dtype)}
        two = torch.full((n,), 2.0 ** 3, dtype=dtype)
        ref["prod"] = ((ka * 8).to(torch.float64) * scale).to(dtype)
        assert int((a != 0).sum()) > n // 2
        out.append((dtype, a, b, two, ref))
    return out


def _caller_flushes():
    """True when this thread currently flushes denormals (DAZ): a denormal times one reads as zero."""
    x = torch.tensor([2.0 ** -140], dtype=torch.float32)
    return float((x * 1.0)[0]) == 0.0


@pytest.mark.parametrize("threads", [1, 3])
def test_denormals_exact_when_the_caller_flushes_denormals(threads):
    """torch.set_flush_denormal(True) sets FTZ/DAZ on the calling thread only; plait's kernels must still compute
    in IEEE mode (exact denormal results) on this thread and on helper threads, and leave the caller's mode as
    it was."""
    C = _kernels()
    cases = _denormal_cases()
    failures = []
    if not torch.set_flush_denormal(True):
        pytest.fail("torch.set_flush_denormal(True) is not supported on this CPU (x86 with SSE3 expected)",
                    pytrace=False)
    try:
        assert _caller_flushes(), "set_flush_denormal(True) did not make this thread flush denormals"
        for dtype, a, b, two, ref in cases:
            for op in ["sum", "min", "max", "prod"]:
                dst = a.clone()
                C.reduce(op, dst, two if op == "prod" else b, threads=threads)
                bits = _BITS[dtype]
                if not torch.equal(dst.view(bits), ref[op].view(bits)):
                    i = int((dst.view(bits) != ref[op].view(bits)).nonzero()[0])
                    failures.append(f"{op} {dtype} n={a.numel()}: {int((dst.view(bits) != ref[op].view(bits)).sum())}"
                                    f" wrong, first [{i}]: bits {int(dst.view(bits)[i]):#x}, "
                                    f"expected {int(ref[op].view(bits)[i]):#x}")
        still = _caller_flushes()
    finally:
        torch.set_flush_denormal(False)
    assert not failures, "\n".join(failures[:20])
    assert still, "the kernel call did not restore the caller's flush-denormal mode"
