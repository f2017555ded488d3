// CUDA kernels of bilateral_slice_apply_points and _bilateral_slice_apply_points_backward
// (csrc/ops.cpp has the schemas, csrc/include/bilateral_ops/slice_points.h the per-sample math
// shared with the CPU, launch_config.h the launch plans). One thread per sample; each sample reads
// its own grid, grid[grid_idx[p]], in place.
//
// The grid gradient is summed as 64-bit fixed point: each contribution is rounded to a multiple of
// 2^-62 times a bound on the sum of all of them (P max|grad_output| max(1, max|input|): the
// weights of a sample sum to 1), and integer atomics add those exactly, so the result is the same
// bitwise whatever the order of the atomics: deterministic in every mode, with a precision far
// below float32's rounding of the result. The bound is computed on the device (no host
// synchronisation); a non-finite bound makes the grid gradient NaN, as a non-finite gradient
// would. Lanes of a warp adding into the same cell are summed first (warp-aggregated atomics).
//
// A grid_idx out of [0, M) cannot be reported without a synchronisation: such a sample gets NaN
// outputs and coordinate / input gradients and adds nothing to the grid gradient.
//
// The fast path (launch_config.h's points_plan says when): the bilagrid layout (3 input channels
// and an offset, C = 12) compiled in, on a copy of the grids packed cell-major by
// points_pack_kernel, (M, cells, 12) in the accumulator type, so that a corner's 12 coefficients
// are three float4 (six double2) loads, with 32-bit offsets. Its backward sums the grid gradient
// of a block's samples in shared memory first: blockIdx.y picks a slice of `slice` channels, the
// block's slab holds their 64-bit fixed-point sums for every cell of the M grids, and the block
// adds its non-zero sums to the global buffer at the end (integer sums: the same bits whatever
// the order, and the same as points_backward_kernel's). The coordinate and input gradients come
// from points_sample_grad_fast_kernel. Every per-sample value is computed by the same operations
// in the same order as the plain kernels.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <climits>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>

#include "../checks.h"
#include "bilateral_ops/slice_points.h"
#include "common.cuh"
#include "launch.cuh"
#include "launch_config.h"

namespace bilateral_ops {
namespace cuda {
namespace {

// 2^62: the fixed-point scale maps the bound of the whole sum to it, so no sum can overflow.
constexpr double kFixedPointRange = 4611686018427387904.0;

// The fixed-point scale, units per unit of gradient: the bound of the whole sum, P max|g|
// max(1, max|x|), maps to kFixedPointRange; 0 (the gradient becomes NaN) when the bound is not
// finite. absmax holds the two maxima as double bits (points_absmax_kernel); every kernel that
// needs the scale computes it from them the same way.
__device__ __forceinline__ double fixed_point_scale(const unsigned long long* absmax, int64_t P) {
  const double in = __longlong_as_double(static_cast<long long>(absmax[1]));
  const double bound = __longlong_as_double(static_cast<long long>(absmax[0])) *
                       static_cast<double>(P) * (in < 1.0 ? 1.0 : in);  // a NaN stays NaN
  return isfinite(bound) ? kFixedPointRange / (bound < 1e-250 ? 1e-250 : bound) : 0.0;
}

// absmax[0] = max |grad_output|, absmax[1] = max |input| (zeroed before), as the bits of doubles:
// non-negative doubles order as their bits, so an integer atomicMax per warp finds the maximum
// whatever the order (a NaN, whose bits are above every number's, wins, as in torch.amax).
template <typename scalar_t>
__global__ void __launch_bounds__(launch::kPointsThreads)
    points_absmax_kernel(const scalar_t* go, int64_t n_go, const scalar_t* input, int64_t n_in,
                         unsigned long long* absmax) {
  const auto bits = [](const scalar_t* p) {
    return static_cast<unsigned long long>(__double_as_longlong(fabs(static_cast<double>(ldg(p)))));
  };
  unsigned long long m[2] = {0ull, 0ull};
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t i = first; i < n_go; i += stride) m[0] = max(m[0], bits(go + i));
  for (int64_t i = first; i < n_in; i += stride) m[1] = max(m[1], bits(input + i));
#pragma unroll
  for (int k = 0; k < 2; ++k) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) m[k] = max(m[k], __shfl_xor_sync(kFullMask, m[k], off));
    if ((threadIdx.x & 31) == 0) atomicMax(absmax + k, m[k]);
  }
}

template <typename scalar_t>
struct PointsArgs {
  const scalar_t* grid;         // (M, C, D, Gh, Gw)
  const scalar_t* coords;       // (P, 3)
  const scalar_t* input;        // (P, Ci)
  const int64_t* idx;           // (P,)
  const scalar_t* grad_output;  // (P, Co), backward
  scalar_t* output;             // (P, Co), forward
  scalar_t* grad_coords;        // (P, 3) when need_coords
  scalar_t* grad_input;         // (P, Ci) when need_input
  unsigned long long* grad_grid_fixed;  // (M, C, cells) when need_grid
  const unsigned long long* absmax;  // max |grad_output|, max |input| as double bits (device)
  const acc_type<scalar_t>* packed;  // (M, cells, kPointsPackedChannels), fast path only
  bool need_grid, need_coords, need_input;
};

