"""Deployment: ONNX export of models that use ``bilateral_ops`` (docs/deploy.md).

    python -m bilateral_ops.export --checkpoint C --out model.onnx [--variant V] [--opset K]

Our ops are custom ops: no ONNX exporter knows them. :func:`export_onnx` captures the model with
``torch.export.export`` (the ops' fake kernels make that work with dynamic N, H, W), replaces every
``bilateral_ops`` op by a decomposition written in plain torch operations that every runtime has
(``ExportedProgram.run_decompositions``), then hands the op-free program to ``torch.onnx.export``.
Nothing is registered as a CompositeImplicitAutograd kernel of the ops: eager mode and
``torch.compile`` keep calling the compiled kernels; the decompositions exist only inside
:func:`export_onnx`.

Variants (only the slice ops differ between them; splat, blur, exact filter, curve guide and the
radiance-field grid ops are the same everywhere):

* ``"gather"`` (default, opset 17 to 18 and above): the grid is first interpolated along its
  width (a matmul with the tent matrix of the pixel columns, exact: every column of it holds the
  two tent weights of that pixel and zeros), then every pixel reads its 4 (y, z) corners as rows
  of that table through ``Gather``. No GridSample anywhere: only Gather, MatMul and element-wise
  arithmetic, which onnxruntime, TensorRT, OpenVINO and the phone runtimes all have.
* ``"gridsample5d"``: one 5-D ``GridSample`` per slice, opset 20 and above only (GridSample-20 is
  the first to allow 5-D inputs; torch emits a spec-violating 5-D GridSample-16 below that).
  onnxruntime runs it; TensorRT, OpenVINO and CoreML do not.
* ``"tensorrt"``: the depth slices of the grid stacked as rows of one 2-D image (each slice with a
  replicated border row above and below, so a bilinear tap never reads the neighbouring slice),
  and one 4-D ``GridSample`` (mode "bilinear", opset 17 to 19: TensorRT's parser reads opset-20
  "linear" as nearest) that reads the two depth cells of every pixel; the depth interpolation is
  arithmetic. TensorRT's GridSample is 2-D only and bilinear in (x, y): this is the layout it runs
  natively. Its coordinates go through the runtime's own float unnormalisation, so it agrees with
  eager to about 5e-5 rather than 1e-5.

Grid coordinates (docs/ops.md "Grid coordinates"): pixel i of an axis of n pixels sits at the
continuous cell index ``s = ((2 i + 1) G - n) / (2 n)`` (sample k at index k), computed with an
integer numerator so that it is exact (the naive ``(i + 0.5) G / n - 0.5`` drifts by ~1.4e-5 cells
at 720p), and the guide at ``s = guide D - 0.5``; ``s`` is clamped to ``[0, G - 1]`` (clamp-to-
edge: the same result as the tent with clamped memory indices), NaN mapped to cell 0 before any
index is cast. The convention is one object (:class:`Coordinates`) passed to every slice
decomposition, so that other conventions (``align_corners``, index ``u (S - 1)``) are a new
instance, not new decompositions.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from . import _library as lib
from ._validation import filter_norm_dtype
from . import reference
from .reference import blur_kernel

__all__ = [
    "DEFAULT_OPSET",
    "MIN_OPSET",
    "VARIANTS",
    "Coordinates",
    "check_opset",
    "decompose",
    "decompositions",
    "export_onnx",
    "main",
    "onnx_op_types",
    "onnx_opset",
]

_ops = torch.ops.bilateral_ops

VARIANTS = ("gather", "gridsample5d", "tensorrt")
DEFAULT_OPSET = 18
MIN_OPSET = 17
# The exporter builds every model at opset 18 and converts it; below 17 the conversion of common
# ops fails and leaves the model at 18 without an error, so we refuse those opsets outright.
_OPSETS = {
    "gather": (MIN_OPSET, None),
    "gridsample5d": (20, None),
    "tensorrt": (MIN_OPSET, 19),
}
# The grid filter divides by the sliced weight clamped to this (the kernels' constant).
_MIN_WEIGHT = 1e-12


# ----------------------------------------------------------------------------------------------
# Coordinates


@dataclasses.dataclass(frozen=True)
class Coordinates:
    """Where pixels and guide values land in the grid, as continuous cell indices (sample k at k).

    ``align_corners=False`` is docs/ops.md's convention (``s = (i + 0.5) G / n - 0.5``, written
    with an integer numerator; ``s = guide D - 0.5``). ``align_corners=True`` is lib_bilagrid's
    (``s = u (G - 1)``, with ``u = i / (n - 1)`` for pixels, ``linspace(0, 1, n)`` as
    nerfstudio passes them and as the kernels' ``align_corners=True`` places them, and ``u = guide``
    for depth). Either way ``s`` is clamped to ``[0, G - 1]`` and NaN goes to 0
    before anything is cast to an index.
    """

    align_corners: bool = False

    def pixels(self, n, g, like: torch.Tensor) -> torch.Tensor:
        """(n,) cell indices of the n pixels of an axis of g cells, clamped, in like's dtype."""
        i = torch.arange(n, device=like.device, dtype=torch.int64)
        if self.align_corners:
            # Pixel i of n at index i (g - 1) / (n - 1), index 0 when n = 1 (the kernels'
            # pixel_to_grid): the integer numerator is exact, one rounding in the division.
            s = (i * (g - 1)).to(like.dtype) / torch.sym_max(n - 1, 1)
        else:
            s = ((2 * i + 1) * g - n).to(like.dtype) / (2 * n)
        return _clamp_cells(s, g)

    def depth(self, guide: torch.Tensor, d) -> torch.Tensor:
        """Cell indices along the depth axis of d cells for every guide value, clamped."""
        s = guide * (d - 1) if self.align_corners else guide * d - 0.5
        s = torch.where(torch.isnan(s), torch.zeros_like(s), s)
        return _clamp_cells(s, d)


