#pragma once
// Host side of curve_guide shared by the CPU and CUDA launchers: the six parameters packed into
// one table (layout in bilateral_ops/curve_guide.h), and a reduced gradient row unpacked back
// into the six parameter gradients.

#include <ATen/ATen.h>

#include <array>

#include "checks.h"

namespace bilateral_ops {

inline at::Tensor curve_table(const at::Tensor& ccm, const at::Tensor& ccm_bias,
                              const at::Tensor& shifts, const at::Tensor& slopes,
                              const at::Tensor& mix, const at::Tensor& mix_bias,
                              at::ScalarType dtype) {
  return at::cat({ccm.reshape(-1), ccm_bias.reshape(-1), shifts.reshape(-1), slopes.reshape(-1),
                  mix.reshape(-1), mix_bias.reshape(-1)})
      .to(dtype)
      .contiguous();
}

// `row` is the summed gradient row (layout of `table`, same dtype). Parameter gradients come back
// in `like`'s dtype, each its own copy (a custom op's outputs must not alias one another); the
// shift entries become -slope * row (see curve_guide.h). mask[1..6] are the parameters' flags.
inline std::array<at::Tensor, 6> curve_unpack_grads(const at::Tensor& row, const at::Tensor& table,
                                                    const CurveLayout& l, const at::Tensor& like,
                                                    const std::array<bool, 7>& mask) {
  const int64_t C = l.C, K = l.K;
  const auto opts = like.options();
  auto out = [&](bool wanted, const at::Tensor& t) {
    return wanted ? t.to(opts, /*non_blocking=*/false, /*copy=*/true) : masked_out(like);
  };
  const at::Tensor d_shift = row.narrow(0, l.shifts(), C * K) * table.narrow(0, l.slopes(), C * K);
  return {out(mask[1], row.narrow(0, l.ccm(), C * C).view({C, C})),
          out(mask[2], row.narrow(0, l.ccm_bias(), C)),
          out(mask[3], d_shift.neg().view({C, K})),
          out(mask[4], row.narrow(0, l.slopes(), C * K).view({C, K})),
          out(mask[5], row.narrow(0, l.mix(), C)),
          out(mask[6], row.narrow(0, l.mix_bias(), 1))};
}

}  // namespace bilateral_ops
