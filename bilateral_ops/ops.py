"""Python glue of the compiled ops: argument validation, autocast, dispatch to the compiled kernels
(or to ``reference.py`` where none exists for a device), fake kernels and autograd.

The schemas themselves live in one place, ``csrc/ops.cpp``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import torch

from . import reference

try:  # importing the extension runs its TORCH_LIBRARY registrations
    from . import _C  # noqa: F401

    LOAD_ERROR: Exception | None = None
except ImportError as exc:  # pragma: no cover - exercised only without a build
    LOAD_ERROR = exc

__all__ = [
    "bilateral_slice",
    "bilateral_slice_apply",
    "compiled_devices",
    "REQUIRE_COMPILED_ENV",
]

REQUIRE_COMPILED_ENV = "BILATERAL_OPS_REQUIRE_COMPILED"
_OPS = (
    "bilateral_slice",
    "_bilateral_slice_backward",
    "bilateral_slice_apply",
    "_bilateral_slice_apply_backward",
)


def _kernel_devices(op: str) -> frozenset[str]:
    if LOAD_ERROR is not None:
        return frozenset()
    qualname = f"bilateral_ops::{op}"
    keys = {"cpu": "CPU", "cuda": "CUDA"}
    return frozenset(
        dev for dev, key in keys.items() if torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key)
    )


# Looked up once: a plain set membership test is free under torch.compile, a dispatcher query is not.
_KERNEL_DEVICES = {op: _kernel_devices(op) for op in _OPS}
_WARNED: set[tuple[str, str]] = set()


def compiled_devices(op: str = "bilateral_slice_apply") -> frozenset[str]:
    """Device types ("cpu", "cuda") for which ``op`` has a compiled kernel in this build."""
    return _KERNEL_DEVICES[op]


def _fallback(op: str, device: torch.device) -> None:
    reason = f"extension failed to load: {LOAD_ERROR}" if LOAD_ERROR else f"no {device.type} kernel in this build"
    if os.environ.get(REQUIRE_COMPILED_ENV, "0") not in ("", "0"):
        raise RuntimeError(
            f"bilateral_ops.{op}: no compiled kernel for device '{device.type}' ({reason}) and "
            f"{REQUIRE_COMPILED_ENV} is set"
        )
    if (op, device.type) not in _WARNED:
        _WARNED.add((op, device.type))
        warnings.warn(
            f"bilateral_ops.{op}: no compiled kernel for device '{device.type}' ({reason}); "
            "using the slow pure-torch reference implementation",
            RuntimeWarning,
            stacklevel=3,
        )


# ----------------------------------------------------------------------------------------------
# Validation (DESIGN.md, "Errors"): ValueError / TypeError naming the argument, before any kernel.


def _check_tensor(name: str, t: object) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def _check_like(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have the same dtype as {ref_name} ({ref.dtype}), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the same device as {ref_name} ({ref.device}), got {t.device}")


def _as_guide(guide: torch.Tensor) -> torch.Tensor:
    """Accept a guide as (N, H, W) or (N, 1, H, W); return (N, H, W)."""
    if guide.dim() == 4 and guide.shape[1] == 1:
        return guide[:, 0]
    if guide.dim() != 3:
        raise ValueError(f"guide must have shape (N, H, W) or (N, 1, H, W), got {tuple(guide.shape)}")
    return guide


def _check_grid(grid: torch.Tensor) -> None:
    if grid.dim() != 5:
        raise ValueError(f"grid must have shape (N, C, D, Gh, Gw), got {tuple(grid.shape)}")
    if min(grid.shape[1:]) < 1:
        raise ValueError(f"grid channels, depth, height and width must be >= 1, got {tuple(grid.shape)}")


def _autocast(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Under torch.autocast, cast every floating argument to the device's autocast dtype."""
    device_type = tensors[0].device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return tuple(t.to(dtype) for t in tensors)
    return tuple(tensors)


def _prepare_grid_guide(grid: object, guide: object) -> tuple[torch.Tensor, torch.Tensor]:
    _check_tensor("grid", grid)
    _check_tensor("guide", guide)
    guide = _as_guide(guide)
    _check_grid(grid)
    if guide.shape[0] != grid.shape[0]:
        raise ValueError(
            f"guide batch size ({guide.shape[0]}) must match grid batch size ({grid.shape[0]})"
        )
    return grid, guide


# ----------------------------------------------------------------------------------------------
# Public functions


