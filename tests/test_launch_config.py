"""Launch configurations of the CUDA kernels, checked on the CPU.

csrc/cuda/launch_config.h computes every launch (grid, block, dynamic shared memory, the shared
budget of the grad_grid scatter, the chunking of the deterministic gather, grid_splat's plan and
grid_blur's passes) with host functions, exposed here through ``bilateral_ops._C``. A launch that breaks a hardware limit only fails on a
GPU (cudaErrorInvalidValue, "too many resources requested"), so every plan of every shape the CUDA
tests, benchmarks and sanitizer workload use, plus a sweep of edge cases, is checked here against
the limits of each architecture we build for (sm_80, sm_86, sm_89, sm_90).
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import bilateral_ops  # noqa: F401  (loads the extension)
from bilateral_ops import _C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KIB = 1024
LIMITS = _C.limits()
SMEM_NO_OPT_IN = 48 * KIB
# Largest static + dynamic shared memory per block with the opt-in attribute.
OPT_IN = {"sm_80": 163 * KIB, "sm_86": 99 * KIB, "sm_89": 99 * KIB, "sm_90": 227 * KIB}
REGISTERS_PER_BLOCK = 64 * KIB

# (elem_size, acc_size) of float32, float64, float16 and bfloat16.
DTYPES = {"float32": (4, 4), "float64": (8, 8), "float16": (2, 4), "bfloat16": (2, 4)}


def _load(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_limits_match_the_architectures():
    assert LIMITS["smem_no_opt_in"] == SMEM_NO_OPT_IN
    assert LIMITS["opt_in_smem"] == OPT_IN
    assert LIMITS["max_threads_per_block"] == 1024
    assert LIMITS["max_grid_x"] == 2**31 - 1
    assert LIMITS["max_grid_yz"] == 65535
    assert LIMITS["registers_per_block"] == REGISTERS_PER_BLOCK


# ----------------------------------------------------------------------------------------------
# max_cells: the cell box of a tile, against the actual taps.


def _taps(n: int, G: int) -> tuple[np.ndarray, np.ndarray]:
    """i0, i1 of every pixel of an n-pixel axis on G cells: image_taps of grid_coords.h, in the same
    double operations ((p + 0.5) * G / n, clamp to [0.5, G - 0.5], - 0.5, floor)."""
    g = (np.arange(n, dtype=np.float64) + 0.5) * float(G) / float(n)
    g = np.where(g > 0.5, g, 0.5)
    g = np.where(g < G - 0.5, g, G - 0.5)
    i0 = np.floor(g - 0.5).astype(np.int64)
    i1 = np.where(i0 + 1 < G, i0 + 1, G - 1)
    return i0, i1


def _widest_box(n: int, G: int, tile: int) -> tuple[int, int]:
    """Cells touched by the widest run of min(tile, n) consecutive pixels (any start), and by the
    widest tile the kernel actually launches (starts at multiples of tile, the last one cut)."""
    i0, i1 = _taps(n, G)
    m = min(tile, n)
    any_start = int((i1[m - 1 :] - i0[: n - m + 1]).max()) + 1
    starts = np.arange(0, n, tile)
    ends = np.minimum(starts + tile, n) - 1
    aligned = int((i1[ends] - i0[starts]).max()) + 1
    return any_start, aligned


@pytest.mark.parametrize("tile", [32, 8])
def test_max_cells_bounds_every_tile_exhaustively(tile):
    """Every axis of up to 300 pixels on up to 80 cells: the bound holds for every run of pixels
    (not just the aligned tiles the kernel uses) and is at most one cell loose."""
    loose = 0
    for n in range(1, 301):
        for G in range(1, 81):
            bound = _C.max_cells(tile, n, G)
            widest, aligned = _widest_box(n, G, tile)
            assert aligned <= widest <= bound <= G, (tile, n, G, aligned, widest, bound)
            assert bound <= widest + 1, (tile, n, G, widest, bound)
            loose += bound > widest
    assert loose < 300 * 80  # tight for a good share of the sizes


@pytest.mark.parametrize("tile", [32, 8])
@pytest.mark.parametrize("n", [1080, 1920, 2160, 3840, 4320, 7680, 4099, 65537])
def test_max_cells_bounds_large_axes(tile, n):
    for G in list(range(1, 70)) + [127, 128, 255, 256, 512, 1000, n // 2, n, 2 * n + 1]:
        bound = _C.max_cells(tile, n, G)
        widest, _ = _widest_box(n, G, tile)
        assert widest <= bound <= min(G, widest + 1), (tile, n, G, widest, bound)


def test_max_cells_narrow_images_are_not_the_whole_grid():
    # The old bound returned the whole grid for images narrower than the tile (and so asked for
    # a shared box of every cell). A 20-pixel row on 64 cells touches 62 of them at most, one
    # pixel 2.
    assert _C.max_cells(32, 1, 64) == 2
    assert _C.max_cells(32, 20, 64) == math.ceil(19 * 64 / 20) + 2 < 64
    assert _C.max_cells(8, 31, 16) == math.ceil(7 * 16 / 31) + 2


# ----------------------------------------------------------------------------------------------
# Plans against the limits.


def _max_registers(max_threads: int, min_blocks: int) -> int:
    """Registers per thread ptxas may use under __launch_bounds__(max_threads, min_blocks)."""
    per_thread = REGISTERS_PER_BLOCK // (max_threads * max(min_blocks, 1))
    return min(255, per_thread) // 8 * 8  # allocated in units of 8 per thread (256 per warp)


def check_plan(plan: dict, where: str) -> None:
    bx, by, bz = plan["block"]
    threads = bx * by * bz
    assert 1 <= threads <= 1024, where
    max_threads, min_blocks = plan["launch_bounds"]
    # Launching more threads than __launch_bounds__ promises fails ("too many resources").
    assert threads <= max_threads <= 1024, where
    assert _max_registers(max_threads, min_blocks) * threads <= REGISTERS_PER_BLOCK, where
    gx, gy, gz = plan["grid"]
    assert 1 <= gx <= 2**31 - 1 and 1 <= gy <= 65535 and 1 <= gz <= 65535, where
    assert plan["dynamic_smem"] >= 0 and plan["static_smem_budget"] >= 0, where
    smem = plan["static_smem_budget"] + plan["dynamic_smem"]
    for arch, opt_in in OPT_IN.items():
        limit = opt_in if plan["opt_in"] else SMEM_NO_OPT_IN
        assert smem <= limit, f"{where}: {smem} bytes of shared memory on {arch} (limit {limit})"
    kernel = plan["kernel"]
    if kernel == "backward_scatter_kernel":
        # The shared box and its header come out of the dynamic request.
        assert plan["shared_cap"] >= 0, where
        if plan["shared_cap"] > 0:
            acc = plan["acc_size"]
            assert plan["dynamic_smem"] >= plan["header_bytes"] + plan["shared_cap"] * acc, where
    if kernel == "grad_grid_gather_kernel":
        assert plan["chunk"] >= 1 and 1 <= plan["split"] <= 65535, where
        assert gy == plan["split"], where


def plans(op, pass_, shape, dtype, **kw):
    N, C, D, Gh, Gw, H, W, Ci, has_offset = shape
    elem, acc = DTYPES[dtype]
    out = _C.launch_plans(
        op, pass_, N, C, D, Gh, Gw, H, W, Ci=Ci, has_offset=has_offset, elem_size=elem, acc_size=acc, **kw
    )
    for p in out:
        p["acc_size"] = acc
    return out


def _masks(op: str):
    k = 3 if op == "slice_apply" else 2
    return [m for m in itertools.product([False, True], repeat=k) if any(m)]


def all_plans(shape, dtype):
    """Every launch of every op and pass for one shape and dtype, with a label."""
    N, C, D, Gh, Gw, H, W, Ci, has_offset = shape
    ops = ["slice"] + (["slice_apply"] if Ci else [])
    for op in ops:
        sshape = shape if op == "slice_apply" else (N, C, D, Gh, Gw, H, W, 0, True)
        for dguide in (False, True):
            for p in plans(op, "forward", sshape, dtype, dguide=dguide):
                yield f"{op} forward dguide={dguide} {shape} {dtype}", p
        for mask, det, dguide in itertools.product(_masks(op), (False, True), (False, True)):
            if dguide and mask[1]:
                continue
            for p in plans(op, "backward", sshape, dtype, mask=list(mask), deterministic=det, dguide=dguide):
                yield f"{op} backward mask={mask} det={det} dguide={dguide} {shape} {dtype}", p


def _apply_shape(N, Co, Ci, D, Gh, Gw, H, W, has_offset=True):
    return (N, Co * (Ci + int(has_offset)), D, Gh, Gw, H, W, Ci, has_offset)


def _shapes_from_tests():
    test_cuda = _load("_bo_test_cuda", os.path.join(ROOT, "tests", "test_cuda.py"))
    return [_apply_shape(*s, has_offset=off) for s in test_cuda.all_shapes() for off in (True, False)]


def _shapes_from_bench():
    bc = _load("_bo_bench_common", os.path.join(ROOT, "bench", "bench_common.py"))
    N, C, D, Gh, Gw = bc.GRID_SHAPE
    sizes = list(bc.SIZES.values()) + list(bc.CUDA_SIZE.values())
    return [(N, C, D, Gh, Gw, h, w, 3, True) for h, w in sizes]


def _shapes_from_sanitizer():
    san = _load("_bo_sanitize_cuda", os.path.join(ROOT, "bench", "sanitize_cuda.py"))
    return [_apply_shape(*s[:8], has_offset=s[8]) for s in san.all_shapes()]


def _edge_shapes():
    shapes = []
    grid = (12, 8, 16, 16)  # HDRNet: 3x4 affine, 8 levels, 16x16 cells
    for H, W in [(1, 1), (1, 7), (7, 1), (31, 42), (42, 31), (33, 33), (4320, 7680), (7680, 4320)]:
        shapes.append((1, *grid, H, W, 3, True))
        shapes.append((64, *grid, H, W, 3, True) if H * W <= 4096 else (2, *grid, H, W, 3, True))
    # Grids as fine as the image, Gh = Gw = 1, deep and wide grids.
    for H, W in [(16, 16), (64, 48), (5, 3), (256, 256)]:
        shapes.append((1, 12, 8, H, W, H, W, 3, True))
        shapes.append((2, 48, 64, H, W, H, W, 5, True))
    for D in (1, 2, 8, 16, 33, 64):
        for C in (1, 3, 4, 12, 13, 32, 48):
            shapes.append((1, C, D, 1, 1, 1080, 1920, 0, True))
            shapes.append((64, C, D, 16, 16, 64, 64, 0, True))
            shapes.append((1, C, D, 64, 64, 4320, 7680, 0, True))
    for Ci, has_offset in itertools.product((1, 3, 4, 7, 8), (True, False)):
        for Co in (1, 3, 6):
            shapes.append(_apply_shape(2, Co, Ci, 64, 16, 16, 1080, 1920, has_offset))
            shapes.append(_apply_shape(1, Co, Ci, 8, 512, 512, 512, 512, has_offset))
    return shapes


SHAPE_SOURCES = {
    "tests/test_cuda.py": _shapes_from_tests,
    "bench/bench_common.py": _shapes_from_bench,
    "bench/sanitize_cuda.py": _shapes_from_sanitizer,
    "edge cases": _edge_shapes,
}


@pytest.mark.parametrize("source", list(SHAPE_SOURCES))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_every_plan_fits_every_architecture(source, dtype):
    shapes = SHAPE_SOURCES[source]()
    assert shapes
    count = 0
    for shape in shapes:
        for where, p in all_plans(shape, dtype):
            check_plan(p, where)
            count += 1
    assert count > 0


# ----------------------------------------------------------------------------------------------
# The bilateral grid: grid_splat (the slice backward's grid gradient, no grid read) and grid_blur
# (one grid-stride pass per axis with sigma > 0).

BLUR_PARAM_TAPS = LIMITS["blur_param_taps"]
# Grid sizes of bilateral_grid_filter (docs/ops.md): sigma_color, sigma_space on the benchmark
# and test images, 4K and 8K included.
FILTER_SIZES = [(512, 512), (1080, 1920), (2160, 3840), (1536, 2560), (4320, 7680), (1, 1), (37, 53)]
FILTER_SIGMAS = [(0.1, 4.0), (0.1, 8.0), (0.1, 16.0), (0.05, 16.0), (0.2, 32.0), (0.1, 2.0), (0.02, 1.0)]


def _grid_size(h, w, sigma_color, sigma_space):
    return max(1, math.ceil(1 / sigma_color)), max(1, math.ceil(h / sigma_space)), max(1, math.ceil(w / sigma_space))


def _filter_grids(cases):
    """bilateral_grid_filter cases (N, C, H, W, sigma_color, sigma_space) as the splat of C + 1
    channels and the blur (sigma 1) of that grid."""
    out = {"splat": [], "blur": []}
    for n, c, h, w, sc, ss in cases:
        d, gh, gw = _grid_size(h, w, sc, ss)
        out["splat"].append((n, c + 1, d, gh, gw, h, w))
        out["blur"].append(((n, c + 1, d, gh, gw), (1.0, 1.0, 1.0)))
    return out


def _grids_from_tests():
    test_cuda = _load("_bo_test_cuda_grids", os.path.join(ROOT, "tests", "test_cuda.py"))
    shapes = test_cuda.grid_shapes()
    filt = _filter_grids(shapes["filter"])
    return {"splat": shapes["splat"] + filt["splat"], "blur": shapes["blur"] + filt["blur"]}


def _grids_from_sanitizer():
    san = _load("_bo_sanitize_cuda_grids", os.path.join(ROOT, "bench", "sanitize_cuda.py"))
    shapes = san.grid_shapes()
    filt = _filter_grids(shapes["filter"])
    return {"splat": shapes["splat"] + filt["splat"], "blur": shapes["blur"] + filt["blur"]}


def _grids_from_bench():
    # The grid filter benchmarks' sizes (issue 6): 512^2 and 1080p (4K on GPU), grey and RGB, the
    # sigmas of the issue and of Halide's bilateral_grid app (s_sigma 8, r_sigma 0.1 on
    # 1536 x 2560).
    cases = [(1, c, h, w, sc, ss) for (h, w) in FILTER_SIZES[:4] for c in (1, 3) for sc, ss in FILTER_SIGMAS[:5]]
    return _filter_grids(cases)


def _grid_edges():
    cases = [(n, c, h, w, sc, ss) for (h, w) in FILTER_SIZES for c in (1, 3, 8) for n in (1, 4)
             for sc, ss in FILTER_SIGMAS]
    out = _filter_grids(cases)
    sigmas = [(1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (0.0, 0.5, 0.0), (15.5, 15.5, 15.5), (16.0, 40.0, 1e6),
              (1e6, 1e6, 1e6), (1e-6, 3.0, 0.0)]
    grids = [(1, 1, 1, 1, 1), (2, 3, 8, 16, 16), (1, 4, 10, 540, 960), (1, 4, 64, 8192, 8192),
             (1, 1, 8, 16384, 16392), (3, 5, 7, 1, 65537), (1, 1, 100000, 1, 1), (1, 1, 1, 4096, 1),
             (2**20, 1, 1, 1, 2048)]
    out["blur"] += [(g, s) for g in grids for s in sigmas]
    # Splats into grids of more than 2^31 cells in all, fine grids, one cell, deep grids.
    out["splat"] += [(1, 4, 64, 2160, 3840, 2160, 3840), (1, 4, 10, 540, 960, 2160, 3840),
                     (2, 13, 64, 64, 64, 64, 64), (1, 4, 10, 1, 1, 4320, 7680), (1, 48, 64, 16, 16, 1080, 1920),
                     (1, 1, 1, 1, 1, 1, 1), (1, 4, 8, 1000, 1, 1000, 3)]
    return out


GRID_SHAPE_SOURCES = {
    "tests/test_cuda.py": _grids_from_tests,
    "bench/sanitize_cuda.py": _grids_from_sanitizer,
    "grid filter benchmark sizes": _grids_from_bench,
    "edge cases": _grid_edges,
}


def splat_plans(shape, dtype, deterministic):
    N, C, D, Gh, Gw, H, W = shape
    return plans("grid_splat", "forward", (N, C, D, Gh, Gw, H, W, 0, True), dtype, deterministic=deterministic)


def blur_plans(grid, sigma, dtype):
    N, C, D, Gh, Gw = grid
    return plans("grid_blur", "forward", (N, C, D, Gh, Gw, 0, 0, 0, True), dtype, sigma=list(sigma))


def check_blur_plans(ps, grid, sigma, where):
    N, C, D, Gh, Gw = grid
    total = N * C * D * Gh * Gw
    sizes, inner = (D, Gh, Gw), (Gh * Gw, Gw, 1)
    axes = [a for a in (2, 1, 0) if sigma[a] > 0] if total else []
    assert [p["axis"] for p in ps] == axes, where  # the contiguous axis first, zeros skipped
    for p in ps:
        a = p["axis"]
        check_plan(p, where)
        assert p["kernel"] == "grid_blur_kernel", where
        assert (p["n"], p["inner"], p["total"]) == (sizes[a], inner[a], total), where
        m = min(math.ceil(2 * sigma[a]), sizes[a] - 1)
        assert p["taps"] == m + 1 and 1 <= p["taps"] <= sizes[a], where
        assert p["param_taps"] == (p["taps"] <= BLUR_PARAM_TAPS), where
        assert p["wide"] == (total > 2**31 - 1), where
        gx, bx = p["grid"][0], p["block"][0]
        # Grid-stride: every element has a thread on some iteration; at most one block without work.
        assert gx == min(math.ceil(total / bx), 2**31 - 1), where
        assert p["dynamic_smem"] == 0, where


@pytest.mark.parametrize("source", list(GRID_SHAPE_SOURCES))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_grid_op_plans_fit_every_architecture(source, dtype):
    shapes = GRID_SHAPE_SOURCES[source]()
    assert shapes["splat"] and shapes["blur"]
    for shape in shapes["splat"]:
        N, _, _, _, _, H, W = shape
        for det in (False, True):
            ps = splat_plans(shape, dtype, det)
            where = f"grid_splat {shape} det={det} {dtype}"
            if N * H * W == 0:
                assert ps == [], where
                continue
            for p in ps:
                check_plan(p, where)
            # Exactly the slice backward's grid gradient (mask [grad_grid]), nothing per pixel.
            ref = plans("slice", "backward", (*shape, 0, True), dtype, mask=[True, False], deterministic=det)
            assert ps == ref, where
            kernels = [p["kernel"] for p in ps]
            assert "backward_pixel_kernel" not in kernels, where
            assert kernels[0] == ("axis_table_kernel" if det else "backward_scatter_kernel"), where
    for grid, sigma in shapes["blur"]:
        check_blur_plans(blur_plans(grid, sigma, dtype), grid, sigma, f"grid_blur {grid} sigma={sigma} {dtype}")


def test_grid_blur_plan_edges():
    # Every sigma 0: no launch (the op returns a copy). An axis of one cell: one tap. 2^31 - 1
    # elements still take the 32-bit path, 2^31 the 64-bit one.
    assert blur_plans((2, 3, 4, 5, 6), (0.0, 0.0, 0.0), "float32") == []
    assert blur_plans((0, 3, 4, 5, 6), (1.0, 1.0, 1.0), "float32") == []
    (p,) = blur_plans((1, 1, 1, 1, 7), (5.0, 0.0, 0.0), "float32")
    assert p["taps"] == 1 and p["param_taps"]
    (p,) = blur_plans((1, 1, 1, 1, 2**31 - 1), (0.0, 0.0, 1.0), "float16")
    assert not p["wide"] and p["taps"] == 3
    (p,) = blur_plans((1, 1, 1, 2, 2**30), (0.0, 0.0, 1.0), "float16")
    assert p["wide"]
    # Long windows: taps truncated to the axis, by value up to the limit, else from a buffer.
    ps = blur_plans((1, 2, 5, 7, 130), (1e6, 1e6, 1e6), "float64")
    assert [(p["axis"], p["taps"], p["param_taps"]) for p in ps] == [(2, 130, False), (1, 7, True), (0, 5, True)]
    assert BLUR_PARAM_TAPS == 32
    (p,) = blur_plans((1, 1, 1, 1, 1000), (0.0, 0.0, 15.5), "float32")
    assert p["taps"] == 32 and p["param_taps"]
    (p,) = blur_plans((1, 1, 1, 1, 1000), (0.0, 0.0, 15.6), "float32")
    assert p["taps"] == 33 and not p["param_taps"]
    with pytest.raises(ValueError):
        blur_plans((1, 1, 1, 1, 1), (-1.0, 0.0, 0.0), "float32")
    with pytest.raises(ValueError):
        blur_plans((1, 1, 1, 1, 1), (float("nan"), 0.0, 0.0), "float32")
    with pytest.raises(ValueError):
        plans("grid_blur", "backward", (1, 1, 1, 1, 1, 0, 0, 0, True), "float32")


def test_grid_splat_plan_edges():
    # An empty image launches nothing; the deterministic gather of many channels still fits.
    assert splat_plans((1, 3, 8, 16, 16, 0, 5), "float32", False) == []
    assert splat_plans((2, 3, 8, 16, 16, 7, 0), "float64", True) == []
    (tile,) = splat_plans((1, 4, 10, 540, 960, 2160, 3840), "float32", False)
    assert tile["kernel"] == "backward_scatter_kernel" and tile["shared_cap"] == 4 * 10 * tile["box_x"] * tile["box_y"]
    ps = splat_plans((1, 4, 10, 540, 960, 2160, 3840), "bfloat16", True)
    assert [p["kernel"] for p in ps] == ["axis_table_kernel", "grad_grid_gather_kernel"]


# ----------------------------------------------------------------------------------------------
# The scatter's shared tile: the old 48 KiB bug and the budget.

HDRNET = (12, 8, 16, 16)


@pytest.mark.parametrize("H,W", [(1, 1), (31, 42), (42, 31), (8, 32), (7, 33), (9, 40), (64, 64)])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_small_images_shared_tile_within_48k(H, W, dtype):
    """Sizes of this kind crashed the old kernel: its request was capped at exactly 48 KiB of
    dynamic shared memory on top of its static shared memory. Now the box is budgeted with its
    header and the kernel has no static shared memory: the whole box when it fits, else the
    budget (tiles whose guide spans few levels still fit, the others go to global atomics)."""
    shape = (1, *HDRNET, H, W, 3, True)
    C, D = HDRNET[0], HDRNET[1]
    acc = DTYPES[dtype][1]
    for op in ("slice", "slice_apply"):
        mask = [True, False] + ([False] if op == "slice_apply" else [])
        (tile,) = plans(op, "backward", shape, dtype, mask=mask)
        assert tile["kernel"] == "backward_scatter_kernel"
        check_plan(tile, f"{op} {H}x{W} {dtype}")
        box = C * D * tile["box_x"] * tile["box_y"]
        budget = SMEM_NO_OPT_IN - tile["static_smem_budget"] - tile["header_bytes"]
        flat = C * min(D, 2) * tile["box_x"] * tile["box_y"]  # a tile whose guide spans 2 levels
        expected = box if box * acc <= budget else budget // acc if flat * acc <= budget else 0
        assert tile["shared_cap"] == expected
        assert tile["dynamic_smem"] == (tile["header_bytes"] + expected * acc if expected else 0)
        assert tile["static_smem_budget"] + tile["dynamic_smem"] <= SMEM_NO_OPT_IN


@pytest.mark.parametrize("H,W", [(31, 42), (42, 31), (1, 1)])
def test_crashing_float32_sizes_take_the_whole_box(H, W):
    for op in ("slice", "slice_apply"):
        mask = [True, True] + ([True] if op == "slice_apply" else [])
        (tile,) = plans(op, "backward", (1, *HDRNET, H, W, 3, True), "float32", mask=mask)
        assert tile["shared_cap"] == HDRNET[0] * HDRNET[1] * tile["box_x"] * tile["box_y"]
        check_plan(tile, f"{op} {H}x{W}")


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_scatter_budget_counts_static_and_header(dtype):
    """A box far larger than the budget: the request is the whole budget, and static shared memory
    plus the request (header included) stays within 48 KiB."""
    acc = DTYPES[dtype][1]
    shape = (1, 48, 64, 64, 64, 64, 64, 0, True)  # every tile touches a huge box
    (tile,) = plans("slice", "backward", shape, dtype, mask=[True, False])
    assert tile["shared_cap"] in (0, (SMEM_NO_OPT_IN - tile["static_smem_budget"] - tile["header_bytes"]) // acc)
    assert tile["static_smem_budget"] + tile["dynamic_smem"] <= SMEM_NO_OPT_IN
    shape = (1, 12, 64, 16, 16, 1080, 1920, 0, True)  # deep grid: full-depth box too big, flat fits
    (tile,) = plans("slice", "backward", shape, dtype, mask=[True, False])
    assert tile["shared_cap"] > 0
    assert tile["dynamic_smem"] == tile["header_bytes"] + tile["shared_cap"] * acc
    assert tile["static_smem_budget"] + tile["dynamic_smem"] <= SMEM_NO_OPT_IN


def test_kernel_info_matches_plans():
    """The bounds reported per kernel (used by tools/ptxas_report.py) are the ones the plans
    launch with, and no plan asks for more dynamic shared memory than reported."""
    seen = set()
    for dtype, (_, acc) in DTYPES.items():
        info = {k["kernel"]: k for k in _C.kernel_info(acc)}
        for shape in _edge_shapes()[::7] + _shapes_from_tests():
            for where, p in all_plans(shape, dtype):
                k = info[p["kernel"]]
                assert p["launch_bounds"] == (k["max_threads"], k["min_blocks"]), where
                assert p["dynamic_smem"] <= k["max_dynamic_smem"], where
                assert p["static_smem_budget"] == k["static_smem_budget"], where
                seen.add(p["kernel"])
        grids = _grids_from_tests()
        launched = [p for shape in grids["splat"] for det in (False, True) for p in splat_plans(shape, dtype, det)]
        launched += [p for grid, sigma in grids["blur"][::5] for p in blur_plans(grid, sigma, dtype)]
        for p in launched:
            k = info[p["kernel"]]
            assert p["launch_bounds"] == (k["max_threads"], k["min_blocks"]), p
            assert p["dynamic_smem"] <= k["max_dynamic_smem"], p
            assert p["static_smem_budget"] == k["static_smem_budget"], p
            seen.add(p["kernel"])
        every = [wp for shape in _edge_shapes()[::7] + _shapes_from_tests() for wp in all_plans(shape, dtype)]
        every += [wp for shape in _curve_edge_shapes() for wp in all_curve_plans(shape, dtype)]
        for where, p in every:
            k = info[p["kernel"]]
            assert p["launch_bounds"] == (k["max_threads"], k["min_blocks"]), where
            assert p["dynamic_smem"] <= k["max_dynamic_smem"], where
            assert p["static_smem_budget"] == k["static_smem_budget"], where
            seen.add(p["kernel"])
        for k in info.values():
            assert k["static_smem_budget"] + k["max_dynamic_smem"] <= SMEM_NO_OPT_IN, k
        for shape in _filter_shapes_from_tests() + _filter_edge_shapes()[::5]:
            for where, p in all_filter_plans(shape, dtype):
                k = info[p["kernel"]]
                assert p["launch_bounds"] == (k["max_threads"], k["min_blocks"]), where
                assert p["dynamic_smem"] <= k["max_dynamic_smem"], where
                seen.add(p["kernel"])
        for where, p in all_points_plans() + all_tv_plans():
            k = info[p["kernel"]]
            assert p["launch_bounds"] == (k["max_threads"], k["min_blocks"]), where
            assert p["dynamic_smem"] <= k["max_dynamic_smem"], where
            assert p["static_smem_budget"] == k["static_smem_budget"], where
            seen.add(p["kernel"])
    assert seen == {k["kernel"] for k in _C.kernel_info(4)}  # every kernel is launched somewhere


# ----------------------------------------------------------------------------------------------
# bilateral_filter


def _filter_masks(self_guided: bool):
    masks = [m for m in itertools.product([False, True], repeat=4) if any(m)]
    return [m for m in masks if not (self_guided and m[1])]


def all_filter_plans(shape, dtype, with_mask=False):
    """Every launch of bilateral_filter's forward and of its backward under every output mask
    (with_mask: (where, plan, mask) triples, mask None for the forward)."""
    for where, p, mask in _filter_plans_masks(shape, dtype):
        yield (where, p, mask) if with_mask else (where, p)


def _filter_plans_masks(shape, dtype):
    N, C, Cg, H, W, ky, kx = shape
    self_guided = Cg is None
    cg = C if self_guided else Cg
    acc = DTYPES[dtype][1]
    for p in _C.filter_plans("forward", N, C, cg, H, W, ky, kx, acc_size=acc, self=self_guided):
        yield f"filter forward {shape} {dtype}", p, None
    for mask in _filter_masks(self_guided):
        for saved in (False, True):
            plans = _C.filter_plans("backward", N, C, cg, H, W, ky, kx, acc_size=acc, self=self_guided, mask=list(mask), saved=saved)
            for p in plans:
                yield f"filter backward mask={mask} saved={saved} {shape} {dtype}", p, mask


def _filter_shapes_from_tests():
    test_cuda = _load("_bo_test_cuda_filter", os.path.join(ROOT, "tests", "test_cuda.py"))
    return test_cuda.all_filter_shapes()


def _filter_shapes_from_bench():
    bc = _load("_bo_bench_common_filter", os.path.join(ROOT, "bench", "bench_common.py"))
    return [(1, 3, None, h, w, k, k) for h, w in bc.FILTER_SIZES.values() for k in bc.FILTER_KERNELS]


def _filter_edge_shapes():
    shapes = []
    for k in (1, 3, 5, 9, 15, 17, 21, 31, 41, 61, 101):
        for C, Cg in ((1, None), (3, None), (3, 1), (4, 4), (5, None), (16, 3), (64, None)):
            shapes.append((1, C, Cg, 1080, 1920, k, k))
            shapes.append((64, C, Cg, 7, 5, k, 1))
        shapes.append((1, 3, None, 4320, 7680, k, k))
    shapes += [(1, 3, None, 1, 1, 3, 3), (70000, 1, None, 2, 2, 3, 3), (1, 1, None, 65537 * 8, 1, 3, 3)]
    return shapes


def _filter_shapes_from_sanitizer():
    san = _load("_bo_sanitize_cuda_filter", os.path.join(ROOT, "bench", "sanitize_cuda.py"))
    return san.all_filter_shapes()


FILTER_SOURCES = {
    "tests/test_cuda.py": _filter_shapes_from_tests,
    "bench/bench_common.py": _filter_shapes_from_bench,
    "bench/sanitize_cuda.py": _filter_shapes_from_sanitizer,
    "edge cases": _filter_edge_shapes,
}


_FILTER_TILE_KERNELS = ("filter_forward_kernel", "filter_pass1_kernel", "filter_forward_fast_kernel",
                        "filter_pass1_fast_kernel")


@pytest.mark.parametrize("source", list(FILTER_SOURCES))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_every_filter_plan_fits_every_architecture(source, dtype):
    count = 0
    for shape in FILTER_SOURCES[source]():
        for where, p, mask in all_filter_plans(shape, dtype, with_mask=True):
            check_plan(p, where)
            N, C, Cg, H, W, ky, kx = shape
            acc = DTYPES[dtype][1]
            fast_channels = C in (1, 3) and (Cg is None or Cg in (1, 3))
            table = -(-(ky + kx) * acc // 8) * 8  # the fast kernels' spatial table
            if p["kernel"] in _FILTER_TILE_KERNELS:
                # The kernel decodes (image, tile row, tile column) from blockIdx.x alone.
                assert p["grid"][0] == N * p["tiles_x"] * p["tiles_y"], where
                assert p["tiles_x"] * 32 >= W and p["tiles_y"] * 8 >= H, where
                assert p["block"] == (32, 8, 1), where
                reduce = 3 * 256 * 8 if "pass1" in p["kernel"] else 0
                staged = C if Cg is None else C + Cg
                window = -(-staged * (8 + ky - 1) * (32 + kx - 1) * acc // 8) * 8  # reduction aligned
                assert p["tile_bytes"] == window, where
                assert p["tiled"] == (window + reduce <= SMEM_NO_OPT_IN), where
                fast = fast_channels and window + table + reduce <= SMEM_NO_OPT_IN
                assert p["kernel"].endswith("_fast_kernel") == fast, where
                want = window + table + reduce if fast else (window if p["tiled"] else 0) + reduce
                assert p["dynamic_smem"] == want, where
            if p["kernel"].startswith("filter_pass2"):
                Hp, Wp = H + ky - 1, W + kx - 1
                planes = C + (C if Cg is None else Cg) + 1 + (C if Cg is not None and mask[1] else 0)
                window = -(-planes * (8 + ky - 1) * (32 + kx - 1) * acc // 8) * 8
                fast = fast_channels and window + table <= SMEM_NO_OPT_IN
                assert p["kernel"].endswith("_fast_kernel") == fast, where
                if fast:  # a 32 x 8 tile of padded positions per block, decoded from blockIdx.x
                    assert p["grid"][0] == N * -(-Hp // 8) * -(-Wp // 32), where
                    assert p["block"] == (32, 8, 1), where
                    assert p["dynamic_smem"] == window + table, where
            count += 1
    assert count > 0


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_filter_falls_back_to_global_memory_for_wide_windows(dtype):
    acc = DTYPES[dtype][1]
    (fwd,) = _C.filter_plans("forward", 1, 3, 3, 1080, 1920, 15, 15, acc_size=acc)
    assert fwd["tiled"]  # the benchmarks' widest window is staged
    (fwd,) = _C.filter_plans("forward", 1, 3, 3, 1080, 1920, 61, 61, acc_size=acc)
    assert not fwd["tiled"] and fwd["dynamic_smem"] == 0
    (fwd,) = _C.filter_plans("forward", 1, 64, 64, 64, 64, 3, 3, acc_size=acc)
    assert not fwd["tiled"]


def test_filter_plans_skip_work():
    assert _C.filter_plans("forward", 1, 3, 3, 0, 5, 3, 3) == []
    assert _C.filter_plans("backward", 1, 0, 0, 5, 5, 3, 3) == []
    names = [p["kernel"] for p in _C.filter_plans("backward", 1, 3, 3, 64, 64, 5, 5, mask=[False, False, True, False])]
    assert names == ["filter_pass1_fast_kernel", "filter_finish_kernel"]
    names = [p["kernel"] for p in _C.filter_plans("backward", 1, 3, 1, 64, 64, 5, 5, self=False, mask=[True, True, False, False])]
    assert names == ["filter_pass1_fast_kernel", "filter_pass2_fast_kernel", "filter_fold_kernel", "filter_fold_kernel"]
    names = [p["kernel"] for p in _C.filter_plans("backward", 1, 2, 2, 64, 64, 5, 5, mask=[True, False, True, False])]
    assert names == ["filter_pass1_kernel", "filter_pass2_kernel", "filter_fold_kernel", "filter_finish_kernel"]
    # Given the forward's output and W, pass 1 is pixel by pixel unless a sigma gradient is wanted.
    plans = _C.filter_plans("backward", 2, 3, 3, 64, 64, 5, 5, mask=[True, False, False, False], saved=True)
    assert [p["kernel"] for p in plans] == ["filter_centre_kernel", "filter_pass2_fast_kernel", "filter_fold_kernel"]
    assert plans[0]["grid"][0] * plans[0]["block"][0] >= 2 * 64 * 64
    names = [p["kernel"] for p in _C.filter_plans("backward", 1, 3, 3, 64, 64, 5, 5, mask=[True, False, True, False], saved=True)]
    assert names == ["filter_pass1_fast_kernel", "filter_pass2_fast_kernel", "filter_fold_kernel", "filter_finish_kernel"]


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_filter_fast_paths_take_the_common_channel_counts(dtype):
    """Grey and RGB, self-guided or with a grey or RGB guidance, run the fast kernels at the
    benchmarks' sizes (k = 9 and k = 15, 1080p); other channel counts and wide windows the generic
    ones."""
    acc = DTYPES[dtype][1]
    for C, Cg, self_guided in [(1, 1, True), (3, 3, True), (1, 1, False), (1, 3, False), (3, 1, False), (3, 3, False)]:
        for k in (9, 15):
            (fwd,) = _C.filter_plans("forward", 1, C, Cg, 1080, 1920, k, k, acc_size=acc, self=self_guided)
            assert fwd["kernel"] == "filter_forward_fast_kernel", (C, Cg, k)
            names = [p["kernel"] for p in _C.filter_plans("backward", 2, C, Cg, 1080, 1920, k, k, acc_size=acc,
                                                          self=self_guided, mask=[True, False, False, False])]
            if acc == 4 or k == 9:  # float64's windows at k = 15 may be too large for the fast backward
                assert names[:2] == ["filter_pass1_fast_kernel", "filter_pass2_fast_kernel"], (C, Cg, k, names)
    for C, Cg, self_guided, k in [(2, 2, True, 9), (3, 2, False, 9), (4, 1, False, 3), (3, 3, True, 61)]:
        (fwd,) = _C.filter_plans("forward", 1, C, Cg, 256, 256, k, k, acc_size=acc, self=self_guided)
        assert fwd["kernel"] == "filter_forward_kernel", (C, Cg, k)
    with pytest.raises(ValueError):
        _C.filter_plans("forward", 1, 3, 3, 8, 8, 4, 3)


# ----------------------------------------------------------------------------------------------
# What the plans choose.


@pytest.mark.parametrize("C", [1, 3, 4, 5, 8, 12, 13, 48])
def test_forward_slice_packing(C):
    for dtype, (_, acc) in DTYPES.items():
        ps = plans("slice", "forward", (2, C, 8, 16, 16, 33, 45, 0, True), dtype)
        if acc == 8:
            assert [p["kernel"] for p in ps] == ["forward_scalar_kernel"]
            continue
        pack, fwd = ps
        assert (pack["kernel"], fwd["kernel"]) == ("pack_grid_kernel", "forward_vec_kernel")
        # Rows of 4 channels: every channel has a slot, and no row is wholly padding.
        assert fwd["chunks"] == 1 and pack["row_stride"] == 4 and pack["row_len"] == 4
        assert (fwd["rows"] - 1) * 4 < C <= fwd["rows"] * 4
        assert pack["packed_elems"] == 2 * 8 * 16 * 16 * fwd["rows"] * 4


@pytest.mark.parametrize("Ci", [1, 2, 3, 4, 5, 7, 8, 9])
@pytest.mark.parametrize("has_offset", [True, False])
@pytest.mark.parametrize("Co", [1, 3])
def test_forward_apply_packing(Ci, has_offset, Co):
    stride = Ci + int(has_offset)
    shape = _apply_shape(2, Co, Ci, 8, 8, 8, 41, 67, has_offset)
    for dtype, (_, acc) in DTYPES.items():
        ps = plans("slice_apply", "forward", shape, dtype)
        if acc == 8 or stride > 8:
            assert [p["kernel"] for p in ps] == ["forward_scalar_kernel"], (dtype, stride)
            continue
        pack, fwd = ps
        assert fwd["kernel"] == "forward_vec_kernel"
        assert fwd["rows"] == Co and pack["row_stride"] == stride
        assert fwd["chunks"] == (1 if stride <= 4 else 2)
        assert pack["row_len"] == 4 * fwd["chunks"] >= stride


@pytest.mark.parametrize("C,D", [(1, 1), (3, 8), (12, 8), (12, 21), (13, 20), (48, 64), (4, 64), (1, 256)])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_gather_covers_every_output_once(C, D, dtype):
    shape = (1, C, D, 16, 16, 270, 480, 0, True)
    ps = plans("slice", "backward", shape, dtype, mask=[True, False], deterministic=True)
    kernels = [p["kernel"] for p in ps]
    assert kernels[:2] == ["axis_table_kernel", "grad_grid_gather_kernel"]
    gather = ps[1]
    threads = gather["block"][0]
    outputs = C * D
    if gather["slices"] > 1:
        assert gather["own"] == 1 and gather["passes"] == 1
        assert gather["slices"] * outputs <= threads
    else:
        assert gather["own"] * threads * gather["passes"] >= outputs
        assert gather["own"] * threads * (gather["passes"] - 1) < outputs
    assert (gather["split"] > 1) == ("gather_finish_kernel" in kernels)


def test_gather_splits_coarse_grids_only():
    one_cell = plans("slice", "backward", (1, 12, 8, 1, 1, 2160, 3840, 0, True), "float32",
                     mask=[True, False], deterministic=True)
    gather = one_cell[1]
    assert gather["grid"][0] == 1 and gather["split"] > 100  # enough blocks for a GPU
    fine = plans("slice", "backward", (1, 12, 8, 64, 64, 64, 64, 0, True), "float32",
                 mask=[True, False], deterministic=True)
    assert fine[1]["split"] == 1 and [p["kernel"] for p in fine][-1] == "grad_grid_gather_kernel"


def test_masks_skip_work():
    shape = _apply_shape(1, 3, 3, 8, 16, 16, 64, 64)
    none = plans("slice_apply", "backward", shape, "float32", mask=[False, False, False])
    assert none == []
    grid_only = plans("slice_apply", "backward", shape, "float32", mask=[True, False, False])
    assert [p["kernel"] for p in grid_only] == ["backward_scatter_kernel"]
    det_grid_only = plans("slice_apply", "backward", shape, "float32", mask=[True, False, False], deterministic=True)
    assert "backward_pixel_kernel" not in [p["kernel"] for p in det_grid_only]
    guide_only = plans("slice_apply", "backward", shape, "float32", mask=[False, True, False])
    assert [p["kernel"] for p in guide_only] == ["backward_pixel_kernel"]
    assert plans("slice", "forward", (1, 12, 8, 16, 16, 0, 5, 0, True), "float32") == []
    with pytest.raises(ValueError):
        plans("slice", "backward", (1, 12, 8, 16, 16, 8, 8, 0, True), "float32", mask=[True, True], dguide=True)


# ----------------------------------------------------------------------------------------------
# curve_guide: (N, C, H, W, K) shapes.

CURVE_MASKS = [
    [True] * 7,
    [True] + [False] * 6,
    [False] + [True] * 6,
    [False, False, False, True, False, False, False],
]


def curve_plans(pass_, shape, dtype, mask=None):
    N, C, H, W, K = shape
    elem, acc = DTYPES[dtype]
    out = _C.curve_plans(pass_, N, C, H, W, K, elem_size=elem, acc_size=acc, mask=mask)
    for p in out:
        p["acc_size"] = acc
    return out


def all_curve_plans(shape, dtype):
    for p in curve_plans("forward", shape, dtype):
        yield f"curve_guide forward {shape} {dtype}", p
    for mask in CURVE_MASKS:
        for p in curve_plans("backward", shape, dtype, mask=mask):
            yield f"curve_guide backward mask={mask} {shape} {dtype}", p


def _curve_shapes_from_tests():
    return _load("_bo_test_cuda", os.path.join(ROOT, "tests", "test_cuda.py")).curve_shapes()


def _curve_shapes_from_bench():
    return _load("_bo_bench_curve", os.path.join(ROOT, "bench", "test_bench_curve_guide.py")).curve_shapes()


def _curve_edge_shapes():
    shapes = []
    for C, K in itertools.product((1, 2, 3, 4, 5, 8, 16, 32, 64), (1, 3, 16, 64, 256, 1024)):
        shapes.append((1, C, 1, 1, K))
        shapes.append((2, C, 33, 47, K))
        shapes.append((4, C, 4320, 7680, K))
    shapes += [(256, 3, 1080, 1920, 16), (1, 3, 1, 31, 16), (64, 3, 384, 384, 16), (1, 512, 8, 8, 4)]
    return shapes


def _curve_shapes_from_sanitizer():
    return _load("_bo_sanitize_cuda", os.path.join(ROOT, "bench", "sanitize_cuda.py")).curve_shapes()


CURVE_SHAPE_SOURCES = {
    "tests/test_cuda.py": _curve_shapes_from_tests,
    "bench/sanitize_cuda.py": _curve_shapes_from_sanitizer,
    "bench/test_bench_curve_guide.py": _curve_shapes_from_bench,
    "edge cases": _curve_edge_shapes,
}


def _check_curve_plan(p, shape, where):
    _, C, _, _, K = shape
    P = C * C + 2 * C + 2 * C * K + 1
    acc = p["acc_size"]
    sorted_bytes = C * (3 * K + 2) * acc  # each channel's sorted knots and prefix-sum pairs
    table = P * acc if p["table_shared"] else 0
    assert p["table_size"] == P, where
    assert bool(p["registers"]) == (C <= 4), where
    assert bool(p["table_shared"]) == (P * acc <= 16 * KIB), where
    if p["kernel"] in ("curve_forward_kernel", "curve_forward_group_kernel"):
        assert p["block"] == (256, 1, 1), where
        # Four pixels per thread exactly when a pixel's channels fit in registers and the table
        # in shared memory; then the sorted curves follow the table.
        assert (p["kernel"] == "curve_forward_group_kernel") == (C <= 4 and p["table_shared"]) == bool(p["group"]), where
        assert p["dynamic_smem"] == table + (sorted_bytes if p["group"] else 0), where
        assert p["launch_bounds"] == (256, (3 if acc == 4 else 2) if p["group"] else 2), where
    elif p["kernel"] == "curve_backward_group_kernel":
        # HDRNet's shapes in float math: the table, the sorted curves, the padded shifts, then
        # four warp rows.
        assert acc == 4 and C in (1, 3) and K <= 16 and p["table_shared"] and p["group"], where
        assert p["block"] == (128, 1, 1) and bool(p["rows_shared"]) == bool(p["partial_rows"]), where
        padded = C * 16 * acc  # each channel's shifts padded to 16
        assert p["dynamic_smem"] == table + sorted_bytes + padded + (4 * P * acc if p["rows_shared"] else 0), where
    elif p["kernel"] == "curve_backward_kernel":
        assert not p["group"] and p["block"] == (256, 1, 1), where
        assert not (acc == 4 and C in (1, 3) and K <= 16 and p["table_shared"]), where
        # The kernel carves the table and then eight warp rows out of the dynamic buffer.
        rows = 8 * P * acc if p["rows_shared"] else 0
        assert p["dynamic_smem"] == table + rows, where
    else:
        # A block per table entry, a double per thread for its tree.
        assert p["kernel"] == "curve_reduce_kernel" and p["dynamic_smem"] == 256 * 8, where
        assert p["grid"][0] == P and p["block"] == (256, 1, 1), where
    if p["partial_rows"]:
        # One row per block with shared rows, one per warp otherwise; bounded memory.
        assert p["partial_rows"] * P <= max(2**24, 8 * P), where


@pytest.mark.parametrize("source", list(CURVE_SHAPE_SOURCES))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_every_curve_plan_fits_every_architecture(source, dtype):
    shapes = CURVE_SHAPE_SOURCES[source]()
    assert shapes
    count = 0
    for shape in shapes:
        plans_ = list(all_curve_plans(shape, dtype))
        mains = [p for _, p in plans_ if p["kernel"] in ("curve_backward_kernel", "curve_backward_group_kernel")]
        for where, p in plans_:
            check_plan(p, where)
            _check_curve_plan(p, shape, where)
            count += 1
        for m in mains:
            per_block = 1 if m["rows_shared"] else 8
            assert m["partial_rows"] in (0, m["grid"][0] * per_block), shape
    assert count > 0


def test_curve_plan_modes():
    hdrnet = curve_plans("backward", (4, 3, 384, 384, 16), "float32")
    assert [p["kernel"] for p in hdrnet] == ["curve_backward_group_kernel", "curve_reduce_kernel"]
    main = hdrnet[0]
    assert main["registers"] and main["table_shared"] and main["rows_shared"] and main["group"]
    # At least 8 pixels a thread of 128: 4 * 384 * 384 / 1024 blocks.
    assert main["grid"][0] == 576 and main["partial_rows"] == 576
    assert curve_plans("backward", (1, 3, 2160, 3840, 16), "float32")[0]["grid"][0] == 1024
    # float64, other channel counts, more than 16 points or no parameter gradient: the per-warp
    # kernel.
    for shape, dtype in [((4, 3, 384, 384, 16), "float64"), ((4, 2, 384, 384, 16), "float32"),
                         ((4, 3, 384, 384, 17), "float32")]:
        plan = curve_plans("backward", shape, dtype)
        assert [p["kernel"] for p in plan] == ["curve_backward_kernel", "curve_reduce_kernel"], shape
    assert curve_plans("backward", (4, 1, 384, 384, 1), "float16")[0]["kernel"] == "curve_backward_group_kernel"
    fwd = curve_plans("forward", (1, 3, 2160, 3840, 16), "float32")[0]
    assert fwd["kernel"] == "curve_forward_group_kernel" and fwd["grid"][0] == 2048
    assert fwd["dynamic_smem"] == (112 + 3 * 50) * 4
    # On a known device the forward's grid is one wave of resident blocks (H200: 132 SMs x 3),
    # and no more blocks than there are groups of pixels.
    on_h200 = _C.curve_plans("forward", 1, 3, 2160, 3840, 16, sms=132)[0]
    assert on_h200["grid"][0] == 132 * on_h200["launch_bounds"][1] == 396
    assert _C.curve_plans("forward", 1, 3, 16, 16, 16, sms=132)[0]["grid"][0] == 1
    generic = _C.curve_plans("forward", 1, 8, 2160, 3840, 256, sms=132)[0]
    assert generic["kernel"] == "curve_forward_kernel"
    assert generic["grid"][0] == 132 * generic["launch_bounds"][1]
    # The backward's grid depends on the sizes only (its reduction order is fixed).
    back = _C.curve_plans("backward", 1, 3, 2160, 3840, 16, sms=132)
    assert [p["grid"] for p in back] == [p["grid"] for p in _C.curve_plans("backward", 1, 3, 2160, 3840, 16)]
    with pytest.raises(ValueError, match="sms"):
        _C.curve_plans("forward", 1, 3, 16, 16, 16, sms=-1)
    # A table beyond 16 KiB is read from global memory; rows that do not fit go to `partial`.
    big = curve_plans("backward", (1, 8, 19, 23, 256), "float32")[0]
    assert not big["table_shared"] and not big["rows_shared"] and not big["registers"]
    assert big["partial_rows"] == 8 * big["grid"][0]
    rows_only = curve_plans("backward", (1, 3, 21, 17, 400), "float32")[0]
    assert rows_only["kernel"] == "curve_backward_kernel"
    assert rows_only["table_shared"] and not rows_only["rows_shared"]
    assert rows_only["dynamic_smem"] == 2416 * 4  # the table alone
    assert curve_plans("backward", (1, 3, 21, 17, 400), "float64")[0]["dynamic_smem"] == 0  # > 16 KiB
    # The number of blocks depends on the sizes only: the reduction order is fixed.
    assert curve_plans("backward", (1, 3, 8, 8, 16), "float32")[0]["grid"][0] == 1


def test_curve_masks_skip_work():
    assert curve_plans("backward", (1, 3, 8, 8, 16), "float32", mask=[False] * 7) == []
    assert curve_plans("forward", (1, 3, 0, 8, 16), "float32") == []
    # The input gradient alone: the kernel the other masks take, so that it has the same bits.
    only_input = curve_plans("backward", (1, 3, 8, 8, 16), "float32", mask=[True] + [False] * 6)
    assert [p["kernel"] for p in only_input] == ["curve_backward_group_kernel"]
    assert only_input[0]["partial_rows"] == 0 and not only_input[0]["rows_shared"]
    only_input = curve_plans("backward", (1, 3, 8, 8, 16), "float64", mask=[True] + [False] * 6)
    assert [p["kernel"] for p in only_input] == ["curve_backward_kernel"]
    assert only_input[0]["partial_rows"] == 0 and not only_input[0]["rows_shared"]
    with pytest.raises(ValueError):
        _C.curve_plans("backward", 1, 0, 8, 8, 16)
    with pytest.raises(ValueError):
        _C.curve_plans("backward", 1, 3, 8, 8, 16, mask=[True] * 6)


# ----------------------------------------------------------------------------------------------
# tools/ptxas_report.py on a canned log (the real one runs in make cuda-check).

SAMPLE_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '{scatter}' for 'sm_90'
ptxas info    : Function properties for {scatter}
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 80 registers, used 1 barriers, 352 bytes cmem[0]
ptxas info    : Compiling entry function '{gather}' for 'sm_80'
ptxas info    : Function properties for {gather}
    8 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers, 16 bytes smem, 400 bytes cmem[0]
"""
SCATTER = (
    "_ZN13bilateral_ops4cuda56_GLOBAL__N__12a49fe2_18_bilateral_slice_cu_27011338_727623"
    "backward_scatter_kernelIfLb0EEEvNS_13SliceGeometryENS_12AffineLayoutENS1_12BackwardArgsIT_EE"
)
GATHER = SCATTER.replace("backward_scatter_kernelIfLb0EEEvNS_13SliceGeometryENS_12AffineLayoutENS1_12BackwardArgsIT_EE",
                         "grad_grid_gather_kernelIfLb1EEEvNS_13SliceGeometryENS_12AffineLayoutENS1_10GatherArgsIT_EE")


