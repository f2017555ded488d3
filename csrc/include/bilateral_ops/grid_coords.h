#pragma once
// Bilateral-grid sampling geometry: one copy of every formula, used by the CPU loops and the CUDA
// kernels alike (docs/ops.md, "Grid coordinates").
//
// Pixel p of an n-pixel axis sits at grid position g = (p + 0.5) * G / n; the guide value v at
// g = v * G. Grid sample k sits at k + 0.5. Along each axis the cells i = floor(g - 0.5) and i + 1
// get tent weights 1 - |i + 0.5 - g|; memory indices clamp to [0, G - 1]. Clamping g itself to
// [0.5, G - 0.5] first gives the same value (outside that band both taps land on the edge cell)
// and is what keeps NaN, +-inf and huge guides away from the int conversion. This is exactly
// F.grid_sample(..., mode="bilinear", padding_mode="border", align_corners=False).
//
// align_corners=True (lib_bilagrid's sampling: F.grid_sample(..., align_corners=True,
// padding_mode="border")) puts the samples on the grid's corners instead: a normalised position u
// in [0, 1] has grid index u * (G - 1), so pixel p of an n-pixel axis sits at index
// p * (G - 1) / (n - 1) (index 0 when n = 1) and the guide value v at v * (D - 1). Rather than a
// second copy of the taps, such an index s is fed to the same machinery as the position
// g = s + 0.5: the clamp to [0.5, G - 0.5] is then the clamp of s to [0, G - 1], the slope is zero
// at or beyond the border (as grid_sample's clip, which counts the border as outside) and
// right-sided at interior knots (floor). Adding 0.5 is exact whenever s is a knot, so knots and
// borders keep their exact conventions; elsewhere it moves s by at most half an ulp of G.

#include "bilateral_ops/macros.h"

