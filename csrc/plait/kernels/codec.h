// Block-quantization codecs: pure functions that turn float32 / bfloat16 / float16 values into wire bytes and back.
// Kernels know nothing of ranks: no transport, no group, no sequence number; a collective decides what to encode
// and where the bytes go. CPU kernels here (AVX2+F16C or scalar, chosen once per process like the reduction
// kernels), CUDA kernels in cuda/kernels.h; both compute every value with the one definition in codec_impl.h, so
// CPU and GPU produce the same bytes and the same decoded bits.
//
// ---- Wire format (part of the protocol: every rank must produce and read exactly these bytes) ----------------------
//
// n values are cut into blocks of B = Spec::block values from the start; block k holds m = min(B, n - kB) values
// (only the last block may be partial). Blocks are encoded independently and the encoded blocks are concatenated,
// so block k starts at byte k * blockBytes(spec). Multi-byte fields are little-endian and unaligned.
//
//   int8  float32 scale (4 bytes), then m int8 values q in [-127, 127].           blockBytes = 4 + B
//   int4  float16 scale (2 bytes), then ceil(m / 2) bytes: value 2j in the low nibble of byte j, value 2j + 1 in
//         the high nibble; each a 4-bit two's complement q in [-7, 7]; a missing odd last value is 0.
//                                                                                 blockBytes = 2 + B / 2
//   fp8   float32 scale (4 bytes), then m bytes of OCP FP8 E4M3 "fn" (bias 7, largest 448, no infinities,
//         0x7f / 0xff are NaN).                                                   blockBytes = 4 + B
//   bf16  no scale: 2m bytes, each value narrowed to bfloat16 rounding to nearest even (a NaN stays NaN with its
//         sign and the quiet bit set; infinities stay infinite).                  blockBytes = 2B
//
// Encoding one block (int8 / int4 / fp8). v_i = x_i widened to float32, then divided by `div` unless div == 1
// (one IEEE float32 division). a = max_i |v_i|. All arithmetic is float32, round to nearest even, no FMA.
//   - Some v_i NaN or infinite: scale = quiet NaN (float32 0x7fc00000, float16 0x7e00), payload all zero bytes.
//     The block decodes to NaN everywhere: a non-finite value is never lost silently.
//   - a == 0: scale = +0, payload all zero (decodes to exact zeros).
//   - int8: s = a / 127; if s == 0 (underflow) s = 2^-149 (the smallest subnormal). q_i = clamp(rint(v_i / s),
//     -127, 127) with rint rounding half to even. decoded_i = q_i * s.
//   - int4: t = a / 7; the float16 scale is t rounded to nearest even, moved one float16 step up if it came out
//     below t (so |v_i / s| <= 7) and raised to the smallest float16 subnormal 2^-24 if it is 0. A scale that
//     would exceed 65504 (a above about 458752) cannot be written: such a block is encoded as non-finite (NaN
//     scale), so int4 carries only |values| up to about 458752 (after the division by div).
//     s = float(scale). q_i = clamp(rint(v_i / s), -7, 7). decoded_i = q_i * s (exact).
//   - fp8: s = a / 448; if s == 0, s = 2^-149. y_i = v_i / s; byte = y_i in E4M3 rounding to nearest even and
//     saturating: |y| at or above 448 gives +-448, subnormals go down to 2^-9, a value that rounds to zero keeps
//     its sign; a finite y never gives the NaN byte. decoded_i = float(e4m3) * s.
//
// Decoding. A block whose scale is not finite (only NaN is ever written) decodes to NaN everywhere; the NaN byte of
// fp8 decodes to NaN. Every NaN that decode arithmetic produces is written as the canonical quiet NaN 0x7fc00000
// (CPU and GPU NaN payload rules differ, the canonical NaN makes them agree). bf16 decodes by exact widening (a
// stored NaN keeps its bits). decodeAccumulate writes acc[i] + decoded_i (one rounding; a NaN sum is canonical).
// decode to bfloat16 / float16 rounds the float32 decoded value to nearest even once (a NaN keeps its sign and top
// payload bits and becomes quiet).
//
// Error (finite blocks): int8 / int4 |decoded - v| <= s/2 * (1 + 2^-15), plus at most 64 * 2^-149 when s is
// subnormal; fp8: half an E4M3 step, i.e. 2^-4 relative for |y| >= 2^-6 and 2^-10 * s absolute below that;
// bf16: 2^-8 relative (2^-9 plus subnormal rounding).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "plait/common.h"

