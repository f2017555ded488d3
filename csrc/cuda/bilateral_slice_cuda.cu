// CUDA kernels of bilateral_slice and bilateral_slice_apply, forward and backward.
//
// All per-pixel geometry and weights come from the shared HOST_DEVICE headers (axis_taps,
// trilinear_taps, trilinear_sample, image_taps, affine_*), so the CPU tests verify this math.
//
// Forward: one thread per pixel; the taps are computed once and every grid channel is sampled
// through the read-only cache. The per-pixel affine coefficients of slice_apply are never stored.
//
// Backward: grad_guide and grad_input are per-pixel gathers (one thread per pixel). grad_grid has
// two paths:
//  * default: the per-pixel kernel scatters w_corner * value into an opmath accumulation buffer.
//    A block covers a 32x8 pixel tile, which touches few grid cells, so the block first
//    accumulates into a shared-memory copy of the cells it touches ([C][z][y][x] over the tile's
//    cell box), and before each shared atomic the lanes of a warp that hit the same cell are
//    reduced with shuffles (one atomic per distinct cell per warp: a butterfly when the whole warp
//    agrees, a peer reduction over __match_any_sync groups otherwise). The shared tile is then
//    flushed to global memory with one atomicAdd per touched cell. A block whose cell box does not
//    fit the shared budget (grids as fine as the image) scatters the same warp-reduced sums
//    straight to global memory.
//  * deterministic (at::globalContext().deterministicAlgorithms()): one thread per grid cell
//    gathers, in a fixed order, every pixel whose x/y footprint covers the cell, testing each
//    candidate with axis_taps (as google/hdrnet's gather kernel does). Bitwise reproducible.

#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "../checks.h"
#include "bilateral_ops/affine.h"
#include "bilateral_ops/grid_coords.h"

