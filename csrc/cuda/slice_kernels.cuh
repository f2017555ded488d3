#pragma once
// CUDA kernels of bilateral_slice (kApply = false) and bilateral_slice_apply (kApply = true),
// forward, guide derivative (dguide) and backward. csrc/cuda/launch_config.h computes every
// launch; csrc/cuda/slice_launch.cuh turns its plans into launches.
//
// All per-pixel geometry comes from the shared headers (image_taps, guide_taps, trilinear_taps),
// the very code the CPU kernels run. With dguide the z taps carry the derivative weights
// (-D * slope, +D * slope), and the same code computes the derivative of the op with respect to
// the guide, or its vector-Jacobian product.
//
// Forward: one thread per pixel. Float-opmath grids are first packed so that a corner of a whole
// affine row (or of 4 slice channels) is one or two float4 loads; float64 and affine rows wider
// than 8 use the scalar kernel.
//
// Backward, per pixel (grad_guide, grad_input): one block per 32 x 8 pixel tile, one warp per
// tile row. grad_grid has two paths:
//  * default: the tile kernel scatters into an accumulator. A tile touches a small box of cells,
//    so the block accumulates into a copy of that box in shared memory (warp-aggregated shared
//    atomics, since the 32 lanes of a warp mostly share cells) and flushes it to global memory
//    with one atomic per cell. A box that does not fit the shared budget goes straight to global
//    memory with the same warp-aggregated atomics.
//  * deterministic: a block per grid cell column gathers the pixels of that column's footprint
//    in a fixed order, accumulating in double; bitwise reproducible.
//
// Kernels live in an anonymous namespace: both ops' translation units include this header, and
// whole-program CUDA compilation must not see one kernel symbol registered by two modules.

#include <cstdint>

#include "bilateral_ops/affine.h"
#include "bilateral_ops/grid_coords.h"
#include "bilateral_ops/slice_geometry.h"
#include "common.cuh"
#include "launch_config.h"

namespace bilateral_ops {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// Kernel arguments: geometry (SliceGeometry, AffineLayout) is passed separately; these hold the
// pointers and modes of one kernel. Tensors are contiguous.

template <typename scalar_t>
struct ForwardArgs {
  const scalar_t* grid;   // (N, C, D, Gh, Gw)
  const scalar_t* guide;  // (N, H, W)
  const scalar_t* input;  // (N, Ci, H, W), slice_apply only
  scalar_t* output;       // (N, C or Co, H, W)
  const float4* packed;   // vectorised: (N, D, Gh, Gw, rows, chunks) float4
  int64_t rows;           // vectorised: packed rows per cell
  bool dguide;
};

template <typename scalar_t>
struct BackwardArgs {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* grid;
  const scalar_t* guide;
  const scalar_t* input;        // slice_apply only
  const scalar_t* grad_output;  // (N, C or Co, H, W)
  scalar_t* grad_guide;         // when need_guide
  scalar_t* grad_input;         // slice_apply, when need_input
  acc_t* grad_grid_acc;         // scatter: (N, C, D, Gh, Gw), zero-initialised
  int64_t shared_cap;           // scatter: acc_t accumulators in shared memory (0: global only)
  bool dguide, need_guide, need_input;
};

// Taps of one image axis, tabulated once per call for the gather.
template <typename acc_t>
struct AxisEntry {
  int i0, i1;
  acc_t w0, w1;
};

template <typename scalar_t>
struct GatherArgs {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* guide;
  const scalar_t* input;  // slice_apply only
  const scalar_t* grad_output;
  const AxisEntry<acc_t>* axis;  // W entries of x taps, then H entries of y taps
  scalar_t* grad_grid;           // split == 1
  double* partial;               // split > 1: (split, N, C, D, Gh, Gw)
  int64_t chunk;                 // pixels staged per round
  int split, slices, own, passes;
  bool dguide;
};

// ---------------------------------------------------------------------------------------------
// Forward.

template <typename acc_t, typename scalar_t>
__device__ __forceinline__ TrilinearTaps<acc_t> pixel_taps(const SliceGeometry& g,
                                                           const scalar_t* guide, bool dguide,
                                                           int64_t n, int64_t y, int64_t x) {
  const AxisTaps<acc_t> tx = image_taps<acc_t>(x, g.W, g.Gw, g.align_corners);
  const AxisTaps<acc_t> ty = image_taps<acc_t>(y, g.H, g.Gh, g.align_corners);
  const acc_t v = ldg(guide + (n * g.H + y) * g.W + x);
  const AxisTaps<acc_t> tz = guide_taps<acc_t>(v, g.D, dguide, g.align_corners);
  return trilinear_taps(tx, ty, tz, g.Gh, g.Gw);
}

template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
__device__ __forceinline__ acc_t sample_channel(const scalar_t* grid, const SliceGeometry& g,
                                                const TrilinearTaps<acc_t>& t, int64_t n,
                                                int64_t c) {
  const scalar_t* slab = grid + (n * g.C + c) * (g.D * g.Gh * g.Gw);
  acc_t v, dv;
  trilinear_sample(t, [slab](int64_t off) { return ldg(slab + off); }, v, dv);
  return v;
}

template <typename scalar_t, bool kApply>
__global__ void __launch_bounds__(launch::kForwardThreads, launch::kForwardMinBlocks)
    forward_scalar_kernel(const SliceGeometry g, const AffineLayout l,
                          const ForwardArgs<scalar_t> a) {
  using acc_t = acc_type<scalar_t>;
  const int64_t HW = g.H * g.W;
  const int64_t total = g.N * HW;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < total;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = p / HW, r = p - n * HW;
    const int64_t y = r / g.W, x = r - y * g.W;
    const TrilinearTaps<acc_t> t = pixel_taps<acc_t>(g, a.guide, a.dguide, n, y, x);
    if (!kApply) {
      scalar_t* out = a.output + n * g.C * HW + r;
#pragma unroll 1
      for (int64_t c = 0; c < g.C; ++c) {
        out[c * HW] = static_cast<scalar_t>(sample_channel(a.grid, g, t, n, c));
      }
    } else {
      const scalar_t* in = a.input + n * l.Ci * HW + r;
      scalar_t* out = a.output + n * l.Co * HW + r;
#pragma unroll 1
      for (int64_t o = 0; o < l.Co; ++o) {
        acc_t acc = l.has_offset ? sample_channel(a.grid, g, t, n, l.offset_channel(o)) : acc_t(0);
#pragma unroll 1
        for (int64_t i = 0; i < l.Ci; ++i) {
          acc += sample_channel(a.grid, g, t, n, l.channel(o, i)) * ldg(in + i * HW);
        }
        out[o * HW] = static_cast<scalar_t>(acc);
      }
    }
  }
}

