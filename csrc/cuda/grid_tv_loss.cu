// CUDA kernels of grid_tv_loss and _grid_tv_loss_backward (csrc/ops.cpp has the schemas,
// csrc/include/bilateral_ops/grid_tv_loss.h the per-element math shared with the CPU,
// launch_config.h the launch plans).
//
// Element positions come from multiply-high divisions when every flat index is below 2^31 (64-bit
// divisions per element made both kernels bound by index arithmetic, not memory).
// Rows whose length Gw is a multiple of 4 (and every flat index below 2^31) take the runs paths
// (TvPath): each thread item is a run of 4 consecutive elements of a row, positioned once, its
// centres and its y / z neighbours read as one vector load each (16 bytes of float, two of
// double, 8 of half / bfloat16; scalar loads where the tensor is not that aligned, with the same
// runs and the same sums), its x neighbours from registers plus one scalar load. Other shapes take
// one element per item.
// Forward: a number of blocks fixed by the sizes alone sums the loss terms of its elements (a
// grid-stride loop per thread, in double, then the block's warps in order) into one partial per
// block; tv_reduce_kernel adds the partials in order and writes the 0-d result. Bitwise
// reproducible, and nothing is read back to the host.
// Backward: each element's gradient from its neighbours, times the number of times its grid
// appears in idx (counted by integer atomics, exact in any order).
// An idx value out of [0, M) cannot be reported without a synchronisation: it makes the loss NaN
// and is not counted in the backward.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../checks.h"
#include "bilateral_ops/grid_tv_loss.h"
#include "common.cuh"
#include "launch.cuh"
#include "launch_config.h"

namespace bilateral_ops {
namespace cuda {
namespace {

struct TvWeights {
  double z, y, x;
};

// Position of flat element e of (grids, C, D, Gh, Gw): grid b, offset r in it, and (z, y, x).
struct TvAt {
  int64_t b, r, z, y, x;
};

// The divisors of that map. kSmall (every flat index below 2^31): multiply-high divisions, else
// 64-bit ones.
struct TvDivs {
  FastDiv numel, cells, plane, gw;
};

template <bool kSmall>
__device__ __forceinline__ TvAt tv_at(int64_t e, const TvGeometry& g, const TvDivs& v) {
  const int64_t cells = g.D * g.Gh * g.Gw, numel = g.C * cells, plane = g.Gh * g.Gw;
  if constexpr (kSmall) {
    const uint32_t n = static_cast<uint32_t>(e);
    const uint32_t b = v.numel.div(n), r = n - b * static_cast<uint32_t>(numel);
    const uint32_t k = r - v.cells.div(r) * static_cast<uint32_t>(cells);
    const uint32_t z = v.plane.div(k), rem = k - z * static_cast<uint32_t>(plane);
    const uint32_t y = v.gw.div(rem);
    return {b, r, z, y, rem - y * static_cast<uint32_t>(g.Gw)};
  } else {
    const int64_t b = e / numel, r = e % numel, k = r % cells;
    return {b, r, k / plane, (k / g.Gw) % g.Gh, k % g.Gw};
  }
}

// kSmall when every flat index of `total` elements fits the multiply-high divisions.
TvDivs tv_divs(const TvGeometry& g, int64_t total, bool* small) {
  const int64_t cells = g.D * g.Gh * g.Gw;
  *small = total < (int64_t{1} << 31);
  if (!*small || total == 0) return TvDivs{};  // no element: no divisor may be zero
  return TvDivs{FastDiv(static_cast<uint32_t>(g.C * cells)), FastDiv(static_cast<uint32_t>(cells)),
                FastDiv(static_cast<uint32_t>(g.Gh * g.Gw)), FastDiv(static_cast<uint32_t>(g.Gw))};
}

// Sum of v over the block, in warp order; valid on thread 0. s_warp: one double per warp
// (the dynamic shared buffer).
__device__ __forceinline__ double block_sum(double v, double* s_warp) {
  v = warp_sum(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) s_warp[warp] = v;
  __syncthreads();
  double total = 0.0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) total += s_warp[w];
  }
  return total;
}

// The kernels' paths: one element per thread item (kWide: 64-bit divisions, kSmall: every flat
// index below 2^31), or runs of 4 along x read as vectors (kRuns) or, off the vector alignment,
// by scalar loads (kRunsScalarLoads).
enum class TvPath { kWide, kSmall, kRuns, kRunsScalarLoads };

// This thread's share of the loss, one element per item.
template <typename scalar_t, bool kSmall>
__device__ __forceinline__ double tv_loss_elements(const TvGeometry& g, const TvDivs& dv,
                                                   const scalar_t* grids, const int64_t* idx,
                                                   const TvWeights& w) {
  const int64_t cells = g.D * g.Gh * g.Gw, numel = g.C * cells, plane = g.Gh * g.Gw;
  const int64_t total = g.B * numel;
  double sum = 0.0;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const TvAt at = tv_at<kSmall>(e, g, dv);
    const int64_t m = idx != nullptr ? idx[at.b] : at.b;
    if (m < 0 || m >= g.M) {
      sum += NAN;
      continue;
    }
    const scalar_t* q = grids + m * numel + at.r;
    const double v = static_cast<double>(ldg(q));
    if (at.x + 1 < g.Gw) sum += w.x * tv_axis_term<double>(v, ldg(q + 1), at.x, g.Gw);
    if (at.y + 1 < g.Gh) sum += w.y * tv_axis_term<double>(v, ldg(q + g.Gw), at.y, g.Gh);
    if (at.z + 1 < g.D) sum += w.z * tv_axis_term<double>(v, ldg(q + plane), at.z, g.D);
  }
  return sum;
}

