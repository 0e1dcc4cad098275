// CUDA kernels of local correlation consistency (LCC, Li et al. 2020); formulas in
// kdfast/reference/lcc.py, descriptor layout in csrc/common.h (Regions), tiles in csrc/cuda/tiles.cuh.
// The algorithm of csrc/cpu/lcc.cpp, in tiles of kTile x kTile (n, m) pairs, 256 threads per block:
//
// lcc_forward:  inv_norm_kernel     a block per row (one launch per network): 1 / max(||x[n]||, eps)
//               forward_kernel      each block walks a fixed share of the upper-triangle tiles (S is
//                                   symmetric; off-diagonal tiles count twice): S_s and S_t tiles of
//                                   u = x inv_norm from shared-memory chunks of kDepth elements, and
//                                   the class sums of (S_s - S_t)^2; one partial (3,) per block
//               sum_partials_kernel one block adds the partials in block order
// lcc_backward: backward_kernel     block (row block r, split s) recomputes the tiles (r, c) of the
//                                   column blocks c = s mod splits, forms w(n, m) 4 (S_s - S_t) in
//                                   shared memory and adds its product with u_s[c block] into its
//                                   own g[s] (splits x N x Ds, zeroed): no two blocks write one g
//               project_kernel      a block per row: g[n] = sum_s g[s][n], then the normalisation's
//                                   backward inv_s[n] (g - u <u, g>), written to the map positions
//
// No N x N matrix is ever stored: besides the outputs, memory is the (blocks, 3) partials and
// g (splits <= kMaxSplits copies of an N x Ds accumulator). The maps are read in place through
// their strides; their dtypes (any of float16, bfloat16, float32, float64, f_t's may differ from
// f_s's) are switched on at run time per load, so that the kernels are instantiated only for the
// accumulation type (float; double for a double f_s). Every reduction has a fixed order (no
// atomics): the results are deterministic on a given device, and the grid sizes depend only on
// the shapes.
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

#include "tiles.cuh"

namespace kdfast {
namespace {

using namespace gpu;

constexpr int64_t kForwardBlocks = 1024;   // blocks of forward_kernel, at most
constexpr int64_t kBackwardBlocks = 256;   // blocks of backward_kernel that splitting aims at
constexpr int64_t kMaxSplits = 4;          // copies of the g accumulator, at most

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

template <typename acc_t>
__global__ void __launch_bounds__(kThreads) forward_kernel(const LccArgs<acc_t> a, int64_t tiles, acc_t* partial) {
  using Shape = TileShape<acc_t>;
  __shared__ ChunkSmem<acc_t> smem;
  const int tx = threadIdx.x % kSide, ty = threadIdx.x / kSide;
  const int positions = a.s.regions.positions;
  acc_t sums[3] = {0, 0, 0};
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    int r, c;
    upper_tile(t, r, c);
    const int n0 = r * Shape::kTile, m0 = c * Shape::kTile;
    acc_t ss[Shape::kMicro][Shape::kMicro], st[Shape::kMicro][Shape::kMicro];
    correlation_tile(a.s, a.rows, n0, m0, smem, ss);
    correlation_tile(a.t, a.rows, n0, m0, smem, st);
    const acc_t weight = r == c ? acc_t(1) : acc_t(2);  // and the mirrored tile (c, r)
#pragma unroll
    for (int i = 0; i < Shape::kMicro; ++i) {
#pragma unroll
      for (int j = 0; j < Shape::kMicro; ++j) {
        const int n = n0 + ty + kSide * i, m = m0 + tx + kSide * j;
        if (n < a.rows && m < a.rows) {
          const acc_t d = ss[i][j] - st[i][j];
          add_to_class(sums, lcc_pair_class(n, m, positions), weight * d * d);
        }
      }
    }
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

// g[split][n0 + i][e] += sum over the column blocks c of this split of
// sum_j w(n, m) 4 (S_s - S_t)[n, m] u_s[m][e], n = n0 + i, m = m0 + j.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) backward_kernel(const LccArgs<acc_t> a, const acc_t* grad_sums, int splits,
                                                            acc_t* g) {
  using Shape = TileShape<acc_t>;
  constexpr int kTile = Shape::kTile, kMicro = Shape::kMicro;
  __shared__ ChunkSmem<acc_t> smem;
  __shared__ ProductSmem<acc_t> products;  // p = w 4 (S_s - S_t)[n0 + i][m0 + j]
  const int tx = threadIdx.x % kSide, ty = threadIdx.x / kSide;
  const int positions = a.s.regions.positions;
  const int n0 = blockIdx.x * kTile, split = blockIdx.y;
  const acc_t weight[3] = {4 * grad_sums[0], 4 * grad_sums[1], 4 * grad_sums[2]};
  acc_t* gs = g + static_cast<int64_t>(split) * a.rows * a.s.regions.dim;
  for (int c = split; c < a.blocks; c += splits) {
    const int m0 = c * kTile;
    acc_t ss[kMicro][kMicro], st[kMicro][kMicro];
    correlation_tile(a.s, a.rows, n0, m0, smem, ss);
    correlation_tile(a.t, a.rows, n0, m0, smem, st);
#pragma unroll
    for (int i = 0; i < kMicro; ++i) {
#pragma unroll
      for (int j = 0; j < kMicro; ++j) {
        const int n = n0 + ty + kSide * i, m = m0 + tx + kSide * j;
        const bool valid = n < a.rows && m < a.rows;
        products.p[ty + kSide * i][tx + kSide * j] =
            valid ? class_value(weight, lcc_pair_class(n, m, positions)) * (ss[i][j] - st[i][j]) : acc_t(0);
      }
    }
    add_tile_products(a.s, a.rows, n0, m0, products, gs);
  }
}

// grad[n] = inv_s[n] (g[n] - u[n] <u[n], g[n]>) (inv_s[n] g[n] where the norm was clamped), with
// g[n] = sum_s g[s][n], written to the map positions of row n = blockIdx.x.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) project_kernel(const Net<acc_t> s, const acc_t* g, int splits, int rows,
                                                           void* grad, Dtype grad_dtype, const Regions out) {
  const int n = blockIdx.x, dim = s.regions.dim;
  const acc_t inv = s.inv_norm[n];
  const int64_t row = s.regions.row_offset(n), out_row = out.row_offset(n);
  auto g_at = [&](int e) {
    acc_t v = 0;
    for (int k = 0; k < splits; ++k) v += g[(static_cast<int64_t>(k) * rows + n) * dim + e];
    return v;
  };
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
    // Column splits: enough blocks for a GPU when N is small, at most kMaxSplits accumulators.
    const int64_t splits = std::clamp<int64_t>(ceil_div(kBackwardBlocks, args.blocks), 1,
                                               std::min<int64_t>(kMaxSplits, args.blocks));
    at::Tensor g = at::zeros({splits, maps.rows, maps.s.dim}, f_s.options().dtype(maps.acc));
    launch(backward_kernel<acc_t>, dim3(args.blocks, splits), args, in.grad_sums.const_data_ptr<acc_t>(),
           static_cast<int>(splits), g.mutable_data_ptr<acc_t>());
    launch(project_kernel<acc_t>, dim3(maps.rows), args.s, g.const_data_ptr<acc_t>(), static_cast<int>(splits),
           maps.rows, grad.mutable_data_ptr(), dtype_of(grad), regions_like(maps.s, grad));
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) {
  m.impl("lcc_forward", &lcc_forward_cuda);
  m.impl("lcc_backward", &lcc_backward_cuda);
}

}  // namespace kdfast
