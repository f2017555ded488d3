"""``bilateral_slice_apply``: HDRNet's slice-and-apply, fused.

The public function validates and dispatches; below it, the fake kernels and autograd formulas of
``bilateral_slice_apply``, ``_bilateral_slice_apply_dguide`` (its derivative with respect to the
guide, pixel by pixel) and ``_bilateral_slice_apply_backward`` (vector-Jacobian products of
either, with an output mask). As for ``bilateral_slice``, autograd of the backward op makes
derivatives of every order exact.
"""

from __future__ import annotations

import torch

from . import _library as lib
from . import _validation as v
from . import reference

__all__ = ["bilateral_slice_apply"]

_ops = torch.ops.bilateral_ops


def bilateral_slice_apply(
    grid: torch.Tensor,
    guide: torch.Tensor,
    input: torch.Tensor,
    has_offset: bool = True,
    align_corners: bool = False,
) -> torch.Tensor:
    """Slice a per-pixel affine matrix from a bilateral grid and apply it to ``input``, fused.

    Args:
        grid: (N, Co*(Ci+1), D, Gh, Gw), or (N, Co*Ci, D, Gh, Gw) when ``has_offset`` is False.
            Channel ``o*(Ci+1) + i`` multiplies input channel i for output channel o; channel
            ``o*(Ci+1) + Ci`` is the offset (for RGB, the row-major 3x4 matrix of google/hdrnet).
        guide: (N, H, W) or (N, 1, H, W), expected in [0, 1] (see :func:`bilateral_slice`).
        input: (N, Ci, H, W).
        has_offset: whether the grid carries an offset channel per output channel.
        align_corners: sample at grid index ``u (S - 1)`` on every axis instead, as
            ``F.grid_sample(..., align_corners=True)`` and lib_bilagrid do (see
            :func:`bilateral_slice`).

    Returns:
        (N, Co, H, W): ``out[o] = sum_i S[o*(Ci+1)+i] * input[i] + S[o*(Ci+1)+Ci]`` where S is
        ``bilateral_slice(grid, guide)``; the per-pixel coefficients are never materialised.
        Differentiable for grid, guide and input, to any order.

    Raises:
        TypeError: an argument is not a floating tensor, the dtypes differ, or has_offset or
            align_corners is not a bool.
        ValueError: wrong ranks, sizes, channel counts or devices.
    """
    v.check_tensor("grid", grid)
    v.check_tensor("guide", guide)
    v.check_tensor("input", input)
    guide = v.as_guide(guide)
    grid, guide, input = lib.autocast((grid, guide, input))
    v.check_slice_apply(grid, guide, input, has_offset)
    v.check_bool("align_corners", align_corners)
    if lib.has_kernel("bilateral_slice_apply", grid.device):
        if lib.eager_autograd(grid, guide, input):
            return _EagerApply.apply(grid, guide, input, has_offset, align_corners)
        return _ops.bilateral_slice_apply(grid, guide, input, has_offset, align_corners)
    lib.fallback("bilateral_slice_apply", grid.device)
    return reference.bilateral_slice_apply(grid, guide, input, has_offset, align_corners)


# ----------------------------------------------------------------------------------------------
# Fake kernels: the same validation as the eager path; contiguous outputs.


def _apply_fake(grid, guide, input, has_offset=True, align_corners=False):
    co = v.check_slice_apply(grid, guide, input, has_offset)
    return input.new_empty((input.shape[0], co, input.shape[2], input.shape[3]))


def _backward_fake(grad_output, grid, guide, input, has_offset, dguide, output_mask, align_corners=False):
    co = v.check_slice_apply(grid, guide, input, has_offset)
    v.check_grad_output(grad_output, grid, (input.shape[0], co, input.shape[2], input.shape[3]))
    v.check_output_mask(dguide, output_mask)
    return (
        grid.new_empty(grid.shape if output_mask[0] else (0,)),
        guide.new_empty(guide.shape if output_mask[1] else (0,)),
        input.new_empty(input.shape if output_mask[2] else (0,)),
    )


# ----------------------------------------------------------------------------------------------
# Autograd


def _apply_setup(ctx, inputs, output):
    grid, guide, input, has_offset, align_corners = inputs
    ctx.set_materialize_grads(False)
    ctx.has_offset = has_offset
    ctx.align_corners = align_corners
    ctx.save_for_backward(grid, guide, input)


def _apply_backward(ctx, grad_output):
    if grad_output is None:
        return None, None, None, None, None
    grid, guide, input = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
    grads = _ops._bilateral_slice_apply_backward(
        grad_output, grid, guide, input, ctx.has_offset, False, mask, ctx.align_corners
    )
    return tuple(lib.masked(g, m) for g, m in zip(grads, mask)) + (None, None)


def _dguide_backward(ctx, grad_output):
    # The guide derivative of the dguide result is a second derivative of the tent: zero almost
    # everywhere.
    if grad_output is None:
        return None, None, None, None, None
    grid, guide, input = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], False, ctx.needs_input_grad[2]]
    grads = _ops._bilateral_slice_apply_backward(
        grad_output, grid, guide, input, ctx.has_offset, True, mask, ctx.align_corners
    )
    return lib.masked(grads[0], mask[0]), None, lib.masked(grads[2], mask[2]), None, None


