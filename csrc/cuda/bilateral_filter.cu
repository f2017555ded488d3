// CUDA kernels of bilateral_filter and _bilateral_filter_backward (csrc/ops.cpp has the schemas,
// csrc/cpu/bilateral_filter.cpp the same algorithm on the CPU, with the derivation; the per-pixel
// math is csrc/include/bilateral_ops/bilateral_filter.h). Launch configurations:
// launch::filter_plan in launch_config.h, checked on the CPU by tests/test_launch_config.py.
//
// Forward and backward pass 1: one thread per pixel of a 32 x 8 tile; the block stages the tile's
// window of guidance and input in shared memory (in the accumulation type: float for float16 and
// bfloat16) when it fits, else reads global memory through the border maps. Channels are
// processed in groups of kGroup held in registers. Pass 1 (gp = g / W, a = gp . out) is pixel by
// pixel (filter_centre_kernel) when the forward's output and weight sums W are given and no sigma
// gradient is wanted, else a sweep of every window that recomputes them. Pass 2 gathers, per
// padded position q, from the padded positions p whose window offsets reach it: each pair's range
// term takes e_pq + e_qp (the CPU's form), e_pq from the centre p (zero when p is not an image
// pixel) and e_qp from q as a centre, so q's own centre term comes out of the same gather; the
// fold adds each padded position into the pixel it reads, in a fixed order. The sigma gradients
// are per-block sums (a fixed tree in shared memory), summed per image by a second kernel in
// block order: deterministic, no atomics.
//
// Fast paths (launch_config.h says which shapes): the same three passes with the channel counts
// and the distance compiled in, always staged, the centre's guide and the sums in registers,
// 32-bit indices within the window, and a per-block table of spatial exponents. For float the
// exponentials are exp2f with log2(e) folded into the colour scale and the table (as on the
// CPU). Pass 2 runs a tile of padded positions per block and stages the guide, gp and a of the
// centres whose windows cover it, so that each tap reads shared memory only.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <array>
#include <string>
#include <tuple>
#include <type_traits>

#include "../bilateral_filter_args.h"
#include "bilateral_ops/bilateral_filter.h"
#include "common.cuh"
#include "launch.cuh"
#include "launch_config.h"

namespace bilateral_ops {
namespace cuda {
namespace {

constexpr int kGroup = 4;  // channels accumulated in registers at once
constexpr int kTW = launch::kFilterTileW;
constexpr int kTH = launch::kFilterTileH;

struct Dims {
  int64_t N, C, Cg, H, W, Hp, Wp, tiles_x, tiles_y;
  int64_t qtiles_x, qtiles_y;  // tiles of the padded image (the fast pass 2)
  int ky, kx, py, px, border, distance;
  bool self, tiled;
};

template <typename scalar_t>
struct Inputs {
  const scalar_t* in;  // (N, C, H, W)
  const scalar_t* gd;  // (N, Cg, H, W); == in when self
  const scalar_t* sc;  // (N,)
  const scalar_t* ss;  // (N, 2)
};

__device__ __forceinline__ float fexp(float x) { return expf(x); }
__device__ __forceinline__ double fexp(double x) { return exp(x); }

// Value of channel plane `plane` (H x W) at padded coordinates (yy, xx) relative to the image.
template <typename scalar_t>
__device__ __forceinline__ acc_type<scalar_t> fetch(const scalar_t* plane, int64_t yy, int64_t xx,
                                                    const Dims& d) {
  const int64_t iy = border_index(yy, d.H, d.border), ix = border_index(xx, d.W, d.border);
  if (iy < 0 || ix < 0) return acc_type<scalar_t>(0);
  return ldg(plane + iy * d.W + ix);
}

// The tile a block of forward / pass 1 covers, and its staged window.
template <typename scalar_t>
struct Window {
  using acc_t = acc_type<scalar_t>;
  const Dims& d;
  const Inputs<scalar_t>& p;
  const acc_t* sh;
  int64_t n, y, x;  // this thread's pixel
  int lx, ly, sw, area;