template <typename acc_t, typename scalar_t>
__device__ __forceinline__ PointCorners<acc_t> sample_corners(const PointsGeometry& g,
                                                              const scalar_t* coords, int64_t p) {
  const scalar_t* c = coords + p * 3;
  return point_corners<acc_t>(ldg(c), ldg(c + 1), ldg(c + 2), g.D, g.Gh, g.Gw);
}

// Channel c of a sample: sum over the corners of weight * grid value.
template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t sample_channel(const PointCorners<acc_t>& pc, const scalar_t* slab) {
  acc_t a = acc_t(0);
#pragma unroll
  for (int k = 0; k < 8; ++k) a += pc.weight[k] * ldg(slab + pc.offset[k]);
  return a;
}

template <typename scalar_t>
__global__ void __launch_bounds__(launch::kPointsThreads)
    points_forward_kernel(const PointsGeometry g, const AffineLayout l, const PointsArgs<scalar_t> a) {
  using acc_t = acc_type<scalar_t>;
  const int64_t cells = g.D * g.Gh * g.Gw;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < g.P;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = a.idx[p];
    scalar_t* out = a.output + p * l.Co;
    if (m < 0 || m >= g.M) {
      for (int64_t o = 0; o < l.Co; ++o) out[o] = static_cast<scalar_t>(NAN);
      continue;
    }
    const PointCorners<acc_t> pc = sample_corners<acc_t>(g, a.coords, p);
    const scalar_t* grid = a.grid + m * g.C * cells;
    const scalar_t* x = a.input + p * l.Ci;
    for (int64_t o = 0; o < l.Co; ++o) {
      acc_t acc = l.has_offset ? sample_channel(pc, grid + l.offset_channel(o) * cells) : acc_t(0);
      for (int64_t i = 0; i < l.Ci; ++i) {
        acc += sample_channel(pc, grid + l.channel(o, i) * cells) * ldg(x + i);
      }
      out[o] = static_cast<scalar_t>(acc);
    }
  }
}

// A lane's sample in the warp-uniform loops of the grid gradient (every lane runs every round,
// for the warp's aggregated atomics): p = base + lane, live while p < P, valid when its grid
// index is in range too (a sample with an index out of range adds nothing).
struct Slot {
  int64_t p, m;
  bool live, valid;
};

__device__ __forceinline__ Slot slot(const PointsGeometry& g, const int64_t* idx, int64_t base) {
  Slot s;
  s.p = base + threadIdx.x;
  s.live = s.p < g.P;
  s.m = s.live ? idx[s.p] : 0;
  s.valid = s.live && s.m >= 0 && s.m < g.M;
  return s;
}

