#pragma once
// Argument checks shared by the CPU and CUDA launchers. The Python wrappers raise ValueError /
// TypeError before any kernel runs; these TORCH_CHECKs protect callers of torch.ops.bilateral_ops.*
// directly, so that no input, however wrong, reaches a kernel that could index out of bounds.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <array>
#include <utility>

#include <cmath>

#include "bilateral_ops/affine.h"
#include "bilateral_ops/grid_blur.h"
#include "bilateral_ops/curve_guide.h"
#include "bilateral_ops/grid_tv_loss.h"
#include "bilateral_ops/slice_geometry.h"
#include "bilateral_ops/slice_points.h"

namespace bilateral_ops {

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), name, " must be a defined tensor");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, " must be a floating-point tensor, got ",
              t.scalar_type());
}

inline void check_same(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), an, " and ", bn,
              " must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(a.device() == b.device(), an, " and ", bn, " must be on the same device, got ",
              a.device(), " and ", b.device());
}

// The dtype the CPU kernels compute in: float16 / bfloat16 arguments in float32 (the results are
// returned in the argument's dtype), float32 and float64 as they are.
inline at::ScalarType compute_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

// grid (N, C, D, Gh, Gw) with every grid dimension >= 1; guide (N, H, W). Returns the sizes
// (align_corners: the sampling of the slice ops' option of that name, grid_coords.h).
inline SliceGeometry check_grid_guide(const at::Tensor& grid, const at::Tensor& guide,
                                      bool align_corners = false) {
  check_floating(grid, "grid");
  check_floating(guide, "guide");
  check_same(grid, "grid", guide, "guide");
  TORCH_CHECK(grid.dim() == 5, "grid must be 5-D (N, C, D, Gh, Gw), got ", grid.dim(), "-D");
  TORCH_CHECK(guide.dim() == 3, "guide must be 3-D (N, H, W), got ", guide.dim(), "-D");
  TORCH_CHECK(grid.size(1) >= 1 && grid.size(2) >= 1 && grid.size(3) >= 1 && grid.size(4) >= 1,
              "grid channel, depth, height and width must be >= 1, got ", grid.sizes());
  TORCH_CHECK(grid.size(0) == guide.size(0), "grid and guide must have the same batch size, got ",
              grid.size(0), " and ", guide.size(0));
  return SliceGeometry{grid.size(0), grid.size(1), grid.size(2), grid.size(3),
                       grid.size(4), guide.size(1), guide.size(2), align_corners};
}

// grid_splat's input (N, C, H, W), guide (N, H, W) and grid_size (D, Gh, Gw); returns the sizes
// of the slice whose transpose it is.
inline SliceGeometry check_grid_splat(const at::Tensor& input, const at::Tensor& guide,
                                      at::IntArrayRef grid_size) {
  check_floating(input, "input");
  check_floating(guide, "guide");
  check_same(input, "input", guide, "guide");
  TORCH_CHECK(input.dim() == 4, "input must be 4-D (N, C, H, W), got ", input.dim(), "-D");
  TORCH_CHECK(guide.dim() == 3, "guide must be 3-D (N, H, W), got ", guide.dim(), "-D");
  TORCH_CHECK(input.size(1) >= 1, "input must have at least one channel");
  TORCH_CHECK(input.size(0) == guide.size(0) && input.size(2) == guide.size(1) &&
                  input.size(3) == guide.size(2),
              "guide must have shape (N, H, W) matching input ", input.sizes(), ", got ",
              guide.sizes());
  TORCH_CHECK(grid_size.size() == 3 && grid_size[0] >= 1 && grid_size[1] >= 1 && grid_size[2] >= 1,
              "grid_size must be three sizes (D, Gh, Gw), each >= 1, got ", grid_size);
  return SliceGeometry{input.size(0), input.size(1), grid_size[0], grid_size[1],
                       grid_size[2], input.size(2), input.size(3)};
}

// grid_blur's grid (N, C, D, Gh, Gw) and per-axis sigmas (D, Gh, Gw order).
inline void check_grid_blur(const at::Tensor& grid, c10::ArrayRef<double> sigma) {
  check_floating(grid, "grid");
  TORCH_CHECK(grid.dim() == 5, "grid must be 5-D (N, C, D, Gh, Gw), got ", grid.dim(), "-D");
  TORCH_CHECK(sigma.size() == 3, "sigma must have three entries (D, Gh, Gw), got ", sigma.size());
  for (const double s : sigma) {
    TORCH_CHECK(std::isfinite(s) && s >= 0.0 && s <= kMaxBlurSigma,
                "sigma must be finite, >= 0 and <= ", kMaxBlurSigma, " cells, got ", sigma);
  }
}

