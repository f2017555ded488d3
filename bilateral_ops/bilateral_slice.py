"""``bilateral_slice``: trilinear sampling of a bilateral grid at (x, y, guide(x, y)).

The public function validates and dispatches; below it, the fake kernels and autograd formulas of
the three ops ``bilateral_slice``, ``_bilateral_slice_dguide`` (the derivative of the slice with
respect to the guide, pixel by pixel) and ``_bilateral_slice_backward`` (vector-Jacobian products
of either, with an output mask). Registering autograd for the backward op too makes second
derivatives exact: the slice is piecewise linear in the guide, so its guide derivative is
piecewise constant and every derivative beyond it is zero almost everywhere.
"""

from __future__ import annotations

import torch

from . import _library as lib
from . import _validation as v
from . import reference

__all__ = ["bilateral_slice"]

_ops = torch.ops.bilateral_ops


def bilateral_slice(grid: torch.Tensor, guide: torch.Tensor, align_corners: bool = False) -> torch.Tensor:
    """Trilinearly sample every channel of a bilateral grid at (x, y, guide(x, y)).

    Args:
        grid: (N, C, D, Gh, Gw) floating tensor.
        guide: (N, H, W) or (N, 1, H, W), same dtype and device, expected in [0, 1]; values
            outside clamp to the edge cells (their gradient is 0); NaN and infinities never read
            out of bounds.
        align_corners: sample at grid index ``u (S - 1)`` on every axis instead: pixel x of a
            W-pixel row at index ``x (Gw - 1)/(W - 1)`` (0 when W = 1), the guide v at
            ``v (D - 1)``, clamped to the grid: exactly ``F.grid_sample(..., align_corners=True,
            padding_mode="border")``, lib_bilagrid's sampling (nerfstudio's ``linspace(0, 1, W)``
            pixel coordinates).

    Returns:
        (N, C, H, W). Pixel (x, y) samples the grid at ``((x + 0.5) Gw / W, (y + 0.5) Gh / H,
        guide D)`` with grid sample k at k + 0.5, tent weights and clamp-to-edge: exactly
        ``F.grid_sample(grid, xyz, "bilinear", "border", align_corners=False)``.
        Differentiable for grid and guide, to any order.

    Raises:
        TypeError: an argument is not a floating tensor, the dtypes differ, or align_corners is
            not a bool.
        ValueError: wrong ranks, sizes or devices.
    """
    v.check_tensor("grid", grid)
    v.check_tensor("guide", guide)
    v.check_bool("align_corners", align_corners)
    guide = v.as_guide(guide)
    grid, guide = lib.autocast((grid, guide))
    v.check_grid_guide(grid, guide)
    if lib.has_kernel("bilateral_slice", grid.device):
        return _ops.bilateral_slice(grid, guide, align_corners)
    lib.fallback("bilateral_slice", grid.device)
    return reference.bilateral_slice(grid, guide, align_corners)


# ----------------------------------------------------------------------------------------------
# Fake kernels: the same validation as the eager path, then outputs of the right shape. The
# kernels return contiguous tensors whatever the strides of their inputs.


def _slice_fake(grid, guide, align_corners=False):
    v.check_grid_guide(grid, guide)
    return grid.new_empty((guide.shape[0], grid.shape[1], guide.shape[1], guide.shape[2]))


def _backward_fake(grad_output, grid, guide, dguide, output_mask, align_corners=False):
    v.check_grid_guide(grid, guide)
    v.check_grad_output(grad_output, grid, (guide.shape[0], grid.shape[1], guide.shape[1], guide.shape[2]))
    v.check_output_mask(dguide, output_mask)
    return (
        grid.new_empty(grid.shape if output_mask[0] else (0,)),
        guide.new_empty(guide.shape if output_mask[1] else (0,)),
    )


# ----------------------------------------------------------------------------------------------
# Autograd


def _slice_setup(ctx, inputs, output):
    grid, guide, align_corners = inputs
    ctx.set_materialize_grads(False)
    ctx.align_corners = align_corners
    ctx.save_for_backward(grid, guide)


def _slice_backward(ctx, grad_output):
    if grad_output is None:
        return None, None, None
    grid, guide = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1]]
    grad_grid, grad_guide = _ops._bilateral_slice_backward(grad_output, grid, guide, False, mask, ctx.align_corners)
    return lib.masked(grad_grid, mask[0]), lib.masked(grad_guide, mask[1]), None


def _dguide_backward(ctx, grad_output):
    # The guide derivative of the dguide sample is a second derivative of the tent: zero almost
    # everywhere.
    if grad_output is None or not ctx.needs_input_grad[0]:
        return None, None, None
    grid, guide = ctx.saved_tensors
    grad_grid, _ = _ops._bilateral_slice_backward(grad_output, grid, guide, True, [True, False], ctx.align_corners)
    return grad_grid, None, None


def _backward_setup(ctx, inputs, output):
    grad_output, grid, guide, dguide, output_mask, align_corners = inputs
    ctx.set_materialize_grads(False)
    ctx.align_corners = align_corners
    ctx.dguide = dguide
    ctx.output_mask = tuple(output_mask)
    ctx.save_for_backward(grad_output, grid, guide)


def _backward_backward(ctx, ct_grid, ct_guide):
    """Vector-Jacobian product of the backward op (g, G, v) -> (splat(g), sum_c g_c S'_c) with
    cotangents a (for the grid gradient) and b (for the guide gradient); S' is the guide
    derivative of the slice, and (with dguide) everything one derivative higher."""
    go, grid, guide = ctx.saved_tensors
    dguide, ac = ctx.dguide, ctx.align_corners
    a = lib.live(ct_grid, ctx.output_mask[0])
    b = lib.live(ct_guide, ctx.output_mask[1])  # never with dguide (the mask forbids it)
    need_go, need_grid, need_guide = ctx.needs_input_grad[:3]
    d_go = d_grid = d_guide = None
    slice_fn = _ops._bilateral_slice_dguide if dguide else _ops.bilateral_slice
    if a is not None:
        if need_go:
            d_go = slice_fn(a, guide, ac)
        if need_guide and not dguide:
            d_guide = _ops._bilateral_slice_backward(go, a, guide, False, [False, True], ac)[1]
    if b is not None:
        if need_go:
            d_go = lib.add(d_go, b.unsqueeze(1) * _ops._bilateral_slice_dguide(grid, guide, ac))
        if need_grid:
            d_grid = _ops._bilateral_slice_backward(b.unsqueeze(1) * go, grid, guide, True, [True, False], ac)[0]
    return d_go, d_grid, d_guide, None, None, None


def _register() -> None:
    torch.library.register_fake("bilateral_ops::bilateral_slice")(_slice_fake)
    torch.library.register_fake("bilateral_ops::_bilateral_slice_dguide")(_slice_fake)
    torch.library.register_fake("bilateral_ops::_bilateral_slice_backward")(_backward_fake)
    torch.library.register_autograd("bilateral_ops::bilateral_slice", _slice_backward, setup_context=_slice_setup)
    torch.library.register_autograd(
        "bilateral_ops::_bilateral_slice_dguide", _dguide_backward, setup_context=_slice_setup
    )
    torch.library.register_autograd(
        "bilateral_ops::_bilateral_slice_backward", _backward_backward, setup_context=_backward_setup
    )


if lib.LOAD_ERROR is None:
    _register()
