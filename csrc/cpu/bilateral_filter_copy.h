// One instruction-set copy of bilateral_filter's CPU kernels (bilateral_filter_kernels.h), in the
// namespace the host code calls (bilateral_filter_cpu.h): each of bilateral_filter.cpp (the
// baseline), bilateral_filter_v3.cpp and bilateral_filter_v4.cpp defines BO_ISA_ONLY (1, 3 or 4)
// and includes this, so that the build compiles the copies side by side. A fragment: no include
// guard, and only after BO_ISA_ONLY.

#ifndef BO_ISA_ONLY
#error "define BO_ISA_ONLY, the x86-64 level of this copy (1, 3 or 4)"
#endif

#include "bilateral_filter_cpu.h"

#if BO_ISA_COPIES
#include <immintrin.h>  // the AVX-512 copy's vexp2
#endif

namespace bilateral_ops {
namespace cpu {
namespace filter {
#define BO_ISA_KERNELS "bilateral_filter_kernels.h"
#include "isa_copies.h"
#undef BO_ISA_KERNELS
}  // namespace filter
}  // namespace cpu
}  // namespace bilateral_ops
