"""Tests of bilateral_slice and bilateral_slice_apply (CPU kernels) against DESIGN.md.

The compiled kernels are compared with ``bilateral_ops.reference`` (F.grid_sample), always
evaluated in float64 on the very same input values, so the comparison measures the kernel's error.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import bilateral_ops as bo
import bilateral_ops.ops as bo_ops
from bilateral_ops import reference

OPS = torch.ops.bilateral_ops

# ----------------------------------------------------------------------------------------------
# Helpers


def _smooth_guide(n: int, h: int, w: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """A low-frequency guide: over 64 pixels of a row it moves by < 0.15, i.e. < 4 z cells at D=24,
    so the CPU kernel takes its dense-z path."""
    ys = torch.arange(h, dtype=torch.float64).view(1, h, 1)
    xs = torch.arange(w, dtype=torch.float64).view(1, 1, w)
    phase = torch.rand(n, 1, 1, generator=gen, dtype=torch.float64)
    g = 0.5 + 0.25 * torch.sin(2 * math.pi * (xs / 700 + ys / 250 + phase)) + 0.1 * torch.cos(
        2 * math.pi * (ys / 97 - phase)
    )
    return g.to(dtype)


def make_guide(kind: str, n: int, h: int, w: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if kind in ("uniform", "noisy"):
        return torch.rand(n, h, w, generator=gen, dtype=torch.float64).to(dtype)
    if kind == "wide":  # partly outside [0, 1]: clamps to the edge cells
        return (torch.rand(n, h, w, generator=gen, dtype=torch.float64) * 1.6 - 0.3).to(dtype)
    if kind == "smooth":
        return _smooth_guide(n, h, w, dtype, gen)
    if kind == "mixed":  # alternating smooth and noisy 50-pixel bands: paths switch inside a row
        g = _smooth_guide(n, h, w, torch.float64, gen)
        noisy = torch.rand(n, h, w, generator=gen, dtype=torch.float64) * 1.6 - 0.3
        band = (torch.arange(w) // 50) % 2 == 1
        g[..., band] = noisy[..., band]
        return g.to(dtype)
    raise AssertionError(kind)


def make_apply_case(n, ci, co, d, gh, gw, h, w, has_offset, dtype, guide_kind, gen):
    stride = ci + (1 if has_offset else 0)
    grid = torch.randn(n, co * stride, d, gh, gw, generator=gen, dtype=torch.float64).to(dtype)
    guide = make_guide(guide_kind, n, h, w, dtype, gen)
    inp = torch.rand(n, ci, h, w, generator=gen, dtype=torch.float64).to(dtype)
    return grid, guide, inp


def run_with_grads(fn, tensors, extra=(), grad_output=None, gen=None):
    """fn(*tensors, *extra) with every tensor a fresh leaf; returns (out, grads, grad_output)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves, *extra)
    if grad_output is None:
        grad_output = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    grads = torch.autograd.grad(out, leaves, grad_output)
    return out.detach(), [g.detach() for g in grads], grad_output