// ---------------------------------------------------------------------------------------------
// Runs of 4 elements along x (Gw % 4 == 0): run u holds flat elements 4u .. 4u + 3 of one row.

constexpr int kTvVec = 4;

// Divisors of the run map: runs per grid, per (grid, channel) slab, per plane, per row.
struct TvVecDivs {
  FastDiv grid, slab, plane, row;
};

TvVecDivs tv_vec_divs(const TvGeometry& g) {
  const int64_t row = g.Gw / kTvVec, plane = g.Gh * row, slab = g.D * plane;
  return TvVecDivs{FastDiv(static_cast<uint32_t>(g.C * slab)), FastDiv(static_cast<uint32_t>(slab)),
                   FastDiv(static_cast<uint32_t>(plane)), FastDiv(static_cast<uint32_t>(row))};
}

// Whether a run's 4 elements are read (and written) as vectors: the tensor's address aligned to
// that vector (every run then is: Gw, the planes and the grids are multiples of 4 elements).
template <typename scalar_t>
constexpr uintptr_t tv_vec_align() {
  return sizeof(scalar_t) * kTvVec < 16 ? sizeof(scalar_t) * kTvVec : 16;
}

template <typename scalar_t>
bool tv_vec_aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % tv_vec_align<scalar_t>() == 0;
}

template <typename scalar_t>
__device__ __forceinline__ float tv_half_bits(unsigned bits) {
  return static_cast<float>(scalar_t(static_cast<unsigned short>(bits), scalar_t::from_bits()));
}

// The 4 elements at p, converted to the accumulation type.
template <typename scalar_t, bool kAligned>
__device__ __forceinline__ void tv_load4(const scalar_t* p, acc_type<scalar_t> (&v)[kTvVec]) {
  if constexpr (!kAligned) {
#pragma unroll
    for (int i = 0; i < kTvVec; ++i) v[i] = ldg(p + i);
  } else if constexpr (std::is_same_v<scalar_t, float>) {
    const float4 t = __ldg(reinterpret_cast<const float4*>(p));
    v[0] = t.x, v[1] = t.y, v[2] = t.z, v[3] = t.w;
  } else if constexpr (std::is_same_v<scalar_t, double>) {
    const double2 a = __ldg(reinterpret_cast<const double2*>(p));
    const double2 b = __ldg(reinterpret_cast<const double2*>(p) + 1);
    v[0] = a.x, v[1] = a.y, v[2] = b.x, v[3] = b.y;
  } else {  // Half / BFloat16: element 0 in the low half of the first word
    const uint2 t = __ldg(reinterpret_cast<const uint2*>(p));
    v[0] = tv_half_bits<scalar_t>(t.x & 0xffffu), v[1] = tv_half_bits<scalar_t>(t.x >> 16);
    v[2] = tv_half_bits<scalar_t>(t.y & 0xffffu), v[3] = tv_half_bits<scalar_t>(t.y >> 16);
  }
}

