// CUDA kernels of grid_tv_loss and _grid_tv_loss_backward (csrc/ops.cpp has the schemas,
// csrc/include/bilateral_ops/grid_tv_loss.h the per-element math shared with the CPU,
// launch_config.h the launch plans).
//
// Element positions come from multiply-high divisions when every flat index is below 2^31 (64-bit
// divisions per element made both kernels bound by index arithmetic, not memory).
// Forward: a number of blocks fixed by the sizes alone sums the loss terms of its elements (a
// grid-stride loop per thread, in double, then the block's warps in order) into one partial per
// block; tv_reduce_kernel adds the partials in order and writes the 0-d result. Bitwise
// reproducible, and nothing is read back to the host.
// Backward: each element's gradient from its neighbours, times the number of times its grid
// appears in idx (counted by integer atomics, exact in any order).
// An idx value out of [0, M) cannot be reported without a synchronisation: it makes the loss NaN
// and is not counted in the backward.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>

#include "../checks.h"
#include "bilateral_ops/grid_tv_loss.h"
#include "common.cuh"
#include "launch.cuh"
#include "launch_config.h"

namespace bilateral_ops {
namespace cuda {
namespace {

struct TvWeights {
  double z, y, x;
};

// Position of flat element e of (grids, C, D, Gh, Gw): grid b, offset r in it, and (z, y, x).
struct TvAt {
  int64_t b, r, z, y, x;
};

// The divisors of that map. kSmall (every flat index below 2^31): multiply-high divisions, else
// 64-bit ones.
struct TvDivs {
  FastDiv numel, cells, plane, gw;
};

template <bool kSmall>
__device__ __forceinline__ TvAt tv_at(int64_t e, const TvGeometry& g, const TvDivs& v) {
  const int64_t cells = g.D * g.Gh * g.Gw, numel = g.C * cells, plane = g.Gh * g.Gw;
  if constexpr (kSmall) {
    const uint32_t n = static_cast<uint32_t>(e);
    const uint32_t b = v.numel.div(n), r = n - b * static_cast<uint32_t>(numel);
    const uint32_t k = r - v.cells.div(r) * static_cast<uint32_t>(cells);
    const uint32_t z = v.plane.div(k), rem = k - z * static_cast<uint32_t>(plane);
    const uint32_t y = v.gw.div(rem);
    return {b, r, z, y, rem - y * static_cast<uint32_t>(g.Gw)};
  } else {
    const int64_t b = e / numel, r = e % numel, k = r % cells;
    return {b, r, k / plane, (k / g.Gw) % g.Gh, k % g.Gw};
  }
}

// kSmall when every flat index of `total` elements fits the multiply-high divisions.
TvDivs tv_divs(const TvGeometry& g, int64_t total, bool* small) {
  const int64_t cells = g.D * g.Gh * g.Gw;
  *small = total < (int64_t{1} << 31);
  if (!*small || total == 0) return TvDivs{};  // no element: no divisor may be zero
  return TvDivs{FastDiv(static_cast<uint32_t>(g.C * cells)), FastDiv(static_cast<uint32_t>(cells)),
                FastDiv(static_cast<uint32_t>(g.Gh * g.Gw)), FastDiv(static_cast<uint32_t>(g.Gw))};
}

// Sum of v over the block, in warp order; valid on thread 0. s_warp: one double per warp
// (the dynamic shared buffer).
__device__ __forceinline__ double block_sum(double v, double* s_warp) {
  v = warp_sum(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) s_warp[warp] = v;
  __syncthreads();
  double total = 0.0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) total += s_warp[w];
  }
  return total;
}

template <typename scalar_t, bool kSmall>
__global__ void __launch_bounds__(launch::kTvThreads)
    tv_loss_kernel(const TvGeometry g, const TvDivs dv, const scalar_t* grids, const int64_t* idx,
                   const TvWeights w, double* partial) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  double* s_warp = reinterpret_cast<double*>(smem_raw);
  const int64_t cells = g.D * g.Gh * g.Gw, numel = g.C * cells, plane = g.Gh * g.Gw;
  const int64_t total = g.B * numel;
  double sum = 0.0;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const TvAt at = tv_at<kSmall>(e, g, dv);
    const int64_t m = idx != nullptr ? idx[at.b] : at.b;
    if (m < 0 || m >= g.M) {
      sum += NAN;
      continue;
    }
    const scalar_t* q = grids + m * numel + at.r;
    const double v = static_cast<double>(ldg(q));
    if (at.x + 1 < g.Gw) sum += w.x * tv_axis_term<double>(v, ldg(q + 1), at.x, g.Gw);
    if (at.y + 1 < g.Gh) sum += w.y * tv_axis_term<double>(v, ldg(q + g.Gw), at.y, g.Gh);
    if (at.z + 1 < g.D) sum += w.z * tv_axis_term<double>(v, ldg(q + plane), at.z, g.D);
  }
  const double s = block_sum(sum, s_warp);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

