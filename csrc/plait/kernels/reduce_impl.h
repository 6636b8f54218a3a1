// Kernel bodies, compiled once per instruction set: the including file defines PLAIT_KERNEL_NS (and is built
// with the matching -m flags). Loops are written so the compiler vectorizes them; half types widen to float32.
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "plait/kernels/reduce.h"

#if defined(PLAIT_KERNEL_F16C)
#include <immintrin.h>
#endif


namespace plait {
namespace PLAIT_KERNEL_NS {
namespace {

// Floating-point mode of one kernel call. MXCSR (flush-to-zero, denormals-are-zero, rounding, exception masks) is
// per thread: torch.set_flush_denormal(True) sets it on the caller's thread only, and a reduction runs on the
// caller's thread, the group's worker thread or a helper thread depending on timing and size. Each float kernel
// therefore switches to one fixed mode (IEEE: no FTZ, no DAZ, round to nearest, all exceptions masked) for its
// duration and restores the caller's mode afterwards; reading MXCSR costs a few cycles, writing it happens only
// when the caller's mode differs.
// Defined inside each ISA's anonymous namespace: no inline function is shared between the two builds (ODR).
class IeeeMode {
 public:
#if defined(__x86_64__) || defined(__i386__)
  IeeeMode() {
    asm volatile("stmxcsr %0" : "=m"(saved_));
    const uint32_t want = (saved_ & ~(kFtz | kDaz | kRound)) | kMasks;
    changed_ = want != saved_;
    if (changed_) asm volatile("ldmxcsr %0" : : "m"(want) : "memory");
  }
  ~IeeeMode() {
    if (changed_) asm volatile("ldmxcsr %0" : : "m"(saved_) : "memory");
  }

 private:
  static constexpr uint32_t kFtz = 1u << 15, kDaz = 1u << 6, kRound = 3u << 13, kMasks = 0x3fu << 7;
  uint32_t saved_ = 0;
  bool changed_ = false;
#endif
};

// Sum and product: with two NaN operands x86 returns the first source operand's NaN, and which operand the compiler
// puts first is its choice (it may commute a + b, and did differently in the scalar and AVX2 builds). Pin it: a's NaN
// (made quiet) wins, else b's, so every implementation gives the same bits. a op (isnan(a) ? a : b) does that with
// one arithmetic operation: a NaN a meets itself, anything else meets b. The select is between two loaded values,
// which the compiler turns into a compare and blend and vectorizes.
struct OpSum {
  template <typename T>
  static T f(T a, T b) {
    if constexpr (std::is_floating_point_v<T>) return a + (a != a ? a : b);
    else return a + b;
  }
};
struct OpProd {
  template <typename T>
  static T f(T a, T b) {
    if constexpr (std::is_floating_point_v<T>) return a * (a != a ? a : b);
    else return a * b;
  }
};
struct OpMin { template <typename T> static T f(T a, T b) { return b < a ? b : a; } };
struct OpMax { template <typename T> static T f(T a, T b) { return a < b ? b : a; } };
struct OpBand { template <typename T> static T f(T a, T b) { return a & b; } };
struct OpBor { template <typename T> static T f(T a, T b) { return a | b; } };
struct OpBxor { template <typename T> static T f(T a, T b) { return a ^ b; } };

template <typename T, typename Op>
void plain(void* dst, const void* a, const void* b, size_t n) {
  T* d = static_cast<T*>(dst);
  const T* x = static_cast<const T*>(a);
  const T* y = static_cast<const T*>(b);
  std::conditional_t<std::is_floating_point_v<T>, IeeeMode, char> mode{};
  (void)mode;
  // d may alias x or y exactly (in-place), which is safe element by element.
  for (size_t i = 0; i < n; ++i) d[i] = static_cast<T>(Op::template f<T>(x[i], y[i]));
}

// bool is stored as bytes 0/1: sum/max = or, prod/min = and.
template <typename Op>
void boolean(void* dst, const void* a, const void* b, size_t n) {
  uint8_t* d = static_cast<uint8_t*>(dst);
  const uint8_t* x = static_cast<const uint8_t*>(a);
  const uint8_t* y = static_cast<const uint8_t*>(b);
  for (size_t i = 0; i < n; ++i) d[i] = uint8_t(Op::template f<uint8_t>(x[i] != 0, y[i] != 0) != 0);
}

inline float bf16ToF32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f32ToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);                                        // round to nearest even
  return uint16_t(u >> 16);
}

template <typename Op>
void bf16(void* dst, const void* a, const void* b, size_t n) {
  uint16_t* d = static_cast<uint16_t*>(dst);
  const uint16_t* x = static_cast<const uint16_t*>(a);
  const uint16_t* y = static_cast<const uint16_t*>(b);
  IeeeMode mode;
  for (size_t i = 0; i < n; ++i) d[i] = f32ToBf16(Op::template f<float>(bf16ToF32(x[i]), bf16ToF32(y[i])));
}

// IEEE half <-> float in software (scalar path, and the tails of the F16C path); the F16C build uses the hardware
// conversions for whole vectors. NaNs convert exactly as VCVTPH2PS / VCVTPS2PH do, so both paths give the same bits:
// half -> float keeps sign and payload and sets the quiet bit; float -> half keeps sign and the payload's top ten
// bits and sets the quiet bit.
inline float halfToF32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal
      exp = 127 - 15 + 1;
      while (!(man & 0x400)) { man <<= 1; --exp; }
      man &= 0x3ff;
      u = sign | (exp << 23) | (man << 13);
    }
  } else if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13) | (man ? 0x00400000u : 0u);  // inf, or NaN made quiet
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f32ToHalf(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000;
  uint32_t absu = u & 0x7fffffffu;
  if (absu > 0x7f800000u) return uint16_t(sign | 0x7e00 | ((absu >> 13) & 0x3ff));  // NaN: quiet, payload kept
  if (absu >= 0x477ff000u) return uint16_t(sign | 0x7c00);          // overflow -> inf (>= 65520)
  if (absu < 0x38800000u) {                                          // subnormal or zero
    if (absu < 0x33000000u) return uint16_t(sign);                   // < half of smallest subnormal
    uint32_t exp = absu >> 23, man = (absu & 0x7fffff) | 0x800000;
    uint32_t shift = 126 - exp;                                      // 14..24 (+1 for the implicit bit)
    uint32_t half = man >> shift, rem = man & ((1u << shift) - 1), mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1))) ++half;
    return uint16_t(sign | half);
  }
  uint32_t half = ((absu >> 13) - ((127 - 15) << 10));
  uint32_t rem = absu & 0x1fff;
  if (rem > 0x1000 || (rem == 0x1000 && (half & 1))) ++half;
  return uint16_t(sign | half);
}