// p[i] = v[i], rounded as static_cast<scalar_t> rounds.
template <typename scalar_t, bool kAligned>
__device__ __forceinline__ void tv_store4(scalar_t* p, const acc_type<scalar_t> (&v)[kTvVec]) {
  if constexpr (!kAligned) {
#pragma unroll
    for (int i = 0; i < kTvVec; ++i) p[i] = static_cast<scalar_t>(v[i]);
  } else if constexpr (std::is_same_v<scalar_t, float>) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  } else if constexpr (std::is_same_v<scalar_t, double>) {
    reinterpret_cast<double2*>(p)[0] = make_double2(v[0], v[1]);
    reinterpret_cast<double2*>(p)[1] = make_double2(v[2], v[3]);
  } else {
    unsigned h[kTvVec];
#pragma unroll
    for (int i = 0; i < kTvVec; ++i) h[i] = static_cast<scalar_t>(v[i]).x;
    *reinterpret_cast<uint2*>(p) = make_uint2(h[0] | (h[1] << 16), h[2] | (h[3] << 16));
  }
}

// Position of run u (below 2^31) in its (grid, channel) slab: z, y and its first x, 64-bit as
// tv_axis_term / tv_axis_grad take them (the kernels' edge tests are then the same expressions as
// those functions' own).
struct TvRun {
  int64_t z, y, x;
};

__device__ __forceinline__ TvRun tv_run_at(uint32_t u, const TvVecDivs& v) {
  const uint32_t k = u - v.slab.div(u) * v.slab.d;
  const uint32_t z = v.plane.div(k), rem = k - z * v.plane.d;
  const uint32_t y = v.row.div(rem);
  return {z, y, (rem - y * v.row.d) * kTvVec};
}

// This thread's share of the loss over runs: the x, y and z terms of each run summed in double
// per axis (as the CPU does), the axes weighted at the end. The runs of a thread, and so the
// partials, depend on the sizes alone (not on the alignment). Every load of a run is issued before
// its arithmetic: a neighbour beyond the grid's edge is read from the run itself (an L1 hit) and
// its term skipped.
template <typename scalar_t, bool kAligned>
__device__ __forceinline__ double tv_loss_runs(const TvGeometry& g, const TvVecDivs& dv,
                                               const scalar_t* grids, const int64_t* idx,
                                               const TvWeights& w) {
  using acc_t = acc_type<scalar_t>;
  const int64_t numel = g.C * g.D * g.Gh * g.Gw, plane = g.Gh * g.Gw;
  const uint32_t runs = static_cast<uint32_t>(g.B * numel / kTvVec);
  double sx = 0.0, sy = 0.0, sz = 0.0;
  for (uint32_t u = blockIdx.x * blockDim.x + threadIdx.x; u < runs; u += gridDim.x * blockDim.x) {
    const TvRun at = tv_run_at(u, dv);
    const scalar_t* q;
    if (idx != nullptr) {
      const uint32_t b = dv.grid.div(u);
      const int64_t m = idx[b];
      if (m < 0 || m >= g.M) {
        sx += NAN;
        continue;
      }
      q = grids + m * numel + static_cast<int64_t>(u - b * dv.grid.d) * kTvVec;
    } else {
      q = grids + static_cast<int64_t>(u) * kTvVec;
    }
    const bool has_x = at.x + kTvVec < g.Gw, has_y = at.y + 1 < g.Gh, has_z = at.z + 1 < g.D;
    acc_t c[kTvVec], ny[kTvVec], nz[kTvVec];
    tv_load4<scalar_t, kAligned>(q, c);
    tv_load4<scalar_t, kAligned>(has_y ? q + g.Gw : q, ny);
    tv_load4<scalar_t, kAligned>(has_z ? q + plane : q, nz);
    const double vn = static_cast<double>(ldg(has_x ? q + kTvVec : q));
    double v[kTvVec];
#pragma unroll
    for (int i = 0; i < kTvVec; ++i) v[i] = static_cast<double>(c[i]);
    // x: elements 0 .. 2 of the run have their next one in the run (position i of the run's 4),
    // the last one's is the next run's first, if the row has one.
#pragma unroll
    for (int i = 0; i + 1 < kTvVec; ++i) sx += tv_axis_term<double>(v[i], v[i + 1], i, kTvVec);
    sx += tv_axis_term<double>(v[kTvVec - 1], vn, at.x + kTvVec - 1, g.Gw);
#pragma unroll
    for (int i = 0; i < kTvVec; ++i) {
      sy += tv_axis_term<double>(v[i], ny[i], at.y, g.Gh);
      sz += tv_axis_term<double>(v[i], nz[i], at.z, g.D);
    }
  }
  // An axis of size one has no term and weight 0: 0 * 0 adds nothing.
  return w.x * sx + w.y * sy + w.z * sz;
}

