// CUDA kernels of ReviewKD's hierarchical context loss (op contract in kdfast/ops/hcl.py, formulas in
// csrc/hcl.h and kdfast/reference/hcl.py). Each direction is one launch per run of up to kMaxStages
// stages (every ReviewKD network in one), plus a tiny per-stage sum after the forward:
//
// forward_kernel:  a warp per (stage, sample, channel) plane; its lanes stride over the plane's
//                  positions, each keeping sum d^2 and the sums of d over the stage's active bins
//                  (up to kMaxCells registers, unrolled), then butterfly sums over the lanes; lane 0
//                  writes the plane's bin means (its cells row) and its partial loss
//                  full sum d^2 + sum_k scale_k D_k^2
// finish_kernel:   a block per stage adds its planes' partials in a fixed order
// backward_kernel: the same warps; lane values v_k = 2 g scale_k D_k / area_k from the saved cells,
//                  then per position 2 g full d + sum of v_k over the bins holding it
//
// The bins holding a position are found with two bit tables per block in dynamic shared memory:
// row_bits[y] has bit k set when bin k's rows hold y, col_bits[x] likewise for the columns, so
// row_bits[y] & col_bits[x] is the position's bin mask (bins of one level overlap where l does not
// divide H). A block's planes all belong to one stage, whose tensors, sizes, strides and plan it
// reads from the launch's argument table (passed by value: no host staging, graph-capturable). The
// inputs are read in place through their strides with read-only loads; accumulation in float
// (double for a double f_s); every sum has a fixed order (deterministic, no atomics).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "../dispatch.h"
#include "../hcl.h"
#include "global_load.cuh"
#include "checked_launch.cuh"
#include "launch.cuh"
#include "reduce.cuh"

