// CPU kernels of bilateral_slice_apply_points and its backward (csrc/ops.cpp has the schemas, the
// per-sample math is csrc/include/bilateral_ops/slice_points.h).
//
// Samples go in blocks of one vector width: the corner offsets and trilinear weights of a block
// are computed first (in vector registers on the dense paths, by slice_points.h's point_corners on
// the others), then each sample gathers its eight corners from grid[grid_idx[p]] where it is.
// When the grids are sampled densely (many samples per cell, e.g. one grid per image), the used
// grids are first copied channels-last, so that a corner's C coefficients are contiguous; sparse
// ray batches read the channels-first grid directly instead (a copy would cost more than the
// samples).
//
// The grid gradient is deterministic without atomics: samples are grouped by grid (a stable
// counting sort, skipped when grid_idx is already sorted), and each grid's samples are summed by
// one task in sample order; a grid with many samples is split into chunks whose number depends
// only on its sample count, each summed in double into a buffer of its own, and the chunks are
// added in order. Whatever the thread count, the result is bitwise the same.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "../checks.h"
#include "bilateral_ops/slice_points.h"
#include "simd.h"

namespace bilateral_ops {
namespace cpu {
namespace {

constexpr int64_t kPointsGrain = 1024;        // samples per parallel_for grain
constexpr int64_t kChunkSamples = 16384;      // samples per chunk of a densely sampled grid
constexpr int64_t kMaxChunks = 32;            // chunks per grid at most
constexpr int64_t kMaxPartialBytes = 64 << 20;  // double partial sums of one grid, all chunks

// Where channel c of cell `cell` of grid m lives: grids either as given (M, C, cells) or copied
// channels-last (M, cells, Cp) with Cp = C rounded up to whole vectors (zeros after C), so that a
// corner's coefficients are nv = Cp / vec_width vector loads.
template <typename T>
struct GridView {
  const T* base;
  int64_t grid_stride, cell_stride, channel_stride;
  int64_t nv;  // vectors per cell when copied channels-last, 0 when read in place

  const T* grid(int64_t m) const { return base + m * grid_stride; }
};

constexpr int64_t kMaxVectors = 4;  // channels-last copies for up to 4 vectors (32 float channels)

// grid_idx as the kernels read it: P indices, or, when it is an expanded single index (stride 0,
// as compat.bilagrid passes one grid for every sample), that one value without a copy of P.
struct Indices {
  at::Tensor storage;
  const int64_t* data;
  int64_t stride;  // 0 or 1

  int64_t operator[](int64_t p) const { return data[p * stride]; }
};

Indices read_indices(const at::Tensor& grid_idx) {
  Indices i;
  i.stride = grid_idx.size(0) > 1 && grid_idx.stride(0) == 0 ? 0 : 1;
  i.storage = i.stride == 0 ? grid_idx.narrow(0, 0, 1).contiguous() : grid_idx.contiguous();
  i.data = i.storage.data_ptr<int64_t>();
  return i;
}

// Samples per grid, and whether grid_idx is nondecreasing. Raises on an index out of range.
struct IndexStats {
  std::vector<int64_t> count;
  bool sorted = true;
};

IndexStats index_stats(const Indices& idx, int64_t P, int64_t M) {
  IndexStats s;
  s.count.assign(M, 0);
  const int64_t n = idx.stride == 0 ? 1 : P;
  int64_t prev = 0;
  for (int64_t p = 0; p < n; ++p) {
    const int64_t m = idx[p];
    TORCH_CHECK(m >= 0 && m < M, "grid_idx values must be in [0, ", M, "), got ", m,
                " at sample ", p);
    ++s.count[m];
    if (m < prev) s.sorted = false;
    prev = m;
  }
  if (idx.stride == 0) s.count[idx[0]] = P;
  return s;
}

// The used grids copied channels-last when that pays: more samples than cells to copy.
template <typename T>
GridView<T> grid_view(const at::Tensor& grid_c, const PointsGeometry& g, const IndexStats& st,
                      at::Tensor& storage) {
  const T* src = grid_c.data_ptr<T>();
  const int64_t cells = g.cells(), per = g.C * cells;
  std::vector<int64_t> used;
  for (int64_t m = 0; m < g.M; ++m) {
    if (st.count[m] > 0) used.push_back(m);
  }
  constexpr int64_t W = vec_width<T>();
  const int64_t nv = (g.C + W - 1) / W, cp = nv * W;
  if (nv > kMaxVectors || g.P < static_cast<int64_t>(used.size()) * cells) {
    return GridView<T>{src, per, 1, cells, 0};
  }
  storage = at::empty({g.M, cells * cp}, grid_c.options());
  T* dst = storage.data_ptr<T>();
  at::parallel_for(0, static_cast<int64_t>(used.size()), 1, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const T* s = src + used[u] * per;
      T* d = dst + used[u] * cells * cp;
      for (int64_t k = 0; k < cells; ++k) {
        for (int64_t c = 0; c < cp; ++c) d[k * cp + c] = c < g.C ? s[c * cells + k] : T(0);
      }
    }
  });
  return GridView<T>{dst, cells * cp, cp, 1, nv};
}

// Integer vectors with one int64 lane per T lane: cell offsets of a block of samples.
template <typename T>
struct OffsetVecOf;
template <>
struct OffsetVecOf<float> {
  typedef int64_t type __attribute__((vector_size(64)));
};
template <>
struct OffsetVecOf<double> {
  typedef int64_t type __attribute__((vector_size(32)));
};

// The corners of a block of W = vec_width<T>() samples, corner k (z-major, as point_corners) of
// lane s at [k][s]. Computing them W samples at a time takes the coordinate arithmetic (clamps,
// floors, offsets, the eight weight products) out of the per-sample loops, which then only
// gather and accumulate.
template <typename T>
struct CornerBlock {
  static constexpr int W = static_cast<int>(vec_width<T>());
  alignas(64) int64_t off[8][W];  // cell offsets in a (D, Gh, Gw) slab
  alignas(32) T w[8][W];
  alignas(32) T dx[8][W], dy[8][W], dz[8][W];  // only when the coordinate gradient is needed
};

// The sample of lane s of a block: order[b + s], or b + s without an order. Lanes past the n
// samples of a short block repeat its last sample.
struct BlockSamples {
  const int64_t* order;
  int64_t b;
  int n;

