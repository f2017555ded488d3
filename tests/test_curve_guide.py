"""curve_guide: against the pure-torch reference, gradients (gradcheck, gradgradcheck, the clamp
and relu conventions), opcheck, torch.compile, determinism across runs and thread counts,
layouts and sizes, dtypes, and errors raised before any kernel runs."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    DEVICES,
    F64,
    OPS,
    assert_close_scaled,
    assert_close_with_nans,
    assert_same_as_registered,
    curve_pre_clamp,
    deterministic,
    make_curve_case,
    no_kernel_runs,
    noncontiguous,
    requires_x86_64,
    run_at_each_cpu_isa,
    run_with_grads,
    tol,
)

import bilateral_ops as bo
import bilateral_ops._library as lib
from bilateral_ops import reference

NAMES = ("input", "ccm", "ccm_bias", "shifts", "slopes", "mix", "mix_bias")

# (N, C, H, W, K): HDRNet's RGB with 16 points, odd sizes, C = 1 and K = 1, more channels than
# the CUDA register path takes, images that span several chunks of the CPU reduction, 1x1, more
# points than the sorted paths take (16 on the CPU), batches of small images whose blocks and
# reduction chunks run across image boundaries (the CPU kernels number the batch's pixels image
# after image).
SHAPES = [(2, 3, 17, 23, 16), (1, 1, 5, 7, 1), (1, 5, 33, 65, 3), (3, 3, 1, 1, 16), (1, 2, 70, 130, 4), (1, 3, 64, 65, 1), (2, 3, 9, 37, 24),
          (37, 3, 5, 7, 16), (300, 3, 3, 5, 16), (5, 2, 30, 33, 5)]


def _grads_vs_reference(args, device, dtype, gen):
    out, grads, go = run_with_grads(bo.curve_guide, args, gen=gen)
    ref_args = [t.detach().to("cpu", F64) for t in args]
    ref_out, ref_grads, _ = run_with_grads(reference.curve_guide, ref_args, grad_output=go.to("cpu", F64))
    return out, grads, ref_out, ref_grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, dtype, device, gen):
    n, c, h, w, k = shape
    # float32 and float64 may take different sides of a kink: keep a margin there.
    args = make_curve_case(n, c, h, w, k, dtype, gen, device, margin=1e-5 if dtype == torch.float32 else 0.0)
    out, grads, ref_out, ref_grads = _grads_vs_reference(args, device, dtype, gen)
    rel = tol(device, dtype)
    assert out.dtype == dtype and out.shape == (n, h, w)
    assert_close_scaled(out, ref_out, rel, "guide")
    # Parameter gradients are sums over every pixel: scale by the pixel count in float32.
    for name, g, r in zip(NAMES, grads, ref_grads):
        scale = 1 if dtype == torch.float64 or name == "input" else max(1, n * h * w) ** 0.5
        assert_close_scaled(g, r, rel * scale, f"grad {name}")


def test_output_is_clamped_and_varies(gen):
    args = make_curve_case(2, 3, 40, 50, 16, gen=gen)
    args[-1] = torch.tensor([0.2], dtype=F64)
    out = bo.curve_guide(*args)
    assert out.min() >= 0 and out.max() <= 1
    assert (out == 1).any() and (out > 0).logical_and(out < 1).float().mean() > 0.3


# ----------------------------------------------------------------------------------------------
# Gradients


def test_gradcheck_every_argument(gen):
    args = [t.requires_grad_() for t in make_curve_case(2, 3, 4, 5, 4, gen=gen, margin=1e-4, mix_bias=0.7)]
    _, g = curve_pre_clamp(*args)
    assert ((g < 0) | (g > 1)).any(), "the case should exercise the clamp"
    assert torch.autograd.gradcheck(bo.curve_guide, args, eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("c,k", [(1, 1), (4, 2)])
def test_gradcheck_channel_and_point_counts(c, k, gen):
    args = [t.requires_grad_() for t in make_curve_case(1, c, 3, 4, k, gen=gen, margin=1e-4)]
    assert torch.autograd.gradcheck(bo.curve_guide, args, eps=1e-6, atol=1e-8)


def test_gradgradcheck(gen):
    args = [t.requires_grad_() for t in make_curve_case(1, 3, 3, 4, 3, gen=gen, margin=1e-4)]
    assert torch.autograd.gradgradcheck(bo.curve_guide, args, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_eager_autograd_equals_the_registered_one(device, gen):
    """bo.curve_guide differentiates eagerly below torch.library's autograd layer: the same op
    and backward op with the same masks, so the same bits as differentiating torch.ops' op."""
    args = make_curve_case(2, 3, 9, 12, 5, gen=gen, device=device)
    go = torch.randn(2, 9, 12, generator=gen, dtype=F64).to(device)
    for wanted in [(True,) * 7, (False,) + (True,) * 6, (True,) + (False,) * 6, (False, False, False, True, True, False, False)]:
        leaves = [t.detach().requires_grad_(w) for t, w in zip(args, wanted)]
        inputs = [t for t, w in zip(leaves, wanted) if w]
        assert_same_as_registered(bo.curve_guide(*leaves), OPS.curve_guide(*leaves), inputs, go, wanted)
    with torch.no_grad():
        assert bo.curve_guide(*[t.detach().requires_grad_() for t in args]).grad_fn is None


