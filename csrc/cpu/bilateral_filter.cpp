// CPU kernels of bilateral_filter and _bilateral_filter_backward (csrc/ops.cpp has the schemas,
// csrc/include/bilateral_ops/bilateral_filter.h the per-pixel math).
//
// Input and guidance are copied once into padded planes (the border handled by index maps, with
// zero margins wide enough that every vector load of a tap stays inside its row), so the tap loops
// are branch-free: each processes a chunk of vec_width pixels of one row, all taps, accumulators in
// registers. Memory is O(image) in both passes, never O(image * taps).
//
// Backward, with w_pt the weight of tap t of centre p, W_p = sum_t w_pt and g the output gradient:
//   pass 1, per centre p: gp_p = g_p / W_p and a_p = gp_p . out_p (the weights kept per chunk of
//   pixels, O(taps) per thread); then per tap
//     e_pt = gp_p . I_{p+t} - a_p (= dL/dw_pt), the centre side of the guidance gradient
//     -sum_t h_pt dD/dDelta with h_pt = -rc e_pt w_pt, and the per-row sums of e_pt w_pt times
//     D_pt, ty^2 and tx^2 (the sigma gradients);
//   pass 2, per padded position q, gathering over the centres p = q - t: the value gradient
//     sum_t w_pt gp_p and the neighbour side of the guidance gradient sum_t h_pt dD/dDelta;
//   fold: each padded position adds into the pixel it reads, in a fixed order.
// Every sum has a fixed order (rows summed in row order per image): results are deterministic
// whatever the thread count.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

#include "../bilateral_filter_args.h"
#include "bilateral_ops/bilateral_filter.h"
#include "simd.h"

namespace bilateral_ops {
namespace cpu {
namespace {

// ---------------------------------------------------------------------------------------------
// exp of vectors of non-positive arguments (the weights' exponents). float: 2^n times a degree-6
// polynomial of 2^f (a few ulp of expf, so float32 stays within ~1e-7 of torch.exp, far inside
// the 1e-5 contract). Arguments below -86 give exactly 0: they are clamped there for the
// arithmetic (2^n stays a normal number), then zeroed. torch's float32 exp gives denormals down
// to -104 and 0 below, so the weights differ by less than 1e-37 of the centre weight (1), and an
// infinite input (exponent -inf) gets weight 0 and makes NaN (0 * inf) where kornia does.
// double: libm per lane, as the float64 contract is 1e-10.

// The clamp's bound, passed as lo = vopaque(kExpFloor) (simd.h): the clamp is then one max.
constexpr float kExpFloor = -86.0f;

template <typename T>
BO_ALWAYS_INLINE vec_t<T> vexp(vec_t<T> x, vec_t<T> lo);

template <>
BO_ALWAYS_INLINE vec_t<float> vexp<float>(vec_t<float> x, vec_t<float> lo) {
  using V = vec_t<float>;
  using I = VecOf<float>::mask;
  const V x_in = x;
  x = lo > x ? lo : x;  // NaN passes through as NaN
  // exp(x) = 2^n 2^f with n = round(x log2 e), |f| <= 1/2: adding 1.5 * 2^23 rounds to an integer
  // held in the low mantissa bits.
  const V t = x * 1.44269504088896341f;
  const V magic = vsplat<float>(12582912.0f);
  const V m = t + magic;
  const V f = t - (m - magic);
  I n;
  __builtin_memcpy(&n, &m, sizeof(n));
  n -= 0x4B400000;  // the bits of 1.5 * 2^23
  // 2^f by its Taylor series to degree 6: relative error < 1.3e-7 on |f| <= 1/2.
  V p = vsplat<float>(1.5403530393e-4f);
  p = p * f + 1.3333558146e-3f;
  p = p * f + 9.6181291076e-3f;
  p = p * f + 5.5504108665e-2f;
  p = p * f + 2.4022650696e-1f;
  p = p * f + 6.9314718056e-1f;
  p = p * f + 1.0f;
  I bits;
  __builtin_memcpy(&bits, &p, sizeof(bits));
  bits += n << 23;
  V out;
  __builtin_memcpy(&out, &bits, sizeof(out));
  return x_in < lo ? V{} : out;
}

template <>
BO_ALWAYS_INLINE vec_t<double> vexp<double>(vec_t<double> x, vec_t<double>) {
  for (int i = 0; i < 4; ++i) x[i] = std::exp(x[i]);
  return x;
}

template <typename T>
BO_ALWAYS_INLINE vec_t<T> vabs(vec_t<T> v) {
  using M = typename VecOf<T>::mask;
  M bits;
  __builtin_memcpy(&bits, &v, sizeof(bits));
  bits &= ~(M{} + (M{} + 1) << (8 * sizeof(T) - 1));  // clear the sign bit
  __builtin_memcpy(&v, &bits, sizeof(v));
  return v;
}

template <typename T>
BO_ALWAYS_INLINE vec_t<T> vsign(vec_t<T> v) {
  const vec_t<T> one = vsplat<T>(T(1));
  return v > T(0) ? one : (v < T(0) ? -one : vec_t<T>{});
}

// Loads lanes x0 .. x0 + V - 1 of a row of n values, zeros past its end.
template <typename T>
BO_ALWAYS_INLINE vec_t<T> load_tail(const T* row, int64_t x0, int64_t n) {
  if (x0 + vec_width<T>() <= n) return vload(row + x0);
  vec_t<T> v{};
  for (int64_t i = 0; x0 + i < n; ++i) v[i] = row[x0 + i];
  return v;
}

template <typename T>
BO_ALWAYS_INLINE void store_tail(T* row, int64_t x0, int64_t n, vec_t<T> v) {
  if (x0 + vec_width<T>() <= n) {
    vstore(row + x0, v);
    return;
  }
  for (int64_t i = 0; x0 + i < n; ++i) row[x0 + i] = v[i];
}

// ---------------------------------------------------------------------------------------------
// Layouts. Padded planes: rows of Ws = kMargin + Wp + kMargin values, padded column j at
// kMargin + j; the margins (>= the kernel width plus a vector) are zero, so a load at any tap of
// any chunk, tails included, stays in its row. Centre planes (gp, a): rows of Wx values, pixel x
// at x + xoff, zero outside the image, so that pass 2 reads zeros for centres outside the image.

template <typename T>
struct Args {
  int64_t N, C, Cg, H, W, ky, kx, py, px, Hp, Wp;
  int64_t margin, Ws;   // padded planes
  int64_t xoff, Wx;     // centre planes
  int distance;
  bool self;
  const T* in;          // (N, C, Hp, Ws)
  const T* gd;          // (N, Cg, Hp, Ws); == in when self
  const T* rc;          // (N,) 0.5 / sigma_color^2
  const T* ss;          // (N, ky * kx) spatial exponents
  T* out;               // forward: (N, C, H, W)
  // Backward.
  const T* go;          // (N, C, H, W)
  T* gp;                // (N, C, H, Wx) g / W
  T* a;                 // (N, H, Wx) gp . out
  T* gcen;              // (N, Cg, H, W) centre side of the guidance gradient (or nullptr)
  double* rows;         // (N * H, 3) per-row sums for the sigma gradients (or nullptr)
  T* gin;               // (N, C, Hp, Ws) value (+ range when self) gradient of the padded input
  T* ggd;               // (N, Cg, Hp, Ws) range gradient of the padded guidance (joint only)
  bool need_value, need_range;

