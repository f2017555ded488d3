"""bilateral_ops.compat.bilagrid against lib_bilagrid's semantics: reference.bilagrid_slice (its
F.grid_sample composition, step by step) in float64 and float32, every call pattern of gsplat,
nerfstudio and BilaRF, BilateralGrid.forward for 2- to 5-D inputs, gradients of grids, rgb (both
paths) and xy, the lazy matrices, total variation, state_dict round trips, compile, errors."""

from __future__ import annotations

import importlib
import math
import types

import pytest
import torch
from torch import nn

from bilateral_ops import reference
from bilateral_ops.compat import bilagrid
from bilateral_ops.compat.bilagrid import BilateralGrid, color_affine_transform, slice, total_variation_loss
from helpers import DEVICES, F64, assert_close_scaled

W601 = torch.tensor([[0.299, 0.587, 0.114]])


def _model(num, gx, gy, gw, dtype, gen, device="cpu", noise=0.3):
    m = BilateralGrid(num, gx, gy, gw).to(dtype=dtype, device=device)
    with torch.no_grad():
        m.grids.add_(noise * torch.randn(m.grids.shape, generator=gen, dtype=F64).to(dtype).to(device))
    return m


def _pixel_centres(n, h, w, dtype):
    """gsplat: ((x + 0.5) / W, (y + 0.5) / H)."""
    ys, xs = torch.meshgrid((torch.arange(h, dtype=dtype) + 0.5) / h, (torch.arange(w, dtype=dtype) + 0.5) / w, indexing="ij")
    return torch.stack([xs, ys], -1).unsqueeze(0).expand(n, h, w, 2)


def _linspace(h, w, dtype):
    """nerfstudio: linspace(0, 1) on both axes."""
    ys, xs = torch.meshgrid(torch.linspace(0, 1, h, dtype=dtype), torch.linspace(0, 1, w, dtype=dtype), indexing="ij")
    return torch.stack([xs, ys], -1).unsqueeze(0)


def _rgb(shape, gen, dtype, lo=-0.1, hi=1.1, exact=True):
    """Colours partly outside [0, 1], some exactly 0 and 1."""
    rgb = torch.rand(shape, generator=gen, dtype=F64) * (hi - lo) + lo
    if exact:
        flat = rgb.view(-1, 3)
        flat[::7] = 0.0
        flat[3::11] = 1.0
    return rgb.to(dtype)


def _patterns(gen, dtype):
    """(name, grids, xy, rgb, grid_idx) of every caller's pattern."""
    out = []
    # gsplat: one image, pixel centres, grid_idx (1, 1); and a batch of 3 images, one grid each.
    out.append(("gsplat_1", (6, 16, 16, 8), _pixel_centres(1, 13, 17, dtype), _rgb((1, 13, 17, 3), gen, dtype), torch.tensor([[4]])))
    out.append(("gsplat_3", (6, 8, 8, 4), _pixel_centres(3, 9, 11, dtype), _rgb((3, 9, 11, 3), gen, dtype), torch.tensor([[5], [0], [2]])))
    out.append(("gsplat_same", (6, 7, 5, 3), _pixel_centres(2, 5, 6, dtype), _rgb((2, 5, 6, 3), gen, dtype), torch.tensor([[1], [1]])))
    # nerfstudio: linspace, a 0-d index.
    out.append(("nerfstudio", (4, 16, 16, 8), _linspace(11, 15, dtype), _rgb((1, 11, 15, 3), gen, dtype), torch.tensor(2)))
    # BilaRF: rays (P, 1, 1, .) with per-ray camera indices, (P, 1, 1, 1) and (P, 1).
    p = 333
    xy = torch.rand(p, 1, 1, 2, generator=gen, dtype=F64).to(dtype)
    out.append(("bilarf_4d", (9, 16, 16, 8), xy, _rgb((p, 1, 1, 3), gen, dtype), torch.randint(0, 9, (p, 1, 1, 1), generator=gen)))
    out.append(("bilarf_2d", (9, 5, 7, 1), xy[:, 0, 0], _rgb((p, 3), gen, dtype), torch.randint(0, 9, (p, 1), generator=gen)))
    # xy outside [0, 1] and exactly on 0 and 1.
    xy = torch.rand(p, 2, generator=gen, dtype=F64) * 1.4 - 0.2
    xy[::5] = 0.0
    xy[1::5] = 1.0
    out.append(("outside", (3, 8, 8, 4), xy.to(dtype), _rgb((p, 3), gen, dtype), torch.randint(0, 3, (p, 1), generator=gen)))
    return out