@pytest.mark.skipif(shutil.which("c++filt") is None, reason="needs c++filt")
def test_ptxas_report_flags_spills_and_static_smem(tmp_path):
    log = tmp_path / "build.log"
    log.write_text(SAMPLE_LOG.format(scatter=SCATTER, gather=GATHER))
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "ptxas_report.py"), str(log)],
        capture_output=True, text=True, cwd=ROOT,
    )
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert "backward_scatter_kernel" in out and "grad_grid_gather_kernel" in out
    assert "spill" in out.lower() and "static" in out.lower()
    ok = SAMPLE_LOG.format(scatter=SCATTER, gather=GATHER).split("ptxas info    : Compiling entry function '" + GATHER)[0]
    log.write_text(ok)
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "ptxas_report.py"), str(log)],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_ptxas_report_names_kernels_with_enum_arguments():
    # An enumerator template argument demangles with parentheses: the name and the arguments must
    # still be told apart (the first GPU run's report listed such kernels as unknown).
    rep = _load("_bo_ptxas_report", os.path.join(ROOT, "tools", "ptxas_report.py"))
    sig = ("void bilateral_ops::cuda::(anonymous namespace)::tv_loss_kernel<float, (bilateral_ops::cuda::TvPath)2>"
           "(bilateral_ops::TvGeometry, float const*)")
    assert rep.describe(sig) == ("tv_loss_kernel", "float, (bilateral_ops::cuda::TvPath)2")
    assert rep.describe("void ns::k<c10::Half, 3, true>(int)") == ("k", "c10::Half, 3, true")
    assert rep.describe("void ns::plain_kernel(int, float*)") == ("plain_kernel", "")


