// The single home of every bilateral_ops schema. Kernels live in csrc/cpu and csrc/cuda; the
// Python glue (validation, fake kernels, autograd) lives in bilateral_ops/ops.py.

#include <Python.h>
#include <torch/library.h>

// A minimal Python module so that `import bilateral_ops._C` loads this shared library through the
// normal import machinery, which runs the static TORCH_LIBRARY registrations below. Every real
// entry point is a torch op; no Python bindings are needed.
// PyMODINIT_FUNC exports the symbol despite -fvisibility=hidden.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(bilateral_ops, m) {
  m.def("bilateral_slice(Tensor grid, Tensor guide) -> Tensor");
  m.def(
      "_bilateral_slice_backward(Tensor grad_output, Tensor grid, Tensor guide) -> (Tensor, "
      "Tensor)");
  m.def(
      "bilateral_slice_apply(Tensor grid, Tensor guide, Tensor input, bool has_offset=True) -> "
      "Tensor");
  m.def(
      "_bilateral_slice_apply_backward(Tensor grad_output, Tensor grid, Tensor guide, Tensor "
      "input, "
      "bool has_offset) -> (Tensor, Tensor, Tensor)");
}