def _reference(model, xy, rgb, grid_idx):
    return reference.bilagrid_slice(model.grids, xy, rgb, grid_idx, model.rgb2gray_weight)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(7))
def test_slice_float64_matches_lib_bilagrid(case, device, gen):
    name, (num, gx, gy, gw), xy, rgb, idx = _patterns(gen, F64)[case]
    model = _model(num, gx, gy, gw, F64, gen, device)
    xy, rgb, idx = xy.to(device), rgb.to(device), idx.to(device)
    out = slice(model, xy, rgb, idx)
    want_rgb, want_mats = _reference(model, xy, rgb, idx)
    assert set(out) == {"rgb", "rgb_affine_mats"}
    assert out["rgb"].shape == rgb.shape and out["rgb_affine_mats"].shape == rgb.shape[:-1] + (3, 4)
    assert (out["rgb"] - want_rgb).abs().max().item() <= 1e-12, name
    assert (out["rgb_affine_mats"] - want_mats).abs().max().item() <= 1e-12, name


def _knot_free(model, xy, rgb, margin=1e-3):
    """Samples away from knots and borders on every axis (one-sided derivatives agree there)."""
    gw, gh, gx = model.grids.shape[2:]
    gray = (rgb.double() @ model.rgb2gray_weight.double().T)[..., 0]
    ok = torch.ones(rgb.shape[:-1], dtype=torch.bool)
    for u, size in ((xy[..., 0].double(), gx), (xy[..., 1].double(), gh), (gray, gw)):
        if size > 1:
            s = u.cpu() * (size - 1)
            ok &= ((s - s.round()).abs() > margin) & (s > margin) & (s < size - 1 - margin)
    return ok


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(7))
def test_slice_float32_gradients(case, device, gen):
    """float32 against the grid_sample composition: forward within 2e-6, gradients of grids, rgb
    (through the affine map and the guide) and xy within 1e-5 max|g|."""
    name, (num, gx, gy, gw), xy, rgb, idx = _patterns(gen, torch.float32)[case]
    model = _model(num, gx, gy, gw, torch.float32, gen, device)
    ref_model = _model(num, gx, gy, gw, torch.float32, gen, device)
    ref_model.load_state_dict(model.state_dict())
    xy, rgb, idx = xy.to(device), rgb.to(device), idx.to(device)
    ok = _knot_free(model, xy, rgb)
    xy_a, rgb_a = xy.clone().requires_grad_(), rgb.clone().requires_grad_()
    xy_b, rgb_b = xy.clone().requires_grad_(), rgb.clone().requires_grad_()
    out = slice(model, xy_a, rgb_a, idx)["rgb"]
    want, _ = _reference(ref_model, xy_b, rgb_b, idx)
    assert (out - want).abs().max().item() <= 2e-6 * (1 + want.abs().max().item()), name
    go = torch.randn(out.shape, generator=gen).to(device) * ok.to(device).unsqueeze(-1)
    got = torch.autograd.grad(out, (model.grids, xy_a, rgb_a), go)
    wants = torch.autograd.grad(want, (ref_model.grids, xy_b, rgb_b), go)
    for what, a, b in zip(("grids", "xy", "rgb"), got, wants):
        err = (a - b).abs().max().item()
        assert err <= 1e-5 * max(b.abs().max().item(), 1e-30), (name, what, err)