// packed[((n * cells + cell) * rows + row) * 4 * chunks + s] = grid[n, row * row_stride + s, cell]
// for s < row_stride (and a real channel), 0 in the padding: the padding then contributes
// nothing whatever it is multiplied by.
template <typename scalar_t>
__global__ void __launch_bounds__(launch::kForwardThreads, launch::kPackMinBlocks)
    pack_grid_kernel(const SliceGeometry g, const scalar_t* grid, int64_t rows, int64_t row_stride,
                     int64_t row_len, float* packed) {
  const int64_t cells = g.D * g.Gh * g.Gw;
  const int64_t total = g.N * cells * rows * row_len;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t r = idx;
    const int64_t s = r % row_len;
    r /= row_len;
    const int64_t row = r % rows;
    r /= rows;
    const int64_t cell = r % cells;
    const int64_t n = r / cells;
    const int64_t c = row * row_stride + s;
    const bool real = s < row_stride && c < g.C;
    packed[idx] = real ? static_cast<float>(ldg(grid + (n * g.C + c) * cells + cell)) : 0.f;
  }
}

__device__ __forceinline__ void fma4(float4& acc, float w, const float4 v) {
  acc.x += w * v.x;
  acc.y += w * v.y;
  acc.z += w * v.z;
  acc.w += w * v.w;
}

// The 8 corners of a pixel in the packed grid: float4 offsets of each corner's cell (int32: the
// plan only packs grids of fewer than 2^31 float4 per image) and the weights.
struct PackedCorners {
  int off[8];
  float w[8];
};

// Float4 chunk q of the packed row at `row_base`, interpolated at the 8 corners.
__device__ __forceinline__ float4 sample_packed(const float4* row_base, const PackedCorners& pk,
                                                int q) {
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
  for (int k = 0; k < 8; ++k) fma4(acc, pk.w[k], __ldg(row_base + pk.off[k] + q));
  return acc;
}

