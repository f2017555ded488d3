// CUDA kernels of bilateral_grid_filter's fused ends (csrc/ops.cpp has the schemas, and
// csrc/cpu/bilateral_grid_filter.cpp the fused CPU versions). On the GPU they are compositions of
// the grid_splat and bilateral_slice kernels with ATen's elementwise ops: the extra passes are
// cheap there next to the launches, and the semantics stay exactly those of the public ops.

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/clamp_min.h>
#include <ATen/ops/div.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/ArrayRef.h>
#include <torch/library.h>

#include "../checks.h"
#include "bilateral_ops/bilateral_grid_filter.h"

namespace bilateral_ops {
namespace cuda {
namespace {

at::Tensor call_grid_splat(const at::Tensor& input, const at::Tensor& guide,
                           at::IntArrayRef grid_size) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bilateral_ops::grid_splat", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, at::IntArrayRef)>();
  return op.call(input, guide, grid_size);
}

at::Tensor call_bilateral_slice(const at::Tensor& grid, const at::Tensor& guide) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bilateral_ops::bilateral_slice", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, bool)>();
  // The filter's grid is sampled at cell centres (align_corners=False), as on the CPU.
  return op.call(grid, guide, false);
}

at::Tensor filter_splat(const at::Tensor& input, const at::Tensor& guide,
                        at::IntArrayRef grid_size) {
  const SliceGeometry g = check_grid_splat(input, guide, grid_size);
  const c10::cuda::CUDAGuard device_guard(input.device());
  const at::Tensor ones = at::ones({g.N, 1, g.H, g.W}, input.options());
  return call_grid_splat(at::cat({input, ones}, 1), guide, grid_size);
}

at::Tensor filter_slice(const at::Tensor& grid, const at::Tensor& guide) {
  const SliceGeometry g = check_grid_guide(grid, guide);
  TORCH_CHECK(g.C >= 2, "grid must have at least two channels (values and the weight), got ", g.C);
  const c10::cuda::CUDAGuard device_guard(grid.device());
  at::Tensor sliced = call_bilateral_slice(grid, guide);
  // The division in float32 or wider, whatever the grid's dtype.
  if (sliced.scalar_type() == at::kHalf || sliced.scalar_type() == at::kBFloat16) {
    sliced = sliced.to(at::kFloat);
  }
  const at::Tensor weight = at::clamp_min(sliced.narrow(1, g.C - 1, 1), kMinGridWeight);
  return at::div(sliced.narrow(1, 0, g.C - 1), weight).to(grid.scalar_type());
}

}  // namespace
}  // namespace cuda
}  // namespace bilateral_ops

TORCH_LIBRARY_IMPL(bilateral_ops, CUDA, m) {
  m.impl("_bilateral_grid_filter_splat", &bilateral_ops::cuda::filter_splat);
  m.impl("_bilateral_grid_filter_slice", &bilateral_ops::cuda::filter_slice);
}
