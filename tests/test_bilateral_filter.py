"""bilateral_filter (and bilateral_blur, joint_bilateral_blur, BilateralBlur, JointBilateralBlur):
against kornia (float32, 1e-5) and the float64 reference (1e-10, gradients included), gradcheck,
opcheck, torch.compile, errors before any kernel, layouts, empty images, determinism, half
precision on the CPU, and OpenCV where its window coincides with ours.

CUDA runs of the same op are in tests/test_cuda.py.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import (
    DEVICES,
    F64,
    OPS,
    assert_close_with_nans,
    assert_same_as_registered,
    deterministic,
    no_kernel_runs,
    noncontiguous,
    requires_x86_64,
    run_at_each_cpu_isa,
)

import bilateral_ops as bo
from bilateral_ops import reference

kornia = pytest.importorskip("kornia")
KF = kornia.filters

BORDERS = ["reflect", "replicate", "constant", "circular"]
DISTANCES = ["l1", "l2"]
# (kernel_size, sigma_color, sigma_space as kornia takes it)
SETTINGS = [(3, 0.1, (3.0, 3.0)), ((5, 3), 0.3, (1.5, 2.0)), (7, 0.5, (2.0, 1.0)), ((1, 5), 0.2, (1.0, 1.5))]
GUIDES = [None, 1, 2]  # None: the input itself; else a guidance of that many channels


def _rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g, dtype=F64).to(dtype)


def _assert_close(got, want, tol, what=""):
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert torch.isfinite(got).all(), what
    err = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    assert err <= tol, f"{what}: max abs err {err:.3e} > {tol:.1e}"


# ----------------------------------------------------------------------------------------------
# kornia


@pytest.mark.parametrize("guide", GUIDES, ids=["self", "g1", "g2"])
@pytest.mark.parametrize("setting", range(len(SETTINGS)))
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("border", BORDERS)
def test_matches_kornia(border, distance, setting, guide):
    ks, sc, ss = SETTINGS[setting]
    x = _rand(2, 3, 19, 26, seed=setting)
    if guide is None:
        got = bo.bilateral_blur(x, ks, sc, ss, border, distance)
        want = KF.bilateral_blur(x, ks, sc, ss, border, distance)
    else:
        g = _rand(2, guide, 19, 26, seed=10 + setting)
        got = bo.joint_bilateral_blur(x, g, ks, sc, ss, border, distance)
        want = KF.joint_bilateral_blur(x, g, ks, sc, ss, border, distance)
    assert got.dtype == torch.float32
    _assert_close(got, want, 1e-5, f"{border} {distance} {ks}")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 1e30], ids=["nan", "inf", "-inf", "huge"])
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("joint", [False, True])
def test_non_finite_inputs_match_kornia(value, distance, joint):
    """NaN, infinite and huge values in the input (or the guidance): NaN and infinite outputs where
    kornia has them (an infinite colour distance is a weight of exactly 0, and 0 * inf is NaN), the
    other pixels as close as ever. Odd sizes and both chunk paths of the vector loops."""
    x = _rand(2, 3, 19, 37, seed=3)
    g = _rand(2, 2, 19, 37, seed=4) if joint else None
    target = g if joint else x
    target[0, 0, 9, 3] = value
    target[1, target.shape[1] - 1, 0, 36] = value
    args = (5, 0.1, (1.5, 2.0), "reflect", distance)
    got = bo.joint_bilateral_blur(x, g, *args) if joint else bo.bilateral_blur(x, *args)
    want = KF.joint_bilateral_blur(x, g, *args) if joint else KF.bilateral_blur(x, *args)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    finite = want.isfinite()
    err = (got[finite] - want[finite]).abs().max().item()
    assert err <= 1e-5 * (1 + want[finite].abs().max().item())


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("joint", [False, True])
def test_tensor_sigmas_match_kornia(distance, joint):
    x = _rand(3, 3, 21, 17)
    g = _rand(3, 2, 21, 17, seed=1) if joint else None
    sc = torch.tensor([0.05, 0.2, 1.0])
    ss = torch.tensor([[1.0, 2.0], [3.0, 0.7], [1.5, 1.5]])
    if joint:
        got = bo.joint_bilateral_blur(x, g, (5, 7), sc, ss, "reflect", distance)
        want = KF.joint_bilateral_blur(x, g, (5, 7), sc, ss, "reflect", distance)
    else:
        got = bo.bilateral_blur(x, (5, 7), sc, ss, "reflect", distance)
        want = KF.bilateral_blur(x, (5, 7), sc, ss, "reflect", distance)
    _assert_close(got, want, 1e-5)
    # A (1,) / (1, 2) tensor broadcasts over the batch, as in kornia.
    got = bo.bilateral_blur(x, 5, sc[:1], ss[:1], "replicate", distance)
    want = KF.bilateral_blur(x, 5, sc[:1], ss[:1], "replicate", distance)
    _assert_close(got, want, 1e-5)


def test_modules_match_kornia():
    x, g = _rand(2, 3, 15, 18), _rand(2, 1, 15, 18, seed=3)
    ours, theirs = bo.BilateralBlur((3, 5), 0.2, (1.5, 2.5), "circular", "l2"), KF.BilateralBlur((3, 5), 0.2, (1.5, 2.5), "circular", "l2")
    _assert_close(ours(x), theirs(x), 1e-5)
    assert repr(ours) == repr(theirs)
    ours, theirs = bo.JointBilateralBlur(5, 0.1, (2.0, 2.0)), KF.JointBilateralBlur(5, 0.1, (2.0, 2.0))
    _assert_close(ours(x, g), theirs(x, g), 1e-5)
    assert repr(ours) == repr(theirs)


def test_casts_like_kornia():
    """A float64 guidance and float64 sigma tensors are cast to the float32 input's dtype."""
    x = _rand(2, 3, 12, 13)
    g = _rand(2, 3, 12, 13, dtype=F64, seed=1)
    sc = torch.tensor([0.2, 0.4], dtype=F64)
    got = bo.joint_bilateral_blur(x, g, 5, sc, (2.0, 2.0))
    assert got.dtype == torch.float32
    _assert_close(got, KF.joint_bilateral_blur(x, g.float(), 5, sc.float(), (2.0, 2.0)), 1e-5)


def test_numpy_scalars_are_numbers():
    import numpy as np

    x = _rand(1, 3, 11, 12)
    want = bo.bilateral_blur(x, 5, 0.2, (1.5, 2.0))
    assert torch.equal(bo.bilateral_blur(x, np.int64(5), np.float32(0.2), (np.float64(1.5), 2)), want)


