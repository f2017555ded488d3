"""Helpers shared by the op test files: inputs, comparisons against the reference, devices, and
the guard that proves an error is raised before any kernel runs."""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
import os
import platform
import subprocess
import sys
import textwrap

import pytest
import torch

OPS = torch.ops.bilateral_ops
F64 = torch.float64

# Every test that runs a kernel runs on each device of this list; CUDA is skipped without a GPU.
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
    ),
]

# Relative tolerance of a kernel against the float64 reference, scaled by 1 + max|reference|.
TOL = {("cpu", torch.float64): 1e-10, ("cpu", torch.float32): 1e-5, ("cuda", torch.float64): 1e-10, ("cuda", torch.float32): 1e-4}


def tol(device: str, dtype: torch.dtype) -> float:
    return TOL[(torch.device(device).type, dtype)]


def _id(case) -> str:
    return "x".join(str(v) for v in case)


# ----------------------------------------------------------------------------------------------
# Inputs


def _smooth_guide(n: int, h: int, w: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """A low-frequency guide: over 64 pixels of a row it moves by < 0.15, i.e. < 4 z cells at D=24,
    so the CPU kernel takes its dense-z path."""
    ys = torch.arange(h, dtype=F64).view(1, h, 1)
    xs = torch.arange(w, dtype=F64).view(1, 1, w)
    phase = torch.rand(n, 1, 1, generator=gen, dtype=F64)
    g = 0.5 + 0.25 * torch.sin(2 * math.pi * (xs / 700 + ys / 250 + phase)) + 0.1 * torch.cos(
        2 * math.pi * (ys / 97 - phase)
    )
    return g.to(dtype)


def make_guide(kind: str, n: int, h: int, w: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Guides of every regime the kernels distinguish: uniform noise (per-pixel gathers when D is
    large, dense spans otherwise), values outside [0, 1], smooth fields, and rows that switch."""
    if kind in ("uniform", "noisy"):
        return torch.rand(n, h, w, generator=gen, dtype=F64).to(dtype)
    if kind == "wide":  # partly outside [0, 1]: clamps to the edge cells
        return (torch.rand(n, h, w, generator=gen, dtype=F64) * 1.6 - 0.3).to(dtype)
    if kind == "smooth":
        return _smooth_guide(n, h, w, dtype, gen)
    if kind == "mixed":  # alternating smooth and noisy 50-pixel bands: paths switch inside a row
        g = _smooth_guide(n, h, w, F64, gen)
        noisy = torch.rand(n, h, w, generator=gen, dtype=F64) * 1.6 - 0.3
        band = (torch.arange(w) // 50) % 2 == 1
        g[..., band] = noisy[..., band]
        return g.to(dtype)
    raise AssertionError(kind)


def make_apply_case(n, ci, co, d, gh, gw, h, w, has_offset, dtype, guide_kind, gen, device="cpu"):
    stride = ci + (1 if has_offset else 0)
    grid = torch.randn(n, co * stride, d, gh, gw, generator=gen, dtype=F64).to(dtype)
    guide = make_guide(guide_kind, n, h, w, dtype, gen)
    inp = torch.rand(n, ci, h, w, generator=gen, dtype=F64).to(dtype)
    return grid.to(device), guide.to(device), inp.to(device)


def make_slice_case(n, c, d, gh, gw, h, w, dtype, guide_kind, gen, device="cpu"):
    grid = torch.randn(n, c, d, gh, gw, generator=gen, dtype=F64).to(dtype)
    guide = make_guide(guide_kind, n, h, w, dtype, gen)
    return grid.to(device), guide.to(device)


@contextlib.contextmanager
def deterministic(flag: bool):
    """torch.use_deterministic_algorithms(flag) for the duration, restored after."""
    old = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(flag)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old, warn_only=old_warn)


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout (every other element of a wider buffer)."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


# ----------------------------------------------------------------------------------------------
# Running and comparing


def run_with_grads(fn, tensors, extra=(), grad_output=None, gen=None):
    """fn(*tensors, *extra) with every tensor a fresh leaf; returns (out, grads, grad_output)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves, *extra)
    if grad_output is None:
        grad_output = torch.randn(out.shape, generator=gen, dtype=F64).to(out.dtype).to(out.device)
    grads = torch.autograd.grad(out, leaves, grad_output)
    return out.detach(), [g.detach() for g in grads], grad_output


CPU_ISA_LEVELS = ("x86-64-v4", "x86-64-v3", "x86-64")
requires_x86_64 = pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64"), reason="the CPU kernel copies are per x86-64 level"
)


