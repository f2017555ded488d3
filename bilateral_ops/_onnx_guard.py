"""A plain ``torch.onnx.export`` of a model with our ops fails with a message that says how to export.

No ONNX exporter knows ``bilateral_ops`` ops; left alone, torch's exporters fail with "No ONNX
function found ... No decompositions registered" (``dynamo=True``) or "unrecognized namespace"
(``dynamo=False``), which does not tell the user what to do. We register, for every op, a
translation that raises an error naming the op and pointing at ``bilateral_ops.export.export_onnx``:

* TorchScript exporter (``dynamo=False``): ``torch.onnx.register_custom_op_symbolic``, public API,
  registered at import (``torch.onnx`` imports in ~30 ms and needs no onnx package).
* torch.export-based exporter (``dynamo=True``): torch offers no public global registry (only the
  per-call ``custom_translation_table``), so the refusal is appended to the list the exporter's
  default registry is built from (``torch.onnx._internal.exporter._torchlib._torchlib_registry``).
  That module imports onnxscript (~1 s), so we do it only when torch imports it itself: an import
  hook (or at once, if it is already imported). Registered as a non-custom entry, it ranks below
  any ``custom_translation_table`` entry a user gives for our ops: their translation wins.

Every step is guarded: if a torch version moves these internals, export simply fails with torch's
own message (tests/test_export.py checks ours on the torch versions we support).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

import torch

_TORCHLIB_REGISTRY = "torch.onnx._internal.exporter._torchlib._torchlib_registry"
_REGISTRATION = "torch.onnx._internal.exporter._registration"
_registered_dynamo = False


def message(op: str) -> str:
    """The refusal for op ``bilateral_ops::<op>``."""
    return (
        f"bilateral_ops::{op} has no ONNX translation: torch.onnx.export cannot export models that "
        "use bilateral_ops ops directly. Use bilateral_ops.export.export_onnx(model, args, f, "
        "opset=..., variant=...), which replaces every bilateral_ops op by a pure-torch "
        "decomposition before handing the model to torch.onnx.export (docs/deploy.md)."
    )


def _refusal(op: str):
    def refuse(*args, **kwargs):
        raise RuntimeError(message(op))

    refuse.__name__ = f"refuse_{op}"
    return refuse


def _register_torchscript(ops) -> None:
    try:
        from torch.onnx import register_custom_op_symbolic

        for op in ops:
            # Registered at opset 7, the oldest the exporter takes: it serves every newer opset.
            register_custom_op_symbolic(f"bilateral_ops::{op}", _refusal(op), 7)
    except Exception:  # noqa: BLE001, S110  # pragma: no cover - a torch without the TorchScript exporter
        pass


def _register_dynamo(ops) -> bool:
    """Append the refusals to torch's torchlib list once both modules have finished executing
    (they import each other, so either may complete first). True once registered."""
    global _registered_dynamo
    if _registered_dynamo:
        return True
    registry = sys.modules.get(_TORCHLIB_REGISTRY)
    registration = sys.modules.get(_REGISTRATION)
    if not (hasattr(registry, "_registry") and hasattr(registration, "OnnxDecompMeta")):
        return False
    _registered_dynamo = True
    try:
        namespace = torch.ops.bilateral_ops
        for op in ops:
            registry._registry.append(
                registration.OnnxDecompMeta(
                    onnx_function=_refusal(op),
                    fx_target=getattr(namespace, op).default,
                    signature=None,
                    is_complex=False,
                    skip_signature_inference=True,
                )
            )
    except Exception:  # noqa: BLE001, S110  # pragma: no cover - torch moved its internals: torch's own error remains
        pass
    return True


class _Finder(importlib.abc.MetaPathFinder):
    """Registers the dynamo refusals as soon as torch has imported both exporter modules."""

    def __init__(self, ops) -> None:
        self.ops = ops
        self.busy = False

    def find_spec(self, fullname, path, target=None):
        if fullname not in (_TORCHLIB_REGISTRY, _REGISTRATION) or self.busy:
            return None
        self.busy = True  # find_spec below must not find us again
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self.busy = False
        if spec is None or spec.loader is None:
            return spec
        loader, finder = spec.loader, self

        class _Loader(importlib.abc.Loader):
            def __getattr__(self, name):  # get_source, get_filename, ...: the real loader's
                return getattr(loader, name)

            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                loader.exec_module(module)
                if _register_dynamo(finder.ops) and finder in sys.meta_path:
                    sys.meta_path.remove(finder)

        spec.loader = _Loader()
        return spec


def install(ops) -> None:
    """Register the refusals for ``ops`` (names in the bilateral_ops namespace)."""
    ops = tuple(ops)
    _register_torchscript(ops)
    if not _register_dynamo(ops):
        sys.meta_path.insert(0, _Finder(ops))
