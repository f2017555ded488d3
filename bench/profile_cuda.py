"""Where the GPU time of each benchmarked CUDA case goes: per case, the wall time of one call
(CUDA events over back-to-back calls, the benchmarks' measure), the summed time of its kernels
(torch.profiler), and its heaviest kernels. A wall time far above the kernels' sum is host
overhead (Python, dispatch, launches, synchronisations); kernels far above their bytes over the
copy bandwidth are slow kernels. Run by bench/gpu_check.sh; prints one table per case.

    python bench/profile_cuda.py [--only SUBSTRING] [--top N]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_common as bc  # noqa: E402
import test_bench_bilagrid as bg  # noqa: E402
import test_bench_curve_guide as cg  # noqa: E402

import bilateral_ops as bo  # noqa: E402


def _bilagrid_cases():
    impls = ["ours", "lib_bilagrid"]
    try:
        import fused_bilagrid  # noqa: F401

        impls.append("fused_bilagrid")
    except ImportError:
        pass
    for kind in ("uniform", "irregular", "rays"):
        for impl in impls:
            for backward in (False, True):
                model, xy, rgb, idx, needs = bg._case(kind, "cuda")
                fn = bg._slice_fn(impl, model)
                yield (f"bilagrid {kind} {impl} {'fb' if backward else 'fwd'}",
                       lambda fn=fn, m=model, a=(xy, rgb, idx, needs), b=backward: bg._step(fn, m, *a, b))
    for impl in impls:
        model = bg._model(bg.TV_GRIDS, "cuda")
        if impl == "ours":
            tv = bg.bilagrid.total_variation_loss
        elif impl == "lib_bilagrid":
            tv = bg._lib_tv
        else:
            import fused_bilagrid

            tv = fused_bilagrid.total_variation_loss
        yield f"tv {impl} fwd", lambda tv=tv, m=model: tv(m.grids.detach())
        yield f"tv {impl} fb", lambda tv=tv, m=model: torch.autograd.grad(tv(m.grids), m.grids)


def _curve_cases():
    for name, (n, h, w) in (("3840x2160", (1, 2160, 3840)), ("4x384x384", (4, 384, 384))):
        for mode in ("forward", "forward_backward"):
            args = cg.prepared(mode, [t.cuda() for t in cg.make_case(n, h, w)])
            fn = cg.impl_fn("ours", mode)
            yield f"curve_guide {name} {mode}", lambda fn=fn, a=args: fn(*a)


def _filter_cases():
    x = torch.rand(1, 3, 1080, 1920, device="cuda")
    go = torch.randn_like(x)

    def fwd():
        with torch.no_grad():
            return bo.bilateral_blur(x, 9, 0.1, (3.0, 3.0))

    def fb():
        xr = x.detach().requires_grad_()
        return torch.autograd.grad(bo.bilateral_blur(xr, 9, 0.1, (3.0, 3.0)), xr, go)

    yield "filter 1080p k9 fwd", fwd
    yield "filter 1080p k9 fb", fb


def _slice_apply_cases():
    grid, guide, inp = bc.make_inputs(*bc.CUDA_SIZE["3840x2160"], device="cuda")
    go = torch.randn(1, 3, *bc.CUDA_SIZE["3840x2160"], device="cuda")

    def fwd():
        with torch.no_grad():
            return bo.bilateral_slice_apply(grid, guide, inp, True)

    def fb():
        g = grid.detach().requires_grad_()
        return torch.autograd.grad(bo.bilateral_slice_apply(g, guide, inp, True), g, go)

    yield "slice_apply 3840x2160 fwd", fwd
    yield "slice_apply 3840x2160 fb", fb


def profile_case(name: str, fn, top: int) -> None:
    wall = bc.cuda_ms(fn, reps=10, repeats=3)
    calls = 5
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels.sort(key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in kernels) / calls / 1e3
    print(f"== {name}: wall {wall:.3f} ms/call, kernels {total:.3f} ms/call")
    for e in kernels[:top]:
        print(f"   {e.device_time_total / calls / 1e3:8.4f} ms  x{e.count // calls:<3d} {e.key[:110]}")
    if wall > 1.5 * total + 0.02:
        # Mostly host time: the operators that spent it.
        ops = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CPU]
        ops.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
        for e in ops[:top]:
            print(f"   host {e.self_cpu_time_total / calls / 1e3:8.4f} ms  x{e.count // calls:<3d} {e.key[:100]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", default="")
    ap.add_argument("--top", type=int, default=6)
    opts = ap.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    for make in (_bilagrid_cases, _curve_cases, _filter_cases, _slice_apply_cases):
        for name, fn in make():
            if opts.only in name:
                profile_case(name, fn, opts.top)


if __name__ == "__main__":
    main()
