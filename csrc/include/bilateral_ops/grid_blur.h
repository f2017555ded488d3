#pragma once
// Taps of grid_blur's Gaussian (docs/ops.md, "grid_blur"), computed once on the host for the CPU
// and CUDA kernels alike. Along an axis of G cells with sigma s > 0 the taps are
// exp(-t^2 / (2 s^2)) for |t| <= r = ceil(2 s), normalised once to sum 1 over the whole window:
// never renormalised at the borders, where cells outside the grid count as zero. That keeps the
// blur linear and symmetric, hence self-adjoint (its backward is itself).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace bilateral_ops {

// Largest sigma grid_blur accepts, in cells: the normalisation sums the whole window (4 s + 1
// taps), so it must stay cheap; far beyond any useful blur of a grid.
constexpr double kMaxBlurSigma = 1e6;

inline int64_t blur_radius(double sigma) {
  return sigma > 0 ? static_cast<int64_t>(std::ceil(2.0 * sigma)) : 0;
}

// Taps k[0..m] of the symmetric kernel (k[-t] = k[t]) for an axis of G cells: only offsets below G
// can ever pair two cells, so m = min(r, G - 1). Empty for sigma == 0 (the axis is skipped).
inline std::vector<double> blur_taps(double sigma, int64_t G) {
  const int64_t r = blur_radius(sigma);
  if (r == 0) return {};
  const double inv = -0.5 / (sigma * sigma);
  double norm = 1.0;
  for (int64_t t = 1; t <= r; ++t) norm += 2.0 * std::exp(inv * static_cast<double>(t * t));
  const int64_t m = std::min<int64_t>(r, G - 1);
  std::vector<double> k(m + 1);
  for (int64_t t = 0; t <= m; ++t) k[t] = std::exp(inv * static_cast<double>(t * t)) / norm;
  return k;
}

}  // namespace bilateral_ops
