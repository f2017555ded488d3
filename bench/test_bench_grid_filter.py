"""The bilateral grid (grid_splat, grid_blur, bilateral_slice) and bilateral_grid_filter against
their peers, side by side in one run.

CPU (float32, batch 1, the photo of bench_common as RGB input, its channel mean as guide;
sigma_color 0.1, sigma_space 16 as in the goals; 512x512 and 1920x1080):
  * the whole filter, forward: ours, the pure-torch grid (bench/grid_peers.py: index_add_ splat,
    conv3d blur, grid_sample slice), a hand-written numba grid, and
    ``cv2.bilateralFilter(img, -1, 0.1, 16.0)`` on the float32 HxWx3 image (the exact filter
    OpenCV users call: a disc of radius round(1.5 * 16));
  * forward + backward (gradients for the input, through the default guide too): ours, pure torch;
  * the pieces (splat of [input, 1], blur, slice of the blurred grid): ours, torch, numba.
Each "ours" row also records best-of-k times of ours and each peer called alternately
(``interleaved_*``), so that a load change on a shared machine hits both alike.

CUDA (skipped without a device): the filter at 3840x2160 (ours and pure torch); the grey
1536x2560 float32 image at s_sigma 8, r_sigma 0.1 of Halide's published bilateral_grid app; splat
and slice bandwidth against a clone() of the same bytes.
"""

from __future__ import annotations

import functools
import time

import numpy as np
import pytest
import torch

import bench_common as bc
import bilateral_ops as bo
import grid_peers as peers

SIGMA_COLOR, SIGMA_SPACE = 0.1, 16.0
ROUNDS = {
    "512x512": {"ours": 30, "torch": 5, "numba": 10, "opencv": 3},
    "1920x1080": {"ours": 10, "torch": 3, "numba": 5, "opencv": 2},
}
HALIDE_MS = 0.50  # Halide's bilateral_grid app, 1536x2560 grey float32, s_sigma 8, r_sigma 0.1, RTX 2060


def _photo(size: str, device: str = "cpu") -> torch.Tensor:
    return bc.cpu_inputs(size)[2].to(device)


def _hwc(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x[0].permute(1, 2, 0).numpy())


def _filter_impl(impl: str):
    if impl == "ours":
        return lambda x: bo.bilateral_grid_filter(x, SIGMA_COLOR, SIGMA_SPACE)
    if impl == "torch":
        return lambda x: peers.torch_grid_filter(x, SIGMA_COLOR, SIGMA_SPACE)
    if impl == "numba":
        if not peers.HAVE_NUMBA:
            pytest.skip("numba is not installed")
        return lambda x: peers.numba_grid_filter(_hwc(x), SIGMA_COLOR, SIGMA_SPACE)
    if impl == "opencv":
        cv2 = pytest.importorskip("cv2")
        return lambda x: cv2.bilateralFilter(_hwc(x), -1, SIGMA_COLOR, SIGMA_SPACE)
    raise ValueError(impl)


def _best_alternating(fns: dict, arg, k: int) -> dict:
    best = {name: float("inf") for name in fns}
    for _ in range(k):
        for name, fn in fns.items():
            # Thread pools (torch's OpenMP, numba's, OpenCV's) spin for a while after each parallel
            # region: let the previous implementation's go idle before timing the next.
            time.sleep(0.05)
            t0 = time.perf_counter()
            fn(arg)
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def _record_ratios(benchmark, fns: dict, arg, k: int) -> None:
    best = _best_alternating(fns, arg, k)
    benchmark.extra_info["interleaved_min_ms"] = {n: round(t * 1e3, 2) for n, t in best.items()}
    benchmark.extra_info["interleaved_speedup"] = {
        n: round(t / best["ours"], 2) for n, t in best.items() if n != "ours"
    }


def _info(benchmark, group: str, impl: str, size: str) -> None:
    benchmark.group = f"cpu {group} {size}"
    benchmark.extra_info.update(
        suite="grid",
        device="cpu",
        op=group,
        size=size,
        impl=impl,
        dtype="float32",
        threads=torch.get_num_threads(),
        sigma_color=SIGMA_COLOR,
        sigma_space=SIGMA_SPACE,
    )