# ----------------------------------------------------------------------------------------------
# bilateral_slice_apply_points and grid_tv_loss: grid-stride kernels over samples / elements.

# (P, M, C, D, Gh, Gw): the tests', the benchmarks' (1440 x 1080 pixels, BilaRF's 16384 rays
# over 600 grids) and edges (one sample, more blocks than the grid cap).
POINTS_SHAPES = [
    (1, 1, 12, 8, 16, 16), (3000, 5, 12, 8, 16, 16), (1440 * 1080, 1, 12, 8, 16, 16), (16384, 600, 12, 8, 16, 16),
    (150000, 2, 12, 8, 16, 16), (700, 6, 10, 3, 5, 4), (2**31, 3, 12, 1, 1, 1), (10**10, 1, 4, 2, 2, 2),
    # the fast path's privatised backward: 6 channels a slice, 5 (slices 5, 5, 2), 1 (a full slab)
    (70000, 2, 12, 4, 8, 8), (40000, 1, 12, 4, 16, 17), (100000, 3, 12, 8, 16, 16),
]
# (M, B, numel, has_idx)
TV_SHAPES = [(1, 1, 12 * 8 * 16 * 16, False), (600, 600, 12 * 8 * 16 * 16, False), (9, 4, 12 * 120, True),
             (3, 0, 10, True), (0, 0, 10, False), (4, 4, 0, False), (10**6, 10**6, 12 * 2048, False), (5, 10**9, 12, True)]


