#pragma once
// Coefficient layout of bilateral_slice_apply (DESIGN.md, "Coefficient order for slice_apply"):
// grid channel o * stride + i multiplies input channel i for output channel o, and channel
// o * stride + Ci is the offset, where stride = Ci + 1 with an offset and Ci without. For RGB->RGB
// this is the row-major 3x4 affine matrix of google/hdrnet.

#include "bilateral_ops/macros.h"

namespace bilateral_ops {

BO_HOST_DEVICE int64_t affine_stride(int64_t in_channels, bool has_offset) {
  return in_channels + (has_offset ? 1 : 0);
}

BO_HOST_DEVICE int64_t affine_channel(int64_t out_c, int64_t in_c, int64_t stride) {
  return out_c * stride + in_c;
}

}  // namespace bilateral_ops
