// C++ CPU kernels of the map-distance op (AFD/RTK; op contract in kdfast/ops/map_distance.py,
// formulas in kdfast/reference/map_distance.py). Per size group u (teachers t0 .. t0 + T_u - 1, N_u
// positions):
//
// map_distance_forward:  dist[b, t, s] = sum_n (v_s[u][b, s, n] - v_t[u][b, t - t0, n])^2 / N_u,
//                        loss = sum_{b,t,s} att dist / B
// map_distance_backward: grad_v_s[u][b, s, n] = 2 g / (B N_u) sum_t att[b, t, s] (v_s - v_t[t - t0]),
//                        grad_att = g dist / B
//
// The forward's work items are the (sample, teacher map) pairs, each writing its dist row and its
// partial sum_s att dist; the partials are added in item order afterwards. The backward's items are
// (group, sample, chunk of kChunk positions); the items of chunk 0 also write grad_att. Results depend
// neither on the thread count nor on the scheduling. Accumulation in float (double for double values).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../map_distance.h"

namespace kdfast {
namespace {

constexpr int64_t kChunk = 256;  // positions per backward work item

int64_t chunks(int64_t n) { return (n + kChunk - 1) / kChunk; }

// Index of the group holding the item `i` of a launch whose groups start at items first[u].
size_t group_of(const std::vector<int64_t>& first, int64_t i) {
  return std::upper_bound(first.begin(), first.end(), i) - first.begin() - 1;
}

template <typename scalar_t, typename acc_t>
void forward_items(const MapDistanceInputs& in, acc_t* dist, acc_t* partials) {
  std::vector<int64_t> t0;  // the group of teacher t is group_of(t0, t)
  for (const auto& g : in.groups) t0.push_back(g.t0);
  const acc_t* att = in.att.const_data_ptr<acc_t>();
  at::parallel_for(0, in.batch * in.teachers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / in.teachers, t = i % in.teachers;
      const size_t u = group_of(t0, t);
      const MapDistanceGroup& g = in.groups[u];
      const scalar_t* vt = in.v_t[u].const_data_ptr<scalar_t>() + b * g.vt_sb + (t - g.t0) * g.vt_st;
      const scalar_t* vs = in.v_s[u].const_data_ptr<scalar_t>() + b * g.vs_sb;
      acc_t weighted = 0;
      for (int64_t s = 0; s < in.students; ++s) {
        const scalar_t* row = vs + s * g.vs_ss;
        acc_t sum = 0;
        for (int64_t n = 0; n < g.n; ++n) {
          const acc_t d = static_cast<acc_t>(row[n]) - static_cast<acc_t>(vt[n]);
          sum += d * d;
        }
        const acc_t d_row = sum / static_cast<acc_t>(g.n);
        dist[i * in.students + s] = d_row;
        weighted += att[i * in.students + s] * d_row;
      }
      partials[i] = weighted;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> map_distance_forward_cpu(const std::vector<at::Tensor>& v_s,
                                                            const std::vector<at::Tensor>& v_t, const at::Tensor& att) {
  const MapDistanceInputs in = check_map_distance("map_distance_forward", v_s, v_t, att);
  const auto options = att.options().dtype(in.acc);
  at::Tensor dist = at::empty({in.batch, in.teachers, in.students}, options);
  at::Tensor loss = at::empty({}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.v_s[0].scalar_type(), "map_distance_forward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    std::vector<acc_t> partials(in.batch * in.teachers);
    forward_items<scalar_t, acc_t>(in, dist.mutable_data_ptr<acc_t>(), partials.data());
    acc_t sum = 0;
    for (const acc_t p : partials) sum += p;
    *loss.mutable_data_ptr<acc_t>() = sum / static_cast<acc_t>(in.batch);
  });
  return {loss, dist};
}

template <typename scalar_t, typename acc_t>
void backward_items(const MapDistanceInputs& in, acc_t g, const acc_t* dist, std::vector<at::Tensor>& grads,
                    acc_t* grad_att) {
  std::vector<int64_t> first{0};  // first item of each group, then the total
  for (const auto& group : in.groups) first.push_back(first.back() + in.batch * chunks(group.n));
  const acc_t* att = in.att.const_data_ptr<acc_t>();
  const acc_t att_scale = g / static_cast<acc_t>(in.batch);
  at::parallel_for(0, first.back(), 1, [&](int64_t begin, int64_t end) {
    acc_t acc[kChunk];
    for (int64_t i = begin; i < end; ++i) {
      const size_t u = group_of(first, i);
      const MapDistanceGroup& grp = in.groups[u];
      const int64_t local = i - first[u], b = local / chunks(grp.n), n0 = (local % chunks(grp.n)) * kChunk;
      const int64_t len = std::min(kChunk, grp.n - n0);
      const acc_t scale = acc_t(2) * g / static_cast<acc_t>(in.batch * grp.n);
      const scalar_t* vs = in.v_s[u].const_data_ptr<scalar_t>() + b * grp.vs_sb + n0;
      const scalar_t* vt = in.v_t[u].const_data_ptr<scalar_t>() + b * grp.vt_sb + n0;
      const acc_t* att_bt = att + (b * in.teachers + grp.t0) * in.students;  // att[b, t0, 0]
      scalar_t* out = grads[u].mutable_data_ptr<scalar_t>() + b * in.students * grp.n + n0;
      for (int64_t s = 0; s < in.students; ++s) {
        const scalar_t* row = vs + s * grp.vs_ss;
        std::fill(acc, acc + len, acc_t(0));
        for (int64_t k = 0; k < grp.teachers; ++k) {
          const acc_t a = att_bt[k * in.students + s];
          const scalar_t* teacher = vt + k * grp.vt_st;
          for (int64_t j = 0; j < len; ++j) acc[j] += a * (static_cast<acc_t>(row[j]) - static_cast<acc_t>(teacher[j]));
        }
        for (int64_t j = 0; j < len; ++j) out[s * grp.n + j] = static_cast<scalar_t>(scale * acc[j]);
      }
      if (n0 == 0) {
        const int64_t offset = (b * in.teachers + grp.t0) * in.students;
        for (int64_t j = 0; j < grp.teachers * in.students; ++j) grad_att[offset + j] = att_scale * dist[offset + j];
      }
    }
  });
}

std::tuple<std::vector<at::Tensor>, at::Tensor> map_distance_backward_cpu(const at::Tensor& grad_loss,
                                                                          const std::vector<at::Tensor>& v_s,
                                                                          const std::vector<at::Tensor>& v_t,
                                                                          const at::Tensor& att, const at::Tensor& dist) {
  const MapDistanceBackwardInputs checked = check_map_distance_backward(grad_loss, v_s, v_t, att, dist);
  const MapDistanceInputs& in = checked.in;
  const at::Tensor &g = checked.grad_loss, &d = checked.dist;
  std::vector<at::Tensor> grads;
  for (const auto& v : in.v_s) grads.push_back(at::empty(v.sizes(), v.options()));
  at::Tensor grad_att = at::empty_like(in.att);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.v_s[0].scalar_type(), "map_distance_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    backward_items<scalar_t, acc_t>(in, *g.const_data_ptr<acc_t>(), d.const_data_ptr<acc_t>(), grads,
                                    grad_att.mutable_data_ptr<acc_t>());
  });
  return {grads, grad_att.to(att.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("map_distance_forward", &map_distance_forward_cpu);
  m.impl("map_distance_backward", &map_distance_backward_cpu);
}

}  // namespace kdfast
