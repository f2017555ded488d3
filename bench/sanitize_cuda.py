"""A small CUDA workload for compute-sanitizer (memcheck, racecheck, synccheck, initcheck), run by
bench/gpu_check.sh with PYTORCH_NO_CUDA_MEMORY_CACHING=1 (so that out-of-bounds accesses inside
pooled blocks are seen).

Every kernel of every op: the forward (vectorised with one and two float4 per row, and scalar),
the _dguide forwards, the backward ops with several output masks (with and without dguide), both
grid-gradient paths (the atomic scatter in its shared-tile and global-fallback modes, the
deterministic gather with and without split bands), float32 / float64 / float16 / bfloat16, odd
sizes, hostile guides (NaN, +-inf, 1e30), and a double backward through the public API.
bilateral_filter: forward and backward under several output masks, staged tiles and the
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


# bilateral_filter: (N, C, Cg, H, W, ky, kx, border, distance); Cg None: the input guides itself.
FILTER_SHAPES = [
    (2, 3, None, 37, 53, 5, 5, "reflect", "l1"),  # staged tile
    (1, 3, 2, 20, 30, 41, 41, "replicate", "l2"),  # too wide to stage: global reads
    (1, 5, 6, 9, 40, 3, 7, "circular", "l1"),  # two register groups of channels
    (1, 1, None, 1, 1, 3, 3, "constant", "l2"),  # 1x1 image
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
    masks = FILTER_MASKS + ([[True, True, True, True], [False, True, False, False]] if gd is not None else [])
    for mask in masks:
        ops._bilateral_filter_backward(go, x, gd, [ky, kx], sc, ss, border, distance, mask)
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
        for shape in FILTER_SHAPES:
            run_filter(shape, dtype)
        print(f"  {dtype}: {len(shapes)} shapes x 2 grid-gradient paths done", flush=True)
    print("sanitize workload done")


if __name__ == "__main__":
    main()
