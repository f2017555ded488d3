"""CUDA kernels of bilateral_slice / bilateral_slice_apply / grid_splat / grid_blur (and the
bilateral_grid_filter built from them) against the compiled CPU kernels.

The oracle is the compiled CPU op in float64 on exactly the same (dtype-rounded) inputs, so every
difference is the CUDA kernel's own rounding. Covered: every op (forward, the _dguide guide
derivatives, the backward ops with every output_mask, with and without dguide), every dtype, both
grad_grid paths (the default atomic scatter, with its shared-tile and global-atomic modes, and the
deterministic gather, bitwise reproducible), the vectorised and scalar forwards, sizes that broke
launches before (tiny images), the current stream, and double backward through the public API.
The grid ops: grid_splat on both paths (hostile guides, bitwise-reproducible deterministic mode,
the adjoint identity, gradients), grid_blur (per-axis sigmas, taps by value and from a device
buffer, more than 2^31 elements, self-adjointness, no aliasing), bilateral_grid_filter forward and
gradients.
Skipped without a CUDA device.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import bilateral_ops as bo
from helpers import deterministic, noncontiguous

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

ops = torch.ops.bilateral_ops
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-4, torch.float64: 1e-10, torch.float16: 1e-2, torch.bfloat16: 3e-2}

# (N, Co, Ci, D, Gh, Gw, H, W); slice uses C = Co * (Ci + 1) channels. Odd sizes, a 1x1x1 grid,
# images smaller than the grid, tiles that touch many cells (shared tile), a grid as fine as the
# image (global-atomic fallback), wide cells (whole warps on one cell).
SHAPES = [
    (1, 3, 3, 8, 16, 16, 37, 53),
    (2, 1, 1, 1, 1, 1, 5, 7),
    (1, 3, 4, 4, 8, 16, 3, 2),
    (2, 3, 1, 8, 5, 7, 70, 130),
    (1, 1, 4, 16, 64, 64, 64, 64),
    (1, 3, 3, 8, 2, 4, 64, 256),
]
# HDRNet's grid on images the old scatter could not launch for (its 48 KiB request plus static
# shared memory), and a 1x1 image.
TINY_SHAPES = [(1, 3, 3, 8, 16, 16, 1, 1), (1, 3, 3, 8, 16, 16, 31, 42), (1, 3, 3, 8, 16, 16, 42, 31)]
# Gather coverage: several passes of outputs per thread (C * D > 1024), a coarse grid whose cell
# footprints are split into bands (and summed by the finish kernel), many slices per output.
GATHER_SHAPES = [(1, 12, 3, 64, 4, 4, 40, 50), (1, 3, 3, 8, 1, 1, 256, 256), (2, 1, 0, 2, 3, 3, 33, 65)]
CHANNEL_SHAPE = (2, 0, 0, 8, 8, 8, 41, 67)  # Co, Ci filled in by the channel-count tests
MISC_SHAPE = (2, 3, 3, 8, 8, 8, 33, 47)
STREAM_SHAPE = (1, 3, 3, 8, 8, 8, 64, 64)
DOUBLE_BACKWARD_SHAPE = (1, 2, 2, 3, 3, 4, 5, 6)


def _random_shape(seed: int) -> tuple[int, ...]:
    g = torch.Generator().manual_seed(100 + seed)

    def r(a, b):
        return int(torch.randint(a, b + 1, (1,), generator=g))

    return (r(1, 2), r(1, 3), r(1, 4), r(1, 9), r(1, 17), r(1, 17), r(1, 90), r(1, 90))


def all_shapes() -> list[tuple[int, ...]]:
    """Every (N, Co, Ci, D, Gh, Gw, H, W) this file launches kernels for, as slice_apply shapes
    (slice runs with Co * (Ci + 1) or Co * Ci channels): tests/test_launch_config.py checks their
    launch plans on the CPU, with and without offset."""
    shapes = SHAPES + TINY_SHAPES + [MISC_SHAPE, STREAM_SHAPE, DOUBLE_BACKWARD_SHAPE]
    shapes += [(n, co, max(ci, 1), *rest) for (n, co, ci, *rest) in GATHER_SHAPES]
    N, _, _, D, Gh, Gw, H, W = CHANNEL_SHAPE
    shapes += [(N, co, ci, D, Gh, Gw, H, W) for co in (1, 3) for ci in (1, 3, 4, 5, 7, 8)]
    shapes += [(2, c, 1, 6, 5, 7, 33, 45) for c in (1, 2, 3, 4, 5, 13)]  # slice channel counts
    shapes += [_random_shape(seed) for seed in range(4)]
    shapes += [(1, 12, 3, 64, 64, 64, 64, 64), (2, 3, 3, 8, 8, 8, 19, 23), (2, 3, 3, 8, 16, 16, 96, 128)]
    shapes += [(1, 3, 1, 4, 1, 2, 300, 400)]
    return shapes


def _case(N, C, Ci, D, Gh, Gw, H, W, dtype, *, lo=0.0, hi=1.0, noncontig=False, seed=0):
    """CPU tensors rounded to dtype, and their CUDA copies."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.randn(N, C, D, Gh, Gw, generator=g, dtype=torch.float64)
    guide = lo + (hi - lo) * torch.rand(N, H, W, generator=g, dtype=torch.float64)
    inp = torch.rand(N, Ci, H, W, generator=g, dtype=torch.float64) if Ci else None
    grid, guide = grid.to(dtype), guide.to(dtype)
    inp = inp.to(dtype) if inp is not None else None
    cuda = [t.cuda() if t is not None else None for t in (grid, guide, inp)]
    if noncontig:
        cuda = [noncontiguous(t) if t is not None else None for t in cuda]
    return (grid, guide, inp), tuple(cuda)


def _randn(shape, dtype, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _assert_close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert got.device.type == "cuda", what
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    assert got.dtype == dtype, (what, got.dtype, dtype)
    got = got.detach().cpu().double()
    ref = ref.double()
    tol = TOL[dtype]
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol * scale, equal_nan=True, msg=lambda m: f"{what}: {m}")


def _d(t):
    return t.double() if t is not None else None


def _slice_check(shape, dtype, *, lo=0.0, hi=1.0, noncontig=False, paths=(False, True)):
    N, Co, Ci, D, Gh, Gw, H, W = shape
    C = Co * (Ci + 1)
    (grid, guide, _), (grid_c, guide_c, _) = _case(N, C, 0, D, Gh, Gw, H, W, dtype, lo=lo, hi=hi, noncontig=noncontig)
    for dguide, fn in ((False, ops.bilateral_slice), (True, ops._bilateral_slice_dguide)):
        _assert_close(fn(grid_c, guide_c), fn(_d(grid), _d(guide)), dtype, f"slice forward dguide={dguide}")

    gout = _randn((N, C, H, W), dtype, 1)
    gout_c = noncontiguous(gout.cuda()) if noncontig else gout.cuda()
    for dguide in (False, True):
        mask = [True, not dguide]
        ref = ops._bilateral_slice_backward(_d(gout), _d(grid), _d(guide), dguide, mask)
        for det in paths:
            with deterministic(det):
                got = ops._bilateral_slice_backward(gout_c, grid_c, guide_c, dguide, mask)
            for name, g, r, m in zip(("grad_grid", "grad_guide"), got, ref, mask):
                if m:
                    _assert_close(g, r, dtype, f"slice {name} (deterministic={det}, dguide={dguide})")
                else:
                    assert g.shape == (0,), name


