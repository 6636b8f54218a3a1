"""plait's CUDA kernels through their raw-pointer entry points, against torch on the GPU and, bit for bit, against
plait's own CPU kernel (``plait._C.reduce``) on the same data:

- ``cuda_reduce(op, dtype, dst_ptr, a_ptr, b_ptr, n, stream)``: every op x dtype the CPU supports, at sizes that
  straddle the 16-byte vector (0, 1, 3, 7, 8, 15, 17, 33, 1023, 4097, 2**20 + 3), with dst separate, aliasing a,
  aliasing b, all three shifted by one element (the peeled-head path) and shifted by different amounts (the scalar
  path); guard elements around every buffer must survive.
- ``cuda_copy(dst_ptr, src_ptr, nbytes, stream)``: byte counts and byte offsets of every alignment class.
- ``cuda_pull(...)``: the descriptor {offset, bytes} lives in a small CUDA int64 tensor read by the kernel; a length
  mismatch writes nothing and sets the error word once.

Half types: the reference is torch computing in float32, rounded once. Integer data spans the whole range, so sums
and products wrap. The data has no NaN (the NaN bit patterns of fp16 / bf16 rounding are not part of the contract).
Every test but the last is marked ``gpu`` and skipped without a CUDA device.
"""

from __future__ import annotations

import zlib

import pytest
import torch

import _harness as H

gpu = pytest.mark.gpu

SIZES = [0, 1, 3, 7, 8, 15, 17, 33, 1023, 4097, (1 << 20) + 3]
NAMES = {
    torch.float32: "float32", torch.float64: "float64", torch.float16: "float16", torch.bfloat16: "bfloat16",
    torch.int8: "int8", torch.uint8: "uint8", torch.int32: "int32", torch.int64: "int64", torch.bool: "bool",
}
DTYPES = list(NAMES)
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
ARITH_OPS = ["sum", "prod", "min", "max"]
BIT_OPS = ["band", "bor", "bxor"]
# Integer views with the same element size, for bitwise comparison (-0.0 vs 0.0 included).
BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
        torch.bfloat16: torch.int16, torch.bool: torch.uint8}
GUARD = 16  # elements (or bytes) of guard on each side of every buffer a kernel writes


def _ids(d):
    return str(d).replace("torch.", "")


def _kernels():
    if not H.IS_PLAIT:
        pytest.skip(f"CUDA kernel tests need plait (backend under test is {H.BACKEND})")
    try:
        import plait._C as C
    except ImportError as e:
        pytest.fail(f"plait._C not importable: {e}", pytrace=False)
    _require_entry_points(C)
    if not C.cuda_compiled():
        pytest.fail("torch sees a CUDA device but plait was built without CUDA kernels (nvcc not found at build "
                    "time): rebuild on this machine with the CUDA toolkit on PATH", pytrace=False)
    if C.cuda_device_count() == 0:
        pytest.fail("torch sees a CUDA device but plait's CUDA runtime sees none: plait links the CUDA runtime of the "
                    "toolkit it was built with (statically), and the driver may be too old for it (nvidia-smi shows "
                    "the driver's CUDA version)", pytrace=False)
    return C


ENTRY_POINTS = ("reduce", "cuda_reduce", "cuda_copy", "cuda_pull", "cuda_sm_count", "cuda_compiled",
                "cuda_device_count")


def _require_entry_points(C):
    missing = [name for name in ENTRY_POINTS if not hasattr(C, name)]
    if missing:
        pytest.fail(f"plait._C lacks the kernel entry point(s) {missing}", pytrace=False)


def _ops_for(dt):
    return ARITH_OPS + BIT_OPS if not dt.is_floating_point else ARITH_OPS


def _bits(t):
    return t.view(BITS.get(t.dtype, t.dtype))


def _stream():
    return torch.cuda.current_stream().cuda_stream


def _rand(dtype, n, op, g):
    """CPU data: floats of moderate range (prod: small, so products stay finite), integers over their whole range."""
    if dtype == torch.bool:
        return torch.randint(0, 2, (n,), generator=g).bool()
    if dtype.is_floating_point:
        x = torch.rand(n, generator=g, dtype=torch.float64) * 4 - 2 if op == "prod" else \
            torch.randn(n, generator=g, dtype=torch.float64) * 100
        return x.to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, (n,), generator=g, dtype=torch.int64).to(dtype)


