"""bilateral_grid_filter: against the reference composition, its grid-size rule, accuracy against
the exact bilateral filter on a photograph, gradients (through the default guide too), torch.compile,
reduced precision, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import bilateral_ops as bo
from bilateral_ops import reference
from helpers import DEVICES, F64, OPS, assert_close_scaled, make_guide, no_kernel_runs, run_with_grads, t64, tol


def make_case(n, c, h, w, dtype, gen, device="cpu"):
    inp = torch.rand(n, c, h, w, generator=gen, dtype=F64).to(dtype)
    guide = make_guide("smooth", n, h, w, dtype, gen)
    return inp.to(device), guide.to(device)


# (N, C, H, W, sigma_color, sigma_space)
CASES = [
    (1, 3, 37, 53, 0.1, 4.0),
    (2, 1, 64, 40, 0.25, 8.0),
    (1, 2, 5, 7, 0.5, 16.0),  # one cell in x and y
    (1, 3, 30, 300, 0.07, 3.5),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("with_guide", [False, True], ids=["mean_guide", "guide"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_matches_reference(case, with_guide, dtype, device, gen):
    n, c, h, w, sc, ss = case
    inp, guide = make_case(n, c, h, w, dtype, gen, device)
    tensors = (inp, guide) if with_guide else (inp,)

    def ours(x, g=None):
        return bo.bilateral_grid_filter(x, sc, ss, g)

    def ref(x, g=None):
        return reference.bilateral_grid_filter(x, sc, ss, g)

    out, grads, go = run_with_grads(ours, tensors, gen=gen)
    want, want_grads, _ = run_with_grads(ref, tuple(t.double().cpu() for t in tensors), grad_output=go.double().cpu())
    assert out.shape == inp.shape and out.dtype == dtype
    rel = tol(device, dtype) * (1 if dtype == F64 else 10)  # a ratio of two slices
    assert_close_scaled(out, want, rel, "output")
    for i, (a, b) in enumerate(zip(grads, want_grads)):
        assert_close_scaled(a, b, rel * 10, f"grad {i}")


def test_grid_size_rule(gen):
    """D = ceil(1/sigma_color), Gh = ceil(H/sigma_space), Gw = ceil(W/sigma_space), at least 1."""
    assert reference.grid_size_for(1080, 1920, 0.1, 16.0) == (10, 68, 120)
    assert reference.grid_size_for(5, 7, 3.0, 100.0) == (1, 1, 1)
    assert reference.grid_size_for(0, 7, 0.3, 2.0) == (4, 1, 4)
    inp, guide = make_case(1, 2, 45, 61, F64, gen)
    size = (4, 6, 8)  # sigma_color 0.3, sigma_space 8
    homogeneous = torch.cat([inp, torch.ones_like(inp[:, :1])], 1)
    sliced = bo.bilateral_slice(bo.grid_blur(bo.grid_splat(homogeneous, guide, size), 1.0), guide)
    want = sliced[:, :2] / sliced[:, 2:]
    torch.testing.assert_close(bo.bilateral_grid_filter(inp, 0.3, 8, guide), want, rtol=1e-14, atol=1e-14)


def _exact_bilateral(x, guide, sigma_space, sigma_color):
    """The exact counterpart (reflect padding, window 2 ceil(3 sigma_space) + 1, Gaussian range
    weight on the guide), written as a loop over the window's taps."""
    k = 2 * math.ceil(3 * sigma_space) + 1
    r = k // 2
    xp = F.pad(x, (r, r, r, r), mode="reflect")
    gp = F.pad(guide, (r, r, r, r), mode="reflect")
    h, w = x.shape[-2:]
    num, den = torch.zeros_like(x), torch.zeros_like(guide)
    for dy in range(k):
        for dx in range(k):
            ws = math.exp(-((dy - r) ** 2 + (dx - r) ** 2) / (2 * sigma_space**2))
            wt = ws * torch.exp(-0.5 * (gp[..., dy : dy + h, dx : dx + w] - guide) ** 2 / sigma_color**2)
            num += wt * xp[..., dy : dy + h, dx : dx + w]
            den += wt
    return num / den


def _psnr(a, b):
    return 10 * math.log10(1 / ((a - b) ** 2).mean().item())


