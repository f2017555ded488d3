"""``bilateral_filter``: the exact (joint) bilateral filter, with kornia's semantics.

``bilateral_blur``, ``joint_bilateral_blur``, ``BilateralBlur`` and ``JointBilateralBlur`` have the
signatures and results of ``kornia.filters``' functions and modules of those names; all of them
run the one op ``bilateral_filter`` (memory O(image), forward and backward). Below the public
functions: the fake kernels and autograd formulas of ``bilateral_filter``,
``_bilateral_filter_forward`` and ``_bilateral_filter_backward`` (gradients for input, guidance
and the tensor sigmas, with an output mask). Where a call records a graph, the public functions
run ``_bilateral_filter_forward``, which also returns each pixel's weight sum W: its backward
takes W and the output instead of sweeping every window again to recompute them (a third of the
backward's work). float16 / bfloat16 inputs keep nothing: their output, rounded to 16 bits, would
spoil the range and sigma gradients, so their backward recomputes it in float32. Second
derivatives are not implemented: differentiating the backward op raises.
"""

from __future__ import annotations

import torch
from torch import nn

from . import _library as lib
from . import _validation as v
from . import reference

__all__ = ["BilateralBlur", "JointBilateralBlur", "bilateral_blur", "bilateral_filter", "joint_bilateral_blur"]

_ops = torch.ops.bilateral_ops


def _sigma_color(sigma_color, input: torch.Tensor) -> torch.Tensor:
    n = input.shape[0]
    if isinstance(sigma_color, torch.Tensor):
        v.check_sigma_tensor("sigma_color", sigma_color, (n,), input)
        t = sigma_color.to(device=input.device, dtype=input.dtype)
        v.check_sigma_values("sigma_color", t)
        return t.reshape(-1).expand(n)
    s = v.positive_number("sigma_color", sigma_color, "a float or a tensor")
    return torch.full((n,), s, dtype=input.dtype, device=input.device)


def _sigma_space(sigma_space, input: torch.Tensor) -> torch.Tensor:
    n = input.shape[0]
    if (
        isinstance(sigma_space, (tuple, list))
        and len(sigma_space) == 2
        and any(isinstance(s, torch.Tensor) for s in sigma_space)
    ):
        # kornia takes (sigma_y, sigma_x) as tensors too; stacked, they keep their gradients.
        for s in sigma_space:
            if isinstance(s, torch.Tensor) and s.numel() != 1:
                raise ValueError(f"sigma_space entries must be numbers or one-element tensors, got shape {tuple(s.shape)}")
        sigma_space = torch.stack(
            [torch.as_tensor(s, dtype=input.dtype, device=input.device).reshape(()) for s in sigma_space]
        )
    if isinstance(sigma_space, torch.Tensor):
        v.check_sigma_tensor("sigma_space", sigma_space, (n, 2), input)
        t = sigma_space.to(device=input.device, dtype=input.dtype)
        v.check_sigma_values("sigma_space", t)
        return t.reshape(-1, 2).expand(n, 2)
    sy, sx = v.sigma_space_pair(sigma_space)
    # Filled on the device: torch.tensor from Python floats is a pageable host-to-device copy,
    # which may wait for the stream (on an H200 the 1080p call's host time exceeded its kernels').
    t = torch.full((n, 2), sy, dtype=input.dtype, device=input.device)
    if sx != sy:
        t[:, 1].fill_(sx)
    return t