def _apply_check(shape, dtype, has_offset, *, lo=0.0, hi=1.0, noncontig=False, paths=(False, True)):
    N, Co, Ci, D, Gh, Gw, H, W = shape
    C = Co * (Ci + int(has_offset))
    (grid, guide, inp), (grid_c, guide_c, inp_c) = _case(
        N, C, Ci, D, Gh, Gw, H, W, dtype, lo=lo, hi=hi, noncontig=noncontig
    )
    for dguide, fn in ((False, ops.bilateral_slice_apply), (True, ops._bilateral_slice_apply_dguide)):
        ref = fn(_d(grid), _d(guide), _d(inp), has_offset)
        _assert_close(fn(grid_c, guide_c, inp_c, has_offset), ref, dtype, f"apply forward dguide={dguide}")

    gout = _randn((N, Co, H, W), dtype, 1)
    gout_c = noncontiguous(gout.cuda()) if noncontig else gout.cuda()
    for dguide in (False, True):
        mask = [True, not dguide, True]
        ref = ops._bilateral_slice_apply_backward(_d(gout), _d(grid), _d(guide), _d(inp), has_offset, dguide, mask)
        for det in paths:
            with deterministic(det):
                got = ops._bilateral_slice_apply_backward(gout_c, grid_c, guide_c, inp_c, has_offset, dguide, mask)
            for name, g, r, m in zip(("grad_grid", "grad_guide", "grad_input"), got, ref, mask):
                what = f"apply {name} (deterministic={det}, dguide={dguide}, has_offset={has_offset})"
                if m:
                    _assert_close(g, r, dtype, what)
                else:
                    assert g.shape == (0,), what


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_slice_matches_cpu(shape, dtype):
    _slice_check(shape, dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("has_offset", [True, False])
def test_apply_matches_cpu(shape, dtype, has_offset):
    _apply_check(shape, dtype, has_offset)


@pytest.mark.parametrize("shape", TINY_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiny_images_launch(shape, dtype):
    """The old scatter asked for exactly 48 KiB of dynamic shared memory on top of its static
    shared memory for these sizes, and failed to launch (cudaErrorInvalidValue)."""
    _slice_check(shape, dtype)
    _apply_check(shape, dtype, True)


@pytest.mark.parametrize("shape", GATHER_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gather_passes_bands_and_slices(shape, dtype):
    if shape[2] == 0:
        _slice_check(shape, dtype)
    else:
        _apply_check(shape, dtype, True)


def test_scatter_shared_tile_and_global_fallback():
    """On a grid as fine as the image the full-depth box does not fit in shared memory: tiles whose
    guide spans few levels still use the shared tile, the others go straight to global atomics."""
    shape = (1, 1, 4, 16, 64, 64, 64, 64)
    _apply_check(shape, torch.float32, True, lo=0.45, hi=0.5)  # flat guide: shared tiles
    _apply_check(shape, torch.float32, True)  # full range: global fallback
    _slice_check((1, 12, 3, 64, 64, 64, 64, 64), torch.float32, paths=(False,))  # nothing fits


# Affine rows of up to 4 coefficients take the float4 forward kernel with one chunk, 5..8 with two,
# wider rows (Ci = 8 with an offset) and float64 the scalar kernel.
@pytest.mark.parametrize("Ci", [1, 3, 4, 5, 7, 8])
@pytest.mark.parametrize("Co", [1, 3])
@pytest.mark.parametrize("has_offset", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_channel_counts(Ci, Co, has_offset, dtype):
    N, _, _, D, Gh, Gw, H, W = CHANNEL_SHAPE
    _apply_check((N, Co, Ci, D, Gh, Gw, H, W), dtype, has_offset, paths=(False,))


@pytest.mark.parametrize("C", [1, 2, 3, 4, 5, 13])
@pytest.mark.parametrize("dtype", DTYPES)
def test_slice_channel_counts(C, dtype):
    # Slice packs channels in rows of 4: remainders must neither be lost nor overwrite others.
    N, D, Gh, Gw, H, W = 2, 6, 5, 7, 33, 45
    (grid, guide, _), (grid_c, guide_c, _) = _case(N, C, 0, D, Gh, Gw, H, W, dtype)
    for fn in (ops.bilateral_slice, ops._bilateral_slice_dguide):
        _assert_close(fn(grid_c, guide_c), fn(_d(grid), _d(guide)), dtype, f"{fn} C={C}")


SLICE_MASKS = [list(m) for m in itertools.product([False, True], repeat=2)]
APPLY_MASKS = [list(m) for m in itertools.product([False, True], repeat=3)]


@pytest.mark.parametrize("det", [False, True])
@pytest.mark.parametrize("dguide", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_output_masks(det, dguide, dtype):
    """Masked-off gradients are empty (0,) tensors; the others equal the unmasked result."""
    N, Co, Ci, D, Gh, Gw, H, W = MISC_SHAPE
    C = Co * (Ci + 1)
    (_, _, _), (grid, guide, inp) = _case(N, C, Ci, D, Gh, Gw, H, W, dtype)
    gs = _randn((N, C, H, W), dtype, 2).cuda()
    ga = _randn((N, Co, H, W), dtype, 3).cuda()
    # grad_grid of the atomic scatter depends on the order of its float atomics.
    tol = 2e-5 if dtype == torch.float32 else 1e-12
    with deterministic(det):
        full_s = ops._bilateral_slice_backward(gs, grid, guide, dguide, [True, not dguide])
        full_a = ops._bilateral_slice_apply_backward(ga, grid, guide, inp, True, dguide, [True, not dguide, True])
        for mask in SLICE_MASKS:
            if dguide and mask[1]:
                with pytest.raises(RuntimeError, match="output_mask"):
                    ops._bilateral_slice_backward(gs, grid, guide, dguide, mask)
                continue
            got = ops._bilateral_slice_backward(gs, grid, guide, dguide, mask)
            for g, f, m in zip(got, full_s, mask):
                if m:
                    torch.testing.assert_close(g, f, rtol=tol, atol=tol)
                else:
                    assert g.shape == (0,) and g.device.type == "cuda" and g.dtype == dtype
        for mask in APPLY_MASKS:
            if dguide and mask[1]:
                with pytest.raises(RuntimeError, match="output_mask"):
                    ops._bilateral_slice_apply_backward(ga, grid, guide, inp, True, dguide, mask)
                continue
            got = ops._bilateral_slice_apply_backward(ga, grid, guide, inp, True, dguide, mask)
            for g, f, m in zip(got, full_a, mask):
                if m:
                    torch.testing.assert_close(g, f, rtol=tol, atol=tol)
                else:
                    assert g.shape == (0,) and g.device.type == "cuda" and g.dtype == dtype
        torch.cuda.synchronize()


@pytest.mark.parametrize("seed", range(4))
def test_random_shapes(seed):
    shape = _random_shape(seed)
    _slice_check(shape, torch.float32)
    _apply_check(shape, torch.float32, bool(seed % 2))


def test_guide_outside_unit_interval():
    _slice_check(MISC_SHAPE, torch.float32, lo=-0.4, hi=1.4)
    _apply_check(MISC_SHAPE, torch.float32, True, lo=-0.4, hi=1.4)


def test_noncontiguous_inputs():
    _slice_check(MISC_SHAPE, torch.float32, noncontig=True)
    _apply_check(MISC_SHAPE, torch.float32, True, noncontig=True)
    _apply_check(MISC_SHAPE, torch.float16, False, noncontig=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_guide_does_not_crash(dtype):
    N, Co, Ci, D, Gh, Gw, H, W = 2, 3, 3, 8, 8, 8, 19, 23
    C = Co * (Ci + 1)
    (grid, guide, inp), (grid_c, _, inp_c) = _case(N, C, Ci, D, Gh, Gw, H, W, dtype)
    bad = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -1e30]).to(dtype)
    guide = guide.clone()
    guide.view(-1)[: bad.numel() * 7 : 7] = bad
    guide_c = guide.cuda()
    gout_s = _randn((N, C, H, W), dtype, 4).cuda()
    gout_a = _randn((N, Co, H, W), dtype, 5).cuda()
    for det in (False, True):
        with deterministic(det):
            out = ops.bilateral_slice(grid_c, guide_c)
            ops._bilateral_slice_dguide(grid_c, guide_c)
            ops._bilateral_slice_backward(gout_s, grid_c, guide_c, False, [True, True])
            ops._bilateral_slice_backward(gout_s, grid_c, guide_c, True, [True, False])
            out_a = ops.bilateral_slice_apply(grid_c, guide_c, inp_c, True)
            ops._bilateral_slice_apply_dguide(grid_c, guide_c, inp_c, True)
            got = ops._bilateral_slice_apply_backward(gout_a, grid_c, guide_c, inp_c, True, False, [True, True, True])
            ops._bilateral_slice_apply_backward(gout_a, grid_c, guide_c, inp_c, True, True, [True, False, True])
            torch.cuda.synchronize()
    # Same semantics as the CPU kernel (NaN clamps like any out-of-range guide).
    _assert_close(out, ops.bilateral_slice(_d(grid), _d(guide)), dtype, "nan slice")
    _assert_close(out_a, ops.bilateral_slice_apply(_d(grid), _d(guide), _d(inp), True), dtype, "nan apply")
    ref = ops._bilateral_slice_apply_backward(_d(gout_a.cpu()), _d(grid), _d(guide), _d(inp), True, False, [True, True, True])
    for name, g, r in zip(("grad_grid", "grad_guide", "grad_input"), got, ref):
        _assert_close(g, r, dtype, f"nan apply {name}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic_grad_grid_is_bitwise_reproducible(dtype):
    N, Co, Ci, D, Gh, Gw, H, W = 2, 3, 3, 8, 16, 16, 96, 128
    C = Co * (Ci + 1)
    _, (grid_c, guide_c, inp_c) = _case(N, C, Ci, D, Gh, Gw, H, W, dtype)
    gout_a = _randn((N, Co, H, W), dtype, 6).cuda()
    gout_s = _randn((N, C, H, W), dtype, 7).cuda()
    with deterministic(True):
        for dguide in (False, True):
            ma, ms = [True, not dguide, True], [True, not dguide]
            a1 = ops._bilateral_slice_apply_backward(gout_a, grid_c, guide_c, inp_c, True, dguide, ma)
            a2 = ops._bilateral_slice_apply_backward(gout_a, grid_c, guide_c, inp_c, True, dguide, ma)
            s1 = ops._bilateral_slice_backward(gout_s, grid_c, guide_c, dguide, ms)
            s2 = ops._bilateral_slice_backward(gout_s, grid_c, guide_c, dguide, ms)
            # Only the grid gradient: same bits whatever else is asked for.
            a3 = ops._bilateral_slice_apply_backward(gout_a, grid_c, guide_c, inp_c, True, dguide, [True, False, False])
            for x, y in zip(a1 + s1, a2 + s2):
                assert torch.equal(x, y)
            assert torch.equal(a1[0], a3[0])
    # A coarse grid: the footprint bands are summed by the finish kernel, in a fixed order too.
    _, (grid_c, guide_c, _) = _case(1, 3, 0, 4, 1, 2, 300, 400, dtype)
    gout = _randn((1, 3, 300, 400), dtype, 8).cuda()
    with deterministic(True):
        r1 = ops._bilateral_slice_backward(gout, grid_c, guide_c, False, [True, False])[0]
        r2 = ops._bilateral_slice_backward(gout, grid_c, guide_c, False, [True, False])[0]
    assert torch.equal(r1, r2)


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
    for fn in (ops.bilateral_slice, ops._bilateral_slice_dguide):
        out = fn(grid, guide)
        assert out.shape == (N, C, H, W) and out.device.type == "cuda"
    gg, gd = ops._bilateral_slice_backward(torch.zeros(N, C, H, W, device="cuda"), grid, guide, False, [True, True])
    assert gg.shape == grid.shape and bool((gg == 0).all()) and gd.shape == guide.shape
    gg, gd = ops._bilateral_slice_backward(torch.zeros(N, C, H, W, device="cuda"), grid, guide, True, [True, False])
    assert gg.shape == grid.shape and bool((gg == 0).all()) and gd.shape == (0,)
    for fn in (ops.bilateral_slice_apply, ops._bilateral_slice_apply_dguide):
        assert fn(grid, guide, inp, True).shape == (N, Co, H, W)
    go = torch.zeros(N, Co, H, W, device="cuda")
    gg, gd, gi = ops._bilateral_slice_apply_backward(go, grid, guide, inp, True, False, [True, True, True])
    assert gg.shape == grid.shape and bool((gg == 0).all())
    assert gd.shape == guide.shape and gi.shape == inp.shape
    gg, gd, gi = ops._bilateral_slice_apply_backward(go, grid, guide, inp, True, False, [False, False, True])
    assert gg.shape == (0,) and gd.shape == (0,) and gi.shape == inp.shape
    torch.cuda.synchronize()


def test_zero_batch():
    grid = torch.randn(0, 12, 4, 4, 4, device="cuda")
    guide = torch.rand(0, 8, 8, device="cuda")
    inp = torch.rand(0, 3, 8, 8, device="cuda")
    assert ops.bilateral_slice_apply(grid, guide, inp, True).shape == (0, 3, 8, 8)
    assert ops.bilateral_slice(grid, guide).shape == (0, 12, 8, 8)


# ----------------------------------------------------------------------------------------------
# The current stream.


def _every_op(grid, guide, inp, gout_slice, gout_apply) -> dict:
    """Every op of the library (forward, guide derivative, backward plain and dguide) on one set of
    arguments."""
    g, gd, x, gs, ga = grid, guide, inp, gout_slice, gout_apply
    return {
        "slice": ops.bilateral_slice(g, gd),
        "slice_dguide": ops._bilateral_slice_dguide(g, gd),
        "slice_backward": ops._bilateral_slice_backward(gs, g, gd, False, [True, True]),
        "slice_backward_dguide": ops._bilateral_slice_backward(gs, g, gd, True, [True, False]),
        "apply": ops.bilateral_slice_apply(g, gd, x, True),
        "apply_dguide": ops._bilateral_slice_apply_dguide(g, gd, x, True),
        "apply_backward": ops._bilateral_slice_apply_backward(ga, g, gd, x, True, False, [True, True, True]),
        "apply_backward_dguide": ops._bilateral_slice_apply_backward(ga, g, gd, x, True, True, [True, False, True]),
    }


@pytest.mark.parametrize("det", [False, True])
def test_kernels_run_on_the_current_stream(det):
    """Inputs start as zeros (synchronised); on a side stream that first sleeps, the real values are
    copied in and every op runs. A kernel launched on another stream would run at once and read
    zeros (or half-copied inputs) instead of waiting behind the sleep."""
    N, Co, Ci, D, Gh, Gw, H, W = STREAM_SHAPE
    C = Co * (Ci + 1)
    (grid, guide, inp), (grid_src, guide_src, inp_src) = _case(N, C, Ci, D, Gh, Gw, H, W, torch.float32)
    gout_s, gout_a = _randn((N, C, H, W), torch.float32, 9), _randn((N, Co, H, W), torch.float32, 10)
    srcs = [grid_src, guide_src, inp_src, gout_s.cuda(), gout_a.cuda()]
    dsts = [torch.zeros_like(t) for t in srcs]
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with deterministic(det), torch.cuda.stream(side):
        torch.cuda._sleep(int(5e8))  # a few hundred ms of GPU time on this stream
        for d, s in zip(dsts, srcs):
            d.copy_(s)
        got = _every_op(*dsts)
    side.synchronize()
    ref = _every_op(_d(grid), _d(guide), _d(inp), _d(gout_s), _d(gout_a))
    for name, r in ref.items():
        outs = got[name] if isinstance(got[name], tuple) else (got[name],)
        refs = r if isinstance(r, tuple) else (r,)
        for i, (o, e) in enumerate(zip(outs, refs)):
            if e.numel() == 0:
                assert o.shape == (0,)
                continue
            _assert_close(o, e, torch.float32, f"{name}[{i}] on a side stream (deterministic={det})")


# ----------------------------------------------------------------------------------------------
# Gradients through the public API, in float64 on CUDA (these run the dguide ops and the backward
# ops with every mask autograd asks for).


def _smooth_guide(N, H, W, D, gen):
    """Guides whose z position stays at least 0.1 cell away from every cell centre (where the tent
    weights have kinks), so that finite differences see a smooth function."""
    k = torch.randint(0, max(D - 1, 1), (N, H, W), generator=gen).double()
    u = 0.1 + 0.8 * torch.rand(N, H, W, generator=gen, dtype=torch.float64)
    return ((k + 0.5 + u) / D).clamp(max=(D - 0.6) / D).cuda()


@pytest.mark.parametrize("det", [False, True])
@pytest.mark.parametrize("has_offset", [True, False])
def test_gradcheck_and_gradgradcheck_slice_apply(det, has_offset):
    N, Co, Ci, D, Gh, Gw, H, W = DOUBLE_BACKWARD_SHAPE
    gen = torch.Generator().manual_seed(11)
    C = Co * (Ci + int(has_offset))
    grid = torch.randn(N, C, D, Gh, Gw, generator=gen, dtype=torch.float64).cuda().requires_grad_()
    guide = _smooth_guide(N, H, W, D, gen).requires_grad_()
    inp = torch.rand(N, Ci, H, W, generator=gen, dtype=torch.float64).cuda().requires_grad_()

    def fn(a, b, c):
        return bo.bilateral_slice_apply(a, b, c, has_offset)

    with deterministic(det):
        assert torch.autograd.gradcheck(fn, (grid, guide, inp), eps=1e-6, atol=1e-5, nondet_tol=1e-9)
        assert torch.autograd.gradgradcheck(fn, (grid, guide, inp), eps=1e-6, atol=1e-5, nondet_tol=1e-9)


@pytest.mark.parametrize("det", [False, True])
def test_gradcheck_and_gradgradcheck_slice(det):
    N, Co, Ci, D, Gh, Gw, H, W = DOUBLE_BACKWARD_SHAPE
    gen = torch.Generator().manual_seed(12)
    grid = torch.randn(N, 3, D, Gh, Gw, generator=gen, dtype=torch.float64).cuda().requires_grad_()
    guide = _smooth_guide(N, H, W, D, gen).requires_grad_()
    with deterministic(det):
        assert torch.autograd.gradcheck(bo.bilateral_slice, (grid, guide), eps=1e-6, atol=1e-5, nondet_tol=1e-9)
        assert torch.autograd.gradgradcheck(bo.bilateral_slice, (grid, guide), eps=1e-6, atol=1e-5, nondet_tol=1e-9)


# ----------------------------------------------------------------------------------------------
# The bilateral grid: grid_splat, grid_blur and bilateral_grid_filter.

# (N, C, D, Gh, Gw, H, W) of grid_splat: C image channels splatted into D x Gh x Gw cells. HDRNet's
# grid, a 1x1x1 grid, a grid finer than the image, batch 2 with odd sizes, a grid as fine as the
# image (the scatter's global-atomic fallback), a 1x1 image, the grid filter's grids (sigma_space
# 4 and 16, sigma_color 0.1, value channels and the weight), and a coarse grid (the gather's
# footprint bands and the finish kernel).
SPLAT_SHAPES = [
    (1, 3, 8, 16, 16, 37, 53),
    (2, 1, 1, 1, 1, 5, 7),
    (1, 4, 4, 8, 16, 3, 2),
    (2, 4, 8, 5, 7, 70, 130),
    (1, 4, 16, 64, 64, 64, 64),
    (1, 4, 10, 9, 12, 1, 1),
    (1, 4, 10, 33, 40, 129, 160),
    (2, 2, 10, 5, 6, 70, 90),
    (1, 3, 4, 1, 2, 300, 400),
]
SPLAT_DET_SHAPE = (2, 4, 10, 24, 32, 96, 128)
# (N, C, D, Gh, Gw) and per-axis sigmas (D, Gh, Gw). Windows of every length: one tap (an axis of
# one cell), short windows passed by value, long ones (sigma 20 and 1e6 on the 130-cell axis:
# taps truncated to G - 1 = 129, read from a device buffer), every sigma 0 (a copy).
BLUR_SHAPES = [(2, 3, 8, 16, 16), (1, 1, 1, 1, 1), (1, 4, 10, 33, 40), (1, 2, 5, 7, 130)]
BLUR_SIGMAS = [
    (1.0, 1.0, 1.0),
    (0.0, 1.0, 2.0),
    (0.5, 0.0, 0.0),
    (0.0, 0.0, 3.0),
    (2.5, 0.7, 0.0),
    (20.0, 0.0, 20.0),
    (1e6, 1e6, 1e6),
    (0.0, 0.0, 0.0),
]
# (N, C, H, W, sigma_color, sigma_space) of bilateral_grid_filter.
FILTER_CASES = [(1, 3, 37, 53, 0.1, 4.0), (2, 1, 64, 48, 0.25, 8.0), (1, 3, 1, 1, 0.1, 4.0), (1, 2, 33, 70, 0.5, 16.0)]
FILTER_TOL = {torch.float32: 1e-4, torch.float64: 1e-9, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def grid_shapes() -> dict:
    """Every grid-op launch of this file (tests/test_launch_config.py checks their plans):
    {"splat": [(N, C, D, Gh, Gw, H, W)], "blur": [((N, C, D, Gh, Gw), sigma)], "filter":
    [(N, C, H, W, sigma_color, sigma_space)]}."""
    return {
        "splat": SPLAT_SHAPES + [SPLAT_DET_SHAPE, (1, 3, 8, 4, 5, 11, 13), (1, 2, 3, 3, 4, 5, 6)],
        "blur": [(s, sig) for s in BLUR_SHAPES for sig in BLUR_SIGMAS] + [((1, 1, 8, 16384, 16392), (1.0, 0.0, 1.0))],
        "filter": FILTER_CASES,
    }


def _splat_case(shape, dtype, *, lo=0.0, hi=1.0, seed=0):
    N, C, _, _, _, H, W = shape
    g = torch.Generator().manual_seed(seed)
    inp = torch.randn(N, C, H, W, generator=g, dtype=torch.float64).to(dtype)
    guide = (lo + (hi - lo) * torch.rand(N, H, W, generator=g, dtype=torch.float64)).to(dtype)
    return inp, guide


@pytest.mark.parametrize("shape", SPLAT_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_grid_splat_matches_cpu(shape, dtype):
    inp, guide = _splat_case(shape, dtype, lo=-0.3, hi=1.3)
    size = list(shape[2:5])
    ref = ops.grid_splat(_d(inp), _d(guide), size)
    for det in (False, True):
        with deterministic(det):
            got = ops.grid_splat(inp.cuda(), guide.cuda(), size)
        _assert_close(got, ref, dtype, f"grid_splat {shape} (deterministic={det})")


@pytest.mark.parametrize("dtype", DTYPES)
def test_grid_splat_hostile_guides_and_noncontiguous(dtype):
    shape = (2, 3, 8, 5, 7, 19, 23)
    inp, guide = _splat_case(shape, dtype)
    bad = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -1e30]).to(dtype)
    guide.view(-1)[: bad.numel() * 7 : 7] = bad
    size = list(shape[2:5])
    ref = ops.grid_splat(_d(inp), _d(guide), size)
    for det in (False, True):
        with deterministic(det):
            got = ops.grid_splat(noncontiguous(inp.cuda()), noncontiguous(guide.cuda()), size)
            torch.cuda.synchronize()
        _assert_close(got, ref, dtype, f"grid_splat hostile guide (deterministic={det})")


@pytest.mark.parametrize("dtype", DTYPES)
def test_grid_splat_deterministic_is_bitwise_reproducible(dtype):
    for shape in (SPLAT_DET_SHAPE, (1, 3, 4, 1, 2, 300, 400)):  # the second: bands + finish
        inp, guide = _splat_case(shape, dtype)
        inp_c, guide_c = inp.cuda(), guide.cuda()
        with deterministic(True):
            a = ops.grid_splat(inp_c, guide_c, list(shape[2:5]))
            b = ops.grid_splat(inp_c, guide_c, list(shape[2:5]))
        assert torch.equal(a, b), shape
        # And the same bits as the slice backward's deterministic grid gradient it is built from.
        grid = torch.zeros(shape[0], shape[1], *shape[2:5], dtype=dtype, device="cuda")
        with deterministic(True):
            gg = ops._bilateral_slice_backward(inp_c, grid, guide_c, False, [True, False])[0]
        assert torch.equal(a, gg), shape


def test_grid_splat_is_the_adjoint_of_slice_on_cuda():
    N, C, D, Gh, Gw, H, W = 2, 3, 8, 9, 11, 41, 57
    g = torch.Generator().manual_seed(21)
    grid = torch.randn(N, C, D, Gh, Gw, generator=g, dtype=torch.float64).cuda()
    guide = (torch.rand(N, H, W, generator=g, dtype=torch.float64) * 1.4 - 0.2).cuda()
    img = torch.randn(N, C, H, W, generator=g, dtype=torch.float64).cuda()
    for det in (False, True):
        with deterministic(det):
            lhs = (bo.bilateral_slice(grid, guide) * img).sum()
            rhs = (grid * bo.grid_splat(img, guide, (D, Gh, Gw))).sum()
        torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("H,W", [(0, 5), (4, 0), (0, 0)])
def test_grid_splat_and_blur_empty(H, W):
    inp = torch.rand(2, 3, H, W, device="cuda")
    guide = torch.rand(2, H, W, device="cuda")
    for det in (False, True):
        with deterministic(det):
            out = ops.grid_splat(inp, guide, [4, 5, 6])
        assert out.shape == (2, 3, 4, 5, 6) and out.device.type == "cuda" and bool((out == 0).all())
    assert ops.grid_splat(torch.rand(0, 3, 8, 8, device="cuda"), torch.rand(0, 8, 8, device="cuda"), [2, 2, 2]).shape == (0, 3, 2, 2, 2)
    empty = torch.rand(0, 3, 4, 4, 4, device="cuda")
    assert ops.grid_blur(empty, [1.0, 1.0, 1.0]).shape == empty.shape
    torch.cuda.synchronize()


@pytest.mark.parametrize("det", [False, True])
def test_grid_splat_gradients_match_cpu(det):
    """Through the public API: the input gradient is a slice, the guide gradient the slice
    backward's guide part with the image as grad_output."""
    N, C, D, Gh, Gw, H, W = 2, 3, 6, 7, 9, 29, 37
    gen = torch.Generator().manual_seed(22)
    inp = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64)
    guide = torch.rand(N, H, W, generator=gen, dtype=torch.float64) * 1.2 - 0.1
    gout = torch.randn(N, C, D, Gh, Gw, generator=gen, dtype=torch.float64)

    def grads(device):
        x = inp.to(device).requires_grad_()
        gd = guide.to(device).requires_grad_()
        out = bo.grid_splat(x, gd, (D, Gh, Gw))
        return (out, *torch.autograd.grad(out, (x, gd), gout.to(device)))

    with deterministic(det):
        got = grads("cuda")
    ref = grads("cpu")
    for name, g, r in zip(("output", "grad_input", "grad_guide"), got, ref):
        _assert_close(g, r, torch.float64, f"grid_splat {name} (deterministic={det})")


@pytest.mark.parametrize("det", [False, True])
def test_gradcheck_grid_splat(det):
    N, C, D, Gh, Gw, H, W = 1, 2, 3, 3, 4, 5, 6
    gen = torch.Generator().manual_seed(23)
    inp = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64).cuda().requires_grad_()
    guide = _smooth_guide(N, H, W, D, gen).requires_grad_()

    def fn(a, b):
        return bo.grid_splat(a, b, (D, Gh, Gw))

    with deterministic(det):
        assert torch.autograd.gradcheck(fn, (inp, guide), eps=1e-6, atol=1e-5, nondet_tol=1e-9)


@pytest.mark.parametrize("shape", BLUR_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_grid_blur_matches_cpu(shape, dtype):
    grid = _randn(shape, dtype, 24)
    grid_c = grid.cuda()
    for sigma in BLUR_SIGMAS:
        ref = ops.grid_blur(_d(grid), list(sigma))
        got = ops.grid_blur(grid_c, list(sigma))
        _assert_close(got, ref, dtype, f"grid_blur {shape} sigma={sigma}")
        assert got.is_contiguous()
    got = ops.grid_blur(noncontiguous(grid_c), [1.0, 2.0, 1.0])
    _assert_close(got, ops.grid_blur(_d(grid), [1.0, 2.0, 1.0]), dtype, f"grid_blur noncontiguous {shape}")


@pytest.mark.parametrize("sigma", [(1.0, 1.0, 1.0), (0.0, 2.0, 0.5), (20.0, 20.0, 20.0), (1e6, 0.0, 1e6)])
def test_grid_blur_is_self_adjoint_on_cuda(sigma):
    shape = (2, 3, 7, 9, 40)
    a, b = _randn(shape, torch.float64, 25).cuda(), _randn(shape, torch.float64, 26).cuda()
    lhs = (ops.grid_blur(a, list(sigma)) * b).sum()
    rhs = (a * ops.grid_blur(b, list(sigma))).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("dtype", DTYPES)
def test_grid_blur_never_aliases(dtype):
    grid = _randn((1, 2, 3, 4, 5), dtype, 27).cuda()
    before = grid.clone()
    for sigma in ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]):
        out = ops.grid_blur(grid, sigma)
        assert out.dtype == dtype and out.shape == grid.shape
        assert out.data_ptr() != grid.data_ptr()
        out.fill_(7)
        assert torch.equal(grid, before), sigma
    out = bo.grid_blur(grid, 0.0)
    assert torch.equal(out, grid) and out.data_ptr() != grid.data_ptr()


def test_grid_blur_gradient_is_the_blur():
    gen = torch.Generator().manual_seed(28)
    grid = torch.randn(1, 2, 4, 5, 6, generator=gen, dtype=torch.float64).cuda().requires_grad_()
    assert torch.autograd.gradcheck(lambda g: bo.grid_blur(g, (1.0, 0.5, 2.0)), (grid,), eps=1e-6, atol=1e-7)
    gout = torch.randn(1, 2, 4, 5, 6, generator=gen, dtype=torch.float64).cuda()
    (g,) = torch.autograd.grad(bo.grid_blur(grid, 1.0), grid, gout)
    _assert_close(g, ops.grid_blur(gout.cpu(), [1.0, 1.0, 1.0]), torch.float64, "grid_blur backward")


def test_grid_blur_beyond_int32_indexing():
    """More than 2^31 elements: the 64-bit index path (float16 in, float32 between the passes)."""
    shape = (1, 1, 8, 16384, 16392)  # 2^31 + 2^20 elements, 4 GiB in float16
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip("needs 24 GiB of free GPU memory")
    grid = torch.randn(shape, device="cuda", dtype=torch.float16)
    out = ops.grid_blur(grid, [1.0, 0.0, 1.0])
    # The D and Gw blur of the last 64 columns of the last 3 rows: the columns with their whole
    # window (radius 2) inside that block must match, including elements past index 2^31.
    sub = grid[..., -3:, -64:].cpu()
    ref = ops.grid_blur(_d(sub), [1.0, 0.0, 1.0])[..., 2:]
    _assert_close(out[..., -3:, -62:], ref, torch.float16, "grid_blur past 2^31 elements")
    del grid, out
    torch.cuda.empty_cache()


def _filter_inputs(case, dtype, seed, with_guide):
    N, C, H, W, _, _ = case
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(N, C, H, W, generator=g, dtype=torch.float64).to(dtype)
    guide = torch.rand(N, H, W, generator=g, dtype=torch.float64).to(dtype) if with_guide else None
    return x, guide


@pytest.mark.parametrize("case", FILTER_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_guide", [False, True])
def test_bilateral_grid_filter_matches_cpu(case, dtype, with_guide):
    *_, sc, ss = case
    x, guide = _filter_inputs(case, dtype, 29, with_guide)
    # The CPU oracle in float64 on the same rounded values; the default guide is the channel mean
    # of the input on each device, in its own dtype (float32 for 16-bit inputs, which are filtered
    # in float32), so give the oracle that mean.
    wide = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    ref_guide = _d(guide) if with_guide else wide.cuda().mean(1).cpu().double()
    ref = bo.bilateral_grid_filter(_d(x), sc, ss, ref_guide)
    for det in (False, True):
        with deterministic(det):
            got = bo.bilateral_grid_filter(x.cuda(), sc, ss, guide.cuda() if with_guide else None)
        assert got.dtype == dtype and got.device.type == "cuda"
        got, r = got.detach().cpu().double(), ref
        tol = FILTER_TOL[dtype]
        what = f"filter {case} {dtype} det={det}"
        torch.testing.assert_close(got, r, rtol=tol, atol=tol, msg=lambda m, what=what: f"{what}: {m}")


@pytest.mark.parametrize("case", FILTER_CASES)
@pytest.mark.parametrize("with_guide", [False, True])
def test_bilateral_grid_filter_gradients_match_cpu(case, with_guide):
    N, C, H, W, sc, ss = case
    x, guide = _filter_inputs(case, torch.float64, 30, with_guide)
    gout = torch.randn(N, C, H, W, generator=torch.Generator().manual_seed(31), dtype=torch.float64)

    def run(device):
        leaves = [x.to(device).requires_grad_()] + ([guide.to(device).requires_grad_()] if with_guide else [])
        out = bo.bilateral_grid_filter(leaves[0], sc, ss, leaves[1] if with_guide else None)
        return (out, *torch.autograd.grad(out, leaves, gout.to(device)))

    ref = run("cpu")
    for det in (False, True):
        with deterministic(det):
            got = run("cuda")
        for i, (g, r) in enumerate(zip(got, ref)):
            assert g.device.type == "cuda"
            tol = 1e-9
            scale = max(1.0, r.abs().max().item()) if r.numel() else 1.0
            what = f"filter {case} output/grad {i} det={det}"
            torch.testing.assert_close(g.detach().cpu(), r, rtol=tol, atol=tol * scale,
                                       msg=lambda m, what=what: f"{what}: {m}")


def test_grid_ops_run_on_the_current_stream():
    """As test_kernels_run_on_the_current_stream, for grid_splat (both paths) and grid_blur (short
    and long windows)."""
    N, C, D, Gh, Gw, H, W = 1, 3, 8, 8, 40, 64, 64
    inp, guide = _splat_case((N, C, D, Gh, Gw, H, W), torch.float32)
    grid = _randn((N, C, D, Gh, Gw), torch.float32, 32)
    srcs = [inp.cuda(), guide.cuda(), grid.cuda()]
    dsts = [torch.zeros_like(t) for t in srcs]
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    got = {}
    with torch.cuda.stream(side):
        torch.cuda._sleep(int(5e8))
        for d, s in zip(dsts, srcs):
            d.copy_(s)
        for det in (False, True):
            with deterministic(det):
                got[f"splat det={det}"] = ops.grid_splat(dsts[0], dsts[1], [D, Gh, Gw])
        got["blur"] = ops.grid_blur(dsts[2], [1.0, 1.0, 1.0])
        got["blur long"] = ops.grid_blur(dsts[2], [0.0, 0.0, 30.0])
    side.synchronize()
    splat_ref = ops.grid_splat(_d(inp), _d(guide), [D, Gh, Gw])
    ref = {
        "splat det=False": splat_ref,
        "splat det=True": splat_ref,
        "blur": ops.grid_blur(_d(grid), [1.0, 1.0, 1.0]),
        "blur long": ops.grid_blur(_d(grid), [0.0, 0.0, 30.0]),
    }
    for name, r in ref.items():
        _assert_close(got[name], r, torch.float32, f"{name} on a side stream")


# ----------------------------------------------------------------------------------------------
# curve_guide: CUDA against the compiled CPU op in float64.

# (N, C, H, W, K): HDRNet (registers, shared table and rows), C = 1 and K = 1, more channels than
# the register path (dc scratch + einsum), a table too large for shared memory (global table,
# global rows), a large table whose rows alone overflow (shared table, global rows), odd sizes and
# images that end mid-warp, and a 1x1 image.
CURVE_SHAPES = [
    (2, 3, 37, 53, 16),
    (1, 1, 5, 7, 1),
    (2, 5, 33, 47, 4),
    (1, 8, 19, 23, 256),
    (1, 3, 21, 17, 400),
    (3, 4, 1, 1, 16),
    (1, 3, 256, 384, 16),
    (2, 2, 8, 12, 3),  # four-pixel groups with vector loads, batch 2, K not a multiple of 4
    (3, 1, 4, 4, 5),
]
CURVE_TOL = {torch.float32: 1e-4, torch.float64: 1e-10, torch.float16: 2e-2, torch.bfloat16: 5e-2}
CURVE_NAMES = ("input", "ccm", "ccm_bias", "shifts", "slopes", "mix", "mix_bias")


def curve_shapes() -> list[tuple[int, ...]]:
    """Every (N, C, H, W, K) this file runs curve_guide on: tests/test_launch_config.py checks
    their launch plans on the CPU."""
    return CURVE_SHAPES + [(2, 3, 40, 60, 16), (1, 3, 64, 64, 16)]


def _curve_case(N, C, H, W, K, dtype, seed=0):
    from helpers import make_curve_case

    cpu = [t.to(dtype) for t in make_curve_case(N, C, H, W, K, gen=torch.Generator().manual_seed(seed))]
    return cpu, [t.cuda() for t in cpu]


def _curve_compare(got, want, dtype, what, pixels=1, mask=None):
    got, want = got.double().cpu(), want.double()
    if mask is not None:
        got, want = got[mask], want[mask]
    tol = CURVE_TOL[dtype] * (1 + want.abs().max().item()) * (max(1, pixels) ** 0.5 if dtype != torch.float64 else 1)
    err = (got - want).abs().max().item() if want.numel() else 0.0
    assert err <= tol, f"{what}: max err {err:.3e} > {tol:.3e}"


@pytest.mark.parametrize("shape", CURVE_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_curve_guide_matches_cpu(shape, dtype):
    N, C, H, W, _ = shape
    cpu, dev = _curve_case(*shape, dtype)
    go = torch.randn(N, H, W, generator=torch.Generator().manual_seed(3)).to(dtype)
    want = ops.curve_guide(*[t.double() for t in cpu])
    want_grads = ops._curve_guide_backward(go.double(), *[t.double() for t in cpu], [True] * 7)
    out = ops.curve_guide(*dev)
    assert out.dtype == dtype and out.device.type == "cuda"
    grads = ops._curve_guide_backward(go.cuda(), *dev, [True] * 7)
    _curve_compare(out, want, dtype, "guide")
    # A pixel whose relu input or pre-clamp guide is within rounding of a kink may take the other
    # side in float32: its input gradient then legitimately differs by O(1). Compare the input
    # gradient away from the kinks; in the parameter sums one such pixel is within tolerance.
    from helpers import curve_pre_clamp

    a, g_pre = curve_pre_clamp(*cpu)
    smooth = (a.abs().amin(dim=(1, 2)) > 1e-5) & (g_pre.abs() > 1e-5) & ((g_pre - 1).abs() > 1e-5)
    smooth = smooth.unsqueeze(1).expand(N, C, H, W)
    for name, g, w in zip(CURVE_NAMES, grads, want_grads):
        assert g.dtype == dtype and g.shape == w.shape, name
        if dtype in (torch.float32, torch.float64):
            if name == "input":
                _curve_compare(g, w, dtype, "grad input", mask=smooth if dtype == torch.float32 else None)
            else:
                _curve_compare(g, w, dtype, f"grad {name}", N * H * W)


@pytest.mark.parametrize("shape", [(1, 3, 720, 1280, 16), (1, 5, 300, 300, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_curve_guide_forward_large_images_match_cpu(shape, dtype):
    # More pixels than one wave of the forward's resident blocks covers (on an H200 405,504 for
    # the four-pixel group kernel, C = 3, and 67,584 for the per-pixel kernel, C = 5): threads take
    # several turns of the grid-stride loop, which the shapes above never make them do.
    cpu, dev = _curve_case(*shape, dtype)
    want = ops.curve_guide(*[t.double() for t in cpu])
    _curve_compare(ops.curve_guide(*dev), want, dtype, f"guide {shape}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_curve_guide_masks(dtype):
    _, dev = _curve_case(2, 3, 33, 47, 16, dtype)
    go = torch.randn(2, 33, 47, dtype=dtype, device="cuda")
    full = ops._curve_guide_backward(go, *dev, [True] * 7)
    for mask in ([True] + [False] * 6, [False] + [True] * 6, [False, True, False, False, True, False, True]):
        part = ops._curve_guide_backward(go, *dev, mask)
        for m, p, f in zip(mask, part, full):
            if m:
                assert torch.equal(p, f)
            else:
                assert p.shape == (0,)
    assert all(t.shape == (0,) for t in ops._curve_guide_backward(go, *dev, [False] * 7))


@pytest.mark.parametrize("det", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 37, 53, 16), (1, 8, 19, 23, 256)])
def test_curve_guide_is_bitwise_reproducible(det, shape):
    _, dev = _curve_case(*shape, torch.float32)
    go = torch.randn(shape[0], shape[2], shape[3], device="cuda")
    with deterministic(det):
        a = ops._curve_guide_backward(go, *dev, [True] * 7)
        b = ops._curve_guide_backward(go, *dev, [True] * 7)
    for name, x, y in zip(CURVE_NAMES, a, b):
        assert torch.equal(x, y), name


def test_curve_guide_noncontiguous_and_empty():
    _, dev = _curve_case(2, 3, 20, 30, 8, torch.float64)
    views = [noncontiguous(dev[0]), dev[1].t().contiguous().t()] + [noncontiguous(t) for t in dev[2:]]
    torch.testing.assert_close(ops.curve_guide(*views), ops.curve_guide(*dev), rtol=0, atol=0)
    empty = [torch.rand(2, 3, 0, 5, dtype=torch.float64, device="cuda")] + dev[1:]
    assert ops.curve_guide(*empty).shape == (2, 0, 5)
    grads = ops._curve_guide_backward(torch.zeros(2, 0, 5, dtype=torch.float64, device="cuda"), *empty, [True] * 7)
    assert all(g.shape == t.shape and (g == 0).all() for g, t in zip(grads, empty))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_curve_guide_unaligned_input_equals_aligned(dtype):
    # A contiguous view that starts one element into its storage cannot take the vector loads of
    # the four-pixel groups: the element-wise path must give the same bits.
    _, dev = _curve_case(2, 3, 16, 24, 16, dtype)
    x = dev[0]
    shifted = torch.empty(x.numel() + 1, dtype=dtype, device="cuda")[1:].view(x.shape)
    shifted.copy_(x)
    assert shifted.data_ptr() % 16 != 0
    assert torch.equal(ops.curve_guide(shifted, *dev[1:]), ops.curve_guide(*dev))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("params", ["finite", "inf shift", "nan slope", "overflowing sums"])
def test_curve_guide_non_finite_values_match_cpu(dtype, params):
    # The CUDA kernels evaluate the curves through their sorted knots; a pixel whose channel value
    # is not finite, and a block whose table has a non-finite entry or whose sums overflow, take
    # the sum over the knots as the CPU does: the same NaNs and infinities, the same values.
    cpu, _ = _curve_case(2, 3, 16, 24, 16, dtype)
    cpu = [t.clone() for t in cpu]
    x = cpu[0]
    x[0, 0, 0, :5] = torch.tensor([float("inf"), float("-inf"), float("nan"), 1e30, -1e30], dtype=dtype)
    x[1, 2, 3, 4] = float("inf")
    if params == "inf shift":
        cpu[3][1, 5] = float("inf")
    elif params == "nan slope":
        cpu[4][2, 7] = float("nan")
    elif params == "overflowing sums":
        cpu[4].fill_(torch.finfo(dtype).max / 4)
    dev = [t.cuda() for t in cpu]
    go = torch.randn(2, 16, 24, generator=torch.Generator().manual_seed(5)).to(dtype)
    want = ops.curve_guide(*cpu)
    got = ops.curve_guide(*dev).cpu()
    torch.testing.assert_close(got, want, equal_nan=True, rtol=1e-5, atol=1e-5)
    want_grads = ops._curve_guide_backward(go, *cpu, [True] * 7)
    grads = ops._curve_guide_backward(go.cuda(), *dev, [True] * 7)
    for name, g, w in zip(CURVE_NAMES, grads, want_grads):
        g = g.cpu()
        assert torch.equal(torch.isnan(g), torch.isnan(w)), name
        assert torch.equal(torch.isinf(g), torch.isinf(w)), name
        if name == "input" and dtype == torch.float32:
            continue  # a pixel within rounding of a kink may take the other side (see above)
        finite = torch.isfinite(w)
        if finite.any():  # a non-finite input pixel can make every entry of a gradient NaN
            scale = 1 + w[finite].abs().max().item()
            assert (g[finite] - w[finite]).abs().max().item() <= 1e-4 * scale * (2 * 16 * 24) ** 0.5, name


def test_curve_guide_runs_on_the_current_stream():
    _, dev = _curve_case(1, 3, 64, 64, 16, torch.float32)
    go = torch.randn(1, 64, 64, device="cuda")
    want = ops.curve_guide(*dev), ops._curve_guide_backward(go, *dev, [True] * 7)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = ops.curve_guide(*dev)
        grads = ops._curve_guide_backward(go, *dev, [True] * 7)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert torch.equal(out, want[0])
    assert all(torch.equal(a, b) for a, b in zip(grads, want[1]))


def test_curve_guide_gradcheck_and_gradgradcheck():
    from helpers import make_curve_case

    args = [t.cuda().requires_grad_() for t in make_curve_case(1, 3, 3, 4, 3, margin=1e-4)]
    assert torch.autograd.gradcheck(bo.curve_guide, args, eps=1e-6, atol=1e-8)
    assert torch.autograd.gradgradcheck(bo.curve_guide, args, eps=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# bilateral_filter: the CUDA op against the compiled CPU op in float64 on the same values.

# (N, C, Cg, H, W, ky, kx); Cg None: the input guides itself. Odd sizes, channel counts beyond one
# register group (C = 5, Cg = 6), a single pixel, the benchmark's k = 15 (still tiled), windows
# whose staged tile exceeds 48 KiB (k = 41 on 5 channels, k = 61): the global-memory path; a joint
# input with a channel group past the guidance's (value terms only in pass 2), and windows larger
# than the image on both sides (every pass-2 partner row read through the border maps).
FILTER_SHAPES = [
    (2, 3, None, 37, 53, 5, 5),
    (1, 1, None, 1, 1, 3, 3),
    (2, 5, None, 19, 70, 3, 7),
    (1, 3, 1, 40, 33, 9, 9),
    (2, 2, 6, 21, 45, 5, 3),
    (1, 3, None, 64, 96, 15, 15),
    (1, 5, None, 50, 60, 41, 41),
    (1, 3, 2, 70, 70, 61, 61),
    (1, 6, 2, 17, 23, 5, 3),
    (2, 3, None, 2, 3, 9, 11),
    (1, 5, 2, 2, 3, 7, 9),
]
FILTER_BORDERS = ["reflect", "replicate", "constant", "circular"]


def all_filter_shapes() -> list[tuple]:
    """Every (N, C, Cg, H, W, ky, kx) this file launches bilateral_filter for: checked on the CPU by
    tests/test_launch_config.py."""
    fast = [shape for C, Cg in FILTER_FAST_CHANNELS for shape in _filter_fast_shapes(C, Cg)]
    return FILTER_SHAPES + [(2, 3, None, 33, 47, 5, 5), (1, 2, 1, 9, 11, 3, 5), (1, 3, None, 64, 64, 7, 7)] + fast


# The channel counts (C, Cg) of the fast CUDA kernels (compile-time channels and distance): RGB and
# grey, self-guided or with a grey or RGB guidance.
FILTER_FAST_CHANNELS = [(3, None), (1, None), (1, 1), (1, 3), (3, 1), (3, 3)]


def _filter_fast_shapes(C, Cg):
    # Tile tails in both directions and a batch of two (37 x 53, 13 x 70 on kernels of unequal
    # sides), a 1x1 image (every tap a border read), and k = 21: still staged by forward and pass 1,
    # the generic pass 2 for float64 only.
    return [(2, C, Cg, 37, 53, 9, 9), (2, C, Cg, 13, 70, 5, 3), (1, C, Cg, 1, 1, 3, 3), (1, C, Cg, 30, 40, 21, 21)]


def _filter_case(shape, dtype, seed=0):
    N, C, Cg, H, W, _, _ = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(N, C, H, W, generator=g, dtype=torch.float64).to(dtype)
    gd = None if Cg is None else torch.rand(N, Cg, H, W, generator=g, dtype=torch.float64).to(dtype)
    sc = (0.1 + torch.rand(N, generator=g, dtype=torch.float64)).to(dtype)
    ss = (0.5 + 3 * torch.rand(N, 2, generator=g, dtype=torch.float64)).to(dtype)
    go = (torch.rand(N, C, H, W, generator=g, dtype=torch.float64) - 0.5).to(dtype)
    return x, gd, sc, ss, go


def _filter_check(shape, dtype, border, distance, *, noncontig=False):
    _, _, Cg, H, W, ky, kx = shape
    if border == "reflect" and (ky // 2 >= H or kx // 2 >= W):
        border = "replicate"
    if border == "circular" and (ky // 2 > H or kx // 2 > W):
        border = "constant"
    x, gd, sc, ss, go = _filter_case(shape, dtype)
    cu = [t.cuda() if t is not None else None for t in (x, gd, sc, ss, go)]
    if noncontig:
        cu = [noncontiguous(t) if t is not None and t.dim() == 4 else t for t in cu]
    x_c, gd_c, sc_c, ss_c, go_c = cu
    k = [ky, kx]
    ref = ops.bilateral_filter(_d(x), _d(gd), k, _d(sc), _d(ss), border, distance)
    _assert_close(ops.bilateral_filter(x_c, gd_c, k, sc_c, ss_c, border, distance), ref, dtype, "filter forward")
    mask = [True, Cg is not None, True, True]
    ref = ops._bilateral_filter_backward(_d(go), _d(x), _d(gd), k, _d(sc), _d(ss), border, distance, mask)
    got = ops._bilateral_filter_backward(go_c, x_c, gd_c, k, sc_c, ss_c, border, distance, mask)
    for name, g, r, m in zip(("input", "guidance", "sigma_color", "sigma_space"), got, ref, mask):
        if m:
            _assert_close(g, r, dtype, f"filter grad_{name} ({border}, {distance}, {shape})")
        else:
            assert g.shape == (0,), name
    # The forward that also returns the weight sums, and the backward given them: pass 1 pixel by
    # pixel (filter_centre_kernel) where no sigma gradient is wanted, the sweep where one is.
    out_c, norm_c = ops._bilateral_filter_forward(x_c, gd_c, k, sc_c, ss_c, border, distance)
    ref_norm = ops._bilateral_filter_forward(_d(x), _d(gd), k, _d(sc), _d(ss), border, distance)[1]
    assert norm_c.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    _assert_close(norm_c.to(dtype), ref_norm, dtype, f"filter weight sums ({border}, {distance}, {shape})")
    # A joint filter's pass 2 from saved W also without the range term, and without the value term.
    saved_masks = [[True, Cg is not None, False, False], mask]
    if Cg is not None:
        saved_masks += [[False, True, False, False], [True, False, False, False]]
    for saved_mask in saved_masks:
        ref = ops._bilateral_filter_backward(_d(go), _d(x), _d(gd), k, _d(sc), _d(ss), border, distance, saved_mask)
        got = ops._bilateral_filter_backward(go_c, x_c, gd_c, k, sc_c, ss_c, border, distance, saved_mask, out_c, norm_c)
        for name, g, r, m in zip(("input", "guidance", "sigma_color", "sigma_space"), got, ref, saved_mask):
            if m:
                _assert_close(g, r, dtype, f"filter grad_{name} from saved W ({border}, {distance}, {shape})")


@pytest.mark.parametrize("shape", FILTER_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_filter_matches_cpu(shape, dtype):
    for border, distance in zip(FILTER_BORDERS, ["l1", "l2", "l2", "l1"]):
        _filter_check(shape, dtype, border, distance)


@pytest.mark.parametrize("channels", FILTER_FAST_CHANNELS)
@pytest.mark.parametrize("distance", ["l1", "l2"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_filter_fast_paths_match_cpu(channels, distance, dtype):
    for shape in _filter_fast_shapes(*channels):
        for border in FILTER_BORDERS:
            _filter_check(shape, dtype, border, distance)


@pytest.mark.parametrize("channels", FILTER_FAST_CHANNELS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_filter_fast_paths_half_precision(channels, dtype):
    C, Cg = channels
    _filter_check((2, C, Cg, 37, 53, 9, 9), dtype, "reflect", "l1")
    _filter_check((1, C, Cg, 13, 70, 5, 3), dtype, "circular", "l2")


@pytest.mark.parametrize("border", FILTER_BORDERS)
@pytest.mark.parametrize("distance", ["l1", "l2"])
def test_filter_every_border_and_distance(border, distance):
    _filter_check((2, 3, None, 23, 41, 7, 5), torch.float32, border, distance)
    _filter_check((1, 2, 3, 23, 41, 5, 7), torch.float32, border, distance, noncontig=True)


@pytest.mark.parametrize("mask", [m for m in itertools.product([False, True], repeat=4) if any(m)])
def test_filter_output_masks(mask):
    shape = (1, 3, 2, 17, 19, 5, 5)
    x, gd, sc, ss, go = (t.cuda() for t in _filter_case(shape, torch.float64))
    full = ops._bilateral_filter_backward(go, x, gd, [5, 5], sc, ss, "reflect", "l1", [True] * 4)
    got = ops._bilateral_filter_backward(go, x, gd, [5, 5], sc, ss, "reflect", "l1", list(mask))
    for wanted, g, f in zip(mask, got, full):
        assert torch.equal(g, f) if wanted else g.shape == (0,)


def test_filter_is_bitwise_deterministic():
    x, _, sc, ss, go = (t.cuda() if t is not None else None for t in _filter_case((2, 3, None, 200, 300, 9, 9), torch.float32))
    first = ops._bilateral_filter_backward(go, x, None, [9, 9], sc, ss, "reflect", "l1", [True, False, True, True])
    for _ in range(3):
        again = ops._bilateral_filter_backward(go, x, None, [9, 9], sc, ss, "reflect", "l1", [True, False, True, True])
        for a, b in zip(again, first):
            assert torch.equal(a, b)


def test_filter_runs_on_the_current_stream():
    x, gd, sc, ss, go = (t.cuda() for t in _filter_case((1, 3, 1, 128, 160, 9, 9), torch.float32))
    want_out = ops.bilateral_filter(x, gd, [9, 9], sc, ss, "reflect", "l1")
    want = ops._bilateral_filter_backward(go, x, gd, [9, 9], sc, ss, "reflect", "l1", [True] * 4)
    # The forward that keeps W, and the backward given it (filter_centre_kernel).
    saved_mask = [True, True, False, False]
    want_saved = ops._bilateral_filter_forward(x, gd, [9, 9], sc, ss, "reflect", "l1")
    want_got_saved = ops._bilateral_filter_backward(go, x, gd, [9, 9], sc, ss, "reflect", "l1", saved_mask, *want_saved)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = ops.bilateral_filter(x, gd, [9, 9], sc, ss, "reflect", "l1")
        got = ops._bilateral_filter_backward(go, x, gd, [9, 9], sc, ss, "reflect", "l1", [True] * 4)
        saved = ops._bilateral_filter_forward(x, gd, [9, 9], sc, ss, "reflect", "l1")
        got_saved = ops._bilateral_filter_backward(go, x, gd, [9, 9], sc, ss, "reflect", "l1", saved_mask, *saved)
    side.synchronize()
    assert torch.equal(out, want_out)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    for a, b in zip(saved, want_saved):
        assert torch.equal(a, b)
    for a, b in zip(got_saved, want_got_saved):
        assert torch.equal(a, b)


def test_filter_empty_images():
    for shape in [(0, 3, 5, 5), (2, 3, 0, 5), (2, 0, 4, 4)]:
        x = torch.rand(*shape, device="cuda", requires_grad=True)
        out = bo.bilateral_blur(x, 3, 0.1, (1.0, 1.0))
        assert out.shape == shape
        out.sum().backward()
        assert x.grad.shape == shape


def test_filter_gradcheck():
    x, gd, sc, ss, _ = (t.cuda() for t in _filter_case((1, 2, 2, 5, 6, 3, 3), torch.float64))
    for guidance in (None, gd):
        leaves = tuple(t.requires_grad_() if t is not None else None for t in (x, guidance, sc, ss))

        def fn(x, g, sc, ss):
            return bo.bilateral_filter(x, (3, 5), sc, ss, "reflect", "l1", guidance=g)

        assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7)


def test_filter_public_api_matches_kornia_on_cuda():
    kornia = pytest.importorskip("kornia")
    x = torch.rand(2, 3, 64, 80, device="cuda")
    g = torch.rand(2, 1, 64, 80, device="cuda")
    torch.testing.assert_close(bo.bilateral_blur(x, 9, 0.1, (3.0, 3.0)), kornia.filters.bilateral_blur(x, 9, 0.1, (3.0, 3.0)), rtol=0, atol=1e-5)
    torch.testing.assert_close(
        bo.joint_bilateral_blur(x, g, (5, 7), 0.2, (1.5, 2.0), "circular", "l2"),
        kornia.filters.joint_bilateral_blur(x, g, (5, 7), 0.2, (1.5, 2.0), "circular", "l2"),
        rtol=0, atol=1e-5,
    )


# ----------------------------------------------------------------------------------------------
# Radiance-field grids: align_corners on the slice ops, bilateral_slice_apply_points, grid_tv_loss,
# and the compat module, against the compiled CPU ops in float64.


def _c64(t):
    return t.detach().double().cpu()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 3, 3, 8, 16, 16, 37, 53), (2, 3, 1, 1, 5, 7, 9, 1), (1, 1, 4, 4, 8, 16, 64, 70)])
def test_align_corners_against_cpu(shape, dtype):
    n, co, ci, d, gh, gw, h, w = shape
    g = torch.Generator().manual_seed(5)
    grid = torch.randn(n, co * (ci + 1), d, gh, gw, generator=g).to(dtype)
    guide = (torch.rand(n, h, w, generator=g) * 1.2 - 0.1).to(dtype)
    inp = torch.randn(n, ci, h, w, generator=g).to(dtype)
    ga = torch.randn(n, co, h, w, generator=g).to(dtype)
    gs = torch.randn(n, co * (ci + 1), h, w, generator=g).to(dtype)
    tol = TOL[dtype]
    for det in (False, True):
        with deterministic(det):
            out = ops.bilateral_slice_apply(grid.cuda(), guide.cuda(), inp.cuda(), True, True)
            got = ops._bilateral_slice_apply_backward(ga.cuda(), grid.cuda(), guide.cuda(), inp.cuda(), True, False, [True, True, True], True)
            s = ops.bilateral_slice(grid.cuda(), guide.cuda(), True)
            sg = ops._bilateral_slice_backward(gs.cuda(), grid.cuda(), guide.cuda(), False, [True, True], True)
        want = ops.bilateral_slice_apply(_c64(grid), _c64(guide), _c64(inp), True, True)
        wants = ops._bilateral_slice_apply_backward(_c64(ga), _c64(grid), _c64(guide), _c64(inp), True, False, [True, True, True], True)
        torch.testing.assert_close(_c64(out), want, rtol=tol, atol=tol * (1 + want.abs().max().item()))
        torch.testing.assert_close(_c64(s), ops.bilateral_slice(_c64(grid), _c64(guide), True), rtol=tol, atol=tol * 10)
        # The guide gradient is compared away from the knots in z (a depth of one has none).
        zg = _c64(guide) * (d - 1)
        kink = (zg - zg.round()).abs() > 1e-3 if d > 1 else torch.ones_like(zg, dtype=torch.bool)
        for i, (a, b) in enumerate(zip(got, wants)):
            a, b = _c64(a), b
            if i == 1:
                a, b = a[kink], b[kink]
            scale = 1 + b.abs().max().item() if b.numel() else 1
            assert (a - b).abs().max().item() <= 10 * tol * scale, i
        want_s = ops._bilateral_slice_backward(_c64(gs), _c64(grid), _c64(guide), False, [True, True], True)
        assert (_c64(sg[0]) - want_s[0]).abs().max().item() <= 10 * tol * (1 + want_s[0].abs().max().item())


POINTS_CASES = [(3000, 5, 3, 3, 8, 16, 16, True), (1, 1, 3, 3, 8, 16, 16, True), (77, 3, 1, 12, 1, 5, 7, False),
                (70000, 2, 3, 3, 4, 8, 8, True), (4099, 600, 3, 3, 8, 16, 16, True)]


def _points_inputs(case, dtype, seed=7):
    p, m, ci, co, d, gh, gw, off = case
    g = torch.Generator().manual_seed(seed)
    grid = torch.randn(m, co * (ci + int(off)), d, gh, gw, generator=g).to(dtype)
    coords = (torch.rand(p, 3, generator=g) * 1.4 - 0.2).to(dtype)
    inp = torch.randn(p, ci, generator=g).to(dtype)
    idx = torch.randint(0, m, (p,), generator=g)
    go = torch.randn(p, co, generator=g).to(dtype)
    return grid, coords, inp, idx, go, off


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", POINTS_CASES)
def test_points_against_cpu(case, dtype):
    grid, coords, inp, idx, go, off = _points_inputs(case, dtype)
    tol = TOL[dtype]
    out = ops.bilateral_slice_apply_points(grid.cuda(), coords.cuda(), inp.cuda(), idx.cuda(), off)
    want = ops.bilateral_slice_apply_points(_c64(grid), _c64(coords), _c64(inp), idx, off)
    assert (_c64(out) - want).abs().max().item() <= tol * (1 + want.abs().max().item())
    got = ops._bilateral_slice_apply_points_backward(go.cuda(), grid.cuda(), coords.cuda(), inp.cuda(), idx.cuda(), off, [True, True, True])
    wants = ops._bilateral_slice_apply_points_backward(_c64(go), _c64(grid), _c64(coords), _c64(inp), idx, off, [True, True, True])
    d, gh, gw = grid.shape[2:]
    # The coordinate gradient is compared away from the knots of every axis longer than one cell.
    s = _c64(coords) * torch.tensor([gw - 1, gh - 1, d - 1], dtype=torch.float64)
    away = ((s - s.round()).abs() > 1e-2)[:, [i for i, n in enumerate((gw, gh, d)) if n > 1]].all(1)
    for i, (a, b) in enumerate(zip(got, wants)):
        a = _c64(a)
        if i == 1:
            a, b = a[away], b[away]
        assert (a - b).abs().max().item() <= 10 * tol * (1 + b.abs().max().item()), i


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_points_grid_gradient_is_bitwise_reproducible(dtype):
    grid, coords, inp, idx, go, off = _points_inputs((200000, 3, 3, 3, 8, 16, 16, True), dtype)
    idx[:150000] = 1
    args = [t.cuda() for t in (go, grid, coords, inp, idx)]
    for det in (False, True):
        with deterministic(det):
            a = ops._bilateral_slice_apply_points_backward(*args, off, [True, False, False])[0]
            b = ops._bilateral_slice_apply_points_backward(*args, off, [True, False, False])[0]
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", [(150000, 1, 3, 3, 8, 16, 16, True), (3000, 5, 3, 3, 8, 16, 16, True)],
                         ids=["fast", "plain"])
def test_points_grid_gradient_fixed_point_bound(case):
    # The fixed-point scale comes from max |grad_output| and max |input| on the device
    # (points_absmax_kernel): huge and tiny gradients keep their relative accuracy, and a
    # non-finite grad_output or input, which admits no finite scale, makes the grid gradient NaN.
    grid, coords, inp, idx, go, off = _points_inputs(case, torch.float32)
    args = [t.cuda() for t in (grid, coords, inp, idx)]
    want = ops._bilateral_slice_apply_points_backward(_c64(go), _c64(grid), _c64(coords), _c64(inp), idx, off,
                                                      [True, False, False])[0]
    for factor in (1e-30, 1.0, 1e30):
        got = ops._bilateral_slice_apply_points_backward((go * factor).cuda(), *args, off, [True, False, False])[0]
        assert torch.isfinite(got).all(), factor
        assert (_c64(got) / factor - want).abs().max().item() <= 1e-4 * (1 + want.abs().max().item()), factor
    for bad in (float("inf"), float("nan")):
        g2 = go.clone()
        g2[7, 1] = bad
        got = ops._bilateral_slice_apply_points_backward(g2.cuda(), *args, off, [True, True, True])
        assert torch.isnan(got[0]).all(), bad
        x2 = inp.clone()
        x2[3, 0] = bad
        got = ops._bilateral_slice_apply_points_backward(go.cuda(), args[0], args[1], x2.cuda(), args[3], off,
                                                         [True, False, False])[0]
        assert torch.isnan(got).all(), bad


# The fast path (C = 12: 3 inputs and an offset, at least as many samples as cells; see
# launch_config.h's points_plan): the privatised grid gradient with 3 channels a slice (4 slices),
# slices of 5, 5 and 2 channels, one channel a slice over 3 grids (a full 48 KiB slab); and 4
# grids, too many for the slab: with the grid gradient the backward falls back to
# points_backward_kernel, without it (and in the forward) the fast kernels stay.
FAST_POINTS_CASES = [(150000, 1, 3, 3, 8, 16, 16, True), (40000, 1, 3, 3, 4, 16, 17, True),
                     (100000, 3, 3, 3, 8, 16, 16, True), (40000, 4, 3, 3, 8, 16, 16, True)]
POINTS_MASKS = [list(m) for m in itertools.product([False, True], repeat=3) if any(m)]


def _check_points_backward(got, want, coords, shape, tol, rows=None):
    d, gh, gw = shape
    s = _c64(coords) * torch.tensor([gw - 1, gh - 1, d - 1], dtype=torch.float64)
    away = ((s - s.round()).abs() > 1e-2)[:, [i for i, n in enumerate((gw, gh, d)) if n > 1]].all(1)
    for i, (a, b) in enumerate(zip(got, want)):
        if a is None or b is None or a.numel() == 0 or b.numel() == 0:
            continue
        a = _c64(a)
        if rows is not None and i > 0:
            a = a[rows]
        if i == 1:
            a, b = a[away], b[away]
        assert (a - b).abs().max().item() <= 10 * tol * (1 + b.abs().max().item()), i


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("case", FAST_POINTS_CASES)
def test_points_fast_path_against_cpu(case, dtype):
    grid, coords, inp, idx, go, off = _points_inputs(case, dtype)
    m = case[1]
    idx[5] = m + 3  # out of range: NaN for that sample, nothing in the grid gradient
    idx[-1] = -1
    ok = (idx >= 0) & (idx < m)
    tol = TOL[dtype]
    out = ops.bilateral_slice_apply_points(grid.cuda(), coords.cuda(), inp.cuda(), idx.cuda(), off).cpu()
    assert torch.isnan(out[~ok]).all()
    want = ops.bilateral_slice_apply_points(_c64(grid), _c64(coords[ok]), _c64(inp[ok]), idx[ok], off)
    assert (_c64(out[ok]) - want).abs().max().item() <= tol * (1 + want.abs().max().item())
    for mask in POINTS_MASKS:
        got = ops._bilateral_slice_apply_points_backward(go.cuda(), grid.cuda(), coords.cuda(), inp.cuda(), idx.cuda(), off, mask)
        got = [t.cpu() if w else None for t, w in zip(got, mask)]
        wants = ops._bilateral_slice_apply_points_backward(_c64(go[ok]), _c64(grid), _c64(coords[ok]), _c64(inp[ok]), idx[ok], off, mask)
        wants = [t if w else None for t, w in zip(wants, mask)]
        for i in (1, 2):
            if mask[i]:
                assert torch.isnan(got[i][~ok]).all(), (mask, i)
        if mask[0]:
            assert torch.isfinite(got[0]).all(), mask
        _check_points_backward(got, wants, coords[ok], grid.shape[2:], tol, rows=ok)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_points_fast_path_pixel_grid(dtype):
    """bilagrid's uniform case: samples on a pixel grid, so that the lanes of a warp share cells
    (whole-warp and partial peer groups of the aggregated shared-memory sums); half the rows at one
    guide value. Against the CPU, and the grid gradient bitwise equal over two runs."""
    h, w = 270, 360
    g = torch.Generator().manual_seed(5)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    z = torch.rand(h, w, generator=g) * 1.4 - 0.2
    z[::2] = 0.5
    coords = torch.stack([xs, ys, z], -1).reshape(-1, 3).to(dtype)
    p = coords.shape[0]
    grid = torch.randn(1, 12, 8, 16, 16, generator=g).to(dtype)
    inp = torch.rand(p, 3, generator=g).to(dtype)
    go = torch.randn(p, 3, generator=g).to(dtype)
    idx = torch.zeros(p, dtype=torch.int64)
    tol = TOL[dtype]
    args = [t.cuda() for t in (go, grid, coords, inp, idx)]
    out = ops.bilateral_slice_apply_points(*args[1:], True).cpu()
    want = ops.bilateral_slice_apply_points(_c64(grid), _c64(coords), _c64(inp), idx, True)
    assert (_c64(out) - want).abs().max().item() <= tol * (1 + want.abs().max().item())
    got = [t.cpu() for t in ops._bilateral_slice_apply_points_backward(*args, True, [True, True, True])]
    wants = ops._bilateral_slice_apply_points_backward(_c64(go), _c64(grid), _c64(coords), _c64(inp), idx, True, [True, True, True])
    _check_points_backward(got, wants, coords, grid.shape[2:], tol)
    again = ops._bilateral_slice_apply_points_backward(*args, True, [True, False, False])[0].cpu()
    assert torch.equal(got[0], again)


def test_points_bad_index_gives_nan_not_a_crash():
    grid, coords, inp, idx, go, off = _points_inputs((100, 3, 3, 3, 2, 3, 4, True), torch.float32)
    idx[5] = 99
    idx[6] = -1
    out = ops.bilateral_slice_apply_points(grid.cuda(), coords.cuda(), inp.cuda(), idx.cuda(), off)
    assert torch.isnan(out[5:7]).all() and torch.isfinite(out[:5]).all()
    gg, gc, gi = ops._bilateral_slice_apply_points_backward(go.cuda(), grid.cuda(), coords.cuda(), inp.cuda(), idx.cuda(), off, [True, True, True])
    assert torch.isfinite(gg).all() and torch.isnan(gc[5:7]).all()
    torch.cuda.synchronize()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [(600, 12, 8, 16, 16, None), (5, 12, 1, 5, 7, [4, 0, 4]), (3, 2, 1, 1, 1, None), (4, 3, 2, 3, 4, [])])
def test_tv_loss_against_cpu(case, dtype):
    m, c, d, gh, gw, idx = case
    x = torch.randn(m, c, d, gh, gw, generator=torch.Generator().manual_seed(3)).to(dtype)
    i = None if idx is None else torch.tensor(idx, dtype=torch.int64)
    got = ops.grid_tv_loss(x.cuda(), None if i is None else i.cuda())
    want = ops.grid_tv_loss(_c64(x), i)
    if torch.isnan(want):
        assert torch.isnan(got)
        return
    tol = TOL[dtype]
    assert abs(got.double().item() - want.item()) <= tol * (1 + abs(want.item()))
    go = torch.tensor(1.7).to(dtype)
    g = ops._grid_tv_loss_backward(go.cuda(), x.cuda(), None if i is None else i.cuda())
    w = ops._grid_tv_loss_backward(_c64(go), _c64(x), i)
    assert (_c64(g) - w).abs().max().item() <= tol * (1 + w.abs().max().item())
    assert torch.equal(ops.grid_tv_loss(x.cuda(), None if i is None else i.cuda()), got)  # reproducible


# (M, C, D, Gh, Gw, idx): rows of a multiple of 4 elements take the kernels' runs of 4 (Gw = 4 is
# one run per row, Gw = 12 three), other widths one element per thread; axes of size one, several
# grids, idx absent, repeated, or skipping grids.
TV_PATH_CASES = [
    (3, 12, 8, 16, 16, None), (3, 12, 8, 16, 16, [2, 0, 2, 2]), (2, 5, 3, 7, 5, None), (2, 5, 3, 7, 5, [1, 1]),
    (4, 2, 1, 1, 8, None), (4, 2, 1, 1, 8, [3, 0, 3]), (2, 3, 2, 3, 4, None), (2, 3, 2, 3, 4, [1, 1, 0, 1]),
    (3, 2, 3, 5, 12, [2, 2]), (2, 1, 4, 1, 4, None), (2, 2, 1, 6, 4, [0]),
]


def _tv_check(x, i, dtype, go=1.7):
    """The CUDA loss and gradient of x (any layout) against the CPU op in float64; returns both."""
    tol = TOL[dtype]
    ic = None if i is None else i.cuda()
    got = ops.grid_tv_loss(x, ic)
    want = ops.grid_tv_loss(_c64(x), i)
    assert abs(got.double().item() - want.item()) <= tol * (1 + abs(want.item()))
    g = ops._grid_tv_loss_backward(torch.tensor(go).to(dtype).cuda(), x, ic)
    w = ops._grid_tv_loss_backward(_c64(torch.tensor(go).to(dtype)), _c64(x), i)
    assert (_c64(g) - w).abs().max().item() <= tol * (1 + w.abs().max().item())
    assert torch.equal(ops.grid_tv_loss(x, ic), got)  # reproducible
    return got, g


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", TV_PATH_CASES)
def test_tv_loss_vector_and_scalar_paths(case, dtype):
    m, c, d, gh, gw, idx = case
    x = torch.randn(m, c, d, gh, gw, generator=torch.Generator().manual_seed(11)).to(dtype)
    i = None if idx is None else torch.tensor(idx, dtype=torch.int64)
    got, g = _tv_check(x.cuda(), i, dtype)
    # The same values one element off the vector alignment: the runs take scalar loads, with the
    # same sums (the partials depend on the sizes alone), so the same bits.
    buf = torch.empty(x.numel() + 1, dtype=dtype, device="cuda")
    xs = buf[1:].view(x.shape)
    xs.copy_(x.cuda())
    assert xs.data_ptr() % 16 != 0
    got_s, g_s = _tv_check(xs, i, dtype)
    assert torch.equal(got_s, got) and torch.equal(g_s, g)


@pytest.mark.parametrize("shape", [(3, 12, 8, 16, 16), (2, 5, 3, 7, 5)])
def test_tv_loss_bad_index_gives_nan_not_a_crash(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(4))
    idx = torch.tensor([1, shape[0], 0, -1, 1])
    assert torch.isnan(ops.grid_tv_loss(x.cuda(), idx.cuda()))
    # The backward counts the valid entries only (the gradient of the loss over them, rescaled by
    # the weights' B: the weights see all 5 entries).
    g = ops._grid_tv_loss_backward(torch.tensor(1.0).cuda(), x.cuda(), idx.cuda())
    good = idx[(idx >= 0) & (idx < shape[0])]
    w = ops._grid_tv_loss_backward(torch.tensor(1.0, dtype=torch.float64), _c64(x), good)
    assert torch.allclose(_c64(g) * 5, w * 3, rtol=1e-4, atol=1e-6)
    torch.cuda.synchronize()


def test_bilagrid_compat_on_cuda():
    from bilateral_ops.compat.bilagrid import BilateralGrid, slice

    g = torch.Generator().manual_seed(0)
    model = BilateralGrid(4)
    with torch.no_grad():
        model.grids.add_(0.3 * torch.randn(model.grids.shape, generator=g))
    xy = torch.rand(2, 30, 40, 2, generator=g)
    rgb = torch.rand(2, 30, 40, 3, generator=g)
    idx = torch.tensor([[3], [1]])
    want = slice(model, xy, rgb, idx)
    cmodel = BilateralGrid(4).cuda()
    cmodel.load_state_dict(model.state_dict())
    got = slice(cmodel, xy.cuda(), rgb.cuda(), idx.cuda())
    for key in ("rgb", "rgb_affine_mats"):
        torch.testing.assert_close(got[key].cpu(), want[key], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cmodel.tv_loss().cpu(), model.tv_loss(), rtol=1e-5, atol=1e-6)