  __device__ acc_t guide(int64_t c, int ty, int tx) const {
    if (d.tiled) return sh[c * area + (ly + ty) * sw + lx + tx];
    return fetch(p.gd + (n * d.Cg + c) * d.H * d.W, y + ty - d.py, x + tx - d.px, d);
  }
  __device__ acc_t value(int64_t c, int ty, int tx) const {
    if (d.tiled) return sh[((d.self ? 0 : d.Cg) + c) * area + (ly + ty) * sw + lx + tx];
    return fetch(p.in + (n * d.C + c) * d.H * d.W, y + ty - d.py, x + tx - d.px, d);
  }
};

// Stages the window of tile (n, by, bx) and returns this thread's view of it. Every thread of the
// block must call it (it synchronises).
template <typename scalar_t>
__device__ Window<scalar_t> stage(const Dims& d, const Inputs<scalar_t>& p, acc_type<scalar_t>* sh) {
  const int64_t per_image = d.tiles_x * d.tiles_y;
  const int64_t t = blockIdx.x;
  const int64_t n = t / per_image, by = (t % per_image) / d.tiles_x, bx = t % d.tiles_x;
  const int sw = kTW + d.kx - 1, shh = kTH + d.ky - 1, area = sw * shh;
  const int lx = threadIdx.x, ly = threadIdx.y;
  if (d.tiled) {
    const int64_t oy = by * kTH - d.py, ox = bx * kTW - d.px;
    const int tid = ly * kTW + lx;
    const int64_t channels = d.self ? d.C : d.Cg + d.C;
    for (int64_t c = 0; c < channels; ++c) {
      const scalar_t* plane = c < d.Cg || d.self ? p.gd + (n * d.Cg + c) * d.H * d.W
                                                 : p.in + (n * d.C + (c - d.Cg)) * d.H * d.W;
      for (int i = tid; i < area; i += launch::kFilterThreads) {
        const int64_t yy = oy + i / sw, xx = ox + i % sw;
        // Past the padded image (tile tails) only inactive pixels read: a circular border would
        // map such a row or column outside the image.
        sh[c * area + i] = yy < d.H + d.py && xx < d.W + d.px ? fetch(plane, yy, xx, d) : acc_type<scalar_t>(0);
      }
    }
    __syncthreads();
  }
  return Window<scalar_t>{d, p, sh, n, by * kTH + ly, bx * kTW + lx, lx, ly, sw, area};
}

template <typename acc_t>
struct Sigmas {
  acc_t rc, ay, ax;  // 0.5 / sc^2, 0.5 / sy^2, 0.5 / sx^2
};

template <typename scalar_t>
__device__ Sigmas<acc_type<scalar_t>> sigmas(const Inputs<scalar_t>& p, int64_t n) {
  using acc_t = acc_type<scalar_t>;
  const acc_t sc = ldg(p.sc + n), sy = ldg(p.ss + 2 * n), sx = ldg(p.ss + 2 * n + 1);
  return {acc_t(0.5) / (sc * sc), acc_t(0.5) / (sy * sy), acc_t(0.5) / (sx * sx)};
}

// Weight of tap (ty, tx) for this thread's centre, and the accumulated distance (l1 slope).
template <typename scalar_t>
__device__ __forceinline__ acc_type<scalar_t> tap_weight(const Window<scalar_t>& w, const Sigmas<acc_type<scalar_t>>& s,
                                                         int ty, int tx, acc_type<scalar_t>* dist) {
  using acc_t = acc_type<scalar_t>;
  acc_t acc = 0;
  for (int64_t c = 0; c < w.d.Cg; ++c) {
    acc += distance_term(w.guide(c, ty, tx) - w.guide(c, w.d.py, w.d.px), w.d.distance);
  }
  *dist = acc;
  const acc_t fy = acc_t(ty - w.d.py), fx = acc_t(tx - w.d.px);
  return fexp(-(distance_finish(acc, w.d.distance) * s.rc + fy * fy * s.ay + fx * fx * s.ax));
}

// The window's weight sum and weighted sums of channels c0 .. c0 + kGroup - 1 (those below C) for
// this thread's centre: the forward's result and the backward's first pass both start from them.
template <typename scalar_t>
__device__ __forceinline__ acc_type<scalar_t> window_sums(const Window<scalar_t>& w,
                                                          const Sigmas<acc_type<scalar_t>>& s,
                                                          const Dims& d, int64_t c0,
                                                          acc_type<scalar_t> (&acc)[kGroup]) {
  using acc_t = acc_type<scalar_t>;
  acc_t wsum = 0;
#pragma unroll
  for (int j = 0; j < kGroup; ++j) acc[j] = 0;
  for (int ty = 0; ty < d.ky; ++ty) {
    for (int tx = 0; tx < d.kx; ++tx) {
      acc_t dist;
      const acc_t wt = tap_weight(w, s, ty, tx, &dist);
      wsum += wt;
#pragma unroll
      for (int j = 0; j < kGroup; ++j) {
        if (c0 + j < d.C) acc[j] += wt * w.value(c0 + j, ty, tx);
      }
    }
  }
  return wsum;
}

template <typename scalar_t>
__global__ void __launch_bounds__(launch::kFilterThreads, launch::kFilterMinBlocks)
    filter_forward_kernel(Dims d, Inputs<scalar_t> p, scalar_t* out, acc_type<scalar_t>* norm) {
  using acc_t = acc_type<scalar_t>;
  extern __shared__ double smem_d[];
  const Window<scalar_t> w = stage(d, p, reinterpret_cast<acc_t*>(smem_d));
  if (w.y >= d.H || w.x >= d.W) return;
  const Sigmas<acc_t> s = sigmas(p, w.n);
  for (int64_t c0 = 0; c0 < d.C; c0 += kGroup) {
    acc_t acc[kGroup];
    const acc_t wsum = window_sums(w, s, d, c0, acc);
    if (norm != nullptr && c0 == 0) norm[(w.n * d.H + w.y) * d.W + w.x] = wsum;
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      if (c0 + j < d.C) out[((w.n * d.C + c0 + j) * d.H + w.y) * d.W + w.x] = static_cast<scalar_t>(acc[j] / wsum);
    }
  }
}

// The block's sums of the threads' three sigma terms (a fixed tree in shared memory) into
// partials[blockIdx.x]. Every thread of the block must call it.
__device__ void block_partials(double* red, const double (&sums)[3], double* partials) {
  const int tid = threadIdx.y * kTW + threadIdx.x;
  for (int k = 0; k < 3; ++k) red[k * launch::kFilterThreads + tid] = sums[k];
  __syncthreads();
  for (int stride = launch::kFilterThreads / 2; stride > 0; stride >>= 1) {
    if (tid < stride) {
      for (int k = 0; k < 3; ++k) red[k * launch::kFilterThreads + tid] += red[k * launch::kFilterThreads + tid + stride];
    }
    __syncthreads();
  }
  if (tid < 3) partials[blockIdx.x * 3 + tid] = red[tid * launch::kFilterThreads];
}

// Backward pass 1 (see csrc/cpu/bilateral_filter.cpp): gp = g / W and a = gp . out per pixel;
// per-block sums of e w D, e w ty^2, e w tx^2.
template <typename scalar_t>
struct Pass1Out {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* go;  // (N, C, H, W)
  acc_t* gp;           // (N, C, H, W)
  acc_t* a;            // (N, H, W)
  double* partials;    // (tiles, 3) or nullptr
};

// Pass 1 from the forward's output and weight sums, pixel by pixel (1-D grid-stride over N H W):
// the same expressions as the sweeps' (gp = g / W, a summed over the channels in order), with the
// forward's output for acc / W.
template <typename scalar_t>
__global__ void __launch_bounds__(launch::kFilterThreads, launch::kFilterMinBlocks)
    filter_centre_kernel(Dims d, const scalar_t* go, const scalar_t* out, const acc_type<scalar_t>* norm,
                         acc_type<scalar_t>* gp, acc_type<scalar_t>* a) {
  using acc_t = acc_type<scalar_t>;
  const int64_t plane = d.H * d.W, total = d.N * plane;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / plane, at0 = n * d.C * plane + (i - n * plane);
    const acc_t wsum = norm[i];
    acc_t s = 0;
    for (int64_t c = 0; c < d.C; ++c) {
      const int64_t at = at0 + c * plane;
      const acc_t g = ldg(go + at) / wsum;
      gp[at] = g;
      s += g * static_cast<acc_t>(ldg(out + at));
    }
    a[i] = s;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(launch::kFilterThreads, launch::kFilterMinBlocks)
    filter_pass1_kernel(Dims d, Inputs<scalar_t> p, Pass1Out<scalar_t> o) {
  using acc_t = acc_type<scalar_t>;
  extern __shared__ double smem_d[];
  const int64_t window_vals = d.tiled ? (d.self ? d.C : d.C + d.Cg) * (kTH + d.ky - 1) * (kTW + d.kx - 1) : 0;
  const Window<scalar_t> w = stage(d, p, reinterpret_cast<acc_t*>(smem_d));
  // The reduction buffer follows the window, 8-byte aligned.
  double* red = smem_d + (window_vals * static_cast<int64_t>(sizeof(acc_t)) + 7) / 8;
  const bool active = w.y < d.H && w.x < d.W;
  double sums[3] = {0, 0, 0};
  if (active) {
    const Sigmas<acc_t> s = sigmas(p, w.n);
    const int64_t pix = (w.n * d.H + w.y) * d.W + w.x, plane = d.H * d.W;
    acc_t a = 0, gpr[kGroup] = {};  // gp of the first channels, for the second loop
    for (int64_t c0 = 0; c0 < d.C; c0 += kGroup) {
      acc_t acc[kGroup];
      const acc_t wsum = window_sums(w, s, d, c0, acc);
#pragma unroll
      for (int j = 0; j < kGroup; ++j) {
        if (c0 + j < d.C) {
          const int64_t at = (w.n * d.C + c0 + j) * plane + w.y * d.W + w.x;
          const acc_t gpj = ldg(o.go + at) / wsum;
          o.gp[at] = gpj;
          if (c0 == 0) gpr[j] = gpj;
          a += gpj * (acc[j] / wsum);
        }
      }
    }
    o.a[pix] = a;
    if (o.partials != nullptr) {
      // The sigma sums need e w per tap: a second sweep.
      for (int ty = 0; ty < d.ky; ++ty) {
        acc_t ew_row = 0;
        for (int tx = 0; tx < d.kx; ++tx) {
          acc_t dist;
          const acc_t wt = tap_weight(w, s, ty, tx, &dist);
          acc_t e = -a;
#pragma unroll
          for (int j = 0; j < kGroup; ++j) {
            if (j < d.C) e += gpr[j] * w.value(j, ty, tx);
          }
          for (int64_t c = kGroup; c < d.C; ++c) e += o.gp[(w.n * d.C + c) * plane + w.y * d.W + w.x] * w.value(c, ty, tx);
          const acc_t ew = e * wt;
          ew_row += ew;
          sums[0] += static_cast<double>(ew * distance_finish(dist, d.distance));
          sums[2] += static_cast<double>(ew * acc_t((tx - d.px) * (tx - d.px)));
        }
        sums[1] += static_cast<double>(ew_row) * double((ty - d.py) * (ty - d.py));
      }
    }
  }
  if (o.partials != nullptr) block_partials(red, sums, o.partials);  // uniform across the block
}

// Pass 2: per padded position q (1-D grid-stride over N * Hp * Wp).
template <typename scalar_t>
struct Pass2Args {
  using acc_t = acc_type<scalar_t>;
  const acc_t* gp;   // (N, C, H, W)
  const acc_t* a;    // (N, H, W)
  acc_t* gin;        // (N, C, Hp, Wp): value (+ range when self) gradient, or nullptr
  acc_t* ggd;        // (N, Cg, Hp, Wp): range gradient of a separate guidance, or nullptr
  bool need_value, need_range;
};

template <typename scalar_t>
__global__ void __launch_bounds__(launch::kFilterThreads, launch::kFilterPass2MinBlocks)
    filter_pass2_kernel(Dims d, Inputs<scalar_t> p, Pass2Args<scalar_t> o) {
  using acc_t = acc_type<scalar_t>;
  const int64_t total = d.N * d.Hp * d.Wp, plane = d.H * d.W;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / (d.Hp * d.Wp), qy = (i / d.Wp) % d.Hp, qx = i % d.Wp;
    const int64_t iy = border_index(qy - d.py, d.H, d.border), ix = border_index(qx - d.px, d.W, d.border);
    const bool reads = iy >= 0 && ix >= 0;  // a constant border reads zeros: its gradient is unused
    const Sigmas<acc_t> s = sigmas(p, n);
    // q is also a centre (an image pixel) whose range gradient is wanted: its pairs with every
    // position of its window, image pixel or not, carry e_qp.
    const bool qc = o.need_range && qy >= d.py && qy < d.py + d.H && qx >= d.px && qx < d.px + d.W;
    const int64_t qpix = (qy - d.py) * d.W + (qx - d.px);
    const int64_t groups = ((d.C > d.Cg ? d.C : d.Cg) + kGroup - 1) / kGroup;
    for (int64_t gi = 0; gi < groups; ++gi) {
      const int64_t g0 = gi * kGroup;
      // A group past the guidance channels has only value terms: no pair without a centre.
      const bool qcg = qc && g0 < d.Cg;
      acc_t val[kGroup] = {}, rng[kGroup] = {};
      if (reads) {
        for (int ty = 0; ty < d.ky; ++ty) {
          const int64_t y = qy - ty;  // the partner's row (image coordinates)
          const bool row_in = y >= 0 && y < d.H;
          if (!row_in && !qcg) continue;
          const acc_t fy = acc_t(ty - d.py);
          for (int tx = 0; tx < d.kx; ++tx) {
            const int64_t x = qx - tx;
            const bool in = row_in && x >= 0 && x < d.W;  // the partner is a centre
            if (!in && !qcg) continue;
            acc_t dist = 0;
            for (int64_t c = 0; c < d.Cg; ++c) {
              const scalar_t* gplane = p.gd + (n * d.Cg + c) * plane;
              dist += distance_term(ldg(gplane + iy * d.W + ix) - fetch(gplane, y, x, d), d.distance);
            }
            const acc_t fx = acc_t(tx - d.px);
            const acc_t wt = fexp(-(distance_finish(dist, d.distance) * s.rc + fy * fy * s.ay + fx * fx * s.ax));
            const int64_t centre = in ? y * d.W + x : 0;
            if (o.need_value && in) {
#pragma unroll
              for (int j = 0; j < kGroup; ++j) {
                if (g0 + j < d.C) val[j] += wt * o.gp[(n * d.C + g0 + j) * plane + centre];
              }
            }
            if (o.need_range && g0 < d.Cg) {
              acc_t e = 0;
              if (in) {  // e_pq: q in the partner's window
                e -= o.a[n * plane + centre];
                for (int64_t c = 0; c < d.C; ++c) {
                  e += o.gp[(n * d.C + c) * plane + centre] * ldg(p.in + (n * d.C + c) * plane + iy * d.W + ix);
                }
              }
              if (qcg) {  // e_qp: the partner in q's window
                e -= o.a[n * plane + qpix];
                for (int64_t c = 0; c < d.C; ++c) {
                  e += o.gp[(n * d.C + c) * plane + qpix] * fetch(p.in + (n * d.C + c) * plane, y, x, d);
                }
              }
              const acc_t h = -s.rc * e * wt;
#pragma unroll
              for (int j = 0; j < kGroup; ++j) {
                if (g0 + j < d.Cg) {
                  const scalar_t* gplane = p.gd + (n * d.Cg + g0 + j) * plane;
                  const acc_t delta = ldg(gplane + iy * d.W + ix) - fetch(gplane, y, x, d);
                  rng[j] += h * distance_slope(delta, dist, d.distance);
                }
              }
            }
          }
        }
      }
      const int64_t q = qy * d.Wp + qx, pplane = d.Hp * d.Wp;
#pragma unroll
      for (int j = 0; j < kGroup; ++j) {
        if (o.gin != nullptr && g0 + j < d.C) o.gin[(n * d.C + g0 + j) * pplane + q] = val[j] + (d.self ? rng[j] : acc_t(0));
        if (o.ggd != nullptr && g0 + j < d.Cg) o.ggd[(n * d.Cg + g0 + j) * pplane + q] = rng[j];
      }
    }
  }
}

// Fold: pixel (n, c, y, x) = the padded gradients of every position that reads it,
// rows and columns in preimage order. The loops over the three intervals are unrolled, so that
// the preimages stay in registers (indexed at run time they went to the stack), and kSmall
// (every flat index below 2^31) finds the pixel with multiply-high divisions: the kernel was
// bound by its index arithmetic, not by the two planes it moves.
struct FoldDivs {
  FastDiv plane, row;  // H W, W
};

template <typename scalar_t, bool kSmall>
__global__ void __launch_bounds__(launch::kFilterThreads, launch::kFilterMinBlocks)
    filter_fold_kernel(Dims d, int64_t channels, FoldDivs v, const acc_type<scalar_t>* padded, scalar_t* out) {
  using acc_t = acc_type<scalar_t>;
  const int64_t total = d.N * channels * d.H * d.W;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t plane_i, y, x;
    if constexpr (kSmall) {
      const uint32_t n = static_cast<uint32_t>(i), pl = v.plane.div(n), rem = n - pl * v.plane.d;
      const uint32_t r = v.row.div(rem);
      plane_i = pl, y = r, x = rem - r * v.row.d;
    } else {
      plane_i = i / (d.H * d.W), y = (i / d.W) % d.H, x = i % d.W;
    }
    acc_t sum = 0;
    const Preimages py = preimages(y, d.H, d.py, d.border), px = preimages(x, d.W, d.px, d.border);
    const acc_t* base = padded + plane_i * d.Hp * d.Wp;
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      for (int64_t yy = py.lo[a]; yy <= py.hi[a]; ++yy) {
        const acc_t* row = base + (yy + d.py) * d.Wp + d.px;
#pragma unroll
        for (int b = 0; b < 3; ++b) {
          for (int64_t xx = px.lo[b]; xx <= px.hi[b]; ++xx) sum += row[xx];
        }
      }
    }
    out[i] = static_cast<scalar_t>(sum);
  }
}

