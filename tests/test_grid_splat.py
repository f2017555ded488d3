"""grid_splat: against the reference (scatter_add), the adjoint identity with bilateral_slice,
gradients of first and second order, opcheck, torch.compile, determinism, hostile guides, errors."""

from __future__ import annotations

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
    assert_close_with_nans,
    away_from_z_kinks,
    make_guide,
    no_kernel_runs,
    noncontiguous,
    run_with_grads,
    second_derivative_probe,
    t64,
    tol,
)

# Every test runs on both paths of the CPU slice ops: the row engine and the per-pixel gathers.
pytestmark = pytest.mark.usefixtures("cpu_slice_path")

# (N, C, D, Gh, Gw, H, W, guide kind): coarse and fine grids, a grid finer than the image, single
# pixels and cells, tall images (many row chunks), guides outside [0, 1], dense and per-pixel z.
CASES = [
    (1, 3, 8, 16, 16, 37, 53, "uniform"),
    (2, 4, 10, 9, 16, 140, 250, "smooth"),  # cells of ~16 pixels: the grid filter's regime
    (1, 1, 1, 1, 1, 5, 7, "wide"),
    (2, 5, 4, 9, 13, 6, 5, "wide"),
    (1, 4, 24, 4, 3, 20, 300, "noisy"),
    (1, 2, 12, 40, 70, 33, 61, "mixed"),  # grid finer than the image
    (1, 12, 8, 16, 16, 1, 1, "uniform"),
    (1, 3, 8, 300, 3, 1100, 9, "wide"),
]


def make_case(n, c, d, gh, gw, h, w, dtype, kind, gen, device="cpu"):
    inp = torch.randn(n, c, h, w, generator=gen, dtype=F64).to(dtype)
    guide = make_guide(kind, n, h, w, dtype, gen)
    return inp.to(device), guide.to(device), (d, gh, gw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_matches_reference(case, dtype, device, gen):
    n, c, d, gh, gw, h, w, kind = case
    inp, guide, size = make_case(*case[:7], dtype, kind, gen, device)
    out, grads, go = run_with_grads(bo.grid_splat, (inp, guide), (size,), gen=gen)
    ref, ref_grads, _ = run_with_grads(
        reference.grid_splat, (inp.double().cpu(), guide.double().cpu()), (size,), grad_output=go.double().cpu()
    )
    assert out.shape == (n, c, d, gh, gw) and out.dtype == dtype and out.device.type == device
    # A cell sums many pixels: scale the tolerance by the largest cell weight.
    rel = tol(device, dtype) * max(1.0, h * w / (gh * gw))
    assert_close_scaled(out, ref, rel, "output")
    assert_close_scaled(grads[0], ref_grads[0], tol(device, dtype), "grad_input")
    mask = None if dtype == F64 else away_from_z_kinks(guide.cpu(), d)
    assert_close_scaled(grads[1], ref_grads[1], tol(device, dtype), "grad_guide", mask)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_adjoint_of_slice(case, device, gen):
    """<bilateral_slice(G, guide), I> == <G, grid_splat(I, guide, size)> for random G and I."""
    n, c, d, gh, gw, h, w, kind = case
    inp, guide, size = make_case(*case[:7], F64, kind, gen, device)
    grid = torch.randn(n, c, d, gh, gw, generator=gen, dtype=F64).to(device)
    lhs = (bo.bilateral_slice(grid, guide) * inp).sum()
    rhs = (grid * bo.grid_splat(inp, guide, size)).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)


def test_splatting_ones_counts_pixels(gen):
    """Every pixel's weights sum to 1, so a channel of ones splats to a grid summing to H * W."""
    guide = make_guide("wide", 2, 45, 77, F64, gen)
    counts = bo.grid_splat(torch.ones(2, 1, 45, 77, dtype=F64), guide, (6, 5, 8))
    torch.testing.assert_close(counts.sum(dim=(1, 2, 3, 4)), torch.full((2,), 45.0 * 77, dtype=F64))
    assert (counts >= 0).all()


