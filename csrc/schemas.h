// The schemas of every kdfast op, defined once for each library that implements them: kdfast
// (csrc/kdfast.cpp: the C++ CPU and CUDA kernels) and kdfast_emu (csrc/emu/module.cpp: the CUDA
// kernels run on the CPU through csrc/emu/cuda_emu.h).
#pragma once

#include <torch/library.h>

namespace kdfast {

inline void define_schemas(torch::Library& m) {
  // at: attention transfer (kdfast/reference/at.py states the formulas).
  m.def("at_maps(Tensor[] feats, float p, str mode) -> Tensor[]");
  m.def("at_maps_backward(Tensor[] grad_maps, Tensor[] feats, float p, str mode) -> Tensor[]");
  m.def("at_map_loss(Tensor[] maps_s, Tensor[] maps_t, str loss) -> (Tensor, Tensor[])");
  // kd: Hinton's logit loss (kdfast/reference/kd.py). Returns (loss rows, stats, grad).
  m.def("kd_forward(Tensor z_s, Tensor z_t, float temperature, bool with_grad) -> (Tensor, Tensor, Tensor)");
  m.def("kd_backward(Tensor grad_loss, Tensor z_s, Tensor z_t, Tensor stats, float temperature) -> Tensor");
  // dkd: decoupled KD (kdfast/reference/dkd.py). Returns (loss rows, stats, grad).
  m.def(
      "dkd_forward(Tensor z_s, Tensor z_t, Tensor target, float alpha, float beta, float temperature, "
      "bool with_grad) -> (Tensor, Tensor, Tensor)");
  m.def(
      "dkd_backward(Tensor grad_loss, Tensor z_s, Tensor z_t, Tensor target, Tensor stats, float alpha, "
      "float beta, float temperature) -> Tensor");
  // lcc: local correlation consistency (kdfast/reference/lcc.py) on maps whose H and W the grid
  // divides. Returns (class sums of (S_s - S_t)^2 (3,), inverse norms of both networks' (N,) region
  // descriptors); the backward returns d(sum_c grad_sums[c] sums[c]) / d f_s.
  m.def("lcc_forward(Tensor f_s, Tensor f_t, int grid) -> (Tensor, Tensor, Tensor)");
  m.def(
      "lcc_backward(Tensor grad_sums, Tensor f_s, Tensor f_t, Tensor inv_norm_s, Tensor inv_norm_t, int grid) "
      "-> Tensor");
  // sp: similarity-preserving loss (op contract in kdfast/ops/sp.py). Returns (loss, stats (B, 3)).
  m.def("sp_forward(Tensor x_s, Tensor x_t) -> (Tensor, Tensor)");
  m.def("sp_backward(Tensor grad_loss, Tensor x_s, Tensor x_t, Tensor stats) -> Tensor");
  // rkd: relational KD (op contract in kdfast/ops/rkd.py). Returns (terms (2,), the squared
  // distances (2, B, B) of both networks, as kernels/rkd.py, stats (3,)).
  m.def("rkd_forward(Tensor e_s, Tensor e_t) -> (Tensor, Tensor, Tensor)");
  m.def("rkd_backward(Tensor grad_terms, Tensor e_s, Tensor sq_dist, Tensor stats) -> Tensor");
  // block_attention: LAKD's NDAM and AFT-KD's attention/feature blocks over L modules (op contract
  // in kdfast/ops/block_attention.py). Returns (terms (L, 2) [feat, map], the un-normalised block
  // maps (L, 2, B, grid^2) of student and teacher); the backward returns (grad_f_s, grad_h_s).
  m.def(
      "block_attention_forward(Tensor[] f_s, Tensor[] h_s, Tensor[] f_t, int grid, float power, "
      "int feature_grid, bool teacher_weighting) -> (Tensor, Tensor)");
  m.def(
      "block_attention_backward(Tensor grad_terms, Tensor[] f_s, Tensor[] h_s, Tensor[] f_t, Tensor maps, "
      "int grid, float power, int feature_grid, bool teacher_weighting) -> (Tensor[], Tensor[])");
  // masked_mse: SoKD's masked feature loss (op contract in kdfast/ops/masked_mse.py): x, y (B, C, H, W),
  // mask (B, H, W) broadcast over the channels. Returns (loss, scale = 1 / denom); the backward returns
  // (grad_x, grad_y), each an empty (0,) tensor unless its flag asks for it.
  m.def("masked_mse_forward(Tensor x, Tensor y, Tensor mask, str reduction) -> (Tensor, Tensor)");
  m.def(
      "masked_mse_backward(Tensor grad_loss, Tensor x, Tensor y, Tensor mask, Tensor scale, bool x_grad, "
      "bool y_grad) -> (Tensor, Tensor)");
  // map_distance: AFD/RTK's attention-weighted distances of every (teacher, student) map pair (op contract
  // in kdfast/ops/map_distance.py): per size group u, student values v_s[u] (B, S, N_u) and teacher values
  // v_t[u] (B, T_u, N_u), att (B, T, S) in group order. Returns (loss, dist (B, T, S)); the backward returns
  // (grad_v_s, grad_att).
  m.def("map_distance_forward(Tensor[] v_s, Tensor[] v_t, Tensor att) -> (Tensor, Tensor)");
  m.def(
      "map_distance_backward(Tensor grad_loss, Tensor[] v_s, Tensor[] v_t, Tensor att, Tensor dist) "
      "-> (Tensor[], Tensor)");
}

}  // namespace kdfast
