// CUDA kernel of grid_blur (csrc/ops.cpp has the schema, csrc/cpu/grid_blur.cpp the reference
// semantics). The taps come from bilateral_ops/grid_blur.h's blur_taps(), computed on the host
// exactly as for the CPU kernel; launch_config.h's blur_plan() plans the passes.
//
// Separable: one pass per axis with sigma > 0, one thread per output element (grid-stride).
// Neighbouring threads hold neighbouring elements along Gw whatever the axis blurred, so every tap
// is a coalesced load; a window of a few taps is served by L1/L2. The passes between the first
// and the last keep their values in the accumulation type (float for float16 / bfloat16), so
// only the result is rounded to the grid's dtype. The result is a new tensor, never the argument,
// even when every sigma is 0.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/ArrayRef.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "bilateral_ops/grid_blur.h"
#include "common.cuh"
#include "launch_config.h"

namespace bilateral_ops {
namespace cuda {
namespace {

// Taps k[0..taps-1] by value, when they fit (launch::BlurPass::param_taps).
template <typename acc_t>
struct BlurTaps {
  acc_t k[launch::kBlurParamTaps];
};

// Sizes of one pass: the grid viewed as (outer, n, inner), `total` elements, taps k[0..m].
struct BlurShape {
  int64_t total, n, inner;
  int m;
};

// Every argument of a launch, kernel parameters included, within the 4 KiB parameter space.
static_assert(sizeof(BlurTaps<double>) + sizeof(BlurShape) + 3 * sizeof(void*) <=
                  launch::kMaxKernelParamBytes,
              "grid_blur_kernel's parameters exceed 4 KiB");

// dst[o, i, j] = sum_t k[|t|] src[o, i + t, j] over 0 <= i + t < n. kWide: int64 index
// arithmetic (total >= 2^31), else 32-bit (the element index fits: total < 2^31).
template <typename in_t, typename out_t, bool kWide, bool kParamTaps>
__global__ void __launch_bounds__(launch::kBlurThreads, launch::kBlurMinBlocks)
    grid_blur_kernel(const in_t* __restrict__ src, out_t* __restrict__ dst, const BlurShape s,
                     const BlurTaps<acc_type<in_t>> kp, const acc_type<in_t>* __restrict__ kd) {
  using acc_t = acc_type<in_t>;
  const int64_t step = s.inner;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < s.total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    // Position i along the axis, and the taps that exist on each side: i + 1 .. i + up and
    // i - 1 .. i - down (in int64 with kWide, where one axis may exceed 2^31 cells).
    using idx_t = std::conditional_t<kWide, int64_t, int>;
    idx_t i;
    if constexpr (kWide) {
      i = (e / s.inner) % s.n;
    } else {
      const uint32_t eu = static_cast<uint32_t>(e);
      i = static_cast<int>((eu / static_cast<uint32_t>(s.inner)) % static_cast<uint32_t>(s.n));
    }
    const idx_t m = s.m;
    const int up = static_cast<int>(min(m, static_cast<idx_t>(s.n) - 1 - i));
    const int down = static_cast<int>(min(m, i));
    const in_t* p = src + e;
    acc_t acc;
    if constexpr (kParamTaps) {
      // Fully unrolled, so that every tap is read from the parameter space at a constant offset
      // (a dynamically indexed parameter array would be copied to local memory).
      acc = kp.k[0] * ldg(p);
#pragma unroll
      for (int t = 1; t < launch::kBlurParamTaps; ++t) {
        if (t > s.m) break;  // uniform
        acc_t v = acc_t(0);
        if (t <= up) v += ldg(p + t * step);
        if (t <= down) v += ldg(p - t * step);
        acc += kp.k[t] * v;
      }
    } else {
      const int both = min(up, down);
      acc = ldg(kd) * ldg(p);
#pragma unroll 4
      for (int t = 1; t <= both; ++t) {
        acc += ldg(kd + t) * (ldg(p + t * step) + ldg(p - t * step));
      }
      for (int t = both + 1; t <= up; ++t) acc += ldg(kd + t) * ldg(p + t * step);
      for (int t = both + 1; t <= down; ++t) acc += ldg(kd + t) * ldg(p - t * step);
    }
    dst[e] = static_cast<out_t>(acc);
  }
}

template <typename in_t, typename out_t>
void launch_pass(const launch::BlurPass& b, const in_t* src, out_t* dst,
                 const std::vector<double>& taps, const at::TensorOptions& options,
                 cudaStream_t stream) {
  using acc_t = acc_type<in_t>;
  static_assert(std::is_same<acc_t, acc_type<out_t>>::value, "one accumulation type per pass");
  TORCH_INTERNAL_ASSERT(static_cast<int64_t>(taps.size()) == b.taps && b.taps >= 1,
                        "grid_blur: taps do not match the plan");
  const BlurShape s{b.total, b.n, b.inner, static_cast<int>(b.taps - 1)};
  BlurTaps<acc_t> kp{};
  at::Tensor device_taps;  // freed in stream order after the launch (caching allocator)
  const acc_t* kd = nullptr;
  if (b.param_taps) {
    for (int64_t t = 0; t < b.taps; ++t) kp.k[t] = static_cast<acc_t>(taps[t]);
  } else {
    // Long windows (sigma > 15.5 cells on an axis of more than 32 cells): a device copy from
    // pinned memory, enqueued on the stream without blocking the host (the pinned block is
    // recycled only once the copy is done).
    at::Tensor host = at::empty(
        {b.taps},
        at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value).pinned_memory(true));
    acc_t* h = host.data_ptr<acc_t>();
    for (int64_t t = 0; t < b.taps; ++t) h[t] = static_cast<acc_t>(taps[t]);
    device_taps = host.to(options.dtype(c10::CppTypeToScalarType<acc_t>::value),
                          /*non_blocking=*/true);
    kd = device_taps.data_ptr<acc_t>();
  }
  const dim3 grid(static_cast<unsigned>(b.launch.grid.x));
  const dim3 block(static_cast<unsigned>(b.launch.block.x));
  if (b.wide) {
    if (b.param_taps) {
      grid_blur_kernel<in_t, out_t, true, true><<<grid, block, 0, stream>>>(src, dst, s, kp, kd);
    } else {
      grid_blur_kernel<in_t, out_t, true, false><<<grid, block, 0, stream>>>(src, dst, s, kp, kd);
    }
  } else {
    if (b.param_taps) {
      grid_blur_kernel<in_t, out_t, false, true><<<grid, block, 0, stream>>>(src, dst, s, kp, kd);
    } else {
      grid_blur_kernel<in_t, out_t, false, false><<<grid, block, 0, stream>>>(src, dst, s, kp, kd);
    }
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor grid_blur(const at::Tensor& grid_in, c10::ArrayRef<double> sigma) {
  check_grid_blur(grid_in, sigma);
  const c10::cuda::CUDAGuard device_guard(grid_in.device());
  if (grid_in.numel() == 0) return at::zeros(grid_in.sizes(), grid_in.options());
  const double sig[3] = {sigma[0], sigma[1], sigma[2]};
  const launch::BlurPlan plan =
      launch::blur_plan(grid_in.size(0), grid_in.size(1), grid_in.size(2), grid_in.size(3),
                        grid_in.size(4), sig);
  // A fresh tensor even without a pass: the result never aliases the argument.
  if (plan.passes == 0) return grid_in.clone(at::MemoryFormat::Contiguous);
  const at::Tensor grid = grid_in.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t G[3] = {grid.size(2), grid.size(3), grid.size(4)};
  at::Tensor out = at::empty(grid.sizes(), grid.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grid.scalar_type(), "grid_blur_cuda",
                                  [&] {
    using acc_t = acc_type<scalar_t>;
    const at::TensorOptions acc_options =
        grid.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    // Intermediate results in acc_t, ping-ponging between two buffers (one suffices for two
    // passes); the last pass writes `out` in the grid's dtype. When that is acc_t already,
    // three passes use `out` itself as the first buffer: grid -> out -> buf[1] -> out.
    at::Tensor buf[2];
    if constexpr (std::is_same<acc_t, scalar_t>::value) {
      if (plan.passes == 3) buf[0] = out;
    }
    const acc_t* cur = nullptr;  // the previous pass' result, once there is one
    for (int k = 0; k < plan.passes; ++k) {
      const launch::BlurPass& b = plan.pass[k];
      const std::vector<double> taps = blur_taps(sig[b.axis], G[b.axis]);
      const bool last = k + 1 == plan.passes;
      acc_t* next = nullptr;
      if (!last) {
        at::Tensor& t = buf[k & 1];
        if (!t.defined()) t = at::empty(grid.sizes(), acc_options);
        next = t.data_ptr<acc_t>();
      }
      if (k == 0) {
        if (last) {
          launch_pass<scalar_t, scalar_t>(b, grid.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                          taps, grid.options(), stream);
        } else {
          launch_pass<scalar_t, acc_t>(b, grid.data_ptr<scalar_t>(), next, taps, grid.options(),
                                       stream);
        }
      } else if (last) {
        launch_pass<acc_t, scalar_t>(b, cur, out.data_ptr<scalar_t>(), taps, grid.options(),
                                     stream);
      } else {
        launch_pass<acc_t, acc_t>(b, cur, next, taps, grid.options(), stream);
      }
      cur = next;
    }
  });
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace bilateral_ops

TORCH_LIBRARY_IMPL(bilateral_ops, CUDA, m) {
  m.impl("grid_blur", &bilateral_ops::cuda::grid_blur);
}