GRADCHECK_SIZES = [(2, 3, 4, 3, 5, 6, 7, "uniform"), (1, 2, 6, 2, 2, 3, 9, "noisy"), (1, 1, 3, 4, 2, 5, 3, "wide")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sizes", GRADCHECK_SIZES, ids=_id)
def test_gradcheck_and_gradgradcheck(sizes, device, gen):
    n, c, d, gh, gw, h, w, kind = sizes
    inp, guide, size = make_case(n, c, d, gh, gw, h, w, F64, kind, gen, device)
    args = (inp.requires_grad_(), guide.requires_grad_())

    def fn(x, g):
        return bo.grid_splat(x, g, size)

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-5)
    assert torch.autograd.gradgradcheck(fn, args, eps=1e-6, atol=1e-5)


def test_gradient_penalty_matches_reference(gen):
    inp, guide, size = make_case(2, 3, 6, 4, 5, 9, 70, F64, "mixed", gen)
    ours = second_derivative_probe(bo.grid_splat, (inp, guide), (size,))
    want = second_derivative_probe(reference.grid_splat, (inp, guide), (size,))
    for name, a, b in zip(("input", "guide"), ours, want):
        assert a.abs().max() > 0, name
        assert_close_scaled(a, b, 1e-9, name, away_from_z_kinks(guide, 6) if name == "guide" else None)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_opcheck(dtype, device, gen):
    inp, guide, size = make_case(2, 3, 5, 3, 4, 6, 7, dtype, "uniform", gen, device)
    torch.library.opcheck(OPS.grid_splat, (inp.requires_grad_(), guide.requires_grad_(), list(size)))