def all_points_plans():
    out = []
    for shape in POINTS_SHAPES:
        out += [(f"points forward {shape}", p) for p in _C.points_plans("forward", *shape)]
        for mask in itertools.product([False, True], repeat=3):
            out += [(f"points backward {shape} {mask}", p) for p in _C.points_plans("backward", *shape, mask=list(mask))]
    return out


def all_tv_plans():
    out = []
    for M, B, numel, has_idx in TV_SHAPES:
        for pass_ in ("forward", "backward"):
            out += [(f"tv {pass_} {(M, B, numel, has_idx)}", p) for p in _C.tv_plans(pass_, M, B, numel, has_idx=has_idx)]
    return out


def test_points_and_tv_plans_fit_every_architecture():
    for where, p in all_points_plans() + all_tv_plans():
        check_plan(p, where)


def test_points_plans_launch_what_is_needed():
    names = lambda pass_, mask=None: [p["kernel"] for p in _C.points_plans(pass_, 100, 2, 12, 8, 16, 16, mask=mask)]  # noqa: E731
    assert names("forward") == ["points_forward_kernel"]
    assert names("backward", [False, True, True]) == ["points_backward_kernel"]
    assert names("backward", [True, False, False]) == [
        "points_absmax_kernel", "points_backward_kernel", "points_grid_finish_kernel"]
    assert names("backward", [False, False, False]) == []
    assert _C.points_plans("forward", 0, 2, 12, 8, 16, 16) == []
    pack, fwd = _C.points_plans("forward", 10**10, 1, 12, 8, 16, 16)  # the fast path packs first
    assert (pack["kernel"], fwd["kernel"]) == ("points_pack_kernel", "points_forward_fast_kernel")
    assert fwd["grid"][0] == 65536  # grid-stride beyond the cap
    # Warp-uniform loops: whole warps per block.
    assert all(p["block"][0] % 32 == 0 for _, p in all_points_plans())


