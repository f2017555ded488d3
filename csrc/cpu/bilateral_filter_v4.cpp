// bilateral_filter's CPU kernels compiled for AVX-512 (x86-64-v4), in a unit of their own so that the
// build compiles the copies side by side (bilateral_filter_copy.h). Empty where the copies are
// not made (BO_ISA_COPIES, simd.h).

#define BO_ISA_ONLY 4
#include "bilateral_filter_copy.h"