def test_float_sigma_space_means_both_axes():
    x = _rand(1, 3, 11, 12)
    assert torch.equal(bo.bilateral_blur(x, 5, 0.2, 1.7), bo.bilateral_blur(x, 5, 0.2, (1.7, 1.7)))
    assert torch.equal(bo.bilateral_blur(x, (5, 5), 0.2, 1.7), bo.bilateral_blur(x, 5, 0.2, 1.7))


def test_gradients_match_kornia():
    x = _rand(2, 3, 13, 15).requires_grad_()
    g = _rand(2, 2, 13, 15, seed=2).requires_grad_()
    sc = torch.tensor([0.2, 0.5], requires_grad=True)
    ss = torch.tensor([[1.0, 2.0], [2.5, 1.5]], requires_grad=True)
    go = _rand(2, 3, 13, 15, seed=4) - 0.5
    for joint in (False, True):
        leaves = [x, sc, ss] + ([g] if joint else [])
        ours = bo.bilateral_filter(x, 5, sc, ss, guidance=g if joint else None)
        theirs = KF.joint_bilateral_blur(x, g, 5, sc, ss) if joint else KF.bilateral_blur(x, 5, sc, ss)
        for a, b in zip(torch.autograd.grad(ours, leaves, go), torch.autograd.grad(theirs, leaves, go)):
            _assert_close(a, b, 1e-4 * (1 + b.abs().max().item()))


# ----------------------------------------------------------------------------------------------
# The float64 reference: values and every gradient


def _leaves(n, c, cg, h, w, seed=0):
    x = _rand(n, c, h, w, dtype=F64, seed=seed)
    g = None if cg is None else _rand(n, cg, h, w, dtype=F64, seed=seed + 1)
    sc = 0.1 + _rand(n, dtype=F64, seed=seed + 2)
    ss = 0.5 + 2 * _rand(n, 2, dtype=F64, seed=seed + 3)
    return x, g, sc, ss


@pytest.mark.parametrize("cg", [None, 1, 3], ids=["self", "g1", "g3"])
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("border", BORDERS)
def test_float64_matches_reference_with_gradients(border, distance, cg):
    x, g, sc, ss = _leaves(2, 3, cg, 11, 19)
    ks = (5, 3)
    args = [t.requires_grad_() for t in (x, g, sc, ss) if t is not None]

    def run(fn):
        out = fn(x, g, sc, ss)
        go = torch.linspace(-1, 1, out.numel(), dtype=F64).view(out.shape)
        return out, torch.autograd.grad(out, args, go)

    out, grads = run(lambda x, g, sc, ss: bo.bilateral_filter(x, ks, sc, ss, border, distance, guidance=g))
    ref, ref_grads = run(lambda x, g, sc, ss: reference.bilateral_filter(x, g, ks, sc, ss, border, distance))
    _assert_close(out, ref, 1e-10, "output")
    for name, a, b in zip(["input", "guidance", "sigma_color", "sigma_space"] if g is not None else ["input", "sigma_color", "sigma_space"], grads, ref_grads):
        _assert_close(a, b, 1e-10 * (1 + b.abs().max().item()), name)


def _assert_matches_reference_with_gradients(leaves, ks, border, distance, seed):
    """Output and every gradient (input, guidance, sigmas) of float64 leaves (x, g or None, sc, ss)
    against the reference, for a random grad_output."""
    x, g, sc, ss = leaves
    args = [t.requires_grad_() for t in (x, g, sc, ss) if t is not None]

    def run(fn):
        out = fn(x, g, sc, ss)
        go = _rand(*out.shape, dtype=F64, seed=seed) - 0.5
        return out, torch.autograd.grad(out, args, go)

    out, grads = run(lambda x, g, sc, ss: bo.bilateral_filter(x, ks, sc, ss, border, distance, guidance=g))
    ref, ref_grads = run(lambda x, g, sc, ss: reference.bilateral_filter(x, g, ks, sc, ss, border, distance))
    _assert_close(out, ref, 1e-10, "output")
    for a, b in zip(grads, ref_grads):
        _assert_close(a, b, 1e-10 * (1 + b.abs().max().item()))


@pytest.mark.parametrize(
    "h, ks, border, distance, cg",
    [
        (77, (9, 5), "reflect", "l2", None),
        (90, (15, 3), "circular", "l1", 2),  # bands of 32, 32, 32 and 1 row: the last shorter than py
        (90, (15, 3), "replicate", "l2", None),
        (70, (5, 7), "constant", "l1", 1),
    ],
)
def test_rows_in_several_bands_match_reference_with_gradients(h, ks, border, distance, cg):
    """The CPU kernels sweep pairs of pixels in bands of 32 padded rows: every band boundary (sums
    reaching across it, gradients added from the band above, a last band shorter than the kernel's
    half height) against the float64 reference, every gradient included."""
    _assert_matches_reference_with_gradients(_leaves(2, 3, cg, h, 21, seed=7), ks, border, distance, seed=9)


@pytest.mark.parametrize("cg", [None, 1, 3], ids=["self", "g1", "g3"])
def test_float32_rows_in_several_bands_match_kornia(cg):
    """The float32 kernels specialised for RGB (self, gray and RGB guides) across band boundaries,
    a last band shorter than py included, against kornia, input and guidance gradients too."""
    x = _rand(2, 3, 90, 37).requires_grad_()
    g = None if cg is None else _rand(2, cg, 90, 37, seed=3).requires_grad_()
    go = _rand(2, 3, 90, 37, seed=4) - 0.5
    leaves = [x] + ([g] if g is not None else [])
    ours = bo.bilateral_filter(x, (15, 3), 0.2, (2.0, 1.5), "reflect", "l2", guidance=g)
    theirs = (KF.bilateral_blur(x, (15, 3), 0.2, (2.0, 1.5), "reflect", "l2") if g is None
              else KF.joint_bilateral_blur(x, g, (15, 3), 0.2, (2.0, 1.5), "reflect", "l2"))
    _assert_close(ours, theirs, 1e-5)
    for a, b in zip(torch.autograd.grad(ours, leaves, go), torch.autograd.grad(theirs, leaves, go)):
        _assert_close(a, b, 1e-4 * (1 + b.abs().max().item()))


@pytest.mark.parametrize(
    "h, w, ks, border, distance, cg",
    [
        (4, 5, (41, 45), "replicate", "l1", None),  # a window ~10x the image: pairs restricted to it
        (3, 37, (35, 33), "constant", "l2", 2),
        (30, 26, (33, 35), "reflect", "l1", 1),  # more than 32 x 32 taps: sums in two levels
        (26, 30, (3, 401), "circular", "l2", None),  # a wide window, few rows
    ],
)
def test_large_windows_match_reference_with_gradients(h, w, ks, border, distance, cg):
    """Windows much larger than the image (the CPU kernels sweep only the pairs with an image pixel
    in them) and windows of more than 32 x 32 taps (their sums staged per padded row), every
    gradient included, against the float64 reference."""
    if border == "circular":
        ks = (ks[0], min(ks[1], 2 * w + 1))
    x, g, sc, ss = _leaves(2, 2, cg, h, w, seed=11)
    ss = ss * 10  # weights far from zero across the window
    _assert_matches_reference_with_gradients((x, g, sc, ss), ks, border, distance, seed=12)


