// CPU kernel of grid_splat (csrc/ops.cpp has the schema). The splat is the transpose of
// bilateral_slice, and the slice's backward pass already computes exactly that transpose for its
// grid gradient: grid_splat runs the slice's backward tasks (csrc/cpu/bilateral_slice.cpp) with
// the input in place of grad_output, so both share one engine and are adjoint by construction,
// deterministic (banded partial grids summed in a fixed order) and vectorised alike.

#include <ATen/ATen.h>
#include <torch/library.h>

#include "../checks.h"
#include "slice_runner.h"

namespace bilateral_ops {
namespace cpu {

BO_DECLARE_SLICE_TASKS(slice)

namespace {

at::Tensor grid_splat(const at::Tensor& input, const at::Tensor& guide,
                      at::IntArrayRef grid_size) {
  const SliceGeometry g = check_grid_splat(input, guide, grid_size);
  if (g.pixels() == 0) return at::zeros({g.N, g.C, g.D, g.Gh, g.Gw}, input.options());
  const auto dt = compute_dtype(input.scalar_type());
  const at::Tensor values = prepared(input, dt);
  at::Tensor out = at::empty({g.N, g.C, g.D, g.Gh, g.Gw}, input.options().dtype(dt));
  AT_DISPATCH_FLOATING_TYPES(dt, "grid_splat_cpu", [&] {
    Problem<scalar_t> problem(guide, g);
    SliceParams<scalar_t>& p = problem.p;
    p.grad_output = values.data_ptr<scalar_t>();
    p.need_grid = true;
    p.need_guide = false;
    run_backward<slice_tasks>(p, false, out.data_ptr<scalar_t>());
  });
  return out.to(input.scalar_type());
}

}  // namespace
}  // namespace cpu
}  // namespace bilateral_ops

TORCH_LIBRARY_IMPL(bilateral_ops, CPU, m) {
  m.impl("grid_splat", &bilateral_ops::cpu::grid_splat);
}