ALIGN_CORNERS_FALSE = Coordinates(False)


def _clamp_cells(s: torch.Tensor, g) -> torch.Tensor:
    # The upper bound as a tensor: g may be symbolic.
    hi = torch.full((), 1, dtype=s.dtype, device=s.device) * (g - 1)
    return torch.minimum(torch.clamp_min(s, 0.0), hi)


def _taps(s: torch.Tensor, g):
    """Cells i0, i1 = min(i0 + 1, g - 1) (int64) and their weights of clamped positions s."""
    f = torch.floor(s)
    w1 = s - f
    i0 = f.to(torch.int64)
    i1 = torch.clamp(i0 + 1, max=g - 1)
    return i0, i1, 1 - w1, w1


def _tent_matrix(s: torch.Tensor, g) -> torch.Tensor:
    """(g, n) interpolation matrix of n positions s on g cells: max(0, 1 - |k - s|). Each column
    holds the two tent weights of its position (exactly those of :func:`_taps`) and zeros."""
    k = torch.arange(g, device=s.device, dtype=s.dtype).view(-1, 1)
    return torch.relu(1 - torch.abs(k - s.view(1, -1)))


# ----------------------------------------------------------------------------------------------
# Slicing: (N, C, D, Gh, Gw) grid, (N, H, W) guide -> (C, N, H, W) samples. Channel-major: every
# per-pixel weight then broadcasts along the last axes, the fast case of every runtime's Mul
# (a (P, 1) weight against (P, C) rows runs several times slower in onnxruntime).


def _slice_gather(grid: torch.Tensor, guide: torch.Tensor, coords: Coordinates) -> torch.Tensor:
    n, c, d, gh, gw = grid.shape
    _, h, w = guide.shape
    # Interpolate along x first: (N, C, D, Gh, Gw) @ (Gw, W) -> (N, C, D, Gh, W). Exact (the tent
    # matrix holds each pixel's two weights and zeros), and it halves the gathers.
    tx = _tent_matrix(coords.pixels(w, gw, grid), gw)
    rows = torch.matmul(grid, tx).permute(0, 2, 3, 4, 1).reshape(n * d * gh * w, c)
    y0, y1, wy0, wy1 = _taps(coords.pixels(h, gh, grid), gh)
    z0, z1, wz0, wz1 = _taps(coords.depth(guide, d), d)
    xs = torch.arange(w, device=grid.device, dtype=torch.int64).view(1, 1, w)
    base = torch.arange(n, device=grid.device, dtype=torch.int64).view(n, 1, 1) * (d * gh)
    out = None
    for zi, wz in ((z0, wz0), (z1, wz1)):
        for yi, wy in ((y0, wy0), (y1, wy1)):
            index = ((base + zi * gh + yi.view(1, h, 1)) * w + xs).reshape(-1)
            weight = (wz * wy.view(1, h, 1)).reshape(-1, 1)
            # Whole rows (C contiguous values) per pixel: Gather on axis 0 is the fast one
            # (element-wise gathers on the last axis run ~6x slower in onnxruntime).
            term = torch.index_select(rows, 0, index) * weight
            out = term if out is None else out + term
    return out.transpose(0, 1).reshape(c, n, h, w)