// dv serves the element paths, vd the runs.
template <typename scalar_t, TvPath kPath>
__global__ void __launch_bounds__(launch::kTvThreads)
    tv_loss_kernel(const TvGeometry g, const TvDivs dv, const TvVecDivs vd, const scalar_t* grids,
                   const int64_t* idx, const TvWeights w, double* partial) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  double* s_warp = reinterpret_cast<double*>(smem_raw);
  double sum;
  if constexpr (kPath == TvPath::kRuns || kPath == TvPath::kRunsScalarLoads) {
    sum = tv_loss_runs<scalar_t, kPath == TvPath::kRuns>(g, vd, grids, idx, w);
  } else {
    sum = tv_loss_elements<scalar_t, kPath == TvPath::kSmall>(g, dv, grids, idx, w);
  }
  const double s = block_sum(sum, s_warp);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

template <typename scalar_t>
__global__ void __launch_bounds__(launch::kTvThreads)
    tv_reduce_kernel(const double* partial, int64_t n, bool empty, scalar_t* out) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  double* s_warp = reinterpret_cast<double*>(smem_raw);
  double sum = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) sum += partial[i];
  const double s = block_sum(sum, s_warp);
  // No grids: 0 / 0, as lib_bilagrid's division by the batch size gives.
  if (threadIdx.x == 0) out[0] = static_cast<scalar_t>(empty ? NAN : s);
}

__global__ void __launch_bounds__(launch::kTvThreads)
    tv_count_kernel(const int64_t* idx, int64_t B, int64_t M, int* count) {
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < B;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = idx[b];
    if (m >= 0 && m < M) atomicAdd(count + m, 1);
  }
}

