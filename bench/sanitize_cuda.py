"""A small CUDA workload for compute-sanitizer (memcheck, racecheck, synccheck, initcheck), run by
bench/gpu_check.sh with PYTORCH_NO_CUDA_MEMORY_CACHING=1 (so that out-of-bounds accesses inside
pooled blocks are seen).

Every kernel of every op: the forward (vectorised with one and two float4 per row, and scalar),
the _dguide forwards, the backward ops with several output masks (with and without dguide), both
grid-gradient paths (the atomic scatter in its shared-tile and global-fallback modes, the
deterministic gather with and without split bands), float32 / float64 / float16 / bfloat16, odd
sizes, hostile guides (NaN, +-inf, 1e30), and a double backward through the public API. The grid
ops: grid_splat on both paths (scatter in shared tiles and global fallback, deterministic gather
with and without bands), grid_blur (taps by value and from a device buffer, every sigma 0), and
bilateral_grid_filter forward and backward (given and default guides).
sizes, hostile guides (NaN, +-inf, 1e30), and a double backward through the public API.
curve_guide: its register and many-channel paths, shared and global parameter tables and
gradient rows, every mask kind, images that end mid-warp, NaN / inf pixels.
bilateral_filter: forward and backward under several output masks, with and without the
forward's output and weight sums, staged tiles and the
global-memory path (windows too wide for shared memory), channel counts beyond one register group,
every border and distance, a 1x1 image.

    python bench/sanitize_cuda.py [--dtypes float32,float64] [--quick]
"""

from __future__ import annotations

import argparse

import torch

import bilateral_ops as bo

ops = torch.ops.bilateral_ops

# (N, Co, Ci, D, Gh, Gw, H, W, has_offset, guide_lo, guide_hi)
SHAPES = [
    (2, 3, 3, 8, 16, 16, 37, 53, True, -0.3, 1.3),  # HDRNet-like grid: shared tiles, float4 rows
    (1, 2, 1, 1, 1, 1, 5, 3, False, 0.0, 1.0),  # 1x1x1 grid, rows of one coefficient
    (1, 1, 4, 24, 5, 7, 70, 129, True, -0.3, 1.3),  # deep grid, rows of 5: two float4
    (1, 1, 8, 4, 3, 3, 9, 40, True, 0.0, 1.0),  # rows of 9: scalar forward
    (1, 1, 2, 16, 32, 32, 32, 32, True, 0.0, 1.0),  # grid as fine as the image: global atomics
    (1, 1, 2, 16, 32, 32, 32, 32, True, 0.45, 0.5),  # ... with a flat guide: capped shared tiles
    (1, 2, 3, 4, 1, 1, 64, 96, True, 0.0, 1.0),  # one cell: gather bands + finish kernel
    (1, 1, 1, 2, 2, 2, 1, 1, True, 0.0, 1.0),  # 1x1 image
]
DOUBLE_BACKWARD = (1, 2, 3, 4, 3, 5, 11, 13, True, -0.2, 1.2)
QUICK = [0, 3, 4, 5, 6, 7]  # racecheck / synccheck: the shared-memory and odd-size cases
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
SLICE_MASKS = [[True, True], [True, False], [False, True]]
APPLY_MASKS = [[True, True, True], [True, False, False], [False, True, False], [False, False, True], [True, True, False]]


