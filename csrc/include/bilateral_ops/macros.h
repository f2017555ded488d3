#pragma once
// Portability macros shared by the CPU (.cpp) and CUDA (.cu) translation units.

#if defined(__CUDACC__) || defined(__HIPCC__)
#define BO_HOST_DEVICE __host__ __device__ __forceinline__
#define BO_UNROLL _Pragma("unroll")
#else
#define BO_HOST_DEVICE inline
#define BO_UNROLL
#endif

#include <cmath>
#include <cstdint>

namespace bilateral_ops {

// NaN-flushing min/max: fmin/fmax return the non-NaN operand, which is what keeps a NaN guide
// from ever reaching a float->int conversion (undefined behaviour) or a memory index.
BO_HOST_DEVICE float bo_fmin(float a, float b) { return fminf(a, b); }
BO_HOST_DEVICE double bo_fmin(double a, double b) { return fmin(a, b); }
BO_HOST_DEVICE float bo_fmax(float a, float b) { return fmaxf(a, b); }
BO_HOST_DEVICE double bo_fmax(double a, double b) { return fmax(a, b); }
BO_HOST_DEVICE float bo_floor(float a) { return floorf(a); }
BO_HOST_DEVICE double bo_floor(double a) { return floor(a); }
BO_HOST_DEVICE float bo_abs(float a) { return fabsf(a); }
BO_HOST_DEVICE double bo_abs(double a) { return fabs(a); }

}  // namespace bilateral_ops
