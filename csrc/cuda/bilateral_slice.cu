// CUDA kernels of bilateral_slice, _bilateral_slice_dguide and _bilateral_slice_backward
// (csrc/ops.cpp has the schemas, csrc/cpu/bilateral_slice.cpp the reference semantics). The
// kernels are shared with bilateral_slice_apply: slice_kernels.cuh, slice_launch.cuh.

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

at::Tensor slice_impl(const at::Tensor& grid_in, const at::Tensor& guide_in, bool align_corners,
                      bool dguide) {
  const SliceGeometry g = check_grid_guide(grid_in, guide_in, align_corners);
  const c10::cuda::CUDAGuard device_guard(grid_in.device());
  if (g.pixels() == 0) return at::zeros({g.N, g.C, g.H, g.W}, grid_in.options());
  const at::Tensor grid = grid_in.contiguous();
  const at::Tensor guide = guide_in.contiguous();
  at::Tensor out = at::empty({g.N, g.C, g.H, g.W}, grid.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grid.scalar_type(),
                                  "bilateral_slice_cuda", [&] {
                                    run_forward<scalar_t, false>(g, AffineLayout{}, grid, guide,
                                                                 at::Tensor(), out, dguide);
                                  });
  return out;
}

at::Tensor bilateral_slice(const at::Tensor& grid, const at::Tensor& guide, bool align_corners) {
  return slice_impl(grid, guide, align_corners, false);
}

at::Tensor bilateral_slice_dguide(const at::Tensor& grid, const at::Tensor& guide,
                                  bool align_corners) {
  return slice_impl(grid, guide, align_corners, true);
}

std::tuple<at::Tensor, at::Tensor> bilateral_slice_backward(const at::Tensor& grad_output_in,
                                                            const at::Tensor& grid_in,
                                                            const at::Tensor& guide_in,
                                                            bool dguide,
                                                            std::array<bool, 2> mask,
                                                            bool align_corners) {
  const SliceGeometry g = check_grid_guide(grid_in, guide_in, align_corners);
  check_grad_output(grad_output_in, grid_in, {g.N, g.C, g.H, g.W});
  check_output_mask(dguide, mask);
  const c10::cuda::CUDAGuard device_guard(grid_in.device());
  if (g.pixels() == 0 || !(mask[0] || mask[1])) {
    return {zero_or_masked(mask[0], grid_in), zero_or_masked(mask[1], guide_in)};
  }
  const at::Tensor grid = grid_in.contiguous();
  const at::Tensor guide = guide_in.contiguous();
  const at::Tensor go = grad_output_in.contiguous();
  at::Tensor grad_guide = mask[1] ? at::empty({g.N, g.H, g.W}, guide.options()) : masked_out(guide);
  launch::BackwardRequest req;
  req.need_grid = mask[0];
  req.need_guide = mask[1];
  req.need_input = false;
  req.deterministic = at::globalContext().deterministicAlgorithms();
  at::Tensor grad_grid;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grid.scalar_type(), "bilateral_slice_backward_cuda", [&] {
        grad_grid = run_backward<scalar_t, false>(g, AffineLayout{}, go, grid, guide, at::Tensor(),
                                                  dguide, req, &grad_guide, nullptr);
      });
  if (!mask[0]) grad_grid = masked_out(grid);
  return {grad_grid, grad_guide};
}

}  // namespace
}  // namespace cuda
}  // namespace bilateral_ops

TORCH_LIBRARY_IMPL(bilateral_ops, CUDA, m) {
  m.impl("bilateral_slice", &bilateral_ops::cuda::bilateral_slice);
  m.impl("_bilateral_slice_dguide", &bilateral_ops::cuda::bilateral_slice_dguide);
  m.impl("_bilateral_slice_backward", &bilateral_ops::cuda::bilateral_slice_backward);
}