template <typename scalar_t, int kChunks, bool kApply>
__global__ void __launch_bounds__(launch::kForwardThreads, launch::kForwardMinBlocks)
    forward_vec_kernel(const SliceGeometry g, const AffineLayout l, const ForwardArgs<scalar_t> a) {
  static_assert(sizeof(acc_type<scalar_t>) == sizeof(float), "float opmath only");
  const int64_t HW = g.H * g.W;
  const int64_t total = g.N * HW;
  const int64_t cells = g.D * g.Gh * g.Gw;
  const int cell_stride = static_cast<int>(a.rows) * kChunks;  // float4 per packed cell
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < total;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = p / HW, r = p - n * HW;
    const int64_t y = r / g.W, x = r - y * g.W;
    PackedCorners pk;
    {
      const TrilinearTaps<float> t = pixel_taps<float>(g, a.guide, a.dguide, n, y, x);
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        pk.off[k] = static_cast<int>(t.offset[k]) * cell_stride;
        pk.w[k] = t.weight[k];
      }
    }
    const float4* packed = a.packed + n * cells * cell_stride;
    if (!kApply) {
      // Rows of 4 channels; the last row may hold fewer than 4 real ones.
      scalar_t* out = a.output + n * g.C * HW + r;
#pragma unroll 1
      for (int64_t row = 0; row < a.rows; ++row) {
        const float4 v = sample_packed(packed + row * kChunks, pk, 0);
        const float vals[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t c = row * 4 + e;
          if (c < g.C) out[c * HW] = static_cast<scalar_t>(vals[e]);
        }
      }
      continue;
    }
    // Dotted with (input, 1, 0, ...): slot Ci is the offset with has_offset and zero padding
    // without, slots beyond are zero padding.
    float ext[4 * kChunks];
    const scalar_t* in = a.input + n * l.Ci * HW + r;
#pragma unroll
    for (int i = 0; i < 4 * kChunks; ++i) {
      ext[i] = i < l.Ci ? ldg(in + i * HW) : (i == l.Ci ? 1.f : 0.f);
    }
    scalar_t* out = a.output + n * l.Co * HW + r;
#pragma unroll 1
    for (int64_t o = 0; o < l.Co; ++o) {
      float acc = 0.f;
#pragma unroll
      for (int q = 0; q < kChunks; ++q) {
        const float4 v = sample_packed(packed + o * kChunks, pk, q);
        acc += v.x * ext[4 * q] + v.y * ext[4 * q + 1] + v.z * ext[4 * q + 2] + v.w * ext[4 * q + 3];
      }
      out[o * HW] = static_cast<scalar_t>(acc);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward per pixel, with the optional grad_grid scatter.

// One lane's pixel: its 8 corners as (z, x) and y parts of slab offsets (int32: the launcher
// checks that a channel slab has fewer than 2^31 cells) and the weights, pre-multiplied where the
// per-channel loops want products. y is uniform across a warp.
template <typename acc_t>
struct PixelCorners {
  int zx[4];       // z * Gh * Gw + x of corner (dz, dx), entry dz * 2 + dx
  int y[2];        // y * Gw
  acc_t wzx[4];    // wz[dz] * wx[dx]
  acc_t wy[2], wx[2];
  acc_t slope;     // d gc / d gz of the z taps (0 with dguide)
};

// Sample of one channel slab and its derivative along gz.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void sample_corners(const scalar_t* slab, const PixelCorners<acc_t>& pc,
                                               acc_t& value, acc_t& dvalue_dz) {
  acc_t v = acc_t(0), dv = acc_t(0);
#pragma unroll
  for (int dx = 0; dx < 2; ++dx) {
    const acc_t s00 = ldg(slab + pc.zx[dx] + pc.y[0]), s01 = ldg(slab + pc.zx[dx] + pc.y[1]);
    const acc_t s10 = ldg(slab + pc.zx[2 + dx] + pc.y[0]), s11 = ldg(slab + pc.zx[2 + dx] + pc.y[1]);
    v += pc.wzx[dx] * (pc.wy[0] * s00 + pc.wy[1] * s01) +
         pc.wzx[2 + dx] * (pc.wy[0] * s10 + pc.wy[1] * s11);
    dv += pc.wx[dx] * (pc.wy[0] * (s10 - s00) + pc.wy[1] * (s11 - s01));
  }
  value = v;
  dvalue_dz = pc.slope * dv;
}

// Destinations of a tile's scatter: channel c of corner (dz, dy, dx) accumulates at
// c * cstride + zx[dz * 2 + dx] + y[dy] from the start of the shared box (kShared) or of the
// image's (C, D, Gh, Gw) accumulator in global memory; the lanes sharing the (z, x) cells of a
// corner are its `peers` (y is uniform across the warp).
template <typename acc_t>
struct ScatterTarget {
  acc_t* base;
  int cstride;
  int zx[4], y[2];
  unsigned peers[4];
};

enum class Scatter { kNone, kShared, kGlobal };

