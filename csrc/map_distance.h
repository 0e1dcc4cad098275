// Host helpers of the map_distance op shared by csrc/cpu/map_distance.cpp and csrc/cuda/map_distance.cu
// (op contract in kdfast/ops/map_distance.py, formulas in kdfast/reference/map_distance.py): argument
// checks and the launch views of the size groups.
#pragma once

#include <ATen/core/Tensor.h>

#include <utility>
#include <vector>

#include "common.h"

namespace kdfast {

// One size group u: its teachers [t0, t0 + teachers) along att's T axis and its N_u positions, with
// the batch and row strides of v_s[u] (rows: students) and v_t[u] (rows: teachers); positions have
// unit stride.
struct MapDistanceGroup {
  int64_t t0, teachers, n;
  int64_t vs_sb, vs_ss, vt_sb, vt_st;
};

// The inputs of a map_distance call in their launch views.
struct MapDistanceInputs {
  std::vector<at::Tensor> v_s, v_t;  // unit-stride positions (a contiguous copy where they were not)
  std::vector<MapDistanceGroup> groups;
  at::Tensor att;                    // (B, T, S), contiguous, in the accumulation dtype
  int64_t batch, teachers, students;
  at::ScalarType acc;                // float64 for float64 values, else float32
};

inline MapDistanceInputs check_map_distance(const char* op, const std::vector<at::Tensor>& v_s,
                                            const std::vector<at::Tensor>& v_t, const at::Tensor& att) {
  TORCH_CHECK(!v_s.empty() && v_s.size() == v_t.size(), op, ": v_s and v_t must hold equally many (>= 1) groups, got ",
              v_s.size(), " and ", v_t.size());
  const at::Tensor& first = v_s[0];
  TORCH_CHECK(is_float_dtype(first.scalar_type()), op, ": v_s and v_t must be float16, bfloat16, float32 or float64, got ",
              first.scalar_type());
  MapDistanceInputs in;
  in.batch = first.dim() == 3 ? first.size(0) : -1;
  in.students = first.dim() == 3 ? first.size(1) : -1;
  in.teachers = 0;
  in.acc = acc_dtype(first.scalar_type());
  for (size_t u = 0; u < v_s.size(); ++u) {
    const at::Tensor &s = v_s[u], &t = v_t[u];
    TORCH_CHECK(s.dim() == 3 && t.dim() == 3 && s.size(0) == in.batch && t.size(0) == in.batch &&
                    s.size(1) == in.students,
                op, ": v_s[", u, "] must be (B, S, N) and v_t[", u, "] (B, T_u, N) with one B and S for all groups, got ",
                s.sizes(), " and ", t.sizes());
    TORCH_CHECK(s.size(2) == t.size(2) && s.numel() > 0 && t.numel() > 0, op, ": v_s[", u, "] ", s.sizes(),
                " and v_t[", u, "] ", t.sizes(), " must be non-empty with one N");
    TORCH_CHECK(s.scalar_type() == first.scalar_type() && t.scalar_type() == first.scalar_type() &&
                    s.device() == first.device() && t.device() == first.device(),
                op, ": all v_s and v_t must share one dtype and device (group ", u, ")");
    in.v_s.push_back(s.stride(2) == 1 || s.size(2) == 1 ? s : s.contiguous());
    in.v_t.push_back(t.stride(2) == 1 || t.size(2) == 1 ? t : t.contiguous());
    const at::Tensor &vs = in.v_s.back(), &vt = in.v_t.back();
    in.groups.push_back({in.teachers, t.size(1), s.size(2), vs.stride(0), vs.stride(1), vt.stride(0), vt.stride(1)});
    in.teachers += t.size(1);
  }
  TORCH_CHECK(att.dim() == 3 && att.size(0) == in.batch && att.size(1) == in.teachers && att.size(2) == in.students,
              op, ": att must be (B, T, S) = (", in.batch, ", ", in.teachers, ", ", in.students, "), got ", att.sizes());
  TORCH_CHECK(is_float_dtype(att.scalar_type()) && att.device() == first.device(), op,
              ": att must be a floating tensor on ", first.device(), ", got ", att.scalar_type(), " on ", att.device());
  in.att = att.to(in.acc).contiguous();
  return in;
}

// The inputs of map_distance_backward, checked: those of the forward, and in the accumulation dtype,
// contiguous, the upstream gradient (0-d) and the saved dist (B, T, S).
struct MapDistanceBackwardInputs {
  MapDistanceInputs in;
  at::Tensor grad_loss, dist;
};

inline MapDistanceBackwardInputs check_map_distance_backward(const at::Tensor& grad_loss,
                                                             const std::vector<at::Tensor>& v_s,
                                                             const std::vector<at::Tensor>& v_t, const at::Tensor& att,
                                                             const at::Tensor& dist) {
  const char* op = "map_distance_backward";
  MapDistanceInputs in = check_map_distance(op, v_s, v_t, att);
  at::Tensor g = upstream_grad(op, "grad_loss", grad_loss, {}, in.acc, in.att);
  at::Tensor d = check_saved(op, "dist", dist, {in.batch, in.teachers, in.students}, in.acc, in.att, "att");
  return {std::move(in), std::move(g), std::move(d)};
}

}  // namespace kdfast
