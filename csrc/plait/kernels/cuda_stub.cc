#include "plait/kernels/cuda_info.h"

namespace plait {
bool cudaCompiled() { return false; }
int cudaDeviceCount() { return 0; }
}  // namespace plait