  const T* in_row(int64_t n, int64_t c, int64_t r) const { return in + ((n * C + c) * Hp + r) * Ws + margin; }
  const T* gd_row(int64_t n, int64_t c, int64_t r) const { return gd + ((n * Cg + c) * Hp + r) * Ws + margin; }
};

// Channel counts fixed at compile time (0: the runtime count), so the accumulators of common
// images (gray, RGB, RGB guided by gray) stay in registers.
template <typename T, int K>
struct Accs {
  vec_t<T> v[K > 0 ? K : 1];
};

template <int K>
BO_ALWAYS_INLINE int64_t count(int64_t runtime) {
  return K > 0 ? K : runtime;
}

// Weight of one tap for a chunk: guidance rows at the tap, centre guidance gc, nrc = -rc and the
// spatial exponent ss_t (subtracted, so that its broadcast folds into the FMA as a memory
// operand). Also returns the accumulated distance (for the l1 slope) and the guidance values
// loaded (gv; the input values too when the input guides itself).
template <typename T, int CG, int DIST>
BO_ALWAYS_INLINE vec_t<T> tap_weight(const T* const* grow, int64_t col, const vec_t<T>* gc, int64_t ng,
                                     vec_t<T> nrc, const T& ss, vec_t<T> lo, vec_t<T>* dist_acc,
                                     vec_t<T>* gv) {
  const auto term = [](vec_t<T> d) { return DIST == kL1 ? vabs<T>(d) : d * d; };
  gv[0] = vload(grow[0] + col);
  vec_t<T> acc = term(gv[0] - gc[0]);  // the terms are >= +0: no "0 +" needed
  for (int64_t c = 1; c < count<CG>(ng); ++c) {
    gv[c] = vload(grow[c] + col);
    acc += term(gv[c] - gc[c]);
  }
  *dist_acc = acc;
  const vec_t<T> D = DIST == kL1 ? acc * acc : acc;
  return vexp<T>(D * nrc - ss, lo);
}

// Sums of w and of w I over every tap of J neighbouring chunks (x0, x0 + vec_width, ...) of row
// (n, y): the forward pass. gc and acc hold J groups of ng and nc vectors, wsum J vectors. SELF:
// the input is the guidance (same rows), so its values are the ones tap_weight loaded.
// taps (or nullptr; J = 1 only): where to keep each tap's weight and distance, 2 vectors per tap,
// for a second sweep over the same chunk.
// Two chunks (J = 2, channel counts fixed): each tap's weight is a chain of ~15 dependent
// operations (the distance, then exp's polynomial); with one chunk the out-of-order window holds
// too few taps to hide it, and the loop runs well below the FP throughput. Two independent chains
// side by side in program order fill it. Their registers (2 x (CC + CG + 1) accumulators and
// centres) fit AVX-512's 32, not AVX2's 16, so the callers take J = 2 only when the CPU has
// AVX-512.
template <typename T, int CC, int CG, int DIST, bool SELF, int J = 1>
BO_ALWAYS_INLINE void accumulate(const Args<T>& p, int64_t n, int64_t y, int64_t x0, const vec_t<T>* gc,
                                 vec_t<T>* acc, vec_t<T>* wsum, vec_t<T>* gv, const T** irow,
                                 const T** grow, vec_t<T>* taps = nullptr) {
  static_assert(J == 1 || (CC > 0 && CG > 0), "two chunks at once need fixed channel counts");
  constexpr int64_t V = vec_width<T>();
  const int64_t nc = count<CC>(p.C), ng = count<CG>(p.Cg);
  const vec_t<T> nrc = vsplat<T>(-p.rc[n]), lo = vopaque<T>(T(kExpFloor));
  const T* ss = p.ss + n * p.ky * p.kx;
  for (int j = 0; j < J; ++j) {
    wsum[j] = vec_t<T>{};
#pragma GCC unroll 4
    for (int64_t c = 0; c < nc; ++c) acc[j * nc + c] = vec_t<T>{};
  }
  for (int64_t ty = 0; ty < p.ky; ++ty) {
    for (int64_t c = 0; c < nc; ++c) irow[c] = p.in_row(n, c, y + ty);
    for (int64_t c = 0; c < ng; ++c) grow[c] = p.gd_row(n, c, y + ty);
    for (int64_t tx = 0; tx < p.kx; ++tx) {
      for (int j = 0; j < J; ++j) {
        const int64_t col = x0 + j * V + tx;
        vec_t<T> dist;
        const vec_t<T> w = tap_weight<T, CG, DIST>(grow, col, gc + j * ng, ng, nrc, ss[ty * p.kx + tx], lo, &dist, gv);
        wsum[j] += w;
        if (taps != nullptr) {
          taps[2 * (ty * p.kx + tx)] = w;
          taps[2 * (ty * p.kx + tx) + 1] = dist;
        }
#pragma GCC unroll 4
        for (int64_t c = 0; c < nc; ++c) acc[j * nc + c] += w * (SELF ? gv[c] : vload(irow[c] + col));
      }
    }
  }
}

// The centre guidance of the chunk at (n, y, x0).
template <typename T>
BO_ALWAYS_INLINE void load_centres(const Args<T>& p, int64_t n, int64_t y, int64_t x0, int64_t ng, vec_t<T>* gc) {
  for (int64_t c = 0; c < ng; ++c) gc[c] = vload(p.gd_row(n, c, y + p.py) + x0 + p.px);
}

// Whether this CPU has the 32 vector registers accumulate<..., 2> needs.
inline bool has_avx512() {
#if defined(__GNUC__) && defined(__x86_64__)
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
  return yes;
#else
  return false;
#endif
}

// Per-task scratch, allocated once per parallel_for task (never per pixel): the accumulators and
// row pointers of runtime channel counts.
// std::vector does not honour the 32-byte alignment of vec_t under every ABI setting, and the
// compiler uses aligned moves on these arrays: allocate them explicitly aligned.
template <typename T>
struct Scratch {
  vec_t<T>* vbuf;
  std::vector<const T*> rows;
  int64_t tap_offset;
  Scratch(int64_t C, int64_t Cg, int64_t taps) : rows(2 * (C + Cg) + 2), tap_offset(3 * (C + Cg) + Cg + 4) {
    const size_t bytes = sizeof(vec_t<T>) * static_cast<size_t>(tap_offset + 2 * taps);
    vbuf = static_cast<vec_t<T>*>(std::aligned_alloc(kVecBytes, bytes));
    TORCH_CHECK(vbuf != nullptr, "bilateral_filter: out of memory for ", bytes, " bytes of scratch");
  }
  ~Scratch() { std::free(vbuf); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  vec_t<T>* v() { return vbuf; }
  vec_t<T>* taps() { return vbuf + tap_offset; }
};

// The forward's result for the chunk at (n, y, x0): acc / wsum per channel.
template <typename T>
BO_ALWAYS_INLINE void store_chunk(const Args<T>& p, int64_t n, int64_t y, int64_t x0, int64_t nc,
                                  const vec_t<T>* acc, vec_t<T> wsum) {
  const vec_t<T> inv = T(1) / wsum;
  for (int64_t c = 0; c < nc; ++c) store_tail(p.out + ((n * p.C + c) * p.H + y) * p.W, x0, p.W, acc[c] * inv);
}

template <typename T, int CC, int CG, int DIST, bool SELF>
BO_ALWAYS_INLINE void forward_rows_impl(const Args<T>& p, int64_t r0, int64_t r1, Scratch<T>& s) {
  constexpr int64_t V = vec_width<T>();
  Accs<T, CC> acc_l;
  Accs<T, CG> gc_l, gv_l;
  vec_t<T>* acc = CC > 0 ? acc_l.v : s.v();
  vec_t<T>* gc = CG > 0 ? gc_l.v : s.v() + p.C;
  vec_t<T>* gv = CG > 0 ? gv_l.v : s.v() + p.C + p.Cg;
  const T** irow = s.rows.data();
  const T** grow = s.rows.data() + p.C;
  [[maybe_unused]] const bool pairs = has_avx512();
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / p.H, y = r % p.H;
    int64_t x0 = 0;
    if constexpr (CC > 0 && CG > 0) {
      for (; pairs && x0 + V < p.W; x0 += 2 * V) {
        vec_t<T> gc2[2 * CG], acc2[2 * CC], wsum2[2];
        for (int j = 0; j < 2; ++j) load_centres(p, n, y, x0 + j * V, CG, gc2 + j * CG);
        accumulate<T, CC, CG, DIST, SELF, 2>(p, n, y, x0, gc2, acc2, wsum2, gv, irow, grow);
        for (int j = 0; j < 2; ++j) store_chunk(p, n, y, x0 + j * V, CC, acc2 + j * CC, wsum2[j]);
      }
    }
    for (; x0 < p.W; x0 += V) {
      load_centres(p, n, y, x0, count<CG>(p.Cg), gc);
      vec_t<T> wsum;
      accumulate<T, CC, CG, DIST, SELF>(p, n, y, x0, gc, acc, &wsum, gv, irow, grow);
      store_chunk(p, n, y, x0, count<CC>(p.C), acc, wsum);
    }
  }
}

template <typename T, int CC, int CG, int DIST, bool SELF>
BO_ALWAYS_INLINE void pass1_rows_impl(const Args<T>& p, int64_t r0, int64_t r1, Scratch<T>& s) {
  constexpr int64_t V = vec_width<T>();
  const int64_t nc = count<CC>(p.C), ng = count<CG>(p.Cg);
  Accs<T, CC> acc_l, gp_l;
  Accs<T, CG> gc_l, cen_l, gv_l;
  vec_t<T>* acc = CC > 0 ? acc_l.v : s.v();
  vec_t<T>* gpv = CC > 0 ? gp_l.v : s.v() + p.C;
  vec_t<T>* gc = CG > 0 ? gc_l.v : s.v() + 2 * p.C;
  vec_t<T>* cen = CG > 0 ? cen_l.v : s.v() + 2 * p.C + p.Cg;
  vec_t<T>* gv = CG > 0 ? gv_l.v : s.v() + 2 * p.C + 2 * p.Cg;
  const T** irow = s.rows.data();
  const T** grow = s.rows.data() + p.C;
  const bool second = p.need_range || p.rows != nullptr;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / p.H, y = r % p.H;
    const vec_t<T> rc = vsplat<T>(p.rc[n]);
    double row_d = 0, row_y = 0, row_x = 0;
    // Centre planes are zero outside the image: pass 2 gathers nothing from there.
    for (int64_t c = 0; c <= nc; ++c) {
      T* row = c < nc ? p.gp + ((n * p.C + c) * p.H + y) * p.Wx : p.a + (n * p.H + y) * p.Wx;
      std::fill(row, row + p.xoff, T(0));
      std::fill(row + p.xoff + p.W, row + p.Wx, T(0));
    }
    for (int64_t x0 = 0; x0 < p.W; x0 += V) {
      load_centres(p, n, y, x0, ng, gc);
      vec_t<T> wsum;
      accumulate<T, CC, CG, DIST, SELF>(p, n, y, x0, gc, acc, &wsum, gv, irow, grow,
                                        second ? s.taps() : nullptr);
      const vec_t<T> inv = T(1) / wsum;
      vec_t<T> a{};
      for (int64_t c = 0; c < nc; ++c) {
        // Lanes past the row read zeros, so their gp and a are zero: pass 2 then gathers nothing
        // from them.
        const vec_t<T> g = load_tail(p.go + ((n * p.C + c) * p.H + y) * p.W, x0, p.W);
        gpv[c] = g * inv;
        a += gpv[c] * (acc[c] * inv);
        vstore(p.gp + ((n * p.C + c) * p.H + y) * p.Wx + p.xoff + x0, gpv[c]);
      }
      vstore(p.a + (n * p.H + y) * p.Wx + p.xoff + x0, a);
      if (!second) continue;
      vec_t<T> sd{}, sy{}, sx{};
      for (int64_t c = 0; c < ng; ++c) cen[c] = vec_t<T>{};
      for (int64_t ty = 0; ty < p.ky; ++ty) {
        for (int64_t c = 0; c < nc; ++c) irow[c] = p.in_row(n, c, y + ty);
        for (int64_t c = 0; c < ng; ++c) grow[c] = p.gd_row(n, c, y + ty);
        const T fy = static_cast<T>((ty - p.py) * (ty - p.py));
        vec_t<T> ew_row{};
        for (int64_t tx = 0; tx < p.kx; ++tx) {
          const vec_t<T> w = s.taps()[2 * (ty * p.kx + tx)];
          const vec_t<T> dist = s.taps()[2 * (ty * p.kx + tx) + 1];
#pragma GCC unroll 4
          for (int64_t c = 0; c < ng; ++c) gv[c] = vload(grow[c] + x0 + tx);
          vec_t<T> e = -a;
#pragma GCC unroll 4
          for (int64_t c = 0; c < nc; ++c) e += gpv[c] * (SELF ? gv[c] : vload(irow[c] + x0 + tx));
          const vec_t<T> ew = e * w;
          ew_row += ew;
          sd += ew * (DIST == kL1 ? dist * dist : dist);
          sx += ew * static_cast<T>((tx - p.px) * (tx - p.px));
          if (p.need_range) {
            const vec_t<T> h = -rc * ew;
#pragma GCC unroll 4
            for (int64_t c = 0; c < ng; ++c) {
              const vec_t<T> d = gv[c] - gc[c];
              cen[c] -= h * (DIST == kL1 ? T(2) * dist * vsign<T>(d) : T(2) * d);
            }
          }
        }
        sy += ew_row * fy;
      }
      if (p.need_range) {
        for (int64_t c = 0; c < ng; ++c) store_tail(p.gcen + ((n * p.Cg + c) * p.H + y) * p.W, x0, p.W, cen[c]);
      }
      if (p.rows != nullptr) {
        row_d += vsum<T>(sd);
        row_y += vsum<T>(sy);
        row_x += vsum<T>(sx);
      }
    }
    if (p.rows != nullptr) {
      p.rows[3 * r] = row_d;
      p.rows[3 * r + 1] = row_y;
      p.rows[3 * r + 2] = row_x;
    }
  }
}

// Pass 2: rows of the padded image (r over N * Hp), gathering from every centre whose window
// covers each position.
template <typename T, int CC, int CG, int DIST, bool SELF>
BO_ALWAYS_INLINE void pass2_rows_impl(const Args<T>& p, int64_t r0, int64_t r1, Scratch<T>& s) {
  constexpr int64_t V = vec_width<T>();
  const int64_t nc = count<CC>(p.C), ng = count<CG>(p.Cg);
  Accs<T, CC> val_l, iq_l, gpv_l;
  Accs<T, CG> rng_l, gq_l;
  vec_t<T>* val = CC > 0 ? val_l.v : s.v();
  vec_t<T>* iq = CC > 0 ? iq_l.v : s.v() + p.C;
  vec_t<T>* gpv = CC > 0 ? gpv_l.v : s.v() + 2 * p.C;
  vec_t<T>* rng = CG > 0 ? rng_l.v : s.v() + 3 * p.C;
  vec_t<T>* gq = CG > 0 ? gq_l.v : s.v() + 3 * p.C + p.Cg;
  const T** gprow = s.rows.data();
  const T** crow = s.rows.data() + p.C;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / p.Hp, qy = r % p.Hp;
    const vec_t<T> rc = vsplat<T>(p.rc[n]), nrc = -rc, lo = vopaque<T>(T(kExpFloor));
    const T* ss = p.ss + n * p.ky * p.kx;
    for (int64_t q0 = 0; q0 < p.Wp; q0 += V) {
      for (int64_t c = 0; c < nc; ++c) {
        val[c] = vec_t<T>{};
        iq[c] = vload(p.in_row(n, c, qy) + q0);
      }
      for (int64_t c = 0; c < ng; ++c) {
        rng[c] = vec_t<T>{};
        gq[c] = vload(p.gd_row(n, c, qy) + q0);
      }
      for (int64_t ty = 0; ty < p.ky; ++ty) {
        const int64_t y = qy - ty;  // the centre row
        if (y < 0 || y >= p.H) continue;
        for (int64_t c = 0; c < nc; ++c) gprow[c] = p.gp + ((n * p.C + c) * p.H + y) * p.Wx + p.xoff;
        // Centre guidance of pixel x is at padded column x + px of padded row y + py.
        for (int64_t c = 0; c < ng; ++c) crow[c] = p.gd_row(n, c, y + p.py) + p.px;
        const T* arow = p.a + (n * p.H + y) * p.Wx + p.xoff;
        for (int64_t tx = 0; tx < p.kx; ++tx) {
          const int64_t x0 = q0 - tx;  // centres of this tap
          vec_t<T> dist{};
#pragma GCC unroll 4
          for (int64_t c = 0; c < ng; ++c) {
            const vec_t<T> d = gq[c] - vload(crow[c] + x0);
            dist += DIST == kL1 ? vabs<T>(d) : d * d;
          }
          const vec_t<T> D = DIST == kL1 ? dist * dist : dist;
          const vec_t<T> w = vexp<T>(D * nrc - ss[ty * p.kx + tx], lo);
#pragma GCC unroll 4
          for (int64_t c = 0; c < nc; ++c) gpv[c] = vload(gprow[c] + x0);
          if (p.need_value) {
#pragma GCC unroll 4
            for (int64_t c = 0; c < nc; ++c) val[c] += w * gpv[c];
          }
          if (p.need_range) {
            vec_t<T> e = -vload(arow + x0);
#pragma GCC unroll 4
            for (int64_t c = 0; c < nc; ++c) e += gpv[c] * iq[c];
            const vec_t<T> h = -rc * e * w;
            vec_t<T>* dst = p.self ? val : rng;
#pragma GCC unroll 4
            for (int64_t c = 0; c < ng; ++c) {
              const vec_t<T> d = gq[c] - vload(crow[c] + x0);
              dst[c] += h * (DIST == kL1 ? T(2) * dist * vsign<T>(d) : T(2) * d);
            }
          }
        }
      }
      if (p.need_value || (p.self && p.need_range)) {
        for (int64_t c = 0; c < nc; ++c) vstore(p.gin + ((n * p.C + c) * p.Hp + qy) * p.Ws + p.margin + q0, val[c]);
      }
      if (!p.self && p.need_range) {
        for (int64_t c = 0; c < ng; ++c) vstore(p.ggd + ((n * p.Cg + c) * p.Hp + qy) * p.Ws + p.margin + q0, rng[c]);
      }
    }
  }
}

// Task functions: one copy per instruction set (BO_TARGET_CLONES); the runtime configuration
// branches once into fully inlined instantiations.
enum class Pass { kForward, kPass1, kPass2 };

template <typename T, int CC, int CG, int DIST, bool SELF>
BO_ALWAYS_INLINE void run_pass(Pass pass, const Args<T>& p, int64_t r0, int64_t r1, Scratch<T>& s) {
  switch (pass) {
    case Pass::kForward:
      return forward_rows_impl<T, CC, CG, DIST, SELF>(p, r0, r1, s);
    case Pass::kPass1:
      return pass1_rows_impl<T, CC, CG, DIST, SELF>(p, r0, r1, s);
    case Pass::kPass2:
      return pass2_rows_impl<T, CC, CG, DIST, SELF>(p, r0, r1, s);
  }
}

template <typename T, int DIST>
BO_ALWAYS_INLINE void run_channels(Pass pass, const Args<T>& p, int64_t r0, int64_t r1, Scratch<T>& s) {
  if constexpr (std::is_same<T, float>::value) {
    if (p.self && p.C == 3) return run_pass<T, 3, 3, DIST, true>(pass, p, r0, r1, s);
    if (p.self && p.C == 1) return run_pass<T, 1, 1, DIST, true>(pass, p, r0, r1, s);
    if (!p.self && p.C == 3 && p.Cg == 1) return run_pass<T, 3, 1, DIST, false>(pass, p, r0, r1, s);
    if (!p.self && p.C == 3 && p.Cg == 3) return run_pass<T, 3, 3, DIST, false>(pass, p, r0, r1, s);
  }
  run_pass<T, 0, 0, DIST, false>(pass, p, r0, r1, s);
}

BO_TARGET_CLONES void filter_task_f32(Pass pass, const Args<float>& p, int64_t r0, int64_t r1,
                                      Scratch<float>& s) {
  if (p.distance == kL1) {
    run_channels<float, kL1>(pass, p, r0, r1, s);
  } else {
    run_channels<float, kL2>(pass, p, r0, r1, s);
  }
}

BO_TARGET_CLONES void filter_task_f64(Pass pass, const Args<double>& p, int64_t r0, int64_t r1,
                                      Scratch<double>& s) {
  if (p.distance == kL1) {
    run_channels<double, kL1>(pass, p, r0, r1, s);
  } else {
    run_channels<double, kL2>(pass, p, r0, r1, s);
  }
}

void filter_task(Pass pass, const Args<float>& p, int64_t r0, int64_t r1, Scratch<float>& s) {
  filter_task_f32(pass, p, r0, r1, s);
}
void filter_task(Pass pass, const Args<double>& p, int64_t r0, int64_t r1, Scratch<double>& s) {
  filter_task_f64(pass, p, r0, r1, s);
}

template <typename T>
void run_rows(Pass pass, const Args<T>& p, int64_t rows) {
  // Rows are independent; a grain of a few rows keeps per-task scratch negligible.
  at::parallel_for(0, rows, 4, [&](int64_t r0, int64_t r1) {
    Scratch<T> s(p.C, p.Cg, p.ky * p.kx);
    filter_task(pass, p, r0, r1, s);
  });
}

// ---------------------------------------------------------------------------------------------
// Host side: padded copies, sigma tables, the fold.

constexpr int64_t kVecMax = 8;

// (N, Cx, H, W) -> (N, Cx, Hp, Ws) padded planes in dtype T, margins zero.
template <typename T>
at::Tensor pad_planes(const at::Tensor& src_in, const FilterShape& s, int64_t margin, int64_t Ws) {
  const at::Tensor src = src_in.to(c10::CppTypeToScalarType<T>::value).contiguous();
  const int64_t Cx = src.size(1), Hp = s.H + 2 * s.py, Wp = s.W + 2 * s.px;
  // Not at::zeros: each row writes its own margins, in parallel (first-touching fresh pages in one
  // serial fill costs more than the filter on small images).
  at::Tensor dst = at::empty({s.N, Cx, Hp, Ws}, src.options());
  std::vector<int64_t> xmap(Wp);
  for (int64_t j = 0; j < Wp; ++j) xmap[j] = border_index(j - s.px, s.W, s.border);
  const T* sp = src.data_ptr<T>();
  T* dp = dst.data_ptr<T>();
  at::parallel_for(0, s.N * Cx * Hp, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t plane = r / Hp, j = r % Hp;
      const int64_t y = border_index(j - s.py, s.H, s.border);
      T* row = dp + r * Ws;
      if (y < 0) {
        std::fill(row, row + Ws, T(0));
        continue;
      }
      std::fill(row, row + margin, T(0));
      std::fill(row + margin + Wp, row + Ws, T(0));
      const T* srow = sp + (plane * s.H + y) * s.W;
      T* drow = row + margin;
      for (int64_t x = 0; x < Wp; ++x) drow[x] = xmap[x] < 0 ? T(0) : srow[xmap[x]];
    }
  });
  return dst;
}

