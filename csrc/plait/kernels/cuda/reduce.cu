// CUDA reduction kernel (sum over float32 for now): proves the CUDA build pipeline (sm_80, sm_90, static cudart).
// The GPU collectives issue builds the full kernel set on this file. No torch headers here.
#include <cuda_runtime.h>

#include "plait/kernels/cuda_info.h"

namespace plait {

namespace {
__global__ void sumF32(float* __restrict__ dst, const float* __restrict__ a, const float* __restrict__ b, size_t n) {
  size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x;
  size_t stride = size_t(gridDim.x) * blockDim.x;
  for (; i < n; i += stride) dst[i] = a[i] + b[i];
}
}  // namespace

// Enqueues dst = a + b on `stream`; returns the CUDA error code (0 on success).
int cudaSumF32(float* dst, const float* a, const float* b, size_t n, cudaStream_t stream) {
  if (n == 0) return 0;
  unsigned blocks = unsigned((n + 255) / 256 < 65535 ? (n + 255) / 256 : 65535);
  sumF32<<<blocks, 256, 0, stream>>>(dst, a, b, n);
  return int(cudaGetLastError());
}

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
