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

// NaN-flushing min/max against a bound b that is never NaN: a NaN a yields b, which is what keeps
// a NaN guide from ever reaching a float->int conversion (undefined behaviour) or a memory index.
// Written as comparisons rather than fminf/fmaxf: on x86 those are library calls (IEEE fmin has no
// single instruction), while these compile to minss/maxss and vectorise.
template <typename T>
BO_HOST_DEVICE T bo_fmin(T a, T b) {
  return a < b ? a : b;
}
template <typename T>
BO_HOST_DEVICE T bo_fmax(T a, T b) {
  return a > b ? a : b;
}
BO_HOST_DEVICE float bo_floor(float a) { return floorf(a); }
BO_HOST_DEVICE double bo_floor(double a) { return floor(a); }
BO_HOST_DEVICE float bo_abs(float a) { return fabsf(a); }
BO_HOST_DEVICE double bo_abs(double a) { return fabs(a); }
BO_HOST_DEVICE float bo_copysign(float a, float b) { return copysignf(a, b); }
BO_HOST_DEVICE double bo_copysign(double a, double b) { return copysign(a, b); }

}  // namespace bilateral_ops