// The loop over samples is warp-uniform (lanes past P ride along with nothing to add): the
// aggregated atomics need every lane of the warp.
template <typename scalar_t>
__global__ void __launch_bounds__(launch::kPointsThreads)
    points_backward_kernel(const PointsGeometry g, const AffineLayout l, const PointsArgs<scalar_t> a) {
  using acc_t = acc_type<scalar_t>;
  const int64_t cells = g.D * g.Gh * g.Gw;
  const int lane = static_cast<int>(threadIdx.x & 31);
  const double scale = a.need_grid ? fixed_point_scale(a.absmax, g.P) : 0.0;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x; base < g.P;
       base += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Slot sl = slot(g, a.idx, base);
    const int64_t p = sl.p, m = sl.m;
    const bool live = sl.live, valid = sl.valid;
    const PointCorners<acc_t> pc =
        valid ? sample_corners<acc_t>(g, a.coords, p) : point_corners<acc_t>(0, 0, 0, 1, 1, 1);
    const scalar_t* go = a.grad_output + (live ? p : 0) * l.Co;
    const scalar_t* x = a.input + (live ? p : 0) * l.Ci;
    const scalar_t* grid = a.grid + (valid ? m : 0) * g.C * cells;
    const auto gof = [&](int64_t o) { return ldg(go + o); };
    const auto xf = [&](int64_t i) { return ldg(x + i); };

    if (live && (a.need_coords || a.need_input)) {
      if (!valid) {
        const scalar_t nan = static_cast<scalar_t>(NAN);
        if (a.need_coords) {
          for (int d = 0; d < 3; ++d) a.grad_coords[p * 3 + d] = nan;
        }
        if (a.need_input) {
          for (int64_t i = 0; i < l.Ci; ++i) a.grad_input[p * l.Ci + i] = nan;
        }
      } else {
        if (a.need_coords) {
          // e_k = sum_c V[c] grid[corner k, c]; the coordinate gradient weighs e_k by the
          // derivatives of corner k's weight.
          acc_t e[8];
#pragma unroll
          for (int k = 0; k < 8; ++k) e[k] = acc_t(0);
          for (int64_t c = 0; c < g.C; ++c) {
            const acc_t v = point_splat_value<acc_t>(l, gof, xf, c);
            const scalar_t* slab = grid + c * cells;
#pragma unroll
            for (int k = 0; k < 8; ++k) e[k] += v * ldg(slab + pc.offset[k]);
          }
          acc_t gx = acc_t(0), gy = acc_t(0), gz = acc_t(0);
#pragma unroll
          for (int k = 0; k < 8; ++k) {
            gx += pc.dx[k] * e[k];
            gy += pc.dy[k] * e[k];
            gz += pc.dz[k] * e[k];
          }
          a.grad_coords[p * 3 + 0] = static_cast<scalar_t>(gx);
          a.grad_coords[p * 3 + 1] = static_cast<scalar_t>(gy);
          a.grad_coords[p * 3 + 2] = static_cast<scalar_t>(gz);
        }
        if (a.need_input) {
          for (int64_t i = 0; i < l.Ci; ++i) {
            acc_t s = acc_t(0);
            for (int64_t o = 0; o < l.Co; ++o) {
              s += gof(o) * sample_channel(pc, grid + l.channel(o, i) * cells);
            }
            a.grad_input[p * l.Ci + i] = static_cast<scalar_t>(s);
          }
        }
      }
    }

    if (a.need_grid) {
      // A cell's channels share their lanes: the peer groups of corner k (same grid, same cell)
      // are those of every channel, so they are matched once per corner.
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        // Lanes without a sample key on a value no cell has, so they form their own group.
        const unsigned long long key =
            valid ? static_cast<unsigned long long>(m * cells + pc.offset[k]) : ~0ull;
        const unsigned peers = __match_any_sync(kFullMask, key);
        const bool leader = valid && is_peer_leader(peers, lane);
        unsigned long long* dest = a.grad_grid_fixed + (valid ? m : 0) * g.C * cells + pc.offset[k];
        for (int64_t o = 0; o < l.Co; ++o) {
          const acc_t gv = valid ? gof(o) : acc_t(0);
          for (int64_t i = 0; i < l.stride; ++i) {
            // point_splat_value of channel o * stride + i, without its divisions.
            const acc_t v = i < l.Ci ? gv * static_cast<acc_t>(xf(i)) : gv;
            const long long q =
                valid ? llrint(static_cast<double>(pc.weight[k] * v) * scale) : 0ll;
            const unsigned long long s =
                peer_sum(static_cast<unsigned long long>(q), peers, lane);
            if (leader && s != 0ull) atomicAdd(dest + (o * l.stride + i) * cells, s);
          }
        }
      }
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(launch::kPointsThreads)
    points_grid_finish_kernel(const unsigned long long* fixed, const unsigned long long* absmax,
                              int64_t P, int64_t n, scalar_t* out) {
  const double s = fixed_point_scale(absmax, P);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const double v = s > 0.0 ? static_cast<double>(static_cast<long long>(fixed[i])) / s : NAN;
    out[i] = static_cast<scalar_t>(v);
  }
}

// ---------------------------------------------------------------------------------------------
// The fast path: the bilagrid layout compiled in, on grids packed cell-major.

constexpr int kFastCi = static_cast<int>(launch::kPointsFastCi);              // 3
constexpr int kFastStride = kFastCi + 1;                                      // with the offset
constexpr int kFastC = static_cast<int>(launch::kPointsFastC);                // 12
constexpr int kFastCo = kFastC / kFastStride;                                 // 3
constexpr int kPackedC = static_cast<int>(launch::kPointsPackedChannels);     // 12
constexpr int kMaxSlice = static_cast<int>(launch::kPointsMaxSliceChannels);  // 6
static_assert(kFastCo * kFastStride == kFastC, "the fast layout is Co x (Ci + 1)");
static_assert(kPackedC >= kFastC && kPackedC % 4 == 0, "packed channels: whole float4");

// packed[(m * cells + cell) * kPackedC + c] = grid[m, c, cell] (0 in the padding), in the
// accumulator type. The plan only packs fewer than 2^31 elements.
template <typename scalar_t>
__global__ void __launch_bounds__(launch::kPointsThreads)
    points_pack_kernel(const scalar_t* grid, int C, int cells, int total,
                       acc_type<scalar_t>* packed) {
  using acc_t = acc_type<scalar_t>;
  // Unsigned: idx + the stride (< 2^24 + 2^31) cannot wrap.
  for (unsigned idx = blockIdx.x * blockDim.x + threadIdx.x; idx < static_cast<unsigned>(total);
       idx += gridDim.x * blockDim.x) {
    const int c = static_cast<int>(idx % kPackedC);
    const int r = static_cast<int>(idx / kPackedC);
    const int cell = r % cells;
    const int m = r / cells;
    packed[idx] = c < C ? ldg(grid + (static_cast<int64_t>(m) * C + c) * cells + cell) : acc_t(0);
  }
}

