// CPU kernels of bilateral_filter and _bilateral_filter_backward (csrc/ops.cpp has the schemas,
// csrc/include/bilateral_ops/bilateral_filter.h the per-pixel math).
//
// Each band of rows copies the input and guidance rows it reads into padded planes of its worker
// (the border handled by index maps, with zero margins wide enough that every vector load of a tap
// stays inside its row), so the loops are branch-free and process chunks of vec_width pixels of
// one row. Memory is O(image) in both passes, never O(image * taps), and the forward allocates
// nothing image-sized but its results.
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
//   planes that are zero outside the image; given the forward's output and W (autograd passes
//   them: _bilateral_filter_forward), pixel by pixel instead, without the sweep, each band of
//   pass 2 making the rows it reads (band_view);
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
#include <climits>
#include <cmath>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>


#include "../bilateral_filter_args.h"
#include "bilateral_filter_cpu.h"
#include "bilateral_ops/bilateral_filter.h"
#include "simd.h"

// The baseline copy of the kernels (the others: bilateral_filter_v3.cpp, bilateral_filter_v4.cpp).
#define BO_ISA_ONLY 1
#include "bilateral_filter_copy.h"
#undef BO_ISA_ONLY

namespace bilateral_ops {
namespace cpu {
namespace filter {
namespace {



template <typename T>
void filter_task(Pass pass, const Args<T>& p, int64_t t, Scratch<T>& s) {
  BO_ISA_CALL(filter_task<T>, pass, p, t, s);
}

// Padded row r (the image row it reads by the border, its columns by p.xmap) of image plane src
// (H x W) into dst (Ws values, margins zero).
template <typename T>
void pad_row(const Args<T>& p, const T* src, int64_t r, T* dst) {
  const int64_t y = border_index(r - p.py, p.H, p.border);
  if (y < 0) {
    std::fill(dst, dst + p.Ws, T(0));
    return;
  }
  std::fill(dst, dst + p.margin, T(0));
  std::fill(dst + p.margin + p.Wp, dst + p.Ws, T(0));
  const T* srow = src + y * p.W;
  T* drow = dst + p.margin;
  // The image columns in one copy (every border maps them to themselves); the gather through
  // xmap element by element took most of a 1080p k = 1 call.
  std::copy(srow, srow + p.W, drow + p.px);
  for (int64_t x = 0; x < p.px; ++x) drow[x] = p.xmap[x] < 0 ? T(0) : srow[p.xmap[x]];
  for (int64_t x = p.px + p.W; x < p.Wp; ++x) drow[x] = p.xmap[x] < 0 ? T(0) : srow[p.xmap[x]];
}

// Centre plane rows of image row y of image n from the forward's output and weight sums: gp = g / W
// per channel into gp_row + c * PX and a = gp . out into a_row, at columns xoff .. xoff + W - 1 of
// rows of Wx values, zero elsewhere (pass 2 pairs nothing with them).
template <typename T>
void centre_row(const Args<T>& p, int64_t n, int64_t y, T* gp_row, int64_t PX, T* a_row) {
  const T* wrow = p.saved_norm + (n * p.H + y) * p.W;
  std::fill(a_row, a_row + p.Wx, T(0));
  T* arow = a_row + p.xoff;
  for (int64_t c = 0; c < p.C; ++c) {
    const int64_t img = ((n * p.C + c) * p.H + y) * p.W;
    const T* grow = p.go + img;
    const T* orow = p.saved_out + img;
    T* row = gp_row + c * PX;
    std::fill(row, row + p.xoff, T(0));
    std::fill(row + p.xoff + p.W, row + p.Wx, T(0));
    T* gprow = row + p.xoff;
    for (int64_t x = 0; x < p.W; ++x) {
      const T gp = grow[x] * (T(1) / wrow[x]);
      gprow[x] = gp;
      arow[x] += gp * orow[x];
    }
  }
}

// Whether pass 2's bands make their own centre rows: given the forward's output and W.
template <typename T>
bool band_makes_centre(Pass pass, const Args<T>& p) {
  return pass == Pass::kPass2 && p.saved_out != nullptr;
}

// The Args of band t of a pass: its padded rows L0 .. L0 + Bh + 2 py - 1 that exist (0 .. Hp - 1)
// copied into the worker's s.pad, every input channel, then every guidance channel (joint); for
// pass 2 from the forward's results, the same rows of the centre planes into s.cen.
// Copying per band rather than padding the whole image once costs 2 py / Bh more copying (the
// rows bands share), a small fraction of the sweeps, and saves an image-sized buffer a call:
// fresh pages, whose faults took a third of a 1080p forward whenever the allocator had handed
// the previous call's memory back to the system.
template <typename T>
Args<T> band_view(Pass pass, const Args<T>& p, int64_t t, Scratch<T>& s) {
  const bool all_rows = pass == Pass::kPass2;
  const BandRows band(p, t, all_rows ? p.nb2 : p.nb, all_rows ? p.Hp : p.PH);
  const int64_t rows = band_plane_rows(p);
  Args<T> q = p;
  q.PS = rows * p.Ws;
  q.row0 = band.L0;
  q.in = s.pad;
  q.gd = p.self ? s.pad : s.pad + p.C * q.PS;
  const int64_t planes = p.self ? p.C : p.C + p.Cg;
  const int64_t r0 = std::max<int64_t>(0, band.L0), r1 = std::min(band.L0 + rows, p.Hp);
  for (int64_t c = 0; c < planes; ++c) {
    const T* src = c < p.C ? p.src_in + (band.n * p.C + c) * p.H * p.W
                           : p.src_gd + (band.n * p.Cg + c - p.C) * p.H * p.W;
    for (int64_t r = r0; r < r1; ++r) pad_row(p, src, r, s.pad + c * q.PS + (r - band.L0) * p.Ws);
  }
  if (band_makes_centre(pass, p)) {
    q.PX = rows * p.Wx;
    q.crow0 = band.L0;
    q.gp_is = q.a_is = 0;
    q.gp = s.cen;
    q.a = s.cen + p.C * q.PX;
    for (int64_t r = r0; r < r1; ++r) {
      T* gp_row = q.gp + (r - band.L0) * p.Wx;
      T* a_row = q.a + (r - band.L0) * p.Wx;
      if (r >= p.py && r < p.py + p.H) {
        centre_row(p, band.n, r - p.py, gp_row, q.PX, a_row);
      } else {
        for (int64_t c = 0; c < p.C; ++c) std::fill(gp_row + c * q.PX, gp_row + c * q.PX + p.Wx, T(0));
        std::fill(a_row, a_row + p.Wx, T(0));
      }
    }
  }
  return q;
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
  const int64_t pad_elems = (p.self ? p.C : p.C + p.Cg) * band_plane_rows(p) * p.Ws;
  const int64_t cen_elems =
      band_makes_centre(pass, p) ? (p.C + 1) * band_plane_rows(p) * p.Wx : 0;
  const int64_t stage_elems = p.stage ? (p.C + p.Cg + 1) * (p.py + 1) * p.Ws : 0;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), bands);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    Scratch<T> s(p.C, p.Cg, band_elems, pad_elems, cen_elems, stage_elems);
    for (int64_t t = next++; t < bands; t = next++) filter_task(pass, band_view(pass, p, t, s), t, s);
  });
}