namespace bilateral_ops {
namespace cuda {
namespace {

constexpr int kThreads = 256;  // forward and gather kernels
constexpr int kTileW = 32;     // backward tile: one warp per image row segment
constexpr int kTileH = 8;      // 8 warps per block
constexpr int kTileThreads = kTileW * kTileH;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int64_t kMaxSharedBytes = 48 * 1024;  // per block, no opt-in needed
constexpr int64_t kMaxBlocks = INT_MAX;

// ---------------------------------------------------------------------------------------------
// Loads through the read-only cache, converted to the accumulation type.

template <typename scalar_t>
struct Ldg;

template <>
struct Ldg<float> {
  static __device__ __forceinline__ float load(const float* p) { return __ldg(p); }
};
template <>
struct Ldg<double> {
  static __device__ __forceinline__ double load(const double* p) { return __ldg(p); }
};
template <>
struct Ldg<c10::Half> {
  static __device__ __forceinline__ float load(const c10::Half* p) {
    const unsigned short bits = __ldg(reinterpret_cast<const unsigned short*>(p));
    return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
  }
};
template <>
struct Ldg<c10::BFloat16> {
  static __device__ __forceinline__ float load(const c10::BFloat16* p) {
    const unsigned short bits = __ldg(reinterpret_cast<const unsigned short*>(p));
    return static_cast<float>(c10::BFloat16(bits, c10::BFloat16::from_bits()));
  }
};

template <typename scalar_t>
__device__ __forceinline__ at::opmath_type<scalar_t> ldg(const scalar_t* p) {
  return Ldg<scalar_t>::load(p);
}

// ---------------------------------------------------------------------------------------------
// Kernel parameters (one plain struct per launch).

template <typename scalar_t>
struct SliceArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* grid;         // (N, C, D, Gh, Gw)
  const scalar_t* guide;        // (N, H, W)
  const scalar_t* input;        // (N, Ci, H, W), apply only
  const scalar_t* grad_output;  // (N, Cout, H, W), backward only
  scalar_t* output;             // forward
  scalar_t* grad_guide;         // backward (N, H, W)
  scalar_t* grad_input;         // backward, apply only
  acc_t* grad_grid_acc;         // scatter path: (N, C, D, Gh, Gw) opmath accumulator
  scalar_t* grad_grid;          // gather path: (N, C, D, Gh, Gw)
  int64_t N, C, D, Gh, Gw, H, W;
  int64_t Ci, Co, stride;  // apply only; Co = C / stride
  bool apply, has_offset;
  int64_t shared_cap;  // scatter path: elements of acc_t of dynamic shared memory per block
  // vectorised forward: the grid packed as (N, D, Gh, Gw, rows, 4 * chunks) float, see pack_grid
  const float4* packed;
  int64_t rows;  // slice: ceil(C / 4) rows of 4 channels; apply: Co rows of `stride` channels
};

template <typename acc_t>
struct PixelTaps {
  AxisTaps<acc_t> tx, ty, tz;
  TrilinearTaps<acc_t> t;
};

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__device__ __forceinline__ PixelTaps<acc_t> pixel_taps(const SliceArgs<scalar_t>& a, int64_t n,
                                                       int64_t y, int64_t x) {
  PixelTaps<acc_t> p;
  p.tx = image_taps<acc_t>(x, a.W, a.Gw);
  p.ty = image_taps<acc_t>(y, a.H, a.Gh);
  const acc_t g = ldg(a.guide + (n * a.H + y) * a.W + x);
  p.tz = axis_taps(g * static_cast<acc_t>(a.D), a.D);
  p.t = trilinear_taps(p.tx, p.ty, p.tz, a.Gh, a.Gw);
  return p;
}

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__device__ __forceinline__ void sample_channel(const SliceArgs<scalar_t>& a,
                                               const TrilinearTaps<acc_t>& t, int64_t n, int64_t c,
                                               acc_t& value, acc_t& dvalue_dz) {
  const scalar_t* slab = a.grid + (n * a.C + c) * (a.D * a.Gh * a.Gw);
  trilinear_sample(t, [slab](int64_t off) { return ldg(slab + off); }, value, dvalue_dz);
}

// ---------------------------------------------------------------------------------------------
// Forward: one thread per pixel.

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) slice_forward_kernel(const SliceArgs<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t HW = a.H * a.W;
  const int64_t total = a.N * HW;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < total;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = p / HW, r = p - n * HW;
    const int64_t y = r / a.W, x = r - y * a.W;
    const PixelTaps<acc_t> pt = pixel_taps(a, n, y, x);
    if (!a.apply) {
      scalar_t* out = a.output + n * a.C * HW + r;
#pragma unroll 1
      for (int64_t c = 0; c < a.C; ++c) {
        acc_t v, dv;
        sample_channel(a, pt.t, n, c, v, dv);
        out[c * HW] = static_cast<scalar_t>(v);
      }
    } else {
      const scalar_t* in = a.input + n * a.Ci * HW + r;
      scalar_t* out = a.output + n * a.Co * HW + r;
#pragma unroll 1
      for (int64_t o = 0; o < a.Co; ++o) {
        acc_t acc = acc_t(0), v, dv;
        if (a.has_offset) {
          sample_channel(a, pt.t, n, affine_channel(o, a.Ci, a.stride), v, dv);
          acc = v;
        }
#pragma unroll 1
        for (int64_t i = 0; i < a.Ci; ++i) {
          sample_channel(a, pt.t, n, affine_channel(o, i, a.stride), v, dv);
          acc += v * ldg(in + i * HW);
        }
        out[o * HW] = static_cast<scalar_t>(acc);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Vectorised forward for float32 / float16 / bfloat16 grids.
//
// The scalar kernel above issues one 4-byte load per corner and channel: 96 loads a pixel for
// HDRNet's 3x4 affine, which bounds it by load instructions rather than DRAM bandwidth. Here the
// small grid is first packed (one tiny kernel) as (N, D, Gh, Gw, rows, 4 * kChunks) float, each
// row zero-padded to whole float4s, so that a corner of one output row is kChunks 16-byte loads:
// 24 loads a pixel for the 3x4 case. For slice_apply a row holds the `stride` coefficients of one
// output channel (Ci gains then the offset), dotted with (input, 1) padded with zeros.

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    pack_grid_kernel(const SliceArgs<scalar_t> a, int64_t row_len, float* packed) {
  const int64_t cells = a.D * a.Gh * a.Gw;
  const int64_t total = a.N * cells * a.rows * row_len;
  const int64_t row_stride = a.apply ? a.stride : 4;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t r = idx;
    const int64_t s = r % row_len;
    r /= row_len;
    const int64_t row = r % a.rows;
    r /= a.rows;
    const int64_t cell = r % cells;
    const int64_t n = r / cells;
    const int64_t c = row * row_stride + s;
    const bool valid = s < row_stride && c < a.C;
    packed[idx] = valid ? static_cast<float>(ldg(a.grid + (n * a.C + c) * cells + cell)) : 0.f;
  }
}

__device__ __forceinline__ void fma4(float4& acc, float w, const float4 v) {
  acc.x += w * v.x;
  acc.y += w * v.y;
  acc.z += w * v.z;
  acc.w += w * v.w;
}

// Sample of float4 chunk q of packed row `row` at the 8 corners.
template <int kChunks>
__device__ __forceinline__ float4 sample_chunk(const float4* cells, const TrilinearTaps<float>& t,
                                               int64_t rows, int64_t row, int q) {
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    fma4(acc, t.weight[k], __ldg(cells + (t.offset[k] * rows + row) * kChunks + q));
  }
  return acc;
}

template <typename scalar_t, int kChunks>
__global__ void __launch_bounds__(kThreads) slice_forward_vec_kernel(const SliceArgs<scalar_t> a) {
  static_assert(std::is_same<at::opmath_type<scalar_t>, float>::value, "float opmath only");
  const int64_t HW = a.H * a.W;
  const int64_t total = a.N * HW;
  const int64_t cells = a.D * a.Gh * a.Gw;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < total;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = p / HW, r = p - n * HW;
    const int64_t y = r / a.W, x = r - y * a.W;
    const PixelTaps<float> pt = pixel_taps(a, n, y, x);
    const float4* packed = a.packed + n * cells * a.rows * kChunks;
    if (!a.apply) {
      scalar_t* out = a.output + n * a.C * HW + r;
#pragma unroll 1
      for (int64_t row = 0; row < a.rows; ++row) {
        const float4 v = sample_chunk<kChunks>(packed, pt.t, a.rows, row, 0);
        const float vals[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t c = row * 4 + e;
          if (c < a.C) out[c * HW] = static_cast<scalar_t>(vals[e]);
        }
      }
      continue;
    }
    // (input, 1, 0, ...): the packed padding is zero, so what multiplies it does not matter.
    float ext[4 * kChunks];
    const scalar_t* in = a.input + n * a.Ci * HW + r;
#pragma unroll
    for (int i = 0; i < 4 * kChunks; ++i) {
      ext[i] = i < a.Ci ? static_cast<float>(ldg(in + i * HW)) : (i == a.Ci ? 1.f : 0.f);
    }
    scalar_t* out = a.output + n * a.Co * HW + r;
#pragma unroll 1
    for (int64_t o = 0; o < a.Co; ++o) {
      float acc = 0.f;
#pragma unroll
      for (int q = 0; q < kChunks; ++q) {
        const float4 v = sample_chunk<kChunks>(packed, pt.t, a.rows, o, q);
        acc +=
            v.x * ext[4 * q] + v.y * ext[4 * q + 1] + v.z * ext[4 * q + 2] + v.w * ext[4 * q + 3];
      }
      out[o * HW] = static_cast<scalar_t>(acc);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Warp-aggregated scatter.

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

// Sum of x over the lanes in `peers` (the calling lane's group, from __match_any_sync), valid on
// the group's lowest lane. Every lane of the warp must call it (E. Westphal's reduce_peers).
template <typename T>
__device__ __forceinline__ T peer_sum(T x, unsigned peers, int lane) {
  int rel_pos = __popc(peers & ((1u << lane) - 1u));
  peers &= (0xfffffffeu << lane);  // peers with a higher lane index
  while (__any_sync(kFullMask, peers != 0u)) {
    const int next = __ffs(peers);
    const T t = __shfl_sync(kFullMask, x, (next - 1) & 31);
    if (next) x += t;
    const int done = rel_pos & 1;
    peers &= ~__ballot_sync(kFullMask, done);
    rel_pos >>= 1;
  }
  return x;
}

// Per-pixel scatter state: the warp groups of lanes sharing each of the 8 corner cells and, in the
// shared-tile mode, the corner's offsets in the tile's cell box (int32: the box is small). In the
// global mode the destinations are the taps' own slab offsets.
template <typename acc_t>
struct Scatter8 {
  unsigned peers[8];
  int zoff[2], yoff[2], xoff[2];
  bool shared;

  __device__ __forceinline__ void init(const TrilinearTaps<acc_t>& t) {
#pragma unroll
    for (int k = 0; k < 8; ++k) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
      peers[k] = __match_any_sync(kFullMask, static_cast<unsigned long long>(t.offset[k]));
#else
      peers[k] = 1u << (threadIdx.x & 31);
#endif
    }
  }

  // base[corner k] += sum over the warp of weight[k] * v, one atomic per distinct cell.
  // All 32 lanes must call it.
  __device__ __forceinline__ void add(acc_t* base, const TrilinearTaps<acc_t>& t, acc_t v,
                                      int lane) const {
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      acc_t s = t.weight[k] * v;
      if (peers[k] == kFullMask) {  // warp-uniform
        s = warp_sum(s);
      } else {
        s = peer_sum(s, peers[k], lane);
      }
      if ((__ffs(peers[k]) - 1) == lane) {
        const int64_t dst =
            shared ? static_cast<int64_t>(zoff[k >> 2] + yoff[(k >> 1) & 1] + xoff[k & 1])
                   : t.offset[k];
        atomicAdd(base + dst, s);
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Backward, per pixel (grad_guide, grad_input) with the optional fused grad_grid scatter.
// Block = one 32x8 pixel tile; grid-stride over tiles.

template <typename scalar_t, bool kScatter>
__global__ void __launch_bounds__(kTileThreads) slice_backward_kernel(const SliceArgs<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);
  __shared__ int s_zlo, s_zhi;

  const int lane = threadIdx.x & 31;
  const int row = threadIdx.x >> 5;
  const int64_t HW = a.H * a.W;
  const int64_t slab = a.D * a.Gh * a.Gw;
  const int64_t tiles_x = (a.W + kTileW - 1) / kTileW;
  const int64_t tiles_y = (a.H + kTileH - 1) / kTileH;
  const int64_t ntiles = a.N * tiles_y * tiles_x;
  const int64_t Cout = a.apply ? a.Co : a.C;
  const acc_t zscale = static_cast<acc_t>(a.D);

  for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
    const int64_t n = tile / (tiles_y * tiles_x);
    const int64_t tr = tile - n * tiles_y * tiles_x;
    const int64_t x0 = (tr % tiles_x) * kTileW, y0 = (tr / tiles_x) * kTileH;
    const int64_t xr = x0 + lane, yr = y0 + row;
    const bool valid = xr < a.W && yr < a.H;
    // Lanes outside the image work on the nearest pixel of the tile with zero values, so that
    // every lane of every warp takes part in the shuffles.
    const int64_t x = xr < a.W ? xr : a.W - 1;
    const int64_t y = yr < a.H ? yr : a.H - 1;
    const int64_t pix = y * a.W + x;
    const PixelTaps<acc_t> pt = pixel_taps(a, n, y, x);

    Scatter8<acc_t> sc;
    bool use_shared = false;
    int64_t bx0 = 0, by0 = 0, bz0 = 0, bnx = 0, bny = 0, bnz = 0;
    if (kScatter) {
      // The tile's cell box: x and y from the tile corners (the taps are monotone in the pixel
      // position), z from a block reduction.
      if (threadIdx.x == 0) {
        s_zlo = INT_MAX;
        s_zhi = -1;
      }
      __syncthreads();
      atomicMin(&s_zlo, static_cast<int>(pt.tz.i0));
      atomicMax(&s_zhi, static_cast<int>(pt.tz.i1));
      __syncthreads();
      const int64_t xl = a.W - 1 < x0 + kTileW - 1 ? a.W - 1 : x0 + kTileW - 1;
      const int64_t yl = a.H - 1 < y0 + kTileH - 1 ? a.H - 1 : y0 + kTileH - 1;
      bx0 = image_taps<acc_t>(x0, a.W, a.Gw).i0;
      bnx = image_taps<acc_t>(xl, a.W, a.Gw).i1 - bx0 + 1;
      by0 = image_taps<acc_t>(y0, a.H, a.Gh).i0;
      bny = image_taps<acc_t>(yl, a.H, a.Gh).i1 - by0 + 1;
      bz0 = s_zlo;
      bnz = static_cast<int64_t>(s_zhi) - bz0 + 1;
      const int64_t cells = bnx * bny * bnz;
      use_shared = cells * a.C <= a.shared_cap;  // block-uniform
      sc.shared = use_shared;
      if (use_shared) {
        sc.zoff[0] = static_cast<int>(((pt.tz.i0 - bz0) * bny) * bnx);
        sc.zoff[1] = static_cast<int>(((pt.tz.i1 - bz0) * bny) * bnx);
        sc.yoff[0] = static_cast<int>((pt.ty.i0 - by0) * bnx);
        sc.yoff[1] = static_cast<int>((pt.ty.i1 - by0) * bnx);
        sc.xoff[0] = static_cast<int>(pt.tx.i0 - bx0);
        sc.xoff[1] = static_cast<int>(pt.tx.i1 - bx0);
      }
      sc.init(pt.t);
      if (use_shared) {
        for (int64_t i = threadIdx.x; i < cells * a.C; i += blockDim.x) smem[i] = acc_t(0);
        __syncthreads();
      }
    }
    // Channel c of the scatter lands at cbase + c * cstride.
    const int64_t cstride = use_shared ? bnx * bny * bnz : slab;
    acc_t* cbase = !kScatter ? nullptr : use_shared ? smem : a.grad_grid_acc + n * a.C * slab;

    const scalar_t* go = a.grad_output + n * Cout * HW + pix;
    acc_t gg = acc_t(0);
    if (!a.apply) {
#pragma unroll 1
      for (int64_t c = 0; c < a.C; ++c) {
        acc_t v, dv;
        sample_channel(a, pt.t, n, c, v, dv);
        const acc_t g = valid ? ldg(go + c * HW) : acc_t(0);
        gg += g * dv;
        if (kScatter) sc.add(cbase + c * cstride, pt.t, g, lane);
      }
    } else {
      const scalar_t* in = a.input + n * a.Ci * HW + pix;
#pragma unroll 1
      for (int64_t i = 0; i < a.stride; ++i) {
        const bool is_offset = i == a.Ci;  // only when has_offset
        const acc_t xin = is_offset ? acc_t(1) : (valid ? ldg(in + i * HW) : acc_t(0));
        acc_t gin = acc_t(0);
#pragma unroll 1
        for (int64_t o = 0; o < a.Co; ++o) {
          const int64_t c = affine_channel(o, i, a.stride);
          acc_t v, dv;
          sample_channel(a, pt.t, n, c, v, dv);
          const acc_t g = valid ? ldg(go + o * HW) : acc_t(0);
          gin += g * v;
          gg += g * (dv * xin);
          if (kScatter) sc.add(cbase + c * cstride, pt.t, g * xin, lane);
        }
        if (!is_offset && valid)
          a.grad_input[(n * a.Ci + i) * HW + pix] = static_cast<scalar_t>(gin);
      }
    }
    if (valid) a.grad_guide[n * HW + pix] = static_cast<scalar_t>(gg * zscale);

    if (kScatter && use_shared) {
      __syncthreads();
      const int64_t cells = bnx * bny * bnz;
      acc_t* out = a.grad_grid_acc + n * a.C * slab;
      for (int64_t i = threadIdx.x; i < cells * a.C; i += blockDim.x) {
        const acc_t v = smem[i];
        if (v != acc_t(0)) {  // NaN too
          int64_t r = i;
          const int64_t cx = r % bnx;
          r /= bnx;
          const int64_t cy = r % bny;
          r /= bny;
          const int64_t cz = r % bnz;
          const int64_t c = r / bnz;
          atomicAdd(out + c * slab + ((bz0 + cz) * a.Gh + (by0 + cy)) * a.Gw + (bx0 + cx), v);
        }
      }
    }
    if (kScatter) __syncthreads();  // smem and s_zlo/s_zhi are reused by the next tile
  }
}

// ---------------------------------------------------------------------------------------------
// Deterministic grad_grid: one thread per grid cell, gathering its pixels in a fixed order.

// Weight of cell k in the taps (both taps may be the same edge cell).
template <typename acc_t>
__device__ __forceinline__ acc_t cell_weight(const AxisTaps<acc_t>& t, int64_t k) {
  return (t.i0 == k ? t.w0 : acc_t(0)) + (t.i1 == k ? t.w1 : acc_t(0));
}

// Pixels along an n-pixel axis that may touch cell k of G: gx = (p + 0.5) G / n within
// [k - 0.5, k + 1.5), widened by one pixel each side; the edge cells extend to the image border.
__device__ __forceinline__ void pixel_range(int64_t k, int64_t n, int64_t G, int64_t& lo,
                                            int64_t& hi) {
  const double scale = static_cast<double>(n) / static_cast<double>(G);
  const double a = (static_cast<double>(k) - 0.5) * scale - 0.5;
  const double b = (static_cast<double>(k) + 1.5) * scale - 0.5;
  lo = k == 0 ? 0 : static_cast<int64_t>(floor(a)) - 1;
  hi = k == G - 1 ? n - 1 : static_cast<int64_t>(ceil(b)) + 1;
  lo = lo < 0 ? 0 : lo;
  hi = hi > n - 1 ? n - 1 : hi;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) grad_grid_gather_kernel(const SliceArgs<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t HW = a.H * a.W;
  const int64_t total = a.N * a.C * a.D * a.Gh * a.Gw;
  const acc_t zscale = static_cast<acc_t>(a.D);
  const int64_t Cout = a.apply ? a.Co : a.C;
  // z fastest, then channel: neighbouring threads read the same pixels.
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t r = idx;
    const int64_t z = r % a.D;
    r /= a.D;
    const int64_t c = r % a.C;
    r /= a.C;
    const int64_t xc = r % a.Gw;
    r /= a.Gw;
    const int64_t yc = r % a.Gh;
    const int64_t n = r / a.Gh;

    // Value channel of the scattered quantity.
    const scalar_t* gplane;
    const scalar_t* iplane = nullptr;
    if (!a.apply) {
      gplane = a.grad_output + (n * Cout + c) * HW;
    } else {
      const int64_t o = c / a.stride, i = c - o * a.stride;
      gplane = a.grad_output + (n * Cout + o) * HW;
      if (i < a.Ci) iplane = a.input + (n * a.Ci + i) * HW;
    }
    const scalar_t* guide = a.guide + n * HW;

    int64_t xlo, xhi, ylo, yhi;
    pixel_range(xc, a.W, a.Gw, xlo, xhi);
    pixel_range(yc, a.H, a.Gh, ylo, yhi);
    acc_t sum = acc_t(0);
    for (int64_t y = ylo; y <= yhi; ++y) {
      const AxisTaps<acc_t> ty = image_taps<acc_t>(y, a.H, a.Gh);
      const acc_t wy = cell_weight(ty, yc);
      if (wy == acc_t(0)) continue;
      for (int64_t x = xlo; x <= xhi; ++x) {
        const AxisTaps<acc_t> tx = image_taps<acc_t>(x, a.W, a.Gw);
        const acc_t wx = cell_weight(tx, xc);
        if (wx == acc_t(0)) continue;
        const int64_t p = y * a.W + x;
        const AxisTaps<acc_t> tz = axis_taps(ldg(guide + p) * zscale, a.D);
        const acc_t wz = cell_weight(tz, z);
        if (wz == acc_t(0)) continue;
        acc_t v = ldg(gplane + p);
        if (iplane != nullptr) v *= ldg(iplane + p);
        sum += (wz * wy * wx) * v;
      }
    }
    a.grad_grid[(((n * a.C + c) * a.D + z) * a.Gh + yc) * a.Gw + xc] = static_cast<scalar_t>(sum);
  }
}

// ---------------------------------------------------------------------------------------------
// Launchers.

unsigned int blocks_for(int64_t work, int64_t per_block) {
  const int64_t b = (work + per_block - 1) / per_block;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(b, kMaxBlocks)));
}

template <typename scalar_t>
SliceArgs<scalar_t> make_args(const at::Tensor& grid, const at::Tensor& guide) {
  SliceArgs<scalar_t> a{};
  a.grid = grid.data_ptr<scalar_t>();
  a.guide = guide.data_ptr<scalar_t>();
  a.N = grid.size(0);
  a.C = grid.size(1);
  a.D = grid.size(2);
  a.Gh = grid.size(3);
  a.Gw = grid.size(4);
  a.H = guide.size(1);
  a.W = guide.size(2);
  return a;
}

template <typename scalar_t>
void set_apply(SliceArgs<scalar_t>& a, const at::Tensor& input, bool has_offset) {
  a.apply = true;
  a.has_offset = has_offset;
  a.Ci = input.size(1);
  a.stride = affine_stride(a.Ci, has_offset);
  a.Co = a.C / a.stride;
  a.input = input.data_ptr<scalar_t>();
}

// The vectorised path handles float opmath types with at most 8 coefficients per output row;
// float64 grids and wider affine rows take the scalar kernel.
template <typename scalar_t>
void launch_forward(SliceArgs<scalar_t>& a, const at::Tensor& grid) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t pixels = a.N * a.H * a.W;
  constexpr bool kFloatMath = std::is_same<at::opmath_type<scalar_t>, float>::value;
  const int64_t row_stride = a.apply ? a.stride : 4;
  if (!kFloatMath || row_stride > 8) {
    slice_forward_kernel<scalar_t><<<blocks_for(pixels, kThreads), kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  if constexpr (kFloatMath) {
    const int chunks = row_stride > 4 ? 2 : 1;
    a.rows = a.apply ? a.Co : (a.C + 3) / 4;
    const int64_t row_len = 4 * chunks;
    const int64_t packed_len = a.N * a.D * a.Gh * a.Gw * a.rows * row_len;
    at::Tensor packed = at::empty({packed_len}, grid.options().dtype(at::kFloat));
    pack_grid_kernel<scalar_t><<<blocks_for(packed_len, kThreads), kThreads, 0, stream>>>(
        a, row_len, packed.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    a.packed = reinterpret_cast<const float4*>(packed.data_ptr<float>());
    if (chunks == 1) {
      slice_forward_vec_kernel<scalar_t, 1>
          <<<blocks_for(pixels, kThreads), kThreads, 0, stream>>>(a);
    } else {
      slice_forward_vec_kernel<scalar_t, 2>
          <<<blocks_for(pixels, kThreads), kThreads, 0, stream>>>(a);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Largest cell box a 32x8 tile can touch along one axis (a safe over-estimate; the kernel checks
// the actual box against the capacity anyway).
int64_t max_cells(int64_t tile, int64_t n, int64_t G) {
  const int64_t span = (tile * G + n - 1) / n + 3;
  return std::min<int64_t>(G, span);
}

// grad_grid: fills a.grad_grid (gather) or a.grad_grid_acc (scatter) and the per-pixel grads.
template <typename scalar_t>
at::Tensor launch_backward(SliceArgs<scalar_t>& a, const at::Tensor& grid) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t tiles = a.N * ((a.H + kTileH - 1) / kTileH) * ((a.W + kTileW - 1) / kTileW);
  if (at::globalContext().deterministicAlgorithms()) {
    at::Tensor grad_grid = at::empty(grid.sizes(), grid.options());
    a.grad_grid = grad_grid.data_ptr<scalar_t>();
    slice_backward_kernel<scalar_t, false><<<blocks_for(tiles, 1), kTileThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t cells = a.N * a.C * a.D * a.Gh * a.Gw;
    grad_grid_gather_kernel<scalar_t><<<blocks_for(cells, kThreads), kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return grad_grid;
  }
  at::Tensor acc =
      at::zeros(grid.sizes(), grid.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  a.grad_grid_acc = acc.data_ptr<acc_t>();
  const int64_t want = a.C * max_cells(kTileW, a.W, a.Gw) * max_cells(kTileH, a.H, a.Gh) * a.D;
  a.shared_cap = std::min<int64_t>(want, kMaxSharedBytes / static_cast<int64_t>(sizeof(acc_t)));
  const size_t shmem = static_cast<size_t>(a.shared_cap) * sizeof(acc_t);
  slice_backward_kernel<scalar_t, true><<<blocks_for(tiles, 1), kTileThreads, shmem, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return acc.scalar_type() == grid.scalar_type() ? acc : acc.to(grid.scalar_type());
}

// ---------------------------------------------------------------------------------------------
// Ops.

at::Tensor slice_forward(const at::Tensor& grid_in, const at::Tensor& guide_in) {
  check_grid_guide(grid_in, guide_in);
  const int64_t N = guide_in.size(0), H = guide_in.size(1), W = guide_in.size(2);
  const int64_t C = grid_in.size(1);
  if (guide_in.numel() == 0) return at::zeros({N, C, H, W}, grid_in.options());
  const c10::cuda::CUDAGuard device_guard(grid_in.device());
  const at::Tensor grid = grid_in.contiguous();
  const at::Tensor guide = guide_in.contiguous();
  at::Tensor out = at::empty({N, C, H, W}, grid.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grid.scalar_type(),
                                  "bilateral_slice_cuda", [&] {
                                    SliceArgs<scalar_t> a = make_args<scalar_t>(grid, guide);
                                    a.output = out.data_ptr<scalar_t>();
                                    launch_forward(a, grid);
                                  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> slice_backward(const at::Tensor& grad_output_in,
                                                  const at::Tensor& grid_in,
                                                  const at::Tensor& guide_in) {
  check_grid_guide(grid_in, guide_in);
  const int64_t N = guide_in.size(0), H = guide_in.size(1), W = guide_in.size(2);
  const int64_t C = grid_in.size(1);
  check_grad_output(grad_output_in, grid_in, {N, C, H, W});
  if (guide_in.numel() == 0)
    return {at::zeros(grid_in.sizes(), grid_in.options()),
            at::zeros(guide_in.sizes(), guide_in.options())};
  const c10::cuda::CUDAGuard device_guard(grid_in.device());
  const at::Tensor grid = grid_in.contiguous();
  const at::Tensor guide = guide_in.contiguous();
  const at::Tensor go = grad_output_in.contiguous();
  at::Tensor grad_guide = at::empty({N, H, W}, guide.options());
  at::Tensor grad_grid;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grid.scalar_type(),
                                  "bilateral_slice_backward_cuda", [&] {
                                    SliceArgs<scalar_t> a = make_args<scalar_t>(grid, guide);
                                    a.grad_output = go.data_ptr<scalar_t>();
                                    a.grad_guide = grad_guide.data_ptr<scalar_t>();
                                    grad_grid = launch_backward(a, grid);
                                  });
  return {grad_grid, grad_guide};
}

at::Tensor slice_apply_forward(const at::Tensor& grid_in, const at::Tensor& guide_in,
                               const at::Tensor& input_in, bool has_offset) {
  check_slice_apply(grid_in, guide_in, input_in, has_offset);
  const int64_t N = guide_in.size(0), H = guide_in.size(1), W = guide_in.size(2);
  const int64_t Co = grid_in.size(1) / affine_stride(input_in.size(1), has_offset);
  if (guide_in.numel() == 0) return at::zeros({N, Co, H, W}, input_in.options());
  const c10::cuda::CUDAGuard device_guard(grid_in.device());
  const at::Tensor grid = grid_in.contiguous();
  const at::Tensor guide = guide_in.contiguous();
  const at::Tensor input = input_in.contiguous();
  at::Tensor out = at::empty({N, Co, H, W}, input.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grid.scalar_type(),
                                  "bilateral_slice_apply_cuda", [&] {
                                    SliceArgs<scalar_t> a = make_args<scalar_t>(grid, guide);
                                    set_apply(a, input, has_offset);
                                    a.output = out.data_ptr<scalar_t>();
                                    launch_forward(a, grid);
                                  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> slice_apply_backward(
    const at::Tensor& grad_output_in, const at::Tensor& grid_in, const at::Tensor& guide_in,
    const at::Tensor& input_in, bool has_offset) {
  check_slice_apply(grid_in, guide_in, input_in, has_offset);
  const int64_t N = guide_in.size(0), H = guide_in.size(1), W = guide_in.size(2);
  const int64_t Co = grid_in.size(1) / affine_stride(input_in.size(1), has_offset);
  check_grad_output(grad_output_in, grid_in, {N, Co, H, W});
  if (guide_in.numel() == 0) {
    return {at::zeros(grid_in.sizes(), grid_in.options()),
            at::zeros(guide_in.sizes(), guide_in.options()),
            at::zeros(input_in.sizes(), input_in.options())};
  }
  const c10::cuda::CUDAGuard device_guard(grid_in.device());
  const at::Tensor grid = grid_in.contiguous();
  const at::Tensor guide = guide_in.contiguous();
  const at::Tensor input = input_in.contiguous();
  const at::Tensor go = grad_output_in.contiguous();
  at::Tensor grad_guide = at::empty({N, H, W}, guide.options());
  at::Tensor grad_input = at::empty(input.sizes(), input.options());
  at::Tensor grad_grid;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grid.scalar_type(),
                                  "bilateral_slice_apply_backward_cuda", [&] {
                                    SliceArgs<scalar_t> a = make_args<scalar_t>(grid, guide);
                                    set_apply(a, input, has_offset);
                                    a.grad_output = go.data_ptr<scalar_t>();
                                    a.grad_guide = grad_guide.data_ptr<scalar_t>();
                                    a.grad_input = grad_input.data_ptr<scalar_t>();
                                    grad_grid = launch_backward(a, grid);
                                  });
  return {grad_grid, grad_guide, grad_input};
}

}  // namespace
}  // namespace cuda
}  // namespace bilateral_ops

TORCH_LIBRARY_IMPL(bilateral_ops, CUDA, m) {
  m.impl("bilateral_slice", &bilateral_ops::cuda::slice_forward);
  m.impl("_bilateral_slice_backward", &bilateral_ops::cuda::slice_backward);
  m.impl("bilateral_slice_apply", &bilateral_ops::cuda::slice_apply_forward);
  m.impl("_bilateral_slice_apply_backward", &bilateral_ops::cuda::slice_apply_backward);
}
