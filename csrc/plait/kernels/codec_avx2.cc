// AVX2 + F16C codec kernels. Built with -mavx2 -mf16c -mfma -ffp-contract=off (CMakeLists.txt) and only called when
// the CPU reports those features (codec.cc). They write the same bytes and decode the same bits as the scalar kernels
// (tests/test_codec.py compares the two): every vector step is the scalar step of codec_impl.h on eight lanes -
// the same IEEE division (vdivps), rounding half to even (vroundps), clamps, integer absolute maximum and bit
// manipulation. Tails shorter than a vector go through codec_impl.h itself.
//
// Per block: one pass over the input for the absolute maximum (as integers, see codec_impl.h; NaN and infinity
// sort above every finite value, so the same pass checks finiteness), one pass that divides, rounds, clamps and
// packs 32 values at a time (8 at a time for the rest of the block).
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "plait/kernels/codec.h"
#include "plait/kernels/codec_impl.h"

namespace plait {
namespace codec {
namespace {

constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

// ---- loading eight values as float32 --------------------------------------------------------------------------------

template <DType D>
inline __m256 load8(const void* src, size_t i) {
  if constexpr (D == DType::kFloat32) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(static_cast<const char*>(src) + 4 * i));
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const char*>(src) + 2 * i));
    if constexpr (D == DType::kBFloat16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    else return _mm256_cvtph_ps(h);  // exact; NaNs as halfToF32
  }
}

// v_i of eight values: widened, then divided by div when kDiv.
template <DType D, bool kDiv>
inline __m256 value8(const void* src, size_t i, __m256 div) {
  const __m256 x = load8<D>(src, i);
  if constexpr (kDiv) return _mm256_div_ps(x, div);
  else return x;
}

// ---- packing --------------------------------------------------------------------------------------------------------

// Four vectors of eight int32 in [-128, 127] (or [0, 255] with kUnsigned) -> 32 bytes in order.
template <bool kUnsigned>
inline __m256i packBytes32(__m256i a, __m256i b, __m256i c, __m256i d) {
  __m256i ab, cd, r;
  if constexpr (kUnsigned) {
    ab = _mm256_packus_epi32(a, b);
    cd = _mm256_packus_epi32(c, d);
    r = _mm256_packus_epi16(ab, cd);
  } else {
    ab = _mm256_packs_epi32(a, b);
    cd = _mm256_packs_epi32(c, d);
    r = _mm256_packs_epi16(ab, cd);
  }
  // Per 128-bit lane the packs interleave four-value groups: a0-3 b0-3 c0-3 d0-3 | a4-7 b4-7 c4-7 d4-7.
  return _mm256_permutevar8x32_epi32(r, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}
// Eight int32 -> eight bytes in order (low 64 bits of the result).
template <bool kUnsigned>
inline __m128i packBytes8(__m256i a) {
  const __m128i lo = _mm256_castsi256_si128(a), hi = _mm256_extracti128_si256(a, 1);
  if constexpr (kUnsigned) {
    const __m128i w = _mm_packus_epi32(lo, hi);
    return _mm_packus_epi16(w, w);
  } else {
    const __m128i w = _mm_packs_epi32(lo, hi);
    return _mm_packs_epi16(w, w);
  }
}
// Bytes holding 4-bit codes in their low nibbles (byte 2j, 2j + 1) -> byte j = low | high << 4, for the 16 bytes of x.
inline __m128i nibblePairs(__m128i x) {
  const __m128i n = _mm_and_si128(x, _mm_set1_epi8(0x0f));
  const __m128i w = _mm_and_si128(_mm_or_si128(n, _mm_srli_epi16(n, 4)), _mm_set1_epi16(0x00ff));
  return _mm_packus_epi16(w, w);  // the eight pair bytes, twice
}

// ---- the codes of eight values --------------------------------------------------------------------------------------

// rint(v / s) clamped to [-lim, lim], as int32 (int8Code / int4Code before the byte).
inline __m256i intCodes8(__m256 v, __m256 s, __m256 lim) {
  __m256 r = _mm256_round_ps(_mm256_div_ps(v, s), kRound);
  r = _mm256_min_ps(_mm256_max_ps(r, _mm256_sub_ps(_mm256_setzero_ps(), lim)), lim);
  return _mm256_cvtps_epi32(r);  // integral already: exact
}

// f32ToE4m3 on eight lanes, as int32 codes 0..255.
inline __m256i e4m3Codes8(__m256 y) {
  const __m256i u = _mm256_castps_si256(y);
  const __m256i sign = _mm256_and_si256(_mm256_srli_epi32(u, 24), _mm256_set1_epi32(0x80));
  const __m256i ax = _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff));
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(ax, 20), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_add_epi32(ax, _mm256_add_epi32(_mm256_set1_epi32(0x7ffff), odd));
  const __m256i normal = _mm256_sub_epi32(_mm256_srli_epi32(rounded, 20), _mm256_set1_epi32(120 << 3));
  const __m256 scaled = _mm256_mul_ps(_mm256_castsi256_ps(ax), _mm256_set1_ps(512.0f));
  const __m256i small = _mm256_cvtps_epi32(_mm256_round_ps(scaled, kRound));  // used only below 2^-6: 0..8
  __m256i code = _mm256_blendv_epi8(small, normal, _mm256_cmpgt_epi32(ax, _mm256_set1_epi32(0x3c800000 - 1)));
  code = _mm256_blendv_epi8(code, _mm256_set1_epi32(0x7e), _mm256_cmpgt_epi32(ax, _mm256_set1_epi32(0x43e00000 - 1)));
  code = _mm256_blendv_epi8(code, _mm256_set1_epi32(0x7f), _mm256_cmpgt_epi32(ax, _mm256_set1_epi32(int(kInfBits))));
  return _mm256_or_si256(code, sign);
}

