// CUDA kernels of the attention-transfer (AT) op family; formulas in kdfast/reference/at.py.
//
// at_maps:          m[b, hw] = scale * sum_c g(f[b, c, hw])    one coalesced pass over each feature map
// at_maps_backward: df[b, c, hw] = dm[b, hw] * scale * g'(f[b, c, hw])
// at_map_loss:      per (stage, sample): normalise both maps, the loss and d loss / d m_s
//
// Every call covers up to kMaxStages stages in one kernel launch (more stages: one launch per run
// of kMaxStages); the stages travel in a by-value argument struct and each block finds its stage
// from the prefix sum of the per-stage block counts. Accumulation is in float (double for double
// inputs); no f^p tensor is ever materialised, and every reduction has a fixed order (no atomics).
#include <ATen/Dispatch.h>
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

#include "../at.h"
#include "checked_launch.cuh"
#include "launch.cuh"
#include "reduce.cuh"

namespace kdfast {
namespace {

using gpu::block_map_scalars;
using gpu::block_sum;
using gpu::kWarpSize;
using gpu::sum_over_lanes;

constexpr int kMaxStages = 8;          // stages per launch
constexpr int kLogThreads = 9;
constexpr int kThreads = 1 << kLogThreads;  // threads per block of at_maps and at_maps_backward
constexpr int kUnroll = 8;             // loads in flight per thread along the channels (a round)
constexpr int kRounds = 4;             // rounds per thread, at most, unless C > 32 * kRounds * kUnroll
constexpr int64_t kFillBlocks = 1024;  // blocks that keep a GPU busy (an H100 holds 396 at once)
constexpr int kLossThreads = 256;      // threads per block of at_map_loss

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Resident blocks per SM that the registers of at_maps / at_maps_backward must allow: 3 x 512
// threads (<= 40 registers, 75% occupancy) with float accumulation; double may use more registers.
template <typename acc_t>
constexpr int min_blocks_per_sm() {
  return sizeof(acc_t) == sizeof(float) ? 3 : 1;
}

// ---------------------------------------------------------------------------------------------
// Tiling of one feature map (shared by at_maps and at_maps_backward)
// ---------------------------------------------------------------------------------------------

// How the blocks of one stage cover its (B, C, HW) feature map. The positions n = b * HW + hw of
// all samples are cut into tiles of P = kThreads / G consecutive positions, one tile per block;
// the G = 2^log_groups threads of a position take its channels c = g + k * G, g < G.
// * channels-first (hw is the fast dim): thread t takes position t % P and g = t / P, so a warp
//   reads rows of min(32, P) contiguous positions, one channel each;
// * channels_last (c is the fast dim): thread t takes position t / G and g = t % G, so a position
//   is read along its channels by G adjacent lanes of one warp.
struct Tiling {
  Bchw d;
  bool channels_last;
  int log_groups;  // G <= 32
};

int64_t block_count(const Bchw& d, int groups) { return ceil_div(d.batch * d.hw, kThreads / groups); }

// channels_last when c is the faster dim (as in the CPU kernels). G (at most a warp) gives each
// thread at most kRounds rounds of channels, so that its fixed costs (index math, reduction) stay
// small next to its loads; more threads share a position, down to one round each, while the stage
// has fewer than kFillBlocks blocks (small maps such as 7x7 or 8x8). A channels_last position also
// gets enough threads for 32 contiguous bytes per load instruction (or all its channels).
Tiling make_tiling(const Bchw& d, int64_t element_size) {
  const bool channels_last = d.stride_c < d.stride_hw;
  const int64_t min_groups = channels_last ? std::min<int64_t>(32 / element_size, d.channels) : 1;
  int log_groups = 0;
  for (int groups = 1; groups < kWarpSize; groups *= 2, ++log_groups) {
    const bool more = groups < min_groups || groups * kUnroll * kRounds < d.channels ||
                      (groups * kUnroll < d.channels && block_count(d, groups) < kFillBlocks);
    if (!more) break;
  }
  return {d, channels_last, log_groups};
}

// The part of a block's tile that thread threadIdx.x covers: the `count` channels c0, c0 + G, ...
// < C at position n = b * HW + hw; `valid` is false for the positions past the end of the last tile.
struct ThreadSpan {
  int64_t n, b, hw, c0, count;
  bool valid;
};

__device__ __forceinline__ ThreadSpan thread_span(const Tiling& t, int64_t block) {
  const int tid = threadIdx.x, log_positions = kLogThreads - t.log_groups;
  const int slot = t.channels_last ? tid >> t.log_groups : tid & ((1 << log_positions) - 1);  // in the tile
  const int64_t c0 = t.channels_last ? tid & ((1 << t.log_groups) - 1) : tid >> log_positions;
  const int64_t n = (block << log_positions) + slot;
  const int64_t count = c0 < t.d.channels ? ((t.d.channels - c0 - 1) >> t.log_groups) + 1 : 0;
  return {n, n / t.d.hw, n % t.d.hw, c0, count, n < t.d.batch * t.d.hw};
}

// Offset of element (span.b, span.c0, span.hw) of a tensor of strides `d`.
__device__ __forceinline__ int64_t span_offset(const Bchw& d, const ThreadSpan& span) {
  return span.b * d.stride_b + span.c0 * d.stride_c + span.hw * d.stride_hw;
}

// Offset between consecutive channels c, c + G of a span, in a tensor of strides `d`.
__device__ __forceinline__ int64_t span_jump(const Bchw& d, const Tiling& t) {
  return d.stride_c * (int64_t{1} << t.log_groups);
}

// One round of for_each_channel: fn(x[u * jump]) for u < n <= kUnroll, all loads first.
template <typename scalar_t, typename Fn>
__device__ __forceinline__ void channel_round(const scalar_t* x, int64_t jump, int n, Fn& fn) {
  scalar_t v[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    if (u < n) v[u] = x[u * jump];
  }
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    if (u < n) fn(v[u]);
  }
}

// fn(x[i * jump]) for i = 0 .. count - 1, in order, in rounds of kUnroll loads in flight.
template <typename scalar_t, typename Fn>
__device__ __forceinline__ void for_each_channel(const scalar_t* x, int64_t jump, int64_t count, Fn fn) {
  int64_t i = 0;
  for (; i + kUnroll <= count; i += kUnroll, x += kUnroll * jump) channel_round(x, jump, kUnroll, fn);
  if (i < count) channel_round(x, jump, static_cast<int>(count - i), fn);
}

// Channels-first tiling: the sum of v over the threads of each position (threadIdx.x % positions),
// added in thread order, returned to the first of them (threadIdx.x < positions; the others get
// their own v back). All threads of the block call it.
template <typename acc_t>
__device__ __forceinline__ acc_t sum_over_groups(acc_t v, int positions) {
  __shared__ acc_t partial[kThreads];
  const int tid = threadIdx.x;
  partial[tid] = v;
  __syncthreads();
  if (tid >= positions) return v;
  acc_t sum = 0;
  for (int i = tid; i < kThreads; i += positions) sum += partial[i];
  return sum;
}

// ---------------------------------------------------------------------------------------------
// at_maps and at_maps_backward kernels
// ---------------------------------------------------------------------------------------------

// Stages of one at_maps / at_maps_backward launch: block i works on the stage s with
// first_block[s] <= i < first_block[s + 1], on tile i - first_block[s] of it.
template <typename scalar_t, typename acc_t>
struct FeatStages {
  int count;
  int64_t first_block[kMaxStages + 1];
  Tiling tiling[kMaxStages];
  const scalar_t* feat[kMaxStages];
  acc_t scale[kMaxStages];  // 1/C (mode "mean") or 1 (mode "sum")
  acc_t p;
  bool odd_signed;
};

template <typename scalar_t, typename acc_t>
struct MapsArgs : FeatStages<scalar_t, acc_t> {
  acc_t* map[kMaxStages];  // (B, HW), contiguous
};

template <typename scalar_t, typename acc_t>
struct MapsBackwardArgs : FeatStages<scalar_t, acc_t> {
  const acc_t* grad_map[kMaxStages];  // (B, HW), contiguous
  scalar_t* grad[kMaxStages];
  Bchw grad_shape[kMaxStages];  // strides of grad (those of feat unless feat is not dense)
};

// A thread of a FeatStages launch: its block's stage s, the stage's tiling t, and its span.
struct StageThread {
  int s;
  Tiling t;
  ThreadSpan span;
};

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ StageThread stage_thread(const FeatStages<scalar_t, acc_t>& a) {
  int s = 0;
  while (s + 1 < a.count && blockIdx.x >= a.first_block[s + 1]) ++s;
  return {s, a.tiling[s], thread_span(a.tiling[s], blockIdx.x - a.first_block[s])};
}

// fn(f[b, c, hw]) for the channels c of the thread's span (valid), in order (for_each_channel).
template <typename scalar_t, typename acc_t, typename Fn>
__device__ __forceinline__ void for_each_feature(const FeatStages<scalar_t, acc_t>& a, const StageThread& x, Fn fn) {
  for_each_channel(a.feat[x.s] + span_offset(x.t.d, x.span), span_jump(x.t.d, x.t), x.span.count, fn);
}

// m[b, hw] = scale * sum_c g(f[b, c, hw]): each thread sums its channels, then the G threads of
// each position are summed (channels_last: shuffles in one warp; channels-first: shared memory).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, min_blocks_per_sm<acc_t>())
    at_maps_kernel(const MapsArgs<scalar_t, acc_t> a) {
  const StageThread x = stage_thread(a);
  acc_t sum = 0;
  if (x.span.valid) {
    for_each_feature(a, x, [&](scalar_t v) { sum += power_value(static_cast<acc_t>(v), a.p, a.odd_signed); });
  }
  // block-uniform branch (one stage per block)
  sum = x.t.channels_last ? sum_over_lanes(sum, 1 << x.t.log_groups)
                          : sum_over_groups(sum, kThreads >> x.t.log_groups);
  if (x.span.valid && x.span.c0 == 0) a.map[x.s][x.span.n] = sum * a.scale[x.s];
}

// df[b, c, hw] = dm[b, hw] * scale * g'(f[b, c, hw]), on the tiles of at_maps_kernel: each thread
// reads dm once and walks its channels.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, min_blocks_per_sm<acc_t>())
    at_maps_backward_kernel(const MapsBackwardArgs<scalar_t, acc_t> a) {
  const StageThread x = stage_thread(a);
  if (!x.span.valid) return;
  const Bchw o = a.grad_shape[x.s];
  const acc_t dm_scale = a.grad_map[x.s][x.span.n] * a.scale[x.s];
  scalar_t* y = a.grad[x.s] + span_offset(o, x.span);
  const int64_t y_jump = span_jump(o, x.t);
  for_each_feature(a, x, [&](scalar_t v) {  // in channel order: y walks along with the feature
    *y = static_cast<scalar_t>(dm_scale * power_grad(static_cast<acc_t>(v), a.p, a.odd_signed));
    y += y_jump;
  });
}

// ---------------------------------------------------------------------------------------------
// at_map_loss kernel
// ---------------------------------------------------------------------------------------------

// Stages of one at_map_loss launch: block i is (stage i / batch, sample i % batch).
template <typename acc_t>
struct LossArgs {
  const acc_t* maps_s[kMaxStages];  // (B, HW), contiguous
  const acc_t* maps_t[kMaxStages];
  acc_t* grads[kMaxStages];         // (B, HW), contiguous
  int64_t hw[kMaxStages];
  acc_t* losses;                    // (stages of this launch, B), contiguous
  int64_t batch;
  bool mse;
};

// With u = m / max(||m||, eps): loss = sum (u_s - u_t)^2 / (B HW) ("mse") or ||u_s - u_t|| / B ("l2")
// (sample_loss, csrc/at.h), and d loss / d m_s (MapScalars::map_grad, csrc/common.h).
template <typename acc_t>
__global__ void __launch_bounds__(kLossThreads) at_map_loss_kernel(const LossArgs<acc_t> a) {
  const int s = static_cast<int>(blockIdx.x / a.batch);
  const int64_t i = blockIdx.x;  // (stage, sample) of this launch
  const int64_t hw = a.hw[s];
  const int64_t row = (i - s * a.batch) * hw;
  const acc_t* ms = a.maps_s[s] + row;
  const acc_t* mt = a.maps_t[s] + row;
  const MapScalars<acc_t> u = block_map_scalars<kLossThreads>(ms, mt, hw);

  acc_t sq[1] = {0};
  for (int64_t j = threadIdx.x; j < hw; j += kLossThreads) {
    const acc_t diff = u.difference(ms[j], mt[j]);
    sq[0] += diff * diff;
  }
  block_sum<kLossThreads>(sq);

  const SampleLoss<acc_t> l = sample_loss(sq[0], a.mse, a.batch, hw);
  if (threadIdx.x == 0) a.losses[i] = l.loss;
  acc_t* g = a.grads[s] + row;
  for (int64_t j = threadIdx.x; j < hw; j += kLossThreads) g[j] = u.map_grad(ms[j], mt[j], l.k);
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

// fn(first, count) for each run of at most kMaxStages consecutive stages.
template <typename Fn>
void for_each_stage_run(size_t stages, Fn fn) {
  for (size_t first = 0; first < stages; first += kMaxStages) fn(first, std::min<size_t>(kMaxStages, stages - first));
}

// Fills the stage part of `a` with feats [first, first + count); returns the launch's block count.
template <typename scalar_t, typename acc_t>
int64_t plan_stages(FeatStages<scalar_t, acc_t>& a, const std::vector<at::Tensor>& feats, size_t first, size_t count,
                    const Power& power, MapMode mode) {
  a.count = static_cast<int>(count);
  a.p = static_cast<acc_t>(power.p);
  a.odd_signed = power.odd_signed;
  a.first_block[0] = 0;
  for (size_t i = 0; i < count; ++i) {
    const at::Tensor& f = feats[first + i];
    a.tiling[i] = make_tiling(bchw(f), f.element_size());
    a.feat[i] = f.const_data_ptr<scalar_t>();
    a.scale[i] = map_scale<acc_t>(mode, f.size(1));
    a.first_block[i + 1] = a.first_block[i] + block_count(a.tiling[i].d, 1 << a.tiling[i].log_groups);
  }
  return a.first_block[count];
}

std::vector<at::Tensor> at_maps_cuda(const std::vector<at::Tensor>& feats_in, double p, c10::string_view mode_name) {
  const AtFeatures in = check_at_maps(feats_in, p, mode_name);
  const c10::cuda::CUDAGuard guard(feats_in[0].device());
  const std::vector<at::Tensor>& feats = in.feats;
  std::vector<at::Tensor> maps = empty_maps(in);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats[0].scalar_type(), "at_maps_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    for_each_stage_run(feats.size(), [&](size_t first, size_t count) {
      MapsArgs<scalar_t, acc_t> args{};
      const int64_t blocks = plan_stages(args, feats, first, count, in.power, in.mode);
      for (size_t i = 0; i < count; ++i) args.map[i] = maps[first + i].mutable_data_ptr<acc_t>();
      gpu::launch_unless_empty("at_maps", at_maps_kernel<scalar_t, acc_t>, blocks, kThreads, 0, args);
    });
  });
  return maps;
}