def run_at_each_cpu_isa(tmp_path, inputs, body: str):
    """Runs ``body`` (the source of a function of ``*inputs`` returning tensors, with ``torch`` and
    ``ops`` = torch.ops.bilateral_ops in scope) once per x86-64 level whose copy of the CPU kernels
    this machine can run (csrc/cpu/simd.h), each in a fresh process capped by
    BILATERAL_OPS_CPU_ISA; yields (level, result), having checked that the process ran that level."""
    from bilateral_ops import _C

    torch.save(inputs, tmp_path / "inputs.pt")
    script = (
        "import sys, torch\nimport bilateral_ops\nfrom bilateral_ops import _C\n"
        "ops = torch.ops.bilateral_ops\ndef run(*inputs):\n"
        + textwrap.indent(textwrap.dedent(body), "    ")
        + "\ntorch.save((_C.cpu_isa(), run(*torch.load(sys.argv[1]))), sys.argv[2])\n"
    )
    for level in CPU_ISA_LEVELS[CPU_ISA_LEVELS.index(_C.cpu_isa()) :]:
        out = tmp_path / f"{level}.pt"
        env = dict(os.environ, BILATERAL_OPS_CPU_ISA=level)
        subprocess.run([sys.executable, "-c", script, str(tmp_path / "inputs.pt"), str(out)], env=env, check=True)
        isa, result = torch.load(out)
        assert isa == level, f"asked for {level}, ran {isa}"
        yield level, result


def assert_close_with_nans(
    got: torch.Tensor, want: torch.Tensor, rel: float, what: str, non_finite: bool = False
) -> None:
    """NaN where want has NaN, elsewhere assert_close_scaled. With ``non_finite``: NaN or +-inf
    wherever want has either (which of them may differ: inf * 0 against inf - inf is a matter of
    the order of the operations), and close elsewhere."""
    got, want = got.detach().cpu(), want.detach().cpu()
    if non_finite:
        finite = torch.isfinite(want)
        assert torch.equal(torch.isfinite(got), finite), f"{what}: non-finite values differ"
        assert_close_scaled(got[finite], want[finite], rel, what)
        return
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{what}: NaNs differ"
    assert_close_scaled(got.nan_to_num(), want.nan_to_num(), rel, what)


def assert_same_as_registered(eager, registered, inputs, grad_output, what="") -> None:
    """A public function's eager autograd (lib.eager_function) against differentiating torch.ops'
    op with its registered formula: two different graph nodes, the same output and the same
    gradients for ``inputs``, bit for bit."""
    assert type(eager.grad_fn).__name__ != type(registered.grad_fn).__name__, what  # two paths
    assert torch.equal(eager, registered), what
    a = torch.autograd.grad(eager, inputs, grad_output)
    b = torch.autograd.grad(registered, inputs, grad_output)
    assert all(torch.equal(u, w) for u, w in zip(a, b)), what


