// CPU kernels of bilateral_grid_filter's fused ends (csrc/ops.cpp has the schemas): the splat of
// [input, 1] and the normalising slice. Both run the slice's tasks (csrc/cpu/bilateral_slice.cpp)
// with a flag: the ones channel is implied in the splat's block buffers, and the division happens
// on the block's samples before they are stored. At 1080p that saves the filter a concatenated
// copy of the image and two full-image passes (clamp, divide).

#include <ATen/ATen.h>
#include <torch/library.h>

#include "../checks.h"
#include "slice_runner.h"

namespace bilateral_ops {
namespace cpu {

BO_DECLARE_SLICE_TASKS(slice, false)

namespace {

at::Tensor filter_splat(const at::Tensor& input, const at::Tensor& guide,
                        at::IntArrayRef grid_size) {
  SliceGeometry g = check_grid_splat(input, guide, grid_size);
  g.C += 1;  // the implied channel of ones
  return run_splat<slice_tasks>(input, guide, g, true);
}

at::Tensor filter_slice(const at::Tensor& grid, const at::Tensor& guide) {
  const SliceGeometry g = check_grid_guide(grid, guide);
  TORCH_CHECK(g.C >= 2, "grid must have at least two channels (values and the weight), got ", g.C);
  if (g.pixels() == 0) return at::zeros({g.N, g.C - 1, g.H, g.W}, grid.options());
  const auto dt = compute_dtype(grid.scalar_type());
  at::Tensor out = at::empty({g.N, g.C - 1, g.H, g.W}, grid.options().dtype(dt));
  AT_DISPATCH_FLOATING_TYPES(dt, "bilateral_grid_filter_slice_cpu", [&] {
    Problem<scalar_t> problem(grid, guide, g);
    problem.p.output = out.data_ptr<scalar_t>();
    problem.p.normalize = true;
    run_forward<slice_tasks>(problem.p, false);
  });
  return out.to(grid.scalar_type());
}

}  // namespace
}  // namespace cpu
}  // namespace bilateral_ops

TORCH_LIBRARY_IMPL(bilateral_ops, CPU, m) {
  m.impl("_bilateral_grid_filter_splat", &bilateral_ops::cpu::filter_splat);
  m.impl("_bilateral_grid_filter_slice", &bilateral_ops::cpu::filter_slice);
}
