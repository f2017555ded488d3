"""curve_guide: ours vs the pure-torch guide of PyTorch HDRNet ports, and the clone() floor.

The peer is ``bilateral_ops.reference.curve_guide``: the formula as an HDRNet port writes it
(einsum for the colour matrix, relu of an (N, C, K, H, W) tensor, sums), which materialises one
value per (pixel, channel, curve point). The memory floor is a ``clone()`` of the input (every
pass reads the image once). Cases: batch 4 of 384x384 crops (HDRNet training), 512x512 and
1920x1080, RGB with 16 curve points (HDRNet's guide), float32. Modes: forward; "hdrnet", forward +
backward for the six parameters (HDRNet's full-resolution input needs no gradient); and
forward_backward, for the input too. Each (mode, case) is one group with the three
implementations side by side; extra_info holds best-of-k times measured alternately (a shared
machine's load then hits all alike), their ratios, and the peak extra resident memory of one call
of ours and of the peer, each measured in a fresh process.

CUDA (skipped without a device): the same cases and 3840x2160, float32 and float16, against the
bandwidth of a clone() of the same bytes in the same run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import bilateral_ops as bo

CASES = {"4x384x384": (4, 384, 384), "512x512": (1, 512, 512), "1920x1080": (1, 1080, 1920)}
CUDA_CASES = dict(CASES, **{"3840x2160": (1, 2160, 3840)})
C, K = 3, 16
IMPLS = ["ours", "torch", "clone"]
MODES = ["forward", "hdrnet", "forward_backward"]
# Rounds per implementation: the pure-torch guide takes ~0.2 s (forward + backward, 4x384x384)
# to ~0.8 s (1080p) per call on two cores.
ROUNDS = {"ours": 30, "torch": 5, "clone": 30}
MIB = 2**20


def curve_shapes() -> list[tuple[int, ...]]:
    """Every (N, C, H, W, K) benchmarked: tests/test_launch_config.py checks their CUDA plans."""
    return [(n, C, h, w, K) for n, h, w in CUDA_CASES.values()]


def make_case(n: int, h: int, w: int, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A smooth image in [0, 1] and parameters near HDRNet's initialisation, perturbed so that
    every curve point is in use."""
    g = torch.Generator().manual_seed(0)
    x = F.interpolate(torch.rand(n, C, 12, 12, generator=g), (h, w), mode="bilinear", align_corners=False)
    ccm = torch.eye(C) + 0.05 * torch.randn(C, C, generator=g)
    ccm_bias = 0.01 * torch.randn(C, generator=g)
    shifts = torch.linspace(0, 1, K + 1)[:-1].repeat(C, 1)
    slopes = torch.zeros(C, K)
    slopes[:, 0] = 1
    slopes += 0.1 * torch.randn(C, K, generator=g)
    mix = torch.full((C,), 1 / C)
    mix_bias = torch.zeros(1)
    return [t.to(device=device, dtype=dtype).contiguous() for t in (x, ccm, ccm_bias, shifts, slopes, mix, mix_bias)]


def impl_fn(impl: str, mode: str):
    """A callable of the case's tensors for one implementation and mode."""
    if impl == "clone":
        return lambda x, *params: x.clone()
    fn = bo.curve_guide if impl == "ours" else bo.reference.curve_guide

    def forward(*args):
        with torch.no_grad():
            return fn(*args)

    def backward(*args):
        want = [t for t in args if t.requires_grad]
        out = fn(*args)
        return torch.autograd.grad(out, want, torch.ones_like(out))

    return forward if mode == "forward" else backward


def prepared(mode: str, args):
    args = [t.detach().clone() for t in args]
    if mode != "forward":
        for i, t in enumerate(args):
            t.requires_grad_(i > 0 or mode == "forward_backward")
    return args


# ----------------------------------------------------------------------------------------------
# Peak memory, in a fresh process (this file run as a script).


def peak_extra_bytes(impl: str, case: str, mode: str) -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), impl, case, mode],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
    ).stdout
    return int(json.loads(out.strip().splitlines()[-1])["peak_extra_bytes"])