// Per image: the block partials in block order, then the sigma gradients.
template <typename scalar_t>
__global__ void __launch_bounds__(launch::kFilterThreads, launch::kFilterMinBlocks)
    filter_finish_kernel(Dims d, Inputs<scalar_t> p, const double* partials, scalar_t* grad_sc,
                         scalar_t* grad_ss) {
  extern __shared__ double red[];
  const int64_t n = blockIdx.x, per_image = d.tiles_x * d.tiles_y;
  const int tid = threadIdx.x;
  double s[3] = {0, 0, 0};
  for (int64_t b = tid; b < per_image; b += blockDim.x) {
    for (int k = 0; k < 3; ++k) s[k] += partials[(n * per_image + b) * 3 + k];
  }
  for (int k = 0; k < 3; ++k) red[k * launch::kFilterThreads + tid] = s[k];
  __syncthreads();
  for (int stride = launch::kFilterThreads / 2; stride > 0; stride >>= 1) {
    if (tid < stride) {
      for (int k = 0; k < 3; ++k) red[k * launch::kFilterThreads + tid] += red[k * launch::kFilterThreads + tid + stride];
    }
    __syncthreads();
  }
  if (tid == 0) {
    const double sc = static_cast<double>(ldg(p.sc + n));
    const double sy = static_cast<double>(ldg(p.ss + 2 * n)), sx = static_cast<double>(ldg(p.ss + 2 * n + 1));
    if (grad_sc != nullptr) grad_sc[n] = static_cast<scalar_t>(red[0] / (sc * sc * sc));
    if (grad_ss != nullptr) {
      grad_ss[2 * n] = static_cast<scalar_t>(red[launch::kFilterThreads] / (sy * sy * sy));
      grad_ss[2 * n + 1] = static_cast<scalar_t>(red[2 * launch::kFilterThreads] / (sx * sx * sx));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Fast paths: C and CG (the guide's channels; == C when SELF) and the distance DIST compiled in.

// exp in the base the fast kernels' exponents are scaled to: 2 for float (one hardware ex2 with
// log2(e) folded into the scales once, as on the CPU), e for double (its contract is 1e-10).
template <typename acc_t>
struct FastExp;
template <>
struct FastExp<float> {
  static constexpr float kScale = 1.44269504088896340736f;
  static __device__ __forceinline__ float eval(float x) { return exp2f(x); }
};
template <>
struct FastExp<double> {
  static constexpr double kScale = 1.0;
  static __device__ __forceinline__ double eval(double x) { return exp(x); }
};

// Values of the window, in acc_t units, rounded up to 8 bytes: the plan's filter_tile_bytes (and
// filter_pass2_tile_bytes), after which the spatial table starts.
template <typename acc_t>
__device__ __forceinline__ int aligned_values(int values) {
  constexpr int per8 = 8 / static_cast<int>(sizeof(acc_t));
  return (values + per8 - 1) / per8 * per8;
}

// The spatial exponents of image n in FastExp's base: tab[ty] = -(ty - py)^2 ay and
// tab[ky + tx] = -(tx - px)^2 ax, so a tap's is tab[ty] + tab[ky + tx].
template <typename acc_t>
__device__ __forceinline__ void stage_spatial(const Dims& d, const Sigmas<acc_t>& s, acc_t* tab) {
  for (int i = threadIdx.y * kTW + threadIdx.x; i < d.ky + d.kx; i += launch::kFilterThreads) {
    const bool row = i < d.ky;
    const acc_t f = acc_t(row ? i - d.py : i - d.ky - d.px);
    tab[i] = -(f * f * (row ? s.ay : s.ax)) * FastExp<acc_t>::kScale;
  }
}

// NC planes (stride `plane` from `base`, image n's first) of the window whose top-left is at
// (oy, ox) in image coordinates, through the border maps. Rows and columns past the padded image
// (tile tails) are zeros: only inactive pixels read them, and a circular border would map them
// outside the image.
template <int NC, typename scalar_t>
__device__ __forceinline__ void stage_planes(const scalar_t* base, int64_t plane, const Dims& d, int oy,
                                             int ox, int sw, int shh, acc_type<scalar_t>* sh) {
  using acc_t = acc_type<scalar_t>;
  const int area = sw * shh;
  for (int r = threadIdx.y; r < shh; r += kTH) {
    const int64_t yy = oy + r;
    const int64_t iy = yy < d.H + d.py ? border_index(yy, d.H, d.border) : -1;
    for (int c = threadIdx.x; c < sw; c += kTW) {
      const int64_t xx = ox + c;
      const int64_t ix = xx < d.W + d.px ? border_index(xx, d.W, d.border) : -1;
      const bool in = iy >= 0 && ix >= 0;
      const scalar_t* at = base + (in ? iy * d.W + ix : 0);
#pragma unroll
      for (int ch = 0; ch < NC; ++ch) sh[ch * area + r * sw + c] = in ? ldg(at + ch * plane) : acc_t(0);
    }
  }
}

// A thread's view of the fast forward / pass 1 window: its centre's guide in registers, and the
// guide and value planes from the window's row and column of tap (0, 0).
template <typename acc_t, int CG, int DIST>
struct FastWindow {
  const acc_t* g;    // guide planes
  const acc_t* v;    // value planes (== g when the input guides itself)
  const acc_t* tab;  // stage_spatial's table
  int sw, area;
  acc_t gc[CG];
  acc_t nrc;  // -rc in FastExp's base

  // The weight of the tap at window offset o (row * sw + column from tap (0, 0)) with spatial
  // exponent sp; its guide and accumulated distance (l1 slope) come back in gt and dist.
  __device__ __forceinline__ acc_t weight(int o, acc_t sp, acc_t (&gt)[CG], acc_t& dist) const {
    dist = 0;
#pragma unroll
    for (int c = 0; c < CG; ++c) {
      gt[c] = g[c * area + o];
      dist += distance_term(gt[c] - gc[c], DIST);
    }
    return FastExp<acc_t>::eval(distance_finish(dist, DIST) * nrc + sp);
  }
};

struct Pixel {
  int64_t n;
  int y, x;
  bool active;
};

// Stages tile blockIdx.x's window and spatial table, and returns the thread's pixel. Every thread
// of the block must call it (it synchronises).
template <int C, int CG, bool SELF, typename scalar_t>
__device__ Pixel stage_fast(const Dims& d, const Inputs<scalar_t>& p, acc_type<scalar_t>* sh) {
  const int64_t per_image = d.tiles_x * d.tiles_y, t = blockIdx.x;
  const int64_t n = t / per_image;
  const int by = static_cast<int>((t % per_image) / d.tiles_x), bx = static_cast<int>(t % d.tiles_x);
  const int sw = kTW + d.kx - 1, shh = kTH + d.ky - 1, area = sw * shh;
  const int oy = by * kTH - d.py, ox = bx * kTW - d.px;
  const int64_t plane = d.H * d.W;
  stage_planes<CG>(p.gd + n * CG * plane, plane, d, oy, ox, sw, shh, sh);
  if (!SELF) stage_planes<C>(p.in + n * C * plane, plane, d, oy, ox, sw, shh, sh + CG * area);
  stage_spatial(d, sigmas(p, n), sh + aligned_values<acc_type<scalar_t>>((SELF ? C : C + CG) * area));
  __syncthreads();
  const int y = by * kTH + threadIdx.y, x = bx * kTW + threadIdx.x;
  return Pixel{n, y, x, y < d.H && x < d.W};
}

template <int C, int CG, bool SELF, int DIST, typename scalar_t>
__device__ __forceinline__ FastWindow<acc_type<scalar_t>, CG, DIST> fast_window(
    const Dims& d, const Inputs<scalar_t>& p, const acc_type<scalar_t>* sh, const Pixel& px) {
  using acc_t = acc_type<scalar_t>;
  FastWindow<acc_t, CG, DIST> w;
  w.sw = kTW + d.kx - 1;
  w.area = w.sw * (kTH + d.ky - 1);
  w.g = sh + threadIdx.y * w.sw + threadIdx.x;
  w.v = SELF ? w.g : w.g + CG * w.area;
  w.tab = sh + aligned_values<acc_t>((SELF ? C : C + CG) * w.area);
#pragma unroll
  for (int c = 0; c < CG; ++c) w.gc[c] = w.g[c * w.area + d.py * w.sw + d.px];
  w.nrc = -sigmas(p, px.n).rc * FastExp<acc_t>::kScale;
  return w;
}

// One sweep of the window: its weight sum (returned) and the weighted sums acc of the C channels,
// the forward's result and pass 1's start.
template <int C, bool SELF, typename acc_t, int CG, int DIST>
__device__ __forceinline__ acc_t fast_sums(const FastWindow<acc_t, CG, DIST>& w, const Dims& d,
                                           acc_t (&acc)[C]) {
  acc_t wsum = 0;
#pragma unroll
  for (int c = 0; c < C; ++c) acc[c] = 0;
  for (int ty = 0; ty < d.ky; ++ty) {
    const acc_t row_sp = w.tab[ty];
    for (int tx = 0; tx < d.kx; ++tx) {
      const int o = ty * w.sw + tx;
      acc_t gt[CG], dist;
      const acc_t wt = w.weight(o, row_sp + w.tab[d.ky + tx], gt, dist);
      wsum += wt;
#pragma unroll
      for (int c = 0; c < C; ++c) acc[c] += wt * (SELF ? gt[c] : w.v[c * w.area + o]);
    }
  }
  return wsum;
}

template <typename scalar_t, int C, int CG, bool SELF, int DIST>
__global__ void __launch_bounds__(launch::kFilterThreads,
                                  launch::filter_fast_min_blocks(sizeof(acc_type<scalar_t>)))
    filter_forward_fast_kernel(Dims d, Inputs<scalar_t> p, scalar_t* out, acc_type<scalar_t>* norm) {
  using acc_t = acc_type<scalar_t>;
  extern __shared__ double smem_d[];
  acc_t* sh = reinterpret_cast<acc_t*>(smem_d);
  const Pixel px = stage_fast<C, CG, SELF>(d, p, sh);
  if (!px.active) return;
  const auto w = fast_window<C, CG, SELF, DIST>(d, p, sh, px);
  acc_t acc[C];
  const acc_t wsum = fast_sums<C, SELF>(w, d, acc);
  const int64_t plane = d.H * d.W, pix = int64_t(px.y) * d.W + px.x, at = px.n * C * plane + pix;
#pragma unroll
  for (int c = 0; c < C; ++c) out[at + c * plane] = static_cast<scalar_t>(acc[c] / wsum);
  if (norm != nullptr) norm[px.n * plane + pix] = wsum;
}

// Pass 1 as filter_pass1_kernel's, on the fast window.
template <typename scalar_t, int C, int CG, bool SELF, int DIST>
__global__ void __launch_bounds__(launch::kFilterThreads,
                                  launch::filter_fast_min_blocks(sizeof(acc_type<scalar_t>)))
    filter_pass1_fast_kernel(Dims d, Inputs<scalar_t> p, Pass1Out<scalar_t> o) {
  using acc_t = acc_type<scalar_t>;
  extern __shared__ double smem_d[];
  acc_t* sh = reinterpret_cast<acc_t*>(smem_d);
  const Pixel px = stage_fast<C, CG, SELF>(d, p, sh);
  const int area = (kTW + d.kx - 1) * (kTH + d.ky - 1);
  // The reduction buffer follows the window and the table (both 8-byte aligned).
  double* red = reinterpret_cast<double*>(
      sh + aligned_values<acc_t>((SELF ? C : C + CG) * area) + aligned_values<acc_t>(d.ky + d.kx));
  double sums[3] = {0, 0, 0};
  if (px.active) {
    const auto w = fast_window<C, CG, SELF, DIST>(d, p, sh, px);
    const int64_t plane = d.H * d.W, pix = int64_t(px.y) * d.W + px.x, at = px.n * C * plane + pix;
    acc_t acc[C];
    const acc_t wsum = fast_sums<C, SELF>(w, d, acc);
    acc_t gp[C], a = 0;
#pragma unroll
    for (int c = 0; c < C; ++c) {
      gp[c] = ldg(o.go + at + c * plane) / wsum;
      o.gp[at + c * plane] = gp[c];
      a += gp[c] * (acc[c] / wsum);
    }
    o.a[px.n * plane + pix] = a;
    if (o.partials != nullptr) {
      // The sigma sums need e w per tap: a second sweep.
      for (int ty = 0; ty < d.ky; ++ty) {
        const acc_t row_sp = w.tab[ty];
        acc_t ew_row = 0;
        for (int tx = 0; tx < d.kx; ++tx) {
          const int o_t = ty * w.sw + tx;
          acc_t gt[CG], dist;
          const acc_t wt = w.weight(o_t, row_sp + w.tab[d.ky + tx], gt, dist);
          acc_t e = -a;
#pragma unroll
          for (int c = 0; c < C; ++c) e += gp[c] * (SELF ? gt[c] : w.v[c * w.area + o_t]);
          const acc_t ew = e * wt;
          ew_row += ew;
          sums[0] += static_cast<double>(ew * distance_finish(dist, DIST));
          sums[2] += static_cast<double>(ew * acc_t((tx - d.px) * (tx - d.px)));
        }
        sums[1] += static_cast<double>(ew_row) * double((ty - d.py) * (ty - d.py));
      }
    }
  }
  if (o.partials != nullptr) block_partials(red, sums, o.partials);  // uniform across the block
}

// Pass 2 as filter_pass2_kernel's for a 32 x 8 tile of padded positions q per block. The partners
// p = q - t (t the tap) of the tile span the window of rows qy0 - ky + 1 .. qy0 + 7 and columns
// qx0 - kx + 1 .. qx0 + 31 (image coordinates); it holds their guide (and the joint input) through
// the border maps where the padded image reaches (zeros past it, never read), and their gp and a
// (zeros outside the image: a partner that is no centre has no e_pq and no value term); the joint
// input only for the guidance gradient (the plan's filter_pass2_tile_bytes). A
// thread's taps are those whose partner is a centre, or all of them when q is itself a centre
// whose range gradient is wanted (its e_qp, from its own gp and a, which the window holds too).
template <typename scalar_t, int C, int CG, bool SELF, int DIST>
__global__ void __launch_bounds__(launch::kFilterThreads,
                                  launch::filter_fast_min_blocks(sizeof(acc_type<scalar_t>)))
    filter_pass2_fast_kernel(Dims d, Inputs<scalar_t> p, Pass2Args<scalar_t> o) {
  using acc_t = acc_type<scalar_t>;
  extern __shared__ double smem_d[];
  acc_t* sh = reinterpret_cast<acc_t*>(smem_d);
  const int64_t per_image = d.qtiles_x * d.qtiles_y, t = blockIdx.x;
  const int64_t n = t / per_image;
  const int by = static_cast<int>((t % per_image) / d.qtiles_x), bx = static_cast<int>(t % d.qtiles_x);
  const int sw = kTW + d.kx - 1, shh = kTH + d.ky - 1, area = sw * shh;
  const int oy = by * kTH - (d.ky - 1), ox = bx * kTW - (d.kx - 1);
  const int64_t plane = d.H * d.W;
  // Planes: guide (CG), gp (C), a, then the input (C; a joint filter's, for e_qp).
  constexpr int kIn = CG + C + 1;
  const bool stage_input = !SELF && o.need_range;
  const int planes = stage_input ? kIn + C : kIn;
  for (int r = threadIdx.y; r < shh; r += kTH) {
    const int y = oy + r;
    const int64_t my = y >= -d.py && y < d.H + d.py ? border_index(y, d.H, d.border) : -1;
    for (int c = threadIdx.x; c < sw; c += kTW) {
      const int x = ox + c;
      const int64_t mx = x >= -d.px && x < d.W + d.px ? border_index(x, d.W, d.border) : -1;
      const bool reads = my >= 0 && mx >= 0;
      const int64_t src = reads ? my * d.W + mx : 0;
      const bool in = y >= 0 && y < d.H && x >= 0 && x < d.W;
      const int64_t at = in ? int64_t(y) * d.W + x : 0;
      const int i = r * sw + c;
#pragma unroll
      for (int ch = 0; ch < CG; ++ch) sh[ch * area + i] = reads ? ldg(p.gd + (n * CG + ch) * plane + src) : acc_t(0);
#pragma unroll
      for (int ch = 0; ch < C; ++ch) sh[(CG + ch) * area + i] = in ? o.gp[(n * C + ch) * plane + at] : acc_t(0);
      sh[(CG + C) * area + i] = in ? o.a[n * plane + at] : acc_t(0);
      if (stage_input) {
#pragma unroll
        for (int ch = 0; ch < C; ++ch) sh[(kIn + ch) * area + i] = reads ? ldg(p.in + (n * C + ch) * plane + src) : acc_t(0);
      }
    }
  }
  const acc_t* tab = sh + aligned_values<acc_t>(planes * area);
  const Sigmas<acc_t> s = sigmas(p, n);
  stage_spatial(d, s, sh + aligned_values<acc_t>(planes * area));
  __syncthreads();
  const int qy = by * kTH + threadIdx.y, qx = bx * kTW + threadIdx.x;
  if (qy >= d.Hp || qx >= d.Wp) return;
  const int64_t iy = border_index(int64_t(qy) - d.py, d.H, d.border);
  const int64_t ix = border_index(int64_t(qx) - d.px, d.W, d.border);
  acc_t val[C] = {}, rng[CG] = {};
  if (iy >= 0 && ix >= 0) {  // a constant border reads zeros: its gradient is unused
    const int64_t at = iy * d.W + ix;
    acc_t gq[CG], iq[C];
#pragma unroll
    for (int c = 0; c < CG; ++c) gq[c] = ldg(p.gd + (n * CG + c) * plane + at);
#pragma unroll
    for (int c = 0; c < C; ++c) iq[c] = SELF ? gq[c] : ldg(p.in + (n * C + c) * plane + at);
    const acc_t nrc = -s.rc * FastExp<acc_t>::kScale;
    // q as a centre: its gp and a are the window's at tap (py, px) (zeros when q is no centre).
    const bool qc = o.need_range && qy >= d.py && qy < d.py + d.H && qx >= d.px && qx < d.px + d.W;
    const int own = (threadIdx.y + d.ky - 1 - d.py) * sw + threadIdx.x + d.kx - 1 - d.px;
    acc_t gpq[C];
#pragma unroll
    for (int c = 0; c < C; ++c) gpq[c] = sh[(CG + c) * area + own];
    const acc_t aq = sh[(CG + C) * area + own];
    // Taps whose partner row qy - ty and column qx - tx lie in the image, or every tap for a centre.
    const int ty_lo = qc ? 0 : max(0, qy - static_cast<int>(d.H) + 1), ty_hi = qc ? d.ky - 1 : min(d.ky - 1, qy);
    const int tx_lo = qc ? 0 : max(0, qx - static_cast<int>(d.W) + 1), tx_hi = qc ? d.kx - 1 : min(d.kx - 1, qx);
    for (int ty = ty_lo; ty <= ty_hi; ++ty) {
      const acc_t row_sp = tab[ty];
      // The window entry of tap (ty, 0)'s partner; tap tx's is tx entries left of it.
      const acc_t* row = sh + (threadIdx.y + d.ky - 1 - ty) * sw + threadIdx.x + d.kx - 1;
      for (int tx = tx_lo; tx <= tx_hi; ++tx) {
        const acc_t* cp = row - tx;
        acc_t delta[CG], dist = 0;
#pragma unroll
        for (int c = 0; c < CG; ++c) {
          delta[c] = gq[c] - cp[c * area];
          dist += distance_term(delta[c], DIST);
        }
        const acc_t wt = FastExp<acc_t>::eval(distance_finish(dist, DIST) * nrc + (row_sp + tab[d.ky + tx]));
        if (o.need_value) {
#pragma unroll
          for (int c = 0; c < C; ++c) val[c] += wt * cp[(CG + c) * area];
        }
        if (o.need_range) {
          // e_pq + e_qp: gp_p . I_q - a_p (zero for a partner outside the image) and
          // gp_q . I_p - a_q (zero unless q is a centre).
          acc_t e = -(cp[(CG + C) * area] + aq);
#pragma unroll
          for (int c = 0; c < C; ++c) {
            e += cp[(CG + c) * area] * iq[c];
            e += gpq[c] * cp[(SELF ? c : kIn + c) * area];
          }
          const acc_t h = -s.rc * e * wt;
#pragma unroll
          for (int c = 0; c < CG; ++c) rng[c] += h * distance_slope(delta[c], dist, DIST);
        }
      }
    }
  }
  const int64_t q = int64_t(qy) * d.Wp + qx, pplane = d.Hp * d.Wp;
  if (o.gin != nullptr) {
#pragma unroll
    for (int c = 0; c < C; ++c) o.gin[(n * C + c) * pplane + q] = val[c] + (SELF ? rng[c] : acc_t(0));
  }
  if (o.ggd != nullptr) {
#pragma unroll
    for (int c = 0; c < CG; ++c) o.ggd[(n * CG + c) * pplane + q] = rng[c];
  }
}

// Calls f(C, CG, SELF, DIST), each a std::integral_constant, for the fast paths' configuration of
// shape s (launch::filter_fast_channels holds).
template <typename F>
void dispatch_fast(const FilterShape& s, F&& f) {
  using One = std::integral_constant<int, 1>;
  using Three = std::integral_constant<int, 3>;
  const auto by_distance = [&](auto c, auto cg, auto self) {
    if (s.distance == kL1) {
      f(c, cg, self, std::integral_constant<int, kL1>());
    } else {
      f(c, cg, self, std::integral_constant<int, kL2>());
    }
  };
  const auto by_guide = [&](auto c) {
    if (s.self) {
      by_distance(c, c, std::true_type());
    } else if (s.Cg == 1) {
      by_distance(c, One(), std::false_type());
    } else {
      by_distance(c, Three(), std::false_type());
    }
  };
  if (s.C == 1) {
    by_guide(One());
  } else {
    by_guide(Three());
  }
}

// ---------------------------------------------------------------------------------------------
// Launchers

launch::FilterPlan plan_for(const FilterShape& s, const at::Tensor& input, bool backward,
                            const std::array<bool, 4>& mask, bool saved = false) {
  const int64_t acc = input.scalar_type() == at::kDouble ? 8 : 4;
  const bool m[4] = {mask[0], mask[1], mask[2], mask[3]};
  launch::FilterPlan plan = launch::filter_plan(launch::FilterSizes{s.N, s.C, s.Cg, s.H, s.W, s.ky, s.kx, s.self},
                                                acc, backward, m, saved);
  TORCH_CHECK(plan.valid, "bilateral_filter: a ", s.H, "x", s.W, " image of batch ", s.N,
              " is too large for one CUDA launch");
  return plan;
}

Dims dims_for(const FilterShape& s, const launch::FilterPlan& plan) {
  return Dims{s.N, s.C, s.Cg, s.H, s.W, s.H + s.ky - 1, s.W + s.kx - 1, plan.tiles_x, plan.tiles_y,
              plan.pass2_tiles_x, plan.pass2_tiles_y, static_cast<int>(s.ky), static_cast<int>(s.kx),
              static_cast<int>(s.py), static_cast<int>(s.px), s.border, s.distance, s.self, plan.tiled};
}

// The filter, and with want_norm the weight sums W too (else an empty norm).
std::tuple<at::Tensor, at::Tensor> filter_forward(const at::Tensor& input_in, const c10::optional<at::Tensor>& guidance,
                                                  at::IntArrayRef kernel_size, const at::Tensor& sigma_color,
                                                  const at::Tensor& sigma_space, c10::string_view border_type,
                                                  c10::string_view color_distance_type, bool want_norm) {
  const FilterShape s = check_filter(input_in, guidance, kernel_size, sigma_color, sigma_space,
                                     std::string(border_type), std::string(color_distance_type));
  const c10::cuda::CUDAGuard device_guard(input_in.device());
  at::Tensor norm = want_norm ? at::empty({s.N, s.H, s.W}, input_in.options().dtype(filter_norm_dtype(input_in.scalar_type())))
                              : at::Tensor();
  if (s.pixels() == 0 || s.C == 0) return {at::empty(input_in.sizes(), input_in.options()), norm.defined() ? norm.fill_(1) : norm};
  const at::Tensor input = input_in.contiguous();
  const at::Tensor gd = s.self ? input : guidance->contiguous();
  const at::Tensor sc = sigma_color.contiguous(), ss = sigma_space.contiguous();
  at::Tensor out = at::empty(input.sizes(), input.options());
  const launch::FilterPlan plan = plan_for(s, input, false, {false, false, false, false});
  const Dims d = dims_for(s, plan);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bilateral_filter_cuda", [&] {
    const Inputs<scalar_t> p{input.data_ptr<scalar_t>(), gd.data_ptr<scalar_t>(), sc.data_ptr<scalar_t>(),
                             ss.data_ptr<scalar_t>()};
    acc_type<scalar_t>* np = want_norm ? norm.data_ptr<acc_type<scalar_t>>() : nullptr;
    if (plan.fast) {
      dispatch_fast(s, [&](auto c, auto cg, auto self, auto dist) {
        const auto kernel = filter_forward_fast_kernel<scalar_t, decltype(c)::value, decltype(cg)::value,
                                                       decltype(self)::value, decltype(dist)::value>;
        BO_LAUNCH(kernel, plan.forward, stream, d, p, out.data_ptr<scalar_t>(), np);
      });
    } else {
      BO_LAUNCH(filter_forward_kernel<scalar_t>, plan.forward, stream, d, p, out.data_ptr<scalar_t>(), np);
    }
  });
  return {out, norm};
}

at::Tensor bilateral_filter(const at::Tensor& input, const c10::optional<at::Tensor>& guidance,
                            at::IntArrayRef kernel_size, const at::Tensor& sigma_color,
                            const at::Tensor& sigma_space, c10::string_view border_type,
                            c10::string_view color_distance_type) {
  return std::get<0>(
      filter_forward(input, guidance, kernel_size, sigma_color, sigma_space, border_type, color_distance_type, false));
}

std::tuple<at::Tensor, at::Tensor> bilateral_filter_forward(const at::Tensor& input,
                                                            const c10::optional<at::Tensor>& guidance,
                                                            at::IntArrayRef kernel_size, const at::Tensor& sigma_color,
                                                            const at::Tensor& sigma_space, c10::string_view border_type,
                                                            c10::string_view color_distance_type) {
  return filter_forward(input, guidance, kernel_size, sigma_color, sigma_space, border_type, color_distance_type, true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bilateral_filter_backward(
    const at::Tensor& grad_output_in, const at::Tensor& input_in, const c10::optional<at::Tensor>& guidance,
    at::IntArrayRef kernel_size, const at::Tensor& sigma_color, const at::Tensor& sigma_space,
    c10::string_view border_type, c10::string_view color_distance_type, std::array<bool, 4> mask,
    const c10::optional<at::Tensor>& output, const c10::optional<at::Tensor>& norm) {
  const FilterShape s = check_filter(input_in, guidance, kernel_size, sigma_color, sigma_space,
                                     std::string(border_type), std::string(color_distance_type));
  check_filter_grad_output(grad_output_in, input_in);
  check_filter_mask(s, mask);
  const bool saved = check_filter_saved(output, norm, input_in);
  const c10::cuda::CUDAGuard device_guard(input_in.device());
  const at::Tensor& gd_like = s.self ? input_in : *guidance;
  at::Tensor grad_input = zero_or_masked(mask[0], input_in);
  at::Tensor grad_guidance = zero_or_masked(mask[1], gd_like);
  at::Tensor grad_sc = zero_or_masked(mask[2], sigma_color);
  at::Tensor grad_ss = zero_or_masked(mask[3], sigma_space);
  if (s.pixels() == 0 || s.C == 0 || !(mask[0] || mask[1] || mask[2] || mask[3])) {
    return {grad_input, grad_guidance, grad_sc, grad_ss};
  }
  const at::Tensor input = input_in.contiguous();
  const at::Tensor gd = s.self ? input : guidance->contiguous();
  const at::Tensor go = grad_output_in.contiguous();
  const at::Tensor sc = sigma_color.contiguous(), ss = sigma_space.contiguous();
  const launch::FilterPlan plan = plan_for(s, input, true, mask, saved);
  const Dims d = dims_for(s, plan);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool need_range = (s.self && mask[0]) || mask[1];
  const bool need_sigma = mask[2] || mask[3];
  // Pass 1 pixel by pixel from the forward's output and W (the plan says when).
  const at::Tensor out_saved = plan.centre ? output->contiguous() : at::Tensor();
  const at::Tensor norm_saved = plan.centre ? norm->contiguous() : at::Tensor();
  const auto acc_dtype = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::TensorOptions acc_opt = input.options().dtype(acc_dtype);
  at::Tensor gp = at::empty({s.N, s.C, s.H, s.W}, acc_opt);
  at::Tensor av = at::empty({s.N, s.H, s.W}, acc_opt);
  at::Tensor partials = need_sigma ? at::empty({plan.pass1.grid.x, 3}, input.options().dtype(at::kDouble)) : at::Tensor();
  at::Tensor gin = mask[0] ? at::empty({s.N, s.C, d.Hp, d.Wp}, acc_opt) : at::Tensor();
  at::Tensor ggd = (mask[1] && !s.self) ? at::empty({s.N, s.Cg, d.Hp, d.Wp}, acc_opt) : at::Tensor();
  if (need_sigma) {
    if (mask[2]) grad_sc = at::empty(sigma_color.sizes(), sigma_color.options());
    if (mask[3]) grad_ss = at::empty(sigma_space.sizes(), sigma_space.options());
  }
  if (mask[0]) grad_input = at::empty(input.sizes(), input.options());
  if (mask[1] && !s.self) grad_guidance = at::empty(gd.sizes(), gd.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bilateral_filter_backward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const Inputs<scalar_t> p{input.data_ptr<scalar_t>(), gd.data_ptr<scalar_t>(), sc.data_ptr<scalar_t>(),
                             ss.data_ptr<scalar_t>()};
    const Pass1Out<scalar_t> o1{go.data_ptr<scalar_t>(), gp.data_ptr<acc_t>(), av.data_ptr<acc_t>(),
                                need_sigma ? partials.data_ptr<double>() : nullptr};
    if (plan.centre) {
      BO_LAUNCH(filter_centre_kernel<scalar_t>, plan.pass1, stream, d, go.data_ptr<scalar_t>(),
                out_saved.data_ptr<scalar_t>(), norm_saved.data_ptr<acc_t>(), gp.data_ptr<acc_t>(),
                av.data_ptr<acc_t>());
    } else if (plan.fast) {
      dispatch_fast(s, [&](auto c, auto cg, auto self, auto dist) {
        const auto kernel = filter_pass1_fast_kernel<scalar_t, decltype(c)::value, decltype(cg)::value,
                                                     decltype(self)::value, decltype(dist)::value>;
        BO_LAUNCH(kernel, plan.pass1, stream, d, p, o1);
      });
    } else {
      BO_LAUNCH(filter_pass1_kernel<scalar_t>, plan.pass1, stream, d, p, o1);
    }
    if (need_sigma) {
      BO_LAUNCH(filter_finish_kernel<scalar_t>, plan.finish, stream, d, p, partials.data_ptr<double>(),
                       mask[2] ? grad_sc.data_ptr<scalar_t>() : nullptr,
                       mask[3] ? grad_ss.data_ptr<scalar_t>() : nullptr);
    }
    if (!(mask[0] || mask[1])) return;
    const Pass2Args<scalar_t> o2{gp.data_ptr<acc_t>(), av.data_ptr<acc_t>(), mask[0] ? gin.data_ptr<acc_t>() : nullptr,
                                 ggd.defined() ? ggd.data_ptr<acc_t>() : nullptr, mask[0], need_range};
    if (plan.fast_pass2) {
      dispatch_fast(s, [&](auto c, auto cg, auto self, auto dist) {
        const auto kernel = filter_pass2_fast_kernel<scalar_t, decltype(c)::value, decltype(cg)::value,
                                                     decltype(self)::value, decltype(dist)::value>;
        BO_LAUNCH(kernel, plan.pass2, stream, d, p, o2);
      });
    } else {
      BO_LAUNCH(filter_pass2_kernel<scalar_t>, plan.pass2, stream, d, p, o2);
    }
    // The fold of `channels` padded planes into out.
    const auto fold = [&](const launch::Launch& l, int64_t channels, const acc_t* padded, scalar_t* out) {
      if (s.N * channels * s.H * s.W < (int64_t{1} << 31)) {
        const FoldDivs v{FastDiv(static_cast<uint32_t>(s.H * s.W)), FastDiv(static_cast<uint32_t>(s.W))};
        BO_LAUNCH((filter_fold_kernel<scalar_t, true>), l, stream, d, channels, v, padded, out);
      } else {
        BO_LAUNCH((filter_fold_kernel<scalar_t, false>), l, stream, d, channels, FoldDivs{}, padded, out);
      }
    };
    if (mask[0]) fold(plan.fold_input, s.C, gin.data_ptr<acc_t>(), grad_input.data_ptr<scalar_t>());
    if (mask[1] && !s.self) fold(plan.fold_guidance, s.Cg, ggd.data_ptr<acc_t>(), grad_guidance.data_ptr<scalar_t>());
  });
  return {grad_input, grad_guidance, grad_sc, grad_ss};
}

}  // namespace
}  // namespace cuda
}  // namespace bilateral_ops

TORCH_LIBRARY_IMPL(bilateral_ops, CUDA, m) {
  m.impl("bilateral_filter", &bilateral_ops::cuda::bilateral_filter);
  m.impl("_bilateral_filter_forward", &bilateral_ops::cuda::bilateral_filter_forward);
  m.impl("_bilateral_filter_backward", &bilateral_ops::cuda::bilateral_filter_backward);
}
