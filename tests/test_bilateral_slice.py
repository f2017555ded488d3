"""bilateral_slice and its private ops (_bilateral_slice_dguide, _bilateral_slice_backward):
against the reference (F.grid_sample), gradients of first and second order, output masks,
opcheck, torch.compile, hostile guides, errors.

Every test that runs a kernel is parametrised over the devices (CUDA skipped without a GPU); the
reference is always evaluated in float64 on the CPU, on the very same (dtype-rounded) values.
"""

from __future__ import annotations

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
    assert_close_with_nans,
    away_from_z_kinks,
    make_apply_case,
    make_slice_case,
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

# (N, C, D, Gh, Gw, H, W, guide kind)
CASES = [
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
    (1, 12, 8, 16, 16, 1, 1, "uniform"),  # a single pixel (a CUDA launch edge)
    # Tall images: the CPU backward splits rows into up to 64 chunks, each accumulating only the
    # band of grid rows it touches; bands overlap and are summed in chunk order.
    (1, 3, 8, 300, 3, 1100, 9, "wide"),  # fine grid: many distinct bands
    (2, 2, 4, 1, 2, 1030, 5, "uniform"),  # Gh = 1: every chunk's band is the one grid row
    (1, 4, 10, 37, 4, 600, 70, "smooth"),  # bands of a few rows, dense-z path
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_matches_reference(case, dtype, device, gen):
    n, c, d, gh, gw, h, w, kind = case
    grid, guide = make_slice_case(n, c, d, gh, gw, h, w, dtype, kind, gen, device)
    out, grads, go = run_with_grads(bo.bilateral_slice, (grid, guide), gen=gen)
    ref, ref_grads, _ = run_with_grads(
        reference.bilateral_slice, (grid.double().cpu(), guide.double().cpu()), grad_output=go.double().cpu()
    )
    assert out.dtype == dtype and out.shape == (n, c, h, w) and out.device.type == device
    rel = tol(device, dtype)
    assert_close_scaled(out, ref, rel, "output")
    assert_close_scaled(grads[0], ref_grads[0], rel, "grad_grid")
    mask = None if dtype == F64 else away_from_z_kinks(guide.cpu(), d)
    assert_close_scaled(grads[1], ref_grads[1], rel, "grad_guide", mask)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES[:10], ids=_id)
