// CUDA kernels of plait (kernels.h): element-wise reduce, copy, and the fused pull (copy or reduce from a peer's
// buffer whose offset and length are read on the device). No torch headers here.
//
// Words used below:
//   element  one value of the dtype as stored (half types: their 16 bits, bool: a byte).
//   vector   16 bytes, 16 / sizeof(element) elements, moved with one uint4 load or store.
//   head     the scalar elements before the first 16-byte boundary of dst (peeled so the body is aligned).
//   body     the whole vectors after the head; tail: the scalar elements after the body.
// The body exists only when every pointer the kernel touches has the same address modulo 16 (then one head length
// aligns them all); otherwise every element takes the scalar path. All kernels run a grid-stride loop over a grid of
// at most 4 blocks per multiprocessor.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <type_traits>

#include "plait/kernels/cuda/kernels.h"
#include "plait/kernels/cuda_info.h"

namespace plait {

namespace cuda {
namespace {

constexpr int kThreads = 256;          // per block
constexpr int kBlocksPerSm = 4;        // grid cap: smCount() * kBlocksPerSm blocks
constexpr int kUnroll = 4;             // vectors in flight per thread and loop trip (loads first, then stores)
constexpr int kFallbackBlocks = 1024;  // grid cap when the multiprocessor count is unknown

// ---- element ops: the CPU's (reduce_impl.h) -------------------------------------------------------------------------

// Sum and product of integers wrap: computed in the unsigned type (no signed overflow), then converted back, which
// is the CPU's static_cast of the promoted result.
template <typename T, bool = std::is_integral<T>::value>
struct ArithOf { using type = T; };
template <typename T>
struct ArithOf<T, true> { using type = std::make_unsigned_t<T>; };
template <typename T>
using Arith = typename ArithOf<T>::type;

struct OpSum { template <typename T> __device__ static T f(T a, T b) { return T(Arith<T>(a) + Arith<T>(b)); } };
struct OpProd { template <typename T> __device__ static T f(T a, T b) { return T(Arith<T>(a) * Arith<T>(b)); } };
struct OpMin { template <typename T> __device__ static T f(T a, T b) { return b < a ? b : a; } };
struct OpMax { template <typename T> __device__ static T f(T a, T b) { return a < b ? b : a; } };
struct OpBand { template <typename T> __device__ static T f(T a, T b) { return a & b; } };
struct OpBor { template <typename T> __device__ static T f(T a, T b) { return a | b; } };
struct OpBxor { template <typename T> __device__ static T f(T a, T b) { return a ^ b; } };
// dst = b: the copy (the pull without reduce); reads no `a`.
struct OpCopy { template <typename T> __device__ static T f(T, T b) { return b; } };

template <typename Op>
constexpr bool kReadsA = !std::is_same<Op, OpCopy>::value;

// ---- element types: how a stored element is combined (T is what memory holds) ---------------------------------------

template <typename S>
struct Plain {  // float, double, the integers; also any type moved bit for bit by OpCopy
  using T = S;
  template <typename Op> __device__ static T apply(T a, T b) { return Op::template f<T>(a, b); }
};
struct Half {  // IEEE binary16: widen to float, one rounding to nearest even
  using T = uint16_t;
  template <typename Op> __device__ static T apply(T a, T b) {
    float r = Op::template f<float>(__half2float(__ushort_as_half(a)), __half2float(__ushort_as_half(b)));
    return __half_as_ushort(__float2half_rn(r));
  }
};
struct BFloat16 {  // bfloat16: widen to float, one rounding to nearest even
  using T = uint16_t;
  template <typename Op> __device__ static T apply(T a, T b) {
    float r =
        Op::template f<float>(__bfloat162float(__ushort_as_bfloat16(a)), __bfloat162float(__ushort_as_bfloat16(b)));
    return __bfloat16_as_ushort(__float2bfloat16_rn(r));
  }
};
struct Bool {  // a byte; any nonzero byte is true, results are 0/1 (sum/max = or, prod/min = and)
  using T = uint8_t;
  template <typename Op> __device__ static T apply(T a, T b) {
    return T(Op::template f<uint8_t>(uint8_t(a != 0), uint8_t(b != 0)) != 0);
  }
};

template <typename E, typename Op>
__device__ __forceinline__ uint4 applyVector(uint4 a, uint4 b) {
  using T = typename E::T;
  constexpr int kV = 16 / sizeof(T);
  union Pack {
    uint4 v;
    T e[kV];
  };
  if constexpr (!kReadsA<Op>) {
    return b;
  } else {
    Pack x, y, r;
    x.v = a;
    y.v = b;
#pragma unroll
    for (int k = 0; k < kV; ++k) r.e[k] = E::template apply<Op>(x.e[k], y.e[k]);
    return r.v;
  }
}

// ---- the one loop every kernel runs ---------------------------------------------------------------------------------

// dst[i] = a[i] op b[i] for i < n, by this thread's share of the grid. dst may alias a or b exactly: a thread reads
// the elements it writes before writing them, and no other thread touches them. For OpCopy `a` is not read.
template <typename E, typename Op>
__device__ __forceinline__ void combine(typename E::T* dst, const typename E::T* a, const typename E::T* b, size_t n) {
  using T = typename E::T;
  constexpr size_t kV = 16 / sizeof(T);
  const uintptr_t d = uintptr_t(dst), x = uintptr_t(a), y = uintptr_t(b);
  size_t head = n, vectors = 0;  // no body: all n elements are scalar
  if (((d ^ y) & 15) == 0 && (!kReadsA<Op> || ((d ^ x) & 15) == 0)) {
    size_t h = ((16 - (d & 15)) & 15) / sizeof(T);  // d is element-aligned, so this is exact
    head = h < n ? h : n;
    vectors = (n - head) / kV;
  }
  const size_t tailStart = head + vectors * kV;
  const size_t tid = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const size_t stride = size_t(gridDim.x) * blockDim.x;

  const uint4* va = reinterpret_cast<const uint4*>(a + head);
  const uint4* vb = reinterpret_cast<const uint4*>(b + head);
  uint4* vd = reinterpret_cast<uint4*>(dst + head);
  for (size_t i0 = tid; i0 < vectors; i0 += kUnroll * stride) {
    uint4 ra[kUnroll] = {}, rb[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const size_t i = i0 + k * stride;
      if (i < vectors) {
        if constexpr (kReadsA<Op>) ra[k] = va[i];
        rb[k] = vb[i];
      }
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const size_t i = i0 + k * stride;
      if (i < vectors) vd[i] = applyVector<E, Op>(ra[k], rb[k]);
    }
  }

  // Head and tail: scalar elements j < head map to j, the rest to tailStart + (j - head).
  const size_t scalars = head + (n - tailStart);
  for (size_t j = tid; j < scalars; j += stride) {
    const size_t i = j < head ? j : tailStart + (j - head);
    dst[i] = E::template apply<Op>(kReadsA<Op> ? a[i] : T(), b[i]);
  }
}

template <typename E, typename Op>
__global__ void __launch_bounds__(kThreads) reduceKernel(typename E::T* dst, const typename E::T* a,
                                                         const typename E::T* b, size_t n) {
  combine<E, Op>(dst, a, b, n);
}

// The descriptor is read once per block (volatile: a peer may have written it after this stream's last kernel).
// A length mismatch, a key mismatch (keyed pulls), or an offset that leaves the source unaligned for its dtype,
// writes nothing and reports errCode once (first reporter wins, from block 0), with what it saw after *err.
template <typename E, typename Op>
__global__ void __launch_bounds__(kThreads) pullKernel(typename E::T* dst, const char* peerBase, const PullDesc* desc,
                                                       size_t bytes, bool keyed, PullKey expect, uint32_t* err,
                                                       uint32_t errCode) {
  using T = typename E::T;
  __shared__ uint64_t offset, length;
  __shared__ uint32_t gotSeq, gotWord;
  if (threadIdx.x == 0) {
    const volatile PullDesc* v = desc;
    offset = v->offset;
    length = v->bytes;
    gotSeq = keyed ? v->key.seq : 0;
    gotWord = keyed ? v->key.word : 0;
  }
  __syncthreads();
  const char* src = peerBase + offset;
  const bool keyBad = keyed && (gotSeq != expect.seq || gotWord != expect.word);
  if (length != bytes || keyBad || uintptr_t(src) % sizeof(T) != 0) {
    // One writer (block 0, thread 0) per kernel, and *err usually lives in mapped host memory, where device
    // atomics need not be supported over PCIe: a plain first-wins store, the record before the code.
    if (blockIdx.x == 0 && threadIdx.x == 0 && err != nullptr) {
      volatile uint32_t* e = err;
      if (*e == 0) {
        if (keyed) {
          e[kErrGotSeq] = gotSeq;
          e[kErrGotWord] = gotWord;
          e[kErrExpSeq] = expect.seq;
          e[kErrExpWord] = expect.word;
          e[kErrGotBytesLo] = uint32_t(length);
          e[kErrGotBytesHi] = uint32_t(length >> 32);
          e[kErrExpBytesLo] = uint32_t(bytes);
          e[kErrExpBytesHi] = uint32_t(uint64_t(bytes) >> 32);
          __threadfence_system();
        }
        *e = errCode;
      }
      __threadfence_system();
    }
    return;
  }
  if (bytes == 0) return;
  combine<E, Op>(dst, dst, reinterpret_cast<const T*>(src), bytes / sizeof(T));
}

// ---- launching ------------------------------------------------------------------------------------------------------

unsigned gridFor(size_t work) {
  const int sm = smCount();
  const size_t cap = sm > 0 ? size_t(sm) * kBlocksPerSm : size_t(kFallbackBlocks);
  size_t blocks = (work + kThreads - 1) / kThreads;
  if (blocks > cap) blocks = cap;
  return unsigned(blocks > 0 ? blocks : 1);
}

// Threads' work: the number of vectors (plus one for a head or tail), whatever the alignment turns out to be.
template <typename T>
size_t workOf(size_t n) {
  return n / (16 / sizeof(T)) + 1;
}

template <typename E, typename Op>
int launchReduce(void* dst, const void* a, const void* b, size_t n, void* stream) {
  using T = typename E::T;
  reduceKernel<E, Op><<<gridFor(workOf<T>(n)), kThreads, 0, cudaStream_t(stream)>>>(
      static_cast<T*>(dst), static_cast<const T*>(a), static_cast<const T*>(b), n);
  return int(cudaGetLastError());
}

template <typename E, typename Op>
int launchPull(void* dst, const char* peerBase, const PullDesc* desc, size_t bytes, bool keyed, PullKey expect,
               uint32_t* err, uint32_t errCode, void* stream) {
  using T = typename E::T;
  pullKernel<E, Op><<<gridFor(workOf<T>(bytes / sizeof(T))), kThreads, 0, cudaStream_t(stream)>>>(
      static_cast<T*>(dst), peerBase, desc, bytes, keyed, expect, err, errCode);
  return int(cudaGetLastError());
}

// ---- dispatch tables by (op, dtype) ---------------------------------------------------------------------------------

using ReduceLaunch = int (*)(void*, const void*, const void*, size_t, void*);
using PullLaunch = int (*)(void*, const char*, const PullDesc*, size_t, bool, PullKey, uint32_t*, uint32_t, void*);

struct Entry {
  ReduceLaunch reduce = nullptr;
  PullLaunch pull = nullptr;  // with reduce
};

struct Tables {
  Entry op[int(RedOp::kCount)][int(DType::kCount)];
  PullLaunch copy[int(DType::kCount)];  // pull without reduce: moves elements of the dtype bit for bit
};

template <typename E, typename Op>
Entry entry() {
  return Entry{launchReduce<E, Op>, launchPull<E, Op>};
}

// sum/prod/min/max: every dtype; band/bor/bxor: the integers and bool (as on the CPU).
template <typename Op, bool kArith>
void fillOp(Entry row[int(DType::kCount)]) {
  if constexpr (kArith) {
    row[int(DType::kFloat32)] = entry<Plain<float>, Op>();
    row[int(DType::kFloat64)] = entry<Plain<double>, Op>();
    row[int(DType::kFloat16)] = entry<Half, Op>();
    row[int(DType::kBFloat16)] = entry<BFloat16, Op>();
  }
  row[int(DType::kInt8)] = entry<Plain<int8_t>, Op>();
  row[int(DType::kUInt8)] = entry<Plain<uint8_t>, Op>();
  row[int(DType::kInt32)] = entry<Plain<int32_t>, Op>();
  row[int(DType::kInt64)] = entry<Plain<int64_t>, Op>();
  row[int(DType::kBool)] = entry<Bool, Op>();
}

const Tables& tables() {
  static const Tables t = [] {
    Tables t{};
    fillOp<OpSum, true>(t.op[int(RedOp::kSum)]);
    fillOp<OpProd, true>(t.op[int(RedOp::kProd)]);
    fillOp<OpMin, true>(t.op[int(RedOp::kMin)]);
    fillOp<OpMax, true>(t.op[int(RedOp::kMax)]);
    fillOp<OpBand, false>(t.op[int(RedOp::kBand)]);
    fillOp<OpBor, false>(t.op[int(RedOp::kBor)]);
    fillOp<OpBxor, false>(t.op[int(RedOp::kBxor)]);
    t.copy[int(DType::kFloat32)] = launchPull<Plain<uint32_t>, OpCopy>;
    t.copy[int(DType::kFloat64)] = launchPull<Plain<uint64_t>, OpCopy>;
    t.copy[int(DType::kFloat16)] = launchPull<Plain<uint16_t>, OpCopy>;
    t.copy[int(DType::kBFloat16)] = launchPull<Plain<uint16_t>, OpCopy>;
    t.copy[int(DType::kInt8)] = launchPull<Plain<uint8_t>, OpCopy>;
    t.copy[int(DType::kUInt8)] = launchPull<Plain<uint8_t>, OpCopy>;
    t.copy[int(DType::kInt32)] = launchPull<Plain<uint32_t>, OpCopy>;
    t.copy[int(DType::kInt64)] = launchPull<Plain<uint64_t>, OpCopy>;
    t.copy[int(DType::kBool)] = launchPull<Plain<uint8_t>, OpCopy>;
    return t;
  }();
  return t;
}

bool validIndex(RedOp op, DType dt) {
  return unsigned(op) < unsigned(RedOp::kCount) && unsigned(dt) < unsigned(DType::kCount);
}

size_t elementSize(DType dt) {
  switch (dt) {
    case DType::kFloat64:
    case DType::kInt64: return 8;
    case DType::kFloat32:
    case DType::kInt32: return 4;
    case DType::kFloat16:
    case DType::kBFloat16: return 2;
    default: return 1;
  }
}

constexpr int kMaxDevices = 64;
std::atomic<int> smCache[kMaxDevices];  // 0: not asked yet (static storage: zero-initialised)

}  // namespace

int reduce(RedOp op, DType dt, void* dst, const void* a, const void* b, size_t n, void* stream) {
  if (!validIndex(op, dt)) return int(cudaErrorInvalidValue);
  const ReduceLaunch launch = tables().op[int(op)][int(dt)].reduce;
  if (launch == nullptr) return int(cudaErrorInvalidValue);
  if (n == 0) return 0;
  const size_t size = elementSize(dt);
  if ((uintptr_t(dst) | uintptr_t(a) | uintptr_t(b)) % size != 0) return int(cudaErrorInvalidValue);
  return launch(dst, a, b, n, stream);
}

int copy(void* dst, const void* src, size_t bytes, void* stream) {
  if (bytes == 0) return 0;
  // 4-byte elements when both pointers and the length allow (the scalar path then moves words, not bytes).
  if (((uintptr_t(dst) | uintptr_t(src) | bytes) & 3) == 0)
    return launchReduce<Plain<uint32_t>, OpCopy>(dst, dst, src, bytes / 4, stream);
  return launchReduce<Plain<uint8_t>, OpCopy>(dst, dst, src, bytes, stream);
}

namespace {
int pullImpl(bool withReduce, RedOp op, DType dt, void* dst, const char* peerBase, const PullDesc* desc, size_t bytes,
             bool keyed, PullKey expect, uint32_t* err, uint32_t errCode, void* stream) {
  if (!validIndex(withReduce ? op : RedOp::kSum, dt)) return int(cudaErrorInvalidValue);
  const PullLaunch launch = withReduce ? tables().op[int(op)][int(dt)].pull : tables().copy[int(dt)];
  if (launch == nullptr) return int(cudaErrorInvalidValue);
  // The length must be whole elements and dst element-aligned.
  if (bytes % elementSize(dt) != 0 || uintptr_t(dst) % elementSize(dt) != 0)
    return int(cudaErrorInvalidValue);
  if (bytes == 0 && !keyed) return 0;  // a keyed pull of nothing still checks the descriptor
  return launch(dst, peerBase, desc, bytes, keyed, expect, err, errCode, stream);
}
}  // namespace

int pull(bool withReduce, RedOp op, DType dt, void* dst, const char* peerBase, const PullDesc* desc, size_t bytes,
         uint32_t* err, uint32_t errCode, void* stream) {
  return pullImpl(withReduce, op, dt, dst, peerBase, desc, bytes, false, PullKey{0, 0}, err, errCode, stream);
}

int pullKeyed(bool withReduce, RedOp op, DType dt, void* dst, const char* peerBase, const PullDesc* desc, size_t bytes,
              PullKey expect, uint32_t* err, uint32_t errCode, void* stream) {
  return pullImpl(withReduce, op, dt, dst, peerBase, desc, bytes, true, expect, err, errCode, stream);
}

int smCount() {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  if (dev >= 0 && dev < kMaxDevices) {
    const int cached = smCache[dev].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int sm = 0;
  if (cudaDeviceGetAttribute(&sm, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  if (dev >= 0 && dev < kMaxDevices) smCache[dev].store(sm, std::memory_order_relaxed);
  return sm;
}

}  // namespace cuda

bool cudaCompiled() { return true; }

int cudaDeviceCount() {
  int n = 0;
  // With no driver or device this returns an error: report zero and let everything run on the CPU.
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

}  // namespace plait
