"""grid_blur: against the reference (conv3d), hand-computed taps, self-adjointness, gradients of
every order, opcheck, torch.compile, aliasing, errors."""

from __future__ import annotations

import math

import pytest
import torch

import bilateral_ops as bo
from bilateral_ops import reference
from helpers import DEVICES, F64, OPS, _id, assert_close_scaled, no_kernel_runs, noncontiguous, t64, tol

# (grid shape, sigma): isotropic and per-axis sigmas, skipped axes, windows wider than the grid,
# single cells.
CASES = [
    ((1, 3, 8, 16, 16), 1.0),
    ((2, 4, 10, 9, 13), (0.0, 1.5, 0.7)),
    ((1, 2, 5, 6, 7), (3.0, 0.0, 0.0)),
    ((1, 1, 1, 1, 1), 2.0),
    ((2, 2, 3, 40, 2), (0.5, 12.0, 1.0)),
    ((1, 5, 12, 3, 90), 0.3),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_matches_reference(case, dtype, device, gen):
    shape, sigma = case
    grid = torch.randn(shape, generator=gen, dtype=F64).to(dtype).to(device)
    out = bo.grid_blur(grid, sigma)
    want = reference.grid_blur(grid.double().cpu(), sigma)
    assert out.shape == grid.shape and out.dtype == dtype and out.device.type == device
    assert_close_scaled(out, want, tol(device, dtype), "output")


def test_hand_computed_taps():
    """A unit impulse in the middle of a long axis spreads into the normalised Gaussian taps; at the
    border the window is cut, never renormalised."""
    sigma = 1.3
    r = math.ceil(2 * sigma)
    t = torch.arange(-r, r + 1, dtype=F64)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    grid = torch.zeros(1, 1, 1, 1, 21, dtype=F64)
    grid[..., 10] = 1
    out = bo.grid_blur(grid, (0.0, 0.0, sigma))[0, 0, 0, 0]
    torch.testing.assert_close(out[10 - r : 10 + r + 1], k, rtol=0, atol=1e-15)
    assert (out[: 10 - r] == 0).all() and (out[10 + r + 1 :] == 0).all()
    grid.zero_()
    grid[..., 0] = 1
    edge = bo.grid_blur(grid, (0.0, 0.0, sigma))[0, 0, 0, 0]
    torch.testing.assert_close(edge[: r + 1], k[r:], rtol=0, atol=1e-15)
    assert edge.sum() < 1  # the mass beyond the border is lost, not folded back


@pytest.mark.parametrize("device", DEVICES)
def test_self_adjoint(device, gen):
    a = torch.randn(2, 3, 7, 9, 11, generator=gen, dtype=F64).to(device)
    b = torch.randn(2, 3, 7, 9, 11, generator=gen, dtype=F64).to(device)
    for sigma in (1.0, (0.0, 2.5, 0.8)):
        torch.testing.assert_close((bo.grid_blur(a, sigma) * b).sum(), (a * bo.grid_blur(b, sigma)).sum())


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_and_gradgradcheck(device, gen):
    grid = torch.randn(2, 2, 4, 5, 3, generator=gen, dtype=F64).to(device).requires_grad_()
    for sigma in (1.0, (0.0, 0.6, 2.0)):

        def blur(g, sigma=sigma):
            return bo.grid_blur(g, sigma)

        assert torch.autograd.gradcheck(blur, (grid,))
        assert torch.autograd.gradgradcheck(blur, (grid,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_opcheck(dtype, device, gen):
    grid = torch.randn(2, 3, 4, 5, 6, generator=gen, dtype=dtype).to(device)
    torch.library.opcheck(OPS.grid_blur, (grid.requires_grad_(), [1.0, 0.0, 0.5]))


@pytest.mark.parametrize("device", DEVICES)
def test_noncontiguous_and_never_aliasing(device, gen):
    grid = torch.randn(2, 3, 5, 6, 7, generator=gen, dtype=F64).to(device)
    want = bo.grid_blur(grid, 0.8)
    torch.testing.assert_close(bo.grid_blur(noncontiguous(grid), 0.8), want, rtol=0, atol=0)
    same = bo.grid_blur(grid, 0.0)  # nothing to blur: still a new tensor
    assert torch.equal(same, grid) and same.data_ptr() != grid.data_ptr()
    before = grid.clone()
    bo.grid_blur(grid, (1.0, 1.0, 1.0))
    assert torch.equal(grid, before)


def test_huge_sigma_is_a_uniform_mean_of_the_axis(gen):
    """A window far wider than the axis: every tap inside the grid is ~1 / (the window's sum)."""
    sigma = 1e5
    grid = torch.randn(1, 1, 1, 1, 9, generator=gen, dtype=F64)
    out = bo.grid_blur(grid, (0.0, 0.0, sigma))
    t = torch.arange(-2 * sigma, 2 * sigma + 1, dtype=F64)
    norm = torch.exp(-(t**2) / (2 * sigma**2)).sum()
    torch.testing.assert_close(out, grid.sum().expand_as(grid) / norm, rtol=1e-8, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_cpu_half_precision_computes_in_float32(dtype, gen):
    grid = torch.randn(1, 2, 4, 5, 6, generator=gen).to(dtype)
    out = bo.grid_blur(grid, 1.0)
    assert out.dtype == dtype
    torch.testing.assert_close(out, bo.grid_blur(grid.float(), 1.0).to(dtype), rtol=0, atol=0)


def test_compile_fullgraph_sigma_that_changes(gen):
    # The second call's sigma reaches the compiled function symbolic (automatic dynamic floats).
    grid = torch.randn(1, 2, 4, 5, 6, generator=gen)
    compiled = torch.compile(bo.grid_blur, fullgraph=True)
    for sigma in (1.0, 0.5, (0.7, 0.0, 1.3), (0.2, 0.4, 0.6)):
        torch.testing.assert_close(compiled(grid, sigma), bo.grid_blur(grid, sigma), rtol=0, atol=0)


def test_compile_fullgraph(gen):
    grid = torch.randn(1, 2, 4, 5, 6, generator=gen)

    def loss(g):
        return (bo.grid_blur(g, (1.0, 0.5, 0.0)) ** 2).sum()

    leaf = grid.clone().requires_grad_()
    loss(leaf).backward()
    comp = grid.clone().requires_grad_()
    out = torch.compile(loss, fullgraph=True)(comp)
    out.backward()
    torch.testing.assert_close(out, loss(grid))
    torch.testing.assert_close(comp.grad, leaf.grad)


def test_empty_grid():
    grid = torch.randn(0, 2, 3, 4, 5, requires_grad=True)
    out = bo.grid_blur(grid, 1.0)
    assert out.shape == grid.shape
    out.sum().backward()


ERRORS = [
    ("g", 1.0, TypeError, "grid"),
    (torch.ones(1, 1, 2, 2, 2, dtype=torch.int64), 1.0, TypeError, "grid"),
    (t64(1, 2, 3, 4), 1.0, ValueError, "grid"),
    (t64(1, 2, 3, 4, 5), -0.5, ValueError, "sigma"),
    (t64(1, 2, 3, 4, 5), (1.0, -1.0, 1.0), ValueError, "sigma"),
    (t64(1, 2, 3, 4, 5), math.nan, ValueError, "sigma"),
    (t64(1, 2, 3, 4, 5), math.inf, ValueError, "sigma"),
    (t64(1, 2, 3, 4, 5), 2e6, ValueError, "sigma"),
    (t64(1, 2, 3, 4, 5), (1.0, 1.0), TypeError, "sigma"),
    (t64(1, 2, 3, 4, 5), "1", TypeError, "sigma"),
    (t64(1, 2, 3, 4, 5), True, TypeError, "sigma"),
    (t64(1, 2, 3, 4, 5), torch.tensor(1.0), TypeError, "sigma"),
]


@pytest.mark.parametrize("case", range(len(ERRORS)))
def test_errors(case, monkeypatch):
    grid, sigma, exc, match = ERRORS[case]
    no_kernel_runs(monkeypatch)
    with pytest.raises(exc, match=match):
        bo.grid_blur(grid, sigma)


@pytest.mark.parametrize(
    "args",
    [(t64(1, 2, 3, 4), [1.0, 1.0, 1.0]), (t64(1, 2, 3, 4, 5), [1.0, -1.0, 1.0]), (t64(1, 2, 3, 4, 5), [math.nan] * 3)],
)
def test_direct_op_calls_check_arguments(args):
    with pytest.raises(RuntimeError):
        OPS.grid_blur(*args)
