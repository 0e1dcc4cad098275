// kdfast._C_emu: the CPU kernels of the library kdfast_emu (schemas declared in kdfast/ops/<op>.py):
// kdfast's CUDA kernels (csrc/cuda/*.cu, compiled as host C++ against csrc/emu/cuda_emu.h; their
// TORCH_LIBRARY_IMPL(kdfast, CUDA, m) becomes TORCH_LIBRARY_IMPL(kdfast_emu, CPU, m), see
// csrc/emu/include/torch/library.h). The Python module has one function:
//
//   set_schedule(blocks: str, threads: str, seed: int = 0) -> None
//     the order of the blocks of the next launches and of the threads of each block: "forward",
//     "reverse" or "shuffle" (seeded); the default comes from $KDFAST_EMU_SCHEDULE (cuda_emu.h).
#include <Python.h>

#include <exception>

#include "cuda_emu.h"

namespace {

PyObject* set_schedule(PyObject*, PyObject* args) {
  const char* blocks = nullptr;
  const char* threads = nullptr;
  unsigned long long seed = 0;
  if (!PyArg_ParseTuple(args, "ss|K", &blocks, &threads, &seed)) return nullptr;
  try {
    cuda_emu::set_schedule(cuda_emu::parse_order(blocks), cuda_emu::parse_order(threads), seed);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"set_schedule", set_schedule, METH_VARARGS,
     "set_schedule(blocks, threads, seed=0): block and thread orders ('forward', 'reverse', 'shuffle') of the "
     "next emulated launches"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" {
PyMODINIT_FUNC PyInit__C_emu(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_emu", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}
