#pragma once
// CPU engine of bilateral_slice (kApply = false) and bilateral_slice_apply (kApply = true); the
// splat half below is the adjoint of the slice half, which grid_splat will reuse.
//
// Work is organised so that the hot loops run over pixels, contiguously, in short vectors
// (simd.h):
//  * y is constant along an image row, so each row first blends its two grid rows into a row
//    table R[xcell][z][c] (the grid is pre-transposed to (N, Gh, Gw, D, C) to make that blend one
//    contiguous axpy).
//  * x cells and weights do not depend on the row: they are computed once per call, and columns
//    sharing the same pair of x cells form a "segment".
//  * inside a segment, pixels are processed in blocks of at most kBlock. Every per-pixel row a
//    block reads (weights, input, grad_output) is first copied into block buffers padded with
//    zeros to whole vectors, so the vector loops need no tails and never read past a row.
//  * if the block's guide spans at most kDenseMaxSpan z levels (smooth guides, and any guide when
//    D is small), every pixel is interpolated densely over that span with tent weights: no
//    gathers, all vector FMAs. Otherwise (or when the block is too short to fill vectors: fine
//    grids) each pixel gathers its own two z cells.
// kDguide swaps the tent weights along z for their slopes times D: the same code then computes
// the derivative of the slice with respect to the guide (used for second derivatives).
// Scratch lives in fixed-size stack arrays or in buffers allocated once per task.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "bilateral_ops/affine.h"
#include "bilateral_ops/bilateral_grid_filter.h"
#include "bilateral_ops/grid_coords.h"
#include "bilateral_ops/slice_geometry.h"
#include "simd.h"

