"""Inputs and the peak-memory probe shared by the benchmarks (and by report.py).

Run as a script, this module is the memory probe: it measures, in a fresh process, the peak extra
resident memory of one call of one implementation:

    python bench/bench_common.py {ours,grid_sample} H W {forward,forward_backward}

and prints one JSON line ``{"peak_extra_bytes": ...}``.
"""

from __future__ import annotations

import functools
import json
import resource
import sys

import torch
import torch.nn.functional as F

# Grid of every benchmark: 3->3 with offset, 8 luma bins, 16x16 cells (HDRNet's default).
GRID_SHAPE = (1, 12, 8, 16, 16)
SIZES = {"512x512": (512, 512), "1920x1080": (1080, 1920)}
CUDA_SIZE = {"3840x2160": (2160, 3840)}
# bilateral_filter: sizes and window widths of bench/test_bench_bilateral_filter.py.
FILTER_SIZES = {"512x512": (512, 512), "1920x1080": (1080, 1920)}
FILTER_KERNELS = (5, 9, 15)


def _photo() -> torch.Tensor:
    """skimage's astronaut as a (1, 3, 512, 512) float tensor in [0, 1]; a smooth random field if
    scikit-image is missing."""
    try:
        from skimage import data

        img = torch.from_numpy(data.astronaut().copy()).float().div_(255)
        return img.permute(2, 0, 1).unsqueeze(0).contiguous()
    except Exception:  # pragma: no cover - scikit-image is a bench dependency
        g = torch.Generator().manual_seed(0)
        coarse = torch.rand(1, 3, 8, 8, generator=g)
        return F.interpolate(coarse, (512, 512), mode="bicubic", align_corners=False).clamp_(0, 1)


GUIDES = ("photo", "noise")


def make_inputs(
    h: int, w: int, dtype: torch.dtype = torch.float32, device: str = "cpu", photo: bool = True, guide: str = "photo"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grid, guide, input) for an h x w image: the photo resized (bilinear) as input, and a fixed
    near-identity random grid (seeded). The guide is the photo's Rec.709 luminance in [0, 1]
    ("photo": smooth, few z cells per neighbourhood) or uniform noise in [0, 1] ("noise": what
    textured or noisy photos give, every z cell everywhere)."""
    g = torch.Generator().manual_seed(0)
    if photo:
        src = _photo()
    else:  # cheap smooth random field (memory probe: values do not matter)
        src = torch.rand(1, 3, 8, 8, generator=g)
    x = F.interpolate(src, (h, w), mode="bilinear", align_corners=False).clamp_(0, 1)
    if guide == "photo":
        guide_t = (0.2126 * x[:, 0] + 0.7152 * x[:, 1] + 0.0722 * x[:, 2]).clamp_(0, 1)
    elif guide == "noise":
        guide_t = torch.rand(1, h, w, generator=torch.Generator().manual_seed(2))
    else:
        raise ValueError(f"unknown guide {guide!r}")
    eye = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]]).reshape(1, 12, 1, 1, 1)
    grid = eye + 0.1 * torch.randn(GRID_SHAPE, generator=g)
    return (
        grid.to(device=device, dtype=dtype).contiguous(),
        guide_t.to(device=device, dtype=dtype).contiguous(),
        x.to(device=device, dtype=dtype).contiguous(),
    )


@functools.lru_cache(maxsize=None)
def cpu_inputs(size: str, guide: str = "photo") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The CPU float32 inputs of a named size and guide, built once per process."""
    h, w = SIZES[size]
    return make_inputs(h, w, guide=guide)


@functools.lru_cache(maxsize=None)
def peak_memory(impl: str, size: str, mode: str) -> int:
    """Peak extra resident memory (bytes) of one call, measured once per process, in a subprocess."""
    h, w = SIZES[size]
    return peak_extra_bytes(impl, h, w, mode)


def impl_fn(impl: str):
    import bilateral_ops as bo

    if impl == "ours":
        return bo.bilateral_slice_apply
    if impl == "grid_sample":
        return bo.reference.bilateral_slice_apply
    raise ValueError(f"unknown impl {impl!r}")