def assert_close_scaled(got: torch.Tensor, want: torch.Tensor, rel: float, what: str, mask=None) -> None:
    """|got - want| <= rel * (1 + max|want|) elementwise (optionally only where mask is True)."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    got, want = got.detach().cpu(), want.detach().cpu()
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    g, w = got.double(), want.double()
    if mask is not None:
        g, w = g[mask.cpu()], w[mask.cpu()]
    if w.numel() == 0:
        return
    tol_ = rel * (1 + w.abs().max().item())
    err = (g - w).abs().max().item()
    assert err <= tol_, f"{what}: max abs err {err:.3e} > tol {tol_:.3e}"


def away_from_z_kinks(guide: torch.Tensor, d: int, margin: float = 1e-4) -> torch.Tensor:
    """Pixels whose z coordinate is not within ``margin`` cells of a kink of the tent (a cell centre
    or the clamp boundary), where float32 and float64 may legitimately pick different sides."""
    s = guide.double() * d - 0.5
    return (s - s.round()).abs() > margin


def reference_dguide(fn, grid: torch.Tensor, guide: torch.Tensor, *rest) -> torch.Tensor:
    """d fn(grid, guide, *rest) / d guide, pixel by pixel, by autograd of the reference: each output
    pixel depends on its own guide pixel only, so channel c's derivative is the gradient of the
    sum of channel c."""
    leaf = guide.detach().clone().requires_grad_(True)
    out = fn(grid, leaf, *rest)
    rows = [torch.autograd.grad(out[:, c].sum(), leaf, retain_graph=True)[0] for c in range(out.shape[1])]
    return torch.stack(rows, dim=1)


@functools.cache
def _grid_sample_double_backward() -> bool:
    x = torch.rand(1, 1, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    c = torch.rand(1, 1, 1, 1, 3, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(torch.nn.functional.grid_sample(x, c, align_corners=False).sum(), c, create_graph=True)
    try:
        torch.autograd.grad(g.sum(), x)
    except RuntimeError:
        return False
    return True


def requires_grid_sample_double_backward() -> None:
    """The references' second derivatives go through grid_sample's double backward, which older
    torch releases do not implement for 3-D grids: skip there (ours is checked by gradgradcheck)."""
    if not _grid_sample_double_backward():
        pytest.skip(f"torch {torch.__version__} has no double backward of grid_sampler_3d")


def second_derivative_probe(fn, tensors, extra=()):
    """Gradients of a scalar built from first derivatives (a gradient penalty): the quantity users
    of create_graph=True get. Returns the second-order gradients for every input."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves, *extra)
    weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view(out.shape)
    grads = torch.autograd.grad((out * out * weight).sum(), leaves, create_graph=True)
    penalty = sum((g * g).sum() for g in grads)
    return [g.detach() for g in torch.autograd.grad(penalty, leaves, allow_unused=True)]


# ----------------------------------------------------------------------------------------------
# Errors before any kernel


def no_kernel_runs(monkeypatch) -> None:
    """Make every compiled op and the reference raise, so a test proves that an error comes before
    any kernel."""

    class _Poisoned:
        def __getattr__(self, name):
            raise AssertionError(f"kernel {name} reached despite invalid arguments")

    # import_module returns the modules; attribute access would give the functions of that name.
    for name in (
        "bilateral_ops.bilateral_slice",
        "bilateral_ops.bilateral_slice_apply",
        "bilateral_ops.bilateral_slice_apply_points",
        "bilateral_ops.grid_tv_loss",
        "bilateral_ops.grid_splat",
        "bilateral_ops.grid_blur",
        "bilateral_ops.bilateral_grid_filter",
        "bilateral_ops.curve_guide",
        "bilateral_ops.bilateral_filter",
    ):
        mod = importlib.import_module(name)
        monkeypatch.setattr(mod, "_ops", _Poisoned())
        monkeypatch.setattr(mod, "reference", _Poisoned())


def make_curve_case(n, c, h, w, k, dtype=F64, gen=None, device="cpu", margin=0.0, tries=200, mix_bias=None):
    """curve_guide arguments near HDRNet's initialisation (a noisy identity ccm, shifts spread over
    [0, 1), mixed-sign slopes) for an (n, c, h, w) image with k curve points. With margin > 0, the
    draw is repeated until every relu input c_k - shift and the pre-clamp guide's distance to 0 and
    1 are at least margin away from their kinks (what finite differences need); some pixels still
    clamp. mix_bias, if given, replaces the drawn one before the margin is checked."""
    gen = gen if gen is not None else torch.Generator().manual_seed(0)
    for _ in range(tries):
        x = torch.rand(n, c, h, w, generator=gen, dtype=F64)
        ccm = torch.eye(c, dtype=F64) + 0.3 * torch.randn(c, c, generator=gen, dtype=F64)
        ccm_bias = 0.1 * torch.randn(c, generator=gen, dtype=F64)
        shifts = torch.linspace(0, 1, k + 1, dtype=F64)[:-1].repeat(c, 1) + 0.05 * torch.rand(c, k, generator=gen, dtype=F64)
        slopes = torch.randn(c, k, generator=gen, dtype=F64) * 0.3
        slopes[:, 0] += 1.0
        mix = (torch.rand(c, generator=gen, dtype=F64) + 0.5) / c
        mix_bias = 0.1 * torch.randn(1, generator=gen, dtype=F64) if mix_bias is None else torch.tensor([float(mix_bias)], dtype=F64)
        args = [x, ccm, ccm_bias, shifts, slopes, mix, mix_bias]
        if margin <= 0 or _curve_margin(*args) >= margin:
            return [t.to(dtype).to(device) for t in args]
    raise AssertionError("no draw kept away from the kinks; lower the margin")


