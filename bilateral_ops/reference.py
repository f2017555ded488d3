"""Pure-torch implementations of every op.

They define the semantics the compiled kernels are tested against, and serve as the fallback where
no compiled kernel exists for a device (see ``bilateral_ops._library``). They are written for clarity,
not speed: ``bilateral_slice_apply`` here materialises every per-pixel coefficient, ``curve_guide``
every (pixel, curve point) pair and ``bilateral_filter`` every tap of every pixel (H * W * k^2
values, as kornia does).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._validation import affine_stride

__all__ = [
    "bilateral_filter",
    "bilateral_filter_weight_sums",
    "bilateral_grid_filter",
    "bilateral_slice",
    "bilateral_slice_apply",
    "bilateral_slice_apply_points",
    "bilagrid_slice",
    "curve_guide",
    "grid_blur",
    "grid_size_for",
    "grid_splat",
    "grid_tv_loss",
    "slice_coordinates",
]


def slice_coordinates(guide: torch.Tensor, align_corners: bool = False) -> torch.Tensor:
    """The (N, 1, H, W, 3) ``grid_sample`` coordinates (x, y, z) of the grid convention (docs/ops.md).

    ``xn = (2x + 1)/W - 1``, ``yn = (2y + 1)/H - 1``, ``zn = 2 guide - 1``, used with
    ``align_corners=False``, so pixel centres map to grid position ``(x + 0.5) Gw / W``. With
    ``align_corners``: ``xn = 2x/(W - 1) - 1`` (-1 when W = 1, as ``linspace(-1, 1, 1)``),
    likewise y, used with ``align_corners=True``, so pixel x maps to grid index
    ``x (Gw - 1)/(W - 1)`` (0 when W = 1).
    """
    n, h, w = guide.shape
    kw = dict(device=guide.device, dtype=guide.dtype)
    if align_corners:
        xs = 2 * torch.arange(w, **kw) / max(w - 1, 1) - 1
        ys = 2 * torch.arange(h, **kw) / max(h - 1, 1) - 1
    else:
        xs = (2 * torch.arange(w, **kw) + 1) / w - 1
        ys = (2 * torch.arange(h, **kw) + 1) / h - 1
    xn = xs.view(1, 1, w).expand(n, h, w)
    yn = ys.view(1, h, 1).expand(n, h, w)
    zn = 2 * guide - 1
    return torch.stack([xn, yn, zn], dim=-1).unsqueeze(1)


def bilateral_slice(grid: torch.Tensor, guide: torch.Tensor, align_corners: bool = False) -> torch.Tensor:
    """Trilinear sample of every grid channel at (x, y, guide): (N,C,D,Gh,Gw), (N,H,W) -> (N,C,H,W)."""
    out = F.grid_sample(
        grid,
        slice_coordinates(guide, align_corners),
        mode="bilinear",
        padding_mode="border",
        align_corners=align_corners,
    )
    return out[:, :, 0]


def _apply_coefficients(coeffs: torch.Tensor, input: torch.Tensor, has_offset: bool) -> torch.Tensor:
    """out[o] = sum_i coeffs[:, o, i] * input[:, i] + coeffs[:, o, Ci] on (B, Co, stride, ...) and
    (B, Ci, ...)."""
    ci = input.shape[1]
    out = (coeffs[:, :, :ci] * input.unsqueeze(1)).sum(dim=2)
    if has_offset:
        out = out + coeffs[:, :, ci]
    return out


def bilateral_slice_apply(
    grid: torch.Tensor,
    guide: torch.Tensor,
    input: torch.Tensor,
    has_offset: bool = True,
    align_corners: bool = False,
) -> torch.Tensor:
    """Slice per-pixel affine coefficients and apply them to ``input`` (coefficient order of docs/ops.md)."""
    n, ci, h, w = input.shape
    stride = affine_stride(ci, has_offset)
    co = grid.shape[1] // stride
    coeffs = bilateral_slice(grid, guide, align_corners).view(n, co, stride, h, w)
    return _apply_coefficients(coeffs, input, has_offset)


def bilateral_slice_apply_points(
    grid: torch.Tensor,
    coords: torch.Tensor,
    input: torch.Tensor,
    grid_idx: torch.Tensor,
    has_offset: bool = True,
) -> torch.Tensor:
    """The explicit-coordinate slice-apply as lib_bilagrid writes it: copy ``grid[grid_idx]``,
    ``F.grid_sample(..., align_corners=True, padding_mode="border")`` at ``2 coords - 1``, apply.
    (M, C, D, Gh, Gw), (P, 3), (P, Ci), (P,) -> (P, Co)."""
    p, ci = input.shape
    stride = affine_stride(ci, has_offset)
    co = grid.shape[1] // stride
    xyz = (2 * coords - 1).view(p, 1, 1, 1, 3)
    coeffs = F.grid_sample(grid[grid_idx], xyz, mode="bilinear", padding_mode="border", align_corners=True)
    return _apply_coefficients(coeffs.view(p, co, stride), input, has_offset)


def bilagrid_slice(
    grids: torch.Tensor, xy: torch.Tensor, rgb: torch.Tensor, grid_idx: torch.Tensor, rgb2gray_weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """lib_bilagrid's ``slice`` (gsplat / nerfstudio / BilaRF), step by step: one unique index
    slices that grid for every sample, else ``grid_idx[:, 0(, 0, 0)]`` per leading item; the
    grids are copied (``grids[idx]``) and sampled by ``F.grid_sample(..., align_corners=True,
    padding_mode="border")`` at ``((xy - 0.5) 2, (rgb @ w.T) 2 - 1)``; the (..., 3, 4) matrices
    are applied to rgb. Returns (rgb_out (..., 3), affine_mats (..., 3, 4))."""
    sh = rgb.shape
    unique = torch.unique(grid_idx)
    if unique.numel() == 1:
        idx = unique
        xy, rgb_in = xy.unsqueeze(0), rgb.unsqueeze(0)
    else:
        if not 2 <= grid_idx.dim() <= 4:
            raise ValueError("The input to bilateral grid slicing is not supported yet.")
        idx = grid_idx.reshape(grid_idx.shape[0], -1)[:, 0]
        rgb_in = rgb
    nd = xy.dim()
    if not 2 <= nd <= 5:
        raise ValueError("Bilateral grid slicing only takes either 2D, 3D, 4D and 5D inputs")
    for _ in range(5 - nd):
        xy, rgb_in = xy.unsqueeze(1), rgb_in.unsqueeze(1)
    sel = grids[idx]
    gray = (rgb_in @ rgb2gray_weight.T) * 2.0 - 1.0
    xyz = torch.cat([(xy - 0.5) * 2, gray], dim=-1)
    mats = F.grid_sample(sel, xyz, mode="bilinear", align_corners=True, padding_mode="border")
    mats = mats.permute(0, 2, 3, 4, 1)
    mats = mats.reshape(*mats.shape[:-1], 3, 4)
    mats = mats.reshape(*sh[:-1], 3, 4)
    out = (mats[..., :3] @ rgb.unsqueeze(-1)).squeeze(-1) + mats[..., 3]
    return out, mats


def grid_tv_loss(grids: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
    """lib_bilagrid's ``total_variation_loss`` of ``grids`` (or ``grids[idx]``): sum over the
    dimensions d >= 2 of ``sum((x[.., 1:, ..] - x[.., :-1, ..])**2) / max(numel / B, 1) / B``."""
    x = grids if idx is None else grids[idx]
    b = x.shape[0]
    tv = x.new_zeros(())
    for d in range(2, x.dim()):
        diff = x.narrow(d, 1, x.shape[d] - 1) - x.narrow(d, 0, x.shape[d] - 1)
        count = max(math.prod(diff.shape[1:]), 1)
        tv = tv + diff.square().sum() / count
    return tv / b


def _taps(g: torch.Tensor, G: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cells (i0, i1) and tent weights (w0, w1) of positions g on an axis of G cells, clamp-to-edge
    (a NaN position samples the lowest cell, as the kernels do)."""
    s = torch.where(torch.isnan(g), torch.full_like(g, 0.5), g).clamp(0.5, G - 0.5) - 0.5
    i0 = s.detach().floor()
    w1 = s - i0
    i0 = i0.long()
    return i0, (i0 + 1).clamp(max=G - 1), 1 - w1, w1


