// CUDA kernels of SoKD's masked feature loss (op contract in kdfast/ops/masked_mse.py, formulas in
// kdfast/reference/masked_mse.py). With x, y read as (B, C, HW) and the mask m as (B, HW):
//
// masked_mse_forward:  loss = scale * sum_{b,c,hw} m^2 (x - y)^2, scale = 1 / denom of the reduction;
//                      one launch of tiles writing two partial sums each ([sum m^2 (x - y)^2, sum m^2]),
//                      then one block that adds them in a fixed order (deterministic, no atomics)
// masked_mse_backward: grad_x = 2 grad_loss scale m^2 (x - y) and grad_y = -grad_x, both written by
//                      one launch on the same tiles (each only when asked for)
//
// Tiling: a block of kThreads threads covers P positions of one sample and a range of its channels;
// the G = kThreads / P threads of a position take the channels c0, c0 + G, ... of the range. For
// channels-first maps (hw the fast dim) thread t takes position t % P, so a warp reads contiguous
// positions; for channels_last maps (c the fast dim) it takes position t / G, so G <= 32 adjacent
// lanes read a position's contiguous channels. Each thread reads the mask of its position once (its
// own strides: never expanded). The channels of a sample are split over several blocks only while
// the launch has fewer than kFillBlocks blocks (small late-stage maps such as 8x8), keeping at least
// kMinChannels channels per thread. Accumulation is in float (double for double inputs); y, the mask
// and the gradients are read and written through their own strides.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>

#include "../masked_mse.h"
#include "checked_launch.cuh"
#include "launch.cuh"
#include "reduce.cuh"

namespace kdfast {
namespace {

using gpu::block_sum;

constexpr int kLogThreads = 8;
constexpr int kThreads = 1 << kLogThreads;
constexpr int kLogWarp = 5;
constexpr int64_t kMinChannels = 8;     // channels per thread that a split of the channels keeps, at least
constexpr int64_t kFillBlocks = 1024;  // blocks that keep a GPU busy (an H100 holds 1056 of 256 threads)

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int log2_ceil(int64_t v) {
  int l = 0;
  while ((int64_t{1} << l) < v) ++l;
  return l;
}

// How the blocks cover one launch; block i is (sample, position tile, channel split) =
// ((i / c_splits) / hw_tiles, (i / c_splits) % hw_tiles, i % c_splits).
struct Tiling {
  Bchw dx, dy, dm;  // x, y and the (B, 1, HW) mask
  bool channels_last;
  int log_groups, log_positions;  // G = 2^log_groups threads per position, P = 2^log_positions positions
  int64_t hw_tiles, c_splits, c_per_block;