def _slice_gridsample5d(grid: torch.Tensor, guide: torch.Tensor, coords: Coordinates) -> torch.Tensor:
    n, _, d, gh, gw = grid.shape
    _, h, w = guide.shape
    # Normalised coordinates of the cell indices for grid_sample(align_corners=False):
    # u = (2 s + 1) / G - 1 (s already clamped, so padding never matters; "border" all the same).
    ux = (2 * coords.pixels(w, gw, grid) + 1) / gw - 1
    uy = (2 * coords.pixels(h, gh, grid) + 1) / gh - 1
    uz = (2 * coords.depth(guide, d) + 1) / d - 1
    xyz = torch.stack(
        [ux.view(1, 1, w).expand(n, h, w), uy.view(1, h, 1).expand(n, h, w), uz], dim=-1
    ).unsqueeze(1)
    out = F.grid_sample(grid, xyz, mode="bilinear", padding_mode="border", align_corners=False)
    return out[:, :, 0].transpose(0, 1)


def _slice_tensorrt(grid: torch.Tensor, guide: torch.Tensor, coords: Coordinates) -> torch.Tensor:
    n, c, d, gh, gw = grid.shape
    _, h, w = guide.shape
    # Every depth slice with a copy of its first and last row around it, stacked as rows of one
    # image: a bilinear tap that strays past a slice's edge reads the edge again (clamp-to-edge),
    # never the neighbouring slice.
    padded = torch.cat([grid[:, :, :, :1], grid, grid[:, :, :, -1:]], dim=3)
    image = padded.reshape(n, c, d * (gh + 2), gw)
    sx = coords.pixels(w, gw, grid)
    sy = coords.pixels(h, gh, grid)
    z0, z1, wz0, wz1 = _taps(coords.depth(guide, d), d)
    rows = d * (gh + 2)
    ux = ((2 * sx + 1) / gw - 1).view(1, 1, 1, w).expand(n, 2, h, w)
    # Row of cell (z, y) in the stacked image: z (Gh + 2) + 1 + y.
    py = torch.stack([z0, z1], dim=1).to(grid.dtype) * (gh + 2) + 1 + sy.view(1, 1, h, 1)
    uy = (2 * py + 1) / rows - 1
    xy = torch.stack([ux, uy], dim=-1).reshape(n, 2 * h, w, 2)
    out = F.grid_sample(image, xy, mode="bilinear", padding_mode="border", align_corners=False)
    out = out.view(n, c, 2, h, w).transpose(0, 1)  # (C, N, 2, H, W)
    return out[:, :, 0] * wz0 + out[:, :, 1] * wz1


_SLICERS: dict[str, Callable] = {
    "gather": _slice_gather,
    "gridsample5d": _slice_gridsample5d,
    "tensorrt": _slice_tensorrt,
}


# ----------------------------------------------------------------------------------------------
# Splat (ScatterND with add, the transpose of the gather slice) and blur (separable convs).