# grid_splat (N, C, D, Gh, Gw, H, W, guide_lo, guide_hi): a filter-like grid, a grid as fine as
# the image (global atomics), a 1x1 image, a coarse grid (gather bands + finish).
SPLAT_SHAPES = [
    (2, 4, 10, 9, 12, 37, 45, -0.3, 1.3),
    (1, 4, 16, 32, 32, 32, 32, 0.0, 1.0),
    (1, 2, 3, 4, 5, 1, 1, 0.0, 1.0),
    (1, 3, 4, 1, 2, 64, 96, 0.0, 1.0),
]
# grid_blur ((N, C, D, Gh, Gw), sigma): short windows by value, long ones from a device buffer
# (truncated to the axis), an axis of one cell, every sigma 0.
BLUR_CASES = [
    ((2, 3, 8, 16, 16), (1.0, 1.0, 1.0)),
    ((1, 2, 5, 7, 70), (0.0, 2.0, 30.0)),
    ((1, 1, 1, 3, 1), (1e6, 1e6, 1e6)),
    ((1, 2, 3, 4, 5), (0.0, 0.0, 0.0)),
]
# bilateral_grid_filter (N, C, H, W, sigma_color, sigma_space).
FILTER_CASES = [(1, 3, 37, 53, 0.1, 4.0), (1, 1, 20, 33, 0.25, 16.0)]
QUICK_GRID = [0, 1, 2]


def grid_shapes() -> dict:
    """The grid ops' cases (tests/test_launch_config.py checks their launch plans):
    {"splat": [(N, C, D, Gh, Gw, H, W)], "blur": [((N, C, D, Gh, Gw), sigma)], "filter":
    [(N, C, H, W, sigma_color, sigma_space)]}."""
    return {"splat": [s[:7] for s in SPLAT_SHAPES], "blur": list(BLUR_CASES), "filter": list(FILTER_CASES)}


# curve_guide (N, C, H, W, K): the group kernels with HDRNet's 16 points and with one channel of
# 5 (padded shifts, a run-time K); many channels; a global table with global rows; a shared
# table with global rows; a 1x1 image.
CURVE_SHAPES = [(2, 3, 37, 53, 16), (3, 1, 5, 7, 5), (1, 6, 9, 40, 3), (1, 8, 7, 11, 256), (1, 3, 5, 9, 400),
                (1, 1, 1, 1, 1)]
CURVE_MASKS = [[True] * 7, [True] + [False] * 6, [False] + [True] * 6]


def curve_shapes() -> list[tuple]:
    """(N, C, H, W, K) of every curve_guide case (tests/test_launch_config.py checks their plans)."""
    return list(CURVE_SHAPES)


def run_curve(shape, dtype, seed=0) -> None:
    n, c, h, w, k = shape
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.rand(n, c, h, w, device="cuda", generator=g)
    x.view(-1)[: min(2, x.numel())] = torch.tensor([float("nan"), float("inf")], device="cuda")[: min(2, x.numel())]
    params = [
        torch.eye(c, device="cuda") + 0.1 * torch.randn(c, c, device="cuda", generator=g),
        0.1 * torch.randn(c, device="cuda", generator=g),
        torch.rand(c, k, device="cuda", generator=g),
        torch.randn(c, k, device="cuda", generator=g),
        torch.full((c,), 1.0 / c, device="cuda"),
        torch.zeros(1, device="cuda"),
    ]
    args = [t.to(dtype) for t in [x] + params]
    go = torch.randn(n, h, w, device="cuda", generator=g).to(dtype)
    ops.curve_guide(*args)
    for mask in CURVE_MASKS:
        ops._curve_guide_backward(go, *args, mask)
    torch.cuda.synchronize()