// The gradient, one element per item. count null: every grid once (no idx).
template <typename scalar_t, bool kSmall>
__device__ __forceinline__ void tv_backward_elements(const TvGeometry& g, const TvDivs& dv,
                                                     const scalar_t* grids, const int* count,
                                                     const scalar_t* grad_output,
                                                     const TvWeights& w, scalar_t* grad) {
  using acc_t = acc_type<scalar_t>;
  const int64_t cells = g.D * g.Gh * g.Gw, numel = g.C * cells, plane = g.Gh * g.Gw;
  const int64_t total = g.M * numel;
  const acc_t go = ldg(grad_output);
  const acc_t wz = static_cast<acc_t>(w.z), wy = static_cast<acc_t>(w.y), wx = static_cast<acc_t>(w.x);
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const TvAt at = tv_at<kSmall>(e, g, dv);
    const int n = count != nullptr ? count[at.b] : 1;
    if (n == 0) {
      grad[e] = static_cast<scalar_t>(0);
      continue;
    }
    const int64_t z = at.z, y = at.y, x = at.x;
    const scalar_t* q = grids + e;
    const acc_t v = ldg(q);
    acc_t d = tv_axis_grad<acc_t>(v, x > 0 ? ldg(q - 1) : v, x + 1 < g.Gw ? ldg(q + 1) : v, x,
                                  g.Gw, wx);
    d += tv_axis_grad<acc_t>(v, y > 0 ? ldg(q - g.Gw) : v, y + 1 < g.Gh ? ldg(q + g.Gw) : v, y,
                             g.Gh, wy);
    d += tv_axis_grad<acc_t>(v, z > 0 ? ldg(q - plane) : v, z + 1 < g.D ? ldg(q + plane) : v, z,
                             g.D, wz);
    grad[e] = static_cast<scalar_t>(go * static_cast<acc_t>(n) * d);
  }
}

// The gradient over runs: the same per-element math, in the same order, as
// tv_backward_elements. Every load of a run is issued before its arithmetic; a neighbour beyond
// the grid's edge is read from the element itself (what tv_backward_elements passes there), x's
// inside the run from registers.
template <typename scalar_t, bool kAligned>
__device__ __forceinline__ void tv_backward_runs(const TvGeometry& g, const TvVecDivs& dv,
                                                 const scalar_t* grids, const int* count,
                                                 const scalar_t* grad_output, const TvWeights& w,
                                                 scalar_t* grad) {
  using acc_t = acc_type<scalar_t>;
  const int64_t plane = g.Gh * g.Gw;
  const uint32_t runs = static_cast<uint32_t>(g.M * g.C * g.D * plane / kTvVec);
  const acc_t go = ldg(grad_output);
  const acc_t wz = static_cast<acc_t>(w.z), wy = static_cast<acc_t>(w.y), wx = static_cast<acc_t>(w.x);
  for (uint32_t u = blockIdx.x * blockDim.x + threadIdx.x; u < runs; u += gridDim.x * blockDim.x) {
    const int64_t e = static_cast<int64_t>(u) * kTvVec;
    const int n = count != nullptr ? count[dv.grid.div(u)] : 1;
    acc_t d[kTvVec];
    if (n == 0) {
#pragma unroll
      for (int i = 0; i < kTvVec; ++i) d[i] = acc_t(0);
      tv_store4<scalar_t, kAligned>(grad + e, d);
      continue;
    }
    const TvRun at = tv_run_at(u, dv);
    const scalar_t* q = grids + e;
    acc_t v[kTvVec], ym[kTvVec], yp[kTvVec], zm[kTvVec], zp[kTvVec];
    tv_load4<scalar_t, kAligned>(q, v);
    tv_load4<scalar_t, kAligned>(at.y > 0 ? q - g.Gw : q, ym);
    tv_load4<scalar_t, kAligned>(at.y + 1 < g.Gh ? q + g.Gw : q, yp);
    tv_load4<scalar_t, kAligned>(at.z > 0 ? q - plane : q, zm);
    tv_load4<scalar_t, kAligned>(at.z + 1 < g.D ? q + plane : q, zp);
    const acc_t xm = ldg(at.x > 0 ? q - 1 : q);
    const acc_t xp = ldg(at.x + kTvVec < g.Gw ? q + kTvVec : q + kTvVec - 1);
    const acc_t scale = go * static_cast<acc_t>(n);
#pragma unroll
    for (int i = 0; i < kTvVec; ++i) {
      d[i] = tv_axis_grad<acc_t>(v[i], i > 0 ? v[i - 1] : xm, i + 1 < kTvVec ? v[i + 1] : xp,
                                 at.x + i, g.Gw, wx);
      d[i] += tv_axis_grad<acc_t>(v[i], ym[i], yp[i], at.y, g.Gh, wy);
      d[i] += tv_axis_grad<acc_t>(v[i], zm[i], zp[i], at.z, g.D, wz);
      d[i] = scale * d[i];
    }
    tv_store4<scalar_t, kAligned>(grad + e, d);
  }
}

