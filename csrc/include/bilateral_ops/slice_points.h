#pragma once
// Per-sample math of bilateral_slice_apply_points (lib_bilagrid's sampling), shared by the CPU and
// CUDA kernels: a sample at (x, y, z) in [0, 1] reads its grid at index (x (Gw - 1), y (Gh - 1),
// z (D - 1)), clamped to the grid (F.grid_sample(..., align_corners=True, padding_mode="border")).
// The taps come from grid_coords.h (unit_to_grid_aligned feeds the one copy of the tent math).
// The CPU's dense paths compute point_corners for a vector of samples at once (corner_block in
// csrc/cpu/bilateral_slice_apply_points.cpp: the same operations in the same order); its other
// paths call it as the CUDA kernels do.

#include "bilateral_ops/affine.h"
#include "bilateral_ops/grid_coords.h"
#include "bilateral_ops/macros.h"

namespace bilateral_ops {

// Sizes of one call: P samples reading M grids of C channels and D x Gh x Gw cells.
struct PointsGeometry {
  int64_t P, M, C, D, Gh, Gw;

  int64_t cells() const { return D * Gh * Gw; }  // per channel and grid
};

// The eight corners of one sample, z-major (corner dz * 4 + dy * 2 + dx), with their trilinear
// weights and the derivatives of those weights with respect to the sample's x, y and z (in the
// [0, 1] units of coords: the slope of the clamp times G - 1; zero at or beyond the border).
template <typename T>
struct PointCorners {
  int64_t offset[8];  // cell offsets in a (D, Gh, Gw) slab
  T weight[8];
  T dx[8], dy[8], dz[8];
};

template <typename T>
BO_HOST_DEVICE PointCorners<T> point_corners(T x, T y, T z, int64_t D, int64_t Gh, int64_t Gw) {
  const AxisTaps<T> tx = axis_taps(unit_to_grid_aligned(x, Gw), Gw);
  const AxisTaps<T> ty = axis_taps(unit_to_grid_aligned(y, Gh), Gh);
  const AxisTaps<T> tz = axis_taps(unit_to_grid_aligned(z, D), D);
  const int64_t zi[2] = {tz.i0, tz.i1};
  const int64_t yi[2] = {ty.i0, ty.i1};
  const int64_t xi[2] = {tx.i0, tx.i1};
  const T zw[2] = {tz.w0, tz.w1};
  const T yw[2] = {ty.w0, ty.w1};
  const T xw[2] = {tx.w0, tx.w1};
  // d w1 / d u = slope * (G - 1) and d w0 / d u its negative.
  const T sx = tx.slope * static_cast<T>(Gw - 1);
  const T sy = ty.slope * static_cast<T>(Gh - 1);
  const T sz = tz.slope * static_cast<T>(D - 1);
  const T xd[2] = {-sx, sx};
  const T yd[2] = {-sy, sy};
  const T zd[2] = {-sz, sz};
  PointCorners<T> c;
  BO_UNROLL
  for (int a = 0; a < 2; ++a) {
    BO_UNROLL
    for (int b = 0; b < 2; ++b) {
      BO_UNROLL
      for (int e = 0; e < 2; ++e) {
        const int k = a * 4 + b * 2 + e;
        c.offset[k] = (zi[a] * Gh + yi[b]) * Gw + xi[e];
        c.weight[k] = zw[a] * yw[b] * xw[e];
        c.dx[k] = zw[a] * yw[b] * xd[e];
        c.dy[k] = zw[a] * yd[b] * xw[e];
        c.dz[k] = zd[a] * yw[b] * xw[e];
      }
    }
  }
  return c;
}

// out[o] = sum_i A[o, i] * x[i] + A[o, offset]: the affine map of one sample's coefficients A.
template <typename T, typename X>
BO_HOST_DEVICE T point_affine(const AffineLayout& l, const T* A, const X& x, int64_t o) {
  T acc = l.has_offset ? A[l.offset_channel(o)] : T(0);
  for (int64_t i = 0; i < l.Ci; ++i) acc += A[l.channel(o, i)] * static_cast<T>(x(i));
  return acc;
}

// The value each coefficient channel of one sample splats into the grid gradient: g[o] * x[i]
// for channel (o, i), g[o] for the offset. Also the weights of the coordinate gradient: the
// coordinate gradient of a sample is sum_k d weight_k * sum_c V[c] * grid[corner k, c].
template <typename T, typename G, typename X>
BO_HOST_DEVICE T point_splat_value(const AffineLayout& l, const G& g, const X& x, int64_t c) {
  const int64_t o = c / l.stride, i = c % l.stride;
  const T go = static_cast<T>(g(o));
  return i < l.Ci ? go * static_cast<T>(x(i)) : go;
}

}  // namespace bilateral_ops
