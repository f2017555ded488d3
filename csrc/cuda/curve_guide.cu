// CUDA kernels of curve_guide and _curve_guide_backward (csrc/ops.cpp has the schemas,
// bilateral_ops/curve_guide.h the per-pixel formula shared with the CPU, launch_config.h the
// launch plans). Grid-stride loops: the forward takes four pixels a thread when a pixel's channels
// fit in registers and the table in shared memory (curve_forward_group_kernel), one otherwise;
// the backward one. The parameters are read as one table in the accumulation type (float for
// float16 / bfloat16 / float32, double for float64), from shared memory when it fits. The group
// kernels evaluate each channel's curve through its sorted knots (curve_guide.h), which a block
// builds once in shared memory.
//
// Parameter gradients: curve_backward_group_kernel (HDRNet's shapes in float math) sums them in
// registers per thread over all its pixels and reduces them over the block once. Otherwise every
// warp sums each contribution over its 32 pixels with shuffles and adds it to its own row (lane 0,
// no contention), and the block adds its warps' rows in warp order. Either way
// curve_reduce_kernel adds the blocks' rows in a fixed order. The number of blocks and the
// assignment of pixels to threads depend on the sizes only, and there are no atomics, so the
// gradients are bitwise reproducible (torch's deterministic mode needs nothing more).
//
// With C <= kCurveRegChannels a pixel's channels and its input gradient live in registers; with
// more channels the channels are re-read (L1 hits) and the per-channel gradient dc is written to a
// scratch tensor, from which the launcher forms the input gradient ccm^T dc with one einsum.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "../checks.h"
#include "../curve_guide_table.h"
#include "bilateral_ops/curve_guide.h"
#include "common.cuh"
#include "launch.cuh"
#include "launch_config.h"

namespace bilateral_ops {
namespace cuda {
namespace {

template <typename scalar_t>
struct CurveKernelArgs {
  using acc_t = acc_type<scalar_t>;
  CurveLayout l;
  int64_t HW, pixels;
  const scalar_t* input;        // (N, C, HW)
  const scalar_t* grad_output;  // (N, HW), backward
  scalar_t* output;             // (N, HW), forward
  scalar_t* grad_input;         // (N, C, HW), backward with need_input and registers
  acc_t* dc;                    // (N, C, HW), backward with need_input without registers
  const acc_t* table;           // (P,) in global memory: the backward, and a forward whose table
                                // does not fit in shared memory
  const scalar_t* params[6];    // the forward's contiguous ccm, ccm_bias, shifts, slopes, mix,
                                // mix_bias, gathered by each block into its shared table
  acc_t* partial;               // backward with need_params: zeroed (partial_rows, P)
  bool table_shared, rows_shared, need_input, need_params;
  bool small;   // pixels < 2^31: the image of a pixel from hw's multiply-high
  FastDiv hw;   // HW, when small
};

// The image of pixel p: a multiply-high instead of a 64-bit division (some seventy instructions,
// a large share of a pixel's work here) whenever the pixel indices fit in 31 bits.
template <typename scalar_t>
__device__ __forceinline__ int64_t image_of(const CurveKernelArgs<scalar_t>& a, int64_t p) {
  return a.small ? static_cast<int64_t>(a.hw.div(static_cast<uint32_t>(p))) : p / a.HW;
}

// The fields every launcher fills the same way.
template <typename scalar_t>
void set_sizes(CurveKernelArgs<scalar_t>& a, const CurveShape& sh) {
  a.l = sh.layout();
  a.HW = sh.H * sh.W;
  a.pixels = sh.pixels();
  a.small = a.pixels < (int64_t{1} << 31);
  if (a.small) a.hw = FastDiv(static_cast<uint32_t>(a.HW));
}

// The parameter table every thread reads: copied to the front of the dynamic shared buffer when
// the plan says so. Every thread of the block must call it (it synchronises).
template <typename acc_t>
__device__ __forceinline__ const acc_t* block_table(const acc_t* table, int64_t P, bool shared,
                                                    acc_t* smem) {
  if (!shared) return table;
  for (int64_t q = threadIdx.x; q < P; q += blockDim.x) smem[q] = table[q];
  __syncthreads();
  return smem;
}

// The forward's shared table, gathered by the block from the six parameters in the table's order
// (curve_guide.h's CurveLayout), converted as curve_table converts them: no packed copy made on
// the host, so a call is one launch (the copy was a second kernel, and an at::cat on the host
// every call). Every thread of the block must call it (it synchronises).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ const acc_t* block_table_from_params(const CurveKernelArgs<scalar_t>& a,
                                                                acc_t* smem) {
  const CurveLayout& l = a.l;
  const int64_t begin[7] = {l.ccm(),   l.ccm_bias(), l.shifts(), l.slopes(),
                            l.mix(),   l.mix_bias(), l.size()};
#pragma unroll
  for (int s = 0; s < 6; ++s) {
    const scalar_t* src = a.params[s];
    const int64_t b = begin[s], n = begin[s + 1] - begin[s];
    for (int64_t q = threadIdx.x; q < n; q += blockDim.x) smem[b + q] = static_cast<acc_t>(src[q]);
  }
  __syncthreads();
  return smem;
}

// Every channel's curve through its sorted knots (curve_guide.h), built by the block from the
// shared table into `sorted` (C K values) and `pq` (C 2 (K + 1)). Returns, the same on every
// thread, whether the block may use them: every shift and slope finite (so that the ranks are a
// permutation) and every sum finite. Every thread of the block must call it (it synchronises).
template <typename acc_t>
__device__ bool block_sorted_curves(const acc_t* tb, const CurveLayout& l, acc_t* sorted,
                                    acc_t* pq) {
  const int C = static_cast<int>(l.C), K = static_cast<int>(l.K);
  const acc_t* shifts = tb + l.shifts();
  const acc_t* slopes = tb + l.slopes();
  int finite = 1;
  for (int t = threadIdx.x; t < C * K; t += blockDim.x) {
    finite &= isfinite(shifts[t]) && isfinite(slopes[t]);
  }
  if (!__syncthreads_and(finite)) return false;
  for (int t = threadIdx.x; t < C * K; t += blockDim.x) {
    const int k = t / K, j = t - k * K;
    curve_place_knot(shifts[t], slopes[t], curve_knot_rank(shifts + k * K, K, j), sorted + k * K,
                     pq + 2 * k * (K + 1));
  }
  __syncthreads();
  for (int k = threadIdx.x; k < C; k += blockDim.x) {
    acc_t* q = pq + 2 * k * (K + 1);
    curve_prefix(q, sorted + k * K, K);
    finite &= isfinite(q[2 * K]) && isfinite(q[2 * K + 1]);
  }
  return __syncthreads_and(finite);
}

// A channel's curve at c as the sum over its knots, with its slope: the values the sorted path
// does not take.
template <typename acc_t>
__device__ __forceinline__ acc_t curve_sum(acc_t c, const acc_t* sh, const acc_t* sl, int K,
                                           acc_t& fp) {
  acc_t f = 0;
  fp = 0;
  for (int t = 0; t < K; ++t) curve_point(c, sh[t], sl[t], f, fp);
  return f;
}

// A pixel's channels: in registers (kRegC > 0, C <= kRegC) or re-read from global memory.
template <typename scalar_t, int kRegC>
struct PixelChannels {
  using acc_t = acc_type<scalar_t>;
  acc_t xr[kRegC > 0 ? kRegC : 1];
  const scalar_t* x;  // channel 0 of the pixel; channel i at x[i * HW]
  int64_t HW;
  int64_t C;