def test_second_derivatives_match_reference(gen):
    """A gradient penalty (create_graph=True) through the op equals the same penalty through the
    reference, for every argument."""
    args = make_curve_case(2, 3, 6, 7, 5, gen=gen, margin=1e-6)

    def penalty_grads(fn):
        leaves = [t.detach().clone().requires_grad_() for t in args]
        firsts = torch.autograd.grad((fn(*leaves) ** 2).sum(), leaves, create_graph=True)
        return torch.autograd.grad(sum((f * f).sum() for f in firsts), leaves)

    for name, got, want in zip(NAMES, penalty_grads(bo.curve_guide), penalty_grads(reference.curve_guide)):
        assert_close_scaled(got, want, 1e-10, f"second-order grad {name}")
        assert want.abs().max() > 0 or name == "mix_bias", name


@pytest.mark.parametrize("mix_bias", [5.0, -5.0])
def test_clamped_pixels_have_zero_gradient(mix_bias, gen):
    args = make_curve_case(2, 3, 9, 11, 6, gen=gen)
    args[-1] = torch.tensor([mix_bias], dtype=F64)
    out, grads, _ = run_with_grads(bo.curve_guide, args, gen=gen)
    assert (out == (1.0 if mix_bias > 0 else 0.0)).all()
    for name, g in zip(NAMES, grads):
        assert (g == 0).all(), name


def test_partly_clamped_gradient_is_masked(gen):
    """Pixels clamped by the guide's range get no input gradient; the others do."""
    args = make_curve_case(1, 3, 20, 30, 8, gen=gen, margin=1e-6)
    _, g = curve_pre_clamp(*args)
    clamped = (g < 0) | (g > 1)
    assert clamped.any() and (~clamped).any()
    _, grads, _ = run_with_grads(bo.curve_guide, args, gen=gen)
    dx = grads[0].abs().sum(1)
    assert (dx[clamped] == 0).all()
    assert (dx[~clamped] > 0).float().mean() > 0.9


def test_kinks_follow_torch_conventions():
    """At relu's kink (c == shift) and at the clamp's edges (guide exactly 0 or 1) the gradients
    are those of torch's autograd of the reference: relu'(0) = 0, clamp passes on [0, 1]."""
    x = torch.tensor([0.25, 0.5, 0.75, 1.0], dtype=F64).view(1, 1, 1, 4)
    ccm = torch.ones(1, 1, dtype=F64)
    zero = torch.zeros(1, dtype=F64)
    shifts = torch.tensor([[0.0, 0.5]], dtype=F64)  # the second is exactly at pixel 1's c
    slopes = torch.tensor([[1.0, -0.5]], dtype=F64)  # guide at pixel 3: 1 - 0.25 = 0.75; ...
    mix = torch.ones(1, dtype=F64)
    for mix_bias in (0.0, 0.25, -0.25):  # pixel 3 at 1.0 with +0.25, pixel 0 at 0.0 with -0.25
        args = [x, ccm, zero, shifts, slopes, mix, torch.tensor([mix_bias], dtype=F64)]
        go = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]], dtype=F64)
        _, got, _ = run_with_grads(bo.curve_guide, args, grad_output=go)
        _, want, _ = run_with_grads(reference.curve_guide, args, grad_output=go)
        for name, g, w in zip(NAMES, got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-15, msg=f"{name} at mix_bias={mix_bias}")


