// CUDA kernels of the block-attention op (LAKD's NDAM, AFT-KD's attention and feature blocks): the
// op contract of kdfast/ops/block_attention.py, the formulas and per-sample math of
// csrc/block_attention.h (shared with csrc/cpu/block_attention.cpp). Each direction is ONE launch
// over all L modules: block i is the pair (module i / B, sample i % B), and finds its module's
// tensors (pointers, dtypes, sizes, strides) in a device table built once per call.
//
// forward_kernel:  the channel sums sum_c |f|^p of f_s and f_t into a scratch plane (a warp per
//                  position for channels_last maps, a thread per position otherwise), pooled into
//                  P_s, P_t (a warp per bin; written to `maps`), then the pair's map and feature
//                  partials (L, B, 2); finish_kernel (one tiny launch) adds them over the samples
// backward_kernel: d f_s = (sum over the bins holding (y, x) of dP / area) / C * p |f|^(p-1) sign(f),
//                  dP from the saved P_s, P_t; d h_s = k w (h - t), or in block mode the pooled
//                  differences (into a scratch) spread back over their bins
//
// Inputs are read in place through their strides, their dtypes (f16/bf16/f32/f64, one for f_s and
// h_s, one for f_t) switched on per load (csrc/cuda/tiles.cuh), so the kernels are instantiated
// only for the accumulation type (float; double for a double f_s). Every sum has a fixed order
// (csrc/cuda/reduce.cuh; no atomics): deterministic, with grid sizes that depend only on the shapes.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "../block_attention.h"
#include "reduce.cuh"
#include "tiles.cuh"

namespace kdfast {
namespace {

using namespace block_attention;
using gpu::block_sum;
using gpu::ceil_div;
using gpu::Dtype;
using gpu::dtype_of;
using gpu::kWarpSize;
using gpu::load_as;
using gpu::store;
using gpu::sum_over_lanes;

constexpr int kBlockThreads = 512;  // threads per (module, sample) block: few blocks when B L is small
constexpr int kWarps = kBlockThreads / kWarpSize;
constexpr int kFinishThreads = 256;

// One input tensor of a module, read in place.
struct Tensor4 {
  const void* data;
  Dtype dtype;
  Map4 map;