  int64_t operator()(int s) const {
    const int64_t i = b + (s < n ? s : n - 1);
    return order != nullptr ? order[i] : i;
  }
};

// The vector form of point_corners (slice_points.h, with unit_to_grid_aligned written out): the
// same operations in the same order, so the same weights and offsets.
template <typename T>
BO_ALWAYS_INLINE void corner_block(const T* coords, const BlockSamples& bs, const PointsGeometry& g,
                                   bool derivatives, CornerBlock<T>& cb) {
  using V = vec_t<T>;
  using L = typename OffsetVecOf<T>::type;
  constexpr int W = CornerBlock<T>::W;
  V u[3];
  for (int s = 0; s < W; ++s) {
    const T* c = coords + bs(s) * 3;
    u[0][s] = c[0];
    u[1][s] = c[1];
    u[2][s] = c[2];
  }
  const VecTaps<T> tx = vaxis_taps<T>(u[0] * static_cast<T>(g.Gw - 1) + T(0.5), g.Gw);
  const VecTaps<T> ty = vaxis_taps<T>(u[1] * static_cast<T>(g.Gh - 1) + T(0.5), g.Gh);
  const VecTaps<T> tz = vaxis_taps<T>(u[2] * static_cast<T>(g.D - 1) + T(0.5), g.D);
  const int64_t plane = g.Gh * g.Gw;
  const L zo[2] = {__builtin_convertvector(tz.i0, L) * plane, __builtin_convertvector(tz.i1, L) * plane};
  const L yo[2] = {__builtin_convertvector(ty.i0, L) * g.Gw, __builtin_convertvector(ty.i1, L) * g.Gw};
  const L xo[2] = {__builtin_convertvector(tx.i0, L), __builtin_convertvector(tx.i1, L)};
  const V zw[2] = {tz.w0, tz.w1};
  const V yw[2] = {ty.w0, ty.w1};
  const V xw[2] = {tx.w0, tx.w1};
  const V sx = tx.slope * static_cast<T>(g.Gw - 1);
  const V sy = ty.slope * static_cast<T>(g.Gh - 1);
  const V sz = tz.slope * static_cast<T>(g.D - 1);
  const V xd[2] = {-sx, sx};
  const V yd[2] = {-sy, sy};
  const V zd[2] = {-sz, sz};
  for (int a = 0; a < 2; ++a) {
    for (int b = 0; b < 2; ++b) {
      for (int e = 0; e < 2; ++e) {
        const int k = a * 4 + b * 2 + e;
        const L o = zo[a] + yo[b] + xo[e];
        __builtin_memcpy(cb.off[k], &o, sizeof(o));
        vstore(cb.w[k], zw[a] * yw[b] * xw[e]);
        if (derivatives) {
          vstore(cb.dx[k], zw[a] * yw[b] * xd[e]);
          vstore(cb.dy[k], zw[a] * yd[b] * xw[e]);
          vstore(cb.dz[k], zd[a] * yw[b] * xw[e]);
        }
      }
    }
  }
}

// The same block filled lane by lane by point_corners itself. The paths that read the grids in
// place (sparse samples, many channels) use it, so that the CPU tests also check the per-sample
// math of the CUDA kernels.
template <typename T>
BO_ALWAYS_INLINE void corner_block_scalar(const T* coords, const BlockSamples& bs,
                                          const PointsGeometry& g, bool derivatives,
                                          CornerBlock<T>& cb) {
  for (int s = 0; s < bs.n; ++s) {
    const T* c = coords + bs(s) * 3;
    const PointCorners<T> pc = point_corners<T>(c[0], c[1], c[2], g.D, g.Gh, g.Gw);
    for (int k = 0; k < 8; ++k) {
      cb.off[k][s] = pc.offset[k];
      cb.w[k][s] = pc.weight[k];
      if (derivatives) {
        cb.dx[k][s] = pc.dx[k];
        cb.dy[k][s] = pc.dy[k];
        cb.dz[k][s] = pc.dz[k];
      }
    }
  }
}

// A[c] = the sample of every channel of lane s at its corners.
template <typename T, int64_t kC>
BO_ALWAYS_INLINE void sample_channels(const GridView<T>& v, const T* grid, const CornerBlock<T>& cb,
                                      int s, int64_t C, T* A) {
  const int64_t n = kC > 0 ? kC : C;
  for (int64_t c = 0; c < n; ++c) A[c] = T(0);
  for (int k = 0; k < 8; ++k) {
    const T* q = grid + cb.off[k][s] * v.cell_stride;
    const T w = cb.w[k][s];
    if (v.channel_stride == 1) {
      for (int64_t c = 0; c < n; ++c) A[c] += w * q[c];
    } else {
      for (int64_t c = 0; c < n; ++c) A[c] += w * q[c * v.channel_stride];
    }
  }
}

typedef float f32x4 __attribute__((vector_size(16)));

// Vectors built from the three values of a sample's row (its input x or its output gradient g,
// both (P, 3)): one 16-byte load and a permute, which reads x[3], the next row's first value
// (unused), so the last row (next_row false) is built lane by lane. GCC compiles lane-by-lane
// vectors to chains of inserts under target_clones, and has __builtin_shufflevector from GCC 12.
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define BO_SHUFFLEVECTOR 1
#endif

// [x0, x1, x2, 1, x0, x1, x2, 1]
BO_ALWAYS_INLINE vec_t<float> xyz1_twice(const float* x, bool next_row) {
#ifdef BO_SHUFFLEVECTOR
  if (next_row) {
    f32x4 v;
    __builtin_memcpy(&v, x, sizeof(v));
    const f32x4 one = f32x4{} + 1.0f;
    return __builtin_shufflevector(v, one, 0, 1, 2, 4, 0, 1, 2, 4);
  }
#endif
  return vec_t<float>{x[0], x[1], x[2], 1.0f, x[0], x[1], x[2], 1.0f};
}

// [g0, g0, g0, g0, g1, g1, g1, g1] and [g2, g2, g2, g2, 0, 0, 0, 0]
BO_ALWAYS_INLINE void rows_of(const float* g, bool next_row, vec_t<float>& g01, vec_t<float>& g2) {
#ifdef BO_SHUFFLEVECTOR
  if (next_row) {
    f32x4 v;
    __builtin_memcpy(&v, g, sizeof(v));
    const f32x4 zero{};
    g01 = __builtin_shufflevector(v, zero, 0, 0, 0, 0, 1, 1, 1, 1);
    g2 = __builtin_shufflevector(v, zero, 2, 2, 2, 2, 4, 4, 4, 4);
    return;
  }
#endif
  g01 = vec_t<float>{g[0], g[0], g[0], g[0], g[1], g[1], g[1], g[1]};
  g2 = vec_t<float>{g[2], g[2], g[2], g[2], 0.0f, 0.0f, 0.0f, 0.0f};
}

// lib_bilagrid's layout (3 inputs, offsets, 3 outputs: 12 channels, two float vectors of a
// channels-last copy: rows 0 and 1 of the 3x4 matrix in a0, row 2 in the low half of a1).
// The affine map, out[o] = (A[o, 0] x0 + A[o, 2] x2) + (A[o, 1] x1 + A[o, 3]), written as four
// floats: the fourth lands on the next sample's first value, which is written after it. The
// range's last sample (last) writes three, by the same sums: its next sample may be another
// task's, and the same sums keep each sample's value independent of where the ranges split.
BO_ALWAYS_INLINE void affine34_store(vec_t<float> a0, vec_t<float> a1, const float* x, float* out,
                                     bool last) {
  using V = vec_t<float>;
  using M = VecOf<float>::mask;
  // The range's last row may be the input's, with no fourth float after it.
  const V xv = xyz1_twice(x, !last);
  const V m0 = a0 * xv, m1 = a1 * xv;
  const V s = __builtin_shuffle(m0, m1, M{0, 1, 4, 5, 8, 9, 12, 13}) +
              __builtin_shuffle(m0, m1, M{2, 3, 6, 7, 10, 11, 14, 15});
  const V t = s + __builtin_shuffle(s, M{1, 0, 3, 2, 5, 4, 7, 6});
  const V r = __builtin_shuffle(t, M{0, 2, 4, 6, 0, 2, 4, 6});
  __builtin_memcpy(out, &r, (last ? 3 : 4) * sizeof(float));
}

// Its input gradient: gi[i] = sum_o go[o] A[o, i], with go's rows from rows_of.
BO_ALWAYS_INLINE void input_grad34(vec_t<float> a0, vec_t<float> a1, vec_t<float> g01, vec_t<float> g2,
                                   float* gi) {
  using V = vec_t<float>;
  using M = VecOf<float>::mask;
  const V h = a0 * g01 + a1 * g2;
  const V r = h + __builtin_shuffle(h, M{4, 5, 6, 7, 0, 1, 2, 3});
  gi[0] = r[0];
  gi[1] = r[1];
  gi[2] = r[2];
}

inline bool is_rgb34(const AffineLayout& l) {
  return l.Ci == 3 && l.Co == 3 && l.has_offset;
}

template <typename T, int NV>
BO_ALWAYS_INLINE void forward_dense(const GridView<T>& v, const PointsGeometry& g,
                                    const AffineLayout& l, const T* coords, const T* input,
                                    const Indices& idx, T* out, int64_t p0, int64_t p1) {
  using V = vec_t<T>;
  constexpr int W = CornerBlock<T>::W;
  constexpr int64_t CP = NV * W;
  [[maybe_unused]] const bool rgb34 = is_rgb34(l);
  CornerBlock<T> cb;
  alignas(32) T A[NV * W];
  for (int64_t b = p0; b < p1; b += W) {
    const int n = static_cast<int>(std::min<int64_t>(W, p1 - b));
    corner_block<T>(coords, BlockSamples{nullptr, b, n}, g, false, cb);
    for (int s = 0; s < n; ++s) {
      const int64_t p = b + s;
      const T* grid = v.grid(idx[p]);
      // Two accumulator chains (even and odd corners) halve the dependent FMAs per sample.
      V acc[2][NV] = {};
      for (int k = 0; k < 8; ++k) {
        const T* q = grid + cb.off[k][s] * CP;
        const V w = vbroadcast<T>(cb.w[k][s]);
        for (int j = 0; j < NV; ++j) acc[k & 1][j] += w * vload(q + j * W);
      }
      for (int j = 0; j < NV; ++j) acc[0][j] += acc[1][j];
      const T* x = input + p * l.Ci;
      if constexpr (W == 8 && NV == 2) {
        if (rgb34) {
          affine34_store(acc[0][0], acc[0][1], x, out + p * 3, p + 1 == p1);
          continue;
        }
      }
      for (int j = 0; j < NV; ++j) vstore(A + j * W, acc[0][j]);
      for (int64_t o = 0; o < l.Co; ++o) {
        out[p * l.Co + o] = point_affine<T>(l, A, [&](int64_t i) { return x[i]; }, o);
      }
    }
  }
}

template <typename T, int64_t kC>
BO_ALWAYS_INLINE void forward_range(const GridView<T>& v, const PointsGeometry& g,
                                    const AffineLayout& l, const T* coords, const T* input,
                                    const Indices& idx, T* out, int64_t p0, int64_t p1) {
  switch (v.nv) {
    case 1: return forward_dense<T, 1>(v, g, l, coords, input, idx, out, p0, p1);
    case 2: return forward_dense<T, 2>(v, g, l, coords, input, idx, out, p0, p1);
    case 3: return forward_dense<T, 3>(v, g, l, coords, input, idx, out, p0, p1);
    case 4: return forward_dense<T, 4>(v, g, l, coords, input, idx, out, p0, p1);
    default: break;
  }
  constexpr int W = CornerBlock<T>::W;
  std::vector<T> A(g.C);
  CornerBlock<T> cb;
  for (int64_t b = p0; b < p1; b += W) {
    const int n = static_cast<int>(std::min<int64_t>(W, p1 - b));
    corner_block_scalar<T>(coords, BlockSamples{nullptr, b, n}, g, false, cb);
    for (int s = 0; s < n; ++s) {
      const int64_t p = b + s;
      sample_channels<T, kC>(v, v.grid(idx[p]), cb, s, g.C, A.data());
      const T* x = input + p * l.Ci;
      for (int64_t o = 0; o < l.Co; ++o) {
        out[p * l.Co + o] = point_affine<T>(l, A.data(), [&](int64_t i) { return x[i]; }, o);
      }
    }
  }
}

// Task functions, one copy per instruction set, with everything they call inlined (flatten: the
// per-sample math of slice_points.h then compiles for each instruction set too). 12 channels
// (lib_bilagrid's 3x4 matrices) read in place get a fixed-size channel loop.
#define BO_POINTS_TASK BO_TARGET_CLONES __attribute__((flatten))
#define BO_POINTS_FORWARD(T, SUFFIX)                                                            \
  BO_POINTS_TASK void points_forward_##SUFFIX(const GridView<T>& v, const PointsGeometry& g, \
                                                const AffineLayout& l, const T* coords,        \
                                                const T* input, const Indices& idx, T* out,     \
                                                int64_t p0, int64_t p1) {                      \
    if (g.C == 12) {                                                                           \
      forward_range<T, 12>(v, g, l, coords, input, idx, out, p0, p1);                          \
    } else {                                                                                   \
      forward_range<T, 0>(v, g, l, coords, input, idx, out, p0, p1);                           \
    }                                                                                          \
  }
