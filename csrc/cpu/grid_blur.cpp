// CPU kernel of grid_blur (csrc/ops.cpp has the schema; the taps come from
// bilateral_ops/grid_blur.h, shared with the CUDA kernel). The blur is separable: one pass per
// axis with a non-zero sigma, ping-ponging between two buffers.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <vector>

#include "../checks.h"
#include "bilateral_ops/grid_blur.h"

namespace bilateral_ops {
namespace cpu {
namespace {

// src and dst viewed as (outer, n, inner): dst[o, i, :] = sum_t k[|t|] * src[o, i + t, :] over the
// i + t inside [0, n). For one shift t the rows i that pair with a valid i + t form one contiguous
// range, and so do their sources: every term is a single contiguous axpy of (i1 - i0) * inner
// elements, which the compiler vectorises whatever the axis (inner == 1 for the last one).
template <typename T>
void blur_axis(const T* src, T* dst, int64_t outer, int64_t n, int64_t inner,
               const std::vector<T>& k) {
  const int64_t m = static_cast<int64_t>(k.size()) - 1;
  const int64_t block = n * inner;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(block, 1));
  at::parallel_for(0, outer, grain, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) {
      const T* s = src + o * block;
      T* d = dst + o * block;
      const T k0 = k[0];
      for (int64_t e = 0; e < block; ++e) d[e] = k0 * s[e];
      for (int64_t t = 1; t <= m; ++t) {
        const T w = k[t];
        const int64_t len = (n - t) * inner;  // rows i in [0, n - t) read i + t; [t, n) read i - t
        const T* __restrict up = s + t * inner;
        T* __restrict lo = d;
        for (int64_t e = 0; e < len; ++e) lo[e] += w * up[e];
        const T* __restrict down = s;
        T* __restrict hi = d + t * inner;
        for (int64_t e = 0; e < len; ++e) hi[e] += w * down[e];
      }
    }
  });
}

at::Tensor grid_blur(const at::Tensor& grid, c10::ArrayRef<double> sigma) {
  check_grid_blur(grid, sigma);
  const at::ScalarType dt = compute_dtype(grid.scalar_type());
  // The argument (or its contiguous copy) is only read; the passes alternate between two buffers
  // of their own, so the result never aliases it, even when every sigma is 0.
  const at::Tensor src = grid.to(dt).contiguous();
  if (src.numel() == 0) return at::zeros(grid.sizes(), grid.options());
  const int64_t S = grid.size(0) * grid.size(1);
  const std::array<int64_t, 3> G = {grid.size(2), grid.size(3), grid.size(4)};
  // Axis a of (S, D, Gh, Gw) as (outer, n, inner).
  const std::array<int64_t, 3> outer = {S, S * G[0], S * G[0] * G[1]};
  const std::array<int64_t, 3> inner = {G[1] * G[2], G[2], 1};
  at::Tensor cur = src, buf[2];
  int next = 0;
  AT_DISPATCH_FLOATING_TYPES(dt, "grid_blur_cpu", [&] {
    for (int a = 2; a >= 0; --a) {  // the contiguous axis first: nothing but order changes
      const std::vector<double> taps = blur_taps(sigma[a], G[a]);
      if (taps.empty()) continue;
      if (!buf[next].defined()) buf[next] = at::empty_like(src);
      const std::vector<scalar_t> k(taps.begin(), taps.end());
      blur_axis<scalar_t>(cur.data_ptr<scalar_t>(), buf[next].data_ptr<scalar_t>(), outer[a],
                          G[a], inner[a], k);
      cur = buf[next];
      next ^= 1;
    }
  });
  if (cur.is_same(grid)) cur = cur.clone();
  return cur.to(grid.scalar_type());
}

}  // namespace
}  // namespace cpu
}  // namespace bilateral_ops

TORCH_LIBRARY_IMPL(bilateral_ops, CPU, m) {
  m.impl("grid_blur", &bilateral_ops::cpu::grid_blur);
}
