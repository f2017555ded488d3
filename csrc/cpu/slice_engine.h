#pragma once
// CPU engine shared by bilateral_slice and bilateral_slice_apply (and, later, grid_splat: the
// splat half below is the adjoint of the slice half).
//
// Work is organised so that the hot loops run over pixels, contiguously, and vectorise:
//  * y is constant along an image row, so each row first blends its two grid rows into a row
//    table R[xcell][z][c] (the grid is pre-transposed to (N, Gh, Gw, D, C) to make that blend one
//    contiguous axpy).
//  * x cells and weights do not depend on the row: they are computed once per call, and columns
//    sharing the same pair of x cells form a "segment".
//  * inside a segment, pixels are processed in blocks of kBlock. If the block's guide spans few z
//    levels (the usual case: guides are smooth), every pixel is interpolated densely over that z
//    span with tent weights, which is gather-free and vectorises across pixels. Otherwise (or when
//    the block is too short to fill a vector: fine grids) each pixel gathers its own two z cells.
// Per-pixel scratch lives in fixed-size stack arrays or in buffers allocated once per task.

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "bilateral_ops/affine.h"
#include "bilateral_ops/grid_coords.h"

#if defined(__GNUC__)
#define BO_ALWAYS_INLINE __attribute__((always_inline)) inline
#else
#define BO_ALWAYS_INLINE inline
#endif

// One build runs fast on any x86-64: GCC emits an AVX-512, an AVX2+FMA and a baseline copy of each
// task function and picks one at load time.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(BO_NO_TARGET_CLONES)
#define BO_TARGET_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define BO_TARGET_CLONES
#endif

