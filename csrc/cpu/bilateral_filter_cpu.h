#pragma once
// What bilateral_filter's CPU host code (bilateral_filter.cpp) and its kernels share: the
// arguments of a pass, the per-task scratch, the band and pair-offset geometry. The kernels are
// compiled once per x86-64 level, each copy in a translation unit of its own so that the build
// compiles them side by side (bilateral_filter.cpp holds the baseline copy,
// bilateral_filter_v3.cpp and bilateral_filter_v4.cpp the AVX2 and AVX-512 ones); each copy's
// task function is declared here and instantiated by its unit (bilateral_filter_kernels.h).
// Everything is in the named namespace bilateral_ops::cpu::filter, which the units share.

#include <c10/util/Exception.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "bilateral_ops/bilateral_filter.h"
#include "simd.h"

namespace bilateral_ops {
namespace cpu {
namespace filter {

// The weights are base-2 exponentials (vexp2 in bilateral_filter_kernels.h): log2 e, and the
// bound below which a weight is exactly 0.
constexpr double kLog2e = 1.44269504088896340736;

// The clamp's bound (-86 in natural units), passed as lo = vopaque(kExp2Floor) (simd.h): the
// clamp is then one max.
constexpr float kExp2Floor = static_cast<float>(-86.0 * kLog2e);

// ---------------------------------------------------------------------------------------------
// Layouts. Padded planes: rows of Ws = kMargin + Wp + kMargin values, padded column j at
// kMargin + j; the margins (>= the kernel width plus a vector) are zero, so a load at any tap of
// any chunk, tails included, stays in its row. A band's padded planes (per worker, filled by
// band_view) hold its Bh + 2 py padded rows from R0 - py, every channel of the input, then of the
// guidance (joint). Centre planes (gp, a): one row per padded row (rows outside the image zero),
// rows of Wx values, pixel x at x + xoff, zero outside the image, so that pass 2 reads zeros for
// centres outside the image; image-sized when pass 1 makes them, a band's rows otherwise. Band
// planes (per worker, the sums and pass 2's gradients of one band at a time): Bh + 2 py rows of
// Ws values, padded row R0 - py + i at row i.

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
  // Large windows (taps > kStageTaps): two-level sums, see Offsets. flush: the pairs p's register
  // sums take before they are added into the staging rows.
  bool stage;
  int64_t flush;
  const T* src_in;      // (N, C, H, W) the input, contiguous, in T
  const T* src_gd;      // (N, Cg, H, W) the guidance; == src_in when self
  // The padded planes of the band being swept (band_view), of its image only: padded row r of
  // channel c at in + c * PS + (r - row0) * Ws + margin.
  const T* in;
  const T* gd;          // == in when self
  int64_t PS, row0;
  const T* rc;          // (N,) 0.5 / sigma_color^2
  const T* ss;          // (N, ky * kx) spatial exponents, base 2 (times log2 e)
  T* out;               // forward: (N, C, H, W)
  T* norm;              // forward: (N, H, W) the weight sums W, or nullptr
  // Backward.
  const T* go;          // (N, C, H, W)
  const T* saved_out;   // (N, C, H, W) the forward's output, given with saved_norm, or nullptr
  const T* saved_norm;  // (N, H, W) its weight sums W
  // The centre planes: gp = g / W (C channels) and a = gp . out, padded row r of channel c of
  // image n at gp + n * gp_is + c * PX + (r - crow0) * Wx (a likewise, one channel): image-sized
  // (N, C, Hp, Wx) and (N, Hp, Wx) when pass 1 sweeps, a band's rows (band_view) when the
  // forward's results are given.
  T* gp;
  T* a;
  int64_t gp_is, a_is, PX, crow0;
  double* rows;         // (N * Hp, 3) per-row sums for the sigma gradients (or nullptr)
  T* gin;               // (N, C, H, W) input gradient: value (+ range when self) (or nullptr)
  T* ggd;               // (N, Cg, H, W) guidance gradient (joint; or nullptr)
  T* pads_in;           // (N, C, 2 py, Wp) the input gradient's padded rows above and below the image
  T* pads_gd;           // (N, Cg, 2 py, Wp) the guidance's
  const int64_t* xmap;  // (Wp,) the image column each padded column reads (-1: none)
  bool need_value, need_range;

