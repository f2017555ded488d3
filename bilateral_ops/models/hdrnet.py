"""HDRNet (Gharbi et al., "Deep Bilateral Learning for Real-Time Image Enhancement", 2017).

A small network sees a fixed-size low-resolution copy of the photo and predicts a bilateral grid
of affine colour transforms; a learned per-pixel guide (``curve_guide``) picks, for every
full-resolution pixel, where to read the grid along its luma axis, and ``bilateral_slice_apply``
reads and applies the interpolated transform. Only the coefficient network sees a fixed size, so
the cost at full resolution is two fused passes over the image.

Layer widths follow google/hdrnet's ``HDRNetCurves`` (with ``cm = channel_multiplier`` and
``lb = luma_bins``):

* splat: ``n = log2(net_input_size / spatial_bins)`` stride-2 3x3 convs, ``cm * lb * 2**i``
  channels (batch norm, when on, never on the first);
* global: two stride-2 3x3 convs of ``8 cm lb`` channels, then fully connected layers of
  ``32 cm lb``, ``16 cm lb`` and ``8 cm lb`` units, the last one linear;
* local: a 3x3 conv of ``8 cm lb`` channels with ReLU, then a 3x3 conv of ``8 cm lb`` channels
  without bias or activation;
* fusion ``relu(local + global)`` and a 1x1 conv to ``12 lb`` channels, viewed as
  ``(N, 12, lb, spatial_bins, spatial_bins)``: channel ``k * lb + z`` is coefficient k of luma
  bin z, coefficients in ``bilateral_slice_apply``'s order (row-major 3x4 matrix per pixel).

Initialisation: convs and linear layers use PyTorch's defaults, except the prediction conv,
whose weights are scaled down (x 0.1) and whose bias is the identity matrix in every bin, so that a
fresh model starts close to the identity operator instead of a random colour transform (training
then starts from PSNR(input, target) rather than from noise). The guide starts as the channel mean
of a near-identity colour transform: ``ccm`` = identity + N(0, 1e-4) noise, shifts
``linspace(0, 1, guide_pts + 1)[:-1]`` per channel, slopes ``[1, 0, ...]``, mix 1/3, biases 0.

``ReferenceHDRNet`` is the identical model (same parameters, same ``state_dict``) computed with
the pure-torch references: the guide materialises ``(N, 3, guide_pts, H, W)`` and the slice is
``F.grid_sample``, as in PyTorch ports of HDRNet. It exists to compare speed and quality.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import reference
from ..bilateral_slice_apply import bilateral_slice_apply
from ..curve_guide import curve_guide

__all__ = ["HDRNet", "ReferenceHDRNet"]


def _conv(cin: int, cout: int, *, stride: int = 1, bias: bool = True, bn: bool = False, relu: bool = True) -> nn.Sequential:
    # A batch-normalised conv needs no bias of its own: the norm's shift plays that part.
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=bias and not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(cout))
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _fc(cin: int, cout: int, *, bn: bool = False, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(cin, cout, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm1d(cout))
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"HDRNet: {name} must be a positive int, got {value!r}")
    return value


class HDRNet(nn.Module):
    """The HDRNet reference network on ``curve_guide`` and ``bilateral_slice_apply``.

    Args:
        luma_bins: depth D of the predicted grid.
        spatial_bins: height and width of the grid (cells).
        channel_multiplier: widens every layer.
        guide_pts: curve points K per channel of the guide.
        net_input_size: side of the square low-resolution input of the coefficient network;
            ``net_input_size / spatial_bins`` must be a power of two (at least 1).
        batch_norm: batch norm in the coefficient network (not on its first layer).

    ``model(fullres)`` takes (N, 3, H, W) in [0, 1], any H and W, and returns (N, 3, H, W),
    not clipped. Under ``torch.autocast`` the convs and both fused ops run in the autocast dtype.

    Raises:
        ValueError: a size argument that is not a positive int, or ``net_input_size /
            spatial_bins`` not a power of two.
    """

    def __init__(
        self,
        luma_bins: int = 8,
        spatial_bins: int = 16,
        channel_multiplier: int = 1,
        guide_pts: int = 16,
        net_input_size: int = 256,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (
            ("luma_bins", luma_bins),
            ("spatial_bins", spatial_bins),
            ("channel_multiplier", channel_multiplier),
            ("guide_pts", guide_pts),
            ("net_input_size", net_input_size),
        ):
            _positive_int(name, value)
        ratio = net_input_size // spatial_bins
        if net_input_size % spatial_bins or ratio & (ratio - 1):
            raise ValueError(
                f"HDRNet: net_input_size / spatial_bins must be a power of two, got "
                f"{net_input_size} / {spatial_bins}"
            )
        # The global path halves spatial_bins twice before its fully connected layers.
        if spatial_bins < 4:
            raise ValueError(f"HDRNet: spatial_bins must be at least 4, got {spatial_bins}")
        self.luma_bins = luma_bins
        self.spatial_bins = spatial_bins
        self.channel_multiplier = channel_multiplier
        self.guide_pts = guide_pts
        self.net_input_size = net_input_size
        self.batch_norm = bool(batch_norm)

        cm, lb, bn = channel_multiplier, luma_bins, self.batch_norm
        width = 8 * cm * lb
        splat, cin = [], 3
        for i in range(int(math.log2(ratio))):
            cout = cm * lb * 2**i
            splat.append(_conv(cin, cout, stride=2, bn=bn and i > 0))
            cin = cout
        self.splat = nn.Sequential(*splat)
        self.global_conv = nn.Sequential(
            _conv(cin, width, stride=2, bn=bn), _conv(width, width, stride=2, bn=bn)
        )
        flat = width * (spatial_bins // 4) ** 2
        self.global_fc = nn.Sequential(
            _fc(flat, 32 * cm * lb, bn=bn),
            _fc(32 * cm * lb, 16 * cm * lb, bn=bn),
            _fc(16 * cm * lb, width, relu=False),
        )
        self.local = nn.Sequential(
            _conv(cin, width, bn=bn), _conv(width, width, bias=False, relu=False)
        )
        self.prediction = nn.Conv2d(width, 12 * lb, 1)

        eye = torch.eye(3, 4)
        ccm = torch.eye(3) + 1e-4 * torch.randn(3, 3)
        self.ccm = nn.Parameter(ccm)
        self.ccm_bias = nn.Parameter(torch.zeros(3))
        self.shifts = nn.Parameter(torch.linspace(0, 1, guide_pts + 1)[:-1].repeat(3, 1))
        slopes = torch.zeros(3, guide_pts)
        slopes[:, 0] = 1
        self.slopes = nn.Parameter(slopes)
        self.mix = nn.Parameter(torch.full((3,), 1 / 3))
        self.mix_bias = nn.Parameter(torch.zeros(1))
        with torch.no_grad():
            self.prediction.weight.mul_(0.1)
            # Channel k * lb + z is coefficient k of bin z: the identity in every bin.
            self.prediction.bias.copy_(eye.reshape(12, 1).expand(12, lb).reshape(-1))

    def extra_repr(self) -> str:
        return (
            f"luma_bins={self.luma_bins}, spatial_bins={self.spatial_bins}, "
            f"channel_multiplier={self.channel_multiplier}, guide_pts={self.guide_pts}, "
            f"net_input_size={self.net_input_size}, batch_norm={self.batch_norm}"
        )

    def config(self) -> dict:
        """The constructor's arguments: ``HDRNet(**model.config())`` builds the same network."""
        return {
            "luma_bins": self.luma_bins,
            "spatial_bins": self.spatial_bins,
            "channel_multiplier": self.channel_multiplier,
            "guide_pts": self.guide_pts,
            "net_input_size": self.net_input_size,
            "batch_norm": self.batch_norm,
        }

    def lowres(self, fullres: torch.Tensor) -> torch.Tensor:
        """The coefficient network's input: ``fullres`` resized (antialiased bilinear) to
        ``net_input_size`` squared."""
        size = (self.net_input_size, self.net_input_size)
        return F.interpolate(fullres, size, mode="bilinear", antialias=True, align_corners=False)

    def coefficients(self, lowres: torch.Tensor) -> torch.Tensor:
        """The bilateral grid of affine coefficients, (N, 12, luma_bins, spatial_bins,
        spatial_bins), from the (N, 3, net_input_size, net_input_size) low-resolution input."""
        s = self.net_input_size
        if lowres.dim() != 4 or lowres.shape[1] != 3 or tuple(lowres.shape[2:]) != (s, s):
            raise ValueError(
                f"HDRNet: lowres must be (N, 3, {s}, {s}) (net_input_size), got {tuple(lowres.shape)}"
            )
        features = self.splat(lowres)
        g = self.global_conv(features).flatten(1)
        g = self.global_fc(g)
        fused = torch.relu(self.local(features) + g[:, :, None, None])
        b = self.spatial_bins
        return self.prediction(fused).view(-1, 12, self.luma_bins, b, b)

    def _guide_params(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # Under autocast the convs see the autocast dtype and the fused ops cast their own
        # arguments; outside it, the parameters follow the image's dtype.
        return tuple(
            p.to(x.dtype) for p in (self.ccm, self.ccm_bias, self.shifts, self.slopes, self.mix, self.mix_bias)
        )

    def guide(self, fullres: torch.Tensor) -> torch.Tensor:
        """The (N, H, W) guide in [0, 1] of the (N, 3, H, W) full-resolution image."""
        return curve_guide(fullres, *self._guide_params(fullres))

    # Not named apply: that would hide nn.Module.apply(fn), which model.apply(init_fn) and every
    # parent module's apply call.
    def apply_coefficients(
        self, coefficients: torch.Tensor, guide: torch.Tensor, fullres: torch.Tensor
    ) -> torch.Tensor:
        """Slice the grid at every pixel and apply its affine transform to ``fullres``."""
        return bilateral_slice_apply(coefficients, guide, fullres)

    def forward(self, fullres: torch.Tensor, lowres: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(fullres, torch.Tensor):
            raise TypeError(f"HDRNet: fullres must be a tensor, got {type(fullres).__name__}")
        if fullres.dim() != 4 or fullres.shape[1] != 3:
            raise ValueError(f"HDRNet: fullres must be (N, 3, H, W), got {tuple(fullres.shape)}")
        if lowres is None:
            lowres = self.lowres(fullres)
        elif lowres.shape[0] != fullres.shape[0]:
            raise ValueError(
                f"HDRNet: lowres has batch {lowres.shape[0]} but fullres has {fullres.shape[0]}"
            )
        coeffs = self.coefficients(lowres)
        guide = self.guide(fullres)
        return self.apply_coefficients(coeffs, guide, fullres)


class ReferenceHDRNet(HDRNet):
    """``HDRNet`` computed with the pure-torch references (``reference.curve_guide``, the
    ``(N, 3, K, H, W)`` formula, and ``reference.bilateral_slice_apply``, ``F.grid_sample``): the
    same parameters and ``state_dict``, the speed of a plain PyTorch port."""

    def guide(self, fullres: torch.Tensor) -> torch.Tensor:
        return reference.curve_guide(fullres, *self._guide_params(fullres))

    def apply_coefficients(
        self, coefficients: torch.Tensor, guide: torch.Tensor, fullres: torch.Tensor
    ) -> torch.Tensor:
        return reference.bilateral_slice_apply(coefficients, guide, fullres)