std::vector<at::Tensor> at_maps_backward_cuda(const std::vector<at::Tensor>& grad_maps_in,
                                              const std::vector<at::Tensor>& feats_in, double p,
                                              c10::string_view mode_name) {
  const AtMapsBackwardInputs in = check_at_maps_backward(grad_maps_in, feats_in, p, mode_name);
  const std::vector<at::Tensor> &feats = in.f.feats, &grad_maps = in.grad_maps;
  std::vector<at::Tensor> grads;
  for (const auto& f : feats) grads.push_back(at::empty_like(f));
  const c10::cuda::CUDAGuard guard(feats[0].device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats[0].scalar_type(), "at_maps_backward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    for_each_stage_run(feats.size(), [&](size_t first, size_t count) {
      MapsBackwardArgs<scalar_t, acc_t> args{};
      const int64_t blocks = plan_stages(args, feats, first, count, in.f.power, in.f.mode);
      for (size_t i = 0; i < count; ++i) {
        args.grad_map[i] = grad_maps[first + i].const_data_ptr<acc_t>();
        args.grad[i] = grads[first + i].mutable_data_ptr<scalar_t>();
        args.grad_shape[i] = bchw(grads[first + i]);
      }
      gpu::launch_unless_empty("at_maps_backward", at_maps_backward_kernel<scalar_t, acc_t>, blocks, kThreads, 0, args);
    });
  });
  return grads;
}

