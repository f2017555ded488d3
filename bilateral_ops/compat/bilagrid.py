"""lib_bilagrid's 3-D bilateral grids on bilateral_ops' kernels: change the import, keep the code.

``from bilateral_ops.compat.bilagrid import BilateralGrid, slice, total_variation_loss,
color_affine_transform, bilateral_grid_tv_loss`` in place of gsplat's / nerfstudio's / BilaRF's
``lib_bilagrid`` (or fused-bilagrid): the same names, signatures, return types and state_dict keys,
the same numbers (``F.grid_sample(..., align_corners=True, padding_mode="border")`` sampling), on
CPU and CUDA, deterministic. What changes is how it is computed:

* ``slice`` and ``BilateralGrid.forward`` call :func:`bilateral_ops.bilateral_slice_apply_points`,
  which reads each sample's grid in place: no ``grids[idx]`` copy (and no copy of its gradient),
  no ``torch.unique`` host synchronisation in the usual call patterns.
* ``slice`` returns ``{"rgb", "rgb_affine_mats"}`` as a read-only mapping whose matrices are only
  sliced when that key is read (then kept): training loops that use ``["rgb"]`` alone never pay
  for the (..., 3, 4) matrices.
* ``total_variation_loss`` runs the fused :func:`bilateral_ops.grid_tv_loss` for 3- to 5-D
  tensors; ``BilateralGrid.tv_loss(idx=None)`` also takes the indices of a subset of grids.
* The guide is ``rgb @ rgb2gray_weight.T`` as in lib_bilagrid; its gradient reaches ``rgb``
  through autograd, beside the gradient of the affine map.

Checkpoints: the state_dict keys are lib_bilagrid's (``grids``, ``rgb2gray_weight``), so its
checkpoints load both ways; fused-bilagrid's (``grids`` only) load too, ``rgb2gray_weight`` being
filled with the BT.601 weights when absent. Loading one of ours into fused-bilagrid's module needs
``strict=False`` (it has no ``rgb2gray_weight``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from .. import reference
from ..bilateral_slice_apply_points import bilateral_slice_apply_points
from ..grid_tv_loss import grid_tv_loss

__all__ = [
    "BilateralGrid",
    "SliceResult",
    "bilateral_grid_tv_loss",
    "color_affine_transform",
    "slice",
    "total_variation_loss",
]

# BT.601 luma, lib_bilagrid's rgb2gray_weight.
RGB2GRAY = (0.299, 0.587, 0.114)


def bilateral_grid_tv_loss(model, config):
    """``config.bilgrid_tv_loss_mult`` times the total variation of every module in
    ``model.bil_grids``, summed (lib_bilagrid's function of that name)."""
    total_loss = 0.0
    for bil_grids in model.bil_grids:
        total_loss += config.bilgrid_tv_loss_mult * total_variation_loss(bil_grids.grids)
    return total_loss


def color_affine_transform(affine_mats: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
    """Apply (..., 3, 4) affine matrices to (..., 3) colours: ``A[..., :3] @ rgb + A[..., 3]``."""
    return (affine_mats[..., :3] @ rgb.unsqueeze(-1)).squeeze(-1) + affine_mats[..., 3]


def total_variation_loss(x: torch.Tensor) -> torch.Tensor:
    """lib_bilagrid's total variation of (B, C, ...): the sum over the dimensions d >= 2 of the
    mean squared difference of neighbours along d (a size-1 dimension contributes 0), fused for
    3- to 5-D tensors (the others take the pure-torch formula)."""
    if isinstance(x, torch.Tensor) and x.is_floating_point() and 3 <= x.dim() <= 5:
        if x.dim() == 5:  # the grids as they are: a view would add an autograd node (host time)
            return grid_tv_loss(x)
        # Leading size-1 spatial dimensions contribute 0: the loss is unchanged.
        return grid_tv_loss(x.reshape(x.shape[:2] + (1,) * (5 - x.dim()) + x.shape[2:]))
    return reference.grid_tv_loss(x)


class SliceResult(Mapping):
    """``slice``'s result: ``{"rgb": ..., "rgb_affine_mats": ...}``, read-only, the matrices
    sliced on first access (gradients flow through them as through ``"rgb"``)."""

    _KEYS = ("rgb", "rgb_affine_mats")

    def __init__(self, rgb: torch.Tensor, affine_mats):
        self._rgb = rgb
        self._make_mats = affine_mats
        self._mats = None

    def __getitem__(self, key: str) -> torch.Tensor:
        if key == "rgb":
            return self._rgb
        if key == "rgb_affine_mats":
            if self._mats is None:
                self._mats = self._make_mats()
                self._make_mats = None
            return self._mats
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._KEYS)

    def __len__(self) -> int:
        return len(self._KEYS)


def _python_index(idx: torch.Tensor, num: int) -> torch.Tensor:
    """Grid indices as lib_bilagrid's ``grids[idx]`` reads them: -1 is the last of the ``num``
    grids. Indices below -num stay negative, and the op then raises for them."""
    return idx + num * (idx < 0)


def _per_sample_index(grid_idx, lead: tuple, num: int, device: torch.device) -> torch.Tensor:
    """lib_bilagrid's choice of grid for each of the prod(lead) samples of ``slice``: the one
    index when grid_idx holds a single value, else ``grid_idx[:, 0(, 0, 0)]`` per leading item.
    Reading the first index of every leading item is the same as lib_bilagrid's ``torch.unique``
    test whenever the shapes line up (all equal or not), without its host synchronisation; other
    shapes take the test itself."""
    if not isinstance(grid_idx, torch.Tensor):
        grid_idx = torch.as_tensor(grid_idx, device=device)
    if grid_idx.is_floating_point() or grid_idx.dtype == torch.bool:
        raise TypeError(f"grid_idx must be an integer tensor, got dtype {grid_idx.dtype}")
    p = math.prod(lead)
    grid_idx = grid_idx.to(device=device, dtype=torch.int64)
    if grid_idx.numel() == 1:
        return _python_index(grid_idx.reshape(1), num).expand(p)
    if 2 <= grid_idx.dim() <= 4 and len(lead) >= 1 and grid_idx.shape[0] == lead[0] and lead[0] > 0:
        first = _python_index(grid_idx.reshape(grid_idx.shape[0], -1)[:, 0], num)
        return first.unsqueeze(1).expand(lead[0], p // lead[0]).reshape(p)
    unique = torch.unique(grid_idx)
    if unique.numel() == 1:
        return _python_index(unique, num).expand(p)
    raise ValueError(
        "The input to bilateral grid slicing is not supported yet: grid_idx must hold one index, "
        f"or have shape (N, 1), (N, 1, 1) or (N, 1, 1, 1) with N = {lead[0] if lead else 0} "
        f"leading items, got {tuple(grid_idx.shape)}"
    )


def _pixel_grid(rgb: torch.Tensor) -> torch.Tensor:
    """fused-bilagrid's default xy for rgb of shape (..., H, W, 3): x = linspace(0, 1, W) along the
    columns, y = linspace(0, 1, H) along the rows (the grid nerfstudio builds for lib_bilagrid)."""
    if rgb.dim() < 3:
        raise ValueError(f"xy=None needs rgb of shape (..., H, W, 3), got {tuple(rgb.shape)}")
    h, w = rgb.shape[-3], rgb.shape[-2]
    kw = dict(device=rgb.device, dtype=rgb.dtype if rgb.is_floating_point() else torch.float32)
    gy, gx = torch.meshgrid(torch.linspace(0, 1, h, **kw), torch.linspace(0, 1, w, **kw), indexing="ij")
    return torch.stack([gx, gy], dim=-1).expand(*rgb.shape[:-1], 2)


def slice(
    bil_grids: BilateralGrid,
    xy: torch.Tensor | None,
    rgb: torch.Tensor,
    grid_idx: torch.Tensor,
    compute_coords_grad: bool | None = None,
    actual_height: int | None = None,
    actual_width: int | None = None,
    patch_offsets: torch.Tensor | None = None,
) -> SliceResult:
    """Slice the bilateral grids at pixel coordinates ``xy`` and the gray level of ``rgb``, and
    apply the sliced affine matrices to ``rgb`` (lib_bilagrid's ``slice``, and fused-bilagrid's
    with its default pixel grid).

    Args:
        bil_grids: a :class:`BilateralGrid` of M grids.
        xy: (..., 2) coordinates in [0, 1] (x along the grid's width, y along its height), or None
            for the pixel grid of an rgb image (..., H, W, 3): x = linspace(0, 1, W), y =
            linspace(0, 1, H), as fused-bilagrid's ``slice(bil_grids, None, rgb, idx)``.
        rgb: (..., 3) colours in [0, 1]; their gray level ``rgb @ rgb2gray_weight.T`` is the third
            coordinate.
        grid_idx: the grid of each sample: one index (any shape, e.g. 0-d), or (N, 1), (N, 1, 1),
            (N, 1, 1, 1) for the N leading items of xy / rgb, one grid each; negative indices count
            from the last grid, as ``grids[idx]`` does.
        compute_coords_grad: fused-bilagrid's flag: False gives xy no gradient. None (the default,
            lib_bilagrid's behaviour) and True let it flow.
        actual_height, actual_width, patch_offsets: fused-bilagrid's patched batching, not
            supported: anything but None raises ``ValueError``.

    Returns:
        ``{"rgb": (..., 3), "rgb_affine_mats": (..., 3, 4)}``, the matrices computed only when read.
    """
    if actual_height is not None or actual_width is not None or patch_offsets is not None:
        raise ValueError(
            "actual_height, actual_width and patch_offsets (fused-bilagrid's patched batching) are not supported"
        )
    if not isinstance(rgb, torch.Tensor):
        raise TypeError("rgb must be a tensor")
    if xy is None:
        xy = _pixel_grid(rgb)
    if not isinstance(xy, torch.Tensor):
        raise TypeError("xy must be a tensor or None")
    if compute_coords_grad is False:
        xy = xy.detach()
    if xy.shape[-1:] != (2,) or rgb.shape[-1:] != (3,) or xy.shape[:-1] != rgb.shape[:-1]:
        raise ValueError(f"xy must have shape (..., 2) and rgb (..., 3) with the same leading shape, got {tuple(xy.shape)} and {tuple(rgb.shape)}")
    sh = rgb.shape
    idx = _per_sample_index(grid_idx, tuple(sh[:-1]), bil_grids.grids.shape[0], rgb.device)
    coords = bil_grids._slice_coords(xy.reshape(-1, 2), rgb.reshape(-1, 3))
    out = bil_grids._slice_rgb(coords, rgb.reshape(-1, 3), idx)
    return SliceResult(
        out.reshape(sh), lambda: bil_grids._slice_mats(coords, idx).reshape(*sh[:-1], 3, 4)
    )


class BilateralGrid(nn.Module):
    """M bilateral grids of 3x4 affine colour transforms (lib_bilagrid's ``BilateralGrid``).

    Args:
        num: the number of grids (views).
        grid_X, grid_Y, grid_W: the grid's width, height and guidance (gray level) depth.

    Attributes:
        grids: parameter (num, 12, grid_W, grid_Y, grid_X), initialised to the identity
            [1,0,0,0, 0,1,0,0, 0,0,1,0]; channel 4r + c is the matrix entry (r, c).
        rgb2gray_weight: buffer (1, 3) float32, BT.601 luma.
    """

    def __init__(self, num: int, grid_X: int = 16, grid_Y: int = 16, grid_W: int = 8):
        super().__init__()
        self.grid_width = grid_X
        self.grid_height = grid_Y
        self.grid_guidance = grid_W
        self.grids = nn.Parameter(self._init_identity_grid().tile(num, 1, 1, 1, 1))
        self.register_buffer("rgb2gray_weight", torch.tensor([RGB2GRAY], dtype=torch.float32))

    def _init_identity_grid(self) -> torch.Tensor:
        identity = torch.eye(3, 4, dtype=torch.float32).reshape(12, 1, 1, 1)
        return identity.expand(12, self.grid_guidance, self.grid_height, self.grid_width).unsqueeze(0).clone()

    def rgb2gray(self, rgb: torch.Tensor) -> torch.Tensor:
        """Gray-scale guidance in [-1, 1] (lib_bilagrid's rgb2gray)."""
        return (rgb @ self.rgb2gray_weight.T) * 2.0 - 1.0

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # fused-bilagrid's checkpoints have no rgb2gray_weight: keep the BT.601 weights.
        key = prefix + "rgb2gray_weight"
        if key not in state_dict:
            state_dict[key] = self.rgb2gray_weight.detach().clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def tv_loss(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Total variation of the grids (lib_bilagrid's ``tv_loss``), or of ``grids[idx]`` only
        (e.g. the grids of the current batch)."""
        if idx is None:
            return total_variation_loss(self.grids)
        return grid_tv_loss(self.grids, idx)

    # The three steps of a slice, on flattened samples: coords (P, 3) are (x, y, gray) in [0, 1],
    # lib_bilagrid's grid_sample position ((x - 0.5) 2, (y - 0.5) 2, gray 2 - 1) before its
    # normalisation.
    def _slice_coords(self, xy: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
        w = self.rgb2gray_weight[0].to(rgb.dtype)
        if rgb.is_cuda:
            # Elementwise: cuBLAS's matrix-vector kernel for a (P, 3) matrix took 48 us of a
            # 1440 x 1080 slice on an H200, twice the multiply and sum.
            gray = (rgb * w).sum(-1, keepdim=True)
        else:
            # rgb @ rgb2gray_weight.T as a matrix-vector product: the same dot products, and a
            # backward that is an outer product rather than an (P, 1) @ (1, 3) matrix product.
            gray = torch.mv(rgb, w).unsqueeze(-1)
        return torch.cat([xy, gray], dim=-1)

    def _slice_rgb(self, coords: torch.Tensor, rgb: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return bilateral_slice_apply_points(self.grids, coords, rgb, idx, True)

    def _slice_mats(self, coords: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        # Each of the 12 channels applied to the constant 1, without offset: the channels themselves.
        ones = coords.new_ones((coords.shape[0], 1))
        return bilateral_slice_apply_points(self.grids, coords, ones, idx, False).view(-1, 3, 4)

    def forward(self, grid_xy: torch.Tensor, rgb: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Slice affine matrices (lib_bilagrid's ``forward``).

        Args:
            grid_xy: (N, ..., 2) coordinates in [0, 1], 2- to 5-D.
            rgb: (N, ..., 3) colours, the same rank.
            idx: (N,) grid indices, one per leading item; required below 5-D. For 5-D input
                without idx, item n uses grid n.

        Returns:
            (N, ..., 3, 4) affine matrices.
        """
        nd = grid_xy.dim()
        if rgb.dim() != nd:
            raise ValueError(f"grid_xy and rgb must have the same rank, got {nd} and {rgb.dim()}")
        if not 2 <= nd <= 5:
            raise ValueError("Bilateral grid slicing only takes either 2D, 3D, 4D and 5D inputs")
        n = grid_xy.shape[0]
        if idx is None:
            if nd < 5:
                raise ValueError("idx is required for 2-D to 4-D inputs")
            if n != self.grids.shape[0]:
                raise ValueError(f"without idx, grid_xy must have one item per grid ({self.grids.shape[0]}), got {n}")
            per_item = torch.arange(n, device=grid_xy.device)
        else:
            per_item = torch.as_tensor(idx, device=grid_xy.device).to(torch.int64).reshape(-1)
            per_item = _python_index(per_item, self.grids.shape[0])
            if per_item.shape[0] != n:
                raise ValueError(f"idx must hold one grid index per leading item ({n}), got {tuple(per_item.shape)}")
        lead = grid_xy.shape[:-1]
        p = math.prod(lead)
        sample_idx = per_item.unsqueeze(1).expand(n, p // n if n else 0).reshape(p)
        coords = self._slice_coords(grid_xy.reshape(-1, 2), rgb.reshape(-1, 3))
        return self._slice_mats(coords, sample_idx).reshape(*lead, 3, 4)
