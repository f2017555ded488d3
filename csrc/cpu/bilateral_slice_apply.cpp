// CPU kernels of bilateral_slice_apply, its guide derivative and its backward (csrc/ops.cpp has
// the schemas). The engine is shared with bilateral_slice: slice_engine.h, slice_runner.h.

#include <ATen/ATen.h>
#include <torch/library.h>

#include "../checks.h"
#include "slice_runner.h"

namespace bilateral_ops {
namespace cpu {

BO_DEFINE_SLICE_TASKS(slice_apply, true)

namespace {

at::Tensor slice_apply_impl(const at::Tensor& grid, const at::Tensor& guide,
                            const at::Tensor& input, bool has_offset, bool align_corners,
                            bool dguide) {
  const SliceApplyShape shape = check_slice_apply(grid, guide, input, has_offset, align_corners);
  const SliceGeometry& g = shape.g;
  const AffineLayout& l = shape.l;
  if (g.pixels() == 0) return at::zeros({g.N, l.Co, g.H, g.W}, input.options());
  const auto dt = compute_dtype(input.scalar_type());
  const at::Tensor input_c = prepared(input, dt);
  at::Tensor out = at::empty({g.N, l.Co, g.H, g.W}, input.options().dtype(dt));
  AT_DISPATCH_FLOATING_TYPES(dt, "bilateral_slice_apply_cpu", [&] {
    Problem<scalar_t> problem(grid, guide, g, use_direct(g));
    SliceParams<scalar_t>& p = problem.p;
    p.l = l;
    p.input = input_c.data_ptr<scalar_t>();
    p.output = out.data_ptr<scalar_t>();
    run_forward<slice_apply_tasks>(p, dguide);
  });
  return out.to(input.scalar_type());
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
    const at::Tensor& grad_output, const at::Tensor& grid, const at::Tensor& guide,
    const at::Tensor& input, bool has_offset, bool dguide, std::array<bool, 3> mask,
    bool align_corners) {
  const SliceApplyShape shape = check_slice_apply(grid, guide, input, has_offset, align_corners);
  const SliceGeometry& g = shape.g;
  const AffineLayout& l = shape.l;
  check_grad_output(grad_output, grid, {g.N, l.Co, g.H, g.W});
  check_output_mask(dguide, mask);
  if (g.pixels() == 0 || !(mask[0] || mask[1] || mask[2])) {
    return {zero_or_masked(mask[0], grid),
            zero_or_masked(mask[1], guide),
            zero_or_masked(mask[2], input)};
  }
  const auto dt = compute_dtype(input.scalar_type());
  const at::Tensor input_c = prepared(input, dt);
  const at::Tensor go = prepared(grad_output, dt);
  at::Tensor grad_grid = mask[0] ? at::empty(grid.sizes(), grid.options().dtype(dt)) : masked_out(grid);
  at::Tensor grad_guide =
      mask[1] ? at::empty({g.N, g.H, g.W}, guide.options().dtype(dt)) : masked_out(guide);
  at::Tensor grad_input =
      mask[2] ? at::empty(input.sizes(), input.options().dtype(dt)) : masked_out(input);
  AT_DISPATCH_FLOATING_TYPES(dt, "bilateral_slice_apply_backward_cpu", [&] {
    Problem<scalar_t> problem(grid, guide, g, use_direct(g));
    SliceParams<scalar_t>& p = problem.p;
    p.l = l;
    p.input = input_c.data_ptr<scalar_t>();
    p.grad_output = go.data_ptr<scalar_t>();
    p.need_grid = mask[0];
    p.need_guide = mask[1];
    p.need_input = mask[2];
    p.grad_guide = mask[1] ? grad_guide.data_ptr<scalar_t>() : nullptr;
    p.grad_input = mask[2] ? grad_input.data_ptr<scalar_t>() : nullptr;
    run_backward<slice_apply_tasks>(p, dguide, mask[0] ? grad_grid.data_ptr<scalar_t>() : nullptr);
  });
  return {grad_grid.to(grid.scalar_type()), grad_guide.to(guide.scalar_type()),
          grad_input.to(input.scalar_type())};
}

}  // namespace
}  // namespace cpu
}  // namespace bilateral_ops

TORCH_LIBRARY_IMPL(bilateral_ops, CPU, m) {
  m.impl("bilateral_slice_apply", &bilateral_ops::cpu::bilateral_slice_apply);
  m.impl("_bilateral_slice_apply_dguide", &bilateral_ops::cpu::bilateral_slice_apply_dguide);
  m.impl("_bilateral_slice_apply_backward", &bilateral_ops::cpu::bilateral_slice_apply_backward);
}
