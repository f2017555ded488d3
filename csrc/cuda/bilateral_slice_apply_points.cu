// CUDA kernels of bilateral_slice_apply_points and _bilateral_slice_apply_points_backward
// (csrc/ops.cpp has the schemas, csrc/include/bilateral_ops/slice_points.h the per-sample math
// shared with the CPU, launch_config.h the launch plans). One thread per sample; each sample reads
// its own grid, grid[grid_idx[p]], in place.
//
// The grid gradient is summed as 64-bit fixed point: each contribution is rounded to a multiple of
// 2^-62 times a bound on the sum of all of them (P max|grad_output| max(1, max|input|): the
// weights of a sample sum to 1), and integer atomics add those exactly, so the result is the same
// bitwise whatever the order of the atomics: deterministic in every mode, with a precision far
// below float32's rounding of the result. The bound is computed on the device (no host
// synchronisation); a non-finite bound makes the grid gradient NaN, as a non-finite gradient
// would. Lanes of a warp adding into the same cell are summed first (warp-aggregated atomics).
//
// A grid_idx out of [0, M) cannot be reported without a synchronisation: such a sample gets NaN
// outputs and coordinate / input gradients and adds nothing to the grid gradient.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <climits>
#include <cmath>
#include <limits>
#include <tuple>

#include "../checks.h"
#include "bilateral_ops/slice_points.h"
#include "common.cuh"
#include "launch.cuh"
#include "launch_config.h"