@pytest.mark.parametrize("size", list(bc.SIZES))
@pytest.mark.parametrize("impl", ["ours", "torch", "numba", "opencv"])
def test_cpu_filter(benchmark, impl, size):
    x = _photo(size)
    fn = _filter_impl(impl)
    _info(benchmark, "grid_filter forward", impl, size)
    with torch.no_grad():
        fn(x)  # numba compiles (or loads its cache) here, outside the timing
        out = benchmark.pedantic(fn, args=(x,), rounds=ROUNDS[size][impl], warmup_rounds=1, iterations=1)
        if impl == "ours":
            want = peers.torch_grid_filter(x, SIGMA_COLOR, SIGMA_SPACE)
            benchmark.extra_info["max_abs_diff_vs_torch"] = (out - want).abs().max().item()
            assert (out - want).abs().max().item() < 1e-4
            fns = {n: _filter_impl(n) for n in ("ours", "torch", "numba", "opencv")}
            _record_ratios(benchmark, fns, x, 2 if size == "1920x1080" else 3)
        elif impl == "numba":
            want = peers.torch_grid_filter(x, SIGMA_COLOR, SIGMA_SPACE)[0].permute(1, 2, 0).numpy()
            assert np.abs(out - want).max() < 1e-3


def _ignore_arg(f):
    return lambda _: f()


def _forward_backward(fn, x, grad_out):
    leaf = x.detach().requires_grad_()
    return torch.autograd.grad(fn(leaf), leaf, grad_out)


@pytest.mark.parametrize("size", list(bc.SIZES))
@pytest.mark.parametrize("impl", ["ours", "torch"])
def test_cpu_filter_forward_backward(benchmark, impl, size):
    x = _photo(size)
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    fn = _filter_impl(impl)
    _info(benchmark, "grid_filter forward_backward", impl, size)
    (g,) = benchmark.pedantic(
        _forward_backward, args=(fn, x, grad_out), rounds=ROUNDS[size][impl], warmup_rounds=1, iterations=1
    )
    assert g.shape == x.shape
    if impl == "ours":
        fns = {n: functools.partial(_forward_backward, _filter_impl(n), grad_out=grad_out) for n in ("ours", "torch")}
        _record_ratios(benchmark, fns, x, 2 if size == "1920x1080" else 3)


# ----------------------------------------------------------------------------------------------
# The pieces: splat of [input, 1], blur by one cell, slice of the blurred grid


def _pieces(size: str):
    x = _photo(size)
    _, c, h, w = x.shape
    guide = x.mean(1)
    grid_size = bo.reference.grid_size_for(h, w, SIGMA_COLOR, SIGMA_SPACE)
    homogeneous = torch.cat([x, torch.ones_like(x[:, :1])], 1)
    grid = bo.grid_splat(homogeneous, guide, grid_size)
    hwc, guide_np = _hwc(homogeneous[:, :c]), guide[0].numpy()
    grid_np = np.ascontiguousarray(grid[0].permute(1, 2, 3, 0).numpy())
    k = bo.reference.blur_kernel(1.0).numpy().astype(np.float32)
    bands = 1
    if peers.HAVE_NUMBA:
        import numba

        bands = numba.get_num_threads()
    return {
        "splat": {
            "ours": lambda: bo.grid_splat(homogeneous, guide, grid_size),
            "torch": lambda: peers.torch_splat(homogeneous, guide, grid_size),
            "numba": lambda: peers.numba_splat(hwc, guide_np, *grid_size, bands),
        },
        "blur": {
            "ours": lambda: bo.grid_blur(grid, 1.0),
            "torch": lambda: peers.torch_blur(grid),
            "numba": lambda: peers.numba_blur(grid_np, k),
        },
        "slice": {
            "ours": lambda: bo.bilateral_slice(grid, guide),
            "torch": lambda: peers.torch_slice(grid, guide),
            "numba": lambda: peers.numba_slice_normalize(grid_np, guide_np),
        },
    }


@pytest.mark.parametrize("size", list(bc.SIZES))
@pytest.mark.parametrize("impl", ["ours", "torch", "numba"])
@pytest.mark.parametrize("piece", ["splat", "blur", "slice"])
def test_cpu_piece(benchmark, piece, impl, size):
    if impl == "numba" and not peers.HAVE_NUMBA:
        pytest.skip("numba is not installed")
    fns = _pieces(size)[piece]
    _info(benchmark, piece, impl, size)
    with torch.no_grad():
        fns[impl]()
        benchmark.pedantic(fns[impl], rounds=max(3, ROUNDS[size][impl]), warmup_rounds=1, iterations=1)
        if impl == "ours":
            _record_ratios(benchmark, {n: _ignore_arg(f) for n, f in fns.items()}, None, 3)