def _torch_ref(op, a, b):
    """a (op) b by torch on a's device; fp16 / bf16 computed in float32 and rounded once."""
    dt = a.dtype
    if dt in (torch.float16, torch.bfloat16):
        a, b = a.float(), b.float()
    if dt == torch.bool:
        r = {"sum": a | b, "max": a | b, "bor": a | b, "prod": a & b, "min": a & b, "band": a & b, "bxor": a ^ b}[op]
    elif op == "sum":
        r = a + b
    elif op == "prod":
        r = a * b
    elif op == "min":
        r = torch.minimum(a, b)
    elif op == "max":
        r = torch.maximum(a, b)
    elif op == "band":
        r = a & b
    elif op == "bor":
        r = a | b
    else:
        r = a ^ b
    return r.to(dt)


def _cpu_ref(C, op, a, b):
    """plait's CPU kernel on copies of the same data."""
    dst = a.cpu().clone()
    C.reduce(op, dst, b.cpu().contiguous())
    return dst


def _guarded(x, offset):
    """A CUDA buffer holding x at element `offset` + GUARD, with random guard elements around it: (full, view)."""
    n = x.numel()
    g = torch.Generator().manual_seed(n * 31 + offset)
    lo = GUARD + offset
    guard = _rand(x.dtype, lo + GUARD, "sum", g).cuda()
    full = torch.empty(lo + n + GUARD, dtype=x.dtype, device="cuda")
    full[:lo] = guard[:lo]
    full[lo + n:] = guard[lo:]
    view = full[lo:lo + n]
    view.copy_(x.cuda())
    return full, view


def _diff(got, exp, a, b):
    """First mismatching element, described."""
    bad = (_bits(got.cpu()) != _bits(exp.cpu())).nonzero().reshape(-1)
    i = int(bad[0])
    return (f"{bad.numel()} wrong, first [{i}]: {a[i].item()} , {b[i].item()} -> {got[i].item()}, "
            f"expected {exp[i].item()}")


# Buffer layouts: (dst is "a", "b" or its own buffer, element offsets of dst, a, b).
LAYOUTS = {
    "separate": ("own", 0, 0, 0),
    "inplace_a": ("a", 0, 0, 0),
    "inplace_b": ("b", 0, 0, 0),
    "shifted": ("own", 1, 1, 1),            # same misalignment: peeled head, then aligned vectors
    "shifted_inplace": ("a", 1, 1, 1),
    "mixed": ("own", 0, 1, 2),              # relatively misaligned: scalar path throughout
    "mixed_inplace": ("a", 3, 3, 1),
}


def _run_reduce_case(C, op, dtype, n, layout, g, failures):
    where, od, oa, ob = LAYOUTS[layout]
    a_cpu, b_cpu = _rand(dtype, n, op, g), _rand(dtype, n, op, g)
    a_full, a = _guarded(a_cpu, oa)
    b_full, b = _guarded(b_cpu, ob)
    if where == "a":
        d_full, d = a_full, a
    elif where == "b":
        d_full, d = b_full, b
    else:
        d_full, d = _guarded(torch.zeros(n, dtype=dtype), od)
    before = {"a": a_full.clone(), "b": b_full.clone(), "d": d_full.clone()}
    C.cuda_reduce(op, NAMES[dtype], d.data_ptr(), a.data_ptr(), b.data_ptr(), n, _stream())
    exp_torch = _torch_ref(op, a_cpu.cuda(), b_cpu.cuda())
    exp_cpu = _cpu_ref(C, op, a_cpu, b_cpu)
    tag = f"{op} {_ids(dtype)} n={n} {layout}"
    if n and not torch.equal(d, exp_torch):
        failures.append(f"{tag} vs torch: {_diff(d, exp_torch, a_cpu, b_cpu)}")
    if n and not torch.equal(_bits(d.cpu()), _bits(exp_cpu)):
        failures.append(f"{tag} vs plait CPU (bitwise): {_diff(d, exp_cpu, a_cpu, b_cpu)}")
    # Everything outside dst is as it was: guards of every buffer, and the inputs dst does not alias.
    for name, full, off in (("a", a_full, oa), ("b", b_full, ob), ("dst", d_full, od)):
        lo, hi = GUARD + off, GUARD + off + n
        ref = before["d" if full is d_full else name]
        if not (torch.equal(_bits(full[:lo]), _bits(ref[:lo])) and torch.equal(_bits(full[hi:]), _bits(ref[hi:]))):
            failures.append(f"{tag}: wrote outside {name}")
        if full is not d_full and not torch.equal(_bits(full), _bits(ref)):
            failures.append(f"{tag}: input {name} modified")


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_reduce_matches_torch_and_cpu(dtype):
    C = _kernels()
    failures = []
    for op in _ops_for(dtype):
        for n in SIZES:
            for layout in LAYOUTS:
                g = torch.Generator().manual_seed(zlib.crc32(repr((op, str(dtype), n, layout)).encode()))
                _run_reduce_case(C, op, dtype, n, layout, g, failures)
    torch.cuda.synchronize()
    assert not failures, "\n".join(failures[:30])


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8, torch.float64], ids=_ids)
def test_reduce_many_grid_strides(dtype):
    """Large enough that every thread of the capped grid goes round its grid-stride loop several times."""
    C = _kernels()
    n = (24 << 20) // torch.empty(0, dtype=dtype).element_size() + 5  # 24 MiB: several trips of a 132-SM grid
    failures = []
    for op in ("sum", "max"):
        g = torch.Generator().manual_seed(zlib.crc32(repr((op, str(dtype))).encode()))
        for layout in ("separate", "shifted_inplace"):
            _run_reduce_case(C, op, dtype, n, layout, g, failures)
    assert not failures, "\n".join(failures[:30])


