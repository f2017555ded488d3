"""Radiance-field bilateral grids: bilateral_ops.compat.bilagrid vs lib_bilagrid (and, on a GPU,
fused-bilagrid), side by side.

The cases of fused-bilagrid's own profile, at 1440x1080 with grids 16x16x8 (grid_X, grid_Y,
grid_W), float32, one grid:
  * uniform: a pixel grid (nerfstudio's linspace(0, 1) coordinates), gradients for the grid and
    rgb (through the affine map and the guide);
  * irregular: 1440 * 1080 samples at xy, rgb = 0.5 + 0.5 randn (many outside [0, 1]),
    gradients for the grid, xy and rgb;
  * rays: BilaRF's call pattern, a batch of 16384 rays (P, 1, 1, .) reading 100 grids through
    per-ray camera indices, gradients for the grids and rgb;
  * tv: total_variation_loss of 600 grids (BilaRF's largest scenes), forward and forward +
    backward.
Each case runs forward, and forward + backward. lib_bilagrid is reference.bilagrid_slice (its
F.grid_sample composition, grids[idx] copy and torch.unique included) and, for the TV loss,
_lib_tv below (its index_select loop and .item() element count). "core" is ours through the
core op, bilateral_slice_apply(..., align_corners=True) on the pixel grid (what a caller who knows
the samples form a pixel grid can use).

CUDA (skipped without a device): the same cases timed with CUDA events; fused-bilagrid too when
it is importable (built from its public source).
"""

from __future__ import annotations

import time

import pytest
import torch

import bench_common as bc
import bilateral_ops as bo
from bilateral_ops import reference
from bilateral_ops.compat import bilagrid

H, W = 1080, 1440
GRID = (16, 16, 8)  # grid_X, grid_Y, grid_W
TV_GRIDS = 600
# Fixed rounds: lib_bilagrid's grid_sample path takes ~0.3-1 s per call on two cores.
ROUNDS = {"ours": 10, "core": 10, "lib_bilagrid": 3}


def _lib_tv(x: torch.Tensor) -> torch.Tensor:
    """lib_bilagrid's total_variation_loss as it is written (index_select, a float element count
    read back with .item())."""
    tv = 0
    for i in range(2, x.dim()):
        n = x.shape[i]
        x1 = x.index_select(i, torch.arange(1, n, device=x.device))
        x2 = x.index_select(i, torch.arange(0, n - 1, device=x.device))
        count = max(torch.prod(torch.tensor(x1.size()[1:]).float()).item(), 1.0)
        tv += torch.pow(x1 - x2, 2).sum() / count
    return tv / x.shape[0]


def _model(num: int, device: str) -> bilagrid.BilateralGrid:
    m = bilagrid.BilateralGrid(num, *GRID).to(device)
    with torch.no_grad():
        m.grids.copy_(torch.randn(m.grids.shape, generator=torch.Generator().manual_seed(42)).to(device))
    return m


RAYS, RAY_GRIDS = 16384, 100


def _case(kind: str, device: str):
    """(model, xy, rgb, grid_idx, which of xy / rgb need gradients)."""
    g = torch.Generator().manual_seed(42)
    if kind == "rays":
        xy = torch.rand(RAYS, 1, 1, 2, generator=g).to(device)
        rgb = torch.rand(RAYS, 1, 1, 3, generator=g).to(device)
        idx = torch.randint(0, RAY_GRIDS, (RAYS, 1, 1, 1), generator=g).to(device)
        return _model(RAY_GRIDS, device), xy, rgb, idx, (False, True)
    model = _model(1, device)
    idx = torch.tensor([0], device=device)
    if kind == "uniform":
        rgb = (0.5 + 0.5 * torch.randn(1, H, W, 3, generator=g)).to(device)
        ys, xs = torch.meshgrid(torch.linspace(0, 1, H), torch.linspace(0, 1, W), indexing="ij")
        xy = torch.stack([xs, ys], -1).unsqueeze(0).to(device)
        return model, xy, rgb, idx, (False, True)
    xy = (0.5 + 0.5 * torch.randn(1, H, W, 2, generator=g)).to(device)
    rgb = (0.5 + 0.5 * torch.randn(1, H, W, 3, generator=g)).to(device)
    return model, xy, rgb, idx, (True, True)


def _slice_fn(impl: str, model):
    if impl == "ours":
        return lambda xy, rgb, idx: bilagrid.slice(model, xy, rgb, idx)["rgb"]
    if impl == "lib_bilagrid":
        return lambda xy, rgb, idx: reference.bilagrid_slice(model.grids, xy, rgb, idx, model.rgb2gray_weight)[0]
    if impl == "core":  # the pixel-grid op with lib_bilagrid's sampling (uniform case only)
        w = model.rgb2gray_weight

        def core(xy, rgb, idx):
            img = rgb.permute(0, 3, 1, 2)
            gray = (rgb @ w.T)[..., 0]
            return bo.bilateral_slice_apply(model.grids[:1], gray, img, True, True).permute(0, 2, 3, 1)

        return core
    if impl == "fused_bilagrid":
        fused = pytest.importorskip("fused_bilagrid")
        fmodel = fused.BilateralGrid(model.grids.shape[0], *GRID).to(model.grids.device)
        fmodel.grids = model.grids  # the same leaf: _step differentiates model.grids
        return lambda xy, rgb, idx: fused.slice(fmodel, xy, rgb, idx, compute_coords_grad=xy.requires_grad)["rgb"]
    raise ValueError(impl)


def _step(fn, model, xy, rgb, idx, needs, backward: bool):
    if not backward:
        with torch.no_grad():
            return fn(xy, rgb, idx)
    leaves = [model.grids] + [t for t, n in zip((xy, rgb), needs) if n]
    xy_ = xy.requires_grad_(needs[0])
    rgb_ = rgb.requires_grad_(needs[1])
    out = fn(xy_, rgb_, idx)
    return torch.autograd.grad(out, leaves, torch.ones_like(out))


