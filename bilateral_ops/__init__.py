"""bilateral_ops: fast, differentiable bilateral operators for PyTorch.

Compiled C++ (CPU) and CUDA kernels registered as ``torch.ops.bilateral_ops.*``, with autograd and
fake kernels so that they work under ``torch.compile``. The contract of every op is in the
project's ``docs/ops.md``.
"""

from . import _library, models, reference
from ._library import compiled_devices
from ._version import __version__
from .bilateral_grid_filter import bilateral_grid_filter
from .bilateral_filter import (
    BilateralBlur,
    JointBilateralBlur,
    bilateral_blur,
    bilateral_filter,
    joint_bilateral_blur,
)
from .bilateral_slice import bilateral_slice
from .bilateral_slice_apply import bilateral_slice_apply
from .bilateral_slice_apply_points import bilateral_slice_apply_points
from .curve_guide import curve_guide
from .grid_blur import grid_blur
from .grid_splat import grid_splat
from .grid_tv_loss import grid_tv_loss

if _library.LOAD_ERROR is None:
    from . import _onnx_guard

    # A plain torch.onnx.export of a model with our ops fails naming the op and export_onnx.
    _onnx_guard.install(_library.OPS)

__all__ = [
    "BilateralBlur",
    "JointBilateralBlur",
    "__version__",
    "bilateral_blur",
    "bilateral_filter",
    "bilateral_grid_filter",
    "bilateral_slice",
    "bilateral_slice_apply",
    "bilateral_slice_apply_points",
    "compiled_devices",
    "curve_guide",
    "grid_blur",
    "grid_splat",
    "grid_tv_loss",
    "joint_bilateral_blur",
    "models",
    "reference",
]
