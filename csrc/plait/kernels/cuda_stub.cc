// The CUDA side of the core when nvcc was not found: no device, and every kernel entry point (cuda/kernels.h)
// answers with an error instead of enqueuing work. No CUDA headers here.
#include "plait/kernels/cuda/kernels.h"
#include "plait/kernels/cuda_info.h"

namespace plait {
bool cudaCompiled() { return false; }
int cudaDeviceCount() { return 0; }

namespace cuda {
namespace {
constexpr int kNotBuilt = 35;  // cudaErrorInsufficientDriver: this build has no CUDA runtime at all
}  // namespace

int reduce(RedOp, DType, void*, const void*, const void*, size_t, void*) { return kNotBuilt; }
int copy(void*, const void*, size_t, void*) { return kNotBuilt; }
int pull(bool, RedOp, DType, void*, const char*, const PullDesc*, size_t, uint32_t*, uint32_t, void*) {
  return kNotBuilt;
}
int codecEncode(uint8_t, uint32_t, DType, const void*, size_t, float, void*, void*) { return kNotBuilt; }
int codecDecode(uint8_t, uint32_t, const void*, size_t, DType, void*, void*) { return kNotBuilt; }
int codecDecodeAccumulate(uint8_t, uint32_t, const void*, size_t, float*, void*) { return kNotBuilt; }
int smCount() { return 0; }
}  // namespace cuda
}  // namespace plait