def test_dguide_matches_reference(case, device, gen):
    n, c, d, gh, gw, h, w, kind = case
    grid, guide = make_slice_case(n, c, d, gh, gw, h, w, F64, kind, gen, device)
    got = OPS._bilateral_slice_dguide(grid, guide)
    want = reference_dguide(reference.bilateral_slice, grid.cpu(), guide.cpu())
    assert got.shape == (n, c, h, w)
    assert_close_scaled(got, want, 1e-10, "dguide")
    # Its backward is the vector-Jacobian product of the dguide op (linear in the grid).
    go = torch.randn(got.shape, generator=gen, dtype=F64).to(device)
    gg, empty = OPS._bilateral_slice_backward(go, grid, guide, True, [True, False])
    assert empty.shape == (0,)
    dg = torch.randn(grid.shape, generator=gen, dtype=F64).to(device)
    lin = (go * (OPS._bilateral_slice_dguide(grid + dg, guide) - got)).sum()
    torch.testing.assert_close((gg * dg).sum(), lin, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dguide", [False, True], ids=["plain", "dguide"])
def test_output_mask_skips_exactly_the_masked_gradients(dguide, device, gen, bitwise):
    grid, guide = make_slice_case(2, 5, 8, 4, 5, 19, 140, F64, "mixed", gen, device)
    go = torch.randn(2, 5, 19, 140, generator=gen, dtype=F64).to(device)
    full = OPS._bilateral_slice_backward(go, grid, guide, dguide, [True, not dguide])
    for mask in itertools.product([False, True], repeat=2):
        if dguide and mask[1]:
            continue
        got = OPS._bilateral_slice_backward(go, grid, guide, dguide, list(mask))
        for m, g, f, t in zip(mask, got, full, (grid, guide)):
            if m:
                torch.testing.assert_close(g, f, rtol=0, atol=0)
            else:
                assert g.shape == (0,) and g.dtype == t.dtype and g.device == t.device


def test_dguide_backward_refuses_a_guide_gradient():
    with pytest.raises(RuntimeError, match="output_mask"):
        OPS._bilateral_slice_backward(t64(1, 8, 6, 7), t64(1, 8, 3, 4, 5), t64(1, 6, 7), True, [True, True])


# ----------------------------------------------------------------------------------------------
# First and second derivatives (float64)

GRADCHECK_SIZES = [(2, 3, 4, 3, 5, 6, 7, "uniform"), (1, 2, 24, 2, 2, 3, 9, "noisy"), (1, 1, 3, 4, 2, 5, 3, "wide")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sizes", GRADCHECK_SIZES, ids=_id)
def test_gradcheck(sizes, device, gen):
    n, c, d, gh, gw, h, w, kind = sizes
    args = tuple(t.requires_grad_() for t in make_slice_case(n, c, d, gh, gw, h, w, F64, kind, gen, device))
    assert torch.autograd.gradcheck(bo.bilateral_slice, args, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sizes", GRADCHECK_SIZES, ids=_id)
def test_gradgradcheck(sizes, device, gen):
    n, c, d, gh, gw, h, w, kind = sizes
    args = tuple(t.requires_grad_() for t in make_slice_case(n, c, d, gh, gw, h, w, F64, kind, gen, device))
    assert torch.autograd.gradgradcheck(bo.bilateral_slice, args, eps=1e-6, atol=1e-5)
    # Third order, through the dguide op's own autograd.
    assert torch.autograd.gradgradcheck(OPS._bilateral_slice_dguide, args, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_penalty_matches_reference(device, gen):
    grid, guide = make_slice_case(2, 5, 6, 4, 4, 9, 70, F64, "mixed", gen, device)
    ours = second_derivative_probe(bo.bilateral_slice, (grid, guide))
    requires_grid_sample_double_backward()
    want = second_derivative_probe(reference.bilateral_slice, (grid.cpu(), guide.cpu()))
    for name, a, b in zip(("grid", "guide"), ours, want):
        assert a.abs().max() > 0, name
        assert_close_scaled(a, b, 1e-9, name, away_from_z_kinks(guide.cpu(), 6) if name == "guide" else None)


# ----------------------------------------------------------------------------------------------
# opcheck


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_opcheck(dtype, device, gen):
    grid, guide = make_slice_case(2, 8, 5, 3, 4, 6, 7, dtype, "uniform", gen, device)
    torch.library.opcheck(OPS.bilateral_slice, (grid.requires_grad_(), guide.requires_grad_()))
    torch.library.opcheck(OPS._bilateral_slice_dguide, (grid, guide))
    go = torch.randn(2, 8, 6, 7, generator=gen, dtype=dtype).to(device)
    plain = (grid.detach(), guide.detach())
    for dguide, mask in ((False, [True, True]), (False, [False, True]), (False, [True, False]), (True, [True, False])):
        torch.library.opcheck(OPS._bilateral_slice_backward, (go, *plain, dguide, mask))


def test_opcheck_backward_noncontiguous(gen):
    grid, guide = make_slice_case(1, 8, 5, 3, 4, 6, 7, F64, "uniform", gen)
    grid = grid.permute(0, 4, 3, 2, 1).contiguous().permute(0, 4, 3, 2, 1)
    guide = guide.transpose(1, 2).contiguous().transpose(1, 2)
    go = torch.randn(1, 8, 6, 7, generator=gen, dtype=F64)
    torch.library.opcheck(OPS._bilateral_slice_backward, (go, grid, guide, False, [True, True]))


# ----------------------------------------------------------------------------------------------
# Guide layout, strides, hostile guides, empty images


@pytest.mark.parametrize("device", DEVICES)
def test_guide_with_channel_dim_equals_3d(device, gen, bitwise):
    grid, guide = make_slice_case(2, 12, 8, 4, 5, 13, 17, F64, "uniform", gen, device)
    s3, sg3, sgo = run_with_grads(bo.bilateral_slice, (grid, guide), gen=gen)
    s4, sg4, _ = run_with_grads(bo.bilateral_slice, (grid, guide[:, None]), grad_output=sgo)
    assert torch.equal(s3, s4)
    assert torch.equal(sg3[0], sg4[0]) and torch.equal(sg3[1], sg4[1][:, 0])


@pytest.mark.parametrize("device", DEVICES)
def test_noncontiguous_inputs(device, gen, bitwise):
    n, c, d, gh, gw, h, w = 2, 12, 8, 5, 6, 19, 23
    grid = torch.randn(n, gw, gh, d, c, generator=gen, dtype=F64).to(device).permute(0, 4, 3, 2, 1)
    guide = torch.rand(n, w, h, generator=gen, dtype=F64).to(device).transpose(1, 2)
    s, sg, sgo = run_with_grads(bo.bilateral_slice, (grid, guide), gen=gen)
    sc, sgc, _ = run_with_grads(bo.bilateral_slice, (grid.contiguous(), guide.contiguous()), grad_output=sgo)
    assert torch.equal(s, sc)
    assert torch.equal(sg[0], sgc[0]) and torch.equal(sg[1], sgc[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize(
    "op,bad", [("slice", "grid"), ("slice", "grad_output"), ("apply", "grid"), ("apply", "grad_output"), ("apply", "input")]
)
def test_nonfinite_values_reach_what_grid_sample_reaches(op, bad, value, dtype, device, gen):
    # D = 8: every block takes the CPU's dense path, which weighs each pixel against every cell
    # of the block's z span (most with weight 0) and once spread one NaN over them all. A
    # non-finite value must reach the outputs and gradients it reaches in F.grid_sample (the
    # reference): the samples whose eight corners read it, weight 0 included.
    n, d, gh, gw, h, w = 2, 8, 4, 5, 13, 150
    if op == "slice":
        grid, guide = make_slice_case(n, 5, d, gh, gw, h, w, F64, "uniform", gen)
        extra, fn, ref = (), bo.bilateral_slice, reference.bilateral_slice
    else:
        grid, guide, inp = make_apply_case(n, 3, 3, d, gh, gw, h, w, True, F64, "uniform", gen)
        extra, fn, ref = (inp,), bo.bilateral_slice_apply, reference.bilateral_slice_apply
    tensors = (grid, guide) + extra
    out = ref(*tensors)
    go = torch.randn(out.shape, generator=gen, dtype=F64)
    pick = lambda size: int(torch.randint(size, (1,), generator=gen))  # noqa: E731
    b, y, x = pick(n), pick(h), pick(w)
    if bad == "grid":  # a cell that pixel (y, x) reads: its lower corner on every axis
        z = int((guide[b, y, x] * d - 0.5).clamp(0, d - 1))
        grid[b, pick(grid.shape[1]), z, int((y + 0.5) * gh / h - 0.5), int(max((x + 0.5) * gw / w - 0.5, 0))] = value
    elif bad == "grad_output":
        go[b, pick(go.shape[1]), y, x] = value
    else:
        inp[b, pick(inp.shape[1]), y, x] = value
    tensors, go = tuple(t.to(dtype).double() for t in tensors), go.to(dtype).double()
    want, want_grads, _ = run_with_grads(ref, tensors, grad_output=go)
    dev = tuple(t.to(device, dtype) for t in tensors)
    got, got_grads, _ = run_with_grads(fn, dev, grad_output=go.to(device, dtype))
    assert not torch.isfinite(want).all() or bad == "grad_output"
    rel = tol(device, dtype)
    assert_close_with_nans(got, want, rel, "output", non_finite=True)
    for name, g, wg in zip(("grid", "guide", "input"), got_grads, want_grads):
        assert_close_with_nans(g, wg, rel, f"grad_{name}", non_finite=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d", [8, 24])
def test_nonfinite_guides(d, device, gen):
    grid, guide = make_slice_case(2, 5, d, 4, 3, 5, 140, torch.float32, "uniform", gen, device)
    specials = torch.tensor([math.nan, math.inf, -math.inf, 1e30, -1e30], device=device)
    idx = torch.randperm(guide.numel(), generator=gen)[:50].to(device)
    guide.view(-1)[idx] = specials.repeat(10)
    bad = ~torch.isfinite(guide) | (guide.abs() > 1)
    s, sg, _ = run_with_grads(bo.bilateral_slice, (grid, guide), gen=gen)
    assert torch.isfinite(s.permute(1, 0, 2, 3)[:, ~torch.isnan(guide)]).all()
    assert torch.isfinite(sg[0]).all()  # a NaN pixel still splats with finite (edge) weights
    assert (sg[1][bad & ~torch.isnan(guide)] == 0).all()
    # The finite pixels equal those of a run with the bad guides replaced.
    s2 = bo.bilateral_slice(grid, torch.where(bad, torch.full_like(guide, 0.5), guide))
    torch.testing.assert_close(s.permute(1, 0, 2, 3)[:, ~bad], s2.permute(1, 0, 2, 3)[:, ~bad], rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,h,w", [(2, 0, 5), (2, 5, 0), (0, 4, 6), (1, 0, 0)])
def test_empty_images(n, h, w, device):
    grid = torch.randn(n, 6, 3, 2, 2, device=device, requires_grad=True)
    guide = torch.rand(n, h, w, device=device, requires_grad=True)
    s = bo.bilateral_slice(grid, guide[:, None])
    assert s.shape == (n, 6, h, w)
    s.sum().backward()
    assert grid.grad.shape == grid.shape and (grid.grad == 0).all()
    assert guide.grad.shape == guide.shape
    assert OPS._bilateral_slice_dguide(grid, guide).shape == (n, 6, h, w)


# ----------------------------------------------------------------------------------------------
# Hand-computed cases


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
    dg = OPS._bilateral_slice_dguide(grid, guide)[:, 0]
    torch.testing.assert_close(dg, leaf.grad, rtol=0, atol=1e-12)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_grad_grid_deterministic_across_runs_and_threads(dtype, gen, restore_num_threads):
    grid, guide = make_slice_case(2, 12, 8, 16, 16, 96, 300, dtype, "mixed", gen)
    go = torch.randn(2, 12, 96, 300, generator=gen, dtype=dtype)

    def grads():
        return OPS._bilateral_slice_backward(go, grid, guide, False, [True, True]) + OPS._bilateral_slice_backward(
            go, grid, guide, True, [True, False]
        )

    torch.set_num_threads(2)
    a, b = grads(), grads()
    torch.set_num_threads(1)
    c = grads()
    for x, y, z in zip(a, b, c):
        assert torch.equal(x, y), "two runs differ"
        assert torch.equal(x, z), "1 thread and 2 threads differ"


# ----------------------------------------------------------------------------------------------
# Errors

GOOD_GRID, GOOD_GUIDE = (2, 8, 3, 4, 5), (2, 6, 7)

ERRORS = [
    # (grid, guide, error, match)
    ("grid", t64(*GOOD_GUIDE), TypeError, "grid"),
    (t64(*GOOD_GRID), [0.5], TypeError, "guide"),
    (torch.ones(*GOOD_GRID, dtype=torch.int16), t64(*GOOD_GUIDE), TypeError, "grid"),
    (t64(*GOOD_GRID), torch.ones(*GOOD_GUIDE, dtype=torch.int64), TypeError, "guide"),
    (t64(2, 8, 3, 4), t64(*GOOD_GUIDE), ValueError, "grid"),
    (t64(*GOOD_GRID), t64(6, 7), ValueError, "guide"),
    (t64(*GOOD_GRID), t64(2, 2, 6, 7), ValueError, "guide"),
    (t64(*GOOD_GRID), t64(2, 1, 6, 7, 1), ValueError, "guide"),
    (t64(*GOOD_GRID), t64(3, 6, 7), ValueError, "batch"),
    (t64(2, 8, 0, 4, 5), t64(*GOOD_GUIDE), ValueError, "grid"),
    (t64(2, 0, 3, 4, 5), t64(*GOOD_GUIDE), ValueError, "grid"),
    (t64(*GOOD_GRID), t64(*GOOD_GUIDE, dtype=torch.float32), TypeError, "guide.*float64"),
    (t64(*GOOD_GRID, dtype=torch.bfloat16), t64(*GOOD_GUIDE), TypeError, "guide"),
    (t64(*GOOD_GRID), torch.rand(*GOOD_GUIDE, dtype=F64, device="meta"), ValueError, "guide"),
]


def test_no_kernel_runs_guard_is_effective(monkeypatch):
    no_kernel_runs(monkeypatch)
    with pytest.raises(AssertionError, match="kernel"):
        bo.bilateral_slice(t64(*GOOD_GRID), t64(*GOOD_GUIDE))


@pytest.mark.parametrize("case", range(len(ERRORS)))
def test_errors(case, monkeypatch):
    grid, guide, exc, match = ERRORS[case]
    no_kernel_runs(monkeypatch)
    with pytest.raises(exc, match=match):
        bo.bilateral_slice(grid, guide)


DIRECT_ERRORS = [
    ("bilateral_slice", (t64(2, 8, 3, 4), t64(*GOOD_GUIDE))),
    ("bilateral_slice", (t64(*GOOD_GRID), t64(2, 1, 6, 7))),
    ("bilateral_slice", (t64(*GOOD_GRID), t64(6, 7))),
    ("bilateral_slice", (t64(*GOOD_GRID), t64(3, 6, 7))),
    ("bilateral_slice", (t64(2, 8, 0, 4, 5), t64(*GOOD_GUIDE))),
    ("bilateral_slice", (t64(2, 8, 3, 4, 0), t64(*GOOD_GUIDE))),
    ("bilateral_slice", (t64(*GOOD_GRID), t64(*GOOD_GUIDE, dtype=torch.float32))),
    ("bilateral_slice", (torch.ones(*GOOD_GRID, dtype=torch.int32), torch.ones(*GOOD_GUIDE, dtype=torch.int32))),
    ("_bilateral_slice_dguide", (t64(*GOOD_GRID), t64(3, 6, 7))),
    ("_bilateral_slice_backward", (t64(2, 8, 6, 8), t64(*GOOD_GRID), t64(*GOOD_GUIDE), False, [True, True])),
    ("_bilateral_slice_backward", (t64(2, 7, 6, 7), t64(*GOOD_GRID), t64(*GOOD_GUIDE), False, [True, True])),
    (
        "_bilateral_slice_backward",
        (t64(2, 8, 6, 7, dtype=torch.float32), t64(*GOOD_GRID), t64(*GOOD_GUIDE), False, [True, True]),
    ),
    ("_bilateral_slice_backward", (t64(2, 8, 6, 7), t64(2, 8, 3, 4), t64(*GOOD_GUIDE), False, [True, True])),
]


@pytest.mark.parametrize("case", range(len(DIRECT_ERRORS)))
def test_direct_op_calls_check_arguments(case):
    name, args = DIRECT_ERRORS[case]
    with pytest.raises(RuntimeError):
        getattr(OPS, name)(*args)


def test_direct_op_calls_accept_valid_arguments():
    assert OPS.bilateral_slice(t64(*GOOD_GRID), t64(*GOOD_GUIDE)).shape == (2, 8, 6, 7)
    gg, gd = OPS._bilateral_slice_backward(t64(2, 8, 6, 7), t64(*GOOD_GRID), t64(*GOOD_GUIDE), False, [True, True])
    assert gg.shape == GOOD_GRID and gd.shape == GOOD_GUIDE


# ----------------------------------------------------------------------------------------------
# align_corners=True: index u (S - 1) on every axis (F.grid_sample's align_corners=True)


def _away_from_aligned_z_kinks(guide: torch.Tensor, d: int, margin: float = 1e-4) -> torch.Tensor:
    s = guide.double() * (d - 1)
    return (s - s.round()).abs() > margin


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_align_corners_matches_reference(case, dtype, device, gen):
    n, c, d, gh, gw, h, w, kind = case
    grid, guide = make_slice_case(n, c, d, gh, gw, h, w, dtype, kind, gen, device)
    out, grads, go = run_with_grads(bo.bilateral_slice, (grid, guide), (True,), gen=gen)
    ref, ref_grads, _ = run_with_grads(
        reference.bilateral_slice, (grid.double().cpu(), guide.double().cpu()), (True,), grad_output=go.double().cpu()
    )
    rel = tol(device, dtype)
    assert_close_scaled(out, ref, rel, "output")
    assert_close_scaled(grads[0], ref_grads[0], rel, "grad_grid")
    mask = _away_from_aligned_z_kinks(guide.cpu(), d, 1e-4 if dtype != F64 else 1e-12)
    assert_close_scaled(grads[1], ref_grads[1], rel, "grad_guide", mask)


def test_align_corners_differs_and_is_exact_at_corners(gen):
    """Corner pixels sample the corner cells exactly; the default sampling does not."""
    grid = torch.randn(1, 2, 3, 4, 5, generator=gen, dtype=F64)
    guide = torch.zeros(1, 6, 7, dtype=F64)
    guide[0, -1, -1] = 1.0
    out = bo.bilateral_slice(grid, guide, align_corners=True)
    assert torch.equal(out[0, :, 0, 0], grid[0, :, 0, 0, 0])
    assert torch.equal(out[0, :, -1, -1], grid[0, :, -1, -1, -1])
    assert not torch.allclose(out, bo.bilateral_slice(grid, guide))


def test_align_corners_gradcheck_and_second_order(gen):
    grid, guide = make_slice_case(2, 3, 4, 3, 5, 6, 7, F64, "uniform", gen)
    guide = guide.clamp(0.02, 0.98)
    keep = _away_from_aligned_z_kinks(guide, 4, 1e-3)
    guide = torch.where(keep, guide, guide + 2e-3)
    args = (grid.requires_grad_(), guide.requires_grad_())
    fn = lambda a, b: bo.bilateral_slice(a, b, align_corners=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-5)
    assert torch.autograd.gradgradcheck(fn, args, eps=1e-6, atol=1e-5)
    ours = second_derivative_probe(bo.bilateral_slice, (grid, guide), (True,))
    requires_grid_sample_double_backward()
    want = second_derivative_probe(reference.bilateral_slice, (grid, guide), (True,))
    for a, b in zip(ours, want):
        assert_close_scaled(a, b, 1e-9, "second order")


def test_align_corners_opcheck(gen):
    grid, guide = make_slice_case(2, 3, 4, 3, 5, 6, 7, F64, "uniform", gen)
    torch.library.opcheck(OPS.bilateral_slice, (grid.requires_grad_(), guide.requires_grad_(), True))
    torch.library.opcheck(OPS._bilateral_slice_dguide, (grid, guide, True))
    go = torch.randn(2, 3, 6, 7, generator=gen, dtype=F64)
    torch.library.opcheck(OPS._bilateral_slice_backward, (go, grid.detach(), guide.detach(), False, [True, True], True))


def test_align_corners_must_be_bool(gen):
    grid, guide = make_slice_case(1, 3, 4, 3, 5, 6, 7, F64, "uniform", gen)
    with pytest.raises(TypeError, match="align_corners"):
        bo.bilateral_slice(grid, guide, 1)