// The kPackedC coefficients of one packed cell, by 16-byte loads through the read-only cache
// (the cell starts 16-aligned). Volatile asm: the compiler may not merge the loads of two passes
// over the same corners (the backward reads them twice rather than keep 96 values live).
__device__ __forceinline__ void load_cell(const float* p, float (&v)[kPackedC]) {
#pragma unroll
  for (int j = 0; j < kPackedC / 4; ++j) {
    asm volatile("ld.global.nc.v4.f32 {%0, %1, %2, %3}, [%4];"
                 : "=f"(v[4 * j]), "=f"(v[4 * j + 1]), "=f"(v[4 * j + 2]), "=f"(v[4 * j + 3])
                 : "l"(p + 4 * j));
  }
}
__device__ __forceinline__ void load_cell(const double* p, double (&v)[kPackedC]) {
#pragma unroll
  for (int j = 0; j < kPackedC / 2; ++j) {
    asm volatile("ld.global.nc.v2.f64 {%0, %1}, [%2];"
                 : "=d"(v[2 * j]), "=d"(v[2 * j + 1])
                 : "l"(p + 2 * j));
  }
}

// point_corners kept as its factors, with 32-bit cell offsets: the weight of corner
// k = a * 4 + b * 2 + e and the derivatives of that weight are formed on use by the very products
// point_corners forms (z factor times y factor, times x factor), so every value is the same.
template <typename T>
struct FastTaps {
  int off[8];       // cell offsets in a (D, Gh, Gw) slab
  T zw[2], yw[2], xw[2];
  T sz, sy, sx;     // d w1 / d u per axis (d w0 / d u is its negative)

  __device__ __forceinline__ T weight(int k) const { return zw[k >> 2] * yw[(k >> 1) & 1] * xw[k & 1]; }
  __device__ __forceinline__ T dx(int k) const {
    return zw[k >> 2] * yw[(k >> 1) & 1] * ((k & 1) ? sx : -sx);
  }
  __device__ __forceinline__ T dy(int k) const {
    return zw[k >> 2] * (((k >> 1) & 1) ? sy : -sy) * xw[k & 1];
  }
  __device__ __forceinline__ T dz(int k) const {
    return ((k >> 2) ? sz : -sz) * yw[(k >> 1) & 1] * xw[k & 1];
  }
};

template <typename T>
__device__ __forceinline__ FastTaps<T> fast_taps(T x, T y, T z, int D, int Gh, int Gw) {
  const AxisTaps<T> tx = axis_taps(unit_to_grid_aligned(x, int64_t{Gw}), int64_t{Gw});
  const AxisTaps<T> ty = axis_taps(unit_to_grid_aligned(y, int64_t{Gh}), int64_t{Gh});
  const AxisTaps<T> tz = axis_taps(unit_to_grid_aligned(z, int64_t{D}), int64_t{D});
  FastTaps<T> t;
  const int zi[2] = {static_cast<int>(tz.i0), static_cast<int>(tz.i1)};
  const int yi[2] = {static_cast<int>(ty.i0), static_cast<int>(ty.i1)};
  const int xi[2] = {static_cast<int>(tx.i0), static_cast<int>(tx.i1)};
#pragma unroll
  for (int k = 0; k < 8; ++k) t.off[k] = (zi[k >> 2] * Gh + yi[(k >> 1) & 1]) * Gw + xi[k & 1];
  t.zw[0] = tz.w0;
  t.zw[1] = tz.w1;
  t.yw[0] = ty.w0;
  t.yw[1] = ty.w1;
  t.xw[0] = tx.w0;
  t.xw[1] = tx.w1;
  t.sx = tx.slope * static_cast<T>(Gw - 1);
  t.sy = ty.slope * static_cast<T>(Gh - 1);
  t.sz = tz.slope * static_cast<T>(D - 1);
  return t;
}

struct FastDims {
  int D, Gh, Gw, cells;
};

inline FastDims fast_dims(const PointsGeometry& g) {
  return FastDims{static_cast<int>(g.D), static_cast<int>(g.Gh), static_cast<int>(g.Gw),
                  static_cast<int>(g.cells())};
}

template <typename scalar_t>
__device__ __forceinline__ FastTaps<acc_type<scalar_t>> fast_sample_taps(const FastDims& d,
                                                                          const scalar_t* coords,
                                                                          int64_t p) {
  const scalar_t* c = coords + p * 3;
  return fast_taps(ldg(c), ldg(c + 1), ldg(c + 2), d.D, d.Gh, d.Gw);
}