  __device__ __forceinline__ void load(const scalar_t* px, int64_t hw, int64_t c, bool valid) {
    x = px;
    HW = hw;
    C = c;
    if constexpr (kRegC > 0) {
#pragma unroll
      for (int i = 0; i < kRegC; ++i) xr[i] = (valid && i < C) ? ldg(x + i * HW) : acc_t(0);
    }
  }
  // Channel i; only called with i < C, and (for kRegC > 0) from fully unrolled loops.
  __device__ __forceinline__ acc_t at(int64_t i) const {
    if constexpr (kRegC > 0) {
      return xr[i];
    } else {
      return ldg(x + i * HW);
    }
  }
};

// c_k = ccm[k] . x + ccm_bias[k]
template <typename scalar_t, int kRegC>
__device__ __forceinline__ acc_type<scalar_t> color(const acc_type<scalar_t>* tb,
                                                    const CurveLayout& l, int64_t k,
                                                    const PixelChannels<scalar_t, kRegC>& px) {
  using acc_t = acc_type<scalar_t>;
  acc_t c = tb[l.ccm_bias() + k];
  const acc_t* row = tb + l.ccm() + k * l.C;
  if constexpr (kRegC > 0) {
#pragma unroll
    for (int i = 0; i < kRegC; ++i) {
      if (i < l.C) c += row[i] * px.at(i);
    }
  } else {
    for (int64_t i = 0; i < l.C; ++i) c += row[i] * px.at(i);
  }
  return c;
}

// The guide before the clamp.
template <typename scalar_t, int kRegC>
__device__ __forceinline__ acc_type<scalar_t> pre_clamp(const acc_type<scalar_t>* tb,
                                                        const CurveLayout& l,
                                                        const PixelChannels<scalar_t, kRegC>& px) {
  using acc_t = acc_type<scalar_t>;
  acc_t g = tb[l.mix_bias()];
  for (int64_t k = 0; k < l.C; ++k) {
    const acc_t c = color(tb, l, k, px);
    const acc_t* sh = tb + l.shifts() + k * l.K;
    const acc_t* sl = tb + l.slopes() + k * l.K;
    acc_t f = 0;
    for (int64_t j = 0; j < l.K; ++j) curve_value(c, sh[j], sl[j], f);
    g += tb[l.mix() + k] * f;
  }
  return g;
}

// The forward of the shapes curve_forward_group_kernel does not take (more channels than
// registers hold, or a table too large for shared memory): one pixel a thread, its channels
// re-read.
template <typename scalar_t>
__global__ void __launch_bounds__(launch::kCurveThreads, launch::kCurveMinBlocks)
    curve_forward_kernel(const CurveKernelArgs<scalar_t> a) {
  using acc_t = acc_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const acc_t* tb = a.table_shared
                         ? block_table_from_params(a, reinterpret_cast<acc_t*>(smem_raw))
                         : a.table;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < a.pixels;
       p += stride) {
    const int64_t n = image_of(a, p), s = p - n * a.HW;
    PixelChannels<scalar_t, 0> px;
    px.load(a.input + n * a.l.C * a.HW + s, a.HW, a.l.C, true);
    a.output[p] = static_cast<scalar_t>(curve_clamp01(pre_clamp(tb, a.l, px)));
  }
}

// kN consecutive elements, for one vector load or store.
template <typename T, int kN>
struct alignas(sizeof(T) * kN) Pack {
  T v[kN];
};

// The forward for C = kC <= kCurveRegChannels with the table in shared memory: each thread takes
// kCurveGroup consecutive pixels, so every parameter read serves all of them (at one pixel per
// thread the loop is bound by those reads, not by memory). kK > 0 compiles the number of curve
// points in (HDRNet's 16: the loop unrolls into loads at fixed offsets), 0 reads it at run time.
// kVec: the image planes hold whole groups (HW a multiple of the group, aligned pointers) and each
// channel of a group is one vector load; else the pixels are read one by one and may straddle two
// images. Each channel's curve comes from the block's sorted knots (a binary search and one
// multiply-add a pixel instead of K points; the kernel was bound by that arithmetic); a block with
// a non-finite parameter, and a pixel with a non-finite channel value, take the sums in
// pre_clamp's order.
template <typename scalar_t, int kC, int kK, bool kVec>
__global__ void __launch_bounds__(launch::kCurveThreads,
                                  launch::curve_forward_group_min_blocks(sizeof(acc_type<scalar_t>)))
    curve_forward_group_kernel(const CurveKernelArgs<scalar_t> a) {
  using acc_t = acc_type<scalar_t>;
  constexpr int kG = launch::kCurveGroup;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const CurveLayout l = a.l;
  // The plan takes this kernel only with the table in shared memory.
  const acc_t* tb = block_table_from_params(a, reinterpret_cast<acc_t*>(smem_raw));
  const int K = kK > 0 ? kK : static_cast<int>(l.K);
  acc_t* sorted = reinterpret_cast<acc_t*>(smem_raw) + l.size();
  acc_t* pq = sorted + kC * K;
  const bool use_sorted = block_sorted_curves(tb, l, sorted, pq);
  // Table offsets from the compile-time sizes: constants when kK > 0.
  constexpr int kCcm = 0, kBias = kC * kC, kShifts = kC * kC + kC;
  const int slopes = kShifts + kC * K, mix = kShifts + 2 * kC * K, mix_bias = mix + kC;
  const int64_t groups = (a.pixels + kG - 1) / kG;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < groups; q += stride) {
    const int64_t p0 = q * kG;
    acc_t x[kC][kG];
    if constexpr (kVec) {
      const int64_t n = image_of(a, p0), s = p0 - n * a.HW;
      const scalar_t* px = a.input + n * kC * a.HW + s;
#pragma unroll
      for (int i = 0; i < kC; ++i) {
        const Pack<scalar_t, kG> v = *reinterpret_cast<const Pack<scalar_t, kG>*>(px + i * a.HW);
#pragma unroll
        for (int j = 0; j < kG; ++j) x[i][j] = static_cast<acc_t>(v.v[j]);
      }
    } else {
#pragma unroll
      for (int j = 0; j < kG; ++j) {
        const int64_t p = p0 + j;
        const bool valid = p < a.pixels;
        const int64_t n = valid ? image_of(a, p) : 0, s = valid ? p - n * a.HW : 0;
#pragma unroll
        for (int i = 0; i < kC; ++i) x[i][j] = valid ? ldg(a.input + (n * kC + i) * a.HW + s) : acc_t(0);
      }
    }
    acc_t g[kG];
#pragma unroll
    for (int j = 0; j < kG; ++j) g[j] = tb[mix_bias];
#pragma unroll
    for (int k = 0; k < kC; ++k) {
      acc_t c[kG], f[kG];
#pragma unroll
      for (int j = 0; j < kG; ++j) {
        c[j] = tb[kBias + k];
#pragma unroll
        for (int i = 0; i < kC; ++i) c[j] += tb[kCcm + k * kC + i] * x[i][j];
        f[j] = 0;
      }
      const acc_t* sh = tb + kShifts + k * K;
      const acc_t* sl = tb + slopes + k * K;
      if (use_sorted) {
        // Every pixel's search first, with no branch between them, so that the four chains of
        // dependent shared loads overlap; then the rare pixels with a non-finite value.
        const acc_t* sk = sorted + k * K;
        const acc_t* pk = pq + 2 * k * (K + 1);
        bool finite = true;
#pragma unroll
        for (int j = 0; j < kG; ++j) {
          f[j] = curve_sorted_value(c[j], sk, pk, K);
          finite = finite && isfinite(c[j]);
        }
        if (!finite) {
#pragma unroll
          for (int j = 0; j < kG; ++j) {
            acc_t fp;
            if (!isfinite(c[j])) f[j] = curve_sum(c[j], sh, sl, K, fp);
          }
        }
      } else {
#pragma unroll 4
        for (int t = 0; t < K; ++t) {
          const acc_t shift = sh[t], slope = sl[t];
#pragma unroll
          for (int j = 0; j < kG; ++j) curve_value(c[j], shift, slope, f[j]);
        }
      }
      const acc_t m = tb[mix + k];
#pragma unroll
      for (int j = 0; j < kG; ++j) g[j] += m * f[j];
    }
    if constexpr (kVec) {
      Pack<scalar_t, kG> v;
#pragma unroll
      for (int j = 0; j < kG; ++j) v.v[j] = static_cast<scalar_t>(curve_clamp01(g[j]));
      *reinterpret_cast<Pack<scalar_t, kG>*>(a.output + p0) = v;
    } else {
#pragma unroll
      for (int j = 0; j < kG; ++j) {
        if (p0 + j < a.pixels) a.output[p0 + j] = static_cast<scalar_t>(curve_clamp01(g[j]));
      }
    }
  }
}

