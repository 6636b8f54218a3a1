// Element-wise reduction kernels: pure functions over buffers, no knowledge of ranks or transports.
#pragma once

#include <cstddef>
#include <cstdint>

#include "plait/common.h"

namespace plait {

// dst[i] = a[i] op b[i] for i < n elements; dst may alias a or b.
using ReduceFn = void (*)(void* dst, const void* a, const void* b, size_t n);

// The kernel for (op, dtype), chosen once per process by CPU features (AVX2+F16C, else scalar; PLAIT_KERNELS=scalar
// forces scalar). Floating-point kernels run in a fixed IEEE mode whatever the calling thread's MXCSR says (no
// flush-to-zero, no denormals-are-zero, round to nearest), so every thread and every rank computes the same bits.
// Throws plait::Error naming the op and dtype when the combination is meaningless (e.g. band on float32).
ReduceFn reduceFn(RedOp op, DType dtype);

// Whole-buffer reduction that splits buffers of 1 MiB and more across up to `threads` threads.
void reduce(RedOp op, DType dtype, void* dst, const void* a, const void* b, size_t n, int threads = 1);

// The kernels' floating-point mode (IEEE: no flush-to-zero, no denormals-are-zero, round to nearest, exceptions
// masked) on the calling thread for the scope's lifetime, whatever mode the thread had (torch.set_flush_denormal sets
// FTZ/DAZ per thread). For arithmetic on reduction data done outside these kernels (AVG's division, PREMUL_SUM's
// scaling) so that it too gives the same bits on every thread and rank. Restores the caller's mode at the end.
class IeeeFpScope {
 public:
  IeeeFpScope();
  ~IeeeFpScope();
  IeeeFpScope(const IeeeFpScope&) = delete;
  IeeeFpScope& operator=(const IeeeFpScope&) = delete;

 private:
  uint32_t saved_ = 0;
  bool changed_ = false;
};

// Which implementation reduceFn() hands out: "avx2" or "scalar".
const char* kernelIsa();

namespace kernels_scalar {
void fill(ReduceFn table[int(RedOp::kCount)][int(DType::kCount)]);
}
namespace kernels_avx2 {
void fill(ReduceFn table[int(RedOp::kCount)][int(DType::kCount)]);
}

}  // namespace plait
