#pragma once
// Parallel drivers of the CPU slice engine, shared by csrc/cpu/bilateral_slice.cpp and
// csrc/cpu/bilateral_slice_apply.cpp: input preparation, column geometry, the row split of the
// forward pass and the banded, deterministic reduction of the grid gradient. A Problem built
// with `direct` (slice_path.h) hands both passes to the per-pixel path (slice_direct.h).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <type_traits>
#include <vector>

#include "../checks.h"
#include "slice_direct.h"
#include "slice_engine.h"

namespace bilateral_ops {
namespace cpu {

// Task functions: the only non-inline code, one copy per instruction set (BO_TARGET_CLONES), and
// per op (KAPPLY). The runtime modes branch once at the top into fully inlined instantiations.
// PREFIX names them after the op; Tasks (PREFIX##_tasks) is the overload set the runners call.
#define BO_DEFINE_SLICE_TASKS_FOR(PREFIX, KAPPLY, T, SUFFIX)                                    \
  BO_TARGET_CLONES void PREFIX##_forward_##SUFFIX(const SliceParams<T>& p, bool dguide,         \
                                                  int64_t r0, int64_t r1, T* R,                 \
                                                  const Scratch<T>& s) {                        \
    if (dguide) {                                                                               \
      forward_rows<T, KAPPLY, true>(p, r0, r1, R, s);                                           \
    } else {                                                                                    \
      forward_rows<T, KAPPLY, false>(p, r0, r1, R, s);                                          \
    }                                                                                           \
  }                                                                                             \
  BO_TARGET_CLONES void PREFIX##_backward_##SUFFIX(const SliceParams<T>& p, bool dguide,        \
                                                   int64_t n, int64_t y0, int64_t y1,           \
                                                   double* G, int64_t band_lo, T* R, T* B,      \
                                                   const Scratch<T>& s) {                       \
    if (dguide) {                                                                               \
      backward_rows<T, KAPPLY, true, false>(p, n, y0, y1, G, band_lo, R, B, s);                 \
    } else if (p.need_guide) {                                                                  \
      backward_rows<T, KAPPLY, false, true>(p, n, y0, y1, G, band_lo, R, B, s);                 \
    } else {                                                                                    \
      backward_rows<T, KAPPLY, false, false>(p, n, y0, y1, G, band_lo, R, B, s);                \
    }                                                                                           \
  }

// The overload set the runners call, over the four task functions of an op.
#define BO_SLICE_TASKS_STRUCT(PREFIX, KAPPLY)                                                   \
  struct PREFIX##_tasks {                                                                       \
    static constexpr bool kApply = KAPPLY;                                                      \
    template <typename T>                                                                       \
    static void forward(const SliceParams<T>& p, bool d, int64_t r0, int64_t r1, T* R,          \
                        const Scratch<T>& s) {                                                  \
      if constexpr (std::is_same<T, float>::value) {                                            \
        PREFIX##_forward_f32(p, d, r0, r1, R, s);                                               \
      } else {                                                                                  \
        PREFIX##_forward_f64(p, d, r0, r1, R, s);                                               \
      }                                                                                         \
    }                                                                                           \
    template <typename T>                                                                       \
    static void backward(const SliceParams<T>& p, bool d, int64_t n, int64_t y0, int64_t y1,   \
                         double* G, int64_t band_lo, T* R, T* B, const Scratch<T>& s) {         \
      if constexpr (std::is_same<T, float>::value) {                                            \
        PREFIX##_backward_f32(p, d, n, y0, y1, G, band_lo, R, B, s);                            \
      } else {                                                                                  \
        PREFIX##_backward_f64(p, d, n, y0, y1, G, band_lo, R, B, s);                            \
      }                                                                                         \
    }                                                                                           \
  };

#define BO_DEFINE_SLICE_TASKS(PREFIX, KAPPLY)                                                   \
  BO_DEFINE_SLICE_TASKS_FOR(PREFIX, KAPPLY, float, f32)                                         \
  BO_DEFINE_SLICE_TASKS_FOR(PREFIX, KAPPLY, double, f64)                                        \
  BO_SLICE_TASKS_STRUCT(PREFIX, KAPPLY)

// Another translation unit's tasks (grid_splat runs the slice's backward tasks): declarations
// only; the symbols are the target_clones dispatchers defined by BO_DEFINE_SLICE_TASKS.
#define BO_DECLARE_SLICE_TASKS_FOR(PREFIX, T, SUFFIX)                                           \
  void PREFIX##_forward_##SUFFIX(const SliceParams<T>& p, bool dguide, int64_t r0, int64_t r1,  \
                                 T* R, const Scratch<T>& s);                                    \
  void PREFIX##_backward_##SUFFIX(const SliceParams<T>& p, bool dguide, int64_t n, int64_t y0,  \
                                  int64_t y1, double* G, int64_t band_lo, T* R, T* B,           \
                                  const Scratch<T>& s);