# bilateral_filter: (N, C, Cg, H, W, ky, kx, border, distance); Cg None: the input guides itself.
# C in {1, 3} with no guidance or a guidance of 1 or 3 channels run the fast kernels (compile-time
# channel counts and distance), the rest the generic ones.
FILTER_SHAPES = [
    (2, 3, None, 37, 53, 5, 5, "reflect", "l1"),  # fast, RGB self-guided
    (1, 3, None, 13, 70, 9, 9, "circular", "l2"),  # fast, RGB self-guided, l2, tile tails
    (2, 1, None, 21, 40, 3, 5, "replicate", "l1"),  # fast, grey
    (1, 1, None, 1, 1, 3, 3, "constant", "l2"),  # fast, 1x1 image
    (1, 1, None, 1, 1, 3, 3, "circular", "l1"),  # fast, 1x1 image wrapping around
    (2, 3, 1, 19, 35, 5, 3, "reflect", "l2"),  # fast, joint RGB by grey
    (1, 1, 3, 17, 33, 3, 3, "circular", "l1"),  # fast, joint grey by RGB
    (1, 3, 3, 9, 45, 7, 7, "replicate", "l1"),  # fast, joint RGB by RGB
    (1, 3, None, 30, 40, 21, 21, "reflect", "l1"),  # fast forward / pass 1, generic pass 2 for float64
    (2, 2, None, 37, 53, 5, 5, "reflect", "l1"),  # generic, staged tile
    (1, 3, 2, 20, 30, 41, 41, "replicate", "l2"),  # generic, too wide to stage: global reads
    (1, 5, 6, 9, 40, 3, 7, "circular", "l1"),  # generic, two register groups of channels
    (1, 6, 2, 5, 40, 3, 5, "constant", "l2"),  # generic, a channel group past the guidance's
    (1, 3, None, 2, 3, 9, 11, "replicate", "l1"),  # fast, window larger than the image
    (1, 3, 3, 3, 2, 7, 9, "constant", "l1"),  # fast joint, window larger than the image
    (1, 5, 2, 2, 3, 7, 9, "replicate", "l2"),  # generic, window larger than the image
]
FILTER_MASKS = [[True, False, True, True], [True, False, False, False], [False, False, True, True]]


def all_filter_shapes() -> list[tuple]:
    """(N, C, Cg, H, W, ky, kx) of every bilateral_filter case (checked by tests/test_launch_config.py)."""
    return [s[:7] for s in FILTER_SHAPES]


def run_filter(shape, dtype) -> None:
    n, c, cg, h, w, ky, kx, border, distance = shape
    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.rand(n, c, h, w, device="cuda", generator=g).to(dtype)
    gd = None if cg is None else torch.rand(n, cg, h, w, device="cuda", generator=g).to(dtype)
    sc = torch.full((n,), 0.2, device="cuda").to(dtype)
    ss = torch.full((n, 2), 2.0, device="cuda").to(dtype)
    go = torch.randn(n, c, h, w, device="cuda", generator=g).to(dtype)
    ops.bilateral_filter(x, gd, [ky, kx], sc, ss, border, distance)
    # With the forward's output and weight sums too: pass 1 pixel by pixel (filter_centre_kernel).
    saved = ops._bilateral_filter_forward(x, gd, [ky, kx], sc, ss, border, distance)
    masks = FILTER_MASKS + ([[True, True, True, True], [False, True, False, False]] if gd is not None else [])
    for mask in masks:
        ops._bilateral_filter_backward(go, x, gd, [ky, kx], sc, ss, border, distance, mask)
        ops._bilateral_filter_backward(go, x, gd, [ky, kx], sc, ss, border, distance, mask, *saved)
    torch.cuda.synchronize()


def all_shapes() -> list[tuple]:
    """(N, Co, Ci, D, Gh, Gw, H, W, has_offset) of every case, the double backward's included
    (tests/test_launch_config.py checks their launch plans)."""
    return [s[:9] for s in SHAPES + [DOUBLE_BACKWARD]]


def _inputs(shape, dtype, seed):
    n, co, ci, d, gh, gw, h, w, off, lo, hi = shape
    g = torch.Generator(device="cuda").manual_seed(seed)
    c = co * (ci + int(off))
    grid = torch.randn(n, c, d, gh, gw, device="cuda", generator=g).to(dtype)
    guide = (lo + (hi - lo) * torch.rand(n, h, w, device="cuda", generator=g)).to(dtype)
    hostile = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -1e30], device="cuda").to(dtype)
    k = min(hostile.numel(), guide.numel())
    guide.view(-1)[:k] = hostile[:k]
    inp = torch.randn(n, ci, h, w, device="cuda", generator=g).to(dtype)
    return grid, guide, inp, c