namespace bilateral_ops {
namespace cpu {

constexpr int64_t kBlock = 64;           // pixels per block: per-block arrays stay in L1
constexpr int64_t kDenseMaxSpan = 8;     // z levels beyond which per-pixel gathers are cheaper
constexpr int64_t kDenseMinPixels = 16;  // shorter blocks (fine grids) do not fill a vector

template <typename T>
struct SliceParams {
  int64_t N, C, D, Gh, Gw, H, W;
  // slice_apply only
  bool apply, has_offset;
  int64_t Ci, Co, stride;
  // x geometry, shared by all rows
  const T* wx0;              // (W,) weight of the segment's first cell
  const T* wx1;              // (W,)
  const int64_t* seg_begin;  // (nseg + 1,) first column of each segment
  const int64_t* seg_c0;     // (nseg,) first x cell of each segment
  const int64_t* seg_c1;     // (nseg,)
  int64_t nseg;
  // tensors, all contiguous
  const T* grid_t;       // (N, Gh, Gw, D, C)
  const T* guide;        // (N, H, W)
  const T* input;        // (N, Ci, H, W), apply only
  const T* grad_output;  // (N, C or Co, H, W), backward only
  T* output;             // forward
  T* grad_guide;         // backward, (N, H, W)
  T* grad_input;         // backward, apply only
  int64_t row_table_size() const { return Gw * D * C; }
};

template <typename T>
struct BlockZ {
  T gc[kBlock];     // z position clamped to [0.5, D - 0.5]
  T slope[kBlock];  // d gc / d gz
  int64_t z0[kBlock], z1[kBlock];
  T wz0[kBlock], wz1[kBlock];
  int64_t zlo, zhi;
  bool dense;
};

template <typename T>
BO_ALWAYS_INLINE void block_z(const T* guide, int64_t nb, int64_t D, BlockZ<T>& bz) {
  int64_t zlo = D, zhi = -1;
  const T scale = static_cast<T>(D);
  for (int64_t j = 0; j < nb; ++j) {
    const T gz = guide[j] * scale;
    const AxisTaps<T> t = axis_taps(gz, D);
    bz.gc[j] = clamp_grid_coord(gz, D);
    bz.slope[j] = t.slope;
    bz.z0[j] = t.i0;
    bz.z1[j] = t.i1;
    bz.wz0[j] = t.w0;
    bz.wz1[j] = t.w1;
    zlo = std::min(zlo, t.i0);
    zhi = std::max(zhi, t.i1);
  }
  bz.zlo = zlo;
  bz.zhi = zhi;
  bz.dense = (zhi - zlo + 1) <= kDenseMaxSpan && nb >= kDenseMinPixels;
}

// R = wy0 * grid_t[y0] + wy1 * grid_t[y1] over one (Gw, D, C) plane.
template <typename T>
BO_ALWAYS_INLINE void build_row_table(const T* __restrict grid_n, const AxisTaps<T>& ty,
                                      int64_t plane, T* __restrict R) {
  const T* __restrict g0 = grid_n + ty.i0 * plane;
  const T* __restrict g1 = grid_n + ty.i1 * plane;
  const T w0 = ty.w0, w1 = ty.w1;
  for (int64_t i = 0; i < plane; ++i) R[i] = w0 * g0[i] + w1 * g1[i];
}

// A[c][j] = sample of channel c at pixel j; with kGrad also dA[c][j] = d sample / d gz.
template <typename T, bool kGrad>
BO_ALWAYS_INLINE void interp_block(const T* R, int64_t D, int64_t C, int64_t c0, int64_t c1,
                                   const T* __restrict wx0, const T* __restrict wx1,
                                   const BlockZ<T>& bz, int64_t nb, T* __restrict A,
                                   T* __restrict dA) {
  if (bz.dense) {
    for (int64_t c = 0; c < C; ++c) {  // only the nb live columns: segments can be short
      std::fill(A + c * kBlock, A + c * kBlock + nb, T(0));
      if (kGrad) std::fill(dA + c * kBlock, dA + c * kBlock + nb, T(0));
    }
    for (int64_t k = bz.zlo; k <= bz.zhi; ++k) {
      T u0[kBlock], u1[kBlock], du0[kBlock], du1[kBlock];
      for (int64_t j = 0; j < nb; ++j) {
        const T w = tent_weight(bz.gc[j], k);
        u0[j] = w * wx0[j];
        u1[j] = w * wx1[j];
        if (kGrad) {
          const T s = tent_weight_slope(bz.gc[j], k) * bz.slope[j];
          du0[j] = s * wx0[j];
          du1[j] = s * wx1[j];
        }
      }
      const T* p0 = R + (c0 * D + k) * C;
      const T* p1 = R + (c1 * D + k) * C;
      for (int64_t c = 0; c < C; ++c) {
        const T s0 = p0[c], s1 = p1[c];
        T* __restrict a = A + c * kBlock;
        for (int64_t j = 0; j < nb; ++j) a[j] += u0[j] * s0 + u1[j] * s1;
        if (kGrad) {
          T* __restrict da = dA + c * kBlock;
          for (int64_t j = 0; j < nb; ++j) da[j] += du0[j] * s0 + du1[j] * s1;
        }
      }
    }
  } else {
    for (int64_t j = 0; j < nb; ++j) {
      const T* p00 = R + (c0 * D + bz.z0[j]) * C;
      const T* p01 = R + (c0 * D + bz.z1[j]) * C;
      const T* p10 = R + (c1 * D + bz.z0[j]) * C;
      const T* p11 = R + (c1 * D + bz.z1[j]) * C;
      const T a0 = wx0[j], a1 = wx1[j], b0 = bz.wz0[j], b1 = bz.wz1[j], s = bz.slope[j];
      for (int64_t c = 0; c < C; ++c) {
        A[c * kBlock + j] = a0 * (b0 * p00[c] + b1 * p01[c]) + a1 * (b0 * p10[c] + b1 * p11[c]);
        if (kGrad) dA[c * kBlock + j] = s * (a0 * (p01[c] - p00[c]) + a1 * (p11[c] - p10[c]));
      }
    }
  }
}

// The adjoint of interp_block: B[xcell][z][c] += sum_j weight(j, cell) * V[c][j], with V's
// channel c at V + c * vstride.
template <typename T>
BO_ALWAYS_INLINE void splat_block(const T* V, int64_t vstride, int64_t D, int64_t C, int64_t c0,
                                  int64_t c1, const T* __restrict wx0, const T* __restrict wx1,
                                  const BlockZ<T>& bz, int64_t nb, T* B) {
  if (bz.dense) {
    for (int64_t k = bz.zlo; k <= bz.zhi; ++k) {
      T u0[kBlock], u1[kBlock];
      for (int64_t j = 0; j < nb; ++j) {
        const T w = tent_weight(bz.gc[j], k);
        u0[j] = w * wx0[j];
        u1[j] = w * wx1[j];
      }
      T* q0 = B + (c0 * D + k) * C;  // q0 == q1 at the x border: accumulate one after the other
      T* q1 = B + (c1 * D + k) * C;
      for (int64_t c = 0; c < C; ++c) {
        const T* __restrict v = V + c * vstride;
        T s0 = 0, s1 = 0;
#pragma omp simd reduction(+ : s0, s1)
        for (int64_t j = 0; j < nb; ++j) {
          s0 += u0[j] * v[j];
          s1 += u1[j] * v[j];
        }
        q0[c] += s0;
        q1[c] += s1;
      }
    }
  } else {
    for (int64_t j = 0; j < nb; ++j) {
      T* q00 = B + (c0 * D + bz.z0[j]) * C;  // may alias each other at the borders
      T* q01 = B + (c0 * D + bz.z1[j]) * C;
      T* q10 = B + (c1 * D + bz.z0[j]) * C;
      T* q11 = B + (c1 * D + bz.z1[j]) * C;
      const T w00 = wx0[j] * bz.wz0[j], w01 = wx0[j] * bz.wz1[j];
      const T w10 = wx1[j] * bz.wz0[j], w11 = wx1[j] * bz.wz1[j];
      for (int64_t c = 0; c < C; ++c) {
        const T v = V[c * vstride + j];
        q00[c] += w00 * v;
        q01[c] += w01 * v;
        q10[c] += w10 * v;
        q11[c] += w11 * v;
      }
    }
  }
}

// Blocks are visited with plain loops, not lambdas, so that everything inlines into the
// target_clones task functions and is compiled for their instruction sets.
#define BO_FOR_EACH_BLOCK(p, BODY)                               \
  for (int64_t s_ = 0; s_ < (p).nseg; ++s_) {                    \
    const int64_t c0 = (p).seg_c0[s_], c1 = (p).seg_c1[s_];      \
    const int64_t end_ = (p).seg_begin[s_ + 1];                  \
    for (int64_t b = (p).seg_begin[s_]; b < end_; b += kBlock) { \
      const int64_t nb = std::min(kBlock, end_ - b);             \
      BODY;                                                      \
    }                                                            \
  }

// One block of the forward pass of row y of image n.
template <typename T>
BO_ALWAYS_INLINE void forward_block(const SliceParams<T>& p, const T* R, T* A, const T* guide,
                                    int64_t n, int64_t y, int64_t b, int64_t nb, int64_t c0,
                                    int64_t c1) {
  const int64_t HW = p.H * p.W;
  BlockZ<T> bz;
  block_z(guide + b, nb, p.D, bz);
  interp_block<T, false>(R, p.D, p.C, c0, c1, p.wx0 + b, p.wx1 + b, bz, nb, A, nullptr);
  if (!p.apply) {
    T* out = p.output + n * p.C * HW + y * p.W + b;
    for (int64_t c = 0; c < p.C; ++c) std::memcpy(out + c * HW, A + c * kBlock, nb * sizeof(T));
    return;
  }
  const T* in = p.input + n * p.Ci * HW + y * p.W + b;
  T* out = p.output + n * p.Co * HW + y * p.W + b;
  for (int64_t o = 0; o < p.Co; ++o) {
    T acc[kBlock];
    if (p.has_offset) {
      std::memcpy(acc, A + affine_channel(o, p.Ci, p.stride) * kBlock, nb * sizeof(T));
    } else {
      std::fill(acc, acc + nb, T(0));
    }
    for (int64_t i = 0; i < p.Ci; ++i) {
      const T* __restrict a = A + affine_channel(o, i, p.stride) * kBlock;
      const T* __restrict x = in + i * HW;
      for (int64_t j = 0; j < nb; ++j) acc[j] += a[j] * x[j];
    }
    std::memcpy(out + o * HW, acc, nb * sizeof(T));
  }
}

// Forward over image rows [r0, r1) of the flattened (N * H) row index.
// Scratch: R (row_table_size), A (C * kBlock).
template <typename T>
BO_ALWAYS_INLINE void forward_rows(const SliceParams<T>& p, int64_t r0, int64_t r1, T* R, T* A) {
  const int64_t plane = p.row_table_size();
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / p.H, y = r % p.H;
    const AxisTaps<T> ty = image_taps<T>(y, p.H, p.Gh);
    build_row_table(p.grid_t + n * p.Gh * plane, ty, plane, R);
    const T* guide = p.guide + r * p.W;
    BO_FOR_EACH_BLOCK(p, forward_block(p, R, A, guide, n, y, b, nb, c0, c1));
  }
}

// One block of the backward pass of row y of image n: grad_guide and grad_input are written
// per pixel, the grid gradient is splatted into the row buffer B.
template <typename T>
BO_ALWAYS_INLINE void backward_block(const SliceParams<T>& p, const T* R, T* B, T* A, T* dA, T* V,
                                     const T* guide, T* grad_guide, int64_t n, int64_t y, int64_t b,
                                     int64_t nb, int64_t c0, int64_t c1) {
  const int64_t HW = p.H * p.W;
  const int64_t Cout = p.apply ? p.Co : p.C;
  const T zscale = static_cast<T>(p.D);  // d gz / d guide
  BlockZ<T> bz;
  block_z(guide + b, nb, p.D, bz);
  interp_block<T, true>(R, p.D, p.C, c0, c1, p.wx0 + b, p.wx1 + b, bz, nb, A, dA);
  const T* go = p.grad_output + n * Cout * HW + y * p.W + b;
  T gg[kBlock];
  std::fill(gg, gg + nb, T(0));
  if (!p.apply) {
    for (int64_t c = 0; c < p.C; ++c) {
      const T* __restrict g = go + c * HW;
      const T* __restrict da = dA + c * kBlock;
      for (int64_t j = 0; j < nb; ++j) gg[j] += g[j] * da[j];
    }
    for (int64_t j = 0; j < nb; ++j) grad_guide[b + j] = gg[j] * zscale;
    splat_block(go, HW, p.D, p.C, c0, c1, p.wx0 + b, p.wx1 + b, bz, nb, B);
    return;
  }
  const T* in = p.input + n * p.Ci * HW + y * p.W + b;
  T* gin = p.grad_input + n * p.Ci * HW + y * p.W + b;
  for (int64_t i = 0; i < p.Ci; ++i) {
    T acc[kBlock];
    std::fill(acc, acc + nb, T(0));
    for (int64_t o = 0; o < p.Co; ++o) {
      const T* __restrict g = go + o * HW;
      const T* __restrict a = A + affine_channel(o, i, p.stride) * kBlock;
      for (int64_t j = 0; j < nb; ++j) acc[j] += g[j] * a[j];
    }
    std::memcpy(gin + i * HW, acc, nb * sizeof(T));
  }
  for (int64_t o = 0; o < p.Co; ++o) {
    const T* __restrict g = go + o * HW;
    T t[kBlock];
    if (p.has_offset) {
      std::memcpy(t, dA + affine_channel(o, p.Ci, p.stride) * kBlock, nb * sizeof(T));
      std::memcpy(V + affine_channel(o, p.Ci, p.stride) * kBlock, g, nb * sizeof(T));
    } else {
      std::fill(t, t + nb, T(0));
    }
    for (int64_t i = 0; i < p.Ci; ++i) {
      const T* __restrict da = dA + affine_channel(o, i, p.stride) * kBlock;
      const T* __restrict x = in + i * HW;
      T* __restrict v = V + affine_channel(o, i, p.stride) * kBlock;
      for (int64_t j = 0; j < nb; ++j) {
        t[j] += da[j] * x[j];
        v[j] = g[j] * x[j];
      }
    }
    for (int64_t j = 0; j < nb; ++j) gg[j] += g[j] * t[j];
  }
  for (int64_t j = 0; j < nb; ++j) grad_guide[b + j] = gg[j] * zscale;
  splat_block(V, kBlock, p.D, p.C, c0, c1, p.wx0 + b, p.wx1 + b, bz, nb, B);
}

// Backward over rows [y0, y1) of image n. Gacc holds grid rows [band_lo, ...) of a
// (Gh, Gw, D, C) grid gradient: only the band of grid rows that these image rows touch. It is
// accumulated in double so that the sum over many pixels keeps float32 grids accurate.
// Scratch: R and B (row_table_size), A, dA and V (C * kBlock).
template <typename T>
BO_ALWAYS_INLINE void backward_rows(const SliceParams<T>& p, int64_t n, int64_t y0, int64_t y1,
                                    double* Gacc, int64_t band_lo, T* R, T* B, T* A, T* dA, T* V) {
  const int64_t plane = p.row_table_size();
  const int64_t HW = p.H * p.W;
  for (int64_t y = y0; y < y1; ++y) {
    const AxisTaps<T> ty = image_taps<T>(y, p.H, p.Gh);
    build_row_table(p.grid_t + n * p.Gh * plane, ty, plane, R);
    std::fill(B, B + plane, T(0));
    const T* guide = p.guide + n * HW + y * p.W;
    T* grad_guide = p.grad_guide + n * HW + y * p.W;
    BO_FOR_EACH_BLOCK(p, backward_block(p, R, B, A, dA, V, guide, grad_guide, n, y, b, nb, c0, c1));
    double* __restrict g0 = Gacc + (ty.i0 - band_lo) * plane;
    const double w0 = ty.w0;
    for (int64_t i = 0; i < plane; ++i) g0[i] += w0 * static_cast<double>(B[i]);
    double* __restrict g1 = Gacc + (ty.i1 - band_lo) * plane;
    const double w1 = ty.w1;
    for (int64_t i = 0; i < plane; ++i) g1[i] += w1 * static_cast<double>(B[i]);
  }
}

}  // namespace cpu
}  // namespace bilateral_ops
