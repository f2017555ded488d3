"""bilateral_slice_apply and its private ops (_bilateral_slice_apply_dguide,
_bilateral_slice_apply_backward): against the reference (F.grid_sample), gradients of first and
second order, output masks, opcheck, torch.compile, reduced precision, hostile guides, errors.

Every test that runs a kernel is parametrised over the devices (CUDA skipped without a GPU); the
reference is always evaluated in float64 on the CPU, on the very same (dtype-rounded) values.
"""

from __future__ import annotations

import importlib
import itertools
import math

import pytest
import torch

import bilateral_ops as bo
from bilateral_ops import reference
from helpers import (
    DEVICES,
    F64,
    OPS,
    _id,
    assert_close_scaled,
    assert_same_as_registered,
    away_from_z_kinks,
    deterministic,
    make_apply_case,
    make_guide,
    no_kernel_runs,
    reference_dguide,
    requires_grid_sample_double_backward,
    run_with_grads,
    second_derivative_probe,
    t64,
    tol,
)

# Every test runs on both paths of the CPU slice ops: the row engine and the per-pixel gathers.
pytestmark = pytest.mark.usefixtures("cpu_slice_path")

# (N, Ci, Co, D, Gh, Gw, H, W, guide kind)
CASES = [
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
    (1, 3, 3, 8, 16, 16, 31, 42, "uniform"),  # tiny image, HDRNet grid (a CUDA launch edge)
]

GRAD_NAMES = ("grad_grid", "grad_guide", "grad_input")


def _reference_grads(grid, guide, inp, has_offset, go):
    return run_with_grads(
        reference.bilateral_slice_apply,
        (grid.double().cpu(), guide.double().cpu(), inp.double().cpu()),
        (has_offset,),
        grad_output=go.double().cpu(),
    )


# ----------------------------------------------------------------------------------------------
# Against the reference: forward, every gradient, the guide derivative


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("has_offset", [True, False], ids=["offset", "no_offset"])
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_matches_reference(case, has_offset, dtype, device, gen):
    n, ci, co, d, gh, gw, h, w, kind = case
    grid, guide, inp = make_apply_case(n, ci, co, d, gh, gw, h, w, has_offset, dtype, kind, gen, device)
    out, grads, go = run_with_grads(bo.bilateral_slice_apply, (grid, guide, inp), (has_offset,), gen=gen)
    ref, ref_grads, _ = _reference_grads(grid, guide, inp, has_offset, go)
    assert out.dtype == dtype and out.shape == (n, co, h, w) and out.device.type == device
    rel = tol(device, dtype)
    assert_close_scaled(out, ref, rel, "output")
    mask = None if dtype == F64 else away_from_z_kinks(guide.cpu(), d)
    for name, g, r, m in zip(GRAD_NAMES, grads, ref_grads, (None, mask, None)):
        assert_close_scaled(g, r, rel, name, m)
    for g, t in zip(grads, (grid, guide, inp)):
        assert g.dtype == dtype and g.shape == t.shape
    # The guide gradient must not be trivially zero inside (0, 1) (unless D = 1).
    if d > 1:
        inside = (guide > 0.05) & (guide < 0.95)
        assert grads[1][inside].abs().max() > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("has_offset", [True, False], ids=["offset", "no_offset"])