# ----------------------------------------------------------------------------------------------
# The backward op and its output mask


@pytest.mark.parametrize("device", DEVICES)
def test_backward_mask(device, gen):
    args = make_curve_case(2, 3, 10, 13, 5, gen=gen, device=device)
    go = torch.randn(2, 10, 13, generator=gen, dtype=F64).to(device)
    full = OPS._curve_guide_backward(go, *args, [True] * 7)
    for i in range(7):
        mask = [j != i for j in range(7)]
        part = OPS._curve_guide_backward(go, *args, mask)
        for j, (p, f) in enumerate(zip(part, full)):
            if mask[j]:
                torch.testing.assert_close(p, f, rtol=0, atol=0)
            else:
                assert p.shape == (0,)
    only_input = OPS._curve_guide_backward(go, *args, [True] + [False] * 6)
    torch.testing.assert_close(only_input[0], full[0], rtol=0, atol=0)
    none = OPS._curve_guide_backward(go, *args, [False] * 7)
    assert all(t.shape == (0,) for t in none)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device, gen):
    args = make_curve_case(2, 3, 6, 7, 4, gen=gen, device=device)
    torch.library.opcheck(OPS.curve_guide, tuple(t.clone().requires_grad_() for t in args))
    go = torch.randn(2, 6, 7, generator=gen, dtype=F64).to(device)
    for mask in ([True] * 7, [True] + [False] * 6, [False, True, False, True, False, True, False]):
        torch.library.opcheck(OPS._curve_guide_backward, (go, *args, mask))


def test_opcheck_noncontiguous(gen):
    args = make_curve_case(2, 3, 6, 7, 4, gen=gen)
    args[0] = noncontiguous(args[0])
    args[1] = args[1].t().contiguous().t()
    go = noncontiguous(torch.randn(2, 6, 7, generator=gen, dtype=F64))
    torch.library.opcheck(OPS._curve_guide_backward, (go, *args, [True] * 7))


# ----------------------------------------------------------------------------------------------
# torch.compile


def test_compile_fullgraph(gen):
    torch._dynamo.reset()
    args = make_curve_case(2, 3, 12, 15, 16, dtype=torch.float32, gen=gen)

    def step(*a):
        return (bo.curve_guide(*a) * 2).sum()

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    leaves = [t.clone().requires_grad_() for t in args]
    eager_leaves = [t.clone().requires_grad_() for t in args]
    loss = compiled(*leaves)
    loss.backward()
    step(*eager_leaves).backward()
    torch.testing.assert_close(loss, step(*args), rtol=1e-6, atol=1e-6)
    for name, a, b in zip(NAMES, leaves, eager_leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5, msg=name)


# ----------------------------------------------------------------------------------------------
# Determinism


def _grads(args, go):
    return OPS._curve_guide_backward(go, *args, [True] * 7)