// The sizes and coefficient layout of one slice_apply call.
struct SliceApplyShape {
  SliceGeometry g;
  AffineLayout l;
};

// slice_apply's arguments (grid and guide included); returns their sizes and layout.
inline SliceApplyShape check_slice_apply(const at::Tensor& grid, const at::Tensor& guide,
                                         const at::Tensor& input, bool has_offset,
                                         bool align_corners) {
  const SliceGeometry g = check_grid_guide(grid, guide, align_corners);
  check_floating(input, "input");
  check_same(grid, "grid", input, "input");
  TORCH_CHECK(input.dim() == 4, "input must be 4-D (N, Ci, H, W), got ", input.dim(), "-D");
  TORCH_CHECK(input.size(0) == guide.size(0), "input and guide must have the same batch size");
  TORCH_CHECK(input.size(2) == guide.size(1) && input.size(3) == guide.size(2),
              "input and guide must have the same height and width, got ", input.sizes(), " and ",
              guide.sizes());
  TORCH_CHECK(input.size(1) >= 1, "input must have at least one channel");
  const int64_t stride = affine_stride(input.size(1), has_offset);
  TORCH_CHECK(grid.size(1) % stride == 0,
              "grid must have Co*(Ci+1) channels (Co*Ci without offset); got ", grid.size(1),
              " channels for Ci=", input.size(1), ", has_offset=", has_offset);
  return SliceApplyShape{g, affine_layout(grid.size(1), input.size(1), has_offset)};
}

// bilateral_slice_apply_points' arguments: grid (M, Co*(Ci+1), D, Gh, Gw) [Co*Ci without offset],
// coords (P, 3), input (P, Ci), grid_idx (P,) int64. grid_idx's values are checked by the kernels
// (the CPU raises; the CUDA kernels cannot without a host synchronisation and give NaN instead).
struct PointsShape {
  PointsGeometry g;
  AffineLayout l;
};

inline PointsShape check_slice_apply_points(const at::Tensor& grid, const at::Tensor& coords,
                                            const at::Tensor& input, const at::Tensor& grid_idx,
                                            bool has_offset) {
  check_floating(grid, "grid");
  check_floating(coords, "coords");
  check_floating(input, "input");
  check_same(grid, "grid", coords, "coords");
  check_same(grid, "grid", input, "input");
  TORCH_CHECK(grid_idx.defined() && grid_idx.scalar_type() == at::kLong,
              "grid_idx must be an int64 tensor");
  TORCH_CHECK(grid_idx.device() == grid.device(), "grid_idx and grid must be on the same device");
  TORCH_CHECK(grid.dim() == 5, "grid must be 5-D (M, C, D, Gh, Gw), got ", grid.dim(), "-D");
  TORCH_CHECK(grid.size(0) >= 1 && grid.size(1) >= 1 && grid.size(2) >= 1 && grid.size(3) >= 1 &&
                  grid.size(4) >= 1,
              "grid's sizes must all be >= 1, got ", grid.sizes());
  TORCH_CHECK(coords.dim() == 2 && coords.size(1) == 3, "coords must have shape (P, 3), got ",
              coords.sizes());
  const int64_t P = coords.size(0);
  TORCH_CHECK(input.dim() == 2 && input.size(0) == P && input.size(1) >= 1,
              "input must have shape (P, Ci) with P = ", P, " and Ci >= 1, got ", input.sizes());
  TORCH_CHECK(grid_idx.dim() == 1 && grid_idx.size(0) == P, "grid_idx must have shape (", P,
              ",), got ", grid_idx.sizes());
  const int64_t stride = affine_stride(input.size(1), has_offset);
  TORCH_CHECK(grid.size(1) % stride == 0,
              "grid must have Co*(Ci+1) channels (Co*Ci without offset); got ", grid.size(1),
              " channels for Ci=", input.size(1), ", has_offset=", has_offset);
  return PointsShape{PointsGeometry{P, grid.size(0), grid.size(1), grid.size(2), grid.size(3),
                                    grid.size(4)},
                     affine_layout(grid.size(1), input.size(1), has_offset)};
}

