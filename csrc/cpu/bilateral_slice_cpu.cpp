// CPU kernels of bilateral_slice and bilateral_slice_apply, forward and backward.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "slice_engine.h"

namespace bilateral_ops {
namespace cpu {

// Task functions: the only non-inline code, one copy per instruction set (BO_TARGET_CLONES).
#define BO_DEFINE_TASKS(T, SUFFIX)                                                                 \
  BO_TARGET_CLONES void slice_forward_task_##SUFFIX(const SliceParams<T>& p, int64_t r0,           \
                                                    int64_t r1, T* R, T* A) {                      \
    forward_rows(p, r0, r1, R, A);                                                                 \
  }                                                                                                \
  BO_TARGET_CLONES void slice_backward_task_##SUFFIX(                                              \
      const SliceParams<T>& p, int64_t n, int64_t y0, int64_t y1, double* G, int64_t band_lo,      \
      T* R, T* B, T* A, T* dA, T* V) {                                                             \
    backward_rows(p, n, y0, y1, G, band_lo, R, B, A, dA, V);                                       \
  }                                                                                                \
  inline void forward_task(const SliceParams<T>& p, int64_t r0, int64_t r1, T* R, T* A) {          \
    slice_forward_task_##SUFFIX(p, r0, r1, R, A);                                                  \
  }                                                                                                \
  inline void backward_task(const SliceParams<T>& p, int64_t n, int64_t y0, int64_t y1, double* G, \
                            int64_t band_lo, T* R, T* B, T* A, T* dA, T* V) {                      \
    slice_backward_task_##SUFFIX(p, n, y0, y1, G, band_lo, R, B, A, dA, V);                        \
  }

BO_DEFINE_TASKS(float, f32)
BO_DEFINE_TASKS(double, f64)
#undef BO_DEFINE_TASKS

namespace {

// Column geometry, identical for every row: per-column x weights and the segments of columns
// that share the same pair of x cells.
template <typename T>
struct XGeometry {
  std::vector<T> wx0, wx1;
  std::vector<int64_t> seg_begin, seg_c0, seg_c1;

  XGeometry(int64_t W, int64_t Gw) {
    wx0.reserve(W);
    wx1.reserve(W);
    for (int64_t x = 0; x < W; ++x) {
      const AxisTaps<T> t = image_taps<T>(x, W, Gw);
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

  void fill(SliceParams<T>& p) const {
    p.wx0 = wx0.data();
    p.wx1 = wx1.data();
    p.seg_begin = seg_begin.data();
    p.seg_c0 = seg_c0.data();
    p.seg_c1 = seg_c1.data();
    p.nseg = static_cast<int64_t>(seg_c0.size());
  }
};

// Half-precision inputs are computed in float32 on the CPU (DESIGN.md) and returned in their dtype.
at::ScalarType compute_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

at::Tensor prepared(const at::Tensor& t, at::ScalarType dtype) { return t.to(dtype).contiguous(); }

// The grid as (N, Gh, Gw, D, C): a row of the image then blends two contiguous planes.
at::Tensor transposed_grid(const at::Tensor& grid, at::ScalarType dtype) {
  return grid.to(dtype).permute({0, 3, 4, 2, 1}).contiguous();
}

// One call's grid and guide in the compute dtype, the parameters that point into them, and the
// column geometry, kept alive together. Sizes are read off the tensors.
template <typename T>
struct Problem {
  at::Tensor grid_t;  // (N, Gh, Gw, D, C)
  at::Tensor guide;   // (N, H, W), contiguous
  XGeometry<T> xg;
  SliceParams<T> p{};

  Problem(const at::Tensor& grid, const at::Tensor& guide_in, at::ScalarType dt)
      : grid_t(transposed_grid(grid, dt)),
        guide(prepared(guide_in, dt)),
        xg(guide_in.size(2), grid.size(4)) {
    p.N = guide.size(0);
    p.H = guide.size(1);
    p.W = guide.size(2);
    p.C = grid.size(1);
    p.D = grid.size(2);
    p.Gh = grid.size(3);
    p.Gw = grid.size(4);
    p.grid_t = grid_t.data_ptr<T>();
    p.guide = guide.data_ptr<T>();
    xg.fill(p);
  }
};

template <typename T>
void run_forward(const SliceParams<T>& p) {
  const int64_t rows = p.N * p.H;
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(p.W, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    std::vector<T> R(p.row_table_size());
    std::vector<T> A(p.C * kBlock);
    forward_task(p, r0, r1, R.data(), A.data());
  });
}

// Rows of one image are split into chunks whose number depends only on the sizes. Each chunk
// accumulates the gradient of just the band of grid rows its image rows touch (the y taps are
// monotone in y), so the partial sums take about one grid's worth of memory whatever the number
// of chunks. The bands are then summed in chunk order: bitwise reproducible whatever the thread
// count, and no atomics.
template <typename T>
void run_backward(const SliceParams<T>& p, at::Tensor& grad_grid) {
  struct Chunk {
    int64_t y0, y1, band_lo, band_hi, offset;
  };
  const int64_t plane = p.row_table_size();
  const int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(64, p.H / 16));
  std::vector<Chunk> chunks(nchunks);
  int64_t per_image = 0;
  for (int64_t i = 0; i < nchunks; ++i) {
    Chunk& c = chunks[i];
    c.y0 = p.H * i / nchunks;
    c.y1 = p.H * (i + 1) / nchunks;
    c.band_lo = image_taps<T>(c.y0, p.H, p.Gh).i0;
    c.band_hi = image_taps<T>(c.y1 - 1, p.H, p.Gh).i1;
    c.offset = per_image;
    per_image += (c.band_hi - c.band_lo + 1) * plane;
  }
  std::vector<double> partial(static_cast<size_t>(p.N * per_image), 0.0);