@pytest.mark.parametrize("device", DEVICES)
def test_float64_gradients_match_lib_bilagrid(device, gen):
    name, (num, gx, gy, gw), xy, rgb, idx = _patterns(gen, F64)[4]
    model = _model(num, gx, gy, gw, F64, gen, device)
    xy, rgb, idx = xy.to(device), rgb.to(device), idx.to(device)
    ok = _knot_free(model, xy, rgb, 1e-9).to(device)
    xy_a, rgb_a = xy.clone().requires_grad_(), rgb.clone().requires_grad_()
    out = slice(model, xy_a, rgb_a, idx)
    loss = (out["rgb"] * ok.unsqueeze(-1)).square().sum() + (out["rgb_affine_mats"] * ok[..., None, None]).sum()
    got = torch.autograd.grad(loss, (model.grids, xy_a, rgb_a))
    xy_b, rgb_b = xy.clone().requires_grad_(), rgb.clone().requires_grad_()
    want_rgb, want_mats = _reference(model, xy_b, rgb_b, idx)
    loss = (want_rgb * ok.unsqueeze(-1)).square().sum() + (want_mats * ok[..., None, None]).sum()
    wants = torch.autograd.grad(loss, (model.grids, xy_b, rgb_b))
    for what, a, b in zip(("grids", "xy", "rgb"), got, wants):
        assert_close_scaled(a, b, 1e-12, what)


def test_gradcheck(gen):
    model = _model(3, 5, 4, 3, F64, gen)
    xy = torch.rand(20, 2, generator=gen, dtype=F64)
    rgb = torch.rand(20, 3, generator=gen, dtype=F64) * 0.8 + 0.1
    idx = torch.randint(0, 3, (20, 1), generator=gen)
    keep = _knot_free(model, xy, rgb, 1e-3)
    xy, rgb, idx = xy[keep], rgb[keep], idx[keep]

    def fn(grids, xy_, rgb_):
        return slice(_Shim(grids, model.rgb2gray_weight), xy_, rgb_, idx)["rgb"]

    args = (model.grids.detach().clone().requires_grad_(), xy.requires_grad_(), rgb.requires_grad_())
    assert torch.autograd.gradcheck(fn, args, eps=1e-7, atol=1e-6)


class _Shim:
    """A BilateralGrid whose grids are a given tensor (for gradcheck)."""

    def __init__(self, grids, w):
        self.grids = grids
        self.rgb2gray_weight = w

    _slice_coords = BilateralGrid._slice_coords
    _slice_rgb = BilateralGrid._slice_rgb
    _slice_mats = BilateralGrid._slice_mats


@pytest.mark.parametrize("nd", [2, 3, 4, 5])
def test_forward_matches_lib_bilagrid(nd, gen):
    """BilateralGrid.forward for 2- to 5-D input: the matrices of grid_sample at
    ((xy - 0.5) 2, gray 2 - 1), with idx one grid per leading item (5-D: without idx too)."""
    model = _model(4, 7, 5, 3, F64, gen)
    shape = {2: (4,), 3: (4, 6), 4: (4, 3, 5), 5: (4, 2, 3, 5)}[nd]
    xy = torch.rand(shape + (2,), generator=gen, dtype=F64)
    rgb = _rgb(shape + (3,), gen, F64)
    idx = torch.tensor([3, 1, 1, 0])
    for use_idx in ([True, False] if nd == 5 else [True]):
        got = model(xy, rgb, idx if use_idx else None)
        grids = model.grids[idx] if use_idx else model.grids
        x5, r5 = xy, rgb
        for _ in range(5 - nd):
            x5, r5 = x5.unsqueeze(1), r5.unsqueeze(1)
        xyz = torch.cat([(x5 - 0.5) * 2, model.rgb2gray(r5)], -1)
        want = torch.nn.functional.grid_sample(grids, xyz, align_corners=True, padding_mode="border")
        want = want.permute(0, 2, 3, 4, 1).reshape(*xyz.shape[:-1], 3, 4)
        for _ in range(5 - nd):
            want = want.squeeze(1)
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= 1e-12