def best_ms(fns: dict, k: int) -> dict:
    """Best of ``k`` wall-clock times (ms, rounded to 0.01) of each callable of ``fns``, the
    callables alternated so that a change of load hits all of them alike."""
    import time

    best = {name: float("inf") for name in fns}
    for _ in range(k):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], (time.perf_counter() - t0) * 1e3)
    return {n: round(t, 2) for n, t in best.items()}


def cuda_ms(fn, reps: int = 20, repeats: int = 7) -> float:
    """Median over ``repeats`` of the mean time (ms) of ``reps`` back-to-back calls of ``fn()``,
    timed with CUDA events after 3 warm-up calls."""
    import statistics

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def record_bandwidth(benchmark, fn, nbytes: int, device: str = "cuda") -> None:
    """Time ``fn`` (CUDA events) and a ``clone()`` of ``nbytes`` bytes on the same device, and record
    both with the achieved bandwidth and its share of the clone's in ``extra_info``."""
    ms = cuda_ms(fn)
    buf = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)  # clone reads + writes nbytes
    clone_ms = cuda_ms(buf.clone)
    del buf
    gbs, clone_gbs = nbytes / ms / 1e6, nbytes / clone_ms / 1e6
    benchmark.extra_info.update(
        bytes=nbytes,
        event_ms=round(ms, 4),
        achieved_GBps=round(gbs, 1),
        clone_ms=round(clone_ms, 4),
        clone_GBps=round(clone_gbs, 1),
        pct_of_clone=round(100 * gbs / clone_gbs, 1),
    )


def forward_backward(fn, grid, guide, x, grad_out):
    """One forward and one backward for every argument that requires grad (no accumulation into
    .grad). HDRNet's input requires none: the backward then skips grad_input."""
    out = fn(grid, guide, x)
    return torch.autograd.grad(out, [t for t in (grid, guide, x) if t.requires_grad], grad_out)


# ----------------------------------------------------------------------------------------------
# Peak memory probe


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _probe(impl: str, h: int, w: int, mode: str) -> int:
    fn = impl_fn(impl)
    # Warm-up on a tiny input: loads every library and kernel, so only the call itself is measured.
    tg, tgd, tx = make_inputs(16, 16, photo=False)
    for t in (tg, tgd, tx):
        t.requires_grad_(mode == "forward_backward")
    if mode == "forward_backward":
        forward_backward(fn, tg, tgd, tx, torch.ones(1, 3, 16, 16))
    else:
        fn(tg, tgd, tx)

    grid, guide, x = make_inputs(h, w, photo=False)
    grad_out = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(1))
    with torch.set_grad_enabled(mode == "forward_backward"):
        for t in (grid, guide, x):
            t.requires_grad_(mode == "forward_backward")
        if _reset_peak() and _status_kib("VmHWM") is not None:
            before = _status_kib("VmRSS")
            res = fn(grid, guide, x) if mode == "forward" else forward_backward(fn, grid, guide, x, grad_out)
            after = _status_kib("VmHWM")
        else:  # ru_maxrss is a running maximum: exact only if the call sets a new peak
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            res = fn(grid, guide, x) if mode == "forward" else forward_backward(fn, grid, guide, x, grad_out)
            after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del res
    return max(after - before, 0) * 1024


def peak_extra_bytes(impl: str, h: int, w: int, mode: str) -> int:
    """Peak extra resident memory of one call, measured in a fresh subprocess."""
    import os
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), impl, str(h), str(w), mode],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
    ).stdout
    return int(json.loads(out.strip().splitlines()[-1])["peak_extra_bytes"])


if __name__ == "__main__":
    impl, h, w, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    if mode not in ("forward", "forward_backward"):
        raise SystemExit(f"mode must be forward or forward_backward, got {mode!r}")
    print(json.dumps({"peak_extra_bytes": _probe(impl, h, w, mode)}))
