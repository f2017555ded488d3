#pragma once
// Which of the CPU slice ops' two paths serves a call (bilateral_slice, bilateral_slice_apply,
// their backward passes and grid_splat): the row engine (slice_engine.h, slice_runner.h) or the
// per-pixel gathers (slice_direct.h). By default the sizes choose (pixels_cheaper); tests force
// either through bilateral_ops._C.slice_path (csrc/module.cpp), so that both stay covered
// whatever sizes a test takes.

#include <atomic>

#include "bilateral_ops/slice_geometry.h"

namespace bilateral_ops {
namespace cpu {

enum class SlicePath : int { kAuto = 0, kRows = 1, kPixels = 2 };

// Process-wide, read once per call.
inline std::atomic<int> g_slice_path{static_cast<int>(SlicePath::kAuto)};

// The engine's overhead per image is the grid's cells (transposed once) plus a row table of
// Gw * D cells per image row, each of C channels; the per-pixel path gathers 8 corners of C
// channels per pixel where the engine streams them from the row table. Measured on the 2-core
// AMD EPYC, 1 thread, slice_apply forward, forward + backward and grid_splat (bench/RESULTS.md,
// "Small images and large grids"), the two cost the same where those cells are about half the
// corners: the per-pixel path won every case at 0.75 (64 images of 32 x 32 on 16 x 16 x 8
// grids, 1.3-1.6x; 256 x 256 on 128 x 128 x 8, 1.8-2x) and lost every case at 0.31 and below.
constexpr double kDirectCellsPerCorner = 0.5;

inline bool pixels_cheaper(const SliceGeometry& g) {
  const double engine = static_cast<double>(g.cells()) + static_cast<double>(g.H) * g.Gw * g.D;
  const double corners = 8.0 * static_cast<double>(g.H) * g.W;
  return engine > kDirectCellsPerCorner * corners;
}

inline bool use_direct(const SliceGeometry& g) {
  switch (static_cast<SlicePath>(g_slice_path.load(std::memory_order_relaxed))) {
    case SlicePath::kRows:
      return false;
    case SlicePath::kPixels:
      return true;
    default:
      return pixels_cheaper(g);
  }
}

}  // namespace cpu
}  // namespace bilateral_ops