def _splat(values: torch.Tensor, guide: torch.Tensor, size: Sequence[int], coords: Coordinates) -> torch.Tensor:
    """(N, C, H, W) values splatted into (N, C, D, Gh, Gw): the adjoint of the gather slice. The
    four (y, z) corners of every pixel are added into a (C, N D Gh W) table with one
    ``scatter_add`` (ONNX ScatterElements, reduction "add"; not ScatterND, whose onnxruntime
    kernel races on repeated indices), then the x axis is contracted with the transposed tent
    matrix of the pixel columns."""
    n, c, h, w = values.shape
    d, gh, gw = (int(s) for s in size)
    y0, y1, wy0, wy1 = _taps(coords.pixels(h, gh, values), gh)
    z0, z1, wz0, wz1 = _taps(coords.depth(guide, d), d)
    src = values.permute(1, 0, 2, 3).reshape(c, 1, n * h * w)
    xs = torch.arange(w, device=values.device, dtype=torch.int64).view(1, 1, w)
    base = torch.arange(n, device=values.device, dtype=torch.int64).view(n, 1, 1) * (d * gh)
    indices, updates = [], []
    for zi, wz in ((z0, wz0), (z1, wz1)):
        for yi, wy in ((y0, wy0), (y1, wy1)):
            indices.append(((base + zi * gh + yi.view(1, h, 1)) * w + xs).reshape(1, 1, -1))
            updates.append(src * (wz * wy.view(1, h, 1)).reshape(1, 1, -1))
    index = torch.cat(indices, dim=2).expand(c, 1, 4 * n * h * w).reshape(c, -1)
    table = values.new_zeros((c, n * d * gh * w)).scatter_add(1, index, torch.cat(updates, dim=2).reshape(c, -1))
    table = table.view(c, n, d, gh, w).transpose(0, 1)  # (N, C, D, Gh, W)
    tx = _tent_matrix(coords.pixels(w, gw, values), gw)  # (Gw, W)
    return torch.matmul(table, tx.transpose(0, 1))


def _blur(grid: torch.Tensor, sigma: Sequence[float]) -> torch.Tensor:
    """docs/ops.md's blur: per axis with s > 0 the taps exp(-t^2 / (2 s^2)), |t| <= ceil(2 s),
    normalised once, zeros outside the grid; as 2-D convolutions (some runtimes lack 3-D ones)."""
    n, c, d, gh, gw = grid.shape
    out = grid
    for axis, s in enumerate(float(x) for x in sigma):
        if s == 0:
            continue
        k = blur_kernel(s, grid.dtype).to(grid.device)
        r = (k.numel() - 1) // 2
        if axis == 0:
            x = out.reshape(n * c, 1, d, gh * gw)
            x = F.conv2d(x, k.view(1, 1, -1, 1), padding=(r, 0))
        elif axis == 1:
            x = out.reshape(n * c * d, 1, gh, gw)
            x = F.conv2d(x, k.view(1, 1, -1, 1), padding=(r, 0))
        else:
            x = out.reshape(n * c * d, 1, gh, gw)
            x = F.conv2d(x, k.view(1, 1, 1, -1), padding=(0, r))
        out = x.reshape(n, c, d, gh, gw)
    return out


# ----------------------------------------------------------------------------------------------
# The exact filter: padding per border type, then one shifted slice of the padded image per tap.


def _pad(x: torch.Tensor, py: int, px: int, border_type: str) -> torch.Tensor:
    if py == 0 and px == 0:
        return x
    if border_type == "constant":
        return F.pad(x, (px, px, py, py))
    if border_type == "circular":
        if py:
            x = torch.cat([x[:, :, -py:], x, x[:, :, :py]], dim=2)
        if px:
            x = torch.cat([x[:, :, :, -px:], x, x[:, :, :, :px]], dim=3)
        return x
    # reflect (without the edge) -> ONNX Pad "reflect"; replicate -> Pad "edge".
    return F.pad(x, (px, px, py, py), mode=border_type)


def _shift(x: torch.Tensor, dy: int, dx: int, ky: int, kx: int) -> torch.Tensor:
    """The window of tap (dy, dx) of a padded image: constant (negative) slice bounds, so that the
    exported Slice needs no shape arithmetic."""
    ey, ex = dy - (ky - 1), dx - (kx - 1)
    return x[:, :, dy : ey if ey < 0 else None, dx : ex if ex < 0 else None]


