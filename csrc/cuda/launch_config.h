#pragma once
// Every launch configuration of the CUDA kernels (grid, block, dynamic shared memory, the shared
// budget of the grad_grid scatter, the chunking of the deterministic gather), computed by plain
// host functions of the sizes. Pure C++, no CUDA or ATen: the launchers in csrc/cuda/*.cu use
// these plans as they are, and csrc/module.cpp exposes them to Python, so that
// tests/test_launch_config.py checks every plan against the limits of every architecture we
// build for on a machine without a GPU (a bad launch would otherwise only show on a GPU), and
// tools/ptxas_report.py checks the compiled kernels against the same constants.
//
// Kernels declare no static shared memory (kStaticSmem): everything a block shares is carved
// out of the dynamic buffer, so the dynamic request is the whole story and is budgeted here.
// Nothing opts in to more than 48 KiB, so no plan depends on the device.

#include <algorithm>
#include <cstdint>

#include "bilateral_ops/affine.h"
#include "bilateral_ops/grid_blur.h"
#include "bilateral_ops/slice_geometry.h"

namespace bilateral_ops {
namespace launch {

// ---------------------------------------------------------------------------------------------
// Limits common to sm_80, sm_86, sm_89 and sm_90.

constexpr int64_t kMaxThreadsPerBlock = 1024;
constexpr int64_t kMaxGridX = 2147483647;  // 2^31 - 1
constexpr int64_t kMaxGridYZ = 65535;
constexpr int64_t kSmemNoOptIn = 48 * 1024;  // static + dynamic shared memory per block
constexpr int64_t kRegistersPerBlock = 64 * 1024;
constexpr int64_t kMaxRegistersPerThread = 255;

// Largest static + dynamic shared memory per block with cudaFuncSetAttribute opt-in (unused by
// our plans; the tests check that a plan asking for opt-in would stay within these).
constexpr int64_t opt_in_smem_limit(int sm) {
  return sm == 80 ? 163 * 1024 : sm == 86 || sm == 89 ? 99 * 1024 : sm == 90 ? 227 * 1024 : 0;
}

// ---------------------------------------------------------------------------------------------
// Kernels and their __launch_bounds__ (the kernels use these very constants). Min-blocks values
// are chosen from ptxas's reports (make cuda-check prints them): each is the largest that does
// not make the float32 / float16 / bfloat16 instance spill.

constexpr int64_t kStaticSmem = 0;  // bytes of static __shared__ any kernel may declare

constexpr int kForwardThreads = 256;  // pack, forward (vectorised and scalar), axis, finish
// <= 128 registers: at 64 the vectorised slice_apply kernel (16 float4 loads in flight for rows
// of 8) and the float64 scalar one spill; at 80 too (on sm_86 / sm_89) since the taps also handle
// align_corners.
constexpr int kForwardMinBlocks = 2;
constexpr int kPackMinBlocks = 4;

// Backward pass per pixel: a block is a 32 x 8 pixel tile, one warp per image row segment, so
// that y (and everything derived from it) is uniform across a warp.
constexpr int kTileW = 32;
constexpr int kTileH = 8;
constexpr int kTileThreads = kTileW * kTileH;
// grad_guide / grad_input only: 4 blocks (64 registers) for float math, 3 (80) for double.
constexpr int tile_min_blocks(int acc_size) { return acc_size == 8 ? 3 : 4; }
// With the grad_grid scatter: 2 blocks (128 registers) for either accumulator. At 64 registers
// the float kernel spills inside the scatter loop (peer masks and offsets of the 4 corner groups
// stay live across it), and at 80 too since the taps also handle align_corners.
constexpr int scatter_min_blocks(int acc_size) { return acc_size == 8 ? 2 : 2; }
// The scatter's dynamic buffer starts with the tile's z range (two ints), padded to 16 bytes so
// that the accumulators after it are aligned for double.
constexpr int64_t kScatterHeaderBytes = 16;

// Deterministic grad_grid gather: a block per grid cell column (n, yc, xc), optionally split
// into `split` bands of its pixel footprint summed afterwards in a fixed order.
constexpr int kGatherThreads = 256;
constexpr int kGatherMinBlocks = 2;              // <= 128 registers
constexpr int kGatherMaxOwn = 4;                 // (c, z) outputs a thread accumulates at once
constexpr int64_t kGatherMaxChunk = 256;         // pixels staged in shared memory per round
constexpr int64_t kGatherHeaderBytes = 32;       // the footprint box, 4 int64
constexpr int64_t kGatherTargetBlocks = 1024;    // enough blocks to fill a GPU (132 SMs on H100)
constexpr int64_t kGatherMinPixelsPerBand = 4096;

// grid_blur: one thread per output element of one separable pass, grid-stride. The taps ride in
// the kernel parameters when there are at most kBlurParamTaps of them (sigma <= 15.5 cells, or an
// axis of at most 32 cells: every blur of the bilateral grid filter), else in a device buffer.
constexpr int kBlurThreads = 256;
constexpr int kBlurMinBlocks = 4;  // <= 64 registers
constexpr int64_t kBlurParamTaps = 32;
// Kernel parameters may take 4 KiB on every architecture we build for (grid_blur.cu asserts it).
constexpr int64_t kMaxKernelParamBytes = 4096;

// ---------------------------------------------------------------------------------------------
// Plans.

struct Dim3 {
  int64_t x = 1, y = 1, z = 1;
  int64_t volume() const { return x * y * z; }
};

struct Launch {
  bool present = false;        // whether this call launches the kernel at all
  const char* kernel = "";     // name of the __global__ function (tools/ptxas_report.py joins on it)
  Dim3 grid, block;
  int64_t dynamic_smem = 0;    // bytes requested at launch
  int64_t static_smem = kStaticSmem;  // budgeted static shared memory of the kernel
  bool opt_in = false;         // whether the launch needs cudaFuncAttributeMaxDynamicSharedMemorySize
  int max_threads = 0;         // __launch_bounds__ of the kernel
  int min_blocks = 0;
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid-stride kernels: enough blocks for one item per thread, within the grid limit.
inline int64_t blocks_for(int64_t items, int64_t per_block) {
  return std::max<int64_t>(1, std::min<int64_t>(ceil_div(items, per_block), kMaxGridX));
}

inline Launch make_launch(const char* kernel, int64_t blocks, int threads, int min_blocks,
                          int64_t dynamic_smem = 0) {
  Launch l;
  l.present = true;
  l.kernel = kernel;
  l.grid.x = blocks;
  l.block.x = threads;
  l.dynamic_smem = dynamic_smem;
  l.max_threads = threads;
  l.min_blocks = min_blocks;
  return l;
}

// Cells that a run of min(tile, n) consecutive pixels of an n-pixel axis touches on a G-cell
// axis (the extent of a tile's cell box along that axis).
//
// Claim: at most ceil((m - 1) * G / n) + 2 with m = min(tile, n), and at most G.
// Proof. Pixel p sits at s(p) = clamp((p + 0.5) G / n, 0.5, G - 0.5) - 0.5 and touches cells
// i0 = floor(s) and i1 = min(i0 + 1, G - 1). The clamp is monotone and 1-Lipschitz, so over the
// run s grows by at most d = (m - 1) G / n. For a <= b, floor(b) - floor(a) is an integer
// smaller than b - a + 1, hence at most ceil(b - a): the first pixel's i0 and the last pixel's
// i0 differ by at most ceil(d), and the cells touched, from the first i0 to the last i1 <= last
// i0 + 1, number at most ceil(d) + 2. Every index lies in [0, G - 1], hence also at most G.
// Rounding: the kernels compute s in double; s(p) is within a few ulps of its exact value, and
// an exact s that is not an integer is at least 1 / (2n) away from one (s = k / (2n) - 0.5 with
// k an integer), far more than those ulps while n * G < 2^40, so floor(s) is exact and the
// bound holds for the computed taps too. tests/test_launch_config.py checks it exhaustively.
inline int64_t max_cells(int64_t tile, int64_t n, int64_t G) {
  const int64_t m = std::min(tile, n);
  if (m <= 0) return std::min<int64_t>(G, 2);
  const int64_t span = ceil_div((m - 1) * G, n) + 2;
  return std::min(G, span);
}

// ---------------------------------------------------------------------------------------------
// Forward: bilateral_slice, bilateral_slice_apply and their _dguide companions.

struct ForwardPlan {
  // Float-opmath dtypes sample a packed copy of the grid with float4 loads when every packed row
  // is at most 8 floats: slice packs its channels 4 to a row (rows = ceil(C / 4)); slice_apply
  // packs the `stride` coefficients of one output channel to a row (rows = Co), padded to
  // 4 * chunks floats. float64 and wider affine rows take the scalar kernel.
  bool vectorised = false;
  int64_t chunks = 0;      // float4 per packed row
  int64_t rows = 0;        // packed rows per cell
  int64_t row_stride = 0;  // grid channels per packed row (<= 4 * chunks)
  int64_t packed_elems = 0;
  Launch pack, forward;
};

inline ForwardPlan forward_plan(const SliceGeometry& g, bool apply, const AffineLayout& l,
                                int64_t acc_size) {
  ForwardPlan p;
  const int64_t pixels = g.N * g.H * g.W;
  p.row_stride = apply ? l.stride : 4;
  const int64_t chunks = p.row_stride > 4 ? 2 : 1;
  const int64_t rows = apply ? l.Co : ceil_div(g.C, 4);
  // The kernel indexes one image's packed grid in int32 float4s.
  p.vectorised = acc_size == 4 && p.row_stride <= 8 &&
                 g.D * g.Gh * g.Gw * rows * chunks <= int64_t{2147483647};
  if (p.vectorised) {
    p.chunks = chunks;
    p.rows = rows;
    p.packed_elems = g.N * g.D * g.Gh * g.Gw * p.rows * 4 * p.chunks;
    p.pack = make_launch("pack_grid_kernel", blocks_for(p.packed_elems, kForwardThreads),
                         kForwardThreads, kPackMinBlocks);
    p.forward = make_launch("forward_vec_kernel", blocks_for(pixels, kForwardThreads),
                            kForwardThreads, kForwardMinBlocks);
  } else {
    p.forward = make_launch("forward_scalar_kernel", blocks_for(pixels, kForwardThreads),
                            kForwardThreads, kForwardMinBlocks);
  }
  return p;
}

// ---------------------------------------------------------------------------------------------
// Backward: _bilateral_slice_backward and _bilateral_slice_apply_backward.

struct BackwardRequest {
  bool need_grid = true, need_guide = true, need_input = true;  // output_mask
  bool deterministic = false;  // at::globalContext().deterministicAlgorithms()
};

struct BackwardPlan {
  bool valid = true;      // false: the gather cannot stage even one pixel (absurd channel counts)
  bool scatter = false;   // grad_grid by the atomic scatter of the tile kernel
  // Tile kernel: "backward_pixel_kernel" (grad_guide / grad_input only) or
  // "backward_scatter_kernel" (with the grad_grid scatter).
  Launch tile;
  int64_t box_x = 0, box_y = 0;  // scatter: most cells a tile touches along x / y
  int64_t shared_cap = 0;        // scatter: accumulators (acc_t) in shared memory; 0 = global only
  // Deterministic grad_grid.
  Launch axis, gather, finish;
  int64_t gather_chunk = 0;   // pixels staged per round
  int64_t gather_split = 1;   // bands per cell column (grid.y of the gather)
  int64_t gather_slices = 1;  // threads sharing one output (summed in a fixed order)
  int64_t gather_own = 1;     // outputs per thread per pass
  int64_t gather_passes = 1;
  int64_t gather_values = 0;  // per-pixel values staged (grad_output and input channels)
};

// Shared memory of the scatter tile for `cap` accumulators of acc_size bytes.
inline int64_t scatter_smem(int64_t cap, int64_t acc_size) {
  return cap > 0 ? kScatterHeaderBytes + cap * acc_size : 0;
}

inline int64_t scatter_max_cap(int64_t acc_size) {
  return (kSmemNoOptIn - kStaticSmem - kScatterHeaderBytes) / acc_size;
}

// Gather shared layout: header | reduction (kGatherThreads double) | chunk x (int2 z taps,
// 2 weights, `values` staged values).
inline int64_t gather_pixel_bytes(int64_t values, int64_t acc_size) {
  return 8 + (2 + values) * acc_size;
}
inline int64_t gather_smem(int64_t chunk, int64_t values, int64_t acc_size) {
  return kGatherHeaderBytes + kGatherThreads * 8 + chunk * gather_pixel_bytes(values, acc_size);
}

inline BackwardPlan backward_plan(const SliceGeometry& g, bool apply, const AffineLayout& l,
                                  int64_t acc_size, const BackwardRequest& r) {
  BackwardPlan p;
  const bool per_pixel = r.need_guide || (apply && r.need_input);
  p.scatter = r.need_grid && !r.deterministic;
  const int64_t tiles = g.N * ceil_div(g.H, kTileH) * ceil_div(g.W, kTileW);
  if (p.scatter) {
    p.box_x = max_cells(kTileW, g.W, g.Gw);
    p.box_y = max_cells(kTileH, g.H, g.Gh);
    const int64_t max_cap = scatter_max_cap(acc_size);
    const int64_t column = g.C * p.box_x * p.box_y;  // one z level of the box, every channel
    const int64_t want = column * g.D;               // the box for a guide spanning every level
    if (want <= max_cap) {
      p.shared_cap = want;
    } else if (column * std::min<int64_t>(g.D, 2) <= max_cap) {
      p.shared_cap = max_cap;  // tiles whose guide spans few levels still fit
    } else {
      p.shared_cap = 0;  // not even a flat tile fits: global atomics, and no shared memory
    }
    p.tile = make_launch("backward_scatter_kernel", blocks_for(tiles, 1), kTileThreads,
                         scatter_min_blocks(static_cast<int>(acc_size)),
                         scatter_smem(p.shared_cap, acc_size));
  } else if (per_pixel) {
    p.tile = make_launch("backward_pixel_kernel", blocks_for(tiles, 1), kTileThreads,
                         tile_min_blocks(static_cast<int>(acc_size)));
  }
  if (!r.need_grid || !r.deterministic) return p;

  p.gather_values = apply ? l.Co + l.Ci : g.C;
  const int64_t stage = kSmemNoOptIn - kStaticSmem - gather_smem(0, 0, acc_size);
  int64_t chunk = std::min(kGatherMaxChunk, stage / gather_pixel_bytes(p.gather_values, acc_size));
  if (chunk >= 32) chunk -= chunk % 32;
  if (chunk < 1) {
    p.valid = false;
    return p;
  }
  p.gather_chunk = chunk;
  const int64_t outputs = g.C * g.D;
  if (outputs <= kGatherThreads) {
    p.gather_slices = kGatherThreads / outputs;
  } else {
    p.gather_own = std::min<int64_t>(kGatherMaxOwn, ceil_div(outputs, kGatherThreads));
    p.gather_passes = ceil_div(outputs, kGatherThreads * p.gather_own);
  }
  // Split the footprints of few, large cells: enough blocks for the GPU, but bands of at least
  // kGatherMinPixelsPerBand pixels. Sizes only: the summation order is the same on every run.
  const int64_t columns = g.N * g.Gh * g.Gw;
  const int64_t fw = std::min(g.W, 2 * ceil_div(g.W, g.Gw) + 2);
  const int64_t fh = std::min(g.H, 2 * ceil_div(g.H, g.Gh) + 2);
  const int64_t split = std::min(ceil_div(kGatherTargetBlocks, columns),
                                 ceil_div(fw * fh, kGatherMinPixelsPerBand));
  p.gather_split = std::max<int64_t>(1, std::min(split, kMaxGridYZ));
  p.axis = make_launch("axis_table_kernel", blocks_for(g.W + g.H, kForwardThreads),
                       kForwardThreads, 0);
  p.gather = make_launch("grad_grid_gather_kernel", std::min(columns, kMaxGridX), kGatherThreads,
                         kGatherMinBlocks, gather_smem(chunk, p.gather_values, acc_size));
  p.gather.grid.y = p.gather_split;
  if (p.gather_split > 1) {
    const int64_t elems = g.N * g.C * g.D * g.Gh * g.Gw;
    p.finish = make_launch("gather_finish_kernel", blocks_for(elems, kForwardThreads),
                           kForwardThreads, 0);
  }
  return p;
}

// ---------------------------------------------------------------------------------------------
// grid_splat: the grid gradient of bilateral_slice's backward with grad_output = the image (the
// splat is the slice's transpose), and nothing else: the same scatter or deterministic gather
// kernels, and never the grid's values.

inline BackwardRequest splat_request(bool deterministic) {
  BackwardRequest r;
  r.need_grid = true;
  r.need_guide = false;
  r.need_input = false;
  r.deterministic = deterministic;
  return r;
}

inline BackwardPlan splat_plan(const SliceGeometry& g, int64_t acc_size, bool deterministic) {
  return backward_plan(g, false, AffineLayout{0, 0, 0, false}, acc_size,
                       splat_request(deterministic));
}

// ---------------------------------------------------------------------------------------------
// grid_blur: one pass per axis with sigma > 0, the contiguous axis first (as on the CPU). A grid
// (N, C, D, Gh, Gw) is viewed, for axis a, as (outer, n, inner) with n the axis' length; the pass
// over `total` = N C D Gh Gw elements writes element e = (o, i, j) from the taps of
// blur_taps(sigma, n): k[0..m], m = min(ceil(2 sigma), n - 1).

struct BlurPass {
  int axis = 0;            // 0: D, 1: Gh, 2: Gw
  int64_t n = 0, inner = 0, total = 0;
  int64_t taps = 0;        // m + 1
  bool param_taps = false; // taps passed by value in the kernel parameters
  bool wide = false;       // int64 index arithmetic (total >= 2^31)
  Launch launch;
};

struct BlurPlan {
  int passes = 0;          // 0: every sigma is 0, the result is a copy
  BlurPass pass[3];        // in launch order
};

inline BlurPlan blur_plan(int64_t N, int64_t C, int64_t D, int64_t Gh, int64_t Gw,
                          const double sigma[3]) {
  BlurPlan p;
  const int64_t G[3] = {D, Gh, Gw};
  const int64_t total = N * C * D * Gh * Gw;
  if (total <= 0) return p;
  const int64_t inner[3] = {Gh * Gw, Gw, 1};
  for (int a = 2; a >= 0; --a) {
    const int64_t r = blur_radius(sigma[a]);
    if (r == 0) continue;
    BlurPass& b = p.pass[p.passes++];
    b.axis = a;
    b.n = G[a];
    b.inner = inner[a];
    b.total = total;
    b.taps = std::min<int64_t>(r, G[a] - 1) + 1;
    b.param_taps = b.taps <= kBlurParamTaps;
    b.wide = total > int64_t{2147483647};
    b.launch = make_launch("grid_blur_kernel", blocks_for(total, kBlurThreads), kBlurThreads,
                           kBlurMinBlocks);
  }
  return p;
}

// ---------------------------------------------------------------------------------------------
// curve_guide: grid-stride kernels over pixels. The parameter table (P values, curve_guide.h) is
// copied into shared memory when small; the backward pass sums parameter gradients per warp
// (shuffles) into one row per warp, in shared memory when the rows fit, then per block, and a
// second kernel adds the blocks' rows in a fixed order. No atomics anywhere: the result does not
// depend on scheduling, so the same path serves torch's deterministic mode.
//
// The group kernels (the forward's four pixels a thread, and the backward of HDRNet's shapes
// below) also build each channel's curve through its sorted knots in shared memory
// (curve_guide.h): C (3K + 2) values after the table.

constexpr int kCurveThreads = 256;
constexpr int kCurveWarps = kCurveThreads / 32;
constexpr int kCurveMinBlocks = 2;               // <= 128 registers
constexpr int kCurveRegChannels = 4;             // C <= this: a pixel's channels in registers
constexpr int kCurveGroup = 4;  // forward with registers: consecutive pixels per thread
// The forward group kernel in float math: <= 80 registers, 24 warps an SM to keep the loads in
// flight (the sorted curves leave it bound by memory); float64 spills at 80, so 128 registers.
constexpr int curve_forward_group_min_blocks(int64_t acc_size) { return acc_size == 8 ? 2 : 3; }
constexpr int64_t kCurveTableSmem = 16 * 1024;   // largest table copied to shared memory
// The sorted curves take at most 1.5 times the table (C (3K + 2) <= 1.5 (2CK + C^2 + 2C + 1)).
constexpr int64_t kCurveGroupSmem = kCurveTableSmem * 5 / 2;
// Forward blocks: enough to fill a GPU a few times over, few enough that each loops over several
// groups (a block builds the sorted curves once).
constexpr int64_t kCurveForwardMaxBlocks = 2048;
constexpr int64_t kCurveBackwardMaxBlocks = 1024;  // partial rows: fixed by the sizes alone
constexpr int64_t kCurveMaxPartial = int64_t{1} << 24;  // elements of the partial rows
// The backward with every parameter gradient summed in registers across the thread's pixels
// (curve_backward_group_kernel): float math, C in {1, 3}, K <= kCurveGroupMaxK, the table in
// shared memory; also when only the input gradient is wanted (the same bits as with the others). C = 3, K = 16 keeps 112 sums: at most 168 registers a thread, 12 warps an SM.
// Each thread takes at least kCurveGroupPixels pixels, so that the block's set-up (the sorted
// curves) and its final reduction (a shuffle sum per parameter) stay small beside the pixels.
constexpr int kCurveGroupThreads = 128;
constexpr int kCurveGroupWarps = kCurveGroupThreads / 32;
constexpr int kCurveGroupMinBlocks = 3;
constexpr int64_t kCurveGroupMaxK = 16;
constexpr int64_t kCurveGroupPixels = 8;
// curve_reduce_kernel: a block per table entry, its threads' double sums added as a tree.
constexpr int64_t kCurveReduceSmem = kCurveThreads * 8;

struct CurveRequest {
  bool backward = false;
  bool need_input = true, need_params = true;  // backward: output_mask[0], any of [1..6]
  int64_t sms = 0;  // forward: the device's multiprocessors (0: unknown, the fixed cap)
};

struct CurvePlan {
  int64_t table_size = 0;      // P
  bool table_shared = false;   // table in shared memory (else read from global)
  bool rows_shared = false;    // backward: per-warp rows in shared memory (else in `partial`)
  bool registers = false;      // C <= kCurveRegChannels
  bool group = false;          // a group kernel (sorted curves after the table in shared memory)
  int64_t partial_rows = 0;    // backward with parameters: rows the reduce kernel adds up
  Launch main, reduce;         // main: curve_forward_group_kernel, curve_forward_kernel,
                               // curve_backward_group_kernel or curve_backward_kernel
};

inline int64_t curve_table_bytes(int64_t P, int64_t acc_size) { return P * acc_size; }
// Every channel's sorted knots (K) and prefix-sum pairs (2 (K + 1)).
inline int64_t curve_sorted_bytes(int64_t C, int64_t K, int64_t acc_size) {
  return C * (3 * K + 2) * acc_size;
}

inline CurvePlan curve_plan(int64_t N, int64_t C, int64_t H, int64_t W, int64_t K,
                            int64_t acc_size, const CurveRequest& r) {
  CurvePlan p;
  const int64_t P = C * C + 2 * C + 2 * C * K + 1;
  const int64_t pixels = N * H * W;
  p.table_size = P;
  p.registers = C <= kCurveRegChannels;
  p.table_shared = curve_table_bytes(P, acc_size) <= kCurveTableSmem;
  const int64_t table_smem = p.table_shared ? curve_table_bytes(P, acc_size) : 0;
  const int64_t sorted_smem = curve_sorted_bytes(C, K, acc_size);
  if (!r.backward) {
    // With registers and a shared table each thread takes kCurveGroup pixels: one read of each
    // parameter serves them all (the loop is bound by those reads and the arithmetic, not by
    // memory, at one pixel per thread).
    p.group = p.registers && p.table_shared;
    const int64_t items = p.group ? ceil_div(pixels, kCurveGroup) : pixels;
    const int64_t min_blocks = p.group ? curve_forward_group_min_blocks(acc_size) : kCurveMinBlocks;
    // On a known device, one wave of the blocks its launch bounds keep resident: the grid-stride
    // loop then ends on every multiprocessor at about the same time, and each block gathers and
    // sorts the table once (2048 blocks are 5.2 waves of 396 on an H200's 132 multiprocessors,
    // the last a fifth full). Each pixel's value is the same whatever the grid.
    const int64_t cap = r.sms > 0 ? r.sms * min_blocks : kCurveForwardMaxBlocks;
    p.main = make_launch(p.group ? "curve_forward_group_kernel" : "curve_forward_kernel",
                         std::min(blocks_for(items, kCurveThreads), cap), kCurveThreads,
                         min_blocks, table_smem + (p.group ? sorted_smem : 0));
    return p;
  }
  const bool params = r.need_params;
  // Whatever the mask, so that every gradient has the same bits whichever others are wanted.
  p.group = acc_size == 4 && p.table_shared && (C == 1 || C == 3) && K <= kCurveGroupMaxK;
  if (p.group) {
    // One row per block: the warps' rows sit in shared memory after the sorted curves.
    p.rows_shared = params;
    const int64_t blocks = std::min(
        blocks_for(pixels, kCurveGroupThreads * kCurveGroupPixels), kCurveBackwardMaxBlocks);
    // The table, the sorted curves, each channel's shifts padded to kCurveGroupMaxK, the rows.
    p.main = make_launch("curve_backward_group_kernel", blocks, kCurveGroupThreads,
                         kCurveGroupMinBlocks,
                         table_smem + sorted_smem + C * kCurveGroupMaxK * acc_size +
                             (params ? kCurveGroupWarps * P * acc_size : 0));
    if (params) p.partial_rows = blocks;
  } else {
    const int64_t rows_smem = params ? kCurveWarps * P * acc_size : 0;
    p.rows_shared = params && table_smem + rows_smem <= kSmemNoOptIn - kStaticSmem;
    const int64_t rows_per_block = p.rows_shared ? 1 : kCurveWarps;
    int64_t blocks = std::min(blocks_for(pixels, kCurveThreads), kCurveBackwardMaxBlocks);
    if (params) blocks = std::max<int64_t>(1, std::min(blocks, kCurveMaxPartial / (rows_per_block * P)));
    p.main = make_launch("curve_backward_kernel", blocks, kCurveThreads, kCurveMinBlocks,
                         table_smem + (p.rows_shared ? rows_smem : 0));
    if (params) p.partial_rows = blocks * rows_per_block;
  }
  if (params) {
    p.reduce = make_launch("curve_reduce_kernel", P, kCurveThreads, 0, kCurveReduceSmem);
  }
  return p;
}

// ---------------------------------------------------------------------------------------------
// bilateral_filter and _bilateral_filter_backward (csrc/cuda/bilateral_filter.cu).
//
// Forward and backward pass 1 run a 32 x 8 pixel tile per block. When it fits in 48 KiB, the
// block stages its (8 + 2 py) x (32 + 2 px) window of guidance and input (one copy when the input
// guides itself) in shared memory, in the accumulation type; otherwise (wide kernels, many
// channels) it reads global memory through the border maps. Pass 1 also reserves a reduction
// buffer for the per-block sigma sums. Given the forward's output and weight sums (saved) and no
// sigma gradient wanted, pass 1 is filter_centre_kernel instead, pixel by pixel (a 1-D grid).
// Pass 2 gathers per padded position (a 1-D grid), the fold per image pixel, the finish kernel
// per image.
//
// Fast paths: for C in {1, 3} with the input its own guidance or a guidance of 1 or 3 channels,
// forward, pass 1 and pass 2 have kernels with the channel counts and the distance compiled in
// (the *_fast_kernel names). They always stage: their window, then a table of the ky row and kx
// column spatial exponents (then pass 1's reduction buffer). Pass 2's runs a 32 x 8 tile of
// padded positions per block and stages the window of the positions paired with them: their
// guide, gp and a, and a joint filter's input when the guidance gradient is wanted (C + Cg + 1
// planes, plus C then). A shape whose staging does not fit runs the generic kernels.

constexpr int kFilterTileW = 32;
constexpr int kFilterTileH = 8;
constexpr int kFilterThreads = kFilterTileW * kFilterTileH;
constexpr int kFilterMinBlocks = 2;  // <= 128 registers
// Pass 2 keeps two groups of channel accumulators and the gather's indices live: at 128
// registers its float instance spills, so it takes a whole register file per block.
constexpr int kFilterPass2MinBlocks = 1;
constexpr int64_t kFilterReduceBytes = 3 * kFilterThreads * 8;  // three double sums per thread
// The fast kernels keep a few channels in registers: <= 64 registers for float math; their
// float64 pass 1 and pass 2 spill at 64, so 2 blocks (128 registers) for double.
constexpr int filter_fast_min_blocks(int64_t acc_size) { return acc_size == 8 ? 2 : 4; }

struct FilterSizes {
  int64_t N, C, Cg, H, W, ky, kx;
  bool self;  // the input is its own guidance (staged once)
};

struct FilterPlan {
  bool valid = true;   // false: more tiles or positions than one grid can address
  bool tiled = false;  // the generic forward / pass 1 would stage their window in shared memory
  bool fast = false;        // forward / pass 1 run the fast kernels
  bool fast_pass2 = false;  // pass 2 runs its fast kernel
  bool centre = false;      // pass 1 is filter_centre_kernel (from the forward's output and W)
  int64_t tiles_x = 0, tiles_y = 0, staged_channels = 0, tile_bytes = 0;
  int64_t pass2_tiles_x = 0, pass2_tiles_y = 0;  // tiles of the padded image (fast pass 2)
  Launch forward, pass1, pass2, fold_input, fold_guidance, finish;
};

// The channel counts the fast kernels are compiled for.
inline bool filter_fast_channels(const FilterSizes& s) {
  return (s.C == 1 || s.C == 3) && (s.self ? s.Cg == s.C : s.Cg == 1 || s.Cg == 3);
}

// The fast kernels' table of spatial exponents (ky rows, then kx columns), rounded up to 8 bytes.
inline int64_t filter_table_bytes(const FilterSizes& s, int64_t acc_size) {
  return ceil_div((s.ky + s.kx) * acc_size, 8) * 8;
}

// The fast pass 2's window: guide, gp and a, C + Cg + 1 planes, plus C for the input of a joint
// filter whose guidance gradient is wanted (its pairs' e_qp).
inline int64_t filter_pass2_tile_bytes(const FilterSizes& s, int64_t acc_size, bool guidance_grad) {
  const int64_t planes = s.C + s.Cg + 1 + (!s.self && guidance_grad ? s.C : 0);
  return ceil_div(planes * (kFilterTileH + s.ky - 1) * (kFilterTileW + s.kx - 1) * acc_size, 8) * 8;
}

// Shared memory of the staged window of one tile, acc_size bytes per value, rounded up to 8 bytes:
// pass 1's reduction buffer of doubles follows it.
inline int64_t filter_tile_bytes(const FilterSizes& s, int64_t acc_size) {
  const int64_t channels = s.self ? s.C : s.C + s.Cg;
  return ceil_div(channels * (kFilterTileH + s.ky - 1) * (kFilterTileW + s.kx - 1) * acc_size, 8) * 8;
}

inline Launch filter_tile_launch(const char* kernel, int64_t tiles, int64_t smem,
                                 int min_blocks = kFilterMinBlocks) {
  Launch l = make_launch(kernel, tiles, kFilterThreads, min_blocks, smem);
  l.block.x = kFilterTileW;
  l.block.y = kFilterTileH;
  return l;
}

// pass_backward false: the forward launch only. mask: grad (input, guidance, sigma_color,
// sigma_space) wanted. saved: the backward has the forward's output and weight sums.
inline FilterPlan filter_plan(const FilterSizes& s, int64_t acc_size, bool backward,
                              const bool mask[4], bool saved = false) {
  FilterPlan p;
  if (s.N * s.H * s.W == 0 || s.C == 0) return p;
  p.tiles_x = ceil_div(s.W, kFilterTileW);
  p.tiles_y = ceil_div(s.H, kFilterTileH);
  const int64_t tiles = s.N * p.tiles_x * p.tiles_y;
  const int64_t Hp = s.H + s.ky - 1, Wp = s.W + s.kx - 1;
  if (tiles > kMaxGridX || s.N * std::max(s.C, s.Cg) * Hp * Wp > (int64_t{1} << 62)) {
    p.valid = false;
    return p;
  }
  p.staged_channels = s.self ? s.C : s.C + s.Cg;
  p.tile_bytes = filter_tile_bytes(s, acc_size);
  const bool need_sigma = backward && (mask[2] || mask[3]);
  const int64_t reduce = backward ? kFilterReduceBytes : 0;
  const int64_t budget = kSmemNoOptIn - kStaticSmem, table = filter_table_bytes(s, acc_size);
  p.tiled = p.tile_bytes + reduce <= budget;
  p.fast = filter_fast_channels(s) && p.tile_bytes + table + reduce <= budget;
  const int64_t smem = p.fast ? p.tile_bytes + table + reduce : (p.tiled ? p.tile_bytes : 0) + reduce;
  if (!backward) {
    p.forward = p.fast ? filter_tile_launch("filter_forward_fast_kernel", tiles, smem,
                                            filter_fast_min_blocks(acc_size))
                       : filter_tile_launch("filter_forward_kernel", tiles, smem);
    return p;
  }
  const bool need_pixels = mask[0] || mask[1];
  if (!need_pixels && !need_sigma) return p;
  p.centre = saved && !need_sigma;
  if (p.centre) {
    p.pass1 = make_launch("filter_centre_kernel", blocks_for(s.N * s.H * s.W, kFilterThreads), kFilterThreads,
                          kFilterMinBlocks);
  } else {
    p.pass1 = p.fast ? filter_tile_launch("filter_pass1_fast_kernel", tiles, smem, filter_fast_min_blocks(acc_size))
                     : filter_tile_launch("filter_pass1_kernel", tiles, smem);
  }
  if (need_pixels) {
    p.pass2_tiles_x = ceil_div(Wp, kFilterTileW);
    p.pass2_tiles_y = ceil_div(Hp, kFilterTileH);
    const int64_t pass2_tiles = s.N * p.pass2_tiles_x * p.pass2_tiles_y;
    const int64_t pass2_smem = filter_pass2_tile_bytes(s, acc_size, mask[1]) + table;
    p.fast_pass2 = filter_fast_channels(s) && pass2_tiles <= kMaxGridX && pass2_smem <= budget;
    p.pass2 = p.fast_pass2 ? filter_tile_launch("filter_pass2_fast_kernel", pass2_tiles, pass2_smem,
                                                filter_fast_min_blocks(acc_size))
                           : make_launch("filter_pass2_kernel", blocks_for(s.N * Hp * Wp, kFilterThreads),
                                         kFilterThreads, kFilterPass2MinBlocks);
  }
  if (mask[0]) {
    p.fold_input = make_launch("filter_fold_kernel", blocks_for(s.N * s.C * s.H * s.W, kFilterThreads),
                               kFilterThreads, kFilterMinBlocks);
  }
  if (mask[1] && !s.self) {
    p.fold_guidance = make_launch("filter_fold_kernel",
                                  blocks_for(s.N * s.Cg * s.H * s.W, kFilterThreads),
                                  kFilterThreads, kFilterMinBlocks);
  }
  if (need_sigma) {
    p.finish = make_launch("filter_finish_kernel", s.N, kFilterThreads, kFilterMinBlocks,
                           kFilterReduceBytes);
    p.finish.grid.x = std::min(s.N, kMaxGridX);
  }
  return p;
}

// ---------------------------------------------------------------------------------------------
// bilateral_slice_apply_points (csrc/cuda/bilateral_slice_apply_points.cu): one thread per sample,
// grid-stride. The backward adds the grid gradient as 64-bit fixed point (integer atomics, whose
// sum does not depend on their order: deterministic in every mode), warp-aggregated, into an
// int64 buffer that points_grid_finish_kernel converts; the loop over samples is warp-uniform
// (the aggregation needs every lane). grid_tv_loss (csrc/cuda/grid_tv_loss.cu): a fixed number
// of blocks (from the sizes alone) sums its elements into one partial per block, and a
// single-block kernel adds the partials in order: deterministic, and the loss never leaves the
// device.

constexpr int kPointsThreads = 256;
constexpr int64_t kPointsMaxBlocks = 65536;
// The fast path (points_pack_kernel, points_forward_fast_kernel, points_backward_fast_kernel):
// the bilagrid layout (3 input channels, an offset: C = 12) compiled in, on a copy of the grids
// packed cell-major, (M, cells, kPointsPackedChannels) in the accumulator type, so that a corner's
// coefficients are three 16-byte loads. Taken when that copy has fewer than 2^31 elements (32-bit
// offsets) and there are at least as many samples as grid cells (else packing costs more than it
// saves: BilaRF's 16384 rays over 100 grids keep the plain kernels).
constexpr int64_t kPointsFastCi = 3;
constexpr int64_t kPointsFastC = 12;
constexpr int64_t kPointsPackedChannels = 12;  // kPointsFastC rounded up to a multiple of 4
// Its backward privatises the grid gradient per block: a block sums the 64-bit fixed-point
// contributions of its samples to a slice of `slice_channels` channels of every cell of the M
// grids in shared memory (M cells slice_channels 8 bytes within the no-opt-in budget, at most
// kPointsMaxSliceChannels), blockIdx.y picks the slice, and each block adds its non-zero sums to
// the global buffer at the end. Shapes whose grids do not fit even one channel keep
// points_backward_kernel's global atomics. kPointsSharedBlocks blocks in all (over x and y):
// enough for a few waves on any GPU, few enough that the final flushes stay cheap.
constexpr int64_t kPointsMaxSliceChannels = 6;
constexpr int64_t kPointsSharedBlocks = 1024;
constexpr int64_t kPointsSlabEntryBytes = 8;  // one unsigned 64-bit fixed-point sum
// A full slab (48 KiB) leaves room for 3 blocks of an SM on sm_80 (164 KiB; 2 on sm_86 / 89),
// 4 on sm_90 (228 KiB): the kernel's bounds ask for this many, 85 registers (the plans do not
// depend on the dtype, so neither does this bound; float64 may spill a little), and one more on
// sm_90 (64 registers; bilateral_slice_apply_points.cu).
constexpr int kPointsFastBackwardMinBlocks = 3;
constexpr int kTvThreads = 256;
constexpr int64_t kTvMaxBlocks = 1024;  // partials of the loss: fixed by the sizes alone
constexpr int64_t kTvReduceBytes = (kTvThreads / 32) * 8;  // one double per warp

// Launch order: pack, forward, samples, backward, finish. On the fast path, backward is
// points_backward_fast_kernel (the grid gradient) with samples points_sample_grad_fast_kernel
// (the coordinate / input gradients, when asked for); without the grid gradient, backward is
// points_sample_grad_fast_kernel itself.
struct PointsPlan {
  Launch pack, absmax, forward, samples, backward, finish;
  bool fast = false;           // the fast path (packed grids, C = 12 compiled in)
  int64_t slice_channels = 0;  // channels a block of the fast backward privatises (0: none)
};

// Whether the fast kernels handle the layout (C channels, Ci input channels, an offset or not).
inline bool points_fast_layout(int64_t C, int64_t Ci, bool has_offset) {
  return C == kPointsFastC && Ci == kPointsFastCi && has_offset;
}

// Channels of the grid gradient a block of the fast backward can sum in shared memory: the most,
// up to kPointsMaxSliceChannels and C, whose slab (M cells channels of 8 bytes) fits the
// no-opt-in budget; 0 when not even one channel fits.
inline int64_t points_slice_channels(int64_t M, int64_t C, int64_t cells) {
  const int64_t budget = kSmemNoOptIn - kStaticSmem;
  if (M <= 0 || cells <= 0 || M > budget || cells > budget) return 0;
  const int64_t per_channel = M * cells * kPointsSlabEntryBytes;
  if (per_channel > budget) return 0;
  return std::min({C, kPointsMaxSliceChannels, budget / per_channel});
}

// mask: the backward's output_mask (grid, coords, input); null for the forward. Ci / has_offset:
// the layout of the C channels (Python's _C.points_plans passes neither: the bilagrid layout,
// 3 input channels and an offset, which with C = 12 takes the fast path).
inline PointsPlan points_plan(int64_t P, int64_t M, int64_t C, int64_t cells, const bool* mask,
                              int64_t Ci = kPointsFastCi, bool has_offset = true) {
  PointsPlan p;
  if (P <= 0) return p;
  const int64_t blocks = std::min(blocks_for(P, kPointsThreads), kPointsMaxBlocks);
  const bool need_grid = mask != nullptr && mask[0];
  const bool any = mask == nullptr || mask[0] || mask[1] || mask[2];
  if (!any) return p;
  const int64_t packed = M * cells * kPointsPackedChannels;  // M C cells < 2^62 (checked)
  const bool fast_shape = points_fast_layout(C, Ci, has_offset) && M <= (int64_t{1} << 31) &&
                          cells <= (int64_t{1} << 31) && packed < (int64_t{1} << 31) &&
                          P >= M * cells;
  const int64_t slice = fast_shape && need_grid ? points_slice_channels(M, C, cells) : 0;
  // The backward computing the grid gradient needs its slab; the other passes only the packing.
  p.fast = fast_shape && (!need_grid || slice > 0);
  // The packed copy serves the forward and the coordinate / input gradients.
  if (p.fast && (mask == nullptr || mask[1] || mask[2])) {
    p.pack = make_launch("points_pack_kernel",
                         std::min(blocks_for(packed, kPointsThreads), kPointsMaxBlocks),
                         kPointsThreads, 0);
  }
  if (mask == nullptr) {
    p.forward = p.fast ? make_launch("points_forward_fast_kernel", blocks, kPointsThreads, 0)
                       : make_launch("points_forward_kernel", blocks, kPointsThreads, 0);
    return p;
  }
  if (need_grid) {
    // The bound of the fixed-point sums (max |grad_output| and max |input|), on the device.
    p.absmax = make_launch("points_absmax_kernel", blocks, kPointsThreads, 0);
  }
  if (p.fast) {
    const Launch samples = make_launch("points_sample_grad_fast_kernel", blocks, kPointsThreads, 0);
    if (need_grid) {
      if (mask[1] || mask[2]) p.samples = samples;
      p.slice_channels = slice;
      const int64_t slices = ceil_div(C, slice);
      const int64_t x = std::min(blocks_for(P, kPointsThreads),
                                 std::max<int64_t>(1, kPointsSharedBlocks / slices));
      p.backward = make_launch("points_backward_fast_kernel", x, kPointsThreads,
                               kPointsFastBackwardMinBlocks,
                               M * cells * slice * kPointsSlabEntryBytes);
      p.backward.grid.y = slices;
    } else {
      p.backward = samples;
    }
  } else {
    p.backward = make_launch("points_backward_kernel", blocks, kPointsThreads, 0);
  }
  if (need_grid) {
    p.finish = make_launch("points_grid_finish_kernel",
                           std::min(blocks_for(M * C * cells, kPointsThreads), kPointsMaxBlocks),
                           kPointsThreads, 0);
  }
  return p;
}

struct TvPlan {
  int64_t partials = 0;  // forward: blocks of tv_loss_kernel, summed by tv_reduce_kernel
  Launch count, loss, reduce, backward;
};

// numel: the elements of one grid (C D Gh Gw); B the grids of the loss (idx's length or M).
// vec: elements per thread item, 4 for the kernels' runs of 4 along x (Gw % 4 == 0 and every flat
// index below 2^31: a choice from the sizes alone), else 1.
inline TvPlan tv_plan(int64_t M, int64_t B, int64_t numel, bool has_idx, bool backward,
                      int64_t vec = 1) {
  TvPlan p;
  if (!backward) {
    // Launched even for an empty loss: the reduce writes the result (0, or NaN for B = 0).
    const int64_t blocks = std::min(blocks_for(ceil_div(B * numel, vec), kTvThreads), kTvMaxBlocks);
    p.partials = blocks;
    p.loss = make_launch("tv_loss_kernel", blocks, kTvThreads, 0, kTvReduceBytes);
    p.reduce = make_launch("tv_reduce_kernel", 1, kTvThreads, 0, kTvReduceBytes);
    return p;
  }
  if (M * numel <= 0) return p;
  if (has_idx && B > 0) {
    p.count = make_launch("tv_count_kernel", std::min(blocks_for(B, kTvThreads), kPointsMaxBlocks),
                          kTvThreads, 0);
  }
  p.backward = make_launch("tv_backward_kernel",
                           std::min(blocks_for(ceil_div(M * numel, vec), kTvThreads), kPointsMaxBlocks),
                           kTvThreads, 0);
  return p;
}

// ---------------------------------------------------------------------------------------------
// Per-kernel bounds for tools/ptxas_report.py: the __launch_bounds__ of each kernel and the
// largest dynamic shared memory any plan above requests from it, by accumulator size.

struct KernelInfo {
  const char* kernel;
  int max_threads, min_blocks;
  int64_t static_smem, max_dynamic_smem;
};

inline int kernel_info(int64_t acc_size, KernelInfo* out) {
  const int64_t gather_max = kSmemNoOptIn - kStaticSmem;  // chunk is sized to fill at most this
  const KernelInfo all[] = {
      {"pack_grid_kernel", kForwardThreads, kPackMinBlocks, kStaticSmem, 0},
      {"forward_vec_kernel", kForwardThreads, kForwardMinBlocks, kStaticSmem, 0},
      {"forward_scalar_kernel", kForwardThreads, kForwardMinBlocks, kStaticSmem, 0},
      {"backward_pixel_kernel", kTileThreads, tile_min_blocks(static_cast<int>(acc_size)),
       kStaticSmem, 0},
      {"backward_scatter_kernel", kTileThreads, scatter_min_blocks(static_cast<int>(acc_size)),
       kStaticSmem, scatter_smem(scatter_max_cap(acc_size), acc_size)},
      {"axis_table_kernel", kForwardThreads, 0, kStaticSmem, 0},
      {"grad_grid_gather_kernel", kGatherThreads, kGatherMinBlocks, kStaticSmem, gather_max},
      {"gather_finish_kernel", kForwardThreads, 0, kStaticSmem, 0},
      {"grid_blur_kernel", kBlurThreads, kBlurMinBlocks, kStaticSmem, 0},
      {"curve_forward_kernel", kCurveThreads, kCurveMinBlocks, kStaticSmem, kCurveTableSmem},
      {"curve_forward_group_kernel", kCurveThreads, curve_forward_group_min_blocks(acc_size), kStaticSmem,
       kCurveGroupSmem},
      {"curve_backward_kernel", kCurveThreads, kCurveMinBlocks, kStaticSmem,
       kSmemNoOptIn - kStaticSmem},
      {"curve_backward_group_kernel", kCurveGroupThreads, kCurveGroupMinBlocks, kStaticSmem,
       kCurveTableSmem},
      {"curve_reduce_kernel", kCurveThreads, 0, kStaticSmem, kCurveReduceSmem},
      {"filter_forward_kernel", kFilterThreads, kFilterMinBlocks, kStaticSmem, kSmemNoOptIn},
      {"filter_pass1_kernel", kFilterThreads, kFilterMinBlocks, kStaticSmem, kSmemNoOptIn},
      {"filter_pass2_kernel", kFilterThreads, kFilterPass2MinBlocks, kStaticSmem, 0},
      {"filter_forward_fast_kernel", kFilterThreads, filter_fast_min_blocks(acc_size), kStaticSmem,
       kSmemNoOptIn},
      {"filter_pass1_fast_kernel", kFilterThreads, filter_fast_min_blocks(acc_size), kStaticSmem,
       kSmemNoOptIn},
      {"filter_pass2_fast_kernel", kFilterThreads, filter_fast_min_blocks(acc_size), kStaticSmem,
       kSmemNoOptIn},
      {"filter_fold_kernel", kFilterThreads, kFilterMinBlocks, kStaticSmem, 0},
      {"filter_centre_kernel", kFilterThreads, kFilterMinBlocks, kStaticSmem, 0},
      {"filter_finish_kernel", kFilterThreads, kFilterMinBlocks, kStaticSmem, kFilterReduceBytes},
      {"points_forward_kernel", kPointsThreads, 0, kStaticSmem, 0},
      {"points_backward_kernel", kPointsThreads, 0, kStaticSmem, 0},
      {"points_pack_kernel", kPointsThreads, 0, kStaticSmem, 0},
      {"points_forward_fast_kernel", kPointsThreads, 0, kStaticSmem, 0},
      {"points_sample_grad_fast_kernel", kPointsThreads, 0, kStaticSmem, 0},
      {"points_backward_fast_kernel", kPointsThreads, kPointsFastBackwardMinBlocks, kStaticSmem,
       kSmemNoOptIn - kStaticSmem},
      {"points_grid_finish_kernel", kPointsThreads, 0, kStaticSmem, 0},
      {"points_absmax_kernel", kPointsThreads, 0, kStaticSmem, 0},
      {"tv_loss_kernel", kTvThreads, 0, kStaticSmem, kTvReduceBytes},
      {"tv_reduce_kernel", kTvThreads, 0, kStaticSmem, kTvReduceBytes},
      {"tv_count_kernel", kTvThreads, 0, kStaticSmem, 0},
      {"tv_backward_kernel", kTvThreads, 0, kStaticSmem, 0},
  };
  const int n = static_cast<int>(sizeof(all) / sizeof(all[0]));
  if (out != nullptr) {
    for (int i = 0; i < n; ++i) out[i] = all[i];
  }
  return n;
}

}  // namespace launch
}  // namespace bilateral_ops
