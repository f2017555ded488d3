// CPU kernels of curve_guide and _curve_guide_backward (csrc/ops.cpp has the schemas,
// bilateral_ops/curve_guide.h the per-pixel formula).
//
// One pass over the image, nothing per (pixel, curve point) stored: pixels are taken in blocks of
// kVecs short vectors (simd.h), channel by channel, so every inner loop runs across pixels with the
// curve parameters broadcast. The image is cut into chunks of kChunk pixels whose number depends
// only on the sizes; each chunk sums its parameter gradients in vector lanes, reduces the lanes in
// a fixed order into its own row of doubles, and the rows are added in chunk order afterwards: the
// result is bitwise the same whatever the number of threads.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <new>
#include <vector>

#include "../checks.h"
#include "../curve_guide_table.h"
#include "simd.h"

namespace bilateral_ops {
namespace cpu {
namespace {

// Vectors per block: four independent chains hide the FMA latency and, with the channel's value,
// curve and slope rows, stay within the 16 vector registers of AVX2.
constexpr int64_t kVecs = 4;
// Pixels per chunk of the deterministic reduction: a multiple of every block size (32 floats,
// 16 doubles) and large enough that the per-chunk rows are negligible.
constexpr int64_t kChunk = 4096;

template <typename T>
constexpr int64_t block_pixels() {
  return kVecs * vec_width<T>();
}

template <typename T>
struct CurveArgs {
  CurveLayout l;
  int64_t HW;
  int64_t chunks_per_image;
  const T* table;        // (P,), curve_guide.h layout
  const T* input;        // (N, C, HW)
  const T* grad_output;  // (N, HW), backward
  T* output;             // (N, HW), forward
  T* grad_input;         // (N, C, HW), backward, or null
  bool need_params;      // backward: accumulate the parameter gradient rows
};

struct Span {
  int64_t n, s0, s1;
};

inline Span chunk_span(int64_t chunk, int64_t HW, int64_t per_image) {
  const int64_t n = chunk / per_image;
  const int64_t s0 = (chunk % per_image) * kChunk;
  return Span{n, s0, std::min(s0 + kChunk, HW)};
}

// len (<= block) values from src into kVecs vectors, zero-padded: padded pixels then have a zero
// grad_output and add nothing to any gradient.
template <typename T>
inline void load_block(const T* src, int64_t len, vec_t<T>* dst) {
  constexpr int64_t Wd = vec_width<T>();
  if (len == block_pixels<T>()) {
    for (int64_t v = 0; v < kVecs; ++v) dst[v] = vload(src + v * Wd);
    return;
  }
  T tmp[block_pixels<T>()] = {};
  std::memcpy(tmp, src, static_cast<size_t>(len) * sizeof(T));
  for (int64_t v = 0; v < kVecs; ++v) dst[v] = vload(tmp + v * Wd);
}

template <typename T>
inline void store_block(const vec_t<T>* src, int64_t len, T* dst) {
  constexpr int64_t Wd = vec_width<T>();
  if (len == block_pixels<T>()) {
    for (int64_t v = 0; v < kVecs; ++v) vstore(dst + v * Wd, src[v]);
    return;
  }
  T tmp[block_pixels<T>()];
  for (int64_t v = 0; v < kVecs; ++v) vstore(tmp + v * Wd, src[v]);
  std::memcpy(dst, tmp, static_cast<size_t>(len) * sizeof(T));
}

// Zeroed vectors, 32-byte aligned. Not std::vector<vec_t<T>>: GCC drops the vector type's
// alignment in template arguments, so the allocator would hand out 16-byte aligned memory.
template <typename T>
class VecBuf {
 public:
  explicit VecBuf(int64_t n) : n_(n) {
    if (n_ > 0) {
      p_ = static_cast<vec_t<T>*>(::operator new(n_ * kVecBytes, std::align_val_t(kVecBytes)));
      fill();
    }
  }
  ~VecBuf() {
    if (p_ != nullptr) ::operator delete(p_, std::align_val_t(kVecBytes));
  }
  VecBuf(const VecBuf&) = delete;
  VecBuf& operator=(const VecBuf&) = delete;
  vec_t<T>& operator[](int64_t i) { return p_[i]; }
  const vec_t<T>& operator[](int64_t i) const { return p_[i]; }
  void fill() {
    for (int64_t i = 0; i < n_; ++i) p_[i] = vec_t<T>{};
  }

