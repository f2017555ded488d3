// CPU kernels of bilateral_slice_apply_points and its backward (csrc/ops.cpp has the schemas, the
// per-sample math is csrc/include/bilateral_ops/slice_points.h).
//
// Grids are read where they are: each sample gathers its eight corners from grid[grid_idx[p]].
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
#include <vector>

#include "../checks.h"
#include "bilateral_ops/slice_points.h"
#include "simd.h"

namespace bilateral_ops {
namespace cpu {
namespace {

constexpr int64_t kPointsGrain = 1024;        // samples per parallel_for grain
constexpr int64_t kChunkSamples = 16384;      // samples per chunk of a densely sampled grid
constexpr int64_t kMaxChunks = 64;            // chunks per grid at most
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

// Samples per grid, and whether grid_idx is nondecreasing. Raises on an index out of range.
struct IndexStats {
  std::vector<int64_t> count;
  bool sorted = true;
};

IndexStats index_stats(const int64_t* idx, int64_t P, int64_t M) {
  IndexStats s;
  s.count.assign(M, 0);
  int64_t prev = 0;
  for (int64_t p = 0; p < P; ++p) {
    const int64_t m = idx[p];
    TORCH_CHECK(m >= 0 && m < M, "grid_idx values must be in [0, ", M, "), got ", m,
                " at sample ", p);
    ++s.count[m];
    if (m < prev) s.sorted = false;
    prev = m;
  }
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

// A[c] = the sample of every channel at the corners.
template <typename T, int64_t kC>
BO_ALWAYS_INLINE void sample_channels(const GridView<T>& v, const T* grid, const PointCorners<T>& pc,
                                      int64_t C, T* A) {
  const int64_t n = kC > 0 ? kC : C;
  for (int64_t c = 0; c < n; ++c) A[c] = T(0);
  for (int k = 0; k < 8; ++k) {
    const T* q = grid + pc.offset[k] * v.cell_stride;
    const T w = pc.weight[k];
    if (v.channel_stride == 1) {
      for (int64_t c = 0; c < n; ++c) A[c] += w * q[c];
    } else {
      for (int64_t c = 0; c < n; ++c) A[c] += w * q[c * v.channel_stride];
    }
  }
}

// The samples of every channel at the corners, NV whole vectors of a channels-last copy.
template <typename T, int NV>
BO_ALWAYS_INLINE void sample_vectors(const T* grid, int64_t cp, const PointCorners<T>& pc, T* A) {
  using V = vec_t<T>;
  constexpr int64_t W = vec_width<T>();
  V acc[NV] = {};
  for (int k = 0; k < 8; ++k) {
    const T* q = grid + pc.offset[k] * cp;
    const V w = vsplat<T>(pc.weight[k]);
    for (int j = 0; j < NV; ++j) acc[j] += w * vload(q + j * W);
  }
  for (int j = 0; j < NV; ++j) vstore(A + j * W, acc[j]);
}

template <typename T, int NV>
BO_ALWAYS_INLINE void forward_dense(const GridView<T>& v, const PointsGeometry& g,
                                    const AffineLayout& l, const T* coords, const T* input,
                                    const int64_t* idx, T* out, int64_t p0, int64_t p1) {
  alignas(32) T A[NV * vec_width<T>()];
  for (int64_t p = p0; p < p1; ++p) {
    const T* xyz = coords + p * 3;
    const PointCorners<T> pc = point_corners<T>(xyz[0], xyz[1], xyz[2], g.D, g.Gh, g.Gw);
    sample_vectors<T, NV>(v.grid(idx[p]), v.cell_stride, pc, A);
    const T* x = input + p * l.Ci;
    for (int64_t o = 0; o < l.Co; ++o) {
      out[p * l.Co + o] = point_affine<T>(l, A, [&](int64_t i) { return x[i]; }, o);
    }
  }
}

template <typename T, int64_t kC>
BO_ALWAYS_INLINE void forward_range(const GridView<T>& v, const PointsGeometry& g,
                                    const AffineLayout& l, const T* coords, const T* input,
                                    const int64_t* idx, T* out, int64_t p0, int64_t p1) {
  switch (v.nv) {
    case 1: return forward_dense<T, 1>(v, g, l, coords, input, idx, out, p0, p1);
    case 2: return forward_dense<T, 2>(v, g, l, coords, input, idx, out, p0, p1);
    case 3: return forward_dense<T, 3>(v, g, l, coords, input, idx, out, p0, p1);
    case 4: return forward_dense<T, 4>(v, g, l, coords, input, idx, out, p0, p1);
    default: break;
  }
  std::vector<T> A(g.C);
  for (int64_t p = p0; p < p1; ++p) {
    const T* xyz = coords + p * 3;
    const PointCorners<T> pc = point_corners<T>(xyz[0], xyz[1], xyz[2], g.D, g.Gh, g.Gw);
    sample_channels<T, kC>(v, v.grid(idx[p]), pc, g.C, A.data());
    const T* x = input + p * l.Ci;
    for (int64_t o = 0; o < l.Co; ++o) {
      out[p * l.Co + o] = point_affine<T>(l, A.data(), [&](int64_t i) { return x[i]; }, o);
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
                                                const T* input, const int64_t* idx, T* out,    \
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
                    const float* c, const float* x, const int64_t* i, float* o, int64_t p0,
                    int64_t p1) {
  points_forward_f32(v, g, l, c, x, i, o, p0, p1);
}
void points_forward(const GridView<double>& v, const PointsGeometry& g, const AffineLayout& l,
                    const double* c, const double* x, const int64_t* i, double* o, int64_t p0,
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
  const int64_t* idx;
  T* grad_coords;  // when need_coords
  T* grad_input;   // when need_input
  bool need_grid, need_coords, need_input;
};

// The backward of sample p: grad_coords and grad_input written, and, when Acc is given, the
// grid gradient added to the (cells, C) channels-last buffer acc (double) or, for direct
// accumulation, to grad_grid (C, cells) of the sample's grid in T.
template <typename T, typename Sink>
BO_ALWAYS_INLINE void backward_sample(const BackwardArgs<T>& a, int64_t p, T* A, T* V,
                                      const Sink& sink) {
  const PointsGeometry& g = a.g;
  const AffineLayout& l = a.l;
  const T* xyz = a.coords + p * 3;
  const PointCorners<T> pc = point_corners<T>(xyz[0], xyz[1], xyz[2], g.D, g.Gh, g.Gw);
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
      const T* q = grid + pc.offset[k] * a.v.cell_stride;
      T e = T(0);
      const T w = pc.weight[k];
      for (int64_t c = 0; c < g.C; ++c) {
        const T s = q[c * a.v.channel_stride];
        e += V[c] * s;
        A[c] += w * s;
      }
      gx += pc.dx[k] * e;
      gy += pc.dy[k] * e;
      gz += pc.dz[k] * e;
    }
    if (a.need_coords) {
      a.grad_coords[p * 3 + 0] = gx;
      a.grad_coords[p * 3 + 1] = gy;
      a.grad_coords[p * 3 + 2] = gz;
    }
    if (a.need_input) {
      for (int64_t i = 0; i < l.Ci; ++i) {
        T s = T(0);
        for (int64_t o = 0; o < l.Co; ++o) s += go[o] * A[l.channel(o, i)];
        a.grad_input[p * l.Ci + i] = s;
      }
    }
  }
  if (a.need_grid) sink(pc, V);
}

// The splat values V of one sample (point_splat_value) as NV vectors vv, and stored to V. For
// lib_bilagrid's layout (3 inputs, offsets, 3 outputs: 12 channels) they are built in registers:
// scalar stores read back as one vector load cannot be forwarded and stall every sample.
template <typename T, int NV>
BO_ALWAYS_INLINE void splat_vectors(const AffineLayout& l, const T* go, const T* x, T* V,
                                    vec_t<T>* vv) {
  using Vec = vec_t<T>;
  constexpr int64_t W = vec_width<T>();
  if constexpr (NV * W >= 12 && NV * W <= 16) {
    if (l.Ci == 3 && l.Co == 3 && l.has_offset) {
      const T g0 = go[0], g1 = go[1], g2 = go[2], x0 = x[0], x1 = x[1], x2 = x[2];
      if constexpr (W == 8) {
        vv[0] = Vec{g0 * x0, g0 * x1, g0 * x2, g0, g1 * x0, g1 * x1, g1 * x2, g1};
        vv[1] = Vec{g2 * x0, g2 * x1, g2 * x2, g2, T(0), T(0), T(0), T(0)};
      } else {
        vv[0] = Vec{g0 * x0, g0 * x1, g0 * x2, g0};
        vv[1] = Vec{g1 * x0, g1 * x1, g1 * x2, g1};
        vv[2] = Vec{g2 * x0, g2 * x1, g2 * x2, g2};
        for (int j = 3; j < NV; ++j) vv[j] = Vec{};
      }
      for (int j = 0; j < NV; ++j) vstore(V + j * W, vv[j]);
      return;
    }
  }
  const auto gof = [&](int64_t o) { return go[o]; };
  const auto xf = [&](int64_t i) { return x[i]; };
  for (int64_t c = 0; c < l.Co * l.stride; ++c) V[c] = point_splat_value<T>(l, gof, xf, c);
  for (int j = 0; j < NV; ++j) vv[j] = vload(V + j * W);
}

// backward_sample on a channels-last copy of NV vectors per cell: the corner dot products e_k and
// the samples A in vector registers. V is padded with zeros to whole vectors.
template <typename T, int NV, typename Sink>
BO_ALWAYS_INLINE void backward_sample_dense(const BackwardArgs<T>& a, int64_t p, T* A, T* V,
                                            const Sink& sink) {
  using Vec = vec_t<T>;
  constexpr int64_t W = vec_width<T>();
  const PointsGeometry& g = a.g;
  const AffineLayout& l = a.l;
  const T* xyz = a.coords + p * 3;
  const PointCorners<T> pc = point_corners<T>(xyz[0], xyz[1], xyz[2], g.D, g.Gh, g.Gw);
  const T* x = a.input + p * l.Ci;
  const T* go = a.grad_output + p * l.Co;
  Vec vv[NV];
  splat_vectors<T, NV>(l, go, x, V, vv);
  if (a.need_coords || a.need_input) {
    const T* grid = a.v.grid(a.idx[p]);
    const int64_t cp = a.v.cell_stride;
    Vec acc[NV] = {};
    T e[8];
    for (int k = 0; k < 8; ++k) {
      const T* q = grid + pc.offset[k] * cp;
      const Vec w = vsplat<T>(pc.weight[k]);
      Vec d = Vec{};
      for (int j = 0; j < NV; ++j) {
        const Vec s = vload(q + j * W);
        d += vv[j] * s;
        acc[j] += w * s;
      }
      e[k] = vsum<T>(d);
    }
    T gx = T(0), gy = T(0), gz = T(0);
    for (int k = 0; k < 8; ++k) {
      gx += pc.dx[k] * e[k];
      gy += pc.dy[k] * e[k];
      gz += pc.dz[k] * e[k];
    }
    if (a.need_coords) {
      a.grad_coords[p * 3 + 0] = gx;
      a.grad_coords[p * 3 + 1] = gy;
      a.grad_coords[p * 3 + 2] = gz;
    }
    if (a.need_input) {
      for (int j = 0; j < NV; ++j) vstore(A + j * W, acc[j]);
      for (int64_t i = 0; i < l.Ci; ++i) {
        T s = T(0);
        for (int64_t o = 0; o < l.Co; ++o) s += go[o] * A[l.channel(o, i)];
        a.grad_input[p * l.Ci + i] = s;
      }
    }
  }
  if (a.need_grid) sink(pc, V);
}

// Samples [s0, s1) of the order `order` (sample indices, or the identity when null). The value
// buffer is zero-padded to whole float vectors: the sinks may read whole vectors of it.
template <typename T, typename Sink>
BO_ALWAYS_INLINE void backward_samples(const BackwardArgs<T>& a, const int64_t* order, int64_t s0,
                                       int64_t s1, const Sink& sink) {
  const int64_t padded = (a.g.C + 7) / 8 * 8;
  alignas(32) T A[kMaxVectors * 8];
  std::vector<T> Abig(a.v.nv > 0 ? 0 : a.g.C), V(padded, T(0));
  const auto at = [&](int64_t s) { return order != nullptr ? order[s] : s; };
  switch (a.v.nv) {
    case 1:
      for (int64_t s = s0; s < s1; ++s) backward_sample_dense<T, 1>(a, at(s), A, V.data(), sink);
      return;
    case 2:
      for (int64_t s = s0; s < s1; ++s) backward_sample_dense<T, 2>(a, at(s), A, V.data(), sink);
      return;
    case 3:
      for (int64_t s = s0; s < s1; ++s) backward_sample_dense<T, 3>(a, at(s), A, V.data(), sink);
      return;
    case 4:
      for (int64_t s = s0; s < s1; ++s) backward_sample_dense<T, 4>(a, at(s), A, V.data(), sink);
      return;
    default:
      for (int64_t s = s0; s < s1; ++s) backward_sample<T>(a, at(s), Abig.data(), V.data(), sink);
  }
}

// Four values as a vector of doubles (a 16-byte load of floats, converted: it forwards from the
// vector store of splat_vectors).
typedef float f32x4 __attribute__((vector_size(16)));
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

// Per-sample gradients only (no grid gradient): any order, plain parallel loop.
#define BO_POINTS_BACKWARD(T, SUFFIX)                                                            \
  BO_POINTS_TASK void points_backward_plain_##SUFFIX(const BackwardArgs<T>& a, int64_t s0,      \
                                                     int64_t s1) {                              \
    backward_samples<T>(a, nullptr, s0, s1, [](const PointCorners<T>&, const T*) {});           \
  }                                                                                             \
  /* grid gradient straight into grad_grid (C, cells) of one grid, in T */                      \
  BO_POINTS_TASK void points_backward_direct_##SUFFIX(const BackwardArgs<T>& a,                 \
                                                      const int64_t* order, int64_t s0,         \
                                                      int64_t s1, T* grad_grid_m) {             \
    const int64_t cells = a.g.cells(), C = a.g.C;                                               \
    backward_samples<T>(a, order, s0, s1, [&](const PointCorners<T>& pc, const T* V) {          \
      for (int k = 0; k < 8; ++k) {                                                             \
        T* q = grad_grid_m + pc.offset[k];                                                      \
        const T w = pc.weight[k];                                                               \
        for (int64_t c = 0; c < C; ++c) q[c * cells] += w * V[c];                               \
      }                                                                                         \
    });                                                                                         \
  }                                                                                             \
  /* grid gradient into a (cells, acc_channels(C)) double buffer, whole vectors */              \
  BO_POINTS_TASK void points_backward_chunk_##SUFFIX(const BackwardArgs<T>& a,                  \
                                                     const int64_t* order, int64_t s0,          \
                                                     int64_t s1, double* acc) {                 \
    using VD = vec_t<double>;                                                                   \
    constexpr int64_t WD = vec_width<double>();                                                 \
    const int64_t cpd = acc_channels(a.g.C);                                                    \
    backward_samples<T>(a, order, s0, s1, [&](const PointCorners<T>& pc, const T* V) {          \
      VD vd[2 * kMaxVectors];                                                                   \
      const int64_t nvd = std::min<int64_t>(cpd / WD, 2 * kMaxVectors);                         \
      for (int64_t j = 0; j < nvd; ++j) vd[j] = widen(V + j * WD);                              \
      for (int k = 0; k < 8; ++k) {                                                             \
        double* q = acc + pc.offset[k] * cpd;                                                   \
        const double w = pc.weight[k];                                                          \
        const VD wv = vsplat<double>(w);                                                        \
        for (int64_t j = 0; j < nvd; ++j) vstore(q + j * WD, vload(q + j * WD) + wv * vd[j]);   \
        for (int64_t c = nvd * WD; c < a.g.C; ++c) q[c] += w * static_cast<double>(V[c]);       \
      }                                                                                         \
    });                                                                                         \
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
                     float* gg) {
    points_backward_direct_f32(a, o, s0, s1, gg);
  }
  static void direct(const BackwardArgs<double>& a, const int64_t* o, int64_t s0, int64_t s1,
                     double* gg) {
    points_backward_direct_f64(a, o, s0, s1, gg);
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
  const at::Tensor idx = grid_idx.contiguous();
  const IndexStats st = index_stats(idx.data_ptr<int64_t>(), g.P, g.M);
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
    const int64_t* i = idx.data_ptr<int64_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, g.P, kPointsGrain, [&](int64_t p0, int64_t p1) {
      points_forward(v, g, l, c, x, i, o, p0, p1);
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
  const at::Tensor idx = grid_idx.contiguous();
  const int64_t* ip = idx.data_ptr<int64_t>();
  const IndexStats st = index_stats(ip, g.P, g.M);
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
    a.idx = ip;
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
      for (int64_t p = 0; p < g.P; ++p) order_buf[next[ip[p]]++] = p;
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
    // Grids with few samples: one task each, straight into grad_grid.
    at::parallel_for(0, static_cast<int64_t>(direct.size()), 1, [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t m = direct[u];
        BackwardTasks::direct(a, order, start[m], start[m + 1], gg + m * numel);
      }
    });
    // Densely sampled grids, one after the other: chunks in parallel, then summed in order.
    std::vector<double> partial;
    for (const int64_t m : chunked) {
      const int64_t n = st.count[m], nch = chunks_for(n, acc_numel);
      partial.assign(static_cast<size_t>(nch * acc_numel), 0.0);
      at::parallel_for(0, nch, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t ch = c0; ch < c1; ++ch) {
          BackwardTasks::chunk(a, order, start[m] + n * ch / nch, start[m] + n * (ch + 1) / nch,
                               partial.data() + ch * acc_numel);
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
