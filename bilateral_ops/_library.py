"""The compiled library: loading it, which ops and devices it covers, and the fallback.

Importing ``bilateral_ops._C`` runs the ``TORCH_LIBRARY`` registrations of the C++ extension.
The list of ops is read back from the dispatcher, so it is written once, in ``csrc/ops.cpp``.
Where an op has no compiled kernel for a device (or the extension failed to load), the public
functions fall back to ``bilateral_ops.reference`` with a one-time ``RuntimeWarning``; setting
``BILATERAL_OPS_REQUIRE_COMPILED=1`` turns that into an error.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import torch

try:  # importing the extension runs its TORCH_LIBRARY registrations
    from . import _C  # noqa: F401

    LOAD_ERROR: Exception | None = None
except ImportError as exc:  # pragma: no cover - exercised only without a build
    LOAD_ERROR = exc

NAMESPACE = "bilateral_ops"
REQUIRE_COMPILED_ENV = "BILATERAL_OPS_REQUIRE_COMPILED"


def _registered_ops() -> tuple[str, ...]:
    if LOAD_ERROR is not None:
        return ()
    prefix = NAMESPACE + "::"
    return tuple(sorted(n[len(prefix) :] for n in torch._C._dispatch_get_all_op_names() if n.startswith(prefix)))


# Every op of the library, public and private (backward passes, guide derivatives).
OPS: tuple[str, ...] = _registered_ops()


def _kernel_devices(op: str) -> frozenset[str]:
    qualname = f"{NAMESPACE}::{op}"
    keys = {"cpu": "CPU", "cuda": "CUDA"}
    return frozenset(dev for dev, key in keys.items() if torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key))


# Looked up once: a set membership test is free under torch.compile, a dispatcher query is not.
KERNEL_DEVICES: dict[str, frozenset[str]] = {op: _kernel_devices(op) for op in OPS}
_WARNED: set[tuple[str, str]] = set()


def compiled_devices(op: str = "bilateral_slice_apply") -> frozenset[str]:
    """Device types (``"cpu"``, ``"cuda"``) for which ``op`` has a compiled kernel in this build.

    Empty if the extension failed to load. ``op`` is any op name of ``torch.ops.bilateral_ops``.
    """
    if LOAD_ERROR is None and op not in KERNEL_DEVICES:
        raise ValueError(f"unknown op {op!r}; the ops are {', '.join(OPS)}")
    return KERNEL_DEVICES.get(op, frozenset())


def has_kernel(op: str, device: torch.device) -> bool:
    return device.type in KERNEL_DEVICES.get(op, ())


def fallback(op: str, device: torch.device) -> None:
    """Called before using the reference implementation of ``op`` on ``device``: raises if
    compiled kernels are required, else warns once per (op, device type)."""
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


def autocast(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Under ``torch.autocast``, cast every floating argument to the device's autocast dtype."""
    device_type = tensors[0].device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return tuple(t.to(dtype) for t in tensors)
    return tuple(tensors)


def _records_graph(tensors: tuple[torch.Tensor | None, ...]) -> bool:
    """Whether a call records an autograd graph for some tensor argument, outside torch.jit.trace
    (whose graph, e.g. for torch.onnx.export, must hold the op itself)."""
    return (
        torch.is_grad_enabled()
        and not torch.jit.is_tracing()
        and any(t is not None and t.requires_grad for t in tensors)
    )


def eager_autograd(*tensors: torch.Tensor | None) -> bool:
    """Whether a public function should differentiate through ``eager_function``'s class: in an
    eager call (not traced by torch.compile) that records a graph for some tensor argument."""
    return not torch.compiler.is_compiling() and _records_graph(tensors)


def traced_autograd(*tensors: torch.Tensor | None) -> bool:
    """Whether a call traced by torch.compile records a graph for some tensor argument (the
    traced counterpart of ``eager_autograd``)."""
    return torch.compiler.is_compiling() and _records_graph(tensors)


def eager_function(op, setup_context, backward, keep: int | None = None) -> type[torch.autograd.Function]:
    """A ``torch.autograd.Function`` running ``op`` with its registered autograd formula
    (``setup_context``, ``backward``, as given to ``torch.library.register_autograd``) below the
    autograd dispatch, instead of through torch.library's Python autograd layer, whose host time
    exceeds small calls' kernels. Traced code and ``torch.ops`` callers keep the registered
    formula, which this runs unchanged; a backward recording a graph (``create_graph=True``) runs
    it through autograd, so that the backward ops' own formulas apply.

    With ``keep``, ``op`` returns a tuple of which the function returns output ``keep`` alone (the
    others only feed the backward): ``setup_context`` then runs after the op, with every output,
    and ``backward`` is called with the one cotangent."""

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            if keep is not None:
                with torch._C._AutoDispatchBelowAutograd():
                    outputs = op(*args)
                setup_context(ctx, args, outputs)
                return outputs[keep]
            setup_context(ctx, args, None)
            with torch._C._AutoDispatchBelowAutograd():
                return op(*args)

        @staticmethod
        def backward(ctx, *grads):
            if torch.is_grad_enabled():
                return backward(ctx, *grads)
            with torch._C._AutoDispatchBelowAutograd():
                return backward(ctx, *grads)

    Eager.__name__ = Eager.__qualname__ = f"Eager_{getattr(op, '__name__', 'op')}"
    return Eager


def live(grad: torch.Tensor | None, wanted: bool) -> torch.Tensor | None:
    """A cotangent of an output of a backward op, or None where that output was masked off (it
    is then an empty placeholder) or unused."""
    return grad if wanted and grad is not None else None


def masked(t: torch.Tensor, wanted: bool) -> torch.Tensor | None:
    """A gradient returned by a backward op, or None where the mask left it out."""
    return t if wanted else None


def add(*terms: torch.Tensor | None) -> torch.Tensor | None:
    """The sum of the terms that exist (None when none does)."""
    out = None
    for t in terms:
        if t is not None:
            out = t if out is None else out + t
    return out