// Adds v, summed over the warp, to row[q]. Every lane must call it.
template <typename acc_t>
__device__ __forceinline__ void warp_add(acc_t* row, int64_t q, acc_t v, int lane) {
  v = warp_sum(v);
  if (lane == 0) row[q] += v;
}

template <typename scalar_t, int kRegC>
__global__ void __launch_bounds__(launch::kCurveThreads, launch::kCurveMinBlocks)
    curve_backward_kernel(const CurveKernelArgs<scalar_t> a) {
  using acc_t = acc_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);
  const CurveLayout l = a.l;
  const int64_t P = l.size(), C = l.C, K = l.K;
  const acc_t* tb = block_table(a.table, P, a.table_shared, smem);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
  // This warp's gradient row: in shared memory after the table, or its own row of `partial`.
  acc_t* rows = smem + (a.table_shared ? P : 0);
  acc_t* row = nullptr;
  if (a.need_params) {
    if (a.rows_shared) {
      for (int64_t q = threadIdx.x; q < warps * P; q += blockDim.x) rows[q] = 0;
      row = rows + warp * P;
    } else {
      row = a.partial + (static_cast<int64_t>(blockIdx.x) * warps + warp) * P;
    }
  }
  __syncthreads();

  const int64_t step = static_cast<int64_t>(gridDim.x) * warps * 32;
  // The loop bound is the same for every lane of a warp: all of them reach the shuffles.
  for (int64_t base = (static_cast<int64_t>(blockIdx.x) * warps + warp) * 32; base < a.pixels;
       base += step) {
    const int64_t p = base + lane;
    const bool valid = p < a.pixels;
    const int64_t n = valid ? image_of(a, p) : 0, s = valid ? p - n * a.HW : 0;
    PixelChannels<scalar_t, kRegC> px;
    px.load(a.input + n * C * a.HW + s, a.HW, C, valid);
    // Lanes past the end carry a zero gradient: they add nothing, and read nothing.
    const acc_t go = valid ? ldg(a.grad_output + p) : acc_t(0);
    const acc_t gp = valid ? curve_clamp_pass(pre_clamp(tb, l, px), go) : acc_t(0);
    if (a.need_params) warp_add(row, l.mix_bias(), gp, lane);
    acc_t dx[kRegC > 0 ? kRegC : 1];
#pragma unroll
    for (int i = 0; i < (kRegC > 0 ? kRegC : 1); ++i) dx[i] = 0;
    for (int64_t k = 0; k < C; ++k) {
      const acc_t c = valid ? color(tb, l, k, px) : acc_t(0);
      const acc_t* sh = tb + l.shifts() + k * K;
      const acc_t* sl = tb + l.slopes() + k * K;
      acc_t f = 0, fp = 0;
      for (int64_t j = 0; j < K; ++j) curve_point(c, sh[j], sl[j], f, fp);
      const acc_t df = gp * tb[l.mix() + k];
      const acc_t dc = df * fp;
      if (a.need_input) {
        if constexpr (kRegC > 0) {
          const acc_t* ccm_row = tb + l.ccm() + k * C;
#pragma unroll
          for (int i = 0; i < kRegC; ++i) {
            if (i < C) dx[i] += ccm_row[i] * dc;
          }
        } else if (valid) {
          a.dc[(n * C + k) * a.HW + s] = dc;
        }
      }
      if (a.need_params) {
        warp_add(row, l.mix() + k, gp * f, lane);
        warp_add(row, l.ccm_bias() + k, dc, lane);
        // Invalid lanes have dc = 0 (and, with registers, zero channels).
        if constexpr (kRegC > 0) {
#pragma unroll
          for (int i = 0; i < kRegC; ++i) {
            if (i < C) warp_add(row, l.ccm() + k * C + i, dc * px.at(i), lane);
          }
        } else {
          for (int64_t i = 0; i < C; ++i) {
            warp_add(row, l.ccm() + k * C + i, valid ? dc * px.at(i) : acc_t(0), lane);
          }
        }
        for (int64_t j = 0; j < K; ++j) {
          acc_t d_shift = 0, d_slope = 0;
          curve_point_grads(c, sh[j], df, d_shift, d_slope);
          warp_add(row, l.shifts() + k * K + j, d_shift, lane);
          warp_add(row, l.slopes() + k * K + j, d_slope, lane);
        }
      }
    }
    if constexpr (kRegC > 0) {
      if (a.need_input && valid) {
        scalar_t* gi = a.grad_input + n * C * a.HW + s;
#pragma unroll
        for (int i = 0; i < kRegC; ++i) {
          if (i < C) gi[i * a.HW] = static_cast<scalar_t>(dx[i]);
        }
      }
    }
  }

  if (a.need_params && a.rows_shared) {
    __syncthreads();
    acc_t* out = a.partial + static_cast<int64_t>(blockIdx.x) * P;
    for (int64_t q = threadIdx.x; q < P; q += blockDim.x) {
      acc_t sum = 0;
      for (int w = 0; w < warps; ++w) sum += rows[w * P + q];
      out[q] = sum;
    }
  }
}

