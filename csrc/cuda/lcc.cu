// CUDA kernels of local correlation consistency (LCC, Li et al. 2020); formulas in
// kdfast/reference/lcc.py, descriptor layout in csrc/tiles.h (Regions), checks in csrc/lcc.h, tiles in csrc/cuda/tiles.cuh.
// The algorithm of csrc/cpu/lcc.cpp, in tiles of kTile x kTile (n, m) pairs, 256 threads per block:
//
// lcc_forward:  inv_norm_kernel     a block per row (one launch per network): 1 / max(||x[n]||, eps)
//               forward_kernel      each block walks a fixed share of the upper-triangle tiles (S is
//                                   symmetric; off-diagonal tiles count twice): the S_s - S_t tile of
//                                   u = x inv_norm (correlation_tile of f_s, then of f_t with sign -1,
//                                   into one accumulator), and the class sums of (S_s - S_t)^2; one
//                                   partial (3,) per block
//               sum_partials_kernel one block adds the partials in block order
// lcc_backward: with P = w(n, m) 4 (S_s - S_t) (symmetric), by stripes of row blocks [first, end):
//               weights_kernel      the upper tiles (r in the stripe, c >= r) of P, each computed
//                                   once, stored in the stripe's buffer (mirrored inside the stripe)
//               product_kernel      (tiles.cuh) a tile of 64 rows x 64 elements per block: rows in
//                                   the stripe g[n] += sum_{m >= first} P[n][m] u_s[m]; rows past it
//                                   g[n] += sum_{m in the stripe} P[m][n] u_s[m] (the symmetry)
//               project_kernel      a block per row: the normalisation's backward
//                                   inv_s[n] (g - u <u, g>), written to the map positions
//
// Besides the outputs, memory is the (blocks, 3) partials, one stripe of P at a time (at most
// kStripeElements entries, or one row block of N: N x N whole only while that fits) and g (one
// N x Ds accumulator). The maps are read in place through their strides; their dtypes
// (any of float16, bfloat16, float32, float64, f_t's may differ from f_s's) are switched on at run
// time per load, so that the kernels are instantiated only for the accumulation type (float;
// double for a double f_s); float16 and bfloat16 maps are multiplied on the tensor cores. Every
// reduction has a fixed order (no atomics): the results are deterministic on a given device, and
// the grid sizes depend only on the shapes.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "../lcc.h"
#include "tiles.cuh"

namespace kdfast {
namespace {

using namespace gpu;

constexpr int64_t kForwardBlocks = 1024;               // blocks of forward_kernel, at most
constexpr int64_t kStripeElements = int64_t(1) << 24;  // entries of a stripe of P (64 MiB in float), at most

template <typename acc_t>
struct LccArgs {
  Net<acc_t> s, t;
  int rows;    // N
  int blocks;  // row (and column) blocks of kTile: ceil(N / kTile)
};

// Element k of a per-class triple (registers: no dynamic indexing, which would put it in local memory).
template <typename acc_t>
__device__ __forceinline__ acc_t class_value(const acc_t (&v)[3], int k) {
  return k == 0 ? v[0] : (k == 1 ? v[1] : v[2]);
}

template <typename acc_t>
__device__ __forceinline__ void add_to_class(acc_t (&v)[3], int k, acc_t x) {
#pragma unroll
  for (int i = 0; i < 3; ++i) v[i] += i == k ? x : acc_t(0);
}

// inv_norm[n] of row n = blockIdx.x of one network.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) inv_norm_kernel(const Net<acc_t> net, acc_t* inv_norm) {
  const int n = blockIdx.x;
  const int64_t row = net.regions.row_offset(n);
  acc_t sum[1] = {0};
  for (int e = threadIdx.x; e < net.regions.dim; e += kThreads) {
    const acc_t v = load_as<acc_t>(net.data, net.dtype, row + net.regions.element_offset(e));
    sum[0] += v * v;
  }
  block_sum<kThreads>(sum);
  if (threadIdx.x == 0) inv_norm[n] = lcc_inv_norm(sum[0]);
}

// fn(n, m, (S_s - S_t)[n, m]) for the entries (n, m) of the tile at rows n0.., columns m0.. that lie
// in the N x N matrix (each thread its micro tile's entries). All threads of the block call it.
template <typename acc_t, typename Fn>
__device__ __forceinline__ void for_each_difference(const LccArgs<acc_t>& a, int n0, int m0, TileSmem<acc_t>& smem,
                                                    Fn&& fn) {
  using Shape = TileShape<acc_t>;
  Micro<acc_t> diff;  // S_s - S_t
  zero(diff);
  correlation_tile(a.s, a.rows, n0, m0, smem, diff);
  correlation_tile(a.t, a.rows, n0, m0, smem, diff, Product(), acc_t(-1));
#pragma unroll
  for (int i = 0; i < Shape::kMicro; ++i) {
#pragma unroll
    for (int j = 0; j < Shape::kMicro; ++j) {
      const int n = n0 + Shape::row(i), m = m0 + Shape::col(j);
      if (n < a.rows && m < a.rows) fn(n, m, diff[i][j]);
    }
  }
}

// partial[blockIdx.x] = the class sums of the upper tiles t = blockIdx.x + k gridDim.x. Bounds of 3
// blocks per SM: up to 80 registers (ptxas's own choice for sm_80 without them, 64, spills).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads, 3) forward_kernel(const LccArgs<acc_t> a, int64_t tiles, acc_t* partial) {
  using Shape = TileShape<acc_t>;
  __shared__ TileSmem<acc_t> smem;
  const int positions = a.s.regions.positions;
  acc_t sums[3] = {0, 0, 0};
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    int r, c;
    upper_tile(t, r, c);
    const acc_t weight = r == c ? acc_t(1) : acc_t(2);  // and the mirrored tile (c, r)
    for_each_difference(a, r * Shape::kTile, c * Shape::kTile, smem, [&](int n, int m, acc_t d) {
      add_to_class(sums, lcc_pair_class(n, m, positions), weight * d * d);
    });
  }
  block_sum<kThreads>(sums);
  if (threadIdx.x == 0) {
    for (int k = 0; k < 3; ++k) partial[blockIdx.x * 3 + k] = sums[k];
  }
}

