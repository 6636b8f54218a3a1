// The one definition of the codecs' arithmetic (wire format and rules: codec.h), as inline functions that compile
// for the host (scalar and AVX2 CPU kernels) and, under nvcc, for the device (cuda/codec.cu). Every kernel computes
// scales, codes and decoded values through these functions (or, in the AVX2 kernels, through vector code that is
// tested to give the same bits), so the CPU and the GPU write the same bytes and decode the same bits.
//
// Rules the functions keep:
//   - float32 arithmetic only, each operation rounded to nearest even, never fused (the host files are compiled
//     with -ffp-contract=off; on the device the intrinsics __fmul_rn / __fadd_rn / __fdiv_rn are never contracted
//     and are exact IEEE). Host callers run in the fixed IEEE mode (IeeeFpScope: no FTZ/DAZ, round to nearest).
//   - Absolute maxima are taken over the bit patterns |v| (sign cleared) as unsigned integers: for non-negative
//     floats the integer order is the float order, NaN and infinity sort above every finite value, and an integer
//     max gives the same answer in any order (warp shuffles, vector lanes, serial loops).
//   - No NaN payload depends on the hardware: every NaN produced by decode arithmetic is written as the canonical
//     quiet NaN 0x7fc00000 (x86 propagates an operand's NaN, CUDA returns 0x7fffffff).
//
// Everything is in an anonymous namespace: the scalar and the AVX2 translation units each get their own copy, so the
// linker can never hand the scalar kernels a copy that the compiler vectorized with AVX2 instructions (ODR).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "plait/kernels/codec.h"

#if defined(__CUDACC__)
#define PLAIT_HD __host__ __device__
#else
#define PLAIT_HD
#endif