// Padded-plane gradients (N, Cx, Hp, Ws) -> image gradients added into dst (N, Cx, H, W): each
// padded position adds into the pixel it reads; rows in preimage order, columns interior first,
// then the left and right borders in order.
template <typename T>
void fold_add(const at::Tensor& padded, at::Tensor& dst, const FilterShape& s, int64_t margin, int64_t Ws) {
  const int64_t Cx = dst.size(1), Hp = s.H + 2 * s.py, Wp = s.W + 2 * s.px;
  std::vector<int64_t> xmap(Wp);
  for (int64_t j = 0; j < Wp; ++j) xmap[j] = border_index(j - s.px, s.W, s.border);
  const T* pp = padded.data_ptr<T>();
  T* dp = dst.data_ptr<T>();
  at::parallel_for(0, s.N * Cx * s.H, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t plane = r / s.H, y = r % s.H;
      T* drow = dp + r * s.W;
      const Preimages pre = preimages(y, s.H, s.py, s.border);
      for (int i = 0; i < pre.count; ++i) {
        for (int64_t yy = pre.lo[i]; yy <= pre.hi[i]; ++yy) {
          const T* prow = pp + (plane * Hp + yy + s.py) * Ws + margin;
          for (int64_t x = 0; x < s.W; ++x) drow[x] += prow[x + s.px];
          for (int64_t j = 0; j < s.px; ++j) {
            if (xmap[j] >= 0) drow[xmap[j]] += prow[j];
          }
          for (int64_t j = s.W + s.px; j < Wp; ++j) {
            if (xmap[j] >= 0) drow[xmap[j]] += prow[j];
          }
        }
      }
    }
  });
}