def test_identity_initialisation_and_names():
    model = BilateralGrid(3, 5, 4, 2)
    assert model.grids.shape == (3, 12, 2, 4, 5) and model.grids.dtype == torch.float32
    assert (model.grid_width, model.grid_height, model.grid_guidance) == (5, 4, 2)
    assert torch.equal(model.grids[:, :, 1, 2, 3].reshape(3, 3, 4), torch.eye(3, 4).expand(3, 3, 4))
    assert torch.equal(model.rgb2gray_weight, W601)
    assert list(model.state_dict()) == ["grids", "rgb2gray_weight"]
    rgb = torch.rand(10, 3)
    assert torch.allclose(model.rgb2gray(rgb), (rgb @ W601.T) * 2 - 1)
    out = slice(model, torch.rand(10, 2), rgb, torch.tensor(1))
    assert torch.allclose(out["rgb"], rgb, atol=1e-6)  # the identity grids


def test_color_affine_transform(gen):
    a = torch.randn(5, 6, 3, 4, generator=gen, dtype=F64)
    rgb = torch.randn(5, 6, 3, generator=gen, dtype=F64)
    want = torch.einsum("...rc,...c->...r", a[..., :3], rgb) + a[..., 3]
    assert torch.allclose(color_affine_transform(a, rgb), want)


def test_affine_mats_are_lazy(gen, monkeypatch):
    """Reading only "rgb" slices once (the rgb op); the matrices cost a second slice on first
    access and are then kept."""
    model = _model(2, 4, 4, 2, F64, gen)
    calls = []
    mod = importlib.import_module("bilateral_ops.compat.bilagrid")
    real = mod.bilateral_slice_apply_points
    monkeypatch.setattr(mod, "bilateral_slice_apply_points", lambda *a: calls.append(a[-1]) or real(*a))
    out = slice(model, torch.rand(8, 2, dtype=F64), torch.rand(8, 3, dtype=F64), torch.zeros(8, 1, dtype=torch.long))
    _ = out["rgb"]
    assert calls == [True]
    mats = out["rgb_affine_mats"]
    assert out["rgb_affine_mats"] is mats and calls == [True, False]
    assert dict(out).keys() == {"rgb", "rgb_affine_mats"}


def test_unsupported_index_shapes_raise(gen):
    model = _model(3, 4, 4, 2, F64, gen)
    xy, rgb = torch.rand(6, 2, dtype=F64), torch.rand(6, 3, dtype=F64)
    with pytest.raises(ValueError, match="not supported"):
        slice(model, xy, rgb, torch.tensor([0, 1, 2, 0, 1, 2]))
    # One unique index in any shape: that grid for every sample.
    got = slice(model, xy, rgb, torch.full((2, 3), 2))["rgb"]
    assert torch.allclose(got, slice(model, xy, rgb, torch.tensor(2))["rgb"])
    with pytest.raises(ValueError, match="rgb"):
        slice(model, xy, rgb[:, :2], torch.tensor(0))
    with pytest.raises(TypeError, match="grid_idx"):
        slice(model, xy, rgb, torch.tensor(0.0))
    with pytest.raises(ValueError):
        model(xy, rgb)  # 2-D input needs idx
    with pytest.raises(ValueError):
        model(xy[:, None, None, None, None], rgb[:, None, None, None, None], torch.zeros(6, dtype=torch.long))