// The backward of HDRNet's shapes (float math, C = kC in {1, 3}, K <= kCurveGroupMaxK, the table
// in shared memory; whatever the mask, for the same bits): each thread sums every parameter's gradient in
// registers over all of its pixels, and the block reduces them once at the end (curve_backward_
// kernel reduces each of them over its warp at every pixel, ~10 shuffles and adds per parameter
// and pixel, which dominated). A pixel's curves for the guide and its slope come from the sorted
// knots, as in the forward; the shift and slope gradients walk the knots in table order, with
// compile-time indices so that the sums stay in registers. The same pixels go to the same thread
// and the block's sums are added in a fixed order: bitwise reproducible, no atomics.
template <typename scalar_t, int kC>
__global__ void __launch_bounds__(launch::kCurveGroupThreads, launch::kCurveGroupMinBlocks)
    curve_backward_group_kernel(const CurveKernelArgs<scalar_t> a) {
  using acc_t = acc_type<scalar_t>;
  constexpr int kK = static_cast<int>(launch::kCurveGroupMaxK);
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);
  const CurveLayout l = a.l;
  // Table offsets in 32 bits, constants where they depend on kC alone (curve_guide.h's layout).
  const int P = static_cast<int>(l.size()), K = static_cast<int>(l.K);
  constexpr int kCcm = 0, kBias = kC * kC, kShifts = kC * kC + kC;
  const int slopes = kShifts + kC * K, mix = kShifts + 2 * kC * K, mix_bias = mix + kC;
  const acc_t* tb = block_table(a.table, static_cast<int64_t>(P), true, smem);
  acc_t* sorted = smem + P;
  acc_t* pq = sorted + kC * K;
  // Each channel's shifts in table order, padded to kK with +inf (no term): the gradient loop
  // reads them with no bound check.
  acc_t* padded = pq + 2 * kC * (K + 1);
  acc_t* rows = padded + kC * kK;
  for (int t = threadIdx.x; t < kC * kK; t += blockDim.x) {
    const int k = t / kK, j = t - k * kK;
    padded[t] = j < K ? tb[kShifts + k * K + j] : acc_t(INFINITY);
  }
  const bool use_sorted = block_sorted_curves(tb, l, sorted, pq);  // synchronises

  acc_t d_ccm[kC * kC], d_bias[kC], d_mix[kC], d_shift[kC][kK], d_slope[kC][kK], d_mix_bias = 0;