// f32ToBf16 on eight lanes, as int32 holding the 16 bits.
inline __m256i bf16Bits8(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i ax = _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff));
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd)), 16);
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  return _mm256_blendv_epi8(rounded, quiet, _mm256_cmpgt_epi32(ax, _mm256_set1_epi32(int(kInfBits))));
}

// ---- encode ---------------------------------------------------------------------------------------------------------

// Lane-wise maxima of |v| bits over the first m8 (a multiple of 8) values of a block starting at k0.
template <DType D, bool kDiv>
__attribute__((always_inline)) inline __m256i absMaxLanes(const void* src, size_t k0, size_t m8, float div) {
  const __m256 vdiv = _mm256_set1_ps(div);
  const __m256i mask = _mm256_set1_epi32(0x7fffffff);
  __m256i m0 = _mm256_setzero_si256(), m1 = _mm256_setzero_si256();
  size_t j = 0;
  for (; j + 16 <= m8; j += 16) {
    m0 = _mm256_max_epu32(m0, _mm256_and_si256(_mm256_castps_si256(value8<D, kDiv>(src, k0 + j, vdiv)), mask));
    m1 = _mm256_max_epu32(m1, _mm256_and_si256(_mm256_castps_si256(value8<D, kDiv>(src, k0 + j + 8, vdiv)), mask));
  }
  if (j < m8)
    m0 = _mm256_max_epu32(m0, _mm256_and_si256(_mm256_castps_si256(value8<D, kDiv>(src, k0 + j, vdiv)), mask));
  return _mm256_max_epu32(m0, m1);
}