  at::parallel_for(0, p.N * nchunks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> R(plane), B(plane), A(p.C * kBlock), dA(p.C * kBlock), V(p.C * kBlock);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / nchunks;
      const Chunk& c = chunks[t % nchunks];
      backward_task(p, n, c.y0, c.y1, partial.data() + n * per_image + c.offset, c.band_lo,
                    R.data(), B.data(), A.data(), dA.data(), V.data());
    }
  });

  // Sum the bands per grid row and transpose (Gh, Gw, D, C) back to (C, D, Gh, Gw).
  T* out = grad_grid.data_ptr<T>();
  const int64_t D = p.D, C = p.C, Gh = p.Gh, Gw = p.Gw;
  at::parallel_for(0, p.N * Gh, 1, [&](int64_t r0, int64_t r1) {
    std::vector<double> row(plane);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / Gh, yc = r % Gh;
      std::fill(row.begin(), row.end(), 0.0);
      for (const Chunk& c : chunks) {
        if (yc < c.band_lo || yc > c.band_hi) continue;
        const double* src = partial.data() + n * per_image + c.offset + (yc - c.band_lo) * plane;
        for (int64_t i = 0; i < plane; ++i) row[i] += src[i];
      }
      for (int64_t xc = 0; xc < Gw; ++xc) {
        for (int64_t z = 0; z < D; ++z) {
          for (int64_t c = 0; c < C; ++c) {
            out[(((n * C + c) * D + z) * Gh + yc) * Gw + xc] =
                static_cast<T>(row[(xc * D + z) * C + c]);
          }
        }
      }
    }
  });
}

bool is_empty_image(const at::Tensor& guide) { return guide.numel() == 0; }

at::Tensor slice_forward(const at::Tensor& grid, const at::Tensor& guide) {
  check_grid_guide(grid, guide);
  const auto out_dtype = grid.scalar_type();
  const int64_t N = guide.size(0), H = guide.size(1), W = guide.size(2), C = grid.size(1);
  if (is_empty_image(guide)) return at::zeros({N, C, H, W}, grid.options());
  const auto dt = compute_dtype(out_dtype);
  at::Tensor out = at::empty({N, C, H, W}, grid.options().dtype(dt));
  AT_DISPATCH_FLOATING_TYPES(dt, "bilateral_slice_cpu", [&] {
    Problem<scalar_t> problem(grid, guide, dt);
    SliceParams<scalar_t>& p = problem.p;
    p.apply = false;
    p.output = out.data_ptr<scalar_t>();
    run_forward(p);
  });
  return out.to(out_dtype);
}