@gpu
def test_special_values_bitwise_like_cpu():
    """Infinities, signed zeros, fp16 overflow to inf and subnormals: bit for bit as plait's CPU kernel."""
    C = _kernels()
    failures = []
    for dtype in FLOATS:
        big = {torch.float16: 65504.0, torch.bfloat16: 3.3e38, torch.float32: 3.4e38, torch.float64: 1.7e308}[dtype]
        tiny = {torch.float16: 6e-8, torch.bfloat16: 1e-40, torch.float32: 1e-45, torch.float64: 5e-324}[dtype]
        vals = [float("inf"), -float("inf"), 0.0, -0.0, 1.0, big, -big, tiny, -tiny, 2.5, -3.0]
        a = torch.tensor([x for x in vals for _ in vals] * 3, dtype=dtype)  # every pair, three times over
        b = torch.tensor([y for _ in vals for y in vals] * 3, dtype=dtype)
        keep = ~torch.isnan(_torch_ref("sum", a, b)) & ~torch.isnan(_torch_ref("prod", a, b))  # no inf - inf, 0 * inf
        a, b = a[keep], b[keep]
        for op in ARITH_OPS:
            for offset in (0, 1):  # 1: all three views one element past a 16-byte boundary (peeled head)
                da, db = a.cuda()[offset:], b.cuda()[offset:]
                d = torch.empty_like(a, device="cuda")[offset:]
                C.cuda_reduce(op, NAMES[dtype], d.data_ptr(), da.data_ptr(), db.data_ptr(), d.numel(), _stream())
                exp = _cpu_ref(C, op, a[offset:], b[offset:])
                if not torch.equal(_bits(d.cpu()), _bits(exp)):
                    failures.append(f"{op} {_ids(dtype)} offset={offset}: {_diff(d, exp, a[offset:], b[offset:])}")
    assert not failures, "\n".join(failures)


@gpu
def test_bool_bytes_other_than_0_1():
    """Any nonzero byte is true and results are 0/1 bytes, exactly as the CPU kernel."""
    C = _kernels()
    g = torch.Generator().manual_seed(5)
    n = 4097
    for op in ARITH_OPS + BIT_OPS:
        a8 = torch.randint(0, 256, (n,), generator=g, dtype=torch.int64).to(torch.uint8)
        b8 = torch.randint(0, 256, (n,), generator=g, dtype=torch.int64).to(torch.uint8)
        a8[::7] = 0
        b8[::5] = 0
        da, db = a8.cuda(), b8.cuda()
        d = torch.empty_like(da)
        C.cuda_reduce(op, "bool", d.data_ptr(), da.data_ptr(), db.data_ptr(), n, _stream())
        exp = _torch_ref(op, a8 != 0, b8 != 0).view(torch.uint8)
        assert torch.equal(d.cpu(), exp), op
        assert torch.equal(_cpu_ref(C, op, a8.view(torch.bool), b8.view(torch.bool)).view(torch.uint8), exp), op


