"""Demo: a hand-built bilateral grid applied to a photo with ``bilateral_slice_apply``.

    python -m bilateral_ops.demo --out out/demo [--image astronaut|coffee] [--device cpu|cuda]

The grid is a local tone curve, no learning involved. It has D = 8 luma bins and 16 x 16 spatial
cells, and holds per cell the row-major 3x4 affine matrix ``[[g, 0, 0, b_r], [0, g, 0, b_g],
[0, 0, g, b_b]]`` (the coefficient order of docs/ops.md). For a cell at normalised position (u, v) in
[0, 1]^2 (u left to right, v top to bottom) and luma-bin centre l = (z + 0.5) / D:

* tone curve ``t(l) = l**gamma * (1 - h l**4)``, where ``gamma = 0.7 + 0.25 u`` lifts the
  shadows strongly on the left and barely on the right, and ``h = 0.04 + 0.16 (1 - v)`` rolls the
  highlights off more near the top of the frame than near the bottom;
* gain ``g = t(l) / l``: scaling RGB by it keeps hue and maps luma l to t(l);
* offset ``b = 0.02 (1 - l)^2 * (1, 0.3, -0.6)``: a slight warm tint in the shadows.

The guide is the photo's Rec. 709 luminance, so every pixel reads the gain of its own luma bin
(interpolated trilinearly between bins and cells): an edge-aware, spatially varying tone curve.
The same grid is applied with the grid_sample path (``bilateral_ops.reference``) that PyTorch
HDRNet ports use; the demo prints both times and their largest difference (~1e-6 in float32),
and writes before.png and after.png (clipped to [0, 1]) to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from . import reference
from .bilateral_slice_apply import bilateral_slice_apply

LUMA_BINS, CELLS = 8, 16


def tone_grid(luma_bins: int = LUMA_BINS, cells: int = CELLS) -> torch.Tensor:
    """The (1, 12, luma_bins, cells, cells) grid described in the module docstring."""
    l = ((torch.arange(luma_bins, dtype=torch.float64) + 0.5) / luma_bins).view(luma_bins, 1, 1)
    v = ((torch.arange(cells, dtype=torch.float64) + 0.5) / cells).view(1, cells, 1)
    u = ((torch.arange(cells, dtype=torch.float64) + 0.5) / cells).view(1, 1, cells)
    gamma = 0.7 + 0.25 * u
    h = 0.04 + 0.16 * (1 - v)
    t = l**gamma * (1 - h * l**4)
    gain = t / l  # (D, cells, cells)
    tint = 0.02 * (1 - l) ** 2 * torch.ones(1, cells, cells, dtype=torch.float64)
    grid = torch.zeros(3, 4, luma_bins, cells, cells, dtype=torch.float64)
    for c, w in enumerate((1.0, 0.3, -0.6)):
        grid[c, c] = gain
        grid[c, 3] = w * tint
    return grid.reshape(1, 12, luma_bins, cells, cells).float()


def load_photo(name: str) -> torch.Tensor:
    """A scikit-image sample photo as a (1, 3, H, W) float32 tensor in [0, 1]."""
    from skimage import data

    img = getattr(data, name)()
    return torch.from_numpy(img.copy()).permute(2, 0, 1).unsqueeze(0).float().div_(255).contiguous()


def luminance(rgb: torch.Tensor) -> torch.Tensor:
    """Rec. 709 luminance (N, H, W) of an (N, 3, H, W) image in [0, 1]."""
    return (0.2126 * rgb[:, 0] + 0.7152 * rgb[:, 1] + 0.0722 * rgb[:, 2]).clamp(0, 1)


def _time_ms(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _save(path: str, img: torch.Tensor) -> None:
    from skimage import io

    arr = (img[0].permute(1, 2, 0).clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()
    io.imsave(path, arr, check_contrast=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    ap.add_argument("--image", default="astronaut", choices=["astronaut", "coffee"], help="scikit-image photo")
    ap.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    ap.add_argument("--repeats", type=int, default=10, help="timed calls per implementation")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    photo = load_photo(args.image).to(device)
    guide = luminance(photo)
    grid = tone_grid().to(device)
    n, c, h, w = photo.shape

    with torch.no_grad():
        ours = bilateral_slice_apply(grid, guide, photo)
        peer = reference.bilateral_slice_apply(grid, guide, photo)
        ours_ms = _time_ms(lambda: bilateral_slice_apply(grid, guide, photo), device, args.repeats)
        peer_ms = _time_ms(lambda: reference.bilateral_slice_apply(grid, guide, photo), device, args.repeats)
    diff = (ours - peer).abs().max().item()

    os.makedirs(args.out, exist_ok=True)
    _save(os.path.join(args.out, "before.png"), photo)
    _save(os.path.join(args.out, "after.png"), ours)

    print(f"image: skimage.data.{args.image}() {w}x{h}, guide = luminance, grid {tuple(grid.shape)}, {device}")
    print(f"bilateral_ops.bilateral_slice_apply : {ours_ms:8.2f} ms (median of {args.repeats})")
    print(f"grid_sample path (reference)         : {peer_ms:8.2f} ms ({peer_ms / ours_ms:.1f}x slower)")
    print(f"max |ours - grid_sample|             : {diff:.2e}")
    print(f"mean luma before {guide.mean().item():.3f}, after {luminance(ours.clamp(0, 1)).mean().item():.3f}")
    print(f"wrote {os.path.join(args.out, 'before.png')} and {os.path.join(args.out, 'after.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
