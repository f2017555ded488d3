#pragma once
// Argument checks of bilateral_filter and _bilateral_filter_backward, shared by the CPU and CUDA
// launchers (the Python wrapper raises ValueError / TypeError first; these protect direct callers
// of torch.ops.bilateral_ops.*).

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <array>
#include <string>

#include "bilateral_ops/bilateral_filter.h"
#include "checks.h"

namespace bilateral_ops {

struct FilterShape {
  int64_t N, C, Cg, H, W, ky, kx, py, px;
  bool self;  // no guidance: the input guides itself (and gets the range-path gradient too)
  int border, distance;

  int64_t pixels() const { return N * H * W; }
  int64_t taps() const { return ky * kx; }
};

inline int parse_border(const std::string& s) {
  if (s == "reflect") return kReflect;
  if (s == "replicate") return kReplicate;
  if (s == "constant") return kConstant;
  if (s == "circular") return kCircular;
  TORCH_CHECK(false, "border_type must be 'reflect', 'replicate', 'constant' or 'circular', got '", s,
              "'");
}

inline int parse_distance(const std::string& s) {
  if (s == "l1") return kL1;
  if (s == "l2") return kL2;
  TORCH_CHECK(false, "color_distance_type must be 'l1' or 'l2', got '", s, "'");
}

// Taps of a kernel at most (2^24, e.g. 4095 x 4095): the spatial table and the padded rows are
// allocated by the kernel's size, so an absurd one (2^31 taps) would exhaust memory rather
// than raise; an exact filter of 2^24 taps a pixel is already far beyond any practical cost.
constexpr int64_t kMaxFilterTaps = int64_t(1) << 24;

inline FilterShape check_filter(const at::Tensor& input, const c10::optional<at::Tensor>& guidance,
                                at::IntArrayRef kernel_size, const at::Tensor& sigma_color,
                                const at::Tensor& sigma_space, const std::string& border_type,
                                const std::string& color_distance_type) {
  check_floating(input, "input");
  TORCH_CHECK(input.dim() == 4, "input must be 4-D (N, C, H, W), got ", input.dim(), "-D");
  FilterShape s{};
  s.N = input.size(0);
  s.C = input.size(1);
  s.H = input.size(2);
  s.W = input.size(3);
  s.self = !(guidance.has_value() && guidance->defined());
  s.Cg = s.C;
  if (!s.self) {
    const at::Tensor& g = *guidance;
    check_floating(g, "guidance");
    check_same(input, "input", g, "guidance");
    TORCH_CHECK(g.dim() == 4, "guidance must be 4-D (N, Cg, H, W), got ", g.dim(), "-D");
    TORCH_CHECK(g.size(0) == s.N && g.size(2) == s.H && g.size(3) == s.W,
                "guidance must have the batch size, height and width of input, got ", g.sizes(),
                " and ", input.sizes());
    s.Cg = g.size(1);
  }
  TORCH_CHECK(kernel_size.size() == 2, "kernel_size must have 2 entries, got ", kernel_size.size());
  s.ky = kernel_size[0];
  s.kx = kernel_size[1];
  TORCH_CHECK(s.ky > 0 && s.kx > 0 && s.ky % 2 == 1 && s.kx % 2 == 1,
              "kernel_size must be odd and positive, got ", kernel_size);
  TORCH_CHECK(s.ky <= kMaxFilterTaps / s.kx, "kernel_size ", kernel_size, " has more than ",
              kMaxFilterTaps, " taps");
  s.py = (s.ky - 1) / 2;
  s.px = (s.kx - 1) / 2;
  s.border = parse_border(border_type);
  s.distance = parse_distance(color_distance_type);
  if (s.H > 0 && s.W > 0) {
    if (s.border == kReflect) {
      TORCH_CHECK(s.py < s.H && s.px < s.W, "kernel_size ", kernel_size,
                  " is too large for reflect padding of a ", s.H, "x", s.W, " image");
    }
    if (s.border == kCircular) {
      TORCH_CHECK(s.py <= s.H && s.px <= s.W, "kernel_size ", kernel_size,
                  " is too large for circular padding of a ", s.H, "x", s.W, " image");
    }
  }
  check_floating(sigma_color, "sigma_color");
  check_floating(sigma_space, "sigma_space");
  check_same(input, "input", sigma_color, "sigma_color");
  check_same(input, "input", sigma_space, "sigma_space");
  TORCH_CHECK(sigma_color.dim() == 1 && sigma_color.size(0) == s.N,
              "sigma_color must have shape (N,) = (", s.N, ",), got ", sigma_color.sizes());
  TORCH_CHECK(sigma_space.dim() == 2 && sigma_space.size(0) == s.N && sigma_space.size(1) == 2,
              "sigma_space must have shape (N, 2) = (", s.N, ", 2), got ", sigma_space.sizes());
  return s;
}

inline void check_filter_grad_output(const at::Tensor& grad_output, const at::Tensor& input) {
  check_floating(grad_output, "grad_output");
  check_same(grad_output, "grad_output", input, "input");
  TORCH_CHECK(grad_output.sizes() == input.sizes(), "grad_output must have shape ", input.sizes(),
              ", got ", grad_output.sizes());
}

inline void check_filter_mask(const FilterShape& s, const std::array<bool, 4>& mask) {
  TORCH_CHECK(!(s.self && mask[1]),
              "output_mask[1] (grad_guidance) must be false when guidance is None");
}

// The dtype of the weight sums W (_bilateral_filter_forward's norm): the accumulation type.
inline at::ScalarType filter_norm_dtype(at::ScalarType input) {
  return compute_dtype(input);
}

// The backward's optional output and norm: both or neither, the forward's (output shaped and
// typed like the input, norm (N, H, W) in filter_norm_dtype, on the input's device). True when
// given and of use: for float16 / bfloat16 inputs they are checked and then left unused, since the
// output rounded to 16 bits breaks the cancellation sum_q w_pq (I_q - out_p) = 0 that the range
// and sigma gradients rely on (a bfloat16 sigma_color gradient came out 18 % off); the backward
// then recomputes them in the accumulation type.
inline bool check_filter_saved(const c10::optional<at::Tensor>& output, const c10::optional<at::Tensor>& norm,
                               const at::Tensor& input) {
  const bool has_out = output.has_value() && output->defined();
  const bool has_norm = norm.has_value() && norm->defined();
  TORCH_CHECK(has_out == has_norm, "output and norm must be given together (both or neither)");
  if (!has_out) return false;
  check_same(*output, "output", input, "input");
  TORCH_CHECK(output->scalar_type() == input.scalar_type() && output->sizes() == input.sizes(),
              "output must have the input's shape ", input.sizes(), " and dtype ", input.scalar_type(),
              ", got ", output->sizes(), " and ", output->scalar_type());
  TORCH_CHECK(norm->device() == input.device(), "norm must be on the input's device ", input.device(), ", got ",
              norm->device());
  const at::ScalarType nd = filter_norm_dtype(input.scalar_type());
  TORCH_CHECK(norm->scalar_type() == nd && norm->dim() == 3 && norm->size(0) == input.size(0) &&
                  norm->size(1) == input.size(2) && norm->size(2) == input.size(3),
              "norm must have shape (", input.size(0), ", ", input.size(2), ", ", input.size(3), ") and dtype ",
              nd, ", got ", norm->sizes(), " and ", norm->scalar_type());
  return nd == input.scalar_type();
}

}  // namespace bilateral_ops