  int64_t blocks() const { return dx.batch * hw_tiles * c_splits; }
};

Tiling make_tiling(const MaskedMseInputs& in) {
  const Bchw& d = in.dx;
  Tiling t{in.dx, in.dy, in.dm, d.stride_c < d.stride_hw};  // channels_last as in the CPU kernels
  t.log_groups = t.channels_last ? std::min(log2_ceil(d.channels), kLogWarp)
                                 : kLogThreads - std::min(log2_ceil(d.hw), kLogThreads);
  t.log_positions = kLogThreads - t.log_groups;
  t.hw_tiles = ceil_div(d.hw, int64_t{1} << t.log_positions);
  const int64_t groups = int64_t{1} << t.log_groups;
  const int64_t rounds = ceil_div(d.channels, groups);  // channels per thread without a split
  int64_t splits = 1;
  while (d.batch * t.hw_tiles * splits < kFillBlocks && rounds / (2 * splits) >= kMinChannels) splits *= 2;
  t.c_per_block = groups * ceil_div(rounds, splits);
  t.c_splits = ceil_div(d.channels, t.c_per_block);
  return t;
}

// The part of a block's tile that thread threadIdx.x covers: `count` channels c0, c0 + G, ... at
// position hw of sample b; `valid` is false past the last position.
struct ThreadSpan {
  int64_t b, hw, c0, count, split;
  int lane;
  bool valid;
};

__device__ __forceinline__ ThreadSpan thread_span(const Tiling& t) {
  const int tid = threadIdx.x;
  const int64_t block = blockIdx.x;
  const int64_t split = block % t.c_splits, tile = block / t.c_splits;
  const int slot = t.channels_last ? tid >> t.log_groups : tid & ((1 << t.log_positions) - 1);
  const int lane = t.channels_last ? tid & ((1 << t.log_groups) - 1) : tid >> t.log_positions;
  const int64_t hw = ((tile % t.hw_tiles) << t.log_positions) + slot;
  const int64_t c0 = split * t.c_per_block + lane;
  const int64_t c_stop = (split + 1) * t.c_per_block;
  const int64_t c_end = c_stop < t.dx.channels ? c_stop : t.dx.channels;
  const int64_t count = c0 < c_end ? ((c_end - c0 - 1) >> t.log_groups) + 1 : 0;
  return {tile / t.hw_tiles, hw, c0, count, split, lane, hw < t.dx.hw};
}

// Offset of element (span.b, span.c0, span.hw) of a tensor of strides `d`, and between its channels
// c and c + G.
__device__ __forceinline__ int64_t span_offset(const Bchw& d, const ThreadSpan& s) {
  return s.b * d.stride_b + s.c0 * d.stride_c + s.hw * d.stride_hw;
}
__device__ __forceinline__ int64_t span_jump(const Bchw& d, const Tiling& t) { return d.stride_c << t.log_groups; }

// m[b, hw]^2 of the span's position.
template <typename mask_t, typename acc_t>
__device__ __forceinline__ acc_t mask_square(const mask_t* __restrict__ mask, const Tiling& t, const ThreadSpan& s) {
  const acc_t m = static_cast<acc_t>(mask[s.b * t.dm.stride_b + s.hw * t.dm.stride_hw]);
  return m * m;
}

template <typename scalar_t, typename mask_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    masked_mse_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y,
                              const mask_t* __restrict__ mask, acc_t* __restrict__ partials, const Tiling t) {
  const ThreadSpan s = thread_span(t);
  acc_t v[2] = {0, 0};  // m^2 sum_c (x - y)^2, m^2 (counted by one thread per position: lane 0 of split 0)
  if (s.valid) {
    const scalar_t* xp = x + span_offset(t.dx, s);
    const scalar_t* yp = y + span_offset(t.dy, s);
    const int64_t jx = span_jump(t.dx, t), jy = span_jump(t.dy, t);
    acc_t sq = 0;
#pragma unroll 4
    for (int64_t i = 0; i < s.count; ++i) {
      const acc_t d = static_cast<acc_t>(xp[i * jx]) - static_cast<acc_t>(yp[i * jy]);
      sq += d * d;
    }
    const acc_t w = mask_square<mask_t, acc_t>(mask, t, s);
    v[0] = w * sq;
    v[1] = s.lane == 0 && s.split == 0 ? w : acc_t(0);
  }
  block_sum<kThreads>(v);
  if (threadIdx.x == 0) {
    partials[2 * static_cast<int64_t>(blockIdx.x)] = v[0];
    partials[2 * static_cast<int64_t>(blockIdx.x) + 1] = v[1];
  }
}

// One block: the partial sums added in a fixed order, then loss and scale.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    masked_mse_finish_kernel(const acc_t* __restrict__ partials, int64_t n, acc_t* __restrict__ loss,
                             acc_t* __restrict__ scale, MaskedMseReduction reduction, int64_t numel, int64_t channels) {
  acc_t v[2] = {0, 0};
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    v[0] += partials[2 * i];
    v[1] += partials[2 * i + 1];
  }
  block_sum<kThreads>(v);
  if (threadIdx.x == 0) {
    const acc_t s = masked_mse_scale(reduction, v[1], numel, channels);
    *loss = v[0] * s;
    *scale = s;
  }
}

// The gradients' pointers and strides; a null pointer is not written.
template <typename scalar_t>
struct Grads {
  scalar_t* x;
  scalar_t* y;
  Bchw dx, dy;
};

// grad = w (x - y) along a span's channels (pointers stepping by their jumps), written to gx when
// kX and its negation to gy when kY: the choice is made once per thread, not per element.
template <bool kX, bool kY, typename scalar_t, typename acc_t>
__device__ __forceinline__ void span_grads(const scalar_t* x, const scalar_t* y, scalar_t* gx, scalar_t* gy,
                                           int64_t jx, int64_t jy, int64_t jgx, int64_t jgy, int64_t count,
                                           acc_t w) {
#pragma unroll 4
  for (int64_t i = 0; i < count; ++i, x += jx, y += jy) {
    const acc_t grad = w * (static_cast<acc_t>(*x) - static_cast<acc_t>(*y));
    if constexpr (kX) {
      *gx = static_cast<scalar_t>(grad);
      gx += jgx;
    }
    if constexpr (kY) {
      *gy = static_cast<scalar_t>(-grad);
      gy += jgy;
    }
  }
}