#pragma unroll
  for (int k = 0; k < kC; ++k) {
    d_bias[k] = 0;
    d_mix[k] = 0;
#pragma unroll
    for (int i = 0; i < kC; ++i) d_ccm[k * kC + i] = 0;
#pragma unroll
    for (int j = 0; j < kK; ++j) d_shift[k][j] = d_slope[k][j] = 0;
  }

  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < a.pixels;
       p += stride) {
    const int64_t n = image_of(a, p), s = p - n * a.HW;
    const scalar_t* px = a.input + n * kC * a.HW + s;
    acc_t x[kC];
#pragma unroll
    for (int i = 0; i < kC; ++i) x[i] = ldg(px + i * a.HW);
    const acc_t go = ldg(a.grad_output + p);
    // The guide before the clamp, summed as pre_clamp does; each channel's c, f and f' kept.
    acc_t c[kC], f[kC], fp[kC];
    bool sorted_ok = use_sorted;
#pragma unroll
    for (int k = 0; k < kC; ++k) {
      c[k] = tb[kBias + k];
#pragma unroll
      for (int i = 0; i < kC; ++i) c[k] += tb[kCcm + k * kC + i] * x[i];
      sorted_ok = sorted_ok && isfinite(c[k]);
    }
    // As in the forward: the channels' searches with no branch between them (their loads
    // overlap), then the sums where the sorted knots do not serve.
    if (use_sorted) {
#pragma unroll
      for (int k = 0; k < kC; ++k) {
        f[k] = curve_sorted_point(c[k], sorted + k * K, pq + 2 * k * (K + 1), K, fp[k]);
      }
    }
    if (!sorted_ok) {
#pragma unroll
      for (int k = 0; k < kC; ++k) {
        if (!(use_sorted && isfinite(c[k]))) {
          f[k] = curve_sum(c[k], tb + kShifts + k * K, tb + slopes + k * K, K, fp[k]);
        }
      }
    }
    acc_t g = tb[mix_bias];
#pragma unroll
    for (int k = 0; k < kC; ++k) g += tb[mix + k] * f[k];
    const acc_t gp = curve_clamp_pass(g, go);
    d_mix_bias += gp;
    acc_t dx[kC];
#pragma unroll
    for (int i = 0; i < kC; ++i) dx[i] = 0;
#pragma unroll
    for (int k = 0; k < kC; ++k) {
      const acc_t df = gp * tb[mix + k];
      const acc_t dc = df * fp[k];
      d_mix[k] += gp * f[k];
      d_bias[k] += dc;
#pragma unroll
      for (int i = 0; i < kC; ++i) {
        d_ccm[k * kC + i] += dc * x[i];
        dx[i] += tb[kCcm + k * kC + i] * dc;
      }
      if (a.need_params) {
        if (sorted_ok && isfinite(df)) {
          // c, the shifts and df finite: a knot below c adds df and (c - s) df, the others add
          // nothing (curve_point_grads adds zeros there), under one predicate: 5 instructions
          // a knot instead of 7 (relu's NaN-preserving select, a second compare).
#pragma unroll
          for (int j = 0; j < kK; ++j) {
            const acc_t am = c[k] - padded[k * kK + j];
            if (am > acc_t(0)) {
              d_shift[k][j] += df;
              d_slope[k][j] += df * am;
            }
          }
        } else {
          const acc_t* sh = tb + kShifts + k * K;
#pragma unroll
          for (int j = 0; j < kK; ++j) {
            if (j < K) curve_point_grads(c[k], sh[j], df, d_shift[k][j], d_slope[k][j]);
          }
        }
      }
    }
    if (a.need_input) {
      scalar_t* gi = a.grad_input + n * kC * a.HW + s;
#pragma unroll
      for (int i = 0; i < kC; ++i) gi[i * a.HW] = static_cast<scalar_t>(dx[i]);
    }
  }

  if (!a.need_params) return;  // the same for the whole block
  // Each sum over the warp into the warp's row, then the rows in warp order into the block's
  // row of `partial`. Every lane reaches the shuffles: K is the same for all.
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  acc_t* row = rows + warp * P;
  const auto put = [&](int q, acc_t v) {
    v = warp_sum(v);
    if (lane == 0) row[q] = v;
  };
  put(mix_bias, d_mix_bias);