// The 8 corners of channel c += weight * s, warp-aggregated: the lanes of each (z, x) group are
// summed first (4 reductions, not 8, since y is uniform), then the group's leader adds to the two
// y rows. The shared box is indexed in int32 from the __shared__ buffer itself, so that the
// atomics compile to shared-memory atomics rather than generic ones. Every lane of the warp must
// call it.
template <Scatter kMode, typename acc_t>
__device__ __forceinline__ void scatter_corners(const ScatterTarget<acc_t>& st, acc_t* s_box,
                                                const PixelCorners<acc_t>& pc, int64_t c, acc_t s,
                                                int lane) {
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const unsigned peers = st.peers[k];
    const acc_t t = peer_sum(pc.wzx[k] * s, peers, lane);
    if (is_peer_leader(peers, lane)) {
      if (kMode == Scatter::kShared) {
        const int off = static_cast<int>(c) * st.cstride + st.zx[k];
        atomicAdd(s_box + off + st.y[0], pc.wy[0] * t);
        atomicAdd(s_box + off + st.y[1], pc.wy[1] * t);
      } else {
        acc_t* p = st.base + c * st.cstride + st.zx[k];
        atomicAdd(p + st.y[0], pc.wy[0] * t);
        atomicAdd(p + st.y[1], pc.wy[1] * t);
      }
    }
  }
}

// Per-pixel gradients of one tile pixel: grad_input is written here; returns the pixel's sum for
// grad_guide (before the factor D). Only called when one of them is wanted.
template <bool kApply, typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t tile_pixel_grads(const SliceGeometry& g, const AffineLayout& l,
                                                  const BackwardArgs<scalar_t>& a,
                                                  const PixelCorners<acc_t>& pc, int64_t n,
                                                  int64_t pix, bool valid) {
  const int64_t HW = g.H * g.W;
  const int64_t slab = g.D * g.Gh * g.Gw;
  const scalar_t* grid_n = a.grid + n * g.C * slab;
  acc_t gg = acc_t(0);
  acc_t v, dv;
  if (!kApply) {
    const scalar_t* go = a.grad_output + n * g.C * HW + pix;
#pragma unroll 1
    for (int64_t c = 0; c < g.C; ++c) {
      sample_corners(grid_n + c * slab, pc, v, dv);
      gg += ldg(go + c * HW) * dv;
    }
    return gg;
  }
  const scalar_t* go = a.grad_output + n * l.Co * HW + pix;
  const scalar_t* in = a.input + n * l.Ci * HW + pix;
#pragma unroll 1
  for (int64_t i = 0; i < l.stride; ++i) {
    const bool is_offset = i == l.Ci;  // only with has_offset
    const acc_t xin = is_offset ? acc_t(1) : ldg(in + i * HW);
    acc_t gin = acc_t(0);
#pragma unroll 1
    for (int64_t o = 0; o < l.Co; ++o) {
      sample_corners(grid_n + l.channel(o, i) * slab, pc, v, dv);
      const acc_t gv = ldg(go + o * HW);
      gin += gv * v;
      gg += gv * (dv * xin);
    }
    if (a.need_input && !is_offset && valid) {
      a.grad_input[(n * l.Ci + i) * HW + pix] = static_cast<scalar_t>(gin);
    }
  }
  return gg;
}

// The scatter of one tile pixel into grad_grid (kMode: shared box or global). Every lane of the
// warp must call it: the loops are uniform, and lanes outside the image scatter zeros.
template <Scatter kMode, bool kApply, typename scalar_t, typename acc_t>
__device__ __forceinline__ void tile_scatter(const SliceGeometry& g, const AffineLayout& l,
                                             const BackwardArgs<scalar_t>& a,
                                             const PixelCorners<acc_t>& pc,
                                             const ScatterTarget<acc_t>& st, acc_t* s_box,
                                             int64_t n, int64_t pix, bool valid, int lane) {
  const int64_t HW = g.H * g.W;
  if (!kApply) {
    const scalar_t* go = a.grad_output + n * g.C * HW + pix;
#pragma unroll 1
    for (int64_t c = 0; c < g.C; ++c) {
      const acc_t gv = valid ? ldg(go + c * HW) : acc_t(0);
      scatter_corners<kMode>(st, s_box, pc, c, gv, lane);
    }
    return;
  }
  const scalar_t* go = a.grad_output + n * l.Co * HW + pix;
  const scalar_t* in = a.input + n * l.Ci * HW + pix;
#pragma unroll 1
  for (int64_t o = 0; o < l.Co; ++o) {
    const acc_t gv = valid ? ldg(go + o * HW) : acc_t(0);
#pragma unroll 1
    for (int64_t i = 0; i < l.stride; ++i) {
      const acc_t xin = i == l.Ci ? acc_t(1) : (valid ? ldg(in + i * HW) : acc_t(0));
      scatter_corners<kMode>(st, s_box, pc, l.channel(o, i), gv * xin, lane);
    }
  }
}

