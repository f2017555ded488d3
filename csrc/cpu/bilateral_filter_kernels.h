// The vector code of bilateral_filter's CPU kernels (csrc/cpu/bilateral_filter.cpp, which
// describes the method), one copy per instruction set: bilateral_filter.cpp and
// bilateral_filter_v3.cpp / _v4.cpp include it through isa_copies.h (namespace BO_ISA_NS, level
// BO_ISA_LEVEL), after the shared types of bilateral_filter_cpu.h (Args, Scratch, BandRows,
// fold_row, Pass). No include guard, on purpose.

namespace BO_ISA_NS {

// This copy's vectors: 64 bytes in the AVX-512 copy, 32 in the others.
#include "isa_vec.h"

// Whether sums_band runs two chunks per pair loop (sum_chunks<..., J = 2>), which needs the 32
// vector registers of AVX-512.
constexpr bool kTwoChunks = BO_ISA_LEVEL >= 4;

// ---------------------------------------------------------------------------------------------
// The weights' exponentials, in base 2: exp(x) = 2^(x log2 e), with the colour scale and the
// spatial table multiplied by log2 e once (Prepared, nrc2 below), so a tap's exponent comes out of
// one multiply-add already in base 2. The tap loops are bound by the multiply-add ports, and
// this saves one of a dozen per tap.
// float: 2^n times a degree-5 minimax polynomial of 2^f, |f| <= 1/2, constant term 1 so that a
// weight of exponent 0 is exactly 1 (relative error 9.2e-8, 1.9e-7 evaluated in float: a few ulp
// of expf, so float32 weights stay within ~2e-7 of torch.exp, far inside the 1e-5 contract).
// Exponents below -86 (natural units) give exactly 0: they are clamped there for the arithmetic
// (2^n stays a normal number), then zeroed. torch's float32 exp gives denormals down to -104 and
// 0 below, so the weights differ by less than 1e-37 of the centre weight (1), and an infinite
// input (exponent -inf) gets weight 0 and makes NaN (0 * inf) where kornia does.
// The AVX-512 copy splits t at floor(t) instead, f in [0, 1), with its own polynomial (below): it
// has an instruction for each half of the split. The two copies' weights differ by a few ulp.
// double: the same split at round(t), with a degree-11 polynomial (below), as the float64
// contract is 1e-10.

template <typename T>
BO_ALWAYS_INLINE vec_t<T> vexp2(vec_t<T> t, vec_t<T> lo);

// 1 + c[N - 1] f + c[N - 2] f^2 + ... + c[0] f^N, by Horner's rule.
template <typename T, int N>
BO_ALWAYS_INLINE vec_t<T> exp2_poly(vec_t<T> f, const T (&c)[N]) {
  vec_t<T> p = vsplat<T>(c[0]);
  for (int i = 1; i < N; ++i) p = p * f + c[i];
  return p * f + T(1);
}

// 2^t for t >= lo and 0 below it (NaN stays NaN), c the polynomial of 2^f for |f| <= 1/2, with
// no special instruction: 2^t = 2^n 2^f with n = round(t). Adding 1.5 * 2^M (M mantissa bits)
// rounds t to an integer held in the low mantissa bits of m, whose bits shifted left by M are
// n << M (those of 1.5 * 2^M vanish: 0x4B400000 << 23 and 0x4338000000000000 << 52 are 0);
// added to the bits of 2^f, n << M scales it by 2^n. lo must keep 2^n a normal number.
template <typename T, int N>
BO_ALWAYS_INLINE vec_t<T> split_exp2(vec_t<T> t, vec_t<T> lo, const T (&c)[N]) {
  using V = vec_t<T>;
  using I = typename VecOf<T>::mask;
  constexpr bool kFloat = std::is_same<T, float>::value;
  const V t_in = t;
  t = lo > t ? lo : t;  // NaN passes through as NaN
  const V magic = vsplat<T>(kFloat ? T(12582912.0f) : T(6755399441055744.0));
  const V m = t + magic;
  const V f = t - (m - magic);
  I n_shifted;
  __builtin_memcpy(&n_shifted, &m, sizeof(n_shifted));
  n_shifted <<= (kFloat ? 23 : 52);
  const V p = exp2_poly(f, c);
  I bits;
  __builtin_memcpy(&bits, &p, sizeof(bits));
  bits += n_shifted;
  V out;
  __builtin_memcpy(&out, &bits, sizeof(out));
  return t_in < lo ? V{} : out;
}

// 2^f for |f| <= 1/2 (see above).
constexpr float kExp2Centred[5] = {1.3264708791e-3f, 9.6715114712e-3f, 5.5507337765e-2f,
                                   2.4022242104e-1f, 6.9314697759e-1f};

#if BO_ISA_LEVEL >= 4
// 2^f for 0 <= f < 1: degree-5 minimax for the relative error with p(0) = 1 exactly (8.2e-8,
// 1.7e-7 evaluated in float; the |f| <= 1/2 polynomial's are 9.2e-8 and 1.9e-7).
constexpr float kExp2Unit[5] = {1.8671298167e-3f, 9.0170307085e-3f, 5.5799912661e-2f,
                                2.4016444385e-1f, 6.9315129519e-1f};

// AVX-512: f = t - floor(t) in one instruction (vreduceps) and p 2^floor(t) in one (vscalefps
// takes the floor of its exponent operand itself, and zeroes the lanes below lo by its mask), where
// the generic version takes seven. Lanes below lo need no clamp: whatever f and p are there, the
// mask zeroes them; scalef is exact where p 2^floor(t) is a normal number, as at t >= lo.
template <>
BO_ALWAYS_INLINE vec_t<float> vexp2<float>(vec_t<float> t, vec_t<float> lo) {
  using V = vec_t<float>;
  static_assert(kIsaVecBytes == 64, "the AVX-512 copy's vectors are zmm registers");
  const __mmask16 keep = _mm512_cmp_ps_mask(t, lo, _CMP_NLT_UQ);  // NaN kept, as NaN
  // The masked form with every lane kept is the same instruction: the plain intrinsic's undefined
  // pass-through operand makes GCC 12 warn.
  const V f = _mm512_mask_reduce_ps(t, __mmask16(0xFFFF), t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const V p = exp2_poly(f, kExp2Unit);
  return _mm512_maskz_scalef_ps(keep, p, t);
}
#else
template <>
BO_ALWAYS_INLINE vec_t<float> vexp2<float>(vec_t<float> t, vec_t<float> lo) {
  return split_exp2(t, lo, kExp2Centred);
}
#endif

// 2^f for |f| <= 1/2: the Taylor coefficients of e^(f ln 2) to degree 11, highest first (the
// remainder, below 7e-15 relative, is a few ulp).
constexpr double kExp2Double[11] = {
    4.4455382718708114976e-10, 7.0549116208011233299e-9, 1.0178086009239699727e-7,
    1.3215486790144309488e-6,  1.525273380405984028e-5,  1.5403530393381609954e-4,
    1.3333558146428443423e-3,  9.618129107628477162e-3,  5.5504108664821579953e-2,
    2.4022650695910071233e-1,  6.9314718055994530942e-1};

// double: split_exp2 as the generic float version, in vectors (a libm exp2 per lane made the
// float64 filter 11-16x slower than the float32 one). Exponents below -1022 (2^-1022 of the
// centre weight) give 0 where libm gives denormals: far below the float64 contract's 1e-10. lo
// (float's clamp) is not used.
template <>
BO_ALWAYS_INLINE vec_t<double> vexp2<double>(vec_t<double> t, vec_t<double>) {
  return split_exp2(t, vsplat<double>(-1022.0), kExp2Double);
}


template <typename T>
BO_ALWAYS_INLINE vec_t<T> vabs(vec_t<T> v) {
  using M = typename VecOf<T>::mask;
  M bits;
  __builtin_memcpy(&bits, &v, sizeof(bits));
  bits &= ~((M{} + 1) << (8 * sizeof(T) - 1));  // clear the sign bit
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


// The weight of the pair {p, q = p + s} for a chunk of p: guidance at q loaded from gd0 (p's row
// of the padded guidance, channel stride PS) at offset os, gdp the guidance at p, nrc2 = -rc log2 e
// and ss the pair's spatial exponent (base 2; subtracted, so that its broadcast folds into the
// multiply-add as a memory operand). Also returns the guidance at q (gq), the differences
// gq - gdp (d) and the accumulated distance (for the l1 slope).
template <typename T, int CG, int DIST>
BO_ALWAYS_INLINE vec_t<T> pair_weight(const T* gd0, int64_t PS, int64_t os, const vec_t<T>* gdp, int64_t ng,
                                      vec_t<T> nrc2, const T& ss, vec_t<T> lo, vec_t<T>* gq, vec_t<T>* d,
                                      vec_t<T>* dist_acc) {
  const auto term = [](vec_t<T> v) { return DIST == kL1 ? vabs<T>(v) : v * v; };
  gq[0] = vload(gd0 + os);
  d[0] = gq[0] - gdp[0];
  vec_t<T> acc = term(d[0]);  // the terms are >= +0: no "0 +" needed
#pragma GCC unroll 4
  for (int64_t c = 1; c < count<CG>(ng); ++c) {
    gq[c] = vload(gd0 + c * PS + os);
    d[c] = gq[c] - gdp[c];
    acc += term(d[c]);
  }
  *dist_acc = acc;
  const vec_t<T> D = DIST == kL1 ? acc * acc : acc;
  return vexp2<T>(D * nrc2 - ss, lo);
}


// The sums pass for J neighbouring chunks j0, j0 + V, ... of row gd0 / in0 (planes s0): see
// sums_band. Two chunks (J = 2, fixed channel counts, AVX-512's 32 registers) put two
// independent weight chains side by side in program order.
// p's sums of J chunks from j0 added into planes s0 (channel stride PL): the C sums, then W.
template <typename T, int J>
BO_ALWAYS_INLINE void add_sums(T* s0, int64_t j0, int64_t PL, int64_t nc, const vec_t<T>* acc, const vec_t<T>* wsum) {
  for (int j = 0; j < J; ++j) {
    T* o = s0 + j0 + j * vec_width<T>();
    for (int64_t c = 0; c < nc; ++c) vstore(o + c * PL, vload(o + c * PL) + acc[j * nc + c]);
    vstore(o + nc * PL, vload(o + nc * PL) + wsum[j]);
  }
}

template <typename T, int CC, int CG, int DIST, bool SELF, int J, bool STAGE>
BO_ALWAYS_INLINE void sum_chunks(const Args<T>& p, const T* gd0, const T* in0, T* s0, int64_t j0, const Offsets& o,
                                 int64_t PL, vec_t<T> nrc2, vec_t<T> lo, const T* ss, vec_t<T>* v) {
  constexpr int64_t V = vec_width<T>();
  const int64_t nc = count<CC>(p.C), ng = count<CG>(p.Cg);
  const int64_t Ws = p.Ws, PS = p.PS;
  constexpr int KC = CC > 0 ? J * CC : 1, KG = CG > 0 ? J * CG : 1;
  vec_t<T> inp_l[KC], acc_l[KC], gdp_l[KG], gq_l[KG], d_l[KG], wsum[J];
  vec_t<T>* inp = CC > 0 ? inp_l : v;              // input at p
  vec_t<T>* acc = CC > 0 ? acc_l : v + p.C;        // p's sums of w I
  vec_t<T>* gdp = CG > 0 ? gdp_l : v + 2 * p.C;    // guidance at p
  vec_t<T>* gq = CG > 0 ? gq_l : v + 2 * p.C + p.Cg;  // guidance at q
  vec_t<T>* d = CG > 0 ? d_l : v + 2 * p.C + 2 * p.Cg;
  const T centre_ss = T(0);
  vec_t<T> dist;
  for (int j = 0; j < J; ++j) {
    const int64_t col = j0 + j * V;
#pragma GCC unroll 4
    for (int64_t c = 0; c < ng; ++c) gdp[j * ng + c] = vload(gd0 + c * PS + col);
    wsum[j] = pair_weight<T, CG, DIST>(gd0, PS, col, gdp + j * ng, ng, nrc2, centre_ss, lo, gq, d, &dist);
#pragma GCC unroll 4
    for (int64_t c = 0; c < nc; ++c) {
      inp[j * nc + c] = SELF ? gdp[j * ng + c] : vload(in0 + c * PS + col);
      acc[j * nc + c] = wsum[j] * inp[j * nc + c];
    }
  }
  int64_t held = 0;  // pairs in p's sums since they were last added (large windows)
  for (int64_t dx = o.dx0; dx <= o.dx1; ++dx) {
    const int64_t dy0 = std::max<int64_t>(dx > 0 ? 0 : 1, o.dy0);
    for (int64_t dy = dy0; dy <= o.dy1; ++dy) {
      const T& sst = ss[(dy + p.py) * p.kx + dx + p.px];
      for (int j = 0; j < J; ++j) {
        const int64_t os = dy * Ws + dx + j0 + j * V;
        const vec_t<T> w = pair_weight<T, CG, DIST>(gd0, PS, os, gdp + j * ng, ng, nrc2, sst, lo, gq, d, &dist);
        wsum[j] += w;
        T* q = s0 + os;
#pragma GCC unroll 4
        for (int64_t c = 0; c < nc; ++c) {
          acc[j * nc + c] += w * (SELF ? gq[c] : vload(in0 + c * PS + os));
          vstore(q + c * PL, vload(q + c * PL) + w * inp[j * nc + c]);
        }
        vstore(q + nc * PL, vload(q + nc * PL) + w);
      }
    }
    if (STAGE && (held += o.dy1 - dy0 + 1) >= p.flush) {
      add_sums<T, J>(s0, j0, PL, nc, acc, wsum);
      for (int64_t i = 0; i < J * nc; ++i) acc[i] = vec_t<T>{};
      for (int j = 0; j < J; ++j) wsum[j] = vec_t<T>{};
      held = 0;
    }
  }
  add_sums<T, J>(s0, j0, PL, nc, acc, wsum);
}


// Sums pass (the forward, and pass 1 of the backward) of band t: for every chunk of p, W_p =
// sum_q w_pq and the C sums sum_q w_pq I_q, over every unordered pair once: p's sums in registers
// over S+ (plus the centre tap, weighed like any other so that a non-finite guidance makes NaN as
// in kornia), q's added in memory, into the worker's band planes s.band (C sums, then W; local row
// i is padded row R0 - py + i). Order of S+: dx outer, dy inner, so that consecutive updates of q
// go to different rows (an unaligned update overlapping the previous one in the same row would
// wait on its store).
// The band also sweeps the pairs of the py rows above it that reach into it (the rows of the band
// above, whose sums go nowhere), so that its own rows' sums are complete without another band:
// bands share no memory, the planes are per worker (L2-sized, reused band after band, never a
// fresh image-sized buffer whose page faults would cost as much as the arithmetic), and each band
// hands its rows' sums to sink(n, y, x0, acc, wsum) as soon as it is done. That costs
// py (py + 1) kx / 2 pairs a band column, ~7% of a band of 32 rows at k = 9. A lambda does not
// inherit its enclosing function's target options: the sinks must be inlined (BO_LAMBDA_INLINE),
// or they run as baseline code with another vector ABI.
template <typename T, int CC, int CG, int DIST, bool SELF, bool STAGE, class Sink>
BO_ALWAYS_INLINE void sums_band_as(const Args<T>& p, int64_t t, Scratch<T>& s, Sink&& sink) {
  constexpr int64_t V = vec_width<T>();
  const int64_t nc = count<CC>(p.C);
  const int64_t Ws = p.Ws, PL = band_plane_rows(p) * Ws, SW = (p.py + 1) * Ws;
  Accs<vec_t<T>, CC> acc_l;
  vec_t<T>* v = s.template v<vec_t<T>>();
  vec_t<T>* acc = CC > 0 ? acc_l.v : v;  // the band's sums handed to the sink
  const BandRows band(p, t, p.nb, p.PH);
  const int64_t n = band.n, R0 = band.R0, R1 = band.R1, L0 = band.L0;
  std::fill(s.band, s.band + (nc + 1) * PL, T(0));
  const vec_t<T> nrc2 = vsplat<T>(static_cast<T>(-p.rc[n] * kLog2e)), lo = vopaque<T>(T(kExp2Floor));
  const T* ss = p.ss + n * p.ky * p.kx;
  for (int64_t x0t = 0; x0t < p.Wp; x0t += kTile) {
    for (int64_t R = std::max<int64_t>(0, L0); R < R1; ++R) {
      const int64_t dy_min = std::max<int64_t>(0, R0 - R);  // rows above: only pairs reaching the band
      const T* gd0 = p.gd_row(0, R);
      const T* in0 = p.in_row(0, R);
      T* const brow = s.band + (R - L0) * Ws;
      // Large windows: this row's pairs go into the staging rows, then into the band (Offsets).
      T* s0 = (STAGE ? s.stage : brow) + p.margin;
      const int64_t PLs = STAGE ? SW : PL;
      const int64_t x1t = std::min(p.Wp, x0t + kTile);
      Reach reach;
      int64_t j0 = x0t;
      if constexpr (CC > 0 && CG > 0) {
        for (; kTwoChunks && j0 + V < x1t; j0 += 2 * V) {
          const Offsets o = pair_offsets(p, R, j0, 2 * V, dy_min, p.py);
          reach.add(o, j0, 2 * V);
          sum_chunks<T, CC, CG, DIST, SELF, 2, STAGE>(p, gd0, in0, s0, j0, o, PLs, nrc2, lo, ss, v);
        }
      }
      for (; j0 < x1t; j0 += V) {
        const Offsets o = pair_offsets(p, R, j0, V, dy_min, p.py);
        reach.add(o, j0, V);
        sum_chunks<T, CC, CG, DIST, SELF, 1, STAGE>(p, gd0, in0, s0, j0, o, PLs, nrc2, lo, ss, v);
      }
      if (STAGE) fold_stage(p, s.stage, SW, brow, PL, nc + 1, reach);
    }
  }
  // The band's image rows.
  for (int64_t R = std::max(R0, p.py); R < std::min(R1, p.py + p.H); ++R) {
    const T* own = s.band + (R - L0) * Ws + p.margin + p.px;
    for (int64_t x0 = 0; x0 < p.W; x0 += V) {
      for (int64_t c = 0; c < nc; ++c) acc[c] = vload(own + c * PL + x0);
      sink(n, R - p.py, x0, acc, vload(own + nc * PL + x0));
    }
  }
}

// Staged sums (large windows) as their own instantiation: both inlined in one loop, the k = 9
// forward ran ~10 % slower.
template <typename T, int CC, int CG, int DIST, bool SELF, class Sink>
BO_ALWAYS_INLINE void sums_band(const Args<T>& p, int64_t t, Scratch<T>& s, Sink&& sink) {
  if (p.stage) {
    sums_band_as<T, CC, CG, DIST, SELF, true>(p, t, s, sink);
  } else {
    sums_band_as<T, CC, CG, DIST, SELF, false>(p, t, s, sink);
  }
}

template <typename T, int CC, int CG, int DIST, bool SELF>
BO_ALWAYS_INLINE void forward_band(const Args<T>& p, int64_t t, Scratch<T>& s) {
  const int64_t nc = count<CC>(p.C);
  sums_band<T, CC, CG, DIST, SELF>(p, t, s, [&](int64_t n, int64_t y, int64_t x0, const vec_t<T>* acc,
                                                const vec_t<T>& wsum) BO_LAMBDA_INLINE {
    const vec_t<T> inv = T(1) / wsum;
    for (int64_t c = 0; c < nc; ++c) store_tail(p.out + ((n * p.C + c) * p.H + y) * p.W, x0, p.W, acc[c] * inv);
    if (p.norm != nullptr) store_tail(p.norm + (n * p.H + y) * p.W, x0, p.W, wsum);
  });
}

// Pass 1: gp = g / W and a = gp . out per centre, written at padded row y + py of the centre
// planes (whose other rows and columns clear_outside zeroes).
template <typename T, int CC, int CG, int DIST, bool SELF>
BO_ALWAYS_INLINE void pass1_band(const Args<T>& p, int64_t t, Scratch<T>& s) {
  const int64_t nc = count<CC>(p.C);
  sums_band<T, CC, CG, DIST, SELF>(p, t, s, [&](int64_t n, int64_t y, int64_t x0, const vec_t<T>* acc,
                                                const vec_t<T>& wsum) BO_LAMBDA_INLINE {
    const vec_t<T> inv = T(1) / wsum;
    const int64_t at = (y + p.py) * p.Wx + p.xoff + x0;
    // Lanes past the row must hold zeros (pass 2 pairs nothing with them); their sums are of
    // padded positions or margins (W = 0 there), so they are cleared, not computed.
    const int64_t live = std::min<int64_t>(vec_width<T>(), p.W - x0);
    vec_t<T> a{};
    for (int64_t c = 0; c < nc; ++c) {
      vec_t<T> gpv = load_tail(p.go + ((n * p.C + c) * p.H + y) * p.W, x0, p.W) * inv;
      for (int64_t i = live; i < vec_width<T>(); ++i) gpv[i] = T(0);
      a += gpv * (acc[c] * inv);
      vstore(p.gp + (n * p.C + c) * p.Hp * p.Wx + at, gpv);
    }
    for (int64_t i = live; i < vec_width<T>(); ++i) a[i] = T(0);
    vstore(p.a + n * p.Hp * p.Wx + at, a);
  });
}


// Pass 2 for band t (bands of Bh padded rows over all Hp of them): every unordered pair
// {p, q = p + s}, s in S+, with p in the band's rows (every padded column), once. p's sums stay in
// registers over S+; q's are added in memory, in the order dx outer, dy inner, so that
// consecutive updates of q go to different rows (an unaligned update overlapping the previous
// one in the same row would wait on its store). VALUE and RANGE (which gradients) are
// compile-time so that each of q's and p's terms is one multiply-add; the sigma sums are rare and
// stay a runtime branch.
// As in sums_band, the band also sweeps the pairs that reach into it from the py rows above (only
// their q's terms kept; their sigma terms are the band above's), so its rows' gradients are
// complete in the worker's planes: it folds its image rows straight into the image gradients
// (rows no other band writes) and keeps its padded rows above and below the image in p.pads_*,
// folded once every band is done (they read into rows of other bands).
// p's gradient sums of a chunk at j0 added into the value and range planes v0 and r0 (channel
// stride PQ; either may be absent) and its sigma sums into the row's, and all of them cleared.
template <typename T>
BO_ALWAYS_INLINE void add_grads(T* v0, T* r0, int64_t j0, int64_t PQ, int64_t nc, int64_t ng, vec_t<T>* vacc,
                                vec_t<T>* racc, bool row_sigma, vec_t<T>& sd, vec_t<T>& sy, vec_t<T>& sx,
                                double& row_d, double& row_y, double& row_x) {
  if (v0 != nullptr) {
    for (int64_t c = 0; c < nc; ++c) vstore(v0 + c * PQ + j0, vload(v0 + c * PQ + j0) + vacc[c]);
  }
  if (r0 != nullptr) {
    for (int64_t c = 0; c < ng; ++c) vstore(r0 + c * PQ + j0, vload(r0 + c * PQ + j0) + racc[c]);
  }
  for (int64_t c = 0; c < nc; ++c) vacc[c] = vec_t<T>{};
  for (int64_t c = 0; c < ng; ++c) racc[c] = vec_t<T>{};
  if (row_sigma) {
    row_d += vsum<T>(sd);
    row_y += vsum<T>(sy);
    row_x += vsum<T>(sx);
    sd = sy = sx = vec_t<T>{};
  }
}

template <typename T, int CC, int CG, int DIST, bool SELF, bool VALUE, bool RANGE, bool STAGE>
BO_ALWAYS_INLINE void pass2_band(const Args<T>& p, int64_t t, Scratch<T>& s) {
  constexpr int64_t V = vec_width<T>();
  const int64_t nc = count<CC>(p.C), ng = count<CG>(p.Cg);
  const int64_t Ws = p.Ws, Wx = p.Wx;
  const int64_t PS = p.PS, PX = p.PX, PB = band_plane_rows(p) * Ws, SW = (p.py + 1) * Ws;  // channel strides
  Accs<vec_t<T>, CC> gpp_l, inp_l, vacc_l, gpq_l;
  Accs<vec_t<T>, CG> gdp_l, gq_l, d_l, racc_l;
  vec_t<T>* v = s.template v<vec_t<T>>();
  vec_t<T>* gpp = CC > 0 ? gpp_l.v : v;              // gp at p
  vec_t<T>* inp = CC > 0 ? inp_l.v : v + p.C;        // input at p (joint)
  vec_t<T>* vacc = CC > 0 ? vacc_l.v : v + 2 * p.C;  // p's value (+ range when self) gradient
  vec_t<T>* gpq = CC > 0 ? gpq_l.v : v + 3 * p.C;    // gp at q
  vec_t<T>* gdp = CG > 0 ? gdp_l.v : v + 4 * p.C;    // guidance at p
  vec_t<T>* gq = CG > 0 ? gq_l.v : v + 4 * p.C + p.Cg;  // guidance at q
  vec_t<T>* d = CG > 0 ? d_l.v : v + 4 * p.C + 2 * p.Cg;  // guidance at q minus at p, then q's range term
  vec_t<T>* racc = CG > 0 ? racc_l.v : v + 4 * p.C + 3 * p.Cg;  // p's range gradient (joint)
  const bool sigma = p.rows != nullptr, pair_terms = RANGE || sigma;
  // The runtime-count instantiation serves self-guided images too (SELF is only a shortcut).
  const bool self = SELF || (CC == 0 && p.self);
  const BandRows band(p, t, p.nb2, p.Hp);
  const int64_t n = band.n, R0 = band.R0, R1 = band.R1, L0 = band.L0;
  // The planes: value (+ range when self) gradients, then the guidance's range gradients (joint).
  T* vband = p.gin != nullptr ? s.band : nullptr;
  T* rband = p.ggd != nullptr ? s.band + p.C * PB : nullptr;
  if (vband != nullptr) std::fill(vband, vband + p.C * PB, T(0));
  if (rband != nullptr) std::fill(rband, rband + p.Cg * PB, T(0));
  const vec_t<T> nrc2 = vsplat<T>(static_cast<T>(-p.rc[n] * kLog2e)), lo = vopaque<T>(T(kExp2Floor));
  // h = -rc w (e_pq + e_qp) times dD/dG_q: 2 d for l2, 2 acc sign(d) for l1; the 2 goes here.
  const vec_t<T> n2rc = vsplat<T>(T(-2) * p.rc[n]);
  const T* ss = p.ss + n * p.ky * p.kx;
  for (int64_t x0t = 0; x0t < p.Wp; x0t += kTile) {
    for (int64_t R = std::max<int64_t>(0, L0); R < R1; ++R) {
      const int64_t dy_min = std::max<int64_t>(0, R0 - R);    // rows above: only pairs reaching the band
      const int64_t dy_max = std::min<int64_t>(p.py, p.Hp - 1 - R);  // q inside the padded image
      const bool row_sigma = sigma && R >= R0;
      const T* gd0 = p.gd_row(0, R);
      const T* in0 = p.in_row(0, R);
      const T* gp0 = p.gp + n * p.gp_is + (R - p.crow0) * Wx + p.xoff - p.px;  // indexed by padded column
      const T* a0 = p.a + n * p.a_is + (R - p.crow0) * Wx + p.xoff - p.px;
      // Large windows: this row's pairs go into the staging rows (value planes, then range planes),
      // then into the band (Offsets).
      T* v0 = vband == nullptr ? nullptr : (STAGE ? s.stage : vband + (R - L0) * Ws) + p.margin;
      T* r0 = rband == nullptr ? nullptr : (STAGE ? s.stage + p.C * SW : rband + (R - L0) * Ws) + p.margin;
      const int64_t PQ = STAGE ? SW : PB;  // their channel stride
      const int64_t x1t = std::min(p.Wp, x0t + kTile);
      double row_d = 0, row_y = 0, row_x = 0;
      Reach reach;
      for (int64_t j0 = x0t; j0 < x1t; j0 += V) {
        for (int64_t c = 0; c < nc; ++c) {
          gpp[c] = vload(gp0 + c * PX + j0);
          if (!SELF) inp[c] = vload(in0 + c * PS + j0);
          vacc[c] = VALUE ? gpp[c] : vec_t<T>{};  // the centre tap: w = 1, no range term
        }
        for (int64_t c = 0; c < ng; ++c) {
          gdp[c] = vload(gd0 + c * PS + j0);
          racc[c] = vec_t<T>{};
        }
        const vec_t<T> ap = vload(a0 + j0);
        vec_t<T> sd{}, sy{}, sx{};
        const Offsets o = pair_offsets(p, R, j0, V, dy_min, dy_max);
        reach.add(o, j0, V);
        int64_t held = 0;  // pairs in p's sums since they were last added (large windows)
        for (int64_t dx = o.dx0; dx <= o.dx1; ++dx) {
          const T fx = static_cast<T>(dx * dx);
          const int64_t dy0 = std::max<int64_t>(dx > 0 ? 0 : 1, o.dy0);
          for (int64_t dy = dy0; dy <= o.dy1; ++dy) {
            const int64_t os = dy * Ws + dx + j0, ox = dy * Wx + dx + j0;
            vec_t<T> dist;
            const vec_t<T> w = pair_weight<T, CG, DIST>(gd0, PS, os, gdp, ng, nrc2, ss[(dy + p.py) * p.kx + dx + p.px],
                                                        lo, gq, d, &dist);
  #pragma GCC unroll 4
            for (int64_t c = 0; c < nc; ++c) gpq[c] = vload(gp0 + c * PX + ox);
            if (pair_terms) {
              vec_t<T> e = -(ap + vload(a0 + ox));
  #pragma GCC unroll 4
              for (int64_t c = 0; c < nc; ++c) {
                e += gpp[c] * (SELF ? gq[c] : vload(in0 + c * PS + os));
                e += gpq[c] * (SELF ? gdp[c] : inp[c]);
              }
              const vec_t<T> ew = e * w;
              if (row_sigma) {
                const vec_t<T> D = DIST == kL1 ? dist * dist : dist;
                sd += ew * D;
                sx += ew * fx;
                sy += ew * static_cast<T>(dy * dy);
              }
              if (RANGE) {
                const vec_t<T> h = DIST == kL1 ? n2rc * ew * dist : n2rc * ew;
  #pragma GCC unroll 4
                for (int64_t c = 0; c < ng; ++c) {
                  d[c] = h * (DIST == kL1 ? vsign<T>(d[c]) : d[c]);  // q's range term; p's is -d
                  if (!self) {
                    racc[c] -= d[c];
                    T* q = r0 + c * PQ + os;
                    vstore(q, vload(q) + d[c]);
                  }
                }
              }
            }
            if (VALUE || (RANGE && self)) {
  #pragma GCC unroll 4
              for (int64_t c = 0; c < nc; ++c) {
                vec_t<T> qv, pv;
                if (VALUE && RANGE && self) {
                  qv = w * gpp[c] + d[c];
                  pv = w * gpq[c] - d[c];
                } else if (VALUE) {
                  qv = w * gpp[c];
                  pv = w * gpq[c];
                } else {
                  qv = d[c];
                  pv = -d[c];
                }
                vacc[c] += pv;  // summed before meeting vacc: one add a pair on its chain
                T* q = v0 + c * PQ + os;
                vstore(q, vload(q) + qv);
              }
            }
          }
          if (STAGE && (held += o.dy1 - dy0 + 1) >= p.flush) {
            add_grads(v0, r0, j0, PQ, nc, ng, vacc, racc, row_sigma, sd, sy, sx, row_d, row_y, row_x);
            held = 0;
          }
        }
        add_grads(v0, r0, j0, PQ, nc, ng, vacc, racc, row_sigma, sd, sy, sx, row_d, row_y, row_x);
      }
      if (STAGE) {
        if (vband != nullptr) fold_stage(p, s.stage, SW, vband + (R - L0) * Ws, PB, p.C, reach);
        if (rband != nullptr) fold_stage(p, s.stage + p.C * SW, SW, rband + (R - L0) * Ws, PB, p.Cg, reach);
      }
      if (row_sigma) {
        double* out = p.rows + 3 * (n * p.Hp + R);
        if (x0t == 0) out[0] = out[1] = out[2] = 0;
        out[0] += row_d;
        out[1] += row_y;
        out[2] += row_x;
      }
    }
  }
  // The band's rows: image rows folded into the image gradients, padded rows kept for later.
  const auto keep = [&](const T* planes, int64_t Cx, T* img, T* pads) {
    if (planes == nullptr) return;
    for (int64_t R = R0; R < R1; ++R) {
      for (int64_t c = 0; c < Cx; ++c) {
        const T* prow = planes + c * PB + (R - L0) * Ws + p.margin;
        if (R >= p.py && R < p.py + p.H) {
          fold_row(p, prow, img + ((n * Cx + c) * p.H + R - p.py) * p.W, true);
        } else {
          const int64_t k = R < p.py ? R : R - p.H;  // the padded row's index in pads
          std::copy(prow, prow + p.Wp, pads + ((n * Cx + c) * 2 * p.py + k) * p.Wp);
        }
      }
    }
  };
  keep(vband, p.C, p.gin, p.pads_in);
  keep(rband, p.Cg, p.ggd, p.pads_gd);
}

template <typename T, int CC, int CG, int DIST, bool SELF, bool STAGE>
BO_ALWAYS_INLINE void pass2_as(const Args<T>& p, int64_t t, Scratch<T>& s) {
  if (p.need_value && p.need_range) {
    pass2_band<T, CC, CG, DIST, SELF, true, true, STAGE>(p, t, s);
  } else if (p.need_value) {
    pass2_band<T, CC, CG, DIST, SELF, true, false, STAGE>(p, t, s);
  } else if (p.need_range) {
    pass2_band<T, CC, CG, DIST, SELF, false, true, STAGE>(p, t, s);
  } else {
    pass2_band<T, CC, CG, DIST, SELF, false, false, STAGE>(p, t, s);
  }
}

// Staged sums (large windows) as their own instantiations, as in sums_band (a runtime test in
// the pair loop cost the k = 9 backward ~5 %).
template <typename T, int CC, int CG, int DIST, bool SELF>
BO_ALWAYS_INLINE void pass2_any(const Args<T>& p, int64_t t, Scratch<T>& s) {
  if (p.stage) {
    pass2_as<T, CC, CG, DIST, SELF, true>(p, t, s);
  } else {
    pass2_as<T, CC, CG, DIST, SELF, false>(p, t, s);
  }
}

// The task function of this instruction set: the runtime configuration branches once into fully
// inlined instantiations.
template <typename T, int CC, int CG, int DIST, bool SELF>
BO_ALWAYS_INLINE void run_pass(Pass pass, const Args<T>& p, int64_t t, Scratch<T>& s) {
  switch (pass) {
    case Pass::kForward:
      return forward_band<T, CC, CG, DIST, SELF>(p, t, s);
    case Pass::kPass1:
      return pass1_band<T, CC, CG, DIST, SELF>(p, t, s);
    case Pass::kPass2:
      return pass2_any<T, CC, CG, DIST, SELF>(p, t, s);
  }
}

template <typename T, int DIST>
BO_ALWAYS_INLINE void run_channels(Pass pass, const Args<T>& p, int64_t t, Scratch<T>& s) {
  if constexpr (std::is_same<T, float>::value) {
    // Self-guided: RGB, grey, two channels (a flow field, a pair of masks), RGBA.
    if (p.self && p.C == 3) return run_pass<T, 3, 3, DIST, true>(pass, p, t, s);
    if (p.self && p.C == 1) return run_pass<T, 1, 1, DIST, true>(pass, p, t, s);
    if (p.self && p.C == 2) return run_pass<T, 2, 2, DIST, true>(pass, p, t, s);
    if (p.self && p.C == 4) return run_pass<T, 4, 4, DIST, true>(pass, p, t, s);
    if (!p.self && p.C == 3 && p.Cg == 1) return run_pass<T, 3, 1, DIST, false>(pass, p, t, s);
    if (!p.self && p.C == 3 && p.Cg == 3) return run_pass<T, 3, 3, DIST, false>(pass, p, t, s);
    // A flow field guided by its RGB frame.
    if (!p.self && p.C == 2 && p.Cg == 3) return run_pass<T, 2, 3, DIST, false>(pass, p, t, s);
    // A grey image (a depth map, a mask) guided by an RGB one (joint upsampling), a grey one, or
    // any image: its sums in registers, the guidance's channels fixed or counted at run time.
    if (!p.self && p.C == 1 && p.Cg == 3) return run_pass<T, 1, 3, DIST, false>(pass, p, t, s);
    if (!p.self && p.C == 1 && p.Cg == 1) return run_pass<T, 1, 1, DIST, false>(pass, p, t, s);
    if (!p.self && p.C == 1) return run_pass<T, 1, 0, DIST, false>(pass, p, t, s);
  }
  run_pass<T, 0, 0, DIST, false>(pass, p, t, s);
}

template <typename T>
void filter_task(Pass pass, const Args<T>& p, int64_t t, Scratch<T>& s) {
  if (p.distance == kL1) {
    run_channels<T, kL1>(pass, p, t, s);
  } else {
    run_channels<T, kL2>(pass, p, t, s);
  }
}

// This copy's task functions (bilateral_filter_cpu.h declares them), made here, under the copy's
// target options.
template void filter_task<float>(Pass, const Args<float>&, int64_t, Scratch<float>&);
template void filter_task<double>(Pass, const Args<double>&, int64_t, Scratch<double>&);

}  // namespace BO_ISA_NS
