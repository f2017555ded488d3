// CUDA kernels of bilateral_slice_apply, _bilateral_slice_apply_dguide and
// _bilateral_slice_apply_backward (csrc/ops.cpp has the schemas, csrc/cpu/bilateral_slice_apply.cpp
// the reference semantics). The kernels are shared with bilateral_slice: slice_kernels.cuh,
// slice_launch.cuh.

#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <tuple>

#include "../checks.h"
#include "slice_launch.cuh"

namespace bilateral_ops {
namespace cuda {
namespace {

at::Tensor slice_apply_impl(const at::Tensor& grid_in, const at::Tensor& guide_in,
                            const at::Tensor& input_in, bool has_offset, bool align_corners,
                            bool dguide) {
  const SliceApplyShape shape =
      check_slice_apply(grid_in, guide_in, input_in, has_offset, align_corners);
  const SliceGeometry& g = shape.g;
  const AffineLayout& l = shape.l;
  const c10::cuda::CUDAGuard device_guard(grid_in.device());
  if (g.pixels() == 0) return at::zeros({g.N, l.Co, g.H, g.W}, input_in.options());
  const at::Tensor grid = grid_in.contiguous();
  const at::Tensor guide = guide_in.contiguous();
  const at::Tensor input = input_in.contiguous();
  at::Tensor out = at::empty({g.N, l.Co, g.H, g.W}, input.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grid.scalar_type(),
                                  "bilateral_slice_apply_cuda", [&] {
                                    run_forward<scalar_t, true>(g, l, grid, guide, input, out,
                                                                dguide);
                                  });
  return out;
}

at::Tensor bilateral_slice_apply(const at::Tensor& grid, const at::Tensor& guide,
                                 const at::Tensor& input, bool has_offset, bool align_corners) {
  return slice_apply_impl(grid, guide, input, has_offset, align_corners, false);
}

at::Tensor bilateral_slice_apply_dguide(const at::Tensor& grid, const at::Tensor& guide,
                                        const at::Tensor& input, bool has_offset,
                                        bool align_corners) {
  return slice_apply_impl(grid, guide, input, has_offset, align_corners, true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bilateral_slice_apply_backward(
    const at::Tensor& grad_output_in, const at::Tensor& grid_in, const at::Tensor& guide_in,
    const at::Tensor& input_in, bool has_offset, bool dguide, std::array<bool, 3> mask,
    bool align_corners) {
  const SliceApplyShape shape =
      check_slice_apply(grid_in, guide_in, input_in, has_offset, align_corners);
  const SliceGeometry& g = shape.g;
  const AffineLayout& l = shape.l;
  check_grad_output(grad_output_in, grid_in, {g.N, l.Co, g.H, g.W});
  check_output_mask(dguide, mask);
  const c10::cuda::CUDAGuard device_guard(grid_in.device());
  if (g.pixels() == 0 || !(mask[0] || mask[1] || mask[2])) {
    return {zero_or_masked(mask[0], grid_in),
            zero_or_masked(mask[1], guide_in),
            zero_or_masked(mask[2], input_in)};
  }
  const at::Tensor grid = grid_in.contiguous();
  const at::Tensor guide = guide_in.contiguous();
  const at::Tensor input = input_in.contiguous();
  const at::Tensor go = grad_output_in.contiguous();
  at::Tensor grad_guide = mask[1] ? at::empty({g.N, g.H, g.W}, guide.options()) : masked_out(guide);
  at::Tensor grad_input = mask[2] ? at::empty(input.sizes(), input.options()) : masked_out(input);
  launch::BackwardRequest req;
  req.need_grid = mask[0];
  req.need_guide = mask[1];
  req.need_input = mask[2];
  req.deterministic = at::globalContext().deterministicAlgorithms();
  at::Tensor grad_grid;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grid.scalar_type(), "bilateral_slice_apply_backward_cuda", [&] {
        grad_grid = run_backward<scalar_t, true>(g, l, go, grid, guide, input, dguide, req,
                                                 &grad_guide, &grad_input);
      });
  if (!mask[0]) grad_grid = masked_out(grid);
  return {grad_grid, grad_guide, grad_input};
}

}  // namespace
}  // namespace cuda
}  // namespace bilateral_ops

TORCH_LIBRARY_IMPL(bilateral_ops, CUDA, m) {
  m.impl("bilateral_slice_apply", &bilateral_ops::cuda::bilateral_slice_apply);
  m.impl("_bilateral_slice_apply_dguide", &bilateral_ops::cuda::bilateral_slice_apply_dguide);
  m.impl("_bilateral_slice_apply_backward",
         &bilateral_ops::cuda::bilateral_slice_apply_backward);
}
