// CUDA kernels of the block-attention op (LAKD's NDAM, AFT-KD's attention and feature blocks): the
// op contract of kdfast/ops/block_attention.py, the formulas and per-sample math of
// csrc/block_attention.h (shared with csrc/cpu/block_attention.cpp). Each direction is one launch per
// run of up to kMaxModules modules (a single launch for any LAKD or AFT network): block i is the pair
// (module first + i / B, sample i % B) and reads its module's tensors (pointers, sizes, strides) from
// the launch's argument table, passed by value as a kernel parameter: no host staging buffer, so the
// launches can be captured in a CUDA graph and replayed.
//
// forward_kernel:  the channel sums sum_c |f|^p of f_s and f_t into a scratch plane, pooled into
//                  P_s, P_t (a warp per bin; written to `maps`), then the pair's map and feature
//                  partials (L, B, 2); finish_kernel (one tiny launch per run) adds them over the
//                  samples. Channel sums of a channels_last map: up to 32 lanes per position along its
//                  contiguous channels, added by shuffles; else a thread per position, and where a map
//                  has fewer positions than the block has threads, the spare threads split the channels
//                  (the partial sums added in order in shared memory).
// backward_kernel: d f_s = dm[y, x] p |f|^(p-1) sign(f) with dm = (sum over the bins holding (y, x) of
//                  dP / area) / C (a scratch plane), dP from the saved P_s, P_t; d h_s = k w (h - t), or
//                  in block mode the pooled differences (a scratch) spread back over their bins. The
//                  gradients are contiguous: a channels_last input is read along its channels and its
//                  gradient written along the positions through a 32 x 32 shared-memory tile, so that
//                  both sides are coalesced.
//
// The kernels are templates on the dtypes of f_s/h_s and of f_t (16 pairs), accumulating in float
// (double for a double f_s); the inputs are read in place through their strides with read-only global
// loads (global_load.cuh). Every sum has a fixed order (csrc/cuda/reduce.cuh; no atomics):
// deterministic, with grid sizes that depend only on the shapes.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "../block_attention.h"
#include "../dispatch.h"
#include "global_load.cuh"
#include "checked_launch.cuh"
#include "launch.cuh"
#include "reduce.cuh"