// The tiles of this block (grid-stride, block-uniform, so __syncthreads inside is safe).
// kScatter adds the grad_grid scatter; per-pixel gradients are written when asked for.
template <typename scalar_t, bool kApply, bool kScatter>
__device__ __forceinline__ void backward_tiles(const SliceGeometry& g, const AffineLayout& l,
                                               const BackwardArgs<scalar_t>& a) {
  using acc_t = acc_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  int* s_zrange = reinterpret_cast<int*>(smem_raw);  // zlo, zhi of the tile
  acc_t* s_box = reinterpret_cast<acc_t*>(smem_raw + launch::kScatterHeaderBytes);

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t HW = g.H * g.W;
  const int plane = static_cast<int>(g.Gh * g.Gw);
  const int slab = static_cast<int>(g.D) * plane;
  const int64_t tiles_x = (g.W + launch::kTileW - 1) / launch::kTileW;
  const int64_t tiles_y = (g.H + launch::kTileH - 1) / launch::kTileH;
  const int64_t ntiles = g.N * tiles_y * tiles_x;
  const bool per_pixel = a.need_guide || (kApply && a.need_input);

  for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
    const int64_t n = tile / (tiles_y * tiles_x);
    const int64_t tr = tile - n * tiles_y * tiles_x;
    const int64_t x0 = (tr % tiles_x) * launch::kTileW, y0 = (tr / tiles_x) * launch::kTileH;
    // Lanes beyond the image take the nearest pixel of the tile (so that every lane of every warp
    // takes part in the warp-collective scatter, with zeros) and write nothing.
    const bool valid = x0 + lane < g.W && y0 + warp < g.H;
    const int64_t x = x0 + lane < g.W ? x0 + lane : g.W - 1;
    const int64_t y = y0 + warp < g.H ? y0 + warp : g.H - 1;
    const int64_t pix = y * g.W + x;

    PixelCorners<acc_t> pc;
    int zi[2], yi[2], xi[2];
    {
      const AxisTaps<acc_t> tx = image_taps<acc_t>(x, g.W, g.Gw, g.align_corners);
      const AxisTaps<acc_t> ty = image_taps<acc_t>(y, g.H, g.Gh, g.align_corners);
      const AxisTaps<acc_t> tz = guide_taps<acc_t>(ldg(a.guide + n * HW + pix), g.D, a.dguide, g.align_corners);
      zi[0] = static_cast<int>(tz.i0);
      zi[1] = static_cast<int>(tz.i1);
      yi[0] = static_cast<int>(ty.i0);
      yi[1] = static_cast<int>(ty.i1);
      xi[0] = static_cast<int>(tx.i0);
      xi[1] = static_cast<int>(tx.i1);
      const acc_t wz[2] = {tz.w0, tz.w1};
      pc.wx[0] = tx.w0;
      pc.wx[1] = tx.w1;
      pc.wy[0] = ty.w0;
      pc.wy[1] = ty.w1;
      pc.slope = tz.slope;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        pc.zx[k] = zi[k >> 1] * plane + xi[k & 1];
        pc.wzx[k] = wz[k >> 1] * pc.wx[k & 1];
      }
      pc.y[0] = yi[0] * static_cast<int>(g.Gw);
      pc.y[1] = yi[1] * static_cast<int>(g.Gw);
    }

    // Per-pixel gradients first, the scatter after: the two loop nests keep fewer values live
    // than one fused nest (the scatter rereads grad_output and input, from cache).
    if (per_pixel) {
      const acc_t gg = tile_pixel_grads<kApply>(g, l, a, pc, n, pix, valid);
      if (a.need_guide && valid) {
        a.grad_guide[n * HW + pix] = static_cast<scalar_t>(gg * guide_scale<acc_t>(g.D, g.align_corners));
      }
    }
    if (!kScatter) continue;

    ScatterTarget<acc_t> st;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      st.peers[k] =
          match_peers(static_cast<unsigned>(zi[k >> 1] * static_cast<int>(g.Gw) + xi[k & 1]));
    }
    bool use_shared = false;
    int bz0 = 0, by0 = 0, bx0 = 0, bnz = 0, bny = 0, bnx = 0;
    if (a.shared_cap > 0) {
      // The tile's cell box: x from the warp's end lanes (the taps are monotone in the pixel
      // position; lane 31 holds the last pixel of the row segment, clamped to the image), y from
      // the tile's first and last rows, z reduced over the block.
      if (threadIdx.x == 0) {
        s_zrange[0] = 0x7fffffff;
        s_zrange[1] = -1;
      }
      __syncthreads();
      const int zlo = warp_min(zi[0]), zhi = warp_max(zi[1]);
      if (lane == 0) {
        atomicMin(&s_zrange[0], zlo);
        atomicMax(&s_zrange[1], zhi);
      }
      bx0 = __shfl_sync(kFullMask, xi[0], 0);
      const int bx1 = __shfl_sync(kFullMask, xi[1], 31);
      const int64_t ylast = y0 + launch::kTileH - 1 < g.H ? y0 + launch::kTileH - 1 : g.H - 1;
      by0 = static_cast<int>(image_taps<acc_t>(y0, g.H, g.Gh, g.align_corners).i0);
      const int by1 = static_cast<int>(image_taps<acc_t>(ylast, g.H, g.Gh, g.align_corners).i1);
      __syncthreads();
      bz0 = s_zrange[0];
      bnz = s_zrange[1] - bz0 + 1;
      bny = by1 - by0 + 1;
      bnx = bx1 - bx0 + 1;
      // Block-uniform. In int64: bnz * bny * bnx is at most a slab, times C.
      use_shared = static_cast<int64_t>(bnz) * bny * bnx * g.C <= a.shared_cap;
    }
    if (use_shared) {
      st.base = nullptr;  // kShared indexes s_box itself
      st.cstride = bnz * bny * bnx;
#pragma unroll
      for (int k = 0; k < 4; ++k) st.zx[k] = (zi[k >> 1] - bz0) * bny * bnx + xi[k & 1] - bx0;
      st.y[0] = (yi[0] - by0) * bnx;
      st.y[1] = (yi[1] - by0) * bnx;
      for (int i = threadIdx.x; i < st.cstride * g.C; i += blockDim.x) s_box[i] = acc_t(0);
      __syncthreads();
      tile_scatter<Scatter::kShared, kApply>(g, l, a, pc, st, s_box, n, pix, valid, lane);
      __syncthreads();  // every warp's shared atomics are done
      acc_t* out = a.grad_grid_acc + n * g.C * slab;
      const int box = st.cstride;
      for (int i = threadIdx.x; i < box * g.C; i += blockDim.x) {
        const acc_t v = s_box[i];
        if (v != acc_t(0)) {  // NaN too
          const int c = i / box, r = i - c * box;
          const int cz = r / (bny * bnx), ryx = r - cz * (bny * bnx);
          const int cy = ryx / bnx, cx = ryx - cy * bnx;
          atomicAdd(out + static_cast<int64_t>(c) * slab + (bz0 + cz) * plane +
                        (by0 + cy) * static_cast<int>(g.Gw) + (bx0 + cx),
                    v);
        }
      }
    } else {
      st.base = a.grad_grid_acc + n * g.C * slab;
      st.cstride = slab;
#pragma unroll
      for (int k = 0; k < 4; ++k) st.zx[k] = pc.zx[k];
      st.y[0] = pc.y[0];
      st.y[1] = pc.y[1];
      tile_scatter<Scatter::kGlobal, kApply>(g, l, a, pc, st, s_box, n, pix, valid, lane);
    }
    // The next tile rewrites s_zrange and s_box.
    if (a.shared_cap > 0) __syncthreads();
  }
}

