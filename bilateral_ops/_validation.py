"""Argument validation shared by the public functions (eager) and the fake kernels.

Every rule raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong shape,
size or device) naming the argument and what was expected, before any kernel runs. The shape
rules only read ``.shape``, ``.dim()``, ``.dtype`` and ``.device``, so they work unchanged on the
fake tensors of ``torch.compile`` (where they become guards on the symbolic sizes).
"""

from __future__ import annotations

import math

import numbers

import torch


def check_tensor(name: str, t: object) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def check_like(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have the same dtype as {ref_name} ({ref.dtype}), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the same device as {ref_name} ({ref.device}), got {t.device}")


def as_guide(guide: torch.Tensor) -> torch.Tensor:
    """Accept a guide as (N, H, W) or (N, 1, H, W); return (N, H, W)."""
    if guide.dim() == 4 and guide.shape[1] == 1:
        return guide[:, 0]
    if guide.dim() != 3:
        raise ValueError(f"guide must have shape (N, H, W) or (N, 1, H, W), got {tuple(guide.shape)}")
    return guide


def check_grid(grid: torch.Tensor) -> None:
    """grid (N, C, D, Gh, Gw)."""
    if grid.dim() != 5:
        raise ValueError(f"grid must have shape (N, C, D, Gh, Gw), got {tuple(grid.shape)}")


def check_grid_guide(grid: torch.Tensor, guide: torch.Tensor) -> None:
    """grid (N, C, D, Gh, Gw) with C, D, Gh, Gw >= 1 and guide (N, H, W) of the same dtype and
    device."""
    if grid.dim() != 5:
        raise ValueError(f"grid must have shape (N, C, D, Gh, Gw), got {tuple(grid.shape)}")
    if min(grid.shape[1:]) < 1:
        raise ValueError(f"grid channels, depth, height and width must be >= 1, got {tuple(grid.shape)}")
    if guide.dim() != 3:
        raise ValueError(f"guide must have shape (N, H, W), got {tuple(guide.shape)}")
    if guide.shape[0] != grid.shape[0]:
        raise ValueError(f"guide batch size ({guide.shape[0]}) must match grid batch size ({grid.shape[0]})")
    check_like("guide", guide, "grid", grid)


def affine_stride(in_channels: int, has_offset: bool) -> int:
    """Grid channels per output channel of bilateral_slice_apply: Ci + 1 with an offset, Ci without."""
    return in_channels + (1 if has_offset else 0)


def affine_output_channels(grid: torch.Tensor, ci: int, has_offset: bool) -> int:
    """Co of a slice-apply grid for Ci input channels; a channel count that is not a multiple of
    the affine stride raises ValueError naming the grid."""
    stride = affine_stride(ci, has_offset)
    if grid.shape[1] % stride != 0:
        expected = "Co*(Ci+1)" if has_offset else "Co*Ci"
        raise ValueError(
            f"grid must have {expected} channels for Ci={ci} input channels "
            f"(has_offset={has_offset}), got {grid.shape[1]}"
        )
    return grid.shape[1] // stride


def check_slice_apply(grid: torch.Tensor, guide: torch.Tensor, input: torch.Tensor, has_offset: bool) -> int:
    """bilateral_slice_apply's arguments (guide already (N, H, W)); returns the output channels Co."""
    check_bool("has_offset", has_offset)
    if input.dim() != 4:
        raise ValueError(f"input must have shape (N, Ci, H, W), got {tuple(input.shape)}")
    n, ci, h, w = input.shape
    if guide.dim() != 3 or tuple(guide.shape) != (n, h, w):
        raise ValueError(
            f"guide must have shape (N, H, W) = {(n, h, w)} to match input {tuple(input.shape)}, "
            f"got {tuple(guide.shape)}"
        )
    if ci < 1:
        raise ValueError("input must have at least one channel")
    check_grid_guide(grid, guide)
    check_like("input", input, "grid", grid)
    return affine_output_channels(grid, ci, has_offset)


CURVE_PARAMS = ("ccm", "ccm_bias", "shifts", "slopes", "mix", "mix_bias")


def check_curve_guide(input, ccm, ccm_bias, shifts, slopes, mix, mix_bias) -> tuple[int, int]:
    """curve_guide's arguments (already known to be floating tensors); returns (C, K)."""
    if input.dim() != 4:
        raise ValueError(f"input must have shape (N, C, H, W), got {tuple(input.shape)}")
    c = input.shape[1]
    if c < 1:
        raise ValueError("input must have at least one channel")
    if shifts.dim() != 2 or shifts.shape[0] != c or shifts.shape[1] < 1:
        raise ValueError(f"shifts must have shape (C, K) = ({c}, K) with K >= 1, got {tuple(shifts.shape)}")
    k = shifts.shape[1]
    expected = {"ccm": (c, c), "ccm_bias": (c,), "slopes": (c, k), "mix": (c,), "mix_bias": (1,)}
    given = {"ccm": ccm, "ccm_bias": ccm_bias, "slopes": slopes, "mix": mix, "mix_bias": mix_bias}
    for name, shape in expected.items():
        if tuple(given[name].shape) != shape:
            raise ValueError(
                f"{name} must have shape {shape} for an input of {c} channels and {k} curve points, "
                f"got {tuple(given[name].shape)}"
            )
    for name, t in zip(CURVE_PARAMS, (ccm, ccm_bias, shifts, slopes, mix, mix_bias)):
        check_like(name, t, "input", input)
    return c, k


def check_grad_output(grad_output: torch.Tensor, like: torch.Tensor, shape: tuple, like_name: str = "grid") -> None:
    check_like("grad_output", grad_output, like_name, like)
    if tuple(grad_output.shape) != tuple(shape):
        raise ValueError(f"grad_output must have shape {tuple(shape)}, got {tuple(grad_output.shape)}")


def check_output_mask(dguide: bool, output_mask) -> None:
    if dguide and output_mask[1]:
        raise ValueError(
            "output_mask[1] (grad_guide) must be false when dguide is true: the guide derivative of "
            "the dguide variant is zero almost everywhere and is not computed"
        )


def _is_int(x: object) -> bool:
    # numpy ints and SymInts (torch.compile) pass; bools are ints to Python but never a size.
    return isinstance(x, (numbers.Integral, torch.SymInt)) and not isinstance(x, bool)


def grid_size_tuple(grid_size: object) -> tuple:
    """grid_splat's grid_size: a sequence of three ints (D, Gh, Gw), each >= 1."""
    if isinstance(grid_size, torch.Tensor) or not hasattr(grid_size, "__len__") or len(grid_size) != 3:
        raise TypeError(f"grid_size must be a sequence of three ints (D, Gh, Gw), got {grid_size!r}")
    if not all(_is_int(s) for s in grid_size):
        raise TypeError(f"grid_size must contain ints, got {grid_size!r}")
    if any(s < 1 for s in grid_size):
        raise ValueError(f"grid_size entries must be >= 1, got {tuple(grid_size)}")
    return tuple(grid_size)


def check_splat(input: torch.Tensor, guide: torch.Tensor) -> None:
    """grid_splat's input (N, C, H, W) and guide (N, H, W)."""
    if input.dim() != 4:
        raise ValueError(f"input must have shape (N, C, H, W), got {tuple(input.shape)}")
    n, c, h, w = input.shape
    if c < 1:
        raise ValueError("input must have at least one channel")
    if guide.dim() != 3 or tuple(guide.shape) != (n, h, w):
        raise ValueError(
            f"guide must have shape (N, H, W) = {(n, h, w)} to match input {tuple(input.shape)}, "
            f"got {tuple(guide.shape)}"
        )
    check_like("guide", guide, "input", input)


# Largest grid_blur sigma, in cells (csrc/include/bilateral_ops/grid_blur.h): the normalisation
# sums the whole window.
MAX_BLUR_SIGMA = 1e6


def _real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def blur_sigma(sigma: object) -> tuple[float, float, float]:
    """grid_blur's sigma: one number for every axis or three (D, Gh, Gw), each finite and in
    [0, MAX_BLUR_SIGMA] cells (0 skips the axis)."""
    values = (sigma,) * 3 if _real(sigma) else sigma
    if isinstance(values, torch.Tensor) or not hasattr(values, "__len__") or len(values) != 3:
        raise TypeError(f"sigma must be a number or a sequence of three numbers (D, Gh, Gw), got {sigma!r}")
    if not all(_real(s) for s in values):
        raise TypeError(f"sigma must contain numbers, got {sigma!r}")
    out = tuple(float(s) for s in values)
    if not all(_finite(s) for s in out):
        raise ValueError(f"sigma must be finite, got {sigma!r}")
    if any(s < 0 for s in out):
        raise ValueError(f"sigma must be >= 0 (0 skips an axis), got {sigma!r}")
    if any(s > MAX_BLUR_SIGMA for s in out):
        raise ValueError(f"sigma must be at most {MAX_BLUR_SIGMA:g} cells, got {sigma!r}")
    return out


def _finite(x: float) -> bool:
    # Comparisons, not math.isfinite: under torch.compile a float argument may be symbolic
    # (dynamic=True, or a value that changed since the first call), and a comparison becomes a
    # guard where math.isfinite breaks the graph. NaN fails both.
    return -math.inf < x < math.inf


def positive_number(name: str, x: object, what: str = "a number") -> float:
    """A finite number > 0 (the filters' sigmas); ``what`` names the accepted kinds in the
    TypeError."""
    if not _real(x):
        raise TypeError(f"{name} must be {what}, got {type(x).__name__}")
    value = float(x)
    if not (_finite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {x!r}")
    return value


# ----------------------------------------------------------------------------------------------
# bilateral_filter

BORDER_TYPES = ("reflect", "replicate", "constant", "circular")
COLOR_DISTANCE_TYPES = ("l1", "l2")
# The most taps a kernel may have (csrc/bilateral_filter_args.h's kMaxFilterTaps): its tables
# are allocated by its size, and 2^24 taps a pixel is far beyond any practical cost.
MAX_FILTER_TAPS = 1 << 24


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {', '.join(map(repr, choices))}; got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _int_scalar(x: object) -> bool:
    # An int, or a one-element integer tensor (kornia's kernel sizes may be tensors).
    if isinstance(x, torch.Tensor):
        return x.numel() == 1 and not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool
    return _is_int(x)


def kernel_size_2d(kernel_size: object) -> tuple[int, int]:
    """An int (both axes) or a pair (ky, kx) of odd positive ints (or one-element integer
    tensors, as kornia takes), as (ky, kx)."""
    if _int_scalar(kernel_size):
        pair = (int(kernel_size), int(kernel_size))
    elif isinstance(kernel_size, (tuple, list)) and len(kernel_size) == 2 and all(map(_int_scalar, kernel_size)):
        pair = (int(kernel_size[0]), int(kernel_size[1]))
    else:
        raise TypeError(f"kernel_size must be an int or a pair of ints (ky, kx), got {kernel_size!r}")
    if any(k <= 0 or k % 2 == 0 for k in pair):
        raise ValueError(f"kernel_size must be odd and positive, got {kernel_size!r}")
    return pair


def sigma_space_pair(value: object) -> tuple[float, float]:
    """A float (both axes) or a pair (sigma_y, sigma_x) of positive numbers."""
    if _real(value):
        s = positive_number("sigma_space", value, "a float, a pair or a tensor")
        return (s, s)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(map(_real, value)):
        return (positive_number("sigma_space", value[0]), positive_number("sigma_space", value[1]))
    raise TypeError(f"sigma_space must be a float, a pair (sigma_y, sigma_x) or a tensor, got {value!r}")


def check_sigma_tensor(name: str, t: torch.Tensor, shape: tuple[int, ...], input: torch.Tensor) -> None:
    """A sigma tensor of shape ``shape`` (per image) or with a leading 1 (broadcast), floating.
    ``shape`` is (N,) for sigma_color and (N, 2) for sigma_space; a 0-d / (2,) tensor is one for
    every image too. It may be on another device than ``input`` (it is copied), but not on the
    meta device unless the input is: such a tensor has no values to copy."""
    check_tensor(name, t)
    if t.device.type == "meta" and input.device.type != "meta":
        raise ValueError(f"{name} is on the meta device (it has no values) but input is on {input.device}")
    ok = tuple(t.shape) in (shape, (1, *shape[1:]), tuple(shape[1:]))
    if not ok:
        raise ValueError(f"{name} must have shape {shape} (or broadcast from one image), got {tuple(t.shape)}")


def check_sigma_values(name: str, t: torch.Tensor) -> None:
    """Positive values, checked in eager mode only: under torch.compile (and on fake tensors) the
    values are unknown, and the kernels then give NaN or infinity for non-positive sigmas."""
    if torch.compiler.is_compiling() or t.device.type == "meta":
        return
    if not bool((t > 0).all()):
        raise ValueError(f"{name} must be positive, got {t.detach().cpu().tolist()}")


def check_filter(
    input: torch.Tensor,
    guidance: torch.Tensor | None,
    kernel_size: tuple[int, int],
    sigma_color: torch.Tensor,
    sigma_space: torch.Tensor,
    border_type: str,
    color_distance_type: str,
) -> None:
    """bilateral_filter's arguments as the op takes them (sigmas already per image)."""
    check_choice("border_type", border_type, BORDER_TYPES)
    check_choice("color_distance_type", color_distance_type, COLOR_DISTANCE_TYPES)
    if input.dim() != 4:
        raise ValueError(f"input must have shape (N, C, H, W), got {tuple(input.shape)}")
    n, _, h, w = input.shape
    if guidance is not None:
        if guidance.dim() != 4 or guidance.shape[0] != n or tuple(guidance.shape[2:]) != (h, w):
            raise ValueError(
                f"guidance must have shape (N, Cg, H, W) with N, H, W = {(n, h, w)} of input "
                f"{tuple(input.shape)}, got {tuple(guidance.shape)}"
            )
        check_like("guidance", guidance, "input", input)
    ky, kx = kernel_size
    if ky <= 0 or kx <= 0 or ky % 2 == 0 or kx % 2 == 0:
        raise ValueError(f"kernel_size must be odd and positive, got {kernel_size!r}")
    if ky * kx > MAX_FILTER_TAPS:
        raise ValueError(f"kernel_size {kernel_size!r} has more than {MAX_FILTER_TAPS} taps")
    py, px = (ky - 1) // 2, (kx - 1) // 2
    if h > 0 and w > 0:
        if border_type == "reflect" and (py >= h or px >= w):
            raise ValueError(
                f"kernel_size {kernel_size} is too large for reflect padding of a {h}x{w} image: "
                f"the padding ({py}, {px}) must be smaller than the image side"
            )
        if border_type == "circular" and (py > h or px > w):
            raise ValueError(
                f"kernel_size {kernel_size} is too large for circular padding of a {h}x{w} image: "
                f"the padding ({py}, {px}) must not exceed the image side"
            )
    if tuple(sigma_color.shape) != (n,):
        raise ValueError(f"sigma_color must have shape ({n},), got {tuple(sigma_color.shape)}")
    if tuple(sigma_space.shape) != (n, 2):
        raise ValueError(f"sigma_space must have shape ({n}, 2), got {tuple(sigma_space.shape)}")
    check_like("sigma_color", sigma_color, "input", input)
    check_like("sigma_space", sigma_space, "input", input)


def check_filter_grad_output(grad_output: torch.Tensor, input: torch.Tensor) -> None:
    check_like("grad_output", grad_output, "input", input)
    if tuple(grad_output.shape) != tuple(input.shape):
        raise ValueError(f"grad_output must have shape {tuple(input.shape)}, got {tuple(grad_output.shape)}")


def filter_norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of _bilateral_filter_forward's weight sums W for an input of ``dtype``: the
    accumulation type (float32 for 16-bit inputs), as csrc/bilateral_filter_args.h's."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def check_filter_saved(output, norm, input: torch.Tensor) -> None:
    """_bilateral_filter_backward's optional forward results: both or neither; output like the
    input, norm (N, H, W) in filter_norm_dtype, on the input's device."""
    norm_dtype = filter_norm_dtype(input.dtype)
    if (output is None) != (norm is None):
        raise ValueError("output and norm must be given together (both or neither)")
    if output is None:
        return
    check_like("output", output, "input", input)
    if tuple(output.shape) != tuple(input.shape):
        raise ValueError(f"output must have shape {tuple(input.shape)}, got {tuple(output.shape)}")
    n, _, h, w = input.shape
    if norm.device != input.device:
        raise ValueError(f"norm must be on the input's device {input.device}, got {norm.device}")
    if tuple(norm.shape) != (n, h, w) or norm.dtype != norm_dtype:
        raise ValueError(f"norm must have shape {(n, h, w)} and dtype {norm_dtype}, got {tuple(norm.shape)} and {norm.dtype}")


def check_index(name: str, t: object, ref_name: str, ref: torch.Tensor) -> None:
    """An index tensor: integer dtype (not bool) on ref's device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the same device as {ref_name} ({ref.device}), got {t.device}")


def check_index_values(name: str, t: torch.Tensor, bound: int, what: str) -> None:
    """Values in [0, bound), checked where that costs no device synchronisation and no graph
    break: eagerly, on CPU (CUDA kernels turn an index out of range into NaN instead)."""
    if t.device.type != "cpu" or t.numel() == 0 or torch.compiler.is_compiling():
        return
    if t.dim() == 1 and t.stride(0) == 0:
        t = t[:1]  # one index expanded to every sample: one value to check
    lo, hi = (int(x) for x in torch.aminmax(t))
    if lo < 0 or hi >= bound:
        raise ValueError(f"{name} values must be in [0, {bound}) ({what}), got values in [{lo}, {hi}]")


def check_slice_apply_points(
    grid: torch.Tensor, coords: torch.Tensor, input: torch.Tensor, grid_idx: torch.Tensor, has_offset: bool
) -> int:
    """bilateral_slice_apply_points' arguments (grid_idx already int64); returns Co."""
    check_bool("has_offset", has_offset)
    if grid.dim() != 5:
        raise ValueError(f"grid must have shape (M, C, D, Gh, Gw), got {tuple(grid.shape)}")
    if min(grid.shape) < 1:
        raise ValueError(f"grid sizes must all be >= 1, got {tuple(grid.shape)}")
    if coords.dim() != 2 or coords.shape[1] != 3:
        raise ValueError(f"coords must have shape (P, 3), got {tuple(coords.shape)}")
    p = coords.shape[0]
    if input.dim() != 2 or input.shape[0] != p or input.shape[1] < 1:
        raise ValueError(f"input must have shape (P, Ci) with P = {p} and Ci >= 1, got {tuple(input.shape)}")
    if grid_idx.dim() != 1 or grid_idx.shape[0] != p:
        raise ValueError(f"grid_idx must have shape (P,) = ({p},), got {tuple(grid_idx.shape)}")
    check_like("coords", coords, "grid", grid)
    check_like("input", input, "grid", grid)
    if grid_idx.dtype != torch.int64:
        raise TypeError(f"grid_idx must be int64, got {grid_idx.dtype}")
    check_index("grid_idx", grid_idx, "grid", grid)
    ci = input.shape[1]
    return affine_output_channels(grid, ci, has_offset)


def check_grid_tv_loss(grids: torch.Tensor, idx: torch.Tensor | None) -> None:
    """grid_tv_loss' grids (M, C, D, Gh, Gw) and optional idx (K,) int64."""
    if grids.dim() != 5:
        raise ValueError(f"grids must have shape (M, C, D, Gh, Gw), got {tuple(grids.shape)}")
    if idx is not None:
        check_index("idx", idx, "grids", grids)
        if idx.dtype != torch.int64:
            raise TypeError(f"idx must be int64, got {idx.dtype}")
        if idx.dim() != 1:
            raise ValueError(f"idx must have shape (K,), got {tuple(idx.shape)}")
