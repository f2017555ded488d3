#pragma once
// bilateral_grid_filter's one constant, shared by its CPU and CUDA kernels (and mirrored by
// MIN_WEIGHT in bilateral_ops/bilateral_grid_filter.py): the smallest sliced weight it divides
// by, so that empty cells give 0, never inf or NaN.

namespace bilateral_ops {

constexpr double kMinGridWeight = 1e-12;

}  // namespace bilateral_ops