BO_POINTS_FORWARD(float, f32)
BO_POINTS_FORWARD(double, f64)

void points_forward(const GridView<float>& v, const PointsGeometry& g, const AffineLayout& l,
                    const float* c, const float* x, const Indices& i, float* o, int64_t p0,
                    int64_t p1) {
  points_forward_f32(v, g, l, c, x, i, o, p0, p1);
}
void points_forward(const GridView<double>& v, const PointsGeometry& g, const AffineLayout& l,
                    const double* c, const double* x, const Indices& i, double* o, int64_t p0,
                    int64_t p1) {
  points_forward_f64(v, g, l, c, x, i, o, p0, p1);
}

// Everything the backward of one sample reads and writes.
template <typename T>
struct BackwardArgs {
  GridView<T> v;
  PointsGeometry g;
  AffineLayout l;
  const T* coords;
  const T* input;
  const T* grad_output;
  Indices idx;
  T* grad_coords;  // when need_coords
  T* grad_input;   // when need_input
  bool need_grid, need_coords, need_input;
};

// The backward of a block: grad_coords and grad_input written, and the splat values V of each
// sample handed to sink(cb, lane, V) when the grid gradient is needed (the sinks add them into a
// channels-last double buffer or, for direct accumulation, into grad_grid (C, cells) of the
// sample's grid in T). Grids read in place, or any channel count.
template <typename T, typename Sink>
BO_ALWAYS_INLINE void backward_block(const BackwardArgs<T>& a, const BlockSamples& bs,
                                     CornerBlock<T>& cb, T* A, T* V, const Sink& sink) {
  const PointsGeometry& g = a.g;
  const AffineLayout& l = a.l;
  corner_block_scalar<T>(a.coords, bs, g, a.need_coords, cb);
  for (int s = 0; s < bs.n; ++s) {
    const int64_t p = bs(s);
    const T* x = a.input + p * l.Ci;
    const T* go = a.grad_output + p * l.Co;
    const auto gof = [&](int64_t o) { return go[o]; };
    const auto xf = [&](int64_t i) { return x[i]; };
    for (int64_t c = 0; c < g.C; ++c) V[c] = point_splat_value<T>(l, gof, xf, c);
    if (a.need_coords || a.need_input) {
      const T* grid = a.v.grid(a.idx[p]);
      T gx = T(0), gy = T(0), gz = T(0);
      for (int64_t c = 0; c < g.C; ++c) A[c] = T(0);
      for (int k = 0; k < 8; ++k) {
        const T* q = grid + cb.off[k][s] * a.v.cell_stride;
        T e = T(0);
        const T w = cb.w[k][s];
        for (int64_t c = 0; c < g.C; ++c) {
          const T sv = q[c * a.v.channel_stride];
          e += V[c] * sv;
          A[c] += w * sv;
        }
        if (a.need_coords) {
          gx += cb.dx[k][s] * e;
          gy += cb.dy[k][s] * e;
          gz += cb.dz[k][s] * e;
        }
      }
      if (a.need_coords) {
        a.grad_coords[p * 3 + 0] = gx;
        a.grad_coords[p * 3 + 1] = gy;
        a.grad_coords[p * 3 + 2] = gz;
      }
      if (a.need_input) {
        for (int64_t i = 0; i < l.Ci; ++i) {
          T sum = T(0);
          for (int64_t o = 0; o < l.Co; ++o) sum += go[o] * A[l.channel(o, i)];
          a.grad_input[p * l.Ci + i] = sum;
        }
      }
    }
    if (a.need_grid) sink(cb, s, V);
  }
}