@pytest.mark.parametrize("h, w, k, border", [(16, 16, 101, "replicate"), (5, 7, 61, "constant"), (4, 4, 201, "replicate")])
def test_float32_large_windows_stay_within_kornias_tolerance(h, w, k, border):
    """Thousands of taps of nearly equal weights: one running float32 sum per pixel drifted by up to
    4e-5 from the float64 result at k = 101 (7e-5 at 401); the two-level sums stay near 1e-6,
    values and the input gradient, and within 1e-5 of kornia."""
    x = _rand(1, 3, h, w, seed=5).requires_grad_()
    go = _rand(1, 3, h, w, seed=6) - 0.5
    x64 = x.detach().double().requires_grad_()
    out = bo.bilateral_blur(x, k, 0.2, (50.0, 40.0), border)
    out64 = bo.bilateral_blur(x64, k, 0.2, (50.0, 40.0), border)
    _assert_close(out, out64, 5e-6, "output")
    _assert_close(out, KF.bilateral_blur(x.detach(), k, 0.2, (50.0, 40.0), border), 1e-5, "kornia")
    (gx,) = torch.autograd.grad(out, [x], go)
    (gx64,) = torch.autograd.grad(out64, [x64], go.double())
    _assert_close(gx, gx64, 1e-5 * gx64.abs().max().item(), "input gradient")


@pytest.mark.parametrize("cg", [1, 2, 3])
@pytest.mark.parametrize("distance", DISTANCES)
def test_grey_input_with_guidance_matches_kornia(distance, cg):
    """A grey input (a depth map, a mask) guided by a grey, two-channel or RGB image: the CPU's
    float32 kernel for one input channel and any guidance, against kornia, values and the input
    and guidance gradients, across band boundaries."""
    x = _rand(2, 1, 45, 37).requires_grad_()
    g = _rand(2, cg, 45, 37, seed=1).requires_grad_()
    go = _rand(2, 1, 45, 37, seed=2) - 0.5
    ours = bo.joint_bilateral_blur(x, g, (7, 5), 0.2, (2.0, 1.5), "reflect", distance)
    theirs = KF.joint_bilateral_blur(x, g, (7, 5), 0.2, (2.0, 1.5), "reflect", distance)
    _assert_close(ours, theirs, 1e-5)
    for a, b in zip(torch.autograd.grad(ours, [x, g], go), torch.autograd.grad(theirs, [x, g], go)):
        _assert_close(a, b, 1e-4 * (1 + b.abs().max().item()))


@pytest.mark.parametrize("c, cg", [(2, None), (4, None), (2, 3), (1, 1)], ids=["flow", "rgba", "flow-by-rgb", "grey-by-grey"])
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("h, w, ks, border", [(45, 37, (7, 5), "reflect"), (20, 24, (33, 35), "replicate")],
                         ids=["bands", "staged"])
def test_float32_channel_kernels_match_float64_with_gradients(c, cg, distance, h, w, ks, border):
    """The CPU's float32 kernels for two- and four-channel images, a flow field guided by RGB and a
    grey image by a grey one (channel counts fixed at compile time), across band boundaries and
    a batch of two, and with a window of more than 32 x 32 taps (sums in two levels): values
    against kornia, and values and every gradient (input, guidance, both sigmas) against the
    float64 path, which takes the kernels of any channel count."""
    n = 2
    x = _rand(n, c, h, w)
    g = None if cg is None else _rand(n, cg, h, w, seed=1)
    sc = 0.15 + 0.1 * _rand(n, seed=2)
    ss = 1.0 + _rand(n, 2, seed=3)
    go = _rand(n, c, h, w, seed=4) - 0.5

    def run(dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (x, g, sc, ss) if t is not None]
        xx, gg = leaves[0], (leaves[1] if g is not None else None)
        out = bo.bilateral_filter(xx, ks, leaves[-2], leaves[-1], border, distance, guidance=gg)
        return out, torch.autograd.grad(out, leaves, go.to(dtype))

    out, grads = run(torch.float32)
    out64, grads64 = run(torch.float64)
    theirs = (KF.bilateral_blur(x, ks, sc, ss, border, distance) if g is None
              else KF.joint_bilateral_blur(x, g, ks, sc, ss, border, distance))
    _assert_close(out, theirs, 1e-5, "kornia")
    _assert_close(out, out64, 1e-5, "output")
    for a, b in zip(grads, grads64):
        _assert_close(a, b, 1e-4 * (1 + b.abs().max().item()))


@pytest.mark.parametrize("case", ["self", "joint"])
def test_gradcheck(case):
    x, g, sc, ss = _leaves(2, 2, None if case == "self" else 2, 5, 6)
    for border, distance in [("reflect", "l1"), ("constant", "l2"), ("circular", "l1"), ("replicate", "l2")]:
        def fn(x, g, sc, ss, border=border, distance=distance):
            return bo.bilateral_filter(x, (3, 5), sc, ss, border, distance, guidance=g)

        inputs = tuple(t.requires_grad_() if t is not None else None for t in (x, g, sc, ss))
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


def test_masked_gradients_are_not_computed():
    x, g, sc, ss = _leaves(1, 2, 1, 6, 7)
    go = torch.ones(1, 2, 6, 7, dtype=F64)
    args = (go, x, g, [3, 3], sc, ss, "reflect", "l1")
    full = OPS._bilateral_filter_backward(*args, [True, True, True, True])
    for mask in itertools.product([False, True], repeat=4):
        outs = OPS._bilateral_filter_backward(*args, list(mask))
        for wanted, got, want in zip(mask, outs, full):
            if wanted:
                assert torch.equal(got, want)
            else:
                assert got.shape == (0,)
    with pytest.raises(RuntimeError, match="guidance"):
        OPS._bilateral_filter_backward(go, x, None, [3, 3], sc, ss, "reflect", "l1", [True, True, False, False])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cg", [None, 2], ids=["self", "joint"])