  template <typename acc_t>
  __device__ __forceinline__ acc_t load(int64_t offset) const {
    return load_as<acc_t>(data, dtype, offset);
  }
};

// A row of the device table: one module's tensors and its part of the scratch.
struct Module {
  Tensor4 f_s, h_s, f_t;
  void* grad_f_s;  // backward: contiguous outputs in the dtype of f_s (= that of h_s); forward: nullptr
  void* grad_h_s;
  int64_t scratch;          // the module's first scratch element; sample b's starts at scratch + b * per_sample
  int scratch_per_sample;
};

template <typename acc_t>
struct Args {
  const Module* modules;  // device table, L rows
  int64_t batch;
  int grid, feature_grid;
  acc_t p;
  bool weighting;
  acc_t* scratch;
};

// The block's pair and its module's table row (in shared memory). All threads call it.
struct Pair {
  int64_t module, sample;
};

__device__ __forceinline__ Pair load_pair(const Module* modules, int64_t batch, Module& m) {
  const Pair pair{blockIdx.x / batch, blockIdx.x % batch};
  if (threadIdx.x == 0) m = modules[pair.module];
  __syncthreads();
  return pair;
}

// sums[y W + x] = sum_c |f[b, c, y, x]|^p: a warp per position along contiguous channels
// (channels_last), else a thread per position (neighbouring threads read neighbouring positions).
template <typename acc_t>
__device__ void channel_power_sums(const Tensor4& f, int64_t b, acc_t p, acc_t* sums) {
  const Map4& m = f.map;
  const int positions = m.positions(), lane = threadIdx.x % kWarpSize;
  if (m.channels_inner()) {
    for (int q = threadIdx.x / kWarpSize; q < positions; q += kWarps) {  // uniform over the warp
      const int64_t base = m.offset(b, 0, q / m.width, q % m.width);
      acc_t sum = 0;
      for (int c = lane; c < m.channels; c += kWarpSize) sum += power_value(f.load<acc_t>(base + c * m.stride_c), p, false);
      sum = sum_over_lanes(sum, kWarpSize);
      if (lane == 0) sums[q] = sum;
    }
  } else {
    for (int q = threadIdx.x; q < positions; q += kBlockThreads) {
      const int64_t base = m.offset(b, 0, q / m.width, q % m.width);
      acc_t sum = 0;
      for (int c = 0; c < m.channels; ++c) sum += power_value(f.load<acc_t>(base + c * m.stride_c), p, false);
      sums[q] = sum;
    }
  }
}

// out[k] = scale * mean over bin k = (i, j) of the (height, width) plane, a warp per bin.
template <typename acc_t>
__device__ void pool_bins(const acc_t* plane, int height, int width, int grid, acc_t scale, acc_t* out) {
  const AdaptiveBins rows{height, grid}, cols{width, grid};
  const int lane = threadIdx.x % kWarpSize;
  for (int k = threadIdx.x / kWarpSize; k < grid * grid; k += kWarps) {  // uniform over the warp
    const int i = k / grid, j = k % grid;
    const int y0 = rows.start(i), x0 = cols.start(j), bin_width = cols.end(j) - x0;
    const int area = (rows.end(i) - y0) * bin_width;
    acc_t sum = 0;
    for (int r = lane; r < area; r += kWarpSize) sum += plane[(y0 + r / bin_width) * width + x0 + r % bin_width];
    sum = sum_over_lanes(sum, kWarpSize);
    if (lane == 0) out[k] = sum * scale / static_cast<acc_t>(area);
  }
}

// pool_fg(h - t)[b, c, i, j]: the mean over the bin of h - t, summed by one thread.
template <typename acc_t>
__device__ acc_t pooled_difference(const Module& m, int64_t b, int c, int feature_grid, int i, int j) {
  const Map4 &h = m.h_s.map, &t = m.f_t.map;
  const AdaptiveBins rows = h.rows(feature_grid), cols = h.cols(feature_grid);
  acc_t sum = 0;
  for (int y = rows.start(i); y < rows.end(i); ++y) {
    for (int x = cols.start(j); x < cols.end(j); ++x) {
      sum += m.h_s.load<acc_t>(h.offset(b, c, y, x)) - m.f_t.load<acc_t>(t.offset(b, c, y, x));
    }
  }
  return sum / static_cast<acc_t>(bin_area(rows, cols, i, j));
}

// (c, k) of item e of the C x n items (channel, bin) of a sample: c fastest where the channels are
// the fastest dim of `order`.
__device__ __forceinline__ void channel_item(const Map4& order, int e, int n, int& c, int& k) {
  if (order.channels_inner()) {
    c = e % order.channels, k = e / order.channels;
  } else {
    c = e / n, k = e % n;
  }
}

// The feature sum of pair (module, b): sum_{c,y,x} w (h - t)^2, or sum_{c,i,j} pool(h - t)^2.
template <typename acc_t>
__device__ acc_t feature_sum(const Module& m, int64_t b, int feature_grid, const TeacherWeight<acc_t>& w) {
  const Map4 &h = m.h_s.map, &t = m.f_t.map;
  acc_t sum = 0;
  if (feature_grid > 0) {
    const int bins = feature_grid * feature_grid, items = h.channels * bins;
    for (int e = threadIdx.x; e < items; e += kBlockThreads) {
      int c, k;
      channel_item(h, e, bins, c, k);
      const acc_t d = pooled_difference<acc_t>(m, b, c, feature_grid, k / feature_grid, k % feature_grid);
      sum += d * d;
    }
    return sum;
  }
  const int positions = h.positions(), items = h.channels * positions;
  for (int e = threadIdx.x; e < items; e += kBlockThreads) {
    int c, q;
    channel_item(h, e, positions, c, q);
    const int y = q / h.width, x = q % h.width;
    const acc_t d = m.h_s.load<acc_t>(h.offset(b, c, y, x)) - m.f_t.load<acc_t>(t.offset(b, c, y, x));
    sum += w(y, x) * (d * d);
  }
  return sum;
}

// maps (L, 2, B, grid^2): P_s, P_t; partials (L, B, 2): [feat sum, map sum] of each pair.
template <typename acc_t>
__global__ void __launch_bounds__(kBlockThreads) forward_kernel(const Args<acc_t> a, acc_t* maps, acc_t* partials) {
  __shared__ Module m;
  const Pair pair = load_pair(a.modules, a.batch, m);
  const int64_t b = pair.sample;
  const int grid = a.grid, bins = grid * grid;
  acc_t* ps = maps + (pair.module * 2 * a.batch + b) * bins;
  acc_t* pt = ps + a.batch * bins;
  acc_t* plane_s = a.scratch + m.scratch + b * m.scratch_per_sample;  // H_s W_s, then H W
  acc_t* plane_t = plane_s + m.f_s.map.positions();
  channel_power_sums(m.f_s, b, a.p, plane_s);
  channel_power_sums(m.f_t, b, a.p, plane_t);
  __syncthreads();
  const Map4 &fs = m.f_s.map, &ft = m.f_t.map;
  pool_bins(plane_s, fs.height, fs.width, grid, acc_t(1) / static_cast<acc_t>(fs.channels), ps);
  pool_bins(plane_t, ft.height, ft.width, grid, acc_t(1) / static_cast<acc_t>(ft.channels), pt);
  __syncthreads();

  acc_t dots[3] = {0, 0, 0};  // ss, tt, st
  for (int k = threadIdx.x; k < bins; k += kBlockThreads) {
    dots[0] += ps[k] * ps[k];
    dots[1] += pt[k] * pt[k];
    dots[2] += ps[k] * pt[k];
  }
  block_sum<kBlockThreads>(dots);
  const MapScalars<acc_t> s(dots[0], dots[1], dots[2]);
  acc_t sums[2] = {0, 0};  // map sum, nearest sum of the teacher weighting
  for (int k = threadIdx.x; k < bins; k += kBlockThreads) {
    const acc_t d = ps[k] * s.inv_s - pt[k] * s.inv_t;
    sums[0] += d * d;
    if (a.weighting) sums[1] += nearest_term(ft, grid, k, pt[k]);
  }
  block_sum<kBlockThreads>(sums);
  const TeacherWeight<acc_t> w(ft, grid, pt, sums[1], s.inv_t, a.weighting);
  acc_t feat[1] = {feature_sum(m, b, a.feature_grid, w)};
  block_sum<kBlockThreads>(feat);
  if (threadIdx.x == 0) {
    partials[2 * blockIdx.x] = feat[0];
    partials[2 * blockIdx.x + 1] = sums[0];
  }
}

// terms[l, col] = sum_b partials[l, b, col] (in order) / count: feature_count, or B grid^2.
template <typename acc_t>
__global__ void __launch_bounds__(kFinishThreads)
    finish_kernel(const Module* modules, const acc_t* partials, int64_t count, int64_t batch, int grid,
                  int feature_grid, acc_t* terms) {
  for (int64_t e = blockIdx.x * int64_t{kFinishThreads} + threadIdx.x; e < 2 * count;
       e += int64_t{gridDim.x} * kFinishThreads) {
    const int64_t l = e / 2, col = e % 2;
    acc_t sum = 0;
    for (int64_t b = 0; b < batch; ++b) sum += partials[(l * batch + b) * 2 + col];
    const int64_t n = col == 0 ? feature_count(modules[l].h_s.map, batch, feature_grid) : batch * grid * grid;
    terms[e] = sum / static_cast<acc_t>(n);
  }
}

// maps (L, 2, B, grid^2): the forward's P_s, P_t; grad_terms (L, 2).
template <typename acc_t>
__global__ void __launch_bounds__(kBlockThreads)
    backward_kernel(const Args<acc_t> a, const acc_t* maps, const acc_t* grad_terms_all) {
  __shared__ Module m;
  const Pair pair = load_pair(a.modules, a.batch, m);
  const int64_t b = pair.sample;
  const int grid = a.grid, bins = grid * grid;
  const acc_t* ps = maps + (pair.module * 2 * a.batch + b) * bins;
  const acc_t* pt = ps + a.batch * bins;
  const Map4 &f = m.f_s.map, &h = m.h_s.map, &t = m.f_t.map;

  acc_t sums[4] = {0, 0, 0, 0};  // ss, tt, st, nearest sum of the teacher weighting
  for (int k = threadIdx.x; k < bins; k += kBlockThreads) {
    sums[0] += ps[k] * ps[k];
    sums[1] += pt[k] * pt[k];
    sums[2] += ps[k] * pt[k];
    if (a.weighting) sums[3] += nearest_term(t, grid, k, pt[k]);
  }
  block_sum<kBlockThreads>(sums);
  const MapScalars<acc_t> s(sums[0], sums[1], sums[2]);
  const acc_t* grad_terms = grad_terms_all + 2 * pair.module;
  const acc_t k_map = acc_t(2) * grad_terms[1] / static_cast<acc_t>(a.batch * bins);

  // d f_s[c, y, x] = dm[y, x] g'(f), dm = (sum over the bins of (y, x) of dP / area) / C
  const AdaptiveBins rows = f.rows(grid), cols = f.cols(grid);
  const acc_t inv_channels = acc_t(1) / static_cast<acc_t>(f.channels);
  const int f_positions = f.positions();
  auto dm = [&](int y, int x) {
    return sum_over_bins<acc_t>(rows, cols, y, x, [&](int i, int j) {
             const int k = i * grid + j;
             return s.map_grad(ps[k], pt[k], k_map);
           }) *
           inv_channels;
  };
  const int64_t f_out = b * f.channels * int64_t{f_positions};
  auto grad_f = [&](int c, int q, int y, int x, acc_t dm_q) {
    const acc_t v = m.f_s.load<acc_t>(f.offset(b, c, y, x));
    store(m.grad_f_s, m.f_s.dtype, f_out + c * int64_t{f_positions} + q, dm_q * power_grad(v, a.p, false));
  };
  if (f.channels_inner()) {  // a warp per position along its channels
    const int lane = threadIdx.x % kWarpSize;
    for (int q = threadIdx.x / kWarpSize; q < f_positions; q += kWarps) {
      const int y = q / f.width, x = q % f.width;
      const acc_t dm_q = dm(y, x);
      for (int c = lane; c < f.channels; c += kWarpSize) grad_f(c, q, y, x, dm_q);
    }
  } else {
    for (int q = threadIdx.x; q < f_positions; q += kBlockThreads) {
      const int y = q / f.width, x = q % f.width;
      const acc_t dm_q = dm(y, x);
      for (int c = 0; c < f.channels; ++c) grad_f(c, q, y, x, dm_q);
    }
  }

  // d h_s = k (w (h - t), or the pooled difference spread back over its bins), k = 2 grad_feat / count;
  // written in the (contiguous) output's order
  const int positions = h.positions(), items = h.channels * positions;
  const int64_t h_out = b * int64_t{items};
  const acc_t k_feat =
      acc_t(2) * grad_terms[0] / static_cast<acc_t>(feature_count(h, a.batch, a.feature_grid));
  const int fg = a.feature_grid;
  if (fg > 0) {  // uniform over the block
    const int fg_bins = fg * fg;
    acc_t* pooled = a.scratch + m.scratch + b * m.scratch_per_sample;  // (C, fg^2)
    for (int e = threadIdx.x; e < h.channels * fg_bins; e += kBlockThreads) {
      const int c = e / fg_bins, k = e % fg_bins;
      pooled[e] = pooled_difference<acc_t>(m, b, c, fg, k / fg, k % fg);
    }
    __syncthreads();
    const AdaptiveBins feature_rows = h.rows(fg), feature_cols = h.cols(fg);
    for (int e = threadIdx.x; e < items; e += kBlockThreads) {
      const int c = e / positions, q = e % positions;
      const acc_t* pooled_c = pooled + c * fg_bins;
      const acc_t spread = sum_over_bins<acc_t>(feature_rows, feature_cols, q / h.width, q % h.width,
                                                [&](int i, int j) { return pooled_c[i * fg + j]; });
      store(m.grad_h_s, m.h_s.dtype, h_out + e, k_feat * spread);
    }
    return;
  }
  const TeacherWeight<acc_t> w(t, grid, pt, sums[3], s.inv_t, a.weighting);
  for (int e = threadIdx.x; e < items; e += kBlockThreads) {
    const int c = e / positions, q = e % positions, y = q / h.width, x = q % h.width;
    const acc_t d = m.h_s.load<acc_t>(h.offset(b, c, y, x)) - m.f_t.load<acc_t>(t.offset(b, c, y, x));
    store(m.grad_h_s, m.h_s.dtype, h_out + e, k_feat * w(y, x) * d);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

Tensor4 tensor4(const at::Tensor& t) { return {t.const_data_ptr(), dtype_of(t), map4(t)}; }

// The device table of a call (rows in pinned host memory, copied asynchronously on the current
// stream) and the scratch size it plans: `per_sample(l)` acc_t elements per sample of module l.
struct Table {
  at::Tensor rows;  // bytes on the device
  int64_t scratch = 0;
};

template <typename PerSample>
Table make_table(const Inputs& in, const std::vector<at::Tensor>& f_s, const std::vector<at::Tensor>& h_s,
                 const std::vector<at::Tensor>& f_t, const std::vector<at::Tensor>* grads_f,
                 const std::vector<at::Tensor>* grads_h, PerSample&& per_sample) {
  std::vector<Module> modules;
  Table table;
  for (size_t l = 0; l < f_s.size(); ++l) {
    const int64_t n = per_sample(l);
    TORCH_CHECK(n <= std::numeric_limits<int32_t>::max(), "block_attention: module ", l, " needs too much scratch");
    modules.push_back({tensor4(f_s[l]), tensor4(h_s[l]), tensor4(f_t[l]),
                       grads_f ? (*grads_f)[l].mutable_data_ptr() : nullptr,
                       grads_h ? (*grads_h)[l].mutable_data_ptr() : nullptr, table.scratch, static_cast<int>(n)});
    table.scratch += in.batch * n;
  }
  const int64_t bytes = static_cast<int64_t>(modules.size() * sizeof(Module));
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.mutable_data_ptr(), modules.data(), bytes);
  table.rows = host.to(at::TensorOptions().device(f_s[0].device()), /*non_blocking=*/true);
  return table;
}

// One block per (module, sample) pair.
int64_t pair_blocks(const Inputs& in) {
  const int64_t blocks = in.modules * in.batch;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "block_attention: too many (module, sample) pairs (",
              blocks, ")");
  return blocks;
}

template <typename acc_t>
Args<acc_t> make_args(const Inputs& in, const Table& table, at::Tensor& scratch) {
  Args<acc_t> a{};
  a.modules = static_cast<const Module*>(table.rows.const_data_ptr());
  a.batch = in.batch;
  a.grid = in.grid;
  a.feature_grid = in.feature_grid;
  a.p = static_cast<acc_t>(in.power);
  a.weighting = in.weighting;
  a.scratch = scratch.mutable_data_ptr<acc_t>();
  return a;
}

template <typename Kernel, typename... Params>
void launch(Kernel kernel, int64_t blocks, int threads, const Params&... params) {
  kernel<<<static_cast<unsigned int>(blocks), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(params...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> block_attention_forward_cuda(const std::vector<at::Tensor>& f_s,
                                                                const std::vector<at::Tensor>& h_s,
                                                                const std::vector<at::Tensor>& f_t, int64_t grid,
                                                                double power, int64_t feature_grid,
                                                                bool teacher_weighting) {
  const Inputs in =
      check_inputs("block_attention_forward", f_s, h_s, f_t, grid, power, feature_grid, teacher_weighting);
  const c10::cuda::CUDAGuard guard(f_s[0].device());
  const auto options = f_s[0].options().dtype(in.acc);
  at::Tensor terms = at::empty({in.modules, 2}, options);
  at::Tensor maps = at::empty({in.modules, 2, in.batch, int64_t{in.grid} * in.grid}, options);
  at::Tensor partials = at::empty({in.modules, in.batch, 2}, options);
  const Table table = make_table(in, f_s, h_s, f_t, nullptr, nullptr, [&](size_t l) {
    return int64_t{f_s[l].size(2)} * f_s[l].size(3) + f_t[l].size(2) * f_t[l].size(3);  // the channel sums
  });
  at::Tensor scratch = at::empty({std::max<int64_t>(table.scratch, 1)}, options);
  const int64_t blocks = pair_blocks(in);
  AT_DISPATCH_FLOATING_TYPES(in.acc, "block_attention_forward_cuda", [&] {
    using acc_t = scalar_t;
    const Args<acc_t> a = make_args<acc_t>(in, table, scratch);
    launch(forward_kernel<acc_t>, blocks, kBlockThreads, a, maps.mutable_data_ptr<acc_t>(),
           partials.mutable_data_ptr<acc_t>());
    launch(finish_kernel<acc_t>, ceil_div(2 * in.modules, kFinishThreads), kFinishThreads, a.modules,
           partials.const_data_ptr<acc_t>(), in.modules, in.batch, in.grid, in.feature_grid,
           terms.mutable_data_ptr<acc_t>());
  });
  return {terms, maps};
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> block_attention_backward_cuda(
    const at::Tensor& grad_terms, const std::vector<at::Tensor>& f_s, const std::vector<at::Tensor>& h_s,
    const std::vector<at::Tensor>& f_t, const at::Tensor& maps, int64_t grid, double power, int64_t feature_grid,
    bool teacher_weighting) {
  const char* op = "block_attention_backward";
  const Inputs in = check_inputs(op, f_s, h_s, f_t, grid, power, feature_grid, teacher_weighting);
  const c10::cuda::CUDAGuard guard(f_s[0].device());
  const at::Tensor g = upstream_grad(op, "grad_terms", grad_terms, {in.modules, 2}, in.acc, f_s[0]);
  const at::Tensor saved =
      check_saved(op, "maps", maps, {in.modules, 2, in.batch, int64_t{in.grid} * in.grid}, in.acc, f_s[0], "f_s[0]");
  std::vector<at::Tensor> grad_f_s, grad_h_s;
  for (size_t l = 0; l < f_s.size(); ++l) {
    grad_f_s.push_back(at::empty(f_s[l].sizes(), f_s[l].options()));
    grad_h_s.push_back(at::empty(h_s[l].sizes(), h_s[l].options()));
  }
  const Table table = make_table(in, f_s, h_s, f_t, &grad_f_s, &grad_h_s, [&](size_t l) {
    return in.feature_grid > 0 ? h_s[l].size(1) * in.feature_grid * in.feature_grid : int64_t{0};  // pooled diffs
  });
  at::Tensor scratch = at::empty({std::max<int64_t>(table.scratch, 1)}, saved.options());
  const int64_t blocks = pair_blocks(in);
  AT_DISPATCH_FLOATING_TYPES(in.acc, "block_attention_backward_cuda", [&] {
    using acc_t = scalar_t;
    launch(backward_kernel<acc_t>, blocks, kBlockThreads, make_args<acc_t>(in, table, scratch),
           saved.const_data_ptr<acc_t>(), g.const_data_ptr<acc_t>());
  });
  return {grad_f_s, grad_h_s};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) {
  m.impl("block_attention_forward", &block_attention_forward_cuda);
  m.impl("block_attention_backward", &block_attention_backward_cuda);
}

}  // namespace kdfast