namespace kdfast {
namespace {

using namespace block_attention;
using gpu::block_map_scalars;
using gpu::block_sum;
using gpu::kWarpSize;
using gpu::load_global;
using gpu::sum_over_lanes;

constexpr int kBlockThreads = 512;  // threads per (module, sample) block: few blocks when B L is small
constexpr int kWarps = kBlockThreads / kWarpSize;
constexpr int kFinishThreads = 256;
constexpr int kTile = 32;         // side of the backward's transpose tile
constexpr int kMaxModules = 16;   // modules per launch: the argument table stays within 4 KB of parameters

KDFAST_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The smallest power of two >= n, capped at `cap` (a power of two).
KDFAST_HOST_DEVICE int pow2_at_least(int n, int cap) {
  int v = 1;
  while (v < n && v < cap) v *= 2;
  return v;
}

// One input tensor of a module, read in place.
template <typename T>
struct Tensor4 {
  const T* data;
  Map4 map;
};

// A row of the argument table: one module's tensors and its part of the scratch.
template <typename student_t, typename teacher_t>
struct Module {
  Tensor4<student_t> f_s, h_s;
  Tensor4<teacher_t> f_t;
  student_t* grad_f_s;  // backward: contiguous outputs; forward: nullptr
  student_t* grad_h_s;
  int64_t scratch;  // the module's first scratch element; sample b's starts at scratch + b * per_sample
  int scratch_per_sample;
};

// The arguments of one launch: the modules first .. first + count - 1 of the op's list.
template <typename student_t, typename teacher_t>
struct Args {
  using acc_t = acc_type<student_t>;
  Module<student_t, teacher_t> modules[kMaxModules];
  int64_t first;  // the op's index of modules[0] (into maps, partials, terms and grad_terms)
  int count;
  int64_t batch;
  int grid, feature_grid;
  acc_t p;
  bool weighting;
  acc_t* scratch;
};
static_assert(sizeof(Args<double, double>) <= 4096, "the argument table must fit 4 KB of kernel parameters");

// The block's pair: its module (in the launch and in the op) and sample.
struct Pair {
  int64_t local, module, sample;
};

// 32-bit division: count B < 2^31 blocks per launch (for_each_run).
template <typename A>
__device__ __forceinline__ Pair block_pair(const A& a) {
  const int block = static_cast<int>(blockIdx.x), batch = static_cast<int>(a.batch);
  const int local = block / batch;
  return {local, a.first + local, block - local * batch};
}

// sums[q] = sum_c |f[b, c, q]|^p for the positions q = y W + x of sample b. Channels_last (channels
// innermost): `width` lanes per position (the channels' power of two, up to 32) read its contiguous
// channels, added by shuffles. Otherwise a thread per position; where the positions fit one pass
// (P <= kBlockThreads), the G = kBlockThreads / P thread groups split the channels and their partial
// sums are added in group order through `part` (kBlockThreads elements of shared memory). All threads
// of the block call it.
template <typename acc_t, typename T>
__device__ __forceinline__ void channel_power_sums(const Tensor4<T>& f, int64_t b, acc_t p, acc_t* part, acc_t* sums) {
  const Map4& m = f.map;
  const int positions = m.positions();
  if (m.channels_inner()) {
    const int width = pow2_at_least(m.channels, kWarpSize), lane = threadIdx.x % width;
    const int slots = kBlockThreads / width;
    for (int q0 = 0; q0 < positions; q0 += slots) {  // uniform over the block: every lane reaches the shuffles
      const int q = q0 + static_cast<int>(threadIdx.x) / width;
      acc_t sum = 0;
      if (q < positions) {
        const T* x = f.data + m.offset(b, 0, q / m.width, q % m.width);
        for (int c = lane; c < m.channels; c += width) {
          sum += power_value(load_global<acc_t>(x + c * m.stride_c), p, false);
        }
      }
      sum = sum_over_lanes(sum, width);
      if (q < positions && lane == 0) sums[q] = sum;
    }
    return;
  }
  const int slots = pow2_at_least(positions, kBlockThreads), groups = kBlockThreads / slots;
  const int slot = threadIdx.x % slots, group = threadIdx.x / slots;
  for (int q = slot; q < positions; q += slots) {  // a single pass where groups > 1
    const T* x = f.data + m.offset(b, 0, q / m.width, q % m.width);
    acc_t sum = 0;
#pragma unroll 4
    for (int c = group; c < m.channels; c += groups) {
      sum += power_value(load_global<acc_t>(x + c * m.stride_c), p, false);
    }
    if (groups == 1) {
      sums[q] = sum;
    } else {
      part[threadIdx.x] = sum;
    }
  }
  if (groups == 1) return;  // uniform over the block
  __syncthreads();
  if (static_cast<int>(threadIdx.x) < positions) {
    acc_t sum = 0;
    for (int g = 0; g < groups; ++g) sum += part[g * slots + threadIdx.x];
    sums[threadIdx.x] = sum;
  }
  __syncthreads();  // `part` is written again by the next call
}

// out[k] = scale * mean over bin k = (i, j) of the (height, width) plane, a warp per bin.
template <typename acc_t>
__device__ __forceinline__ void pool_bins(const acc_t* plane, int height, int width, int grid, acc_t scale,
                                          acc_t* out) {
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

// h - t at (b, c, y, x) of a module.
template <typename acc_t, typename M>
__device__ __forceinline__ acc_t difference(const M& m, int64_t b, int c, int y, int x) {
  return load_global<acc_t>(m.h_s.data + m.h_s.map.offset(b, c, y, x)) -
         load_global<acc_t>(m.f_t.data + m.f_t.map.offset(b, c, y, x));
}

// pool_fg(h - t)[b, c, i, j]: the mean over the bin of h - t, summed by one thread.
template <typename acc_t, typename M>
__device__ __forceinline__ acc_t pooled_difference(const M& m, int64_t b, int c, int feature_grid, int i, int j) {
  const Map4& h = m.h_s.map;
  const AdaptiveBins rows = h.rows(feature_grid), cols = h.cols(feature_grid);
  acc_t sum = 0;
  for (int y = rows.start(i); y < rows.end(i); ++y) {
    for (int x = cols.start(j); x < cols.end(j); ++x) sum += difference<acc_t>(m, b, c, y, x);
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
template <typename acc_t, typename M>
__device__ __forceinline__ acc_t feature_sum(const M& m, int64_t b, int feature_grid, const TeacherWeight<acc_t>& w) {
  const Map4& h = m.h_s.map;
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
    const acc_t d = difference<acc_t>(m, b, c, y, x);
    sum += w(y, x) * (d * d);
  }
  return sum;
}

// maps (L, 2, B, grid^2): P_s, P_t; partials (L, B, 2): [feat sum, map sum] of each pair.
template <typename student_t, typename teacher_t>
__global__ void __launch_bounds__(kBlockThreads)
    forward_kernel(const Args<student_t, teacher_t> a, acc_type<student_t>* maps,
                   acc_type<student_t>* partials) {
  using acc_t = acc_type<student_t>;
  __shared__ acc_t part[kBlockThreads];
  const Pair pair = block_pair(a);
  const Module<student_t, teacher_t>& m = a.modules[pair.local];
  const int64_t b = pair.sample;
  const int grid = a.grid, bins = grid * grid;
  acc_t* ps = maps + (pair.module * 2 * a.batch + b) * bins;
  acc_t* pt = ps + a.batch * bins;
  acc_t* plane_s = a.scratch + m.scratch + b * m.scratch_per_sample;  // H_s W_s, then H W
  acc_t* plane_t = plane_s + m.f_s.map.positions();
  channel_power_sums(m.f_s, b, a.p, part, plane_s);
  channel_power_sums(m.f_t, b, a.p, part, plane_t);
  __syncthreads();
  const Map4 &fs = m.f_s.map, &ft = m.f_t.map;
  pool_bins(plane_s, fs.height, fs.width, grid, acc_t(1) / static_cast<acc_t>(fs.channels), ps);
  pool_bins(plane_t, ft.height, ft.width, grid, acc_t(1) / static_cast<acc_t>(ft.channels), pt);
  __syncthreads();

  const MapScalars<acc_t> s = block_map_scalars<kBlockThreads>(ps, pt, bins);
  acc_t sums[2] = {0, 0};  // map sum, nearest sum of the teacher weighting
  for (int k = threadIdx.x; k < bins; k += kBlockThreads) {
    const acc_t d = s.difference(ps[k], pt[k]);
    sums[0] += d * d;
    if (a.weighting) sums[1] += nearest_term(ft, grid, k, pt[k]);
  }
  block_sum<kBlockThreads>(sums);
  acc_t* pair_partials = partials + 2 * (pair.module * a.batch + b);
  if (threadIdx.x == 0) pair_partials[1] = sums[0];  // written now: not kept live over the feature sum
  const TeacherWeight<acc_t> w(ft, grid, pt, sums[1], s.inv_t, a.weighting);
  acc_t feat[1] = {feature_sum(m, b, a.feature_grid, w)};
  block_sum<kBlockThreads>(feat);
  if (threadIdx.x == 0) pair_partials[0] = feat[0];
}

// terms[l, col] = sum_b partials[l, b, col] (in order) / count (feature_count, or B grid^2) for the
// launch's modules.
template <typename student_t, typename teacher_t>
__global__ void __launch_bounds__(kFinishThreads)
    finish_kernel(const Args<student_t, teacher_t> a, const acc_type<student_t>* partials,
                  acc_type<student_t>* terms) {
  using acc_t = acc_type<student_t>;
  for (int e = blockIdx.x * kFinishThreads + threadIdx.x; e < 2 * a.count; e += gridDim.x * kFinishThreads) {
    const int local = e / 2, col = e % 2;
    const int64_t l = a.first + local;
    acc_t sum = 0;
    for (int64_t b = 0; b < a.batch; ++b) sum += partials[(l * a.batch + b) * 2 + col];
    const int64_t n = col == 0 ? feature_count(a.modules[local].h_s.map, a.batch, a.feature_grid)
                               : a.batch * a.grid * a.grid;
    terms[2 * l + col] = sum / static_cast<acc_t>(n);
  }
}

// out[c P + q] = value(c, q) for the C x P elements of a sample (out contiguous). Where the input has
// its channels innermost (channels_last), value is read along the channels and out written along the
// positions through the kTile x kTile shared tile, so that both sides are coalesced; else out is
// written in order. All threads of the block call it.
template <typename acc_t, typename out_t, typename Value>
__device__ __forceinline__ void write_sample(bool channels_inner, int channels, int positions,
                                             acc_t (*tile)[kTile + 1], Value value, out_t* out) {
  if (!channels_inner) {
    for (int e = threadIdx.x; e < channels * positions; e += kBlockThreads) {
      out[e] = static_cast<out_t>(value(e / positions, e % positions));
    }
    return;
  }
  constexpr int kRows = kBlockThreads / kTile;
  const int tx = threadIdx.x % kTile, ty = threadIdx.x / kTile;
  const int c_tiles = static_cast<int>(ceil_div(channels, kTile));
  const int tiles = c_tiles * static_cast<int>(ceil_div(positions, kTile));
  for (int t = 0; t < tiles; ++t) {
    const int c0 = t % c_tiles * kTile, q0 = t / c_tiles * kTile;
    for (int r = ty; r < kTile; r += kRows) {  // lanes along the channels
      if (c0 + tx < channels && q0 + r < positions) tile[r][tx] = value(c0 + tx, q0 + r);
    }
    __syncthreads();
    for (int r = ty; r < kTile; r += kRows) {  // lanes along the positions
      if (c0 + r < channels && q0 + tx < positions) {
        out[int64_t{c0 + r} * positions + q0 + tx] = static_cast<out_t>(tile[tx][r]);
      }
    }
    __syncthreads();
  }
}

// maps (L, 2, B, grid^2): the forward's P_s, P_t; grad_terms (L, 2).
template <typename student_t, typename teacher_t>
__global__ void __launch_bounds__(kBlockThreads)
    backward_kernel(const Args<student_t, teacher_t> a, const acc_type<student_t>* maps,
                    const acc_type<student_t>* grad_terms_all) {
  using acc_t = acc_type<student_t>;
  __shared__ acc_t tile[kTile][kTile + 1];
  const Pair pair = block_pair(a);
  const Module<student_t, teacher_t>& m = a.modules[pair.local];
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

  // dm[q] = (sum over the bins of q = (y, x) of dP / area) / C, then d f_s[c, q] = dm[q] g'(f[c, q])
  acc_t* dm = a.scratch + m.scratch + b * m.scratch_per_sample;  // H_s W_s, then C fg^2 pooled differences
  const AdaptiveBins rows = f.rows(grid), cols = f.cols(grid);
  const acc_t inv_channels = acc_t(1) / static_cast<acc_t>(f.channels);
  const int f_positions = f.positions();
  for (int q = threadIdx.x; q < f_positions; q += kBlockThreads) {
    dm[q] = sum_over_bins<acc_t>(rows, cols, q / f.width, q % f.width, [&](int i, int j) {
              const int k = i * grid + j;
              return s.map_grad(ps[k], pt[k], k_map);
            }) *
            inv_channels;
  }
  __syncthreads();
  write_sample(
      f.channels_inner(), f.channels, f_positions, tile,
      [&](int c, int q) {
        const acc_t v = load_global<acc_t>(m.f_s.data + f.offset(b, c, q / f.width, q % f.width));
        return dm[q] * power_grad(v, a.p, false);
      },
      m.grad_f_s + b * f.channels * int64_t{f_positions});

  // d h_s = k (w (h - t), or the pooled difference spread back over its bins), k = 2 grad_feat / count
  const int positions = h.positions();
  student_t* grad_h = m.grad_h_s + b * h.channels * int64_t{positions};
  const acc_t k_feat =
      acc_t(2) * grad_terms[0] / static_cast<acc_t>(feature_count(h, a.batch, a.feature_grid));
  const int fg = a.feature_grid;
  if (fg > 0) {  // uniform over the block
    const int fg_bins = fg * fg;
    acc_t* pooled = dm + f_positions;  // (C, fg^2)
    for (int e = threadIdx.x; e < h.channels * fg_bins; e += kBlockThreads) {
      int c, k;
      channel_item(h, e, fg_bins, c, k);
      pooled[c * fg_bins + k] = pooled_difference<acc_t>(m, b, c, fg, k / fg, k % fg);
    }
    __syncthreads();
    const AdaptiveBins feature_rows = h.rows(fg), feature_cols = h.cols(fg);
    write_sample(  // reads no input: in output order
        false, h.channels, positions, tile,
        [&](int c, int q) {
          const acc_t* pooled_c = pooled + c * fg_bins;
          return k_feat * sum_over_bins<acc_t>(feature_rows, feature_cols, q / h.width, q % h.width,
                                               [&](int i, int j) { return pooled_c[i * fg + j]; });
        },
        grad_h);
    return;
  }
  const TeacherWeight<acc_t> w(t, grid, pt, sums[3], s.inv_t, a.weighting);
  write_sample(
      h.channels_inner(), h.channels, positions, tile,
      [&](int c, int q) {
        const int y = q / h.width, x = q % h.width;
        return k_feat * w(y, x) * difference<acc_t>(m, b, c, y, x);
      },
      grad_h);
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

template <typename T>
Tensor4<T> tensor4(const at::Tensor& t) {
  return {t.const_data_ptr<T>(), map4(t)};
}

// The scratch of a call: each sample of module l holds per_sample[l] acc_t elements, from offset[l] on.
struct Scratch {
  std::vector<int64_t> offset;
  std::vector<int> per_sample;
  int64_t total = 0;
};

template <typename PerSample>
Scratch plan_scratch(const Inputs& in, PerSample&& per_sample) {
  Scratch plan;
  for (int64_t l = 0; l < in.modules; ++l) {
    const int64_t n = per_sample(l);
    TORCH_CHECK(n <= std::numeric_limits<int32_t>::max(), "block_attention: module ", l, " needs too much scratch");
    plan.offset.push_back(plan.total);
    plan.per_sample.push_back(static_cast<int>(n));
    plan.total += in.batch * n;
  }
  return plan;
}

// fn(args, blocks) for each run of up to kMaxModules modules: the run's argument table (gradients:
// nullptr in the forward) and its block count, one block per (module, sample) pair.
template <typename student_t, typename teacher_t, typename Fn>
void for_each_run(const Inputs& in, const Scratch& plan, at::Tensor& scratch, const std::vector<at::Tensor>& f_s,
                  const std::vector<at::Tensor>& h_s, const std::vector<at::Tensor>& f_t,
                  const std::vector<at::Tensor>* grads_f, const std::vector<at::Tensor>* grads_h, Fn&& fn) {
  using acc_t = acc_type<student_t>;
  for (int64_t first = 0; first < in.modules; first += kMaxModules) {
    Args<student_t, teacher_t> a{};
    a.first = first;
    a.count = static_cast<int>(std::min<int64_t>(kMaxModules, in.modules - first));
    a.batch = in.batch;
    a.grid = in.grid;
    a.feature_grid = in.feature_grid;
    a.p = static_cast<acc_t>(in.power);
    a.weighting = in.weighting;
    a.scratch = scratch.mutable_data_ptr<acc_t>();
    for (int i = 0; i < a.count; ++i) {
      const size_t l = static_cast<size_t>(first + i);
      a.modules[i] = {tensor4<student_t>(f_s[l]), tensor4<student_t>(h_s[l]), tensor4<teacher_t>(f_t[l]),
                      grads_f ? (*grads_f)[l].mutable_data_ptr<student_t>() : nullptr,
                      grads_h ? (*grads_h)[l].mutable_data_ptr<student_t>() : nullptr, plan.offset[l],
                      plan.per_sample[l]};
    }
    const int64_t blocks = a.count * in.batch;
    TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(),
                "block_attention: too many (module, sample) pairs for one launch (", blocks, ")");
    fn(a, blocks);
  }
}

// The kernels of block_attention::forward and ::backward (csrc/block_attention.h) on the GPU.
struct CudaDevice {
  using Guard = c10::cuda::CUDAGuard;

  template <typename student_t, typename teacher_t>
  static void forward(const Inputs& in, const std::vector<at::Tensor>& f_s, const std::vector<at::Tensor>& h_s,
                      const std::vector<at::Tensor>& f_t, const at::Tensor& terms, const at::Tensor& maps) {
    using acc_t = acc_type<student_t>;
    const char* op = "block_attention_forward";
    at::Tensor partials = at::empty({in.modules, in.batch, 2}, maps.options());
    const Scratch plan = plan_scratch(in, [&](int64_t l) {
      return f_s[l].size(2) * f_s[l].size(3) + f_t[l].size(2) * f_t[l].size(3);  // the channel sums
    });
    at::Tensor scratch = at::empty({std::max<int64_t>(plan.total, 1)}, maps.options());
    for_each_run<student_t, teacher_t>(
        in, plan, scratch, f_s, h_s, f_t, nullptr, nullptr, [&](const auto& a, int64_t blocks) {
          gpu::launch_checked(op, forward_kernel<student_t, teacher_t>, blocks, kBlockThreads, 0, a,
                              maps.mutable_data_ptr<acc_t>(), partials.mutable_data_ptr<acc_t>());
          gpu::launch_checked(op, finish_kernel<student_t, teacher_t>, 1, kFinishThreads, 0, a,
                              partials.const_data_ptr<acc_t>(), terms.mutable_data_ptr<acc_t>());
        });
  }

  template <typename student_t, typename teacher_t>
  static void backward(const BackwardInputs& checked, const std::vector<at::Tensor>& f_s,
                       const std::vector<at::Tensor>& h_s, const std::vector<at::Tensor>& f_t,
                       const std::vector<at::Tensor>& grad_f_s, const std::vector<at::Tensor>& grad_h_s) {
    using acc_t = acc_type<student_t>;
    const Inputs& in = checked.in;
    const at::Tensor &g = checked.grad_terms, &saved = checked.maps;
    const Scratch plan = plan_scratch(in, [&](int64_t l) {  // the dm plane, then the pooled differences
      const int64_t pooled = in.feature_grid > 0 ? h_s[l].size(1) * in.feature_grid * in.feature_grid : 0;
      return f_s[l].size(2) * f_s[l].size(3) + pooled;
    });
    at::Tensor scratch = at::empty({std::max<int64_t>(plan.total, 1)}, saved.options());
    for_each_run<student_t, teacher_t>(
        in, plan, scratch, f_s, h_s, f_t, &grad_f_s, &grad_h_s, [&](const auto& a, int64_t blocks) {
          gpu::launch_checked("block_attention_backward", backward_kernel<student_t, teacher_t>, blocks,
                              kBlockThreads, 0, a, saved.const_data_ptr<acc_t>(), g.const_data_ptr<acc_t>());
        });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) {
  m.impl("block_attention_forward", &block_attention::forward<CudaDevice>);
  m.impl("block_attention_backward", &block_attention::backward<CudaDevice>);
}

}  // namespace kdfast