// The splat values V of one sample (point_splat_value) as NV vectors vv, and stored to V. For
// lib_bilagrid's layout (3 inputs, offsets, 3 outputs: 12 channels) they are built in registers:
// scalar stores read back as one vector load cannot be forwarded and stall every sample. (In float,
// the dense backward builds them itself from go's rows, which the input gradient uses too.)
template <typename T, int NV>
BO_ALWAYS_INLINE void splat_vectors(const AffineLayout& l, const T* go, const T* x, T* V,
                                    vec_t<T>* vv) {
  using Vec = vec_t<T>;
  constexpr int64_t W = vec_width<T>();
  if constexpr (W == 4 && NV >= 3 && NV <= 4) {
    if (is_rgb34(l)) {
      const T g0 = go[0], g1 = go[1], g2 = go[2], x0 = x[0], x1 = x[1], x2 = x[2];
      vv[0] = Vec{g0 * x0, g0 * x1, g0 * x2, g0};
      vv[1] = Vec{g1 * x0, g1 * x1, g1 * x2, g1};
      vv[2] = Vec{g2 * x0, g2 * x1, g2 * x2, g2};
      for (int j = 3; j < NV; ++j) vv[j] = Vec{};
      for (int j = 0; j < NV; ++j) vstore(V + j * W, vv[j]);
      return;
    }
  }
  const auto gof = [&](int64_t o) { return go[o]; };
  const auto xf = [&](int64_t i) { return x[i]; };
  for (int64_t c = 0; c < l.Co * l.stride; ++c) V[c] = point_splat_value<T>(l, gof, xf, c);
  for (int j = 0; j < NV; ++j) vv[j] = vload(V + j * W);
}

