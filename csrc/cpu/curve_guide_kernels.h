// The vector code of curve_guide's CPU kernels (csrc/cpu/curve_guide.cpp), one copy per
// instruction set: curve_guide.cpp includes it through isa_copies.h (namespace BO_ISA_NS, level
// BO_ISA_LEVEL), after the shared types CurveArgs, Span, kVecs and kChunk. No include guard, on
// purpose.

namespace BO_ISA_NS {

// This copy's vectors: 64 bytes in the AVX-512 copy, 32 in the others.
#include "isa_vec.h"
#include "bilateral_ops/curve_pointwise.h"

// Whether this copy evaluates the curves through their sorted knots (sorted_curve): where the
// permutes it needs are single instructions (AVX-512); AVX2's take two and a blend, no faster
// than the sum.
constexpr bool kSortedCurves = BO_ISA_LEVEL >= 4;

template <typename T>
constexpr int64_t block_pixels() {
  return kVecs * vec_width<T>();
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

// Zeroed vectors, aligned to their size. Not std::vector<vec_t<T>>: GCC drops the vector type's
// alignment in template arguments, so the allocator would hand out 16-byte aligned memory.
template <typename T>
class VecBuf {
 public:
  explicit VecBuf(int64_t n) : n_(n) {
    if (n_ > 0) {
      p_ = static_cast<vec_t<T>*>(::operator new(n_ * sizeof(vec_t<T>), std::align_val_t(sizeof(vec_t<T>))));
      fill();
    }
  }
  ~VecBuf() {
    if (p_ != nullptr) ::operator delete(p_, std::align_val_t(sizeof(vec_t<T>)));
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
// The backward also keeps, for the curve as (c - r) P - Q (below), each channel's smallest
// shift r and each knot's slope * (shift - r), and for the parameter gradients of the blocks
// that take that form, the per-knot sums A and B.
template <typename T>
struct Scratch {
  VecBuf<T> x, c, f, fp, dx, acc, tab, ref, slope_shift, knot_sums;
  vec_t<T> zero;
  bool table_finite = true;
  Scratch(const CurveLayout& l, bool backward, const T* table, const T* ref_value)
      : x(l.C * kVecs),
        c(backward ? l.C * kVecs : 0),
        f(backward ? l.C * kVecs : 0),
        fp(backward ? l.C * kVecs : 0),
        dx(backward ? l.C * kVecs : 0),
        acc(backward ? l.size() : 0),
        tab(l.size()),
        ref(backward ? l.C : 0),
        slope_shift(backward ? l.C * l.K : 0),
        knot_sums(backward ? 2 * l.C * l.K : 0),
        zero(vopaque<T>(T(0))) {
    for (int64_t q = 0; q < l.size(); ++q) {
      tab[q] = vbroadcast<T>(table[q]);
      table_finite = table_finite && std::isfinite(table[q]);
    }
    if (backward) {
      for (int64_t k = 0; k < l.C; ++k) {
        ref[k] = vbroadcast<T>(ref_value[k]);
        for (int64_t j = 0; j < l.K; ++j) {
          const T d = table[l.shifts() + k * l.K + j] - ref_value[k];
          const T prod = table[l.slopes() + k * l.K + j] * d;
          slope_shift[k * l.K + j] = vbroadcast<T>(prod);
        }
      }
    }
  }
};

// Whether every lane of the kVecs vectors v is finite (v * 0 is +-0 exactly then, NaN if not).
// AVX-512: one compare into a mask (no lane NaN), where the lane sum is a chain of shuffles and
// adds; the passes ask once per block and channel.
template <typename T>
BO_ALWAYS_INLINE bool all_finite(const vec_t<T>* v, vec_t<T> zero) {
  vec_t<T> z = zero;
  for (int64_t i = 0; i < kVecs; ++i) z += v[i] * zero;
#if BO_ISA_LEVEL >= 4
  static_assert(kIsaVecBytes == 64, "the AVX-512 copy's vectors are zmm registers");
  if constexpr (std::is_same<T, float>::value) {
    return _mm512_cmp_ps_mask(z, z, _CMP_ORD_Q) == __mmask16(0xFFFF);
  } else {
    return _mm512_cmp_pd_mask(z, z, _CMP_ORD_Q) == __mmask8(0xFF);
  }
#else
  return vsum<T>(z) == T(0);
#endif
}

// Channel k's curve and slope at the block's values ck through its sorted knots (a.sorted, see
// CurveArgs; curve_guide.h's form, as the CUDA kernels evaluate it): the count n of the 16
// padded shifts (one vector) below c, each probe of a shift one permute (vpermps), then P_n and
// Q_n by the same permute; about 28 instructions a vector where the sum over 16 knots takes 48.
// For finite c only (see sorted_guide).
template <typename T>
BO_ALWAYS_INLINE void sorted_curve(const CurveArgs<T>& a, int64_t k, const vec_t<T>* ck,
                                   vec_t<T>* fk, vec_t<T>* fpk) {
  using V = vec_t<T>;
  using I = typename VecOf<T>::mask;
  static_assert(vec_width<T>() == 16, "16 knots in one vector");
  const T* t = a.sorted + k * kSortedStride;
  const V knots = vload(t), p_tab = vload(t + 16), q_tab = vload(t + 32);
  const V s3 = vbroadcast<T>(t[3]), s7 = vbroadcast<T>(t[7]), s11 = vbroadcast<T>(t[11]);
  const V s15 = vbroadcast<T>(t[15]), ref = vbroadcast<T>(t[0]);
  for (int64_t v = 0; v < kVecs; ++v) {
    const V c = ck[v];
    // The group of four knots c falls in (four knots below c per group passed), then the knots
    // of that group below c, each by compares that do not wait on one another: a short chain,
    // where a binary search's five dependent probes left the core waiting.
    I n = {};
    n = s3 < c ? n + 4 : n;
    n = s7 < c ? n + 4 : n;
    n = s11 < c ? n + 4 : n;
    const V p0 = __builtin_shuffle(knots, n), p1 = __builtin_shuffle(knots, n + 1);
    const V p2 = __builtin_shuffle(knots, n + 2);
    n = p0 < c ? n + 1 : n;
    n = p1 < c ? n + 1 : n;
    n = p2 < c ? n + 1 : n;
    // n counts the knots below c among the first 15; the 16th is below c only if all are.
    n = s15 < c ? n + 1 : n;
    // n knots below c; entry n - 1 of the tables holds P_n and Q_n, and P_0 = Q_0 = 0.
    const auto some = n > 0;
    const V P = some ? __builtin_shuffle(p_tab, n - 1) : V{};
    const V Q = some ? __builtin_shuffle(q_tab, n - 1) : V{};
    const V d = c - ref;
    fk[v] = d * P - Q;
    fpk[v] = P;
  }
}

// The channel values c = ccm x + ccm_bias of channel k.
template <typename T>
BO_ALWAYS_INLINE void block_colour(const CurveArgs<T>& a, const Scratch<T>& s, int64_t k,
                                   vec_t<T>* ck) {
  const CurveLayout& l = a.l;
  for (int64_t v = 0; v < kVecs; ++v) ck[v] = s.tab[l.ccm_bias() + k];
  for (int64_t i = 0; i < l.C; ++i) {
    const vec_t<T> m = s.tab[l.ccm() + k * l.C + i];
    for (int64_t v = 0; v < kVecs; ++v) ck[v] += m * s.x[i * kVecs + v];
  }
}

// Adds channel k's term mix_k f_k to the guide g; with kKeep, keeps c, f and f' for the backward.
template <typename T, bool kKeep>
BO_ALWAYS_INLINE void add_channel(const CurveArgs<T>& a, Scratch<T>& s, int64_t k,
                                  const vec_t<T>* ck, const vec_t<T>* fk, const vec_t<T>* fpk,
                                  vec_t<T>* g) {
  const vec_t<T> mk = s.tab[a.l.mix() + k];
  for (int64_t v = 0; v < kVecs; ++v) {
    g[v] += mk * fk[v];
    if constexpr (kKeep) {
      s.c[k * kVecs + v] = ck[v];
      s.f[k * kVecs + v] = fk[v];
      s.fp[k * kVecs + v] = fpk[v];
    }
  }
}

// block_guide through sorted_curve for every channel. False where the guide g is not finite:
// with a finite table that is where some c is not finite (c = +-inf gives another NaN or
// infinity than the sum over the knots), or the sums overflow; the caller then redoes the block
// in another form. One check per block rather than per channel.
template <typename T, bool kKeep>
BO_ALWAYS_INLINE bool sorted_guide(const CurveArgs<T>& a, Scratch<T>& s, vec_t<T>* g) {
  using V = vec_t<T>;
  const CurveLayout& l = a.l;
  for (int64_t v = 0; v < kVecs; ++v) g[v] = s.tab[l.mix_bias()];
  for (int64_t k = 0; k < l.C; ++k) {
    V ck[kVecs], fk[kVecs], fpk[kVecs];
    block_colour<T>(a, s, k, ck);
    sorted_curve<T>(a, k, ck, fk, fpk);
    add_channel<T, kKeep>(a, s, k, ck, fk, fpk, g);
  }
  return all_finite<T>(g, s.zero);
}

// The pre-clamp guide g of one block (x already loaded); with kKeep, each channel's c, f and f'
// are kept for the backward pass. Where the AVX-512 copy has sorted knots (float, K <= 16), both
// passes take sorted_guide; otherwise, or where that gives up:
//
// The backward (kKeep) takes a channel's curve as f = (c - r) P - Q, f' = P, with P the sum of
// the slopes and Q the sum of slope * (shift - r) over the knots below c, r the channel's
// smallest shift (curve_guide.h's sorted form, without the sort; r keeps the rounding that of
// c - shift rather than of c and shift apart): a compare and two masked adds per knot instead of
// curve_point's five operations. Where c or the table is not finite, or a sum overflows, the two
// forms differ in their NaNs and infinities, and that block of the channel takes the sum over
// the knots as the forward does.
template <typename T, bool kKeep>
BO_ALWAYS_INLINE void block_guide(const CurveArgs<T>& a, Scratch<T>& s, vec_t<T>* g) {
  using V = vec_t<T>;
  const CurveLayout& l = a.l;
  const int64_t C = l.C, K = l.K;
  const VecBuf<T>& tb = s.tab;
  if constexpr (kSortedCurves && std::is_same<T, float>::value) {
    if (a.sorted != nullptr && sorted_guide<T, kKeep>(a, s, g)) return;
  }
  for (int64_t v = 0; v < kVecs; ++v) g[v] = tb[l.mix_bias()];
  for (int64_t k = 0; k < C; ++k) {
    V ck[kVecs], fk[kVecs] = {}, fpk[kVecs] = {};
    block_colour<T>(a, s, k, ck);
    const V zero = s.zero;
    bool summed = false;
    if constexpr (kKeep) {
      if (s.table_finite) {
        V P[kVecs] = {}, Q[kVecs] = {}, check[kVecs];
        for (int64_t j = 0; j < K; ++j) {
          const V t = tb[l.shifts() + k * K + j], m = tb[l.slopes() + k * K + j];
          const V ms = s.slope_shift[k * K + j];
          for (int64_t v = 0; v < kVecs; ++v) {
            const auto below = ck[v] > t;
            P[v] = below ? P[v] + m : P[v];
            Q[v] = below ? Q[v] + ms : Q[v];
          }
        }
        for (int64_t v = 0; v < kVecs; ++v) {
          const V d = ck[v] - s.ref[k];
          fk[v] = d * P[v] - Q[v];
          fpk[v] = P[v];
          check[v] = (d + fk[v]) + (P[v] + Q[v]);
        }
        summed = all_finite<T>(check, zero);
      }
    }
    if (!summed) {
      for (int64_t v = 0; v < kVecs; ++v) fk[v] = fpk[v] = V{};
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
    }
    add_channel<T, kKeep>(a, s, k, ck, fk, fpk, g);
  }
}

// Copies pixels g .. g + len - 1 of channel plane i of an (N, C, HW) tensor to dst, or (kStore)
// back from it, piece by piece across the images they span.
template <typename T, bool kStore, typename P>
inline void copy_pieces(const CurveArgs<T>& a, P* planes, int64_t i, int64_t g, int64_t len, T* buf) {
  for (int64_t done = 0; done < len;) {
    const int64_t n = (g + done) / a.HW, at = g + done - n * a.HW;
    const int64_t take = std::min(len - done, a.HW - at);
    P* src = planes + (n * a.l.C + i) * a.HW + at;
    if constexpr (kStore) {
      std::memcpy(src, buf + done, static_cast<size_t>(take) * sizeof(T));
    } else {
      std::memcpy(buf + done, src, static_cast<size_t>(take) * sizeof(T));
    }
    done += take;
  }
}

// Whether the block g .. g + len - 1 lies in one image, and where (offset of image n's pixel 0
// times C is n * C * HW).
template <typename T>
BO_ALWAYS_INLINE bool one_image(const CurveArgs<T>& a, int64_t g, int64_t len, int64_t* plane_at) {
  const int64_t n = g / a.HW, at = g - n * a.HW;
  *plane_at = n * a.l.C * a.HW + at;
  return at + len <= a.HW;
}

// The input's pixels g .. g + len - 1 into s.x, every channel.
template <typename T>
BO_ALWAYS_INLINE void load_pixels(const CurveArgs<T>& a, Scratch<T>& s, int64_t g, int64_t len) {
  int64_t at;
  if (one_image(a, g, len, &at)) {
    for (int64_t i = 0; i < a.l.C; ++i) load_block(a.input + at + i * a.HW, len, &s.x[i * kVecs]);
    return;
  }
  for (int64_t i = 0; i < a.l.C; ++i) {
    T buf[block_pixels<T>()] = {};
    copy_pieces<T, false>(a, a.input, i, g, len, buf);
    load_block(buf, block_pixels<T>(), &s.x[i * kVecs]);
  }
}

// s.dx into the input gradient's pixels g .. g + len - 1, every channel.
template <typename T>
BO_ALWAYS_INLINE void store_input_grad(const CurveArgs<T>& a, const Scratch<T>& s, int64_t g, int64_t len) {
  int64_t at;
  if (one_image(a, g, len, &at)) {
    for (int64_t i = 0; i < a.l.C; ++i) store_block(&s.dx[i * kVecs], len, a.grad_input + at + i * a.HW);
    return;
  }
  for (int64_t i = 0; i < a.l.C; ++i) {
    T buf[block_pixels<T>()];
    store_block(&s.dx[i * kVecs], block_pixels<T>(), buf);
    copy_pieces<T, true>(a, a.grad_input, i, g, len, buf);
  }
}

template <typename T>
BO_ALWAYS_INLINE void forward_chunks(const CurveArgs<T>& a, int64_t c0, int64_t c1) {
  using V = vec_t<T>;
  Scratch<T> s(a.l, false, a.table, nullptr);
  constexpr int64_t B = block_pixels<T>();
  for (int64_t chunk = c0; chunk < c1; ++chunk) {
    const Span sp = chunk_span(chunk, a.total);
    for (int64_t p = sp.g0; p < sp.g1; p += B) {
      const int64_t len = std::min(B, sp.g1 - p);
      load_pixels(a, s, p, len);
      V g[kVecs];
      block_guide<T, false>(a, s, g);
      for (int64_t v = 0; v < kVecs; ++v) g[v] = curve_clamp01(g[v]);
      store_block(g, len, a.output + p);  // (N, HW): the batch's pixels in order
    }
  }
}

// Adds the lanes' sum of terms[0..kVecs) to acc, in a fixed order.
template <typename T>
BO_ALWAYS_INLINE void accumulate(vec_t<T>& acc, const vec_t<T>* terms) {
  acc += (terms[0] + terms[1]) + (terms[2] + terms[3]);
}

// The shift and slope gradient rows of channel k's knots for one block. A knot's slope gradient
// is sum df relu(c - s) = B - (s - r) A, where A = sum df and B = sum df (c - r) over the pixels
// with c > s (r as in block_guide): a compare and two masked adds per knot, A and B kept per
// knot in s.knot_sums and combined once per chunk, in double. A block whose df (c - r) is not
// finite (c or grad_output not finite) adds df relu(c - s) as it comes, which keeps the NaNs of
// 0 * inf that B - (s - r) A would drop.
template <typename T>
BO_ALWAYS_INLINE void knot_grads(const CurveArgs<T>& a, Scratch<T>& s, int64_t k,
                                 const vec_t<T>* ck, const vec_t<T>* df) {
  using V = vec_t<T>;
  const CurveLayout& l = a.l;
  const int64_t K = l.K;
  const VecBuf<T>& tb = s.tab;
  V dfc[kVecs];
  for (int64_t v = 0; v < kVecs; ++v) dfc[v] = df[v] * (ck[v] - s.ref[k]);
  if (s.table_finite && all_finite<T>(dfc, s.zero)) {
    V* sums = &s.knot_sums[2 * k * K];
    for (int64_t j = 0; j < K; ++j) {
      const V tj = tb[l.shifts() + k * K + j];
      V A = sums[2 * j], B = sums[2 * j + 1];
      for (int64_t v = 0; v < kVecs; ++v) {
        const auto above = ck[v] > tj;
        A = above ? A + df[v] : A;
        B = above ? B + dfc[v] : B;
      }
      sums[2 * j] = A;
      sums[2 * j + 1] = B;
    }
    return;
  }
  V* acc_shift = &s.acc[l.shifts() + k * K];
  V* acc_slope = &s.acc[l.slopes() + k * K];
  for (int64_t j = 0; j < K; ++j) {
    const V tj = tb[l.shifts() + k * K + j];
    V d_shift[kVecs] = {}, d_slope[kVecs] = {};
    for (int64_t v = 0; v < kVecs; ++v) {
      curve_point_grads(ck[v], tj, df[v], d_shift[v], d_slope[v], s.zero);
    }
    accumulate<T>(acc_shift[j], d_shift);
    accumulate<T>(acc_slope[j], d_slope);
  }
}

template <typename T, bool kParams, bool kInput>
BO_ALWAYS_INLINE void backward_chunks(const CurveArgs<T>& a, int64_t c0, int64_t c1,
                                      double* partial) {
  static_assert(kVecs == 4, "accumulate() sums exactly kVecs terms");
  using V = vec_t<T>;
  const CurveLayout& l = a.l;
  const int64_t C = l.C, K = l.K, P = l.size();
  Scratch<T> s(l, true, a.table, a.ref);
  const VecBuf<T>& tb = s.tab;
  constexpr int64_t B = block_pixels<T>();
  for (int64_t chunk = c0; chunk < c1; ++chunk) {
    const Span sp = chunk_span(chunk, a.total);
    if constexpr (kParams) {
      s.acc.fill();
      s.knot_sums.fill();
    }
    for (int64_t p = sp.g0; p < sp.g1; p += B) {
      const int64_t len = std::min(B, sp.g1 - p);
      load_pixels(a, s, p, len);
      V g[kVecs], gp[kVecs];
      block_guide<T, true>(a, s, g);
      load_block(a.grad_output + p, len, gp);  // (N, HW)
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
          knot_grads<T>(a, s, k, ck, df);
        }
      }
      if constexpr (kInput) store_input_grad(a, s, p, len);
    }
    if constexpr (kParams) {
      double* row = partial + chunk * P;
      for (int64_t q = 0; q < P; ++q) row[q] = static_cast<double>(vsum<T>(s.acc[q]));
      // Without a finite table no block took the A, B form (and s * 0 could be NaN).
      if (s.table_finite) {
        for (int64_t q = 0; q < C * K; ++q) {
          const double A = static_cast<double>(vsum<T>(s.knot_sums[2 * q]));
          const double B = static_cast<double>(vsum<T>(s.knot_sums[2 * q + 1]));
          row[l.shifts() + q] += A;
          const double shift = static_cast<double>(a.table[l.shifts() + q]);
          row[l.slopes() + q] += B - (shift - static_cast<double>(a.ref[q / K])) * A;
        }
      }
    }
  }
}

// Task functions: the only non-inline code of this instruction set.
template <typename T>
void forward_task(const CurveArgs<T>& a, int64_t c0, int64_t c1) {
  forward_chunks<T>(a, c0, c1);
}

template <typename T>
void backward_task(const CurveArgs<T>& a, int64_t c0, int64_t c1, double* partial) {
  if (a.need_params && a.grad_input != nullptr) {
    backward_chunks<T, true, true>(a, c0, c1, partial);
  } else if (a.need_params) {
    backward_chunks<T, true, false>(a, c0, c1, partial);
  } else {
    backward_chunks<T, false, true>(a, c0, c1, partial);
  }
}

}  // namespace BO_ISA_NS
