#pragma once
// Host side of the slice kernels, shared by bilateral_slice.cu, bilateral_slice_apply.cu and
// grid_splat.cu (the slice backward's grid gradient, with no grid): turns the plans of
// launch_config.h into launches on the current stream. The callers have
// checked the arguments (csrc/checks.h), made them contiguous, set the device guard and handled
// empty images.

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/core/TensorOptions.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <array>
#include <climits>
#include <cstdint>
#include <type_traits>

#include "launch.cuh"
#include "launch_config.h"
#include "slice_kernels.cuh"

namespace bilateral_ops {
namespace cuda {
namespace {

// Sizes the kernels index in int32 (offsets inside one channel slab, warp keys).
inline void check_int32_sizes(const SliceGeometry& g) {
  TORCH_CHECK(g.D * g.Gh * g.Gw <= INT_MAX && g.C * g.D <= INT_MAX && g.W + g.H <= INT_MAX,
              "bilateral_ops CUDA kernels: grid of ", g.D, "x", g.Gh, "x", g.Gw, " cells and ",
              g.C, " channels is too large (a channel slab must have fewer than 2^31 cells)");
}

// The forward of the op or (dguide) its guide derivative into `out`. `input` is undefined for
// slice.
template <typename scalar_t, bool kApply>
void run_forward(const SliceGeometry& g, const AffineLayout& l, const at::Tensor& grid,
                 const at::Tensor& guide, const at::Tensor& input, at::Tensor& out, bool dguide) {
  using acc_t = acc_type<scalar_t>;
  check_int32_sizes(g);
  const launch::ForwardPlan plan = launch::forward_plan(g, kApply, l, sizeof(acc_t));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  ForwardArgs<scalar_t> a{};
  a.grid = grid.data_ptr<scalar_t>();
  a.guide = guide.data_ptr<scalar_t>();
  a.input = kApply ? input.data_ptr<scalar_t>() : nullptr;
  a.output = out.data_ptr<scalar_t>();
  a.dguide = dguide;
  if constexpr (sizeof(acc_t) == sizeof(float)) {
    if (plan.vectorised) {
      at::Tensor packed = at::empty({plan.packed_elems}, grid.options().dtype(at::kFloat));
      BO_LAUNCH(pack_grid_kernel<scalar_t>, plan.pack, stream, g, a.grid, plan.rows,
                plan.row_stride, 4 * plan.chunks, packed.data_ptr<float>());
      a.packed = reinterpret_cast<const float4*>(packed.data_ptr<float>());
      a.rows = plan.rows;
      // slice packs 4 channels to a row: one chunk, never two.
      TORCH_INTERNAL_ASSERT(plan.chunks == 1 || (kApply && plan.chunks == 2),
                            "bilateral_ops: unexpected packed row length");
      if (!kApply || plan.chunks == 1) {
        BO_LAUNCH((forward_vec_kernel<scalar_t, 1, kApply>), plan.forward, stream, g, l, a);
      } else if constexpr (kApply) {
        BO_LAUNCH((forward_vec_kernel<scalar_t, 2, kApply>), plan.forward, stream, g, l, a);
      }
      return;  // `packed` is freed on the stream's order: the caching allocator waits for it
    }
  }
  TORCH_INTERNAL_ASSERT(!plan.vectorised, "bilateral_ops: vectorised forward needs float math");
  BO_LAUNCH((forward_scalar_kernel<scalar_t, kApply>), plan.forward, stream, g, l, a);
}

// The grid a backward pass reads, and how its gradient is allocated. The values are read only by
// the per-pixel gradients (grad_guide, grad_input): a pass that wants grad_grid alone (grid_splat,
// whose "grid" does not exist yet) may leave `data` null. `options` is the grid's (dtype and
// device of grad_grid); its sizes are those of the geometry, (N, C, D, Gh, Gw).
template <typename scalar_t>
struct GridRef {
  const scalar_t* data;
  at::TensorOptions options;
};

// Gradients of the op (or, with dguide, of its guide derivative). Outputs that are not wanted
// are left undefined by the caller; grad_grid is returned (in the grid's dtype) when wanted.
template <typename scalar_t, bool kApply>
at::Tensor run_backward(const SliceGeometry& g, const AffineLayout& l, const at::Tensor& grad_output,
                        const GridRef<scalar_t>& grid, const at::Tensor& guide,
                        const at::Tensor& input, bool dguide, const launch::BackwardRequest& req,
                        at::Tensor* grad_guide, at::Tensor* grad_input) {
  using acc_t = acc_type<scalar_t>;
  check_int32_sizes(g);
  const bool per_pixel = req.need_guide || (kApply && req.need_input);
  TORCH_INTERNAL_ASSERT(grid.data != nullptr || !per_pixel,
                        "bilateral_ops: the per-pixel gradients read the grid");
  const launch::BackwardPlan plan = launch::backward_plan(g, kApply, l, sizeof(acc_t), req);
  TORCH_CHECK(plan.valid, "bilateral_ops: too many channels (", g.C, ") for the deterministic ",
              "grid gradient: one pixel's values do not fit in shared memory");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const std::array<int64_t, 5> grid_sizes = {g.N, g.C, g.D, g.Gh, g.Gw};
  const int64_t grid_numel = g.N * g.C * g.D * g.Gh * g.Gw;

  at::Tensor grad_grid;
  at::Tensor acc;  // scatter accumulator, in acc_t
  BackwardArgs<scalar_t> a{};
  a.grid = grid.data;
  a.guide = guide.data_ptr<scalar_t>();
  a.input = kApply ? input.data_ptr<scalar_t>() : nullptr;
  a.grad_output = grad_output.data_ptr<scalar_t>();
  a.grad_guide = req.need_guide ? grad_guide->data_ptr<scalar_t>() : nullptr;
  a.grad_input = kApply && req.need_input ? grad_input->data_ptr<scalar_t>() : nullptr;
  a.shared_cap = plan.shared_cap;
  a.dguide = dguide;
  a.need_guide = req.need_guide;
  a.need_input = kApply && req.need_input;
  if (plan.scatter) {
    acc = at::zeros(grid_sizes, grid.options.dtype(c10::CppTypeToScalarType<acc_t>::value));
    a.grad_grid_acc = acc.data_ptr<acc_t>();
    BO_LAUNCH((backward_scatter_kernel<scalar_t, kApply>), plan.tile, stream, g, l, a);
    grad_grid = std::is_same<acc_t, scalar_t>::value
                    ? acc
                    : acc.to(c10::CppTypeToScalarType<scalar_t>::value);
  } else if (plan.tile.present) {
    BO_LAUNCH((backward_pixel_kernel<scalar_t, kApply>), plan.tile, stream, g, l, a);
  }
  if (!req.need_grid || plan.scatter) return grad_grid;

  // Deterministic gather.
  at::Tensor axis = at::empty({static_cast<int64_t>((g.W + g.H) * sizeof(AxisEntry<acc_t>))},
                              grid.options.dtype(at::kByte));
  AxisEntry<acc_t>* table = reinterpret_cast<AxisEntry<acc_t>*>(axis.data_ptr<uint8_t>());
  BO_LAUNCH(axis_table_kernel<acc_t>, plan.axis, stream, g, table);
  grad_grid = at::empty(grid_sizes, grid.options);
  at::Tensor partial;
  GatherArgs<scalar_t> ga{};
  ga.guide = a.guide;
  ga.input = a.input;
  ga.grad_output = a.grad_output;
  ga.axis = table;
  ga.grad_grid = grad_grid.data_ptr<scalar_t>();
  ga.chunk = plan.gather_chunk;
  ga.split = static_cast<int>(plan.gather_split);
  ga.slices = static_cast<int>(plan.gather_slices);
  ga.own = static_cast<int>(plan.gather_own);
  ga.passes = static_cast<int>(plan.gather_passes);
  ga.dguide = dguide;
  if (plan.gather_split > 1) {
    partial = at::empty({plan.gather_split * grid_numel}, grid.options.dtype(at::kDouble));
    ga.partial = partial.data_ptr<double>();
  }
  BO_LAUNCH((grad_grid_gather_kernel<scalar_t, kApply>), plan.gather, stream, g, l, ga);
  if (plan.finish.present) {
    BO_LAUNCH(gather_finish_kernel<scalar_t>, plan.finish, stream, ga.partial, grid_numel,
              ga.split, ga.grad_grid);
  }
  return grad_grid;
}

// The slice ops' form: the grid tensor itself (contiguous, of the geometry's sizes).
template <typename scalar_t, bool kApply>
at::Tensor run_backward(const SliceGeometry& g, const AffineLayout& l, const at::Tensor& grad_output,
                        const at::Tensor& grid, const at::Tensor& guide, const at::Tensor& input,
                        bool dguide, const launch::BackwardRequest& req, at::Tensor* grad_guide,
                        at::Tensor* grad_input) {
  return run_backward<scalar_t, kApply>(g, l, grad_output,
                                        GridRef<scalar_t>{grid.data_ptr<scalar_t>(), grid.options()},
                                        guide, input, dguide, req, grad_guide, grad_input);
}

}  // namespace
}  // namespace cuda
}  // namespace bilateral_ops
