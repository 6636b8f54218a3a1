#include "plait/kernels/reduce.h"

#include <algorithm>
#include <thread>
#include <vector>

namespace plait {

namespace {
struct Table {
  ReduceFn fn[int(RedOp::kCount)][int(DType::kCount)] = {};
  const char* isa = "scalar";
  Table() {
#if defined(__x86_64__)
    __builtin_cpu_init();
    // PLAIT_KERNELS=scalar forces the portable kernels (tests run both paths on an AVX2 machine).
    const bool forceScalar = knobs().kernels == "scalar";
    if (!forceScalar && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") &&
        __builtin_cpu_supports("fma")) {
      kernels_avx2::fill(fn);
      isa = "avx2";
      return;
    }
#endif
    kernels_scalar::fill(fn);
  }
};
const Table& table() {
  static const Table t;
  return t;
}
}  // namespace

ReduceFn reduceFn(RedOp op, DType dtype) {
  PLAIT_CHECK(op < RedOp::kCount && dtype < DType::kCount, "plait: invalid reduction op/dtype code");
  ReduceFn f = table().fn[int(op)][int(dtype)];
  PLAIT_CHECK(f != nullptr, "plait: reduction op ", redOpName(op), " is not supported for dtype ", dtypeName(dtype));
  return f;
}

const char* kernelIsa() { return table().isa; }

IeeeFpScope::IeeeFpScope() {
#if defined(__x86_64__) || defined(__i386__)
  constexpr uint32_t kFtz = 1u << 15, kDaz = 1u << 6, kRound = 3u << 13, kMasks = 0x3fu << 7;
  asm volatile("stmxcsr %0" : "=m"(saved_));
  const uint32_t want = (saved_ & ~(kFtz | kDaz | kRound)) | kMasks;
  changed_ = want != saved_;
  if (changed_) asm volatile("ldmxcsr %0" : : "m"(want) : "memory");
#endif
}

IeeeFpScope::~IeeeFpScope() {
#if defined(__x86_64__) || defined(__i386__)
  if (changed_) asm volatile("ldmxcsr %0" : : "m"(saved_) : "memory");
#endif
}

void reduce(RedOp op, DType dtype, void* dst, const void* a, const void* b, size_t n, int threads) {
  ReduceFn f = reduceFn(op, dtype);
  const size_t es = dtypeSize(dtype);
  const size_t kMinPerThread = size_t(1) << 20;  // bytes
  threads = int(std::min<size_t>(size_t(std::max(threads, 1)), std::max<size_t>(1, n * es / kMinPerThread)));
  if (threads <= 1) {
    f(dst, a, b, n);
    return;
  }
  std::vector<std::thread> pool;
  size_t per = (n + threads - 1) / threads;
  per = (per + 63) & ~size_t(63);
  auto* d = static_cast<char*>(dst);
  auto* x = static_cast<const char*>(a);
  auto* y = static_cast<const char*>(b);
  for (size_t lo = per; lo < n; lo += per) {
    size_t m = std::min(per, n - lo);
    pool.emplace_back([=] { f(d + lo * es, x + lo * es, y + lo * es, m); });
  }
  f(d, x, y, std::min(per, n));
  for (auto& t : pool) t.join();
}

}  // namespace plait