@gpu
def test_invalid_combinations_and_empty():
    C = _kernels()
    x = torch.ones(8, device="cuda")
    p = x.data_ptr()
    for op in BIT_OPS:
        for dt in ("float32", "float64", "float16", "bfloat16"):
            with pytest.raises(RuntimeError, match=r"plait\.cuda_reduce: CUDA error 1\b"):
                C.cuda_reduce(op, dt, p, p, p, 8, _stream())
    with pytest.raises(ValueError, match="unknown dtype"):
        C.cuda_reduce("sum", "complex64", p, p, p, 8, _stream())
    with pytest.raises(ValueError, match="unknown op"):
        C.cuda_reduce("avg", "float32", p, p, p, 8, _stream())
    # n == 0 / nbytes == 0 enqueue nothing, whatever the pointers.
    C.cuda_reduce("sum", "float32", 0, 0, 0, 0, _stream())
    C.cuda_copy(0, 0, 0, _stream())
    C.cuda_pull(True, "sum", "float32", 0, 0, 0, 0, 0, 1, _stream())
    # pull: a length that is not whole elements, or an unaligned dst, is refused before launching.
    with pytest.raises(RuntimeError, match=r"plait\.cuda_pull: CUDA error 1\b"):
        C.cuda_pull(True, "sum", "float32", p, p, p, 6, p, 1, _stream())
    with pytest.raises(RuntimeError, match=r"plait\.cuda_pull: CUDA error 1\b"):
        C.cuda_pull(False, "sum", "float32", p + 2, p, p, 4, p, 1, _stream())
    torch.cuda.synchronize()
    assert torch.equal(x, torch.ones(8, device="cuda"))


@gpu
def test_sm_count():
    C = _kernels()
    for dev in range(torch.cuda.device_count()):
        with torch.cuda.device(dev):
            torch.empty(1, device="cuda")  # the device's context is current
            assert C.cuda_sm_count() == torch.cuda.get_device_properties(dev).multi_processor_count, dev


@gpu
def test_copy():
    C = _kernels()
    sizes = SIZES + [4, 16, 4096, 1 << 20]
    offsets = [(0, 0), (1, 1), (4, 4), (8, 8), (0, 4), (3, 5), (8, 0), (0, 1)]  # (dst, src) byte offsets
    failures = []
    for nbytes in sizes:
        for od, os_ in offsets:
            g = torch.Generator().manual_seed(nbytes * 131 + od * 7 + os_)
            src_cpu = _rand(torch.uint8, nbytes, "sum", g)
            s_full, s = _guarded(src_cpu, os_)
            d_full, d = _guarded(torch.zeros(nbytes, dtype=torch.uint8), od)
            s_before, d_before = s_full.clone(), d_full.clone()
            C.cuda_copy(d.data_ptr(), s.data_ptr(), nbytes, _stream())
            tag = f"copy nbytes={nbytes} dst+{od} src+{os_}"
            if not torch.equal(d.cpu(), src_cpu):
                failures.append(f"{tag}: wrong bytes")
            lo, hi = GUARD + od, GUARD + od + nbytes
            if not (torch.equal(d_full[:lo], d_before[:lo]) and torch.equal(d_full[hi:], d_before[hi:])):
                failures.append(f"{tag}: wrote outside dst")
            if not torch.equal(s_full, s_before):
                failures.append(f"{tag}: src modified")
    assert not failures, "\n".join(failures[:30])


# ---- pull ------------------------------------------------------------------------------------------------------------

def _pull(C, with_reduce, op, dtype, dst, peer, desc, nbytes, err, code):
    C.cuda_pull(with_reduce, op, NAMES[dtype], dst.data_ptr(), peer.data_ptr(), desc.data_ptr(), nbytes,
                err.data_ptr(), code, _stream())


