#pragma once
// Coefficient layout of bilateral_slice_apply: grid channel o * stride + i multiplies input channel
// i for output channel o, and channel o * stride + Ci is the offset, where stride = Ci + 1 with an
// offset and Ci without. For RGB->RGB this is the row-major 3x4 affine matrix of google/hdrnet.
// The one place where the stride and the output channel count are derived.

#include "bilateral_ops/macros.h"

namespace bilateral_ops {

struct AffineLayout {
  int64_t Ci;      // input channels
  int64_t Co;      // output channels
  int64_t stride;  // grid channels per output channel
  bool has_offset;

  BO_HOST_DEVICE int64_t channel(int64_t o, int64_t i) const { return o * stride + i; }
  BO_HOST_DEVICE int64_t offset_channel(int64_t o) const { return o * stride + Ci; }
};

BO_HOST_DEVICE int64_t affine_stride(int64_t in_channels, bool has_offset) {
  return in_channels + (has_offset ? 1 : 0);
}

// grid_channels must be a multiple of the stride (checked by the callers).
BO_HOST_DEVICE AffineLayout affine_layout(int64_t grid_channels, int64_t in_channels,
                                          bool has_offset) {
  AffineLayout l;
  l.Ci = in_channels;
  l.stride = affine_stride(in_channels, has_offset);
  l.Co = grid_channels / l.stride;
  l.has_offset = has_offset;
  return l;
}

}  // namespace bilateral_ops
