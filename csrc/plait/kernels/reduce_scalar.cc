#define PLAIT_KERNEL_NS kernels_scalar
#include "plait/kernels/reduce_impl.h"
