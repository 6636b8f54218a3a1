// What the CUDA side of the core can do in this process. Always callable: without a CUDA build, or with no
// driver or device, it reports zero devices and everything runs on the CPU.
#pragma once

namespace plait {
bool cudaCompiled();
int cudaDeviceCount();
}  // namespace plait
