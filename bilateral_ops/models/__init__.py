"""Networks built on the bilateral ops."""

from .hdrnet import HDRNet, ReferenceHDRNet

__all__ = ["HDRNet", "ReferenceHDRNet"]