@pytest.mark.parametrize("case", CASES[:8], ids=_id)
def test_dguide_matches_reference(case, has_offset, device, gen):
    n, ci, co, d, gh, gw, h, w, kind = case
    grid, guide, inp = make_apply_case(n, ci, co, d, gh, gw, h, w, has_offset, F64, kind, gen, device)
    got = OPS._bilateral_slice_apply_dguide(grid, guide, inp, has_offset)
    want = reference_dguide(reference.bilateral_slice_apply, grid.cpu(), guide.cpu(), inp.cpu(), has_offset)
    assert got.shape == (n, co, h, w)
    assert_close_scaled(got, want, 1e-10, "dguide")
    # Its backward is the vector-Jacobian product of the dguide op (linear in grid and input).
    go = torch.randn(got.shape, generator=gen, dtype=F64).to(device)
    gg, empty, gi = OPS._bilateral_slice_apply_backward(go, grid, guide, inp, has_offset, True, [True, False, True])
    assert empty.shape == (0,)
    dg, dx = torch.randn(grid.shape, generator=gen, dtype=F64).to(device), torch.rand(inp.shape, generator=gen, dtype=F64).to(device)
    lin_g = (go * (OPS._bilateral_slice_apply_dguide(grid + dg, guide, inp, has_offset) - got)).sum()
    lin_x = (go * (OPS._bilateral_slice_apply_dguide(grid, guide, inp + dx, has_offset) - got)).sum()
    torch.testing.assert_close((gg * dg).sum(), lin_g, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close((gi * dx).sum(), lin_x, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dguide", [False, True], ids=["plain", "dguide"])
def test_output_mask_skips_exactly_the_masked_gradients(dguide, device, gen, bitwise):
    grid, guide, inp = make_apply_case(2, 3, 3, 8, 4, 5, 19, 140, True, F64, "mixed", gen, device)
    go = torch.randn(2, 3, 19, 140, generator=gen, dtype=F64).to(device)
    full_mask = [True, not dguide, True]
    full = OPS._bilateral_slice_apply_backward(go, grid, guide, inp, True, dguide, full_mask)
    for mask in itertools.product([False, True], repeat=3):
        if dguide and mask[1]:
            continue
        got = OPS._bilateral_slice_apply_backward(go, grid, guide, inp, True, dguide, list(mask))
        for m, g, f, t in zip(mask, got, full, (grid, guide, inp)):
            if m:
                assert g.shape == t.shape
                torch.testing.assert_close(g, f, rtol=0, atol=0)
            else:
                assert g.shape == (0,) and g.dtype == t.dtype and g.device == t.device


def test_dguide_backward_refuses_a_guide_gradient():
    grid, guide, inp = t64(1, 8, 3, 4, 5), t64(1, 6, 7), t64(1, 3, 6, 7)
    with pytest.raises(RuntimeError, match="output_mask"):
        OPS._bilateral_slice_apply_backward(t64(1, 2, 6, 7), grid, guide, inp, True, True, [True, True, True])


def test_autograd_asks_only_for_needed_gradients(monkeypatch, gen):
    """HDRNet's input needs no gradient: the backward op must be called with that mask."""
    grid, guide, inp = make_apply_case(1, 3, 3, 4, 3, 3, 9, 11, True, F64, "uniform", gen)
    seen = []
    real = torch.ops.bilateral_ops._bilateral_slice_apply_backward

    class Spy:
        def __getattr__(self, name):
            if name == "_bilateral_slice_apply_backward":
                def call(*args):
                    seen.append(list(args[6]))  # output_mask (align_corners follows it)
                    return real(*args)
                return call
            return getattr(torch.ops.bilateral_ops, name)

    mod = importlib.import_module("bilateral_ops.bilateral_slice_apply")  # the module, not the function
    monkeypatch.setattr(mod, "_ops", Spy())
    g = grid.clone().requires_grad_()
    gd = guide.clone().requires_grad_()
    out = bo.bilateral_slice_apply(g, gd, inp)
    grads = torch.autograd.grad(out.sum(), (g, gd))
    assert seen == [[True, True, False]]
    assert grads[0].shape == grid.shape and grads[1].shape == guide.shape


# ----------------------------------------------------------------------------------------------
# First and second derivatives (float64)

GRADCHECK_SIZES = [(2, 3, 2, 4, 3, 5, 6, 7, "uniform"), (1, 2, 1, 24, 2, 2, 3, 9, "noisy"), (1, 1, 2, 3, 4, 2, 5, 3, "wide")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("has_offset", [True, False], ids=["offset", "no_offset"])
@pytest.mark.parametrize("sizes", GRADCHECK_SIZES, ids=_id)
def test_gradcheck(sizes, has_offset, device, gen):
    n, ci, co, d, gh, gw, h, w, kind = sizes
    args = tuple(t.requires_grad_() for t in make_apply_case(n, ci, co, d, gh, gw, h, w, has_offset, F64, kind, gen, device))
    assert torch.autograd.gradcheck(lambda a, b, c: bo.bilateral_slice_apply(a, b, c, has_offset), args, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("has_offset", [True, False], ids=["offset", "no_offset"])
@pytest.mark.parametrize("sizes", GRADCHECK_SIZES, ids=_id)
def test_gradgradcheck(sizes, has_offset, device, gen):
    n, ci, co, d, gh, gw, h, w, kind = sizes
    args = tuple(t.requires_grad_() for t in make_apply_case(n, ci, co, d, gh, gw, h, w, has_offset, F64, kind, gen, device))
    assert torch.autograd.gradgradcheck(
        lambda a, b, c: bo.bilateral_slice_apply(a, b, c, has_offset), args, eps=1e-6, atol=1e-5
    )


@pytest.mark.parametrize("device", DEVICES)
def test_eager_autograd_equals_the_registered_one(device, gen):
    """bo.bilateral_slice_apply differentiates eagerly below torch.library's autograd layer: the
    same op and backward op with the same masks, so the same bits as torch.ops' op (in
    deterministic mode: the CUDA grid gradient's default path sums with atomics)."""
    case = make_apply_case(2, 3, 3, 5, 4, 6, 9, 11, True, F64, "uniform", gen, device)
    go = torch.randn(2, 3, 9, 11, generator=gen, dtype=F64).to(device)
    with deterministic(True):
        for wanted in itertools.product([False, True], repeat=3):
            if not any(wanted):
                continue
            leaves = [t.detach().requires_grad_(w) for t, w in zip(case, wanted)]
            eager = bo.bilateral_slice_apply(*leaves, True, True)
            registered = OPS.bilateral_slice_apply(*leaves, True, True)
            assert_same_as_registered(eager, registered, [t for t, w in zip(leaves, wanted) if w], go, wanted)


@pytest.mark.parametrize("device", DEVICES)
def test_gradgradcheck_of_the_guide_derivative(device, gen):
    """Third derivatives go through the dguide ops' own autograd."""
    grid, guide, inp = (t.requires_grad_() for t in make_apply_case(1, 2, 2, 5, 3, 4, 4, 6, True, F64, "uniform", gen, device))
    assert torch.autograd.gradcheck(lambda a, b, c: OPS._bilateral_slice_apply_dguide(a, b, c, True), (grid, guide, inp), eps=1e-6, atol=1e-5)
    assert torch.autograd.gradgradcheck(
        lambda a, b, c: OPS._bilateral_slice_apply_dguide(a, b, c, True), (grid, guide, inp), eps=1e-6, atol=1e-5
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("has_offset", [True, False], ids=["offset", "no_offset"])
def test_gradient_penalty_matches_reference(has_offset, device, gen):
    """A gradient penalty (create_graph=True, then a second backward) gives the reference's
    values: not zero, not approximately right."""
    grid, guide, inp = make_apply_case(2, 3, 3, 6, 4, 4, 9, 70, has_offset, F64, "mixed", gen, device)
    ours = second_derivative_probe(bo.bilateral_slice_apply, (grid, guide, inp), (has_offset,))
    requires_grid_sample_double_backward()
    want = second_derivative_probe(reference.bilateral_slice_apply, (grid.cpu(), guide.cpu(), inp.cpu()), (has_offset,))
    for name, a, b in zip(GRAD_NAMES, ours, want):
        assert a.abs().max() > 0, name
        assert_close_scaled(a, b, 1e-9, name, away_from_z_kinks(guide.cpu(), 6) if name == "grad_guide" else None)


# ----------------------------------------------------------------------------------------------
# opcheck


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_opcheck(dtype, device, gen):
    grid, guide, inp = make_apply_case(2, 3, 2, 5, 3, 4, 6, 7, True, dtype, "uniform", gen, device)
    args = (grid.requires_grad_(), guide.requires_grad_(), inp.requires_grad_())
    torch.library.opcheck(OPS.bilateral_slice_apply, (*args, True))
    torch.library.opcheck(OPS._bilateral_slice_apply_dguide, (*args, True))
    grid2 = torch.randn(1, 6, 4, 3, 4, generator=gen, dtype=F64).to(dtype).to(device)
    torch.library.opcheck(
        OPS.bilateral_slice_apply,
        (grid2.requires_grad_(), guide[:1].detach().requires_grad_(), inp[:1].detach().requires_grad_(), False),
    )
    go = torch.randn(2, 2, 6, 7, generator=gen, dtype=dtype).to(device)
    plain = [t.detach() for t in args]
    for dguide, mask in ((False, [True, True, True]), (False, [True, True, False]), (False, [False, True, False]), (True, [True, False, True])):
        torch.library.opcheck(OPS._bilateral_slice_apply_backward, (go, *plain, True, dguide, mask))


@pytest.mark.parametrize("which", ["grid", "guide", "input"])
def test_opcheck_backward_noncontiguous(which, gen):
    """The fake kernels must describe the real outputs, strides included: torch.compile relies on it
    (see test_compile_noncontiguous_grid)."""
    grid, guide, inp = make_apply_case(1, 3, 2, 5, 3, 4, 6, 7, True, F64, "uniform", gen)
    if which == "grid":
        grid = grid.permute(0, 4, 3, 2, 1).contiguous().permute(0, 4, 3, 2, 1)
    elif which == "guide":
        guide = guide.transpose(1, 2).contiguous().transpose(1, 2)
    else:
        inp = inp.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels-last
    go = torch.randn(1, 2, 6, 7, generator=gen, dtype=F64)
    torch.library.opcheck(OPS._bilateral_slice_apply_backward, (go, grid, guide, inp, True, False, [True, True, True]))


# ----------------------------------------------------------------------------------------------
# torch.compile (slow: few and small)


def _compile_inputs(gen, device, dtype=torch.float32):
    grid = torch.randn(2, 12, 4, 3, 5, generator=gen, dtype=dtype).to(device)
    guide = torch.rand(2, 10, 13, generator=gen, dtype=dtype).to(device)
    inp = torch.rand(2, 3, 10, 13, generator=gen, dtype=dtype).to(device)
    weight = torch.randn(2, 3, 10, 13, generator=gen, dtype=dtype).to(device)
    return grid, guide, inp, weight


def _loss(grid, guide, inp, weight):
    out = bo.bilateral_slice_apply(grid, guide * 0.9 + 0.05, inp)
    coeffs = bo.bilateral_slice(grid, guide)
    return (out * weight).sum() + coeffs.square().mean()


def _eager_and_compiled(fn, tensors, **compile_kwargs):
    one = torch.tensor(1.0, device=tensors[0].device)
    eager_out, eager_grads, _ = run_with_grads(fn, tensors[:3], (tensors[3],), grad_output=one)
    compiled = torch.compile(fn, fullgraph=True, **compile_kwargs)
    comp_out, comp_grads, _ = run_with_grads(compiled, tensors[:3], (tensors[3],), grad_output=one)
    return eager_out, eager_grads, comp_out, comp_grads


@pytest.mark.parametrize("device", DEVICES)
def test_compile_inductor_static(device, gen):
    torch._dynamo.reset()
    e_out, e_grads, c_out, c_grads = _eager_and_compiled(_loss, _compile_inputs(gen, device), backend="inductor", dynamic=False)
    torch.testing.assert_close(c_out, e_out, rtol=1e-5, atol=1e-5)
    for c, e in zip(c_grads, e_grads):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)


def test_compile_inductor_dynamic(gen):
    """Default (dynamic) compile of the public wrappers, run on two sizes."""
    torch._dynamo.reset()
    compiled = torch.compile(_loss, fullgraph=True, backend="inductor", dynamic=True)
    one = torch.tensor(1.0)
    for h, w in ((10, 13), (7, 21)):
        grid = torch.randn(2, 12, 4, 3, 5, generator=gen)
        guide = torch.rand(2, h, w, generator=gen)
        inp = torch.rand(2, 3, h, w, generator=gen)
        weight = torch.randn(2, 3, h, w, generator=gen)
        e_out, e_grads, _ = run_with_grads(_loss, (grid, guide, inp), (weight,), grad_output=one)
        c_out, c_grads, _ = run_with_grads(compiled, (grid, guide, inp), (weight,), grad_output=one)
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

    grid, guide, inp, weight = _compile_inputs(gen, "cpu")
    grid_hwdc = grid.permute(0, 3, 4, 2, 1).contiguous()
    e_out, e_grads, c_out, c_grads = _eager_and_compiled(fn, (grid_hwdc, guide, inp, weight), backend="inductor")
    torch.testing.assert_close(c_out, e_out, rtol=1e-5, atol=1e-5)
    for c, e in zip(c_grads, e_grads):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)


def test_compile_keeps_the_compiled_kernel(gen):
    """torch.compile must call our op, not trace through a decomposition of it."""
    torch._dynamo.reset()
    grid, guide, inp, _ = _compile_inputs(gen, "cpu")
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    torch.compile(lambda a, b, c: bo.bilateral_slice_apply(a, b, c), fullgraph=True, backend=backend)(grid, guide, inp)
    assert any("bilateral_slice_apply" in s for s in seen), seen


# ----------------------------------------------------------------------------------------------
# Reduced precision: autocast and half dtypes on the CPU


def test_autocast_bfloat16(gen):
    grid, guide, inp = make_apply_case(2, 3, 3, 8, 4, 4, 12, 70, True, torch.float32, "uniform", gen)
    ref = bo.bilateral_slice_apply(grid, guide, inp)
    leaves = [t.clone().requires_grad_() for t in (grid, guide, inp)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bo.bilateral_slice_apply(*leaves)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    assert_close_scaled(out, ref, 3e-2, "autocast output")
    # The result must be the one computed from bf16-rounded inputs, rounded to bf16.
    want = bo.bilateral_slice_apply(*(t.bfloat16().float() for t in (grid, guide, inp))).bfloat16()
    assert (out.float() - want.float()).abs().max() <= 2**-7 * (1 + want.float().abs().max())
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
    torch.testing.assert_close(out, out32.to(half), rtol=0, atol=0)
    for g, g32, t in zip(grads, grads32, (grid, guide, inp)):
        assert g.dtype == half and g.shape == t.shape
        torch.testing.assert_close(g, g32.to(half), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Strides, guide layout, hostile guides, empty images


@pytest.mark.parametrize("device", DEVICES)
def test_guide_with_channel_dim_equals_3d(device, gen, bitwise):
    grid, guide, inp = make_apply_case(2, 3, 3, 8, 4, 5, 13, 17, True, F64, "uniform", gen, device)
    out3, g3, go = run_with_grads(bo.bilateral_slice_apply, (grid, guide, inp), gen=gen)
    out4, g4, _ = run_with_grads(bo.bilateral_slice_apply, (grid, guide[:, None], inp), grad_output=go)
    assert torch.equal(out3, out4)
    assert g4[1].shape == (2, 1, 13, 17)
    for a, b in zip(g3, (g4[0], g4[1][:, 0], g4[2])):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_noncontiguous_inputs(dtype, device, gen, bitwise):
    n, ci, co, d, gh, gw, h, w = 2, 3, 3, 8, 5, 6, 19, 23
    # grid: permuted storage; guide: transposed; input: strided slice of a larger tensor.
    grid = torch.randn(n, gw, gh, d, co * (ci + 1), generator=gen, dtype=dtype).to(device).permute(0, 4, 3, 2, 1)
    guide = torch.rand(n, w, h, generator=gen, dtype=dtype).to(device).transpose(1, 2)
    inp = torch.rand(n, 2 * ci, h, 2 * w, generator=gen, dtype=dtype).to(device)[:, ::2, :, 1::2]
    assert not grid.is_contiguous() and not guide.is_contiguous() and not inp.is_contiguous()
    out, grads, go = run_with_grads(bo.bilateral_slice_apply, (grid, guide, inp), gen=gen)
    outc, gradsc, _ = run_with_grads(
        bo.bilateral_slice_apply, (grid.contiguous(), guide.contiguous(), inp.contiguous()), grad_output=go
    )
    assert torch.equal(out, outc)
    for a, b in zip(grads, gradsc):
        assert torch.equal(a, b)


def test_expanded_batch_and_noncontiguous_grad_output(gen):
    """Stride-0 (expanded) grid and guide, and a non-contiguous grad_output."""
    grid1 = torch.randn(1, 4, 6, 3, 4, generator=gen, dtype=F64)
    guide1 = torch.rand(1, 9, 70, generator=gen, dtype=F64)
    inp = torch.rand(3, 3, 9, 70, generator=gen, dtype=F64)
    grid, guide = grid1.expand(3, -1, -1, -1, -1), guide1.expand(3, -1, -1)
    out = bo.bilateral_slice_apply(grid, guide, inp)
    torch.testing.assert_close(
        out, reference.bilateral_slice_apply(grid.contiguous(), guide.contiguous(), inp), rtol=0, atol=1e-12
    )
    go = torch.randn(3, 70, 9, 1, generator=gen, dtype=F64).permute(0, 3, 2, 1)
    mask = [True, True, True]
    a = OPS._bilateral_slice_apply_backward(go, grid, guide, inp, True, False, mask)
    b = OPS._bilateral_slice_apply_backward(go.contiguous(), grid.contiguous(), guide.contiguous(), inp, True, False, mask)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("d", [8, 24])
def test_infinite_and_huge_guides(d, dtype, device, gen):
    n, h, w = 1, 6, 150
    grid, guide, inp = make_apply_case(n, 3, 3, d, 4, 3, h, w, True, dtype, "smooth", gen, device)
    specials = torch.tensor([math.inf, -math.inf, 1e30, -1e30, 1.3, -0.3], dtype=dtype, device=device)
    idx = torch.randperm(h * w, generator=gen)[:60].to(device)
    guide.view(-1)[idx] = specials.repeat(10)
    out, grads, go = run_with_grads(bo.bilateral_slice_apply, (grid, guide, inp), gen=gen)
    assert torch.isfinite(out).all()
    for g in grads:
        assert torch.isfinite(g).all()
    outside = (guide < 0) | (guide > 1)
    assert outside.sum() == 60
    assert (grads[1][outside] == 0).all()
    # Equal to the result with the guide clamped to [0, 1] (the edge cells), gradients included.
    out_c, grads_c, _ = run_with_grads(bo.bilateral_slice_apply, (grid, guide.clamp(0, 1), inp), grad_output=go)
    torch.testing.assert_close(out, out_c, rtol=0, atol=0)
    torch.testing.assert_close(grads[0], grads_c[0], rtol=1e-12, atol=1e-12 if dtype == F64 else 1e-5)
    torch.testing.assert_close(grads[2], grads_c[2], rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d", [8, 24])
def test_nan_guides_do_not_crash(d, device, gen):
    n, h, w = 2, 5, 140
    grid, guide, inp = make_apply_case(n, 3, 3, d, 4, 3, h, w, True, torch.float32, "uniform", gen, device)
    idx = torch.randperm(n * h * w, generator=gen)[:40].to(device)
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
    dg = OPS._bilateral_slice_apply_dguide(grid, guide, inp, True)
    assert torch.isfinite(dg.permute(1, 0, 2, 3)[:, ~nan]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,h,w", [(2, 0, 5), (2, 5, 0), (0, 4, 6), (1, 0, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_empty_images(n, h, w, dtype, device):
    grid = torch.randn(n, 6, 3, 2, 2, dtype=dtype, device=device, requires_grad=True)
    guide = torch.rand(n, h, w, dtype=dtype, device=device, requires_grad=True)
    inp = torch.rand(n, 3, h, w, dtype=dtype, device=device, requires_grad=True)
    out = bo.bilateral_slice_apply(grid, guide, inp, False)
    assert out.shape == (n, 2, h, w) and out.dtype == dtype
    out.sum().backward()
    assert grid.grad.shape == grid.shape and guide.grad.shape == guide.shape and inp.grad.shape == inp.shape
    assert (grid.grad == 0).all()
    assert OPS._bilateral_slice_apply_dguide(grid, guide, inp, False).shape == (n, 2, h, w)


# ----------------------------------------------------------------------------------------------
# CPU code paths and determinism


def test_dense_and_gather_paths_agree(gen):
    """The same pixels computed once in a smooth block (dense-z path) and once in a block made
    noisy by other pixels (gather path) give the same values and gradients."""
    d, w = 24, 128
    grid = torch.randn(1, 6, d, 3, 1, generator=gen, dtype=F64)  # Gw=1: one segment
    inp = torch.rand(1, 2, 2, w, generator=gen, dtype=F64)
    smooth = 0.4 + 0.1 * torch.sin(torch.arange(w, dtype=F64) / 30)
    guide = torch.stack([smooth, smooth.clone()]).unsqueeze(0)  # (1, 2, w)
    guide[0, 1, 1::2] = torch.rand(w // 2, generator=gen, dtype=F64)  # row 1: noisy
    inp[:, :, 1] = inp[:, :, 0]
    # Rows 0 and 1 sit at different y positions: make the grid constant along y so that equal
    # guides and inputs must give equal results in both rows.
    grid_y = grid[:, :, :, :1].expand(1, 6, d, 3, 1).contiguous()
    out, grads, _ = run_with_grads(
        bo.bilateral_slice_apply, (grid_y, guide, inp), (True,), grad_output=torch.ones(1, 2, 2, w, dtype=F64)
    )
    torch.testing.assert_close(out[:, :, 1, ::2], out[:, :, 0, ::2], rtol=0, atol=1e-13)
    torch.testing.assert_close(grads[1][:, 1, ::2], grads[1][:, 0, ::2], rtol=0, atol=1e-12)
    torch.testing.assert_close(grads[2][:, :, 1, ::2], grads[2][:, :, 0, ::2], rtol=0, atol=1e-13)
    dg = OPS._bilateral_slice_apply_dguide(grid_y, guide, inp, True)
    torch.testing.assert_close(dg[:, :, 1, ::2], dg[:, :, 0, ::2], rtol=0, atol=1e-12)
    torch.testing.assert_close(out, reference.bilateral_slice_apply(grid_y, guide, inp), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_grad_grid_deterministic_across_runs_and_threads(dtype, gen, restore_num_threads):
    grid, guide, inp = make_apply_case(2, 3, 3, 8, 16, 16, 96, 300, True, dtype, "mixed", gen)
    go = torch.randn(2, 3, 96, 300, generator=gen, dtype=dtype)

    def grads():
        plain = OPS._bilateral_slice_apply_backward(go, grid, guide, inp, True, False, [True, True, True])
        dguide = OPS._bilateral_slice_apply_backward(go, grid, guide, inp, True, True, [True, False, True])
        return plain + dguide

    torch.set_num_threads(2)
    a, b = grads(), grads()
    torch.set_num_threads(1)
    c = grads()
    for x, y, z in zip(a, b, c):
        assert torch.equal(x, y), "two runs differ"
        assert torch.equal(x, z), "1 thread and 2 threads differ"


# ----------------------------------------------------------------------------------------------
# Hand-computed cases and identities


def test_equals_slice_plus_affine_sum(gen):
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
        torch.testing.assert_close(bo.bilateral_slice_apply(grid, guide, inp, has_offset), want, rtol=0, atol=1e-12)
        # The guide derivatives obey the same identity.
        dcoeffs = OPS._bilateral_slice_dguide(grid, guide).view(n, co, stride, h, w)
        dwant = torch.einsum("noihw,nihw->nohw", dcoeffs[:, :, :ci], inp)
        if has_offset:
            dwant = dwant + dcoeffs[:, :, ci]
        torch.testing.assert_close(OPS._bilateral_slice_apply_dguide(grid, guide, inp, has_offset), dwant, rtol=0, atol=1e-11)


def test_constant_grid_is_a_per_pixel_affine_matrix(gen):
    m = torch.tensor([[0.5, -1.0, 2.0, 0.25], [1.5, 0.0, -0.5, -1.0], [-2.0, 3.0, 1.0, 0.5]], dtype=F64)
    grid = m.reshape(1, 12, 1, 1, 1)  # row-major 3x4: channel o*4 + i
    rgb = torch.rand(1, 3, 9, 130, generator=gen, dtype=F64)
    guide = torch.rand(1, 9, 130, generator=gen, dtype=F64) * 1.6 - 0.3
    want = torch.einsum("oi,nihw->nohw", m[:, :3], rgb) + m[:, 3].view(1, 3, 1, 1)
    torch.testing.assert_close(bo.bilateral_slice_apply(grid, guide, rgb), want, rtol=0, atol=1e-14)
    got_no = bo.bilateral_slice_apply(m[:, :3].reshape(1, 9, 1, 1, 1), guide, rgb, False)
    torch.testing.assert_close(got_no, want - m[:, 3].view(1, 3, 1, 1), rtol=0, atol=1e-14)
    # Gradients: d out_o / d rgb_i = m[o, i], summed over o; a constant grid has no guide derivative.
    leaf = rgb.clone().requires_grad_()
    bo.bilateral_slice_apply(grid, guide, leaf).sum().backward()
    torch.testing.assert_close(leaf.grad, m[:, :3].sum(0).view(1, 3, 1, 1).expand_as(rgb), rtol=0, atol=1e-14)
    assert (OPS._bilateral_slice_apply_dguide(grid, guide, rgb, True) == 0).all()


def test_coefficient_order(gen):
    """Channel o*(Ci+1)+i multiplies input channel i for output o; o*(Ci+1)+Ci is the offset."""
    ci, co = 3, 2
    inp = torch.rand(1, ci, 4, 5, generator=gen, dtype=F64)
    guide = torch.rand(1, 4, 5, generator=gen, dtype=F64)
    for o in range(co):
        for i in range(ci + 1):
            grid = torch.zeros(1, co * (ci + 1), 2, 2, 2, dtype=F64)
            grid[:, o * (ci + 1) + i] = 1.0
            want = torch.zeros(1, co, 4, 5, dtype=F64)
            want[:, o] = inp[:, i] if i < ci else 1.0
            torch.testing.assert_close(bo.bilateral_slice_apply(grid, guide, inp), want, rtol=0, atol=1e-15)


def test_grid_linear_in_z_has_constant_guide_derivative(gen):
    """grid[k] = a + b (k + 0.5) along z: the guide derivative is b D inside the band and 0 at the
    clamped edges, times the input for a coefficient channel."""
    d, a, b = 6, 0.75, -0.3
    lin = (a + b * (torch.arange(d, dtype=F64) + 0.5)).view(1, 1, d, 1, 1).expand(1, 1, d, 2, 3)
    grid = torch.cat([lin, torch.ones_like(lin)], 1).contiguous()  # Ci = 1: coefficient, offset 1
    guide = torch.rand(1, 7, 90, generator=gen, dtype=F64) * 1.4 - 0.2
    inp = torch.rand(1, 1, 7, 90, generator=gen, dtype=F64)
    got = OPS._bilateral_slice_apply_dguide(grid, guide, inp, True)[:, 0]
    gz = guide * d
    inside = (gz > 0.5) & (gz < d - 0.5)
    assert inside.any() and (~inside).any()
    torch.testing.assert_close(got[inside], (b * d * inp[:, 0])[inside], rtol=0, atol=1e-12)
    assert (got[~inside] == 0).all()


# ----------------------------------------------------------------------------------------------
# Errors raised by the public function: before any kernel, naming the argument

GOOD_GRID, GOOD_GUIDE, GOOD_INPUT = (2, 8, 3, 4, 5), (2, 6, 7), (2, 3, 6, 7)  # Co=2, Ci=3, offset

ERRORS = [
    # (grid, guide, input, has_offset, error, match)
    ([[1.0]], t64(*GOOD_GUIDE), t64(*GOOD_INPUT), True, TypeError, "grid"),
    (t64(*GOOD_GRID), 0.5, t64(*GOOD_INPUT), True, TypeError, "guide"),
    (t64(*GOOD_GRID), t64(*GOOD_GUIDE), None, True, TypeError, "input"),
    (torch.ones(*GOOD_GRID, dtype=torch.int64), t64(*GOOD_GUIDE), t64(*GOOD_INPUT), True, TypeError, "grid"),
    (t64(*GOOD_GRID), torch.ones(*GOOD_GUIDE, dtype=torch.int32), t64(*GOOD_INPUT), True, TypeError, "guide"),
    (t64(*GOOD_GRID), t64(*GOOD_GUIDE), torch.ones(*GOOD_INPUT, dtype=torch.uint8), True, TypeError, "input"),
    (t64(*GOOD_GRID), t64(*GOOD_GUIDE), torch.ones(*GOOD_INPUT, dtype=torch.bool), True, TypeError, "input"),
    (t64(*GOOD_GRID, dtype=torch.complex64), t64(*GOOD_GUIDE), t64(*GOOD_INPUT), True, TypeError, "grid"),
    (t64(2, 8, 3, 4), t64(*GOOD_GUIDE), t64(*GOOD_INPUT), True, ValueError, "grid"),
    (t64(2, 8, 3, 4, 5, 1), t64(*GOOD_GUIDE), t64(*GOOD_INPUT), True, ValueError, "grid"),
    (t64(*GOOD_GRID), t64(6, 7), t64(*GOOD_INPUT), True, ValueError, "guide"),
    (t64(*GOOD_GRID), t64(2, 1, 1, 6, 7), t64(*GOOD_INPUT), True, ValueError, "guide"),
    (t64(*GOOD_GRID), t64(2, 2, 6, 7), t64(*GOOD_INPUT), True, ValueError, "guide"),  # 2-channel guide
    (t64(*GOOD_GRID), t64(*GOOD_GUIDE), t64(3, 6, 7), True, ValueError, "input"),
    (t64(*GOOD_GRID), t64(*GOOD_GUIDE), t64(2, 3, 6, 7, 1), True, ValueError, "input"),
    (t64(3, 8, 3, 4, 5), t64(*GOOD_GUIDE), t64(*GOOD_INPUT), True, ValueError, "batch"),  # grid batch
    (t64(*GOOD_GRID), t64(*GOOD_GUIDE), t64(3, 3, 6, 7), True, ValueError, "input"),  # input batch
    (t64(*GOOD_GRID), t64(2, 6, 8), t64(*GOOD_INPUT), True, ValueError, "guide"),  # W mismatch
    (t64(*GOOD_GRID), t64(2, 5, 7), t64(*GOOD_INPUT), True, ValueError, "guide"),  # H mismatch
    (t64(2, 9, 3, 4, 5), t64(*GOOD_GUIDE), t64(*GOOD_INPUT), True, ValueError, r"Co\*\(Ci\+1\)"),  # 9 % 4
    (t64(2, 8, 3, 4, 5), t64(*GOOD_GUIDE), t64(*GOOD_INPUT), False, ValueError, r"Co\*Ci"),  # 8 % 3
    (t64(2, 6, 3, 4, 5), t64(*GOOD_GUIDE), t64(2, 4, 6, 7), False, ValueError, "grid"),  # 6 % 4
    (t64(2, 0, 3, 4, 5), t64(*GOOD_GUIDE), t64(*GOOD_INPUT), True, ValueError, "grid"),
    (t64(2, 8, 0, 4, 5), t64(*GOOD_GUIDE), t64(*GOOD_INPUT), True, ValueError, "grid"),
    (t64(2, 8, 3, 0, 5), t64(*GOOD_GUIDE), t64(*GOOD_INPUT), True, ValueError, "grid"),
    (t64(2, 8, 3, 4, 0), t64(*GOOD_GUIDE), t64(*GOOD_INPUT), True, ValueError, "grid"),
    (t64(2, 8, 3, 4, 5), t64(*GOOD_GUIDE), t64(2, 0, 6, 7), True, ValueError, "input"),
    (t64(*GOOD_GRID), t64(*GOOD_GUIDE, dtype=torch.float32), t64(*GOOD_INPUT), True, TypeError, "guide.*float64"),
    (t64(*GOOD_GRID), t64(*GOOD_GUIDE), t64(*GOOD_INPUT, dtype=torch.float32), True, TypeError, "input"),
    (t64(*GOOD_GRID, dtype=torch.float16), t64(*GOOD_GUIDE), t64(*GOOD_INPUT), True, TypeError, "guide"),
    (t64(*GOOD_GRID), t64(*GOOD_GUIDE), t64(*GOOD_INPUT), 1, TypeError, "has_offset"),
    (t64(*GOOD_GRID), t64(*GOOD_GUIDE), t64(*GOOD_INPUT), None, TypeError, "has_offset"),
    (t64(*GOOD_GRID), t64(*GOOD_GUIDE), t64(*GOOD_INPUT), "yes", TypeError, "has_offset"),
    (t64(*GOOD_GRID), torch.rand(*GOOD_GUIDE, dtype=F64, device="meta"), t64(*GOOD_INPUT), True, ValueError, "guide"),
    (t64(*GOOD_GRID), t64(*GOOD_GUIDE), torch.rand(*GOOD_INPUT, dtype=F64, device="meta"), True, ValueError, "input"),
]


def test_no_kernel_runs_guard_is_effective(monkeypatch):
    """The guard used by the error tests must really stop a valid call from reaching a kernel."""
    no_kernel_runs(monkeypatch)
    with pytest.raises(AssertionError, match="kernel"):
        bo.bilateral_slice_apply(t64(*GOOD_GRID), t64(*GOOD_GUIDE), t64(*GOOD_INPUT))


@pytest.mark.parametrize("case", range(len(ERRORS)))
def test_errors(case, monkeypatch):
    grid, guide, inp, has_offset, exc, match = ERRORS[case]
    no_kernel_runs(monkeypatch)
    with pytest.raises(exc, match=match):
        bo.bilateral_slice_apply(grid, guide, inp, has_offset)


# Direct calls of the compiled ops: TORCH_CHECK -> RuntimeError, never a crash.
MASK = [True, True, True]
DIRECT_ERRORS = [
    ("bilateral_slice_apply", (t64(2, 9, 3, 4, 5), t64(*GOOD_GUIDE), t64(*GOOD_INPUT), True)),
    ("bilateral_slice_apply", (t64(2, 8, 3, 4, 5), t64(*GOOD_GUIDE), t64(*GOOD_INPUT), False)),
    ("bilateral_slice_apply", (t64(*GOOD_GRID), t64(*GOOD_GUIDE), t64(2, 3, 6, 8), True)),
    ("bilateral_slice_apply", (t64(*GOOD_GRID), t64(*GOOD_GUIDE), t64(2, 3, 5, 7), True)),
    ("bilateral_slice_apply", (t64(*GOOD_GRID), t64(*GOOD_GUIDE), t64(1, 3, 6, 7), True)),
    ("bilateral_slice_apply", (t64(*GOOD_GRID), t64(*GOOD_GUIDE), t64(3, 6, 7), True)),
    ("bilateral_slice_apply", (t64(*GOOD_GRID), t64(*GOOD_GUIDE), t64(2, 0, 6, 7), True)),
    ("bilateral_slice_apply", (t64(*GOOD_GRID), t64(*GOOD_GUIDE), t64(*GOOD_INPUT, dtype=torch.float32), True)),
    ("bilateral_slice_apply", (t64(*GOOD_GRID), t64(*GOOD_GUIDE), torch.ones(*GOOD_INPUT, dtype=torch.int64), True)),
    ("bilateral_slice_apply", (t64(2, 8, 3, 0, 5), t64(*GOOD_GUIDE), t64(*GOOD_INPUT), True)),
    ("_bilateral_slice_apply_dguide", (t64(2, 9, 3, 4, 5), t64(*GOOD_GUIDE), t64(*GOOD_INPUT), True)),
    ("_bilateral_slice_apply_dguide", (t64(*GOOD_GRID), t64(2, 6), t64(*GOOD_INPUT), True)),
    ("_bilateral_slice_apply_backward", (t64(2, 3, 6, 7), t64(*GOOD_GRID), t64(*GOOD_GUIDE), t64(*GOOD_INPUT), True, False, MASK)),
    ("_bilateral_slice_apply_backward", (t64(2, 2, 6, 6), t64(*GOOD_GRID), t64(*GOOD_GUIDE), t64(*GOOD_INPUT), True, False, MASK)),
    (
        "_bilateral_slice_apply_backward",
        (torch.ones(2, 2, 6, 7, dtype=torch.int64), t64(*GOOD_GRID), t64(*GOOD_GUIDE), t64(*GOOD_INPUT), True, False, MASK),
    ),
    ("_bilateral_slice_apply_backward", (t64(2, 2, 6, 7), t64(*GOOD_GRID), t64(*GOOD_GUIDE), t64(2, 3, 6, 5), True, False, MASK)),
    ("_bilateral_slice_apply_backward", (t64(2, 2, 6, 7), t64(2, 9, 3, 4, 5), t64(*GOOD_GUIDE), t64(*GOOD_INPUT), True, False, MASK)),
    ("_bilateral_slice_apply_backward", (t64(2, 2, 6, 7), t64(*GOOD_GRID), t64(*GOOD_GUIDE), t64(*GOOD_INPUT), True, True, MASK)),
]


@pytest.mark.parametrize("case", range(len(DIRECT_ERRORS)))
def test_direct_op_calls_check_arguments(case):
    name, args = DIRECT_ERRORS[case]
    with pytest.raises(RuntimeError):
        getattr(OPS, name)(*args)


def test_direct_op_calls_accept_valid_arguments():
    """The direct-call checks above must fail for the bad argument, not always."""
    out = OPS.bilateral_slice_apply(t64(*GOOD_GRID), t64(*GOOD_GUIDE), t64(*GOOD_INPUT), True)
    assert out.shape == (2, 2, 6, 7)
    assert OPS._bilateral_slice_apply_dguide(t64(*GOOD_GRID), t64(*GOOD_GUIDE), t64(*GOOD_INPUT), True).shape == (2, 2, 6, 7)
    gg, gd, gi = OPS._bilateral_slice_apply_backward(
        t64(2, 2, 6, 7), t64(*GOOD_GRID), t64(*GOOD_GUIDE), t64(*GOOD_INPUT), True, False, MASK
    )
    assert gg.shape == GOOD_GRID and gd.shape == GOOD_GUIDE and gi.shape == GOOD_INPUT


# ----------------------------------------------------------------------------------------------
# align_corners=True (lib_bilagrid's sampling on a pixel grid: nerfstudio's linspace(0, 1, W))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(
    "case",
    [(1, 3, 3, 8, 16, 16, 37, 53, "wide"), (2, 3, 3, 4, 8, 8, 9, 11, "uniform"), (1, 3, 3, 3, 7, 5, 5, 6, "smooth"),
     (1, 3, 3, 1, 4, 6, 13, 17, "uniform"), (1, 3, 2, 6, 5, 4, 1, 70, "mixed"), (1, 3, 3, 8, 16, 16, 120, 1, "noisy")],
    ids=_id,
)
def test_align_corners_matches_reference(case, dtype, device, gen):
    n, ci, co, d, gh, gw, h, w, kind = case
    grid, guide, inp = make_apply_case(n, ci, co, d, gh, gw, h, w, True, dtype, kind, gen, device)
    out, grads, go = run_with_grads(bo.bilateral_slice_apply, (grid, guide, inp), (True, True), gen=gen)
    ref, ref_grads, _ = run_with_grads(
        reference.bilateral_slice_apply,
        (grid.double().cpu(), guide.double().cpu(), inp.double().cpu()),
        (True, True),
        grad_output=go.double().cpu(),
    )
    rel = tol(device, dtype)
    assert_close_scaled(out, ref, rel, "output")
    assert_close_scaled(grads[0], ref_grads[0], rel, "grad_grid")
    s = guide.double().cpu() * (d - 1)
    mask = (s - s.round()).abs() > (1e-4 if dtype != F64 else 1e-12)
    assert_close_scaled(grads[1], ref_grads[1], rel, "grad_guide", mask)
    assert_close_scaled(grads[2], ref_grads[2], rel, "grad_input")


def test_align_corners_is_lib_bilagrid_on_a_linspace_grid(gen):
    """With align_corners, the pixel grid samples where lib_bilagrid samples nerfstudio's
    linspace(0, 1) coordinates: the points op on those coordinates gives the same result."""
    h, w = 9, 13
    grid = torch.randn(1, 12, 8, 16, 16, generator=gen, dtype=F64)
    rgb = torch.rand(1, 3, h, w, generator=gen, dtype=F64)
    gray = torch.einsum("c,nchw->nhw", torch.tensor([0.299, 0.587, 0.114], dtype=F64), rgb)
    out = bo.bilateral_slice_apply(grid, gray, rgb, True, True)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, h, dtype=F64), torch.linspace(0, 1, w, dtype=F64), indexing="ij")
    coords = torch.stack([xs.flatten(), ys.flatten(), gray.flatten()], -1)
    pts = bo.bilateral_slice_apply_points(grid, coords, rgb[0].flatten(1).T, torch.zeros(h * w, dtype=torch.long))
    assert (out[0].flatten(1).T - pts).abs().max().item() <= 1e-12


def test_align_corners_gradcheck_and_second_order(gen):
    grid, guide, inp = make_apply_case(2, 3, 2, 4, 3, 5, 6, 7, True, F64, "uniform", gen)
    guide = guide.clamp(0.02, 0.98)
    s = guide * 3
    guide = torch.where((s - s.round()).abs() > 1e-3, guide, guide + 2e-3)
    args = (grid.requires_grad_(), guide.requires_grad_(), inp.requires_grad_())
    fn = lambda a, b, c: bo.bilateral_slice_apply(a, b, c, True, True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-5)
    assert torch.autograd.gradgradcheck(fn, args, eps=1e-6, atol=1e-5)


def test_align_corners_opcheck(gen):
    grid, guide, inp = make_apply_case(2, 3, 2, 5, 3, 4, 6, 7, True, F64, "uniform", gen)
    args = (grid.requires_grad_(), guide.requires_grad_(), inp.requires_grad_())
    torch.library.opcheck(OPS.bilateral_slice_apply, (*args, True, True))
    torch.library.opcheck(OPS._bilateral_slice_apply_dguide, (*args, True, True))
    go = torch.randn(2, 2, 6, 7, generator=gen, dtype=F64)
    plain = [t.detach() for t in args]
    torch.library.opcheck(OPS._bilateral_slice_apply_backward, (go, *plain, True, False, [True, True, True], True))


def test_the_sizes_choose_the_cpu_path():
    """By default the CPU slice ops take per-pixel gathers for batches of small images, images one
    pixel wide and grids with more cells than the image has pixels, and the row engine otherwise
    (csrc/cpu/slice_path.h); every other test of this file runs on each path."""
    from bilateral_ops import _C

    assert _C.slice_path_for(8, 16, 16, 512, 512) == "rows"
    assert _C.slice_path_for(8, 16, 16, 1080, 1920) == "rows"
    assert _C.slice_path_for(8, 16, 16, 8, 8) == "pixels"
    assert _C.slice_path_for(8, 16, 16, 65536, 1) == "pixels"
    assert _C.slice_path_for(64, 64, 64, 64, 64) == "pixels"
    with pytest.raises(ValueError, match="slice_path"):
        _C.slice_path("fast")


@pytest.mark.parametrize("hw", [(8, 8), (96, 80)])
def test_auto_takes_the_path_the_sizes_choose(hw):
    from bilateral_ops import _C

    h, w = hw
    gen = torch.Generator().manual_seed(3)
    grid = torch.randn(3, 12, 8, 16, 16, generator=gen, dtype=F64)
    x = torch.rand(3, 3, h, w, generator=gen, dtype=F64)
    guide = x.mean(1)
    before = _C.slice_path("auto")
    try:
        auto = bo.bilateral_slice_apply(grid, guide, x)
        _C.slice_path(_C.slice_path_for(8, 16, 16, h, w))
        chosen = bo.bilateral_slice_apply(grid, guide, x)
    finally:
        _C.slice_path(before)
    assert torch.equal(auto, chosen)