def run_ops(shape, dtype, deterministic: bool) -> None:
    torch.use_deterministic_algorithms(deterministic)
    n, co, ci, d, gh, gw, h, w, off, _, _ = shape
    grid, guide, inp, c = _inputs(shape, dtype, 0)
    gs = torch.randn(n, c, h, w, device="cuda").to(dtype)
    ga = torch.randn(n, co, h, w, device="cuda").to(dtype)
    ops.bilateral_slice(grid, guide)
    ops._bilateral_slice_dguide(grid, guide)
    ops.bilateral_slice_apply(grid, guide, inp, off)
    ops._bilateral_slice_apply_dguide(grid, guide, inp, off)
    for mask in SLICE_MASKS:
        ops._bilateral_slice_backward(gs, grid, guide, False, mask)
    ops._bilateral_slice_backward(gs, grid, guide, True, [True, False])
    for mask in APPLY_MASKS:
        ops._bilateral_slice_apply_backward(ga, grid, guide, inp, off, False, mask)
    ops._bilateral_slice_apply_backward(ga, grid, guide, inp, off, True, [True, False, True])
    ops._bilateral_slice_apply_backward(ga, grid, guide, inp, off, True, [False, False, True])
    torch.cuda.synchronize()
    torch.use_deterministic_algorithms(False)


def double_backward(dtype) -> None:
    grid, guide, inp, _ = _inputs(DOUBLE_BACKWARD, dtype, 1)
    leaves = [t.requires_grad_() for t in (grid, guide, inp)]
    out = bo.bilateral_slice_apply(*leaves, True)
    grads = torch.autograd.grad(out.square().sum(), leaves, create_graph=True)
    sum(gr.float().sum() for gr in grads).backward()
    s = bo.bilateral_slice(leaves[0], leaves[1])
    grads = torch.autograd.grad(s.square().sum(), leaves[:2], create_graph=True)
    sum(gr.float().sum() for gr in grads).backward()
    torch.cuda.synchronize()


def run_grid_ops(splat_shape, blur_case, filter_case, dtype, deterministic: bool) -> None:
    torch.use_deterministic_algorithms(deterministic)
    n, c, d, gh, gw, h, w, lo, hi = splat_shape
    g = torch.Generator(device="cuda").manual_seed(2)
    inp = torch.randn(n, c, h, w, device="cuda", generator=g).to(dtype)
    guide = (lo + (hi - lo) * torch.rand(n, h, w, device="cuda", generator=g)).to(dtype)
    hostile = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -1e30], device="cuda").to(dtype)
    k = min(hostile.numel(), guide.numel())
    guide.view(-1)[:k] = hostile[:k]
    ops.grid_splat(inp, guide, [d, gh, gw])
    shape, sigma = blur_case
    ops.grid_blur(torch.randn(shape, device="cuda", generator=g).to(dtype), list(sigma))
    # The filter, forward and backward, with its default guide and a given one.
    n, c, h, w, sc, ss = filter_case
    x = torch.rand(n, c, h, w, device="cuda", generator=g).to(dtype).requires_grad_()
    gd = torch.rand(n, h, w, device="cuda", generator=g).to(dtype).requires_grad_()
    out = bo.bilateral_grid_filter(x, sc, ss) + bo.bilateral_grid_filter(x, sc, ss, gd)
    out.float().square().sum().backward()
    torch.cuda.synchronize()
    torch.use_deterministic_algorithms(False)


# bilateral_slice_apply_points: (P, M, Ci, Co, D, Gh, Gw, has_offset); a P that is not a multiple
# of a warp (the backward's warp-uniform loop), one sample, a depth of 1, odd sizes, and an index
# out of range (NaN, never an out-of-bounds read). grid_tv_loss: (M, C, D, Gh, Gw, idx or None).
POINTS_SHAPES = [(1000, 4, 3, 3, 8, 16, 16, True), (1, 1, 3, 3, 8, 16, 16, True), (77, 3, 1, 12, 1, 5, 7, False),
                 (4099, 2, 2, 1, 3, 4, 5, True),
                 # the fast path (packed grids): privatised grid gradient in 4 slices of 3 channels,
                 # in slices of 5, 5 and 2, in a full 48 KiB slab; and its per-sample kernel alone
                 # (4 grids: a backward with the grid gradient falls back to points_backward_kernel)
                 (5000, 1, 3, 3, 8, 16, 16, True), (2000, 1, 3, 3, 4, 16, 17, True), (6200, 3, 3, 3, 8, 16, 16, True),
                 (8200, 4, 3, 3, 8, 16, 16, True)]
