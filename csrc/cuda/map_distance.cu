// CUDA kernels of the map-distance op (AFD/RTK; op contract in kdfast/ops/map_distance.py, formulas in
// kdfast/reference/map_distance.py). Per size group u (teachers t0 .. t0 + T_u - 1, N_u positions):
//
// map_distance_forward:  dist[b, t, s] = sum_n (v_s[u][b, s, n] - v_t[u][b, t - t0, n])^2 / N_u,
//                        loss = sum_{b,t,s} att dist / B
// map_distance_backward: grad_v_s[u][b, s, n] = 2 g / (B N_u) sum_t att[b, t, s] (v_s - v_t[t - t0]),
//                        grad_att = g dist / B
//
// Forward: block i of a launch is the (sample, teacher map) pair (i / T_run, t_begin + i % T_run) of the
// run of teachers it covers (all T in one launch for up to kMaxGroups size groups); its threads stride over the
// positions, kStudents students at a time (v_t's element loaded once per round), and the per-thread sums
// are added with block_sum (warps in order); thread 0 writes the dist row and the block's partial
// sum_s att dist. torch then sums the B*T partials (a fixed order). Backward: block i is a (group,
// sample, block of kThreads positions), one position per thread, kStudents students at a time, looping
// over the group's teachers; the blocks of position block 0 also write grad_att. The size groups travel
// in a table of GroupRow (pointers and strides) passed by value as a kernel parameter (no host staging
// buffer: the launches can be captured in a CUDA graph), kMaxGroups groups per launch (one launch for
// any AFD/RTK network; more groups: one launch per run of kMaxGroups, along consecutive teachers).
// v_s and v_t are read with read-only global loads (global_load.cuh). Accumulation in float (double for
// double values); att and the gradients' accumulation-dtype buffers are contiguous; no atomics.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "../map_distance.h"
#include "global_load.cuh"
#include "checked_launch.cuh"
#include "launch.cuh"
#include "reduce.cuh"