// backward_block on a channels-last copy of NV vectors per cell. Per sample, the eight corner dot
// products e_k = V . grid[corner k] and the samples A stay in vector registers; the corner sums of
// the W lanes are transposed once per block, so that the coordinate gradients
// sum_k d weight_k e_k are computed for the W lanes at once. V is padded with zeros to whole
// vectors.
template <typename T, int NV, typename Sink>
BO_ALWAYS_INLINE void backward_block_dense(const BackwardArgs<T>& a, const BlockSamples& bs,
                                           CornerBlock<T>& cb, T* A, T* V, const Sink& sink) {
  using Vec = vec_t<T>;
  constexpr int W = CornerBlock<T>::W;
  constexpr int H = 8 / W;  // vectors of corner sums per sample
  constexpr int64_t CP = NV * W;
  const AffineLayout& l = a.l;
  [[maybe_unused]] const bool rgb34 = is_rgb34(l);
  corner_block<T>(a.coords, bs, a.g, a.need_coords, cb);
  Vec E[H][W] = {};  // E[h][s]: lane s's corner sums h W .. h W + W - 1
  for (int s = 0; s < bs.n; ++s) {
    const int64_t p = bs(s);
    const T* x = a.input + p * l.Ci;
    const T* go = a.grad_output + p * l.Co;
    Vec vv[NV] = {};
    // lib_bilagrid's layout in float: go's rows give the splat values [go0 x, go0 | go1 x, go1]
    // and [go2 x, go2 | 0] and, below, the input gradient.
    [[maybe_unused]] Vec g01, g2;
    bool built = false;
    if constexpr (W == 8 && NV == 2) {
      if (rgb34) {
        const bool next_row = p + 1 < a.g.P;
        rows_of(go, next_row, g01, g2);
        const Vec xv = xyz1_twice(x, next_row);
        vv[0] = g01 * xv;
        vv[1] = g2 * xv;
        for (int j = 0; j < NV; ++j) vstore(V + j * W, vv[j]);
        built = true;
      }
    }
    if (!built) splat_vectors<T, NV>(l, go, x, V, vv);
    if (a.need_coords || a.need_input) {
      const T* grid = a.v.grid(a.idx[p]);
      Vec acc[2][NV] = {};
      Vec d[8];
      for (int k = 0; k < 8; ++k) {
        const T* q = grid + cb.off[k][s] * CP;
        const Vec w = vbroadcast<T>(cb.w[k][s]);
        d[k] = Vec{};
        for (int j = 0; j < NV; ++j) {
          const Vec sv = vload(q + j * W);
          d[k] += vv[j] * sv;
          acc[k & 1][j] += w * sv;
        }
      }
      if (a.need_coords) {
        for (int h = 0; h < H; ++h) E[h][s] = vsum_many<T>(d + h * W);
      }
      if (a.need_input) {
        for (int j = 0; j < NV; ++j) acc[0][j] += acc[1][j];
        T* gi = a.grad_input + p * l.Ci;
        if constexpr (W == 8 && NV == 2) {
          if (built) input_grad34(acc[0][0], acc[0][1], g01, g2, gi);
        }
        if (!built) {
          for (int j = 0; j < NV; ++j) vstore(A + j * W, acc[0][j]);
          for (int64_t i = 0; i < l.Ci; ++i) {
            T sum = T(0);
            for (int64_t o = 0; o < l.Co; ++o) sum += go[o] * A[l.channel(o, i)];
            gi[i] = sum;
          }
        }
      }
    }
    if (a.need_grid) sink(cb, s, V);
  }
  if (a.need_coords) {
    for (int h = 0; h < H; ++h) vtranspose<T>(E[h]);  // E[h][c]: corner h W + c of every lane
    Vec gx{}, gy{}, gz{};
    for (int h = 0; h < H; ++h) {
      for (int c = 0; c < W; ++c) {
        const int k = h * W + c;
        gx += vload(cb.dx[k]) * E[h][c];
        gy += vload(cb.dy[k]) * E[h][c];
        gz += vload(cb.dz[k]) * E[h][c];
      }
    }
    for (int s = 0; s < bs.n; ++s) {
      T* gc = a.grad_coords + bs(s) * 3;
      gc[0] = gx[s];
      gc[1] = gy[s];
      gc[2] = gz[s];
    }
  }
}

