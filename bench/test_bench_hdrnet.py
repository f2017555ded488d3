"""HDRNet: a training step and full-resolution inference, ours against the identical pure-torch
model (``ReferenceHDRNet``: the guide as an (N, 3, K, H, W) formula, ``F.grid_sample`` slicing).

Both models share one ``state_dict``; only the guide and the slice-apply differ, so the ratio is
what the fused ops buy a whole network.

* CPU training step: batch 4 of 384x384 crops of a photo, forward, L2 loss, backward, Adam step.
  ``extra_info`` also holds the split of the step, forward + backward of each piece timed on its
  own: the coefficient network (with the downsampling to its 256x256 input), the guide and the
  slice-apply, for both models, best-of-k measured alternately.
* CPU inference: batch 1 at 1920x1080 and 3840x2160, ``torch.no_grad``, float32; the split per
  stage as ``bilateral_ops.enhance`` prints it.
* CUDA inference (skipped without a device): 1920x1080 and 3840x2160, float32 and float16
  (autocast), eager, and ``torch.compile(mode="reduce-overhead")`` (CUDA graphs) at 1080p float16;
  images per second of ours and of the pure-torch model in the same run. Goal: >= 1000 images/s at 1080p
  in float16.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from bilateral_ops.enhance import timed_enhance
from bilateral_ops.models import HDRNet, ReferenceHDRNet
from bench_common import best_ms  # bench/ is on sys.path (conftest.py)

IMPLS = {"ours": HDRNet, "torch": ReferenceHDRNet}
INFER_SIZES = {"1920x1080": (1080, 1920), "3840x2160": (2160, 3840)}
ROUNDS = {"ours": 15, "torch": 4}


def _models(device: str = "cpu"):
    torch.manual_seed(0)
    ours = HDRNet().to(device)
    # Away from the identity initialisation, so that every guide curve point and grid cell is used.
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.02 * torch.randn_like(p))
    twin = ReferenceHDRNet().to(device)
    twin.load_state_dict(ours.state_dict())
    return {"ours": ours, "torch": twin}


def _batch(n: int, h: int, w: int, device: str = "cpu"):
    import bench_common as bc

    photo = F.interpolate(bc._photo(), (max(h, 512), max(w, 512)), mode="bilinear", align_corners=False)
    g = torch.Generator().manual_seed(1)
    crops = []
    for _ in range(n):
        top = int(torch.randint(photo.shape[2] - h + 1, (1,), generator=g))
        left = int(torch.randint(photo.shape[3] - w + 1, (1,), generator=g))
        crops.append(photo[0, :, top : top + h, left : left + w])
    x = torch.stack(crops).clamp(0, 1).contiguous().to(device)
    target = (x.pow(0.8) * torch.tensor([1.05, 1.0, 0.95], device=device).view(1, 3, 1, 1)).clamp(0, 1)
    return x, target


def _train_step(model, opt, x, target):
    loss = F.mse_loss(model(x), target)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _pieces(model, x):
    """Forward + backward of each piece of the network on its own (parameter gradients only, as
    in training: the image needs none)."""
    low = model.lowres(x)
    coeffs = model.coefficients(low).detach().requires_grad_(True)
    guide = model.guide(x).detach().requires_grad_(True)
    params = list(model.parameters())
    guide_params = [model.ccm, model.ccm_bias, model.shifts, model.slopes, model.mix, model.mix_bias]
    net_params = [p for p in params if all(p is not q for q in guide_params)]

    def coefficient_network():
        c = model.coefficients(model.lowres(x))
        torch.autograd.grad(c, net_params, torch.ones_like(c))

    def guide_fn():
        g = model.guide(x)
        torch.autograd.grad(g, guide_params, torch.ones_like(g))

    def slice_apply():
        out = model.apply_coefficients(coeffs, guide, x)
        torch.autograd.grad(out, [coeffs, guide], torch.ones_like(out))

    return {"coefficients": coefficient_network, "guide": guide_fn, "slice_apply": slice_apply}


@pytest.mark.parametrize("impl", list(IMPLS))
def test_cpu_train_step(benchmark, impl):
    models = _models()
    model = models[impl].train()
    x, target = _batch(4, 384, 384)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    benchmark.group = "cpu hdrnet train step 4x384x384"
    benchmark.extra_info.update(device="cpu", suite="hdrnet", op="train step", size="4x384x384", impl=impl,
                                threads=torch.get_num_threads())
    benchmark.pedantic(_train_step, args=(model, opt, x, target), rounds=ROUNDS[impl], warmup_rounds=2, iterations=1)
    benchmark.extra_info["split_ms"] = best_ms(_pieces(model, x), k=3 if impl == "ours" else 2)
    if impl == "ours":
        other = models["torch"].train()
        opt2 = torch.optim.Adam(other.parameters(), lr=1e-4)
        best = best_ms({"ours": lambda: _train_step(model, opt, x, target),
                         "torch": lambda: _train_step(other, opt2, x, target)}, k=3)
        benchmark.extra_info["interleaved_min_ms"] = best
        benchmark.extra_info["speedup_vs_torch"] = round(best["torch"] / best["ours"], 2)


@pytest.mark.parametrize("size", list(INFER_SIZES))
@pytest.mark.parametrize("impl", list(IMPLS))
def test_cpu_inference(benchmark, impl, size):
    models = _models()
    model = models[impl].eval()
    h, w = INFER_SIZES[size]
    x, _ = _batch(1, h, w)
    benchmark.group = f"cpu hdrnet inference {size}"
    benchmark.extra_info.update(device="cpu", suite="hdrnet", op="inference", size=size, impl=impl,
                                threads=torch.get_num_threads())

    def infer():
        with torch.no_grad():
            return model(x)

    benchmark.pedantic(infer, rounds=10 if impl == "ours" else 3, warmup_rounds=1, iterations=1)
    _, split = timed_enhance(model, x[0], repeats=3 if impl == "ours" else 1)
    benchmark.extra_info["split_ms"] = {k: round(v, 2) for k, v in split.items()}
    if impl == "ours":
        with torch.no_grad():
            diff = (model(x) - models["torch"].eval()(x)).abs().max().item()
        benchmark.extra_info["max_abs_diff_vs_torch"] = diff
        assert diff < 1e-4


# Eager everywhere; compiled (CUDA graphs, a compile of each model) where the goal is set: the
# compiles take most of a minute each.
CUDA_CASES = [(size, dtype, "eager") for size in INFER_SIZES for dtype in (torch.float32, torch.float16)]
CUDA_CASES.append(("1920x1080", torch.float16, "compiled"))


@pytest.mark.cuda
@pytest.mark.parametrize("size, dtype, mode", CUDA_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_cuda_inference(benchmark, requires_cuda, size, dtype, mode):
    import bench_common as bc

    h, w = INFER_SIZES[size]
    models = _models("cuda")
    x, _ = _batch(1, h, w, "cuda")
    rates, fns = {}, {}
    for impl, model in models.items():
        model.eval()
        net = torch.compile(model, mode="reduce-overhead", fullgraph=True) if mode == "compiled" else model

        def infer(net=net):
            with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                return net(x)

        fns[impl] = infer
        ms = bc.cuda_ms(infer, reps=20 if impl == "ours" else 5, repeats=5)
        rates[impl] = 1e3 / ms
    benchmark.group = f"cuda hdrnet inference {size}"
    benchmark.extra_info.update(device=torch.cuda.get_device_name(), suite="hdrnet", op=f"inference {mode}", size=size,
                                dtype=str(dtype).replace("torch.", ""),
                                images_per_s={k: round(v, 1) for k, v in rates.items()},
                                speedup_vs_torch=round(rates["ours"] / rates["torch"], 2))
    if mode == "eager":
        _, split = timed_enhance(models["ours"], x[0], repeats=5, dtype=None if dtype == torch.float32 else dtype)
        benchmark.extra_info["split_ms"] = {k: round(v, 3) for k, v in split.items()}
    benchmark.pedantic(lambda: (fns["ours"](), torch.cuda.synchronize()), rounds=10, warmup_rounds=2, iterations=1)
    torch._dynamo.reset()
