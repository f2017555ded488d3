// bilateral_filter's CPU kernels compiled for AVX2 (x86-64-v3), in a unit of their own so that the
// build compiles the copies side by side (bilateral_filter_cpu.h; bilateral_filter.cpp dispatches).
// Empty where the copies are not made (BO_ISA_COPIES, simd.h).

#include "bilateral_filter_cpu.h"

#if BO_ISA_COPIES
namespace bilateral_ops {
namespace cpu {
namespace filter {
#define BO_ISA_KERNELS "bilateral_filter_kernels.h"
#define BO_ISA_ONLY 3
#include "isa_copies.h"
#undef BO_ISA_ONLY
#undef BO_ISA_KERNELS
}  // namespace filter
}  // namespace cpu
}  // namespace bilateral_ops
#endif
