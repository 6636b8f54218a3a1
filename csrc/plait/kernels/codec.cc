// Codec API (codec.h): argument checks, the choice of instruction set, and the scalar kernels. Built with
// -ffp-contract=off: the arithmetic of codec_impl.h must round after every operation.
#include "plait/kernels/codec.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "plait/kernels/codec_impl.h"
#include "plait/kernels/reduce.h"

namespace plait {
namespace codec {

namespace {

const char* const kNames[kCodecCount] = {"none", "int8", "int4", "fp8", "bf16"};

bool validCodec(Codec c) { return unsigned(c) < unsigned(kCodecCount); }

// The Spec an encoding function works with: a real codec (not kNone) and a valid block, 0 resolved to the default.
Spec checked(const Spec& s, const char* who) {
  PLAIT_CHECK(validCodec(s.codec), who, ": invalid codec code ", unsigned(s.codec));
  PLAIT_CHECK(s.codec != Codec::kNone, who, ": codec none has no wire format (int8, int4, fp8 or bf16)");
  return makeSpec(s.codec, s.block);
}

// ---- scalar kernels -------------------------------------------------------------------------------------------------

template <DType D>
void encodeTyped(Codec c, uint32_t block, const void* src, size_t n, float div, uint8_t* dst) {
  const bool withDiv = div != 1.0f;
  if (c == Codec::kBf16) {
    for (size_t i = 0; i < n; ++i) storeLe16(dst + 2 * i, f32ToBf16(divided(loadAs<D>(src, i), div, withDiv)));
    return;
  }
  const size_t stride = wireBlockBytes(c, block);
  for (size_t k0 = 0; k0 < n; k0 += block, dst += stride) {
    const size_t m = std::min<size_t>(block, n - k0);
    uint32_t amax = 0;
    for (size_t j = 0; j < m; ++j) amax = std::max(amax, absBits(divided(loadAs<D>(src, k0 + j), div, withDiv)));
    const BlockScale bs = blockScale(c, amax);
    writeScale(c, dst, bs.wire);
    uint8_t* p = dst + scaleBytes(c);
    if (!bs.live) {
      std::memset(p, 0, payloadBytes(c, m));
      continue;
    }
    auto v = [&](size_t j) { return divided(loadAs<D>(src, k0 + j), div, withDiv); };
    if (c == Codec::kInt8) {
      for (size_t j = 0; j < m; ++j) p[j] = int8Code(v(j), bs.s);
    } else if (c == Codec::kFp8) {
      for (size_t j = 0; j < m; ++j) p[j] = fp8Code(v(j), bs.s);
    } else {
      for (size_t j = 0; j + 1 < m; j += 2) p[j / 2] = uint8_t(int4Code(v(j), bs.s) | int4Code(v(j + 1), bs.s) << 4);
      if (m & 1) p[m / 2] = int4Code(v(m - 1), bs.s);
    }
  }
}

void encodeScalar(Codec c, uint32_t block, DType dt, const void* src, size_t n, float div, void* dst) {
  auto* d = static_cast<uint8_t*>(dst);
  switch (dt) {
    case DType::kFloat32: return encodeTyped<DType::kFloat32>(c, block, src, n, div, d);
    case DType::kBFloat16: return encodeTyped<DType::kBFloat16>(c, block, src, n, div, d);
    default: return encodeTyped<DType::kFloat16>(c, block, src, n, div, d);
  }
}

// Where decoded values go: stored as D, or added to a float32 accumulator.
template <DType D>
struct Store {
  void* dst;
  void operator()(size_t i, float v) const { storeAs<D>(dst, i, v); }
};
struct Accumulate {
  float* acc;
  void operator()(size_t i, float v) const { acc[i] = accumulate(acc[i], v); }
};

template <typename Out>
void decodeTo(Codec c, uint32_t block, const uint8_t* src, size_t n, Out out) {
  if (c == Codec::kBf16) {
    for (size_t i = 0; i < n; ++i) out(i, bf16ToF32(uint16_t(loadLe16(src + 2 * i))));
    return;
  }
  const size_t stride = wireBlockBytes(c, block);
  for (size_t k0 = 0; k0 < n; k0 += block, src += stride) {
    const size_t m = std::min<size_t>(block, n - k0);
    const float s = readScale(c, src);
    const uint8_t* p = src + scaleBytes(c);
    if (!scaleIsFinite(s)) {
      for (size_t j = 0; j < m; ++j) out(k0 + j, floatOf(kCanonicalNaN));
    } else if (c == Codec::kInt8) {
      for (size_t j = 0; j < m; ++j) out(k0 + j, int8Value(p[j], s));
    } else if (c == Codec::kFp8) {
      for (size_t j = 0; j < m; ++j) out(k0 + j, fp8Value(p[j], s));
    } else {
      for (size_t j = 0; j < m; ++j) out(k0 + j, int4Value(p[j / 2] >> (4 * (j & 1)), s));
    }
  }
}

void decodeAccumulateScalar(Codec c, uint32_t block, const void* src, size_t n, float* acc) {
  decodeTo(c, block, static_cast<const uint8_t*>(src), n, Accumulate{acc});
}

void decodeScalar(Codec c, uint32_t block, const void* src, size_t n, DType dt, void* dst) {
  const auto* s = static_cast<const uint8_t*>(src);
  switch (dt) {
    case DType::kFloat32: return decodeTo(c, block, s, n, Store<DType::kFloat32>{dst});
    case DType::kBFloat16: return decodeTo(c, block, s, n, Store<DType::kBFloat16>{dst});
    default: return decodeTo(c, block, s, n, Store<DType::kFloat16>{dst});
  }
}

// ---- the implementation this process runs ---------------------------------------------------------------------------

struct Choice {
  detail::Kernels k = detail::scalarKernels();
  const char* isa = "scalar";
  Choice() {
#if defined(__x86_64__)
    __builtin_cpu_init();
    // PLAIT_KERNELS=scalar forces the portable kernels, as for the reduction kernels (the tests run both).
    const bool forceScalar = knobs().kernels == "scalar";
    if (!forceScalar && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") &&
        __builtin_cpu_supports("fma")) {
      k = detail::avx2Kernels();
      isa = "avx2";
    }
#endif
  }
};
const Choice& choice() {
  static const Choice c;
  return c;
}

}  // namespace

namespace detail {
Kernels scalarKernels() { return Kernels{encodeScalar, decodeAccumulateScalar, decodeScalar}; }
}  // namespace detail

const char* codecName(Codec c) { return validCodec(c) ? kNames[int(c)] : "?"; }

Codec parseCodec(const std::string& s) {
  for (int i = 0; i < kCodecCount; ++i)
    if (s == kNames[i]) return Codec(i);
  throw Error(cat("plait: unknown codec '", s, "' (valid: none, int8, int4, fp8, bf16)"));
}

uint32_t defaultBlock(Codec c) { return defaultBlockOf(c); }

Spec makeSpec(Codec c, uint32_t block) {
  PLAIT_CHECK(validCodec(c), "plait: invalid codec code ", unsigned(c));
  if (c == Codec::kNone) {
    PLAIT_CHECK(block == 0, "plait: codec none takes no block size (got block ", block, ")");
    return Spec{c, 0};
  }
  if (block == 0) return Spec{c, defaultBlock(c)};
  PLAIT_CHECK(validBlock(block), "plait: codec ", codecName(c), " block ", block,
              " is invalid: a block must be a multiple of 8 in [8, ", kMaxBlock, "] (0: the default, ",
              defaultBlock(c), ")");
  return Spec{c, block};
}

size_t blockBytes(const Spec& s) {
  const Spec r = checked(s, "plait::codec::blockBytes");
  return wireBlockBytes(r.codec, r.block);
}

size_t encodedBytes(const Spec& s, size_t n) {
  const Spec r = checked(s, "plait::codec::encodedBytes");
  const size_t full = n / r.block, rest = n % r.block;
  return full * wireBlockBytes(r.codec, r.block) + (rest ? scaleBytes(r.codec) + payloadBytes(r.codec, rest) : 0);
}

bool codecSupports(DType dt) { return dt == DType::kFloat32 || dt == DType::kBFloat16 || dt == DType::kFloat16; }

void encode(const Spec& s, DType dt, const void* src, size_t n, float div, void* dst) {
  const char* who = "plait::codec::encode";
  const Spec r = checked(s, who);
  PLAIT_CHECK(dt < DType::kCount && codecSupports(dt), who, ": codec ", codecName(r.codec), " cannot encode dtype ",
              dt < DType::kCount ? dtypeName(dt) : "?", " (float32, bfloat16 or float16)");
  PLAIT_CHECK(div == 1.0f || (std::isfinite(div) && div != 0.0f), who, ": div must be finite and nonzero, got ", div);
  if (n == 0) return;
  PLAIT_CHECK(src != nullptr && dst != nullptr, who, ": null buffer for ", n, " values");
  IeeeFpScope mode;
  choice().k.encode(r.codec, r.block, dt, src, n, div, dst);
}

void decodeAccumulate(const Spec& s, const void* src, size_t n, float* acc) {
  const char* who = "plait::codec::decodeAccumulate";
  const Spec r = checked(s, who);
  if (n == 0) return;
  PLAIT_CHECK(src != nullptr && acc != nullptr, who, ": null buffer for ", n, " values");
  IeeeFpScope mode;
  choice().k.decodeAccumulate(r.codec, r.block, src, n, acc);
}

void decode(const Spec& s, const void* src, size_t n, DType dt, void* dst) {
  const char* who = "plait::codec::decode";
  const Spec r = checked(s, who);
  PLAIT_CHECK(dt < DType::kCount && codecSupports(dt), who, ": codec ", codecName(r.codec), " cannot decode to dtype ",
              dt < DType::kCount ? dtypeName(dt) : "?", " (float32, bfloat16 or float16)");
  if (n == 0) return;
  PLAIT_CHECK(src != nullptr && dst != nullptr, who, ": null buffer for ", n, " values");
  IeeeFpScope mode;
  choice().k.decode(r.codec, r.block, src, n, dt, dst);
}

const char* codecIsa() { return choice().isa; }

}  // namespace codec
}  // namespace plait
