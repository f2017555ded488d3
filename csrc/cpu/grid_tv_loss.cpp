// CPU kernels of grid_tv_loss and its backward (csrc/ops.cpp has the schemas, the per-element
// math is csrc/include/bilateral_ops/grid_tv_loss.h). Deterministic: every (grid, channel) slab
// is summed by one task in a fixed order, in double, and the slab sums are added in slab order.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"

namespace bilateral_ops {
namespace cpu {
namespace {

// The grids of the loss: idx's values (checked), or 0 .. M - 1.
std::vector<int64_t> loss_grids(const TvGeometry& g, const c10::optional<at::Tensor>& idx) {
  std::vector<int64_t> out(g.B);
  if (idx.has_value() && idx->defined()) {
    const at::Tensor i = idx->contiguous();
    const int64_t* p = i.data_ptr<int64_t>();
    for (int64_t b = 0; b < g.B; ++b) {
      TORCH_CHECK(p[b] >= 0 && p[b] < g.M, "idx values must be in [0, ", g.M, "), got ", p[b]);
      out[b] = p[b];
    }
  } else {
    for (int64_t b = 0; b < g.B; ++b) out[b] = b;
  }
  return out;
}

struct AxisWeights {
  double z, y, x;
};

AxisWeights axis_weights(const TvGeometry& g) {
  const int64_t n = g.grid_numel();
  return AxisWeights{tv_axis_weight(g.B, n, g.D), tv_axis_weight(g.B, n, g.Gh),
                     tv_axis_weight(g.B, n, g.Gw)};
}

template <typename T>
double slab_loss(const T* s, const TvGeometry& g, const AxisWeights& w) {
  double lz = 0.0, ly = 0.0, lx = 0.0;
  const int64_t plane = g.Gh * g.Gw;
  for (int64_t z = 0; z < g.D; ++z) {
    for (int64_t y = 0; y < g.Gh; ++y) {
      const T* r = s + z * plane + y * g.Gw;
      for (int64_t x = 0; x < g.Gw; ++x) {
        const double v = r[x];
        if (x + 1 < g.Gw) lx += tv_axis_term<double>(v, r[x + 1], x, g.Gw);
        if (y + 1 < g.Gh) ly += tv_axis_term<double>(v, r[x + g.Gw], y, g.Gh);
        if (z + 1 < g.D) lz += tv_axis_term<double>(v, r[x + plane], z, g.D);
      }
    }
  }
  return w.z * lz + w.y * ly + w.x * lx;
}

at::Tensor grid_tv_loss(const at::Tensor& grids, const c10::optional<at::Tensor>& idx) {
  const TvGeometry g = check_grid_tv_loss(grids, idx);
  const std::vector<int64_t> sel = loss_grids(g, idx);
  const auto dt = compute_dtype(grids.scalar_type());
  const at::Tensor x = grids.to(dt).contiguous();
  const AxisWeights w = axis_weights(g);
  const int64_t slabs = g.B * g.C, slab = g.D * g.Gh * g.Gw;
  std::vector<double> partial(slabs, 0.0);
  AT_DISPATCH_FLOATING_TYPES(dt, "grid_tv_loss_cpu", [&] {
    const scalar_t* p = x.data_ptr<scalar_t>();
    at::parallel_for(0, slabs, 1, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t b = s / g.C, c = s % g.C;
        partial[s] = slab_loss(p + (sel[b] * g.C + c) * slab, g, w);
      }
    });
  });
  double total = 0.0;
  for (const double v : partial) total += v;
  // No grids: 0 / 0, as lib_bilagrid's division by the batch size gives.
  if (g.B == 0) total = std::nan("");
  return at::scalar_tensor(total, grids.options().dtype(at::kDouble)).to(grids.scalar_type());
}

at::Tensor grid_tv_loss_backward(const at::Tensor& grad_output, const at::Tensor& grids,
                                 const c10::optional<at::Tensor>& idx) {
  const TvGeometry g = check_grid_tv_loss(grids, idx);
  check_floating(grad_output, "grad_output");
  TORCH_CHECK(grad_output.numel() == 1, "grad_output must have one element, got ",
              grad_output.sizes());
  const std::vector<int64_t> sel = loss_grids(g, idx);
  std::vector<int64_t> count(g.M, 0);
  for (const int64_t m : sel) ++count[m];
  const auto dt = compute_dtype(grids.scalar_type());
  const at::Tensor x = grids.to(dt).contiguous();
  at::Tensor grad = at::empty(grids.sizes(), grids.options().dtype(dt));
  const double go = grad_output.to(at::kDouble).item<double>();
  const AxisWeights w = axis_weights(g);
  const int64_t slab = g.D * g.Gh * g.Gw, plane = g.Gh * g.Gw;
  AT_DISPATCH_FLOATING_TYPES(dt, "grid_tv_loss_backward_cpu", [&] {
    using T = scalar_t;
    const T* p = x.data_ptr<T>();
    T* q = grad.data_ptr<T>();
    at::parallel_for(0, g.M * g.C, 1, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t m = s / g.C;
        T* out = q + s * slab;
        if (count[m] == 0) {
          std::fill(out, out + slab, T(0));
          continue;
        }
        const T scale = static_cast<T>(go * static_cast<double>(count[m]));
        const T wz = static_cast<T>(w.z), wy = static_cast<T>(w.y), wx = static_cast<T>(w.x);
        const T* in = p + s * slab;
        for (int64_t z = 0; z < g.D; ++z) {
          for (int64_t y = 0; y < g.Gh; ++y) {
            for (int64_t xx = 0; xx < g.Gw; ++xx) {
              const int64_t k = z * plane + y * g.Gw + xx;
              const T v = in[k];
              T d = tv_axis_grad<T>(v, xx > 0 ? in[k - 1] : v, xx + 1 < g.Gw ? in[k + 1] : v, xx,
                                    g.Gw, wx);
              d += tv_axis_grad<T>(v, y > 0 ? in[k - g.Gw] : v, y + 1 < g.Gh ? in[k + g.Gw] : v,
                                   y, g.Gh, wy);
              d += tv_axis_grad<T>(v, z > 0 ? in[k - plane] : v, z + 1 < g.D ? in[k + plane] : v,
                                   z, g.D, wz);
              out[k] = scale * d;
            }
          }
        }
      }
    });
  });
  return grad.to(grids.scalar_type());
}

}  // namespace
}  // namespace cpu
}  // namespace bilateral_ops

TORCH_LIBRARY_IMPL(bilateral_ops, CPU, m) {
  m.impl("grid_tv_loss", &bilateral_ops::cpu::grid_tv_loss);
  m.impl("_grid_tv_loss_backward", &bilateral_ops::cpu::grid_tv_loss_backward);
}