def curve_pre_clamp(x, ccm, ccm_bias, shifts, slopes, mix, mix_bias):
    """The relu inputs (N, C, K, H, W) and the guide before its clamp (N, H, W), in float64."""
    x, ccm, ccm_bias, shifts, slopes, mix, mix_bias = (t.double() for t in (x, ccm, ccm_bias, shifts, slopes, mix, mix_bias))
    c = torch.einsum("ki,nihw->nkhw", ccm, x) + ccm_bias.view(1, -1, 1, 1)
    a = c.unsqueeze(2) - shifts.view(1, *shifts.shape, 1, 1)
    g = (mix.view(1, -1, 1, 1) * (slopes.view(1, *slopes.shape, 1, 1) * a.clamp_min(0)).sum(2)).sum(1) + mix_bias
    return a, g


def _curve_margin(*args) -> float:
    a, g = curve_pre_clamp(*args)
    return min(a.abs().min().item(), g.abs().min().item(), (g - 1).abs().min().item())


def t64(*shape, dtype=F64):
    return torch.rand(*shape, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Radiance-field grids (lib_bilagrid's sampling)


def gather_points(grid, coords, inp, grid_idx, has_offset=True):
    """bilateral_slice_apply_points written as the eight-corner gather of its definition, in the
    arguments' dtype, independently of F.grid_sample: index s = clamp(u (S - 1), 0, S - 1) per
    axis, cells floor(s) and floor(s) + 1 (clamped), tent weights."""
    m, c, d, gh, gw = grid.shape
    ci = inp.shape[1]
    stride = ci + (1 if has_offset else 0)

    def taps(u, size):
        s = (u * (size - 1)).clamp(0, size - 1)
        i0 = s.floor().long()
        w1 = s - i0
        return i0, (i0 + 1).clamp(max=size - 1), 1 - w1, w1

    x0, x1, wx0, wx1 = taps(coords[:, 0], gw)
    y0, y1, wy0, wy1 = taps(coords[:, 1], gh)
    z0, z1, wz0, wz1 = taps(coords[:, 2], d)
    coeffs = 0
    for zi, wz in ((z0, wz0), (z1, wz1)):
        for yi, wy in ((y0, wy0), (y1, wy1)):
            for xi, wx in ((x0, wx0), (x1, wx1)):
                coeffs = coeffs + grid[grid_idx, :, zi, yi, xi] * (wz * wy * wx).unsqueeze(1)  # (P, C)
    coeffs = coeffs.view(-1, c // stride, stride)
    out = (coeffs[:, :, :ci] * inp.unsqueeze(1)).sum(-1)
    return out + coeffs[:, :, ci] if has_offset else out


def make_points_case(m, ci, co, d, gh, gw, p, has_offset, dtype, gen, device="cpu", spread=0.0, knots=0.0):
    """Grids (m, co*stride, d, gh, gw), coords (p, 3) in [-spread, 1 + spread], a fraction
    `knots` of the coordinates exactly on 0, 1 or grid knots, inputs and per-sample grid indices."""
    stride = ci + (1 if has_offset else 0)
    grid = torch.randn(m, co * stride, d, gh, gw, generator=gen, dtype=F64)
    coords = torch.rand(p, 3, generator=gen, dtype=F64) * (1 + 2 * spread) - spread
    if knots > 0:
        pick = torch.rand(p, 3, generator=gen, dtype=F64) < knots
        sizes = torch.tensor([gw, gh, d], dtype=F64)
        k = torch.floor(torch.rand(p, 3, generator=gen, dtype=F64) * sizes)
        on_knot = torch.where(sizes > 1, k / (sizes - 1).clamp(min=1), torch.zeros(()))
        coords = torch.where(pick, on_knot, coords)
    inp = torch.rand(p, ci, generator=gen, dtype=F64) * 1.4 - 0.2
    idx = torch.randint(0, m, (p,), generator=gen)
    return grid.to(dtype).to(device), coords.to(dtype).to(device), inp.to(dtype).to(device), idx.to(device)


def away_from_knots(coords: torch.Tensor, sizes, margin: float = 1e-4) -> torch.Tensor:
    """Samples none of whose coordinates lies within `margin` cells of a knot or a border: where
    one-sided derivatives of float32 and float64 (or of finite differences) may differ."""
    ok = torch.ones(coords.shape[0], dtype=torch.bool)
    for a, size in enumerate(sizes):
        if size == 1:
            continue
        s = coords[:, a].double().cpu() * (size - 1)
        ok &= (s - s.round()).abs() > margin
    return ok
