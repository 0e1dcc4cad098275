// CUDA kernels of the map-distance op (AFD/RTK; op contract in kdfast/ops/map_distance.py, formulas in
// kdfast/reference/map_distance.py). Per size group u (teachers t0 .. t0 + T_u - 1, N_u positions):
//
// map_distance_forward:  dist[b, t, s] = sum_n (v_s[u][b, s, n] - v_t[u][b, t - t0, n])^2 / N_u,
//                        loss = sum_{b,t,s} att dist / B
// map_distance_backward: grad_v_s[u][b, s, n] = 2 g / (B N_u) sum_t att[b, t, s] (v_s - v_t[t - t0]),
//                        grad_att = g dist / B
//
// ONE forward launch: block i is the (sample, teacher map) pair (i / T, i % T); its threads stride over
// the positions, kStudents students at a time (v_t's element loaded once per round), and the per-thread
// sums are added with block_sum (warps in order); thread 0 writes the dist row and the block's partial
// sum_s att dist. torch then sums the B*T partials (a fixed order). ONE backward launch: block i is a
// (group, sample, block of kThreads positions), one position per thread, kStudents students at a time,
// looping over the group's teachers; the blocks of position block 0 also write grad_att. The groups travel
// in a small table of GroupRow (pointers and strides) copied to the device from pinned memory without a
// host sync, so any number of groups fits in one launch. Accumulation in float (double for double
// values); att and the gradients' accumulation-dtype buffers are contiguous; no atomics.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "../map_distance.h"
#include "reduce.cuh"