namespace kdfast {
namespace {

using namespace hcl;
using gpu::block_sum;
using gpu::kWarpSize;
using gpu::load_global;
using gpu::sum_over_lanes;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kMaxStages = 8;             // stages per launch: the argument table stays within 4 KB
constexpr int kMaxTableSide = 8192;       // H + W of a stage at most (the bit tables in shared memory)

// One stage of a launch.
template <typename student_t, typename teacher_t, typename acc_t>
struct Stage {
  const student_t* s;
  const teacher_t* t;
  student_t* grad;  // backward only
  Map ms, mt, mg;
  Plan<acc_t> plan;
  int64_t planes;       // B C
  int64_t first_row;    // row of plane (0, 0) in the cells and partials
  int64_t first_block;  // the stage's first block in the launch
};

template <typename student_t, typename teacher_t>
struct Args {
  using acc_t = acc_type<student_t>;
  Stage<student_t, teacher_t, acc_t> stages[kMaxStages];
  int count;
  int first_stage;            // the op's index of stages[0] (into losses and grad_losses)
  int64_t n_cells;            // N, the cells' row length
  acc_t* cells;               // forward: written; backward: read
  acc_t* partials;            // forward: one per plane
  const acc_t* grad_losses;   // backward
};
static_assert(sizeof(Args<double, double>) <= 4096, "the argument table must fit 4 KB of kernel parameters");

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The block's stage (blocks of a stage are consecutive).
template <typename A>
__device__ __forceinline__ int block_stage(const A& a) {
  int i = 0;
  while (i + 1 < a.count && static_cast<int64_t>(blockIdx.x) >= a.stages[i + 1].first_block) ++i;
  return i;
}

// Per-block tables of a stage in dynamic shared memory: bin_scale[k] = scale of k's level, inv_area[k],
// row_bits (H) and col_bits (W).
template <typename acc_t>
struct Tables {
  acc_t* bin_scale;
  acc_t* inv_area;
  uint32_t* row_bits;
  uint32_t* col_bits;
};

template <typename acc_t, typename StageT>
__device__ __forceinline__ Tables<acc_t> build_tables(const StageT& st, double* shared) {
  Tables<acc_t> tb{reinterpret_cast<acc_t*>(shared), reinterpret_cast<acc_t*>(shared) + kMaxCells,
                   reinterpret_cast<uint32_t*>(shared + 2 * kMaxCells), nullptr};
  tb.col_bits = tb.row_bits + st.ms.height;
  const int count = st.plan.cells(), height = st.ms.height, width = st.ms.width;
  for (int k = threadIdx.x; k < count; k += kThreads) {
    int y0, y1, x0, x1;
    st.plan.bounds(k, height, width, y0, y1, x0, x1);
    tb.bin_scale[k] = st.plan.scale[st.plan.level_of(k)];
    tb.inv_area[k] = acc_t(1) / static_cast<acc_t>((y1 - y0) * (x1 - x0));
  }
  for (int v = threadIdx.x; v < height + width; v += kThreads) {
    const bool row = v < height;
    const int pos = row ? v : v - height;
    uint32_t bits = 0;
    for (int k = 0; k < count; ++k) {
      int y0, y1, x0, x1;
      st.plan.bounds(k, height, width, y0, y1, x0, x1);
      const bool inside = row ? (pos >= y0 && pos < y1) : (pos >= x0 && pos < x1);
      bits |= static_cast<uint32_t>(inside) << k;
    }
    (row ? tb.row_bits : tb.col_bits)[pos] = bits;
  }
  return tb;
}

// The warp's plane of the block, or -1 past the stage's last plane.
template <typename StageT>
__device__ __forceinline__ int64_t warp_plane(const StageT& st) {
  const int64_t plane = (static_cast<int64_t>(blockIdx.x) - st.first_block) * kWarps + threadIdx.x / kWarpSize;
  return plane < st.planes ? plane : -1;
}

template <typename student_t, typename teacher_t>
__global__ void __launch_bounds__(kThreads) hcl_forward_kernel(const Args<student_t, teacher_t> a) {
  using acc_t = acc_type<student_t>;
  KDFAST_DYNAMIC_SHARED(double, shared);
  const auto& st = a.stages[block_stage(a)];
  const Tables<acc_t> tb = build_tables<acc_t>(st, shared);
  __syncthreads();
  const int64_t plane = warp_plane(st);
  if (plane < 0) return;  // after the only barrier: a whole warp leaves
  const int lane = threadIdx.x % kWarpSize, width = st.ms.width, count = st.plan.cells();
  const int64_t b = plane / st.ms.channels, c = plane % st.ms.channels;
  const student_t* sp = st.s + st.ms.offset(b, c, 0, 0);
  const teacher_t* tp = st.t + st.mt.offset(b, c, 0, 0);
  acc_t sq = 0, bins[kMaxCells];
#pragma unroll
  for (int k = 0; k < kMaxCells; ++k) bins[k] = 0;
  const int positions = st.ms.height * width;
  for (int p = lane; p < positions; p += kWarpSize) {
    const int y = p / width, x = p - y * width;
    const acc_t d = load_global<acc_t>(sp + y * st.ms.stride_h + x * st.ms.stride_w) -
                    load_global<acc_t>(tp + y * st.mt.stride_h + x * st.mt.stride_w);
    sq += d * d;
    if (count > 0) {  // uniform over the warp
      const uint32_t bits = tb.row_bits[y] & tb.col_bits[x];
#pragma unroll
      for (int k = 0; k < kMaxCells; ++k) bins[k] += ((bits >> k) & 1u) ? d : acc_t(0);
    }
  }
  sq = sum_over_lanes(sq, kWarpSize);
#pragma unroll
  for (int k = 0; k < kMaxCells; ++k) {
    if (k < count) bins[k] = sum_over_lanes(bins[k], kWarpSize);  // uniform over the warp
  }
  if (lane == 0) {
    const int64_t row = st.first_row + plane;
    acc_t* out = a.cells + row * a.n_cells;
    acc_t partial = st.plan.full * sq;
#pragma unroll
    for (int k = 0; k < kMaxCells; ++k) {
      if (k < count) {
        const acc_t mean = bins[k] * tb.inv_area[k];
        out[k] = mean;
        partial += tb.bin_scale[k] * mean * mean;
      } else if (k < a.n_cells) {
        out[k] = acc_t(0);
      }
    }
    a.partials[row] = partial;
  }
}

// One block per stage: its planes' partials added in a fixed order.
template <typename student_t, typename teacher_t>
__global__ void __launch_bounds__(kThreads)
    hcl_finish_kernel(const Args<student_t, teacher_t> a, acc_type<student_t>* __restrict__ losses) {
  using acc_t = acc_type<student_t>;
  const auto& st = a.stages[blockIdx.x];
  acc_t v[1] = {0};
  for (int64_t i = threadIdx.x; i < st.planes; i += kThreads) v[0] += a.partials[st.first_row + i];
  block_sum<kThreads>(v);
  if (threadIdx.x == 0) losses[a.first_stage + blockIdx.x] = v[0];
}

template <typename student_t, typename teacher_t>
__global__ void __launch_bounds__(kThreads) hcl_backward_kernel(const Args<student_t, teacher_t> a) {
  using acc_t = acc_type<student_t>;
  KDFAST_DYNAMIC_SHARED(double, shared);
  const int stage = block_stage(a);
  const auto& st = a.stages[stage];
  const Tables<acc_t> tb = build_tables<acc_t>(st, shared);
  __syncthreads();
  const int64_t plane = warp_plane(st);
  if (plane < 0) return;
  const int lane = threadIdx.x % kWarpSize, width = st.ms.width, count = st.plan.cells();
  const int64_t b = plane / st.ms.channels, c = plane % st.ms.channels;
  const acc_t k2 = acc_t(2) * a.grad_losses[a.first_stage + stage];
  const acc_t full = k2 * st.plan.full;
  const acc_t* saved = a.cells + (st.first_row + plane) * a.n_cells;
  acc_t v[kMaxCells];
#pragma unroll
  for (int k = 0; k < kMaxCells; ++k) v[k] = k < count ? k2 * tb.bin_scale[k] * saved[k] * tb.inv_area[k] : acc_t(0);
  const student_t* sp = st.s + st.ms.offset(b, c, 0, 0);
  const teacher_t* tp = st.t + st.mt.offset(b, c, 0, 0);
  student_t* gp = st.grad + st.mg.offset(b, c, 0, 0);
  const int positions = st.ms.height * width;
  for (int p = lane; p < positions; p += kWarpSize) {
    const int y = p / width, x = p - y * width;
    const acc_t d = load_global<acc_t>(sp + y * st.ms.stride_h + x * st.ms.stride_w) -
                    load_global<acc_t>(tp + y * st.mt.stride_h + x * st.mt.stride_w);
    acc_t g = full * d;
    if (count > 0) {
      const uint32_t bits = tb.row_bits[y] & tb.col_bits[x];
#pragma unroll
      for (int k = 0; k < kMaxCells; ++k) g += ((bits >> k) & 1u) ? v[k] : acc_t(0);
    }
    gp[y * st.mg.stride_h + x * st.mg.stride_w] = static_cast<student_t>(g);
  }
}

// fn(args, blocks, shared bytes) for each run of up to kMaxStages stages.
template <typename student_t, typename teacher_t, typename Fn>
void for_each_run(const Inputs& in, const std::vector<at::Tensor>* grads, Fn&& fn) {
  using acc_t = acc_type<student_t>;
  const std::vector<int64_t> first = first_rows(in);
  const int stages = static_cast<int>(in.f_s.size());
  for (int lo = 0; lo < stages; lo += kMaxStages) {
    Args<student_t, teacher_t> a{};
    a.count = std::min(kMaxStages, stages - lo);
    a.first_stage = lo;
    a.n_cells = in.cells;
    int64_t blocks = 0, side = 0;
    for (int i = 0; i < a.count; ++i) {
      const at::Tensor &s = in.f_s[lo + i], &t = in.f_t[lo + i];
      auto& st = a.stages[i];
      st.s = s.const_data_ptr<student_t>();
      st.t = t.const_data_ptr<teacher_t>();
      st.ms = map_of(s), st.mt = map_of(t);
      if (grads != nullptr) {
        st.grad = (*grads)[lo + i].mutable_data_ptr<student_t>();
        st.mg = map_of((*grads)[lo + i]);
      }
      st.plan = make_plan<acc_t>(in.levels, in.batch, s.size(1), s.size(2), s.size(3));
      st.planes = in.batch * s.size(1);
      st.first_row = first[lo + i];
      st.first_block = blocks;
      blocks += ceil_div(st.planes, kWarps);
      side = std::max(side, s.size(2) + s.size(3));
    }
    TORCH_CHECK(side <= kMaxTableSide, "hcl: H + W of a stage must be at most ", kMaxTableSide, ", got ", side);
    fn(a, blocks, 2 * kMaxCells * sizeof(double) + static_cast<size_t>(side) * sizeof(uint32_t));
  }
}

std::tuple<at::Tensor, at::Tensor> hcl_forward_cuda(const std::vector<at::Tensor>& f_s,
                                                    const std::vector<at::Tensor>& f_t, at::IntArrayRef levels) {
  const char* op = "hcl_forward";
  const Inputs in = check_inputs(op, f_s, f_t, levels);
  const c10::cuda::CUDAGuard guard(f_s[0].device());
  const auto options = f_s[0].options().dtype(in.acc);
  at::Tensor losses = at::empty({static_cast<int64_t>(f_s.size())}, options);
  at::Tensor cells = at::empty({in.rows, in.cells}, options);
  at::Tensor partials = at::empty({in.rows}, options);
  dispatch_float_pair(f_s[0].scalar_type(), f_t[0].scalar_type(), [&](auto s_tag, auto t_tag) {
    using student_t = typename decltype(s_tag)::type;
    using teacher_t = typename decltype(t_tag)::type;
    using acc_t = acc_type<student_t>;
    for_each_run<student_t, teacher_t>(in, nullptr, [&](Args<student_t, teacher_t>& a, int64_t blocks, size_t shared) {
      a.cells = cells.mutable_data_ptr<acc_t>();
      a.partials = partials.mutable_data_ptr<acc_t>();
      gpu::launch_checked(op, hcl_forward_kernel<student_t, teacher_t>, blocks, kThreads, shared, a);
      gpu::launch_checked(op, hcl_finish_kernel<student_t, teacher_t>, a.count, kThreads, 0, a,
                          losses.mutable_data_ptr<acc_t>());
    });
  });
  return {losses, cells};
}

std::vector<at::Tensor> hcl_backward_cuda(const at::Tensor& grad_losses, const std::vector<at::Tensor>& f_s,
                                          const std::vector<at::Tensor>& f_t, const at::Tensor& cells,
                                          at::IntArrayRef levels) {
  const char* op = "hcl_backward";
  const Inputs in = check_inputs(op, f_s, f_t, levels);
  const c10::cuda::CUDAGuard guard(f_s[0].device());
  const at::Tensor g = upstream_grad(op, "grad_losses", grad_losses, {static_cast<int64_t>(f_s.size())}, in.acc, f_s[0]);
  const at::Tensor saved = check_saved(op, "cells", cells, {in.rows, in.cells}, in.acc, f_s[0], "f_s[0]");
  std::vector<at::Tensor> grads;
  for (const auto& s : f_s) grads.push_back(at::empty_like(s));
  dispatch_float_pair(f_s[0].scalar_type(), f_t[0].scalar_type(), [&](auto s_tag, auto t_tag) {
    using student_t = typename decltype(s_tag)::type;
    using teacher_t = typename decltype(t_tag)::type;
    using acc_t = acc_type<student_t>;
    for_each_run<student_t, teacher_t>(in, &grads, [&](Args<student_t, teacher_t>& a, int64_t blocks, size_t shared) {
      a.cells = const_cast<acc_t*>(saved.const_data_ptr<acc_t>());
      a.grad_losses = g.const_data_ptr<acc_t>();
      gpu::launch_checked(op, hcl_backward_kernel<student_t, teacher_t>, blocks, kThreads, shared, a);
    });
  });
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) {
  m.impl("hcl_forward", &hcl_forward_cuda);
  m.impl("hcl_backward", &hcl_backward_cuda);
}

}  // namespace kdfast