template <typename scalar_t, TvPath kPath>
__global__ void __launch_bounds__(launch::kTvThreads)
    tv_backward_kernel(const TvGeometry g, const TvDivs dv, const TvVecDivs vd, const scalar_t* grids,
                       const int* count, const scalar_t* grad_output, const TvWeights w,
                       scalar_t* grad) {
  if constexpr (kPath == TvPath::kRuns || kPath == TvPath::kRunsScalarLoads) {
    tv_backward_runs<scalar_t, kPath == TvPath::kRuns>(g, vd, grids, count, grad_output, w, grad);
  } else {
    tv_backward_elements<scalar_t, kPath == TvPath::kSmall>(g, dv, grids, count, grad_output, w,
                                                            grad);
  }
}

TvWeights weights(const TvGeometry& g) {
  const int64_t n = g.grid_numel();
  return TvWeights{tv_axis_weight(g.B, n, g.D), tv_axis_weight(g.B, n, g.Gh),
                   tv_axis_weight(g.B, n, g.Gw)};
}

// Whether the runs of 4 serve `grids` grids of g: rows of a multiple of 4 elements, every flat
// index of the runs below 2^31 (the run map's multiply-high divisions), at least one run.
bool tv_vec(const TvGeometry& g, int64_t grids, bool small) {
  return small && g.Gw % kTvVec == 0 && grids * g.grid_numel() > 0;
}

TvPath tv_path(bool vec, bool small, bool aligned) {
  if (vec) return aligned ? TvPath::kRuns : TvPath::kRunsScalarLoads;
  return small ? TvPath::kSmall : TvPath::kWide;
}

const int64_t* idx_ptr(const c10::optional<at::Tensor>& idx, at::Tensor& keep) {
  if (!idx.has_value() || !idx->defined()) return nullptr;
  keep = idx->contiguous();
  return keep.data_ptr<int64_t>();
}