#pragma unroll
  for (int k = 0; k < kC; ++k) {
    put(kBias + k, d_bias[k]);
    put(mix + k, d_mix[k]);
#pragma unroll
    for (int i = 0; i < kC; ++i) put(kCcm + k * kC + i, d_ccm[k * kC + i]);
#pragma unroll
    for (int j = 0; j < kK; ++j) {
      if (j < K) {
        put(kShifts + k * K + j, d_shift[k][j]);
        put(slopes + k * K + j, d_slope[k][j]);
      }
    }
  }
  __syncthreads();
  const int warps = blockDim.x >> 5;
  acc_t* out = a.partial + static_cast<int64_t>(blockIdx.x) * P;
  for (int q = threadIdx.x; q < P; q += blockDim.x) {
    acc_t sum = 0;
    for (int w = 0; w < warps; ++w) sum += rows[w * P + q];
    out[q] = sum;
  }
}

// out[q] = the sum of the rows' q-th entries, in double: a block per entry, each thread summing
// the rows t, t + blockDim.x, ... in order, then a tree over the threads (a fixed order, and a
// short chain of dependent loads per thread whatever the number of rows).
template <typename acc_t>
__global__ void __launch_bounds__(launch::kCurveThreads)
    curve_reduce_kernel(const acc_t* partial, int64_t rows, int64_t P, acc_t* out) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  double* buf = reinterpret_cast<double*>(smem_raw);
  const int64_t q = blockIdx.x;
  double sum = 0;
  for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) sum += static_cast<double>(partial[r * P + q]);
  buf[threadIdx.x] = sum;
  __syncthreads();
  for (int half = blockDim.x >> 1; half > 0; half >>= 1) {
    if (static_cast<int>(threadIdx.x) < half) buf[threadIdx.x] += buf[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[q] = static_cast<acc_t>(buf[0]);
}

// curve_backward_group_kernel for the plan's channel count; the plan takes it in float math only.
template <typename scalar_t>
void launch_backward_group(const launch::Launch& plan, cudaStream_t stream,
                           const CurveKernelArgs<scalar_t>& a) {
  if constexpr (std::is_same_v<acc_type<scalar_t>, float>) {
    if (a.l.C == 1) {
      BO_LAUNCH((curve_backward_group_kernel<scalar_t, 1>), plan, stream, a);
    } else {
      TORCH_CHECK(a.l.C == 3, "curve_guide: no backward group kernel for ", a.l.C, " channels");
      BO_LAUNCH((curve_backward_group_kernel<scalar_t, 3>), plan, stream, a);
    }
  } else {
    TORCH_CHECK(false, "curve_guide: the backward group kernel takes float math only");
  }
}

at::Tensor curve_guide(const at::Tensor& input_in, const at::Tensor& ccm,
                       const at::Tensor& ccm_bias, const at::Tensor& shifts,
                       const at::Tensor& slopes, const at::Tensor& mix,
                       const at::Tensor& mix_bias) {
  const CurveShape sh = check_curve_guide(input_in, ccm, ccm_bias, shifts, slopes, mix, mix_bias);
  const c10::cuda::CUDAGuard device_guard(input_in.device());
  if (sh.pixels() == 0) return at::zeros({sh.N, sh.H, sh.W}, input_in.options());
  const at::Tensor input = input_in.contiguous();
  const at::ScalarType acc = at::toOpMathType(input.scalar_type());
  at::Tensor out = at::empty({sh.N, sh.H, sh.W}, input.options());
  launch::CurveRequest req;
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, input.get_device()));
  req.sms = sms;
  const launch::CurvePlan plan =
      launch::curve_plan(sh.N, sh.C, sh.H, sh.W, sh.K, at::elementSize(acc), req);
  // A table in shared memory is gathered by the kernel from the parameters; only one too large
  // for it is packed here, for the kernel to read from global memory.
  const std::array<at::Tensor, 6> params = {ccm.contiguous(),    ccm_bias.contiguous(),
                                            shifts.contiguous(), slopes.contiguous(),
                                            mix.contiguous(),    mix_bias.contiguous()};
  const at::Tensor table =
      plan.table_shared
          ? at::Tensor()
          : curve_table(params[0], params[1], params[2], params[3], params[4], params[5], acc);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "curve_guide_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    CurveKernelArgs<scalar_t> a{};
    set_sizes(a, sh);
    a.input = input.data_ptr<scalar_t>();
    a.output = out.data_ptr<scalar_t>();
    if (table.defined()) a.table = table.data_ptr<acc_t>();
    for (int i = 0; i < 6; ++i) a.params[i] = params[i].data_ptr<scalar_t>();
    a.table_shared = plan.table_shared;
    if (plan.group) {
      // Whole groups per plane, and vector-aligned planes (a view may start anywhere).
      constexpr int64_t kG = launch::kCurveGroup;
      const bool vec = a.HW % kG == 0 &&
                       reinterpret_cast<uintptr_t>(a.input) % (kG * sizeof(scalar_t)) == 0 &&
                       reinterpret_cast<uintptr_t>(a.output) % (kG * sizeof(scalar_t)) == 0;
      // HDRNet's 16 curve points compiled in; any other count read at run time.
      const auto go = [&](auto channels) {
        constexpr int kC = decltype(channels)::value;
        if (sh.K == 16) {
          if (vec) {
            BO_LAUNCH((curve_forward_group_kernel<scalar_t, kC, 16, true>), plan.main, stream, a);
          } else {
            BO_LAUNCH((curve_forward_group_kernel<scalar_t, kC, 16, false>), plan.main, stream, a);
          }
        } else if (vec) {
          BO_LAUNCH((curve_forward_group_kernel<scalar_t, kC, 0, true>), plan.main, stream, a);
        } else {
          BO_LAUNCH((curve_forward_group_kernel<scalar_t, kC, 0, false>), plan.main, stream, a);
        }
      };
      static_assert(launch::kCurveRegChannels == 4, "one case per channel count below");
      switch (sh.C) {
        case 1: go(std::integral_constant<int, 1>{}); break;
        case 2: go(std::integral_constant<int, 2>{}); break;
        case 3: go(std::integral_constant<int, 3>{}); break;
        default: go(std::integral_constant<int, 4>{}); break;
      }
    } else {
      BO_LAUNCH(curve_forward_kernel<scalar_t>, plan.main, stream, a);
    }
  });
  return out;
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                         at::Tensor>;