namespace kdfast {
namespace {

using gpu::block_sum;

constexpr int kThreads = 128;
constexpr int kStudents = 8;  // students per round: the forward's block sums, the backward's accumulators

KDFAST_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// One size group as the kernels read it (a table row on the device).
struct GroupRow {
  int64_t t0, teachers, n;
  int64_t first_block;  // of the group in the backward launch
  const void* vs;       // v_s[u] (B, S, N_u), unit-stride positions
  int64_t vs_sb, vs_ss;
  const void* vt;  // v_t[u] (B, T_u, N_u), unit-stride positions
  int64_t vt_sb, vt_st;
  void* gvs;  // grad_v_s[u], contiguous (backward only)
};

// The rows of `in`'s groups on its device (copied from pinned memory, no host sync).
at::Tensor group_table(const MapDistanceInputs& in, const std::vector<at::Tensor>* grads) {
  std::vector<GroupRow> rows;
  int64_t first_block = 0;
  for (size_t u = 0; u < in.groups.size(); ++u) {
    const MapDistanceGroup& g = in.groups[u];
    rows.push_back({g.t0, g.teachers, g.n, first_block, in.v_s[u].const_data_ptr(), g.vs_sb, g.vs_ss,
                    in.v_t[u].const_data_ptr(), g.vt_sb, g.vt_st,
                    grads != nullptr ? (*grads)[u].mutable_data_ptr() : nullptr});
    first_block += in.batch * ceil_div(g.n, kThreads);
  }
  static_assert(sizeof(GroupRow) % sizeof(int64_t) == 0, "GroupRow must be a whole number of int64");
  const int64_t words = static_cast<int64_t>(rows.size() * sizeof(GroupRow) / sizeof(int64_t));
  at::Tensor host = at::empty({words}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::memcpy(host.mutable_data_ptr(), rows.data(), rows.size() * sizeof(GroupRow));
  return host.to(in.v_s[0].device(), at::kLong, /*non_blocking=*/true);
}

// The last group whose `field` is <= i (rows are in group order, field increasing).
template <typename Field>
__device__ __forceinline__ GroupRow find_group(const GroupRow* rows, int groups, int64_t i, Field field) {
  int u = 0;
  while (u + 1 < groups && i >= field(rows[u + 1])) ++u;
  return rows[u];
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    map_distance_forward_kernel(const GroupRow* __restrict__ rows, int groups, const acc_t* __restrict__ att,
                                acc_t* __restrict__ dist, acc_t* __restrict__ partials, int64_t teachers,
                                int64_t students) {
  const int64_t i = blockIdx.x;  // (b, t), row-major: dist and att rows start at i * students
  const int64_t b = i / teachers, t = i % teachers;
  const GroupRow row = find_group(rows, groups, t, [](const GroupRow& r) { return r.t0; });
  const scalar_t* vt = static_cast<const scalar_t*>(row.vt) + b * row.vt_sb + (t - row.t0) * row.vt_st;
  const scalar_t* vs = static_cast<const scalar_t*>(row.vs) + b * row.vs_sb;
  acc_t weighted = 0;
  for (int64_t s0 = 0; s0 < students; s0 += kStudents) {
    acc_t sums[kStudents];
#pragma unroll
    for (int k = 0; k < kStudents; ++k) sums[k] = 0;
    for (int64_t n = threadIdx.x; n < row.n; n += kThreads) {
      const acc_t x_t = static_cast<acc_t>(vt[n]);
#pragma unroll
      for (int k = 0; k < kStudents; ++k) {
        if (s0 + k < students) {
          const acc_t d = static_cast<acc_t>(vs[(s0 + k) * row.vs_ss + n]) - x_t;
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
    map_distance_backward_kernel(const GroupRow* __restrict__ rows, int groups, const acc_t* __restrict__ grad_loss,
                                 const acc_t* __restrict__ att, const acc_t* __restrict__ dist,
                                 acc_t* __restrict__ grad_att, int64_t batch, int64_t teachers, int64_t students) {
  const int64_t i = blockIdx.x;
  const GroupRow row = find_group(rows, groups, i, [](const GroupRow& r) { return r.first_block; });
  const int64_t n_blocks = ceil_div(row.n, kThreads);
  const int64_t local = i - row.first_block, b = local / n_blocks, block = local % n_blocks;
  const int64_t n = block * kThreads + threadIdx.x;
  const acc_t g = *grad_loss;
  const int64_t att_offset = (b * teachers + row.t0) * students;  // att[b, t0, 0]
  if (n < row.n) {
    const acc_t scale = acc_t(2) * g / static_cast<acc_t>(batch * row.n);
    const scalar_t* vs = static_cast<const scalar_t*>(row.vs) + b * row.vs_sb + n;
    const scalar_t* vt = static_cast<const scalar_t*>(row.vt) + b * row.vt_sb + n;
    scalar_t* out = static_cast<scalar_t*>(row.gvs) + b * students * row.n + n;
    for (int64_t s0 = 0; s0 < students; s0 += kStudents) {
      acc_t x_s[kStudents], acc[kStudents];
#pragma unroll
      for (int k = 0; k < kStudents; ++k) {
        x_s[k] = s0 + k < students ? static_cast<acc_t>(vs[(s0 + k) * row.vs_ss]) : acc_t(0);
        acc[k] = 0;
      }
      for (int64_t j = 0; j < row.teachers; ++j) {
        const acc_t x_t = static_cast<acc_t>(vt[j * row.vt_st]);
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

// kernel<<<blocks, kThreads>>>(args...) on the current stream; zero blocks launch nothing.
template <typename... Params, typename... Args>
void launch(const char* op, void (*kernel)(Params...), int64_t blocks, Args&&... args) {
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), op, ": too many blocks for one launch (", blocks, ")");
  if (blocks == 0) return;
  kernel<<<static_cast<unsigned int>(blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

const GroupRow* rows_of(const at::Tensor& table) {
  return reinterpret_cast<const GroupRow*>(table.const_data_ptr<int64_t>());
}

std::tuple<at::Tensor, at::Tensor> map_distance_forward_cuda(const std::vector<at::Tensor>& v_s,
                                                             const std::vector<at::Tensor>& v_t, const at::Tensor& att) {
  const char* op = "map_distance_forward";
  const MapDistanceInputs in = check_map_distance(op, v_s, v_t, att);
  const c10::cuda::CUDAGuard guard(att.device());
  const auto options = att.options().dtype(in.acc);
  at::Tensor dist = at::empty({in.batch, in.teachers, in.students}, options);
  at::Tensor partials = at::empty({in.batch * in.teachers}, options);
  const at::Tensor table = group_table(in, nullptr);
  const int groups = static_cast<int>(in.groups.size());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.v_s[0].scalar_type(), "map_distance_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch(op, map_distance_forward_kernel<scalar_t, acc_t>, in.batch * in.teachers, rows_of(table), groups,
           in.att.const_data_ptr<acc_t>(), dist.mutable_data_ptr<acc_t>(), partials.mutable_data_ptr<acc_t>(),
           in.teachers, in.students);
  });
  return {at::sum(partials).div_(static_cast<double>(in.batch)), dist};
}

std::tuple<std::vector<at::Tensor>, at::Tensor> map_distance_backward_cuda(const at::Tensor& grad_loss,
                                                                           const std::vector<at::Tensor>& v_s,
                                                                           const std::vector<at::Tensor>& v_t,
                                                                           const at::Tensor& att, const at::Tensor& dist) {
  const char* op = "map_distance_backward";
  const MapDistanceInputs in = check_map_distance(op, v_s, v_t, att);
  const c10::cuda::CUDAGuard guard(att.device());
  const at::Tensor g = upstream_grad(op, "grad_loss", grad_loss, {}, in.acc, in.att);
  const at::Tensor d = check_saved(op, "dist", dist, {in.batch, in.teachers, in.students}, in.acc, in.att, "att");
  std::vector<at::Tensor> grads;
  int64_t blocks = 0;
  for (size_t u = 0; u < in.v_s.size(); ++u) {
    grads.push_back(at::empty(in.v_s[u].sizes(), in.v_s[u].options()));
    blocks += in.batch * ceil_div(in.groups[u].n, kThreads);
  }
  at::Tensor grad_att = at::empty_like(in.att);
  const at::Tensor table = group_table(in, &grads);
  const int groups = static_cast<int>(in.groups.size());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.v_s[0].scalar_type(), "map_distance_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch(op, map_distance_backward_kernel<scalar_t, acc_t>, blocks, rows_of(table), groups, g.const_data_ptr<acc_t>(),
           in.att.const_data_ptr<acc_t>(), d.const_data_ptr<acc_t>(), grad_att.mutable_data_ptr<acc_t>(), in.batch,
           in.teachers, in.students);
  });
  return {grads, grad_att.to(att.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) {
  m.impl("map_distance_forward", &map_distance_forward_cuda);
  m.impl("map_distance_backward", &map_distance_backward_cuda);
}

}  // namespace kdfast