def _interleaved(benchmark, fns: dict) -> None:
    """Best-of-3 of each implementation, called alternately (a shared machine's load hits all
    alike); the ratios go into extra_info."""
    best = {n: float("inf") for n in fns}
    for _ in range(3):
        for n, f in fns.items():
            t0 = time.perf_counter()
            f()
            best[n] = min(best[n], time.perf_counter() - t0)
    benchmark.extra_info["interleaved_min_ms"] = {n: round(t * 1e3, 2) for n, t in best.items()}
    if "lib_bilagrid" in best:
        benchmark.extra_info["interleaved_speedup"] = {
            n: round(best["lib_bilagrid"] / t, 1) for n, t in best.items() if n != "lib_bilagrid"
        }


CPU_CASES = [
    ("uniform", "ours"),
    ("uniform", "core"),
    ("uniform", "lib_bilagrid"),
    ("irregular", "ours"),
    ("irregular", "lib_bilagrid"),
    ("rays", "ours"),
    ("rays", "lib_bilagrid"),
]


def _size(kind: str) -> str:
    return f"{RAYS} rays, {RAY_GRIDS} grids" if kind == "rays" else f"{W}x{H}"


@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("kind,impl", CPU_CASES, ids=["-".join(c) for c in CPU_CASES])
def test_cpu_slice(benchmark, kind, impl, mode):
    model, xy, rgb, idx, needs = _case(kind, "cpu")
    backward = mode == "forward_backward"
    fn = _slice_fn(impl, model)
    benchmark.group = f"bilagrid cpu {kind} {mode} {_size(kind)}"
    benchmark.extra_info.update(device="cpu", case=kind, op=mode, impl=impl, size=_size(kind), grid=GRID, threads=torch.get_num_threads())
    benchmark.pedantic(_step, args=(fn, model, xy, rgb, idx, needs, backward), rounds=ROUNDS[impl], warmup_rounds=1, iterations=1)
    if impl == "ours":
        impls = ["ours", "lib_bilagrid"] + (["core"] if kind == "uniform" else [])
        _interleaved(benchmark, {n: (lambda f=_slice_fn(n, model): _step(f, model, xy, rgb, idx, needs, backward)) for n in impls})


@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("impl", ["ours", "lib_bilagrid"])
def test_cpu_tv(benchmark, impl, mode):
    model = _model(TV_GRIDS, "cpu")
    tv = bilagrid.total_variation_loss if impl == "ours" else _lib_tv

    def run(f=tv):
        if mode == "forward":
            with torch.no_grad():
                return f(model.grids)
        return torch.autograd.grad(f(model.grids), model.grids)

    benchmark.group = f"bilagrid cpu tv {mode} {TV_GRIDS} grids"
    benchmark.extra_info.update(device="cpu", case="tv", op=mode, impl=impl, grids=TV_GRIDS, grid=GRID, threads=torch.get_num_threads())
    benchmark.pedantic(run, rounds=20 if impl == "ours" else 5, warmup_rounds=1, iterations=1)
    if impl == "ours":
        _interleaved(benchmark, {"ours": run, "lib_bilagrid": lambda: run(_lib_tv)})


# ----------------------------------------------------------------------------------------------
# CUDA


CUDA_IMPLS = ["ours", "lib_bilagrid", "fused_bilagrid"]


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("kind", ["uniform", "irregular", "rays"])
@pytest.mark.parametrize("impl", CUDA_IMPLS + ["core"])
def test_cuda_slice(benchmark, requires_cuda, impl, kind, mode):
    if impl == "core" and kind != "uniform":
        pytest.skip("the pixel-grid op covers the uniform case only")
    model, xy, rgb, idx, needs = _case(kind, "cuda")
    fn = _slice_fn(impl, model)
    deterministic = impl != "fused_bilagrid"
    with bc_deterministic(deterministic):
        ms = bc.cuda_ms(lambda: _step(fn, model, xy, rgb, idx, needs, mode == "forward_backward"))
        benchmark.pedantic(_step, args=(fn, model, xy, rgb, idx, needs, mode == "forward_backward"), rounds=5, iterations=1)
    benchmark.group = f"bilagrid cuda {kind} {mode} {_size(kind)}"
    benchmark.extra_info.update(device="cuda", case=kind, op=mode, impl=impl, size=_size(kind), grid=GRID, event_ms=round(ms, 3), deterministic=deterministic)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("impl", CUDA_IMPLS)
def test_cuda_tv(benchmark, requires_cuda, impl, mode):
    model = _model(TV_GRIDS, "cuda")
    if impl == "ours":
        tv = bilagrid.total_variation_loss
    elif impl == "lib_bilagrid":
        tv = _lib_tv
    else:
        tv = pytest.importorskip("fused_bilagrid").total_variation_loss

    def run():
        if mode == "forward":
            with torch.no_grad():
                return tv(model.grids)
        return torch.autograd.grad(tv(model.grids), model.grids)

    ms = bc.cuda_ms(run)
    benchmark.pedantic(run, rounds=5, iterations=1)
    benchmark.group = f"bilagrid cuda tv {mode} {TV_GRIDS} grids"
    benchmark.extra_info.update(device="cuda", case="tv", op=mode, impl=impl, grids=TV_GRIDS, event_ms=round(ms, 3))


class bc_deterministic:
    """torch.use_deterministic_algorithms(flag) for a block."""

    def __init__(self, flag: bool):
        self.flag = flag

    def __enter__(self):
        self.old = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(self.flag, warn_only=True)

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(self.old)