Grads curve_guide_backward(const at::Tensor& grad_output_in, const at::Tensor& input_in,
                           const at::Tensor& ccm, const at::Tensor& ccm_bias,
                           const at::Tensor& shifts, const at::Tensor& slopes,
                           const at::Tensor& mix, const at::Tensor& mix_bias,
                           std::array<bool, 7> mask) {
  const CurveShape sh = check_curve_guide(input_in, ccm, ccm_bias, shifts, slopes, mix, mix_bias);
  check_floating(grad_output_in, "grad_output");
  check_same(grad_output_in, "grad_output", input_in, "input");
  TORCH_CHECK(grad_output_in.dim() == 3 && grad_output_in.size(0) == sh.N &&
                  grad_output_in.size(1) == sh.H && grad_output_in.size(2) == sh.W,
              "grad_output must have shape (", sh.N, ", ", sh.H, ", ", sh.W, "), got ",
              grad_output_in.sizes());
  const c10::cuda::CUDAGuard device_guard(input_in.device());
  const bool need_params = std::any_of(mask.begin() + 1, mask.end(), [](bool b) { return b; });
  if (sh.pixels() == 0 || !(mask[0] || need_params)) {
    return {zero_or_masked(mask[0], input_in), zero_or_masked(mask[1], ccm),
            zero_or_masked(mask[2], ccm_bias), zero_or_masked(mask[3], shifts),
            zero_or_masked(mask[4], slopes),   zero_or_masked(mask[5], mix),
            zero_or_masked(mask[6], mix_bias)};
  }
  const at::Tensor input = input_in.contiguous();
  const at::Tensor go = grad_output_in.contiguous();
  const at::ScalarType acc = at::toOpMathType(input.scalar_type());
  const at::Tensor table = curve_table(ccm, ccm_bias, shifts, slopes, mix, mix_bias, acc);
  const CurveLayout l = sh.layout();
  launch::CurveRequest req;
  req.backward = true;
  req.need_input = mask[0];
  req.need_params = need_params;
  const launch::CurvePlan plan =
      launch::curve_plan(sh.N, sh.C, sh.H, sh.W, sh.K, at::elementSize(acc), req);
  const auto acc_opts = input.options().dtype(acc);
  at::Tensor grad_input = masked_out(input);
  at::Tensor dc;
  if (mask[0]) {
    if (plan.registers) {
      grad_input = at::empty(input.sizes(), input.options());
    } else {
      dc = at::empty({sh.N, sh.C, sh.H, sh.W}, acc_opts);
    }
  }
  at::Tensor partial = need_params ? at::zeros({plan.partial_rows, l.size()}, acc_opts)
                                   : at::Tensor();
  at::Tensor row = need_params ? at::empty({l.size()}, acc_opts) : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "curve_guide_backward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    CurveKernelArgs<scalar_t> a{};
    set_sizes(a, sh);
    a.input = input.data_ptr<scalar_t>();
    a.grad_output = go.data_ptr<scalar_t>();
    a.table = table.data_ptr<acc_t>();
    a.table_shared = plan.table_shared;
    a.rows_shared = plan.rows_shared;
    a.need_input = mask[0];
    a.need_params = need_params;
    a.grad_input = (mask[0] && plan.registers) ? grad_input.data_ptr<scalar_t>() : nullptr;
    a.dc = dc.defined() ? dc.data_ptr<acc_t>() : nullptr;
    a.partial = need_params ? partial.data_ptr<acc_t>() : nullptr;
    if (plan.group) {
      launch_backward_group(plan.main, stream, a);
    } else if (plan.registers) {
      BO_LAUNCH((curve_backward_kernel<scalar_t, launch::kCurveRegChannels>), plan.main,
                      stream, a);
    } else {
      BO_LAUNCH((curve_backward_kernel<scalar_t, 0>), plan.main, stream, a);
    }
    if (need_params) {
      BO_LAUNCH(curve_reduce_kernel<acc_t>, plan.reduce, stream, partial.data_ptr<acc_t>(),
                      plan.partial_rows, l.size(), row.data_ptr<acc_t>());
    }
  });
  if (dc.defined()) {
    // The input gradient of the many-channel path: dx_i = sum_k ccm[k, i] dc_k.
    grad_input = at::einsum("ki,nkhw->nihw", {table.narrow(0, l.ccm(), l.C * l.C).view({l.C, l.C}), dc})
                     .to(input.scalar_type());
  }
  if (!need_params) row = at::zeros({l.size()}, acc_opts);  // every parameter is masked off
  const std::array<at::Tensor, 6> pg = curve_unpack_grads(row, table, l, ccm, mask);
  return {grad_input, pg[0], pg[1], pg[2], pg[3], pg[4], pg[5]};
}

}  // namespace
}  // namespace cuda
}  // namespace bilateral_ops

TORCH_LIBRARY_IMPL(bilateral_ops, CUDA, m) {
  m.impl("curve_guide", &bilateral_ops::cuda::curve_guide);
  m.impl("_curve_guide_backward", &bilateral_ops::cuda::curve_guide_backward);
}