def _probe(impl: str, case: str, mode: str) -> int:
    import bench_common as bc  # here, not at the top: tests/test_launch_config.py loads this file

    fn = impl_fn(impl, mode)
    fn(*prepared(mode, make_case(1, 16, 16)))  # loads every library and kernel first
    args = prepared(mode, make_case(*CASES[case]))
    bc._reset_peak()
    before = bc._status_kib("VmRSS")
    res = fn(*args)
    after = bc._status_kib("VmHWM")
    del res
    return max(after - before, 0) * 1024


# ----------------------------------------------------------------------------------------------
# CPU


def _best_of(fns: dict, args, k: int) -> dict:
    best = {name: float("inf") for name in fns}
    for _ in range(k):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(*args)
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("impl", IMPLS)
def test_cpu(benchmark, impl, case, mode):
    args = prepared(mode, make_case(*CASES[case]))
    fn = impl_fn(impl, mode)
    benchmark.group = f"cpu curve_guide {mode} {case}"
    benchmark.extra_info.update(
        device="cpu", op=f"curve_guide {mode}", size=case, impl=impl, dtype="float32", threads=torch.get_num_threads()
    )
    benchmark.pedantic(fn, args=args, rounds=ROUNDS[impl], warmup_rounds=2, iterations=1)
    if impl != "ours":
        return
    if mode == "forward":
        with torch.no_grad():
            diff = (bo.curve_guide(*args) - bo.reference.curve_guide(*args)).abs().max().item()
        benchmark.extra_info["max_abs_diff_vs_torch"] = diff
        assert diff < 1e-5
    best = _best_of({i: impl_fn(i, mode) for i in IMPLS}, args, k=3)
    benchmark.extra_info["interleaved_min_ms"] = {n: round(t * 1e3, 3) for n, t in best.items()}
    benchmark.extra_info["speedup_vs_torch"] = round(best["torch"] / best["ours"], 2)
    benchmark.extra_info["ratio_to_clone"] = round(best["ours"] / best["clone"], 2)
    if mode != "forward_backward":
        mine, peer = (peak_extra_bytes(i, case, mode) for i in ("ours", "torch"))
        benchmark.extra_info["peak_extra_MiB"] = round(mine / MIB, 1)
        benchmark.extra_info["peer_peak_extra_MiB"] = round(peer / MIB, 1)
        assert mine < peer, f"ours {mine / MIB:.1f} MiB at peak, the pure-torch guide {peer / MIB:.1f} MiB"


# ----------------------------------------------------------------------------------------------
# CUDA: ours against the clone() bandwidth floor of the same bytes


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["forward", "hdrnet"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(CUDA_CASES))
def test_cuda(benchmark, requires_cuda, case, dtype, mode):
    import bench_common as bc

    n, h, w = CUDA_CASES[case]
    args = prepared(mode, make_case(n, h, w, device="cuda", dtype=dtype))
    fn = impl_fn("ours", mode)
    benchmark.group = f"cuda curve_guide {mode} {case}"
    benchmark.extra_info.update(device=torch.cuda.get_device_name(), op=f"curve_guide {mode}", size=case,
                                dtype=str(dtype).replace("torch.", ""))
    ms = bc.cuda_ms(lambda: fn(*args))
    # Bytes moved at the least: the forward reads the image and writes the guide; with the
    # backward, a second pass reads the image and grad_output.
    elem = args[0].element_size()
    nbytes = (n * C * h * w + n * h * w) * elem * (1 if mode == "forward" else 2)
    buf = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")  # clone reads and writes
    clone_ms = bc.cuda_ms(buf.clone)
    benchmark.extra_info.update(ms=round(ms, 4), clone_ms=round(clone_ms, 4),
                                fraction_of_clone_bandwidth=round(clone_ms / ms, 3))
    if mode != "forward":
        benchmark.extra_info["peer_ms"] = round(bc.cuda_ms(lambda: impl_fn("torch", mode)(*args), reps=3, repeats=3), 3)
    benchmark.pedantic(lambda: (fn(*args), torch.cuda.synchronize()), rounds=10, warmup_rounds=2, iterations=1)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    impl_, case_, mode_ = sys.argv[1:4]
    print(json.dumps({"peak_extra_bytes": _probe(impl_, case_, mode_)}))