// ---------------------------------------------------------------------------------------------
// Host side: the sigma tables, the fold.

// Windows of more taps sum in two levels (Offsets): at k = 31 one sequential sum drifts by at
// most ~1e-6 in float32, and staging costs a few per cent there.
constexpr int64_t kStageTaps = 32 * 32;

// The most lanes of any copy's vectors (float in 64 bytes): the margins' room for a last load.
constexpr int64_t kVecMax = kVecBytesMax / sizeof(float);

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

// The bands' height: 32 padded rows, or the padded image's Hp = H + 2 py when fewer, and at least
// py (see Prepared).
inline int64_t band_height(int64_t H, int64_t py) {
  return std::max<int64_t>(std::min<int64_t>(32, H + 2 * py), py);
}

// Everything both passes share: the input and guidance in T, the per-image sigma tables, and the
// Args.
template <typename T>
struct Prepared {
  at::Tensor src_in, src_gd, rc, ss;
  std::vector<int64_t> xmap;  // the padding's column map, for pad_row and pass 2's fold
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
    // A fixed height (not derived from the thread count) keeps the sums' order fixed. Never
    // taller than the padded image: the band planes are allocated and cleared by the band's
    // height, and a one-row image paid for 32 rows (61x the time per pixel of 512 x 512). Bands
    // split the rows as with 32 (one band when Hp <= 32), so the sums and results are the same.
    a.Bh = band_height(s.H, s.py);
    a.nb = (a.PH + a.Bh - 1) / a.Bh;
    a.nb2 = (a.Hp + a.Bh - 1) / a.Bh;
    const int64_t pairs = (s.ky * s.kx - 1) / 2;
    a.stage = s.ky * s.kx > kStageTaps;
    a.flush = std::max<int64_t>(s.py + 1, static_cast<int64_t>(std::ceil(std::sqrt(static_cast<double>(pairs)))));
    a.border = s.border;
    a.distance = s.distance;
    a.self = s.self;
    xmap.resize(a.Wp);
    for (int64_t j = 0; j < a.Wp; ++j) xmap[j] = border_index(j - s.px, s.W, s.border);
    a.xmap = xmap.data();
    src_in = input.to(dt).contiguous();
    src_gd = s.self ? src_in : guidance->to(dt).contiguous();
    a.src_in = src_in.data_ptr<T>();
    a.src_gd = src_gd.data_ptr<T>();
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

// Tall narrow images are filtered as their transpose, with the kernel's and the spatial sigmas'
// axes swapped: the filter commutes with transposition (each border mode pads each axis by the
// same rule, the spatial exponent swaps its terms). The kernels sweep (H + py) padded rows of
// ceil(W + 2 px) columns in vectors of up to 16 lanes, in bands of 32 rows shared among the
// threads, so a row of W pixels fills W of 16 lanes: a 65536 x 1 signal took ~15x the time per
// pixel of a wide image (a review's finding); 4096 x 24 at k = 9 takes 0.7x its time transposed.
// Transposed where that sweep, per band in flight (of at most kBandsInFlight), is at most 0.8 of
// the other. A fixed count, not the thread count: the choice changes the results' rounding, and
// they must not depend on the number of threads.
constexpr double kBandsInFlight = 2;

// Images of few bands (a one-row signal, a short strip, a narrow image's transpose) are one task
// or a few: nothing for the other threads to do. Such an image is cut into S column segments that
// overlap by the window's half width px on each side, filtered as a batch of N S images, and its
// results are taken from each segment's own columns; the backward adds the segments' gradients,
// which meet in the overlaps, in segment order. An own column's window lies inside its segment,
// so its output and its terms are the unsegmented image's; a segment's inner edges are padded by
// the border rule, but that padding reaches only the overlap, whose outputs are dropped and whose
// grad_output is zero. The circular border reads across the image, which the edge segments lack:
// those images are not cut. S depends on the sizes only (kBandsWanted bands whatever the thread
// count), so the results do not depend on the number of threads.
constexpr int64_t kBandsWanted = 8;
// A segment's own columns: at least this many, and 8 px (the overlap then costs at most a quarter).
constexpr int64_t kMinSegment = 512;
// Windows of fewer taps are not cut: the copies would cost about what a thread saves (a one-row
// signal at k = (1, 9): 7 -> 8 ns a pixel forward at one thread, 6-7 -> 5-7 at two).
constexpr int64_t kMinSegmentTaps = 25;

struct Segments {
  int64_t S = 1;     // segments (1: not cut)
  int64_t L = 0;     // own columns of each (the last may have fewer)
  int64_t Wseg = 0;  // columns of each, own and overlap
  int64_t W = 0, px = 0;
  int64_t own0(int64_t s) const { return s * L; }
  int64_t own1(int64_t s) const { return std::min(W, (s + 1) * L); }
  // The image column of the segment's first: px before its own, within the image.
  int64_t offset(int64_t s) const { return std::min(std::max<int64_t>(0, s * L - px), W - Wseg); }
};

Segments column_segments(int64_t N, int64_t H, int64_t W, int64_t py, int64_t px, int border) {
  Segments g;
  g.W = W;
  g.px = px;
  if (border == kCircular || N * H * W == 0 || (2 * py + 1) * (2 * px + 1) < kMinSegmentTaps) return g;
  // The sums pass's bands (Prepared's nb).
  const int64_t Bh = band_height(H, py);
  const int64_t bands = N * ((py + H + Bh - 1) / Bh);
  if (bands >= kBandsWanted) return g;
  const int64_t S = std::min((kBandsWanted + bands - 1) / bands, W / std::max(kMinSegment, 8 * px));
  if (S < 2) return g;
  g.S = S;
  g.L = (W + S - 1) / S;
  g.Wseg = std::min(W, g.L + 2 * px);
  return g;
}

double sweep_cost(int64_t N, int64_t H, int64_t W, int64_t py, int64_t px, int border) {
  const double lanes = 16.0 * std::ceil(static_cast<double>(W + 2 * px) / 16.0);
  const double bands = static_cast<double>(N) * std::ceil(static_cast<double>(H + py) / 32.0) *
                       static_cast<double>(column_segments(N, H, W, py, px, border).S);
  return static_cast<double>(H + py) * lanes / std::min(kBandsInFlight, bands);
}

bool narrow(const FilterShape& s) {
  return sweep_cost(s.N, s.W, s.H, s.px, s.py, s.border) < 0.8 * sweep_cost(s.N, s.H, s.W, s.py, s.px, s.border);
}

Segments column_segments(const FilterShape& s) {
  return column_segments(s.N, s.H, s.W, s.py, s.px, s.border);
}

// t's columns (dimension dim, the last) cut into g's segments: (N, ...) -> (N S, ..., Wseg),
// image n's segments in order. With own_only, the columns outside each segment's own are zero.
at::Tensor segmented(const at::Tensor& t, const Segments& g, int64_t dim, bool own_only = false) {
  std::vector<at::Tensor> parts;
  for (int64_t k = 0; k < g.S; ++k) parts.push_back(t.narrow(dim, g.offset(k), g.Wseg));
  at::Tensor st = at::stack(parts, 1);
  if (own_only) {
    for (int64_t k = 0; k < g.S; ++k) {
      at::Tensor seg = st.select(1, k);
      const int64_t a = g.own0(k) - g.offset(k), b = g.own1(k) - g.offset(k);
      seg.narrow(dim, 0, a).zero_();
      seg.narrow(dim, b, g.Wseg - b).zero_();
    }
  }
  std::vector<int64_t> sizes = st.sizes().vec();
  sizes[0] *= g.S;
  sizes.erase(sizes.begin() + 1);
  return st.reshape(sizes);
}

c10::optional<at::Tensor> segmented(const c10::optional<at::Tensor>& t, const Segments& g, int64_t dim) {
  if (!(t.has_value() && t->defined())) return t;
  return segmented(*t, g, dim);
}

// One value (sigma_color (N,)) or row (sigma_space (N, 2)) per image -> per segment.
at::Tensor per_segment(const at::Tensor& t, const Segments& g) {
  return t.repeat_interleave(g.S, 0);
}

// A segmented result (N S, ...) as (N, S, ...).
at::Tensor by_segment(const at::Tensor& t, const Segments& g) {
  std::vector<int64_t> sizes = t.sizes().vec();
  sizes[0] /= g.S;
  sizes.insert(sizes.begin() + 1, g.S);
  return t.view(sizes);
}

// A segmented result back on the image (full: its sizes): each segment's own columns (kOwn), or
// (kAdd) every segment's columns added in segment order. Masked-out results pass as they are.
enum class Join { kOwn, kAdd };

at::Tensor unsegmented(const at::Tensor& t, const Segments& g, int64_t dim, at::IntArrayRef full, Join how) {
  if (!t.defined() || t.dim() != static_cast<int64_t>(full.size())) return t;
  const at::Tensor v = by_segment(t, g);
  at::Tensor out = how == Join::kOwn ? at::empty(full, t.options()) : at::zeros(full, t.options());
  for (int64_t k = 0; k < g.S; ++k) {
    const at::Tensor seg = v.select(1, k);
    if (how == Join::kOwn) {
      const int64_t n = g.own1(k) - g.own0(k);
      out.narrow(dim, g.own0(k), n).copy_(seg.narrow(dim, g.own0(k) - g.offset(k), n));
    } else {
      out.narrow(dim, g.offset(k), g.Wseg).add_(seg);
    }
  }
  return out;
}

// Per-segment sigma gradients (N S, ...) summed per image, in segment order.
at::Tensor per_image(const at::Tensor& t, const Segments& g) {
  if (!t.defined() || t.dim() == 0 || t.numel() == 0) return t;
  const at::Tensor v = by_segment(t, g);
  at::Tensor out = v.select(1, 0).clone();
  for (int64_t k = 1; k < g.S; ++k) out.add_(v.select(1, k));
  return out;
}

at::Tensor transposed(const at::Tensor& t, int64_t a, int64_t b) {
  return t.transpose(a, b);
}

c10::optional<at::Tensor> transposed(const c10::optional<at::Tensor>& t, int64_t a, int64_t b) {
  if (!(t.has_value() && t->defined())) return t;
  return t->transpose(a, b);
}

// A result of the transposed problem back in the caller's layout (masked-out results, (0,)
// tensors, and zero results pass as they are).
at::Tensor untransposed(const at::Tensor& t, int64_t a, int64_t b) {
  return t.defined() && t.dim() > b ? t.transpose(a, b).contiguous() : t;
}

std::vector<int64_t> swapped(at::IntArrayRef kernel_size) {
  return {kernel_size[1], kernel_size[0]};
}

// The filter, and with want_norm the weight sums W too (else an empty norm).
std::tuple<at::Tensor, at::Tensor> filter_forward(const at::Tensor& input, const c10::optional<at::Tensor>& guidance,
                                                  at::IntArrayRef kernel_size, const at::Tensor& sigma_color,
                                                  const at::Tensor& sigma_space, c10::string_view border_type,
                                                  c10::string_view color_distance_type, bool want_norm) {
  const FilterShape s = check_filter(input, guidance, kernel_size, sigma_color, sigma_space,
                                     std::string(border_type), std::string(color_distance_type));
  if (s.pixels() > 0 && narrow(s)) {
    const auto r = filter_forward(transposed(input, 2, 3), transposed(guidance, 2, 3), swapped(kernel_size),
                                  sigma_color, sigma_space.flip(-1), border_type, color_distance_type, want_norm);
    return {untransposed(std::get<0>(r), 2, 3), untransposed(std::get<1>(r), 1, 2)};
  }
  if (const Segments g = column_segments(s); g.S > 1) {
    const auto r = filter_forward(segmented(input, g, 3), segmented(guidance, g, 3), kernel_size,
                                  per_segment(sigma_color, g), per_segment(sigma_space, g), border_type,
                                  color_distance_type, want_norm);
    const at::Tensor& nr = std::get<1>(r);
    return {unsegmented(std::get<0>(r), g, 3, input.sizes(), Join::kOwn),
            nr.defined() ? unsegmented(nr, g, 2, {s.N, s.H, s.W}, Join::kOwn) : nr};
  }
  const auto dt = compute_dtype(input.scalar_type());
  at::Tensor norm = want_norm ? at::empty({s.N, s.H, s.W}, input.options().dtype(filter_norm_dtype(input.scalar_type())))
                              : at::Tensor();
  if (s.pixels() == 0 || s.C == 0) return {at::empty(input.sizes(), input.options()), norm.defined() ? norm.fill_(1) : norm};
  at::Tensor out = at::empty(input.sizes(), input.options().dtype(dt));
  AT_DISPATCH_FLOATING_TYPES(dt, "bilateral_filter_cpu", [&] {
    Prepared<scalar_t> prep(input, guidance, sigma_color, sigma_space, s);
    prep.a.out = out.data_ptr<scalar_t>();
    prep.a.norm = want_norm ? norm.data_ptr<scalar_t>() : nullptr;
    run_bands(Pass::kForward, prep.a);
  });
  return {out.to(input.scalar_type()), norm};
}

at::Tensor bilateral_filter(const at::Tensor& input, const c10::optional<at::Tensor>& guidance,
                            at::IntArrayRef kernel_size, const at::Tensor& sigma_color,
                            const at::Tensor& sigma_space, c10::string_view border_type,
                            c10::string_view color_distance_type) {
  return std::get<0>(
      filter_forward(input, guidance, kernel_size, sigma_color, sigma_space, border_type, color_distance_type, false));
}

std::tuple<at::Tensor, at::Tensor> bilateral_filter_forward(const at::Tensor& input,
                                                            const c10::optional<at::Tensor>& guidance,
                                                            at::IntArrayRef kernel_size, const at::Tensor& sigma_color,
                                                            const at::Tensor& sigma_space, c10::string_view border_type,
                                                            c10::string_view color_distance_type) {
  return filter_forward(input, guidance, kernel_size, sigma_color, sigma_space, border_type, color_distance_type, true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bilateral_filter_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const c10::optional<at::Tensor>& guidance,
    at::IntArrayRef kernel_size, const at::Tensor& sigma_color, const at::Tensor& sigma_space,
    c10::string_view border_type, c10::string_view color_distance_type, std::array<bool, 4> mask,
    const c10::optional<at::Tensor>& output, const c10::optional<at::Tensor>& norm) {
  const FilterShape s = check_filter(input, guidance, kernel_size, sigma_color, sigma_space,
                                     std::string(border_type), std::string(color_distance_type));
  check_filter_grad_output(grad_output, input);
  check_filter_mask(s, mask);
  const bool saved = check_filter_saved(output, norm, input);
  const at::Tensor& gd_like = s.self ? input : *guidance;
  if (s.pixels() == 0 || s.C == 0 || !(mask[0] || mask[1] || mask[2] || mask[3])) {
    return {zero_or_masked(mask[0], input), zero_or_masked(mask[1], gd_like), zero_or_masked(mask[2], sigma_color),
            zero_or_masked(mask[3], sigma_space)};
  }
  if (narrow(s)) {  // see filter_forward
    const auto r = bilateral_filter_backward(
        transposed(grad_output, 2, 3), transposed(input, 2, 3), transposed(guidance, 2, 3), swapped(kernel_size),
        sigma_color, sigma_space.flip(-1), border_type, color_distance_type, mask, transposed(output, 2, 3),
        transposed(norm, 1, 2));
    const at::Tensor& gss = std::get<3>(r);
    return {untransposed(std::get<0>(r), 2, 3), untransposed(std::get<1>(r), 2, 3), std::get<2>(r),
            mask[3] ? gss.flip(-1) : gss};
  }
  if (const Segments g = column_segments(s); g.S > 1) {  // see column_segments
    const auto r = bilateral_filter_backward(
        segmented(grad_output, g, 3, true), segmented(input, g, 3), segmented(guidance, g, 3), kernel_size,
        per_segment(sigma_color, g), per_segment(sigma_space, g), border_type, color_distance_type, mask,
        segmented(output, g, 3), segmented(norm, g, 2));
    return {unsegmented(std::get<0>(r), g, 3, input.sizes(), Join::kAdd),
            unsegmented(std::get<1>(r), g, 3, gd_like.sizes(), Join::kAdd), per_image(std::get<2>(r), g),
            per_image(std::get<3>(r), g)};
  }
  // Every wanted gradient is computed below (check_filter_mask refuses grad_guidance without a
  // guidance); the others come back masked out. Zeros here would be filled only to be replaced.
  at::Tensor grad_input = masked_out(input), grad_guidance = masked_out(gd_like);
  at::Tensor grad_sc = masked_out(sigma_color), grad_ss = masked_out(sigma_space);
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
    // The centre planes: given the forward's output and W, each band of pass 2 makes its own rows
    // (band_view); else pass 1 sweeps every window for them, into image-sized planes.
    at::Tensor out_t, norm_t, gp, av;
    if (saved) {
      out_t = output->to(dt).contiguous();
      norm_t = norm->contiguous();
      a.saved_out = out_t.data_ptr<T>();
      a.saved_norm = norm_t.data_ptr<T>();
    } else {
      gp = at::empty({s.N, s.C, a.Hp, a.Wx}, opt);  // pass 1 writes every column
      av = at::empty({s.N, a.Hp, a.Wx}, opt);
      a.gp = gp.data_ptr<T>();
      a.a = av.data_ptr<T>();
      a.PX = a.Hp * a.Wx;
      a.gp_is = s.C * a.PX;
      a.a_is = a.PX;
      a.crow0 = 0;
      clear_outside<T>(a);
      run_bands(Pass::kPass1, a);
    }

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

Layout cpu_layout(int64_t N, int64_t H, int64_t W, int64_t ky, int64_t kx, const std::string& border) {
  FilterShape s{};
  s.N = N;
  s.H = H;
  s.W = W;
  s.ky = ky;
  s.kx = kx;
  s.py = ky / 2;
  s.px = kx / 2;
  s.border = parse_border(border);
  const bool t = s.pixels() > 0 && narrow(s);
  if (t) {
    std::swap(s.H, s.W);
    std::swap(s.py, s.px);
  }
  return {t, column_segments(s).S};
}

}  // namespace filter
}  // namespace cpu
}  // namespace bilateral_ops

TORCH_LIBRARY_IMPL(bilateral_ops, CPU, m) {
  m.impl("bilateral_filter", &bilateral_ops::cpu::filter::bilateral_filter);
  m.impl("_bilateral_filter_forward", &bilateral_ops::cpu::filter::bilateral_filter_forward);
  m.impl("_bilateral_filter_backward", &bilateral_ops::cpu::filter::bilateral_filter_backward);
}

