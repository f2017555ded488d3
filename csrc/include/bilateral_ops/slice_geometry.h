#pragma once
// Sizes of one slice / slice_apply / splat call, shared by the CPU and CUDA launchers and the
// launch-configuration functions. Per-kernel arguments (pointers, modes) live with each kernel.

#include <cstdint>

namespace bilateral_ops {

// N images of H x W pixels sampling a grid of C channels, D x Gh x Gw cells; align_corners
// selects the corner-aligned sampling (grid_coords.h). Brace-initialised without it: false.
struct SliceGeometry {
  int64_t N, C, D, Gh, Gw, H, W;
  bool align_corners = false;

  int64_t pixels() const { return N * H * W; }
  int64_t cells() const { return D * Gh * Gw; }  // per channel and image
};

}  // namespace bilateral_ops
