// The Python module bilateral_ops._C. Importing it loads this shared library, which runs the
// static TORCH_LIBRARY registrations of csrc/ops.cpp and of the kernels; every op is reached
// through torch.ops.bilateral_ops. PyMODINIT_FUNC exports the symbol despite -fvisibility=hidden.

#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
