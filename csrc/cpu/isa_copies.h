// Includes the kernel header named by BO_ISA_KERNELS (a quoted file name in this folder) once per
// x86-64 level, each copy in the namespace BO_ISA_CALL (simd.h) calls and, but for the baseline,
// under its `#pragma GCC target`; BO_ISA_LEVEL (1, 3 or 4) tells the header which level it is
// compiled for. See BO_ISA_COPIES in simd.h for why. No include guard: one include per kernel
// file. With BO_ISA_ONLY defined (1, 3 or 4), only that level's copy: a kernel whose copies take
// minutes each to compile puts each in a translation unit of its own, which the build compiles in
// parallel (bilateral_filter_v3.cpp, bilateral_filter_v4.cpp).

#ifndef BO_ISA_KERNELS
#error "define BO_ISA_KERNELS, the kernel header to compile once per instruction set"
#endif

#ifndef BO_ISA_ONLY
#define BO_ISA_ALL 1
#endif

#if BO_ISA_ALL || BO_ISA_ONLY == 1
#define BO_ISA_NS isa_default
#define BO_ISA_LEVEL 1
#include BO_ISA_KERNELS
#undef BO_ISA_LEVEL
#undef BO_ISA_NS
#endif

#if BO_ISA_COPIES && (BO_ISA_ALL || BO_ISA_ONLY == 3)
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
#define BO_ISA_NS isa_v3
#define BO_ISA_LEVEL 3
#include BO_ISA_KERNELS
#undef BO_ISA_LEVEL
#undef BO_ISA_NS
#pragma GCC pop_options
#endif

#if BO_ISA_COPIES && (BO_ISA_ALL || BO_ISA_ONLY == 4)
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
#define BO_ISA_NS isa_v4
#define BO_ISA_LEVEL 4
#include BO_ISA_KERNELS
#undef BO_ISA_LEVEL
#undef BO_ISA_NS
#pragma GCC pop_options
#endif

#undef BO_ISA_ALL
