// bilateral_filter's CPU kernels compiled for AVX-512 (x86-64-v4), in a unit of their own so that the
// build compiles the copies side by side (bilateral_filter_cpu.h; bilateral_filter.cpp dispatches).
// Empty where the copies are not made (BO_ISA_COPIES, simd.h).

#include "bilateral_filter_cpu.h"

#if BO_ISA_COPIES
#include <immintrin.h>  // the AVX-512 copy's vexp2

namespace bilateral_ops {
namespace cpu {
namespace filter {
#define BO_ISA_KERNELS "bilateral_filter_kernels.h"
#define BO_ISA_ONLY 4
#include "isa_copies.h"
#undef BO_ISA_ONLY
#undef BO_ISA_KERNELS
}  // namespace filter
}  // namespace cpu
}  // namespace bilateral_ops
#endif