namespace bilateral_ops {
namespace cuda {
namespace {

// 2^62: the fixed-point scale maps the bound of the whole sum to it, so no sum can overflow.
constexpr double kFixedPointRange = 4611686018427387904.0;

template <typename scalar_t>
struct PointsArgs {
  const scalar_t* grid;         // (M, C, D, Gh, Gw)
  const scalar_t* coords;       // (P, 3)
  const scalar_t* input;        // (P, Ci)
  const int64_t* idx;           // (P,)
  const scalar_t* grad_output;  // (P, Co), backward
  scalar_t* output;             // (P, Co), forward
  scalar_t* grad_coords;        // (P, 3) when need_coords
  scalar_t* grad_input;         // (P, Ci) when need_input
  unsigned long long* grad_grid_fixed;  // (M, C, cells) when need_grid
  const double* scale;          // fixed-point units per unit of gradient (device scalar)
  bool need_grid, need_coords, need_input;
};

template <typename acc_t, typename scalar_t>
__device__ __forceinline__ PointCorners<acc_t> sample_corners(const PointsGeometry& g,
                                                              const scalar_t* coords, int64_t p) {
  const scalar_t* c = coords + p * 3;
  return point_corners<acc_t>(ldg(c), ldg(c + 1), ldg(c + 2), g.D, g.Gh, g.Gw);
}

// Channel c of a sample: sum over the corners of weight * grid value.
template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t sample_channel(const PointCorners<acc_t>& pc, const scalar_t* slab) {
  acc_t a = acc_t(0);
#pragma unroll
  for (int k = 0; k < 8; ++k) a += pc.weight[k] * ldg(slab + pc.offset[k]);
  return a;
}

template <typename scalar_t>
__global__ void __launch_bounds__(launch::kPointsThreads)
    points_forward_kernel(const PointsGeometry g, const AffineLayout l, const PointsArgs<scalar_t> a) {
  using acc_t = acc_type<scalar_t>;
  const int64_t cells = g.D * g.Gh * g.Gw;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < g.P;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = a.idx[p];
    scalar_t* out = a.output + p * l.Co;
    if (m < 0 || m >= g.M) {
      for (int64_t o = 0; o < l.Co; ++o) out[o] = static_cast<scalar_t>(NAN);
      continue;
    }
    const PointCorners<acc_t> pc = sample_corners<acc_t>(g, a.coords, p);
    const scalar_t* grid = a.grid + m * g.C * cells;
    const scalar_t* x = a.input + p * l.Ci;
    for (int64_t o = 0; o < l.Co; ++o) {
      acc_t acc = l.has_offset ? sample_channel(pc, grid + l.offset_channel(o) * cells) : acc_t(0);
      for (int64_t i = 0; i < l.Ci; ++i) {
        acc += sample_channel(pc, grid + l.channel(o, i) * cells) * ldg(x + i);
      }
      out[o] = static_cast<scalar_t>(acc);
    }
  }
}

// The loop over samples is warp-uniform (lanes past P ride along with nothing to add): the
// aggregated atomics need every lane of the warp.
template <typename scalar_t>
__global__ void __launch_bounds__(launch::kPointsThreads)
    points_backward_kernel(const PointsGeometry g, const AffineLayout l, const PointsArgs<scalar_t> a) {
  using acc_t = acc_type<scalar_t>;
  const int64_t cells = g.D * g.Gh * g.Gw;
  const int lane = static_cast<int>(threadIdx.x & 31);
  const double scale = a.need_grid ? *a.scale : 0.0;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x; base < g.P;
       base += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t p = base + threadIdx.x;
    const bool live = p < g.P;
    const int64_t m = live ? a.idx[p] : 0;
    const bool valid = live && m >= 0 && m < g.M;
    const PointCorners<acc_t> pc =
        valid ? sample_corners<acc_t>(g, a.coords, p) : point_corners<acc_t>(0, 0, 0, 1, 1, 1);
    const scalar_t* go = a.grad_output + (live ? p : 0) * l.Co;
    const scalar_t* x = a.input + (live ? p : 0) * l.Ci;
    const scalar_t* grid = a.grid + (valid ? m : 0) * g.C * cells;
    const auto gof = [&](int64_t o) { return ldg(go + o); };
    const auto xf = [&](int64_t i) { return ldg(x + i); };

    if (live && (a.need_coords || a.need_input)) {
      if (!valid) {
        const scalar_t nan = static_cast<scalar_t>(NAN);
        if (a.need_coords) {
          for (int d = 0; d < 3; ++d) a.grad_coords[p * 3 + d] = nan;
        }
        if (a.need_input) {
          for (int64_t i = 0; i < l.Ci; ++i) a.grad_input[p * l.Ci + i] = nan;
        }
      } else {
        if (a.need_coords) {
          // e_k = sum_c V[c] grid[corner k, c]; the coordinate gradient weighs e_k by the
          // derivatives of corner k's weight.
          acc_t e[8];
#pragma unroll
          for (int k = 0; k < 8; ++k) e[k] = acc_t(0);
          for (int64_t c = 0; c < g.C; ++c) {
            const acc_t v = point_splat_value<acc_t>(l, gof, xf, c);
            const scalar_t* slab = grid + c * cells;
#pragma unroll
            for (int k = 0; k < 8; ++k) e[k] += v * ldg(slab + pc.offset[k]);
          }
          acc_t gx = acc_t(0), gy = acc_t(0), gz = acc_t(0);
#pragma unroll
          for (int k = 0; k < 8; ++k) {
            gx += pc.dx[k] * e[k];
            gy += pc.dy[k] * e[k];
            gz += pc.dz[k] * e[k];
          }
          a.grad_coords[p * 3 + 0] = static_cast<scalar_t>(gx);
          a.grad_coords[p * 3 + 1] = static_cast<scalar_t>(gy);
          a.grad_coords[p * 3 + 2] = static_cast<scalar_t>(gz);
        }
        if (a.need_input) {
          for (int64_t i = 0; i < l.Ci; ++i) {
            acc_t s = acc_t(0);
            for (int64_t o = 0; o < l.Co; ++o) {
              s += gof(o) * sample_channel(pc, grid + l.channel(o, i) * cells);
            }
            a.grad_input[p * l.Ci + i] = static_cast<scalar_t>(s);
          }
        }
      }
    }

    if (a.need_grid) {
      for (int64_t c = 0; c < g.C; ++c) {
        const acc_t v = valid ? point_splat_value<acc_t>(l, gof, xf, c) : acc_t(0);
        const int64_t slab = (m * g.C + c) * cells;
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          // Lanes without a sample key on a value no cell has, so they form their own group.
          const unsigned long long dest =
              valid ? static_cast<unsigned long long>(slab + pc.offset[k]) : ~0ull;
          const long long q =
              valid ? llrint(static_cast<double>(pc.weight[k] * v) * scale) : 0ll;
          const unsigned peers = __match_any_sync(kFullMask, dest);
          const unsigned long long s = peer_sum(static_cast<unsigned long long>(q), peers, lane);
          if (valid && is_peer_leader(peers, lane)) atomicAdd(a.grad_grid_fixed + dest, s);
        }
      }
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(launch::kPointsThreads)
    points_grid_finish_kernel(const unsigned long long* fixed, const double* scale, int64_t n,
                              scalar_t* out) {
  const double s = *scale;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const double v = s > 0.0 ? static_cast<double>(static_cast<long long>(fixed[i])) / s : NAN;
    out[i] = static_cast<scalar_t>(v);
  }
}

void check_int_sizes(const PointsGeometry& g) {
  TORCH_CHECK(g.M * g.C * g.cells() < (int64_t{1} << 62),
              "bilateral_slice_apply_points: the grids are too large");
}

at::Tensor bilateral_slice_apply_points(const at::Tensor& grid_in, const at::Tensor& coords_in,
                                        const at::Tensor& input_in, const at::Tensor& grid_idx_in,
                                        bool has_offset) {
  const PointsShape shape =
      check_slice_apply_points(grid_in, coords_in, input_in, grid_idx_in, has_offset);
  const PointsGeometry& g = shape.g;
  const AffineLayout& l = shape.l;
  const c10::cuda::CUDAGuard device_guard(grid_in.device());
  if (g.P == 0) return at::zeros({0, l.Co}, input_in.options());
  check_int_sizes(g);
  const at::Tensor grid = grid_in.contiguous();
  const at::Tensor coords = coords_in.contiguous();
  const at::Tensor input = input_in.contiguous();
  const at::Tensor idx = grid_idx_in.contiguous();
  at::Tensor out = at::empty({g.P, l.Co}, input.options());
  const launch::PointsPlan plan = launch::points_plan(g.P, g.M, g.C, g.cells(), nullptr);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grid.scalar_type(),
                                  "bilateral_slice_apply_points_cuda", [&] {
                                    PointsArgs<scalar_t> a{};
                                    a.grid = grid.data_ptr<scalar_t>();
                                    a.coords = coords.data_ptr<scalar_t>();
                                    a.input = input.data_ptr<scalar_t>();
                                    a.idx = idx.data_ptr<int64_t>();
                                    a.output = out.data_ptr<scalar_t>();
                                    BO_LAUNCH(points_forward_kernel<scalar_t>, plan.forward,
                                              stream, g, l, a);
                                  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bilateral_slice_apply_points_backward(
    const at::Tensor& grad_output_in, const at::Tensor& grid_in, const at::Tensor& coords_in,
    const at::Tensor& input_in, const at::Tensor& grid_idx_in, bool has_offset,
    std::array<bool, 3> mask) {
  const PointsShape shape =
      check_slice_apply_points(grid_in, coords_in, input_in, grid_idx_in, has_offset);
  const PointsGeometry& g = shape.g;
  const AffineLayout& l = shape.l;
  check_grad_output(grad_output_in, grid_in, {g.P, l.Co});
  const c10::cuda::CUDAGuard device_guard(grid_in.device());
  if (g.P == 0 || !(mask[0] || mask[1] || mask[2])) {
    return {zero_or_masked(mask[0], grid_in), zero_or_masked(mask[1], coords_in),
            zero_or_masked(mask[2], input_in)};
  }
  check_int_sizes(g);
  const at::Tensor grid = grid_in.contiguous();
  const at::Tensor coords = coords_in.contiguous();
  const at::Tensor input = input_in.contiguous();
  const at::Tensor idx = grid_idx_in.contiguous();
  const at::Tensor go = grad_output_in.contiguous();
  at::Tensor grad_grid = mask[0] ? at::empty(grid.sizes(), grid.options()) : masked_out(grid);
  at::Tensor grad_coords = mask[1] ? at::empty({g.P, 3}, coords.options()) : masked_out(coords);
  at::Tensor grad_input = mask[2] ? at::empty({g.P, l.Ci}, input.options()) : masked_out(input);
  at::Tensor fixed, scale;
  if (mask[0]) {
    fixed = at::zeros({g.M * g.C * g.cells()}, grid.options().dtype(at::kLong));
    // The bound of the whole sum, on the device: P max|g| max(1, max|x|).
    const at::Tensor bound = go.abs().amax().to(at::kDouble) * static_cast<double>(g.P) *
                             input.abs().amax().to(at::kDouble).clamp_min(1.0);
    scale = at::where(at::isfinite(bound), kFixedPointRange / bound.clamp_min(1e-250),
                      at::zeros_like(bound));
  }
  const launch::PointsPlan plan = launch::points_plan(g.P, g.M, g.C, g.cells(), mask.data());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grid.scalar_type(), "bilateral_slice_apply_points_backward_cuda",
      [&] {
        PointsArgs<scalar_t> a{};
        a.grid = grid.data_ptr<scalar_t>();
        a.coords = coords.data_ptr<scalar_t>();
        a.input = input.data_ptr<scalar_t>();
        a.idx = idx.data_ptr<int64_t>();
        a.grad_output = go.data_ptr<scalar_t>();
        a.grad_coords = mask[1] ? grad_coords.data_ptr<scalar_t>() : nullptr;
        a.grad_input = mask[2] ? grad_input.data_ptr<scalar_t>() : nullptr;
        a.grad_grid_fixed =
            mask[0] ? reinterpret_cast<unsigned long long*>(fixed.data_ptr<int64_t>()) : nullptr;
        a.scale = mask[0] ? scale.data_ptr<double>() : nullptr;
        a.need_grid = mask[0];
        a.need_coords = mask[1];
        a.need_input = mask[2];
        BO_LAUNCH(points_backward_kernel<scalar_t>, plan.backward, stream, g, l, a);
        if (mask[0]) {
          BO_LAUNCH(points_grid_finish_kernel<scalar_t>, plan.finish, stream, a.grad_grid_fixed,
                    a.scale, fixed.numel(), grad_grid.data_ptr<scalar_t>());
        }
      });
  return {grad_grid, grad_coords, grad_input};
}

}  // namespace
}  // namespace cuda
}  // namespace bilateral_ops

TORCH_LIBRARY_IMPL(bilateral_ops, CUDA, m) {
  m.impl("bilateral_slice_apply_points", &bilateral_ops::cuda::bilateral_slice_apply_points);
  m.impl("_bilateral_slice_apply_points_backward",
         &bilateral_ops::cuda::bilateral_slice_apply_points_backward);
}