inline uint32_t maxOfLanes(__m256i m) {
  __m128i h = _mm_max_epu32(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
  h = _mm_max_epu32(h, _mm_shuffle_epi32(h, 0x4e));
  h = _mm_max_epu32(h, _mm_shuffle_epi32(h, 0xb1));
  return uint32_t(_mm_cvtsi128_si32(h));
}

// r[k] = the maximum of the lanes of v[k], for eight vectors (a transposing reduction).
inline __m256i maxOfLanes8(const __m256i v[8]) {
  auto quad = [](__m256i a, __m256i b, __m256i c, __m256i d) {
    const __m256i ab = _mm256_max_epu32(_mm256_unpacklo_epi32(a, b), _mm256_unpackhi_epi32(a, b));
    const __m256i cd = _mm256_max_epu32(_mm256_unpacklo_epi32(c, d), _mm256_unpackhi_epi32(c, d));
    // Per 128-bit lane: the maxima of a, b, c, d over that lane's four values.
    return _mm256_max_epu32(_mm256_unpacklo_epi64(ab, cd), _mm256_unpackhi_epi64(ab, cd));
  };
  const __m256i lo = quad(v[0], v[1], v[2], v[3]), hi = quad(v[4], v[5], v[6], v[7]);
  return _mm256_max_epu32(_mm256_permute2x128_si256(lo, hi, 0x20), _mm256_permute2x128_si256(lo, hi, 0x31));
}

// blockScale (codec_impl.h) of eight blocks at once, from their absolute-maximum bits: the same divisions, the
// same float16 rounding (VCVTPS2PH rounds to nearest even as f32ToHalf does), the same bump, clamps and NaN rules.
template <Codec C>
inline void blockScales8(__m256i amax, uint32_t wire[8], float scale[8], uint32_t live[8]) {
  const __m256i nonFinite = _mm256_cmpgt_epi32(amax, _mm256_set1_epi32(int(kInfBits) - 1));
  const __m256i zero = _mm256_cmpeq_epi32(amax, _mm256_setzero_si256());
  const __m256 a = _mm256_castsi256_ps(amax);
  __m256i w, dead;
  __m256 s;
  if constexpr (C == Codec::kInt4) {
    const __m256 t = _mm256_div_ps(a, _mm256_set1_ps(7.0f));
    __m128i h = _mm256_cvtps_ph(t, kRound);
    const __m256i below = _mm256_castps_si256(_mm256_cmp_ps(_mm256_cvtph_ps(h), t, _CMP_LT_OQ));
    h = _mm_sub_epi16(h, _mm_packs_epi32(_mm256_castsi256_si128(below), _mm256_extracti128_si256(below, 1)));
    const __m256i over = _mm256_cvtepi16_epi32(_mm_cmpgt_epi16(h, _mm_set1_epi16(0x7bff)));
    h = _mm_max_epu16(h, _mm_set1_epi16(1));
    s = _mm256_cvtph_ps(h);
    const __m256i nan = _mm256_or_si256(nonFinite, over);
    w = _mm256_blendv_epi8(_mm256_cvtepu16_epi32(h), _mm256_set1_epi32(kHalfNaN), nan);
    dead = _mm256_or_si256(nan, zero);
  } else {
    s = _mm256_div_ps(a, _mm256_set1_ps(C == Codec::kInt8 ? 127.0f : 448.0f));
    s = _mm256_blendv_ps(s, _mm256_castsi256_ps(_mm256_set1_epi32(int(kMinSubnormalBits))),
                         _mm256_cmp_ps(s, _mm256_setzero_ps(), _CMP_EQ_OQ));
    w = _mm256_blendv_epi8(_mm256_castps_si256(s), _mm256_set1_epi32(int(kCanonicalNaN)), nonFinite);
    dead = _mm256_or_si256(nonFinite, zero);
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(wire), _mm256_andnot_si256(zero, w));
  _mm256_storeu_ps(scale, s);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(live), _mm256_andnot_si256(dead, _mm256_set1_epi32(-1)));
}