def assert_close_scaled(got: torch.Tensor, want: torch.Tensor, rel: float, what: str, mask=None) -> None:
    """|got - want| <= rel * (1 + max|want|) elementwise (optionally only where mask is True)."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    g, w = got.double(), want.double()
    if mask is not None:
        g, w = g[mask], w[mask]
    if w.numel() == 0:
        return
    tol = rel * (1 + w.abs().max().item())
    err = (g - w).abs().max().item()
    assert err <= tol, f"{what}: max abs err {err:.3e} > tol {tol:.3e}"


def away_from_z_kinks(guide: torch.Tensor, d: int, margin: float = 1e-4) -> torch.Tensor:
    """Pixels whose z coordinate is not within ``margin`` cells of a kink of the tent (a cell centre
    or the clamp boundary), where float32 and float64 may legitimately pick different sides."""
    s = guide.double() * d - 0.5
    return (s - s.round()).abs() > margin


TOL = {torch.float64: 1e-10, torch.float32: 1e-5}

# (N, Ci, Co, D, Gh, Gw, H, W, guide kind)
APPLY_CASES = [
    (1, 3, 3, 8, 16, 16, 37, 53, "uniform"),  # non-divisible sizes
    (2, 3, 3, 8, 16, 16, 37, 53, "wide"),  # batch, guide outside [0, 1]
    (1, 1, 1, 1, 1, 1, 5, 7, "uniform"),  # D = Gh = Gw = 1
    (2, 4, 1, 4, 9, 13, 6, 5, "wide"),  # image smaller than the grid
    (1, 3, 1, 24, 4, 3, 20, 300, "noisy"),  # large D, noisy: per-pixel gather path
    (2, 1, 3, 24, 5, 2, 9, 301, "smooth"),  # large D, smooth: dense-z path, several 64-px blocks
    (1, 3, 3, 24, 3, 4, 11, 410, "mixed"),  # both paths in one row
    (3, 4, 3, 5, 2, 1, 4, 260, "wide"),  # Gw = 1: one segment spanning 260 columns
    (1, 3, 3, 16, 1, 7, 1, 229, "noisy"),  # H = 1, Gh = 1
    (1, 1, 3, 12, 6, 6, 33, 1, "uniform"),  # W = 1
    (2, 3, 3, 16, 16, 16, 64, 257, "mixed"),  # HDRNet-like
]

# (N, C, D, Gh, Gw, H, W, guide kind)
SLICE_CASES = [
    (1, 3, 8, 16, 16, 37, 53, "uniform"),
    (2, 12, 8, 16, 16, 37, 53, "wide"),
    (1, 1, 1, 1, 1, 5, 7, "uniform"),
    (2, 5, 4, 9, 13, 6, 5, "wide"),
    (1, 4, 24, 4, 3, 20, 300, "noisy"),
    (2, 3, 24, 5, 2, 9, 301, "smooth"),
    (1, 12, 24, 3, 4, 11, 410, "mixed"),
    (3, 2, 5, 2, 1, 4, 260, "wide"),
    (1, 1, 16, 1, 7, 1, 229, "noisy"),
    (1, 3, 12, 6, 6, 33, 1, "uniform"),
    # Tall images: the CPU backward splits rows into up to 64 chunks, each accumulating only the
    # band of grid rows it touches; bands overlap and are summed in chunk order.
    (1, 3, 8, 300, 3, 1100, 9, "wide"),  # fine grid: many distinct bands
    (2, 2, 4, 1, 2, 1030, 5, "uniform"),  # Gh = 1: every chunk's band is the one grid row
    (1, 4, 10, 37, 4, 600, 70, "smooth"),  # bands of a few rows, dense-z path
]


def _id(case):
    return "x".join(str(v) for v in case)


# ----------------------------------------------------------------------------------------------
# Against the reference: forward and every gradient


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("has_offset", [True, False], ids=["offset", "no_offset"])
@pytest.mark.parametrize("case", APPLY_CASES, ids=_id)
def test_slice_apply_matches_reference(case, has_offset, dtype, gen):
    n, ci, co, d, gh, gw, h, w, kind = case
    grid, guide, inp = make_apply_case(n, ci, co, d, gh, gw, h, w, has_offset, dtype, kind, gen)
    out, grads, go = run_with_grads(bo.bilateral_slice_apply, (grid, guide, inp), (has_offset,), gen=gen)
    ref, ref_grads, _ = run_with_grads(
        reference.bilateral_slice_apply,
        (grid.double(), guide.double(), inp.double()),
        (has_offset,),
        grad_output=go.double(),
    )
    assert out.dtype == dtype and out.shape == (n, co, h, w)
    rel = TOL[dtype]
    assert_close_scaled(out, ref, rel, "output")
    assert_close_scaled(grads[0], ref_grads[0], rel, "grad_grid")
    mask = None if dtype == torch.float64 else away_from_z_kinks(guide, d)
    assert_close_scaled(grads[1], ref_grads[1], rel, "grad_guide", mask)
    assert_close_scaled(grads[2], ref_grads[2], rel, "grad_input")
    for g, t in zip(grads, (grid, guide, inp)):
        assert g.dtype == dtype and g.shape == t.shape
    # The gradient w.r.t. the guide must not be trivially zero inside (0, 1) (unless D = 1).
    if d > 1:
        inside = (guide > 0.05) & (guide < 0.95)
        assert grads[1][inside].abs().max() > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", SLICE_CASES, ids=_id)
def test_slice_matches_reference(case, dtype, gen):
    n, c, d, gh, gw, h, w, kind = case
    grid = torch.randn(n, c, d, gh, gw, generator=gen, dtype=torch.float64).to(dtype)
    guide = make_guide(kind, n, h, w, dtype, gen)
    out, grads, go = run_with_grads(bo.bilateral_slice, (grid, guide), gen=gen)
    ref, ref_grads, _ = run_with_grads(
        reference.bilateral_slice, (grid.double(), guide.double()), grad_output=go.double()
    )
    assert out.dtype == dtype and out.shape == (n, c, h, w)
    rel = TOL[dtype]
    assert_close_scaled(out, ref, rel, "output")
    assert_close_scaled(grads[0], ref_grads[0], rel, "grad_grid")
    mask = None if dtype == torch.float64 else away_from_z_kinks(guide, d)
    assert_close_scaled(grads[1], ref_grads[1], rel, "grad_guide", mask)


def test_dense_and_gather_paths_agree(gen):
    """The same pixels computed once in a smooth block (dense-z path) and once in a block made
    noisy by other pixels (gather path) give the same values and gradients."""
    d, w = 24, 128
    grid = torch.randn(1, 6, d, 3, 1, generator=gen, dtype=torch.float64)  # Gw=1: one segment
    inp = torch.rand(1, 2, 2, w, generator=gen, dtype=torch.float64)
    smooth = 0.4 + 0.1 * torch.sin(torch.arange(w, dtype=torch.float64) / 30)
    guide = torch.stack([smooth, smooth.clone()]).unsqueeze(0)  # (1, 2, w)
    guide[0, 1, 1::2] = torch.rand(w // 2, generator=gen, dtype=torch.float64)  # row 1: noisy
    # Row 0 is smooth everywhere; in row 1 the even pixels keep the smooth values.
    inp[:, :, 1] = inp[:, :, 0]
    # Rows 0 and 1 sit at different y positions: make the grid constant along y so that equal
    # guides and inputs must give equal results in both rows.
    grid_y = grid[:, :, :, :1].expand(1, 6, d, 3, 1).contiguous()
    out, grads, _ = run_with_grads(
        bo.bilateral_slice_apply, (grid_y, guide, inp), (True,), grad_output=torch.ones(1, 2, 2, w, dtype=torch.float64)
    )
    torch.testing.assert_close(out[:, :, 1, ::2], out[:, :, 0, ::2], rtol=0, atol=1e-13)
    torch.testing.assert_close(grads[1][:, 1, ::2], grads[1][:, 0, ::2], rtol=0, atol=1e-12)
    torch.testing.assert_close(grads[2][:, :, 1, ::2], grads[2][:, :, 0, ::2], rtol=0, atol=1e-13)
    ref = reference.bilateral_slice_apply(grid_y, guide, inp)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Guide layout and strides


def test_guide_with_channel_dim_equals_3d(gen):
    grid, guide, inp = make_apply_case(2, 3, 3, 8, 4, 5, 13, 17, True, torch.float64, "uniform", gen)
    out3, g3, go = run_with_grads(bo.bilateral_slice_apply, (grid, guide, inp), gen=gen)
    out4, g4, _ = run_with_grads(bo.bilateral_slice_apply, (grid, guide[:, None], inp), grad_output=go)
    assert torch.equal(out3, out4)
    assert g4[1].shape == (2, 1, 13, 17)
    for a, b in zip(g3, (g4[0], g4[1][:, 0], g4[2])):
        assert torch.equal(a, b)
    s3, sg3, sgo = run_with_grads(bo.bilateral_slice, (grid, guide), gen=gen)
    s4, sg4, _ = run_with_grads(bo.bilateral_slice, (grid, guide[:, None]), grad_output=sgo)
    assert torch.equal(s3, s4)
    assert torch.equal(sg3[0], sg4[0]) and torch.equal(sg3[1], sg4[1][:, 0])


def _noncontiguous_views(gen, dtype):
    n, ci, co, d, gh, gw, h, w = 2, 3, 3, 8, 5, 6, 19, 23
    # grid: permuted storage; guide: transposed; input: strided slice of a larger tensor.
    grid = torch.randn(n, gw, gh, d, co * (ci + 1), generator=gen, dtype=dtype).permute(0, 4, 3, 2, 1)
    guide = torch.rand(n, w, h, generator=gen, dtype=dtype).transpose(1, 2)
    inp = torch.rand(n, 2 * ci, h, 2 * w, generator=gen, dtype=dtype)[:, ::2, :, 1::2]
    assert not grid.is_contiguous() and not guide.is_contiguous() and not inp.is_contiguous()
    return grid, guide, inp


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_noncontiguous_inputs(gen, dtype):
    grid, guide, inp = _noncontiguous_views(gen, dtype)
    out, grads, go = run_with_grads(bo.bilateral_slice_apply, (grid, guide, inp), gen=gen)
    outc, gradsc, _ = run_with_grads(
        bo.bilateral_slice_apply, (grid.contiguous(), guide.contiguous(), inp.contiguous()), grad_output=go
    )
    assert torch.equal(out, outc)
    for a, b in zip(grads, gradsc):
        assert torch.equal(a, b)
    ref = reference.bilateral_slice_apply(grid.double(), guide.double(), inp.double())
    assert_close_scaled(out, ref, TOL[dtype], "output")

    s, sg, sgo = run_with_grads(bo.bilateral_slice, (grid, guide), gen=gen)
    sc, sgc, _ = run_with_grads(bo.bilateral_slice, (grid.contiguous(), guide.contiguous()), grad_output=sgo)
    assert torch.equal(s, sc)
    assert torch.equal(sg[0], sgc[0]) and torch.equal(sg[1], sgc[1])


def test_expanded_batch_and_noncontiguous_grad_output(gen):
    """Stride-0 (expanded) grid and guide, and a non-contiguous grad_output."""
    grid1 = torch.randn(1, 4, 6, 3, 4, generator=gen, dtype=torch.float64)
    guide1 = torch.rand(1, 9, 70, generator=gen, dtype=torch.float64)
    inp = torch.rand(3, 3, 9, 70, generator=gen, dtype=torch.float64)
    grid, guide = grid1.expand(3, -1, -1, -1, -1), guide1.expand(3, -1, -1)
    out = bo.bilateral_slice_apply(grid, guide, inp)
    torch.testing.assert_close(
        out, reference.bilateral_slice_apply(grid.contiguous(), guide.contiguous(), inp), rtol=0, atol=1e-12
    )
    go = torch.randn(3, 70, 9, 1, generator=gen, dtype=torch.float64).permute(0, 3, 2, 1)
    gg, gd, gi = OPS._bilateral_slice_apply_backward(go, grid, guide, inp, True)
    gg2, gd2, gi2 = OPS._bilateral_slice_apply_backward(
        go.contiguous(), grid.contiguous(), guide.contiguous(), inp, True
    )
    assert torch.equal(gg, gg2) and torch.equal(gd, gd2) and torch.equal(gi, gi2)


# ----------------------------------------------------------------------------------------------
# gradcheck (float64)


@pytest.mark.parametrize("has_offset", [True, False], ids=["offset", "no_offset"])
@pytest.mark.parametrize(
    "sizes",
    [(2, 3, 2, 4, 3, 5, 6, 7, "uniform"), (1, 2, 1, 24, 2, 2, 3, 9, "noisy"), (1, 1, 2, 3, 4, 2, 5, 3, "wide")],
    ids=_id,
)
def test_gradcheck_slice_apply(sizes, has_offset, gen):
    n, ci, co, d, gh, gw, h, w, kind = sizes
    grid, guide, inp = make_apply_case(n, ci, co, d, gh, gw, h, w, has_offset, torch.float64, kind, gen)
    args = tuple(t.requires_grad_() for t in (grid, guide, inp))
    assert torch.autograd.gradcheck(
        lambda a, b, c: bo.bilateral_slice_apply(a, b, c, has_offset), args, eps=1e-6, atol=1e-5
    )


@pytest.mark.parametrize(
    "sizes", [(2, 3, 4, 3, 5, 6, 7, "uniform"), (1, 2, 24, 2, 2, 3, 9, "noisy"), (1, 1, 3, 4, 2, 5, 3, "wide")], ids=_id
)
def test_gradcheck_slice(sizes, gen):
    n, c, d, gh, gw, h, w, kind = sizes
    grid = torch.randn(n, c, d, gh, gw, generator=gen, dtype=torch.float64).requires_grad_()
    guide = make_guide(kind, n, h, w, torch.float64, gen).requires_grad_()
    assert torch.autograd.gradcheck(bo.bilateral_slice, (grid, guide), eps=1e-6, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# opcheck


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_opcheck_forward_ops(dtype, gen):
    grid, guide, inp = make_apply_case(2, 3, 2, 5, 3, 4, 6, 7, True, dtype, "uniform", gen)
    torch.library.opcheck(
        OPS.bilateral_slice_apply, (grid.requires_grad_(), guide.requires_grad_(), inp.requires_grad_(), True)
    )
    grid2 = torch.randn(1, 6, 4, 3, 4, generator=gen, dtype=torch.float64).to(dtype)
    torch.library.opcheck(
        OPS.bilateral_slice_apply,
        (grid2.requires_grad_(), guide[:1].detach().requires_grad_(), inp[:1].detach().requires_grad_(), False),
    )
    torch.library.opcheck(OPS.bilateral_slice, (grid.detach().requires_grad_(), guide.detach().requires_grad_()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_opcheck_backward_ops(dtype, gen):
    grid, guide, inp = make_apply_case(2, 3, 2, 5, 3, 4, 6, 7, True, dtype, "uniform", gen)
    go = torch.randn(2, 2, 6, 7, generator=gen, dtype=dtype)
    torch.library.opcheck(OPS._bilateral_slice_apply_backward, (go, grid, guide, inp, True))
    go_s = torch.randn(2, 8, 6, 7, generator=gen, dtype=dtype)
    torch.library.opcheck(OPS._bilateral_slice_backward, (go_s, grid, guide))


@pytest.mark.parametrize("which", ["grid", "guide", "input"])
def test_opcheck_backward_ops_noncontiguous(which, gen):
    """The fake kernels must describe the real outputs, strides included: torch.compile relies on it
    (see test_compile_noncontiguous_grid)."""
    grid, guide, inp = make_apply_case(1, 3, 2, 5, 3, 4, 6, 7, True, torch.float64, "uniform", gen)
    if which == "grid":
        grid = grid.permute(0, 4, 3, 2, 1).contiguous().permute(0, 4, 3, 2, 1)
    elif which == "guide":
        guide = guide.transpose(1, 2).contiguous().transpose(1, 2)
    else:
        inp = inp.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels-last
    go = torch.randn(1, 2, 6, 7, generator=gen, dtype=torch.float64)
    torch.library.opcheck(OPS._bilateral_slice_apply_backward, (go, grid, guide, inp, True))
    if which != "input":
        go_s = torch.randn(1, 8, 6, 7, generator=gen, dtype=torch.float64)
        torch.library.opcheck(OPS._bilateral_slice_backward, (go_s, grid, guide))


# ----------------------------------------------------------------------------------------------
# torch.compile (slow: few and small)


def _compile_inputs(gen, dtype=torch.float32):
    grid = torch.randn(2, 12, 4, 3, 5, generator=gen, dtype=dtype)
    guide = torch.rand(2, 10, 13, generator=gen, dtype=dtype)
    inp = torch.rand(2, 3, 10, 13, generator=gen, dtype=dtype)
    weight = torch.randn(2, 3, 10, 13, generator=gen, dtype=dtype)
    return grid, guide, inp, weight


def _loss_apply(grid, guide, inp, weight):
    out = bo.bilateral_slice_apply(grid, guide * 0.9 + 0.05, inp)
    coeffs = bo.bilateral_slice(grid, guide)
    return (out * weight).sum() + coeffs.square().mean()


def _eager_and_compiled(fn, tensors, **compile_kwargs):
    eager_out, eager_grads, _ = run_with_grads(fn, tensors[:3], (tensors[3],), grad_output=torch.tensor(1.0))
    compiled = torch.compile(fn, fullgraph=True, **compile_kwargs)
    comp_out, comp_grads, _ = run_with_grads(compiled, tensors[:3], (tensors[3],), grad_output=torch.tensor(1.0))
    return eager_out, eager_grads, comp_out, comp_grads


def test_compile_inductor_static(gen):
    torch._dynamo.reset()
    tensors = _compile_inputs(gen)
    e_out, e_grads, c_out, c_grads = _eager_and_compiled(_loss_apply, tensors, backend="inductor", dynamic=False)
    torch.testing.assert_close(c_out, e_out, rtol=1e-5, atol=1e-5)
    for c, e in zip(c_grads, e_grads):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)


def test_compile_inductor_dynamic(gen):
    """Default (dynamic) compile of the public wrappers, run on two sizes."""
    torch._dynamo.reset()
    compiled = torch.compile(_loss_apply, fullgraph=True, backend="inductor", dynamic=True)
    for h, w in ((10, 13), (7, 21)):
        grid = torch.randn(2, 12, 4, 3, 5, generator=gen)
        guide = torch.rand(2, h, w, generator=gen)
        inp = torch.rand(2, 3, h, w, generator=gen)
        weight = torch.randn(2, 3, h, w, generator=gen)
        e_out, e_grads, _ = run_with_grads(_loss_apply, (grid, guide, inp), (weight,), grad_output=torch.tensor(1.0))
        c_out, c_grads, _ = run_with_grads(compiled, (grid, guide, inp), (weight,), grad_output=torch.tensor(1.0))
        torch.testing.assert_close(c_out, e_out, rtol=1e-6, atol=1e-6)
        for c, e in zip(c_grads, e_grads):
            torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-6)


def test_compile_noncontiguous_grid(gen):
    """A grid produced by a permute (as when porting google/hdrnet's (N,Gh,Gw,D,C) layout) must
    compile: the backward's fake kernel must report the strides the real kernel returns."""
    torch._dynamo.reset()

    def fn(grid_hwdc, guide, inp, weight):
        grid = grid_hwdc.permute(0, 4, 3, 1, 2)  # (N, Gh, Gw, D, C) -> (N, C, D, Gh, Gw)
        return (bo.bilateral_slice_apply(grid, guide, inp) * weight).sum()

    grid, guide, inp, weight = _compile_inputs(gen)
    grid_hwdc = grid.permute(0, 3, 4, 2, 1).contiguous()
    e_out, e_grads, _ = run_with_grads(fn, (grid_hwdc, guide, inp), (weight,), grad_output=torch.tensor(1.0))
    compiled = torch.compile(fn, fullgraph=True, backend="inductor")
    c_out, c_grads, _ = run_with_grads(compiled, (grid_hwdc, guide, inp), (weight,), grad_output=torch.tensor(1.0))
    torch.testing.assert_close(c_out, e_out, rtol=1e-5, atol=1e-5)
    for c, e in zip(c_grads, e_grads):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Reduced precision: autocast and half dtypes on the CPU


def test_autocast_bfloat16(gen):
    grid, guide, inp = make_apply_case(2, 3, 3, 8, 4, 4, 12, 70, True, torch.float32, "uniform", gen)
    ref = bo.bilateral_slice_apply(grid, guide, inp)
    leaves = [t.clone().requires_grad_() for t in (grid, guide, inp)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bo.bilateral_slice_apply(*leaves)
        sl = bo.bilateral_slice(leaves[0], leaves[1])
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    assert sl.dtype == torch.bfloat16
    assert_close_scaled(out, ref, 3e-2, "autocast output")
    assert_close_scaled(sl, bo.bilateral_slice(grid, guide), 3e-2, "autocast slice output")
    # The result must be the one computed from bf16-rounded inputs, rounded to bf16.
    want = bo.bilateral_slice_apply(*(t.bfloat16().float() for t in (grid, guide, inp))).bfloat16()
    assert (out.float() - want.float()).abs().max() <= 2 ** -7 * (1 + want.float().abs().max())
    out.float().sum().backward()
    for leaf in leaves:  # the casts are differentiable: float32 leaves get float32 gradients
        assert leaf.grad is not None and leaf.grad.dtype == torch.float32 and torch.isfinite(leaf.grad).all()


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_dtypes_on_cpu(half, gen):
    grid, guide, inp = make_apply_case(1, 3, 3, 8, 4, 4, 10, 90, True, torch.float32, "uniform", gen)
    grid, guide, inp = grid.to(half), guide.to(half), inp.to(half)
    out, grads, go = run_with_grads(bo.bilateral_slice_apply, (grid, guide, inp), gen=gen)
    # Computed in float32 from the same (rounded) values, then rounded once to the input dtype.
    f32 = [t.float() for t in (grid, guide, inp)]
    out32, grads32, _ = run_with_grads(bo.bilateral_slice_apply, f32, grad_output=go.float())
    assert out.dtype == half
    ulp = 2 ** -10 if half == torch.float16 else 2 ** -7
    assert ((out.float() - out32).abs() <= ulp * out32.abs() + 1e-6).all()
    torch.testing.assert_close(out, out32.to(half), rtol=0, atol=0)
    for g, g32, t in zip(grads, grads32, (grid, guide, inp)):
        assert g.dtype == half and g.shape == t.shape
        torch.testing.assert_close(g, g32.to(half), rtol=0, atol=0)

    s, sg, sgo = run_with_grads(bo.bilateral_slice, (grid, guide), gen=gen)
    s32, sg32, _ = run_with_grads(bo.bilateral_slice, f32[:2], grad_output=sgo.float())
    assert s.dtype == half and sg[0].dtype == half and sg[1].dtype == half
    torch.testing.assert_close(s, s32.to(half), rtol=0, atol=0)
    torch.testing.assert_close(sg[0], sg32[0].to(half), rtol=0, atol=0)
    torch.testing.assert_close(sg[1], sg32[1].to(half), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Determinism


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_grad_grid_deterministic_across_runs_and_threads(dtype, gen, restore_num_threads):
    grid, guide, inp = make_apply_case(2, 3, 3, 8, 16, 16, 96, 300, True, dtype, "mixed", gen)
    go = torch.randn(2, 3, 96, 300, generator=gen, dtype=dtype)

    def grads():
        r = run_with_grads(bo.bilateral_slice_apply, (grid, guide, inp), grad_output=go)[1]
        s = run_with_grads(bo.bilateral_slice, (grid, guide), grad_output=torch.cat([go] * 4, 1))[1]
        return r + s

    torch.set_num_threads(2)
    a, b = grads(), grads()
    torch.set_num_threads(1)
    c = grads()
    for x, y, z in zip(a, b, c):
        assert torch.equal(x, y), "two runs differ"
        assert torch.equal(x, z), "1 thread and 2 threads differ"


# ----------------------------------------------------------------------------------------------
# Non-finite and out-of-range guides


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("d", [8, 24])
def test_infinite_and_huge_guides(d, dtype, gen):
    n, h, w = 1, 6, 150
    grid, guide, inp = make_apply_case(n, 3, 3, d, 4, 3, h, w, True, dtype, "smooth", gen)
    specials = torch.tensor([math.inf, -math.inf, 1e30, -1e30, 1.3, -0.3], dtype=dtype)
    idx = torch.randperm(h * w, generator=gen)[:60]
    guide.view(-1)[idx] = specials.repeat(10)
    out, grads, go = run_with_grads(bo.bilateral_slice_apply, (grid, guide, inp), gen=gen)
    assert torch.isfinite(out).all()
    for g in grads:
        assert torch.isfinite(g).all()
    outside = (guide < 0) | (guide > 1)
    assert outside.sum() == 60
    assert (grads[1][outside] == 0).all()
    # Equal to the result with the guide clamped to [0, 1] (the edge cells), gradients included.
    clamped = guide.clamp(0, 1)
    out_c, grads_c, _ = run_with_grads(bo.bilateral_slice_apply, (grid, clamped, inp), grad_output=go)
    torch.testing.assert_close(out, out_c, rtol=0, atol=0)
    torch.testing.assert_close(grads[0], grads_c[0], rtol=1e-12, atol=1e-12 if dtype == torch.float64 else 1e-5)
    torch.testing.assert_close(grads[2], grads_c[2], rtol=0, atol=0)
    # And the finite ones (including +-1e30) match the reference.
    assert torch.isinf(guide).sum() == 20
    g_fin = torch.where(torch.isinf(guide), torch.full_like(guide, 7.0), guide)
    out_f, grads_f, go_f = run_with_grads(bo.bilateral_slice_apply, (grid, g_fin, inp), gen=gen)
    ref_f, rgrads_f, _ = run_with_grads(
        reference.bilateral_slice_apply, (grid.double(), g_fin.double(), inp.double()), grad_output=go_f.double()
    )
    assert_close_scaled(out_f, ref_f, TOL[dtype], "output")
    assert_close_scaled(grads_f[0], rgrads_f[0], TOL[dtype], "grad_grid")
    assert_close_scaled(grads_f[1], rgrads_f[1], TOL[dtype], "grad_guide", away_from_z_kinks(g_fin, d))
    assert_close_scaled(grads_f[2], rgrads_f[2], TOL[dtype], "grad_input")


@pytest.mark.parametrize("d", [8, 24])
def test_nan_guides_do_not_crash(d, gen):
    n, h, w = 2, 5, 140
    grid, guide, inp = make_apply_case(n, 3, 3, d, 4, 3, h, w, True, torch.float32, "uniform", gen)
    idx = torch.randperm(n * h * w, generator=gen)[:40]
    guide.view(-1)[idx] = math.nan
    nan = torch.isnan(guide)
    out, grads, go = run_with_grads(bo.bilateral_slice_apply, (grid, guide, inp), gen=gen)
    assert out.shape == (n, 3, h, w)
    assert torch.isfinite(out.permute(1, 0, 2, 3)[:, ~nan]).all()
    assert torch.isfinite(grads[1][~nan]).all()
    assert torch.isfinite(grads[2].permute(1, 0, 2, 3)[:, ~nan]).all()
    # Pixels are independent: the finite-guide pixels equal those of a run with NaN replaced.
    out2 = bo.bilateral_slice_apply(grid, torch.where(nan, torch.full_like(guide, 0.5), guide), inp)
    torch.testing.assert_close(out.permute(1, 0, 2, 3)[:, ~nan], out2.permute(1, 0, 2, 3)[:, ~nan], rtol=0, atol=0)
    s, sg, _ = run_with_grads(bo.bilateral_slice, (grid, guide), gen=gen)
    assert torch.isfinite(s.permute(1, 0, 2, 3)[:, ~nan]).all()
    assert torch.isfinite(sg[1][~nan]).all()


# ----------------------------------------------------------------------------------------------
# Empty images


@pytest.mark.parametrize("n,h,w", [(2, 0, 5), (2, 5, 0), (0, 4, 6), (1, 0, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_empty_images(n, h, w, dtype):
    grid = torch.randn(n, 6, 3, 2, 2, dtype=dtype, requires_grad=True)
    guide = torch.rand(n, h, w, dtype=dtype, requires_grad=True)
    inp = torch.rand(n, 3, h, w, dtype=dtype, requires_grad=True)
    out = bo.bilateral_slice_apply(grid, guide, inp, False)
    assert out.shape == (n, 2, h, w) and out.dtype == dtype
    out.sum().backward()
    assert grid.grad.shape == grid.shape and guide.grad.shape == guide.shape and inp.grad.shape == inp.shape
    assert (grid.grad == 0).all()
    grid.grad = guide.grad = None
    s = bo.bilateral_slice(grid, guide[:, None])
    assert s.shape == (n, 6, h, w) and s.dtype == dtype
    s.sum().backward()
    assert grid.grad.shape == grid.shape and (grid.grad == 0).all()
    assert guide.grad.shape == guide.shape


# ----------------------------------------------------------------------------------------------
# Errors raised by the public functions (DESIGN.md "Errors")

F64 = torch.float64


def _t(*shape, dtype=F64):
    return torch.rand(*shape, dtype=dtype)


GOOD_GRID, GOOD_GUIDE, GOOD_INPUT = (2, 8, 3, 4, 5), (2, 6, 7), (2, 3, 6, 7)  # Co=2, Ci=3, offset

APPLY_ERRORS = [
    # (grid, guide, input, has_offset, error, match)
    ([[1.0]], _t(*GOOD_GUIDE), _t(*GOOD_INPUT), True, TypeError, "grid"),
    (_t(*GOOD_GRID), 0.5, _t(*GOOD_INPUT), True, TypeError, "guide"),
    (_t(*GOOD_GRID), _t(*GOOD_GUIDE), None, True, TypeError, "input"),
    (torch.ones(*GOOD_GRID, dtype=torch.int64), _t(*GOOD_GUIDE), _t(*GOOD_INPUT), True, TypeError, "grid"),
    (_t(*GOOD_GRID), torch.ones(*GOOD_GUIDE, dtype=torch.int32), _t(*GOOD_INPUT), True, TypeError, "guide"),
    (_t(*GOOD_GRID), _t(*GOOD_GUIDE), torch.ones(*GOOD_INPUT, dtype=torch.uint8), True, TypeError, "input"),
    (_t(*GOOD_GRID), _t(*GOOD_GUIDE), torch.ones(*GOOD_INPUT, dtype=torch.bool), True, TypeError, "input"),
    (_t(*GOOD_GRID, dtype=torch.complex64), _t(*GOOD_GUIDE), _t(*GOOD_INPUT), True, TypeError, "grid"),
    (_t(2, 8, 3, 4), _t(*GOOD_GUIDE), _t(*GOOD_INPUT), True, ValueError, "grid"),
    (_t(2, 8, 3, 4, 5, 1), _t(*GOOD_GUIDE), _t(*GOOD_INPUT), True, ValueError, "grid"),
    (_t(*GOOD_GRID), _t(6, 7), _t(*GOOD_INPUT), True, ValueError, "guide"),
    (_t(*GOOD_GRID), _t(2, 1, 1, 6, 7), _t(*GOOD_INPUT), True, ValueError, "guide"),
    (_t(*GOOD_GRID), _t(2, 2, 6, 7), _t(*GOOD_INPUT), True, ValueError, "guide"),  # 2-channel guide
    (_t(*GOOD_GRID), _t(*GOOD_GUIDE), _t(3, 6, 7), True, ValueError, "input"),
    (_t(*GOOD_GRID), _t(*GOOD_GUIDE), _t(2, 3, 6, 7, 1), True, ValueError, "input"),
    (_t(3, 8, 3, 4, 5), _t(*GOOD_GUIDE), _t(*GOOD_INPUT), True, ValueError, "batch"),  # grid batch
    (_t(*GOOD_GRID), _t(*GOOD_GUIDE), _t(3, 3, 6, 7), True, ValueError, "input"),  # input batch
    (_t(*GOOD_GRID), _t(2, 6, 8), _t(*GOOD_INPUT), True, ValueError, "guide"),  # W mismatch
    (_t(*GOOD_GRID), _t(2, 5, 7), _t(*GOOD_INPUT), True, ValueError, "guide"),  # H mismatch
    (_t(2, 9, 3, 4, 5), _t(*GOOD_GUIDE), _t(*GOOD_INPUT), True, ValueError, "grid"),  # 9 % 4
    (_t(2, 8, 3, 4, 5), _t(*GOOD_GUIDE), _t(*GOOD_INPUT), False, ValueError, "grid"),  # 8 % 3
    (_t(2, 6, 3, 4, 5), _t(*GOOD_GUIDE), _t(2, 4, 6, 7), False, ValueError, "grid"),  # 6 % 4
    (_t(2, 0, 3, 4, 5), _t(*GOOD_GUIDE), _t(*GOOD_INPUT), True, ValueError, "grid"),
    (_t(2, 8, 0, 4, 5), _t(*GOOD_GUIDE), _t(*GOOD_INPUT), True, ValueError, "grid"),
    (_t(2, 8, 3, 0, 5), _t(*GOOD_GUIDE), _t(*GOOD_INPUT), True, ValueError, "grid"),
    (_t(2, 8, 3, 4, 0), _t(*GOOD_GUIDE), _t(*GOOD_INPUT), True, ValueError, "grid"),
    (_t(2, 8, 3, 4, 5), _t(*GOOD_GUIDE), _t(2, 0, 6, 7), True, ValueError, "input"),
    (_t(*GOOD_GRID), _t(*GOOD_GUIDE, dtype=torch.float32), _t(*GOOD_INPUT), True, TypeError, "guide"),
    (_t(*GOOD_GRID), _t(*GOOD_GUIDE), _t(*GOOD_INPUT, dtype=torch.float32), True, TypeError, "input"),
    (_t(*GOOD_GRID, dtype=torch.float16), _t(*GOOD_GUIDE), _t(*GOOD_INPUT), True, TypeError, "guide"),
    (_t(*GOOD_GRID), _t(*GOOD_GUIDE), _t(*GOOD_INPUT), 1, TypeError, "has_offset"),
    (_t(*GOOD_GRID), _t(*GOOD_GUIDE), _t(*GOOD_INPUT), None, TypeError, "has_offset"),
    (_t(*GOOD_GRID), _t(*GOOD_GUIDE), _t(*GOOD_INPUT), "yes", TypeError, "has_offset"),
    (_t(*GOOD_GRID), torch.rand(*GOOD_GUIDE, dtype=F64, device="meta"), _t(*GOOD_INPUT), True, ValueError, "guide"),
    (_t(*GOOD_GRID), _t(*GOOD_GUIDE), torch.rand(*GOOD_INPUT, dtype=F64, device="meta"), True, ValueError, "input"),
]


def _no_kernel_runs(monkeypatch):
    """Make every compiled op raise, so a test proves the error comes before any kernel."""

    class _Poisoned:
        def __getattr__(self, name):
            raise AssertionError(f"kernel {name} reached despite invalid arguments")

    monkeypatch.setattr(torch.ops, "bilateral_ops", _Poisoned())
    monkeypatch.setattr(bo_ops, "reference", _Poisoned())


def test_no_kernel_runs_guard_is_effective(monkeypatch):
    """The guard used by the error tests must really stop a valid call from reaching a kernel."""
    _no_kernel_runs(monkeypatch)
    with pytest.raises(AssertionError, match="kernel"):
        bo.bilateral_slice_apply(_t(*GOOD_GRID), _t(*GOOD_GUIDE), _t(*GOOD_INPUT))
    with pytest.raises(AssertionError, match="kernel"):
        bo.bilateral_slice(_t(*GOOD_GRID), _t(*GOOD_GUIDE))


@pytest.mark.parametrize("case", range(len(APPLY_ERRORS)))
def test_slice_apply_errors(case, monkeypatch):
    grid, guide, inp, has_offset, exc, match = APPLY_ERRORS[case]
    _no_kernel_runs(monkeypatch)
    with pytest.raises(exc, match=match):
        bo.bilateral_slice_apply(grid, guide, inp, has_offset)


SLICE_ERRORS = [
    # (grid, guide, error, match)
    ("grid", _t(*GOOD_GUIDE), TypeError, "grid"),
    (_t(*GOOD_GRID), [0.5], TypeError, "guide"),
    (torch.ones(*GOOD_GRID, dtype=torch.int16), _t(*GOOD_GUIDE), TypeError, "grid"),
    (_t(*GOOD_GRID), torch.ones(*GOOD_GUIDE, dtype=torch.int64), TypeError, "guide"),
    (_t(2, 8, 3, 4), _t(*GOOD_GUIDE), ValueError, "grid"),
    (_t(*GOOD_GRID), _t(6, 7), ValueError, "guide"),
    (_t(*GOOD_GRID), _t(2, 2, 6, 7), ValueError, "guide"),
    (_t(*GOOD_GRID), _t(2, 1, 6, 7, 1), ValueError, "guide"),
    (_t(*GOOD_GRID), _t(3, 6, 7), ValueError, "batch"),
    (_t(2, 8, 0, 4, 5), _t(*GOOD_GUIDE), ValueError, "grid"),
    (_t(2, 0, 3, 4, 5), _t(*GOOD_GUIDE), ValueError, "grid"),
    (_t(*GOOD_GRID), _t(*GOOD_GUIDE, dtype=torch.float32), TypeError, "guide"),
    (_t(*GOOD_GRID, dtype=torch.bfloat16), _t(*GOOD_GUIDE), TypeError, "guide"),
    (_t(*GOOD_GRID), torch.rand(*GOOD_GUIDE, dtype=F64, device="meta"), ValueError, "guide"),
]


@pytest.mark.parametrize("case", range(len(SLICE_ERRORS)))
def test_slice_errors(case, monkeypatch):
    grid, guide, exc, match = SLICE_ERRORS[case]
    _no_kernel_runs(monkeypatch)
    with pytest.raises(exc, match=match):
        bo.bilateral_slice(grid, guide)


def test_error_messages_say_what_was_expected():
    with pytest.raises(ValueError, match=r"Co\*\(Ci\+1\)"):
        bo.bilateral_slice_apply(_t(2, 9, 3, 4, 5), _t(*GOOD_GUIDE), _t(*GOOD_INPUT))
    with pytest.raises(ValueError, match=r"Co\*Ci"):
        bo.bilateral_slice_apply(_t(2, 8, 3, 4, 5), _t(*GOOD_GUIDE), _t(*GOOD_INPUT), False)
    with pytest.raises(TypeError, match="float64"):
        bo.bilateral_slice(_t(*GOOD_GRID), _t(*GOOD_GUIDE, dtype=torch.float32))


# Direct calls of the compiled ops: TORCH_CHECK -> RuntimeError, never a crash.
DIRECT_ERRORS = [
    ("bilateral_slice", (_t(2, 8, 3, 4), _t(*GOOD_GUIDE))),
    ("bilateral_slice", (_t(*GOOD_GRID), _t(2, 1, 6, 7))),
    ("bilateral_slice", (_t(*GOOD_GRID), _t(6, 7))),
    ("bilateral_slice", (_t(*GOOD_GRID), _t(3, 6, 7))),
    ("bilateral_slice", (_t(2, 8, 0, 4, 5), _t(*GOOD_GUIDE))),
    ("bilateral_slice", (_t(2, 8, 3, 4, 0), _t(*GOOD_GUIDE))),
    ("bilateral_slice", (_t(*GOOD_GRID), _t(*GOOD_GUIDE, dtype=torch.float32))),
    ("bilateral_slice", (torch.ones(*GOOD_GRID, dtype=torch.int32), torch.ones(*GOOD_GUIDE, dtype=torch.int32))),
    ("bilateral_slice_apply", (_t(2, 9, 3, 4, 5), _t(*GOOD_GUIDE), _t(*GOOD_INPUT), True)),
    ("bilateral_slice_apply", (_t(2, 8, 3, 4, 5), _t(*GOOD_GUIDE), _t(*GOOD_INPUT), False)),
    ("bilateral_slice_apply", (_t(*GOOD_GRID), _t(*GOOD_GUIDE), _t(2, 3, 6, 8), True)),
    ("bilateral_slice_apply", (_t(*GOOD_GRID), _t(*GOOD_GUIDE), _t(2, 3, 5, 7), True)),
    ("bilateral_slice_apply", (_t(*GOOD_GRID), _t(*GOOD_GUIDE), _t(1, 3, 6, 7), True)),
    ("bilateral_slice_apply", (_t(*GOOD_GRID), _t(*GOOD_GUIDE), _t(3, 6, 7), True)),
    ("bilateral_slice_apply", (_t(*GOOD_GRID), _t(*GOOD_GUIDE), _t(2, 0, 6, 7), True)),
    ("bilateral_slice_apply", (_t(*GOOD_GRID), _t(*GOOD_GUIDE), _t(*GOOD_INPUT, dtype=torch.float32), True)),
    ("bilateral_slice_apply", (_t(*GOOD_GRID), _t(*GOOD_GUIDE), torch.ones(*GOOD_INPUT, dtype=torch.int64), True)),
    ("bilateral_slice_apply", (_t(2, 8, 3, 0, 5), _t(*GOOD_GUIDE), _t(*GOOD_INPUT), True)),
    ("_bilateral_slice_backward", (_t(2, 8, 6, 8), _t(*GOOD_GRID), _t(*GOOD_GUIDE))),
    ("_bilateral_slice_backward", (_t(2, 7, 6, 7), _t(*GOOD_GRID), _t(*GOOD_GUIDE))),
    ("_bilateral_slice_backward", (_t(2, 8, 6, 7, dtype=torch.float32), _t(*GOOD_GRID), _t(*GOOD_GUIDE))),
    ("_bilateral_slice_backward", (_t(2, 8, 6, 7), _t(2, 8, 3, 4), _t(*GOOD_GUIDE))),
    ("_bilateral_slice_apply_backward", (_t(2, 3, 6, 7), _t(*GOOD_GRID), _t(*GOOD_GUIDE), _t(*GOOD_INPUT), True)),
    ("_bilateral_slice_apply_backward", (_t(2, 2, 6, 6), _t(*GOOD_GRID), _t(*GOOD_GUIDE), _t(*GOOD_INPUT), True)),
    (
        "_bilateral_slice_apply_backward",
        (torch.ones(2, 2, 6, 7, dtype=torch.int64), _t(*GOOD_GRID), _t(*GOOD_GUIDE), _t(*GOOD_INPUT), True),
    ),
    ("_bilateral_slice_apply_backward", (_t(2, 2, 6, 7), _t(*GOOD_GRID), _t(*GOOD_GUIDE), _t(2, 3, 6, 5), True)),
    ("_bilateral_slice_apply_backward", (_t(2, 2, 6, 7), _t(2, 9, 3, 4, 5), _t(*GOOD_GUIDE), _t(*GOOD_INPUT), True)),
]


@pytest.mark.parametrize("case", range(len(DIRECT_ERRORS)))
def test_direct_op_calls_check_arguments(case):
    name, args = DIRECT_ERRORS[case]
    with pytest.raises(RuntimeError):
        getattr(OPS, name)(*args)


def test_direct_op_calls_accept_valid_arguments():
    """The direct-call checks above must fail for the bad argument, not always."""
    out = OPS.bilateral_slice_apply(_t(*GOOD_GRID), _t(*GOOD_GUIDE), _t(*GOOD_INPUT), True)
    assert out.shape == (2, 2, 6, 7)
    gg, gd, gi = OPS._bilateral_slice_apply_backward(
        _t(2, 2, 6, 7), _t(*GOOD_GRID), _t(*GOOD_GUIDE), _t(*GOOD_INPUT), True
    )
    assert gg.shape == GOOD_GRID and gd.shape == GOOD_GUIDE and gi.shape == GOOD_INPUT
    gg, gd = OPS._bilateral_slice_backward(_t(2, 8, 6, 7), _t(*GOOD_GRID), _t(*GOOD_GUIDE))
    assert gg.shape == GOOD_GRID and gd.shape == GOOD_GUIDE


# ----------------------------------------------------------------------------------------------
# Hand-computed cases and identities


def test_slice_apply_equals_slice_plus_affine_sum(gen):
    for has_offset in (True, False):
        n, ci, co, h, w = 2, 3, 2, 21, 150
        stride = ci + int(has_offset)
        grid = torch.randn(n, co * stride, 24, 5, 6, generator=gen, dtype=F64)
        guide = make_guide("mixed", n, h, w, F64, gen)
        inp = torch.randn(n, ci, h, w, generator=gen, dtype=F64)
        coeffs = bo.bilateral_slice(grid, guide).view(n, co, stride, h, w)
        want = torch.einsum("noihw,nihw->nohw", coeffs[:, :, :ci], inp)
        if has_offset:
            want = want + coeffs[:, :, ci]
        got = bo.bilateral_slice_apply(grid, guide, inp, has_offset)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        ref_coeffs = reference.bilateral_slice(grid, guide).view(n, co, stride, h, w)
        torch.testing.assert_close(coeffs, ref_coeffs, rtol=0, atol=1e-12)


def test_constant_grid_is_a_per_pixel_affine_matrix(gen):
    m = torch.tensor([[0.5, -1.0, 2.0, 0.25], [1.5, 0.0, -0.5, -1.0], [-2.0, 3.0, 1.0, 0.5]], dtype=F64)
    grid = m.reshape(1, 12, 1, 1, 1)  # row-major 3x4: channel o*4 + i
    rgb = torch.rand(1, 3, 9, 130, generator=gen, dtype=F64)
    guide = torch.rand(1, 9, 130, generator=gen, dtype=F64) * 1.6 - 0.3
    want = torch.einsum("oi,nihw->nohw", m[:, :3], rgb) + m[:, 3].view(1, 3, 1, 1)
    got = bo.bilateral_slice_apply(grid, guide, rgb)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-14)
    got_no = bo.bilateral_slice_apply(m[:, :3].reshape(1, 9, 1, 1, 1), guide, rgb, False)
    torch.testing.assert_close(got_no, want - m[:, 3].view(1, 3, 1, 1), rtol=0, atol=1e-14)
    # Gradients: d out_o / d rgb_i = m[o, i], summed over o.
    leaf = rgb.clone().requires_grad_()
    bo.bilateral_slice_apply(grid, guide, leaf).sum().backward()
    torch.testing.assert_close(leaf.grad, m[:, :3].sum(0).view(1, 3, 1, 1).expand_as(rgb), rtol=0, atol=1e-14)


@pytest.mark.parametrize("d", [4, 24])
def test_grid_linear_in_z(d, gen):
    """grid[k] = a + b (k + 0.5) along z, constant along x, y: a sample at guide v in the interior
    [0.5/D, 1 - 0.5/D] is exactly a + b v D, and d/dv = b D; outside, the edge cell's value."""
    a, b = 0.75, -0.3
    k = torch.arange(d, dtype=F64) + 0.5
    grid = (a + b * k).view(1, 1, d, 1, 1).expand(1, 1, d, 3, 4).contiguous()
    guide = torch.rand(1, 7, 200, generator=gen, dtype=F64) * 1.4 - 0.2
    leaf = guide.clone().requires_grad_()
    out = bo.bilateral_slice(grid, leaf)
    out.sum().backward()
    gz = guide * d
    want = a + b * gz.clamp(0.5, d - 0.5)
    torch.testing.assert_close(out[:, 0], want, rtol=0, atol=1e-13)
    interior = (gz > 0.5) & (gz < d - 0.5)
    assert interior.any() and (~interior).any()
    torch.testing.assert_close(leaf.grad[interior], torch.full_like(leaf.grad[interior], b * d), rtol=0, atol=1e-12)
    assert (leaf.grad[~interior] == 0).all()
    # The same through slice_apply: one input channel, grid = coefficient, offset = 1.
    grid2 = torch.cat([grid, torch.ones_like(grid)], 1)
    inp = torch.rand(1, 1, 7, 200, generator=gen, dtype=F64)
    out2 = bo.bilateral_slice_apply(grid2, guide, inp)
    torch.testing.assert_close(out2[:, 0], want * inp[:, 0] + 1, rtol=0, atol=1e-13)


def test_grid_linear_in_x_and_y_clamps_to_edge():
    """grid[.., j] = j + 0.5 along x samples gx = (x + 0.5) Gw / W clamped to [0.5, Gw - 0.5];
    likewise along y."""
    h, w, gh, gw = 9, 10, 3, 4
    gx_grid = (torch.arange(gw, dtype=F64) + 0.5).view(1, 1, 1, 1, gw).expand(1, 1, 2, gh, gw)
    gy_grid = (torch.arange(gh, dtype=F64) + 0.5).view(1, 1, 1, gh, 1).expand(1, 1, 2, gh, gw)
    grid = torch.cat([gx_grid, gy_grid], 1).contiguous()
    guide = torch.full((1, h, w), 0.3, dtype=F64)
    out = bo.bilateral_slice(grid, guide)
    gx = ((torch.arange(w, dtype=F64) + 0.5) * gw / w).clamp(0.5, gw - 0.5)
    gy = ((torch.arange(h, dtype=F64) + 0.5) * gh / h).clamp(0.5, gh - 0.5)
    torch.testing.assert_close(out[0, 0], gx.expand(h, w), rtol=0, atol=1e-14)
    torch.testing.assert_close(out[0, 1], gy.view(h, 1).expand(h, w), rtol=0, atol=1e-14)
    assert out[0, 0, 0, 0] == 0.5 and out[0, 0, 0, -1] == gw - 0.5  # clamped at both edges


def test_coefficient_order(gen):
    """Channel o*(Ci+1)+i multiplies input channel i for output o; o*(Ci+1)+Ci is the offset."""
    ci, co = 3, 2
    inp = torch.rand(1, ci, 4, 5, generator=gen, dtype=F64)
    guide = torch.rand(1, 4, 5, generator=gen, dtype=F64)
    for o in range(co):
        for i in range(ci + 1):
            grid = torch.zeros(1, co * (ci + 1), 2, 2, 2, dtype=F64)
            grid[:, o * (ci + 1) + i] = 1.0
            out = bo.bilateral_slice_apply(grid, guide, inp)
            want = torch.zeros(1, co, 4, 5, dtype=F64)
            want[:, o] = inp[:, i] if i < ci else 1.0
            torch.testing.assert_close(out, want, rtol=0, atol=1e-15)


# ----------------------------------------------------------------------------------------------
# Fallback to the reference


def test_fallback_raises_when_compiled_required(monkeypatch):
    monkeypatch.setenv("BILATERAL_OPS_REQUIRE_COMPILED", "1")
    monkeypatch.setattr(bo_ops, "_WARNED", set())
    with pytest.raises(RuntimeError, match="no compiled kernel"):
        bo_ops._fallback("bilateral_slice_apply", torch.device("cpu"))


@pytest.mark.parametrize("value", ["0", ""])
def test_fallback_warns_once(monkeypatch, value):
    monkeypatch.setenv("BILATERAL_OPS_REQUIRE_COMPILED", value)
    monkeypatch.setattr(bo_ops, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match="bilateral_slice_apply"):
        bo_ops._fallback("bilateral_slice_apply", torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bo_ops._fallback("bilateral_slice_apply", torch.device("cpu"))  # second call: silent
    with pytest.warns(RuntimeWarning, match="bilateral_slice"):
        bo_ops._fallback("bilateral_slice", torch.device("cpu"))  # another op warns on its own


def test_fallback_unset_env_warns(monkeypatch):
    monkeypatch.delenv("BILATERAL_OPS_REQUIRE_COMPILED", raising=False)
    monkeypatch.setattr(bo_ops, "_WARNED", set())
    with pytest.warns(RuntimeWarning):
        bo_ops._fallback("bilateral_slice", torch.device("cpu"))


def test_public_functions_use_fallback_without_a_kernel(monkeypatch, gen):
    """With no kernel for the device, the public functions raise (env set) or warn and return the
    reference result (env "0")."""
    grid, guide, inp = make_apply_case(1, 3, 3, 4, 3, 3, 5, 6, True, F64, "uniform", gen)
    monkeypatch.setattr(bo_ops, "_WARNED", set())
    monkeypatch.setitem(bo_ops._KERNEL_DEVICES, "bilateral_slice_apply", frozenset())
    monkeypatch.setitem(bo_ops._KERNEL_DEVICES, "bilateral_slice", frozenset())
    monkeypatch.setenv("BILATERAL_OPS_REQUIRE_COMPILED", "1")
    with pytest.raises(RuntimeError, match="BILATERAL_OPS_REQUIRE_COMPILED"):
        bo.bilateral_slice_apply(grid, guide, inp)
    with pytest.raises(RuntimeError, match="BILATERAL_OPS_REQUIRE_COMPILED"):
        bo.bilateral_slice(grid, guide)
    monkeypatch.setenv("BILATERAL_OPS_REQUIRE_COMPILED", "0")
    with pytest.warns(RuntimeWarning):
        out = bo.bilateral_slice_apply(grid, guide, inp)
    torch.testing.assert_close(out, reference.bilateral_slice_apply(grid, guide, inp), rtol=0, atol=0)
    with pytest.warns(RuntimeWarning):
        out = bo.bilateral_slice(grid, guide)
    torch.testing.assert_close(out, reference.bilateral_slice(grid, guide), rtol=0, atol=0)


def test_compiled_devices():
    for op in ("bilateral_slice", "bilateral_slice_apply"):
        assert "cpu" in bo.compiled_devices(op)
    assert bo.compiled_devices() == bo.compiled_devices("bilateral_slice_apply")
    assert bo_ops.LOAD_ERROR is None
