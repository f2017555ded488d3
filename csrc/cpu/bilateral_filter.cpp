// CPU kernels of bilateral_filter and _bilateral_filter_backward (csrc/ops.cpp has the schemas,
// csrc/include/bilateral_ops/bilateral_filter.h the per-pixel math).
//
// Input and guidance are copied once into padded planes (the border handled by index maps, with
// zero margins wide enough that every vector load of a tap stays inside its row), so the loops are
// branch-free and process chunks of vec_width pixels of one row. Memory is O(image) in both
// passes, never O(image * taps).
//
// The weight is symmetric, w_pq = w_qp (the spatial exponent is even in the offset s = q - p, the
// colour distance symmetric), so both passes sweep each unordered pair {p, q = p + s} of padded
// positions once, s in the half window S+ (dy > 0, or dy = 0 and dx > 0), and one exponential
// serves both directions: p's terms are summed in registers, q's added in memory. A centre
// outside the image contributes nothing (its terms are zero or discarded), and every pair of a
// pixel's window lies in the padded domain.
// Forward (sums_band): W_p = sum_q w_pq and sum_q w_pq I_q per pixel, in bands of Bh rows, each
// with its own planes (see there), then out = sum / W.
//
// Backward, with W_p = sum_q w_pq and g the output gradient:
//   pass 1, per centre p (the forward's sweep): gp_p = g_p / W_p and a_p = gp_p . out_p, into
//   planes that are zero outside the image;
//   pass 2, per unordered pair:
//     value:  gI_q += w gp_p,  gI_p += w gp_q;
//     range:  e_pq = gp_p . I_q - a_p (= dL/dw_pq) and e_qp likewise; with h = -rc w (e_pq + e_qp),
//             gG_q += h dD/dG_q and gG_p += h dD/dG_p = -h dD/dG_q;
//     sigmas: per-row sums of w (e_pq + e_qp) times D, dy^2 and dx^2.
//   A gather per centre would evaluate each weight twice (once per direction), and once more in
//   pass 1. Pass 2 runs in bands of rows of p that, like the sums pass's, also sweep the pairs
//   reaching into them from above, so each band completes its rows' gradients alone and folds
//   them (each padded position adds into the pixel it reads) into its image rows; the padded rows
//   above and below the image, which read into other bands' rows, are folded last, in row order.
// Every sum has a fixed order (the band height does not depend on the thread count; rows summed
// in row order per image): results are deterministic whatever the thread count.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
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
// double: libm's exp2 per lane, as the float64 contract is 1e-10.

constexpr double kLog2e = 1.44269504088896340736;

// The clamp's bound (-86 in natural units), passed as lo = vopaque(kExp2Floor) (simd.h): the
// clamp is then one max.
constexpr float kExp2Floor = static_cast<float>(-86.0 * kLog2e);

template <typename T>
BO_ALWAYS_INLINE vec_t<T> vexp2(vec_t<T> t, vec_t<T> lo);

template <>
BO_ALWAYS_INLINE vec_t<float> vexp2<float>(vec_t<float> t, vec_t<float> lo) {
  using V = vec_t<float>;
  using I = VecOf<float>::mask;
  const V t_in = t;
  t = lo > t ? lo : t;  // NaN passes through as NaN
  // 2^t = 2^n 2^f with n = round(t), |f| <= 1/2: adding 1.5 * 2^23 rounds to an integer held in
  // the low mantissa bits: the bits of m are those of 1.5 * 2^23 (0x4B400000) plus n.
  const V magic = vsplat<float>(12582912.0f);
  const V m = t + magic;
  const V f = t - (m - magic);
  I n_shifted;  // n << 23: 0x4B400000 << 23 is 0 modulo 2^32, so the bits of m shifted will do
  __builtin_memcpy(&n_shifted, &m, sizeof(n_shifted));
  n_shifted <<= 23;
  V p = vsplat<float>(1.3264708791e-3f);
  p = p * f + 9.6715114712e-3f;
  p = p * f + 5.5507337765e-2f;
  p = p * f + 2.4022242104e-1f;
  p = p * f + 6.9314697759e-1f;
  p = p * f + 1.0f;
  I bits;
  __builtin_memcpy(&bits, &p, sizeof(bits));
  bits += n_shifted;
  V out;
  __builtin_memcpy(&out, &bits, sizeof(out));
  return t_in < lo ? V{} : out;
}