std::tuple<at::Tensor, std::vector<at::Tensor>> at_map_loss_cuda(const std::vector<at::Tensor>& maps_s_in,
                                                                  const std::vector<at::Tensor>& maps_t_in,
                                                                  c10::string_view loss_name) {
  const AtMapLossInputs in = check_at_map_loss(maps_s_in, maps_t_in, loss_name);
  const std::vector<at::Tensor> &maps_s = in.maps_s, &maps_t = in.maps_t;
  const int64_t batch = in.batch;
  const AtMapLossOutputs out = empty_map_loss_outputs(in);
  const std::vector<at::Tensor>& grads = out.grads;
  const c10::cuda::CUDAGuard guard(in.device);
  AT_DISPATCH_FLOATING_TYPES(in.dtype, "at_map_loss_cuda", [&] {
    using acc_t = scalar_t;
    for_each_stage_run(maps_s.size(), [&](size_t first, size_t count) {
      LossArgs<acc_t> args{};
      for (size_t i = 0; i < count; ++i) {
        args.maps_s[i] = maps_s[first + i].const_data_ptr<acc_t>();
        args.maps_t[i] = maps_t[first + i].const_data_ptr<acc_t>();
        args.grads[i] = grads[first + i].mutable_data_ptr<acc_t>();
        args.hw[i] = maps_s[first + i].size(1);
      }
      args.losses = out.losses.mutable_data_ptr<acc_t>() + static_cast<int64_t>(first) * batch;
      args.batch = batch;
      args.mse = in.mse;
      gpu::launch_unless_empty("at_map_loss", at_map_loss_kernel<acc_t>, static_cast<int64_t>(count) * batch,
                               kLossThreads, 0, args);
    });
  });
  return {out.losses, out.grads};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) {
  m.impl("at_maps", &at_maps_cuda);
  m.impl("at_maps_backward", &at_maps_backward_cuda);
  m.impl("at_map_loss", &at_map_loss_cuda);
}

}  // namespace kdfast