// sums[k] = sum over b of partial[b][k], in block order. One block.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) sum_partials_kernel(const acc_t* partial, int count, acc_t* sums) {
  acc_t v[3] = {0, 0, 0};
  for (int b = threadIdx.x; b < count; b += kThreads) {
    for (int k = 0; k < 3; ++k) v[k] += partial[b * 3 + k];
  }
  block_sum<kThreads>(v);
  if (threadIdx.x == 0) {
    for (int k = 0; k < 3; ++k) sums[k] = v[k];
  }
}

// p[(n - base) ld + (m - base)] = 4 grad_sums[class(n, m)] (S_s - S_t)[n, m], base = first kTile,
// ld = N - base, for the upper tiles (r, c >= r) with r in the stripe's row blocks [first, end):
// block t = blockIdx.x takes the upper tile first_tile + t of the blocks counted from the last
// (r = blocks - 1 - c', c = blocks - 1 - r' for upper_tile's (r', c')), so that the stripe's tiles
// are consecutive. Tiles with c in the stripe are mirrored.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) weights_kernel(const LccArgs<acc_t> a, const acc_t* grad_sums, int first,
                                                           int end, int64_t first_tile, acc_t* p) {
  using Shape = TileShape<acc_t>;
  __shared__ TileSmem<acc_t> smem;
  const int positions = a.s.regions.positions;
  const acc_t weight[3] = {4 * grad_sums[0], 4 * grad_sums[1], 4 * grad_sums[2]};
  int r, c;
  upper_tile(first_tile + blockIdx.x, r, c);
  const int n0 = (a.blocks - 1 - c) * Shape::kTile, m0 = (a.blocks - 1 - r) * Shape::kTile;
  const bool mirror = n0 != m0 && m0 < end * Shape::kTile;
  const int base = first * Shape::kTile;
  const int64_t ld = a.rows - base;
  for_each_difference(a, n0, m0, smem, [&](int n, int m, acc_t d) {
    const acc_t v = class_value(weight, lcc_pair_class(n, m, positions)) * d;
    p[(n - base) * ld + (m - base)] = v;
    if (mirror) p[(m - base) * ld + (n - base)] = v;
  });
}

// grad[n] = inv_s[n] (g[n] - u[n] <u[n], g[n]>) (inv_s[n] g[n] where the norm was clamped), written
// to the map positions of row n = blockIdx.x.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) project_kernel(const Net<acc_t> s, const acc_t* g, void* grad,
                                                           Dtype grad_dtype, const Regions out) {
  const int n = blockIdx.x, dim = s.regions.dim;
  const acc_t inv = s.inv_norm[n];
  const int64_t row = s.regions.row_offset(n), out_row = out.row_offset(n);
  auto g_at = [&](int e) { return g[static_cast<int64_t>(n) * dim + e]; };
  auto u_at = [&](int e) { return load_as<acc_t>(s.data, s.dtype, row + s.regions.element_offset(e)) * inv; };
  acc_t dot[1] = {0};
  if (!lcc_norm_clamped(inv)) {  // uniform over the block
    for (int e = threadIdx.x; e < dim; e += kThreads) dot[0] += u_at(e) * g_at(e);
    block_sum<kThreads>(dot);
  }
  for (int e = threadIdx.x; e < dim; e += kThreads) {
    store(grad, grad_dtype, out_row + out.element_offset(e), inv * (g_at(e) - u_at(e) * dot[0]));
  }
}