def test_negative_indices_count_from_the_last_grid(gen):
    # lib_bilagrid reads grids[idx]: -1 is the last grid, as in Python.
    model = _model(3, 4, 4, 2, F64, gen)
    xy, rgb = torch.rand(2, 5, 2, dtype=F64), torch.rand(2, 5, 3, dtype=F64)
    assert torch.equal(slice(model, xy, rgb, torch.tensor(-1))["rgb"], slice(model, xy, rgb, torch.tensor(2))["rgb"])
    got = slice(model, xy, rgb, torch.tensor([[-3], [-1]]))["rgb"]
    assert torch.equal(got, slice(model, xy, rgb, torch.tensor([[0], [2]]))["rgb"])
    assert torch.equal(model(xy, rgb, torch.tensor([-2, 1])), model(xy, rgb, torch.tensor([1, 1])))
    with pytest.raises(ValueError, match="grid_idx"):
        slice(model, xy, rgb, torch.tensor(-4))


def test_fused_bilagrid_calls(gen):
    # fused-bilagrid's slice(bil_grids, None, rgb, idx): the pixel grid nerfstudio builds for
    # lib_bilagrid (linspace(0, 1) along each axis); compute_coords_grad=False stops xy's gradient.
    model = _model(2, 4, 4, 2, F64, gen)
    rgb = torch.rand(1, 6, 9, 3, dtype=F64)
    gy, gx = torch.meshgrid(torch.linspace(0, 1, 6, dtype=F64), torch.linspace(0, 1, 9, dtype=F64), indexing="ij")
    xy = torch.stack([gx, gy], dim=-1)[None]
    idx = torch.tensor([1])
    assert torch.equal(slice(model, None, rgb, idx)["rgb"], slice(model, xy, rgb, idx)["rgb"])
    leaf = xy.clone().requires_grad_()
    slice(model, leaf, rgb, idx, compute_coords_grad=False)["rgb"].sum().backward()
    assert leaf.grad is None and model.grids.grad is not None
    slice(model, leaf, rgb, idx)["rgb"].sum().backward()
    assert leaf.grad is not None
    with pytest.raises(ValueError, match="patch"):
        slice(model, None, rgb, idx, actual_height=6, actual_width=9, patch_offsets=torch.zeros(1, 2))
    with pytest.raises(ValueError, match="xy=None"):
        slice(model, None, rgb[0, 0], idx)


# ----------------------------------------------------------------------------------------------
# Total variation


@pytest.mark.parametrize("shape", [(600, 12, 8, 16, 16), (3, 12, 4, 8, 8), (2, 12, 1, 7, 5), (2, 3, 4, 5), (2, 3, 7), (2, 3), (2, 3, 2, 2, 2, 2)])
def test_total_variation_loss(shape, gen):
    x = torch.randn(shape, generator=gen, dtype=F64, requires_grad=True)
    got = total_variation_loss(x)
    want = reference.grid_tv_loss(x)
    assert abs(got.item() - want.item()) <= 1e-12 * (1 + abs(want.item()))
    if x.dim() < 3:  # no dimension to vary along: 0 (lib_bilagrid returns the float 0.0)
        assert got.item() == 0.0
        return
    g = torch.autograd.grad(got, x)[0]
    w = torch.autograd.grad(want, x)[0]
    assert_close_scaled(g, w, 1e-12, "grad")


def test_total_variation_loss_of_grids_adds_no_autograd_node(gen):
    # 5-D grids go to the fused loss as they are: a reshape to the same shape would add a view
    # node to the graph, host time in every training step (a quarter of a small call's).
    x = torch.randn(2, 12, 2, 3, 4, generator=gen, dtype=F64, requires_grad=True)
    parents = [f for f, _ in total_variation_loss(x).grad_fn.next_functions if f is not None]
    assert [type(f).__name__ for f in parents] == ["AccumulateGrad"] and parents[0].variable is x


def _lib_total_variation_loss(x):
    """lib_bilagrid's loop, as written there (index_select and a float element count)."""
    tv = 0
    for i in range(2, len(x.shape)):
        n = x.shape[i]
        x1 = x.index_select(i, torch.arange(1, n))
        x2 = x.index_select(i, torch.arange(0, n - 1))
        count = max(torch.prod(torch.tensor(x1.size()[1:]).float()).item(), 1.0)
        tv += torch.pow(x1 - x2, 2).sum() / count
    return tv / x.shape[0]