namespace kdfast {
namespace {

using gpu::block_sum;

constexpr int kThreads = 128;
constexpr int kStudents = 8;   // students per round: the forward's block sums, the backward's accumulators
constexpr int kMaxGroups = 32;  // size groups per launch: the argument table stays within 4 KB of parameters

KDFAST_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// One size group as the kernels read it.
template <typename scalar_t>
struct GroupRow {
  int64_t t0, teachers, n;
  int64_t first_block;  // of the group in the backward launch
  const scalar_t* vs;   // v_s[u] (B, S, N_u), unit-stride positions
  int64_t vs_sb, vs_ss;
  const scalar_t* vt;  // v_t[u] (B, T_u, N_u), unit-stride positions
  int64_t vt_sb, vt_st;
  scalar_t* gvs;  // grad_v_s[u], contiguous (backward only)
};

// The groups of one launch, whose teachers are t_begin .. t_begin + t_count - 1 of att's T axis.
template <typename scalar_t>
struct Groups {
  GroupRow<scalar_t> rows[kMaxGroups];
  int count;
  int64_t t_begin, t_count;
};
static_assert(sizeof(Groups<double>) <= 4096, "the argument table must fit 4 KB of kernel parameters");

// The last group whose `field` is <= i (rows are in group order, field increasing).
template <typename scalar_t, typename Field>
__device__ __forceinline__ const GroupRow<scalar_t>& find_group(const Groups<scalar_t>& groups, int64_t i,
                                                                Field field) {
  int u = 0;
  while (u + 1 < groups.count && i >= field(groups.rows[u + 1])) ++u;
  return groups.rows[u];
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    map_distance_forward_kernel(const Groups<scalar_t> groups, const acc_t* __restrict__ att,
                                acc_t* __restrict__ dist, acc_t* __restrict__ partials, int64_t teachers,
                                int64_t students) {
  const int64_t b = blockIdx.x / groups.t_count, t = groups.t_begin + blockIdx.x % groups.t_count;
  const int64_t i = b * teachers + t;  // (b, t), row-major: dist and att rows start at i * students
  const GroupRow<scalar_t>& row = find_group(groups, t, [](const GroupRow<scalar_t>& r) { return r.t0; });
  const scalar_t* vt = row.vt + b * row.vt_sb + (t - row.t0) * row.vt_st;
  const scalar_t* vs = row.vs + b * row.vs_sb;
  acc_t weighted = 0;
  for (int64_t s0 = 0; s0 < students; s0 += kStudents) {
    acc_t sums[kStudents];
#pragma unroll
    for (int k = 0; k < kStudents; ++k) sums[k] = 0;
    for (int64_t n = threadIdx.x; n < row.n; n += kThreads) {
      const acc_t x_t = gpu::load_global<acc_t>(vt + n);
#pragma unroll
      for (int k = 0; k < kStudents; ++k) {
        if (s0 + k < students) {
          const acc_t d = gpu::load_global<acc_t>(vs + (s0 + k) * row.vs_ss + n) - x_t;
          sums[k] += d * d;
        }
      }
    }
    block_sum<kThreads>(sums);
    if (threadIdx.x == 0) {
      for (int k = 0; k < kStudents && s0 + k < students; ++k) {
        const acc_t d_row = sums[k] / static_cast<acc_t>(row.n);
        dist[i * students + s0 + k] = d_row;
        weighted += att[i * students + s0 + k] * d_row;
      }
    }
  }
  if (threadIdx.x == 0) partials[i] = weighted;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    map_distance_backward_kernel(const Groups<scalar_t> groups, const acc_t* __restrict__ grad_loss,
                                 const acc_t* __restrict__ att, const acc_t* __restrict__ dist,
                                 acc_t* __restrict__ grad_att, int64_t batch, int64_t teachers, int64_t students) {
  const int64_t i = blockIdx.x;
  const GroupRow<scalar_t>& row =
      find_group(groups, i, [](const GroupRow<scalar_t>& r) { return r.first_block; });
  const int64_t n_blocks = ceil_div(row.n, kThreads);
  const int64_t local = i - row.first_block, b = local / n_blocks, block = local % n_blocks;
  const int64_t n = block * kThreads + threadIdx.x;
  const acc_t g = *grad_loss;
  const int64_t att_offset = (b * teachers + row.t0) * students;  // att[b, t0, 0]
  if (n < row.n) {
    const acc_t scale = acc_t(2) * g / static_cast<acc_t>(batch * row.n);
    const scalar_t* vs = row.vs + b * row.vs_sb + n;
    const scalar_t* vt = row.vt + b * row.vt_sb + n;
    scalar_t* out = row.gvs + b * students * row.n + n;
    for (int64_t s0 = 0; s0 < students; s0 += kStudents) {
      acc_t x_s[kStudents], acc[kStudents];
#pragma unroll
      for (int k = 0; k < kStudents; ++k) {
        x_s[k] = s0 + k < students ? gpu::load_global<acc_t>(vs + (s0 + k) * row.vs_ss) : acc_t(0);
        acc[k] = 0;
      }
      for (int64_t j = 0; j < row.teachers; ++j) {
        const acc_t x_t = gpu::load_global<acc_t>(vt + j * row.vt_st);
        const acc_t* a = att + att_offset + j * students + s0;
#pragma unroll
        for (int k = 0; k < kStudents; ++k) {
          if (s0 + k < students) acc[k] += a[k] * (x_s[k] - x_t);
        }
      }
#pragma unroll
      for (int k = 0; k < kStudents; ++k) {
        if (s0 + k < students) out[(s0 + k) * row.n] = static_cast<scalar_t>(scale * acc[k]);
      }
    }
  }
  if (block == 0) {
    const acc_t att_scale = g / static_cast<acc_t>(batch);
    for (int64_t k = threadIdx.x; k < row.teachers * students; k += kThreads) {
      grad_att[att_offset + k] = att_scale * dist[att_offset + k];
    }
  }
}

// fn(groups, blocks) for each run of up to kMaxGroups consecutive groups: the run's argument table
// and its block count (forward: B x the run's teachers; backward: B x the position blocks of each
// group). `grads`: the backward's outputs, nullptr in the forward.
template <typename scalar_t, typename Fn>
void for_each_run(const MapDistanceInputs& in, std::vector<at::Tensor>* grads, Fn&& fn) {
  const int64_t count = static_cast<int64_t>(in.groups.size());
  for (int64_t first = 0; first < count; first += kMaxGroups) {
    Groups<scalar_t> groups{};
    groups.count = static_cast<int>(std::min<int64_t>(kMaxGroups, count - first));
    groups.t_begin = in.groups[first].t0;
    int64_t backward_blocks = 0;
    for (int k = 0; k < groups.count; ++k) {
      const size_t u = static_cast<size_t>(first + k);
      const MapDistanceGroup& g = in.groups[u];
      groups.rows[k] = {g.t0, g.teachers, g.n, backward_blocks, in.v_s[u].const_data_ptr<scalar_t>(), g.vs_sb,
                        g.vs_ss, in.v_t[u].const_data_ptr<scalar_t>(), g.vt_sb, g.vt_st,
                        grads != nullptr ? (*grads)[u].mutable_data_ptr<scalar_t>() : nullptr};
      groups.t_count += g.teachers;
      backward_blocks += in.batch * ceil_div(g.n, kThreads);
    }
    fn(groups, grads != nullptr ? backward_blocks : in.batch * groups.t_count);
  }
}

std::tuple<at::Tensor, at::Tensor> map_distance_forward_cuda(const std::vector<at::Tensor>& v_s,
                                                             const std::vector<at::Tensor>& v_t, const at::Tensor& att) {
  const char* op = "map_distance_forward";
  const MapDistanceInputs in = check_map_distance(op, v_s, v_t, att);
  const c10::cuda::CUDAGuard guard(att.device());
  const auto options = att.options().dtype(in.acc);
  at::Tensor dist = at::empty({in.batch, in.teachers, in.students}, options);
  at::Tensor partials = at::empty({in.batch * in.teachers}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.v_s[0].scalar_type(), "map_distance_forward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    for_each_run<scalar_t>(in, nullptr, [&](const Groups<scalar_t>& groups, int64_t blocks) {
      gpu::launch_unless_empty(op, map_distance_forward_kernel<scalar_t, acc_t>, blocks, kThreads, 0, groups,
                               in.att.const_data_ptr<acc_t>(), dist.mutable_data_ptr<acc_t>(),
                               partials.mutable_data_ptr<acc_t>(), in.teachers, in.students);
    });
  });
  return {at::sum(partials).div_(static_cast<double>(in.batch)), dist};
}

std::tuple<std::vector<at::Tensor>, at::Tensor> map_distance_backward_cuda(const at::Tensor& grad_loss,
                                                                           const std::vector<at::Tensor>& v_s,
                                                                           const std::vector<at::Tensor>& v_t,
                                                                           const at::Tensor& att, const at::Tensor& dist) {
  const char* op = "map_distance_backward";
  const MapDistanceBackwardInputs checked = check_map_distance_backward(grad_loss, v_s, v_t, att, dist);
  const c10::cuda::CUDAGuard guard(att.device());
  const MapDistanceInputs& in = checked.in;
  const at::Tensor &g = checked.grad_loss, &d = checked.dist;
  std::vector<at::Tensor> grads;
  for (const at::Tensor& v : in.v_s) grads.push_back(at::empty(v.sizes(), v.options()));
  at::Tensor grad_att = at::empty_like(in.att);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.v_s[0].scalar_type(), "map_distance_backward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    for_each_run<scalar_t>(in, &grads, [&](const Groups<scalar_t>& groups, int64_t blocks) {
      gpu::launch_unless_empty(op, map_distance_backward_kernel<scalar_t, acc_t>, blocks, kThreads, 0, groups,
                               g.const_data_ptr<acc_t>(), in.att.const_data_ptr<acc_t>(), d.const_data_ptr<acc_t>(),
                               grad_att.mutable_data_ptr<acc_t>(), in.batch, in.teachers, in.students);
    });
  });
  return {grads, grad_att.to(att.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) {
  m.impl("map_distance_forward", &map_distance_forward_cuda);
  m.impl("map_distance_backward", &map_distance_backward_cuda);
}

}  // namespace kdfast