template <typename scalar_t, typename mask_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    masked_mse_backward_kernel(const acc_t* __restrict__ grad_loss, const acc_t* __restrict__ scale,
                               const scalar_t* __restrict__ x, const scalar_t* __restrict__ y,
                               const mask_t* __restrict__ mask, const Grads<scalar_t> g, const Tiling t) {
  const ThreadSpan s = thread_span(t);
  if (!s.valid) return;
  const acc_t w = acc_t(2) * *grad_loss * *scale * mask_square<mask_t, acc_t>(mask, t, s);
  const scalar_t* xp = x + span_offset(t.dx, s);
  const scalar_t* yp = y + span_offset(t.dy, s);
  const int64_t jx = span_jump(t.dx, t), jy = span_jump(t.dy, t), jgx = span_jump(g.dx, t), jgy = span_jump(g.dy, t);
  if (g.x != nullptr && g.y != nullptr) {  // uniform over the launch
    span_grads<true, true>(xp, yp, g.x + span_offset(g.dx, s), g.y + span_offset(g.dy, s), jx, jy, jgx, jgy, s.count,
                           w);
  } else if (g.x != nullptr) {
    span_grads<true, false>(xp, yp, g.x + span_offset(g.dx, s), g.y, jx, jy, jgx, jgy, s.count, w);
  } else {
    span_grads<false, true>(xp, yp, g.x, g.y + span_offset(g.dy, s), jx, jy, jgx, jgy, s.count, w);
  }
}

std::tuple<at::Tensor, at::Tensor> masked_mse_forward_cuda(const at::Tensor& x, const at::Tensor& y,
                                                           const at::Tensor& mask, c10::string_view reduction_name) {
  const char* op = "masked_mse_forward";
  const MaskedMseReduction reduction = parse_masked_mse_reduction(reduction_name);
  const MaskedMseInputs in = check_masked_mse(op, x, y, mask);
  const c10::cuda::CUDAGuard guard(x.device());
  const Tiling t = make_tiling(in);
  const auto options = x.options().dtype(in.acc);
  at::Tensor partials = at::empty({t.blocks(), 2}, options);
  at::Tensor loss = at::empty({}, options), scale = at::empty({}, options);
  dispatch_masked_mse(in, [&](auto x_tag, auto mask_tag) {
    using scalar_t = decltype(x_tag);
    using mask_t = decltype(mask_tag);
    using acc_t = acc_type<scalar_t>;
    gpu::launch_checked(op, masked_mse_forward_kernel<scalar_t, mask_t, acc_t>, t.blocks(), kThreads, 0,
                        in.x.const_data_ptr<scalar_t>(), in.y.const_data_ptr<scalar_t>(),
                        in.mask.const_data_ptr<mask_t>(), partials.mutable_data_ptr<acc_t>(), t);
    gpu::launch_checked(op, masked_mse_finish_kernel<acc_t>, 1, kThreads, 0, partials.const_data_ptr<acc_t>(),
                        t.blocks(), loss.mutable_data_ptr<acc_t>(), scale.mutable_data_ptr<acc_t>(), reduction,
                        x.numel(), x.size(1));
  });
  return {loss, scale};
}

std::tuple<at::Tensor, at::Tensor> masked_mse_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& x,
                                                            const at::Tensor& y, const at::Tensor& mask,
                                                            const at::Tensor& scale, bool x_grad, bool y_grad) {
  const char* op = "masked_mse_backward";
  const MaskedMseBackwardInputs checked = check_masked_mse_backward(grad_loss, x, y, mask, scale);
  const c10::cuda::CUDAGuard guard(x.device());
  const MaskedMseInputs& in = checked.in;
  const at::Tensor &g = checked.grad_loss, &s = checked.scale;
  at::Tensor grad_x = masked_mse_grad_buffer(in.x, x_grad), grad_y = masked_mse_grad_buffer(in.y, y_grad);
  if (!x_grad && !y_grad) return {grad_x, grad_y};
  const Tiling t = make_tiling(in);
  dispatch_masked_mse(in, [&](auto x_tag, auto mask_tag) {
    using scalar_t = decltype(x_tag);
    using mask_t = decltype(mask_tag);
    using acc_t = acc_type<scalar_t>;
    const Grads<scalar_t> grads{x_grad ? grad_x.mutable_data_ptr<scalar_t>() : nullptr,
                                y_grad ? grad_y.mutable_data_ptr<scalar_t>() : nullptr,
                                x_grad ? bchw(grad_x) : in.dx, y_grad ? bchw(grad_y) : in.dy};
    gpu::launch_checked(op, masked_mse_backward_kernel<scalar_t, mask_t, acc_t>, t.blocks(), kThreads, 0,
                        g.const_data_ptr<acc_t>(), s.const_data_ptr<acc_t>(), in.x.const_data_ptr<scalar_t>(),
                        in.y.const_data_ptr<scalar_t>(), in.mask.const_data_ptr<mask_t>(), grads, t);
  });
  return {grad_x, grad_y};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) {
  m.impl("masked_mse_forward", &masked_mse_forward_cuda);
  m.impl("masked_mse_backward", &masked_mse_backward_cuda);
}

}  // namespace kdfast