template <typename scalar_t, bool kApply>
__global__ void __launch_bounds__(launch::kTileThreads,
                                  launch::tile_min_blocks(sizeof(acc_type<scalar_t>)))
    backward_pixel_kernel(const SliceGeometry g, const AffineLayout l,
                          const BackwardArgs<scalar_t> a) {
  backward_tiles<scalar_t, kApply, false>(g, l, a);
}

template <typename scalar_t, bool kApply>
__global__ void __launch_bounds__(launch::kTileThreads,
                                  launch::scatter_min_blocks(sizeof(acc_type<scalar_t>)))
    backward_scatter_kernel(const SliceGeometry g, const AffineLayout l,
                            const BackwardArgs<scalar_t> a) {
  backward_tiles<scalar_t, kApply, true>(g, l, a);
}

// ---------------------------------------------------------------------------------------------
// Deterministic grad_grid.

template <typename acc_t>
__global__ void __launch_bounds__(launch::kForwardThreads)
    axis_table_kernel(const SliceGeometry g, AxisEntry<acc_t>* table) {
  const int64_t total = g.W + g.H;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const AxisTaps<acc_t> t =
        i < g.W ? image_taps<acc_t>(i, g.W, g.Gw, g.align_corners)
                : image_taps<acc_t>(i - g.W, g.H, g.Gh, g.align_corners);
    table[i] = AxisEntry<acc_t>{static_cast<int>(t.i0), static_cast<int>(t.i1), t.w0, t.w1};
  }
}