def bilateral_filter(
    input: torch.Tensor,
    kernel_size: int | tuple[int, int],
    sigma_color: float | torch.Tensor,
    sigma_space: float | tuple[float, float] | torch.Tensor,
    border_type: str = "reflect",
    color_distance_type: str = "l1",
    guidance: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact (joint) bilateral filter of every channel of ``input``.

    Args:
        input: (N, C, H, W) floating tensor.
        kernel_size: odd window size, an int or (ky, kx).
        sigma_color: standard deviation of the range Gaussian, a positive float or a tensor of
            shape (N,) (or (1,)), cast to the input's dtype and device.
        sigma_space: standard deviation of the spatial Gaussian in pixels, a float, a pair
            (sigma_y, sigma_x) or a tensor of shape (N, 2) (or (1, 2)).
        border_type: ``F.pad`` mode of the window at the border: ``"reflect"``, ``"replicate"``,
            ``"constant"`` (zeros) or ``"circular"``.
        color_distance_type: ``"l1"`` (the squared sum of absolute differences, as OpenCV) or
            ``"l2"`` (the sum of squared differences).
        guidance: (N, Cg, H, W) image the range weights are measured on (any Cg, cast to the
            input's dtype), or None for the input itself.

    Returns:
        (N, C, H, W): per pixel ``sum(w I) / sum(w)`` over the window, with
        ``w = exp(-0.5 D / sigma_color^2) * exp(-0.5 (dy^2 / sigma_y^2 + dx^2 / sigma_x^2))`` and D
        the squared colour distance of the guidance to the centre. Differentiable for input,
        guidance and tensor sigmas (first order).

    Raises:
        TypeError: a tensor argument is not a floating tensor, or a non-tensor of the wrong kind.
        ValueError: wrong shapes, devices, even or non-positive kernel sizes, a kernel too large
            for reflect (or circular) padding, non-positive sigmas, unknown border or distance.
    """
    v.check_tensor("input", input)
    if guidance is not None:
        v.check_tensor("guidance", guidance)
    ks = v.kernel_size_2d(kernel_size)
    v.check_choice("border_type", border_type, v.BORDER_TYPES)
    v.check_choice("color_distance_type", color_distance_type, v.COLOR_DISTANCE_TYPES)
    if input.dim() != 4:
        raise ValueError(f"input must have shape (N, C, H, W), got {tuple(input.shape)}")
    if guidance is None:
        (input,) = lib.autocast((input,))
    else:
        input, guidance = lib.autocast((input, guidance))
        if guidance.dtype != input.dtype:  # kornia's cast; a device mismatch still raises below
            guidance = guidance.to(input.dtype)
    sc = _sigma_color(sigma_color, input)
    ss = _sigma_space(sigma_space, input)
    v.check_filter(input, guidance, ks, sc, ss, border_type, color_distance_type)
    if lib.has_kernel("bilateral_filter", input.device):
        args = (input, guidance, list(ks), sc, ss, border_type, color_distance_type)
        # The backward takes the output and W only where the output holds the accumulation type's
        # values (W's dtype is the input's), as check_filter_saved in csrc/bilateral_filter_args.h.
        keeps = v.filter_norm_dtype(input.dtype) == input.dtype
        if keeps and lib.eager_autograd(input, guidance, sc, ss):
            return _EagerFilter.apply(*args)
        if keeps and lib.traced_autograd(input, guidance, sc, ss):
            # The compiled graph saves the output for the backward, as it saves sigmoid's: changing
            # the returned tensor in place before the backward raises autograd's error (the eager
            # path instead recomputes; see _saved_forward).
            return _ops._bilateral_filter_forward(*args)[0]
        return _ops.bilateral_filter(*args)
    lib.fallback("bilateral_filter", input.device)
    return reference.bilateral_filter(input, guidance, ks, sc, ss, border_type, color_distance_type)


def bilateral_blur(
    input: torch.Tensor,
    kernel_size: int | tuple[int, int],
    sigma_color: float | torch.Tensor,
    sigma_space: float | tuple[float, float] | torch.Tensor,
    border_type: str = "reflect",
    color_distance_type: str = "l1",
) -> torch.Tensor:
    """``kornia.filters.bilateral_blur``: ``bilateral_filter`` guided by the input itself."""
    return bilateral_filter(input, kernel_size, sigma_color, sigma_space, border_type, color_distance_type)


def joint_bilateral_blur(
    input: torch.Tensor,
    guidance: torch.Tensor,
    kernel_size: int | tuple[int, int],
    sigma_color: float | torch.Tensor,
    sigma_space: float | tuple[float, float] | torch.Tensor,
    border_type: str = "reflect",
    color_distance_type: str = "l1",
) -> torch.Tensor:
    """``kornia.filters.joint_bilateral_blur``: range weights measured on ``guidance``."""
    v.check_tensor("guidance", guidance)
    return bilateral_filter(
        input, kernel_size, sigma_color, sigma_space, border_type, color_distance_type, guidance=guidance
    )


class _BilateralBlur(nn.Module):
    def __init__(
        self,
        kernel_size: int | tuple[int, int],
        sigma_color: float | torch.Tensor,
        sigma_space: float | tuple[float, float] | torch.Tensor,
        border_type: str = "reflect",
        color_distance_type: str = "l1",
    ) -> None:
        super().__init__()
        v.kernel_size_2d(kernel_size)  # as kornia's modules, refused here rather than at forward
        self.kernel_size = kernel_size
        self.sigma_color = sigma_color
        self.sigma_space = sigma_space
        self.border_type = border_type
        self.color_distance_type = color_distance_type

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(kernel_size={self.kernel_size}, sigma_color={self.sigma_color}, "
            f"sigma_space={self.sigma_space}, border_type={self.border_type}, "
            f"color_distance_type={self.color_distance_type})"
        )


class BilateralBlur(_BilateralBlur):
    """``kornia.filters.BilateralBlur``: ``forward(input)`` is ``bilateral_blur`` with the
    constructor's arguments."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return bilateral_blur(
            input, self.kernel_size, self.sigma_color, self.sigma_space, self.border_type, self.color_distance_type
        )


class JointBilateralBlur(_BilateralBlur):
    """``kornia.filters.JointBilateralBlur``: ``forward(input, guidance)`` is
    ``joint_bilateral_blur`` with the constructor's arguments."""

    def forward(self, input: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        return joint_bilateral_blur(
            input,
            guidance,
            self.kernel_size,
            self.sigma_color,
            self.sigma_space,
            self.border_type,
            self.color_distance_type,
        )


# ----------------------------------------------------------------------------------------------
# Fake kernels: the eager path's shape rules, then outputs of the right shape (contiguous, as the
# kernels return).


def _filter_fake(input, guidance, kernel_size, sigma_color, sigma_space, border_type, color_distance_type):
    v.check_filter(input, guidance, tuple(kernel_size), sigma_color, sigma_space, border_type, color_distance_type)
    return input.new_empty(input.shape)


def _forward_fake(input, guidance, kernel_size, sigma_color, sigma_space, border_type, color_distance_type):
    out = _filter_fake(input, guidance, kernel_size, sigma_color, sigma_space, border_type, color_distance_type)
    n, _, h, w = input.shape
    return out, input.new_empty((n, h, w), dtype=v.filter_norm_dtype(input.dtype))


def _backward_fake(
    grad_output,
    input,
    guidance,
    kernel_size,
    sigma_color,
    sigma_space,
    border_type,
    color_distance_type,
    output_mask,
    output=None,
    norm=None,
):
    v.check_filter(input, guidance, tuple(kernel_size), sigma_color, sigma_space, border_type, color_distance_type)
    v.check_filter_grad_output(grad_output, input)
    v.check_filter_saved(output, norm, input)
    if guidance is None and output_mask[1]:
        raise ValueError("output_mask[1] (grad_guidance) must be false when guidance is None")
    like = (input, guidance if guidance is not None else input, sigma_color, sigma_space)
    return tuple(t.new_empty(t.shape if wanted else (0,)) for t, wanted in zip(like, output_mask))


# ----------------------------------------------------------------------------------------------
# Autograd


def _filter_setup(ctx, inputs, output, saved=()):
    input, guidance, kernel_size, sigma_color, sigma_space, border_type, color_distance_type = inputs
    ctx.set_materialize_grads(False)
    ctx.args = (list(kernel_size), border_type, color_distance_type)
    ctx.has_guidance = guidance is not None
    ctx.save_for_backward(input, guidance, sigma_color, sigma_space, *saved)


def _forward_setup(ctx, inputs, output):
    """_bilateral_filter_forward's: bilateral_filter's, plus the output and its weight sums W (not
    differentiable: only the backward reads them)."""
    out, norm = output
    ctx.mark_non_differentiable(norm)
    _filter_setup(ctx, inputs, output, (out, norm))


def _eager_setup(ctx, inputs, output):
    """The eager class's: W saved, and the output it returns kept without save_for_backward's
    check of in-place changes (see _saved_forward)."""
    out, norm = output
    _filter_setup(ctx, inputs, output, (norm,))
    ctx.out, ctx.out_version = out.detach(), out._version


def _saved_forward(ctx):
    """The forward's output and W for the backward, or (None, None): the backward then recomputes
    them. The eager class returns the very output it keeps, which the caller may change in place
    (``out.clamp_(0, 1)``, as kornia's result allows): then it recomputes rather than raise."""
    saved = ctx.saved_tensors
    if len(saved) == 6:  # _bilateral_filter_forward's registered formula
        return saved[4], saved[5]
    if len(saved) == 5 and ctx.out._version == ctx.out_version:
        return ctx.out, saved[4]
    return None, None


def _filter_backward(ctx, grad_output, grad_norm=None):
    if grad_output is None:
        return None, None, None, None, None, None, None
    input, guidance, sigma_color, sigma_space = ctx.saved_tensors[:4]
    out, norm = _saved_forward(ctx)
    kernel_size, border_type, color_distance_type = ctx.args
    needs = ctx.needs_input_grad
    mask = [needs[0], ctx.has_guidance and needs[1], needs[3], needs[4]]
    if not any(mask):
        return None, None, None, None, None, None, None
    gi, gg, gsc, gss = _ops._bilateral_filter_backward(
        grad_output,
        input,
        guidance,
        kernel_size,
        sigma_color,
        sigma_space,
        border_type,
        color_distance_type,
        mask,
        out,
        norm,
    )
    return (
        lib.masked(gi, mask[0]),
        lib.masked(gg, mask[1]),
        None,
        lib.masked(gsc, mask[2]),
        lib.masked(gss, mask[3]),
        None,
        None,
    )


def _backward_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)


def _backward_backward(ctx, *grads):
    raise RuntimeError(
        "bilateral_ops::_bilateral_filter_backward: second derivatives of bilateral_filter are not "
        "implemented (differentiate a first-order gradient of bilateral_filter without create_graph, "
        "or use bilateral_ops.reference.bilateral_filter)"
    )


def _register() -> None:
    torch.library.register_fake("bilateral_ops::bilateral_filter")(_filter_fake)
    torch.library.register_fake("bilateral_ops::_bilateral_filter_forward")(_forward_fake)
    torch.library.register_fake("bilateral_ops::_bilateral_filter_backward")(_backward_fake)
    torch.library.register_autograd("bilateral_ops::bilateral_filter", _filter_backward, setup_context=_filter_setup)
    torch.library.register_autograd(
        "bilateral_ops::_bilateral_filter_forward", _filter_backward, setup_context=_forward_setup
    )
    torch.library.register_autograd(
        "bilateral_ops::_bilateral_filter_backward", _backward_backward, setup_context=_backward_setup
    )


if lib.LOAD_ERROR is None:
    _register()
    # Eager autograd (lib.eager_function): on a small image the Python autograd layer was a third of
    # a forward + backward's host time (150 -> 104 us on the 2-core CPU).
    # The eager class returns the output alone: W is saved, not returned, so nothing marks it.
    _EagerFilter = lib.eager_function(_ops._bilateral_filter_forward, _eager_setup, _filter_backward, keep=0)