def test_eager_autograd_equals_the_registered_one(cg, device):
    # bo.bilateral_filter differentiates eagerly below torch.library's autograd layer: the same op
    # (_bilateral_filter_forward, which saves W) and backward op with the same masks, so the same
    # bits as differentiating torch.ops' op; and within rounding of bilateral_filter's registered
    # formula, whose backward recomputes W and the output.
    x, g, sc, ss = (t if t is None else t.to(device) for t in _leaves(2, 3, cg, 9, 12))
    go = _rand(2, 3, 9, 12, dtype=F64, seed=9).to(device)
    for wanted in itertools.product([False, True], repeat=4):
        if not any(wanted) or (cg is None and wanted[1]):
            continue
        leaves = [t.detach().requires_grad_(w) if t is not None else None for t, w in zip((x, g, sc, ss), wanted)]
        inputs = [t for t, w in zip(leaves, wanted) if w]
        eager = bo.bilateral_filter(leaves[0], (5, 3), leaves[2], leaves[3], "reflect", "l2", guidance=leaves[1])
        args = (leaves[0], leaves[1], [5, 3], leaves[2], leaves[3], "reflect", "l2")
        registered = OPS._bilateral_filter_forward(*args)[0]
        assert_same_as_registered(eager, registered, inputs, go, wanted)
        saved = torch.autograd.grad(OPS._bilateral_filter_forward(*args)[0], inputs, go)
        recomputed = torch.autograd.grad(OPS.bilateral_filter(*args), inputs, go)
        for a, b in zip(saved, recomputed):
            _assert_close(a, b, 1e-12 * (1 + b.abs().max().item()), f"recomputed {wanted}")
    with torch.no_grad():
        assert bo.bilateral_filter(x.requires_grad_(), 3, sc, ss).grad_fn is None


@pytest.mark.parametrize("cg", [None, 2], ids=["self", "joint"])
@pytest.mark.parametrize("border, distance", list(zip(BORDERS, ["l1", "l2", "l2", "l1"])))
def test_forward_op_returns_the_weight_sums(border, distance, cg):
    """_bilateral_filter_forward: bilateral_filter's output, bit for bit, and each pixel's sum of
    weights (the reference's, float64 1e-10; float32 in float32)."""
    x, g, sc, ss = _leaves(2, 3, cg, 13, 17)
    for dtype in (F64, torch.float32):
        args = (x.to(dtype), None if g is None else g.to(dtype), [5, 7], sc.to(dtype), ss.to(dtype), border, distance)
        out, norm = OPS._bilateral_filter_forward(*args)
        assert torch.equal(out, OPS.bilateral_filter(*args))
        assert norm.shape == (2, 13, 17) and norm.dtype == dtype
        want = reference.bilateral_filter_weight_sums(x, g, (5, 7), sc, ss, border, distance)
        _assert_close(norm, want, 1e-10 if dtype == F64 else 1e-5 * want.max().item(), f"{dtype}")
    out, norm = OPS._bilateral_filter_forward(x.half(), None if g is None else g.half(), [3, 3], sc.half(), ss.half(), border, distance)
    assert out.dtype == torch.float16 and norm.dtype == torch.float32


