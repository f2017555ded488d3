"""Launch configurations of the CUDA kernels, checked on the CPU.

csrc/cuda/launch_config.h computes every launch (grid, block, dynamic shared memory, the shared
budget of the grad_grid scatter, the chunking of the deterministic gather) with host functions,
exposed here through ``bilateral_ops._C``. A launch that breaks a hardware limit only fails on a
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
        for k in info.values():
            assert k["static_smem_budget"] + k["max_dynamic_smem"] <= SMEM_NO_OPT_IN, k
        for shape in _filter_shapes_from_tests() + _filter_edge_shapes()[::5]:
            for where, p in all_filter_plans(shape, dtype):
                k = info[p["kernel"]]
                assert p["launch_bounds"] == (k["max_threads"], k["min_blocks"]), where
                assert p["dynamic_smem"] <= k["max_dynamic_smem"], where
                seen.add(p["kernel"])
    assert seen == {k["kernel"] for k in _C.kernel_info(4)}  # every kernel is launched somewhere


# ----------------------------------------------------------------------------------------------
# bilateral_filter


def _filter_masks(self_guided: bool):
    masks = [m for m in itertools.product([False, True], repeat=4) if any(m)]
    return [m for m in masks if not (self_guided and m[1])]


def all_filter_plans(shape, dtype):
    """Every launch of bilateral_filter's forward and of its backward under every output mask."""
    N, C, Cg, H, W, ky, kx = shape
    self_guided = Cg is None
    cg = C if self_guided else Cg
    acc = DTYPES[dtype][1]
    for p in _C.filter_plans("forward", N, C, cg, H, W, ky, kx, acc_size=acc, self=self_guided):
        yield f"filter forward {shape} {dtype}", p
    for mask in _filter_masks(self_guided):
        for p in _C.filter_plans("backward", N, C, cg, H, W, ky, kx, acc_size=acc, self=self_guided, mask=list(mask)):
            yield f"filter backward mask={mask} {shape} {dtype}", p


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


@pytest.mark.parametrize("source", list(FILTER_SOURCES))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_every_filter_plan_fits_every_architecture(source, dtype):
    count = 0
    for shape in FILTER_SOURCES[source]():
        for where, p in all_filter_plans(shape, dtype):
            check_plan(p, where)
            if p["kernel"] in ("filter_forward_kernel", "filter_pass1_kernel"):
                N, C, Cg, H, W, ky, kx = shape
                # The kernel decodes (image, tile row, tile column) from blockIdx.x alone.
                assert p["grid"][0] == N * p["tiles_x"] * p["tiles_y"], where
                assert p["tiles_x"] * 32 >= W and p["tiles_y"] * 8 >= H, where
                assert p["block"] == (32, 8, 1), where
                reduce = 3 * 256 * 8 if p["kernel"] == "filter_pass1_kernel" else 0
                staged = C if Cg is None else C + Cg
                window = -(-staged * (8 + ky - 1) * (32 + kx - 1) * DTYPES[dtype][1] // 8) * 8  # reduction aligned
                assert p["tile_bytes"] == window, where
                assert p["dynamic_smem"] == (window if p["tiled"] else 0) + reduce, where
                assert p["tiled"] == (window + reduce <= SMEM_NO_OPT_IN), where
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
    assert names == ["filter_pass1_kernel", "filter_finish_kernel"]
    names = [p["kernel"] for p in _C.filter_plans("backward", 1, 3, 1, 64, 64, 5, 5, self=False, mask=[True, True, False, False])]
    assert names == ["filter_pass1_kernel", "filter_pass2_kernel", "filter_fold_kernel", "filter_fold_kernel"]
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