namespace bilateral_ops {

template <typename T>
BO_HOST_DEVICE T pixel_to_grid(int64_t p, int64_t n, int64_t G, bool align_corners) {
  // (Written without a select on n: with n = 1, p = 0 gives 0.5 all the same. The CUDA kernels
  // keep register budgets tight; see launch_config.h.)
  if (align_corners) {
    return static_cast<T>(p) * static_cast<T>(G - 1) / static_cast<T>(n > 1 ? n - 1 : 1) + T(0.5);
  }
  return (static_cast<T>(p) + T(0.5)) * static_cast<T>(G) / static_cast<T>(n);
}

// The guide value v sits at g = v * guide_scale + guide_offset; guide_scale is also d g / d v.
template <typename T>
BO_HOST_DEVICE T guide_scale(int64_t D, bool align_corners) {
  return static_cast<T>(D - static_cast<int64_t>(align_corners));
}
template <typename T>
BO_HOST_DEVICE T guide_offset(bool align_corners) {
  return static_cast<T>(align_corners) * T(0.5);
}
template <typename T>
BO_HOST_DEVICE T guide_to_grid(T v, int64_t D, bool align_corners) {
  return v * guide_scale<T>(D, align_corners) + guide_offset<T>(align_corners);
}

// A normalised coordinate u in [0, 1] under align_corners=True (index u * (G - 1)), as a grid
// position: the explicit-coordinate ops' sampling. Its slope d g / d u is G - 1.
template <typename T>
BO_HOST_DEVICE T unit_to_grid_aligned(T u, int64_t G) {
  return u * static_cast<T>(G - 1) + T(0.5);
}

// Clamp a grid position into the band where interpolation is not constant. NaN maps to 0.5.
template <typename T>
BO_HOST_DEVICE T clamp_grid_coord(T g, int64_t G) {
  return bo_fmin(bo_fmax(g, T(0.5)), static_cast<T>(G) - T(0.5));
}

// d(clamped g)/dg: 1 strictly inside the band, 0 where the clamp is active (and for NaN).
template <typename T>
BO_HOST_DEVICE T grid_coord_slope(T g, int64_t G) {
  return (g > T(0.5) && g < static_cast<T>(G) - T(0.5)) ? T(1) : T(0);
}

template <typename T>
struct AxisTaps {
  int64_t i0, i1;  // memory indices, already clamped to [0, G - 1]
  T w0, w1;        // tent weights of i0 and i1, summing to 1
  T slope;         // d(sample)/dg = slope * (v[i1] - v[i0])
};

template <typename T>
BO_HOST_DEVICE AxisTaps<T> axis_taps(T g, int64_t G) {
  AxisTaps<T> t;
  const T s = clamp_grid_coord(g, G) - T(0.5);  // in [0, G - 1], never NaN
  const T fl = bo_floor(s);
  t.i0 = static_cast<int64_t>(fl);
  t.i1 = t.i0 + 1 < G ? t.i0 + 1 : G - 1;  // only clamps when the weight of i1 is 0
  t.w1 = s - fl;
  t.w0 = T(1) - t.w1;
  t.slope = grid_coord_slope(g, G);
  return t;
}

// Taps of pixel p of an n-pixel image axis. The position is computed in double whatever T: it
// keeps float32 weights exact on fine grids (at g ~ 300 a float32 position is off by ~3e-5 cells)
// and costs little, since x and y taps are computed once per column, row or pixel.
template <typename T>
BO_HOST_DEVICE AxisTaps<T> image_taps(int64_t p, int64_t n, int64_t G, bool align_corners) {
  const AxisTaps<double> t = axis_taps(pixel_to_grid<double>(p, n, G, align_corners), G);
  AxisTaps<T> r;
  r.i0 = t.i0;
  r.i1 = t.i1;
  r.w0 = static_cast<T>(t.w0);
  r.w1 = static_cast<T>(t.w1);
  r.slope = static_cast<T>(t.slope);
  return r;
}

// Taps along z of guide value v (g = guide_to_grid(v)). With dguide they are the taps of the
// derivative with respect to v instead: the tent weights become their slopes, -scale * slope on i0
// and +scale * slope on i1 (scale = guide_scale), and the slope itself (the second derivative)
// becomes 0, since the sample is piecewise linear in v. The same trilinear code then computes
// either the sample or its guide derivative.
template <typename T>
BO_HOST_DEVICE AxisTaps<T> guide_taps(T v, int64_t D, bool dguide, bool align_corners) {
  AxisTaps<T> t = axis_taps(guide_to_grid(v, D, align_corners), D);
  if (dguide) {
    const T s = t.slope * guide_scale<T>(D, align_corners);
    t.w0 = -s;
    t.w1 = s;
    t.slope = T(0);
  }
  return t;
}

// The same weights written densely: the weight of cell k for a clamped position gc. Equal to the
// AxisTaps weights (0 for every cell but i0 and i1); lets CPU loops run over k without gathers.
template <typename T>
BO_HOST_DEVICE T tent_weight(T gc, int64_t k) {
  const T w = T(1) - bo_abs(static_cast<T>(k) + T(0.5) - gc);
  return w > T(0) ? w : T(0);
}

// d tent_weight / d gc, with the same one-sided convention as AxisTaps at cell centres
// (g exactly at k + 0.5 belongs to the interval [k + 0.5, k + 1.5)).
template <typename T>
BO_HOST_DEVICE T tent_weight_slope(T gc, int64_t k) {
  const T d = gc - (static_cast<T>(k) + T(0.5));
  // Selects rather than bool-to-float casts: those are scalar conversions on x86, selects are
  // blends, so CPU loops over pixels vectorise.
  const T up = (d >= T(-1) && d < T(0)) ? T(1) : T(0);
  return (d >= T(0) && d < T(1)) ? T(-1) : up;
}

// The eight corners of a trilinear sample in a (D, Gh, Gw) channel slab.
template <typename T>
struct TrilinearTaps {
  int64_t offset[8];  // z-major: corner (dz, dy, dx) is entry dz * 4 + dy * 2 + dx
  T weight[8];
  T dweight_dz[8];  // d weight / d gz (zero where the z clamp is active)
};

template <typename T>
BO_HOST_DEVICE TrilinearTaps<T> trilinear_taps(const AxisTaps<T>& tx, const AxisTaps<T>& ty,
                                               const AxisTaps<T>& tz, int64_t Gh, int64_t Gw) {
  TrilinearTaps<T> t;
  const int64_t zi[2] = {tz.i0, tz.i1};
  const int64_t yi[2] = {ty.i0, ty.i1};
  const int64_t xi[2] = {tx.i0, tx.i1};
  const T zw[2] = {tz.w0, tz.w1};
  const T zd[2] = {-tz.slope, tz.slope};
  const T yw[2] = {ty.w0, ty.w1};
  const T xw[2] = {tx.w0, tx.w1};
  BO_UNROLL
  for (int dz = 0; dz < 2; ++dz) {
    BO_UNROLL
    for (int dy = 0; dy < 2; ++dy) {
      BO_UNROLL
      for (int dx = 0; dx < 2; ++dx) {
        const int c = dz * 4 + dy * 2 + dx;
        t.offset[c] = (zi[dz] * Gh + yi[dy]) * Gw + xi[dx];
        t.weight[c] = zw[dz] * yw[dy] * xw[dx];
        t.dweight_dz[c] = zd[dz] * yw[dy] * xw[dx];
      }
    }
  }
  return t;
}

// Sample (and its z-derivative) of one channel slab at precomputed taps. Load is any callable
// mapping an offset to a value in the accumulation type (a plain read on CPU, __ldg on CUDA).
template <typename T, typename Load>
BO_HOST_DEVICE void trilinear_sample(const TrilinearTaps<T>& t, const Load& load, T& value,
                                     T& dvalue_dz) {
  T v = T(0), dv = T(0);
  BO_UNROLL
  for (int c = 0; c < 8; ++c) {
    const T s = load(t.offset[c]);
    v += t.weight[c] * s;
    dv += t.dweight_dz[c] * s;
  }
  value = v;
  dvalue_dz = dv;
}

}  // namespace bilateral_ops