# ----------------------------------------------------------------------------------------------
# CUDA


def _cuda_info(benchmark, group: str, **kw) -> None:
    benchmark.group = f"cuda {group}"
    benchmark.extra_info.update(
        suite="grid", device=torch.cuda.get_device_name(), op=group, impl="ours", dtype="float32", **kw
    )


@pytest.mark.cuda
def test_cuda_filter_4k(benchmark, requires_cuda):
    h, w = bc.CUDA_SIZE["3840x2160"]
    x = bc.make_inputs(h, w, device="cuda")[2]
    _cuda_info(benchmark, "grid_filter 3840x2160", sigma_color=SIGMA_COLOR, sigma_space=SIGMA_SPACE)
    with torch.no_grad():
        ours = bc.cuda_ms(lambda: bo.bilateral_grid_filter(x, SIGMA_COLOR, SIGMA_SPACE))
        torch_ms = bc.cuda_ms(lambda: peers.torch_grid_filter(x, SIGMA_COLOR, SIGMA_SPACE), reps=5)
        benchmark.extra_info.update(
            event_ms=round(ours, 4), torch_event_ms=round(torch_ms, 4), speedup_vs_torch=round(torch_ms / ours, 2)
        )
    # Outside no_grad: the forward + backward needs the graph (run 4 failed here on the H200).
    grad_out = torch.randn_like(x)
    fb = bc.cuda_ms(
        lambda: _forward_backward(lambda a: bo.bilateral_grid_filter(a, SIGMA_COLOR, SIGMA_SPACE), x, grad_out),
        reps=5,
    )
    benchmark.extra_info["forward_backward_event_ms"] = round(fb, 4)
    with torch.no_grad():
        out = benchmark.pedantic(
            lambda: bo.bilateral_grid_filter(x, SIGMA_COLOR, SIGMA_SPACE), rounds=20, warmup_rounds=3, iterations=1
        )
        diff = (out - peers.torch_grid_filter(x, SIGMA_COLOR, SIGMA_SPACE)).abs().max().item()
        benchmark.extra_info["max_abs_diff_vs_torch"] = diff
        assert diff < 1e-3


@pytest.mark.cuda
def test_cuda_filter_halide_size(benchmark, requires_cuda):
    """Halide's published bilateral_grid app: 1536x2560 grey float32, s_sigma 8, r_sigma 0.1."""
    grey = bc.make_inputs(1536, 2560, device="cuda")[1][:, None].contiguous()  # the photo's luminance
    _cuda_info(benchmark, "grid_filter halide 2560x1536 grey", sigma_color=0.1, sigma_space=8.0)
    with torch.no_grad():
        ms = bc.cuda_ms(lambda: bo.bilateral_grid_filter(grey, 0.1, 8.0))
        benchmark.extra_info.update(
            event_ms=round(ms, 4), halide_published_ms=HALIDE_MS, speedup_vs_halide=round(HALIDE_MS / ms, 2)
        )
        benchmark.pedantic(lambda: bo.bilateral_grid_filter(grey, 0.1, 8.0), rounds=20, warmup_rounds=3, iterations=1)


@pytest.mark.cuda
@pytest.mark.parametrize("piece", ["splat", "slice"])
def test_cuda_piece_bandwidth(benchmark, requires_cuda, piece):
    h, w = bc.CUDA_SIZE["3840x2160"]
    x = bc.make_inputs(h, w, device="cuda")[2]
    guide = x.mean(1)
    size = bo.reference.grid_size_for(h, w, SIGMA_COLOR, SIGMA_SPACE)
    homogeneous = torch.cat([x, torch.ones_like(x[:, :1])], 1)
    grid = bo.grid_splat(homogeneous, guide, size)
    # Bytes that must move: splat reads 4 channels and the guide; slice reads the guide and writes
    # 4 channels (the grid itself is a few MiB and stays in L2).
    nbytes = 5 * h * w * 4
    fn = (
        (lambda: bo.grid_splat(homogeneous, guide, size))
        if piece == "splat"
        else (lambda: bo.bilateral_slice(grid, guide))
    )
    _cuda_info(benchmark, f"{piece} 3840x2160")
    with torch.no_grad():
        bc.record_bandwidth(benchmark, fn, nbytes)
        benchmark.pedantic(fn, rounds=20, warmup_rounds=3, iterations=1)