def test_reference_tv_is_lib_bilagrid(gen):
    for shape in ((5, 12, 8, 16, 16), (3, 12, 1, 4, 4), (2, 12, 1, 1, 1)):
        x = torch.randn(shape, generator=gen, dtype=F64)
        assert abs(reference.grid_tv_loss(x).item() - float(_lib_total_variation_loss(x))) <= 1e-12


def test_tv_loss_methods(gen):
    model = _model(5, 4, 4, 2, F64, gen)
    assert torch.equal(model.tv_loss(), total_variation_loss(model.grids))
    sub = model.tv_loss(torch.tensor([1, 3]))
    assert abs(sub.item() - reference.grid_tv_loss(model.grids[[1, 3]]).item()) <= 1e-12
    cfg = types.SimpleNamespace(bilgrid_tv_loss_mult=10.0)
    holder = types.SimpleNamespace(bil_grids=[model, model])
    total = bilagrid.bilateral_grid_tv_loss(holder, cfg)
    assert abs(total.item() - 20.0 * model.tv_loss().item()) <= 1e-10


# ----------------------------------------------------------------------------------------------
# Checkpoints


class _LibBilateralGrid(nn.Module):
    """The parameters and buffers of lib_bilagrid's BilateralGrid (for state_dict round trips)."""

    def __init__(self, num, gx=16, gy=16, gw=8):
        super().__init__()
        self.grids = nn.Parameter(torch.zeros(num, 12, gw, gy, gx))
        self.register_buffer("rgb2gray_weight", torch.Tensor([[0.299, 0.587, 0.114]]))


class _FusedBilateralGrid(nn.Module):
    """fused-bilagrid's BilateralGrid keeps the grids only."""

    def __init__(self, num, gx=16, gy=16, gw=8):
        super().__init__()
        self.grids = nn.Parameter(torch.zeros(num, 12, gw, gy, gx))


def test_state_dict_round_trips(gen):
    ours = _model(4, 16, 16, 8, torch.float32, gen)
    lib = _LibBilateralGrid(4)
    lib.load_state_dict(ours.state_dict())  # ours -> lib_bilagrid, strict
    assert torch.equal(lib.grids, ours.grids)
    back = BilateralGrid(4)
    back.load_state_dict(lib.state_dict())  # lib_bilagrid -> ours, strict
    assert torch.equal(back.grids, ours.grids) and torch.equal(back.rgb2gray_weight, W601)
    fused = _FusedBilateralGrid(4)
    fused.load_state_dict(ours.state_dict(), strict=False)  # ours -> fused-bilagrid
    assert torch.equal(fused.grids, ours.grids)
    again = BilateralGrid(4)
    with torch.no_grad():
        again.rgb2gray_weight.zero_()
    again.load_state_dict(fused.state_dict())  # fused-bilagrid -> ours: the weights filled in
    assert torch.equal(again.grids, ours.grids)
    nested = nn.ModuleDict({"bil": BilateralGrid(4)})
    nested.load_state_dict({"bil.grids": fused.grids.detach()})  # prefixes too
    assert torch.equal(nested["bil"].rgb2gray_weight, W601)


# ----------------------------------------------------------------------------------------------
# torch.compile


def test_compile_fullgraph(gen):
    model = _model(3, 6, 5, 4, torch.float32, gen)
    xy = _pixel_centres(2, 6, 7, torch.float32).contiguous()
    rgb = _rgb((2, 6, 7, 3), gen, torch.float32)
    idx = torch.tensor([[2], [0]])

    def step(rgb_):
        out = slice(model, xy, rgb_, idx)
        return out["rgb"].square().mean() + 0.1 * model.tv_loss()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    r1 = rgb.clone().requires_grad_()
    loss = compiled(r1)
    g1 = torch.autograd.grad(loss, (model.grids, r1))
    r2 = rgb.clone().requires_grad_()
    g2 = torch.autograd.grad(step(r2), (model.grids, r2))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