def test_accuracy_against_the_exact_filter_on_a_photo():
    """On a photograph at 256x256, sigma_space 4, sigma_color 0.1: >= 35 dB from the exact bilateral
    filter (a Gaussian blur of the same sigma_space scores about 20 dB)."""
    data = pytest.importorskip("skimage.data")
    img = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].double() / 255
    img = F.interpolate(img, (256, 256), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    guide = img.mean(1, keepdim=True)
    exact = _exact_bilateral(img, guide, 4.0, 0.1)
    fast = bo.bilateral_grid_filter(img, 0.1, 4.0)
    assert _psnr(fast, exact) >= 35.0
    blur = _exact_bilateral(img, guide, 4.0, 1e6)  # no range weight: a Gaussian blur
    assert _psnr(blur, exact) < 25.0


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device, gen):
    inp, guide = make_case(1, 2, 9, 11, F64, gen, device)
    inp.requires_grad_()
    guide.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: bo.bilateral_grid_filter(x, 0.3, 3.0), (inp,), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(
        lambda x, g: bo.bilateral_grid_filter(x, 0.3, 3.0, g), (inp, guide), eps=1e-6, atol=1e-6
    )


# ----------------------------------------------------------------------------------------------
# The fused ends: each equals its composition of public ops, with exact derivatives


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_fused_ends_match_their_compositions(dtype, device, gen):
    inp, guide = make_case(2, 3, 37, 53, dtype, gen, device)
    size = (6, 5, 7)
    splat = OPS._bilateral_grid_filter_splat(inp, guide, list(size))
    want = bo.grid_splat(torch.cat([inp, torch.ones_like(inp[:, :1])], 1), guide, size)
    assert splat.shape == (2, 4, 6, 5, 7)
    assert_close_scaled(splat, want, tol(device, dtype) * 10, "splat")
    grid = bo.grid_blur(splat, 1.0)
    grid[:, -1, 0] = 0  # some empty cells: the clamp of the weight
    sliced = bo.bilateral_slice(grid, guide)
    want = sliced[:, :3] / sliced[:, 3:].clamp_min(1e-12)
    got = OPS._bilateral_grid_filter_slice(grid, guide)
    assert got.shape == (2, 3, 37, 53)
    assert_close_scaled(got, want, tol(device, dtype) * 10, "slice")


@pytest.mark.parametrize("device", DEVICES)
def test_fused_ends_gradcheck_and_gradgradcheck(device, gen):
    inp, guide = make_case(1, 2, 6, 7, F64, gen, device)
    grid = torch.rand(1, 3, 4, 3, 3, generator=gen, dtype=F64).to(device) + 0.5
    inp.requires_grad_()
    guide.requires_grad_()
    grid.requires_grad_()

    def splat(x, g):
        return OPS._bilateral_grid_filter_splat(x, g, [4, 3, 3])

    # CUDA's default grid gradients add with atomics: a rerun of the backward may differ in the
    # last bits (the deterministic paths are checked bitwise elsewhere).
    nondet = 1e-12 if device == "cuda" else 0.0
    kw = dict(eps=1e-6, atol=1e-5, nondet_tol=nondet)
    assert torch.autograd.gradcheck(splat, (inp, guide), **kw)
    assert torch.autograd.gradgradcheck(splat, (inp, guide), **kw)
    assert torch.autograd.gradcheck(OPS._bilateral_grid_filter_slice, (grid, guide), **kw)
    assert torch.autograd.gradgradcheck(OPS._bilateral_grid_filter_slice, (grid, guide), **kw)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_ends_opcheck(device, gen):
    inp, guide = make_case(2, 3, 6, 7, F64, gen, device)
    grid = torch.rand(2, 4, 5, 3, 4, generator=gen, dtype=F64).to(device)
    torch.library.opcheck(OPS._bilateral_grid_filter_splat, (inp.requires_grad_(), guide.requires_grad_(), [5, 3, 4]))
    torch.library.opcheck(OPS._bilateral_grid_filter_slice, (grid.requires_grad_(), guide))


def test_fused_slice_needs_a_weight_channel():
    with pytest.raises(RuntimeError, match="two channels"):
        OPS._bilateral_grid_filter_slice(t64(1, 1, 2, 3, 4), t64(1, 5, 6))


def test_constant_image_is_a_fixed_point(gen):
    inp = torch.full((1, 3, 40, 50), 0.3, dtype=F64)
    torch.testing.assert_close(bo.bilateral_grid_filter(inp, 0.1, 4.0), inp, rtol=1e-12, atol=1e-12)


def test_compile_fullgraph(gen):
    inp, guide = make_case(1, 3, 24, 31, torch.float32, gen)

    def loss(x, g):
        return (bo.bilateral_grid_filter(x, 0.2, 4.0, g) ** 2).sum() + bo.bilateral_grid_filter(x, 0.2, 4.0).sum()

    one = torch.tensor(1.0)
    eager, eager_grads, _ = run_with_grads(loss, (inp, guide), grad_output=one)
    comp, comp_grads, _ = run_with_grads(torch.compile(loss, fullgraph=True), (inp, guide), grad_output=one)
    torch.testing.assert_close(comp, eager)
    for a, b in zip(comp_grads, eager_grads):
        torch.testing.assert_close(a, b)