namespace plait {
namespace codec {

enum class Codec : uint8_t { kNone = 0, kInt8 = 1, kInt4 = 2, kFp8 = 3, kBf16 = 4 };
constexpr int kCodecCount = 5;

// "none", "int8", "int4", "fp8", "bf16" ("?" for a value outside the enum).
const char* codecName(Codec c);
// The codec with that name; throws plait::Error listing the valid names.
Codec parseCodec(const std::string& s);

// A codec and its block size in values. kNone (no codec: the caller sends raw values) has block 0 and no wire
// format; every encoding function throws for it.
struct Spec {
  Codec codec = Codec::kNone;
  uint32_t block = 0;  // 0: the codec's default
};

// int8 256, int4 32, fp8 256, bf16 256 (bf16 has no scales: its block only sets segment granularity); none 0.
uint32_t defaultBlock(Codec c);
// A checked Spec: block 0 takes the default; otherwise the block must be a multiple of 8 in [8, 65536] (else
// plait::Error naming codec and block). kNone accepts only block 0.
Spec makeSpec(Codec c, uint32_t block);

// Wire bytes of one full block / of n values (the full blocks plus a last partial block). Throw for kNone or an
// invalid block (as makeSpec); block 0 means the default.
size_t blockBytes(const Spec& s);
size_t encodedBytes(const Spec& s, size_t n);

// The value types encode reads and decode writes: float32, bfloat16, float16.
bool codecSupports(DType dt);

// Encodes n values of src (dtype dt), each first divided by div (div == 1.0f: no division at all; otherwise div
// must be finite and nonzero), writing exactly encodedBytes(s, n) bytes to dst. Blocks are taken from the start of
// src. src and dst need no alignment and must not overlap. Single-threaded, in the fixed IEEE mode of the reduction
// kernels (no FTZ/DAZ, round to nearest, whatever the calling thread's MXCSR says).
void encode(const Spec& s, DType dt, const void* src, size_t n, float div, void* dst);
// acc[i] = acc[i] + decoded_i in float32 (decode, then one rounded addition; never fused), for i < n, reading
// encodedBytes(s, n) bytes of src.
void decodeAccumulate(const Spec& s, const void* src, size_t n, float* acc);
// dst[i] = decoded_i rounded to nearest even to dt (float32, bfloat16 or float16), for i < n.
void decode(const Spec& s, const void* src, size_t n, DType dt, void* dst);

// Which implementation the functions above run: "avx2" or "scalar" (PLAIT_KERNELS=scalar forces scalar).
const char* codecIsa();

namespace detail {
// One instruction set's whole-buffer kernels. Arguments are already checked (valid codec other than kNone, block a
// multiple of 8, supported dtypes, pointers non-null when n > 0) and the IEEE mode is set by the caller.
struct Kernels {
  void (*encode)(Codec c, uint32_t block, DType dt, const void* src, size_t n, float div, void* dst);
  void (*decodeAccumulate)(Codec c, uint32_t block, const void* src, size_t n, float* acc);
  void (*decode)(Codec c, uint32_t block, const void* src, size_t n, DType dt, void* dst);
};
Kernels scalarKernels();  // codec.cc
Kernels avx2Kernels();    // codec_avx2.cc (built with -mavx2 -mf16c -mfma; call only when the CPU has them)
}  // namespace detail

}  // namespace codec
}  // namespace plait
