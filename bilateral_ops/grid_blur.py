"""``grid_blur``: the separable, normalised Gaussian blur of a bilateral grid.

The blur is linear and its kernel symmetric with zeros outside the grid, so it is self-adjoint:
its backward is the op itself, and so is every higher derivative.
"""

from __future__ import annotations

import torch

from . import _library as lib
from . import _validation as v
from . import reference

__all__ = ["grid_blur"]

_ops = torch.ops.bilateral_ops


def grid_blur(grid: torch.Tensor, sigma=1.0) -> torch.Tensor:
    """Blur a bilateral grid along its depth, height and width with a Gaussian.

    Args:
        grid: (N, C, D, Gh, Gw) floating tensor.
        sigma: standard deviation in cells, one number for every axis or three (sd, sh, sw) for
            (D, Gh, Gw); 0 leaves that axis alone. Finite, >= 0, at most 1e6.

    Returns:
        (N, C, D, Gh, Gw), a new tensor. Along an axis with sigma s > 0 every cell becomes
        ``sum_t k[t] * grid[i + t]`` over ``|t| <= r = ceil(2 s)``, with ``k[t]`` proportional to
        ``exp(-t^2 / (2 s^2))`` and summing to 1 over the whole window; cells outside the grid
        count as zero (the window is never renormalised at the borders). Linear and self-adjoint:
        differentiable to any order.

    Raises:
        TypeError: grid is not a floating tensor or sigma is not a number or three numbers.
        ValueError: grid is not 5-D, or a sigma is negative, infinite, NaN or above 1e6.
    """
    v.check_tensor("grid", grid)
    s = v.blur_sigma(sigma)
    (grid,) = lib.autocast((grid,))
    v.check_grid(grid)
    if lib.has_kernel("grid_blur", grid.device):
        return _ops.grid_blur(grid, s)
    lib.fallback("grid_blur", grid.device)
    return reference.grid_blur(grid, s)


def _blur_fake(grid, sigma):
    v.check_grid(grid)
    v.blur_sigma(list(sigma))
    return grid.new_empty(grid.shape)


def _blur_setup(ctx, inputs, output):
    ctx.sigma = tuple(inputs[1])
    ctx.set_materialize_grads(False)


def _blur_backward(ctx, grad):
    if grad is None or not ctx.needs_input_grad[0]:
        return None, None
    return _ops.grid_blur(grad, ctx.sigma), None


def _register() -> None:
    torch.library.register_fake("bilateral_ops::grid_blur")(_blur_fake)
    torch.library.register_autograd("bilateral_ops::grid_blur", _blur_backward, setup_context=_blur_setup)


if lib.LOAD_ERROR is None:
    _register()