def grid_splat(input: torch.Tensor, guide: torch.Tensor, grid_size) -> torch.Tensor:
    """The transpose of ``bilateral_slice``, written as eight ``scatter_add_`` (one per corner):
    (N,C,H,W), (N,H,W), (D,Gh,Gw) -> (N,C,D,Gh,Gw)."""
    n, c, h, w = input.shape
    d, gh, gw = (int(s) for s in grid_size)
    kw = dict(device=input.device, dtype=input.dtype)
    xs = (torch.arange(w, **kw) + 0.5) * gw / w
    ys = (torch.arange(h, **kw) + 0.5) * gh / h
    x0, x1, wx0, wx1 = _taps(xs, gw)
    y0, y1, wy0, wy1 = _taps(ys, gh)
    z0, z1, wz0, wz1 = _taps(guide * d, d)
    out = input.new_zeros((n, c, d * gh * gw))
    values = input.reshape(n, c, h * w)
    for zi, wz in ((z0, wz0), (z1, wz1)):
        for yi, wy in ((y0, wy0), (y1, wy1)):
            for xi, wx in ((x0, wx0), (x1, wx1)):
                index = (zi * gh + yi.view(1, h, 1)) * gw + xi.view(1, 1, w)
                weight = wz * wy.view(1, h, 1) * wx.view(1, 1, w)
                out = out.scatter_add(
                    2, index.reshape(n, 1, h * w).expand(n, c, h * w), values * weight.reshape(n, 1, h * w)
                )
    return out.view(n, c, d, gh, gw)


