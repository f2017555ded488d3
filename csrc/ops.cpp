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

#include <torch/library.h>

TORCH_LIBRARY(bilateral_ops, m) {
  m.def("bilateral_slice(Tensor grid, Tensor guide) -> Tensor");
  m.def("_bilateral_slice_dguide(Tensor grid, Tensor guide) -> Tensor");
  m.def(
      "_bilateral_slice_backward(Tensor grad_output, Tensor grid, Tensor guide, bool dguide, "
      "bool[2] output_mask) -> (Tensor, Tensor)");

  m.def(
      "bilateral_slice_apply(Tensor grid, Tensor guide, Tensor input, bool has_offset=True) -> "
      "Tensor");
  m.def(
      "_bilateral_slice_apply_dguide(Tensor grid, Tensor guide, Tensor input, bool has_offset) -> "
      "Tensor");
  m.def(
      "_bilateral_slice_apply_backward(Tensor grad_output, Tensor grid, Tensor guide, Tensor input, "
      "bool has_offset, bool dguide, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");

  m.def(
      "curve_guide(Tensor input, Tensor ccm, Tensor ccm_bias, Tensor shifts, Tensor slopes, "
      "Tensor mix, Tensor mix_bias) -> Tensor");
  m.def(
      "_curve_guide_backward(Tensor grad_output, Tensor input, Tensor ccm, Tensor ccm_bias, "
      "Tensor shifts, Tensor slopes, Tensor mix, Tensor mix_bias, bool[7] output_mask) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}