namespace bilateral_ops {
namespace cpu {

constexpr int64_t kBlock = 64;           // pixels per block: per-block arrays stay in L1
constexpr int64_t kDenseMaxSpan = 8;     // z levels beyond which per-pixel gathers are cheaper
constexpr int64_t kDenseMinPixels = 8;  // shorter blocks fill too little of a vector pair
// Vectors processed together in the vector loops: independent accumulator chains hide the FMA
// latency. Blocks long enough for the dense path are padded to a multiple of kUnroll vectors.
constexpr int64_t kUnroll = 4;

// Column geometry shared by all rows (see XGeometry in slice_runner.h).
template <typename T>
struct ColumnTaps {
  const T* wx0;              // (W,) weight of the segment's first cell
  const T* wx1;              // (W,)
  const int64_t* seg_begin;  // (nseg + 1,) first column of each segment
  const int64_t* seg_c0;     // (nseg,) first x cell of each segment
  const int64_t* seg_c1;     // (nseg,)
  int64_t nseg;
};

// Everything one forward or backward call reads and writes; tensors are contiguous.
template <typename T>
struct SliceParams {
  SliceGeometry g;
  AffineLayout l;  // slice_apply only
  ColumnTaps<T> x;
  const T* grid_t;       // (N, Gh, Gw, D, C), the engine's
  const T* grid;         // (N, C, D, Gh, Gw), the per-pixel path's (slice_direct.h)
  bool direct;           // the per-pixel path serves the call
  const T* guide;        // (N, H, W)
  const T* input;        // (N, Ci, H, W), slice_apply only
  const T* grad_output;  // (N, C or Co, H, W), backward only
  T* output;             // forward
  T* grad_guide;         // backward, (N, H, W), when need_guide
  T* grad_input;         // backward, slice_apply only, when need_input
  bool need_grid, need_guide, need_input;
  // bilateral_grid_filter's fused steps (slice only, never with kApply):
  //  * ones_channel (backward): grad_output holds C - 1 channels and a last channel of ones is
  //    implied, so the filter's splat of [input, 1] needs no concatenated copy;
  //  * normalize (forward): output holds C - 1 channels, samples divided by the last one (at
  //    least kMinGridWeight), so the filter's division needs no pass of its own.
  bool ones_channel, normalize;
  int64_t row_table_size() const { return g.Gw * g.D * g.C; }
};

// Per-task block buffers (TaskScratch in slice_runner.h allocates them, C * kBlock each).
template <typename T>
struct Scratch {
  T* A;    // samples, channel c at A + c * kBlock
  T* dA;   // d sample / d gz (backward)
  T* V;    // values splatted into the grid gradient (backward)
  T* X;    // input rows (Ci * kBlock), slice_apply
  T* G;    // grad_output rows (Cout * kBlock), backward
  T* OUT;  // output rows (Cout * kBlock or Ci * kBlock for grad_input)
};

// Per-pixel z state of a block, padded with neutral values (x weights 0) to whole vector groups.
template <typename T>
struct BlockZ {
  alignas(32) T wx0[kBlock];
  alignas(32) T wx1[kBlock];
  alignas(32) T gc[kBlock];     // z position clamped to [0.5, D - 0.5]
  alignas(32) T slope[kBlock];  // d gc / d gz; with kDguide, times D (the scale of the slopes)
  alignas(32) T wz0[kBlock];    // weights of z0 and z1 (slopes with kDguide)
  alignas(32) T wz1[kBlock];
  alignas(32) int32_t z0[kBlock];
  alignas(32) int32_t z1[kBlock];
  int64_t zlo, zhi;
  int64_t nb, nv;  // live pixels, vectors covering them (even when the block may be dense)
  bool dense;
};

template <typename T, bool kDguide>
BO_ALWAYS_INLINE void block_z(const T* guide, const T* wx0, const T* wx1, int64_t nb, int64_t D,
                              bool align_corners, bool allow_dense, BlockZ<T>& bz) {
  using V = vec_t<T>;
  using I = ivec_t<T>;
  constexpr int64_t W = vec_width<T>();
  static_assert(kBlock % (kUnroll * W) == 0, "blocks are whole groups of vectors");
  bz.nb = nb;
  // Blocks that may take the dense path cover whole groups of kUnroll vectors, or of two when
  // they are shorter (fine grids: segments of 8-32 pixels), so that they do not pay for three
  // quarters of padding; the dense loops work on vector pairs. Other blocks take what they need.
  const bool may_be_dense = allow_dense && nb >= kDenseMinPixels;
  const int64_t need = (nb + W - 1) / W;
  const int64_t group = need >= kUnroll ? kUnroll : 2;
  bz.nv = may_be_dense ? (need + group - 1) / group * group : need;
  const int64_t padded = bz.nv * W;
  // Padding columns repeat the first pixel's guide (the z span is unchanged) with x weights 0.
  alignas(32) T gbuf[kBlock];
  for (int64_t j = 0; j < nb; ++j) {
    gbuf[j] = guide[j];
    bz.wx0[j] = wx0[j];
    bz.wx1[j] = wx1[j];
  }
  for (int64_t j = nb; j < padded; ++j) {
    gbuf[j] = guide[0];
    bz.wx0[j] = bz.wx1[j] = T(0);
  }
  const T scale = guide_scale<T>(D, align_corners);
  I lo = I{} + static_cast<int32_t>(D), hi = I{} - 1;
  for (int64_t v = 0; v < bz.nv; ++v) {
    const VecTaps<T> t = vguide_taps<T>(vload(gbuf + v * W), D, align_corners);
    vstore(bz.gc + v * W, t.gc);
    __builtin_memcpy(bz.z0 + v * W, &t.i0, sizeof(I));
    __builtin_memcpy(bz.z1 + v * W, &t.i1, sizeof(I));
    if (kDguide) {  // guide_taps with dguide: the weights become -/+ scale * slope
      const V sd = t.slope * scale;
      vstore(bz.slope + v * W, sd);
      vstore(bz.wz0 + v * W, -sd);
      vstore(bz.wz1 + v * W, sd);
    } else {
      vstore(bz.slope + v * W, t.slope);
      vstore(bz.wz0 + v * W, t.w0);
      vstore(bz.wz1 + v * W, t.w1);
    }
    lo = t.i0 < lo ? t.i0 : lo;
    hi = t.i1 > hi ? t.i1 : hi;
  }
  int64_t zlo = D, zhi = -1;
  for (int64_t l = 0; l < W; ++l) {
    zlo = std::min<int64_t>(zlo, lo[l]);
    zhi = std::max<int64_t>(zhi, hi[l]);
  }
  bz.zlo = zlo;
  bz.zhi = zhi;
  bz.dense = (zhi - zlo + 1) <= kDenseMaxSpan && may_be_dense;
}

// (Whole vectors first, then the tail: small library memcpy calls cost more than the copy.)
template <typename T>
BO_ALWAYS_INLINE void load_rows(const T* src, int64_t stride, int64_t rows, const BlockZ<T>& bz,
                                T* buf) {
  constexpr int64_t W = vec_width<T>();
  const int64_t full = bz.nb / W * W, padded = bz.nv * W;
  for (int64_t r = 0; r < rows; ++r) {
    const T* from = src + r * stride;
    T* to = buf + r * kBlock;
    for (int64_t j = 0; j < full; j += W) vstore(to + j, vload(from + j));
    for (int64_t j = full; j < bz.nb; ++j) to[j] = from[j];
    for (int64_t j = bz.nb; j < padded; ++j) to[j] = T(0);
  }
}

template <typename T>
BO_ALWAYS_INLINE void store_rows(const T* buf, int64_t rows, const BlockZ<T>& bz, T* dst,
                                 int64_t stride) {
  constexpr int64_t W = vec_width<T>();
  const int64_t full = bz.nb / W * W;
  for (int64_t r = 0; r < rows; ++r) {
    const T* from = buf + r * kBlock;
    T* to = dst + r * stride;
    for (int64_t j = 0; j < full; j += W) vstore(to + j, vload(from + j));
    for (int64_t j = full; j < bz.nb; ++j) to[j] = from[j];
  }
}

// Dense z weights of the block: U0[k][j] = w(j, zlo + k) * wx0[j], U1 likewise with wx1, and the
// slopes DU0 / DU1 with kGrad. w is the tent (its slope times D with kDguide).
template <typename T>
struct DenseWeights {
  alignas(32) T U0[kDenseMaxSpan][kBlock];
  alignas(32) T U1[kDenseMaxSpan][kBlock];
  alignas(32) T DU0[kDenseMaxSpan][kBlock];
  alignas(32) T DU1[kDenseMaxSpan][kBlock];
};

template <typename T, bool kDguide, bool kGrad>
BO_ALWAYS_INLINE void dense_weights(const BlockZ<T>& bz, DenseWeights<T>& dw) {
  using V = vec_t<T>;
  constexpr int64_t W = vec_width<T>();
  for (int64_t k = 0; k <= bz.zhi - bz.zlo; ++k) {
    const T kc = static_cast<T>(bz.zlo + k) + T(0.5);
    for (int64_t v = 0; v < bz.nv; ++v) {
      const V gc = vload(bz.gc + v * W);
      const V wx0 = vload(bz.wx0 + v * W), wx1 = vload(bz.wx1 + v * W);
      const V w = kDguide ? vtent_slope(gc, kc) * vload(bz.slope + v * W) : vtent(gc, kc);
      vstore(dw.U0[k] + v * W, w * wx0);
      vstore(dw.U1[k] + v * W, w * wx1);
      if (kGrad) {
        const V s = vtent_slope(gc, kc) * vload(bz.slope + v * W);
        vstore(dw.DU0[k] + v * W, s * wx0);
        vstore(dw.DU1[k] + v * W, s * wx1);
      }
    }
  }
}

// The unsigned integer as wide as T (float or double).
template <typename T>
using BitsOf = typename std::conditional<sizeof(T) == 4, uint32_t, uint64_t>::type;

// 1 where x is a NaN or an infinity (every exponent bit set), else 0: an integer test, so that
// loops or-ing it vectorise (a float sum of x * 0 would not, its order being fixed).
template <typename T>
BO_ALWAYS_INLINE BitsOf<T> non_finite_bit(T x) {
  constexpr BitsOf<T> kExponent =
      sizeof(T) == 4 ? BitsOf<T>(0x7F800000u) : BitsOf<T>(0x7FF0000000000000ull);
  BitsOf<T> bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return static_cast<BitsOf<T>>((bits & kExponent) == kExponent);
}

template <typename T>
BO_ALWAYS_INLINE bool values_finite(const T* __restrict v, int64_t n) {
  BitsOf<T> bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= non_finite_bit(v[i]);
  return bad == 0;
}

// R = wy0 * grid_t[y0] + wy1 * grid_t[y1] over one (Gw, D, C) plane. Returns whether every entry
// is finite: the dense path weighs each pixel of a block against every cell of the block's span,
// most with weight 0, so one NaN or infinity there would reach the whole block. A row with one
// takes the per-pixel gathers, which read each pixel's eight corners only, as grid_sample does.
template <typename T>
BO_ALWAYS_INLINE bool build_row_table(const T* __restrict grid_n, const AxisTaps<T>& ty,
                                      int64_t plane, T* __restrict R) {
  const T* __restrict g0 = grid_n + ty.i0 * plane;
  const T* __restrict g1 = grid_n + ty.i1 * plane;
  const T w0 = ty.w0, w1 = ty.w1;
  BitsOf<T> bad = 0;
  for (int64_t i = 0; i < plane; ++i) {
    R[i] = w0 * g0[i] + w1 * g1[i];
    bad |= non_finite_bit(R[i]);
  }
  return bad == 0;
}

// Dense interpolation of channels [cbegin, cend) (a multiple of kCB of them): for each pixel
// vector, a = sum over the block's z span of U0[k] * R[c0][k][c] + U1[k] * R[c1][k][c].
template <typename T, bool kGrad, int64_t kCB>
BO_ALWAYS_INLINE void dense_interp(const T* R, int64_t D, int64_t C, int64_t c0, int64_t c1,
                                   const BlockZ<T>& bz, const DenseWeights<T>& dw, T* __restrict A,
                                   T* __restrict dA, int64_t cbegin, int64_t cend) {
  using V = vec_t<T>;
  constexpr int64_t W = vec_width<T>();
  constexpr int64_t kVB = kGrad ? 1 : 2;  // a dense block's nv is even
  const int64_t span = bz.zhi - bz.zlo + 1;
  const T* r0 = R + (c0 * D + bz.zlo) * C;  // level k, channel c at r0[k * C + c]
  const T* r1 = R + (c1 * D + bz.zlo) * C;
  for (int64_t cb = cbegin; cb < cend; cb += kCB) {
    for (int64_t v0 = 0; v0 < bz.nv; v0 += kVB) {
      V a[kCB][kVB] = {}, d[kCB][kVB] = {};
      for (int64_t k = 0; k < span; ++k) {
        V u0[kVB], u1[kVB], du0[kVB], du1[kVB];
        for (int64_t vb = 0; vb < kVB; ++vb) {
          const int64_t off = (v0 + vb) * W;
          u0[vb] = vload(dw.U0[k] + off);
          u1[vb] = vload(dw.U1[k] + off);
          if (kGrad) {
            du0[vb] = vload(dw.DU0[k] + off);
            du1[vb] = vload(dw.DU1[k] + off);
          }
        }
        for (int64_t ci = 0; ci < kCB; ++ci) {
          const T s0 = r0[k * C + cb + ci], s1 = r1[k * C + cb + ci];
          for (int64_t vb = 0; vb < kVB; ++vb) {
            a[ci][vb] += u0[vb] * s0;
            a[ci][vb] += u1[vb] * s1;
            if (kGrad) {
              d[ci][vb] += du0[vb] * s0;
              d[ci][vb] += du1[vb] * s1;
            }
          }
        }
      }
      for (int64_t ci = 0; ci < kCB; ++ci) {
        for (int64_t vb = 0; vb < kVB; ++vb) {
          vstore(A + (cb + ci) * kBlock + (v0 + vb) * W, a[ci][vb]);
          if (kGrad) vstore(dA + (cb + ci) * kBlock + (v0 + vb) * W, d[ci][vb]);
        }
      }
    }
  }
}

// A[c] = samples of channel c over the block; with kGrad also dA[c] = d sample / d gz. Whole
// vectors are written (zeros beyond nb).
template <typename T, bool kGrad>
BO_ALWAYS_INLINE void interp_block(const T* R, int64_t D, int64_t C, int64_t c0, int64_t c1,
                                   const BlockZ<T>& bz, const DenseWeights<T>& dw, T* __restrict A,
                                   T* __restrict dA) {
  constexpr int64_t W = vec_width<T>();
  if (bz.dense) {
    // Register blocks of kCB channels x kVB pixel vectors: each U weight load then serves kCB
    // channels, and the kCB * kVB (x2 with kGrad) accumulators are independent chains.
    if (C % 4 == 0) {
      dense_interp<T, kGrad, 4>(R, D, C, c0, c1, bz, dw, A, dA, 0, C);
    } else {
      dense_interp<T, kGrad, 1>(R, D, C, c0, c1, bz, dw, A, dA, 0, C);
    }
    return;
  }
  for (int64_t j = 0; j < bz.nb; ++j) {
    const T* p00 = R + (c0 * D + bz.z0[j]) * C;
    const T* p01 = R + (c0 * D + bz.z1[j]) * C;
    const T* p10 = R + (c1 * D + bz.z0[j]) * C;
    const T* p11 = R + (c1 * D + bz.z1[j]) * C;
    const T a0 = bz.wx0[j], a1 = bz.wx1[j], b0 = bz.wz0[j], b1 = bz.wz1[j], s = bz.slope[j];
    for (int64_t c = 0; c < C; ++c) {
      A[c * kBlock + j] = a0 * (b0 * p00[c] + b1 * p01[c]) + a1 * (b0 * p10[c] + b1 * p11[c]);
      if (kGrad) dA[c * kBlock + j] = s * (a0 * (p01[c] - p00[c]) + a1 * (p11[c] - p10[c]));
    }
  }
  const int64_t padded = bz.nv * W;
  for (int64_t c = 0; c < C; ++c) {
    std::fill(A + c * kBlock + bz.nb, A + c * kBlock + padded, T(0));
    if (kGrad) std::fill(dA + c * kBlock + bz.nb, dA + c * kBlock + padded, T(0));
  }
}

// The adjoint of interp_block: B[xcell][z][c] += sum_j weight(j, cell) * V[c][j] (V zero beyond
// nb, up to whole vectors).
template <typename T>
BO_ALWAYS_INLINE void splat_block(const T* Vb, int64_t D, int64_t C, int64_t c0, int64_t c1,
                                  const BlockZ<T>& bz, const DenseWeights<T>& dw, T* B) {
  using V = vec_t<T>;
  constexpr int64_t W = vec_width<T>();
  if (bz.dense) {
    const int64_t span = bz.zhi - bz.zlo + 1;
    // Channels in blocks of W/2: their sums for both x cells (W vectors of lane partials) are
    // reduced together by one transposing tree; leftover channels one at a time.
    constexpr int64_t CB = W / 2;
    const int64_t cfull = C / CB * CB;
    for (int64_t k = 0; k < span; ++k) {
      T* q0 = B + (c0 * D + bz.zlo + k) * C;  // q0 == q1 at the x border: add one after the other
      T* q1 = B + (c1 * D + bz.zlo + k) * C;
      const T* u0 = dw.U0[k];
      const T* u1 = dw.U1[k];
      for (int64_t c = 0; c < cfull; c += CB) {
        V acc[W] = {};  // acc[ci]: cell c0, channel c + ci; acc[CB + ci]: cell c1
        for (int64_t v = 0; v < bz.nv; ++v) {
          const V w0 = vload(u0 + v * W), w1 = vload(u1 + v * W);
          for (int64_t ci = 0; ci < CB; ++ci) {
            const V x = vload(Vb + (c + ci) * kBlock + v * W);
            acc[ci] += w0 * x;
            acc[CB + ci] += w1 * x;
          }
        }
        const V sums = vsum_many<T>(acc);
        for (int64_t ci = 0; ci < CB; ++ci) q0[c + ci] += sums[ci];
        for (int64_t ci = 0; ci < CB; ++ci) q1[c + ci] += sums[CB + ci];
      }
      for (int64_t c = cfull; c < C; ++c) {
        V s0[kUnroll] = {}, s1[kUnroll] = {};
        for (int64_t v = 0; v < bz.nv; ++v) {  // nv may be 2: no fixed unroll
          const int64_t off = v * W;
          const V x = vload(Vb + c * kBlock + off);
          s0[v % kUnroll] += vload(u0 + off) * x;
          s1[v % kUnroll] += vload(u1 + off) * x;
        }
        q0[c] += vsum<T>((s0[0] + s0[1]) + (s0[2] + s0[3]));
        q1[c] += vsum<T>((s1[0] + s1[1]) + (s1[2] + s1[3]));
      }
    }
    return;
  }
  for (int64_t j = 0; j < bz.nb; ++j) {
    T* q00 = B + (c0 * D + bz.z0[j]) * C;  // may alias each other at the borders
    T* q01 = B + (c0 * D + bz.z1[j]) * C;
    T* q10 = B + (c1 * D + bz.z0[j]) * C;
    T* q11 = B + (c1 * D + bz.z1[j]) * C;
    const T w00 = bz.wx0[j] * bz.wz0[j], w01 = bz.wx0[j] * bz.wz1[j];
    const T w10 = bz.wx1[j] * bz.wz0[j], w11 = bz.wx1[j] * bz.wz1[j];
    for (int64_t c = 0; c < C; ++c) {
      const T x = Vb[c * kBlock + j];
      q00[c] += w00 * x;
      q01[c] += w01 * x;
      q10[c] += w10 * x;
      q11[c] += w11 * x;
    }
  }
}

// Blocks are visited with plain loops, not lambdas, so that everything inlines into the
// target_clones task functions and is compiled for their instruction sets.
#define BO_FOR_EACH_BLOCK(p, BODY)                                 \
  for (int64_t s_ = 0; s_ < (p).x.nseg; ++s_) {                    \
    const int64_t c0 = (p).x.seg_c0[s_], c1 = (p).x.seg_c1[s_];    \
    const int64_t end_ = (p).x.seg_begin[s_ + 1];                  \
    for (int64_t b = (p).x.seg_begin[s_]; b < end_; b += kBlock) { \
      const int64_t nb = std::min(kBlock, end_ - b);               \
      BODY;                                                        \
    }                                                              \
  }

// acc[u] = sum_i coef[o, i] * X[i] + coef[o, offset] for pixel vectors v0 .. v0 + U - 1: the affine
// map of output o, on the samples (A) or on their z-derivatives (dA).
template <typename T, int64_t U>
BO_ALWAYS_INLINE void affine_rows(const AffineLayout& l, const T* coef, const T* X, int64_t o,
                                  int64_t v0, vec_t<T>* acc) {
  constexpr int64_t W = vec_width<T>();
  for (int64_t u = 0; u < U; ++u) {
    const int64_t off = (v0 + u) * W;
    acc[u] = l.has_offset ? vload(coef + l.offset_channel(o) * kBlock + off) : vec_t<T>{};
  }
  for (int64_t i = 0; i < l.Ci; ++i) {
    const T* a = coef + l.channel(o, i) * kBlock;
    const T* x = X + i * kBlock;
    for (int64_t u = 0; u < U; ++u) {
      const int64_t off = (v0 + u) * W;
      acc[u] += vload(a + off) * vload(x + off);
    }
  }
}

// OUT[o] = the affine map of output o on the samples, over nv vectors (nv % U == 0).
template <typename T, int64_t U>
BO_ALWAYS_INLINE void apply_affine(const AffineLayout& l, const Scratch<T>& s, int64_t nv) {
  constexpr int64_t W = vec_width<T>();
  for (int64_t o = 0; o < l.Co; ++o) {
    for (int64_t v0 = 0; v0 < nv; v0 += U) {
      vec_t<T> acc[U];
      affine_rows<T, U>(l, s.A, s.X, o, v0, acc);
      for (int64_t u = 0; u < U; ++u) vstore(s.OUT + o * kBlock + (v0 + u) * W, acc[u]);
    }
  }
}

// OUT[c] = A[c] / max(A[C - 1], kMinGridWeight) for c < C - 1, over nv vectors.
template <typename T>
BO_ALWAYS_INLINE void normalize_rows(const Scratch<T>& s, int64_t C, int64_t nv) {
  using V = vec_t<T>;
  constexpr int64_t W = vec_width<T>();
  const V floor_w = V{} + static_cast<T>(kMinGridWeight);
  const T* wrow = s.A + (C - 1) * kBlock;
  for (int64_t v = 0; v < nv; ++v) {
    const V w = vload(wrow + v * W);
    const V inv = V{} + T(1) / (w > floor_w ? w : floor_w);
    for (int64_t c = 0; c + 1 < C; ++c) {
      vstore(s.OUT + c * kBlock + v * W, vload(s.A + c * kBlock + v * W) * inv);
    }
  }
}

// One block of the forward pass of row y of image n.
template <typename T, bool kApply, bool kDguide>
BO_ALWAYS_INLINE void forward_block(const SliceParams<T>& p, const T* R, bool R_finite,
                                    const Scratch<T>& s, const T* guide, int64_t n, int64_t y,
                                    int64_t b, int64_t nb, int64_t c0, int64_t c1) {
  const int64_t HW = p.g.H * p.g.W;
  const int64_t pix = y * p.g.W + b;
  BlockZ<T> bz;
  block_z<T, kDguide>(guide + b, p.x.wx0 + b, p.x.wx1 + b, nb, p.g.D, p.g.align_corners, R_finite,
                      bz);
  DenseWeights<T> dw;
  if (bz.dense) dense_weights<T, kDguide, false>(bz, dw);
  interp_block<T, false>(R, p.g.D, p.g.C, c0, c1, bz, dw, s.A, nullptr);
  if (!kApply) {
    if (p.normalize) {
      normalize_rows(s, p.g.C, bz.nv);
      store_rows(s.OUT, p.g.C - 1, bz, p.output + n * (p.g.C - 1) * HW + pix, HW);
    } else {
      store_rows(s.A, p.g.C, bz, p.output + n * p.g.C * HW + pix, HW);
    }
    return;
  }
  const AffineLayout& l = p.l;
  load_rows(p.input + n * l.Ci * HW + pix, HW, l.Ci, bz, s.X);
  if (bz.nv % kUnroll == 0) {
    apply_affine<T, kUnroll>(l, s, bz.nv);
  } else {
    apply_affine<T, 1>(l, s, bz.nv);
  }
  store_rows(s.OUT, l.Co, bz, p.output + n * l.Co * HW + pix, HW);
}

// Forward over image rows [r0, r1) of the flattened (N * H) row index. R: row_table_size.
template <typename T, bool kApply, bool kDguide>
BO_ALWAYS_INLINE void forward_rows(const SliceParams<T>& p, int64_t r0, int64_t r1, T* R,
                                   const Scratch<T>& s) {
  const int64_t plane = p.row_table_size();
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / p.g.H, y = r % p.g.H;
    const AxisTaps<T> ty = image_taps<T>(y, p.g.H, p.g.Gh, p.g.align_corners);
    const bool R_finite = build_row_table(p.grid_t + n * p.g.Gh * plane, ty, plane, R);
    const T* guide = p.guide + r * p.g.W;
    BO_FOR_EACH_BLOCK(
        p, (forward_block<T, kApply, kDguide>(p, R, R_finite, s, guide, n, y, b, nb, c0, c1)));
  }
}

// slice_apply's per-pixel backward over the block, U vectors at a time (nv % U == 0):
// grad_input (written out), the guide gradient's sum gg, and the values V splatted into the grid
// gradient.
template <typename T, int64_t U, bool kGrad>
BO_ALWAYS_INLINE void apply_backward(const SliceParams<T>& p, const Scratch<T>& s,
                                     const BlockZ<T>& bz, vec_t<T>* gg, int64_t n, int64_t pix) {
  using V = vec_t<T>;
  constexpr int64_t W = vec_width<T>();
  const AffineLayout& l = p.l;
  const int64_t HW = p.g.H * p.g.W;
  if (p.need_input) {
    for (int64_t i = 0; i < l.Ci; ++i) {
      for (int64_t v0 = 0; v0 < bz.nv; v0 += U) {
        V acc[U] = {};
        for (int64_t o = 0; o < l.Co; ++o) {
          const T* g = s.G + o * kBlock;
          const T* a = s.A + l.channel(o, i) * kBlock;
          for (int64_t u = 0; u < U; ++u) {
            const int64_t off = (v0 + u) * W;
            acc[u] += vload(g + off) * vload(a + off);
          }
        }
        for (int64_t u = 0; u < U; ++u) vstore(s.OUT + i * kBlock + (v0 + u) * W, acc[u]);
      }
    }
    store_rows(s.OUT, l.Ci, bz, p.grad_input + n * l.Ci * HW + pix, HW);
  }
  for (int64_t o = 0; o < l.Co; ++o) {
    const T* g = s.G + o * kBlock;
    if (kGrad) {
      for (int64_t v0 = 0; v0 < bz.nv; v0 += U) {
        V t[U];
        affine_rows<T, U>(l, s.dA, s.X, o, v0, t);
        for (int64_t u = 0; u < U; ++u) gg[v0 + u] += vload(g + (v0 + u) * W) * t[u];
      }
    }
    if (p.need_grid) {
      for (int64_t i = 0; i < l.Ci; ++i) {
        const T* x = s.X + i * kBlock;
        T* dst = s.V + l.channel(o, i) * kBlock;
        for (int64_t v = 0; v < bz.nv; ++v) vstore(dst + v * W, vload(g + v * W) * vload(x + v * W));
      }
      if (l.has_offset) {
        T* dst = s.V + l.offset_channel(o) * kBlock;
        for (int64_t v = 0; v < bz.nv; ++v) vstore(dst + v * W, vload(g + v * W));
      }
    }
  }
}

// One block of the backward pass of row y of image n: grad_guide and grad_input are written
// per pixel, the grid gradient is splatted into the row buffer B.
template <typename T, bool kApply, bool kDguide, bool kGrad>
BO_ALWAYS_INLINE void backward_block(const SliceParams<T>& p, const T* R, bool allow_dense, T* B,
                                     const Scratch<T>& s, const T* guide, int64_t n, int64_t y,
                                     int64_t b, int64_t nb, int64_t c0, int64_t c1) {
  using V = vec_t<T>;
  constexpr int64_t W = vec_width<T>();
  const int64_t HW = p.g.H * p.g.W;
  const int64_t pix = y * p.g.W + b;
  const int64_t C = p.g.C;
  BlockZ<T> bz;
  block_z<T, kDguide>(guide + b, p.x.wx0 + b, p.x.wx1 + b, nb, p.g.D, p.g.align_corners,
                      allow_dense, bz);
  DenseWeights<T> dw;
  if (bz.dense) dense_weights<T, kDguide, kGrad>(bz, dw);
  // grad_input needs the samples, grad_guide their z-derivative; the grid gradient needs neither.
  if (kGrad || (kApply && p.need_input)) {
    interp_block<T, kGrad>(R, p.g.D, C, c0, c1, bz, dw, s.A, s.dA);
  }
  const int64_t Cout = kApply ? p.l.Co : C;
  if (!kApply && p.ones_channel) {
    load_rows(p.grad_output + n * (C - 1) * HW + pix, HW, C - 1, bz, s.G);
    T* ones = s.G + (C - 1) * kBlock;
    std::fill(ones, ones + bz.nb, T(1));
    std::fill(ones + bz.nb, ones + bz.nv * vec_width<T>(), T(0));
  } else {
    load_rows(p.grad_output + n * Cout * HW + pix, HW, Cout, bz, s.G);
  }
  V gg[kBlock / vec_width<T>()];  // nv <= kBlock / W
  if (kGrad) std::fill(gg, gg + bz.nv, V{});
  if (!kApply) {
    if (kGrad) {
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t v = 0; v < bz.nv; ++v) {
          gg[v] += vload(s.G + c * kBlock + v * W) * vload(s.dA + c * kBlock + v * W);
        }
      }
    }
  } else {
    const AffineLayout& l = p.l;
    load_rows(p.input + n * l.Ci * HW + pix, HW, l.Ci, bz, s.X);
    if (bz.nv % kUnroll == 0) {
      apply_backward<T, kUnroll, kGrad>(p, s, bz, gg, n, pix);
    } else {
      apply_backward<T, 1, kGrad>(p, s, bz, gg, n, pix);
    }
  }
  if (kGrad) {
    const T zscale = guide_scale<T>(p.g.D, p.g.align_corners);  // d gz / d guide
    for (int64_t v = 0; v < bz.nv; ++v) vstore(s.OUT + v * W, gg[v] * zscale);
    store_rows(s.OUT, 1, bz, p.grad_guide + n * HW + pix, HW);
  }
  if (p.need_grid) {
    // slice: the splatted values are grad_output itself (already padded in s.G).
    splat_block(kApply ? s.V : s.G, p.g.D, C, c0, c1, bz, dw, B);
  }
}