// The payload of one live block: values k0 .. k0 + m of src with scale s, into p.
template <DType D, bool kDiv, Codec C>
__attribute__((always_inline)) inline void quantizeBlock(const void* src, size_t k0, size_t m, float div, float s,
                                                         uint8_t* p) {
  const __m256 vdiv = _mm256_set1_ps(div), vs = _mm256_set1_ps(s);
  auto v8 = [&](size_t j) { return value8<D, kDiv>(src, k0 + j, vdiv); };
  auto v1 = [&](size_t j) { return divided(loadAs<D>(src, k0 + j), div, kDiv); };
  size_t j = 0;
  if constexpr (C == Codec::kInt8) {
    const __m256 lim = _mm256_set1_ps(127.0f);
    for (; j + 32 <= m; j += 32) {
      const __m256i r = packBytes32<false>(intCodes8(v8(j), vs, lim), intCodes8(v8(j + 8), vs, lim),
                                           intCodes8(v8(j + 16), vs, lim), intCodes8(v8(j + 24), vs, lim));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j), r);
    }
    for (; j + 8 <= m; j += 8)
      _mm_storel_epi64(reinterpret_cast<__m128i*>(p + j), packBytes8<false>(intCodes8(v8(j), vs, lim)));
    for (; j < m; ++j) p[j] = int8Code(v1(j), s);
  } else if constexpr (C == Codec::kFp8) {
    for (; j + 32 <= m; j += 32) {
      const __m256i r = packBytes32<true>(
          e4m3Codes8(_mm256_div_ps(v8(j), vs)), e4m3Codes8(_mm256_div_ps(v8(j + 8), vs)),
          e4m3Codes8(_mm256_div_ps(v8(j + 16), vs)), e4m3Codes8(_mm256_div_ps(v8(j + 24), vs)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j), r);
    }
    for (; j + 8 <= m; j += 8)
      _mm_storel_epi64(reinterpret_cast<__m128i*>(p + j), packBytes8<true>(e4m3Codes8(_mm256_div_ps(v8(j), vs))));
    for (; j < m; ++j) p[j] = fp8Code(v1(j), s);
  } else {
    static_assert(C == Codec::kInt4, "integer and fp8 codecs");
    const __m256 lim = _mm256_set1_ps(7.0f);
    for (; j + 32 <= m; j += 32) {
      const __m256i r = packBytes32<false>(intCodes8(v8(j), vs, lim), intCodes8(v8(j + 8), vs, lim),
                                           intCodes8(v8(j + 16), vs, lim), intCodes8(v8(j + 24), vs, lim));
      const __m128i lo = nibblePairs(_mm256_castsi256_si128(r)), hi = nibblePairs(_mm256_extracti128_si256(r, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p + j / 2), _mm_unpacklo_epi64(lo, hi));
    }
    for (; j + 8 <= m; j += 8) {
      const uint32_t four = uint32_t(_mm_cvtsi128_si32(nibblePairs(packBytes8<false>(intCodes8(v8(j), vs, lim)))));
      std::memcpy(p + j / 2, &four, 4);
    }
    for (; j + 1 < m; j += 2) p[j / 2] = uint8_t(int4Code(v1(j), s) | int4Code(v1(j + 1), s) << 4);
    if (j < m) p[j / 2] = int4Code(v1(j), s);
  }
}

// Blocks up to this size go eight at a time while eight whole blocks remain: the absolute maxima of eight blocks are
// reduced together and their scales computed in one vector, so the per-block scalar work (a horizontal maximum, a
// division, int4's float16 rounding) neither dominates small blocks nor serializes them. The eight blocks' input
// (at most 8 KiB of float32) is still in L1 when the second pass reads it.
constexpr uint32_t kGroupMaxBlock = 256;