// Everything both passes share: padded planes, the per-image sigma tables, and the Args.
template <typename T>
struct Prepared {
  at::Tensor in_pad, gd_pad, rc, ss;
  Args<T> a{};

  Prepared(const at::Tensor& input, const c10::optional<at::Tensor>& guidance, const at::Tensor& sigma_color,
           const at::Tensor& sigma_space, const FilterShape& s) {
    const auto dt = c10::CppTypeToScalarType<T>::value;
    a.N = s.N;
    a.C = s.C;
    a.Cg = s.Cg;
    a.H = s.H;
    a.W = s.W;
    a.ky = s.ky;
    a.kx = s.kx;
    a.py = s.py;
    a.px = s.px;
    a.Hp = s.H + 2 * s.py;
    a.Wp = s.W + 2 * s.px;
    a.margin = s.kx + kVecMax;
    a.Ws = a.margin + a.Wp + a.margin;
    a.xoff = s.kx - 1;
    a.Wx = s.W + 2 * (s.kx - 1) + kVecMax;
    a.distance = s.distance;
    a.self = s.self;
    in_pad = pad_planes<T>(input, s, a.margin, a.Ws);
    gd_pad = s.self ? in_pad : pad_planes<T>(*guidance, s, a.margin, a.Ws);
    a.in = in_pad.data_ptr<T>();
    a.gd = gd_pad.data_ptr<T>();
    const at::Tensor sc = sigma_color.to(dt).contiguous();
    rc = (0.5 / (sc * sc)).contiguous();
    a.rc = rc.data_ptr<T>();
    const at::Tensor sp = sigma_space.to(dt).contiguous();
    ss = at::empty({s.N, s.ky * s.kx}, sp.options());
    const T* spp = sp.data_ptr<T>();
    T* ssp = ss.data_ptr<T>();
    for (int64_t n = 0; n < s.N; ++n) {
      for (int64_t ty = 0; ty < s.ky; ++ty) {
        for (int64_t tx = 0; tx < s.kx; ++tx) {
          ssp[(n * s.ky + ty) * s.kx + tx] =
              spatial_exponent<T>(ty - s.py, tx - s.px, spp[2 * n], spp[2 * n + 1]);
        }
      }
    }
    a.ss = ssp;
  }
};

