"""Deployment (bilateral_ops.export): torch.export with dynamic shapes, ONNX export of every op in
every variant checked by onnx.checker and run by onnxruntime at sizes the trace never saw, the
whole HDRNet, the opset refusals, the error of a plain torch.onnx.export, torch.compile still
calling our kernels, and the command line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.export import Dim

import bilateral_ops as bo
import bilateral_ops._library as lib
from bilateral_ops import export as bx
from bilateral_ops.models import HDRNet

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

OPS = torch.ops.bilateral_ops

# (variant, opset) pairs the ops are exported at: every variant at an opset it allows.
VARIANTS = [("gather", 18), ("gridsample5d", 20), ("tensorrt", 19)]
# onnxruntime against eager, |got - want| <= tol * (1 + max|want|) (tests/helpers.py's scaling).
TOL = {"gather": 1e-5, "gridsample5d": 1e-5, "tensorrt": 5e-5}
# Sizes the trace (batch 2, 40 x 56) never saw.
SIZES = [(1, 96, 128), (2, 201, 157), (1, 720, 1280)]
TRACE = (2, 40, 56)

# What the decompositions may emit: arithmetic, shape plumbing, Gather, MatMul, Conv,
# Pad, ScatterElements (never ScatterND: onnxruntime races on its repeated indices) and (HDRNet's
# low-resolution input) Resize. GridSample only in the GridSample variants.
ALLOWED = {
    "Abs", "Add", "And", "Cast", "Clip", "Concat", "Constant", "ConstantOfShape", "Conv", "Div",
    "Equal", "Exp", "Expand", "Flatten", "Floor", "Gather", "Gemm", "Greater", "Identity", "IsNaN",
    "Less", "MatMul", "Max", "Min", "Mul", "Neg", "Not", "Pad", "Pow", "Range", "Reciprocal",
    "ReduceMean", "ReduceSum", "Relu", "Reshape", "Resize", "ScatterElements", "Shape", "Slice", "Split",
    "Sqrt", "Squeeze", "Sub", "Transpose", "Unsqueeze", "Where",
}


def _dims():
    return Dim("N", min=1, max=64), Dim("H", min=8, max=8192), Dim("W", min=8, max=8192)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# One model per op. Each case: (module, inputs(n, h, w, gen), dynamic_shapes, big sizes too?)


class Slice(torch.nn.Module):
    def forward(self, grid, guide):
        return bo.bilateral_slice(grid, guide)


class SliceApply(torch.nn.Module):
    def __init__(self, has_offset=True):
        super().__init__()
        self.has_offset = has_offset

    def forward(self, grid, guide, x):
        return bo.bilateral_slice_apply(grid, guide, x, has_offset=self.has_offset)


class Splat(torch.nn.Module):
    def forward(self, x, guide):
        return bo.grid_splat(x, guide, (6, 9, 13))


class Blur(torch.nn.Module):
    def forward(self, grid):
        return bo.grid_blur(bo.grid_blur(grid, 1.0), (0.7, 0.0, 2.5))


class GridFilter(torch.nn.Module):
    def forward(self, x):
        return bo.bilateral_grid_filter(x, 0.1, 16.0)


class GuidedGridFilter(torch.nn.Module):
    def forward(self, x, guide):
        return bo.bilateral_grid_filter(x, 0.15, 8.0, guide=guide)


class ExactFilter(torch.nn.Module):
    """Every border type and distance, a guidance image and tensor sigmas."""

    def forward(self, x, guidance, sigma_color, sigma_space):
        a = bo.bilateral_blur(x, (3, 5), 0.1, (1.5, 2.0), "reflect", "l1")
        b = bo.bilateral_blur(x, 3, 0.2, 1.0, "replicate", "l2")
        c = bo.joint_bilateral_blur(x, guidance, 3, sigma_color, sigma_space, "constant", "l1")
        d = bo.bilateral_blur(x, 3, 0.3, 1.2, "circular", "l2")
        return torch.cat([a, b, c, d], 1)


class SmallExactFilter(torch.nn.Module):
    """One joint filter with tensor sigmas: the exact filter in the variants other than gather,
    where its decomposition is the same (exporting its many taps is slow)."""

    def forward(self, x, guidance, sigma_color, sigma_space):
        return bo.joint_bilateral_blur(x, guidance, 3, sigma_color, sigma_space, "reflect", "l2")


class Curve(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = _gen(3)
        k = 6
        self.ccm = torch.nn.Parameter(torch.eye(3) + 0.3 * torch.randn(3, 3, generator=g))
        self.ccm_bias = torch.nn.Parameter(0.1 * torch.randn(3, generator=g))
        self.shifts = torch.nn.Parameter(torch.linspace(0, 1, k + 1)[:-1].repeat(3, 1))
        self.slopes = torch.nn.Parameter(torch.randn(3, k, generator=g) * 0.3 + torch.eye(1, k))
        self.mix = torch.nn.Parameter(torch.full((3,), 0.4))
        self.mix_bias = torch.nn.Parameter(torch.tensor([0.05]))

    def forward(self, x):
        return bo.curve_guide(x, self.ccm, self.ccm_bias, self.shifts, self.slopes, self.mix, self.mix_bias)


def _guide(n, h, w, g):
    # Partly outside [0, 1] (clamps to the edge cells) and a few exact cell boundaries.
    guide = torch.rand(n, h, w, generator=g) * 1.2 - 0.1
    guide[:, ::7, ::5] = 0.5
    return guide


def _slice_inputs(n, h, w, g):
    return {"grid": torch.randn(n, 5, 8, 12, 10, generator=g), "guide": _guide(n, h, w, g)}


def _apply_inputs(n, h, w, g):
    return {
        "grid": torch.randn(n, 12, 8, 16, 16, generator=g),
        "guide": _guide(n, h, w, g),
        "x": torch.rand(n, 3, h, w, generator=g),
    }


def _apply_no_offset_inputs(n, h, w, g):
    d = _apply_inputs(n, h, w, g)
    d["grid"] = torch.randn(n, 8, 4, 7, 9, generator=g)
    d["x"] = torch.rand(n, 2, h, w, generator=g)
    return d


def _image_dims(*names):
    def make():
        N, H, W = _dims()
        spec = {"grid": {0: N}, "guide": {0: N, 1: H, 2: W}, "x": {0: N, 2: H, 3: W},
                "guidance": {0: N, 2: H, 3: W}, "sigma_color": {0: N}, "sigma_space": {0: N}}
        return {k: spec[k] for k in names}
    return make


def _batch_dims(*names):
    def make():
        N, _, _ = _dims()
        return {k: {0: N} for k in names}
    return make


CASES = {
    "bilateral_slice": (Slice, _slice_inputs, _image_dims("grid", "guide"), True),
    "bilateral_slice_apply": (SliceApply, _apply_inputs, _image_dims("grid", "guide", "x"), True),
    "bilateral_slice_apply_no_offset": (
        lambda: SliceApply(False), _apply_no_offset_inputs, _image_dims("grid", "guide", "x"), False,
    ),
    "grid_splat": (
        Splat, lambda n, h, w, g: {"x": torch.rand(n, 3, h, w, generator=g), "guide": _guide(n, h, w, g)},
        _image_dims("x", "guide"), True,
    ),
    "grid_blur": (
        Blur, lambda n, h, w, g: {"grid": torch.randn(n, 4, 7, 11, 9, generator=g)},
        _batch_dims("grid"), False,
    ),
    # The grid filter's grid size is ceil(H / sigma_space) x ceil(W / sigma_space): an int[3]
    # argument of its ops, so H and W are static in its export (N stays dynamic).
    "bilateral_grid_filter": (
        GridFilter, lambda n, h, w, g: {"x": torch.rand(n, 3, h, w, generator=g)}, _batch_dims("x"), None,
    ),
    "bilateral_grid_filter_guided": (
        GuidedGridFilter,
        lambda n, h, w, g: {"x": torch.rand(n, 2, h, w, generator=g), "guide": torch.rand(n, h, w, generator=g)},
        _batch_dims("x", "guide"), None,
    ),
    "bilateral_filter": (
        ExactFilter,
        lambda n, h, w, g: {
            "x": torch.rand(n, 3, h, w, generator=g),
            "guidance": torch.rand(n, 2, h, w, generator=g),
            "sigma_color": 0.1 + torch.rand(n, generator=g) * 0.2,
            "sigma_space": 1 + torch.rand(n, 2, generator=g),
        },
        _image_dims("x", "guidance", "sigma_color", "sigma_space"), False,
    ),
    "curve_guide": (Curve, lambda n, h, w, g: {"x": torch.rand(n, 3, h, w, generator=g)}, _image_dims("x"), True),
}
# Ops whose decomposition depends on the variant (they slice). The others decompose the same way in
# every variant: in the non-default ones they are checked at one size only (the opset differs).
SLICING = {"bilateral_slice", "bilateral_slice_apply", "bilateral_slice_apply_no_offset",
           "bilateral_grid_filter", "bilateral_grid_filter_guided"}
OP_CASES = [
    pytest.param(name, variant, opset, id=f"{name}-{variant}{opset}")
    for name in CASES
    for variant, opset in VARIANTS
] + [
    # The gather variant at the oldest opset it takes, and the TensorRT one at the oldest.
    pytest.param("bilateral_slice_apply", "gather", 17, id="bilateral_slice_apply-gather17"),
    pytest.param("bilateral_slice_apply", "tensorrt", 17, id="bilateral_slice_apply-tensorrt17"),
]


def _session(model_proto):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model_proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _run(session, inputs: dict) -> np.ndarray:
    names = [i.name for i in session.get_inputs()]
    assert set(names) <= set(inputs), f"model inputs {names}, given {sorted(inputs)}"
    return session.run(None, {k: inputs[k].numpy() for k in names})[0]


def _check_model(model_proto, variant: str, opset: int) -> dict[str, int]:
    onnx.checker.check_model(model_proto, full_check=True)
    assert bx.onnx_opset(model_proto) == opset
    types = bx.onnx_op_types(model_proto)
    custom = [t for t in types if "::" in t]
    assert not custom, f"custom-domain nodes {custom}"
    allowed = ALLOWED | ({"GridSample"} if variant != "gather" else set())
    assert set(types) <= allowed, f"op types outside the allow-list: {sorted(set(types) - allowed)}"
    if variant == "gather":
        assert "GridSample" not in types
    for node in model_proto.graph.node:
        if node.op_type == "GridSample":
            attrs = {a.name: a for a in node.attribute}
            mode = attrs["mode"].s.decode() if "mode" in attrs else ("linear" if opset >= 20 else "bilinear")
            assert mode == ("bilinear" if variant == "tensorrt" else "linear"), mode
    return types


def _assert_close(got: np.ndarray, want: torch.Tensor, tol: float, what: str) -> None:
    want = want.detach().double()
    got_t = torch.from_numpy(np.asarray(got)).double()
    assert got_t.shape == want.shape, f"{what}: shape {tuple(got_t.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got_t).all(), f"{what}: non-finite values"
    err = (got_t - want).abs().max().item()
    bound = tol * (1 + want.abs().max().item())
    assert err <= bound, f"{what}: max abs err {err:.3e} > {bound:.3e}"


@pytest.mark.parametrize("name, variant, opset", OP_CASES)
def test_op_exports_and_runs_in_onnxruntime(name, variant, opset):
    make, inputs, dims, big = CASES[name]
    if name == "bilateral_filter" and variant != "gather":
        make = SmallExactFilter
    model = make().eval()
    example = inputs(*TRACE, _gen(0))
    program = bx.export_onnx(model, tuple(example.values()), opset=opset, variant=variant, dynamic_shapes=dims())
    _check_model(program.model_proto, variant, opset)
    session = _session(program.model_proto)
    sizes = SIZES if big else SIZES[:2]
    if big is None:  # static H, W: other batches at the traced size
        sizes = [(1,) + TRACE[1:], (3,) + TRACE[1:]]
    if name not in SLICING and variant != "gather":
        sizes = sizes[:1]
    for i, (n, h, w) in enumerate(sizes):
        args = inputs(n, h, w, _gen(10 + i))
        with torch.no_grad():
            want = model(*args.values())
        _assert_close(_run(session, args), want, TOL[variant], f"{name} {variant} at {n}x{h}x{w}")


@pytest.mark.parametrize("variant", [v for v, _ in VARIANTS])
def test_slice_decompositions_in_eager_float64(variant):
    """The decompositions themselves, run eagerly in float64, against the kernels in both
    conventions, and align_corners=True against grid_sample(align_corners=True) at pixels
    u = linspace(0, 1, n) (index u (S - 1))."""
    import torch.nn.functional as F

    table = bx.decompositions(variant)
    g = _gen(5)
    grid = torch.randn(2, 8, 5, 7, 9, generator=g, dtype=torch.float64)
    guide = torch.rand(2, 23, 31, generator=g, dtype=torch.float64) * 1.2 - 0.1
    x = torch.rand(2, 3, 23, 31, generator=g, dtype=torch.float64)
    sl, sa = table[OPS.bilateral_slice.default], table[OPS.bilateral_slice_apply.default]
    torch.testing.assert_close(sl(grid, guide), bo.bilateral_slice(grid, guide), rtol=0, atol=1e-12)
    torch.testing.assert_close(sa(grid, guide, x), bo.bilateral_slice_apply(grid, guide, x), rtol=0, atol=1e-12)
    n, h, w = guide.shape
    ux = torch.linspace(-1, 1, w, dtype=torch.float64).view(1, 1, w).expand(n, h, w)
    uy = torch.linspace(-1, 1, h, dtype=torch.float64).view(1, h, 1).expand(n, h, w)
    xyz = torch.stack([ux, uy, guide.clamp(0, 1) * 2 - 1], -1).unsqueeze(1)
    want = F.grid_sample(grid, xyz, "bilinear", "border", align_corners=True)[:, :, 0]
    torch.testing.assert_close(sl(grid, guide, True), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(sl(grid, guide, True), bo.bilateral_slice(grid, guide, align_corners=True), rtol=0, atol=1e-12)
    torch.testing.assert_close(
        sa(grid, guide, x, True, True), bo.bilateral_slice_apply(grid, guide, x, align_corners=True), rtol=0, atol=1e-12
    )


def test_nan_and_inf_guides_stay_in_bounds():
    """NaN and infinite guide values never index outside the grid (onnxruntime would raise)."""
    model = SliceApply().eval()
    example = _apply_inputs(*TRACE, _gen(0))
    for variant, opset in VARIANTS:
        program = bx.export_onnx(
            model, tuple(example.values()), opset=opset, variant=variant,
            dynamic_shapes=_image_dims("grid", "guide", "x")(),
        )
        args = _apply_inputs(1, 16, 24, _gen(1))
        args["guide"][0, 0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30])
        got = _run(_session(program.model_proto), args)
        with torch.no_grad():
            want = model(*args.values())
        finite = torch.isfinite(want)
        _assert_close(got[finite.numpy()], want[finite], TOL[variant], variant)


# ----------------------------------------------------------------------------------------------
# Radiance-field grids: bilateral_slice_apply_points, grid_tv_loss, the lib_bilagrid drop-in


class Points(torch.nn.Module):
    def __init__(self, has_offset=True):
        super().__init__()
        self.has_offset = has_offset

    def forward(self, grid, coords, x, grid_idx):
        return bo.bilateral_slice_apply_points(grid, coords, x, grid_idx, self.has_offset)


class TvLoss(torch.nn.Module):
    def forward(self, grids, idx):
        return bo.grid_tv_loss(grids, idx) + 0.5 * bo.grid_tv_loss(grids)


class BilagridSlice(torch.nn.Module):
    """compat.bilagrid's slice of an image (nerfstudio's call: one 0-d grid index)."""

    def __init__(self):
        super().__init__()
        from bilateral_ops.compat import bilagrid

        self.bilagrid = bilagrid
        self.grids = bilagrid.BilateralGrid(3, 8, 6, 4)
        with torch.no_grad():
            self.grids.grids.add_(0.2 * torch.randn(self.grids.grids.shape, generator=_gen(7)))

    def forward(self, xy, rgb, grid_idx):
        return self.bilagrid.slice(self.grids, xy, rgb, grid_idx)["rgb"]


def _points_inputs(p, g, has_offset=True):
    ci, co = (3, 3) if has_offset else (2, 4)
    coords = torch.rand(p, 3, generator=g) * 1.4 - 0.2
    coords[: p // 10] = torch.floor(coords[: p // 10] * 8) / 8  # on knots and borders
    return {
        "grid": torch.randn(5, co * (ci + has_offset), 8, 16, 16, generator=g),
        "coords": coords,
        "x": torch.rand(p, ci, generator=g),
        "grid_idx": torch.randint(0, 5, (p,), generator=g),
    }


@pytest.mark.parametrize("variant, opset", VARIANTS, ids=[f"{v}{o}" for v, o in VARIANTS])
@pytest.mark.parametrize("has_offset", [True, False], ids=["offset", "no_offset"])
def test_points_op_exports(variant, opset, has_offset):
    """Dynamic sample count; unseen counts, coordinates outside [0, 1], on knots, NaN and
    infinite (they read the border cells, as the kernels do)."""
    model = Points(has_offset).eval()
    P = Dim("P", min=2, max=1 << 24)
    example = _points_inputs(100, _gen(0), has_offset)
    dims = {"grid": {}, "coords": {0: P}, "x": {0: P}, "grid_idx": {0: P}}
    program = bx.export_onnx(model, tuple(example.values()), opset=opset, variant=variant, dynamic_shapes=dims)
    types = _check_model(program.model_proto, variant, opset)
    assert "GridSample" not in types
    session = _session(program.model_proto)
    for i, p in enumerate((7, 20011)):
        args = _points_inputs(p, _gen(20 + i), has_offset)
        args["coords"][0, 0], args["coords"][1, 1], args["coords"][2, 2] = float("nan"), float("inf"), -float("inf")
        with torch.no_grad():
            want = model(*args.values())
        _assert_close(_run(session, args), want, TOL["gather"], f"points {variant} P={p}")


def test_grid_tv_loss_exports():
    """Dynamic grid and index counts, a grid with size-1 axes too."""
    model = TvLoss().eval()
    M, K = Dim("M", min=2, max=4096), Dim("K", min=1, max=4096)
    program = bx.export_onnx(
        model, (torch.randn(7, 12, 8, 16, 16), torch.tensor([1, 3])), dynamic_shapes={"grids": {0: M}, "idx": {0: K}}
    )
    _check_model(program.model_proto, "gather", bx.DEFAULT_OPSET)
    session = _session(program.model_proto)
    for i, (m, k) in enumerate(((11, 4), (600, 37))):
        args = {"grids": torch.randn(m, 12, 8, 16, 16, generator=_gen(30 + i)), "idx": torch.randint(0, m, (k,), generator=_gen(40 + i))}
        with torch.no_grad():
            want = model(*args.values())
        _assert_close(_run(session, args), want, 1e-5, f"tv M={m} K={k}")
    flat = bx.export_onnx(model, (torch.randn(3, 12, 1, 5, 1), torch.tensor([2])))
    args = {"grids": torch.randn(3, 12, 1, 5, 1, generator=_gen(50)), "idx": torch.tensor([2])}
    with torch.no_grad():
        want = model(*args.values())
    _assert_close(_run(_session(flat.model_proto), args), want, 1e-5, "tv with size-1 axes")


def test_lib_bilagrid_drop_in_exports():
    """compat.bilagrid.slice of a whole image (dynamic H, W): the gray level, the coordinates and
    the points op, end to end."""
    model = BilagridSlice().eval()
    H, W = Dim("H", min=2, max=8192), Dim("W", min=2, max=8192)

    def inputs(h, w, g):
        ys, xs = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
        return {"xy": torch.stack([xs, ys], -1)[None], "rgb": torch.rand(1, h, w, 3, generator=g), "grid_idx": torch.tensor(1)}

    example = inputs(24, 32, _gen(0))
    program = bx.export_onnx(model, tuple(example.values()), dynamic_shapes={"xy": {1: H, 2: W}, "rgb": {1: H, 2: W}, "grid_idx": {}})
    _check_model(program.model_proto, "gather", bx.DEFAULT_OPSET)
    args = inputs(97, 131, _gen(1))
    with torch.no_grad():
        want = model(*args.values())
    _assert_close(_run(_session(program.model_proto), args), want, 1e-5, "lib_bilagrid slice")


# ----------------------------------------------------------------------------------------------
# HDRNet end to end


def _hdrnet():
    torch.manual_seed(0)
    model = HDRNet(luma_bins=8, spatial_bins=16, guide_pts=8, net_input_size=64).eval()
    with torch.no_grad():  # a model whose grid varies: perturb the near-identity initialisation
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape))
    return model


@pytest.mark.parametrize("variant, opset", VARIANTS, ids=[f"{v}{o}" for v, o in VARIANTS])
def test_hdrnet_exports_end_to_end(variant, opset, tmp_path):
    model = _hdrnet()
    N, H, W = _dims()
    f = tmp_path / "hdrnet.onnx"
    x = torch.rand(*TRACE[:1], 3, *TRACE[1:], generator=_gen(0))
    program = bx.export_onnx(model, (x,), f, opset=opset, variant=variant, dynamic_shapes={"fullres": {0: N, 2: H, 3: W}})
    types = _check_model(program.model_proto, variant, opset)
    assert "Resize" in types  # the antialiased low-resolution input
    loaded = onnx.load(str(f))
    onnx.checker.check_model(loaded, full_check=True)
    session = ort.InferenceSession(str(f), providers=["CPUExecutionProvider"])
    for i, (n, h, w) in enumerate(SIZES):
        x = torch.rand(n, 3, h, w, generator=_gen(20 + i))
        with torch.no_grad():
            want = model(x)
        _assert_close(_run(session, {"fullres": x}), want, 1e-4, f"HDRNet {variant} at {n}x{h}x{w}")


def test_hdrnet_at_opset_17_is_refused_not_left_at_18():
    """HDRNet's antialiased resize needs opset 18: torch's converter would quietly keep 18."""
    model = _hdrnet()
    x = torch.rand(1, 3, 40, 56)
    with pytest.raises(ValueError, match="opset 17.*antialiased resize"):
        bx.export_onnx(model, (x,), opset=17)


# ----------------------------------------------------------------------------------------------
# Refusals and errors


@pytest.mark.parametrize(
    "variant, opset, match",
    [
        ("gather", 16, "opset 16 is not supported.*17 or newer"),
        ("gather", 11, "opset 11 is not supported"),
        ("tensorrt", 16, "opset 16 is not supported"),
        ("gridsample5d", 16, "opset 16 is not supported"),
        ("gridsample5d", 18, "needs opset 20 or newer"),
        ("gridsample5d", 19, "needs opset 20 or newer"),
        ("tensorrt", 20, "needs opset 19 or older"),
        ("bicubic", 18, "variant must be one of gather, gridsample5d, tensorrt"),
    ],
)
def test_unsupported_opsets_and_variants_raise_before_exporting(variant, opset, match, monkeypatch):
    def no_export(*a, **k):
        raise AssertionError("torch.export reached")

    monkeypatch.setattr(torch.export, "export", no_export)
    with pytest.raises(ValueError, match=match):
        bx.export_onnx(SliceApply(), tuple(_apply_inputs(1, 8, 8, _gen()).values()), opset=opset, variant=variant)


def test_missing_export_dependencies_name_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(ImportError, match=r"onnxscript.*bilateral_ops\[export\]"):
        bx.export_onnx(SliceApply(), tuple(_apply_inputs(1, 8, 8, _gen()).values()))


def test_a_backward_op_left_in_the_graph_is_named():
    class Backward(torch.nn.Module):
        def forward(self, go, grid, guide):
            return OPS._bilateral_slice_backward(go, grid, guide, False, [True, False])[0]

    grid, guide = _slice_inputs(1, 8, 8, _gen()).values()
    go = torch.randn(1, 5, 8, 8)
    with pytest.raises(ValueError, match="bilateral_ops::_bilateral_slice_backward"):
        bx.export_onnx(Backward(), (go, grid, guide))


@pytest.mark.parametrize("dynamo", [True, False])
def test_plain_torch_onnx_export_names_the_op_and_export_onnx(dynamo, tmp_path):
    model = SliceApply().eval()
    args = tuple(_apply_inputs(1, 16, 16, _gen()).values())
    with pytest.raises(Exception) as info:
        torch.onnx.export(model, args, str(tmp_path / "m.onnx"), dynamo=dynamo)
    text = str(info.value) + "".join(str(e) for e in _causes(info.value))
    assert "bilateral_ops::bilateral_slice_apply" in text
    assert "bilateral_ops.export.export_onnx" in text


@pytest.mark.parametrize("dynamo", [True, False])
def test_plain_export_of_a_model_with_parameters_names_the_op(dynamo, tmp_path):
    # Parameters require grad: the public functions' eager autograd must stay out of a traced
    # graph (torch.jit.trace, dynamo=False), which then holds the op and so the helpful error.
    with pytest.raises(Exception) as info:
        torch.onnx.export(Curve().eval(), (torch.rand(1, 3, 8, 8),), str(tmp_path / "m.onnx"), dynamo=dynamo)
    text = str(info.value) + "".join(str(e) for e in _causes(info.value))
    assert "bilateral_ops::curve_guide" in text and "export_onnx" in text


@pytest.mark.parametrize("dynamo", [True, False])
def test_plain_export_of_a_direct_op_call_names_the_op(dynamo, tmp_path):
    class Direct(torch.nn.Module):
        def forward(self, x, ccm, ccm_bias, shifts, slopes, mix, mix_bias):
            return OPS.curve_guide(x, ccm, ccm_bias, shifts, slopes, mix, mix_bias)

    c = Curve()
    args = (torch.rand(1, 3, 8, 8),) + tuple(p.detach() for p in c.parameters())
    with pytest.raises(Exception) as info:
        torch.onnx.export(Direct(), args, str(tmp_path / "m.onnx"), dynamo=dynamo)
    text = str(info.value) + "".join(str(e) for e in _causes(info.value))
    assert "bilateral_ops::curve_guide" in text and "export_onnx" in text


def _causes(exc):
    seen = []
    while exc is not None and len(seen) < 20:
        exc = exc.__cause__ or exc.__context__
        if exc is not None:
            seen.append(exc)
    return seen


def test_a_custom_translation_of_our_op_still_wins():
    """Our refusal ranks below a user's custom_translation_table entry (say, a custom-domain node
    for their own runtime plugin); here a stand-in that returns the input."""
    import onnxscript

    op = onnxscript.opset18

    def slice_apply(grid, guide, x, has_offset: bool = True):
        return op.Identity(x)

    model = SliceApply().eval()
    args = _apply_inputs(1, 16, 16, _gen())
    program = torch.onnx.export(
        model, tuple(args.values()), dynamo=True, verbose=False,
        custom_translation_table={OPS.bilateral_slice_apply.default: slice_apply},
    )
    got = _run(_session(program.model_proto), args)
    np.testing.assert_array_equal(got, args["x"].numpy())


# ----------------------------------------------------------------------------------------------
# torch.export with dynamic shapes; torch.compile keeps our kernels


@pytest.mark.parametrize("name", sorted(CASES))
def test_torch_export_with_dynamic_shapes(name):
    make, inputs, dims, big = CASES[name]
    model = make().eval()
    ep = torch.export.export(model, tuple(inputs(*TRACE, _gen()).values()), dynamic_shapes=dims())
    ops = {
        n.target.name() for n in ep.graph.nodes
        if isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "bilateral_ops"
    }
    assert ops, "the exported program calls no bilateral_ops op"
    sizes = [(3, 33, 47), (1, 64, 20)] if big is not None else [(3,) + TRACE[1:], (1,) + TRACE[1:]]
    for i, (n, h, w) in enumerate(sizes):
        args = inputs(n, h, w, _gen(30 + i))
        with torch.no_grad():
            torch.testing.assert_close(ep.module()(*args.values()), model(*args.values()), rtol=0, atol=0)


def test_hdrnet_torch_export_with_dynamic_shapes():
    model = _hdrnet()
    N, H, W = _dims()
    ep = torch.export.export(model, (torch.rand(2, 3, 40, 56),), dynamic_shapes={"fullres": {0: N, 2: H, 3: W}})
    for n, h, w in [(1, 33, 65), (3, 80, 24)]:
        x = torch.rand(n, 3, h, w)
        with torch.no_grad():
            torch.testing.assert_close(ep.module()(x), model(x), rtol=0, atol=0)


def test_no_op_has_a_composite_implicit_kernel():
    """A CompositeImplicitAutograd kernel would make torch.compile (and autograd) use the
    decomposition instead of our kernels."""
    for op in lib.OPS:
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"bilateral_ops::{op}", "CompositeImplicitAutograd"), op


def _op_calls(fn) -> dict[str, int]:
    """Calls of bilateral_ops ops while fn runs, as the profiler records dispatcher calls (a
    dispatch mode would make torch.compile recompile)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key: e.count for e in prof.key_averages() if e.key.startswith("bilateral_ops::")}