TV_CASES = [(7, 12, 8, 16, 16, None), (5, 3, 1, 1, 4, [4, 0, 4]), (3, 2, 3, 5, 7, [1, 7])]


def run_points(shape, dtype) -> None:
    p, m, ci, co, d, gh, gw, off = shape
    g = torch.Generator(device="cuda").manual_seed(3)
    grid = torch.randn(m, co * (ci + int(off)), d, gh, gw, device="cuda", generator=g).to(dtype)
    coords = (torch.rand(p, 3, device="cuda", generator=g) * 1.4 - 0.2).to(dtype)
    hostile = torch.tensor([float("nan"), float("inf"), -float("inf")], device="cuda").to(dtype)
    coords.view(-1)[: min(3, coords.numel())] = hostile[: min(3, coords.numel())]
    inp = torch.randn(p, ci, device="cuda", generator=g).to(dtype)
    idx = torch.randint(0, m, (p,), device="cuda", generator=g)
    idx[-1] = m + 5  # out of range: NaN for that sample
    go = torch.randn(p, co, device="cuda", generator=g).to(dtype)
    ops.bilateral_slice_apply_points(grid, coords, inp, idx, off)
    for mask in ([True, True, True], [True, False, False], [False, True, True]):
        ops._bilateral_slice_apply_points_backward(go, grid, coords, inp, idx, off, mask)
    torch.cuda.synchronize()


def run_tv(case, dtype) -> None:
    m, c, d, gh, gw, idx = case
    x = torch.randn(m, c, d, gh, gw, device="cuda").to(dtype)
    i = None if idx is None else torch.tensor(idx, device="cuda")
    ops.grid_tv_loss(x, i)
    ops._grid_tv_loss_backward(torch.ones((), device="cuda", dtype=dtype), x, i)
    torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--quick", action="store_true", help="the shared-memory and odd-size cases only")
    opts = ap.parse_args()
    dtypes = [DTYPES[name] for name in opts.dtypes.split(",")]
    shapes = [SHAPES[i] for i in QUICK] if opts.quick else SHAPES
    for dtype in dtypes:
        for shape in shapes:
            for det in (False, True):
                run_ops(shape, dtype, det)
        double_backward(dtype)
        grid_cases = QUICK_GRID if opts.quick else range(len(SPLAT_SHAPES))
        for i in grid_cases:
            for det in (False, True):
                run_grid_ops(SPLAT_SHAPES[i], BLUR_CASES[i % len(BLUR_CASES)], FILTER_CASES[i % len(FILTER_CASES)],
                             dtype, det)
        print(f"  {dtype}: {len(shapes)} slice shapes and {len(grid_cases)} grid cases x 2 grid-gradient paths done",
              flush=True)
        for shape in CURVE_SHAPES[:4] if opts.quick else CURVE_SHAPES:
            run_curve(shape, dtype)
        print(f"  {dtype}: curve_guide done", flush=True)
        for shape in FILTER_SHAPES:
            run_filter(shape, dtype)
        print(f"  {dtype}: bilateral_filter done", flush=True)
        for shape in POINTS_SHAPES:
            run_points(shape, dtype)
        for case in TV_CASES:
            run_tv(case, dtype)
        print(f"  {dtype}: bilateral_slice_apply_points and grid_tv_loss done", flush=True)
    print("sanitize workload done")


if __name__ == "__main__":
    main()
