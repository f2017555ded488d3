#pragma once
// The CPU slice ops' per-pixel path: every pixel gathers its eight corners from the grid as the
// caller laid it out, (N, C, D, Gh, Gw), with the formulas the CUDA kernels use (grid_coords.h).
// The row engine (slice_engine.h) pays per call for a transposed copy of the whole grid and per
// image row for a table of Gw * D * C blended values, which the pixels of the row then share.
// Where the grid and the tables outweigh the pixels (batches of small images, images one pixel
// wide, grids with more cells than the image has pixels) those dominate: 256 images of 8 x 8 on
// HDRNet's 16 x 16 x 8 grids took 2.5x F.grid_sample's time, a 64 x 64 image on a 64^3 grid 14x.
// use_direct (slice_path.h) picks this path there.
//
// Forward: rows in parallel. Backward: with the grid gradient, one task per image (its slab of
// grad_grid is summed pixel after pixel, in order: deterministic, no atomics); without it, rows
// in parallel. No transposed grid, no row tables, no partial grids.

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <vector>

#include "bilateral_ops/affine.h"
#include "bilateral_ops/grid_coords.h"
#include "bilateral_ops/slice_geometry.h"
#include "slice_engine.h"
#include "slice_path.h"

namespace bilateral_ops {
namespace cpu {

// The x taps of every column, computed once per call (image_taps works in double).
template <typename T>
std::vector<AxisTaps<T>> column_taps(const SliceGeometry& g) {
  std::vector<AxisTaps<T>> tx(g.W);
  for (int64_t x = 0; x < g.W; ++x) tx[x] = image_taps<T>(x, g.W, g.Gw, g.align_corners);
  return tx;
}

// Channel c of a slab sampled at t: its value and d value / d gz.
template <typename T>
BO_ALWAYS_INLINE void sample(const T* slab, const TrilinearTaps<T>& t, T& v, T& dv) {
  trilinear_sample(t, [slab](int64_t o) { return slab[o]; }, v, dv);
}

template <typename T, bool kApply>
void direct_forward(const SliceParams<T>& p, bool dguide) {
  TORCH_INTERNAL_ASSERT(!p.normalize, "the per-pixel slice does not normalise");
  const SliceGeometry& g = p.g;
  const AffineLayout& l = p.l;
  const int64_t HW = g.H * g.W, cells = g.cells();
  const std::vector<AxisTaps<T>> tx = column_taps<T>(g);
  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(g.W, 1));
  at::parallel_for(0, g.N * g.H, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / g.H, y = r % g.H;
      const AxisTaps<T> ty = image_taps<T>(y, g.H, g.Gh, g.align_corners);
      const T* grid = p.grid + n * g.C * cells;
      for (int64_t x = 0; x < g.W; ++x) {
        const int64_t pix = y * g.W + x;
        const AxisTaps<T> tz = guide_taps<T>(p.guide[n * HW + pix], g.D, dguide, g.align_corners);
        const TrilinearTaps<T> t = trilinear_taps(tx[x], ty, tz, g.Gh, g.Gw);
        T v, dv;
        if constexpr (!kApply) {
          for (int64_t c = 0; c < g.C; ++c) {
            sample(grid + c * cells, t, v, dv);
            p.output[(n * g.C + c) * HW + pix] = v;
          }
        } else {
          const T* in = p.input + n * l.Ci * HW + pix;
          for (int64_t o = 0; o < l.Co; ++o) {
            T acc = T(0);
            if (l.has_offset) sample(grid + l.offset_channel(o) * cells, t, acc, dv);
            for (int64_t i = 0; i < l.Ci; ++i) {
              sample(grid + l.channel(o, i) * cells, t, v, dv);
              acc += v * in[i * HW];
            }
            p.output[(n * l.Co + o) * HW + pix] = acc;
          }
        }
      }
    }
  });
}

// Row y of image n: the guide and input gradients, and (gg != nullptr) the grid gradient added
// into image n's slab gg.
template <typename T, bool kApply>
BO_ALWAYS_INLINE void direct_backward_row(const SliceParams<T>& p, bool dguide, const AxisTaps<T>* tx,
                                          int64_t n, int64_t y, T* gg) {
  const SliceGeometry& g = p.g;
  const AffineLayout& l = p.l;
  const int64_t HW = g.H * g.W, cells = g.cells();
  const bool read_grid = p.need_guide || (kApply && p.need_input);
  const AxisTaps<T> ty = image_taps<T>(y, g.H, g.Gh, g.align_corners);
  const T* grid = read_grid ? p.grid + n * g.C * cells : nullptr;
  const T scale = guide_scale<T>(g.D, g.align_corners);
  // Channel c's share of a pixel: gv = d loss / d sample, spread over the corners (grid
  // gradient) and, through d sample / d gz, into the guide gradient; returns the sample.
  const auto channel = [&](int64_t c, const TrilinearTaps<T>& t, T gv, T& dguide_acc) {
    T v = T(0), dv = T(0);
    if (read_grid) {
      sample(grid + c * cells, t, v, dv);
      dguide_acc += gv * dv;
    }
    if (gg != nullptr) {
      T* slab = gg + c * cells;
      for (int k = 0; k < 8; ++k) slab[t.offset[k]] += t.weight[k] * gv;
    }
    return v;
  };
  for (int64_t x = 0; x < g.W; ++x) {
    const int64_t pix = y * g.W + x;
    const AxisTaps<T> tz = guide_taps<T>(p.guide[n * HW + pix], g.D, dguide, g.align_corners);
    const TrilinearTaps<T> t = trilinear_taps(tx[x], ty, tz, g.Gh, g.Gw);
    T dz = T(0);
    if constexpr (!kApply) {
      for (int64_t c = 0; c < g.C; ++c) channel(c, t, p.grad_output[(n * g.C + c) * HW + pix], dz);
    } else {
      const T* in = p.input + n * l.Ci * HW + pix;
      const T* go = p.grad_output + n * l.Co * HW + pix;
      for (int64_t i = 0; i < l.Ci; ++i) {
        T gi = T(0);
        for (int64_t o = 0; o < l.Co; ++o) gi += go[o * HW] * channel(l.channel(o, i), t, go[o * HW] * in[i * HW], dz);
        if (p.need_input) p.grad_input[(n * l.Ci + i) * HW + pix] = gi;
      }
      if (l.has_offset) {
        for (int64_t o = 0; o < l.Co; ++o) channel(l.offset_channel(o), t, go[o * HW], dz);
      }
    }
    if (p.need_guide) p.grad_guide[n * HW + pix] = dz * scale;
  }
}

template <typename T, bool kApply>
void direct_backward(const SliceParams<T>& p, bool dguide, T* grad_grid) {
  TORCH_INTERNAL_ASSERT(!p.ones_channel, "the per-pixel splat takes no implied channel");
  const SliceGeometry& g = p.g;
  const std::vector<AxisTaps<T>> tx = column_taps<T>(g);
  if (p.need_grid) {
    const int64_t slab = g.C * g.cells();
    at::parallel_for(0, g.N, 1, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        T* gg = grad_grid + n * slab;
        std::fill(gg, gg + slab, T(0));
        for (int64_t y = 0; y < g.H; ++y) direct_backward_row<T, kApply>(p, dguide, tx.data(), n, y, gg);
      }
    });
    return;
  }
  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(g.W, 1));
  at::parallel_for(0, g.N * g.H, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      direct_backward_row<T, kApply>(p, dguide, tx.data(), r / g.H, r % g.H, nullptr);
    }
  });
}

}  // namespace cpu
}  // namespace bilateral_ops
