"""grid_tv_loss and _grid_tv_loss_backward: lib_bilagrid's total_variation_loss (the reference),
values and gradients up to 600 grids, size-1 dimensions, subsets of grids, derivatives of every
order, determinism, opcheck, torch.compile, errors."""

from __future__ import annotations

import pytest
import torch

import bilateral_ops as bo
from bilateral_ops import reference
from helpers import DEVICES, F64, OPS, assert_close_scaled, no_kernel_runs

SHAPES = [(1, 12, 8, 16, 16), (600, 12, 8, 16, 16), (7, 12, 4, 8, 8), (5, 12, 3, 7, 5), (4, 12, 1, 5, 6), (3, 2, 1, 1, 1), (2, 3, 5, 1, 4)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_value_and_gradient(shape, device, gen):
    x = torch.randn(shape, generator=gen, dtype=F64).to(device)
    leaf = x.clone().requires_grad_()
    loss = bo.grid_tv_loss(leaf)
    (g,) = torch.autograd.grad(loss * 3.0, leaf)
    ref_leaf = x.cpu().clone().requires_grad_()
    want = reference.grid_tv_loss(ref_leaf)
    (wg,) = torch.autograd.grad(want * 3.0, ref_leaf)
    assert loss.shape == () and loss.dtype == F64
    assert abs(loss.item() - want.item()) <= 1e-12 * (1 + abs(want.item()))
    assert_close_scaled(g, wg, 1e-12, "grad")


@pytest.mark.parametrize("device", DEVICES)
def test_float32(device, gen):
    x = torch.randn(600, 12, 8, 16, 16, generator=gen).to(device)
    want = reference.grid_tv_loss(x.double().cpu()).item()
    got = bo.grid_tv_loss(x).item()
    assert abs(got - want) <= 1e-6 * abs(want)


@pytest.mark.parametrize("device", DEVICES)
def test_subset(device, gen):
    """With idx: the loss of grids[idx] (repeats counted), gradient only on those grids."""
    x = torch.randn(9, 12, 4, 5, 6, generator=gen, dtype=F64).to(device)
    idx = torch.tensor([3, 0, 3, 8], device=device)
    leaf = x.clone().requires_grad_()
    loss = bo.grid_tv_loss(leaf, idx)
    (g,) = torch.autograd.grad(loss, leaf)
    ref_leaf = x.cpu().clone().requires_grad_()
    want = reference.grid_tv_loss(ref_leaf[idx.cpu()])
    (wg,) = torch.autograd.grad(want, ref_leaf)
    assert abs(loss.item() - want.item()) <= 1e-12 * (1 + abs(want.item()))
    assert_close_scaled(g, wg, 1e-12, "grad")
    assert (g[[1, 2, 4, 5, 6, 7]] == 0).all()
    assert torch.isnan(bo.grid_tv_loss(x, idx[:0]))


def test_size_one_dimensions_give_zero(gen):
    x = torch.randn(4, 12, 1, 1, 1, generator=gen, dtype=F64)
    assert bo.grid_tv_loss(x).item() == 0.0
    assert reference.grid_tv_loss(x).item() == 0.0


def test_second_derivatives(gen):
    x = torch.randn(3, 2, 3, 4, 5, generator=gen, dtype=F64, requires_grad=True)
    idx = torch.tensor([0, 2, 2])
    assert torch.autograd.gradcheck(lambda t: bo.grid_tv_loss(t, idx), (x,))
    assert torch.autograd.gradgradcheck(lambda t: bo.grid_tv_loss(t, idx), (x,))
    assert torch.autograd.gradgradcheck(lambda t: bo.grid_tv_loss(t), (x,))


@pytest.mark.parametrize("device", DEVICES)
def test_eager_autograd_equals_the_registered_one(device, gen):
    # bo.grid_tv_loss differentiates eagerly below torch.library's autograd layer: the same op and
    # backward op, so the same bits as differentiating torch.ops' op, to the second order.
    x = torch.randn(4, 3, 3, 5, 6, generator=gen, dtype=F64).to(device).requires_grad_()
    idx = torch.tensor([2, 0, 2]).to(device)
    go = torch.tensor(1.3, dtype=F64, device=device)
    for i in (None, idx):
        (a,) = torch.autograd.grad(bo.grid_tv_loss(x, i), x, go, create_graph=True)
        (b,) = torch.autograd.grad(OPS.grid_tv_loss(x, i), x, go, create_graph=True)
        assert torch.equal(a, b)
        c = torch.randn(x.shape, generator=gen, dtype=F64).to(device)
        assert torch.equal(torch.autograd.grad((a * c).sum(), x)[0], torch.autograd.grad((b * c).sum(), x)[0])
    assert bo.grid_tv_loss(x).grad_fn is not None


def test_deterministic(gen, restore_num_threads):
    x = torch.randn(64, 12, 8, 16, 16, generator=gen)
    values = []
    for threads in (1, 2, 2):
        torch.set_num_threads(threads)
        values.append(bo.grid_tv_loss(x))
    assert all(torch.equal(values[0], v) for v in values)


def test_reduced_precision_cpu(gen):
    x = torch.randn(5, 12, 4, 8, 8, generator=gen)
    want = bo.grid_tv_loss(x).item()
    for dt in (torch.float16, torch.bfloat16):
        got = bo.grid_tv_loss(x.to(dt))
        assert got.dtype == dt and abs(got.item() - want) < 0.02 * want


def test_opcheck_and_compile(gen):
    x = torch.randn(3, 12, 2, 3, 4, generator=gen, dtype=F64, requires_grad=True)
    idx = torch.tensor([2, 0])
    torch.library.opcheck(OPS.grid_tv_loss, (x, None))
    torch.library.opcheck(OPS.grid_tv_loss, (x, idx))
    torch.library.opcheck(OPS._grid_tv_loss_backward, (torch.tensor(1.5, dtype=F64), x.detach(), idx))
    compiled = torch.compile(lambda t: bo.grid_tv_loss(t, idx) * 2, fullgraph=True, backend="aot_eager")
    (g,) = torch.autograd.grad(compiled(x), x)
    (w,) = torch.autograd.grad(bo.grid_tv_loss(x, idx) * 2, x)
    torch.testing.assert_close(g, w)


@pytest.mark.parametrize(
    "name,args,exc",
    [
        ("grids", lambda x: (x[0],), ValueError),
        ("grids", lambda x: (x.long(),), TypeError),
        ("grids", lambda x: ("x",), TypeError),
        ("idx", lambda x: (x, torch.tensor([0.5])), TypeError),
        ("idx", lambda x: (x, torch.tensor([[0]])), ValueError),
        ("idx", lambda x: (x, torch.tensor([3])), ValueError),
        ("idx", lambda x: (x, torch.tensor([-1])), ValueError),
    ],
)
def test_bad_inputs(name, args, exc, gen, monkeypatch):
    a = args(torch.randn(3, 12, 2, 3, 4, generator=gen, dtype=F64))
    no_kernel_runs(monkeypatch)
    with pytest.raises(exc, match=name):
        bo.grid_tv_loss(*a)