def blur_kernel(sigma: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """grid_blur's taps: exp(-t^2/(2 sigma^2)) for |t| <= ceil(2 sigma), summing to 1."""
    r = math.ceil(2 * sigma)
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    return (k / k.sum()).to(dtype)


def grid_blur(grid: torch.Tensor, sigma) -> torch.Tensor:
    """Separable Gaussian blur of (N,C,D,Gh,Gw) along D, Gh, Gw with zero padding, as three
    ``conv3d``; sigma is one number or three (0 skips an axis)."""
    sigmas = (float(sigma),) * 3 if isinstance(sigma, (int, float)) else tuple(float(s) for s in sigma)
    n, c = grid.shape[:2]
    out = grid.reshape(n * c, 1, *grid.shape[2:])
    for axis, s in enumerate(sigmas):
        if s == 0:
            continue
        k = blur_kernel(s).to(device=grid.device, dtype=grid.dtype)
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = k.numel()
        padding = [0, 0, 0]
        padding[axis] = k.numel() // 2
        out = F.conv3d(out, k.view(shape), padding=padding)
    return out.reshape(grid.shape).clone()


def grid_size_for(height: int, width: int, sigma_color: float, sigma_space: float) -> tuple[int, int, int]:
    """The bilateral grid filter's grid: (ceil(1/sigma_color), ceil(H/sigma_space),
    ceil(W/sigma_space)), each at least 1."""
    return (
        max(1, math.ceil(1 / sigma_color)),
        max(1, math.ceil(height / sigma_space)),
        max(1, math.ceil(width / sigma_space)),
    )


def bilateral_grid_filter(
    input: torch.Tensor, sigma_color: float, sigma_space: float, guide: torch.Tensor | None = None
) -> torch.Tensor:
    """Splat [input, 1], blur one cell, slice, divide by the sliced weight."""
    if guide is None:
        guide = input.mean(1)
    _, c, h, w = input.shape
    size = grid_size_for(h, w, sigma_color, sigma_space)
    homogeneous = torch.cat([input, torch.ones_like(input[:, :1])], dim=1)
    sliced = bilateral_slice(grid_blur(grid_splat(homogeneous, guide, size), 1.0), guide)
    weight = sliced[:, c:].clamp_min(1e-12)
    return sliced[:, :c] / weight


def curve_guide(
    input: torch.Tensor,
    ccm: torch.Tensor,
    ccm_bias: torch.Tensor,
    shifts: torch.Tensor,
    slopes: torch.Tensor,
    mix: torch.Tensor,
    mix_bias: torch.Tensor,
) -> torch.Tensor:
    """HDRNet's guide, as an HDRNet port writes it: (N, C, H, W) -> (N, H, W).

    ``c = ccm @ input + ccm_bias``; ``f_k = sum_j slopes[k, j] relu(c_k - shifts[k, j])``;
    ``clamp(sum_k mix[k] f_k + mix_bias, 0, 1)``. Materialises (N, C, K, H, W).
    """
    c = torch.einsum("ki,nihw->nkhw", ccm, input) + ccm_bias.view(1, -1, 1, 1)
    r = torch.relu(c.unsqueeze(2) - shifts.view(1, *shifts.shape, 1, 1))
    f = (slopes.view(1, *slopes.shape, 1, 1) * r).sum(dim=2)
    return ((mix.view(1, -1, 1, 1) * f).sum(dim=1) + mix_bias).clamp(0, 1)


def bilateral_filter(
    input: torch.Tensor,
    guidance: torch.Tensor | None,
    kernel_size: tuple[int, int],
    sigma_color: torch.Tensor,
    sigma_space: torch.Tensor,
    border_type: str = "reflect",
    color_distance_type: str = "l1",
) -> torch.Tensor:
    """Exact (joint) bilateral filter, kornia's semantics (docs/ops.md): sigma_color (N,),
    sigma_space (N, 2) as (sigma_y, sigma_x), guidance None for the input itself.

    Tap t = (ty, tx) of centre p weighs ``exp(-0.5 D / sigma_color^2 - 0.5 (ty^2 / sy^2 + tx^2 /
    sx^2))`` with D the squared l1 or l2 distance of the guidance; the output is sum(w I) / sum(w).
    """
    if input.numel() == 0:
        return input.clone()
    values, weight = _filter_taps(input, guidance, kernel_size, sigma_color, sigma_space, border_type, color_distance_type)
    return (values * weight).sum(-1) / weight.sum(-1)


def bilateral_filter_weight_sums(
    input: torch.Tensor,
    guidance: torch.Tensor | None,
    kernel_size: tuple[int, int],
    sigma_color: torch.Tensor,
    sigma_space: torch.Tensor,
    border_type: str = "reflect",
    color_distance_type: str = "l1",
) -> torch.Tensor:
    """sum(w) of ``bilateral_filter``'s window of every pixel, (N, H, W): the normaliser the
    forward op ``_bilateral_filter_forward`` returns alongside the output."""
    _, weight = _filter_taps(input, guidance, kernel_size, sigma_color, sigma_space, border_type, color_distance_type)
    return weight.sum(-1)[:, 0]


def _filter_taps(input, guidance, kernel_size, sigma_color, sigma_space, border_type, color_distance_type):
    """The values (N, C, H, W, ky * kx) and weights (N, 1, H, W, ky * kx) of every tap."""
    n = input.shape[0]
    ky, kx = kernel_size
    py, px = (ky - 1) // 2, (kx - 1) // 2

    def taps(t: torch.Tensor) -> torch.Tensor:  # (N, C, H, W, ky * kx)
        padded = F.pad(t, (px, px, py, py), mode=border_type)
        return padded.unfold(2, ky, 1).unfold(3, kx, 1).flatten(-2)

    values = taps(input)
    guide = input if guidance is None else guidance
    delta = (values if guidance is None else taps(guidance)) - guide.unsqueeze(-1)
    if color_distance_type == "l1":
        dist = delta.abs().sum(1, keepdim=True).square()
    else:
        dist = delta.square().sum(1, keepdim=True)
    dt = input.dtype
    ty = torch.arange(ky, device=input.device, dtype=dt) - py
    tx = torch.arange(kx, device=input.device, dtype=dt) - px
    sy, sx = sigma_space[:, 0].view(n, 1, 1), sigma_space[:, 1].view(n, 1, 1)
    space = 0.5 * (ty.view(1, ky, 1) ** 2 / sy**2 + tx.view(1, 1, kx) ** 2 / sx**2)  # (N, ky, kx)
    exponent = 0.5 * dist / sigma_color.view(n, 1, 1, 1, 1) ** 2 + space.view(n, 1, 1, 1, ky * kx)
    return values, torch.exp(-exponent)