@pytest.mark.parametrize("device", DEVICES)
def test_noncontiguous_and_4d_guide(device, gen, bitwise):
    inp, guide, size = make_case(2, 3, 6, 5, 7, 19, 23, F64, "uniform", gen, device)
    want = bo.grid_splat(inp, guide, size)
    torch.testing.assert_close(bo.grid_splat(noncontiguous(inp), noncontiguous(guide), size), want, rtol=0, atol=0)
    torch.testing.assert_close(bo.grid_splat(inp, guide[:, None], list(size)), want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_deterministic_across_runs_and_threads(dtype, gen, restore_num_threads):
    inp, guide, size = make_case(2, 4, 10, 20, 30, 300, 470, dtype, "mixed", gen)
    torch.set_num_threads(2)
    a, b = bo.grid_splat(inp, guide, size), bo.grid_splat(inp, guide, size)
    torch.set_num_threads(1)
    c = bo.grid_splat(inp, guide, size)
    assert torch.equal(a, b), "two runs differ"
    assert torch.equal(a, c), "1 thread and 2 threads differ"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_cpu_half_precision_computes_in_float32(dtype, gen):
    inp, guide, size = make_case(1, 3, 6, 4, 5, 20, 30, dtype, "uniform", gen)
    out = bo.grid_splat(inp, guide, size)
    assert out.dtype == dtype
    want = bo.grid_splat(inp.float(), guide.float(), size)
    torch.testing.assert_close(out, want.to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("gh,gw", [(4, 5), (9, 40)], ids=["coarse", "fine"])
def test_nonfinite_pixels_reach_only_their_corners(gh, gw, value, device, gen):
    # D = 8: every block takes the CPU's dense path, which adds each pixel to every cell of the
    # block's z span, most with weight 0. A non-finite pixel must reach the cells the reference's
    # scatter reaches (its eight corners, weight 0 included); the other cells keep their sums.
    n, c, d, h, w = 2, 3, 8, 13, 150
    inp = torch.rand(n, c, h, w, generator=gen, dtype=F64)
    guide = make_guide("uniform", n, h, w, F64, gen)
    inp[1, 2, 7, 77] = value
    inp[0, 0, 3, 140] = value
    want = reference.grid_splat(inp, guide, (d, gh, gw))
    got = bo.grid_splat(inp.to(device), guide.to(device), (d, gh, gw))
    assert 0 < (~torch.isfinite(want)).sum() <= 16
    assert_close_with_nans(got, want, 1e-12, "splat", non_finite=True)


@pytest.mark.parametrize("device", DEVICES)
def test_nonfinite_guides_stay_in_bounds(device, gen):
    inp, guide, size = make_case(2, 3, 8, 4, 3, 5, 140, torch.float32, "uniform", gen, device)
    specials = torch.tensor([math.nan, math.inf, -math.inf, 1e30, -1e30], device=device)
    idx = torch.randperm(guide.numel(), generator=gen)[:50].to(device)
    guide.view(-1)[idx] = specials.repeat(10)
    out = bo.grid_splat(inp, guide, size)
    assert torch.isfinite(out).all()
    # Pixels are still splatted exactly once each (at the edge cells).
    ones = bo.grid_splat(torch.ones_like(inp[:, :1]), guide, size)
    torch.testing.assert_close(ones.sum(dim=(1, 2, 3, 4)).cpu(), torch.full((2,), 5.0 * 140))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,h,w", [(2, 0, 5), (2, 5, 0), (0, 4, 6)])
def test_empty_images(n, h, w, device):
    inp = torch.randn(n, 3, h, w, device=device, requires_grad=True)
    guide = torch.rand(n, h, w, device=device, requires_grad=True)
    out = bo.grid_splat(inp, guide, (4, 2, 3))
    assert out.shape == (n, 3, 4, 2, 3) and (out == 0).all()
    out.sum().backward()
    assert inp.grad.shape == inp.shape and guide.grad.shape == guide.shape


def test_compile_fullgraph(gen):
    inp, guide, size = make_case(1, 3, 6, 4, 5, 12, 17, torch.float32, "uniform", gen)

    def loss(x, g):
        return (bo.grid_splat(x, g, size) ** 2).sum()

    eager, eager_grads, _ = run_with_grads(loss, (inp, guide), grad_output=torch.tensor(1.0))
    compiled, comp_grads, _ = run_with_grads(
        torch.compile(loss, fullgraph=True), (inp, guide), grad_output=torch.tensor(1.0)
    )
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(comp_grads, eager_grads):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------------------
# Errors

IN, GD, SIZE = (2, 3, 6, 7), (2, 6, 7), (4, 3, 5)

ERRORS = [
    ("x", t64(*GD), SIZE, TypeError, "input"),
    (t64(*IN), None, SIZE, TypeError, "guide"),
    (torch.ones(*IN, dtype=torch.int32), t64(*GD), SIZE, TypeError, "input"),
    (t64(*IN), t64(*GD, dtype=torch.float32), SIZE, TypeError, "guide"),
    (t64(2, 3, 6), t64(*GD), SIZE, ValueError, "input"),
    (t64(2, 0, 6, 7), t64(*GD), SIZE, ValueError, "channel"),
    (t64(*IN), t64(3, 6, 7), SIZE, ValueError, "guide"),
    (t64(*IN), t64(2, 6, 8), SIZE, ValueError, "guide"),
    (t64(*IN), t64(2, 2, 6, 7), SIZE, ValueError, "guide"),
    (t64(*IN), t64(*GD), (4, 3), TypeError, "grid_size"),
    (t64(*IN), t64(*GD), 4, TypeError, "grid_size"),
    (t64(*IN), t64(*GD), (4, 3.0, 5), TypeError, "grid_size"),
    (t64(*IN), t64(*GD), (4, True, 5), TypeError, "grid_size"),
    (t64(*IN), t64(*GD), torch.tensor([4, 3, 5]), TypeError, "grid_size"),
    (t64(*IN), t64(*GD), (4, 0, 5), ValueError, "grid_size"),
    (t64(*IN), t64(*GD), (-1, 3, 5), ValueError, "grid_size"),
    (t64(*IN), torch.rand(*GD, dtype=F64, device="meta"), SIZE, ValueError, "guide"),
]


@pytest.mark.parametrize("case", range(len(ERRORS)))
def test_errors(case, monkeypatch):
    inp, guide, size, exc, match = ERRORS[case]
    no_kernel_runs(monkeypatch)
    with pytest.raises(exc, match=match):
        bo.grid_splat(inp, guide, size)


@pytest.mark.parametrize(
    "args",
    [
        (t64(2, 3, 6), t64(*GD), [4, 3, 5]),
        (t64(*IN), t64(3, 6, 7), [4, 3, 5]),
        (t64(*IN), t64(*GD), [4, 0, 5]),
        (t64(*IN), t64(*GD, dtype=torch.float32), [4, 3, 5]),
        (t64(2, 0, 6, 7), t64(*GD), [4, 3, 5]),
    ],
)
def test_direct_op_calls_check_arguments(args):
    with pytest.raises(RuntimeError):
        OPS.grid_splat(*args)