@pytest.mark.parametrize("nhw", [(3, 90, 151), (700, 4, 5)], ids=["large", "tiny"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_deterministic_across_runs_and_threads(dtype, nhw, gen, restore_num_threads):
    # Three images of several reduction chunks each, uneven last chunks; or 700 tiny images in
    # four chunks that start and end inside images.
    args = make_curve_case(nhw[0], 3, nhw[1], nhw[2], 16, dtype=dtype, gen=gen)
    go = torch.randn(*nhw, generator=gen, dtype=dtype)
    torch.set_num_threads(2)
    a = _grads(args, go)
    b = _grads(args, go)
    torch.set_num_threads(1)
    c = _grads(args, go)
    for name, x, y, z in zip(NAMES, a, b, c):
        assert torch.equal(x, y), f"{name}: runs differ"
        assert torch.equal(x, z), f"{name}: 1 and 2 threads differ"


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_mode(device, gen):
    args = make_curve_case(2, 3, 50, 70, 16, dtype=torch.float32, gen=gen, device=device)
    go = torch.randn(2, 50, 70, generator=gen).to(device)
    with deterministic(True):
        a = _grads(args, go)
        b = _grads(args, go)
    for name, x, y in zip(NAMES, a, b):
        assert torch.equal(x, y), name


# ----------------------------------------------------------------------------------------------
# Layouts, sizes, dtypes


def test_noncontiguous_views(gen):
    args = make_curve_case(2, 3, 11, 13, 5, gen=gen)
    views = [noncontiguous(args[0]), args[1].t().contiguous().t()] + [noncontiguous(t) for t in args[2:]]
    assert not any(t.is_contiguous() for t in views[:2])
    out, grads, go = run_with_grads(bo.curve_guide, views, gen=gen)
    ref_out, ref_grads, _ = run_with_grads(bo.curve_guide, args, grad_output=go)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    for name, a, b in zip(NAMES, grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_channels_last_input(gen):
    args = make_curve_case(2, 4, 9, 10, 3, gen=gen)
    cl = [args[0].to(memory_format=torch.channels_last)] + args[1:]
    torch.testing.assert_close(bo.curve_guide(*cl), bo.curve_guide(*args), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(2, 3, 0, 5), (0, 3, 4, 5), (1, 3, 4, 0)])
def test_empty_image(shape, gen):
    args = make_curve_case(1, 3, 2, 2, 4, gen=gen)
    args[0] = torch.rand(*shape, dtype=F64)
    out, grads, _ = run_with_grads(bo.curve_guide, args)
    assert out.shape == (shape[0], shape[2], shape[3])
    for name, g, t in zip(NAMES, grads, args):
        assert g.shape == t.shape and (g == 0).all(), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_half_computes_in_float32(dtype, gen):
    args = make_curve_case(2, 3, 21, 34, 16, dtype=dtype, gen=gen)
    out, grads, go = run_with_grads(bo.curve_guide, args, gen=gen)
    f32 = [t.float() for t in args]
    want, want_grads, _ = run_with_grads(bo.curve_guide, f32, grad_output=go.float())
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    torch.testing.assert_close(out, want.to(dtype), rtol=0, atol=0)
    for name, g, w in zip(NAMES, grads, want_grads):
        torch.testing.assert_close(g, w.to(dtype), rtol=0, atol=0, msg=name)


def test_autocast_casts_every_argument(gen):
    args = make_curve_case(1, 3, 8, 9, 4, dtype=torch.float32, gen=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bo.curve_guide(*args)
    assert out.dtype == torch.bfloat16
    want = bo.curve_guide(*[t.to(torch.bfloat16) for t in args])
    torch.testing.assert_close(out, want, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Errors


def _bad_cases():
    def case(i, value):
        return i, value

    f = torch.rand
    return [
        (case(0, f(3, 4, 5, dtype=F64)), ValueError, "input must have shape"),
        (case(0, f(1, 0, 4, 5, dtype=F64)), ValueError, "at least one channel"),
        (case(1, f(3, 2, dtype=F64)), ValueError, r"ccm must have shape \(3, 3\)"),
        (case(2, f(4, dtype=F64)), ValueError, r"ccm_bias must have shape \(3,\)"),
        (case(3, f(3, dtype=F64)), ValueError, "shifts must have shape"),
        (case(3, f(2, 4, dtype=F64)), ValueError, "shifts must have shape"),
        (case(3, f(3, 0, dtype=F64)), ValueError, "K >= 1"),
        (case(4, f(3, 5, dtype=F64)), ValueError, r"slopes must have shape \(3, 4\)"),
        (case(5, f(1, 3, dtype=F64)), ValueError, r"mix must have shape \(3,\)"),
        (case(6, f(2, dtype=F64)), ValueError, r"mix_bias must have shape \(1,\)"),
        (case(6, torch.tensor(0.0, dtype=F64)), ValueError, r"mix_bias must have shape \(1,\)"),
        (case(1, f(3, 3, dtype=torch.float32)), TypeError, "ccm must have the same dtype as input"),
        (case(0, torch.ones(1, 3, 4, 5, dtype=torch.int64)), TypeError, "input must be a floating-point"),
        (case(4, [[1.0] * 4] * 3), TypeError, "slopes must be a torch.Tensor"),
        (case(5, f(3, dtype=F64, device="meta")), ValueError, "mix must be on the same device as input"),
    ]


@pytest.mark.parametrize("bad,exc,match", _bad_cases(), ids=lambda x: None)
def test_bad_inputs_raise_before_any_kernel(bad, exc, match, monkeypatch, gen):
    args = make_curve_case(1, 3, 4, 5, 4, gen=gen)
    i, value = bad
    args[i] = value
    no_kernel_runs(monkeypatch)
    with pytest.raises(exc, match=match):
        bo.curve_guide(*args)


def test_ops_check_their_arguments(gen):
    """Callers of torch.ops.bilateral_ops get a RuntimeError, never a crash."""
    args = make_curve_case(1, 3, 4, 5, 4, gen=gen)
    for i, bad in [(1, torch.rand(3, 2, dtype=F64)), (3, torch.rand(2, 4, dtype=F64)), (4, torch.rand(3, 5, dtype=F64)),
                   (6, torch.rand(0, dtype=F64)), (0, torch.rand(4, 5, dtype=F64)), (2, torch.rand(3))]:
        wrong = list(args)
        wrong[i] = bad
        with pytest.raises(RuntimeError, match=NAMES[i]):
            OPS.curve_guide(*wrong)
        go = torch.zeros(1, 4, 5, dtype=F64)
        with pytest.raises(RuntimeError, match=NAMES[i]):
            OPS._curve_guide_backward(go, *wrong, [True] * 7)
    with pytest.raises(RuntimeError, match="grad_output"):
        OPS._curve_guide_backward(torch.zeros(1, 5, 4, dtype=F64), *args, [True] * 7)


def test_non_finite_inputs_do_not_crash(gen):
    args = make_curve_case(1, 3, 8, 9, 4, gen=gen)
    args[0][0, 0, 0, 0] = float("nan")
    args[0][0, 1, 2, 3] = float("inf")
    out, grads, _ = run_with_grads(bo.curve_guide, args, gen=gen)
    assert all(g.shape == t.shape for g, t in zip(grads, args))
    ref = reference.curve_guide(*args)
    assert torch.isnan(out[0, 0, 0]) and torch.isnan(ref[0, 0, 0])
    finite = torch.isfinite(ref)
    torch.testing.assert_close(out[finite], ref[finite])


def test_registered_with_cpu_kernels_and_exported():
    assert "curve_guide" in lib.OPS and "_curve_guide_backward" in lib.OPS
    assert "cpu" in bo.compiled_devices("curve_guide") and "cpu" in bo.compiled_devices("_curve_guide_backward")
    assert "curve_guide" in bo.__all__


def test_fallback_without_a_kernel(monkeypatch, gen):
    """No kernel for the device: raise with BILATERAL_OPS_REQUIRE_COMPILED set, else warn and
    return the reference's result."""
    args = make_curve_case(1, 3, 5, 6, 4, gen=gen)
    monkeypatch.setattr(lib, "_WARNED", set())
    monkeypatch.setitem(lib.KERNEL_DEVICES, "curve_guide", frozenset())
    monkeypatch.setenv("BILATERAL_OPS_REQUIRE_COMPILED", "1")
    with pytest.raises(RuntimeError, match="curve_guide"):
        bo.curve_guide(*args)
    monkeypatch.setenv("BILATERAL_OPS_REQUIRE_COMPILED", "0")
    with pytest.warns(RuntimeWarning, match="curve_guide"):
        out = bo.curve_guide(*args)
    torch.testing.assert_close(out, reference.curve_guide(*args), rtol=0, atol=0)


@pytest.mark.parametrize("K", [1, 2, 3, 5, 16, 17, 33, 400])
def test_sorted_knots_evaluate_the_curve(K, gen):
    """The CUDA kernels evaluate each curve through its sorted knots (curve_guide.h); the module
    runs those same functions on the host. Against the direct sum of the definition: ties among
    the shifts, points exactly on a knot (relu(0) = relu'(0) = 0), below the first and above the
    last knot, and a NaN."""
    from bilateral_ops import _C

    # Shifts on a coarse lattice so that some coincide; unsorted, as the parameters are.
    shifts = (torch.randint(0, max(2, K // 2), (K,), generator=gen).to(F64) / max(1, K // 2) - 0.1).tolist()
    slopes = torch.randn(K, generator=gen, dtype=F64).tolist()
    points = torch.rand(64, generator=gen, dtype=F64) * 1.6 - 0.3
    cs = points.tolist() + shifts + [min(shifts) - 1.0, max(shifts) + 1.0]
    c = torch.tensor(cs, dtype=F64).unsqueeze(1)
    sh, sl = torch.tensor(shifts, dtype=F64), torch.tensor(slopes, dtype=F64)
    want_f = (sl * torch.relu(c - sh)).sum(1)
    want_fp = (sl * (c > sh)).sum(1)
    scale = 1 + (sl.abs() * (c - sh).abs()).sum(1)
    got = _C.curve_sorted(shifts, slopes, cs)
    assert list(got["sorted"]) == sorted(shifts)
    assert got["pq"][2 * K] == pytest.approx(sum(slopes), abs=1e-12)
    assert ((torch.tensor(got["f"], dtype=F64) - want_f).abs() <= 1e-13 * scale).all()
    assert ((torch.tensor(got["fp"], dtype=F64) - want_fp).abs() <= 1e-13 * (1 + sl.abs().sum())).all()
    # In float the CUDA path's rounding: a few ulps of the terms' magnitude.
    got32 = _C.curve_sorted(shifts, slopes, cs, double=False)
    assert ((torch.tensor(got32["f"], dtype=F64) - want_f).abs() <= 1e-5 * scale).all()
    nan = _C.curve_sorted(shifts, slopes, [float("nan")])
    assert torch.isnan(torch.tensor(nan["f"])).all() and nan["fp"] == (0.0,)
    with pytest.raises(ValueError):
        _C.curve_sorted([0.0, 1.0], [1.0], [0.5])


def test_sorted_knots_keep_their_precision_far_from_zero(gen):
    """The sorted form takes the shifts from the smallest one, (c - s_0) P_n - Q_n: in float,
    shifts and points near 1e4 keep the rounding of c - s (c P_n - sum m s would lose ~1e-3)."""
    from bilateral_ops import _C

    K = 16
    # Values exact in float: the float result differs from the double one by its own rounding.
    shifts = (1e4 + torch.randint(0, 64, (K,), generator=gen).to(F64) / 32).tolist()
    slopes = (torch.randint(-64, 64, (K,), generator=gen).to(F64) / 64).tolist()
    cs = (1e4 + torch.randint(-16, 96, (200,), generator=gen).to(F64) / 32).tolist()
    want = torch.tensor(_C.curve_sorted(shifts, slopes, cs)["f"], dtype=F64)
    got = torch.tensor(_C.curve_sorted(shifts, slopes, cs, double=False)["f"], dtype=F64)
    assert (got - want).abs().max().item() <= 1e-5 * (1 + want.abs().max().item())


# ----------------------------------------------------------------------------------------------
# The CPU backward's two forms of the curve and its copies per instruction set
# (csrc/cpu/curve_guide_kernels.h)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", ["input nan", "input inf", "grad nan", "shift inf", "slope nan"])
def test_backward_non_finite_values_follow_the_reference(case, dtype, gen):
    """The CPU backward evaluates each curve as (c - r) P - Q and its slope gradients as
    B - (s - r) A where the values are finite, and as sums over the knots where they are not:
    NaNs and infinities where torch's autograd of the reference has them, the finite values alike."""
    args = make_curve_case(2, 3, 8, 40, 16, dtype=dtype, gen=gen)
    go = torch.randn(2, 8, 40, generator=gen, dtype=F64).to(dtype)
    if case == "input nan":
        args[0][0, 1, 2, 3] = float("nan")
    elif case == "input inf":
        args[0][1, 0, 4, 5] = float("inf")
        args[0][1, 2, 1, 30] = -float("inf")
    elif case == "grad nan":
        go[0, 3, 3] = float("nan")
    elif case == "shift inf":
        args[3][1, 4] = float("inf")
    else:
        args[4][2, 7] = float("nan")
    got = OPS._curve_guide_backward(go, *args, [True] * 7)
    _, want, _ = run_with_grads(reference.curve_guide, [t.to(F64) for t in args], grad_output=go.to(F64))
    rel = 1e-5 if dtype == torch.float32 else 1e-12
    for name, g, w in zip(NAMES, got, want):
        if case == "grad nan" and name in ("input", "ccm", "ccm_bias"):
            # These flow through f'(c) df, which is NaN at the NaN pixel even where f' = 0 (c
            # below every knot), where the reference's relu backward selects 0 per knot.
            continue
        g = g.to(F64)
        assert torch.equal(torch.isnan(g), torch.isnan(w)), name
        assert torch.equal(torch.isinf(g), torch.isinf(w)), name
        finite = torch.isfinite(w)
        if finite.any():
            assert_close_scaled(g[finite], w[finite], rel, name)


def test_backward_keeps_its_precision_far_from_zero(gen):
    """Channel values and shifts near 1000, every value exact in float: the float gradients keep
    the rounding of c - shift (the CPU backward takes the shifts from each channel's smallest)."""
    n, h, w, K = 2, 24, 40, 16
    x = 1000 + torch.randint(0, 64, (n, 3, h, w), generator=gen).to(F64) / 64
    ccm = torch.eye(3, dtype=F64)
    ccm_bias = torch.zeros(3, dtype=F64)
    shifts = 1000 + torch.randint(0, 64, (3, K), generator=gen).to(F64) / 64
    slopes = torch.randint(-16, 32, (3, K), generator=gen).to(F64) / 64
    mix = torch.full((3,), 0.25, dtype=F64)
    mix_bias = torch.tensor([0.25], dtype=F64)
    args = [x, ccm, ccm_bias, shifts, slopes, mix, mix_bias]
    go = torch.randint(-8, 8, (n, h, w), generator=gen).to(F64) / 8
    _, want, _ = run_with_grads(reference.curve_guide, args, grad_output=go)
    got = OPS._curve_guide_backward(go.float(), *[t.float() for t in args], [True] * 7)
    for name, g, wt in zip(NAMES, got, want):
        assert wt.abs().max() > 0, name
        assert_close_scaled(g, wt, 2e-6, name)


@requires_x86_64
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_instruction_set_copy_agrees(dtype, gen, tmp_path):
    """The CPU curve kernels are compiled once per x86-64 level (csrc/cpu/simd.h) and a process
    runs the best its CPU has; BILATERAL_OPS_CPU_ISA caps it, so each copy this machine can run
    is run here, in its own process, against this one's."""
    # Several reduction chunks, a partial last block, a non-finite pixel (the sums' fallback).
    args = make_curve_case(2, 3, 37, 121, 16, dtype=dtype, gen=gen)
    args[0][1, 2, 5, 7] = float("inf")
    go = torch.randn(2, 37, 121, generator=gen, dtype=F64).to(dtype)
    want = (OPS.curve_guide(*args),) + tuple(OPS._curve_guide_backward(go, *args, [True] * 7))
    body = "return (ops.curve_guide(*inputs[1:]),) + tuple(ops._curve_guide_backward(*inputs, [True] * 7))"
    rel = 1e-5 if dtype == torch.float32 else 1e-12
    for level, got in run_at_each_cpu_isa(tmp_path, [go, *args], body):
        for name, g, w in zip(("output",) + NAMES, got, want):
            assert_close_with_nans(g, w, rel, f"{level} {name}")
