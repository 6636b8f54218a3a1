// Builds without CUDA: device collectives on CUDA are unavailable (the emulated device still works).
#include "plait/transport/device.h"

namespace plait {
std::unique_ptr<DeviceOps> makeCudaDeviceOps(std::string* why) {
  *why = "plait was built without CUDA (nvcc was not found, or -DPLAIT_WITH_CUDA=OFF)";
  return nullptr;
}
}  // namespace plait