// A[c] = sum over the corners of weight * packed grid value: the sample's coefficients, in
// sample_channel's order.
template <typename acc_t>
__device__ __forceinline__ void fast_coefficients(const acc_t* grid, const FastTaps<acc_t>& t,
                                                  acc_t (&A)[kPackedC]) {
#pragma unroll
  for (int c = 0; c < kPackedC; ++c) A[c] = acc_t(0);
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    acc_t G[kPackedC];
    load_cell(grid + t.off[k] * kPackedC, G);
    const acc_t w = t.weight(k);
#pragma unroll
    for (int c = 0; c < kFastC; ++c) A[c] += w * G[c];
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(launch::kPointsThreads)
    points_forward_fast_kernel(const PointsGeometry g, const FastDims d, const PointsArgs<scalar_t> a) {
  using acc_t = acc_type<scalar_t>;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < g.P;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = a.idx[p];
    scalar_t* out = a.output + p * kFastCo;
    if (m < 0 || m >= g.M) {
#pragma unroll
      for (int o = 0; o < kFastCo; ++o) out[o] = static_cast<scalar_t>(NAN);
      continue;
    }
    const FastTaps<acc_t> t = fast_sample_taps(d, a.coords, p);
    acc_t A[kPackedC];
    fast_coefficients(a.packed + static_cast<int>(m) * d.cells * kPackedC, t, A);
    acc_t x[kFastCi];
#pragma unroll
    for (int i = 0; i < kFastCi; ++i) x[i] = ldg(a.input + p * kFastCi + i);
#pragma unroll
    for (int o = 0; o < kFastCo; ++o) {
      acc_t acc = A[o * kFastStride + kFastCi];
#pragma unroll
      for (int i = 0; i < kFastCi; ++i) acc += A[o * kFastStride + i] * x[i];
      out[o] = static_cast<scalar_t>(acc);
    }
  }
}

// peer_sum of n <= N values at once (one tree, shared by the values): valid on the group's
// leader. Every lane of the warp must call it, with the same n.
template <int N>
__device__ __forceinline__ void peer_sum_n(unsigned long long (&x)[N], int n, unsigned peers,
                                           int lane) {
  if (peers == kFullMask) {  // then every lane has the full mask
#pragma unroll
    for (int t = 0; t < N; ++t) {
      if (t < n) {
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) x[t] += __shfl_xor_sync(kFullMask, x[t], off);
      }
    }
    return;
  }
  int rel_pos = __popc(peers & ((1u << lane) - 1u));
  peers &= (0xfffffffeu << lane);  // peers above this lane
  while (__any_sync(kFullMask, peers != 0u)) {
    const int next = __ffs(peers);  // next remaining peer above, 1-based; 0 if none
#pragma unroll
    for (int t = 0; t < N; ++t) {
      if (t < n) {
        const unsigned long long v = __shfl_sync(kFullMask, x[t], (next - 1) & 31);
        if (next != 0) x[t] += v;
      }
    }
    peers &= ~__ballot_sync(kFullMask, rel_pos & 1);
    rel_pos >>= 1;
  }
}

// The coordinate and input gradients of the fast path, one thread per sample.
template <typename scalar_t>
__global__ void __launch_bounds__(launch::kPointsThreads)
    points_sample_grad_fast_kernel(const PointsGeometry g, const FastDims d,
                                   const PointsArgs<scalar_t> a) {
  using acc_t = acc_type<scalar_t>;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < g.P;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = a.idx[p];
    const bool valid = m >= 0 && m < g.M;
    const FastTaps<acc_t> t = fast_sample_taps(d, a.coords, p);
    acc_t go[kFastCo], x[kFastCi];
#pragma unroll
    for (int o = 0; o < kFastCo; ++o) go[o] = ldg(a.grad_output + p * kFastCo + o);
#pragma unroll
    for (int i = 0; i < kFastCi; ++i) x[i] = ldg(a.input + p * kFastCi + i);
    {
      if (!valid) {
        const scalar_t nan = static_cast<scalar_t>(NAN);
        if (a.need_coords) {
#pragma unroll
          for (int k = 0; k < 3; ++k) a.grad_coords[p * 3 + k] = nan;
        }
        if (a.need_input) {
#pragma unroll
          for (int i = 0; i < kFastCi; ++i) a.grad_input[p * kFastCi + i] = nan;
        }
      } else {
        // V[c] = point_splat_value; e_k = sum_c V[c] grid[corner k, c], folded into the
        // coordinate gradient as soon as it is complete (the same sums in the same order);
        // A[c] = sum_k weight_k grid[corner k, c]. Two passes over the corners (the second
        // reads them from L1), so that V and A are not live at once.
        const acc_t* grid = a.packed + static_cast<int>(m) * d.cells * kPackedC;
        acc_t gx = acc_t(0), gy = acc_t(0), gz = acc_t(0);
        if (a.need_coords) {
          acc_t V[kFastC];
#pragma unroll
          for (int c = 0; c < kFastC; ++c) {
            const int o = c / kFastStride, i = c % kFastStride;
            V[c] = i < kFastCi ? go[o] * x[i] : go[o];
          }
#pragma unroll
          for (int k = 0; k < 8; ++k) {
            acc_t G[kPackedC];
            load_cell(grid + t.off[k] * kPackedC, G);
            acc_t e = acc_t(0);
#pragma unroll
            for (int c = 0; c < kFastC; ++c) e += V[c] * G[c];
            gx += t.dx(k) * e;
            gy += t.dy(k) * e;
            gz += t.dz(k) * e;
          }
        }
        acc_t A[kPackedC];
        if (a.need_input) fast_coefficients(grid, t, A);
        if (a.need_coords) {
          a.grad_coords[p * 3 + 0] = static_cast<scalar_t>(gx);
          a.grad_coords[p * 3 + 1] = static_cast<scalar_t>(gy);
          a.grad_coords[p * 3 + 2] = static_cast<scalar_t>(gz);
        }
        if (a.need_input) {
#pragma unroll
          for (int i = 0; i < kFastCi; ++i) {
            acc_t s = acc_t(0);
#pragma unroll
            for (int o = 0; o < kFastCo; ++o) s += go[o] * A[o * kFastStride + i];
            a.grad_input[p * kFastCi + i] = static_cast<scalar_t>(s);
          }
        }
      }
    }
  }
}

