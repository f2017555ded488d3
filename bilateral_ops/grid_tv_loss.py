"""``grid_tv_loss``: lib_bilagrid's ``total_variation_loss`` of bilateral grids, fused.

The public function validates and dispatches; below it, the fake kernels and the autograd
formulas of ``grid_tv_loss`` and ``_grid_tv_loss_backward``. The loss is quadratic in the grids,
so its backward is linear in both of its tensor arguments and is differentiated exactly by
itself: derivatives of every order.
"""

from __future__ import annotations

import torch

from . import _library as lib
from . import _validation as v
from . import reference

__all__ = ["grid_tv_loss"]

_ops = torch.ops.bilateral_ops


def grid_tv_loss(grids: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
    """Total variation of bilateral grids, as lib_bilagrid's ``total_variation_loss``.

    Args:
        grids: (M, C, D, Gh, Gw) floating tensor (lib_bilagrid's ``(num, 12, grid_W, grid_Y,
            grid_X)``).
        idx: optional (K,) integer tensor: the loss of ``grids[idx]`` (a repeated index counts
            each time), without the copy; e.g. only the grids of the current batch. On CPU a value
            out of range raises ValueError; on CUDA it makes the loss NaN.

    Returns:
        A 0-d tensor in the grids' dtype: the sum over the axes D, Gh, Gw of the mean of the
        squared differences of neighbours along that axis, over the B = K (or M) grids and all
        channels; an axis of size 1 contributes 0; NaN when B = 0 (0 / 0, as lib_bilagrid).
        Deterministic, with no host synchronisation on CUDA. Differentiable for grids, to any
        order.

    Raises:
        TypeError: grids is not a floating tensor, or idx is not an integer tensor.
        ValueError: wrong ranks or devices; idx out of range (CPU).
    """
    v.check_tensor("grids", grids)
    if idx is not None:
        v.check_index("idx", idx, "grids", grids)
        idx = idx.long()
    (grids,) = lib.autocast((grids,))
    v.check_grid_tv_loss(grids, idx)
    if idx is not None:
        v.check_index_values("idx", idx, grids.shape[0], "the number of grids")
    if lib.has_kernel("grid_tv_loss", grids.device):
        if lib.eager_autograd(grids):
            return _EagerLoss.apply(grids, idx)
        return _ops.grid_tv_loss(grids, idx)
    lib.fallback("grid_tv_loss", grids.device)
    return reference.grid_tv_loss(grids, idx)


# ----------------------------------------------------------------------------------------------
# Fake kernels


def _loss_fake(grids, idx=None):
    v.check_grid_tv_loss(grids, idx)
    return grids.new_empty(())


def _backward_fake(grad_output, grids, idx):
    v.check_grid_tv_loss(grids, idx)
    return grids.new_empty(grids.shape)


# ----------------------------------------------------------------------------------------------
# Autograd


def _loss_setup(ctx, inputs, output):
    grids, idx = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grids, idx)


def _loss_backward(ctx, grad_output):
    if grad_output is None or not ctx.needs_input_grad[0]:
        return None, None
    grids, idx = ctx.saved_tensors
    return _ops._grid_tv_loss_backward(grad_output, grids, idx), None


def _backward_setup(ctx, inputs, output):
    grad_output, grids, idx = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad_output, grids, idx)


def _backward_backward(ctx, ct):
    """The backward op is go * H x with H the (symmetric) Hessian of the loss: its products with a
    cotangent c are go * H c (for x) and <c, H x> (for go), both the backward op again."""
    if ct is None:
        return None, None, None
    go, grids, idx = ctx.saved_tensors
    d_go = d_grids = None
    if ctx.needs_input_grad[0]:
        d_go = (ct * _ops._grid_tv_loss_backward(torch.ones_like(go), grids, idx)).sum().reshape(go.shape)
    if ctx.needs_input_grad[1]:
        d_grids = _ops._grid_tv_loss_backward(go, ct, idx)
    return d_go, d_grids, None


def _register() -> None:
    torch.library.register_fake("bilateral_ops::grid_tv_loss")(_loss_fake)
    torch.library.register_fake("bilateral_ops::_grid_tv_loss_backward")(_backward_fake)
    torch.library.register_autograd("bilateral_ops::grid_tv_loss", _loss_backward, setup_context=_loss_setup)
    torch.library.register_autograd(
        "bilateral_ops::_grid_tv_loss_backward", _backward_backward, setup_context=_backward_setup
    )


if lib.LOAD_ERROR is None:
    _register()
    # Eager autograd (lib.eager_function): a loss is one small call per training step, and
    # torch.library's Python autograd layer took more host time than the CUDA kernels of 600 grids.
    _EagerLoss = lib.eager_function(_ops.grid_tv_loss, _loss_setup, _loss_backward)