def _bilateral_filter_sums(input, guidance, kernel_size, sigma_color, sigma_space, border_type, color_distance_type):
    """The filter's output and its (N, 1, H, W) weight sums."""
    n = input.shape[0]
    ky, kx = (int(k) for k in kernel_size)
    py, px = (ky - 1) // 2, (kx - 1) // 2
    guide = input if guidance is None else guidance
    padded = _pad(input, py, px, border_type)
    padded_guide = padded if guidance is None else _pad(guidance, py, px, border_type)
    neg_inv_c = (-0.5 / sigma_color**2).view(n, 1, 1, 1)
    # The spatial exponent of every tap at once, (N, ky * kx, 1, 1): one slice per tap below.
    ty = (torch.arange(ky, device=input.device, dtype=input.dtype) - py).view(1, ky, 1)
    tx = (torch.arange(kx, device=input.device, dtype=input.dtype) - px).view(1, 1, kx)
    sy, sx = sigma_space[:, 0].view(n, 1, 1), sigma_space[:, 1].view(n, 1, 1)
    space = (0.5 * (ty * ty / (sy * sy) + tx * tx / (sx * sx))).reshape(n, ky * kx, 1, 1)
    num = den = None
    for dy in range(ky):
        for dx in range(kx):
            t = dy * kx + dx
            v = _shift(padded, dy, dx, ky, kx)
            delta = (v if guidance is None else _shift(padded_guide, dy, dx, ky, kx)) - guide
            if color_distance_type == "l1":
                dist = delta.abs().sum(1, keepdim=True).square()
            else:
                dist = delta.square().sum(1, keepdim=True)
            weight = torch.exp(dist * neg_inv_c - space[:, t : t + 1])
            num = v * weight if num is None else num + v * weight
            den = weight if den is None else den + weight
    return num / den, den


def _bilateral_filter(*args):
    return _bilateral_filter_sums(*args)[0]


def _bilateral_filter_forward(*args):
    """The filter and its weight sums W (what autograd's traced path runs)."""
    out, den = _bilateral_filter_sums(*args)
    return out, den[:, 0].to(filter_norm_dtype(out.dtype))


# ----------------------------------------------------------------------------------------------
# The decompositions, per op


def _curve_guide(input, ccm, ccm_bias, shifts, slopes, mix, mix_bias):
    """The formula, one (N, H, W) plane and one curve point at a time with scalar weights (C and K
    are small; scalars are the fastest broadcast of every runtime): no (N, C, K, H, W)
    intermediate, and no per-channel (1, C, 1, 1) broadcast."""
    c, k = shifts.shape
    x = [input[:, i] for i in range(c)]
    g = None
    for ch in range(c):
        cc = None
        for i in range(c):
            t = x[i] * ccm[ch, i]
            cc = t if cc is None else cc + t
        cc = cc + ccm_bias[ch]
        f = None
        for j in range(k):
            t = torch.relu(cc - shifts[ch, j]) * slopes[ch, j]
            f = t if f is None else f + t
        t = f * mix[ch]
        g = t if g is None else g + t
    return torch.clamp(g + mix_bias, 0.0, 1.0)


# ----------------------------------------------------------------------------------------------
# Radiance-field grids: explicit sample coordinates, a grid per sample, the TV loss. The same in
# every variant (a sample's eight corners are rows of the channels-last grids: Gather).


