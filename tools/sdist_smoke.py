"""Smoke test of an installed bilateral_ops (run from outside the source tree, e.g. after
installing the sdist into a fresh venv): every op of the library runs its compiled CPU kernel and
agrees with the reference, and the package data is there.

    BILATERAL_OPS_REQUIRE_COMPILED=1 python tools/sdist_smoke.py
"""

from __future__ import annotations

import os
import sys

import torch


def main() -> int:
    os.environ.setdefault("BILATERAL_OPS_REQUIRE_COMPILED", "1")
    import bilateral_ops as bo
    import bilateral_ops._library as lib
    from bilateral_ops import reference

    here = os.path.dirname(os.path.abspath(bo.__file__))
    if os.path.abspath(os.getcwd()).startswith(os.path.dirname(here)) and os.path.exists("setup.py"):
        print("run this from outside the source tree, so that the installed package is tested")
        return 1
    if lib.LOAD_ERROR is not None:
        print(f"FAILED: the extension did not load: {lib.LOAD_ERROR}")
        return 1
    assert os.path.exists(os.path.join(here, "py.typed")), "py.typed missing from the installation"

    g = torch.Generator().manual_seed(0)
    grid = torch.randn(2, 12, 4, 3, 5, generator=g, dtype=torch.float64)
    guide = torch.rand(2, 9, 11, generator=g, dtype=torch.float64)
    x = torch.rand(2, 3, 9, 11, generator=g, dtype=torch.float64)
    sc = torch.full((2,), 0.1, dtype=torch.float64)
    ss = torch.full((2, 2), 1.5, dtype=torch.float64)
    curve = (
        torch.eye(3, dtype=torch.float64),
        torch.zeros(3, dtype=torch.float64),
        torch.linspace(0, 1, 17, dtype=torch.float64)[:-1].repeat(3, 1),
        torch.rand(3, 16, generator=g, dtype=torch.float64),
        torch.full((3,), 1 / 3, dtype=torch.float64),
        torch.zeros(1, dtype=torch.float64),
    )
    pts = torch.rand(20, 3, generator=g, dtype=torch.float64)
    x_pts = torch.rand(20, 3, generator=g, dtype=torch.float64)
    idx = torch.randint(0, 2, (20,), generator=g)
    ops = torch.ops.bilateral_ops
    calls = {
        "bilateral_slice": lambda: ops.bilateral_slice(grid, guide),
        "_bilateral_slice_dguide": lambda: ops._bilateral_slice_dguide(grid, guide),
        "_bilateral_slice_backward": lambda: ops._bilateral_slice_backward(
            torch.ones(2, 12, 9, 11, dtype=torch.float64), grid, guide, False, [True, True]
        ),
        "bilateral_slice_apply": lambda: ops.bilateral_slice_apply(grid, guide, x, True),
        "_bilateral_slice_apply_dguide": lambda: ops._bilateral_slice_apply_dguide(grid, guide, x, True),
        "_bilateral_slice_apply_backward": lambda: ops._bilateral_slice_apply_backward(
            torch.ones(2, 3, 9, 11, dtype=torch.float64), grid, guide, x, True, False, [True, True, True]
        ),
        "grid_splat": lambda: ops.grid_splat(x, guide, [4, 3, 5]),
        "grid_blur": lambda: ops.grid_blur(grid, [1.0, 0.5, 0.0]),
        "_bilateral_grid_filter_splat": lambda: ops._bilateral_grid_filter_splat(x, guide, [4, 3, 5]),
        "_bilateral_grid_filter_slice": lambda: ops._bilateral_grid_filter_slice(grid, guide),
        "bilateral_filter": lambda: ops.bilateral_filter(x, None, [3, 5], sc, ss, "reflect", "l1"),
        "_bilateral_filter_forward": lambda: ops._bilateral_filter_backward(
            torch.ones_like(x), x, None, [3, 5], sc, ss, "reflect", "l1", [True, False, False, False],
            *ops._bilateral_filter_forward(x, None, [3, 5], sc, ss, "reflect", "l1"),
        ),
        "_bilateral_filter_backward": lambda: ops._bilateral_filter_backward(
            torch.ones_like(x), x, None, [3, 5], sc, ss, "reflect", "l1", [True, False, True, True]
        ),
        "bilateral_slice_apply_points": lambda: ops.bilateral_slice_apply_points(grid, pts, x_pts, idx, True),
        "_bilateral_slice_apply_points_backward": lambda: ops._bilateral_slice_apply_points_backward(
            torch.ones(20, 3, dtype=torch.float64), grid, pts, x_pts, idx, True, [True, True, True]
        ),
        "grid_tv_loss": lambda: ops.grid_tv_loss(grid, idx[:3]),
        "_grid_tv_loss_backward": lambda: ops._grid_tv_loss_backward(
            torch.ones((), dtype=torch.float64), grid, None
        ),
        "curve_guide": lambda: ops.curve_guide(x, *curve),
        "_curve_guide_backward": lambda: ops._curve_guide_backward(
            torch.ones(2, 9, 11, dtype=torch.float64), x, *curve, [True] * 7
        ),
    }
    missing = sorted(set(lib.OPS) - set(calls))
    if missing:
        print(f"FAILED: no smoke call for {missing}: add one")
        return 1
    for op in lib.OPS:
        if "cpu" not in bo.compiled_devices(op):
            print(f"FAILED: {op} has no compiled CPU kernel")
            return 1
        calls[op]()
        print(f"  {op}: ok")
    err = (bo.bilateral_slice_apply(grid, guide, x) - reference.bilateral_slice_apply(grid, guide, x)).abs().max()
    assert err < 1e-12, err
    err = (bo.grid_splat(x, guide, (4, 3, 5)) - reference.grid_splat(x, guide, (4, 3, 5))).abs().max()
    assert err < 1e-12, err
    err = (bo.bilateral_filter(x, (3, 5), 0.1, 1.5) - reference.bilateral_filter(x, None, (3, 5), sc, ss)).abs().max()
    assert err < 1e-12, err
    err = (
        bo.bilateral_slice_apply_points(grid, pts, x_pts, idx) - reference.bilateral_slice_apply_points(grid, pts, x_pts, idx)
    ).abs().max()
    assert err < 1e-12, err
    from bilateral_ops.compat import bilagrid  # the compat package ships too

    assert bilagrid.BilateralGrid(2).grids.shape == (2, 12, 8, 16, 16)
    from bilateral_ops.models import HDRNet, ReferenceHDRNet

    torch.manual_seed(0)
    net = HDRNet(luma_bins=4, spatial_bins=8, net_input_size=32, guide_pts=4).double()
    twin = ReferenceHDRNet(**net.config()).double()
    twin.load_state_dict(net.state_dict())
    img = torch.rand(1, 3, 21, 34, dtype=torch.float64)
    with torch.no_grad():
        err = (net(img) - twin(img)).abs().max()
    assert err < 1e-10, err
    print("  models.HDRNet: ok")
    print(f"bilateral_ops {bo.__version__} from {here}: all {len(lib.OPS)} ops ran compiled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