// Backward over rows [y0, y1) of image n. Gacc holds grid rows [band_lo, ...) of a
// (Gh, Gw, D, C) grid gradient: only the band of grid rows that these image rows touch. It is
// accumulated in double so that the sum over many pixels keeps float32 grids accurate.
// R and B: row_table_size.
template <typename T, bool kApply, bool kDguide, bool kGrad>
BO_ALWAYS_INLINE void backward_rows(const SliceParams<T>& p, int64_t n, int64_t y0, int64_t y1,
                                    double* Gacc, int64_t band_lo, T* R, T* B,
                                    const Scratch<T>& s) {
  const int64_t plane = p.row_table_size();
  for (int64_t y = y0; y < y1; ++y) {
    const AxisTaps<T> ty = image_taps<T>(y, p.g.H, p.g.Gh, p.g.align_corners);
    // Only samples need the grid: a pure splat (slice, grid gradient alone) has none to read.
    bool R_finite = true;
    if (kGrad || (kApply && p.need_input)) {
      R_finite = build_row_table(p.grid_t + n * p.g.Gh * plane, ty, plane, R);
    }
    const T* guide = p.guide + (n * p.g.H + y) * p.g.W;
    // A dense block splats each pixel's values into every cell of its z span, most with weight 0,
    // so one NaN or infinity among them reaches all of those cells. A row whose splat is not
    // finite is redone without the dense path: then it reaches only each pixel's eight corners,
    // as grid_sample's gradient does. (One test of the row buffer, where a test per block cost
    // ~9% of a fine grid's splat.)
    for (bool dense = R_finite;; dense = false) {
      if (p.need_grid) std::fill(B, B + plane, T(0));
      BO_FOR_EACH_BLOCK(p, (backward_block<T, kApply, kDguide, kGrad>(p, R, dense, B, s, guide, n,
                                                                      y, b, nb, c0, c1)));
      if (!dense || !p.need_grid || values_finite(B, plane)) break;
    }
    if (!p.need_grid) continue;
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
