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

BO_DECLARE_SLICE_TASKS(slice, false)

namespace {

at::Tensor grid_splat(const at::Tensor& input, const at::Tensor& guide,
                      at::IntArrayRef grid_size) {
  return run_splat<slice_tasks>(input, guide, check_grid_splat(input, guide, grid_size), false);
}

}  // namespace
}  // namespace cpu
}  // namespace bilateral_ops

TORCH_LIBRARY_IMPL(bilateral_ops, CPU, m) {
  m.impl("grid_splat", &bilateral_ops::cpu::grid_splat);
}
