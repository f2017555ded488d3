#pragma once
// Per-pixel math of the exact (joint) bilateral filter, shared by the CPU (csrc/cpu/
// bilateral_filter.cpp) and CUDA (csrc/cuda/bilateral_filter.cu) kernels: border index maps, the
// colour distance and its derivative, the spatial exponent, and the preimages of a pixel under the
// padding (the fold that turns a gradient of the padded image into one of the image).
//
// The weight of tap t = (ty, tx) of centre p is exp(-(D * rc + ss_t)) with D the squared colour
// distance of the guidance, rc = 0.5 / sigma_color^2 and ss_t = 0.5 (ty^2 / sy^2 + tx^2 / sx^2):
// kornia's colour kernel times its spatial kernel, up to the spatial kernel's normalisation,
// which cancels in the ratio sum(w I) / sum(w) (and so does its derivative).

#include <cstdint>

#include "bilateral_ops/macros.h"

namespace bilateral_ops {

// The F.pad modes; the order is the schema's (csrc/cpu/bilateral_filter.cpp parses the names).
enum BorderType : int { kReflect = 0, kReplicate = 1, kConstant = 2, kCircular = 3 };
enum ColorDistance : int { kL1 = 0, kL2 = 1 };

// The image index that padded coordinate i (in [-pad, n - 1 + pad]) reads, or -1 for a constant
// (zero) border. Reflect assumes pad < n and circular pad <= n (the wrappers check): one
// reflection or one wrap is then enough.
BO_HOST_DEVICE int64_t border_index(int64_t i, int64_t n, int border) {
  if (i >= 0 && i < n) return i;
  switch (border) {
    case kReflect:
      return i < 0 ? -i : 2 * (n - 1) - i;
    case kReplicate:
      return i < 0 ? 0 : n - 1;
    case kCircular:
      return i < 0 ? i + n : i - n;
    default:
      return -1;
  }
}

// The padded coordinates that read image index x, as three intervals [lo, hi] (in padded
// coordinates, -pad .. n - 1 + pad) in increasing order: the reflection or wrap from below, x
// itself (replicate: the run of the edge), the reflection or wrap from above; an empty one has
// lo > hi. The fold sums them in this fixed order, so gradients are deterministic. Three slots at
// fixed places rather than a count: unrolled loops over them index registers, not the stack.
struct Preimages {
  int64_t lo[3], hi[3];
};

BO_HOST_DEVICE Preimages preimages(int64_t x, int64_t n, int64_t pad, int border) {
  Preimages p = {{1, x, 1}, {0, x, 0}};
  switch (border) {
    case kReflect:
      if (x >= 1 && x <= pad) p.lo[0] = p.hi[0] = -x;
      if (x <= n - 2 && 2 * (n - 1) - x <= n - 1 + pad) p.lo[2] = p.hi[2] = 2 * (n - 1) - x;
      break;
    case kReplicate:
      p.lo[1] = x == 0 ? -pad : x;
      p.hi[1] = x == n - 1 ? n - 1 + pad : x;
      break;
    case kCircular:
      if (x - n >= -pad) p.lo[0] = p.hi[0] = x - n;
      if (x + n <= n - 1 + pad) p.lo[2] = p.hi[2] = x + n;
      break;
    default:
      break;
  }
  return p;
}

// 0.5 (ty^2 / sy^2 + tx^2 / sx^2) for tap offsets (ty, tx) from the centre.
template <typename T>
BO_HOST_DEVICE T spatial_exponent(int64_t ty, int64_t tx, T sy, T sx) {
  const T fy = static_cast<T>(ty), fx = static_cast<T>(tx);
  return T(0.5) * (fy * fy / (sy * sy) + fx * fx / (sx * sx));
}

// The colour distance is accumulated channel by channel into `acc` (sum |d| for l1, sum d^2 for
// l2) and finished into D = acc^2 (l1) or acc (l2).
template <typename T>
BO_HOST_DEVICE T distance_term(T d, int distance) {
  return distance == kL1 ? bo_abs(d) : d * d;
}

template <typename T>
BO_HOST_DEVICE T distance_finish(T acc, int distance) {
  return distance == kL1 ? acc * acc : acc;
}

// dD / d(delta_c) for channel difference d given the accumulated `acc`: 2 acc sign(d) for l1
// (sign(0) = 0, as torch's abs), 2 d for l2. For l1, (2 acc) times sign(d) exactly: acc >= 0 (or
// NaN), so the product by +-1 is a copysign; where |d| > 0 fails (d = 0 or NaN) it is 2 acc * 0
// (0, or NaN for an infinite acc). A compare, a sign copy and a select, where the sign as a
// number took five instructions on the GPU.
template <typename T>
BO_HOST_DEVICE T distance_slope(T d, T acc, int distance) {
  if (distance == kL2) return T(2) * d;
  const T two_acc = T(2) * acc;
  return bo_abs(d) > T(0) ? bo_copysign(two_acc, d) : two_acc * T(0);
}

}  // namespace bilateral_ops