// Samples [s0, s1) of the order `order` (sample indices, or the identity when null), in blocks of
// W. The value buffer is zero-padded to whole float vectors: the sinks may read whole vectors.
template <typename T, int NV, typename Sink>
BO_ALWAYS_INLINE void backward_blocks(const BackwardArgs<T>& a, const int64_t* order, int64_t s0,
                                      int64_t s1, T* A, T* V, const Sink& sink) {
  constexpr int W = CornerBlock<T>::W;
  CornerBlock<T> cb;
  for (int64_t b = s0; b < s1; b += W) {
    const BlockSamples bs{order, b, static_cast<int>(std::min<int64_t>(W, s1 - b))};
    if constexpr (NV > 0) {
      backward_block_dense<T, NV>(a, bs, cb, A, V, sink);
    } else {
      backward_block<T>(a, bs, cb, A, V, sink);
    }
  }
}

template <typename T, typename Sink>
BO_ALWAYS_INLINE void backward_samples(const BackwardArgs<T>& a, const int64_t* order, int64_t s0,
                                       int64_t s1, const Sink& sink) {
  const int64_t padded = (a.g.C + 7) / 8 * 8;
  std::vector<T> A(std::max<int64_t>(a.g.C, kMaxVectors * 8)), V(padded, T(0));
  switch (a.v.nv) {
    case 1: return backward_blocks<T, 1>(a, order, s0, s1, A.data(), V.data(), sink);
    case 2: return backward_blocks<T, 2>(a, order, s0, s1, A.data(), V.data(), sink);
    case 3: return backward_blocks<T, 3>(a, order, s0, s1, A.data(), V.data(), sink);
    case 4: return backward_blocks<T, 4>(a, order, s0, s1, A.data(), V.data(), sink);
    default: return backward_blocks<T, 0>(a, order, s0, s1, A.data(), V.data(), sink);
  }
}

// Four values as a vector of doubles (a 16-byte load of floats, converted: it forwards from the
// vector store of splat_vectors).
BO_ALWAYS_INLINE vec_t<double> widen(const float* p) {
  f32x4 v;
  __builtin_memcpy(&v, p, sizeof(v));
  return __builtin_convertvector(v, vec_t<double>);
}
BO_ALWAYS_INLINE vec_t<double> widen(const double* p) { return vload(p); }

// Double accumulators of the grid gradient, channels-last with the channels padded to whole
// double vectors (chunk buffers of densely sampled grids).
inline int64_t acc_channels(int64_t C) {
  constexpr int64_t W = vec_width<double>();
  return (C + W - 1) / W * W;
}

// Adds a sample's splat values V, times each corner's weight, into a (cells, cpd) double buffer
// (cpd = acc_channels(C)): whole vectors for the first NVD * 4 channels (all of them when NVD is
// the runtime count cpd / 4, given as 0), then scalars.
template <typename T, int NVD>
struct ChunkSink {
  double* acc;
  int64_t C, cpd;

  BO_ALWAYS_INLINE void operator()(const CornerBlock<T>& cb, int s, const T* V) const {
    using VD = vec_t<double>;
    constexpr int64_t WD = vec_width<double>();
    constexpr int64_t kMax = 2 * kMaxVectors;
    const int64_t nvd = NVD > 0 ? NVD : std::min<int64_t>(cpd / WD, kMax);
    VD vd[NVD > 0 ? NVD : kMax];
    for (int64_t j = 0; j < nvd; ++j) vd[j] = widen(V + j * WD);
    for (int k = 0; k < 8; ++k) {
      double* q = acc + cb.off[k][s] * cpd;
      const double w = cb.w[k][s];
      const VD wv = vsplat<double>(w);  // converted from T: a broadcast of a computed value
      for (int64_t j = 0; j < nvd; ++j) vstore(q + j * WD, vload(q + j * WD) + wv * vd[j]);
      for (int64_t c = nvd * WD; c < C; ++c) q[c] += w * static_cast<double>(V[c]);
    }
  }
};

