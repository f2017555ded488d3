"""Peers of the bilateral grid benchmarks: the grid filter written in pure torch as well as torch
allows, and in numba as a Python user would write it by hand. Both follow the same definition as
``bilateral_ops.bilateral_grid_filter`` (docs/ops.md), so their results are compared too."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from bilateral_ops.reference import blur_kernel, grid_size_for, slice_coordinates

# ----------------------------------------------------------------------------------------------
# Pure torch: index_add_ splat (one call per trilinear corner), separable conv3d blur, 5-D
# grid_sample slice. Differentiable for input and guide through autograd.


def _axis(pos: torch.Tensor, size: int):
    s = pos.clamp(0.5, size - 0.5) - 0.5
    i0 = s.detach().floor()
    w1 = s - i0
    i0 = i0.long()
    return i0, (i0 + 1).clamp(max=size - 1), 1 - w1, w1


def torch_splat(values: torch.Tensor, guide: torch.Tensor, size) -> torch.Tensor:
    n, c, h, w = values.shape
    d, gh, gw = size
    kw = dict(device=values.device, dtype=values.dtype)
    x0, x1, wx0, wx1 = _axis((torch.arange(w, **kw) + 0.5) * gw / w, gw)
    y0, y1, wy0, wy1 = _axis((torch.arange(h, **kw) + 0.5) * gh / h, gh)
    z0, z1, wz0, wz1 = _axis(guide * d, d)
    base = (torch.arange(n, device=values.device) * (d * gh * gw)).view(n, 1, 1)
    src = values.permute(0, 2, 3, 1).reshape(n * h * w, c)
    out = values.new_zeros((n * d * gh * gw, c))
    for zi, wz in ((z0, wz0), (z1, wz1)):
        for yi, wy in ((y0, wy0), (y1, wy1)):
            for xi, wx in ((x0, wx0), (x1, wx1)):
                index = base + (zi * gh + yi.view(1, h, 1)) * gw + xi.view(1, 1, w)
                weight = wz * wy.view(1, h, 1) * wx.view(1, 1, w)
                out = out.index_add(0, index.reshape(-1), src * weight.reshape(-1, 1))
    return out.view(n, d, gh, gw, c).permute(0, 4, 1, 2, 3)


def torch_blur(grid: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    n, c = grid.shape[:2]
    k = blur_kernel(sigma).to(device=grid.device, dtype=grid.dtype)
    r = k.numel() // 2
    out = grid.reshape(n * c, 1, *grid.shape[2:])
    out = F.conv3d(out, k.view(1, 1, -1, 1, 1), padding=(r, 0, 0))
    out = F.conv3d(out, k.view(1, 1, 1, -1, 1), padding=(0, r, 0))
    out = F.conv3d(out, k.view(1, 1, 1, 1, -1), padding=(0, 0, r))
    return out.view(grid.shape)


def torch_slice(grid: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
    return F.grid_sample(grid, slice_coordinates(guide), mode="bilinear", padding_mode="border", align_corners=False)[
        :, :, 0
    ]


def torch_grid_filter(x: torch.Tensor, sigma_color: float, sigma_space: float) -> torch.Tensor:
    _, c, h, w = x.shape
    guide = x.mean(1)
    size = grid_size_for(h, w, sigma_color, sigma_space)
    homogeneous = torch.cat([x, torch.ones_like(x[:, :1])], 1)
    sliced = torch_slice(torch_blur(torch_splat(homogeneous, guide, size)), guide)
    return sliced[:, :c] / sliced[:, c:].clamp_min(1e-12)


# ----------------------------------------------------------------------------------------------
# numba, by hand: (H, W, C) float32 images, the homogeneous channel appended inside the splat.
# The splat runs over bands of rows in parallel, each into its own grid, summed afterwards (a
# parallel scatter into one grid would race).

try:
    import numba
    from numba import njit, prange

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - numba is a bench dependency
    HAVE_NUMBA = False

if HAVE_NUMBA:

    @njit(cache=True, inline="always")
    def _taps(g, size):
        s = min(max(g, 0.5), size - 0.5) - 0.5
        i0 = int(math.floor(s))
        w1 = s - i0
        return i0, min(i0 + 1, size - 1), 1.0 - w1, w1

    @njit(parallel=True, cache=True)
    def numba_splat(img, guide, d, gh, gw, bands):
        h, w, c = img.shape
        parts = np.zeros((bands, d, gh, gw, c + 1), dtype=np.float32)
        for b in prange(bands):
            for y in range(h * b // bands, h * (b + 1) // bands):
                y0, y1, wy0, wy1 = _taps((y + 0.5) * gh / h, gh)
                for x in range(w):
                    x0, x1, wx0, wx1 = _taps((x + 0.5) * gw / w, gw)
                    z0, z1, wz0, wz1 = _taps(guide[y, x] * d, d)
                    for zi, wz in ((z0, wz0), (z1, wz1)):
                        for yi, wy in ((y0, wy0), (y1, wy1)):
                            for xi, wx in ((x0, wx0), (x1, wx1)):
                                wt = wz * wy * wx
                                for ch in range(c):
                                    parts[b, zi, yi, xi, ch] += wt * img[y, x, ch]
                                parts[b, zi, yi, xi, c] += wt
        return parts.sum(axis=0)

    @njit(parallel=True, cache=True)
    def numba_blur(grid, k):
        d, gh, gw, c = grid.shape
        r = k.shape[0] // 2
        a = np.zeros_like(grid)
        b = np.zeros_like(grid)
        for z in prange(d):
            for y in range(gh):
                for x in range(gw):
                    for t in range(-r, r + 1):
                        if 0 <= x + t < gw:
                            for ch in range(c):
                                a[z, y, x, ch] += k[t + r] * grid[z, y, x + t, ch]
        for z in prange(d):
            for y in range(gh):
                for t in range(-r, r + 1):
                    if 0 <= y + t < gh:
                        for x in range(gw):
                            for ch in range(c):
                                b[z, y, x, ch] += k[t + r] * a[z, y + t, x, ch]
        a[:] = 0
        for z in prange(d):
            for t in range(-r, r + 1):
                if 0 <= z + t < d:
                    for y in range(gh):
                        for x in range(gw):
                            for ch in range(c):
                                a[z, y, x, ch] += k[t + r] * b[z + t, y, x, ch]
        return a

    @njit(parallel=True, cache=True)
    def numba_slice_normalize(grid, guide):
        d, gh, gw, c1 = grid.shape
        h, w = guide.shape
        out = np.empty((h, w, c1 - 1), dtype=np.float32)
        for y in prange(h):
            y0, y1, wy0, wy1 = _taps((y + 0.5) * gh / h, gh)
            acc = np.empty(c1, dtype=np.float32)
            for x in range(w):
                x0, x1, wx0, wx1 = _taps((x + 0.5) * gw / w, gw)
                z0, z1, wz0, wz1 = _taps(guide[y, x] * d, d)
                acc[:] = 0
                for zi, wz in ((z0, wz0), (z1, wz1)):
                    for yi, wy in ((y0, wy0), (y1, wy1)):
                        for xi, wx in ((x0, wx0), (x1, wx1)):
                            wt = wz * wy * wx
                            for ch in range(c1):
                                acc[ch] += wt * grid[zi, yi, xi, ch]
                for ch in range(c1 - 1):
                    out[y, x, ch] = acc[ch] / max(acc[c1 - 1], 1e-12)
        return out

    def numba_grid_filter(img: np.ndarray, sigma_color: float, sigma_space: float) -> np.ndarray:
        """(H, W, C) float32 -> (H, W, C) float32, guide = channel mean."""
        h, w, _ = img.shape
        d, gh, gw = grid_size_for(h, w, sigma_color, sigma_space)
        guide = img.mean(axis=2)
        grid = numba_splat(img, guide, d, gh, gw, numba.get_num_threads())
        grid = numba_blur(grid, blur_kernel(1.0).numpy().astype(np.float32))
        return numba_slice_normalize(grid, guide)
