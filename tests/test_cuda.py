"""CUDA kernels of bilateral_slice / bilateral_slice_apply against the CPU float64 kernels.

The oracle is the compiled CPU op on float64 copies of exactly the same (dtype-rounded) inputs, so
every difference is the CUDA kernel's own rounding. grad_grid is checked on both CUDA paths: the
default atomic scatter and the deterministic gather (torch.use_deterministic_algorithms(True)).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import bilateral_ops  # noqa: F401  (registers the ops)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

ops = torch.ops.bilateral_ops

TOL = {torch.float32: 1e-4, torch.float64: 1e-10, torch.float16: 1e-2, torch.bfloat16: 3e-2}

# (N, Co, Ci, D, Gh, Gw, H, W): odd sizes, a 1x1x1 grid, images smaller than the grid, tiles that
# touch many cells (the shared-memory path), a grid as fine as the image (the global-atomic
# fallback), wide cells (whole warps on one cell).
SHAPES = [
    (1, 3, 3, 8, 16, 16, 37, 53),
    (2, 1, 1, 1, 1, 1, 5, 7),
    (1, 3, 4, 4, 8, 16, 3, 2),
    (2, 3, 1, 8, 5, 7, 70, 130),
    (1, 1, 4, 16, 64, 64, 64, 64),
    (1, 3, 3, 8, 2, 4, 64, 256),
]


@contextlib.contextmanager
def deterministic(flag: bool):
    old = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(flag)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old, warn_only=old_warn)


def _noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout (every other element of a wider buffer)."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


def _case(N, C, Ci, D, Gh, Gw, H, W, dtype, *, lo=0.0, hi=1.0, noncontig=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    grid = torch.randn(N, C, D, Gh, Gw, generator=g, dtype=torch.float64)
    guide = lo + (hi - lo) * torch.rand(N, H, W, generator=g, dtype=torch.float64)
    inp = torch.rand(N, Ci, H, W, generator=g, dtype=torch.float64) if Ci else None
    # Round to the tested dtype once: CPU oracle and CUDA see the same values.
    grid, guide = grid.to(dtype), guide.to(dtype)
    inp = inp.to(dtype) if inp is not None else None
    cuda = [t.cuda() if t is not None else None for t in (grid, guide, inp)]
    if noncontig:
        cuda = [_noncontiguous(t) if t is not None else None for t in cuda]
    return (grid, guide, inp), tuple(cuda)


def _assert_close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    assert got.dtype == dtype, (what, got.dtype, dtype)
    got = got.detach().cpu().double()
    ref = ref.double()
    tol = TOL[dtype]
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol * scale, equal_nan=True, msg=lambda m: f"{what}: {m}")


def _cpu64(t):
    return t.double() if t is not None else None


def _slice_check(shape, dtype, *, lo=0.0, hi=1.0, noncontig=False):
    N, Co, Ci, D, Gh, Gw, H, W = shape
    C = Co * (Ci + 1)
    (grid, guide, _), (grid_c, guide_c, _) = _case(N, C, 0, D, Gh, Gw, H, W, dtype, lo=lo, hi=hi, noncontig=noncontig)
    ref = ops.bilateral_slice(_cpu64(grid), _cpu64(guide))
    out = ops.bilateral_slice(grid_c, guide_c)
    _assert_close(out, ref, dtype, "slice forward")

    gout = torch.randn(N, C, H, W, dtype=torch.float64).to(dtype)
    ref_gg, ref_gd = ops._bilateral_slice_backward(_cpu64(gout), _cpu64(grid), _cpu64(guide))
    gout_c = _noncontiguous(gout.cuda()) if noncontig else gout.cuda()
    for det in (False, True):
        with deterministic(det):
            gg, gd = ops._bilateral_slice_backward(gout_c, grid_c, guide_c)
            torch.cuda.synchronize()
        _assert_close(gg, ref_gg, dtype, f"slice grad_grid (deterministic={det})")
        _assert_close(gd, ref_gd, dtype, f"slice grad_guide (deterministic={det})")


def _apply_check(shape, dtype, has_offset, *, lo=0.0, hi=1.0, noncontig=False):
    N, Co, Ci, D, Gh, Gw, H, W = shape
    C = Co * (Ci + (1 if has_offset else 0))
    (grid, guide, inp), (grid_c, guide_c, inp_c) = _case(
        N, C, Ci, D, Gh, Gw, H, W, dtype, lo=lo, hi=hi, noncontig=noncontig
    )
    ref = ops.bilateral_slice_apply(_cpu64(grid), _cpu64(guide), _cpu64(inp), has_offset)
    out = ops.bilateral_slice_apply(grid_c, guide_c, inp_c, has_offset)
    _assert_close(out, ref, dtype, "apply forward")

    gout = torch.randn(N, Co, H, W, dtype=torch.float64).to(dtype)
    ref_g = ops._bilateral_slice_apply_backward(_cpu64(gout), _cpu64(grid), _cpu64(guide), _cpu64(inp), has_offset)
    gout_c = _noncontiguous(gout.cuda()) if noncontig else gout.cuda()
    for det in (False, True):
        with deterministic(det):
            got = ops._bilateral_slice_apply_backward(gout_c, grid_c, guide_c, inp_c, has_offset)
            torch.cuda.synchronize()
        for name, g, r in zip(("grad_grid", "grad_guide", "grad_input"), got, ref_g):
            _assert_close(g, r, dtype, f"apply {name} (deterministic={det}, has_offset={has_offset})")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_slice_matches_cpu(shape, dtype):
    _slice_check(shape, dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("has_offset", [True, False])
def test_apply_matches_cpu(shape, dtype, has_offset):
    _apply_check(shape, dtype, has_offset)


# Affine rows of up to 4 coefficients take the float4 forward kernel with one chunk, 5..8 with two,
# wider rows (Ci = 8 with an offset) the scalar kernel.
@pytest.mark.parametrize("Ci", [1, 3, 4, 5, 7, 8])
@pytest.mark.parametrize("Co", [1, 3])
@pytest.mark.parametrize("has_offset", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_apply_channel_counts(Ci, Co, has_offset, dtype):
    _apply_check((2, Co, Ci, 8, 8, 8, 41, 67), dtype, has_offset)


@pytest.mark.parametrize("C", [1, 3, 4, 5, 13])
def test_slice_channel_counts(C):
    # Slice packs channels in rows of 4: remainders must neither be lost nor overwrite others.
    N, D, Gh, Gw, H, W = 2, 6, 5, 7, 33, 45
    (grid, guide, _), (grid_c, guide_c, _) = _case(N, C, 0, D, Gh, Gw, H, W, torch.float32)
    _assert_close(ops.bilateral_slice(grid_c, guide_c), ops.bilateral_slice(grid.double(), guide.double()),
                  torch.float32, f"slice C={C}")


@pytest.mark.parametrize("seed", range(4))
def test_random_shapes(seed):
    g = torch.Generator().manual_seed(100 + seed)

    def r(a, b):
        return int(torch.randint(a, b + 1, (1,), generator=g))

    shape = (r(1, 2), r(1, 3), r(1, 4), r(1, 9), r(1, 17), r(1, 17), r(1, 90), r(1, 90))
    _slice_check(shape, torch.float32)
    _apply_check(shape, torch.float32, bool(seed % 2))


def test_guide_outside_unit_interval():
    shape = (2, 3, 3, 8, 8, 8, 33, 47)
    _slice_check(shape, torch.float32, lo=-0.4, hi=1.4)
    _apply_check(shape, torch.float32, True, lo=-0.4, hi=1.4)


def test_noncontiguous_inputs():
    shape = (2, 3, 3, 8, 8, 8, 33, 47)
    _slice_check(shape, torch.float32, noncontig=True)
    _apply_check(shape, torch.float32, True, noncontig=True)
    _apply_check(shape, torch.float16, False, noncontig=True)


def test_nonfinite_guide_does_not_crash():
    N, Co, Ci, D, Gh, Gw, H, W = 2, 3, 3, 8, 8, 8, 19, 23
    C = Co * (Ci + 1)
    (grid, guide, inp), (grid_c, guide_c, inp_c) = _case(N, C, Ci, D, Gh, Gw, H, W, torch.float32)
    bad = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -1e30])
    guide = guide.clone()
    guide.view(-1)[: bad.numel() * 7 : 7] = bad
    guide_c = guide.cuda()
    gout_s = torch.randn(N, C, H, W).cuda()
    gout_a = torch.randn(N, Co, H, W).cuda()
    for det in (False, True):
        with deterministic(det):
            out = ops.bilateral_slice(grid_c, guide_c)
            ops._bilateral_slice_backward(gout_s, grid_c, guide_c)
            out_a = ops.bilateral_slice_apply(grid_c, guide_c, inp_c, True)
            ops._bilateral_slice_apply_backward(gout_a, grid_c, guide_c, inp_c, True)
            torch.cuda.synchronize()
    # Same semantics as the CPU kernel (NaN clamps like any out-of-range guide).
    _assert_close(out, ops.bilateral_slice(grid.double(), guide.double()), torch.float32, "nan slice")
    ref_a = ops.bilateral_slice_apply(grid.double(), guide.double(), inp.double(), True)
    _assert_close(out_a, ref_a, torch.float32, "nan apply")


def test_deterministic_grad_grid_is_bitwise_reproducible():
    N, Co, Ci, D, Gh, Gw, H, W = 2, 3, 3, 8, 16, 16, 96, 128
    C = Co * (Ci + 1)
    _, (grid_c, guide_c, inp_c) = _case(N, C, Ci, D, Gh, Gw, H, W, torch.float32)
    gout_a = torch.randn(N, Co, H, W).cuda()
    gout_s = torch.randn(N, C, H, W).cuda()
    with deterministic(True):
        a1 = ops._bilateral_slice_apply_backward(gout_a, grid_c, guide_c, inp_c, True)
        a2 = ops._bilateral_slice_apply_backward(gout_a, grid_c, guide_c, inp_c, True)
        s1 = ops._bilateral_slice_backward(gout_s, grid_c, guide_c)
        s2 = ops._bilateral_slice_backward(gout_s, grid_c, guide_c)
    for x, y in zip(a1 + s1, a2 + s2):
        assert torch.equal(x, y)


def test_deterministic_flag_is_restored():
    before = torch.are_deterministic_algorithms_enabled()
    with deterministic(True):
        assert torch.are_deterministic_algorithms_enabled()
    assert torch.are_deterministic_algorithms_enabled() == before


@pytest.mark.parametrize("H,W", [(0, 5), (4, 0), (0, 0)])
def test_empty_image(H, W):
    N, Co, Ci, D, Gh, Gw = 2, 3, 3, 4, 4, 4
    C = Co * (Ci + 1)
    grid = torch.randn(N, C, D, Gh, Gw, device="cuda")
    guide = torch.rand(N, H, W, device="cuda")
    inp = torch.rand(N, Ci, H, W, device="cuda")
    out = ops.bilateral_slice(grid, guide)
    assert out.shape == (N, C, H, W) and out.device.type == "cuda"
    gg, gd = ops._bilateral_slice_backward(torch.zeros(N, C, H, W, device="cuda"), grid, guide)
    assert gg.shape == grid.shape and bool((gg == 0).all()) and gd.shape == guide.shape
    out = ops.bilateral_slice_apply(grid, guide, inp, True)
    assert out.shape == (N, Co, H, W)
    gg, gd, gi = ops._bilateral_slice_apply_backward(torch.zeros(N, Co, H, W, device="cuda"), grid, guide, inp, True)
    assert gg.shape == grid.shape and bool((gg == 0).all())
    assert gd.shape == guide.shape and gi.shape == inp.shape
    torch.cuda.synchronize()


def test_zero_batch():
    grid = torch.randn(0, 12, 4, 4, 4, device="cuda")
    guide = torch.rand(0, 8, 8, device="cuda")
    inp = torch.rand(0, 3, 8, 8, device="cuda")
    assert ops.bilateral_slice_apply(grid, guide, inp, True).shape == (0, 3, 8, 8)


def test_runs_on_current_stream_and_device():
    N, Co, Ci, D, Gh, Gw, H, W = 1, 3, 3, 8, 8, 8, 64, 64
    C = Co * (Ci + 1)
    (grid, guide, inp), (grid_c, guide_c, inp_c) = _case(N, C, Ci, D, Gh, Gw, H, W, torch.float32)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        out = ops.bilateral_slice_apply(grid_c, guide_c, inp_c, True)
    s.synchronize()
    ref = ops.bilateral_slice_apply(grid.double(), guide.double(), inp.double(), True)
    _assert_close(out, ref, torch.float32, "stream")
