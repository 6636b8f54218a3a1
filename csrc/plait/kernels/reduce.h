// Element-wise reduction kernels: pure functions over buffers, no knowledge of ranks or transports.
#pragma once

#include <cstddef>

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

// Which implementation reduceFn() hands out: "avx2" or "scalar".
const char* kernelIsa();

namespace kernels_scalar {
void fill(ReduceFn table[int(RedOp::kCount)][int(DType::kCount)]);
}
namespace kernels_avx2 {
void fill(ReduceFn table[int(RedOp::kCount)][int(DType::kCount)]);
}

}  // namespace plait