at::Tensor grid_tv_loss(const at::Tensor& grids_in, const c10::optional<at::Tensor>& idx) {
  const TvGeometry g = check_grid_tv_loss(grids_in, idx);
  const c10::cuda::CUDAGuard device_guard(grids_in.device());
  const at::Tensor grids = grids_in.contiguous();
  at::Tensor idx_c;
  const int64_t* ip = idx_ptr(idx, idx_c);
  bool small = false;
  const TvDivs dv = tv_divs(g, g.B * g.grid_numel(), &small);
  const bool vec = tv_vec(g, g.B, small);
  const launch::TvPlan plan =
      launch::tv_plan(g.M, g.B, g.grid_numel(), ip != nullptr, false, vec ? kTvVec : 1);
  at::Tensor partial = at::empty({plan.partials}, grids.options().dtype(at::kDouble));
  at::Tensor out = at::empty({}, grids.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const TvWeights w = weights(g);
  const TvVecDivs vd = vec ? tv_vec_divs(g) : TvVecDivs{};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grids.scalar_type(), "grid_tv_loss_cuda", [&] {
    const scalar_t* gp = grids.data_ptr<scalar_t>();
    double* pp = partial.data_ptr<double>();
    switch (tv_path(vec, small, tv_vec_aligned<scalar_t>(gp))) {
      case TvPath::kRuns:
        BO_LAUNCH((tv_loss_kernel<scalar_t, TvPath::kRuns>), plan.loss, stream, g, dv, vd, gp, ip, w, pp);
        break;
      case TvPath::kRunsScalarLoads:
        BO_LAUNCH((tv_loss_kernel<scalar_t, TvPath::kRunsScalarLoads>), plan.loss, stream, g, dv, vd, gp, ip,
                  w, pp);
        break;
      case TvPath::kSmall:
        BO_LAUNCH((tv_loss_kernel<scalar_t, TvPath::kSmall>), plan.loss, stream, g, dv, vd, gp, ip, w, pp);
        break;
      case TvPath::kWide:
        BO_LAUNCH((tv_loss_kernel<scalar_t, TvPath::kWide>), plan.loss, stream, g, dv, vd, gp, ip, w, pp);
        break;
    }
    BO_LAUNCH(tv_reduce_kernel<scalar_t>, plan.reduce, stream, pp, plan.partials, g.B == 0,
              out.data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor grid_tv_loss_backward(const at::Tensor& grad_output_in, const at::Tensor& grids_in,
                                 const c10::optional<at::Tensor>& idx) {
  const TvGeometry g = check_grid_tv_loss(grids_in, idx);
  check_floating(grad_output_in, "grad_output");
  check_same(grad_output_in, "grad_output", grids_in, "grids");
  TORCH_CHECK(grad_output_in.numel() == 1, "grad_output must have one element, got ",
              grad_output_in.sizes());
  const c10::cuda::CUDAGuard device_guard(grids_in.device());
  const at::Tensor grids = grids_in.contiguous();
  const at::Tensor go = grad_output_in.contiguous();
  at::Tensor idx_c;
  const int64_t* ip = idx_ptr(idx, idx_c);
  at::Tensor grad = at::empty(grids.sizes(), grids.options());
  bool small = false;
  const TvDivs dv = tv_divs(g, g.M * g.grid_numel(), &small);
  const bool vec = tv_vec(g, g.M, small);
  const launch::TvPlan plan =
      launch::tv_plan(g.M, g.B, g.grid_numel(), ip != nullptr, true, vec ? kTvVec : 1);
  if (!plan.backward.present) return grad;
  at::Tensor count;
  if (ip != nullptr) count = at::zeros({g.M}, grids.options().dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (plan.count.present) {
    BO_LAUNCH(tv_count_kernel, plan.count, stream, ip, g.B, g.M, count.data_ptr<int>());
  }
  const TvWeights w = weights(g);
  const TvVecDivs vd = vec ? tv_vec_divs(g) : TvVecDivs{};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grids.scalar_type(), "grid_tv_loss_backward_cuda", [&] {
        const int* cp = ip != nullptr ? count.data_ptr<int>() : nullptr;
        const scalar_t* gp = grids.data_ptr<scalar_t>();
        const scalar_t* gop = go.data_ptr<scalar_t>();
        scalar_t* out = grad.data_ptr<scalar_t>();
        const bool aligned = tv_vec_aligned<scalar_t>(gp) && tv_vec_aligned<scalar_t>(out);
        switch (tv_path(vec, small, aligned)) {
          case TvPath::kRuns:
            BO_LAUNCH((tv_backward_kernel<scalar_t, TvPath::kRuns>), plan.backward, stream, g, dv, vd, gp,
                      cp, gop, w, out);
            break;
          case TvPath::kRunsScalarLoads:
            BO_LAUNCH((tv_backward_kernel<scalar_t, TvPath::kRunsScalarLoads>), plan.backward, stream, g,
                      dv, vd, gp, cp, gop, w, out);
            break;
          case TvPath::kSmall:
            BO_LAUNCH((tv_backward_kernel<scalar_t, TvPath::kSmall>), plan.backward, stream, g, dv, vd, gp,
                      cp, gop, w, out);
            break;
          case TvPath::kWide:
            BO_LAUNCH((tv_backward_kernel<scalar_t, TvPath::kWide>), plan.backward, stream, g, dv, vd, gp,
                      cp, gop, w, out);
            break;
        }
      });
  return grad;
}

}  // namespace
}  // namespace cuda
}  // namespace bilateral_ops

TORCH_LIBRARY_IMPL(bilateral_ops, CUDA, m) {
  m.impl("grid_tv_loss", &bilateral_ops::cuda::grid_tv_loss);
  m.impl("_grid_tv_loss_backward", &bilateral_ops::cuda::grid_tv_loss_backward);
}