template <>
BO_ALWAYS_INLINE vec_t<double> vexp2<double>(vec_t<double> t, vec_t<double>) {
  for (int i = 0; i < 4; ++i) t[i] = std::exp2(t[i]);
  return t;
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
// any chunk, tails included, stays in its row. Centre planes (gp, a): one row per padded row
// (rows outside the image zero), rows of Wx values, pixel x at x + xoff, zero outside the image,
// so that pass 2 reads zeros for centres outside the image. Band planes (per worker, the sums and
// pass 2's gradients of one band at a time): Bh + 2 py rows of Ws values, padded row R0 - py + i at
// row i.

template <typename T>
struct Args {
  int64_t N, C, Cg, H, W, ky, kx, py, px, Hp, Wp;
  int64_t margin, Ws;   // padded planes
  int64_t xoff, Wx;     // centre planes
  int64_t PH;           // padded rows 0 .. PH - 1 = py + H - 1 hold the image rows and those above
  int64_t Bh, nb, nb2;  // band height (>= py, not derived from the thread count); bands per image
                        // of the sums pass (rows 0 .. PH - 1) and of pass 2 (all Hp rows)
  int distance, border;
  bool self;
  const T* in;          // (N, C, Hp, Ws)
  const T* gd;          // (N, Cg, Hp, Ws); == in when self
  const T* rc;          // (N,) 0.5 / sigma_color^2
  const T* ss;          // (N, ky * kx) spatial exponents, base 2 (times log2 e)
  T* out;               // forward: (N, C, H, W)
  // Backward.
  const T* go;          // (N, C, H, W)
  T* gp;                // (N, C, Hp, Wx) g / W
  T* a;                 // (N, Hp, Wx) gp . out
  double* rows;         // (N * Hp, 3) per-row sums for the sigma gradients (or nullptr)
  T* gin;               // (N, C, H, W) input gradient: value (+ range when self) (or nullptr)
  T* ggd;               // (N, Cg, H, W) guidance gradient (joint; or nullptr)
  T* pads_in;           // (N, C, 2 py, Wp) the input gradient's padded rows above and below the image
  T* pads_gd;           // (N, Cg, 2 py, Wp) the guidance's
  const int64_t* xmap;  // (Wp,) the image column each padded column reads (-1: none)
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

// Per-task scratch, allocated once per parallel_for task (never per pixel): the vectors of runtime
// channel counts (pass 2 needs the most: 4 per input and 4 per guidance channel) and a band's
// planes.
// std::vector does not honour the 32-byte alignment of vec_t under every ABI setting, and the
// compiler uses aligned moves on these arrays: allocate them explicitly aligned.
template <typename T>
struct Scratch {
  vec_t<T>* vbuf;
  T* band = nullptr;  // a band's planes
  Scratch(int64_t C, int64_t Cg, int64_t band_elems) {
    const size_t bytes = sizeof(vec_t<T>) * static_cast<size_t>(4 * (C + Cg));
    vbuf = static_cast<vec_t<T>*>(std::aligned_alloc(kVecBytes, bytes));
    TORCH_CHECK(vbuf != nullptr, "bilateral_filter: out of memory for ", bytes, " bytes of scratch");
    if (band_elems > 0) {
      const size_t band_bytes = (sizeof(T) * static_cast<size_t>(band_elems) + kVecBytes - 1) / kVecBytes * kVecBytes;
      band = static_cast<T*>(std::aligned_alloc(kVecBytes, band_bytes));
      TORCH_CHECK(band != nullptr, "bilateral_filter: out of memory for ", band_bytes, " bytes of scratch");
    }
  }
  ~Scratch() {
    std::free(vbuf);
    std::free(band);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  vec_t<T>* v() { return vbuf; }
};

// The pair sweeps run over a band in column tiles of kTile padded columns, all of the band's rows
// a tile at a time: the rows a chunk reaches (py + 1 rows of every plane it reads and of the band
// planes it updates) then stay in L1/L2 however wide the image (a 1080p row of 5 planes x 5
// rows is ~200 KB). A multiple of every vector width.
constexpr int64_t kTile = 128;

// Whether this CPU has the 32 vector registers sum_chunks<..., J = 2> needs.
inline bool has_avx512() {
#if defined(__GNUC__) && defined(__x86_64__)
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
  return yes;
#else
  return false;
#endif
}

// The sums pass for J neighbouring chunks j0, j0 + V, ... of row gd0 / in0 (planes s0): see
// sums_band. Two chunks (J = 2, fixed channel counts, AVX-512's 32 registers) put two
// independent weight chains side by side in program order.
template <typename T, int CC, int CG, int DIST, bool SELF, int J>
BO_ALWAYS_INLINE void sum_chunks(const Args<T>& p, const T* gd0, const T* in0, T* s0, int64_t j0, int64_t dy_min,
                                 int64_t PL, vec_t<T> nrc2, vec_t<T> lo, const T* ss, vec_t<T>* v) {
  constexpr int64_t V = vec_width<T>();
  const int64_t nc = count<CC>(p.C), ng = count<CG>(p.Cg);
  const int64_t Ws = p.Ws, PS = p.Hp * Ws;
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
  for (int64_t dx = -p.px; dx <= p.px; ++dx) {
    for (int64_t dy = std::max<int64_t>(dx > 0 ? 0 : 1, dy_min); dy <= p.py; ++dy) {
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
  }
  for (int j = 0; j < J; ++j) {
    T* o = s0 + j0 + j * V;
    for (int64_t c = 0; c < nc; ++c) vstore(o + c * PL, vload(o + c * PL) + acc[j * nc + c]);
    vstore(o + nc * PL, vload(o + nc * PL) + wsum[j]);
  }
}

// Rows of a band's planes (sums pass and pass 2): a band of padded rows R0 .. R1 - 1 keeps py
// rows above and below its own.
template <typename T>
int64_t band_plane_rows(const Args<T>& p) {
  return p.Bh + 2 * p.py;
}

// Band t of a sweep with `per_image` bands of Bh padded rows over rows 0 .. end - 1 of each
// image: its image n and its own rows R0 .. R1 - 1; L0 = R0 - py is its planes' first row.
struct BandRows {
  int64_t n, R0, R1, L0;
  template <typename T>
  BandRows(const Args<T>& p, int64_t t, int64_t per_image, int64_t end)
      : n(t / per_image), R0(t % per_image * p.Bh), R1(std::min(R0 + p.Bh, end)), L0(R0 - p.py) {}
};

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
// inherit its enclosing function's target_clones: the sinks must be inlined (BO_LAMBDA_INLINE),
// or they run as baseline code with another vector ABI.
template <typename T, int CC, int CG, int DIST, bool SELF, class Sink>
BO_ALWAYS_INLINE void sums_band(const Args<T>& p, int64_t t, Scratch<T>& s, Sink&& sink) {
  constexpr int64_t V = vec_width<T>();
  const int64_t nc = count<CC>(p.C), ng = count<CG>(p.Cg);
  const int64_t Ws = p.Ws, PS = p.Hp * Ws, PL = band_plane_rows(p) * Ws;
  Accs<T, CC> acc_l;
  vec_t<T>* v = s.v();
  vec_t<T>* acc = CC > 0 ? acc_l.v : v;  // the band's sums handed to the sink
  [[maybe_unused]] const bool pairs = has_avx512();
  const BandRows band(p, t, p.nb, p.PH);
  const int64_t n = band.n, R0 = band.R0, R1 = band.R1, L0 = band.L0;
  std::fill(s.band, s.band + (nc + 1) * PL, T(0));
  const vec_t<T> nrc2 = vsplat<T>(static_cast<T>(-p.rc[n] * kLog2e)), lo = vopaque<T>(T(kExp2Floor));
  const T* ss = p.ss + n * p.ky * p.kx;
  for (int64_t x0t = 0; x0t < p.Wp; x0t += kTile) {
    for (int64_t R = std::max<int64_t>(0, L0); R < R1; ++R) {
      const int64_t dy_min = std::max<int64_t>(0, R0 - R);  // rows above: only pairs reaching the band
      const T* gd0 = p.gd_row(n, 0, R);
      const T* in0 = p.in_row(n, 0, R);
      T* s0 = s.band + (R - L0) * Ws + p.margin;
      const int64_t x1t = std::min(p.Wp, x0t + kTile);
      int64_t j0 = x0t;
      if constexpr (CC > 0 && CG > 0) {
        for (; pairs && j0 + V < x1t; j0 += 2 * V) {
          sum_chunks<T, CC, CG, DIST, SELF, 2>(p, gd0, in0, s0, j0, dy_min, PL, nrc2, lo, ss, v);
        }
      }
      for (; j0 < x1t; j0 += V) sum_chunks<T, CC, CG, DIST, SELF, 1>(p, gd0, in0, s0, j0, dy_min, PL, nrc2, lo, ss, v);
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

template <typename T, int CC, int CG, int DIST, bool SELF>
BO_ALWAYS_INLINE void forward_band(const Args<T>& p, int64_t t, Scratch<T>& s) {
  const int64_t nc = count<CC>(p.C);
  sums_band<T, CC, CG, DIST, SELF>(p, t, s, [&](int64_t n, int64_t y, int64_t x0, const vec_t<T>* acc,
                                                const vec_t<T>& wsum) BO_LAMBDA_INLINE {
    const vec_t<T> inv = T(1) / wsum;
    for (int64_t c = 0; c < nc; ++c) store_tail(p.out + ((n * p.C + c) * p.H + y) * p.W, x0, p.W, acc[c] * inv);
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

// Adds (or, assign, writes) padded row prow's gradient into image row drow: each padded column
// adds into the pixel it reads (xmap), the interior first, then the left and right borders.
template <typename T>
BO_ALWAYS_INLINE void fold_row(const Args<T>& p, const T* prow, T* drow, bool assign) {
  if (assign) {
    std::copy(prow + p.px, prow + p.px + p.W, drow);
  } else {
    for (int64_t x = 0; x < p.W; ++x) drow[x] += prow[x + p.px];
  }
  for (int64_t j = 0; j < p.px; ++j) {
    if (p.xmap[j] >= 0) drow[p.xmap[j]] += prow[j];
  }
  for (int64_t j = p.W + p.px; j < p.Wp; ++j) {
    if (p.xmap[j] >= 0) drow[p.xmap[j]] += prow[j];
  }
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
template <typename T, int CC, int CG, int DIST, bool SELF, bool VALUE, bool RANGE>
BO_ALWAYS_INLINE void pass2_band(const Args<T>& p, int64_t t, Scratch<T>& s) {
  constexpr int64_t V = vec_width<T>();
  const int64_t nc = count<CC>(p.C), ng = count<CG>(p.Cg);
  const int64_t Ws = p.Ws, Wx = p.Wx;
  const int64_t PS = p.Hp * Ws, PX = p.Hp * Wx, PB = band_plane_rows(p) * Ws;  // channel strides
  Accs<T, CC> gpp_l, inp_l, vacc_l, gpq_l;
  Accs<T, CG> gdp_l, gq_l, d_l, racc_l;
  vec_t<T>* v = s.v();
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
      const T* gd0 = p.gd_row(n, 0, R);
      const T* in0 = p.in_row(n, 0, R);
      const T* gp0 = p.gp + (n * p.C * p.Hp + R) * Wx + p.xoff - p.px;  // indexed by padded column
      const T* a0 = p.a + (n * p.Hp + R) * Wx + p.xoff - p.px;
      T* v0 = vband != nullptr ? vband + (R - L0) * Ws + p.margin : nullptr;
      T* r0 = rband != nullptr ? rband + (R - L0) * Ws + p.margin : nullptr;
      double row_d = 0, row_y = 0, row_x = 0;
      for (int64_t j0 = x0t; j0 < std::min(p.Wp, x0t + kTile); j0 += V) {
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
        for (int64_t dx = -p.px; dx <= p.px; ++dx) {
          const T fx = static_cast<T>(dx * dx);
          for (int64_t dy = std::max<int64_t>(dx > 0 ? 0 : 1, dy_min); dy <= dy_max; ++dy) {
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
                    T* q = r0 + c * PB + os;
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
                T* q = v0 + c * PB + os;
                vstore(q, vload(q) + qv);
              }
            }
          }
        }
        if (v0 != nullptr) {
          for (int64_t c = 0; c < nc; ++c) vstore(v0 + c * PB + j0, vload(v0 + c * PB + j0) + vacc[c]);
        }
        if (RANGE && r0 != nullptr) {
          for (int64_t c = 0; c < ng; ++c) vstore(r0 + c * PB + j0, vload(r0 + c * PB + j0) + racc[c]);
        }
        if (row_sigma) {
          row_d += vsum<T>(sd);
          row_y += vsum<T>(sy);
          row_x += vsum<T>(sx);
        }
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

template <typename T, int CC, int CG, int DIST, bool SELF>
BO_ALWAYS_INLINE void pass2_any(const Args<T>& p, int64_t t, Scratch<T>& s) {
  if (p.need_value && p.need_range) {
    pass2_band<T, CC, CG, DIST, SELF, true, true>(p, t, s);
  } else if (p.need_value) {
    pass2_band<T, CC, CG, DIST, SELF, true, false>(p, t, s);
  } else if (p.need_range) {
    pass2_band<T, CC, CG, DIST, SELF, false, true>(p, t, s);
  } else {
    pass2_band<T, CC, CG, DIST, SELF, false, false>(p, t, s);
  }
}

// Task functions: one copy per instruction set (BO_TARGET_CLONES); the runtime configuration
// branches once into fully inlined instantiations.
enum class Pass { kForward, kPass1, kPass2 };

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
    if (p.self && p.C == 3) return run_pass<T, 3, 3, DIST, true>(pass, p, t, s);
    if (p.self && p.C == 1) return run_pass<T, 1, 1, DIST, true>(pass, p, t, s);
    if (!p.self && p.C == 3 && p.Cg == 1) return run_pass<T, 3, 1, DIST, false>(pass, p, t, s);
    if (!p.self && p.C == 3 && p.Cg == 3) return run_pass<T, 3, 3, DIST, false>(pass, p, t, s);
  }
  run_pass<T, 0, 0, DIST, false>(pass, p, t, s);
}

BO_TARGET_CLONES void filter_task_f32(Pass pass, const Args<float>& p, int64_t t, Scratch<float>& s) {
  if (p.distance == kL1) {
    run_channels<float, kL1>(pass, p, t, s);
  } else {
    run_channels<float, kL2>(pass, p, t, s);
  }
}

BO_TARGET_CLONES void filter_task_f64(Pass pass, const Args<double>& p, int64_t t, Scratch<double>& s) {
  if (p.distance == kL1) {
    run_channels<double, kL1>(pass, p, t, s);
  } else {
    run_channels<double, kL2>(pass, p, t, s);
  }
}

void filter_task(Pass pass, const Args<float>& p, int64_t t, Scratch<float>& s) {
  filter_task_f32(pass, p, t, s);
}
void filter_task(Pass pass, const Args<double>& p, int64_t t, Scratch<double>& s) {
  filter_task_f64(pass, p, t, s);
}

// Every pass runs over bands (N * nb of them), handed out one at a time from a shared counter
// rather than split in equal ranges up front: on a machine whose cores do not run at the same
// speed (a sibling hyperthread busy, another tenant) no core then waits on the slowest one's
// share. A band's results do not depend on which thread computes them, so they stay
// deterministic.
template <typename T>
void run_bands(Pass pass, const Args<T>& p) {
  const int64_t bands = p.N * (pass == Pass::kPass2 ? p.nb2 : p.nb);
  const int64_t band_elems = (p.C + p.Cg + 1) * band_plane_rows(p) * p.Ws;  // either pass's planes
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), bands);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    Scratch<T> s(p.C, p.Cg, band_elems);
    for (int64_t t = next++; t < bands; t = next++) filter_task(pass, p, t, s);
  });
}

// ---------------------------------------------------------------------------------------------
// Host side: padded copies, sigma tables, the fold.

constexpr int64_t kVecMax = 8;

// (N, Cx, H, W) -> (N, Cx, Hp, Ws) padded planes in dtype T, margins zero; xmap[j] is the image
// column padded column j reads (-1: none).
template <typename T>
at::Tensor pad_planes(const at::Tensor& src_in, const FilterShape& s, int64_t margin, int64_t Ws,
                      const std::vector<int64_t>& xmap) {
  const at::Tensor src = src_in.to(c10::CppTypeToScalarType<T>::value).contiguous();
  const int64_t Cx = src.size(1), Hp = s.H + 2 * s.py, Wp = s.W + 2 * s.px;
  // Not at::zeros: each row writes its own margins, in parallel (first-touching fresh pages in one
  // serial fill costs more than the filter on small images).
  at::Tensor dst = at::empty({s.N, Cx, Hp, Ws}, src.options());
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

// Zeroes the centre planes (gp, a) outside the image, which pass 1 does not write: the padded rows
// above and below, and each row's columns left and right of it.
template <typename T>
void clear_outside(const Args<T>& a) {
  at::parallel_for(0, a.N * a.Hp, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / a.Hp, R = r % a.Hp;
      const bool inside = R >= a.py && R < a.py + a.H;
      for (int64_t c = 0; c <= a.C; ++c) {
        T* row = c < a.C ? a.gp + ((n * a.C + c) * a.Hp + R) * a.Wx : a.a + r * a.Wx;
        if (inside) {
          std::fill(row, row + a.xoff, T(0));
          std::fill(row + a.xoff + a.W, row + a.Wx, T(0));
        } else {
          std::fill(row, row + a.Wx, T(0));
        }
      }
    }
  });
}

// Folds pass 2's padded rows above and below the image (p.pads_*) into the image gradients dst
// (N, Cx, H, W), in row order, after the bands have written the image rows.
template <typename T>
void fold_pads(const Args<T>& a, const T* pads, T* dst, int64_t Cx) {
  at::parallel_for(0, a.N * Cx, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t k = 0; k < 2 * a.py; ++k) {
        const int64_t R = k < a.py ? k : k + a.H;
        const int64_t y = border_index(R - a.py, a.H, a.border);
        if (y >= 0) fold_row(a, pads + (i * 2 * a.py + k) * a.Wp, dst + (i * a.H + y) * a.W, false);
      }
    }
  });
}

// Everything both passes share: padded planes, the per-image sigma tables, and the Args.
template <typename T>
struct Prepared {
  at::Tensor in_pad, gd_pad, rc, ss;
  std::vector<int64_t> xmap;  // the padding's column map, for pad_planes and pass 2's fold
  Args<T> a{};                 // points into the members above: not copyable

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
    a.PH = s.py + s.H;
    // A fixed height (not derived from the thread count) keeps the sums' order fixed.
    a.Bh = std::max<int64_t>(32, s.py);
    a.nb = (a.PH + a.Bh - 1) / a.Bh;
    a.nb2 = (a.Hp + a.Bh - 1) / a.Bh;
    a.border = s.border;
    a.distance = s.distance;
    a.self = s.self;
    xmap.resize(a.Wp);
    for (int64_t j = 0; j < a.Wp; ++j) xmap[j] = border_index(j - s.px, s.W, s.border);
    a.xmap = xmap.data();
    in_pad = pad_planes<T>(input, s, a.margin, a.Ws, xmap);
    gd_pad = s.self ? in_pad : pad_planes<T>(*guidance, s, a.margin, a.Ws, xmap);
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
              spatial_exponent<T>(ty - s.py, tx - s.px, spp[2 * n], spp[2 * n + 1]) * static_cast<T>(kLog2e);
        }
      }
    }
    a.ss = ssp;
  }

  Prepared(const Prepared&) = delete;
  Prepared& operator=(const Prepared&) = delete;
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
    run_bands(Pass::kForward, prep.a);
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
    at::Tensor gp = at::empty({s.N, s.C, a.Hp, a.Wx}, opt);  // pass 1 writes every column
    at::Tensor av = at::empty({s.N, a.Hp, a.Wx}, opt);
    a.gp = gp.data_ptr<T>();
    a.a = av.data_ptr<T>();
    clear_outside<T>(a);
    run_bands(Pass::kPass1, a);

    // Pass 2 writes every row of the image gradients and of the padded rows.
    at::Tensor gi = mask[0] ? at::empty({s.N, s.C, s.H, s.W}, opt) : at::Tensor();
    at::Tensor gg = (!s.self && mask[1]) ? at::empty({s.N, s.Cg, s.H, s.W}, opt) : at::Tensor();
    at::Tensor pads_in = gi.defined() ? at::empty({s.N, s.C, 2 * s.py, a.Wp}, opt) : at::Tensor();
    at::Tensor pads_gd = gg.defined() ? at::empty({s.N, s.Cg, 2 * s.py, a.Wp}, opt) : at::Tensor();
    at::Tensor rows = need_sigma ? at::empty({s.N * a.Hp, 3}, opt.dtype(at::kDouble)) : at::Tensor();
    a.gin = gi.defined() ? gi.data_ptr<T>() : nullptr;
    a.ggd = gg.defined() ? gg.data_ptr<T>() : nullptr;
    a.pads_in = pads_in.defined() ? pads_in.data_ptr<T>() : nullptr;
    a.pads_gd = pads_gd.defined() ? pads_gd.data_ptr<T>() : nullptr;
    a.rows = need_sigma ? rows.data_ptr<double>() : nullptr;
    run_bands(Pass::kPass2, a);

    if (need_sigma) {
      // Per image, rows summed in row order.
      const double* rp = rows.data_ptr<double>();
      const at::Tensor sc = sigma_color.to(at::kDouble).contiguous();
      const at::Tensor sp = sigma_space.to(at::kDouble).contiguous();
      at::Tensor gsc = at::empty({s.N}, sc.options());
      at::Tensor gss = at::empty({s.N, 2}, sc.options());
      for (int64_t n = 0; n < s.N; ++n) {
        double d = 0, yy = 0, xx = 0;
        for (int64_t R = 0; R < a.Hp; ++R) {
          d += rp[3 * (n * a.Hp + R)];
          yy += rp[3 * (n * a.Hp + R) + 1];
          xx += rp[3 * (n * a.Hp + R) + 2];
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
    if (gi.defined()) {
      fold_pads<T>(a, a.pads_in, a.gin, s.C);
      grad_input = gi.to(input.scalar_type());
    }
    if (gg.defined()) {
      fold_pads<T>(a, a.pads_gd, a.ggd, s.Cg);
      grad_guidance = gg.to(guidance->scalar_type());
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