// kBlock != 0: the block size as a constant (the default blocks), so the per-block loops unroll completely.
template <DType D, bool kDiv, Codec C, uint32_t kBlock>
void encodeBlocks(uint32_t blockArg, const void* src, size_t n, float div, uint8_t* dst) {
  const uint32_t block = kBlock ? kBlock : blockArg;
  const size_t stride = wireBlockBytes(C, block);
  size_t k0 = 0;
  if (block <= kGroupMaxBlock) {
    for (; n - k0 >= 8 * size_t(block); k0 += 8 * size_t(block), dst += 8 * stride) {
      __m256i lanes[8];
      for (int g = 0; g < 8; ++g) lanes[g] = absMaxLanes<D, kDiv>(src, k0 + g * size_t(block), block, div);
      alignas(32) uint32_t wire[8], live[8];
      alignas(32) float scale[8];
      blockScales8<C>(maxOfLanes8(lanes), wire, scale, live);
      for (int g = 0; g < 8; ++g) {
        uint8_t* out = dst + g * stride;
        writeScale(C, out, wire[g]);
        if (live[g]) quantizeBlock<D, kDiv, C>(src, k0 + g * size_t(block), block, div, scale[g], out + scaleBytes(C));
        else std::memset(out + scaleBytes(C), 0, payloadBytes(C, block));
      }
    }
  }
  for (; k0 < n; k0 += block, dst += stride) {
    const size_t m = std::min<size_t>(block, n - k0), m8 = m & ~size_t(7);
    uint32_t amax = maxOfLanes(absMaxLanes<D, kDiv>(src, k0, m8, div));
    for (size_t j = m8; j < m; ++j) amax = std::max(amax, absBits(divided(loadAs<D>(src, k0 + j), div, kDiv)));
    const BlockScale bs = blockScale(C, amax);
    writeScale(C, dst, bs.wire);
    uint8_t* p = dst + scaleBytes(C);
    if (bs.live) quantizeBlock<D, kDiv, C>(src, k0, m, div, bs.s, p);
    else std::memset(p, 0, payloadBytes(C, m));
  }
}

template <DType D, bool kDiv>
void encodeBf16(const void* src, size_t n, float div, uint8_t* dst) {
  const __m256 vdiv = _mm256_set1_ps(div);
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i w = _mm256_packus_epi32(bf16Bits8(value8<D, kDiv>(src, i, vdiv)),
                                          bf16Bits8(value8<D, kDiv>(src, i + 8, vdiv)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 2 * i), _mm256_permute4x64_epi64(w, 0xd8));
  }
  for (; i < n; ++i) storeLe16(dst + 2 * i, f32ToBf16(divided(loadAs<D>(src, i), div, kDiv)));
}

template <DType D, bool kDiv>
void encodeTyped(Codec c, uint32_t block, const void* src, size_t n, float div, uint8_t* dst) {
  switch (c) {
    case Codec::kInt8:
      if (block == 256) return encodeBlocks<D, kDiv, Codec::kInt8, 256>(block, src, n, div, dst);
      return encodeBlocks<D, kDiv, Codec::kInt8, 0>(block, src, n, div, dst);
    case Codec::kInt4:
      if (block == 32) return encodeBlocks<D, kDiv, Codec::kInt4, 32>(block, src, n, div, dst);
      return encodeBlocks<D, kDiv, Codec::kInt4, 0>(block, src, n, div, dst);
    case Codec::kFp8:
      if (block == 256) return encodeBlocks<D, kDiv, Codec::kFp8, 256>(block, src, n, div, dst);
      return encodeBlocks<D, kDiv, Codec::kFp8, 0>(block, src, n, div, dst);
    default: return encodeBf16<D, kDiv>(src, n, div, dst);
  }
}

template <DType D>
void encodeDtype(Codec c, uint32_t block, const void* src, size_t n, float div, uint8_t* dst) {
  if (div == 1.0f) encodeTyped<D, false>(c, block, src, n, div, dst);
  else encodeTyped<D, true>(c, block, src, n, div, dst);
}

void encodeAvx2(Codec c, uint32_t block, DType dt, const void* src, size_t n, float div, void* dst) {
  auto* d = static_cast<uint8_t*>(dst);
  switch (dt) {
    case DType::kFloat32: return encodeDtype<DType::kFloat32>(c, block, src, n, div, d);
    case DType::kBFloat16: return encodeDtype<DType::kBFloat16>(c, block, src, n, div, d);
    default: return encodeDtype<DType::kFloat16>(c, block, src, n, div, d);
  }
}

// ---- decode ---------------------------------------------------------------------------------------------------------

