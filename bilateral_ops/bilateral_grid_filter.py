"""``bilateral_grid_filter``: the fast, approximate bilateral filter of the bilateral grid.

Splat the image and a channel of ones into a grid whose cells are ``sigma_space`` pixels wide and
``sigma_color`` deep, blur it by one cell, slice it back at every pixel and divide by the sliced
weight. The two ends are fused private ops (``_bilateral_grid_filter_splat``: the splat of
``[input, 1]`` without the concatenated copy; ``_bilateral_grid_filter_slice``: the slice and the
division in one pass); ``grid_blur`` sits between them. Their gradients are built from the slice
ops, so they carry autograd of every order.
"""

from __future__ import annotations

import torch

from . import _library as lib
from . import _validation as v
from . import reference
from .grid_blur import grid_blur
from .reference import grid_size_for

__all__ = ["bilateral_grid_filter"]

_ops = torch.ops.bilateral_ops
_FUSED = ("_bilateral_grid_filter_splat", "_bilateral_grid_filter_slice")

# Weights below this are empty cells: the result there is 0, never a division by zero (the same
# constant as the kernels').
MIN_WEIGHT = 1e-12
# The most cells on one grid axis.
MAX_GRID_AXIS = 2**31 - 1


def bilateral_grid_filter(
    input: torch.Tensor, sigma_color: float, sigma_space: float, guide: torch.Tensor | None = None
) -> torch.Tensor:
    """Edge-preserving smoothing of ``input`` with the bilateral grid (an approximation of the
    bilateral filter whose cost does not grow with ``sigma_space``).

    Args:
        input: (N, C, H, W) floating tensor, C >= 1, values expected in [0, 1].
        sigma_color: range sigma, in guide units (> 0): the grid has ``ceil(1 / sigma_color)``
            depth cells.
        sigma_space: spatial sigma in pixels (> 0): grid cells are about that wide,
            ``ceil(H / sigma_space)`` by ``ceil(W / sigma_space)`` of them.
        guide: (N, H, W) or (N, 1, H, W) in [0, 1], same dtype and device; defaults to the
            channel mean of ``input`` (then gradients flow into ``input`` through it too).

    Returns:
        (N, C, H, W): ``S[:C] / max(S[C], 1e-12)`` where ``S = bilateral_slice(grid_blur(
        grid_splat([input, 1], guide, size), 1.0), guide)``, the division done in float32 or
        wider. float16 / bfloat16 inputs are filtered in float32 and the result rounded once: a
        grid held in 16 bits would round each cell on its own and spoil the guide's gradient,
        which cancels between neighbouring cells. Differentiable for input and guide.

    Raises:
        TypeError: input or guide is not a floating tensor, their dtypes differ, or a sigma is
            not a number.
        ValueError: wrong ranks, sizes or devices, or a sigma that is not finite and > 0 or so
            small that a grid axis would have over 2^31 - 1 cells.
    """
    v.check_tensor("input", input)
    sigma_color = v.positive_number("sigma_color", sigma_color)
    sigma_space = v.positive_number("sigma_space", sigma_space)
    # The grid has ceil(1 / sigma_color) x ceil(H / sigma_space) x ceil(W / sigma_space) cells: a
    # sigma so small that an axis would not fit an int is refused here, naming it.
    side = max(input.shape[2], input.shape[3]) if input.dim() == 4 else 1
    if 1 / sigma_color > MAX_GRID_AXIS:
        raise ValueError(f"sigma_color {sigma_color!r} is too small: the grid would have over {MAX_GRID_AXIS} depth cells")
    if side / sigma_space > MAX_GRID_AXIS:
        raise ValueError(f"sigma_space {sigma_space!r} is too small: the grid would have over {MAX_GRID_AXIS} cells a side")
    mean_guide = guide is None
    if guide is not None:
        v.check_tensor("guide", guide)
        guide = v.as_guide(guide)
        input, guide = lib.autocast((input, guide))
    else:
        (input,) = lib.autocast((input,))
        # The channel mean's shape and dtype for the checks (not 4-D: check_splat names input);
        # the mean itself is taken below, in the dtype the filter runs in.
        shape = (input.shape[0], *input.shape[2:]) if input.dim() == 4 else (0, 0, 0)
        guide = input.new_empty(shape)
    v.check_splat(input, guide)
    dtype = input.dtype
    if dtype not in (torch.float16, torch.bfloat16):
        return _filter(input, sigma_color, sigma_space, input.mean(1) if mean_guide else guide)
    # In float32 with autocast off: autocast would take the float32 grids back to 16 bits.
    with torch.autocast(input.device.type, enabled=False):
        input = input.float()
        guide = input.mean(1) if mean_guide else guide.float()
        return _filter(input, sigma_color, sigma_space, guide).to(dtype)