@pytest.mark.parametrize("cg", [None, 1, 3], ids=["self", "g1", "g3"])
@pytest.mark.parametrize("border, distance", list(zip(BORDERS, ["l2", "l1", "l1", "l2"])))
def test_backward_from_saved_weight_sums_matches_recomputing_them(border, distance, cg):
    """Given the forward's output and W, the backward skips the sweep that recomputes them: every
    gradient and output mask within rounding of the backward without them (float64 1e-12),
    float32 within 1e-5; 70 rows, so that pass 2's bands (32 padded rows, each making its own rows
    of g / W and a from the saved tensors) meet at two boundaries."""
    x, g, sc, ss = _leaves(2, 3, cg, 70, 37, seed=4)
    go = _rand(2, 3, 70, 37, dtype=F64, seed=8) - 0.5
    for dtype, tol in ((F64, 1e-12), (torch.float32, 1e-5)):
        args = [t if t is None else t.to(dtype) for t in (x, g)] + [[7, 5], sc.to(dtype), ss.to(dtype), border, distance]
        out, norm = OPS._bilateral_filter_forward(*args)
        for mask in itertools.product([False, True], repeat=4):
            if not any(mask) or (cg is None and mask[1]):
                continue
            want = OPS._bilateral_filter_backward(go.to(dtype), *args, list(mask))
            got = OPS._bilateral_filter_backward(go.to(dtype), *args, list(mask), out, norm)
            for wanted, a, b in zip(mask, got, want):
                if wanted:
                    _assert_close(a, b, tol * (1 + b.abs().max().item()), f"{dtype} {mask}")
                else:
                    assert a.shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_backward_leaves_16_bit_saved_tensors_unused(dtype):
    """A 16-bit output has lost the bits whose cancellation the range and sigma gradients need
    (from the saved bfloat16 output a sigma_color gradient came out 18 % off): the backward checks
    the saved tensors, then recomputes, with the same bits as without them."""
    x, g, sc, ss = _leaves(2, 3, 2, 37, 29, seed=5)
    go = (_rand(2, 3, 37, 29, dtype=F64, seed=9) - 0.5).to(dtype)
    args = [x.to(dtype), g.to(dtype), [9, 7], sc.to(dtype), ss.to(dtype), "reflect", "l1"]
    out, norm = OPS._bilateral_filter_forward(*args)
    assert out.dtype == dtype and norm.dtype == torch.float32
    mask = [True, True, True, True]
    want = OPS._bilateral_filter_backward(go, *args, mask)
    got = OPS._bilateral_filter_backward(go, *args, mask, out, norm)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_autograd_saves_the_weight_sums():
    """A call that records a graph runs _bilateral_filter_forward and keeps its output and W for
    the backward (eager and under torch.compile); one that does not runs bilateral_filter."""
    x, _, sc, ss = _leaves(1, 3, None, 9, 11)
    leaf = x.clone().requires_grad_()
    out = bo.bilateral_blur(leaf, 5, sc, ss)
    saved = out.grad_fn.saved_tensors
    assert len(saved) == 5 and saved[4].shape == (1, 9, 11)  # the inputs, then W
    assert out.grad_fn.out.data_ptr() == out.data_ptr()  # the output, kept (see _saved_forward)
    with torch.no_grad():
        assert torch.equal(bo.bilateral_blur(leaf, 5, sc, ss), out.detach())
    graphs = []

    def backend(gm, inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    compiled = torch.compile(lambda t: bo.bilateral_blur(t, 5, sc, ss), backend=backend, fullgraph=True)
    got = compiled(leaf)
    (a,) = torch.autograd.grad(got, leaf, torch.ones_like(got))
    (b,) = torch.autograd.grad(bo.bilateral_blur(leaf, 5, sc, ss), leaf, torch.ones_like(got))
    assert torch.equal(a, b)
    assert "_bilateral_filter_forward" in graphs[-1]


@pytest.mark.parametrize("cg", [None, 2], ids=["self", "joint"])
def test_output_changed_in_place_before_the_backward(cg):
    """kornia's result may be changed in place before the backward (``out.clamp_(0, 1)``); so may
    ours: the eager backward then recomputes W and the output instead of reading the changed one."""
    x, g, sc, ss = _leaves(2, 3, cg, 10, 13)
    go = _rand(2, 3, 10, 13, dtype=F64, seed=3)
    leaves = [t.clone().requires_grad_() for t in (x, sc) + (() if g is None else (g,))]
    guidance = None if g is None else leaves[2]
    out = bo.bilateral_filter(leaves[0], 5, leaves[1], ss, guidance=guidance)
    out.clamp_(0.3, 0.7)
    got = torch.autograd.grad(out, leaves, go)
    fresh = [t.detach().clone().requires_grad_() for t in leaves]
    want_out = reference.bilateral_filter(fresh[0], None if g is None else fresh[2], (5, 5), fresh[1], ss)
    want = torch.autograd.grad(want_out.clamp(0.3, 0.7), fresh, go)
    for a, b in zip(got, want):
        _assert_close(a, b, 1e-10 * (1 + b.abs().max().item()))


SAVED_ERRORS = [
    ({"output": True}, "together"),
    ({"norm": True}, "together"),
    ({"output": True, "norm": (2, 6, 6)}, "norm"),
    ({"output": True, "norm": "float64"}, "norm"),
    ({"output": (2, 3, 6, 6), "norm": True}, "output"),
]


@pytest.mark.parametrize("case", range(len(SAVED_ERRORS)))
def test_backward_checks_the_saved_tensors(case):
    kw, match = SAVED_ERRORS[case]
    x = _x(2, 3, 6, 7)
    args = (x, None, [3, 3], _x(2) + 0.5, _x(2, 2) + 0.5, "reflect", "l1")
    out, norm = OPS._bilateral_filter_forward(*args)
    for key, value in kw.items():
        if key == "output":
            out = out if value is True else torch.zeros(value)
        else:
            norm = norm if value is True else (norm.double() if value == "float64" else torch.ones(value))
    given = {"output": out if "output" in kw else None, "norm": norm if "norm" in kw else None}
    call = (torch.rand_like(x), *args, [True, False, False, False], given["output"], given["norm"])
    with pytest.raises(RuntimeError, match=match):
        OPS._bilateral_filter_backward(*call)
    with pytest.raises((ValueError, TypeError), match=match):
        _backward_fake_of(*call)


def _backward_fake_of(*call):
    from bilateral_ops.bilateral_filter import _backward_fake

    return _backward_fake(*call)


def test_second_derivatives_raise():
    x, _, sc, ss = _leaves(1, 2, None, 6, 7)
    x.requires_grad_()
    out = bo.bilateral_blur(x, 3, sc, ss)
    (grad,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="_bilateral_filter_backward.*second derivatives"):
        grad.sum().backward()


# ----------------------------------------------------------------------------------------------
# opcheck, torch.compile


@pytest.mark.parametrize("joint", [False, True])
def test_opcheck(joint):
    x, g, sc, ss = _leaves(2, 3, 2 if joint else None, 7, 9)
    args = (x.requires_grad_(), g, [3, 5], sc.requires_grad_(), ss.requires_grad_(), "reflect", "l1")
    torch.library.opcheck(OPS.bilateral_filter, args)
    go = _rand(2, 3, 7, 9, dtype=F64, seed=7)
    mask = [True, joint, True, True]
    torch.library.opcheck(OPS._bilateral_filter_backward, (go, x.detach(), g, [3, 5], sc.detach(), ss.detach(), "circular", "l2", mask))
    torch.library.opcheck(OPS._bilateral_filter_forward, args)
    saved = OPS._bilateral_filter_forward(*(t.detach() if isinstance(t, torch.Tensor) else t for t in args))
    back = (go, x.detach(), g, [3, 5], sc.detach(), ss.detach(), "reflect", "l1", mask, *saved)
    torch.library.opcheck(OPS._bilateral_filter_backward, back)


def test_torch_compile_fullgraph():
    x, g, sc, ss = _leaves(2, 3, 1, 12, 14)

    def fn(x, g, sc, ss):
        return bo.bilateral_filter(x, (3, 5), sc, ss, "reflect", "l2", guidance=g).square().sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    leaves = [t.requires_grad_() for t in (x, g, sc, ss)]
    want = torch.autograd.grad(fn(*leaves), leaves)
    got = torch.autograd.grad(compiled(*leaves), leaves)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    module = torch.compile(bo.BilateralBlur(5, 0.2, (1.5, 1.5)), fullgraph=True, backend="inductor")
    assert torch.equal(module(x.detach()), bo.bilateral_blur(x.detach(), 5, 0.2, (1.5, 1.5)))


@pytest.mark.parametrize("dynamic", [True, None], ids=["dynamic", "automatic"])
def test_torch_compile_fullgraph_float_sigmas_that_change(dynamic):
    # A float sigma that changes between calls (or any float under dynamic=True) reaches the
    # compiled function symbolic; validating it must not break the graph, as kornia's does not.
    x = _leaves(2, 3, 1, 12, 14)[0]

    def fn(x, sc, sy):
        return bo.bilateral_blur(x, 5, sc, (sy, 1.5))

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    for sc, sy in ((0.2, 1.0), (0.35, 2.5), (0.05, 0.7)):
        torch.testing.assert_close(compiled(x, sc, sy), fn(x, sc, sy), rtol=0, atol=0)
    module = torch.compile(bo.BilateralBlur(5, 0.2, (1.5, 1.5)), fullgraph=True, dynamic=dynamic)
    for sc in (0.2, 0.3):
        module.sigma_color = sc
        torch.testing.assert_close(module(x), bo.bilateral_blur(x, 5, sc, (1.5, 1.5)), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Layouts, sizes, dtypes, determinism


def test_noncontiguous_inputs():
    x, g, sc, ss = _leaves(2, 3, 2, 9, 10)
    want = bo.bilateral_filter(x, 3, sc, ss, guidance=g)
    ss_t = ss.T.contiguous().T
    assert not ss_t.is_contiguous()
    got = bo.bilateral_filter(noncontiguous(x), 3, noncontiguous(sc), ss_t, guidance=noncontiguous(g))
    assert torch.equal(got, want)
    channels_last = x.to(memory_format=torch.channels_last)
    assert torch.equal(bo.bilateral_blur(channels_last, 3, sc, ss), bo.bilateral_blur(x, 3, sc, ss))


@pytest.mark.parametrize("hw", [(1, 1), (1, 9), (9, 1), (2, 3), (33, 17)])
@pytest.mark.parametrize("border", ["replicate", "constant", "circular"])
def test_odd_sizes_match_reference(hw, border):
    """Kernels wider than the image (replicate and constant take any padding, circular up to the
    side) and rows shorter than a vector."""
    h, w = hw
    ks = (min(2 * h + 1, 7) if border == "circular" else 7, min(2 * w + 1, 9) if border == "circular" else 9)
    x, g, sc, ss = _leaves(3, 2, 3, h, w)
    for guidance in (None, g):
        got = bo.bilateral_filter(x, ks, sc, ss, border, "l1", guidance=guidance)
        want = reference.bilateral_filter(x, guidance, ks, sc, ss, border, "l1")
        _assert_close(got, want, 1e-10)


@pytest.mark.parametrize("shape", [(0, 3, 5, 5), (2, 0, 5, 5), (2, 3, 0, 5), (2, 3, 5, 0)])
def test_empty_images(shape):
    x = torch.rand(*shape, dtype=F64, requires_grad=True)
    out = bo.bilateral_blur(x, 3, 0.1, (1.0, 1.0))
    assert out.shape == shape
    out.sum().backward()
    assert x.grad.shape == shape and (x.grad == 0).all()


@pytest.mark.parametrize("nhw", [(2, 64, 70), (1, 600, 12), (1, 4, 3000)], ids=["wide", "narrow", "strip"])
def test_deterministic_across_runs_and_threads(nhw, restore_num_threads):
    # The narrow image is one whose transposition would pay at 1 thread and not at 3, had the
    # thread count entered the choice.
    n, h, w = nhw
    x, _g, sc, ss = _leaves(n, 3, None, h, w)
    x = x.float().requires_grad_()
    sc, ss = sc.float().requires_grad_(), ss.float().requires_grad_()
    go = _rand(n, 3, h, w, seed=5)

    def grads():
        out = bo.bilateral_blur(x, 7, sc, ss)
        return (out, *torch.autograd.grad(out, (x, sc, ss), go))

    first = grads()
    with deterministic(True):
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for a, b in zip(grads(), first):
                assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_computed_in_float32(dtype):
    x = _rand(2, 3, 15, 17, dtype=dtype).requires_grad_()
    g = _rand(2, 1, 15, 17, dtype=dtype, seed=1)
    out = bo.joint_bilateral_blur(x, g, 5, 0.25, (2.0, 2.0))
    assert out.dtype == dtype
    x32 = x.detach().float().requires_grad_()
    want = bo.joint_bilateral_blur(x32, g.float(), 5, torch.tensor(0.25, dtype=dtype), (2.0, 2.0))
    assert torch.equal(out, want.to(dtype))
    go = _rand(2, 3, 15, 17, dtype=dtype, seed=2)
    (grad,) = torch.autograd.grad(out, x, go)
    (grad32,) = torch.autograd.grad(want, x32, go.float())
    assert grad.dtype == dtype and torch.equal(grad, grad32.to(dtype))


@pytest.mark.parametrize("cg", [None, 2], ids=["self", "g2"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_range_and_sigma_gradients(dtype, cg):
    """With range terms (self-guided, or the guidance's gradient) and tensor sigmas, every gradient
    of a 16-bit call is the float32 call's on the same values, rounded once: the backward works in
    float32 from no 16-bit intermediate (from the 16-bit output it was up to 28 eps off)."""
    x, g, sc, ss = _leaves(2, 3, cg, 37, 29, seed=6)
    leaves16 = [t.to(dtype).requires_grad_() for t in (x, sc, ss) + (() if g is None else (g,))]
    leaves32 = [t.detach().float().requires_grad_() for t in leaves16]
    go = (_rand(2, 3, 37, 29, dtype=F64, seed=10) - 0.5).to(dtype)

    def grads(leaves, grad_output):
        x, sc, ss, *g = leaves
        out = bo.joint_bilateral_blur(x, g[0], 9, sc, ss) if g else bo.bilateral_blur(x, 9, sc, ss)
        return torch.autograd.grad(out, leaves, grad_output)

    eps = torch.finfo(dtype).eps
    names = ("input", "sigma_color", "sigma_space", "guidance")
    for name, a, b in zip(names, grads(leaves16, go), grads(leaves32, go.float())):
        assert a.dtype == dtype
        _assert_close(a, b, (eps / 2 + 1e-5) * b.abs().max().item(), f"{dtype} {name}")


def test_autocast_runs_in_the_autocast_dtype():
    x = _rand(1, 3, 9, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bo.bilateral_blur(x, 3, 0.2, (1.0, 1.0))
    assert out.dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------
# OpenCV: the same filter on a disc window. With d = 3 OpenCV's window is the 5-tap cross; our
# 3x3 square adds the 4 diagonal taps, whose spatial weight exp(-1 / sigma^2) is negligible for
# sigma = 0.25 (1.1e-7 of the centre), so the two must agree up to OpenCV's own approximations
# (a table of the range exponential).


def test_matches_opencv_where_the_windows_coincide():
    cv2 = pytest.importorskip("cv2")
    import numpy as np

    img = _rand(1, 3, 40, 50, seed=11)
    for sigma_color in (0.1, 0.3):
        want = cv2.bilateralFilter(img[0].permute(1, 2, 0).numpy().copy(), 3, sigma_color, 0.25)
        got = bo.bilateral_blur(img, 3, sigma_color, (0.25, 0.25), "reflect", "l1")[0].permute(1, 2, 0)
        err = np.abs(got.numpy() - want).max()
        assert err < 2e-3, err


# ----------------------------------------------------------------------------------------------
# Errors: before any kernel, naming the argument


def _x(*shape, dtype=torch.float32):
    return torch.rand(*shape, dtype=dtype)


ERRORS = [
    ({"kernel_size": 4}, ValueError, "kernel_size"),
    ({"kernel_size": 0}, ValueError, "kernel_size"),
    ({"kernel_size": -3}, ValueError, "kernel_size"),
    ({"kernel_size": (3, 2)}, ValueError, "kernel_size"),
    ({"kernel_size": (3, 3, 3)}, TypeError, "kernel_size"),
    ({"kernel_size": 3.0}, TypeError, "kernel_size"),
    ({"kernel_size": 13}, ValueError, "kernel_size.*reflect"),  # pad 6 >= 6 rows
    ({"kernel_size": (1, 17), "border_type": "circular"}, ValueError, "kernel_size.*circular"),
    ({"sigma_color": 0.0}, ValueError, "sigma_color"),
    ({"sigma_color": -1.0}, ValueError, "sigma_color"),
    ({"sigma_color": float("nan")}, ValueError, "sigma_color"),
    ({"sigma_color": "0.1"}, TypeError, "sigma_color"),
    ({"sigma_color": torch.tensor([0.1, -0.1])}, ValueError, "sigma_color"),
    ({"sigma_color": torch.tensor([0.1, 0.2, 0.3])}, ValueError, "sigma_color"),
    ({"sigma_color": torch.tensor([1, 2])}, TypeError, "sigma_color"),
    ({"sigma_space": (1.0, 0.0)}, ValueError, "sigma_space"),
    ({"sigma_space": (1.0, 2.0, 3.0)}, TypeError, "sigma_space"),
    ({"sigma_space": torch.tensor([[1.0, 2.0]] * 3)}, ValueError, "sigma_space"),
    ({"sigma_space": torch.tensor([[1.0, 0.0]])}, ValueError, "sigma_space"),
    ({"border_type": "mirror"}, ValueError, "border_type"),
    ({"border_type": None}, TypeError, "border_type"),
    ({"color_distance_type": "l3"}, ValueError, "color_distance_type"),
    ({"input": _x(2, 3, 6)}, ValueError, "input"),
    ({"input": torch.ones(2, 3, 6, 7, dtype=torch.int64)}, TypeError, "input"),
    ({"input": [[1.0]]}, TypeError, "input"),
    ({"guidance": _x(2, 1, 6, 8)}, ValueError, "guidance"),
    ({"guidance": _x(3, 1, 6, 7)}, ValueError, "guidance"),
    ({"guidance": _x(2, 6, 7)}, ValueError, "guidance"),
    ({"guidance": torch.ones(2, 1, 6, 7, dtype=torch.int32)}, TypeError, "guidance"),
    ({"guidance": torch.rand(2, 1, 6, 7, device="meta")}, ValueError, "guidance"),
    ({"sigma_color": torch.ones(2, device="meta")}, ValueError, "sigma_color.*meta"),
    ({"sigma_space": torch.ones(2, 2, device="meta")}, ValueError, "sigma_space.*meta"),
    # More taps than MAX_FILTER_TAPS: refused before a table of that size is allocated.
    ({"kernel_size": (1, 2**31 - 1), "border_type": "constant"}, ValueError, "kernel_size.*taps"),
]


def _call(**kw):
    args = {"input": _x(2, 3, 6, 7), "kernel_size": 3, "sigma_color": 0.1, "sigma_space": (1.0, 1.0)}
    args.update(kw)
    return bo.bilateral_filter(**args)


def test_no_kernel_runs_guard_is_effective(monkeypatch):
    no_kernel_runs(monkeypatch)
    with pytest.raises(AssertionError, match="kernel"):
        _call()


@pytest.mark.parametrize("case", range(len(ERRORS)))
def test_errors(case, monkeypatch):
    kw, exc, match = ERRORS[case]
    no_kernel_runs(monkeypatch)
    with pytest.raises(exc, match=match):
        _call(**kw)


def test_kornia_argument_forms_with_tensors():
    # kornia takes the kernel size as integer tensors and (sigma_y, sigma_x) as a pair of tensors;
    # the pair's gradients flow as a (2,) tensor's would.
    x = _rand(2, 3, 9, 11, seed=4)
    want = bo.bilateral_blur(x, (3, 5), 0.1, (1.5, 0.8))
    got = bo.bilateral_blur(x, (torch.tensor(3), torch.tensor(5)), 0.1, (torch.tensor(1.5), 0.8))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    sy, sx = torch.tensor(1.5, dtype=F64, requires_grad=True), torch.tensor(0.8, dtype=F64, requires_grad=True)
    pair = torch.tensor([1.5, 0.8], dtype=F64, requires_grad=True)
    bo.bilateral_blur(x, 3, 0.1, (sy, sx)).sum().backward()
    bo.bilateral_blur(x, 3, 0.1, pair).sum().backward()
    torch.testing.assert_close(torch.stack([sy.grad, sx.grad]), pair.grad)
    with pytest.raises(TypeError, match="kernel_size"):
        bo.bilateral_blur(x, (torch.tensor(3.0), 3), 0.1, 1.0)
    with pytest.raises(ValueError, match="sigma_space"):
        bo.bilateral_blur(x, 3, 0.1, (torch.ones(2), 1.0))


@pytest.mark.parametrize("module", [bo.BilateralBlur, bo.JointBilateralBlur])
@pytest.mark.parametrize("kernel_size,exc", [(4, ValueError), ((3, 0), ValueError), (3.0, TypeError)])
def test_modules_check_the_kernel_size_when_built(module, kernel_size, exc):
    with pytest.raises(exc, match="kernel_size"):
        module(kernel_size, 0.1, (1.0, 1.0))


def test_joint_needs_a_guidance_tensor():
    with pytest.raises(TypeError, match="guidance"):
        bo.joint_bilateral_blur(_x(1, 1, 5, 5), None, 3, 0.1, (1.0, 1.0))


def _direct(**kw):
    args = {
        "input": _x(2, 3, 6, 7), "guidance": None, "kernel_size": [3, 3], "sigma_color": _x(2), "sigma_space": _x(2, 2),
        "border_type": "reflect", "color_distance_type": "l1",
    }
    args.update(kw)
    return OPS.bilateral_filter(*args.values())


DIRECT_ERRORS = [
    {"kernel_size": [4, 3]},
    {"kernel_size": [3]},
    {"kernel_size": [13, 3]},
    {"kernel_size": [3, 17], "border_type": "circular"},
    {"border_type": "mirror"},
    {"color_distance_type": "l3"},
    {"input": _x(2, 3, 7)},
    {"guidance": _x(2, 1, 6, 8)},
    {"guidance": _x(2, 1, 6, 7, dtype=F64)},
    {"sigma_color": _x(3)},
    {"sigma_space": _x(2, 3)},
    {"sigma_space": _x(2, 2, dtype=F64)},
    {"input": torch.ones(2, 3, 6, 7, dtype=torch.int32)},
    {"kernel_size": [1, 2**31 - 1], "border_type": "constant"},
]


@pytest.mark.parametrize("case", range(len(DIRECT_ERRORS)))
def test_direct_op_calls_check_arguments(case):
    with pytest.raises(RuntimeError):
        _direct(**DIRECT_ERRORS[case])


def test_direct_op_call_accepts_valid_arguments():
    assert _direct().shape == (2, 3, 6, 7)


@requires_x86_64
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_instruction_set_copy_agrees(dtype, tmp_path):
    """The CPU kernels are compiled once per x86-64 level (csrc/cpu/simd.h; the AVX-512 copy runs
    two chunks per pair loop and its own exponential) and a process runs the best its CPU has;
    BILATERAL_OPS_CPU_ISA caps it, so each copy this machine can run is run here, in its own
    process, against this one's: forward and backward, self-guided and joint, an infinite and a
    NaN pixel."""
    x = _rand(2, 3, 29, 45, dtype=dtype, seed=3)
    x[0, 0, 4, 4] = float("inf")  # image 1 stays finite: its sigma gradients are compared too
    x[0, 2, 20, 30] = float("nan")
    gd = _rand(2, 1, 29, 45, dtype=dtype, seed=4)
    go = _rand(2, 3, 29, 45, dtype=dtype, seed=5)
    sc = torch.tensor([0.1, 0.3], dtype=dtype)
    ss = torch.tensor([[2.0, 1.5], [1.0, 3.0]], dtype=dtype)
    body = """
    x, gd, go, sc, ss = inputs
    out = []
    for guidance, dist in ((None, "l1"), (gd, "l2")):
        args = (x, guidance, [7, 5], sc, ss, "reflect", dist)
        out.append(ops.bilateral_filter(*args))
        out.extend(ops._bilateral_filter_backward(go, *args, [True, guidance is not None, True, True]))
    return out
    """
    want = None
    rel = 1e-5 if dtype == torch.float32 else 1e-12
    for level, got in run_at_each_cpu_isa(tmp_path, [x, gd, go, sc, ss], body):
        if want is None:  # the first level is this process's: its result is the reference
            want = got
        assert len(got) == len(want)
        for i, (g, w) in enumerate(zip(got, want)):
            if g.numel() or w.numel():
                assert_close_with_nans(g, w, rel, f"{level} result {i}")


@pytest.mark.parametrize(
    "h, w, ks, border, distance, cg",
    [
        (40, 1, (7, 1), "reflect", "l1", None),
        (37, 3, (9, 5), "replicate", "l2", 2),
        (60, 7, (5, 9), "circular", "l1", 1),
        (70, 5, (3, 11), "constant", "l2", None),
    ],
)
def test_narrow_images_match_reference_with_gradients(h, w, ks, border, distance, cg):
    """Tall narrow images are filtered as their transpose on the CPU (kernel sizes and spatial
    sigmas swapped with the axes; each of these sweeps at most 0.71 of the padded lanes so): values
    and every gradient, the sigma_space gradient's two axes included, against the reference."""
    x, g, sc, ss = _leaves(2, 2, cg, h, w, seed=13)
    _assert_matches_reference_with_gradients((x, g, sc, ss), ks, border, distance, seed=14)


@pytest.mark.parametrize(
    "n, h, w, ks, border, distance, cg",
    [
        (1, 1, 1100, (1, 31), "reflect", "l1", None),  # a one-row signal: 2 segments
        (1, 2, 1700, (3, 9), "replicate", "l2", 2),  # 3 segments
        (2, 3, 1200, (3, 9), "constant", "l1", None),  # a batch of two strips: 2 segments each
        (1, 1, 5000, (1, 31), "reflect", "l2", 3),  # 9 of 8: the last segment's own columns fewer
        (1, 1300, 2, (9, 3), "replicate", "l1", 1),  # a narrow image's transpose, cut in 2
    ],
)
def test_segmented_images_match_reference_with_gradients(n, h, w, ks, border, distance, cg):
    """Images of few bands (one-row signals, strips, a narrow image's transpose) are filtered on
    the CPU as a batch of overlapping column segments, so that more than one thread has work:
    values and every gradient (the overlaps' gradients added, the sigmas' summed over the
    segments) against the float64 reference."""
    _, segments = bo._C.filter_layout(n, h, w, *ks, border)
    assert segments > 1
    x, g, sc, ss = _leaves(n, 2, cg, h, w, seed=17)
    _assert_matches_reference_with_gradients((x, g, sc, ss), ks, border, distance, seed=18)


def test_segmented_images_keep_the_saved_weights():
    """A segmented image's weight sums W are the image's (each taken from its own segment), and
    the backward from them, which cuts them into segments too, equals the one that recomputes
    them. Circular borders read across the image and are not cut."""
    assert bo._C.filter_layout(1, 1, 4000, 1, 31, "reflect") == (False, 7)
    assert bo._C.filter_layout(1, 1, 4000, 1, 31, "circular") == (False, 1)
    assert bo._C.filter_layout(1, 1, 4000, 1, 9, "reflect") == (False, 1)  # too few taps to pay
    assert bo._C.filter_layout(1, 256, 256, 9, 9, "reflect") == (False, 1)
    assert bo._C.filter_layout(1, 4000, 1, 31, 1, "reflect") == (True, 7)
    with pytest.raises(ValueError, match="border_type"):
        bo._C.filter_layout(1, 1, 4000, 1, 31, "wrap")
    x = _rand(2, 3, 2, 1500, dtype=F64, seed=19)
    sc, ss = torch.full((2,), 0.3, dtype=F64), torch.tensor([[1.0, 2.0]] * 2, dtype=F64)
    assert bo._C.filter_layout(2, 2, 1500, 1, 31, "replicate")[1] == 2
    out, norm = OPS._bilateral_filter_forward(x, None, [1, 31], sc, ss, "replicate", "l1")
    assert out.is_contiguous() and norm.is_contiguous() and norm.shape == (2, 2, 1500)
    _assert_close(out, reference.bilateral_filter(x, None, (1, 31), sc, ss, "replicate", "l1"), 1e-12, "output")
    # With a one-row window W away from the left and right edges does not depend on the border:
    # against the circular border's, computed on the image uncut.
    _, norm_uncut = OPS._bilateral_filter_forward(x, None, [1, 31], sc, ss, "circular", "l1")
    _assert_close(norm[..., 15:-15], norm_uncut[..., 15:-15], 1e-12, "W")
    go = _rand(2, 3, 2, 1500, dtype=F64, seed=20)
    args = (go, x, None, [1, 31], sc, ss, "replicate", "l1", [True, False, True, True])
    saved = OPS._bilateral_filter_backward(*args, out, norm)
    again = OPS._bilateral_filter_backward(*args, None, None)
    for a, b in zip(saved, again):
        if b.numel():
            _assert_close(a, b, 1e-12 * (1 + b.abs().max().item()))


def test_narrow_images_keep_the_layout_and_the_saved_weights():
    """The transposed problem's results come back contiguous in the caller's layout, the weight
    sums W too, and the backward from them equals the one that recomputes them."""
    x = _rand(2, 3, 50, 3, dtype=F64, seed=15)
    out, norm = OPS._bilateral_filter_forward(x, None, [5, 3], torch.full((2,), 0.3, dtype=F64),
                                              torch.tensor([[2.0, 1.0]] * 2, dtype=F64), "reflect", "l1")
    assert out.is_contiguous() and norm.is_contiguous() and norm.shape == (2, 50, 3)
    _assert_close(out, bo.bilateral_filter(x, (5, 3), 0.3, (2.0, 1.0)), 0.0, "output")
    go = _rand(2, 3, 50, 3, dtype=F64, seed=16)
    args = (go, x, None, [5, 3], torch.full((2,), 0.3, dtype=F64), torch.tensor([[2.0, 1.0]] * 2, dtype=F64),
            "reflect", "l1", [True, False, True, True])
    saved = OPS._bilateral_filter_backward(*args, out, norm)
    again = OPS._bilateral_filter_backward(*args, None, None)
    for a, b in zip(saved, again):
        if b.numel():
            _assert_close(a, b, 1e-12 * (1 + b.abs().max().item()))
