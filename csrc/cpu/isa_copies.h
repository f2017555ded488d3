// Includes the kernel header named by BO_ISA_KERNELS (a quoted file name in this folder) once per
// x86-64 level, each copy in the namespace BO_ISA_CALL (simd.h) calls and, but for the baseline,
// under its `#pragma GCC target`; BO_ISA_LEVEL (1, 3 or 4) tells the header which level it is
// compiled for. See BO_ISA_COPIES in simd.h for why. No include guard: one include per kernel
// file.

#ifndef BO_ISA_KERNELS
#error "define BO_ISA_KERNELS, the kernel header to compile once per instruction set"
#endif

#define BO_ISA_NS isa_default
#define BO_ISA_LEVEL 1
#include BO_ISA_KERNELS
#undef BO_ISA_LEVEL
#undef BO_ISA_NS

#if BO_ISA_COPIES
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
#define BO_ISA_NS isa_v3
#define BO_ISA_LEVEL 3
#include BO_ISA_KERNELS
#undef BO_ISA_LEVEL
#undef BO_ISA_NS
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
#define BO_ISA_NS isa_v4
#define BO_ISA_LEVEL 4
#include BO_ISA_KERNELS
#undef BO_ISA_LEVEL
#undef BO_ISA_NS
#pragma GCC pop_options
#endif