#if defined(PLAIT_KERNEL_F16C)
// Op::f on eight floats at once, element for element the same bits as the scalar Op::f above.
template <typename Op>
inline __m256 vectorOp(__m256 a, __m256 b) {
  if constexpr (std::is_same_v<Op, OpSum> || std::is_same_v<Op, OpProd>) {
    const __m256 other = _mm256_blendv_ps(b, a, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));  // isnan(a) ? a : b
    return std::is_same_v<Op, OpSum> ? _mm256_add_ps(a, other) : _mm256_mul_ps(a, other);
  } else if constexpr (std::is_same_v<Op, OpMin>) {
    return _mm256_min_ps(b, a);  // b < a ? b : a
  } else {
    static_assert(std::is_same_v<Op, OpMax>, "fp16 kernels exist for sum, prod, min and max");
    return _mm256_max_ps(b, a);  // b > a ? b : a, i.e. a < b ? b : a
  }
}
#endif

template <typename Op>
void fp16(void* dst, const void* a, const void* b, size_t n) {
  uint16_t* d = static_cast<uint16_t*>(dst);
  const uint16_t* x = static_cast<const uint16_t*>(a);
  const uint16_t* y = static_cast<const uint16_t*>(b);
  IeeeMode mode;
  size_t i = 0;
#if defined(PLAIT_KERNEL_F16C)
  for (; i + 8 <= n; i += 8) {
    __m256 fx = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i)));
    __m256 fy = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(y + i)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i),
                     _mm256_cvtps_ph(vectorOp<Op>(fx, fy), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
#endif
  for (; i < n; ++i) d[i] = f32ToHalf(Op::template f<float>(halfToF32(x[i]), halfToF32(y[i])));
}

template <typename Op, bool kArith>
void fillOp(ReduceFn row[int(DType::kCount)]) {
  if constexpr (kArith) {
    row[int(DType::kFloat32)] = plain<float, Op>;
    row[int(DType::kFloat64)] = plain<double, Op>;
    row[int(DType::kFloat16)] = fp16<Op>;
    row[int(DType::kBFloat16)] = bf16<Op>;
  }
  {
    row[int(DType::kInt8)] = plain<int8_t, Op>;
    row[int(DType::kUInt8)] = plain<uint8_t, Op>;
    row[int(DType::kInt32)] = plain<int32_t, Op>;
    row[int(DType::kInt64)] = plain<int64_t, Op>;
  }
}

}  // namespace

void fill(ReduceFn t[int(RedOp::kCount)][int(DType::kCount)]) {
  fillOp<OpSum, true>(t[int(RedOp::kSum)]);
  fillOp<OpProd, true>(t[int(RedOp::kProd)]);
  fillOp<OpMin, true>(t[int(RedOp::kMin)]);
  fillOp<OpMax, true>(t[int(RedOp::kMax)]);
  fillOp<OpBand, false>(t[int(RedOp::kBand)]);
  fillOp<OpBor, false>(t[int(RedOp::kBor)]);
  fillOp<OpBxor, false>(t[int(RedOp::kBxor)]);
  t[int(RedOp::kSum)][int(DType::kBool)] = boolean<OpBor>;
  t[int(RedOp::kMax)][int(DType::kBool)] = boolean<OpBor>;
  t[int(RedOp::kBor)][int(DType::kBool)] = boolean<OpBor>;
  t[int(RedOp::kProd)][int(DType::kBool)] = boolean<OpBand>;
  t[int(RedOp::kMin)][int(DType::kBool)] = boolean<OpBand>;
  t[int(RedOp::kBand)][int(DType::kBool)] = boolean<OpBand>;
  t[int(RedOp::kBxor)][int(DType::kBool)] = boolean<OpBxor>;
}

}  // namespace PLAIT_KERNEL_NS
}  // namespace plait
