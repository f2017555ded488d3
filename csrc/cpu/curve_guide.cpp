// CPU kernels of curve_guide and _curve_guide_backward (csrc/ops.cpp has the schemas,
// bilateral_ops/curve_guide.h the per-pixel formula; the vector code is curve_guide_kernels.h,
// compiled here once per instruction set).
//
// One pass over the image, nothing per (pixel, curve point) stored: pixels are taken in blocks of
// kVecs short vectors (simd.h), channel by channel, so every inner loop runs across pixels with the
// curve parameters broadcast. The batch's pixels, image after image, are cut into chunks of
// kChunk pixels whose number depends only on the sizes; each chunk sums its parameter gradients
// in vector lanes, reduces the lanes in a fixed order into its own row of doubles, and the rows
// are added in chunk order afterwards: the result is bitwise the same whatever the number of
// threads. Chunks and blocks run across image boundaries, so a batch of tiny images costs what
// one image of as many pixels does (chunks per image cost a parameter row and a block of mostly
// padding per image: 2 x 2 images took 55x the time per pixel of 512 x 512).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <new>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "../curve_guide_table.h"
#include "simd.h"

#if BO_ISA_COPIES
#include <immintrin.h>  // the AVX-512 copy's all_finite
#endif

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
struct CurveArgs {
  CurveLayout l;
  int64_t HW;     // pixels per image
  int64_t total;  // pixels of the batch, N * HW
  const T* table;        // (P,), curve_guide.h layout
  const T* ref;          // (C,), backward: each channel's smallest shift (curve_guide_kernels.h)
  // (C, kSortedStride) or null: each channel's knots sorted (sorted_curves below).
  const T* sorted;
  const T* input;        // (N, C, HW)
  const T* grad_output;  // (N, HW), backward
  T* output;             // (N, HW), forward
  T* grad_input;         // (N, C, HW), backward, or null
  bool need_params;      // backward: accumulate the parameter gradient rows
};

// Chunk `chunk`'s pixels g0 .. g1 - 1, numbered image after image (g = n * HW + pixel).
struct Span {
  int64_t g0, g1;
};

inline Span chunk_span(int64_t chunk, int64_t total) {
  return Span{chunk * kChunk, std::min((chunk + 1) * kChunk, total)};
}

inline int64_t chunk_count(int64_t total) {
  return (total + kChunk - 1) / kChunk;
}

// Each channel's knots for the kernels' sorted path, kSortedStride values a channel: the shifts in
// ascending order, padded to 16 with +inf, then P_n and then Q_n for n = 1..16 (n > K repeating
// n = K), built by curve_guide.h's functions as the CUDA kernels build them.
constexpr int64_t kSortedStride = 48;

// Empty where the sorted path does not serve: not float, K > 16, a shift or slope not finite
// (the ranks would not be a permutation) or a sum that overflows.
std::vector<float> sorted_curves(const at::Tensor& table, const CurveLayout& l) {
  const int K = static_cast<int>(l.K);
  if (table.scalar_type() != at::kFloat || K > 16) return {};
  const float* tb = table.data_ptr<float>();
  std::vector<float> out(static_cast<size_t>(l.C * kSortedStride));
  std::vector<float> sorted(K), pq(2 * (K + 1));
  for (int64_t k = 0; k < l.C; ++k) {
    const float* shifts = tb + l.shifts() + k * K;
    const float* slopes = tb + l.slopes() + k * K;
    for (int j = 0; j < K; ++j) {
      if (!std::isfinite(shifts[j]) || !std::isfinite(slopes[j])) return {};
      curve_place_knot(shifts[j], slopes[j], curve_knot_rank(shifts, K, j), sorted.data(), pq.data());
    }
    curve_prefix(pq.data(), sorted.data(), K);
    if (!std::isfinite(pq[2 * K]) || !std::isfinite(pq[2 * K + 1])) return {};
    float* o = out.data() + k * kSortedStride;
    for (int i = 0; i < 16; ++i) {
      const int n = std::min(i + 1, K);
      o[i] = i < K ? sorted[i] : std::numeric_limits<float>::infinity();
      o[16 + i] = pq[2 * n];
      o[32 + i] = pq[2 * n + 1];
    }
  }
  return out;
}

template <typename T>
const T* sorted_ptr(const std::vector<float>& sorted) {
  if constexpr (std::is_same<T, float>::value) return sorted.empty() ? nullptr : sorted.data();
  return nullptr;
}

// The kernels, once per instruction set (simd.h, BO_ISA_COPIES).
#define BO_ISA_KERNELS "curve_guide_kernels.h"
#include "isa_copies.h"
#undef BO_ISA_KERNELS

template <typename T>
void forward_task(const CurveArgs<T>& a, int64_t c0, int64_t c1) {
  BO_ISA_CALL(forward_task<T>, a, c0, c1);
}

template <typename T>
void backward_task(const CurveArgs<T>& a, int64_t c0, int64_t c1, double* partial) {
  BO_ISA_CALL(backward_task<T>, a, c0, c1, partial);
}

template <typename T>
CurveArgs<T> make_args(const CurveShape& sh, const at::Tensor& table, const at::Tensor& input,
                       const std::vector<float>& sorted) {
  CurveArgs<T> a{};
  a.sorted = sorted_ptr<T>(sorted);
  a.l = sh.layout();
  a.HW = sh.H * sh.W;
  a.total = sh.N * a.HW;
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
  const std::vector<float> sorted = sorted_curves(table, sh.layout());
  at::Tensor out = at::empty({sh.N, sh.H, sh.W}, input.options().dtype(dt));
  AT_DISPATCH_FLOATING_TYPES(dt, "curve_guide_cpu", [&] {
    CurveArgs<scalar_t> a = make_args<scalar_t>(sh, table, x, sorted);
    a.output = out.data_ptr<scalar_t>();
    at::parallel_for(0, chunk_count(a.total), 1,
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
  const CurveLayout l = sh.layout();
  const std::vector<float> sorted = sorted_curves(table, l);
  const at::Tensor ref =
      table.narrow(0, l.shifts(), l.C * l.K).view({l.C, l.K}).amin(1).contiguous();
  at::Tensor grad_input =
      mask[0] ? at::empty(x.sizes(), x.options()) : masked_out(input);
  const int64_t chunks = chunk_count(sh.pixels());
  std::vector<double> partial(need_params ? static_cast<size_t>(chunks * l.size()) : 0);
  at::Tensor row = at::zeros({l.size()}, table.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(dt, "curve_guide_backward_cpu", [&] {
    CurveArgs<scalar_t> a = make_args<scalar_t>(sh, table, x, sorted);
    a.grad_output = go.data_ptr<scalar_t>();
    a.grad_input = mask[0] ? grad_input.data_ptr<scalar_t>() : nullptr;
    a.need_params = need_params;
    a.ref = ref.data_ptr<scalar_t>();
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
