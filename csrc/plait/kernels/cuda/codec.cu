// CUDA codec kernels (cuda/kernels.h; wire format and rules: kernels/codec.h). Every scale, code and decoded value
// comes from codec_impl.h, the functions the CPU kernels use, so the bytes and decoded bits equal the CPU's. Built
// with --fmad=false as well: codec_impl.h already uses the never-contracted __fmul_rn / __fadd_rn / __fdiv_rn on
// the device, the flag keeps any other arithmetic here from being fused.
//
// Block codecs (int8, int4, fp8): one warp per codec block, a grid-stride loop over the blocks. The warp's lanes
// read the block's values (lane, lane + 32, ...) for the absolute maximum of their bit patterns, combine the lanes'
// maxima with shuffles (an integer max: any order gives the CPU's answer), and every lane derives the same scale
// from it; lane 0 writes the scale, each lane quantizes and writes its own bytes (int4: its own pairs of values).
// Decoding is the same shape: each lane reads the scale and decodes its values. bf16 is element-wise.
//
// Encoded buffers are read and written byte by byte (blocks start at any byte offset); value buffers must be aligned
// to their element (else cudaErrorInvalidValue, nothing enqueued).
#include <cuda_runtime.h>

#include <cstdint>

#include "plait/kernels/codec_impl.h"
#include "plait/kernels/cuda/kernels.h"