# A plan's main launches, without the helpers (points_pack_kernel, and points_absmax_kernel and
# points_sample_grad_fast_kernel next to the grid gradient).
def _points_core(pass_, shape, mask=None):
    helpers = ("points_pack_kernel",) + (("points_absmax_kernel", "points_sample_grad_fast_kernel") if mask and mask[0] else ())
    return [p for p in _C.points_plans(pass_, *shape, mask=mask) if p["kernel"] not in helpers]


def test_points_fast_path_plans():
    uniform = (1440 * 1080, 1, 12, 8, 16, 16)
    assert [p["kernel"] for p in _points_core("forward", uniform)] == ["points_forward_fast_kernel"]
    assert [p["kernel"] for p in _points_core("backward", uniform, [False, True, True])] == [
        "points_sample_grad_fast_kernel"]
    for mask in ([True, True, True], [True, False, False], [True, True, False]):
        bwd, fin = _points_core("backward", uniform, mask)
        assert (bwd["kernel"], fin["kernel"]) == ("points_backward_fast_kernel", "points_grid_finish_kernel")
        # 2048 cells: 3 channels of 8-byte sums in 48 KiB, so 4 slices; 1024 blocks in all.
        assert bwd["grid"] == (256, 4, 1) and bwd["dynamic_smem"] == 2048 * 3 * 8 == 48 * 1024
        assert bwd["block"] == (256, 1, 1) and bwd["launch_bounds"] == (256, 3)
    cases = {  # shape: (slices, dynamic shared memory)
        (70000, 2, 12, 4, 8, 8): (2, 512 * 6 * 8),
        (40000, 1, 12, 4, 16, 17): (3, 1088 * 5 * 8),  # slices of 5, 5 and 2 channels
        (100000, 3, 12, 8, 16, 16): (12, 3 * 2048 * 8),
        (2**31, 3, 12, 1, 1, 1): (2, 3 * 6 * 8),
    }
    for shape, (slices, smem) in cases.items():
        bwd = _points_core("backward", shape, [True, True, True])[0]
        assert bwd["kernel"] == "points_backward_fast_kernel", shape
        assert bwd["grid"][1] == slices and bwd["dynamic_smem"] == smem, shape
        assert bwd["grid"][0] == min(-(-shape[0] // 256), 1024 // slices), shape
    # Plain kernels: grids too large for one channel in shared memory, fewer samples than cells
    # (BilaRF's rays), another channel count.
    for shape in [(100000, 4, 12, 8, 16, 16), (16384, 100, 12, 8, 16, 16), (3000, 5, 12, 8, 16, 16),
                  (10**6, 1, 10, 8, 16, 16)]:
        assert [p["kernel"] for p in _C.points_plans("backward", *shape, mask=[True, True, True])] == [
            "points_absmax_kernel", "points_backward_kernel", "points_grid_finish_kernel"], shape
    for shape in [(16384, 100, 12, 8, 16, 16), (10**6, 1, 10, 8, 16, 16)]:
        assert [p["kernel"] for p in _C.points_plans("forward", *shape)] == ["points_forward_kernel"], shape
    # Without the grid gradient only the packing matters: M = 4 grids still take the fast path.
    assert [p["kernel"] for p in _points_core("backward", (100000, 4, 12, 8, 16, 16), [False, True, False])] == [
        "points_sample_grad_fast_kernel"]


def test_tv_plans():
    fwd = _C.tv_plans("forward", 600, 600, 12 * 2048)
    assert [p["kernel"] for p in fwd] == ["tv_loss_kernel", "tv_reduce_kernel"]
    assert fwd[0]["grid"][0] == fwd[0]["partials"] <= 1024 and fwd[1]["grid"] == (1, 1, 1)
    # The partials depend on the sizes only (determinism) and an empty loss still writes its value.
    assert _C.tv_plans("forward", 3, 0, 10, has_idx=True)[0]["partials"] == 1
    assert [p["kernel"] for p in _C.tv_plans("backward", 9, 4, 1440, has_idx=True)] == ["tv_count_kernel", "tv_backward_kernel"]
    assert [p["kernel"] for p in _C.tv_plans("backward", 9, 9, 1440)] == ["tv_backward_kernel"]
    assert _C.tv_plans("backward", 0, 0, 10) == []
    with pytest.raises(ValueError):
        _C.tv_plans("forward", 3, 2, 10)  # B != M without idx
