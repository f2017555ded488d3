// CUDA kernel of grid_splat (csrc/ops.cpp has the schema, csrc/cpu/grid_splat.cpp the reference
// semantics). The splat is the transpose of bilateral_slice, which is exactly the grid gradient of
// the slice's backward pass with the image in place of grad_output: grid_splat runs that pass
// (slice_launch.cuh's run_backward, grad_grid only) with no grid at all. So it shares the slice's
// kernels: by default the tile scatter (a shared-memory box per 32 x 8 pixel tile, warp-aggregated
// atomics, one global atomic per touched cell), and under torch.use_deterministic_algorithms(True)
// the per-cell-column gather in double, bitwise reproducible. float16 / bfloat16 accumulate in
// float32 (the scatter) or double (the gather).

#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/ArrayRef.h>
#include <torch/library.h>

#include "../checks.h"
#include "slice_launch.cuh"

namespace bilateral_ops {
namespace cuda {
namespace {

at::Tensor grid_splat(const at::Tensor& input_in, const at::Tensor& guide_in,
                      at::IntArrayRef grid_size) {
  const SliceGeometry g = check_grid_splat(input_in, guide_in, grid_size);
  const c10::cuda::CUDAGuard device_guard(input_in.device());
  if (g.pixels() == 0) return at::zeros({g.N, g.C, g.D, g.Gh, g.Gw}, input_in.options());
  const at::Tensor input = input_in.contiguous();
  const at::Tensor guide = guide_in.contiguous();
  const launch::BackwardRequest req =
      launch::splat_request(at::globalContext().deterministicAlgorithms());
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "grid_splat_cuda", [&] {
        // No grid values: only grad_grid is asked for, and it never reads them.
        const GridRef<scalar_t> grid{nullptr, input.options()};
        out = run_backward<scalar_t, false>(g, AffineLayout{0, 0, 0, false}, input, grid, guide,
                                            at::Tensor(), false, req, nullptr, nullptr);
      });
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace bilateral_ops

TORCH_LIBRARY_IMPL(bilateral_ops, CUDA, m) {
  m.impl("grid_splat", &bilateral_ops::cuda::grid_splat);
}