def _slice_points(grid, coords, input, grid_idx, has_offset=True):
    """bilateral_slice_apply_points: lib_bilagrid's sampling (index ``u (S - 1)`` on every axis,
    clamped, NaN at cell 0), each sample reading the eight corners of its own grid as rows of the
    (M D Gh Gw, C) channels-last table, then the affine map."""
    m, c, d, gh, gw = grid.shape
    ci = input.shape[1]
    rows = grid.permute(0, 2, 3, 4, 1).reshape(m * d * gh * gw, c)

    def taps(u, g):
        # Every axis maps as the guide does under align_corners=True (u (g - 1), NaN to 0, which
        # also catches inf * 0 on a size-1 axis, clamped).
        return _taps(Coordinates(True).depth(u, g), g)

    x0, x1, wx0, wx1 = taps(coords[:, 0], gw)
    y0, y1, wy0, wy1 = taps(coords[:, 1], gh)
    z0, z1, wz0, wz1 = taps(coords[:, 2], d)
    base = grid_idx.to(torch.int64) * d
    out = None
    for zi, wz in ((z0, wz0), (z1, wz1)):
        for yi, wy in ((y0, wy0), (y1, wy1)):
            row = ((base + zi) * gh + yi) * gw
            wzy = wz * wy
            for xi, wx in ((x0, wx0), (x1, wx1)):
                term = torch.index_select(rows, 0, row + xi) * (wzy * wx).unsqueeze(1)
                out = term if out is None else out + term
    stride = ci + 1 if has_offset else ci
    coeffs = out.reshape(-1, c // stride, stride)
    result = (coeffs[:, :, :ci] * input.unsqueeze(1)).sum(-1)
    if has_offset:
        result = result + coeffs[:, :, ci]
    return result


def _grid_tv_loss(grids, idx=None):
    """grid_tv_loss: lib_bilagrid's total variation (the reference formula: Slice, Sub, Pow,
    ReduceSum), of the grids indexed by idx (Gather) when given. Summed in float64, as the
    kernels do: a float32 ReduceSum over 600 grids is off by ~4e-4 relative."""
    x = grids if idx is None else torch.index_select(grids, 0, idx)
    return reference.grid_tv_loss(x.to(torch.float64)).to(grids.dtype)


def decompositions(variant: str = "gather", coords: Coordinates = ALIGN_CORNERS_FALSE) -> dict:
    """``{op overload: pure-torch decomposition}`` for every op of an inference graph: the public
    ops and the grid filter's fused ends. ``variant`` picks how the slice ops read the grid;
    ``coords`` is the coordinate convention of the ops that take none of their own (the splat
    and the grid filter). The slice decompositions already take an ``align_corners`` argument
    (default False), so that ops whose schema gains it keep working unchanged."""
    if variant not in _SLICERS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    slicer = _SLICERS[variant]

    def convention(align_corners) -> Coordinates:
        return coords if align_corners is None else Coordinates(bool(align_corners))

    def bilateral_slice(grid, guide, align_corners=None):
        return slicer(grid, guide, convention(align_corners)).transpose(0, 1).contiguous()

    def bilateral_slice_apply(grid, guide, input, has_offset=True, align_corners=None):
        n, ci, h, w = input.shape
        stride = ci + 1 if has_offset else ci
        co = grid.shape[1] // stride
        coeffs = slicer(grid, guide, convention(align_corners)).reshape(co, stride, n, h, w)
        x = input.transpose(0, 1).unsqueeze(0)  # (1, Ci, N, H, W)
        out = (coeffs[:, :ci] * x).sum(1)
        if has_offset:
            out = out + coeffs[:, ci]
        return out.transpose(0, 1).contiguous()

    def grid_splat(input, guide, grid_size):
        return _splat(input, guide, grid_size, coords)

    def grid_blur(grid, sigma):
        return _blur(grid, sigma)

    def grid_filter_splat(input, guide, grid_size):
        homogeneous = torch.cat([input, torch.ones_like(input[:, :1])], dim=1)
        return _splat(homogeneous, guide, grid_size, coords)

    def grid_filter_slice(grid, guide):
        s = slicer(grid, guide, coords)  # (C, N, H, W)
        values, weight = s[:-1], s[-1:]
        if values.dtype not in (torch.float32, torch.float64):
            values, weight = values.float(), weight.float()
        out = values / torch.clamp_min(weight, _MIN_WEIGHT)
        return out.to(grid.dtype).transpose(0, 1).contiguous()

    def curve_guide(input, ccm, ccm_bias, shifts, slopes, mix, mix_bias):
        return _curve_guide(input, ccm, ccm_bias, shifts, slopes, mix, mix_bias)

    return {
        _ops.bilateral_slice.default: bilateral_slice,
        _ops.bilateral_slice_apply.default: bilateral_slice_apply,
        _ops.grid_splat.default: grid_splat,
        _ops.grid_blur.default: grid_blur,
        _ops._bilateral_grid_filter_splat.default: grid_filter_splat,
        _ops._bilateral_grid_filter_slice.default: grid_filter_slice,
        _ops.bilateral_filter.default: _bilateral_filter,
        _ops._bilateral_filter_forward.default: _bilateral_filter_forward,
        _ops.curve_guide.default: curve_guide,
        _ops.bilateral_slice_apply_points.default: _slice_points,
        _ops.grid_tv_loss.default: _grid_tv_loss,
    }


# ----------------------------------------------------------------------------------------------
# export_onnx


def _require(*modules: str) -> None:
    """ImportError naming the missing optional dependencies and the extra that installs them."""
    import importlib.util

    missing = []
    for m in modules:
        try:
            found = importlib.util.find_spec(m) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(m)
    if missing:
        raise ImportError(
            f"bilateral_ops.export needs {', '.join(missing)}: pip install 'bilateral_ops[export]' "
            "(onnx, onnxscript, onnxruntime at the tested versions)"
        )


def check_opset(variant: str, opset: int) -> None:
    """Raise ValueError unless ``variant`` can be exported at ``opset``."""
    if variant not in _OPSETS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise TypeError(f"opset must be an int, got {opset!r}")
    if opset < MIN_OPSET:
        raise ValueError(
            f"opset {opset} is not supported: bilateral_ops exports at opset {MIN_OPSET} or newer "
            f"(torch's exporter builds at 18 and its down-conversion below {MIN_OPSET} fails "
            "silently, leaving the model at 18)"
        )
    lo, hi = _OPSETS[variant]
    if opset < lo:
        raise ValueError(
            f"variant {variant!r} needs opset {lo} or newer (5-D GridSample exists only from "
            f"GridSample-20; torch emits a spec-violating 5-D GridSample-16 below that), got "
            f"opset {opset}; use variant 'gather' for older opsets"
        )
    if hi is not None and opset > hi:
        raise ValueError(
            f"variant {variant!r} needs opset {hi} or older (GridSample-20's mode 'linear' is read "
            f"as nearest by TensorRT's parser; GridSample-16 mode 'bilinear' is not), got opset {opset}"
        )


def _leftover_ops(ep: torch.export.ExportedProgram) -> list[str]:
    found = []
    for module in ep.graph_module.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in module.graph.nodes:
            t = node.target
            if node.op == "call_function" and isinstance(t, torch._ops.OpOverload) and t.namespace == lib.NAMESPACE:
                found.append(t.name())
    return sorted(set(found))


def decompose(ep: torch.export.ExportedProgram, variant: str = "gather", coords: Coordinates = ALIGN_CORNERS_FALSE):
    """``ep`` with every ``bilateral_ops`` op replaced by its decomposition for ``variant``.

    Raises ValueError if a ``bilateral_ops`` op without a decomposition remains (a backward op:
    export an inference graph)."""
    out = ep.run_decompositions(decompositions(variant, coords))
    left = _leftover_ops(out)
    if left:
        raise ValueError(
            f"no ONNX decomposition for {', '.join(left)}: export_onnx covers inference graphs "
            "(the public ops and the grid filter's fused ends); export the model in eval mode "
            "without autograd"
        )
    return out


def export_onnx(
    model: torch.nn.Module,
    args: tuple,
    f: str | os.PathLike | None = None,
    opset: int = DEFAULT_OPSET,
    variant: str = "gather",
    dynamic_shapes=None,
    *,
    kwargs: dict | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    optimize: bool = True,
    verbose: bool = False,
):
    """Export a model that uses ``bilateral_ops`` to ONNX.

    ``torch.export.export(model, args, dynamic_shapes=...)`` → ``run_decompositions`` with the
    decompositions of ``variant`` → ``torch.onnx.export(ep, opset_version=opset)``.

    Args:
        model: an ``nn.Module`` (put it in eval mode first).
        args: example inputs, a tuple.
        f: where to save the ``.onnx`` file (weights inside it), or None to only return it.
        opset: ONNX opset, 17 or newer (variant ``"gridsample5d"``: 20 or newer; ``"tensorrt"``:
            17 to 19).
        variant: ``"gather"`` (default), ``"gridsample5d"`` or ``"tensorrt"`` (module docstring).
        dynamic_shapes: as for ``torch.export.export`` (e.g. ``{"x": {0: Dim("N"), 2: Dim("H"),
            3: Dim("W")}}``); None exports static shapes.
        kwargs, input_names, output_names, optimize, verbose: passed on.

    Returns:
        The ``torch.onnx.ONNXProgram``: ``.model_proto`` is the ONNX model.

    Raises:
        ImportError: onnx or onnxscript is missing (the ``export`` extra).
        ValueError: an unknown variant, an opset it does not support, a model left at another
            opset than asked for (e.g. an antialiased resize, which needs opset 18), or a
            ``bilateral_ops`` op without a decomposition in the graph.
    """
    check_opset(variant, opset)
    _require("onnx", "onnxscript")
    with _quiet_exporter(verbose):
        ep = torch.export.export(model, tuple(args), kwargs=kwargs, dynamic_shapes=dynamic_shapes)
        ep = decompose(ep, variant)
        program = torch.onnx.export(
            ep,
            opset_version=opset,
            input_names=input_names,
            output_names=output_names,
            optimize=optimize,
            verbose=verbose,
            dynamo=True,
        )
    got = onnx_opset(program.model_proto)
    if got != opset:
        raise ValueError(
            f"the model could not be converted to opset {opset} (it stays at {got}): it uses an "
            "operation that does not exist there (an antialiased resize, as HDRNet's default "
            "low-resolution input, needs opset 18)"
        )
    if f is not None:
        program.save(os.fspath(f), external_data=False)
    return program


@contextlib.contextmanager
def _quiet_exporter(verbose: bool):
    """Silence torch.onnx's progress lines and known-harmless warnings unless verbose."""
    if verbose:
        yield
        return
    import logging

    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def onnx_opset(model_proto) -> int:
    """The default-domain opset of an ONNX model."""
    for imp in model_proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise ValueError("the model imports no default-domain opset")


def onnx_op_types(model_proto) -> dict[str, int]:
    """``{"domain::op_type" or "op_type": count}`` over the graph and every function and subgraph."""
    counts: dict[str, int] = {}

    def visit(nodes):
        for node in nodes:
            key = f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
            counts[key] = counts.get(key, 0) + 1
            for attr in node.attribute:
                if attr.g is not None and len(attr.g.node):
                    visit(attr.g.node)
                for g in attr.graphs:
                    visit(g.node)

    visit(model_proto.graph.node)
    for fn in model_proto.functions:
        visit(fn.node)
    return counts


# ----------------------------------------------------------------------------------------------
# The command line


def _hdrnet_dynamic_shapes():
    dim = torch.export.Dim
    return {"fullres": {0: dim("N", min=1, max=64), 2: dim("H", min=2, max=16384), 3: dim("W", min=2, max=16384)}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bilateral_ops.export",
        description="Export a trained HDRNet (a checkpoint of python -m bilateral_ops.train) to ONNX, "
        "with dynamic batch, height and width; run it once in onnxruntime and print its difference "
        "from the eager model.",
    )
    ap.add_argument("--checkpoint", required=True, help="checkpoint written by python -m bilateral_ops.train")
    ap.add_argument("--out", required=True, help="the .onnx file to write")
    ap.add_argument("--variant", default="gather", choices=VARIANTS, help="how the slice is written (default gather)")
    ap.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18; 20 for gridsample5d)")
    ap.add_argument("--height", type=int, default=480, help="height of the check image (default 480)")
    ap.add_argument("--width", type=int, default=640, help="width of the check image (default 640)")
    ap.add_argument("--no-check", action="store_true", help="skip the onnxruntime run")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from .train import model_from_checkpoint

    opset = args.opset if args.opset is not None else (20 if args.variant == "gridsample5d" else DEFAULT_OPSET)
    try:
        check_opset(args.variant, opset)
        _require("onnx", "onnxscript", *(() if args.no_check else ("onnxruntime",)))
        model = model_from_checkpoint(args.checkpoint)
    except (ValueError, TypeError, OSError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    example = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    try:
        program = export_onnx(
            model, (example,), args.out, opset=opset, variant=args.variant,
            dynamic_shapes=_hdrnet_dynamic_shapes(), input_names=["fullres"], output_names=["output"],
        )
    except ValueError as exc:  # e.g. HDRNet at opset 17: its antialiased resize needs 18
        print(f"error: {exc}", file=sys.stderr)
        return 2
    n_nodes = len(program.model_proto.graph.node)
    print(f"wrote {args.out}: opset {opset}, variant {args.variant}, {n_nodes} nodes, inputs fullres (N, 3, H, W)")
    if args.no_check:
        return 0
    import onnxruntime as ort

    x = torch.rand(1, 3, args.height, args.width, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x)
    session = ort.InferenceSession(args.out, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    diff = (torch.from_numpy(got) - want).abs().max().item()
    print(f"onnxruntime {ort.__version__} vs eager at 1x3x{args.height}x{args.width}: max abs difference {diff:.3e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
