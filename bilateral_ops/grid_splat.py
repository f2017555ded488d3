"""``grid_splat``: the exact transpose of ``bilateral_slice``.

Splatting accumulates every pixel's value into the eight grid cells its slice would read, with the
same tent weights and clamp-to-edge. Its vector-Jacobian products are therefore slice ops:
the input gradient is ``bilateral_slice(grad, guide)`` and the guide gradient is the guide part of
``_bilateral_slice_backward(input, grad, guide)``, i.e. ``sum_c input_c * d slice_c / d guide``.
Those ops carry their own autograd, so derivatives of every order are exact.
"""

from __future__ import annotations

import torch

from . import _library as lib
from . import _validation as v
from . import reference

__all__ = ["grid_splat"]

_ops = torch.ops.bilateral_ops


def grid_splat(input: torch.Tensor, guide: torch.Tensor, grid_size) -> torch.Tensor:
    """Splat an image into a bilateral grid: the adjoint (transpose) of :func:`bilateral_slice`.

    Args:
        input: (N, C, H, W) floating tensor, C >= 1.
        guide: (N, H, W) or (N, 1, H, W), same dtype and device, expected in [0, 1] (values outside
            land in the edge cells; NaN and infinities never write out of bounds).
        grid_size: (D, Gh, Gw), three ints >= 1.

    Returns:
        (N, C, D, Gh, Gw): ``grid[n, c, k, i, j] = sum over pixels of input[n, c, y, x] * w`` where
        w is the weight with which ``bilateral_slice`` at pixel (x, y) reads cell (k, i, j). So
        ``<bilateral_slice(G, guide), I> == <G, grid_splat(I, guide, G.shape[2:])>`` for every G
        and I. Splatting a channel of ones gives the (fractional) pixel count of every cell.
        Differentiable for input and guide, to any order.

    Raises:
        TypeError: an argument is not a floating tensor, the dtypes differ, or grid_size is not
            three ints.
        ValueError: wrong ranks, sizes or devices, or a grid size below 1.
    """
    v.check_tensor("input", input)
    v.check_tensor("guide", guide)
    guide = v.as_guide(guide)
    size = v.grid_size_tuple(grid_size)
    input, guide = lib.autocast((input, guide))
    v.check_splat(input, guide)
    if lib.has_kernel("grid_splat", input.device):
        return _ops.grid_splat(input, guide, size)
    lib.fallback("grid_splat", input.device)
    return reference.grid_splat(input, guide, size)


def _splat_fake(input, guide, grid_size):
    v.check_splat(input, guide)
    size = v.grid_size_tuple(grid_size)
    return input.new_empty((input.shape[0], input.shape[1], *size))


def _splat_setup(ctx, inputs, output):
    input, guide, _ = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(input, guide)


def _splat_backward(ctx, grad):
    if grad is None:
        return None, None, None
    input, guide = ctx.saved_tensors
    grad_input = grad_guide = None
    if ctx.needs_input_grad[0]:
        grad_input = _ops.bilateral_slice(grad, guide)
    if ctx.needs_input_grad[1]:
        grad_guide = _ops._bilateral_slice_backward(input, grad, guide, False, [False, True])[1]
    return grad_input, grad_guide, None


def _register() -> None:
    torch.library.register_fake("bilateral_ops::grid_splat")(_splat_fake)
    torch.library.register_autograd("bilateral_ops::grid_splat", _splat_backward, setup_context=_splat_setup)


if lib.LOAD_ERROR is None:
    _register()