std::tuple<at::Tensor, at::Tensor> slice_backward(const at::Tensor& grad_output,
                                                  const at::Tensor& grid, const at::Tensor& guide) {
  check_grid_guide(grid, guide);
  const int64_t N = guide.size(0), H = guide.size(1), W = guide.size(2), C = grid.size(1);
  check_grad_output(grad_output, grid, {N, C, H, W});
  if (is_empty_image(guide))
    return {at::zeros(grid.sizes(), grid.options()), at::zeros(guide.sizes(), guide.options())};
  const auto dt = compute_dtype(grid.scalar_type());
  at::Tensor go = prepared(grad_output, dt);
  at::Tensor grad_grid = at::empty(grid.sizes(), grid.options().dtype(dt));
  at::Tensor grad_guide = at::empty({N, H, W}, guide.options().dtype(dt));
  AT_DISPATCH_FLOATING_TYPES(dt, "bilateral_slice_backward_cpu", [&] {
    Problem<scalar_t> problem(grid, guide, dt);
    SliceParams<scalar_t>& p = problem.p;
    p.apply = false;
    p.grad_output = go.data_ptr<scalar_t>();
    p.grad_guide = grad_guide.data_ptr<scalar_t>();
    run_backward(p, grad_grid);
  });
  return {grad_grid.to(grid.scalar_type()), grad_guide.to(guide.scalar_type())};
}

template <typename T>
void set_apply(SliceParams<T>& p, const at::Tensor& input, bool has_offset) {
  p.apply = true;
  p.has_offset = has_offset;
  p.Ci = input.size(1);
  p.stride = affine_stride(p.Ci, has_offset);
  p.Co = p.C / p.stride;
  p.input = input.data_ptr<T>();
}

at::Tensor slice_apply_forward(const at::Tensor& grid, const at::Tensor& guide,
                               const at::Tensor& input, bool has_offset) {
  check_slice_apply(grid, guide, input, has_offset);
  const int64_t N = guide.size(0), H = guide.size(1), W = guide.size(2), C = grid.size(1);
  const int64_t Co = C / affine_stride(input.size(1), has_offset);
  if (is_empty_image(guide)) return at::zeros({N, Co, H, W}, input.options());
  const auto dt = compute_dtype(input.scalar_type());
  at::Tensor input_c = prepared(input, dt);
  at::Tensor out = at::empty({N, Co, H, W}, input.options().dtype(dt));
  AT_DISPATCH_FLOATING_TYPES(dt, "bilateral_slice_apply_cpu", [&] {
    Problem<scalar_t> problem(grid, guide, dt);
    SliceParams<scalar_t>& p = problem.p;
    set_apply(p, input_c, has_offset);
    p.output = out.data_ptr<scalar_t>();
    run_forward(p);
  });
  return out.to(input.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> slice_apply_backward(const at::Tensor& grad_output,
                                                                    const at::Tensor& grid,
                                                                    const at::Tensor& guide,
                                                                    const at::Tensor& input,
                                                                    bool has_offset) {
  check_slice_apply(grid, guide, input, has_offset);
  const int64_t N = guide.size(0), H = guide.size(1), W = guide.size(2), C = grid.size(1);
  const int64_t Co = C / affine_stride(input.size(1), has_offset);
  check_grad_output(grad_output, grid, {N, Co, H, W});
  if (is_empty_image(guide)) {
    return {at::zeros(grid.sizes(), grid.options()), at::zeros(guide.sizes(), guide.options()),
            at::zeros(input.sizes(), input.options())};
  }
  const auto dt = compute_dtype(input.scalar_type());
  at::Tensor input_c = prepared(input, dt);
  at::Tensor go = prepared(grad_output, dt);
  at::Tensor grad_grid = at::empty(grid.sizes(), grid.options().dtype(dt));
  at::Tensor grad_guide = at::empty({N, H, W}, guide.options().dtype(dt));
  at::Tensor grad_input = at::empty(input.sizes(), input.options().dtype(dt));
  AT_DISPATCH_FLOATING_TYPES(dt, "bilateral_slice_apply_backward_cpu", [&] {
    Problem<scalar_t> problem(grid, guide, dt);
    SliceParams<scalar_t>& p = problem.p;
    set_apply(p, input_c, has_offset);
    p.grad_output = go.data_ptr<scalar_t>();
    p.grad_guide = grad_guide.data_ptr<scalar_t>();
    p.grad_input = grad_input.data_ptr<scalar_t>();
    run_backward(p, grad_grid);
  });
  return {grad_grid.to(grid.scalar_type()), grad_guide.to(guide.scalar_type()),
          grad_input.to(input.scalar_type())};
}

}  // namespace
}  // namespace cpu
}  // namespace bilateral_ops

TORCH_LIBRARY_IMPL(bilateral_ops, CPU, m) {
  m.impl("bilateral_slice", &bilateral_ops::cpu::slice_forward);
  m.impl("_bilateral_slice_backward", &bilateral_ops::cpu::slice_backward);
  m.impl("bilateral_slice_apply", &bilateral_ops::cpu::slice_apply_forward);
  m.impl("_bilateral_slice_apply_backward", &bilateral_ops::cpu::slice_apply_backward);
}
