"""plait's block-quantization codecs (wire format: csrc/plait/kernels/codec.h) through ``plait._C``:

- ``codec_encoded_bytes(codec, block, n)``, ``codec_encode(codec, block, src, div=1.0)``,
  ``codec_decode(codec, block, enc, n, dtype)``, ``codec_decode_accumulate(codec, block, enc, acc)``, ``codec_isa()``;
- ``cuda_codec_encode / cuda_codec_decode / cuda_codec_decode_accumulate`` (raw pointers; gpu-marked tests).

The central check is byte for byte: an independent numpy/torch reference of the wire format (``ref_encode`` /
``ref_decode`` below: numpy float32 division, ``np.rint``, numpy's float16 rounding, torch's ``float8_e4m3fn``) must
produce exactly the kernel's bytes and decoded bits, for random normal, heavy-tailed, huge, denormal, all-zero and
NaN / Inf data, every input dtype, div 1 and 3, several block sizes and sizes that are not multiples of the block.
Beside it: hand-checked layouts, exact round trips of representable values, the documented error bounds, E4M3 against
torch on every float16 value, decode into each dtype, decode-accumulate, argument errors, the fixed IEEE mode when the
caller flushes denormals, and the AVX2 and scalar kernels against each other (child processes with
``PLAIT_KERNELS=scalar``, as tests/test_kernels.py does).
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import tempfile
import zlib

import numpy as np
import pytest
import torch

import _harness as H

KNOB = os.environ.get("PLAIT_KERNELS", "auto")
spawns_child = pytest.mark.kernel_child  # deselected inside the scalar child (no recursion)
gpu = pytest.mark.gpu

CODECS = ["int8", "int4", "fp8", "bf16"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
DEFAULT_BLOCK = {"int8": 256, "int4": 32, "fp8": 256, "bf16": 256}
SCALE_BYTES = {"int8": 4, "int4": 2, "fp8": 4, "bf16": 0}
CANONICAL_NAN = 0x7FC00000
F32 = np.float32
TINY = float(np.float32(2.0 ** -149))  # smallest float32 subnormal


def _ids(x):
    return str(x).replace("torch.", "")


def _codec():
    if not H.IS_PLAIT:
        pytest.skip(f"codec tests need plait (backend under test is {H.BACKEND})")
    try:
        import plait._C as C
    except ImportError as e:
        pytest.fail(f"plait._C not importable: {e}", pytrace=False)
    missing = [f for f in ("codec_encoded_bytes", "codec_encode", "codec_decode", "codec_decode_accumulate",
                           "codec_isa") if not hasattr(C, f)]
    if missing:
        pytest.fail(f"plait._C lacks the codec entry point(s) {missing}", pytrace=False)
    return C


# ---- the reference ---------------------------------------------------------------------------------------------------

def payload_bytes(codec, m):
    return (m + 1) // 2 if codec == "int4" else (2 * m if codec == "bf16" else m)


def block_bytes(codec, block):
    return SCALE_BYTES[codec] + payload_bytes(codec, block)


def encoded_bytes(codec, block, n):
    full, rest = divmod(n, block)
    return full * block_bytes(codec, block) + (SCALE_BYTES[codec] + payload_bytes(codec, rest) if rest else 0)


def _values(x, div):
    """v_i: x widened to float32 (exact; by numpy, IEEE-style: NaN payloads kept), divided by div in float32 unless
    div == 1."""
    if x.dtype == torch.float32:
        v = x.numpy().copy()
    elif x.dtype == torch.bfloat16:
        v = (x.view(torch.int16).numpy().view(np.uint16).astype(np.uint32) << 16).view(F32)
    else:
        v = x.view(torch.int16).numpy().view(np.float16).astype(F32)
    if div != 1.0:
        with np.errstate(all="ignore"):
            v = (v / F32(div)).astype(F32)
    return v


def _bf16_bits(v):
    """float32 -> bfloat16 bits, nearest even; NaN: sign and top payload bits kept, quiet bit set."""
    u = v.view(np.uint32).astype(np.uint64)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
    return np.where(nan, (u >> 16) | 0x40, r).astype(np.uint16)


def ref_encode(codec, block, x, div=1.0):
    """The wire bytes (numpy uint8) of tensor x, written from codec.h's rules without plait."""
    block = block or DEFAULT_BLOCK[codec]
    v = _values(x, div)
    n = v.size
    if codec == "bf16":
        return _bf16_bits(v).astype("<u2").view(np.uint8)
    nb = -(-n // block)
    V = np.zeros(nb * block, F32)
    V[:n] = v
    V = V.reshape(nb, block)
    with np.errstate(all="ignore"):
        a = np.abs(V).max(axis=1) if nb else np.zeros(0, F32)
        finite = np.isfinite(V).all(axis=1)
        zero = finite & (a == 0)
        if codec == "int4":
            t = (a / F32(7)).astype(F32)
            s16 = t.astype(np.float16)
            s16 = np.where(s16.astype(F32) < t, np.nextafter(s16, np.float16(np.inf)), s16)
            s16 = np.where(s16 == 0, np.float16(2.0 ** -24), s16).astype(np.float16)
            bad = ~finite | ~np.isfinite(s16)
            live = ~bad & ~zero
            scale = np.where(live, s16.astype(F32), F32(1))
            wire = s16.view(np.uint16).copy()
            wire[bad] = 0x7E00
            wire[zero] = 0
            q = np.clip(np.rint(V / scale[:, None]), -7, 7).astype(np.int64)
            q[~live] = 0
            nib = (q & 0xF).astype(np.uint8)
            pay = nib[:, 0::2] | (nib[:, 1::2] << 4)
            head = wire.astype("<u2").view(np.uint8).reshape(nb, 2)
        else:
            s = (a / F32(127 if codec == "int8" else 448)).astype(F32)
            s = np.where(s == 0, F32(TINY), s).astype(F32)
            bad = ~finite
            live = finite & ~zero
            scale = np.where(live, s, F32(1)).astype(F32)
            wire = s.view(np.uint32).copy()
            wire[bad] = CANONICAL_NAN
            wire[zero] = 0
            Y = (V / scale[:, None]).astype(F32)
            if codec == "int8":
                pay = np.clip(np.rint(Y), -127, 127).astype(np.int8).view(np.uint8)
            else:
                Y = np.where(live[:, None], Y, F32(0))
                pay = torch.from_numpy(np.clip(Y, -448, 448)).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
            pay = pay.copy()
            pay[~live] = 0
            head = wire.astype("<u4").view(np.uint8).reshape(nb, 4)
    return np.concatenate([head, pay], axis=1).reshape(-1)[:encoded_bytes(codec, block, n)]


def _canonical(vals):
    bits = vals.view(np.uint32).copy()
    bits[np.isnan(vals)] = CANONICAL_NAN
    return bits.view(F32)


def ref_decode(codec, block, enc, n):
    """The float32 values (numpy) of n encoded values, from codec.h's rules without plait."""
    block = block or DEFAULT_BLOCK[codec]
    enc = np.asarray(enc, dtype=np.uint8)
    if n == 0:
        return np.zeros(0, F32)
    if codec == "bf16":
        return (enc[:2 * n].copy().view("<u2").astype(np.uint32) << 16).view(F32)
    nb, bb = -(-n // block), block_bytes(codec, block)
    E = np.zeros(nb * bb, np.uint8)
    used = encoded_bytes(codec, block, n)
    E[:used] = enc[:used]
    E = E.reshape(nb, bb)
    with np.errstate(all="ignore"):
        if codec == "int4":
            scale = E[:, :2].copy().view("<f2").astype(F32).reshape(nb)
            P = E[:, 2:].astype(np.int64)
            q = np.stack([P & 0xF, P >> 4], axis=2).reshape(nb, -1)
            q = np.where(q >= 8, q - 16, q)
            vals = (q.astype(F32) * scale[:, None]).astype(F32)
        else:
            scale = E[:, :4].copy().view("<f4").reshape(nb)
            P = E[:, 4:].copy()
            if codec == "int8":
                f = P.view(np.int8).astype(F32)
            else:
                f = torch.from_numpy(P).view(torch.float8_e4m3fn).float().numpy()
            vals = (f * scale[:, None]).astype(F32)
        vals[~np.isfinite(scale)] = np.nan
    return _canonical(vals.reshape(-1)[:n].astype(F32))


# ---- data ------------------------------------------------------------------------------------------------------------

KINDS = ["normal", "heavy_t", "cauchy", "huge", "denormal", "tiny", "zeros", "nan_inf", "mixed_scale"]


def make_data(kind, n, dtype, seed):
    rng = np.random.default_rng(seed)
    if kind == "normal":
        x = rng.standard_normal(n) * 3
    elif kind == "heavy_t":
        x = rng.standard_t(1.5, n)
    elif kind == "cauchy":
        x = rng.standard_cauchy(n)
    elif kind == "huge":
        x = rng.standard_normal(n)
        if n:
            x[rng.integers(n)] = 6e4 if dtype == torch.float16 else 1e30
    elif kind == "denormal":  # subnormal in the input type
        tiny = {torch.float32: 1e-40, torch.bfloat16: 1e-40, torch.float16: 3e-6}[dtype]
        x = rng.standard_normal(n) * tiny
    elif kind == "tiny":  # a few steps of the smallest subnormal: int8 / fp8 scales underflow
        step = {torch.float32: TINY, torch.bfloat16: 2.0 ** -133, torch.float16: 2.0 ** -24}[dtype]
        x = rng.integers(-300, 301, n) * step
    elif kind == "zeros":
        x = np.where(rng.random(n) < 0.5, -0.0, 0.0)
    elif kind == "nan_inf":
        x = rng.standard_normal(n)
        for special in (np.nan, np.inf, -np.inf):
            if n > 3:
                x[rng.integers(n)] = special
    else:  # mixed_scale: every block of 8 at its own magnitude, 2^-30 .. 2^30
        x = rng.standard_normal(n) * np.repeat(2.0 ** rng.integers(-30, 31, (n + 7) // 8), 8)[:n]
    return torch.from_numpy(np.asarray(x, dtype=np.float64)).to(dtype)


def _first_diff(got, exp):
    bad = np.nonzero(got != exp)[0]
    return f"{bad.size} differ, first at [{bad[0]}]: got {got[bad[0]]:#x}, expected {exp[bad[0]]:#x}"


def _bits32(a):
    return np.ascontiguousarray(a, dtype=F32).view(np.uint32)


# ---- sizes and layout ------------------------------------------------------------------------------------------------

ENC_SIZES = [0, 1, 7, 8, 31, 32, 33, 255, 256, 257, 1000]


@pytest.mark.parametrize("codec", CODECS)
def test_encoded_bytes(codec):
    C = _codec()
    for block in [0, 8, 32, 64, 256, 65536]:
        b = block or DEFAULT_BLOCK[codec]
        for n in ENC_SIZES + [65537, 1 << 20]:
            assert C.codec_encoded_bytes(codec, block, n) == encoded_bytes(codec, b, n), (codec, block, n)
    # Spot values written out by hand (default blocks).
    hand = {"int8": {1: 5, 256: 260, 257: 265, 1000: 3 * 260 + 4 + 232},
            "int4": {1: 3, 7: 6, 32: 18, 33: 21, 1000: 31 * 18 + 2 + 4},
            "fp8": {1: 5, 256: 260, 257: 265, 1000: 3 * 260 + 4 + 232},
            "bf16": {1: 2, 7: 14, 257: 514, 1000: 2000}}[codec]
    for n, want in hand.items():
        assert C.codec_encoded_bytes(codec, 0, n) == want, (codec, n)
    for n in ENC_SIZES:
        assert C.codec_encode(codec, 0, torch.randn(n)).numel() == encoded_bytes(codec, DEFAULT_BLOCK[codec], n)


def test_invalid_specs_raise_clearly():
    C = _codec()
    for block in (4, 7, 12, 65544, 1 << 20):
        with pytest.raises(RuntimeError, match=rf"codec int8 block {block} is invalid.*multiple of 8 in \[8, 65536\]"):
            C.codec_encoded_bytes("int8", block, 10)
    with pytest.raises(RuntimeError, match="block must be 0"):
        C.codec_encode("int4", -8, torch.ones(4))
    with pytest.raises(RuntimeError, match=r"unknown codec 'int2' \(valid: none, int8, int4, fp8, bf16\)"):
        C.codec_encoded_bytes("int2", 0, 10)
    with pytest.raises(RuntimeError, match="codec none has no wire format"):
        C.codec_encode("none", 0, torch.ones(4))


def test_wire_layout_by_hand():
    C = _codec()
    # int8, block 8: scale 127/127 = 1.0, values rounded half to even; 11 values: a partial block of 3 follows.
    x = torch.tensor([1.0, -2.0, 3.0, 127.0, 0.5, 1.5, -127.0, 64.0, 2.0, -1.1, 0.25])
    enc = C.codec_encode("int8", 8, x).numpy().tobytes()
    want = struct.pack("<f", 1.0) + bytes([1, 0xFE, 3, 127, 0, 2, 0x81, 64]) + \
        struct.pack("<f", F32(2) / F32(127)) + bytes([127, 0xBA, 16])  # -1.1 * 63.5 -> -70, 0.25 * 63.5 -> 16
    assert enc == want, (enc.hex(), want.hex())
    # int4, block 8: scale 7/7 = 1.0 as float16 (0x3c00), value 2j low nibble, 2j + 1 high nibble; 9 values: the last
    # block has one value (its high nibble 0).
    x = torch.tensor([7.0, -7.0, 1.0, 0.0, -1.0, 3.0, 2.5, -3.5, 5.0])
    enc = C.codec_encode("int4", 8, x).numpy().tobytes()
    # 5/7 as float16, moved up if it rounded below 5/7 (so 5 / s <= 7).
    s16 = np.float16(F32(5) / F32(7))
    if F32(s16) < F32(5) / F32(7):
        s16 = np.nextafter(s16, np.float16(np.inf))
    want = bytes([0x00, 0x3C, 0x97, 0x01, 0x3F, 0xC2]) + s16.tobytes() + bytes([0x07])
    assert enc == want, (enc.hex(), want.hex())
    # fp8: scale 448/448 = 1.0; E4M3 bytes of 448, -448, 1, -0.0 (sign kept), 2^-9 (smallest subnormal), 0.75.
    x = torch.tensor([448.0, -448.0, 1.0, -0.0, 2.0 ** -9, 0.75, 3.0, -0.0009])
    enc = C.codec_encode("fp8", 8, x).numpy().tobytes()
    want = struct.pack("<f", 1.0) + bytes([0x7E, 0xFE, 0x38, 0x80, 0x01, 0x34, 0x44, 0x80])
    assert enc == want, (enc.hex(), want.hex())
    # bf16: little-endian bfloat16 bits, no scale.
    enc = C.codec_encode("bf16", 8, torch.tensor([1.0, -2.0, 1.00390625])).numpy().tobytes()
    assert enc == bytes([0x80, 0x3F, 0x00, 0xC0, 0x80, 0x3F]), enc.hex()  # 1 + 2^-8 is a tie: even (1.0)


# ---- exact round trips -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("codec", CODECS)
def test_representable_values_round_trip_exactly(codec):
    C = _codec()
    g = torch.Generator().manual_seed(zlib.crc32(codec.encode()))
    block = DEFAULT_BLOCK[codec]
    for n in (1, 9, block, 3 * block + 5):
        for k in (-10, 0, 5):
            if codec in ("int8", "int4"):
                lim = 127 if codec == "int8" else 7
                q = torch.randint(-lim, lim + 1, (n,), generator=g)
                q[::block] = lim * torch.where(torch.rand(q[::block].shape, generator=g) < 0.5, -1, 1)
                x = q.double() * 2.0 ** k
            elif codec == "fp8":
                b = torch.randint(0, 256, (n,), generator=g, dtype=torch.int64).to(torch.uint8)
                b[(b & 0x7F) == 0x7F] = 0x7E  # no NaN
                x = b.view(torch.float8_e4m3fn).double()
                x[::block] = 448.0
                x = x * 2.0 ** k
            else:
                x = (torch.randn(n, generator=g, dtype=torch.float64) * 2.0 ** k).to(torch.bfloat16).double()
            dtypes = DTYPES if codec != "bf16" else [torch.float32, torch.bfloat16]
            for dt in dtypes:
                if dt == torch.float16 and codec == "fp8":
                    continue  # E4M3 subnormals times 2^-10 fall below float16's range
                xt = x.to(dt)
                assert torch.equal(xt.double(), x), "test data must be representable in the input dtype"
                for div in (1.0, 4.0):
                    enc = C.codec_encode(codec, 0, xt, div)
                    dec = C.codec_decode(codec, 0, enc, n, torch.float32)
                    assert torch.equal(dec.double(), x / div), (codec, n, k, dt, div, dec, x / div)


# ---- against the reference, and the error bounds ---------------------------------------------------------------------

REF_SIZES = [0, 1, 7, 33, 255, 257, 1000, 4099]


def _blocks_for(codec):
    return [0, 24, 64] if codec != "bf16" else [0, 8]


def _bound_failures(codec, block, x, div, enc, dec):
    """Per-element check of codec.h's error bound (or NaN rules) of decoded values against v."""
    block = block or DEFAULT_BLOCK[codec]
    v = _values(x, div).astype(np.float64)
    d = dec.astype(np.float64)
    n = v.size
    if codec == "bf16":
        with np.errstate(all="ignore"):
            ok = np.where(np.isnan(v), np.isnan(d),
                          np.where(np.isinf(v), d == v, np.abs(d - v) <= np.abs(v) * 2.0 ** -8 + 2.0 ** -134))
        return [] if ok.all() else [f"bf16 bound: first bad [{np.nonzero(~ok)[0][0]}]"]
    out = []
    bb = block_bytes(codec, block)
    for k0 in range(0, n, block):
        vb, db = v[k0:k0 + block], d[k0:k0 + block]
        head = enc[(k0 // block) * bb:(k0 // block) * bb + SCALE_BYTES[codec]].tobytes()
        s = float(np.frombuffer(head, "<f2" if codec == "int4" else "<f4")[0])
        a = np.abs(vb).max() if np.isfinite(vb).all() else np.inf
        nan_block = not np.isfinite(vb).all() or (codec == "int4" and float(F32(a) / F32(7)) > 65504)
        if nan_block:
            if not (np.isnan(s) and np.isnan(db).all()):
                out.append(f"block at {k0}: non-finite or unrepresentable, scale {s}, decoded {db[:4]}")
            continue
        if a == 0:
            if not (s == 0 and (db == 0).all()):
                out.append(f"block at {k0}: all zero, scale {s}, decoded {db[:4]}")
            continue
        sub = s < 2.0 ** -126
        if codec in ("int8", "int4"):
            bound = s / 2 * (1 + 2.0 ** -15) + (64 * TINY if sub else 0.0)
        else:
            bound = np.maximum(np.abs(vb) * 2.0 ** -4, s * 2.0 ** -10) * (1 + 2.0 ** -8) + np.abs(vb) * 2.0 ** -22 \
                + (256 * TINY if sub else 0.0)
        err = np.abs(db - vb)
        if not (err <= bound).all():
            i = int(np.nonzero(~(err <= bound))[0][0])
            out.append(f"block at {k0}: [{k0 + i}] v={vb[i]!r} decoded={db[i]!r} err={err[i]:.3g} > bound "
                       f"{np.broadcast_to(bound, err.shape)[i]:.3g} (scale {s!r})")
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("codec", CODECS)
def test_bytes_and_decoded_bits_match_the_reference(codec, dtype):
    """Every data kind, div 1 and 3, several blocks and sizes: the kernel's bytes are the reference's bytes, its
    decoded float32 bits are the reference's, and the decoded values keep the documented error bound."""
    C = _codec()
    failures = []
    for kind in KINDS:
        for n in REF_SIZES:
            for block in _blocks_for(codec):
                for div in (1.0, 3.0):
                    seed = zlib.crc32(repr((codec, str(dtype), kind, n, block, div)).encode())
                    x = make_data(kind, n, dtype, seed)
                    tag = f"{codec} {_ids(dtype)} {kind} n={n} block={block} div={div}"
                    enc = C.codec_encode(codec, block, x, div)
                    assert enc.dtype == torch.uint8 and enc.dim() == 1
                    want = ref_encode(codec, block, x, div)
                    got = enc.numpy()
                    if got.size != want.size or not np.array_equal(got, want):
                        failures.append(f"{tag}: bytes: " + (_first_diff(got, want) if got.size == want.size else
                                                             f"{got.size} bytes, expected {want.size}"))
                        continue
                    dec = C.codec_decode(codec, block, enc, n, torch.float32).numpy()
                    ref = ref_decode(codec, block, want, n)
                    if not np.array_equal(_bits32(dec), _bits32(ref)):
                        failures.append(f"{tag}: decoded bits: {_first_diff(_bits32(dec), _bits32(ref))}")
                        continue
                    failures += [f"{tag}: {f}" for f in _bound_failures(codec, block, x, div, got, dec)]
    assert not failures, "\n".join(failures[:30])


def test_nan_and_inf_poison_only_their_block():
    C = _codec()
    for codec in ("int8", "int4", "fp8"):
        for bad in (float("nan"), float("inf"), -float("inf")):
            for dtype in DTYPES:
                x = torch.randn(32 * 3 + 5).to(dtype)
                x[32 + 7] = bad
                enc = C.codec_encode(codec, 32, x).numpy()
                bb = block_bytes(codec, 32)
                scale = enc[bb:bb + SCALE_BYTES[codec]].tobytes()
                want = b"\x00\x7e" if codec == "int4" else struct.pack("<I", CANONICAL_NAN)
                assert scale == want, (codec, bad, scale.hex())
                assert not enc[bb + SCALE_BYTES[codec]:2 * bb].any(), "payload of a non-finite block must be zero"
                dec = C.codec_decode(codec, 32, torch.from_numpy(enc), x.numel(), torch.float32)
                assert (dec[32:64].view(torch.int32) == CANONICAL_NAN).all(), (codec, bad, dec[32:64])
                assert torch.isfinite(dec[:32]).all() and torch.isfinite(dec[64:]).all(), (codec, bad)
    # bf16 has no blocks: NaN and infinities stay where they are (the NaN quiet, with its sign).
    x = torch.tensor([1.0, float("inf"), -float("inf"), 2.0]).view(torch.int32)
    x = torch.cat([x, torch.tensor([0x7F800001, -0x7FFFFF], dtype=torch.int32)]).view(torch.float32)
    enc = C.codec_encode("bf16", 0, x).numpy().view("<u2")
    assert enc.tolist() == [0x3F80, 0x7F80, 0xFF80, 0x4000, 0x7FC0, 0xFFC0], [hex(b) for b in enc]


def test_int4_scale_limit():
    """An int4 block whose float16 scale would exceed 65504 (|v| above about 458752) is encoded as non-finite."""
    C = _codec()
    ok = torch.tensor([7.0 * 65504] + [1.0] * 31)
    enc = C.codec_encode("int4", 32, ok).numpy()
    assert np.frombuffer(enc[:2].tobytes(), "<f2")[0] == np.float16(65504)
    assert C.codec_decode("int4", 32, torch.from_numpy(enc), 32, torch.float32)[0] == 7 * 65504
    for big in (7.0 * 65504 + 64, 7.0 * 65520, 1e9):  # a / 7 rounds to 65504 but lies above it; 65520; far above
        enc = C.codec_encode("int4", 32, torch.tensor([big] + [1.0] * 31))
        assert enc[:2].tolist() == [0x00, 0x7E]
        assert torch.isnan(C.codec_decode("int4", 32, enc, 32, torch.float32)).all()
    # Many blocks (the AVX2 kernels compute eight blocks' scales at once): every case beside the others.
    amax = [7.0 * 65504, 7.0 * 65504 + 64, 7.0 * 65520, 1e9, 458000.0, 1.0, 0.0, 2.0 ** -30, 7 * 2.0 ** -24, 1e-30,
            TINY, 3 * TINY, 65504.0, 7.0, 6.9999, float("inf")] * 2
    g = torch.Generator().manual_seed(5)
    x = torch.rand(len(amax), 32, generator=g, dtype=torch.float64) * 2 - 1
    x = (x * torch.tensor(amax, dtype=torch.float64).nan_to_num(posinf=1.0)[:, None]).float()
    x[:, 7] = torch.tensor(amax)
    for div in (1.0, 3.0):
        got = C.codec_encode("int4", 32, x.reshape(-1), div).numpy()
        want = ref_encode("int4", 32, x.reshape(-1), div)
        assert np.array_equal(got, want), _first_diff(got, want)
    # With div the limit applies to v = x / div.
    enc = C.codec_encode("int4", 32, torch.tensor([1e6] + [1.0] * 31), 4.0)
    assert torch.isfinite(C.codec_decode("int4", 32, enc, 32, torch.float32)).all()


def test_unaligned_buffers():
    """Every buffer one element (or byte) past where the allocator put it: inputs, encoded bytes, outputs, acc."""
    C = _codec()
    failures = []
    for codec in CODECS:
        for dtype in DTYPES:
            for n in (33, 1000):
                x = make_data("normal", n + 1, dtype, zlib.crc32(repr((codec, str(dtype), n)).encode()))[1:]
                want = ref_encode(codec, 0, x, 3.0)
                space = torch.zeros(want.size + 1, dtype=torch.uint8)
                enc = C.codec_encode(codec, 0, x, 3.0, out=space[1:])
                if not np.array_equal(enc.numpy(), want) or space[0] != 0:
                    failures.append(f"{codec} {_ids(dtype)} n={n}: encode from/to unaligned buffers")
                ref = ref_decode(codec, 0, want, n)
                for dt in DTYPES:
                    dst = torch.zeros(n + 1, dtype=dt)
                    C.codec_decode(codec, 0, space[1:], n, dt, out=dst[1:])
                    if not _same_floats(dst[1:], torch.from_numpy(ref).to(dt)) or dst[0] != 0:
                        failures.append(f"{codec} {_ids(dtype)} n={n}: decode to unaligned {_ids(dt)}")
                acc = torch.ones(n + 1)
                C.codec_decode_accumulate(codec, 0, space[1:], acc[1:])
                if not np.array_equal(_bits32(acc[1:].numpy()), _bits32(_canonical(ref + F32(1)))) or acc[0] != 1:
                    failures.append(f"{codec} {_ids(dtype)} n={n}: accumulate into an unaligned acc")
    assert not failures, "\n".join(failures)


def test_empty_tensors():
    C = _codec()
    for codec in CODECS:
        for dtype in DTYPES:
            enc = C.codec_encode(codec, 0, torch.empty(0, dtype=dtype), 3.0)
            assert enc.numel() == 0 and enc.dtype == torch.uint8
            assert C.codec_decode(codec, 0, enc, 0, dtype).numel() == 0
            C.codec_decode_accumulate(codec, 0, enc, torch.empty(0))


# ---- E4M3 against torch ----------------------------------------------------------------------------------------------

def _e4m3_via_codec(C, y):
    """The fp8 codec's E4M3 byte of each float32 in y (|y| <= 448): blocks of 256 led by 448 have scale exactly 1."""
    body = 255
    nb = -(-y.numel() // body)
    rest = torch.zeros(nb * body)
    rest[:y.numel()] = y
    x = torch.cat([torch.full((nb, 1), 448.0), rest.reshape(nb, body)], dim=1)
    enc = C.codec_encode("fp8", 256, x.reshape(-1)).numpy().reshape(nb, 260)
    assert (enc[:, :4].copy().view("<f4") == 1.0).all()
    return torch.from_numpy(enc[:, 5:].reshape(-1)[:y.numel()].copy())


def test_fp8_conversion_matches_torch_on_every_float16_value():
    C = _codec()
    h = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    h = h[torch.isfinite(h)].clamp(-448, 448)
    got = _e4m3_via_codec(C, h)
    want = h.to(torch.float8_e4m3fn).view(torch.uint8)
    bad = (got != want).nonzero().reshape(-1)
    assert bad.numel() == 0, f"{bad.numel()} differ, first {h[bad[0]].item()!r}: {int(got[bad[0]]):#x} vs " \
                             f"{int(want[bad[0]]):#x}"
    # Signed zeros: the sign survives values that round to zero.
    assert int(_e4m3_via_codec(C, torch.tensor([-0.0, -1e-4, 1e-4]))[0]) == 0x80


def test_fp8_conversion_matches_torch_on_random_float32():
    C = _codec()
    g = torch.Generator().manual_seed(11)
    n = 200000
    mag = torch.exp2(torch.rand(n, generator=g, dtype=torch.float64) * 24 - 15)  # 2^-15 .. 2^9
    y = (mag * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()).float().clamp(-448, 448)
    got = _e4m3_via_codec(C, y)
    want = y.to(torch.float8_e4m3fn).view(torch.uint8)
    bad = (got != want).nonzero().reshape(-1)
    assert bad.numel() == 0, f"{bad.numel()} differ, first {y[bad[0]].item()!r}: {int(got[bad[0]]):#x} vs " \
                             f"{int(want[bad[0]]):#x}"


def test_fp8_decodes_every_byte_like_torch():
    C = _codec()
    payload = torch.arange(256, dtype=torch.int64).to(torch.uint8)
    enc = torch.cat([torch.tensor(list(struct.pack("<f", 1.0)), dtype=torch.uint8), payload])
    dec = C.codec_decode("fp8", 256, enc, 256, torch.float32)
    want = payload.view(torch.float8_e4m3fn).float()
    nan = torch.isnan(want)
    assert int(nan.sum()) == 2 and torch.equal(dec[~nan].view(torch.int32), want[~nan].view(torch.int32))
    assert (dec[nan].view(torch.int32) == CANONICAL_NAN).all()


# ---- decode targets --------------------------------------------------------------------------------------------------

def _same_floats(a, b):
    """Bitwise equal, except that NaN matches any NaN (torch's NaN rounding rules differ from IEEE payload keeping)."""
    bits = BITS[a.dtype]
    nan = torch.isnan(a.float())
    return torch.equal(nan, torch.isnan(b.float())) and torch.equal(a.view(bits)[~nan], b.view(bits)[~nan])


@pytest.mark.parametrize("codec", CODECS)
def test_decode_into_each_dtype_and_accumulate(codec):
    C = _codec()
    failures = []
    for kind in ("normal", "heavy_t", "denormal", "tiny", "nan_inf", "mixed_scale"):
        for n in (1, 33, 1000):
            for offset in (0, 1):  # 1: the encoded bytes at an odd address
                seed = zlib.crc32(repr((codec, kind, n, offset)).encode())
                x = make_data(kind, n, torch.float32, seed) * 1e3
                enc0 = C.codec_encode(codec, 0, x)
                buf = torch.zeros(enc0.numel() + offset, dtype=torch.uint8)
                buf[offset:] = enc0
                enc = buf[offset:]
                f32 = C.codec_decode(codec, 0, enc, n, torch.float32)
                for dt in (torch.bfloat16, torch.float16):
                    got = C.codec_decode(codec, 0, enc, n, dt)
                    if got.dtype != dt or not _same_floats(got, f32.to(dt)):
                        failures.append(f"{codec} {kind} n={n} -> {_ids(dt)}: differs from float32 decode rounded")
                g = torch.Generator().manual_seed(seed)
                acc0 = torch.randn(n, generator=g) * 100
                if kind == "normal":
                    acc0[::17] = float("nan")  # NaN accumulators stay NaN (canonical)
                acc = acc0.clone()
                C.codec_decode_accumulate(codec, 0, enc, acc)
                want = (acc0 + f32).numpy()
                if not np.array_equal(_bits32(acc.numpy()), _bits32(_canonical(want))):
                    failures.append(f"{codec} {kind} n={n}: accumulate: "
                                    f"{_first_diff(_bits32(acc.numpy()), _bits32(_canonical(want)))}")
    assert not failures, "\n".join(failures[:30])


def test_decode_rounds_to_half_types_like_torch():
    """Decoded float32 values that need rounding (bf16 codec of float32 data decoded to float16, int8 values)."""
    C = _codec()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4099, generator=g) * 300
    for codec in CODECS:
        enc = C.codec_encode(codec, 0, x)
        f32 = C.codec_decode(codec, 0, enc, x.numel(), torch.float32)
        for dt in (torch.bfloat16, torch.float16):
            assert torch.equal(C.codec_decode(codec, 0, enc, x.numel(), dt).view(torch.int16),
                               f32.to(dt).view(torch.int16)), (codec, dt)


# ---- errors ----------------------------------------------------------------------------------------------------------

def test_argument_errors_are_clear():
    C = _codec()
    with pytest.raises((ValueError, RuntimeError), match=r"src dtype (torch\.)?float64 is not supported"):
        C.codec_encode("int8", 0, torch.ones(4, dtype=torch.float64))
    with pytest.raises((ValueError, RuntimeError), match=r"src dtype (torch\.)?int32 is not supported"):
        C.codec_encode("int8", 0, torch.ones(4, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="src must be contiguous"):
        C.codec_encode("int8", 0, torch.ones(8)[::2])
    for div in (0.0, float("inf"), float("nan")):
        with pytest.raises(RuntimeError, match="div must be finite and nonzero"):
            C.codec_encode("fp8", 0, torch.ones(8), div)
    enc = C.codec_encode("int8", 0, torch.ones(300))
    with pytest.raises(RuntimeError, match=r"enc holds 307 bytes, int8 block 256 needs 308 for 300 values"):
        C.codec_decode("int8", 0, enc[:-1], 300, torch.float32)
    with pytest.raises(RuntimeError, match="enc must be uint8"):
        C.codec_decode("int8", 0, enc.to(torch.int8), 300, torch.float32)
    with pytest.raises((ValueError, RuntimeError), match=r"output dtype (torch\.)?float64 is not supported"):
        C.codec_decode("int8", 0, enc, 300, torch.float64)
    with pytest.raises(RuntimeError, match="acc must be float32"):
        C.codec_decode_accumulate("int8", 0, enc, torch.zeros(300, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="needs 308 for 300 values"):
        C.codec_decode_accumulate("int8", 0, enc[:100], torch.zeros(300))
    with pytest.raises(RuntimeError, match="n must be >= 0"):
        C.codec_decode("int8", 0, enc, -1, torch.float32)
    with pytest.raises(RuntimeError, match=r"out must be a uint8 tensor of 308 bytes \(int8 block 256, 300 values\)"):
        C.codec_encode("int8", 0, torch.ones(300), out=torch.empty(307, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="out must hold 300 values of"):
        C.codec_decode("int8", 0, enc, 300, torch.float16, out=torch.empty(300))


def test_out_tensors_are_filled_in_place():
    C = _codec()
    x = torch.randn(1000)
    for codec in CODECS:
        out = torch.full((C.codec_encoded_bytes(codec, 64, 1000),), 0xA5, dtype=torch.uint8)
        got = C.codec_encode(codec, 64, x, 3.0, out=out)
        assert got.data_ptr() == out.data_ptr() and torch.equal(out, C.codec_encode(codec, 64, x, 3.0)), codec
        for dt in DTYPES:
            dst = torch.full((1000,), 7.0, dtype=dt)
            got = C.codec_decode(codec, 64, out, 1000, dt, out=dst)
            assert got.data_ptr() == dst.data_ptr() and torch.equal(dst, C.codec_decode(codec, 64, out, 1000, dt))


# ---- floating-point mode ---------------------------------------------------------------------------------------------

def test_denormals_exact_when_the_caller_flushes_denormals():
    """torch.set_flush_denormal(True) sets FTZ/DAZ on this thread; the codecs still compute in IEEE mode."""
    C = _codec()
    cases = []
    for codec in CODECS:
        for dtype in DTYPES:
            for kind in ("denormal", "tiny"):
                x = make_data(kind, 1000, dtype, zlib.crc32(repr((codec, str(dtype), kind)).encode()))
                want1 = ref_encode(codec, 0, x)
                cases.append((codec, dtype, kind, x, want1, ref_encode(codec, 0, x, 3.0),
                              ref_decode(codec, 0, want1, x.numel())))  # numpy too flushes when the thread does
    if not torch.set_flush_denormal(True):
        pytest.fail("torch.set_flush_denormal(True) is not supported on this CPU", pytrace=False)
    failures = []
    try:
        for codec, dtype, kind, x, want1, want3, ref in cases:
            for div, want in ((1.0, want1), (3.0, want3)):
                got = C.codec_encode(codec, 0, x, div).numpy()
                if not np.array_equal(got, want):
                    failures.append(f"{codec} {_ids(dtype)} {kind} div={div}: {_first_diff(got, want)}")
            enc = torch.from_numpy(want1)
            dec = C.codec_decode(codec, 0, enc, x.numel(), torch.float32).numpy()
            if not np.array_equal(_bits32(dec), _bits32(ref)):
                failures.append(f"{codec} {_ids(dtype)} {kind}: decode {_first_diff(_bits32(dec), _bits32(ref))}")
        still = float((torch.tensor([2.0 ** -140]) * 1.0)[0]) == 0.0
    finally:
        torch.set_flush_denormal(False)
    assert not failures, "\n".join(failures[:20])
    assert still, "the codec call did not restore the caller's flush-denormal mode"


# ---- which implementation runs; AVX2 against scalar ------------------------------------------------------------------

def _cpu_has_avx2_path() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return {"avx2", "f16c", "fma"} <= set(flags)


def test_codec_isa_follows_the_cpu_and_the_knob():
    C = _codec()
    want = "scalar" if KNOB == "scalar" else ("avx2" if _cpu_has_avx2_path() else "scalar")
    assert C.codec_isa() == want, f"PLAIT_KERNELS={KNOB}, AVX2 path available: {_cpu_has_avx2_path()}"


def _child_env(**extra):
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def _agreement_cases():
    """Inputs for every codec, dtype, div and a spread of blocks and sizes (vector bodies, 8-wide rests, tails)."""
    cases = []
    for codec in CODECS:
        for dtype in DTYPES:
            for kind in ("normal", "cauchy", "denormal", "tiny", "nan_inf", "mixed_scale", "huge"):
                for n, block in ((1, 0), (37, 8), (1000, 0), (1000, 40), (4099, 64), (70000, 65536)):
                    for div in (1.0, 3.0):
                        seed = zlib.crc32(repr(("agree", codec, str(dtype), kind, n, block, div)).encode())
                        cases.append((codec, block, div, make_data(kind, n, dtype, seed)))
    return cases


_CHILD = """
import sys, torch, plait._C as C
assert C.codec_isa() == 'scalar', C.codec_isa()
cases = torch.load(sys.argv[1])
out = []
for codec, block, div, x in cases:
    enc = C.codec_encode(codec, block, x, div)
    n = x.numel()
    decs = [C.codec_decode(codec, block, enc, n, dt) for dt in (torch.float32, torch.bfloat16, torch.float16)]
    acc = torch.linspace(-5, 5, n)
    C.codec_decode_accumulate(codec, block, enc, acc)
    out.append([enc] + decs + [acc])
torch.save(out, sys.argv[2])
"""


@spawns_child
@pytest.mark.timeout(600)
def test_scalar_and_avx2_kernels_agree_bitwise():
    C = _codec()
    if C.codec_isa() != "avx2":
        pytest.skip(f"this process runs the {C.codec_isa()} codec kernels (no AVX2/F16C/FMA here, or "
                    f"PLAIT_KERNELS={KNOB}): there is no second implementation to compare with")
    cases = _agreement_cases()
    with tempfile.TemporaryDirectory(prefix="plait_codec_") as d:
        path = os.path.join(d, "cases.pt")
        torch.save(cases, path)
        res = subprocess.run([sys.executable, "-c", _CHILD, path, path + ".out"],
                             env=_child_env(PLAIT_KERNELS="scalar"), capture_output=True, text=True, timeout=500)
        assert res.returncode == 0, res.stdout + res.stderr
        scalar = torch.load(path + ".out")
    failures = []
    for (codec, block, div, x), ref in zip(cases, scalar):
        n = x.numel()
        enc = C.codec_encode(codec, block, x, div)
        acc = torch.linspace(-5, 5, n)
        C.codec_decode_accumulate(codec, block, enc, acc)
        mine = [enc] + [C.codec_decode(codec, block, enc, n, dt) for dt in (torch.float32, torch.bfloat16,
                                                                            torch.float16)] + [acc]
        for what, a, b in zip(("bytes", "decode f32", "decode bf16", "decode f16", "accumulate"), mine, ref):
            bits = {torch.uint8: torch.uint8, torch.float32: torch.int32}.get(a.dtype, torch.int16)
            if not torch.equal(a.view(bits), b.view(bits)):
                i = int((a.view(bits) != b.view(bits)).nonzero()[0])
                failures.append(f"{codec} block={block} {_ids(x.dtype)} n={n} div={div} {what}: [{i}] avx2 "
                                f"{int(a.view(bits)[i]):#x}, scalar {int(b.view(bits)[i]):#x}")
    assert not failures, "\n".join(failures[:30])


@spawns_child
@pytest.mark.timeout(900)
def test_whole_file_on_the_scalar_path():
    """Knobs are read once per process: run every other test of this file in a child with PLAIT_KERNELS=scalar, so
    the scalar kernels meet the reference too."""
    _codec()
    here = os.path.abspath(__file__)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", here, "-q", "-rs", "-p", "no:cacheprovider", "-m", "not kernel_child and "
         "not gpu"], env=_child_env(PLAIT_KERNELS="scalar"), cwd=os.path.dirname(here), capture_output=True,
        text=True, timeout=850)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"test_codec.py under PLAIT_KERNELS=scalar failed (rc {proc.returncode}):\n" \
                                 f"{out[-6000:]}"
    summary = out.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary) and "deselected" in summary, \
        f"unexpected summary of the scalar run: {summary!r}\n{out[-3000:]}"


# ---- CUDA ------------------------------------------------------------------------------------------------------------

def _cuda():
    C = _codec()
    missing = [f for f in ("cuda_codec_encode", "cuda_codec_decode", "cuda_codec_decode_accumulate")
               if not hasattr(C, f)]
    if missing:
        pytest.fail(f"plait._C lacks the CUDA codec entry point(s) {missing}", pytrace=False)
    if not C.cuda_compiled():
        pytest.fail("torch sees a CUDA device but plait was built without CUDA kernels", pytrace=False)
    return C


def _stream():
    return torch.cuda.current_stream().cuda_stream


CUDA_SIZES = [1, 7, 31, 32, 33, 255, 256, 257, 4097, (1 << 20) + 3]


@gpu
@pytest.mark.parametrize("codec", CODECS)
def test_cuda_bytes_and_decodes_equal_the_cpu(codec):
    C = _cuda()
    failures = []
    for dtype in DTYPES:
        for kind in ("normal", "cauchy", "denormal", "tiny", "nan_inf", "mixed_scale", "huge", "zeros"):
            for n in CUDA_SIZES:
                for block, div in ((0, 1.0), (24, 3.0)):
                    tag = f"{codec} {_ids(dtype)} {kind} n={n} block={block} div={div}"
                    x = make_data(kind, n, dtype, zlib.crc32(repr(("cuda", codec, str(dtype), kind, n)).encode()))
                    want = C.codec_encode(codec, block, x, div)
                    off = n % 3  # the encoded buffer at byte offsets 0, 1, 2
                    buf = torch.full((want.numel() + off + 16,), 0xA5, dtype=torch.uint8, device="cuda")
                    enc = buf[off:off + want.numel()]
                    xd = x.cuda()
                    C.cuda_codec_encode(codec, block, NAMES[dtype], xd.data_ptr(), n, div, enc.data_ptr(), _stream())
                    torch.cuda.synchronize()
                    if not torch.equal(enc.cpu(), want):
                        i = int((enc.cpu() != want).nonzero()[0])
                        failures.append(f"{tag}: bytes differ first at {i}: {int(enc[i])} vs {int(want[i])}")
                        continue
                    if not (buf[:off].cpu() == 0xA5).all() or not (buf[off + want.numel():].cpu() == 0xA5).all():
                        failures.append(f"{tag}: wrote outside the encoded buffer")
                    for dt in DTYPES:
                        out = torch.empty(n, dtype=dt, device="cuda")
                        C.cuda_codec_decode(codec, block, enc.data_ptr(), n, NAMES[dt], out.data_ptr(), _stream())
                        ref = C.codec_decode(codec, block, want, n, dt)
                        if not torch.equal(out.cpu().view(BITS[dt]), ref.view(BITS[dt])):
                            failures.append(f"{tag}: decode to {_ids(dt)} differs from the CPU")
                    acc0 = torch.randn(n) * 10
                    acc = acc0.cuda()
                    C.cuda_codec_decode_accumulate(codec, block, enc.data_ptr(), n, acc.data_ptr(), _stream())
                    ref = acc0.clone()
                    C.codec_decode_accumulate(codec, block, want, ref)
                    if not torch.equal(acc.cpu().view(torch.int32), ref.view(torch.int32)):
                        failures.append(f"{tag}: decode-accumulate differs from the CPU")
    torch.cuda.synchronize()
    assert not failures, "\n".join(failures[:30])


@gpu
def test_cuda_invalid_arguments():
    C = _cuda()
    x = torch.ones(16, device="cuda")
    enc = torch.empty(64, dtype=torch.uint8, device="cuda")
    with pytest.raises(RuntimeError, match="invalid"):
        C.cuda_codec_encode("int8", 12, "float32", x.data_ptr(), 16, 1.0, enc.data_ptr(), _stream())
    with pytest.raises(RuntimeError, match="not supported"):
        C.cuda_codec_encode("int8", 0, "int32", x.data_ptr(), 16, 1.0, enc.data_ptr(), _stream())
    with pytest.raises(RuntimeError, match="cudaErrorInvalidValue"):  # misaligned float32 source
        C.cuda_codec_encode("int8", 0, "float32", x.data_ptr() + 2, 8, 1.0, enc.data_ptr(), _stream())
    C.cuda_codec_encode("int8", 0, "float32", 0, 0, 1.0, 0, _stream())  # n == 0: nothing enqueued


def test_without_a_device_the_cuda_entry_points_report_errors():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present (the gpu tests cover this machine)")
    C = _codec()
    if not hasattr(C, "cuda_codec_encode"):
        pytest.fail("plait._C lacks cuda_codec_encode", pytrace=False)
    if C.cuda_device_count() > 0:
        pytest.skip("plait sees a CUDA device that torch does not")
    code = r"(35 \(cudaErrorInsufficientDriver\)|100 \(cudaErrorNoDevice\)) enqueuing"
    with pytest.raises(RuntimeError, match=rf"^plait\.cuda_codec_encode: CUDA error {code}"):
        C.cuda_codec_encode("int8", 0, "float32", 256, 300, 1.0, 4096, 0)
    with pytest.raises(RuntimeError, match=rf"^plait\.cuda_codec_decode: CUDA error {code}"):
        C.cuda_codec_decode("int4", 0, 256, 300, "bfloat16", 4096, 0)
    with pytest.raises(RuntimeError, match=rf"^plait\.cuda_codec_decode_accumulate: CUDA error {code}"):
        C.cuda_codec_decode_accumulate("fp8", 0, 256, 300, 4096, 0)
    C.cuda_codec_encode("int8", 0, "float32", 0, 0, 1.0, 0, 0)  # n == 0: nothing to enqueue, no error