template <typename acc_t>
LccArgs<acc_t> make_args(const LccMaps& in, const at::Tensor& f_s, const at::Tensor& f_t, const at::Tensor& inv_s,
                         const at::Tensor& inv_t) {
  return {net_of(f_s, in.s, inv_s.const_data_ptr<acc_t>()), net_of(f_t, in.t, inv_t.const_data_ptr<acc_t>()),
          in.rows,
          static_cast<int>(ceil_div(in.rows, TileShape<acc_t>::kTile))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lcc_forward_cuda(const at::Tensor& f_s, const at::Tensor& f_t,
                                                                int64_t grid) {
  const LccMaps in = check_lcc_maps("lcc_forward", f_s, f_t, grid);
  const c10::cuda::CUDAGuard guard(f_s.device());
  const auto options = f_s.options().dtype(in.acc);
  at::Tensor sums = at::empty({3}, options);
  at::Tensor inv_s = at::empty({in.rows}, options), inv_t = at::empty({in.rows}, options);
  AT_DISPATCH_FLOATING_TYPES(in.acc, "lcc_forward_cuda", [&] {
    using acc_t = scalar_t;
    const LccArgs<acc_t> args = make_args<acc_t>(in, f_s, f_t, inv_s, inv_t);
    launch(inv_norm_kernel<acc_t>, dim3(in.rows), args.s, inv_s.mutable_data_ptr<acc_t>());
    launch(inv_norm_kernel<acc_t>, dim3(in.rows), args.t, inv_t.mutable_data_ptr<acc_t>());
    const int64_t tiles = int64_t(args.blocks) * (args.blocks + 1) / 2;
    const int64_t blocks = std::min(tiles, kForwardBlocks);
    at::Tensor partial = at::empty({blocks, 3}, options);
    launch(forward_kernel<acc_t>, dim3(blocks), args, tiles, partial.mutable_data_ptr<acc_t>());
    launch(sum_partials_kernel<acc_t>, dim3(1), partial.const_data_ptr<acc_t>(), static_cast<int>(blocks),
           sums.mutable_data_ptr<acc_t>());
  });
  return {sums, inv_s, inv_t};
}

at::Tensor lcc_backward_cuda(const at::Tensor& grad_sums, const at::Tensor& f_s, const at::Tensor& f_t,
                             const at::Tensor& inv_norm_s, const at::Tensor& inv_norm_t, int64_t grid) {
  const LccBackwardInputs in = check_lcc_backward(grad_sums, f_s, f_t, inv_norm_s, inv_norm_t, grid);
  const c10::cuda::CUDAGuard guard(f_s.device());
  at::Tensor grad = at::empty_like(f_s);
  const LccMaps& maps = in.maps;
  AT_DISPATCH_FLOATING_TYPES(maps.acc, "lcc_backward_cuda", [&] {
    using acc_t = scalar_t;
    const LccArgs<acc_t> args = make_args<acc_t>(maps, f_s, f_t, in.inv_norm_s, in.inv_norm_t);
    constexpr int kTile = TileShape<acc_t>::kTile;
    const int blocks = args.blocks, rows = maps.rows;
    // Stripes of row blocks: the stripe of P holds at most kStripeElements entries (one row block at least).
    const int height = static_cast<int>(std::clamp<int64_t>(kStripeElements / (int64_t(kTile) * rows), 1, blocks));
    const auto acc_options = f_s.options().dtype(maps.acc);
    at::Tensor g = at::zeros({rows, maps.s.dim}, acc_options);
    at::Tensor p = at::empty({std::min<int64_t>(int64_t(height) * kTile, rows) * rows}, acc_options);
    const Net<acc_t> u_s = args.s;
    for (int first = 0; first < blocks; first += height) {
      const int end = std::min(first + height, blocks);
      // the stripe's upper tiles, counted from the last block: c' in [blocks - end, blocks - first)
      const int64_t c_lo = blocks - end, c_hi = blocks - first;
      const int64_t first_tile = c_lo * (c_lo + 1) / 2, tiles = c_hi * (c_hi + 1) / 2 - first_tile;
      launch(weights_kernel<acc_t>, dim3(tiles), args, in.grad_sums.const_data_ptr<acc_t>(), first, end, first_tile,
             p.mutable_data_ptr<acc_t>());
      const int base = first * kTile;
      launch_product<false, acc_t>({p.const_data_ptr<acc_t>(), rows - base, base, std::min(end * kTile, rows), rows},
                                   u_s, first, {g.mutable_data_ptr<acc_t>(), dtype_of_acc<acc_t>(), maps.s.dim,
                                                acc_t(1), true});
    }
    launch(project_kernel<acc_t>, dim3(rows), args.s, g.const_data_ptr<acc_t>(), grad.mutable_data_ptr(),
           dtype_of(grad), regions_like(maps.s, grad));
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) {
  m.impl("lcc_forward", &lcc_forward_cuda);
  m.impl("lcc_backward", &lcc_backward_cuda);
}

}  // namespace kdfast