  const T* in_row(int64_t c, int64_t r) const { return in + c * PS + (r - row0) * Ws + margin; }
  const T* gd_row(int64_t c, int64_t r) const { return gd + c * PS + (r - row0) * Ws + margin; }
};

// Channel counts fixed at compile time (0: the runtime count), so the accumulators of common
// images (gray, RGB, RGB guided by gray) stay in registers.
template <typename V, int K>
struct Accs {
  V v[K > 0 ? K : 1];
};

template <int K>
BO_ALWAYS_INLINE int64_t count(int64_t runtime) {
  return K > 0 ? K : runtime;
}

// Per-task scratch, allocated once per parallel_for task (never per pixel): the vectors of runtime
// channel counts (pass 2 needs the most: 4 per input and 4 per guidance channel), a band's
// planes, its padded input and guidance rows and (pass 2 from the forward's results) its centre
// planes.
// std::vector does not honour the alignment of vec_t under every ABI setting, and the compiler
// uses aligned moves on these arrays: allocate them explicitly aligned, for the widest vectors
// of any kernel copy (the copy's own type: v<V>()).
template <typename T>
struct Scratch {
  void* vbuf;
  T* band = nullptr;  // a band's planes
  T* pad = nullptr;   // a band's padded input and guidance rows
  T* cen = nullptr;   // a band's centre planes
  T* stage = nullptr; // large windows: the staging rows of one padded row's pairs (see Offsets)
  Scratch(int64_t C, int64_t Cg, int64_t band_elems, int64_t pad_elems, int64_t cen_elems, int64_t stage_elems) {
    const size_t bytes = kVecBytesMax * static_cast<size_t>(4 * (C + Cg));
    vbuf = std::aligned_alloc(kVecBytesMax, bytes);
    TORCH_CHECK(vbuf != nullptr, "bilateral_filter: out of memory for ", bytes, " bytes of scratch");
    band = alloc(band_elems);
    pad = alloc(pad_elems);
    cen = alloc(cen_elems);
    stage = alloc(stage_elems);
    if (stage != nullptr) std::fill(stage, stage + stage_elems, T(0));  // folds leave it zero
  }
  ~Scratch() {
    std::free(vbuf);
    std::free(band);
    std::free(pad);
    std::free(cen);
    std::free(stage);
  }
  static T* alloc(int64_t elems) {
    if (elems <= 0) return nullptr;
    const size_t bytes = (sizeof(T) * static_cast<size_t>(elems) + kVecBytesMax - 1) / kVecBytesMax * kVecBytesMax;
    T* ptr = static_cast<T*>(std::aligned_alloc(kVecBytesMax, bytes));
    TORCH_CHECK(ptr != nullptr, "bilateral_filter: out of memory for ", bytes, " bytes of scratch");
    return ptr;
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  template <typename V>
  V* v() {
    static_assert(sizeof(V) <= kVecBytesMax, "scratch sized for kVecBytesMax-byte vectors");
    return static_cast<V*>(vbuf);
  }
};

// The pair sweeps run over a band in column tiles of kTile padded columns, all of the band's rows
// a tile at a time: the rows a chunk reaches (py + 1 rows of every plane it reads and of the band
// planes it updates) then stay in L1/L2 however wide the image (a 1080p row of 5 planes x 5
// rows is ~200 KB). A multiple of every vector width.
constexpr int64_t kTile = 128;

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

// The offsets s = (dy, dx) of S+ that the pairs of a run of p (padded row R, columns j0 .. j0 +
// width - 1) sweep: all of them when one of its positions is an image pixel; else only those
// whose q is an image pixel for some position of the run. A pair of two positions outside the
// image adds only to sums that are discarded (the forward's, pass 1's) or products with the zero
// centre planes (pass 2), so image results keep the same terms in the same order, and a window
// much larger than the image costs its pairs with the image rather than the padded image's
// ((H + k)(W + k) k^2 / 2 pairs: seconds for a 4 x 4 image at k = 401).
// Large windows also sum in two levels, so that float32 keeps the 1e-5 contract with kornia
// (whose sums over the window are pairwise): one sequential sum of the k^2 / 2 pairs of a
// position drifted by up to 4e-5 at k = 101. With Args::stage the pairs of one padded row R of p
// add q's terms into staging rows (R .. R + py), folded into the band planes after the row, and
// p's register sums go into them every Args::flush pairs; every sum then chains ~ the square root
// of its terms at each level instead of all of them.
struct Offsets {
  int64_t dx0, dx1, dy0, dy1;
};

template <typename T>
BO_ALWAYS_INLINE Offsets pair_offsets(const Args<T>& p, int64_t R, int64_t j0, int64_t width, int64_t dy_min,
                                      int64_t dy_max) {
  Offsets o{-p.px, p.px, dy_min, dy_max};
  const bool p_row = R >= p.py && R < p.py + p.H;
  const bool p_col = j0 < p.px + p.W && j0 + width > p.px;
  if (!(p_row && p_col)) {
    o.dx0 = std::max(o.dx0, p.px - (j0 + width - 1));
    o.dx1 = std::min(o.dx1, p.px + p.W - 1 - j0);
    o.dy0 = std::max(o.dy0, p.py - R);
    o.dy1 = std::min(o.dy1, p.py + p.H - 1 - R);
  }
  return o;
}

// Large windows: what the pairs of one padded row R reached in its staging rows: rows 0 .. y1
// (padded rows R .. R + y1) and padded columns c0 .. c1 - 1.
struct Reach {
  int64_t y1 = 0, c0 = INT64_MAX, c1 = INT64_MIN;
  void add(const Offsets& o, int64_t j0, int64_t width) {
    c0 = std::min(c0, j0 + std::min<int64_t>(o.dx0, 0));
    c1 = std::max(c1, j0 + width + std::max<int64_t>(o.dx1, 0));
    if (o.dx0 <= o.dx1 && o.dy0 <= o.dy1) y1 = std::max(y1, o.dy1);
  }
};

// Large windows: adds the staging rows of padded row R's pairs (planes of (py + 1) rows, channel
// stride SW) into the band planes (channel stride PL, row R at band_row) where they reached, and
// clears them for the next row.
template <typename T>
void fold_stage(const Args<T>& p, T* stage, int64_t SW, T* band_row, int64_t PL, int64_t planes, const Reach& r) {
  for (int64_t c = 0; c < planes; ++c) {
    for (int64_t i = 0; i <= r.y1; ++i) {
      T* src = stage + c * SW + i * p.Ws + p.margin;
      T* dst = band_row + c * PL + i * p.Ws + p.margin;
      for (int64_t j = r.c0; j < r.c1; ++j) {
        dst[j] += src[j];
        src[j] = T(0);
      }
    }
  }
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

enum class Pass { kForward, kPass1, kPass2 };

// How the CPU filter runs a call of these sizes (bilateral_filter.cpp; the tests ask, through
// bilateral_ops._C.filter_layout): whether as the image's transpose, and in how many column
// segments of that image.
struct Layout {
  bool transposed;
  int64_t segments;
};
Layout cpu_layout(int64_t N, int64_t H, int64_t W, int64_t ky, int64_t kx, const std::string& border);

// The task function of each instruction set's copy: the pass of band t, with p the call's
// arguments and s the worker's scratch. Instantiated for float and double by the unit of each copy.
#define BO_FILTER_TASK_DECL(NS)                                                    \
  namespace NS {                                                                   \
  template <typename T>                                                            \
  void filter_task(Pass pass, const Args<T>& p, int64_t t, Scratch<T>& s);         \
  }
BO_FILTER_TASK_DECL(isa_default)
#if BO_ISA_COPIES
BO_FILTER_TASK_DECL(isa_v3)
BO_FILTER_TASK_DECL(isa_v4)
#endif
#undef BO_FILTER_TASK_DECL

}  // namespace filter
}  // namespace cpu
}  // namespace bilateral_ops