// Blocks a multiprocessor holds at once: sm_90's shared memory fits one full slab more than
// launch_config.h's bound, which holds on every architecture (64 registers spill on sm_80), the
// way c10's launch bounds depend on __CUDA_ARCH__.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define BO_POINTS_FAST_BACKWARD_MIN_BLOCKS (launch::kPointsFastBackwardMinBlocks)
#else
#define BO_POINTS_FAST_BACKWARD_MIN_BLOCKS (launch::kPointsFastBackwardMinBlocks + 1)
#endif

// The grid gradient of the fast path, privatised per block. blockIdx.y: the slice
// [c0, c0 + slice) of the channels (slice: the plan's slice_channels; the last slice may have
// fewer). The block zeroes its slab, adds the 64-bit fixed-point contributions of its samples
// (those of points_backward_kernel, warp-aggregated the same way) with shared-memory atomics
// (two 32-bit ones each: shared_atomic_add_u64), then adds each non-zero sum to the global
// buffer. The loop over samples is warp-uniform (lanes past P ride along with nothing to add).
template <typename scalar_t>
__global__ void __launch_bounds__(launch::kPointsThreads, BO_POINTS_FAST_BACKWARD_MIN_BLOCKS)
    points_backward_fast_kernel(const PointsGeometry g, const FastDims d,
                                const PointsArgs<scalar_t> a, const int slice) {
  using acc_t = acc_type<scalar_t>;
  extern __shared__ unsigned long long slab[];  // (M, cells, slice)
  const int lane = static_cast<int>(threadIdx.x & 31);
  const int c0 = static_cast<int>(blockIdx.y) * slice;
  const int n = min(slice, kFastC - c0);  // channels of this slice, >= 1
  const int M = static_cast<int>(g.M);
  {
    const int len = M * d.cells * slice;
    for (int i = threadIdx.x; i < len; i += blockDim.x) slab[i] = 0ull;
    __syncthreads();
  }
  const double scale = fixed_point_scale(a.absmax, g.P);
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x; base < g.P;
       base += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Slot sl = slot(g, a.idx, base);
    const int64_t p = sl.p, m = sl.m;
    const bool live = sl.live, valid = sl.valid;
    const FastTaps<acc_t> t = live ? fast_sample_taps(d, a.coords, p)
                                   : fast_taps(acc_t(0), acc_t(0), acc_t(0), 1, 1, 1);
    acc_t go[kFastCo], x[kFastCi];
#pragma unroll
    for (int o = 0; o < kFastCo; ++o) go[o] = live ? ldg(a.grad_output + p * kFastCo + o) : acc_t(0);
#pragma unroll
    for (int i = 0; i < kFastCi; ++i) x[i] = live ? ldg(a.input + p * kFastCi + i) : acc_t(0);

    {
      // The splat values of the slice's channels c0 + s (s < n; the others are never used).
      acc_t v[kMaxSlice];
#pragma unroll
      for (int s = 0; s < kMaxSlice; ++s) {
        const int c = c0 + s;
        const int o = c / kFastStride, i = c % kFastStride;
        const acc_t gv = o == 0 ? go[0] : o == 1 ? go[1] : go[2];
        const acc_t xv = i == 0 ? x[0] : i == 1 ? x[1] : x[2];
        v[s] = i < kFastCi ? gv * xv : gv;
      }
      const int cell0 = static_cast<int>(valid ? m : 0) * d.cells;
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        // Lanes without a sample key on a value no cell has (M cells < 2^31 - 1).
        const unsigned key = valid ? static_cast<unsigned>(cell0 + t.off[k]) : 0xffffffffu;
        const unsigned peers = __match_any_sync(kFullMask, key);
        const acc_t w = t.weight(k);
        unsigned long long q[kMaxSlice];
#pragma unroll
        for (int s = 0; s < kMaxSlice; ++s) {
          q[s] = valid && s < n ? static_cast<unsigned long long>(
                                      llrint(static_cast<double>(w * v[s]) * scale))
                                : 0ull;
        }
        peer_sum_n(q, n, peers, lane);
        if (valid && is_peer_leader(peers, lane)) {
          unsigned long long* dst = slab + (cell0 + t.off[k]) * slice;
#pragma unroll
          for (int s = 0; s < kMaxSlice; ++s) {
            if (s < n && q[s] != 0ull) shared_atomic_add_u64(dst + s, q[s]);
          }
        }
      }
    }
  }
  {
    __syncthreads();
    // The slice's real channels, in the global buffer's order: (m, c0 + s, cell).
    const int total = M * n * d.cells;
    for (int i = threadIdx.x; i < total; i += blockDim.x) {
      const int cell = i % d.cells;
      const int r = i / d.cells;
      const int s = r % n;
      const int mm = r / n;
      const unsigned long long sum = slab[(mm * d.cells + cell) * slice + s];
      if (sum != 0ull) {
        atomicAdd(a.grad_grid_fixed + (static_cast<int64_t>(mm) * kFastC + c0 + s) * d.cells + cell,
                  sum);
      }
    }
  }
}