def _linear_part(grid: torch.Tensor, ci: int, has_offset: bool) -> torch.Tensor:
    """The grid without its offset channels: (N, Co*Ci, D, Gh, Gw)."""
    if not has_offset:
        return grid
    return grid.unflatten(1, (-1, v.affine_stride(ci, has_offset)))[:, :, :ci].flatten(1, 2)


def _with_offset(grad_linear: torch.Tensor, ci: int, has_offset: bool) -> torch.Tensor:
    """A gradient of _linear_part's output, back in the full layout (zero offset channels)."""
    if not has_offset:
        return grad_linear
    g = grad_linear.unflatten(1, (-1, ci))
    zeros = g.new_zeros(g.shape[:2] + (1,) + g.shape[3:])
    return torch.cat([g, zeros], dim=2).flatten(1, 2)


def _backward_setup(ctx, inputs, output):
    grad_output, grid, guide, input, has_offset, dguide, output_mask, align_corners = inputs
    ctx.set_materialize_grads(False)
    ctx.has_offset = has_offset
    ctx.align_corners = align_corners
    ctx.dguide = dguide
    ctx.output_mask = tuple(output_mask)
    ctx.save_for_backward(grad_output, grid, guide, input)


def _backward_backward(ctx, ct_grid, ct_guide, ct_input):
    """Vector-Jacobian product of the backward op (g, G, v, x) -> (grad_grid, grad_guide,
    grad_input) with cotangents a, b and e. With S the slice of G, S' its guide derivative and
    X = (x, 1), the backward op computes grad_grid = splat(g_o X_i), grad_guide = sum g_o X_i S'
    and grad_input = sum_o g_o S_oi; every term below is one of the three ops applied to other
    arguments (with dguide, one derivative higher throughout)."""
    go, grid, guide, x = ctx.saved_tensors
    has_offset, dguide, ac = ctx.has_offset, ctx.dguide, ctx.align_corners
    ci = x.shape[1]
    a = lib.live(ct_grid, ctx.output_mask[0])
    b = lib.live(ct_guide, ctx.output_mask[1])  # never with dguide (the mask forbids it)
    e = lib.live(ct_input, ctx.output_mask[2])
    need_go, need_grid, need_guide, need_x = ctx.needs_input_grad[:4]
    need_guide = need_guide and not dguide  # a second derivative of the tent: zero a.e.
    def backward(go_, grid_, guide_, x_, has_offset_, dguide_, mask_):
        return _ops._bilateral_slice_apply_backward(go_, grid_, guide_, x_, has_offset_, dguide_, mask_, ac)

    def apply_fn(grid_, guide_, x_, has_offset_):
        op = _ops._bilateral_slice_apply_dguide if dguide else _ops.bilateral_slice_apply
        return op(grid_, guide_, x_, has_offset_, ac)

    d_go = d_grid = d_guide = d_x = None
    if a is not None:  # <a, splat(g X)>: the forward op on grid a
        if need_go:
            d_go = apply_fn(a, guide, x, has_offset)
        if need_guide or need_x:
            _, gd, gx = backward(go, a, guide, x, has_offset, dguide, [False, need_guide, need_x])
            d_guide = lib.masked(gd, need_guide)
            d_x = lib.masked(gx, need_x)
    if e is not None:  # <e, sum_o g_o S_oi>: slice_apply of the grid's linear part on input e
        lin = _linear_part(grid, ci, has_offset)
        if need_go:
            d_go = lib.add(d_go, apply_fn(lin, guide, e, False))
        if need_grid or need_guide:
            gg, gd, _ = backward(go, lin, guide, e, False, dguide, [need_grid, need_guide, False])
            if need_grid:
                d_grid = _with_offset(gg, ci, has_offset)
            if need_guide:
                d_guide = lib.add(d_guide, gd)
    if b is not None:  # <b, sum g_o X_i S'>: the dguide ops
        if need_go:
            d_go = lib.add(d_go, b.unsqueeze(1) * _ops._bilateral_slice_apply_dguide(grid, guide, x, has_offset, ac))
        if need_grid or need_x:
            gg, _, gx = backward(b.unsqueeze(1) * go, grid, guide, x, has_offset, True, [need_grid, False, need_x])
            if need_grid:
                d_grid = lib.add(d_grid, gg)
            if need_x:
                d_x = lib.add(d_x, gx)
    return d_go, d_grid, d_guide, d_x, None, None, None, None


def _register() -> None:
    torch.library.register_fake("bilateral_ops::bilateral_slice_apply")(_apply_fake)
    torch.library.register_fake("bilateral_ops::_bilateral_slice_apply_dguide")(_apply_fake)
    torch.library.register_fake("bilateral_ops::_bilateral_slice_apply_backward")(_backward_fake)
    torch.library.register_autograd(
        "bilateral_ops::bilateral_slice_apply", _apply_backward, setup_context=_apply_setup
    )
    torch.library.register_autograd(
        "bilateral_ops::_bilateral_slice_apply_dguide", _dguide_backward, setup_context=_apply_setup
    )
    torch.library.register_autograd(
        "bilateral_ops::_bilateral_slice_apply_backward", _backward_backward, setup_context=_backward_setup
    )


if lib.LOAD_ERROR is None:
    _register()
    # Eager autograd (lib.eager_function), as for curve_guide: HDRNet's other per-step op.
    _EagerApply = lib.eager_function(_ops.bilateral_slice_apply, _apply_setup, _apply_backward)
