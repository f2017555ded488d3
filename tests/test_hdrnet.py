"""HDRNet (bilateral_ops.models): layer layout, initialisation, agreement with the pure-torch
twin, gradients, dtypes, torch.compile and state_dict portability."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bilateral_ops import reference
from bilateral_ops.models import HDRNet, ReferenceHDRNet
from helpers import DEVICES

# A small configuration that keeps every path (two splat convs, the global path, batch norm) and
# runs in milliseconds.
SMALL = dict(luma_bins=4, spatial_bins=8, channel_multiplier=1, guide_pts=5, net_input_size=32)


def _convs(module: nn.Module) -> list[nn.Conv2d]:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)]


def test_layer_widths_follow_the_contract():
    cm, lb = 2, 4
    m = HDRNet(luma_bins=lb, spatial_bins=16, channel_multiplier=cm, net_input_size=256)
    splat = _convs(m.splat)
    assert [c.out_channels for c in splat] == [cm * lb * 2**i for i in range(4)]
    assert all(c.stride == (2, 2) and c.kernel_size == (3, 3) for c in splat)
    glob = _convs(m.global_conv)
    assert [(c.out_channels, c.stride) for c in glob] == [(8 * cm * lb, (2, 2))] * 2
    fcs = [l for l in m.global_fc.modules() if isinstance(l, nn.Linear)]
    assert [l.out_features for l in fcs] == [32 * cm * lb, 16 * cm * lb, 8 * cm * lb]
    assert fcs[0].in_features == 8 * cm * lb * 4 * 4
    # The last fully connected layer is linear: no ReLU after it.
    assert not isinstance(list(m.global_fc[-1])[-1], nn.ReLU)
    local = _convs(m.local)
    assert [c.out_channels for c in local] == [8 * cm * lb] * 2
    assert local[0].bias is not None and local[1].bias is None
    assert not isinstance(list(m.local[-1])[-1], nn.ReLU)
    assert m.prediction.kernel_size == (1, 1) and m.prediction.out_channels == 12 * lb
    coeffs = m.coefficients(torch.rand(2, 3, 256, 256))
    assert coeffs.shape == (2, 12, lb, 16, 16)


def test_batch_norm_is_never_on_the_first_layer():
    m = HDRNet(**SMALL, batch_norm=True)
    assert not any(isinstance(l, nn.BatchNorm2d) for l in m.splat[0])
    assert any(isinstance(l, nn.BatchNorm2d) for l in m.splat[1])
    assert any(isinstance(l, nn.BatchNorm1d) for l in m.global_fc.modules())
    out = m(torch.rand(3, 3, 40, 44))  # training mode: batch statistics
    m.eval()
    assert torch.isfinite(m(torch.rand(1, 3, 40, 44))).all() and out.shape == (3, 3, 40, 44)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(net_input_size=256, spatial_bins=12), "power of two"),
        (dict(net_input_size=96, spatial_bins=16), "power of two"),
        (dict(net_input_size=8, spatial_bins=16), "power of two"),
        (dict(luma_bins=0), "luma_bins"),
        (dict(guide_pts=2.0), "guide_pts"),
        (dict(channel_multiplier=True), "channel_multiplier"),
        (dict(spatial_bins=2, net_input_size=64), "spatial_bins"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HDRNet(**kwargs)


def test_bad_inputs():
    m = HDRNet(**SMALL)
    with pytest.raises(ValueError, match="fullres"):
        m(torch.rand(1, 4, 20, 20))
    with pytest.raises(ValueError, match="fullres"):
        m(torch.rand(3, 20, 20))
    with pytest.raises(TypeError, match="fullres"):
        m([1.0])
    with pytest.raises(ValueError, match="lowres"):
        m(torch.rand(1, 3, 20, 20), torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="lowres"):
        m(torch.rand(2, 3, 20, 20), torch.rand(1, 3, 32, 32))


def test_initialisation():
    torch.manual_seed(0)
    m = HDRNet(guide_pts=16)
    assert torch.allclose(m.ccm, torch.eye(3), atol=1e-3) and not torch.equal(m.ccm, torch.eye(3))
    assert torch.equal(m.shifts, torch.linspace(0, 1, 17)[:-1].repeat(3, 1))
    assert torch.equal(m.slopes[:, 0], torch.ones(3)) and not m.slopes[:, 1:].any()
    assert torch.allclose(m.mix, torch.full((3,), 1 / 3)) and not m.mix_bias.any() and not m.ccm_bias.any()
    # The prediction bias is the identity in every luma bin, in slice-apply's coefficient order.
    bias = m.prediction.bias.detach().view(12, m.luma_bins)
    assert torch.equal(bias, torch.eye(3, 4).reshape(12, 1).expand(12, m.luma_bins))
    x = torch.rand(1, 3, 50, 70)
    with torch.no_grad():
        # The guide starts as the channel mean; the output near the input.
        assert torch.allclose(m.guide(x), x.mean(1).clamp(0, 1), atol=1e-3)
        assert (m(x) - x).abs().max() < 0.1


@pytest.mark.parametrize("device", DEVICES)
def test_matches_the_pure_torch_twin_with_gradients(device):
    torch.manual_seed(1)
    m = HDRNet(**SMALL).double().to(device)
    twin = ReferenceHDRNet(**SMALL).double().to(device)
    twin.load_state_dict(m.state_dict())
    for p in m.parameters():  # move away from the initial state so every term matters
        p.data.add_(0.05 * torch.randn_like(p))
    twin.load_state_dict(m.state_dict())
    x = torch.rand(2, 3, 37, 53, dtype=torch.float64, device=device, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y, y2 = m(x), twin(x2)
    assert torch.allclose(y, y2, atol=1e-10, rtol=0)
    w = torch.randn_like(y)
    (y * w).sum().backward()
    (y2 * w).sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-9, rtol=0)
    for (name, p), q in zip(m.named_parameters(), twin.parameters()):
        assert p.grad is not None, name
        assert torch.allclose(p.grad, q.grad, atol=1e-8, rtol=1e-8), name


def test_pieces_compose_the_forward():
    torch.manual_seed(2)
    m = HDRNet(**SMALL)
    x = torch.rand(2, 3, 45, 31)
    with torch.no_grad():
        low = m.lowres(x)
        assert low.shape == (2, 3, 32, 32)
        expected = reference.bilateral_slice_apply(m.coefficients(low), m.guide(x), x)
        assert torch.allclose(m(x), expected, atol=1e-5)
        assert torch.equal(m(x), m(x, low))
        g = m.guide(x)
        assert g.shape == (2, 45, 31) and g.min() >= 0 and g.max() <= 1


def test_module_apply_is_torchs():
    # model.apply(fn) is nn.Module.apply (initialisers use it, and so does every parent module's
    # apply); the slice-and-apply step is apply_coefficients.
    torch.manual_seed(3)
    m = HDRNet(**SMALL)
    seen = []
    assert m.apply(seen.append) is m and seen[-1] is m and len(seen) == len(list(m.modules()))
    parent = torch.nn.Sequential(m)
    parent.apply(lambda mod: torch.nn.init.zeros_(mod.bias) if isinstance(mod, torch.nn.Conv2d) and mod.bias is not None else None)
    x = torch.rand(1, 3, 20, 30)
    with torch.no_grad():
        torch.testing.assert_close(m.apply_coefficients(m.coefficients(m.lowres(x)), m.guide(x), x), m(x), rtol=0, atol=0)


def test_any_size_and_batch():
    m = HDRNet(**SMALL)
    for shape in [(1, 3, 1, 1), (3, 3, 7, 129), (2, 3, 64, 9)]:
        with torch.no_grad():
            assert m(torch.rand(shape)).shape == shape


def test_autocast_bfloat16_on_cpu():
    torch.manual_seed(3)
    m = HDRNet(**SMALL)
    x = torch.rand(2, 3, 40, 48)
    with torch.no_grad():
        ref = m(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.05


def test_torch_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    torch.manual_seed(4)
    m = HDRNet(**SMALL)
    twin = HDRNet(**SMALL)
    twin.load_state_dict(m.state_dict())
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    x = torch.rand(2, 3, 33, 41)
    y, yc = m(x), compiled(x)
    assert torch.allclose(y, yc, atol=1e-6)
    y.square().sum().backward()
    yc.square().sum().backward()
    for p, q in zip(m.parameters(), twin.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_torch_compile_inductor():
    torch._dynamo.reset()
    m = HDRNet(**SMALL).eval()
    x = torch.rand(1, 3, 60, 80)
    compiled = torch.compile(m, fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(m(x), compiled(x), atol=1e-5)


def test_state_dict_round_trip_and_config(tmp_path):
    torch.manual_seed(5)
    m = HDRNet(**SMALL, batch_norm=True)
    path = tmp_path / "m.pt"
    torch.save(m.state_dict(), path)
    other = HDRNet(**m.config())
    other.load_state_dict(torch.load(path, weights_only=True))
    twin = ReferenceHDRNet(**m.config())
    twin.load_state_dict(m.state_dict())
    x = torch.rand(1, 3, 30, 30)
    m.eval(), other.eval(), twin.eval()
    with torch.no_grad():
        assert torch.equal(m(x), other(x))
        assert torch.allclose(m(x), twin(x), atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_state_dict_loads_across_devices_and_half_on_cuda():
    torch.manual_seed(6)
    m = HDRNet(**SMALL).eval()
    gpu = HDRNet(**SMALL).cuda().eval()
    gpu.load_state_dict(m.state_dict())
    x = torch.rand(2, 3, 67, 45)
    with torch.no_grad():
        ref = m(x)
        assert torch.allclose(gpu(x.cuda()).cpu(), ref, atol=1e-4)
        for dtype in (torch.float16, torch.bfloat16):
            with torch.autocast("cuda", dtype=dtype):
                out = gpu(x.cuda())
            assert out.dtype == dtype
            assert (out.float().cpu() - ref).abs().max() < 0.05
    back = HDRNet(**SMALL)
    back.load_state_dict({k: v.cpu() for k, v in gpu.state_dict().items()})
    with torch.no_grad():
        assert torch.equal(back.eval()(x), ref)