def _peer_with(src_cpu, byte_offset):
    """A peer's byte buffer holding src_cpu's bytes at byte_offset (plus a tail of other bytes)."""
    raw = _bits(src_cpu).contiguous().view(torch.uint8) if src_cpu.numel() else torch.empty(0, dtype=torch.uint8)
    peer = torch.randint(0, 256, (byte_offset + raw.numel() + 64,), dtype=torch.uint8)
    peer[byte_offset:byte_offset + raw.numel()] = raw
    return peer.cuda()


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_pull(dtype):
    C = _kernels()
    es = torch.empty(0, dtype=dtype).element_size()
    failures = []
    for with_reduce in (False, True):
        for op in (_ops_for(dtype) if with_reduce else ["sum"]):
            for n in (1, 7, 17, 33, 4097, (1 << 20) + 3):
                for od, os_ in ((0, 0), (1, 1), (0, 1), (1, 5)):  # element offsets of dst and src
                    g = torch.Generator().manual_seed(zlib.crc32(repr((with_reduce, op, str(dtype), n, od, os_))
                                                                 .encode()))
                    dst_cpu, src_cpu = _rand(dtype, n, op, g), _rand(dtype, n, op, g)
                    base = 64 + os_ * es  # byte offset of src in the peer's buffer
                    peer = _peer_with(src_cpu, base)
                    peer_before = peer.clone()
                    d_full, d = _guarded(dst_cpu, od)
                    d_before = d_full.clone()
                    desc = torch.tensor([base, n * es], dtype=torch.int64, device="cuda")
                    err = torch.zeros(1, dtype=torch.int32, device="cuda")
                    _pull(C, with_reduce, op, dtype, d, peer, desc, n * es, err, 7)
                    tag = f"pull {'reduce ' + op if with_reduce else 'copy'} {_ids(dtype)} n={n} dst+{od} src+{os_}"
                    if int(err.item()) != 0:
                        failures.append(f"{tag}: err set to {int(err.item())}")
                    if with_reduce:
                        exp = _cpu_ref(C, op, dst_cpu, src_cpu)
                        exp_torch = _torch_ref(op, dst_cpu.cuda(), src_cpu.cuda())
                        if not torch.equal(d, exp_torch):
                            failures.append(f"{tag} vs torch: {_diff(d, exp_torch, dst_cpu, src_cpu)}")
                    else:
                        exp = src_cpu
                    if not torch.equal(_bits(d.cpu()), _bits(exp)):
                        failures.append(f"{tag} (bitwise): {_diff(d, exp, dst_cpu, src_cpu)}")
                    lo, hi = GUARD + od, GUARD + od + n
                    if not (torch.equal(_bits(d_full[:lo]), _bits(d_before[:lo]))
                            and torch.equal(_bits(d_full[hi:]), _bits(d_before[hi:]))):
                        failures.append(f"{tag}: wrote outside dst")
                    if not torch.equal(peer, peer_before):
                        failures.append(f"{tag}: peer buffer modified")
    assert not failures, "\n".join(failures[:30])


@gpu
@pytest.mark.parametrize("with_reduce", [False, True], ids=["copy", "reduce"])
def test_pull_length_mismatch_writes_nothing_and_reports_once(with_reduce):
    C = _kernels()
    for dtype in DTYPES:
        es = torch.empty(0, dtype=dtype).element_size()
        n = 4097
        g = torch.Generator().manual_seed(11)
        src_cpu, dst_cpu = _rand(dtype, n, "max", g), _rand(dtype, n, "max", g)
        peer = _peer_with(src_cpu, 32)
        d = dst_cpu.cuda()
        err = torch.zeros(1, dtype=torch.int32, device="cuda")
        bad_lengths = [(n - 1) * es, (n + 1) * es, 0]
        for i, length in enumerate(bad_lengths):
            desc = torch.tensor([32, length], dtype=torch.int64, device="cuda")
            _pull(C, with_reduce, "max", dtype, d, peer, desc, n * es, err, 100 + i)
            assert int(err.item()) == 100, (dtype, length, int(err.item()))  # the first code stays
            assert torch.equal(_bits(d.cpu()), _bits(dst_cpu)), f"{_ids(dtype)}: wrote on a length mismatch"
        # An error word already set by someone else is left alone, and a matching length still transfers.
        err.fill_(42)
        desc = torch.tensor([32, n * es + es], dtype=torch.int64, device="cuda")
        _pull(C, with_reduce, "max", dtype, d, peer, desc, n * es, err, 9)
        assert int(err.item()) == 42
        err.zero_()
        desc = torch.tensor([32, n * es], dtype=torch.int64, device="cuda")
        _pull(C, with_reduce, "max", dtype, d, peer, desc, n * es, err, 9)
        assert int(err.item()) == 0
        exp = _cpu_ref(C, "max", dst_cpu, src_cpu) if with_reduce else src_cpu
        assert torch.equal(_bits(d.cpu()), _bits(exp)), _ids(dtype)
        # An offset that leaves the source unaligned for its dtype is refused the same way (nothing written).
        if es > 1:
            d2 = dst_cpu.cuda()
            err.zero_()
            desc = torch.tensor([33, n * es], dtype=torch.int64, device="cuda")
            _pull(C, with_reduce, "max", dtype, d2, peer, desc, n * es, err, 5)
            assert int(err.item()) == 5, _ids(dtype)
            assert torch.equal(_bits(d2.cpu()), _bits(dst_cpu))