inline __m256 canonical8(__m256 v) {
  const __m256 nan = _mm256_castsi256_ps(_mm256_set1_epi32(int(kCanonicalNaN)));
  return _mm256_blendv_ps(v, nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}

// Where decoded values go (eight at a time or one): stored as D, or added to a float32 accumulator.
template <DType D>
struct Store {
  void* dst;
  void put8(size_t i, __m256 v) const {
    char* d = static_cast<char*>(dst);
    if constexpr (D == DType::kFloat32) {
      _mm256_storeu_ps(reinterpret_cast<float*>(d + 4 * i), v);
    } else if constexpr (D == DType::kBFloat16) {
      const __m256i b = bf16Bits8(v);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + 2 * i),
                       _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1)));
    } else {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + 2 * i), _mm256_cvtps_ph(v, kRound));  // as f32ToHalf
    }
  }
  void put1(size_t i, float v) const { storeAs<D>(dst, i, v); }
};
struct Accumulate {
  float* acc;
  void put8(size_t i, __m256 v) const {
    _mm256_storeu_ps(acc + i, canonical8(_mm256_add_ps(_mm256_loadu_ps(acc + i), v)));
  }
  void put1(size_t i, float v) const { acc[i] = accumulate(acc[i], v); }
};

template <Codec C>
inline __m256 decode8(const uint8_t* p, size_t j, __m256 s);  // values j .. j + 8 of a block's payload p

template <>
inline __m256 decode8<Codec::kInt8>(const uint8_t* p, size_t j, __m256 s) {
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + j));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), s);
}
template <>
inline __m256 decode8<Codec::kFp8>(const uint8_t* p, size_t j, __m256 s) {
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + j)));
  const __m256i e = _mm256_and_si256(b, _mm256_set1_epi32(0x7f));
  const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x80)), 24);
  const __m256 normal = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_slli_epi32(e, 20), _mm256_set1_epi32(120 << 23)));
  const __m256 small = _mm256_mul_ps(_mm256_cvtepi32_ps(e), _mm256_set1_ps(0.001953125f));  // e * 2^-9, exact
  __m256 f = _mm256_blendv_ps(normal, small, _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(8), e)));
  f = _mm256_or_ps(f, _mm256_castsi256_ps(sign));
  const __m256i nan = _mm256_cmpeq_epi32(e, _mm256_set1_epi32(0x7f));
  f = _mm256_blendv_ps(f, _mm256_castsi256_ps(_mm256_set1_epi32(int(kCanonicalNaN))), _mm256_castsi256_ps(nan));
  return canonical8(_mm256_mul_ps(f, s));
}
// Eight 4-bit codes (in the low nibbles of `bytes`, in order) as float32 times s.
inline __m256 int4Times(__m128i bytes, __m256 s) {
  const __m128i signExtended = _mm_sub_epi8(_mm_xor_si128(bytes, _mm_set1_epi8(8)), _mm_set1_epi8(8));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(signExtended)), s);
}
// The nibbles of the low eight bytes of x, in order (low nibble first), one per byte.
inline __m128i splitNibbles(__m128i x) {
  const __m128i lo = _mm_and_si128(x, _mm_set1_epi8(0x0f));
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(x, 4), _mm_set1_epi8(0x0f));
  return _mm_unpacklo_epi8(lo, hi);
}

