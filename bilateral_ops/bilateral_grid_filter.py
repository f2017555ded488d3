"""``bilateral_grid_filter``: the fast, approximate bilateral filter of the bilateral grid.

A composition of the compiled ops, each differentiable: splat the image and a channel of ones
into a grid whose cells are ``sigma_space`` pixels wide and ``sigma_color`` deep, blur it by one
cell, slice it back at every pixel and divide by the sliced weight.
"""

from __future__ import annotations

import torch

from . import _library as lib
from . import _validation as v
from .bilateral_slice import bilateral_slice
from .grid_blur import grid_blur
from .grid_splat import grid_splat
from .reference import grid_size_for

__all__ = ["bilateral_grid_filter"]

# Weights below this are empty cells: the result there is 0, never a division by zero.
MIN_WEIGHT = 1e-12


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
        wider. Differentiable for input and guide.

    Raises:
        TypeError: input or guide is not a floating tensor, their dtypes differ, or a sigma is
            not a number.
        ValueError: wrong ranks, sizes or devices, or a sigma that is not finite and > 0.
    """
    v.check_tensor("input", input)
    sigma_color = v.positive_number("sigma_color", sigma_color)
    sigma_space = v.positive_number("sigma_space", sigma_space)
    if guide is not None:
        v.check_tensor("guide", guide)
        guide = v.as_guide(guide)
        input, guide = lib.autocast((input, guide))
    else:
        (input,) = lib.autocast((input,))
        if input.dim() == 4:
            guide = input.mean(1)
    if guide is None:  # input is not 4-D: check_splat names it
        guide = input.new_empty((0, 0, 0))
    v.check_splat(input, guide)
    _, c, h, w = input.shape
    homogeneous = torch.cat([input, torch.ones_like(input[:, :1])], dim=1)
    grid = grid_blur(grid_splat(homogeneous, guide, grid_size_for(h, w, sigma_color, sigma_space)), 1.0)
    return _Normalize.apply(bilateral_slice(grid, guide))[0].to(input.dtype)


class _Normalize(torch.autograd.Function):
    """(N, C+1, H, W) sliced values and weight -> (N, C, H, W) values / max(weight, MIN_WEIGHT), in
    float32 or wider. Written out because autograd of the plain expression makes about twice as
    many full-image passes (slice and clamp backwards, a broadcast reduction), which at 1080p cost
    more than the grid ops themselves."""

    @staticmethod
    def forward(sliced):
        if sliced.dtype not in (torch.float32, torch.float64):
            sliced = sliced.float()
        weight = sliced[:, -1:].clamp_min(MIN_WEIGHT)
        return sliced[:, :-1] / weight, weight

    @staticmethod
    def setup_context(ctx, inputs, output):
        out, weight = output
        ctx.mark_non_differentiable(weight)
        ctx.save_for_backward(out, weight)
        ctx.dtype = inputs[0].dtype

    @staticmethod
    def backward(ctx, grad, _):
        out, weight = ctx.saved_tensors
        grad_values = grad / weight
        # d out / d weight = -out / weight, and 0 where the clamp holds the weight.
        grad_weight = -(grad_values * out).sum(1, keepdim=True) * (weight > MIN_WEIGHT)
        return torch.cat([grad_values, grad_weight], 1).to(ctx.dtype)