def bilateral_slice(grid: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
    """Trilinearly sample every channel of a bilateral grid at (x, y, guide(x, y)).

    Args:
        grid: (N, C, D, Gh, Gw).
        guide: (N, H, W) or (N, 1, H, W), expected in [0, 1]; values outside clamp to the edge cells.

    Returns:
        (N, C, H, W). Pixel (x, y) samples the grid at ``((x + 0.5) Gw / W, (y + 0.5) Gh / H,
        guide D)`` with grid sample k at k + 0.5 and clamp-to-edge, exactly
        ``F.grid_sample(grid, xyz, "bilinear", "border", align_corners=False)``.
    """
    grid, guide = _prepare_grid_guide(grid, guide)
    grid, guide = _autocast((grid, guide))
    _check_like("guide", guide, "grid", grid)
    if grid.device.type in _KERNEL_DEVICES["bilateral_slice"]:
        return torch.ops.bilateral_ops.bilateral_slice(grid, guide)
    _fallback("bilateral_slice", grid.device)
    return reference.bilateral_slice(grid, guide)


def bilateral_slice_apply(
    grid: torch.Tensor, guide: torch.Tensor, input: torch.Tensor, has_offset: bool = True
) -> torch.Tensor:
    """Slice a per-pixel affine matrix from a bilateral grid and apply it to ``input``, fused.

    Args:
        grid: (N, Co*(Ci+1), D, Gh, Gw), or (N, Co*Ci, D, Gh, Gw) when ``has_offset`` is False.
            Channel ``o*(Ci+1) + i`` multiplies input channel i for output channel o; channel
            ``o*(Ci+1) + Ci`` is the offset (google/hdrnet's row-major 3x4 layout for RGB).
        guide: (N, H, W) or (N, 1, H, W), expected in [0, 1].
        input: (N, Ci, H, W).
        has_offset: whether the grid carries an offset channel per output channel.

    Returns:
        (N, Co, H, W). The per-pixel coefficients are never materialised.
    """
    grid, guide = _prepare_grid_guide(grid, guide)
    _check_tensor("input", input)
    if not isinstance(has_offset, bool):
        raise TypeError(f"has_offset must be a bool, got {type(has_offset).__name__}")
    if input.dim() != 4:
        raise ValueError(f"input must have shape (N, Ci, H, W), got {tuple(input.shape)}")
    n, ci, h, w = input.shape
    if tuple(guide.shape) != (n, h, w):
        raise ValueError(
            f"guide must have shape (N, H, W) = {(n, h, w)} to match input {tuple(input.shape)}, "
            f"got {tuple(guide.shape)}"
        )
    if ci < 1:
        raise ValueError("input must have at least one channel")
    stride = ci + (1 if has_offset else 0)
    if grid.shape[1] % stride != 0:
        expected = "Co*(Ci+1)" if has_offset else "Co*Ci"
        raise ValueError(
            f"grid must have {expected} channels for Ci={ci} input channels "
            f"(has_offset={has_offset}), got {grid.shape[1]}"
        )
    grid, guide, input = _autocast((grid, guide, input))
    _check_like("guide", guide, "grid", grid)
    _check_like("input", input, "grid", grid)
    if grid.device.type in _KERNEL_DEVICES["bilateral_slice_apply"]:
        return torch.ops.bilateral_ops.bilateral_slice_apply(grid, guide, input, has_offset)
    _fallback("bilateral_slice_apply", grid.device)
    return reference.bilateral_slice_apply(grid, guide, input, has_offset)


# ----------------------------------------------------------------------------------------------
# Fake kernels and autograd


def _register() -> None:
    lib = "bilateral_ops::"

    @torch.library.register_fake(lib + "bilateral_slice")
    def _slice_fake(grid, guide):
        torch._check(grid.dim() == 5, lambda: "grid must be 5-D")
        torch._check(guide.dim() == 3, lambda: "guide must be 3-D")
        return grid.new_empty((guide.shape[0], grid.shape[1], guide.shape[1], guide.shape[2]))

    @torch.library.register_fake(lib + "_bilateral_slice_backward")
    def _slice_backward_fake(grad_output, grid, guide):
        # The kernels return contiguous gradients whatever the inputs' strides.
        return grid.new_empty(grid.shape), guide.new_empty(guide.shape)

    @torch.library.register_fake(lib + "bilateral_slice_apply")
    def _slice_apply_fake(grid, guide, input, has_offset=True):
        torch._check(grid.dim() == 5, lambda: "grid must be 5-D")
        torch._check(input.dim() == 4, lambda: "input must be 4-D")
        stride = input.shape[1] + (1 if has_offset else 0)
        return input.new_empty((input.shape[0], grid.shape[1] // stride, input.shape[2], input.shape[3]))

    @torch.library.register_fake(lib + "_bilateral_slice_apply_backward")
    def _slice_apply_backward_fake(grad_output, grid, guide, input, has_offset):
        return grid.new_empty(grid.shape), guide.new_empty(guide.shape), input.new_empty(input.shape)

    def _slice_setup(ctx, inputs, output):
        grid, guide = inputs
        ctx.save_for_backward(grid, guide)

    def _slice_backward(ctx, grad_output):
        grid, guide = ctx.saved_tensors
        return torch.ops.bilateral_ops._bilateral_slice_backward(grad_output, grid, guide)

    torch.library.register_autograd(lib + "bilateral_slice", _slice_backward, setup_context=_slice_setup)

    def _slice_apply_setup(ctx, inputs, output):
        grid, guide, input, has_offset = inputs
        ctx.has_offset = has_offset
        ctx.save_for_backward(grid, guide, input)

    def _slice_apply_backward(ctx, grad_output):
        grid, guide, input = ctx.saved_tensors
        grad_grid, grad_guide, grad_input = torch.ops.bilateral_ops._bilateral_slice_apply_backward(
            grad_output, grid, guide, input, ctx.has_offset
        )
        return grad_grid, grad_guide, grad_input, None

    torch.library.register_autograd(
        lib + "bilateral_slice_apply", _slice_apply_backward, setup_context=_slice_apply_setup
    )


if LOAD_ERROR is None:
    _register()