// grid_tv_loss' grids (M, C, D, Gh, Gw) and optional idx (K,) int64 (values checked by the
// kernels, as grid_idx above).
inline TvGeometry check_grid_tv_loss(const at::Tensor& grids, const c10::optional<at::Tensor>& idx) {
  check_floating(grids, "grids");
  TORCH_CHECK(grids.dim() == 5, "grids must be 5-D (M, C, D, Gh, Gw), got ", grids.dim(), "-D");
  int64_t B = grids.size(0);
  if (idx.has_value() && idx->defined()) {
    TORCH_CHECK(idx->scalar_type() == at::kLong, "idx must be an int64 tensor, got ",
                idx->scalar_type());
    TORCH_CHECK(idx->device() == grids.device(), "idx and grids must be on the same device");
    TORCH_CHECK(idx->dim() == 1, "idx must be 1-D (K,), got ", idx->dim(), "-D");
    B = idx->size(0);
  }
  return TvGeometry{grids.size(0), B, grids.size(1), grids.size(2), grids.size(3), grids.size(4)};
}

// curve_guide's arguments: input (N, C, H, W), ccm (C, C), ccm_bias (C,), shifts and slopes
// (C, K), mix (C,), mix_bias (1,), all floating, one dtype and device. Returns the sizes.
inline CurveShape check_curve_guide(const at::Tensor& input, const at::Tensor& ccm,
                                    const at::Tensor& ccm_bias, const at::Tensor& shifts,
                                    const at::Tensor& slopes, const at::Tensor& mix,
                                    const at::Tensor& mix_bias) {
  check_floating(input, "input");
  const std::array<std::pair<const at::Tensor*, const char*>, 6> params = {{{&ccm, "ccm"},
                                                                            {&ccm_bias, "ccm_bias"},
                                                                            {&shifts, "shifts"},
                                                                            {&slopes, "slopes"},
                                                                            {&mix, "mix"},
                                                                            {&mix_bias, "mix_bias"}}};
  for (const auto& p : params) {
    check_floating(*p.first, p.second);
    check_same(*p.first, p.second, input, "input");
  }
  TORCH_CHECK(input.dim() == 4, "input must be 4-D (N, C, H, W), got ", input.dim(), "-D");
  const int64_t C = input.size(1);
  TORCH_CHECK(C >= 1, "input must have at least one channel");
  TORCH_CHECK(ccm.dim() == 2 && ccm.size(0) == C && ccm.size(1) == C, "ccm must have shape (", C,
              ", ", C, "), got ", ccm.sizes());
  TORCH_CHECK(ccm_bias.dim() == 1 && ccm_bias.size(0) == C, "ccm_bias must have shape (", C,
              ",), got ", ccm_bias.sizes());
  TORCH_CHECK(shifts.dim() == 2 && shifts.size(0) == C && shifts.size(1) >= 1,
              "shifts must have shape (", C, ", K) with K >= 1, got ", shifts.sizes());
  TORCH_CHECK(slopes.sizes() == shifts.sizes(), "slopes must have the shape of shifts ",
              shifts.sizes(), ", got ", slopes.sizes());
  TORCH_CHECK(mix.dim() == 1 && mix.size(0) == C, "mix must have shape (", C, ",), got ",
              mix.sizes());
  TORCH_CHECK(mix_bias.dim() == 1 && mix_bias.size(0) == 1, "mix_bias must have shape (1,), got ",
              mix_bias.sizes());
  return CurveShape{input.size(0), C, input.size(2), input.size(3), shifts.size(1)};
}

inline void check_grad_output(const at::Tensor& grad_output, const at::Tensor& like,
                              at::IntArrayRef expected) {
  check_floating(grad_output, "grad_output");
  check_same(grad_output, "grad_output", like, "grid");
  TORCH_CHECK(grad_output.sizes() == expected, "grad_output must have shape ", expected, ", got ",
              grad_output.sizes());
}

// The guide gradient of a dguide product is a second derivative of a function that is piecewise
// linear in the guide: zero almost everywhere, so never computed (the autograd formulas know).
template <size_t K>
void check_output_mask(bool dguide, const std::array<bool, K>& mask) {
  TORCH_CHECK(!(dguide && mask[1]),
              "output_mask[1] (grad_guide) must be false when dguide is true: the guide "
              "derivative of the dguide variant is zero almost everywhere and is not computed");
}

// What a masked-off gradient comes back as: an empty (0,) tensor like `like`.
inline at::Tensor masked_out(const at::Tensor& like) { return at::empty({0}, like.options()); }

// A gradient of a call that has nothing to compute (no pixels, or nothing asked for): zeros
// shaped like its argument where wanted, masked_out otherwise.
inline at::Tensor zero_or_masked(bool wanted, const at::Tensor& like) {
  return wanted ? at::zeros(like.sizes(), like.options()) : masked_out(like);
}

}  // namespace bilateral_ops