// Per-sample gradients only (no grid gradient): any order, plain parallel loop.
#define BO_POINTS_BACKWARD(T, SUFFIX)                                                            \
  BO_POINTS_TASK void points_backward_plain_##SUFFIX(const BackwardArgs<T>& a, int64_t s0,      \
                                                     int64_t s1) {                              \
    backward_samples<T>(a, nullptr, s0, s1, [](const CornerBlock<T>&, int, const T*) {});       \
  }                                                                                             \
  /* grid gradient of one grid in T: into the (cells, C) buffer acc when given, then written   */ \
  /* to grad_grid (C, cells); straight into grad_grid otherwise. The same sums in the same      */ \
  /* order either way. acc is for grids with many samples: grad_grid's channel stride (cells) */ \
  /* is a multiple of 4 KiB for power-of-two grids (lib_bilagrid's 8 x 16 x 16: 8 KiB), and the */ \
  /* C channels of a corner then share one set of the L1 cache: ~6x slower per sample.         */ \
  BO_POINTS_TASK void points_backward_direct_##SUFFIX(const BackwardArgs<T>& a,                 \
                                                      const int64_t* order, int64_t s0,         \
                                                      int64_t s1, T* grad_grid_m, T* acc) {     \
    const int64_t cells = a.g.cells(), C = a.g.C;                                               \
    const int64_t cs = acc != nullptr ? 1 : cells;  /* channel stride */                        \
    T* dst = acc != nullptr ? acc : grad_grid_m;                                                \
    const int64_t ks = acc != nullptr ? C : 1;  /* cell stride */                               \
    if (acc != nullptr) std::fill(acc, acc + cells * C, T(0));                                  \
    backward_samples<T>(a, order, s0, s1, [&](const CornerBlock<T>& cb, int s, const T* V) {    \
      for (int k = 0; k < 8; ++k) {                                                             \
        T* q = dst + cb.off[k][s] * ks;                                                         \
        const T w = cb.w[k][s];                                                                 \
        for (int64_t c = 0; c < C; ++c) q[c * cs] += w * V[c];                                  \
      }                                                                                         \
    });                                                                                         \
    if (acc == nullptr) return;                                                                 \
    for (int64_t c = 0; c < C; ++c) {                                                           \
      for (int64_t k = 0; k < cells; ++k) grad_grid_m[c * cells + k] = acc[k * C + c];          \
    }                                                                                           \
  }                                                                                             \
  /* grid gradient into a (cells, acc_channels(C)) double buffer, whole vectors; lib_bilagrid's */ \
  /* 12 channels (3 double vectors) with a fixed-size loop */                                    \
  BO_POINTS_TASK void points_backward_chunk_##SUFFIX(const BackwardArgs<T>& a,                  \
                                                     const int64_t* order, int64_t s0,          \
                                                     int64_t s1, double* acc) {                 \
    const int64_t cpd = acc_channels(a.g.C);                                                    \
    if (cpd == 12) {                                                                            \
      backward_samples<T>(a, order, s0, s1, ChunkSink<T, 3>{acc, a.g.C, cpd});                  \
    } else {                                                                                    \
      backward_samples<T>(a, order, s0, s1, ChunkSink<T, 0>{acc, a.g.C, cpd});                  \
    }                                                                                           \
  }
BO_POINTS_BACKWARD(float, f32)
BO_POINTS_BACKWARD(double, f64)

struct BackwardTasks {
  static void plain(const BackwardArgs<float>& a, int64_t s0, int64_t s1) {
    points_backward_plain_f32(a, s0, s1);
  }
  static void plain(const BackwardArgs<double>& a, int64_t s0, int64_t s1) {
    points_backward_plain_f64(a, s0, s1);
  }
  static void direct(const BackwardArgs<float>& a, const int64_t* o, int64_t s0, int64_t s1,
                     float* gg, float* acc) {
    points_backward_direct_f32(a, o, s0, s1, gg, acc);
  }
  static void direct(const BackwardArgs<double>& a, const int64_t* o, int64_t s0, int64_t s1,
                     double* gg, double* acc) {
    points_backward_direct_f64(a, o, s0, s1, gg, acc);
  }
  static void chunk(const BackwardArgs<float>& a, const int64_t* o, int64_t s0, int64_t s1,
                    double* acc) {
    points_backward_chunk_f32(a, o, s0, s1, acc);
  }
  static void chunk(const BackwardArgs<double>& a, const int64_t* o, int64_t s0, int64_t s1,
                    double* acc) {
    points_backward_chunk_f64(a, o, s0, s1, acc);
  }
};

// Chunks of a grid with n samples: one unless it has more than kChunkSamples; never so many that
// their double buffers exceed kMaxPartialBytes. Sizes only: the summation order is fixed.
int64_t chunks_for(int64_t n, int64_t grid_numel) {
  const int64_t by_memory =
      std::max<int64_t>(1, kMaxPartialBytes / (grid_numel * static_cast<int64_t>(sizeof(double))));
  const int64_t by_samples = (n + kChunkSamples - 1) / kChunkSamples;
  return std::max<int64_t>(1, std::min({kMaxChunks, by_samples, by_memory}));
}

