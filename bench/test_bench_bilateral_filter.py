"""bilateral_filter: ours vs kornia and OpenCV, side by side.

CPU, float32, batch 1, RGB, the photo (bench_common) at 512x512 and 1920x1080, windows k = 5, 9, 15,
sigma_color 0.1 and sigma_space 3 (the peers' exact calls):

* ours: ``bilateral_ops.bilateral_blur(x, k, 0.1, (3.0, 3.0))``;
* kornia: ``kornia.filters.bilateral_blur(x, k, 0.1, (3.0, 3.0))``;
* OpenCV: ``cv2.bilateralFilter(img, k, 0.1, 3.0)`` on the float32 HxWx3 image, forward only, with
  as many threads as torch. Its window is the disc of radius k // 2 (49 taps for k = 9 where ours
  has 81), so ``extra_info`` records taps per second: compare those across implementations.

Forward, and forward + backward (input gradient). kornia's unfold materialises (2C + 3) (forward)
or about (3C + 6) (forward + backward) tensors of H x W x k^2 floats; where that exceeds the
memory budget of this shared machine, kornia is not run and the test records its failure
("needs X GB") as an xfail rather than pushing the machine into swap.

CUDA (skipped without a device): ours vs kornia on the GPU at 1920x1080, k = 9, forward and
forward + backward.
"""

from __future__ import annotations

import os

import bench_common as bc
import pytest
import torch
import torch.nn.functional as F

import bilateral_ops as bo

kornia = pytest.importorskip("kornia")
cv2 = pytest.importorskip("cv2")

SIGMA_COLOR = 0.1
SIGMA_SPACE = 3.0
GB = 1e9
# kornia's peak may not exceed this (and half of the memory available when the bench starts):
# three engineers share 24 GiB.
KORNIA_BUDGET = 8 * GB
ROUNDS = {"ours": 5, "kornia": 2, "opencv": 5}


def _available_bytes() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024.0
    except OSError:
        pass
    return float("inf")


def kornia_bytes(h: int, w: int, k: int, c: int = 3, backward: bool = False) -> float:
    """Peak bytes of kornia's unfold path: every H x W x k^2 float32 intermediate alive at once
    (the difference per channel and its absolute value, the distance, colour and full kernels;
    with autograd, the saved tensors and their gradients)."""
    planes = 3 * c + 6 if backward else 2 * c + 3
    return planes * h * w * k * k * 4.0


def _image(size: str) -> torch.Tensor:
    h, w = bc.FILTER_SIZES[size]
    return F.interpolate(bc._photo(), (h, w), mode="bilinear", align_corners=False).clamp_(0, 1).contiguous()


def _disc_taps(k: int) -> int:
    r = k // 2
    return sum(1 for i in range(-r, r + 1) for j in range(-r, r + 1) if i * i + j * j <= r * r)


def _taps(impl: str, h: int, w: int, k: int) -> int:
    return h * w * (_disc_taps(k) if impl == "opencv" else k * k)


def _info(benchmark, mode, size, k, impl):
    benchmark.group = f"filter cpu {mode} {size} k={k}"
    h, w = bc.FILTER_SIZES[size]
    benchmark.extra_info.update(
        device="cpu", op=mode, size=size, k=k, impl=impl, dtype="float32", threads=torch.get_num_threads(),
        taps=_taps(impl, h, w, k),
    )


def _finish(benchmark, impl, size, k):
    h, w = bc.FILTER_SIZES[size]
    best = benchmark.stats.stats.min
    benchmark.extra_info["taps_per_s"] = round(_taps(impl, h, w, k) / best)


def _kornia_fits(h, w, k, backward) -> None:
    need = kornia_bytes(h, w, k, backward=backward)
    budget = min(KORNIA_BUDGET, 0.5 * _available_bytes())
    if need > budget:
        pytest.xfail(f"kornia's unfold needs ~{need / GB:.1f} GB here (budget {budget / GB:.1f} GB on this shared machine)")


def _forward_backward(fn, x, go):
    x = x.detach().requires_grad_(True)
    out = fn(x)
    (g,) = torch.autograd.grad(out, x, go)
    return g


FN = {
    "ours": lambda k: (lambda x: bo.bilateral_blur(x, k, SIGMA_COLOR, (SIGMA_SPACE, SIGMA_SPACE))),
    "kornia": lambda k: (lambda x: kornia.filters.bilateral_blur(x, k, SIGMA_COLOR, (SIGMA_SPACE, SIGMA_SPACE))),
}