namespace plait {
namespace cuda {
namespace {

using codec::Codec;

constexpr int kThreads = 256;  // per thread block: 8 warps, 8 codec blocks at a time
constexpr int kBlocksPerSm = 8;        // grid cap: smCount() * kBlocksPerSm thread blocks
constexpr int kFallbackBlocks = 1024;  // grid cap when the multiprocessor count is unknown

__device__ __forceinline__ size_t warpIndex() { return (size_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32; }
__device__ __forceinline__ size_t warpCount() { return size_t(gridDim.x) * blockDim.x / 32; }

__device__ __forceinline__ uint32_t warpMax(uint32_t v) {
#pragma unroll
  for (int d = 16; d > 0; d /= 2) {
    const uint32_t o = __shfl_xor_sync(0xffffffffu, v, d);
    v = o > v ? o : v;
  }
  return v;
}

template <DType D, bool kDiv>
__device__ __forceinline__ float valueAt(const void* src, size_t i, float div) {
  return codec::divided(codec::loadAs<D>(src, i), div, kDiv);
}

template <DType D, bool kDiv, Codec C>
__global__ void __launch_bounds__(kThreads) encodeKernel(const void* src, size_t n, uint32_t block, float div,
                                                         uint8_t* dst) {
  const uint32_t lane = threadIdx.x & 31;
  const size_t blocks = (n + block - 1) / block;
  const size_t stride = codec::wireBlockBytes(C, block);
  for (size_t k = warpIndex(); k < blocks; k += warpCount()) {  // uniform across the warp
    const size_t k0 = k * block;
    const uint32_t m = n - k0 < block ? uint32_t(n - k0) : block;
    uint32_t amax = 0;
    for (uint32_t j = lane; j < m; j += 32) {
      const uint32_t b = codec::absBits(valueAt<D, kDiv>(src, k0 + j, div));
      amax = b > amax ? b : amax;
    }
    const codec::BlockScale bs = codec::blockScale(C, warpMax(amax));
    uint8_t* out = dst + k * stride;
    if (lane == 0) codec::writeScale(C, out, bs.wire);
    uint8_t* p = out + codec::scaleBytes(C);
    const uint32_t bytes = uint32_t(codec::payloadBytes(C, m));
    if (!bs.live) {
      for (uint32_t j = lane; j < bytes; j += 32) p[j] = 0;
    } else if constexpr (C == Codec::kInt4) {
      for (uint32_t j = lane; j < bytes; j += 32) {
        const uint32_t lo = codec::int4Code(valueAt<D, kDiv>(src, k0 + 2 * j, div), bs.s);
        const uint32_t hi = 2 * j + 1 < m ? codec::int4Code(valueAt<D, kDiv>(src, k0 + 2 * j + 1, div), bs.s) : 0u;
        p[j] = uint8_t(lo | hi << 4);
      }
    } else {
      for (uint32_t j = lane; j < m; j += 32) {
        const float v = valueAt<D, kDiv>(src, k0 + j, div);
        p[j] = C == Codec::kInt8 ? codec::int8Code(v, bs.s) : codec::fp8Code(v, bs.s);
      }
    }
  }
}

template <DType D, bool kDiv>
__global__ void __launch_bounds__(kThreads) encodeBf16Kernel(const void* src, size_t n, float div, uint8_t* dst) {
  const size_t step = size_t(gridDim.x) * blockDim.x;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step)
    codec::storeLe16(dst + 2 * i, codec::f32ToBf16(valueAt<D, kDiv>(src, i, div)));
}

// Where decoded values go: stored as D, or added to a float32 accumulator.
template <DType D>
struct Store {
  void* dst;
  __device__ void operator()(size_t i, float v) const { codec::storeAs<D>(dst, i, v); }
};
struct Accumulate {
  float* acc;
  __device__ void operator()(size_t i, float v) const { acc[i] = codec::accumulate(acc[i], v); }
};

template <Codec C, typename Out>
__global__ void __launch_bounds__(kThreads) decodeKernel(const uint8_t* src, size_t n, uint32_t block, Out out) {
  const uint32_t lane = threadIdx.x & 31;
  const size_t blocks = (n + block - 1) / block;
  const size_t stride = codec::wireBlockBytes(C, block);
  for (size_t k = warpIndex(); k < blocks; k += warpCount()) {
    const size_t k0 = k * block;
    const uint32_t m = n - k0 < block ? uint32_t(n - k0) : block;
    const uint8_t* in = src + k * stride;
    const float s = codec::readScale(C, in);
    const uint8_t* p = in + codec::scaleBytes(C);
    if (!codec::scaleIsFinite(s)) {
      for (uint32_t j = lane; j < m; j += 32) out(k0 + j, codec::floatOf(codec::kCanonicalNaN));
    } else {
      for (uint32_t j = lane; j < m; j += 32) {
        float v;
        if constexpr (C == Codec::kInt8) v = codec::int8Value(p[j], s);
        else if constexpr (C == Codec::kFp8) v = codec::fp8Value(p[j], s);
        else v = codec::int4Value(uint32_t(p[j / 2]) >> (4 * (j & 1)), s);
        out(k0 + j, v);
      }
    }
  }
}

template <typename Out>
__global__ void __launch_bounds__(kThreads) decodeBf16Kernel(const uint8_t* src, size_t n, Out out) {
  const size_t step = size_t(gridDim.x) * blockDim.x;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step)
    out(i, codec::bf16ToF32(uint16_t(codec::loadLe16(src + 2 * i))));
}

// ---- launching ------------------------------------------------------------------------------------------------------

unsigned gridFor(size_t threads) {
  const int sm = smCount();
  const size_t cap = sm > 0 ? size_t(sm) * kBlocksPerSm : size_t(kFallbackBlocks);
  size_t blocks = (threads + kThreads - 1) / kThreads;
  if (blocks > cap) blocks = cap;
  return unsigned(blocks > 0 ? blocks : 1);
}
// Threads for a codec: a warp per codec block, or a thread per value (bf16).
size_t threadsFor(Codec c, uint32_t block, size_t n) { return c == Codec::kBf16 ? n : (n + block - 1) / block * 32; }

bool validCodec(uint8_t c) { return c >= uint8_t(Codec::kInt8) && c <= uint8_t(Codec::kBf16); }
bool valueType(DType dt) { return dt == DType::kFloat32 || dt == DType::kBFloat16 || dt == DType::kFloat16; }
size_t valueSize(DType dt) { return dt == DType::kFloat32 ? 4 : 2; }

// The checked block (0: the default), or 0 when the arguments are invalid.
uint32_t checkedBlock(uint8_t c, uint32_t block) {
  if (!validCodec(c)) return 0;
  if (block == 0) return codec::defaultBlockOf(Codec(c));
  return codec::validBlock(block) ? block : 0;
}

template <DType D, bool kDiv>
void launchEncode(Codec c, uint32_t block, const void* src, size_t n, float div, uint8_t* dst, cudaStream_t st) {
  const unsigned grid = gridFor(threadsFor(c, block, n));
  switch (c) {
    case Codec::kInt8: encodeKernel<D, kDiv, Codec::kInt8><<<grid, kThreads, 0, st>>>(src, n, block, div, dst); break;
    case Codec::kInt4: encodeKernel<D, kDiv, Codec::kInt4><<<grid, kThreads, 0, st>>>(src, n, block, div, dst); break;
    case Codec::kFp8: encodeKernel<D, kDiv, Codec::kFp8><<<grid, kThreads, 0, st>>>(src, n, block, div, dst); break;
    default: encodeBf16Kernel<D, kDiv><<<grid, kThreads, 0, st>>>(src, n, div, dst); break;
  }
}

template <DType D>
void launchEncodeTyped(Codec c, uint32_t block, const void* src, size_t n, float div, uint8_t* dst, cudaStream_t st) {
  if (div == 1.0f) launchEncode<D, false>(c, block, src, n, div, dst, st);
  else launchEncode<D, true>(c, block, src, n, div, dst, st);
}

template <typename Out>
void launchDecode(Codec c, uint32_t block, const uint8_t* src, size_t n, Out out, cudaStream_t st) {
  const unsigned grid = gridFor(threadsFor(c, block, n));
  switch (c) {
    case Codec::kInt8: decodeKernel<Codec::kInt8><<<grid, kThreads, 0, st>>>(src, n, block, out); break;
    case Codec::kInt4: decodeKernel<Codec::kInt4><<<grid, kThreads, 0, st>>>(src, n, block, out); break;
    case Codec::kFp8: decodeKernel<Codec::kFp8><<<grid, kThreads, 0, st>>>(src, n, block, out); break;
    default: decodeBf16Kernel<<<grid, kThreads, 0, st>>>(src, n, out); break;
  }
}

}  // namespace

int codecEncode(uint8_t codecCode, uint32_t block, DType dt, const void* src, size_t n, float div, void* dst,
                void* stream) {
  block = checkedBlock(codecCode, block);
  if (block == 0 || !valueType(dt)) return int(cudaErrorInvalidValue);
  if (!(div == 1.0f || (codec::absBits(div) < codec::kInfBits && div != 0.0f))) return int(cudaErrorInvalidValue);
  if (n == 0) return 0;
  if (src == nullptr || dst == nullptr || uintptr_t(src) % valueSize(dt) != 0) return int(cudaErrorInvalidValue);
  const Codec c = Codec(codecCode);
  auto* d = static_cast<uint8_t*>(dst);
  const cudaStream_t st = cudaStream_t(stream);
  switch (dt) {
    case DType::kFloat32: launchEncodeTyped<DType::kFloat32>(c, block, src, n, div, d, st); break;
    case DType::kBFloat16: launchEncodeTyped<DType::kBFloat16>(c, block, src, n, div, d, st); break;
    default: launchEncodeTyped<DType::kFloat16>(c, block, src, n, div, d, st); break;
  }
  return int(cudaGetLastError());
}

int codecDecode(uint8_t codecCode, uint32_t block, const void* src, size_t n, DType dt, void* dst, void* stream) {
  block = checkedBlock(codecCode, block);
  if (block == 0 || !valueType(dt)) return int(cudaErrorInvalidValue);
  if (n == 0) return 0;
  if (src == nullptr || dst == nullptr || uintptr_t(dst) % valueSize(dt) != 0) return int(cudaErrorInvalidValue);
  const Codec c = Codec(codecCode);
  const auto* s = static_cast<const uint8_t*>(src);
  const cudaStream_t st = cudaStream_t(stream);
  switch (dt) {
    case DType::kFloat32: launchDecode(c, block, s, n, Store<DType::kFloat32>{dst}, st); break;
    case DType::kBFloat16: launchDecode(c, block, s, n, Store<DType::kBFloat16>{dst}, st); break;
    default: launchDecode(c, block, s, n, Store<DType::kFloat16>{dst}, st); break;
  }
  return int(cudaGetLastError());
}

int codecDecodeAccumulate(uint8_t codecCode, uint32_t block, const void* src, size_t n, float* acc, void* stream) {
  block = checkedBlock(codecCode, block);
  if (block == 0) return int(cudaErrorInvalidValue);
  if (n == 0) return 0;
  if (src == nullptr || acc == nullptr || uintptr_t(acc) % 4 != 0) return int(cudaErrorInvalidValue);
  launchDecode(Codec(codecCode), block, static_cast<const uint8_t*>(src), n, Accumulate{acc}, cudaStream_t(stream));
  return int(cudaGetLastError());
}

}  // namespace cuda
}  // namespace plait
