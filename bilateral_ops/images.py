"""Photos in and out of the command-line jobs (train, enhance, demo).

Images are (3, H, W) float32 tensors in [0, 1], RGB. Reading and writing go through OpenCV
(``opencv-python-headless``, part of the ``train`` extra), which reads 8- and 16-bit PNG, JPEG,
TIFF, BMP and WebP; every failure raises ``ImageError`` naming the file.
"""

from __future__ import annotations

import os

import numpy as np
import torch

__all__ = [
    "BUNDLED_HOLDOUT",
    "BUNDLED_PHOTOS",
    "IMAGE_EXTENSIONS",
    "ImageError",
    "bundled_photo_paths",
    "list_images",
    "read_rgb",
    "to_uint8",
    "write_png",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")

# The natural colour photos bundled with scikit-image (motorcycle_right is left out: it is the
# other half of a stereo pair with motorcycle_left, and would leak a training photo into the
# held-out set).
BUNDLED_PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "motorcycle_left.png",
    "retina.jpg",
    "rocket.jpg",
)
BUNDLED_HOLDOUT = ("chelsea", "coffee")


class ImageError(ValueError):
    """An image that cannot be used: missing, unreadable, not RGB, or of the wrong size."""


def _cv2():
    try:
        import cv2
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "bilateral_ops' image jobs need OpenCV: pip install 'bilateral_ops[train]' "
            "(or opencv-python-headless)"
        ) from exc
    return cv2


def bundled_photo_paths() -> list[str]:
    """Paths of the colour photos that ship with scikit-image (nothing is downloaded)."""
    try:
        from skimage import data
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the bundled photos come with scikit-image: pip install scikit-image") from exc
    return [os.path.join(data.data_dir, name) for name in BUNDLED_PHOTOS]


def list_images(paths: list[str]) -> list[str]:
    """Expand folders into the image files they hold (sorted by name); files are kept as given."""
    out = []
    for p in paths:
        if os.path.isdir(p):
            names = sorted(n for n in os.listdir(p) if n.lower().endswith(IMAGE_EXTENSIONS))
            if not names:
                raise ImageError(f"{p}: folder holds no image ({', '.join(IMAGE_EXTENSIONS)})")
            out.extend(os.path.join(p, n) for n in names)
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise ImageError(f"{p}: no such file or folder")
    return out


def read_rgb(path: str) -> torch.Tensor:
    """The image at ``path`` as a (3, H, W) float32 RGB tensor in [0, 1].

    Raises:
        ImageError: the file is missing or unreadable, or has not exactly 3 colour channels
            (grayscale, or an alpha channel that would have to be dropped silently).
    """
    cv2 = _cv2()
    if not os.path.isfile(path):
        raise ImageError(f"{path}: no such file")
    arr = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ImageError(f"{path}: not a readable image")
    channels = 1 if arr.ndim == 2 else arr.shape[2]
    if channels != 3:
        kind = {1: "grayscale", 2: "grayscale with alpha", 4: "RGBA"}.get(channels, f"{channels}-channel")
        raise ImageError(f"{path}: {kind} image; an RGB image is expected")
    if arr.dtype == np.uint8:
        scale = 255.0
    elif arr.dtype == np.uint16:
        scale = 65535.0
    elif arr.dtype == np.float32:
        scale = 1.0
    else:
        raise ImageError(f"{path}: unsupported sample type {arr.dtype}")
    rgb = np.ascontiguousarray(arr[:, :, ::-1])
    return torch.from_numpy(rgb.astype(np.float32) / scale).permute(2, 0, 1).contiguous()


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """(3, H, W) RGB in [0, 1] (clipped) as an (H, W, 3) uint8 RGB array."""
    arr = img.detach().float().clamp(0, 1).mul(255).add_(0.5).to(torch.uint8)
    return arr.permute(1, 2, 0).cpu().numpy()


def write_png(path: str, img: torch.Tensor) -> None:
    """Write (3, H, W) RGB in [0, 1] as an 8-bit PNG (clipped), atomically."""
    cv2 = _cv2()
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}.png")
    if not cv2.imwrite(tmp, np.ascontiguousarray(to_uint8(img)[:, :, ::-1])):
        raise ImageError(f"{path}: could not write")
    os.replace(tmp, path)