 private:
  vec_t<T>* p_ = nullptr;
  int64_t n_;
};

// Per-task block buffers: x, and (backward) every channel's c, f and f' and the input gradient;
// the parameter table with every value broadcast to a vector once (GCC broadcasts a scalar with
// an add of zero first, two instructions, which the curve loops would pay per point), and a
// zero vector for curve_relu that the compiler cannot fold (vopaque: its max is one instruction).
template <typename T>
struct Scratch {
  VecBuf<T> x, c, f, fp, dx, acc, tab;
  vec_t<T> zero;
  Scratch(const CurveLayout& l, bool backward, const T* table)
      : x(l.C * kVecs),
        c(backward ? l.C * kVecs : 0),
        f(backward ? l.C * kVecs : 0),
        fp(backward ? l.C * kVecs : 0),
        dx(backward ? l.C * kVecs : 0),
        acc(backward ? l.size() : 0),
        tab(l.size()),
        zero(vopaque<T>(T(0))) {
    for (int64_t q = 0; q < l.size(); ++q) tab[q] = vbroadcast<T>(table[q]);
  }
};

// The pre-clamp guide g of one block (x already loaded); with kKeep, each channel's c, f and f'
// are kept for the backward pass.
template <typename T, bool kKeep>
BO_ALWAYS_INLINE void block_guide(const CurveArgs<T>& a, Scratch<T>& s, vec_t<T>* g) {
  using V = vec_t<T>;
  const CurveLayout& l = a.l;
  const int64_t C = l.C, K = l.K;
  const VecBuf<T>& tb = s.tab;
  for (int64_t v = 0; v < kVecs; ++v) g[v] = tb[l.mix_bias()];
  for (int64_t k = 0; k < C; ++k) {
    V ck[kVecs], fk[kVecs] = {}, fpk[kVecs] = {};
    for (int64_t v = 0; v < kVecs; ++v) ck[v] = tb[l.ccm_bias() + k];
    for (int64_t i = 0; i < C; ++i) {
      const V m = tb[l.ccm() + k * C + i];
      for (int64_t v = 0; v < kVecs; ++v) ck[v] += m * s.x[i * kVecs + v];
    }
    const V zero = s.zero;
    for (int64_t j = 0; j < K; ++j) {
      const V t = tb[l.shifts() + k * K + j], m = tb[l.slopes() + k * K + j];
      for (int64_t v = 0; v < kVecs; ++v) {
        if constexpr (kKeep) {
          curve_point(ck[v], t, m, fk[v], fpk[v], zero);
        } else {
          curve_value(ck[v], t, m, fk[v], zero);
        }
      }
    }
    const V mk = tb[l.mix() + k];
    for (int64_t v = 0; v < kVecs; ++v) {
      g[v] += mk * fk[v];
      if constexpr (kKeep) {
        s.c[k * kVecs + v] = ck[v];
        s.f[k * kVecs + v] = fk[v];
        s.fp[k * kVecs + v] = fpk[v];
      }
    }
  }
}

template <typename T>
BO_ALWAYS_INLINE void load_pixels(const CurveArgs<T>& a, Scratch<T>& s, const T* in, int64_t len) {
  for (int64_t i = 0; i < a.l.C; ++i) load_block(in + i * a.HW, len, &s.x[i * kVecs]);
}

template <typename T>
BO_ALWAYS_INLINE void forward_chunks(const CurveArgs<T>& a, int64_t c0, int64_t c1) {
  using V = vec_t<T>;
  Scratch<T> s(a.l, false, a.table);
  constexpr int64_t B = block_pixels<T>();
  for (int64_t chunk = c0; chunk < c1; ++chunk) {
    const Span sp = chunk_span(chunk, a.HW, a.chunks_per_image);
    const T* in = a.input + sp.n * a.l.C * a.HW;
    T* out = a.output + sp.n * a.HW;
    for (int64_t p = sp.s0; p < sp.s1; p += B) {
      const int64_t len = std::min(B, sp.s1 - p);
      load_pixels(a, s, in + p, len);
      V g[kVecs];
      block_guide<T, false>(a, s, g);
      for (int64_t v = 0; v < kVecs; ++v) g[v] = curve_clamp01(g[v]);
      store_block(g, len, out + p);
    }
  }
}

// Adds the lanes' sum of terms[0..kVecs) to acc, in a fixed order.
template <typename T>
BO_ALWAYS_INLINE void accumulate(vec_t<T>& acc, const vec_t<T>* terms) {
  acc += (terms[0] + terms[1]) + (terms[2] + terms[3]);
}

template <typename T, bool kParams, bool kInput>
BO_ALWAYS_INLINE void backward_chunks(const CurveArgs<T>& a, int64_t c0, int64_t c1,
                                      double* partial) {
  static_assert(kVecs == 4, "accumulate() sums exactly kVecs terms");
  using V = vec_t<T>;
  const CurveLayout& l = a.l;
  const int64_t C = l.C, K = l.K, P = l.size();
  Scratch<T> s(l, true, a.table);
  const VecBuf<T>& tb = s.tab;
  constexpr int64_t B = block_pixels<T>();
  for (int64_t chunk = c0; chunk < c1; ++chunk) {
    const Span sp = chunk_span(chunk, a.HW, a.chunks_per_image);
    const T* in = a.input + sp.n * C * a.HW;
    const T* go = a.grad_output + sp.n * a.HW;
    T* gin = kInput ? a.grad_input + sp.n * C * a.HW : nullptr;
    if constexpr (kParams) s.acc.fill();
    for (int64_t p = sp.s0; p < sp.s1; p += B) {
      const int64_t len = std::min(B, sp.s1 - p);
      load_pixels(a, s, in + p, len);
      V g[kVecs], gp[kVecs];
      block_guide<T, true>(a, s, g);
      load_block(go + p, len, gp);
      for (int64_t v = 0; v < kVecs; ++v) gp[v] = curve_clamp_pass(g[v], gp[v]);
      if constexpr (kParams) accumulate<T>(s.acc[l.mix_bias()], gp);
      if constexpr (kInput) s.dx.fill();
      for (int64_t k = 0; k < C; ++k) {
        const V mk = tb[l.mix() + k];
        const V* ck = &s.c[k * kVecs];
        V df[kVecs], dc[kVecs], t[kVecs];
        for (int64_t v = 0; v < kVecs; ++v) {
          df[v] = gp[v] * mk;
          dc[v] = df[v] * s.fp[k * kVecs + v];
        }
        if constexpr (kInput) {
          for (int64_t i = 0; i < C; ++i) {
            const V m = tb[l.ccm() + k * C + i];
            for (int64_t v = 0; v < kVecs; ++v) s.dx[i * kVecs + v] += m * dc[v];
          }
        }
        if constexpr (kParams) {
          for (int64_t v = 0; v < kVecs; ++v) t[v] = gp[v] * s.f[k * kVecs + v];
          accumulate<T>(s.acc[l.mix() + k], t);
          accumulate<T>(s.acc[l.ccm_bias() + k], dc);
          for (int64_t i = 0; i < C; ++i) {
            for (int64_t v = 0; v < kVecs; ++v) t[v] = dc[v] * s.x[i * kVecs + v];
            accumulate<T>(s.acc[l.ccm() + k * C + i], t);
          }
          V* acc_shift = &s.acc[l.shifts() + k * K];
          V* acc_slope = &s.acc[l.slopes() + k * K];
          const V zero = s.zero;
          for (int64_t j = 0; j < K; ++j) {
            const V tj = tb[l.shifts() + k * K + j];
            V d_shift[kVecs] = {}, d_slope[kVecs] = {};
            for (int64_t v = 0; v < kVecs; ++v) {
              curve_point_grads(ck[v], tj, df[v], d_shift[v], d_slope[v], zero);
            }
            accumulate<T>(acc_shift[j], d_shift);
            accumulate<T>(acc_slope[j], d_slope);
          }
        }
      }
      if constexpr (kInput) {
        for (int64_t i = 0; i < C; ++i) store_block(&s.dx[i * kVecs], len, gin + i * a.HW + p);
      }
    }
    if constexpr (kParams) {
      double* row = partial + chunk * P;
      for (int64_t q = 0; q < P; ++q) row[q] = static_cast<double>(vsum<T>(s.acc[q]));
    }
  }
}

// Task functions: the only non-inline code, one copy per instruction set.
#define BO_DEFINE_CURVE_TASKS(T, SUFFIX)                                                         \
  BO_TARGET_CLONES void curve_forward_##SUFFIX(const CurveArgs<T>& a, int64_t c0, int64_t c1) { \
    forward_chunks<T>(a, c0, c1);                                                                \
  }                                                                                              \
  BO_TARGET_CLONES void curve_backward_##SUFFIX(const CurveArgs<T>& a, int64_t c0, int64_t c1,  \
                                                double* partial) {                               \
    if (a.need_params && a.grad_input != nullptr) {                                             \
      backward_chunks<T, true, true>(a, c0, c1, partial);                                       \
    } else if (a.need_params) {                                                                 \
      backward_chunks<T, true, false>(a, c0, c1, partial);                                      \
    } else {                                                                                     \
      backward_chunks<T, false, true>(a, c0, c1, partial);                                      \
    }                                                                                            \
  }

BO_DEFINE_CURVE_TASKS(float, f32)
BO_DEFINE_CURVE_TASKS(double, f64)

void forward_task(const CurveArgs<float>& a, int64_t c0, int64_t c1) { curve_forward_f32(a, c0, c1); }
void forward_task(const CurveArgs<double>& a, int64_t c0, int64_t c1) { curve_forward_f64(a, c0, c1); }
void backward_task(const CurveArgs<float>& a, int64_t c0, int64_t c1, double* partial) {
  curve_backward_f32(a, c0, c1, partial);
}
void backward_task(const CurveArgs<double>& a, int64_t c0, int64_t c1, double* partial) {
  curve_backward_f64(a, c0, c1, partial);
}

template <typename T>
CurveArgs<T> make_args(const CurveShape& sh, const at::Tensor& table, const at::Tensor& input) {
  CurveArgs<T> a{};
  a.l = sh.layout();
  a.HW = sh.H * sh.W;
  a.chunks_per_image = (a.HW + kChunk - 1) / kChunk;
  a.table = table.data_ptr<T>();
  a.input = input.data_ptr<T>();
  return a;
}

at::Tensor curve_guide(const at::Tensor& input, const at::Tensor& ccm, const at::Tensor& ccm_bias,
                       const at::Tensor& shifts, const at::Tensor& slopes, const at::Tensor& mix,
                       const at::Tensor& mix_bias) {
  const CurveShape sh = check_curve_guide(input, ccm, ccm_bias, shifts, slopes, mix, mix_bias);
  if (sh.pixels() == 0) return at::zeros({sh.N, sh.H, sh.W}, input.options());
  const auto dt = compute_dtype(input.scalar_type());
  const at::Tensor x = input.to(dt).contiguous();
  const at::Tensor table = curve_table(ccm, ccm_bias, shifts, slopes, mix, mix_bias, dt);
  at::Tensor out = at::empty({sh.N, sh.H, sh.W}, input.options().dtype(dt));
  AT_DISPATCH_FLOATING_TYPES(dt, "curve_guide_cpu", [&] {
    CurveArgs<scalar_t> a = make_args<scalar_t>(sh, table, x);
    a.output = out.data_ptr<scalar_t>();
    at::parallel_for(0, sh.N * a.chunks_per_image, 1,
                     [&](int64_t c0, int64_t c1) { forward_task(a, c0, c1); });
  });
  return out.to(input.scalar_type());
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                         at::Tensor>;

Grads curve_guide_backward(const at::Tensor& grad_output, const at::Tensor& input,
                           const at::Tensor& ccm, const at::Tensor& ccm_bias,
                           const at::Tensor& shifts, const at::Tensor& slopes,
                           const at::Tensor& mix, const at::Tensor& mix_bias,
                           std::array<bool, 7> mask) {
  const CurveShape sh = check_curve_guide(input, ccm, ccm_bias, shifts, slopes, mix, mix_bias);
  check_floating(grad_output, "grad_output");
  check_same(grad_output, "grad_output", input, "input");
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == sh.N &&
                  grad_output.size(1) == sh.H && grad_output.size(2) == sh.W,
              "grad_output must have shape (", sh.N, ", ", sh.H, ", ", sh.W, "), got ",
              grad_output.sizes());
  const bool need_params = std::any_of(mask.begin() + 1, mask.end(), [](bool b) { return b; });
  if (sh.pixels() == 0 || !(mask[0] || need_params)) {
    return {zero_or_masked(mask[0], input),    zero_or_masked(mask[1], ccm),
            zero_or_masked(mask[2], ccm_bias), zero_or_masked(mask[3], shifts),
            zero_or_masked(mask[4], slopes),   zero_or_masked(mask[5], mix),
            zero_or_masked(mask[6], mix_bias)};
  }
  const auto dt = compute_dtype(input.scalar_type());
  const at::Tensor x = input.to(dt).contiguous();
  const at::Tensor go = grad_output.to(dt).contiguous();
  const at::Tensor table = curve_table(ccm, ccm_bias, shifts, slopes, mix, mix_bias, dt);
  at::Tensor grad_input =
      mask[0] ? at::empty(x.sizes(), x.options()) : masked_out(input);
  const CurveLayout l = sh.layout();
  const int64_t per_image = (sh.H * sh.W + kChunk - 1) / kChunk;
  const int64_t chunks = sh.N * per_image;
  std::vector<double> partial(need_params ? static_cast<size_t>(chunks * l.size()) : 0);
  at::Tensor row = at::zeros({l.size()}, table.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(dt, "curve_guide_backward_cpu", [&] {
    CurveArgs<scalar_t> a = make_args<scalar_t>(sh, table, x);
    a.grad_output = go.data_ptr<scalar_t>();
    a.grad_input = mask[0] ? grad_input.data_ptr<scalar_t>() : nullptr;
    a.need_params = need_params;
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      backward_task(a, c0, c1, partial.data());
    });
  });
  if (need_params) {
    // Chunk rows in chunk order: the same sum whatever the thread count.
    double* r = row.data_ptr<double>();
    for (int64_t c = 0; c < chunks; ++c) {
      const double* src = partial.data() + c * l.size();
      for (int64_t q = 0; q < l.size(); ++q) r[q] += src[q];
    }
  }
  const std::array<at::Tensor, 6> pg =
      curve_unpack_grads(row.to(dt), table, l, ccm, mask);
  return {mask[0] ? grad_input.to(input.scalar_type()) : grad_input, pg[0], pg[1], pg[2], pg[3],
          pg[4], pg[5]};
}

}  // namespace
}  // namespace cpu
}  // namespace bilateral_ops

TORCH_LIBRARY_IMPL(bilateral_ops, CPU, m) {
  m.impl("curve_guide", &bilateral_ops::cpu::curve_guide);
  m.impl("_curve_guide_backward", &bilateral_ops::cpu::curve_guide_backward);
}
