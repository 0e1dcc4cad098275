// The kdfast library, with the schemas of csrc/schemas.h. Kernels live in csrc/cpu/<op>.cpp and
// csrc/cuda/<op>.cu and register themselves with TORCH_LIBRARY_IMPL; fake kernels and autograd are
// registered from Python (kdfast/ops/<op>.py). Importing kdfast._C runs these static registrations.
#include <Python.h>
#include <torch/library.h>

#include "schemas.h"

extern "C" {
// An empty Python module: `import kdfast._C` only loads the shared library.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(kdfast, m) { kdfast::define_schemas(m); }