at::Tensor bilateral_slice_apply_points(const at::Tensor& grid, const at::Tensor& coords,
                                        const at::Tensor& input, const at::Tensor& grid_idx,
                                        bool has_offset) {
  const PointsShape shape = check_slice_apply_points(grid, coords, input, grid_idx, has_offset);
  const PointsGeometry& g = shape.g;
  const AffineLayout& l = shape.l;
  if (g.P == 0) return at::zeros({0, l.Co}, input.options());
  const Indices idx = read_indices(grid_idx);
  const IndexStats st = index_stats(idx, g.P, g.M);
  const auto dt = compute_dtype(input.scalar_type());
  const at::Tensor grid_c = grid.to(dt).contiguous();
  const at::Tensor coords_c = coords.to(dt).contiguous();
  const at::Tensor input_c = input.to(dt).contiguous();
  at::Tensor out = at::empty({g.P, l.Co}, input.options().dtype(dt));
  AT_DISPATCH_FLOATING_TYPES(dt, "bilateral_slice_apply_points_cpu", [&] {
    at::Tensor storage;
    const GridView<scalar_t> v = grid_view<scalar_t>(grid_c, g, st, storage);
    const scalar_t* c = coords_c.data_ptr<scalar_t>();
    const scalar_t* x = input_c.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, g.P, kPointsGrain, [&](int64_t p0, int64_t p1) {
      points_forward(v, g, l, c, x, idx, o, p0, p1);
    });
  });
  return out.to(input.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bilateral_slice_apply_points_backward(
    const at::Tensor& grad_output, const at::Tensor& grid, const at::Tensor& coords,
    const at::Tensor& input, const at::Tensor& grid_idx, bool has_offset,
    std::array<bool, 3> mask) {
  const PointsShape shape = check_slice_apply_points(grid, coords, input, grid_idx, has_offset);
  const PointsGeometry& g = shape.g;
  const AffineLayout& l = shape.l;
  check_grad_output(grad_output, grid, {g.P, l.Co});
  if (g.P == 0 || !(mask[0] || mask[1] || mask[2])) {
    return {zero_or_masked(mask[0], grid), zero_or_masked(mask[1], coords),
            zero_or_masked(mask[2], input)};
  }
  const Indices idx = read_indices(grid_idx);
  const IndexStats st = index_stats(idx, g.P, g.M);
  const auto dt = compute_dtype(input.scalar_type());
  const at::Tensor grid_c = grid.to(dt).contiguous();
  const at::Tensor coords_c = coords.to(dt).contiguous();
  const at::Tensor input_c = input.to(dt).contiguous();
  const at::Tensor go = grad_output.to(dt).contiguous();
  // Zeros: grids without samples get none, and direct accumulation adds into it.
  at::Tensor grad_grid = mask[0] ? at::zeros(grid.sizes(), grid.options().dtype(dt)) : masked_out(grid);
  at::Tensor grad_coords =
      mask[1] ? at::empty({g.P, 3}, coords.options().dtype(dt)) : masked_out(coords);
  at::Tensor grad_input =
      mask[2] ? at::empty({g.P, l.Ci}, input.options().dtype(dt)) : masked_out(input);
  AT_DISPATCH_FLOATING_TYPES(dt, "bilateral_slice_apply_points_backward_cpu", [&] {
    using T = scalar_t;
    at::Tensor storage;
    BackwardArgs<T> a{};
    // The grid gradient alone never reads the grid, but the channels-last copy also selects the
    // vector paths; it costs a grid's worth of copying, only made when samples outnumber cells.
    a.v = grid_view<T>(grid_c, g, st, storage);
    a.g = g;
    a.l = l;
    a.coords = coords_c.data_ptr<T>();
    a.input = input_c.data_ptr<T>();
    a.grad_output = go.data_ptr<T>();
    a.idx = idx;
    a.grad_coords = mask[1] ? grad_coords.data_ptr<T>() : nullptr;
    a.grad_input = mask[2] ? grad_input.data_ptr<T>() : nullptr;
    a.need_grid = mask[0];
    a.need_coords = mask[1];
    a.need_input = mask[2];
    if (!mask[0]) {
      at::parallel_for(0, g.P, kPointsGrain,
                       [&](int64_t s0, int64_t s1) { BackwardTasks::plain(a, s0, s1); });
      return;
    }
    // Group the samples by grid: order[start[m] .. start[m + 1]) are grid m's, in sample order.
    std::vector<int64_t> start(g.M + 1, 0);
    for (int64_t m = 0; m < g.M; ++m) start[m + 1] = start[m] + st.count[m];
    std::vector<int64_t> order_buf;
    const int64_t* order = nullptr;  // the identity when grid_idx is sorted
    if (!st.sorted) {
      order_buf.resize(g.P);
      std::vector<int64_t> next(start.begin(), start.end() - 1);
      for (int64_t p = 0; p < g.P; ++p) order_buf[next[idx[p]]++] = p;
      order = order_buf.data();
    }
    const int64_t numel = g.C * g.cells();
    const int64_t cpd = acc_channels(g.C), acc_numel = cpd * g.cells();
    T* gg = grad_grid.data_ptr<T>();
    std::vector<int64_t> direct, chunked;
    for (int64_t m = 0; m < g.M; ++m) {
      if (st.count[m] == 0) continue;
      (chunks_for(st.count[m], acc_numel) > 1 ? chunked : direct).push_back(m);
    }
    // Grids with few samples: one task each, into grad_grid through a channels-last buffer when
    // the samples' adds (8 C each) outnumber the buffer's clearing and copying (2 C a cell) a few
    // times over, else straight.
    at::parallel_for(0, static_cast<int64_t>(direct.size()), 1, [&](int64_t u0, int64_t u1) {
      std::vector<T> acc;
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t m = direct[u];
        const bool buffer = 32 * st.count[m] >= g.cells();
        if (buffer) acc.resize(numel);
        BackwardTasks::direct(a, order, start[m], start[m + 1], gg + m * numel,
                              buffer ? acc.data() : nullptr);
      }
    });
    // Densely sampled grids, one after the other: chunks in parallel, then summed in order.
    std::unique_ptr<double[]> partial;
    int64_t partial_size = 0;
    for (const int64_t m : chunked) {
      const int64_t n = st.count[m], nch = chunks_for(n, acc_numel);
      if (nch * acc_numel > partial_size) {
        partial_size = nch * acc_numel;
        partial.reset(new double[partial_size]);
      }
      at::parallel_for(0, nch, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t ch = c0; ch < c1; ++ch) {
          // Zeroed by the task that fills it: in parallel, and in its cache.
          double* buf = partial.get() + ch * acc_numel;
          std::fill(buf, buf + acc_numel, 0.0);
          BackwardTasks::chunk(a, order, start[m] + n * ch / nch, start[m] + n * (ch + 1) / nch, buf);
        }
      });
      const int64_t cells = g.cells();
      at::parallel_for(0, cells, 256, [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k) {
          for (int64_t c = 0; c < g.C; ++c) {
            double s = 0.0;
            for (int64_t ch = 0; ch < nch; ++ch) s += partial[ch * acc_numel + k * cpd + c];
            gg[m * numel + c * cells + k] = static_cast<T>(s);
          }
        }
      });
    }
  });
  return {grad_grid.to(grid.scalar_type()), grad_coords.to(coords.scalar_type()),
          grad_input.to(input.scalar_type())};
}

}  // namespace
}  // namespace cpu
}  // namespace bilateral_ops

TORCH_LIBRARY_IMPL(bilateral_ops, CPU, m) {
  m.impl("bilateral_slice_apply_points", &bilateral_ops::cpu::bilateral_slice_apply_points);
  m.impl("_bilateral_slice_apply_points_backward",
         &bilateral_ops::cpu::bilateral_slice_apply_points_backward);
}
