// CPU kernels of bilateral_slice, its guide derivative and its backward (csrc/ops.cpp has the
// schemas). The engine is shared with bilateral_slice_apply: slice_engine.h, slice_runner.h.

#include <ATen/ATen.h>
#include <torch/library.h>

#include "../checks.h"
#include "slice_runner.h"

namespace bilateral_ops {
namespace cpu {

BO_DEFINE_SLICE_TASKS(slice, false)

namespace {

at::Tensor slice_impl(const at::Tensor& grid, const at::Tensor& guide, bool align_corners,
                      bool dguide) {
  const SliceGeometry g = check_grid_guide(grid, guide, align_corners);
  if (g.pixels() == 0) return at::zeros({g.N, g.C, g.H, g.W}, grid.options());
  const auto dt = compute_dtype(grid.scalar_type());
  at::Tensor out = at::empty({g.N, g.C, g.H, g.W}, grid.options().dtype(dt));
  AT_DISPATCH_FLOATING_TYPES(dt, "bilateral_slice_cpu", [&] {
    Problem<scalar_t> problem(grid, guide, g, use_direct(g));
    problem.p.output = out.data_ptr<scalar_t>();
    run_forward<slice_tasks>(problem.p, dguide);
  });
  return out.to(grid.scalar_type());
}

at::Tensor bilateral_slice(const at::Tensor& grid, const at::Tensor& guide, bool align_corners) {
  return slice_impl(grid, guide, align_corners, false);
}

at::Tensor bilateral_slice_dguide(const at::Tensor& grid, const at::Tensor& guide,
                                  bool align_corners) {
  return slice_impl(grid, guide, align_corners, true);
}

std::tuple<at::Tensor, at::Tensor> bilateral_slice_backward(const at::Tensor& grad_output,
                                                            const at::Tensor& grid,
                                                            const at::Tensor& guide, bool dguide,
                                                            std::array<bool, 2> mask,
                                                            bool align_corners) {
  const SliceGeometry g = check_grid_guide(grid, guide, align_corners);
  check_grad_output(grad_output, grid, {g.N, g.C, g.H, g.W});
  check_output_mask(dguide, mask);
  if (g.pixels() == 0 || !(mask[0] || mask[1])) {
    return {zero_or_masked(mask[0], grid), zero_or_masked(mask[1], guide)};
  }
  const auto dt = compute_dtype(grid.scalar_type());
  const at::Tensor go = prepared(grad_output, dt);
  at::Tensor grad_grid = mask[0] ? at::empty(grid.sizes(), grid.options().dtype(dt)) : masked_out(grid);
  at::Tensor grad_guide =
      mask[1] ? at::empty({g.N, g.H, g.W}, guide.options().dtype(dt)) : masked_out(guide);
  AT_DISPATCH_FLOATING_TYPES(dt, "bilateral_slice_backward_cpu", [&] {
    // The grid gradient alone is a splat of grad_output: the grid itself is never read.
    Problem<scalar_t> problem =
        mask[1] ? Problem<scalar_t>(grid, guide, g, use_direct(g)) : Problem<scalar_t>(guide, g, use_direct(g));
    SliceParams<scalar_t>& p = problem.p;
    p.grad_output = go.data_ptr<scalar_t>();
    p.need_grid = mask[0];
    p.need_guide = mask[1];
    p.grad_guide = mask[1] ? grad_guide.data_ptr<scalar_t>() : nullptr;
    run_backward<slice_tasks>(p, dguide, mask[0] ? grad_grid.data_ptr<scalar_t>() : nullptr);
  });
  return {grad_grid.to(grid.scalar_type()), grad_guide.to(guide.scalar_type())};
}

}  // namespace
}  // namespace cpu
}  // namespace bilateral_ops

TORCH_LIBRARY_IMPL(bilateral_ops, CPU, m) {
  m.impl("bilateral_slice", &bilateral_ops::cpu::bilateral_slice);
  m.impl("_bilateral_slice_dguide", &bilateral_ops::cpu::bilateral_slice_dguide);
  m.impl("_bilateral_slice_backward", &bilateral_ops::cpu::bilateral_slice_backward);
}