def _filter(input, sigma_color, sigma_space, guide):
    if not all(lib.has_kernel(op, input.device) for op in _FUSED):
        lib.fallback("bilateral_grid_filter", input.device)
        return reference.bilateral_grid_filter(input, sigma_color, sigma_space, guide)
    size = grid_size_for(input.shape[2], input.shape[3], sigma_color, sigma_space)
    grid = grid_blur(_ops._bilateral_grid_filter_splat(input, guide, size), 1.0)
    return _ops._bilateral_grid_filter_slice(grid, guide)


# ----------------------------------------------------------------------------------------------
# Fake kernels and autograd of the fused ends


def _splat_fake(input, guide, grid_size):
    v.check_splat(input, guide)
    size = v.grid_size_tuple(grid_size)
    return input.new_empty((input.shape[0], input.shape[1] + 1, *size))


def _slice_fake(grid, guide):
    v.check_grid_guide(grid, guide)
    if grid.shape[1] < 2:
        raise ValueError(f"grid must have at least two channels (values and the weight), got {grid.shape[1]}")
    return grid.new_empty((guide.shape[0], grid.shape[1] - 1, guide.shape[1], guide.shape[2]))


def _splat_setup(ctx, inputs, output):
    input, guide, _ = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(input, guide)


def _splat_backward(ctx, grad):
    """The transpose of the splat of [input, 1]: slices of grad (input), and the guide derivative
    of the slice weighted by [input, 1] (guide)."""
    if grad is None:
        return None, None, None
    input, guide = ctx.saved_tensors
    grad_input = grad_guide = None
    if ctx.needs_input_grad[0]:
        grad_input = _ops.bilateral_slice(grad[:, : input.shape[1]], guide)
    if ctx.needs_input_grad[1]:
        homogeneous = torch.cat([input, torch.ones_like(input[:, :1])], 1)
        grad_guide = _ops._bilateral_slice_backward(homogeneous, grad, guide, False, [False, True])[1]
    return grad_input, grad_guide, None


def _slice_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*inputs, output)


def _slice_backward(ctx, grad):
    """out = S[:-1] / w with w = max(S[-1], MIN_WEIGHT): the gradient of S is [grad / w,
    -sum(grad * out) / w] (the last term 0 where the clamp holds w), pulled back through the
    slice. The weight is sliced again (one channel): cheaper than keeping it."""
    if grad is None:
        return None, None
    grid, guide, out = ctx.saved_tensors
    weight = _ops.bilateral_slice(grid[:, -1:], guide)
    dtype = grid.dtype
    if dtype not in (torch.float32, torch.float64):
        weight, out, grad = weight.float(), out.float(), grad.float()
    grad_values = grad / weight.clamp_min(MIN_WEIGHT)
    grad_weight = -(grad_values * out).sum(1, keepdim=True) * (weight > MIN_WEIGHT)
    grad_sliced = torch.cat([grad_values, grad_weight], 1).to(dtype)
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1]]
    grad_grid, grad_guide = _ops._bilateral_slice_backward(grad_sliced, grid, guide, False, mask)
    return lib.masked(grad_grid, mask[0]), lib.masked(grad_guide, mask[1])


def _register() -> None:
    torch.library.register_fake("bilateral_ops::_bilateral_grid_filter_splat")(_splat_fake)
    torch.library.register_fake("bilateral_ops::_bilateral_grid_filter_slice")(_slice_fake)
    torch.library.register_autograd(
        "bilateral_ops::_bilateral_grid_filter_splat", _splat_backward, setup_context=_splat_setup
    )
    torch.library.register_autograd(
        "bilateral_ops::_bilateral_grid_filter_slice", _slice_backward, setup_context=_slice_setup
    )


if lib.LOAD_ERROR is None:
    _register()