template <typename scalar_t>
__global__ void __launch_bounds__(launch::kTvThreads)
    tv_reduce_kernel(const double* partial, int64_t n, bool empty, scalar_t* out) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  double* s_warp = reinterpret_cast<double*>(smem_raw);
  double sum = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) sum += partial[i];
  const double s = block_sum(sum, s_warp);
  // No grids: 0 / 0, as lib_bilagrid's division by the batch size gives.
  if (threadIdx.x == 0) out[0] = static_cast<scalar_t>(empty ? NAN : s);
}

__global__ void __launch_bounds__(launch::kTvThreads)
    tv_count_kernel(const int64_t* idx, int64_t B, int64_t M, int* count) {
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < B;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = idx[b];
    if (m >= 0 && m < M) atomicAdd(count + m, 1);
  }
}

// count null: every grid once (no idx).
template <typename scalar_t, bool kSmall>
__global__ void __launch_bounds__(launch::kTvThreads)
    tv_backward_kernel(const TvGeometry g, const TvDivs dv, const scalar_t* grids, const int* count,
                       const scalar_t* grad_output, const TvWeights w, scalar_t* grad) {
  using acc_t = acc_type<scalar_t>;
  const int64_t cells = g.D * g.Gh * g.Gw, numel = g.C * cells, plane = g.Gh * g.Gw;
  const int64_t total = g.M * numel;
  const acc_t go = ldg(grad_output);
  const acc_t wz = static_cast<acc_t>(w.z), wy = static_cast<acc_t>(w.y), wx = static_cast<acc_t>(w.x);
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const TvAt at = tv_at<kSmall>(e, g, dv);
    const int n = count != nullptr ? count[at.b] : 1;
    if (n == 0) {
      grad[e] = static_cast<scalar_t>(0);
      continue;
    }
    const int64_t z = at.z, y = at.y, x = at.x;
    const scalar_t* q = grids + e;
    const acc_t v = ldg(q);
    acc_t d = tv_axis_grad<acc_t>(v, x > 0 ? ldg(q - 1) : v, x + 1 < g.Gw ? ldg(q + 1) : v, x,
                                  g.Gw, wx);
    d += tv_axis_grad<acc_t>(v, y > 0 ? ldg(q - g.Gw) : v, y + 1 < g.Gh ? ldg(q + g.Gw) : v, y,
                             g.Gh, wy);
    d += tv_axis_grad<acc_t>(v, z > 0 ? ldg(q - plane) : v, z + 1 < g.D ? ldg(q + plane) : v, z,
                             g.D, wz);
    grad[e] = static_cast<scalar_t>(go * static_cast<acc_t>(n) * d);
  }
}

TvWeights weights(const TvGeometry& g) {
  const int64_t n = g.grid_numel();
  return TvWeights{tv_axis_weight(g.B, n, g.D), tv_axis_weight(g.B, n, g.Gh),
                   tv_axis_weight(g.B, n, g.Gw)};
}

const int64_t* idx_ptr(const c10::optional<at::Tensor>& idx, at::Tensor& keep) {
  if (!idx.has_value() || !idx->defined()) return nullptr;
  keep = idx->contiguous();
  return keep.data_ptr<int64_t>();
}