#define BO_DECLARE_SLICE_TASKS(PREFIX, KAPPLY)                                                  \
  BO_DECLARE_SLICE_TASKS_FOR(PREFIX, float, f32)                                                \
  BO_DECLARE_SLICE_TASKS_FOR(PREFIX, double, f64)                                               \
  BO_SLICE_TASKS_STRUCT(PREFIX, KAPPLY)

inline at::Tensor prepared(const at::Tensor& t, at::ScalarType dtype) {
  return t.to(dtype).contiguous();
}

// Column geometry, identical for every row: per-column x weights and the segments of columns
// that share the same pair of x cells.
template <typename T>
struct XGeometry {
  std::vector<T> wx0, wx1;
  std::vector<int64_t> seg_begin, seg_c0, seg_c1;

  XGeometry(int64_t W, int64_t Gw, bool align_corners) {
    wx0.reserve(W);
    wx1.reserve(W);
    for (int64_t x = 0; x < W; ++x) {
      const AxisTaps<T> t = image_taps<T>(x, W, Gw, align_corners);
      if (x == 0 || t.i0 != seg_c0.back() || t.i1 != seg_c1.back()) {
        seg_begin.push_back(x);
        seg_c0.push_back(t.i0);
        seg_c1.push_back(t.i1);
      }
      wx0.push_back(t.w0);
      wx1.push_back(t.w1);
    }
    seg_begin.push_back(W);
  }

  ColumnTaps<T> taps() const {
    return ColumnTaps<T>{wx0.data(),    wx1.data(),    seg_begin.data(),
                         seg_c0.data(), seg_c1.data(), static_cast<int64_t>(seg_c0.size())};
  }
};

// One call's grid and guide in the compute dtype, the column geometry, and the parameters that
// point into them, kept alive together. The engine's grid is transposed to (N, Gh, Gw, D, C) (a
// row of the image then blends two contiguous planes); with `direct` (use_direct: the calls
// whose kernels may take the per-pixel path, slice_direct.h) the grid keeps its layout.
template <typename T>
struct Problem {
  at::Tensor grid_t;
  at::Tensor guide;
  XGeometry<T> xg;
  SliceParams<T> p{};

  Problem(const at::Tensor& grid, const at::Tensor& guide_in, const SliceGeometry& g, bool direct = false)
      : grid_t(direct ? prepared(grid, c10::CppTypeToScalarType<T>::value)
                      : grid.to(c10::CppTypeToScalarType<T>::value).permute({0, 3, 4, 2, 1}).contiguous()),
        guide(prepared(guide_in, c10::CppTypeToScalarType<T>::value)),
        xg(direct ? 0 : g.W, g.Gw, g.align_corners) {
    p.g = g;
    p.x = xg.taps();
    p.direct = direct;
    (direct ? p.grid : p.grid_t) = grid_t.data_ptr<T>();
    p.guide = guide.data_ptr<T>();
  }

  // Without a grid: enough for a backward pass that only splats (grid_splat, or the slice's grid
  // gradient alone), which never reads the grid.
  Problem(const at::Tensor& guide_in, const SliceGeometry& g, bool direct = false)
      : guide(prepared(guide_in, c10::CppTypeToScalarType<T>::value)), xg(direct ? 0 : g.W, g.Gw, g.align_corners) {
    p.g = g;
    p.x = xg.taps();
    p.direct = direct;
    p.guide = guide.data_ptr<T>();
  }
};

// The block buffers of one task. Every buffer holds C rows of kBlock: C is at least the number
// of input channels and of output channels.
template <typename T>
struct TaskScratch {
  std::vector<T> buf;
  int64_t rows;
  explicit TaskScratch(int64_t C) : buf(6 * C * kBlock, T(0)), rows(C * kBlock) {}
  Scratch<T> view() {
    T* b = buf.data();
    return Scratch<T>{b, b + rows, b + 2 * rows, b + 3 * rows, b + 4 * rows, b + 5 * rows};
  }
};

template <typename Tasks, typename T>
void run_forward(const SliceParams<T>& p, bool dguide) {
  if (p.direct) return direct_forward<T, Tasks::kApply>(p, dguide);
  const int64_t rows = p.g.N * p.g.H;
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(p.g.W, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    std::vector<T> R(p.row_table_size());
    TaskScratch<T> s(p.g.C);
    Tasks::forward(p, dguide, r0, r1, R.data(), s.view());
  });
}

