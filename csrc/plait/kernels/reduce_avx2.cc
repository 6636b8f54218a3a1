// Built with -mavx2 -mf16c -mfma (see CMakeLists.txt); only called when the CPU reports those features.
#define PLAIT_KERNEL_NS kernels_avx2
#define PLAIT_KERNEL_F16C 1
#include "plait/kernels/reduce_impl.h"
