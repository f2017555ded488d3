"""HDRNet exported to ONNX (bilateral_ops.export), run by onnxruntime on the CPU, against our eager
model, at 1920x1080, batch 1, float32.

One export per variant (gather at opset 18, gridsample5d at 20, tensorrt at 19) of the default
HDRNet (luma_bins 8, spatial_bins 16, guide_pts 16, net_input_size 256), with dynamic N, H, W.
``extra_info`` holds the node count and the op-type histogram of each model, the max difference
from eager, and the best-of-k times of onnxruntime and of our eager model measured alternately in
the same process (``interleaved_min_ms``), whose ratio is ``slowdown_vs_eager``. onnxruntime uses
as many intra-op threads as torch (``torch.get_num_threads()``).
"""

from __future__ import annotations

import time

import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

from bilateral_ops import export as bx
from bilateral_ops.models import HDRNet
from bench_common import best_ms  # bench/ is on sys.path (conftest.py)

VARIANTS = {"gather": 18, "gridsample5d": 20, "tensorrt": 19}
H, W = 1080, 1920


def _model() -> HDRNet:
    torch.manual_seed(0)
    model = HDRNet().eval()
    with torch.no_grad():  # away from the identity initialisation, as in test_bench_hdrnet
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def _image() -> torch.Tensor:
    import bench_common as bc
    import torch.nn.functional as F

    return F.interpolate(bc._photo(), (H, W), mode="bilinear", align_corners=False).clamp(0, 1).contiguous()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hdrnet_onnxruntime_cpu_1080p(benchmark, variant):
    model = _model()
    x = _image()
    dim = torch.export.Dim
    opset = VARIANTS[variant]
    t0 = time.perf_counter()
    program = bx.export_onnx(
        model, (torch.rand(2, 3, 64, 96),), opset=opset, variant=variant,
        dynamic_shapes={"fullres": {0: dim("N", min=1, max=64), 2: dim("H", min=8, max=8192), 3: dim("W", min=8, max=8192)}},
    )
    export_s = time.perf_counter() - t0
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.log_severity_level = 3
    session = ort.InferenceSession(program.model_proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}

    def run_onnx():
        return session.run(None, feed)[0]

    def run_eager():
        with torch.no_grad():
            return model(x)

    diff = (torch.from_numpy(run_onnx()) - run_eager()).abs().max().item()
    assert diff < 1e-4
    types = bx.onnx_op_types(program.model_proto)
    best = best_ms({"onnxruntime": run_onnx, "eager": run_eager}, k=5)
    benchmark.group = "cpu hdrnet onnxruntime 1920x1080"
    benchmark.extra_info.update(
        device="cpu", suite="export", op="hdrnet inference", size=f"{W}x{H}", impl=f"onnxruntime {variant}",
        opset=opset, threads=torch.get_num_threads(), torch=torch.__version__, onnxruntime=ort.__version__,
        nodes=len(program.model_proto.graph.node), op_types=types, export_s=round(export_s, 1),
        max_abs_diff_vs_eager=diff, interleaved_min_ms=best,
        slowdown_vs_eager=round(best["onnxruntime"] / best["eager"], 2),
    )
    benchmark.pedantic(run_onnx, rounds=5, warmup_rounds=1, iterations=1)


def test_hdrnet_eager_cpu_1080p(benchmark):
    """Our eager model, the baseline of the runs above."""
    model = _model()
    x = _image()
    benchmark.group = "cpu hdrnet onnxruntime 1920x1080"
    benchmark.extra_info.update(device="cpu", suite="export", op="hdrnet inference", size=f"{W}x{H}", impl="eager",
                                threads=torch.get_num_threads(), torch=torch.__version__)

    def run():
        with torch.no_grad():
            return model(x)

    benchmark.pedantic(run, rounds=10, warmup_rounds=1, iterations=1)
