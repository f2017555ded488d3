"""The library as a whole: the op list, compiled devices, the fallback to the reference and the
switch that forbids it, the version."""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch

import bilateral_ops as bo
import bilateral_ops._library as lib
from bilateral_ops import reference
from helpers import F64, make_apply_case

PUBLIC = ("bilateral_slice", "bilateral_slice_apply")
# Ops whose derivatives are other ops (the splat's are slices; the blur is self-adjoint).
SELF_CONTAINED = ("grid_splat", "grid_blur")


def test_every_op_is_registered_once_with_cpu_kernels():
    assert lib.LOAD_ERROR is None
    for name in PUBLIC:
        assert name in lib.OPS
        assert f"_{name}_backward" in lib.OPS and f"_{name}_dguide" in lib.OPS
        assert getattr(bo, name) is getattr(importlib.import_module(f"bilateral_ops.{name}"), name)
    for name in SELF_CONTAINED:
        assert name in lib.OPS
        assert getattr(bo, name) is getattr(importlib.import_module(f"bilateral_ops.{name}"), name)
    for op in lib.OPS:
        assert "cpu" in bo.compiled_devices(op)
    assert bo.compiled_devices() == bo.compiled_devices("bilateral_slice_apply")


def test_compiled_devices_rejects_unknown_ops():
    with pytest.raises(ValueError, match="unknown op"):
        bo.compiled_devices("bilateral_splat")


def test_version_is_written_once():
    from bilateral_ops._version import __version__

    assert bo.__version__ == __version__ and __version__.count(".") == 2


def test_fallback_raises_when_compiled_required(monkeypatch):
    monkeypatch.setenv("BILATERAL_OPS_REQUIRE_COMPILED", "1")
    monkeypatch.setattr(lib, "_WARNED", set())
    with pytest.raises(RuntimeError, match="no compiled kernel"):
        lib.fallback("bilateral_slice_apply", torch.device("cpu"))


@pytest.mark.parametrize("value", ["0", ""])
def test_fallback_warns_once(monkeypatch, value):
    monkeypatch.setenv("BILATERAL_OPS_REQUIRE_COMPILED", value)
    monkeypatch.setattr(lib, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match="bilateral_slice_apply"):
        lib.fallback("bilateral_slice_apply", torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lib.fallback("bilateral_slice_apply", torch.device("cpu"))  # second call: silent
    with pytest.warns(RuntimeWarning, match="bilateral_slice"):
        lib.fallback("bilateral_slice", torch.device("cpu"))  # another op warns on its own


def test_fallback_unset_env_warns(monkeypatch):
    monkeypatch.delenv("BILATERAL_OPS_REQUIRE_COMPILED", raising=False)
    monkeypatch.setattr(lib, "_WARNED", set())
    with pytest.warns(RuntimeWarning):
        lib.fallback("bilateral_slice", torch.device("cpu"))


def test_public_functions_use_fallback_without_a_kernel(monkeypatch, gen):
    """With no kernel for the device, the public functions raise (env set) or warn and return the
    reference result (env "0")."""
    grid, guide, inp = make_apply_case(1, 3, 3, 4, 3, 3, 5, 6, True, F64, "uniform", gen)
    monkeypatch.setattr(lib, "_WARNED", set())
    for name in PUBLIC:
        monkeypatch.setitem(lib.KERNEL_DEVICES, name, frozenset())
    monkeypatch.setenv("BILATERAL_OPS_REQUIRE_COMPILED", "1")
    with pytest.raises(RuntimeError, match="BILATERAL_OPS_REQUIRE_COMPILED"):
        bo.bilateral_slice_apply(grid, guide, inp)
    with pytest.raises(RuntimeError, match="BILATERAL_OPS_REQUIRE_COMPILED"):
        bo.bilateral_slice(grid, guide)
    monkeypatch.setenv("BILATERAL_OPS_REQUIRE_COMPILED", "0")
    with pytest.warns(RuntimeWarning):
        out = bo.bilateral_slice_apply(grid, guide, inp)
    torch.testing.assert_close(out, reference.bilateral_slice_apply(grid, guide, inp), rtol=0, atol=0)
    with pytest.warns(RuntimeWarning):
        out = bo.bilateral_slice(grid, guide)
    torch.testing.assert_close(out, reference.bilateral_slice(grid, guide), rtol=0, atol=0)


def test_grid_ops_use_fallback_without_a_kernel(monkeypatch, gen):
    inp = torch.rand(1, 2, 6, 7, generator=gen, dtype=F64)
    guide = torch.rand(1, 6, 7, generator=gen, dtype=F64)
    monkeypatch.setattr(lib, "_WARNED", set())
    for name in SELF_CONTAINED + ("bilateral_slice", "_bilateral_grid_filter_splat", "_bilateral_grid_filter_slice"):
        monkeypatch.setitem(lib.KERNEL_DEVICES, name, frozenset())
    monkeypatch.setenv("BILATERAL_OPS_REQUIRE_COMPILED", "1")
    with pytest.raises(RuntimeError, match="grid_splat"):
        bo.grid_splat(inp, guide, (3, 2, 2))
    monkeypatch.setenv("BILATERAL_OPS_REQUIRE_COMPILED", "0")
    with pytest.warns(RuntimeWarning, match="grid_splat"):
        grid = bo.grid_splat(inp, guide, (3, 2, 2))
    torch.testing.assert_close(grid, reference.grid_splat(inp, guide, (3, 2, 2)), rtol=0, atol=0)
    with pytest.warns(RuntimeWarning, match="grid_blur"):
        blurred = bo.grid_blur(grid, 1.0)
    torch.testing.assert_close(blurred, reference.grid_blur(grid, 1.0), rtol=0, atol=0)
    with pytest.warns(RuntimeWarning, match="bilateral_grid_filter"):
        out = bo.bilateral_grid_filter(inp, 0.3, 4.0)
    torch.testing.assert_close(out, reference.bilateral_grid_filter(inp, 0.3, 4.0), rtol=0, atol=0)


def test_radiance_field_ops_use_fallback_without_a_kernel(monkeypatch, gen):
    """bilateral_slice_apply_points and grid_tv_loss (and so the compat module) fall back to the
    pure-torch reference, with the same results."""
    grid = torch.randn(3, 12, 2, 3, 4, generator=gen, dtype=F64)
    coords = torch.rand(20, 3, generator=gen, dtype=F64)
    x = torch.rand(20, 3, generator=gen, dtype=F64)
    idx = torch.randint(0, 3, (20,), generator=gen)
    want = bo.bilateral_slice_apply_points(grid, coords, x, idx)
    want_tv = bo.grid_tv_loss(grid, idx[:4])
    monkeypatch.setattr(lib, "_WARNED", set())
    for name in ("bilateral_slice_apply_points", "grid_tv_loss"):
        monkeypatch.setitem(lib.KERNEL_DEVICES, name, frozenset())
    monkeypatch.setenv("BILATERAL_OPS_REQUIRE_COMPILED", "1")
    with pytest.raises(RuntimeError, match="bilateral_slice_apply_points"):
        bo.bilateral_slice_apply_points(grid, coords, x, idx)
    monkeypatch.setenv("BILATERAL_OPS_REQUIRE_COMPILED", "0")
    with pytest.warns(RuntimeWarning, match="bilateral_slice_apply_points"):
        got = bo.bilateral_slice_apply_points(grid, coords, x, idx)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    with pytest.warns(RuntimeWarning, match="grid_tv_loss"):
        got_tv = bo.grid_tv_loss(grid, idx[:4])
    torch.testing.assert_close(got_tv, want_tv, rtol=0, atol=1e-12)
