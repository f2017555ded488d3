"""Pure-torch implementations of every op.

They define the semantics the compiled kernels are tested against, and serve as the fallback where
no compiled kernel exists for a device (see ``bilateral_ops._library``). They are written for clarity,
not speed: ``bilateral_slice_apply`` here materialises every per-pixel coefficient, and
``bilateral_filter`` every tap of every pixel (H * W * k^2 values, as kornia does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validation import affine_stride

__all__ = ["bilateral_filter", "bilateral_slice", "bilateral_slice_apply", "slice_coordinates"]


def slice_coordinates(guide: torch.Tensor) -> torch.Tensor:
    """The (N, 1, H, W, 3) ``grid_sample`` coordinates (x, y, z) of the grid convention (docs/ops.md).

    ``xn = (2x + 1)/W - 1``, ``yn = (2y + 1)/H - 1``, ``zn = 2 guide - 1``, used with
    ``align_corners=False``, so pixel centres map to grid position ``(x + 0.5) Gw / W``.
    """
    n, h, w = guide.shape
    xs = (2 * torch.arange(w, device=guide.device, dtype=guide.dtype) + 1) / w - 1
    ys = (2 * torch.arange(h, device=guide.device, dtype=guide.dtype) + 1) / h - 1
    xn = xs.view(1, 1, w).expand(n, h, w)
    yn = ys.view(1, h, 1).expand(n, h, w)
    zn = 2 * guide - 1
    return torch.stack([xn, yn, zn], dim=-1).unsqueeze(1)


def bilateral_slice(grid: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
    """Trilinear sample of every grid channel at (x, y, guide): (N,C,D,Gh,Gw), (N,H,W) -> (N,C,H,W)."""
    out = F.grid_sample(
        grid, slice_coordinates(guide), mode="bilinear", padding_mode="border", align_corners=False
    )
    return out[:, :, 0]


def bilateral_slice_apply(
    grid: torch.Tensor, guide: torch.Tensor, input: torch.Tensor, has_offset: bool = True
) -> torch.Tensor:
    """Slice per-pixel affine coefficients and apply them to ``input`` (coefficient order of docs/ops.md)."""
    n, ci, h, w = input.shape
    stride = affine_stride(ci, has_offset)
    co = grid.shape[1] // stride
    coeffs = bilateral_slice(grid, guide).view(n, co, stride, h, w)
    out = (coeffs[:, :, :ci] * input.unsqueeze(1)).sum(dim=2)
    if has_offset:
        out = out + coeffs[:, :, ci]
    return out


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
    n = input.shape[0]
    ky, kx = kernel_size
    py, px = (ky - 1) // 2, (kx - 1) // 2
    if input.numel() == 0:
        return input.clone()

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
    weight = torch.exp(-exponent)
    return (values * weight).sum(-1) / weight.sum(-1)
