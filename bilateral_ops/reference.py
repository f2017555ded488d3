"""Pure-torch implementations of every op.

They define the semantics the compiled kernels are tested against, and serve as the fallback where
no compiled kernel exists for a device (see ``bilateral_ops._library``). They are written for clarity,
not speed: ``bilateral_slice_apply`` here materialises every per-pixel coefficient, ``curve_guide``
every (pixel, curve point) pair.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validation import affine_stride

__all__ = ["bilateral_slice", "bilateral_slice_apply", "curve_guide", "slice_coordinates"]


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
