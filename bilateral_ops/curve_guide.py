"""``curve_guide``: HDRNet's full-resolution guidance map, fused.

The public function validates and dispatches; below it, the fake kernels and autograd formulas of
``curve_guide`` and ``_curve_guide_backward`` (vector-Jacobian products for all seven arguments,
with an output mask). The guide is piecewise linear in the input and in the shifts, and
multilinear in the other parameters, so its second derivatives are far from zero: autograd of the
backward op differentiates the pure-torch formula (``reference.curve_guide``) twice, which agrees
with the kernels' first derivatives, masks included (same relu and clamp conventions). It
materialises (N, C, K, H, W), but only when second derivatives are asked for.
"""

from __future__ import annotations

import torch

from . import _library as lib
from . import _validation as v
from . import reference

__all__ = ["curve_guide"]

_ops = torch.ops.bilateral_ops
_NAMES = ("input",) + v.CURVE_PARAMS


def curve_guide(
    input: torch.Tensor,
    ccm: torch.Tensor,
    ccm_bias: torch.Tensor,
    shifts: torch.Tensor,
    slopes: torch.Tensor,
    mix: torch.Tensor,
    mix_bias: torch.Tensor,
) -> torch.Tensor:
    """HDRNet's guide: a colour transform, a learned piecewise-linear curve per channel and a
    channel mix, clamped to [0, 1], in one pass over the image.

    Args:
        input: (N, C, H, W) floating tensor, any C >= 1.
        ccm: (C, C) colour matrix; ccm_bias: (C,).
        shifts, slopes: (C, K), K >= 1 curve points per channel.
        mix: (C,) channel weights; mix_bias: (1,).
        All of the same dtype and device.

    Returns:
        (N, H, W): per pixel ``c = ccm @ input + ccm_bias``,
        ``f_k = sum_j slopes[k, j] * relu(c_k - shifts[k, j])`` and
        ``clamp(sum_k mix[k] * f_k + mix_bias, 0, 1)``; no (N, C, K, H, W) tensor is ever made.
        Differentiable for every argument (zero gradient where the clamp is active), to any order.

    Raises:
        TypeError: an argument is not a floating tensor, or the dtypes differ.
        ValueError: wrong ranks, shapes (naming the parameter and the expected shape) or devices.
    """
    args = (input, ccm, ccm_bias, shifts, slopes, mix, mix_bias)
    for name, t in zip(_NAMES, args):
        v.check_tensor(name, t)
    args = lib.autocast(args)
    v.check_curve_guide(*args)
    if lib.has_kernel("curve_guide", args[0].device):
        if lib.eager_autograd(*args):
            return _EagerCurve.apply(*args)
        return _ops.curve_guide(*args)
    lib.fallback("curve_guide", args[0].device)
    return reference.curve_guide(*args)


# ----------------------------------------------------------------------------------------------
# Fake kernels: the same validation as the eager path; contiguous outputs.


def _curve_fake(input, ccm, ccm_bias, shifts, slopes, mix, mix_bias):
    v.check_curve_guide(input, ccm, ccm_bias, shifts, slopes, mix, mix_bias)
    return input.new_empty((input.shape[0], input.shape[2], input.shape[3]))


def _backward_fake(grad_output, input, ccm, ccm_bias, shifts, slopes, mix, mix_bias, output_mask):
    args = (input, ccm, ccm_bias, shifts, slopes, mix, mix_bias)
    v.check_curve_guide(*args)
    v.check_grad_output(grad_output, input, (input.shape[0], input.shape[2], input.shape[3]), "input")
    return tuple(t.new_empty(t.shape if m else (0,)) for t, m in zip(args, output_mask))


# ----------------------------------------------------------------------------------------------
# Autograd


def _curve_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*inputs)


def _curve_backward(ctx, grad_output):
    if grad_output is None:
        return (None,) * 7
    mask = list(ctx.needs_input_grad[:7])
    grads = _ops._curve_guide_backward(grad_output, *ctx.saved_tensors, mask)
    return tuple(lib.masked(g, m) for g, m in zip(grads, mask))


def _backward_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    ctx.output_mask = tuple(inputs[-1])
    ctx.save_for_backward(*inputs[:-1])


def _backward_backward(ctx, *cotangents):
    """Vector-Jacobian product of the backward op (g, x, params) -> (d x, d params): the first
    derivatives written as torch.func.vjp of the pure-torch formula, pulled back once more. Being
    function transforms, they differentiate exactly this map (never through whatever graph the
    saved tensors carry, which autograd follows itself), and their result is differentiable again
    when the caller asked for a graph."""
    live = [i for i, ct in enumerate(cotangents) if lib.live(ct, ctx.output_mask[i]) is not None]
    need = ctx.needs_input_grad[:8]
    if not live or not any(need):
        return (None,) * 9

    def first_derivatives(go, *args):
        _, pullback = torch.func.vjp(reference.curve_guide, *args)
        grads = pullback(go)
        return tuple(grads[i] for i in live)

    _, pullback = torch.func.vjp(first_derivatives, *ctx.saved_tensors)
    seconds = pullback(tuple(cotangents[i] for i in live))
    return tuple(g if n else None for g, n in zip(seconds, need)) + (None,)


def _register() -> None:
    torch.library.register_fake("bilateral_ops::curve_guide")(_curve_fake)
    torch.library.register_fake("bilateral_ops::_curve_guide_backward")(_backward_fake)
    torch.library.register_autograd("bilateral_ops::curve_guide", _curve_backward, setup_context=_curve_setup)
    torch.library.register_autograd(
        "bilateral_ops::_curve_guide_backward", _backward_backward, setup_context=_backward_setup
    )


if lib.LOAD_ERROR is None:
    _register()
    # Eager autograd (lib.eager_function): HDRNet calls the guide once per training step, where
    # torch.library's Python autograd layer costs host time comparable to a small batch's kernels.
    _EagerCurve = lib.eager_function(_ops.curve_guide, _curve_setup, _curve_backward)