@gpu
def test_pull_reads_the_descriptor_when_it_runs():
    """The descriptor is written by a kernel enqueued before the pull on the same stream (the host never knows it)."""
    C = _kernels()
    n = 1000
    src = torch.arange(n, dtype=torch.float32)
    peer = _peer_with(src, 4096)
    d = torch.zeros(n, device="cuda")
    err = torch.zeros(1, dtype=torch.int32, device="cuda")
    desc = torch.zeros(2, dtype=torch.int64, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(1_000_000)  # the descriptor is filled in late, on the stream, not by the host
        desc.copy_(torch.tensor([4096, n * 4], dtype=torch.int64, device="cuda"))
        C.cuda_pull(True, "sum", "float32", d.data_ptr(), peer.data_ptr(), desc.data_ptr(), n * 4, err.data_ptr(), 3,
                    side.cuda_stream)
    torch.cuda.current_stream().wait_stream(side)
    assert int(err.item()) == 0
    assert torch.equal(d.cpu(), src)


@gpu
def test_pull_error_word_in_pinned_host_memory():
    """The error word may live in pinned (mapped) host memory, which the host reads after synchronizing."""
    C = _kernels()
    err = torch.zeros(1, dtype=torch.int32).pin_memory()
    n = 64
    peer = _peer_with(torch.ones(n), 0)
    d = torch.zeros(n, device="cuda")
    desc = torch.tensor([0, n * 4 + 4], dtype=torch.int64, device="cuda")
    C.cuda_pull(False, "sum", "float32", d.data_ptr(), peer.data_ptr(), desc.data_ptr(), n * 4, err.data_ptr(), 77,
                _stream())
    torch.cuda.synchronize()
    assert int(err[0]) == 77
    assert torch.equal(d.cpu(), torch.zeros(n))


# ---- without a device ----------------------------------------------------------------------------------------------

def test_without_a_device_the_entry_points_report_errors():
    """No device (or no CUDA build): enqueuing fails with a RuntimeError naming the CUDA error; nothing crashes."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present (the gpu tests cover this machine)")
    if not H.IS_PLAIT:
        pytest.skip(f"needs plait (backend under test is {H.BACKEND})")
    import plait._C as C

    _require_entry_points(C)
    if C.cuda_device_count() > 0:
        pytest.skip("plait sees a CUDA device that torch does not (a CPU-only torch on a GPU machine?): the "
                    "no-device path cannot be checked here")
    assert C.cuda_sm_count() == 0
    # What the launch fails with: a build without CUDA answers cudaErrorInsufficientDriver (35) and says it was built
    # without CUDA; a CUDA build on a machine without a usable device gets cudaErrorNoDevice (100) or, without a
    # driver, cudaErrorInsufficientDriver (35).
    if C.cuda_compiled():
        code = r"(35 \(cudaErrorInsufficientDriver\)|100 \(cudaErrorNoDevice\)) enqueuing "
    else:
        code = r"35 \(cudaErrorInsufficientDriver\) enqueuing .*; plait was built without CUDA"
    # Fake, never dereferenced addresses: with no device the launch itself fails.
    with pytest.raises(RuntimeError, match=rf"^plait\.cuda_reduce: CUDA error {code}"):
        C.cuda_reduce("sum", "float32", 256, 256, 256, 4, 0)
    with pytest.raises(RuntimeError, match=rf"^plait\.cuda_copy: CUDA error {code}"):
        C.cuda_copy(256, 512, 16, 0)
    with pytest.raises(RuntimeError, match=rf"^plait\.cuda_pull: CUDA error {code}"):
        C.cuda_pull(True, "sum", "float32", 256, 256, 256, 16, 256, 1, 0)
    C.cuda_reduce("sum", "float32", 0, 0, 0, 0, 0)  # n == 0: nothing to enqueue, no error
