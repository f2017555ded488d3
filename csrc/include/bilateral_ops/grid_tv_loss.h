#pragma once
// Per-element math of grid_tv_loss (lib_bilagrid's total_variation_loss), shared by the CPU and
// CUDA kernels. Grids are viewed as (B, C, D, Gh, Gw); the loss is sum over the three spatial axes
// a of w_a * sum (x[.., j + 1, ..] - x[.., j, ..])^2, with w_a = 1 / (number of such differences
// over all B grids), and w_a = 0 for an axis of size 1 (lib_bilagrid divides by max(count, 1) of
// an empty sum). The weights are computed once on the host, in double.

#include "bilateral_ops/macros.h"

namespace bilateral_ops {

struct TvGeometry {
  int64_t M;  // grids in the tensor
  int64_t B;  // grids in the loss (the length of idx, or M)
  int64_t C, D, Gh, Gw;

  int64_t grid_numel() const { return C * D * Gh * Gw; }
};

// w_a for an axis of size n in grids of grid_numel elements, B of them in the loss.
inline double tv_axis_weight(int64_t B, int64_t grid_numel, int64_t n) {
  if (n <= 1 || B <= 0 || grid_numel <= 0) return 0.0;
  return 1.0 / (static_cast<double>(B) * static_cast<double>(grid_numel / n) *
                static_cast<double>(n - 1));
}

// The loss terms of the element at position j of an axis of size n whose next element is xp:
// its forward difference (none for the last element).
template <typename T>
BO_HOST_DEVICE T tv_axis_term(T x, T xp, int64_t j, int64_t n) {
  if (j + 1 >= n) return T(0);
  const T d = xp - x;
  return d * d;
}

// d loss / d x of that element with neighbours xm (j - 1) and xp (j + 1), weight w:
// 2 w ((x - xm) [j > 0] - (xp - x) [j < n - 1]).
template <typename T>
BO_HOST_DEVICE T tv_axis_grad(T x, T xm, T xp, int64_t j, int64_t n, T w) {
  T d = T(0);
  if (j > 0) d += x - xm;
  if (j + 1 < n) d -= xp - x;
  return T(2) * w * d;
}

}  // namespace bilateral_ops
