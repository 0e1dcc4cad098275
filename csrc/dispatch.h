// Dtype dispatch of the ops whose student and teacher tensors may have different floating dtypes
// (KD, DKD, block_attention), shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/Dispatch.h>
#include <c10/core/ScalarType.h>

namespace kdfast {

template <typename T>
struct TypeTag {
  using type = T;
};

// f(TypeTag<student_t>, TypeTag<teacher_t>) for the dtypes `student` and `teacher` (each
// float16, bfloat16, float32 or float64): 16 instantiations of f.
template <typename F>
void dispatch_float_pair(at::ScalarType student, at::ScalarType teacher, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student, "kdfast_student", [&] {
    using student_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, teacher, "kdfast_teacher",
                                    [&] { f(TypeTag<student_t>{}, TypeTag<scalar_t>{}); });
  });
}

}  // namespace kdfast
