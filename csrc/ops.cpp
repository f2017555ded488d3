// The single home of every bilateral_ops schema. Kernels live in csrc/cpu/<op>.cpp and
// csrc/cuda/<op>.cu; the Python glue (validation, fake kernels, autograd) in bilateral_ops/<op>.py.
//
// Private companions of each public op, all visible to torch.compile:
//  * _<op>_backward(grad_output, ..., bool dguide, bool[k] output_mask): the vector-Jacobian
//    product. output_mask says which gradients are wanted; the others come back as empty (0,)
//    tensors and cost nothing. With dguide it is the product of the _<op>_dguide companion instead.
//  * _<op>_dguide(...): the derivative of the op with respect to the guide, pixel by pixel (the
//    tent weights along z replaced by their slopes). Second derivatives are built from it: the
//    slice is piecewise linear in the guide, so every derivative beyond this one is zero almost
//    everywhere.
//  * curve_guide's backward returns the gradients of all seven arguments (masked-off ones as
//    empty tensors); it has no dguide variant: its second derivatives come from autograd of the
//    pure-torch formula (bilateral_ops/curve_guide.py).
// grid_splat and grid_blur need no companions: their derivatives are the slice ops (the splat is
// the slice's transpose) and grid_blur itself.
//
// bilateral_filter takes its sigmas as tensors, one per image (sigma_color (N,), sigma_space
// (N, 2) as (sigma_y, sigma_x)), in the input's dtype: the Python wrapper expands floats and
// tuples, so one schema serves fixed and trainable sigmas. guidance None means the input guides
// itself. Its backward returns the gradients of (input, guidance, sigma_color, sigma_space).
// _bilateral_filter_forward is the same filter that also returns each pixel's weight sum W
// (N, H, W; float32 for float16 / bfloat16 inputs, else the input's dtype; 1 for an input without
// channels, which has nothing to filter): autograd runs it and hands W and the output to the
// backward (output, norm), which then skips the sweep over every window that would recompute
// them. Without them the backward recomputes them, as it must for a direct caller of
// bilateral_filter.

#include <torch/library.h>

TORCH_LIBRARY(bilateral_ops, m) {
  // align_corners (last, default False, so that every earlier caller keeps its meaning): sample
  // at index u * (S - 1) on all three axes, as F.grid_sample(..., align_corners=True) and
  // lib_bilagrid do (csrc/include/bilateral_ops/grid_coords.h).
  m.def("bilateral_slice(Tensor grid, Tensor guide, bool align_corners=False) -> Tensor");
  m.def("_bilateral_slice_dguide(Tensor grid, Tensor guide, bool align_corners=False) -> Tensor");
  m.def(
      "_bilateral_slice_backward(Tensor grad_output, Tensor grid, Tensor guide, bool dguide, "
      "bool[2] output_mask, bool align_corners=False) -> (Tensor, Tensor)");

  m.def(
      "bilateral_slice_apply(Tensor grid, Tensor guide, Tensor input, bool has_offset=True, "
      "bool align_corners=False) -> Tensor");
  m.def(
      "_bilateral_slice_apply_dguide(Tensor grid, Tensor guide, Tensor input, bool has_offset, "
      "bool align_corners=False) -> Tensor");
  m.def(
      "_bilateral_slice_apply_backward(Tensor grad_output, Tensor grid, Tensor guide, Tensor input, "
      "bool has_offset, bool dguide, bool[3] output_mask, bool align_corners=False) -> "
      "(Tensor, Tensor, Tensor)");

  // slice_apply at explicit sample positions, each sample in a grid of its own choosing: grid
  // (M, Co*(Ci+1), D, Gh, Gw), coords (P, 3) as (x, y, z) in [0, 1] with align_corners=True
  // sampling, input (P, Ci), grid_idx (P,) int64 -> (P, Co). Each sample's grid is read in place
  // (no grids[idx] copy). The backward returns the gradients of (grid, coords, input); it is not
  // differentiable again (its autograd raises), as lib_bilagrid's users need first derivatives.
  m.def(
      "bilateral_slice_apply_points(Tensor grid, Tensor coords, Tensor input, Tensor grid_idx, "
      "bool has_offset=True) -> Tensor");
  m.def(
      "_bilateral_slice_apply_points_backward(Tensor grad_output, Tensor grid, Tensor coords, "
      "Tensor input, Tensor grid_idx, bool has_offset, bool[3] output_mask) -> "
      "(Tensor, Tensor, Tensor)");

  // lib_bilagrid's total_variation_loss of grids (B, C, ...) fused: sum over the dimensions
  // d >= 2 of mean((x[.., i+1, ..] - x[.., i, ..])^2), a dimension of size 1 giving 0; with idx
  // (K,) int64, of grids[idx] (repeats count as often as they appear) without the copy. A 0-d
  // tensor in the grids' dtype. Its backward is linear in the grids and is its own op.
  m.def("grid_tv_loss(Tensor grids, Tensor? idx=None) -> Tensor");
  m.def("_grid_tv_loss_backward(Tensor grad_output, Tensor grids, Tensor? idx) -> Tensor");

  // The transpose of bilateral_slice: its vector-Jacobian products are slices (input) and the
  // guide part of _bilateral_slice_backward (guide), so it needs no backward op of its own.
  m.def("grid_splat(Tensor input, Tensor guide, int[3] grid_size) -> Tensor");

  // Linear and self-adjoint: its backward is itself.
  m.def("grid_blur(Tensor grid, float[3] sigma) -> Tensor");

  // bilateral_grid_filter's two ends, fused (its Python module composes them with grid_blur and
  // derives their gradients from the slice ops):
  //  * _bilateral_grid_filter_splat: grid_splat of [input, 1] without the concatenated copy;
  //  * _bilateral_grid_filter_slice: bilateral_slice of a grid whose last channel is the weight,
  //    every other channel divided by max(weight, 1e-12): (N, C, ..) -> (N, C - 1, H, W).
  m.def("_bilateral_grid_filter_splat(Tensor input, Tensor guide, int[3] grid_size) -> Tensor");
  m.def("_bilateral_grid_filter_slice(Tensor grid, Tensor guide) -> Tensor");

  m.def(
      "curve_guide(Tensor input, Tensor ccm, Tensor ccm_bias, Tensor shifts, Tensor slopes, "
      "Tensor mix, Tensor mix_bias) -> Tensor");
  m.def(
      "_curve_guide_backward(Tensor grad_output, Tensor input, Tensor ccm, Tensor ccm_bias, "
      "Tensor shifts, Tensor slopes, Tensor mix, Tensor mix_bias, bool[7] output_mask) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");

  m.def(
      "bilateral_filter(Tensor input, Tensor? guidance, int[2] kernel_size, Tensor sigma_color, "
      "Tensor sigma_space, str border_type, str color_distance_type) -> Tensor");
  m.def(
      "_bilateral_filter_forward(Tensor input, Tensor? guidance, int[2] kernel_size, "
      "Tensor sigma_color, Tensor sigma_space, str border_type, str color_distance_type) -> "
      "(Tensor, Tensor)");
  m.def(
      "_bilateral_filter_backward(Tensor grad_output, Tensor input, Tensor? guidance, "
      "int[2] kernel_size, Tensor sigma_color, Tensor sigma_space, str border_type, "
      "str color_distance_type, bool[4] output_mask, Tensor? output=None, Tensor? norm=None) -> "
      "(Tensor, Tensor, Tensor, Tensor)");
}