// Rows of one image are split into chunks whose number depends only on the sizes. Each chunk
// accumulates the gradient of just the band of grid rows its image rows touch (the y taps are
// monotone in y), so the partial sums take about one grid's worth of memory whatever the number
// of chunks. The bands are then summed in chunk order: bitwise reproducible whatever the thread
// count, and no atomics. grad_grid is written when p.need_grid; it is (N, C, D, Gh, Gw).
template <typename Tasks, typename T>
void run_backward(const SliceParams<T>& p, bool dguide, T* grad_grid) {
  if (p.direct) return direct_backward<T, Tasks::kApply>(p, dguide, grad_grid);
  struct Chunk {
    int64_t y0, y1, band_lo, band_hi, offset;
  };
  const SliceGeometry& g = p.g;
  const int64_t plane = p.row_table_size();
  const int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(64, g.H / 16));
  std::vector<Chunk> chunks(nchunks);
  int64_t per_image = 0;
  for (int64_t i = 0; i < nchunks; ++i) {
    Chunk& c = chunks[i];
    c.y0 = g.H * i / nchunks;
    c.y1 = g.H * (i + 1) / nchunks;
    c.band_lo = image_taps<T>(c.y0, g.H, g.Gh, g.align_corners).i0;
    c.band_hi = image_taps<T>(c.y1 - 1, g.H, g.Gh, g.align_corners).i1;
    c.offset = per_image;
    per_image += (c.band_hi - c.band_lo + 1) * plane;
  }
  std::vector<double> partial(p.need_grid ? static_cast<size_t>(g.N * per_image) : 0, 0.0);

  at::parallel_for(0, g.N * nchunks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> R(plane), B(p.need_grid ? plane : 0);
    TaskScratch<T> scratch(g.C);
    const Scratch<T> s = scratch.view();
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / nchunks;
      const Chunk& c = chunks[t % nchunks];
      double* band = p.need_grid ? partial.data() + n * per_image + c.offset : nullptr;
      Tasks::backward(p, dguide, n, c.y0, c.y1, band, c.band_lo, R.data(), B.data(), s);
    }
  });
  if (!p.need_grid) return;

  // Sum the bands per grid row and transpose (Gh, Gw, D, C) back to (C, D, Gh, Gw).
  at::parallel_for(0, g.N * g.Gh, 1, [&](int64_t r0, int64_t r1) {
    std::vector<double> row(plane);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / g.Gh, yc = r % g.Gh;
      std::fill(row.begin(), row.end(), 0.0);
      for (const Chunk& c : chunks) {
        if (yc < c.band_lo || yc > c.band_hi) continue;
        const double* src = partial.data() + n * per_image + c.offset + (yc - c.band_lo) * plane;
        for (int64_t i = 0; i < plane; ++i) row[i] += src[i];
      }
      for (int64_t xc = 0; xc < g.Gw; ++xc) {
        for (int64_t z = 0; z < g.D; ++z) {
          for (int64_t c = 0; c < g.C; ++c) {
            grad_grid[(((n * g.C + c) * g.D + z) * g.Gh + yc) * g.Gw + xc] =
                static_cast<T>(row[(xc * g.D + z) * g.C + c]);
          }
        }
      }
    }
  });
}

// A splat on a slice's backward tasks (grid_splat, and bilateral_grid_filter's splat of
// [input, 1]): the image (N, C, H, W) in place of grad_output, no grid read, into a grid of g.C
// channels; with ones_channel g.C is C + 1, the last channel ones (implied, never materialised).
template <typename Tasks>
at::Tensor run_splat(const at::Tensor& input, const at::Tensor& guide, const SliceGeometry& g,
                     bool ones_channel) {
  if (g.pixels() == 0) return at::zeros({g.N, g.C, g.D, g.Gh, g.Gw}, input.options());
  const auto dt = compute_dtype(input.scalar_type());
  const at::Tensor values = prepared(input, dt);
  at::Tensor out = at::empty({g.N, g.C, g.D, g.Gh, g.Gw}, input.options().dtype(dt));
  AT_DISPATCH_FLOATING_TYPES(dt, "bilateral_ops_splat_cpu", [&] {
    Problem<scalar_t> problem(guide, g, !ones_channel && use_direct(g));
    SliceParams<scalar_t>& p = problem.p;
    p.grad_output = values.data_ptr<scalar_t>();
    p.need_grid = true;
    p.need_guide = false;
    p.ones_channel = ones_channel;
    run_backward<Tasks>(p, false, out.data_ptr<scalar_t>());
  });
  return out.to(input.scalar_type());
}

}  // namespace cpu
}  // namespace bilateral_ops