@pytest.mark.parametrize("k", bc.FILTER_KERNELS)
@pytest.mark.parametrize("size", list(bc.FILTER_SIZES))
@pytest.mark.parametrize("impl", ["ours", "kornia", "opencv"])
def test_filter_forward(benchmark, impl, size, k):
    _info(benchmark, "forward", size, k, impl)
    x = _image(size)
    h, w = bc.FILTER_SIZES[size]
    if impl == "opencv":
        cv2.setNumThreads(torch.get_num_threads())
        img = x[0].permute(1, 2, 0).contiguous().numpy()
        benchmark.pedantic(cv2.bilateralFilter, args=(img, k, SIGMA_COLOR, SIGMA_SPACE), rounds=ROUNDS[impl],
                           warmup_rounds=1, iterations=1)
    else:
        if impl == "kornia":
            _kornia_fits(h, w, k, backward=False)
        with torch.no_grad():
            benchmark.pedantic(FN[impl](k), args=(x,), rounds=ROUNDS[impl], warmup_rounds=1, iterations=1)
    _finish(benchmark, impl, size, k)


@pytest.mark.parametrize("k", bc.FILTER_KERNELS)
@pytest.mark.parametrize("size", list(bc.FILTER_SIZES))
@pytest.mark.parametrize("impl", ["ours", "kornia"])
def test_filter_forward_backward(benchmark, impl, size, k):
    _info(benchmark, "forward_backward", size, k, impl)
    x = _image(size)
    h, w = bc.FILTER_SIZES[size]
    if impl == "kornia":
        _kornia_fits(h, w, k, backward=True)
    go = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    benchmark.pedantic(_forward_backward, args=(FN[impl](k), x, go), rounds=ROUNDS[impl], warmup_rounds=1, iterations=1)
    _finish(benchmark, impl, size, k)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("impl", ["ours", "kornia"])
def test_cuda_filter(benchmark, requires_cuda, impl, mode):
    """1920x1080, k = 9, float32 on the GPU; each call synchronises so that the time is the GPU's."""
    k = 9
    benchmark.group = f"filter cuda {mode} 1920x1080 k={k}"
    benchmark.extra_info.update(device=torch.cuda.get_device_name(), op=mode, impl=impl, k=k, dtype="float32")
    x = _image("1920x1080").cuda()
    go = torch.randn(x.shape, device="cuda")
    fn = FN[impl](k)
    if impl == "kornia" and kornia_bytes(1080, 1920, k, backward=mode != "forward") > 0.8 * torch.cuda.mem_get_info()[0]:
        pytest.xfail("kornia's unfold does not fit in the GPU's free memory")

    def step():
        if mode == "forward":
            with torch.no_grad():
                fn(x)
        else:
            _forward_backward(fn, x, go)

    def call():
        step()
        torch.cuda.synchronize()

    benchmark.pedantic(call, rounds=10 if impl == "ours" else 3, warmup_rounds=2, iterations=1)
    # The other GPU rows' measure as well: CUDA events around back-to-back calls, where the host's
    # work overlaps the kernels as in a training loop (a synchronised call adds its launch latency
    # and the wait for the host's first kernel: ~0.2 ms of ours' 1.35 ms on the H200).
    reps, repeats = (20, 7) if impl == "ours" else (3, 3)
    benchmark.extra_info["event_ms"] = round(bc.cuda_ms(step, reps=reps, repeats=repeats), 4)


@pytest.mark.cuda
@pytest.mark.parametrize("k", [17, 19, 23])
def test_cuda_joint_filter_guidance_grad(benchmark, requires_cuda, k):
    """A joint RGB-by-RGB filter at 1920x1080, float32, with the guidance's gradient (a trained
    guide): pass 2 from the saved weight sums stages the input beside the guidance, so windows past
    k = 17 no longer fit its 48 KiB tile and take the generic pass-2 kernel. Measures that step."""
    benchmark.group = "filter cuda joint guidance grad 1920x1080"
    benchmark.extra_info.update(device=torch.cuda.get_device_name(), op="forward_backward", impl="ours", k=k,
                                dtype="float32")
    x = _image("1920x1080").cuda()
    gd = x.flip(-1).contiguous().requires_grad_()
    x = x.requires_grad_()
    go = torch.randn(x.shape, device="cuda")

    def step():
        out = bo.joint_bilateral_blur(x, gd, k, SIGMA_COLOR, (SIGMA_SPACE, SIGMA_SPACE))
        torch.autograd.grad(out, (x, gd), go)

    def call():
        step()
        torch.cuda.synchronize()

    benchmark.pedantic(call, rounds=10, warmup_rounds=2, iterations=1)
    benchmark.extra_info["event_ms"] = round(bc.cuda_ms(step, reps=10, repeats=5), 4)


def test_kornia_memory_model_is_not_optimistic():
    """The budget check above relies on kornia_bytes; at a small size, measure kornia's peak resident
    memory growth and check that the model does not underestimate it by more than 2x."""
    if os.environ.get("BILATERAL_OPS_BENCH_SKIP_PROBE"):
        pytest.skip("probe disabled")
    import resource

    x = _image("512x512")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with torch.no_grad():
        kornia.filters.bilateral_blur(x, 15, SIGMA_COLOR, (SIGMA_SPACE, SIGMA_SPACE))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    grown = after - before
    if grown <= 0:
        pytest.skip("an earlier test already set a higher peak")
    assert kornia_bytes(512, 512, 15) >= 0.5 * grown