def test_compiled_hdrnet_still_calls_our_ops():
    """After torch.compile the graph AOTAutograd hands to the compiler holds our ops (not their
    decomposition), and running the compiled model calls them."""
    from torch._dynamo.backends.common import aot_autograd

    targets: list[str] = []

    def record(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    model = _hdrnet()
    x = torch.rand(1, 3, 48, 64)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=aot_autograd(fw_compiler=record), fullgraph=True)
    with torch.no_grad():
        want = model(x)
        compiled(x)  # compile
        out = []
        calls = _op_calls(lambda: out.append(compiled(x)))
    torch.testing.assert_close(out[0], want)
    assert "bilateral_ops.bilateral_slice_apply.default" in targets
    assert "bilateral_ops.curve_guide.default" in targets
    assert not any(t.endswith("grid_sampler_3d.default") or "index_select" in t for t in targets)
    assert calls == {"bilateral_ops::bilateral_slice_apply": 1, "bilateral_ops::curve_guide": 1}, calls
    torch._dynamo.reset()


def test_inductor_calls_our_kernel():
    from torch._inductor.utils import run_and_get_code

    grid, guide, x = _apply_inputs(1, 24, 32, _gen()).values()
    torch._dynamo.reset()
    fn = torch.compile(lambda a, b, c: bo.bilateral_slice_apply(a, b, c) * 2, backend="inductor", fullgraph=True)
    out, codes = run_and_get_code(fn, grid, guide, x)
    torch.testing.assert_close(out, 2 * bo.bilateral_slice_apply(grid, guide, x))
    assert any("bilateral_ops.bilateral_slice_apply" in c for c in codes)
    assert _op_calls(lambda: fn(grid, guide, x)) == {"bilateral_ops::bilateral_slice_apply": 1}
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------
# The command line on a trained checkpoint


