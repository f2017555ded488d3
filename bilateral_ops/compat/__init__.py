"""Drop-in replacements for other projects' bilateral-grid modules.

``bilateral_ops.compat.bilagrid``: lib_bilagrid (gsplat's ``examples/lib_bilagrid.py``,
nerfstudio's ``model_components/lib_bilagrid.py``, BilaRF's ``lib_bilagrid.py``) and
fused-bilagrid's 3-D grids, with the same names, signatures, results and checkpoints.
"""

from . import bilagrid

__all__ = ["bilagrid"]