// Pixels of an n-pixel axis whose taps include cell k: {p : i0(p) <= k <= i1(p)}, an interval
// since i0 and i1 are nondecreasing in p. Returns [lo, hi] (empty when hi < lo).
template <typename acc_t>
__device__ __forceinline__ int64_t footprint_bound(const AxisEntry<acc_t>* t, int64_t n, int64_t k,
                                                   bool upper) {
  // lower: first p with i1(p) >= k. upper: (first p with i0(p) > k) - 1.
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    const bool right = upper ? t[mid].i0 > k : t[mid].i1 >= k;
    if (right) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return upper ? lo - 1 : lo;
}

template <typename acc_t>
__device__ __forceinline__ acc_t cell_weight(const AxisEntry<acc_t>& e, int64_t k) {
  return (e.i0 == k ? e.w0 : acc_t(0)) + (e.i1 == k ? e.w1 : acc_t(0));
}

// One block per (n, yc, xc) cell column and band of its footprint (blockIdx.y). The footprint's
// pixels are staged in chunks (z taps with the x/y weights of this cell folded in, and the
// grad_output / input values); thread (k, q) accumulates output q = (c, z) over the pixels
// j = k mod slices of each chunk, in double, and the slices are summed in a fixed order. Every
// choice depends on the sizes only: bitwise reproducible.
template <typename scalar_t, bool kApply>
__global__ void __launch_bounds__(launch::kGatherThreads, launch::kGatherMinBlocks)
    grad_grid_gather_kernel(const SliceGeometry g, const AffineLayout l,
                            const GatherArgs<scalar_t> a) {
  using acc_t = acc_type<scalar_t>;
  constexpr int kOwn = launch::kGatherMaxOwn;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  int64_t* s_fp = reinterpret_cast<int64_t*>(smem_raw);  // xlo, xhi, ylo, yhi
  double* s_red = reinterpret_cast<double*>(smem_raw + launch::kGatherHeaderBytes);
  int2* s_z = reinterpret_cast<int2*>(s_red + launch::kGatherThreads);
  acc_t* s_wa = reinterpret_cast<acc_t*>(s_z + a.chunk);
  acc_t* s_wb = s_wa + a.chunk;
  acc_t* s_val = s_wb + a.chunk;  // value v of pixel j at s_val[v * chunk + j]

  const int tid = threadIdx.x;
  const int T = launch::kGatherThreads;
  const int64_t HW = g.H * g.W;
  const int64_t columns = g.N * g.Gh * g.Gw;
  const int64_t outputs = g.C * g.D;
  const int64_t total = g.N * g.C * g.D * g.Gh * g.Gw;
  const int band = blockIdx.y;
  const int64_t Cout = kApply ? l.Co : g.C;
  const int slice = a.slices > 1 ? tid / static_cast<int>(outputs) : 0;
  const bool slice_live = slice < a.slices;

  for (int64_t col = blockIdx.x; col < columns; col += gridDim.x) {
    const int64_t n = col / (g.Gh * g.Gw);
    const int64_t yc = (col / g.Gw) % g.Gh;
    const int64_t xc = col % g.Gw;
    if (tid < 4) {
      const bool is_y = tid >= 2;
      s_fp[tid] = footprint_bound(a.axis + (is_y ? g.W : 0), is_y ? g.H : g.W, is_y ? yc : xc,
                                  (tid & 1) != 0);
    }
    __syncthreads();
    const int64_t xlo = s_fp[0], ylo = s_fp[2];
    const int64_t fw = s_fp[1] - xlo + 1, fh = s_fp[3] - ylo + 1;
    const int64_t F = fw > 0 && fh > 0 ? fw * fh : 0;
    const int64_t f_begin = F * band / a.split, f_end = F * (band + 1) / a.split;

    for (int pass = 0; pass < a.passes; ++pass) {
      // This thread's outputs q = (c, z), z fastest; value channel(s) of each.
      double acc[kOwn];
      int z_own[kOwn], v_own[kOwn], x_own[kOwn];
      bool live[kOwn];
#pragma unroll
      for (int r = 0; r < kOwn; ++r) {
        acc[r] = 0.0;
        const int64_t q = a.slices > 1
                              ? tid % outputs
                              : (static_cast<int64_t>(pass) * a.own + r) * T + tid;
        live[r] = slice_live && r < a.own && q < outputs;
        const int64_t c = live[r] ? q / g.D : 0;
        z_own[r] = live[r] ? static_cast<int>(q % g.D) : -1;
        if (kApply) {
          const int64_t o = c / l.stride, i = c % l.stride;
          v_own[r] = static_cast<int>(o);
          x_own[r] = i < l.Ci ? static_cast<int>(Cout + i) : -1;  // -1: the offset
        } else {
          v_own[r] = static_cast<int>(c);
          x_own[r] = -1;
        }
      }

      for (int64_t f = f_begin; f < f_end; f += a.chunk) {
        const int np = static_cast<int>(f_end - f < a.chunk ? f_end - f : a.chunk);
        __syncthreads();  // the previous chunk has been consumed
        for (int j = tid; j < np; j += T) {
          const int64_t idx = f + j;
          const int64_t yy = ylo + idx / fw, xx = xlo + idx % fw;
          const int64_t pix = yy * g.W + xx;
          const acc_t w = cell_weight(a.axis[xx], xc) * cell_weight(a.axis[g.W + yy], yc);
          const AxisTaps<acc_t> tz = guide_taps<acc_t>(ldg(a.guide + n * HW + pix), g.D, a.dguide, g.align_corners);
          s_z[j] = make_int2(static_cast<int>(tz.i0), static_cast<int>(tz.i1));
          s_wa[j] = w * tz.w0;
          s_wb[j] = w * tz.w1;
          const scalar_t* go = a.grad_output + n * Cout * HW + pix;
          for (int64_t v = 0; v < Cout; ++v) s_val[v * a.chunk + j] = ldg(go + v * HW);
          if (kApply) {
            const scalar_t* in = a.input + n * l.Ci * HW + pix;
            for (int64_t i = 0; i < l.Ci; ++i) s_val[(Cout + i) * a.chunk + j] = ldg(in + i * HW);
          }
        }
        __syncthreads();
        for (int j = slice; j < np; j += a.slices) {
          const int2 zz = s_z[j];
          const acc_t wa = s_wa[j], wb = s_wb[j];
#pragma unroll
          for (int r = 0; r < kOwn; ++r) {
            if (!live[r]) continue;
            acc_t v = s_val[v_own[r] * a.chunk + j];
            if (kApply && x_own[r] >= 0) v *= s_val[x_own[r] * a.chunk + j];
            if (zz.x == z_own[r]) acc[r] += static_cast<double>(wa * v);
            if (zz.y == z_own[r]) acc[r] += static_cast<double>(wb * v);
          }
        }
      }

      // Sum the slices in order and write (c, z) of this column.
      const int64_t cell = yc * g.Gw + xc;
      if (a.slices > 1) {
        s_red[tid] = live[0] ? acc[0] : 0.0;
        __syncthreads();
        if (tid < outputs) {
          double s = 0.0;
          for (int k = 0; k < a.slices; ++k) s += s_red[k * outputs + tid];
          const int64_t idx = (n * outputs + tid) * (g.Gh * g.Gw) + cell;
          if (a.split == 1) {
            a.grad_grid[idx] = static_cast<scalar_t>(s);
          } else {
            a.partial[band * total + idx] = s;
          }
        }
      } else {
#pragma unroll
        for (int r = 0; r < kOwn; ++r) {
          if (!live[r]) continue;
          const int64_t q = (static_cast<int64_t>(pass) * a.own + r) * T + tid;
          const int64_t idx = (n * outputs + q) * (g.Gh * g.Gw) + cell;
          if (a.split == 1) {
            a.grad_grid[idx] = static_cast<scalar_t>(acc[r]);
          } else {
            a.partial[band * total + idx] = acc[r];
          }
        }
      }
      __syncthreads();  // s_red, s_fp and the staging buffers are rewritten next
    }
  }
}

// grad_grid = the split bands summed in band order.
template <typename scalar_t>
__global__ void __launch_bounds__(launch::kForwardThreads)
    gather_finish_kernel(const double* partial, int64_t total, int split, scalar_t* grad_grid) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double s = 0.0;
    for (int b = 0; b < split; ++b) s += partial[b * total + i];
    grad_grid[i] = static_cast<scalar_t>(s);
  }
}

}  // namespace
}  // namespace cuda
}  // namespace bilateral_ops