// kBlock != 0: the block size as a constant (the default blocks), as for encodeBlocks.
template <Codec C, uint32_t kBlock, typename Out>
void decodeBlocks(uint32_t blockArg, const uint8_t* src, size_t n, const Out& out) {
  const uint32_t block = kBlock ? kBlock : blockArg;
  const size_t stride = wireBlockBytes(C, block);
  for (size_t k0 = 0; k0 < n; k0 += block, src += stride) {
    const size_t m = std::min<size_t>(block, n - k0);
    // int4: the float16 scale widened by VCVTPH2PS (exact, NaNs as halfToF32).
    const float s = C == Codec::kInt4 ? _cvtsh_ss(uint16_t(loadLe16(src))) : readScale(C, src);
    const uint8_t* p = src + scaleBytes(C);
    size_t j = 0;
    if (!scaleIsFinite(s)) {
      const float nan = floatOf(kCanonicalNaN);
      for (; j + 8 <= m; j += 8) out.put8(k0 + j, _mm256_set1_ps(nan));
      for (; j < m; ++j) out.put1(k0 + j, nan);
      continue;
    }
    const __m256 vs = _mm256_set1_ps(s);
    if constexpr (C == Codec::kInt4) {
      for (; j + 32 <= m; j += 32) {
        const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + j / 2));
        const __m128i lo = _mm_and_si128(x, _mm_set1_epi8(0x0f));
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(x, 4), _mm_set1_epi8(0x0f));
        const __m128i first = _mm_unpacklo_epi8(lo, hi), second = _mm_unpackhi_epi8(lo, hi);
        out.put8(k0 + j, int4Times(first, vs));
        out.put8(k0 + j + 8, int4Times(_mm_srli_si128(first, 8), vs));
        out.put8(k0 + j + 16, int4Times(second, vs));
        out.put8(k0 + j + 24, int4Times(_mm_srli_si128(second, 8), vs));
      }
      for (; j + 16 <= m; j += 16) {
        const __m128i codes = splitNibbles(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + j / 2)));
        out.put8(k0 + j, int4Times(codes, vs));
        out.put8(k0 + j + 8, int4Times(_mm_srli_si128(codes, 8), vs));
      }
      for (; j + 8 <= m; j += 8) {
        uint32_t four;
        std::memcpy(&four, p + j / 2, 4);
        out.put8(k0 + j, int4Times(splitNibbles(_mm_cvtsi32_si128(int(four))), vs));
      }
      for (; j < m; ++j) out.put1(k0 + j, int4Value(p[j / 2] >> (4 * (j & 1)), s));
    } else {
      for (; j + 8 <= m; j += 8) out.put8(k0 + j, decode8<C>(p, j, vs));
      for (; j < m; ++j) out.put1(k0 + j, C == Codec::kInt8 ? int8Value(p[j], s) : fp8Value(p[j], s));
    }
  }
}

template <typename Out>
void decodeBf16(const uint8_t* src, size_t n, const Out& out) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 2 * i));
    out.put8(i, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
  }
  for (; i < n; ++i) out.put1(i, bf16ToF32(uint16_t(loadLe16(src + 2 * i))));
}

template <typename Out>
void decodeTo(Codec c, uint32_t block, const void* src, size_t n, const Out& out) {
  const auto* s = static_cast<const uint8_t*>(src);
  switch (c) {
    case Codec::kInt8:
      if (block == 256) return decodeBlocks<Codec::kInt8, 256>(block, s, n, out);
      return decodeBlocks<Codec::kInt8, 0>(block, s, n, out);
    case Codec::kInt4:
      if (block == 32) return decodeBlocks<Codec::kInt4, 32>(block, s, n, out);
      return decodeBlocks<Codec::kInt4, 0>(block, s, n, out);
    case Codec::kFp8:
      if (block == 256) return decodeBlocks<Codec::kFp8, 256>(block, s, n, out);
      return decodeBlocks<Codec::kFp8, 0>(block, s, n, out);
    default: return decodeBf16(s, n, out);
  }
}

void decodeAccumulateAvx2(Codec c, uint32_t block, const void* src, size_t n, float* acc) {
  decodeTo(c, block, src, n, Accumulate{acc});
}

void decodeAvx2(Codec c, uint32_t block, const void* src, size_t n, DType dt, void* dst) {
  switch (dt) {
    case DType::kFloat32: return decodeTo(c, block, src, n, Store<DType::kFloat32>{dst});
    case DType::kBFloat16: return decodeTo(c, block, src, n, Store<DType::kBFloat16>{dst});
    default: return decodeTo(c, block, src, n, Store<DType::kFloat16>{dst});
  }
}

}  // namespace

namespace detail {
Kernels avx2Kernels() { return Kernels{encodeAvx2, decodeAccumulateAvx2, decodeAvx2}; }
}  // namespace detail

}  // namespace codec
}  // namespace plait
