#pragma once
// HDRNet's guidance map, per pixel: c = ccm x + ccm_bias; f_k = sum_j slopes[k,j] relu(c_k -
// shifts[k,j]); guide = clamp(sum_k mix[k] f_k + mix_bias, 0, 1). One copy of the formula for
// the CPU kernels (where V is a GCC vector of pixels) and the CUDA kernels (V a scalar).
//
// The derivative conventions are those of torch's autograd of the reference (reference.py), so
// that kernel and reference gradients agree bit for bit in their masks: relu'(0) = 0 (torch's
// threshold_backward keeps the gradient where the output is > 0) and clamp passes the gradient
// on the closed interval [0, 1] (torch's clamp_backward).
//
// Parameters travel as one table of P values, and parameter gradients as rows of the same
// layout, so that a single reduction covers all of them:
//   [ccm (C*C) | ccm_bias (C) | shifts (C*K) | slopes (C*K) | mix (C) | mix_bias (1)]
// The shift entries of a gradient row accumulate sum(df_k * [a > 0]) (a = c_k - shift); the
// launchers multiply by -slopes[k,j] once, after the reduction.

#include "bilateral_ops/macros.h"

namespace bilateral_ops {

struct CurveLayout {
  int64_t C, K;

  BO_HOST_DEVICE int64_t ccm() const { return 0; }
  BO_HOST_DEVICE int64_t ccm_bias() const { return C * C; }
  BO_HOST_DEVICE int64_t shifts() const { return C * C + C; }
  BO_HOST_DEVICE int64_t slopes() const { return C * C + C + C * K; }
  BO_HOST_DEVICE int64_t mix() const { return C * C + C + 2 * C * K; }
  BO_HOST_DEVICE int64_t mix_bias() const { return C * C + 2 * C + 2 * C * K; }
  BO_HOST_DEVICE int64_t size() const { return C * C + 2 * C + 2 * C * K + 1; }
};

// The sizes of one call: N images of C channels, H x W pixels; K curve points per channel.
struct CurveShape {
  int64_t N, C, H, W, K;

  int64_t pixels() const { return N * H * W; }
  CurveLayout layout() const { return CurveLayout{C, K}; }
};

// The per-point functions, where V is a GCC vector or a scalar (curve_pointwise.h, included
// here and again inside each of the CPU kernels' instruction-set copies).
#include "bilateral_ops/curve_pointwise.h"

// ---------------------------------------------------------------------------------------------
// The curve through its sorted knots (the CUDA kernels' path; bilateral_ops._C.curve_sorted runs
// these same functions on the host for the tests). With a channel's shifts in ascending order
// s_0 <= ... <= s_{K-1} and the slopes m_i permuted alike,
//   f(c) = sum_{i<n} m_i (c - s_i) = (c - s_0) P_n - Q_n,   f'(c) = P_n,
// where n = #{i : s_i < c}, P_n = sum_{i<n} m_i and Q_n = sum_{i<n} m_i (s_i - s_0). A knot
// equal to c adds nothing to either, as relu(0) = relu'(0) = 0 in the sum. A pixel then costs a
// binary search and one multiply-add instead of K points; the two agree to rounding for finite
// values. They differ for c = +-inf (the sum gives NaN or 0 where the product gives inf or
// NaN), and ranks need comparable shifts, so callers use the sum unless c and the whole table
// are finite.

// The rank of knot j among a channel's K shifts, ties broken by index: for finite shifts the
// ranks are a permutation of 0..K-1.
template <typename T>
BO_HOST_DEVICE int curve_knot_rank(const T* shifts, int K, int j) {
  const T s = shifts[j];
  int r = 0;
  for (int i = 0; i < K; ++i) r += (shifts[i] < s || (shifts[i] == s && i < j)) ? 1 : 0;
  return r;
}

// Puts a knot of rank r in place: sorted (K) receives its shift, pq (2 (K + 1)) its slope as
// the term of P at n = r + 1, which curve_prefix then turns into the sums.
template <typename T>
BO_HOST_DEVICE void curve_place_knot(T shift, T slope, int r, T* sorted, T* pq) {
  sorted[r] = shift;
  pq[2 * r + 2] = slope;
}

// pq[2n] = P_n and pq[2n + 1] = Q_n for n = 0..K, summed in knot order, with the shifts taken
// from the smallest, sorted[0]: Q_n = sum_{i<n} m_i (s_i - s_0), and the curve (c - s_0) P_n -
// Q_n. The same function of c; its rounding is that of c - s rather than of c and s apart, which
// for shifts far from 0 (say near 1000 in float) would otherwise dominate.
template <typename T>
BO_HOST_DEVICE void curve_prefix(T* pq, const T* sorted, int K) {
  pq[0] = T(0);
  pq[1] = T(0);
  for (int n = 1; n <= K; ++n) {
    pq[2 * n + 1] = pq[2 * n] * (sorted[n - 1] - sorted[0]) + pq[2 * n - 1];
    pq[2 * n] += pq[2 * n - 2];
  }
}

// n = #{i : sorted[i] < c}: a branchless binary search, floor(log2 K) + 1 reads. A NaN c gives 0.
template <typename T>
BO_HOST_DEVICE int curve_segment(T c, const T* sorted, int K) {
  int base = 0;
  BO_UNROLL
  for (int n = K; n > 1;) {
    const int half = n >> 1;
    base = sorted[base + half] < c ? base + half : base;
    n -= half;
  }
  return base + (sorted[base] < c ? 1 : 0);
}

// f(c), and f'(c) into fp, from a channel's sorted knots and pq (see above).
template <typename T>
BO_HOST_DEVICE T curve_sorted_point(T c, const T* sorted, const T* pq, int K, T& fp) {
  const int n = curve_segment(c, sorted, K);
  fp = pq[2 * n];
  return (c - sorted[0]) * pq[2 * n] - pq[2 * n + 1];
}

template <typename T>
BO_HOST_DEVICE T curve_sorted_value(T c, const T* sorted, const T* pq, int K) {
  T fp;
  return curve_sorted_point(c, sorted, pq, K, fp);
}

}  // namespace bilateral_ops