namespace plait {
namespace codec {
namespace {

constexpr uint32_t kCanonicalNaN = 0x7fc00000u;  // float32 quiet NaN
constexpr uint16_t kHalfNaN = 0x7e00;            // float16 quiet NaN
constexpr uint32_t kInfBits = 0x7f800000u;       // |v| bits at or above this: NaN or infinity
constexpr uint32_t kMinSubnormalBits = 1u;       // 2^-149

// ---- bits and exactly rounded arithmetic ---------------------------------------------------------------------------

PLAIT_HD inline uint32_t bitsOf(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}
PLAIT_HD inline float floatOf(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}
PLAIT_HD inline float fdiv(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
PLAIT_HD inline float fmul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
PLAIT_HD inline float fadd(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
PLAIT_HD inline uint32_t absBits(float v) { return bitsOf(v) & 0x7fffffffu; }
PLAIT_HD inline bool isNaN(float v) { return absBits(v) > kInfBits; }
PLAIT_HD inline float canonical(float v) { return isNaN(v) ? floatOf(kCanonicalNaN) : v; }

// x rounded to an integer, ties to even (rint in round-to-nearest mode). On the host: adding and subtracting 2^23
// leaves exactly the rounded magnitude (the caller's mode is round to nearest); |x| >= 2^23 is already an integer.
PLAIT_HD inline float roundEven(float x) {
#if defined(__CUDA_ARCH__)
  return rintf(x);
#else
  const float ax = floatOf(absBits(x));
  if (!(ax < 8388608.0f)) return x;
  const float r = (ax + 8388608.0f) - 8388608.0f;
  return floatOf(bitsOf(r) | (bitsOf(x) & 0x80000000u));
#endif
}

// ---- half types -----------------------------------------------------------------------------------------------------

PLAIT_HD inline float bf16ToF32(uint16_t h) { return floatOf(uint32_t(h) << 16); }

// float32 -> bfloat16, round to nearest even; a NaN keeps its sign and top payload bits and becomes quiet.
PLAIT_HD inline uint16_t f32ToBf16(float f) {
  const uint32_t u = bitsOf(f);
  if ((u & 0x7fffffffu) > kInfBits) return uint16_t((u >> 16) | 0x40u);
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// IEEE binary16 -> float32, exact; a NaN keeps sign and payload and becomes quiet (as VCVTPH2PS does).
PLAIT_HD inline float halfToF32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0x1f) return floatOf(sign | kInfBits | (man << 13) | (man ? 0x00400000u : 0u));
  if (exp == 0) return floatOf(sign | bitsOf(fmul(float(man), 5.9604644775390625e-8f)));  // man * 2^-24, exact
  return floatOf(sign | ((exp + 112u) << 23) | (man << 13));
}

// float32 -> IEEE binary16, round to nearest even; overflow gives infinity; a NaN keeps its sign and the top ten
// payload bits and becomes quiet (as VCVTPS2PH does).
PLAIT_HD inline uint16_t f32ToHalf(float f) {
  const uint32_t u = bitsOf(f), sign = (u >> 16) & 0x8000u, ax = u & 0x7fffffffu;
  if (ax > kInfBits) return uint16_t(sign | kHalfNaN | ((ax >> 13) & 0x3ffu));
  if (ax >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // >= 65520 rounds to infinity
  if (ax >= 0x38800000u) {                                   // >= 2^-14: a normal half
    const uint32_t r = ax + 0xfffu + ((ax >> 13) & 1u);
    return uint16_t(sign | ((r >> 13) - (112u << 10)));
  }
  if (ax <= 0x33000000u) return uint16_t(sign);  // <= 2^-25: rounds to zero (2^-25 is a tie, even is 0)
  // A subnormal half: the value in units of 2^-24, rounded to nearest even (1024 is the smallest normal).
  const uint32_t man = (ax & 0x7fffffu) | 0x800000u, shift = 126u - (ax >> 23);  // 14..24
  const uint32_t q = man >> shift, rem = man & ((1u << shift) - 1u), half = 1u << (shift - 1u);
  return uint16_t(sign | (q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u)));
}

// ---- OCP FP8 E4M3 ("fn") --------------------------------------------------------------------------------------------

// float32 -> E4M3, round to nearest even, saturating: |y| >= 448 (infinity included) gives +-448 (0x7e), a NaN gives
// the NaN byte 0x7f with y's sign, results below 2^-6 are multiples of 2^-9 (code 8 is 2^-6 itself), a value that
// rounds to zero keeps its sign.
PLAIT_HD inline uint8_t f32ToE4m3(float y) {
  const uint32_t u = bitsOf(y), sign = (u >> 24) & 0x80u, ax = u & 0x7fffffffu;
  if (ax > kInfBits) return uint8_t(sign | 0x7fu);
  if (ax >= 0x43e00000u) return uint8_t(sign | 0x7eu);  // 448
  if (ax >= 0x3c800000u) {                               // >= 2^-6: keep 3 mantissa bits, rebias 127 -> 7
    const uint32_t r = ax + 0x7ffffu + ((ax >> 20) & 1u);
    return uint8_t(sign | ((r >> 20) - (120u << 3)));
  }
  // |y| * 512 is exact (a power of two), and rounding it to an integer is rounding y to a multiple of 2^-9.
  return uint8_t(sign | uint32_t(roundEven(fmul(floatOf(ax), 512.0f))));
}

// E4M3 -> float32, exact; the NaN bytes give the canonical NaN.
PLAIT_HD inline float e4m3ToF32(uint8_t b) {
  const uint32_t sign = uint32_t(b & 0x80u) << 24, e = b & 0x7fu;
  if (e == 0x7f) return floatOf(kCanonicalNaN);
  if (e < 8) return floatOf(sign | bitsOf(fmul(float(e), 0.001953125f)));  // e * 2^-9, exact
  return floatOf(sign | ((e << 20) + (120u << 23)));
}

// ---- specs and wire layout ------------------------------------------------------------------------------------------

// codec.h's defaultBlock and block rule, here so that the CUDA library needs nothing from the CPU core.
PLAIT_HD inline uint32_t defaultBlockOf(Codec c) {
  return c == Codec::kInt4 ? 32u : ((c == Codec::kInt8 || c == Codec::kFp8 || c == Codec::kBf16) ? 256u : 0u);
}
constexpr uint32_t kMaxBlock = 65536;
PLAIT_HD inline bool validBlock(uint32_t block) { return block % 8 == 0 && block >= 8 && block <= kMaxBlock; }

PLAIT_HD inline uint32_t scaleBytes(Codec c) {
  return (c == Codec::kInt8 || c == Codec::kFp8) ? 4u : (c == Codec::kInt4 ? 2u : 0u);
}
// Payload bytes of m values (after the scale).
PLAIT_HD inline size_t payloadBytes(Codec c, size_t m) {
  return c == Codec::kInt4 ? (m + 1) / 2 : (c == Codec::kBf16 ? 2 * m : m);
}
PLAIT_HD inline size_t wireBlockBytes(Codec c, uint32_t block) { return scaleBytes(c) + payloadBytes(c, block); }

PLAIT_HD inline void storeLe16(uint8_t* p, uint32_t v) {
  p[0] = uint8_t(v);
  p[1] = uint8_t(v >> 8);
}
PLAIT_HD inline void storeLe32(uint8_t* p, uint32_t v) {
  p[0] = uint8_t(v);
  p[1] = uint8_t(v >> 8);
  p[2] = uint8_t(v >> 16);
  p[3] = uint8_t(v >> 24);
}
PLAIT_HD inline uint32_t loadLe16(const uint8_t* p) { return uint32_t(p[0]) | uint32_t(p[1]) << 8; }
PLAIT_HD inline uint32_t loadLe32(const uint8_t* p) {
  return uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24;
}

// ---- per block ------------------------------------------------------------------------------------------------------

// The scale of a block from the bits of its absolute maximum (absBits of every value, max taken as integers).
//   wire  what goes on the wire: float32 bits (int8, fp8) or float16 bits (int4)
//   s     the float32 value the payload is divided by and multiplied with
//   live  false: the payload is all zero bytes (a non-finite or all-zero block, or an int4 scale beyond 65504)
struct BlockScale {
  uint32_t wire;
  float s;
  bool live;
};

PLAIT_HD inline BlockScale blockScale(Codec c, uint32_t amaxBits) {
  const uint32_t nanWire = c == Codec::kInt4 ? kHalfNaN : kCanonicalNaN;
  if (amaxBits >= kInfBits) return BlockScale{nanWire, 0.0f, false};
  if (amaxBits == 0) return BlockScale{0u, 0.0f, false};
  const float a = floatOf(amaxBits);
  if (c == Codec::kInt4) {
    // The float16 nearest a / 7, one step up when below it (so |v / s| <= 7), at least the smallest subnormal.
    const float t = fdiv(a, 7.0f);
    uint32_t h = f32ToHalf(t);
    if (h < 0x7c00u && halfToF32(uint16_t(h)) < t) ++h;  // 0x7bff + 1 is infinity: caught below
    if (h >= 0x7c00u) return BlockScale{nanWire, 0.0f, false};
    if (h == 0) h = 1;
    return BlockScale{h, halfToF32(uint16_t(h)), true};
  }
  float s = fdiv(a, c == Codec::kInt8 ? 127.0f : 448.0f);
  if (s == 0.0f) s = floatOf(kMinSubnormalBits);
  return BlockScale{bitsOf(s), s, true};
}

PLAIT_HD inline void writeScale(Codec c, uint8_t* p, uint32_t wire) {
  if (c == Codec::kInt4) storeLe16(p, wire);
  else storeLe32(p, wire);
}
// The scale as float32 (int4's float16 widened exactly).
PLAIT_HD inline float readScale(Codec c, const uint8_t* p) {
  return c == Codec::kInt4 ? halfToF32(uint16_t(loadLe16(p))) : floatOf(loadLe32(p));
}
// A block whose scale is not finite decodes to NaN everywhere.
PLAIT_HD inline bool scaleIsFinite(float s) { return absBits(s) < kInfBits; }

// ---- per value ------------------------------------------------------------------------------------------------------

// v_i of the wire format: x widened, divided by div unless the caller passes withDiv = false (div == 1).
PLAIT_HD inline float divided(float x, float div, bool withDiv) { return withDiv ? fdiv(x, div) : x; }

// Codes of one finite value v of a live block with scale s.
PLAIT_HD inline uint8_t int8Code(float v, float s) {
  float r = roundEven(fdiv(v, s));
  r = r < -127.0f ? -127.0f : (r > 127.0f ? 127.0f : r);
  return uint8_t(int8_t(int(r)));
}
PLAIT_HD inline uint8_t int4Code(float v, float s) {  // the low nibble holds the code
  float r = roundEven(fdiv(v, s));
  r = r < -7.0f ? -7.0f : (r > 7.0f ? 7.0f : r);
  return uint8_t(int(r) & 0xf);
}
PLAIT_HD inline uint8_t fp8Code(float v, float s) { return f32ToE4m3(fdiv(v, s)); }

// Decoded values of one code of a block with finite scale s.
PLAIT_HD inline float int8Value(uint8_t b, float s) { return fmul(float(int8_t(b)), s); }
PLAIT_HD inline float int4Value(uint32_t nibble, float s) {  // nibble in the low 4 bits
  return fmul(float(int(nibble & 0xfu) - int((nibble & 0x8u) << 1)), s);
}
PLAIT_HD inline float fp8Value(uint8_t b, float s) { return canonical(fmul(e4m3ToF32(b), s)); }

// decodeAccumulate's sum: one rounding, a NaN sum is canonical.
PLAIT_HD inline float accumulate(float acc, float d) { return canonical(fadd(acc, d)); }

// ---- typed loads and stores -----------------------------------------------------------------------------------------

// Element i of a float32 / bfloat16 / float16 buffer as float32. The host accepts any alignment; the device requires
// element alignment (checked before launch).
template <DType D>
PLAIT_HD inline float loadAs(const void* src, size_t i) {
  static_assert(D == DType::kFloat32 || D == DType::kBFloat16 || D == DType::kFloat16, "codec value types");
#if defined(__CUDA_ARCH__)
  if constexpr (D == DType::kFloat32) return static_cast<const float*>(src)[i];
  else if constexpr (D == DType::kBFloat16) return bf16ToF32(static_cast<const uint16_t*>(src)[i]);
  else return halfToF32(static_cast<const uint16_t*>(src)[i]);
#else
  if constexpr (D == DType::kFloat32) {
    float f;
    std::memcpy(&f, static_cast<const char*>(src) + 4 * i, 4);
    return f;
  } else {
    uint16_t h;
    std::memcpy(&h, static_cast<const char*>(src) + 2 * i, 2);
    if constexpr (D == DType::kBFloat16) return bf16ToF32(h);
    else return halfToF32(h);
  }
#endif
}

// dst[i] = v rounded to nearest even to D.
template <DType D>
PLAIT_HD inline void storeAs(void* dst, size_t i, float v) {
  static_assert(D == DType::kFloat32 || D == DType::kBFloat16 || D == DType::kFloat16, "codec value types");
#if defined(__CUDA_ARCH__)
  if constexpr (D == DType::kFloat32) static_cast<float*>(dst)[i] = v;
  else if constexpr (D == DType::kBFloat16) static_cast<uint16_t*>(dst)[i] = f32ToBf16(v);
  else static_cast<uint16_t*>(dst)[i] = f32ToHalf(v);
#else
  if constexpr (D == DType::kFloat32) {
    std::memcpy(static_cast<char*>(dst) + 4 * i, &v, 4);
  } else {
    const uint16_t h = D == DType::kBFloat16 ? f32ToBf16(v) : f32ToHalf(v);
    std::memcpy(static_cast<char*>(dst) + 2 * i, &h, 2);
  }
#endif
}

}  // namespace
}  // namespace codec
}  // namespace plait