def test_cli_exports_a_trained_checkpoint(tmp_path, capsys):
    cv2 = pytest.importorskip("cv2")
    from bilateral_ops import train

    ind, tgt = tmp_path / "in", tmp_path / "target"
    ind.mkdir(), tgt.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(40, 52), (48, 40), (37, 61), (44, 44)]):
        x = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        y = (255 * (x / 255.0) ** 0.7).astype(np.uint8)
        assert cv2.imwrite(str(ind / f"img{i}.png"), x) and cv2.imwrite(str(tgt / f"img{i}.png"), y)
    ckpt = tmp_path / "hdrnet.pt"
    assert train.main([
        "--pairs", str(ind), str(tgt), "--checkpoint", str(ckpt), "--steps", "2", "--crop", "32",
        "--batch-size", "2", "--eval-every", "0", "--no-progress", "--threads", "1",
        "--luma-bins", "4", "--spatial-bins", "8", "--net-input-size", "32", "--guide-pts", "4",
    ]) == 0
    capsys.readouterr()
    out = tmp_path / "onnx" / "hdrnet.onnx"
    assert bx.main(["--checkpoint", str(ckpt), "--out", str(out), "--height", "67", "--width", "91"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "variant gather" in printed
    diff = float(printed.split("max abs difference")[1].split()[0])
    assert diff <= 1e-4
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert "GridSample" not in bx.onnx_op_types(model)
    # Errors: a bad opset for the variant, a missing checkpoint.
    assert bx.main(["--checkpoint", str(ckpt), "--out", str(out), "--variant", "gridsample5d", "--opset", "18"]) == 2
    assert "needs opset 20" in capsys.readouterr().err
    assert bx.main(["--checkpoint", str(tmp_path / "missing.pt"), "--out", str(out)]) == 2
    assert "error" in capsys.readouterr().err
    # Opset 17 suits the variant but not HDRNet (its antialiased resize needs 18): refused after
    # the export, with the same message and status.
    assert bx.main(["--checkpoint", str(ckpt), "--out", str(out), "--opset", "17"]) == 2
    assert "error" in capsys.readouterr().err
