"""Enhance photos at full resolution with a trained HDRNet.

    python -m bilateral_ops.enhance --checkpoint C IN [IN ...] OUT_DIR [--device cuda] [--half]

Each IN is an image file or a folder of images (png, jpg, tif, bmp, webp); the results are
written to OUT_DIR as 8-bit PNGs named after their inputs. Any resolution works: the coefficient
network always sees a ``net_input_size`` square copy, the guide and the slice-apply run at full
resolution. For every image the time is printed, split into the coefficient network (including
the downsampling to its input), the guide, and the slice-apply; each stage is timed after a
warm-up call, synchronised on CUDA. ``--reference`` runs the same weights with the pure-torch guide
and ``F.grid_sample`` slicing, for comparison.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from .images import ImageError, list_images, read_rgb, write_png
from .train import model_from_checkpoint

__all__ = ["enhance", "main", "timed_enhance"]


def enhance(model: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) in [0, 1] -> (3, H, W), not clipped."""
    with torch.no_grad():
        return model(image[None])[0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_enhance(model, image: torch.Tensor, repeats: int = 1, dtype: torch.dtype | None = None):
    """Enhance ``image`` (3, H, W) on the model's device, stage by stage.

    Returns the (3, H, W) float32 result and a dict of median milliseconds per stage
    (``coefficients``, ``guide``, ``slice_apply``, ``total``) over ``repeats`` timed runs that
    follow one warm-up run. ``dtype`` (float16/bfloat16) runs the stages under autocast.
    """
    device = next(model.parameters()).device
    x = image[None].to(device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    stages = ("coefficients", "guide", "slice_apply")
    times: dict[str, list[float]] = {s: [] for s in stages}
    with torch.no_grad(), autocast:
        for i in range(repeats + 1):
            marks = []
            _sync(device)
            marks.append(time.perf_counter())
            coeffs = model.coefficients(model.lowres(x))
            _sync(device)
            marks.append(time.perf_counter())
            guide = model.guide(x)
            _sync(device)
            marks.append(time.perf_counter())
            out = model.apply_coefficients(coeffs, guide, x)
            _sync(device)
            marks.append(time.perf_counter())
            if i:
                for s, a, b in zip(stages, marks, marks[1:]):
                    times[s].append((b - a) * 1e3)
    result = {s: statistics.median(t) for s, t in times.items()}
    result["total"] = sum(result.values())
    return out[0].float(), result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bilateral_ops.enhance", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--checkpoint", required=True, help="a checkpoint written by bilateral_ops.train")
    ap.add_argument("paths", nargs="+", metavar="IN ... OUT_DIR", help="images or folders, then the output folder")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--half", action="store_true", help="float16 on CUDA, bfloat16 on CPU (autocast)")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per image after the warm-up (default 1)")
    ap.add_argument("--reference", action="store_true", help="use the pure-torch guide and grid_sample slicing")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads")
    args = ap.parse_args(argv)
    if len(args.paths) < 2:
        ap.error("give at least one input and the output folder")
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    *inputs, out_dir = args.paths
    if os.path.isfile(out_dir):
        ap.error(f"the last path is the output folder, but {out_dir} is a file")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = (torch.float16 if device.type == "cuda" else torch.bfloat16) if args.half else None
    try:
        files = list_images(inputs)
        model = model_from_checkpoint(args.checkpoint, device, reference=args.reference)
    except (ImageError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{'image':<28} {'size':>11} {'coeff ms':>9} {'guide ms':>9} {'slice ms':>9} {'total ms':>9}")
    failed = 0
    for path in files:
        try:
            img = read_rgb(path)
        except ImageError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed += 1
            continue
        out, t = timed_enhance(model, img, args.repeats, dtype)
        name = os.path.splitext(os.path.basename(path))[0] + ".png"
        write_png(os.path.join(out_dir, name), out)
        size = f"{img.shape[2]}x{img.shape[1]}"
        print(
            f"{os.path.basename(path):<28} {size:>11} {t['coefficients']:9.2f} {t['guide']:9.2f} "
            f"{t['slice_apply']:9.2f} {t['total']:9.2f}"
        )
    print(f"wrote {len(files) - failed} image(s) to {out_dir}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