def test_compile_fullgraph_dynamic_sigmas(gen):
    # Symbolic sigmas (dynamic=True): the grid's size follows them, and nothing breaks the graph.
    inp, _ = make_case(1, 3, 24, 31, torch.float32, gen)
    compiled = torch.compile(bo.bilateral_grid_filter, fullgraph=True, dynamic=True)
    for sc, ss in ((0.2, 4.0), (0.1, 3.0), (0.3, 7.5)):
        torch.testing.assert_close(compiled(inp, sc, ss), bo.bilateral_grid_filter(inp, sc, ss))


@pytest.mark.parametrize("with_guide", [False, True], ids=["mean_guide", "guide"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_cpu_half_precision(dtype, with_guide, gen):
    """A 16-bit call is the float32 call on the same values, rounded once: result and gradients.
    (With the grids held in 16 bits, each cell rounded on its own, the guide's gradient, which
    cancels between neighbouring cells, was up to 0.3 off at bfloat16.)"""
    inp, guide = make_case(2, 3, 40, 48, F64, gen)
    go = torch.randn(2, 3, 40, 48, generator=gen, dtype=F64).to(dtype)
    leaves16 = [inp.to(dtype).requires_grad_()] + ([guide.to(dtype).requires_grad_()] if with_guide else [])
    leaves32 = [t.detach().float().requires_grad_() for t in leaves16]
    out = bo.bilateral_grid_filter(leaves16[0], 0.1, 4.0, *leaves16[1:])
    want = bo.bilateral_grid_filter(leaves32[0], 0.1, 4.0, *leaves32[1:])
    assert out.dtype == dtype and torch.equal(out, want.to(dtype))
    grads = torch.autograd.grad(out, leaves16, go)
    wants = torch.autograd.grad(want, leaves32, go.float())
    for g, w in zip(grads, wants):
        assert g.dtype == dtype and torch.equal(g, w.to(dtype))


def test_autocast_casts_input_and_guide(gen):
    inp, guide = make_case(1, 3, 20, 30, torch.float32, gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bo.bilateral_grid_filter(inp, 0.1, 4.0, guide)
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("n,h,w", [(2, 0, 5), (0, 4, 6)])
def test_empty_images(n, h, w):
    inp = torch.rand(n, 3, h, w, requires_grad=True)
    out = bo.bilateral_grid_filter(inp, 0.1, 4.0)
    assert out.shape == inp.shape
    out.sum().backward()
    assert inp.grad.shape == inp.shape


ERRORS = [
    ("x", 0.1, 4.0, None, TypeError, "input"),
    (t64(1, 3, 8, 9), "0.1", 4.0, None, TypeError, "sigma_color"),
    (t64(1, 3, 8, 9), 0.1, None, None, TypeError, "sigma_space"),
    (t64(1, 3, 8, 9), 0.0, 4.0, None, ValueError, "sigma_color"),
    (t64(1, 3, 8, 9), 0.1, -4.0, None, ValueError, "sigma_space"),
    (t64(1, 3, 8, 9), math.nan, 4.0, None, ValueError, "sigma_color"),
    (t64(1, 3, 8, 9), 0.1, math.inf, None, ValueError, "sigma_space"),
    (t64(1, 3, 8, 9), True, 4.0, None, TypeError, "sigma_color"),
    (t64(1, 3, 8, 9), 5e-324, 4.0, None, ValueError, "sigma_color.*too small"),  # 1 / sigma: inf
    (t64(1, 3, 8, 9), 0.1, 1e-300, None, ValueError, "sigma_space.*too small"),
    (t64(3, 8, 9), 0.1, 4.0, None, ValueError, "input"),
    (t64(1, 3, 8, 9), 0.1, 4.0, t64(1, 8, 8), ValueError, "guide"),
    (t64(1, 3, 8, 9), 0.1, 4.0, t64(1, 8, 9, dtype=torch.float32), TypeError, "guide"),
    (t64(1, 3, 8, 9), 0.1, 4.0, torch.ones(1, 8, 9, dtype=torch.int64), TypeError, "guide"),
]


@pytest.mark.parametrize("case", range(len(ERRORS)))
def test_errors(case, monkeypatch):
    inp, sc, ss, guide, exc, match = ERRORS[case]
    no_kernel_runs(monkeypatch)
    with pytest.raises(exc, match=match):
        bo.bilateral_grid_filter(inp, sc, ss, guide)
