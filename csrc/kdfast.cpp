// kdfast._C: the C++ CPU kernels (csrc/cpu/<op>.cpp) and CUDA kernels (csrc/cuda/<op>.cu) of the
// library kdfast. They only implement ops (TORCH_LIBRARY_IMPL): each op's schema, fake kernel and
// autograd formula are declared once in Python (kdfast/ops/<op>.py, registered by kdfast/ops/spec.py),
// and the dispatcher checks every C++ signature against that schema. Importing kdfast._C runs the
// static registrations.
#include <Python.h>

extern "C" {
// An empty Python module: `import kdfast._C` only loads the shared library.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
