"""``bilateral_slice_apply_points``: slice-and-apply at explicit sample positions, each sample in
a grid of its own choosing (lib_bilagrid's ``grid_sample`` of ``grids[idx]``, without the copy).

The public function validates and dispatches; below it, the fake kernels and the autograd
formulas of ``bilateral_slice_apply_points`` and ``_bilateral_slice_apply_points_backward``. The
backward op has no derivatives of its own (radiance-field training needs first derivatives
only): differentiating it raises a RuntimeError naming the op.
"""

from __future__ import annotations

import torch

from . import _library as lib
from . import _validation as v
from . import reference

__all__ = ["bilateral_slice_apply_points"]

_ops = torch.ops.bilateral_ops


def bilateral_slice_apply_points(
    grid: torch.Tensor,
    coords: torch.Tensor,
    input: torch.Tensor,
    grid_idx: torch.Tensor,
    has_offset: bool = True,
) -> torch.Tensor:
    """Slice an affine matrix per sample from one of M grids and apply it to the sample's input.

    Args:
        grid: (M, Co*(Ci+1), D, Gh, Gw), or (M, Co*Ci, D, Gh, Gw) when ``has_offset`` is False
            (coefficient order of :func:`bilateral_slice_apply`).
        coords: (P, 3): each sample's (x, y, z) in [0, 1]. Sampled as lib_bilagrid does,
            ``F.grid_sample(..., align_corners=True, padding_mode="border")`` at ``2 coords - 1``:
            index ``x (Gw - 1)``, ``y (Gh - 1)``, ``z (D - 1)``, clamped to the grid (zero
            coordinate gradient at or beyond the border).
        input: (P, Ci).
        grid_idx: (P,) integer tensor: the grid of each sample, in [0, M). On CPU a value out of
            range raises ValueError; CUDA kernels cannot check without a synchronisation and give
            NaN for such samples instead (and no grid gradient).
        has_offset: whether the grid carries an offset channel per output channel.

    Returns:
        (P, Co). Differentiable for grid, coords and input (first derivatives). The grid
        gradient is deterministic on CPU and CUDA.

    Raises:
        TypeError: a floating argument is not a floating tensor, the dtypes differ, grid_idx is
            not an integer tensor, or has_offset is not a bool.
        ValueError: wrong ranks, sizes, channel counts or devices; grid_idx out of range (CPU).
    """
    v.check_tensor("grid", grid)
    v.check_tensor("coords", coords)
    v.check_tensor("input", input)
    v.check_index("grid_idx", grid_idx, "grid", grid)
    grid_idx = grid_idx.long()
    grid, coords, input = lib.autocast((grid, coords, input))
    v.check_slice_apply_points(grid, coords, input, grid_idx, has_offset)
    v.check_index_values("grid_idx", grid_idx, grid.shape[0], "the number of grids")
    if lib.has_kernel("bilateral_slice_apply_points", grid.device):
        return _ops.bilateral_slice_apply_points(grid, coords, input, grid_idx, has_offset)
    lib.fallback("bilateral_slice_apply_points", grid.device)
    return reference.bilateral_slice_apply_points(grid, coords, input, grid_idx, has_offset)


# ----------------------------------------------------------------------------------------------
# Fake kernels: the same validation as the eager path; contiguous outputs.


def _points_fake(grid, coords, input, grid_idx, has_offset=True):
    co = v.check_slice_apply_points(grid, coords, input, grid_idx, has_offset)
    return input.new_empty((input.shape[0], co))


def _backward_fake(grad_output, grid, coords, input, grid_idx, has_offset, output_mask):
    co = v.check_slice_apply_points(grid, coords, input, grid_idx, has_offset)
    v.check_grad_output(grad_output, grid, (input.shape[0], co))
    return (
        grid.new_empty(grid.shape if output_mask[0] else (0,)),
        coords.new_empty(coords.shape if output_mask[1] else (0,)),
        input.new_empty(input.shape if output_mask[2] else (0,)),
    )


# ----------------------------------------------------------------------------------------------
# Autograd


def _points_setup(ctx, inputs, output):
    grid, coords, input, grid_idx, has_offset = inputs
    ctx.set_materialize_grads(False)
    ctx.has_offset = has_offset
    ctx.save_for_backward(grid, coords, input, grid_idx)


def _points_backward(ctx, grad_output):
    if grad_output is None:
        return None, None, None, None, None
    grid, coords, input, grid_idx = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
    grads = _ops._bilateral_slice_apply_points_backward(grad_output, grid, coords, input, grid_idx, ctx.has_offset, mask)
    return tuple(lib.masked(g, m) for g, m in zip(grads, mask)) + (None, None)


def _backward_setup(ctx, inputs, output):
    pass


def _backward_backward(ctx, *cotangents):
    raise RuntimeError(
        "bilateral_ops._bilateral_slice_apply_points_backward: second derivatives of "
        "bilateral_slice_apply_points are not implemented"
    )


def _register() -> None:
    torch.library.register_fake("bilateral_ops::bilateral_slice_apply_points")(_points_fake)
    torch.library.register_fake("bilateral_ops::_bilateral_slice_apply_points_backward")(_backward_fake)
    torch.library.register_autograd(
        "bilateral_ops::bilateral_slice_apply_points", _points_backward, setup_context=_points_setup
    )
    torch.library.register_autograd(
        "bilateral_ops::_bilateral_slice_apply_points_backward", _backward_backward, setup_context=_backward_setup
    )


if lib.LOAD_ERROR is None:
    _register()