at::Tensor grid_tv_loss(const at::Tensor& grids_in, const c10::optional<at::Tensor>& idx) {
  const TvGeometry g = check_grid_tv_loss(grids_in, idx);
  const c10::cuda::CUDAGuard device_guard(grids_in.device());
  const at::Tensor grids = grids_in.contiguous();
  at::Tensor idx_c;
  const int64_t* ip = idx_ptr(idx, idx_c);
  const launch::TvPlan plan = launch::tv_plan(g.M, g.B, g.grid_numel(), ip != nullptr, false);
  at::Tensor partial = at::empty({plan.partials}, grids.options().dtype(at::kDouble));
  at::Tensor out = at::empty({}, grids.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const TvWeights w = weights(g);
  bool small = false;
  const TvDivs dv = tv_divs(g, g.B * g.grid_numel(), &small);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grids.scalar_type(), "grid_tv_loss_cuda", [&] {
    if (small) {
      BO_LAUNCH((tv_loss_kernel<scalar_t, true>), plan.loss, stream, g, dv, grids.data_ptr<scalar_t>(), ip, w,
                partial.data_ptr<double>());
    } else {
      BO_LAUNCH((tv_loss_kernel<scalar_t, false>), plan.loss, stream, g, dv, grids.data_ptr<scalar_t>(), ip, w,
                partial.data_ptr<double>());
    }
    BO_LAUNCH(tv_reduce_kernel<scalar_t>, plan.reduce, stream, partial.data_ptr<double>(), plan.partials,
              g.B == 0, out.data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor grid_tv_loss_backward(const at::Tensor& grad_output_in, const at::Tensor& grids_in,
                                 const c10::optional<at::Tensor>& idx) {
  const TvGeometry g = check_grid_tv_loss(grids_in, idx);
  check_floating(grad_output_in, "grad_output");
  check_same(grad_output_in, "grad_output", grids_in, "grids");
  TORCH_CHECK(grad_output_in.numel() == 1, "grad_output must have one element, got ",
              grad_output_in.sizes());
  const c10::cuda::CUDAGuard device_guard(grids_in.device());
  const at::Tensor grids = grids_in.contiguous();
  const at::Tensor go = grad_output_in.contiguous();
  at::Tensor idx_c;
  const int64_t* ip = idx_ptr(idx, idx_c);
  at::Tensor grad = at::empty(grids.sizes(), grids.options());
  const launch::TvPlan plan = launch::tv_plan(g.M, g.B, g.grid_numel(), ip != nullptr, true);
  if (!plan.backward.present) return grad;
  at::Tensor count;
  if (ip != nullptr) count = at::zeros({g.M}, grids.options().dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (plan.count.present) {
    BO_LAUNCH(tv_count_kernel, plan.count, stream, ip, g.B, g.M, count.data_ptr<int>());
  }
  const TvWeights w = weights(g);
  bool small = false;
  const TvDivs dv = tv_divs(g, g.M * g.grid_numel(), &small);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grids.scalar_type(), "grid_tv_loss_backward_cuda", [&] {
        const int* cp = ip != nullptr ? count.data_ptr<int>() : nullptr;
        if (small) {
          BO_LAUNCH((tv_backward_kernel<scalar_t, true>), plan.backward, stream, g, dv,
                    grids.data_ptr<scalar_t>(), cp, go.data_ptr<scalar_t>(), w, grad.data_ptr<scalar_t>());
        } else {
          BO_LAUNCH((tv_backward_kernel<scalar_t, false>), plan.backward, stream, g, dv,
                    grids.data_ptr<scalar_t>(), cp, go.data_ptr<scalar_t>(), w, grad.data_ptr<scalar_t>());
        }
      });
  return grad;
}

}  // namespace
}  // namespace cuda
}  // namespace bilateral_ops

TORCH_LIBRARY_IMPL(bilateral_ops, CUDA, m) {
  m.impl("grid_tv_loss", &bilateral_ops::cuda::grid_tv_loss);
  m.impl("_grid_tv_loss_backward", &bilateral_ops::cuda::grid_tv_loss_backward);
}
