"""bilateral_slice_apply_points and _bilateral_slice_apply_points_backward: against the float64
gather formula of their definition (lib_bilagrid's sampling) and the F.grid_sample composition,
gradients (gradcheck), masks, determinism, the CPU's dense and sparse paths, opcheck,
torch.compile, errors."""

from __future__ import annotations

import pytest
import torch

import bilateral_ops as bo
from bilateral_ops import reference
from helpers import (
    DEVICES,
    F64,
    OPS,
    assert_close_scaled,
    away_from_knots,
    gather_points,
    make_points_case,
    no_kernel_runs,
)

# (D, Gh, Gw) of the grids: lib_bilagrid's default (grid_W, grid_Y, grid_X) = (8, 16, 16), the
# smaller (4, 8, 8), odd sizes and a depth of 1.
GRIDS = [(8, 16, 16), (4, 8, 8), (3, 7, 5), (1, 4, 6), (2, 1, 1)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dgg", GRIDS, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("has_offset", [True, False], ids=["offset", "no_offset"])
def test_matches_gather_formula_float64(dgg, has_offset, device, gen):
    """Within 1e-12 of the gather formula, with coordinates outside [0, 1] and on 0, 1 and the
    knots."""
    d, gh, gw = dgg
    grid, coords, inp, idx = make_points_case(5, 3, 3, d, gh, gw, 3000, has_offset, F64, gen, device, spread=0.2, knots=0.2)
    got = bo.bilateral_slice_apply_points(grid, coords, inp, idx, has_offset)
    want = gather_points(grid.cpu(), coords.cpu(), inp.cpu(), idx.cpu(), has_offset)
    assert (got.cpu() - want).abs().max().item() <= 1e-12


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dgg", GRIDS[:3], ids=lambda s: "x".join(map(str, s)))
def test_matches_grid_sample_float32(dgg, device, gen):
    """The grid_sample composition (reference.bilateral_slice_apply_points) in float32: forward
    within 2e-6, gradients within 1e-5 max|g| (away from knots, where one-sided derivatives of
    two float32 computations may pick different sides)."""
    d, gh, gw = dgg
    grid, coords, inp, idx = make_points_case(4, 3, 3, d, gh, gw, 2000, True, torch.float32, gen, device, spread=0.1)
    leaves = [t.clone().requires_grad_() for t in (grid, coords, inp)]
    ref_leaves = [t.clone().requires_grad_() for t in (grid, coords, inp)]
    out = bo.bilateral_slice_apply_points(*leaves, idx)
    want = reference.bilateral_slice_apply_points(*ref_leaves, idx)
    assert (out - want).abs().max().item() <= 2e-6 * (1 + want.abs().max().item())
    go = torch.randn(out.shape, generator=gen).to(device)
    grads = torch.autograd.grad(out, leaves, go)
    wants = torch.autograd.grad(want, ref_leaves, go)
    ok = away_from_knots(coords, (gw, gh, d))
    for name, g, w in zip(("grid", "coords", "input"), grads, wants):
        if name == "coords":
            g, w = g.cpu()[ok], w.cpu()[ok]
        err = (g - w).abs().max().item()
        assert err <= 1e-5 * w.abs().max().item(), (name, err)


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_match_gather_formula(device, gen):
    """float64 gradients of all three arguments against autograd of the gather formula, with
    repeated and unsorted grid indices."""
    grid, coords, inp, idx = make_points_case(6, 4, 2, 3, 5, 4, 700, True, F64, gen, device, spread=0.3)
    go = torch.randn(700, 2, generator=gen, dtype=F64).to(device)
    ours = torch.autograd.grad(bo.bilateral_slice_apply_points(*[t.requires_grad_() for t in (grid, coords, inp)], idx), (grid, coords, inp), go)
    leaves = [t.detach().cpu().requires_grad_() for t in (grid, coords, inp)]
    want = torch.autograd.grad(gather_points(*leaves, idx.cpu()), leaves, go.cpu())
    ok = away_from_knots(coords.detach(), (4, 5, 3), 1e-9)
    for name, a, b in zip(("grid", "coords", "input"), ours, want):
        if name == "coords":
            a, b = a.cpu()[ok], b[ok]
        assert_close_scaled(a, b, 1e-12, name)


def test_gradcheck(gen):
    grid, coords, inp, idx = make_points_case(3, 2, 2, 3, 4, 5, 40, True, F64, gen, spread=0.1)
    coords = coords[away_from_knots(coords, (5, 4, 3), 1e-3)]
    inp, idx = inp[: coords.shape[0]], idx[: coords.shape[0]]
    args = (grid.requires_grad_(), coords.requires_grad_(), inp.requires_grad_())
    assert torch.autograd.gradcheck(lambda a, b, c: bo.bilateral_slice_apply_points(a, b, c, idx), args, eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(
        lambda a, b, c: bo.bilateral_slice_apply_points(a, b, c[:, :1], idx, False), (grid[:, :4], coords, inp), eps=1e-6, atol=1e-6
    )


def test_backward_masks(gen):
    """Every output mask gives the same gradients as the full backward (to rounding: the per-sample
    loops are compiled once per accumulation path); masked ones are empty."""
    grid, coords, inp, idx = make_points_case(3, 3, 3, 4, 5, 6, 300, True, F64, gen)
    go = torch.randn(300, 3, generator=gen, dtype=F64)
    full = OPS._bilateral_slice_apply_points_backward(go, grid, coords, inp, idx, True, [True, True, True])
    for mask in ([True, False, False], [False, True, False], [False, False, True], [False, True, True]):
        got = OPS._bilateral_slice_apply_points_backward(go, grid, coords, inp, idx, True, mask)
        for m, g, f in zip(mask, got, full):
            if m:
                torch.testing.assert_close(g, f, rtol=1e-14, atol=1e-14)
            else:
                assert g.shape == (0,)


def test_only_needed_gradients(gen, monkeypatch):
    """The autograd formula asks the backward op for the gradients that are needed only."""
    grid, coords, inp, idx = make_points_case(2, 3, 3, 2, 3, 3, 50, True, F64, gen)
    masks = []
    real = torch.ops.bilateral_ops._bilateral_slice_apply_points_backward

    class Spy:
        def __getattr__(self, name):
            op = getattr(torch.ops.bilateral_ops, name)
            if name != "_bilateral_slice_apply_points_backward":
                return op

            def wrapped(*args):
                masks.append(list(args[-1]))
                return real(*args)

            return wrapped

    import importlib

    monkeypatch.setattr(importlib.import_module("bilateral_ops.bilateral_slice_apply_points"), "_ops", Spy())
    out = bo.bilateral_slice_apply_points(grid.requires_grad_(), coords, inp, idx)
    out.sum().backward()
    assert masks == [[True, False, False]]


def test_second_derivative_raises(gen):
    grid, coords, inp, idx = make_points_case(2, 3, 3, 2, 3, 3, 20, True, F64, gen)
    leaves = [t.requires_grad_() for t in (grid, coords, inp)]
    out = bo.bilateral_slice_apply_points(*leaves, idx)
    g = torch.autograd.grad(out.square().sum(), leaves, create_graph=True)
    with pytest.raises(RuntimeError, match="_bilateral_slice_apply_points_backward"):
        torch.autograd.grad(sum(x.square().sum() for x in g), leaves)


@pytest.mark.parametrize("p", [100, 6000, 40000, 150000], ids=["sparse", "mixed", "one_chunk", "chunked"])
def test_dense_and_chunked_paths(p, gen):
    """Few samples per grid (the grids read in place, the gradient accumulated per grid, straight
    or, from cells / 32 samples on, through a channels-last buffer), many (a channels-last copy;
    chunks summed in order): all agree with the gather formula."""
    m = 2 if p > 6000 else (4 if p == 6000 else 30)
    grid, coords, inp, idx = make_points_case(m, 3, 3, 8, 16, 16, p, True, F64, gen, spread=0.05)
    if p > 6000:
        idx = torch.zeros(p, dtype=torch.int64)  # one grid per image, as gsplat
        idx[p // 3 :] = 1
    elif p == 6000:  # 2048 cells: 63 samples straight, 64 through the buffer, 1, the rest
        idx = torch.full((p,), 3, dtype=torch.int64)
        idx[:63], idx[63:127], idx[127] = 0, 1, 2
        idx = idx[torch.randperm(p, generator=gen)]
    go = torch.randn(p, 3, generator=gen, dtype=F64)
    leaves = [t.clone().requires_grad_() for t in (grid, coords, inp)]
    out = bo.bilateral_slice_apply_points(*leaves, idx)
    grads = torch.autograd.grad(out, leaves, go)
    ref_leaves = [t.clone().requires_grad_() for t in (grid, coords, inp)]
    want = gather_points(*ref_leaves, idx)
    wants = torch.autograd.grad(want, ref_leaves, go)
    assert (out - want).abs().max().item() <= 1e-12
    ok = away_from_knots(coords, (16, 16, 8), 1e-9)
    assert_close_scaled(grads[0], wants[0], 1e-11, "grid")
    assert_close_scaled(grads[1][ok], wants[1][ok], 1e-11, "coords")
    assert_close_scaled(grads[2], wants[2], 1e-11, "input")


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize(
    "ci,co,has_offset",
    [(3, 3, True), (2, 4, False), (3, 3, False), (4, 5, True)],
    ids=["rgb_3x4", "2to4", "3x3", "4to5_offset"],
)
def test_dense_paths_every_layout(ci, co, has_offset, dtype, gen):
    """The densely sampled paths in float32 and float64, every layout (lib_bilagrid's 3x4 has its
    own vector code), a sample count that leaves a partial block of samples at the end, two
    grids in unsorted order: forward and all three gradients against the float64 gather formula."""
    p = 20011
    grid, coords, inp, idx = make_points_case(2, ci, co, 8, 16, 16, p, has_offset, dtype, gen, spread=0.1, knots=0.05)
    go = torch.randn(p, co, generator=gen, dtype=F64)
    leaves = [t.clone().requires_grad_() for t in (grid, coords, inp)]
    out = bo.bilateral_slice_apply_points(*leaves, idx, has_offset)
    grads = torch.autograd.grad(out, leaves, go.to(dtype))
    ref_leaves = [t.double().requires_grad_() for t in (grid, coords, inp)]
    want = gather_points(*ref_leaves, idx, has_offset)
    wants = torch.autograd.grad(want, ref_leaves, go)
    rel = 1e-12 if dtype == F64 else 2e-6
    assert_close_scaled(out, want, rel, "output")
    ok = away_from_knots(coords, (16, 16, 8), 1e-9 if dtype == F64 else 1e-4)
    assert_close_scaled(grads[0], wants[0], 10 * rel, "grid")
    assert_close_scaled(grads[1][ok], wants[1][ok], 10 * rel, "coords")
    assert_close_scaled(grads[2], wants[2], 10 * rel, "input")


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
def test_cpu_deterministic(dtype, gen, restore_num_threads):
    """Bitwise the same output and gradients whatever the thread count and run, sorted or not.
    The thread counts split the samples at other places: each task's last sample (which takes a
    narrower store in lib_bilagrid's layout) must come out as it does inside a range."""
    grid, coords, inp, idx = make_points_case(3, 3, 3, 8, 16, 16, 60001, True, dtype, gen)
    idx[:40000] = 1  # one grid densely sampled (chunked), the others sparse
    go = torch.randn(60001, 3, generator=gen, dtype=F64).to(dtype)
    results = []
    for threads in (1, 2, 2, 3, 5):
        torch.set_num_threads(threads)
        out = OPS.bilateral_slice_apply_points(grid, coords, inp, idx, True)
        grads = OPS._bilateral_slice_apply_points_backward(go, grid, coords, inp, idx, True, [True, True, True])
        results.append((out, *grads))
    for r in results[1:]:
        for a, b in zip(results[0], r):
            assert torch.equal(a, b)


def test_reduced_precision_cpu(gen):
    grid, coords, inp, idx = make_points_case(2, 3, 3, 4, 5, 6, 500, True, torch.float32, gen)
    want = bo.bilateral_slice_apply_points(grid, coords, inp, idx)
    for dt in (torch.float16, torch.bfloat16):
        got = bo.bilateral_slice_apply_points(grid.to(dt), coords.to(dt), inp.to(dt), idx)
        assert got.dtype == dt
        assert (got.float() - want).abs().max().item() < 0.1 * (1 + want.abs().max().item())


def test_int32_index_and_empty(gen):
    grid, coords, inp, idx = make_points_case(2, 3, 3, 2, 3, 4, 30, True, F64, gen)
    assert torch.equal(bo.bilateral_slice_apply_points(grid, coords, inp, idx.int()), bo.bilateral_slice_apply_points(grid, coords, inp, idx))
    out = bo.bilateral_slice_apply_points(grid, coords[:0], inp[:0], idx[:0])
    assert out.shape == (0, 3)


@pytest.mark.parametrize("p", [1, 5000], ids=["one", "dense"])
def test_expanded_index(p, gen):
    """One grid index expanded to every sample (stride 0, how compat.bilagrid passes a single
    index) gives what the materialised indices give, forward and backward; its value is checked."""
    grid, coords, inp, _ = make_points_case(3, 3, 3, 4, 5, 6, p, True, F64, gen)
    expanded = torch.tensor([2]).expand(p)
    dense = torch.full((p,), 2, dtype=torch.int64)
    assert torch.equal(bo.bilateral_slice_apply_points(grid, coords, inp, expanded), bo.bilateral_slice_apply_points(grid, coords, inp, dense))
    go = torch.randn(p, 3, generator=gen, dtype=F64)
    a = OPS._bilateral_slice_apply_points_backward(go, grid, coords, inp, expanded, True, [True, True, True])
    b = OPS._bilateral_slice_apply_points_backward(go, grid, coords, inp, dense, True, [True, True, True])
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    with pytest.raises(ValueError, match="grid_idx"):
        bo.bilateral_slice_apply_points(grid, coords, inp, torch.tensor([3]).expand(p))
    with pytest.raises(RuntimeError, match="grid_idx"):
        OPS.bilateral_slice_apply_points(grid, coords, inp, torch.tensor([-1]).expand(p), True)


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("p", [6, 400], ids=["sparse", "dense"])
def test_nan_and_inf_coordinates_stay_in_bounds(p, dtype, gen):
    """Non-finite and huge coordinates read the border cells (NaN the lower one), on the paths
    that compute the corners per sample and per block of samples; all gradients stay finite."""
    grid, coords, inp, idx = make_points_case(2, 3, 3, 3, 4, 5, p, True, dtype, gen)
    coords[0, 0] = float("nan")
    coords[1, 1] = float("inf")
    coords[2, 2] = -float("inf")
    coords[3] = 1e30
    leaves = [t.requires_grad_() for t in (grid, coords, inp)]
    out = bo.bilateral_slice_apply_points(*leaves, idx)
    assert torch.isfinite(out).all()
    clamped = coords.detach().double().nan_to_num(nan=0.0).clamp(0, 1)
    want = gather_points(grid.detach().double(), clamped, inp.detach().double(), idx)
    assert_close_scaled(out, want, 1e-12 if dtype == F64 else 2e-6, "output")
    for g in torch.autograd.grad(out.sum(), leaves):
        assert torch.isfinite(g).all()


# ----------------------------------------------------------------------------------------------
# opcheck and torch.compile


def test_opcheck(gen):
    grid, coords, inp, idx = make_points_case(3, 3, 3, 2, 3, 4, 50, True, F64, gen)
    torch.library.opcheck(OPS.bilateral_slice_apply_points, (grid.requires_grad_(), coords.requires_grad_(), inp.requires_grad_(), idx, True))
    torch.library.opcheck(OPS.bilateral_slice_apply_points, (grid[:, :12].detach(), coords.detach(), inp[:, :1].detach(), idx, False))
    go = torch.randn(50, 3, generator=gen, dtype=F64)
    for mask in ([True, True, True], [True, False, False], [False, True, True]):
        torch.library.opcheck(OPS._bilateral_slice_apply_points_backward, (go, grid.detach(), coords.detach(), inp.detach(), idx, True, mask))


def test_compile_fullgraph(gen):
    grid, coords, inp, idx = make_points_case(3, 3, 3, 2, 3, 4, 64, True, torch.float32, gen)

    def loss(g, c, x):
        return (bo.bilateral_slice_apply_points(g, c, x, idx) ** 2).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (grid, coords, inp)]
    got = torch.autograd.grad(compiled(*leaves), leaves)
    leaves2 = [t.clone().requires_grad_() for t in (grid, coords, inp)]
    want = torch.autograd.grad(loss(*leaves2), leaves2)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------------------
# Errors


def _good(gen):
    return make_points_case(2, 3, 3, 2, 3, 4, 10, True, F64, gen)


BAD = [
    ("grid", lambda g, c, x, i: (g[0], c, x, i), ValueError),
    ("grid", lambda g, c, x, i: (g.long(), c, x, i), TypeError),
    ("coords", lambda g, c, x, i: (g, c[:, :2], x, i), ValueError),
    ("coords", lambda g, c, x, i: (g, c.float(), x, i), TypeError),
    ("input", lambda g, c, x, i: (g, c, x[:5], i), ValueError),
    ("grid", lambda g, c, x, i: (g[:, :10], c, x, i), ValueError),
    ("grid_idx", lambda g, c, x, i: (g, c, x, i[:5]), ValueError),
    ("grid_idx", lambda g, c, x, i: (g, c, x, i.double()), TypeError),
    ("grid_idx", lambda g, c, x, i: (g, c, x, i.bool()), TypeError),
    ("grid_idx", lambda g, c, x, i: (g, c, x, i + 2), ValueError),
    ("grid_idx", lambda g, c, x, i: (g, c, x, i - 1 - i), ValueError),
    ("grid_idx", lambda g, c, x, i: (g, c, x, [0] * 10), TypeError),
]


@pytest.mark.parametrize("name,make,exc", BAD)
def test_bad_inputs_raise_before_any_kernel(name, make, exc, gen, monkeypatch):
    args = make(*_good(gen))
    no_kernel_runs(monkeypatch)
    with pytest.raises(exc, match=name):
        bo.bilateral_slice_apply_points(*args)


def test_has_offset_must_be_bool(gen):
    with pytest.raises(TypeError, match="has_offset"):
        bo.bilateral_slice_apply_points(*_good(gen), 1)


def test_cpp_checks(gen):
    grid, coords, inp, idx = _good(gen)
    with pytest.raises(RuntimeError, match="grid_idx"):
        OPS.bilateral_slice_apply_points(grid, coords, inp, idx + 5, True)
    with pytest.raises(RuntimeError, match="coords"):
        OPS.bilateral_slice_apply_points(grid, coords[:, :2], inp, idx, True)
    with pytest.raises(RuntimeError, match="grid_idx"):
        OPS.bilateral_slice_apply_points(grid, coords, inp, idx.int(), True)
    with pytest.raises(RuntimeError, match="grad_output"):
        OPS._bilateral_slice_apply_points_backward(torch.zeros(3, 3, dtype=F64), grid, coords, inp, idx, True, [True, True, True])