// The fast path's packed copy of the grids (plan.pack), in the accumulator type.
template <typename scalar_t>
at::Tensor pack_grid(const at::Tensor& grid, const PointsGeometry& g, const launch::PointsPlan& plan,
                     cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  const int64_t total = g.M * g.cells() * kPackedC;  // < 2^31 on the fast path
  const at::Tensor packed = at::empty(
      {total}, grid.options().dtype(std::is_same<acc_t, double>::value ? at::kDouble : at::kFloat));
  BO_LAUNCH(points_pack_kernel<scalar_t>, plan.pack, stream, grid.data_ptr<scalar_t>(),
            static_cast<int>(g.C), static_cast<int>(g.cells()), static_cast<int>(total),
            packed.data_ptr<acc_t>());
  return packed;
}

void check_int_sizes(const PointsGeometry& g) {
  TORCH_CHECK(g.M * g.C * g.cells() < (int64_t{1} << 62),
              "bilateral_slice_apply_points: the grids are too large");
}

at::Tensor bilateral_slice_apply_points(const at::Tensor& grid_in, const at::Tensor& coords_in,
                                        const at::Tensor& input_in, const at::Tensor& grid_idx_in,
                                        bool has_offset) {
  const PointsShape shape =
      check_slice_apply_points(grid_in, coords_in, input_in, grid_idx_in, has_offset);
  const PointsGeometry& g = shape.g;
  const AffineLayout& l = shape.l;
  const c10::cuda::CUDAGuard device_guard(grid_in.device());
  if (g.P == 0) return at::zeros({0, l.Co}, input_in.options());
  check_int_sizes(g);
  const at::Tensor grid = grid_in.contiguous();
  const at::Tensor coords = coords_in.contiguous();
  const at::Tensor input = input_in.contiguous();
  const at::Tensor idx = grid_idx_in.contiguous();
  at::Tensor out = at::empty({g.P, l.Co}, input.options());
  const launch::PointsPlan plan =
      launch::points_plan(g.P, g.M, g.C, g.cells(), nullptr, l.Ci, l.has_offset);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grid.scalar_type(),
                                  "bilateral_slice_apply_points_cuda", [&] {
                                    PointsArgs<scalar_t> a{};
                                    a.grid = grid.data_ptr<scalar_t>();
                                    a.coords = coords.data_ptr<scalar_t>();
                                    a.input = input.data_ptr<scalar_t>();
                                    a.idx = idx.data_ptr<int64_t>();
                                    a.output = out.data_ptr<scalar_t>();
                                    if (plan.fast) {
                                      const at::Tensor packed = pack_grid<scalar_t>(grid, g, plan, stream);
                                      a.packed = packed.data_ptr<acc_type<scalar_t>>();
                                      BO_LAUNCH(points_forward_fast_kernel<scalar_t>, plan.forward,
                                                stream, g, fast_dims(g), a);
                                    } else {
                                      BO_LAUNCH(points_forward_kernel<scalar_t>, plan.forward,
                                                stream, g, l, a);
                                    }
                                  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bilateral_slice_apply_points_backward(
    const at::Tensor& grad_output_in, const at::Tensor& grid_in, const at::Tensor& coords_in,
    const at::Tensor& input_in, const at::Tensor& grid_idx_in, bool has_offset,
    std::array<bool, 3> mask) {
  const PointsShape shape =
      check_slice_apply_points(grid_in, coords_in, input_in, grid_idx_in, has_offset);
  const PointsGeometry& g = shape.g;
  const AffineLayout& l = shape.l;
  check_grad_output(grad_output_in, grid_in, {g.P, l.Co});
  const c10::cuda::CUDAGuard device_guard(grid_in.device());
  if (g.P == 0 || !(mask[0] || mask[1] || mask[2])) {
    return {zero_or_masked(mask[0], grid_in), zero_or_masked(mask[1], coords_in),
            zero_or_masked(mask[2], input_in)};
  }
  check_int_sizes(g);
  const at::Tensor grid = grid_in.contiguous();
  const at::Tensor coords = coords_in.contiguous();
  const at::Tensor input = input_in.contiguous();
  const at::Tensor idx = grid_idx_in.contiguous();
  const at::Tensor go = grad_output_in.contiguous();
  at::Tensor grad_grid = mask[0] ? at::empty(grid.sizes(), grid.options()) : masked_out(grid);
  at::Tensor grad_coords = mask[1] ? at::empty({g.P, 3}, coords.options()) : masked_out(coords);
  at::Tensor grad_input = mask[2] ? at::empty({g.P, l.Ci}, input.options()) : masked_out(input);
  // The fixed-point sums of the grid gradient, then the two maxima of fixed_point_scale: one
  // zeroed buffer (the maxima were some fourteen small ATen ops, more host time than kernels).
  const int64_t fixed_len = g.M * g.C * g.cells();
  at::Tensor fixed;
  if (mask[0]) fixed = at::zeros({fixed_len + 2}, grid.options().dtype(at::kLong));
  const launch::PointsPlan plan =
      launch::points_plan(g.P, g.M, g.C, g.cells(), mask.data(), l.Ci, l.has_offset);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grid.scalar_type(), "bilateral_slice_apply_points_backward_cuda",
      [&] {
        PointsArgs<scalar_t> a{};
        a.grid = grid.data_ptr<scalar_t>();
        a.coords = coords.data_ptr<scalar_t>();
        a.input = input.data_ptr<scalar_t>();
        a.idx = idx.data_ptr<int64_t>();
        a.grad_output = go.data_ptr<scalar_t>();
        a.grad_coords = mask[1] ? grad_coords.data_ptr<scalar_t>() : nullptr;
        a.grad_input = mask[2] ? grad_input.data_ptr<scalar_t>() : nullptr;
        a.grad_grid_fixed =
            mask[0] ? reinterpret_cast<unsigned long long*>(fixed.data_ptr<int64_t>()) : nullptr;
        unsigned long long* absmax = mask[0] ? a.grad_grid_fixed + fixed_len : nullptr;
        a.absmax = absmax;
        a.need_grid = mask[0];
        a.need_coords = mask[1];
        a.need_input = mask[2];
        at::Tensor packed;
        if (plan.pack.present) {
          packed = pack_grid<scalar_t>(grid, g, plan, stream);
          a.packed = packed.data_ptr<acc_type<scalar_t>>();
        }
        if (mask[0]) {
          BO_LAUNCH(points_absmax_kernel<scalar_t>, plan.absmax, stream, a.grad_output,
                    g.P * l.Co, a.input, g.P * l.Ci, absmax);
        }
        if (plan.fast && mask[0]) {
          if (plan.samples.present) {
            BO_LAUNCH(points_sample_grad_fast_kernel<scalar_t>, plan.samples, stream, g,
                      fast_dims(g), a);
          }
          BO_LAUNCH(points_backward_fast_kernel<scalar_t>, plan.backward, stream, g, fast_dims(g),
                    a, static_cast<int>(plan.slice_channels));
        } else if (plan.fast) {  // no grid gradient: the per-sample kernel is plan.backward
          BO_LAUNCH(points_sample_grad_fast_kernel<scalar_t>, plan.backward, stream, g,
                    fast_dims(g), a);
        } else {
          BO_LAUNCH(points_backward_kernel<scalar_t>, plan.backward, stream, g, l, a);
        }
        if (mask[0]) {
          BO_LAUNCH(points_grid_finish_kernel<scalar_t>, plan.finish, stream, a.grad_grid_fixed,
                    a.absmax, g.P, fixed_len, grad_grid.data_ptr<scalar_t>());
        }
      });
  return {grad_grid, grad_coords, grad_input};
}

}  // namespace
}  // namespace cuda
}  // namespace bilateral_ops

TORCH_LIBRARY_IMPL(bilateral_ops, CUDA, m) {
  m.impl("bilateral_slice_apply_points", &bilateral_ops::cuda::bilateral_slice_apply_points);
  m.impl("_bilateral_slice_apply_points_backward",
         &bilateral_ops::cuda::bilateral_slice_apply_points_backward);
}