at::Tensor bilateral_filter(const at::Tensor& input, const c10::optional<at::Tensor>& guidance,
                            at::IntArrayRef kernel_size, const at::Tensor& sigma_color,
                            const at::Tensor& sigma_space, c10::string_view border_type,
                            c10::string_view color_distance_type) {
  const FilterShape s = check_filter(input, guidance, kernel_size, sigma_color, sigma_space,
                                     std::string(border_type), std::string(color_distance_type));
  if (s.pixels() == 0 || s.C == 0) return at::empty(input.sizes(), input.options());
  const auto dt = compute_dtype(input.scalar_type());
  at::Tensor out = at::empty(input.sizes(), input.options().dtype(dt));
  AT_DISPATCH_FLOATING_TYPES(dt, "bilateral_filter_cpu", [&] {
    Prepared<scalar_t> prep(input, guidance, sigma_color, sigma_space, s);
    prep.a.out = out.data_ptr<scalar_t>();
    run_rows(Pass::kForward, prep.a, s.N * s.H);
  });
  return out.to(input.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bilateral_filter_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const c10::optional<at::Tensor>& guidance,
    at::IntArrayRef kernel_size, const at::Tensor& sigma_color, const at::Tensor& sigma_space,
    c10::string_view border_type, c10::string_view color_distance_type, std::array<bool, 4> mask) {
  const FilterShape s = check_filter(input, guidance, kernel_size, sigma_color, sigma_space,
                                     std::string(border_type), std::string(color_distance_type));
  check_filter_grad_output(grad_output, input);
  check_filter_mask(s, mask);
  const at::Tensor& gd_like = s.self ? input : *guidance;
  at::Tensor grad_input = zero_or_masked(mask[0], input);
  at::Tensor grad_guidance = zero_or_masked(mask[1], gd_like);
  at::Tensor grad_sc = zero_or_masked(mask[2], sigma_color);
  at::Tensor grad_ss = zero_or_masked(mask[3], sigma_space);
  if (s.pixels() == 0 || s.C == 0 || !(mask[0] || mask[1] || mask[2] || mask[3])) {
    return {grad_input, grad_guidance, grad_sc, grad_ss};
  }
  const auto dt = compute_dtype(input.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(dt, "bilateral_filter_backward_cpu", [&] {
    using T = scalar_t;
    Prepared<T> prep(input, guidance, sigma_color, sigma_space, s);
    Args<T>& a = prep.a;
    const at::TensorOptions opt = input.options().dtype(dt);
    const at::Tensor go = grad_output.to(dt).contiguous();
    a.go = go.data_ptr<T>();
    a.need_value = mask[0];
    a.need_range = (s.self && mask[0]) || mask[1];
    const bool need_sigma = mask[2] || mask[3];
    at::Tensor gp = at::empty({s.N, s.C, s.H, a.Wx}, opt);  // pass 1 writes every column
    at::Tensor av = at::empty({s.N, s.H, a.Wx}, opt);
    at::Tensor gcen = a.need_range ? at::empty({s.N, s.Cg, s.H, s.W}, opt) : at::Tensor();
    at::Tensor rows = need_sigma ? at::empty({s.N * s.H, 3}, opt.dtype(at::kDouble)) : at::Tensor();
    a.gp = gp.data_ptr<T>();
    a.a = av.data_ptr<T>();
    a.gcen = a.need_range ? gcen.data_ptr<T>() : nullptr;
    a.rows = need_sigma ? rows.data_ptr<double>() : nullptr;
    run_rows(Pass::kPass1, a, s.N * s.H);

    if (need_sigma) {
      // Per image, rows summed in row order.
      const double* rp = rows.data_ptr<double>();
      const at::Tensor sc = sigma_color.to(at::kDouble).contiguous();
      const at::Tensor sp = sigma_space.to(at::kDouble).contiguous();
      at::Tensor gsc = at::empty({s.N}, sc.options());
      at::Tensor gss = at::empty({s.N, 2}, sc.options());
      for (int64_t n = 0; n < s.N; ++n) {
        double d = 0, yy = 0, xx = 0;
        for (int64_t y = 0; y < s.H; ++y) {
          d += rp[3 * (n * s.H + y)];
          yy += rp[3 * (n * s.H + y) + 1];
          xx += rp[3 * (n * s.H + y) + 2];
        }
        const double c = sc.data_ptr<double>()[n];
        const double sy = sp.data_ptr<double>()[2 * n], sx = sp.data_ptr<double>()[2 * n + 1];
        gsc.data_ptr<double>()[n] = d / (c * c * c);
        gss.data_ptr<double>()[2 * n] = yy / (sy * sy * sy);
        gss.data_ptr<double>()[2 * n + 1] = xx / (sx * sx * sx);
      }
      if (mask[2]) grad_sc = gsc.to(sigma_color.scalar_type());
      if (mask[3]) grad_ss = gss.to(sigma_space.scalar_type());
    }
    if (!(mask[0] || mask[1])) return;

    const bool want_gin = mask[0];
    // Pass 2 writes every padded position the fold reads.
    at::Tensor gin = want_gin ? at::empty({s.N, s.C, a.Hp, a.Ws}, opt) : at::Tensor();
    at::Tensor ggd = (!s.self && mask[1]) ? at::empty({s.N, s.Cg, a.Hp, a.Ws}, opt) : at::Tensor();
    a.gin = want_gin ? gin.data_ptr<T>() : nullptr;
    a.ggd = ggd.defined() ? ggd.data_ptr<T>() : nullptr;
    run_rows(Pass::kPass2, a, s.N * a.Hp);

    if (want_gin) {
      at::Tensor gi = s.self ? gcen : at::zeros({s.N, s.C, s.H, s.W}, opt);
      fold_add<T>(gin, gi, s, a.margin, a.Ws);
      grad_input = gi.to(input.scalar_type());
    }
    if (!s.self && mask[1]) {
      fold_add<T>(ggd, gcen, s, a.margin, a.Ws);
      grad_guidance = gcen.to(guidance->scalar_type());
    }
  });
  return {grad_input, grad_guidance, grad_sc, grad_ss};
}

}  // namespace
}  // namespace cpu
}  // namespace bilateral_ops

TORCH_LIBRARY_IMPL(bilateral_ops, CPU, m) {
  m.impl("bilateral_filter", &bilateral_ops::cpu::bilateral_filter);
  m.impl("_bilateral_filter_backward", &bilateral_ops::cpu::bilateral_filter_backward);
}
