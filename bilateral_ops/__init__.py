"""bilateral_ops: fast, differentiable bilateral operators for PyTorch.

Compiled C++ (CPU) and CUDA kernels registered as ``torch.ops.bilateral_ops.*``, with autograd and
fake kernels so that they work under ``torch.compile``. See DESIGN.md for the full contract.
"""

from . import reference
from .ops import bilateral_slice, bilateral_slice_apply, compiled_devices

__version__ = "0.1.0"

__all__ = ["bilateral_slice", "bilateral_slice_apply", "compiled_devices", "reference", "__version__"]
