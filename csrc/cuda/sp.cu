// CUDA kernels of the similarity-preserving loss (SP, Tung & Mori 2019): the op contract of
// kdfast/ops/sp.py with the algorithm of kernels/sp.py and csrc/cpu/sp.cpp, in tiles of
// kTile x kTile (i, j) pairs of S = X X^T (csrc/cuda/tiles.cuh), 256 threads per block. A block
// (row block r, split s) visits the column blocks c = s mod splits:
//
// sp_forward:  norms_kernel      the S_s and S_t tiles (r, c): per row i, partial sums of S_ij^2
//              loss_kernel       the same tiles again, with the rows' inv from the norm partials:
//                                partial sums of (G_s - G_t)_ij^2 and G_s_ij (G_s - G_t)_ij
//              finish_kernel     one block: stats [inv_s, inv_t, proj] per row and loss = sum of
//                                the loss rows / B^2
// sp_backward: backward_kernel   the recomputed tiles give M_ij = (a_i + a_j) S_s_ij - (b_i + b_j) S_t_ij
//                                in shared memory; g[s][rows of r] += M X_s[rows of c]
//              sum_splits_kernel dX_s = sum_s g[s], in x_s's dtype
//
// No B x B matrix is ever stored: besides the outputs, memory is the (splits, B, 2) partials and
// in the backward g (splits <= kMaxBackwardSplits copies of a B x Ds accumulator). X_s and X_t are
// read in place through their strides, in their own dtypes. Every reduction has a fixed order (no
// atomics): the results are deterministic on a given device, and the grid sizes depend only on
// the shapes.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
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

constexpr int kStats = 3;                       // stats columns: inv_s, inv_t, proj
constexpr int64_t kTargetBlocks = 264;          // blocks that splitting the columns aims at (2 per H100 SM)
constexpr int64_t kMaxForwardSplits = 16;       // column splits of the forward, at most
constexpr int64_t kMaxBackwardSplits = 4;       // copies of the g accumulator, at most
constexpr int64_t kSumBlocks = 4096;            // blocks of sum_splits_kernel, at most

template <typename acc_t>
struct SpArgs {
  Net<acc_t> s, t;
  int rows;    // B
  int blocks;  // row (and column) blocks of kTile: ceil(B / kTile)
};

template <typename acc_t>
using Micro = acc_t[TileShape<acc_t>::kMicro][TileShape<acc_t>::kMicro];

// v summed over the kSide threads of a tile row (the lanes of a half-warp), in a fixed order.
template <typename acc_t>
__device__ __forceinline__ acc_t tile_row_sum(acc_t v) {
#pragma unroll
  for (int offset = kSide / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// parts[split][n][0..1] = the tile-row sums of v0[i], v1[i] for the thread's rows n = n0 + ty + kSide i.
template <typename acc_t>
__device__ void store_row_sums(const acc_t (&v0)[TileShape<acc_t>::kMicro], const acc_t (&v1)[TileShape<acc_t>::kMicro],
                               int rows, int n0, int split, acc_t* parts) {
  const int tx = threadIdx.x % kSide, ty = threadIdx.x / kSide;
#pragma unroll
  for (int i = 0; i < TileShape<acc_t>::kMicro; ++i) {
    const acc_t a = tile_row_sum(v0[i]), b = tile_row_sum(v1[i]);
    const int n = n0 + ty + kSide * i;
    if (tx == 0 && n < rows) {
      parts[(static_cast<int64_t>(split) * rows + n) * 2] = a;
      parts[(static_cast<int64_t>(split) * rows + n) * 2 + 1] = b;
    }
  }
}

// sum_s parts[s][n][k], s in order.
template <typename acc_t>
__device__ __forceinline__ acc_t split_sum(const acc_t* parts, int splits, int rows, int n, int k) {
  acc_t v = 0;
  for (int s = 0; s < splits; ++s) v += parts[(static_cast<int64_t>(s) * rows + n) * 2 + k];
  return v;
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads) norms_kernel(const SpArgs<acc_t> a, int splits, acc_t* norms) {
  constexpr int kTile = TileShape<acc_t>::kTile, kMicro = TileShape<acc_t>::kMicro;
  __shared__ ChunkSmem<acc_t> smem;
  const int n0 = blockIdx.x * kTile, split = blockIdx.y;
  acc_t ss[kMicro] = {}, tt[kMicro] = {};
  for (int c = split; c < a.blocks; c += splits) {
    Micro<acc_t> s, t;
    correlation_tile(a.s, a.rows, n0, c * kTile, smem, s);
    correlation_tile(a.t, a.rows, n0, c * kTile, smem, t);
#pragma unroll
    for (int i = 0; i < kMicro; ++i) {
#pragma unroll
      for (int j = 0; j < kMicro; ++j) {  // columns past B are 0
        ss[i] += s[i][j] * s[i][j];
        tt[i] += t[i][j] * t[i][j];
      }
    }
  }
  store_row_sums(ss, tt, a.rows, n0, split, norms);
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads) loss_kernel(const SpArgs<acc_t> a, int splits, const acc_t* norms,
                                                        acc_t* parts) {
  constexpr int kTile = TileShape<acc_t>::kTile, kMicro = TileShape<acc_t>::kMicro;
  __shared__ ChunkSmem<acc_t> smem;
  const int ty = threadIdx.x / kSide;
  const int n0 = blockIdx.x * kTile, split = blockIdx.y;
  acc_t inv_s[kMicro], inv_t[kMicro];
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    const int n = n0 + ty + kSide * i;
    inv_s[i] = n < a.rows ? inv_clamped(std::sqrt(split_sum(norms, splits, a.rows, n, 0))) : acc_t(0);
    inv_t[i] = n < a.rows ? inv_clamped(std::sqrt(split_sum(norms, splits, a.rows, n, 1))) : acc_t(0);
  }
  acc_t loss[kMicro] = {}, proj[kMicro] = {};
  for (int c = split; c < a.blocks; c += splits) {
    Micro<acc_t> s, t;
    correlation_tile(a.s, a.rows, n0, c * kTile, smem, s);
    correlation_tile(a.t, a.rows, n0, c * kTile, smem, t);
#pragma unroll
    for (int i = 0; i < kMicro; ++i) {
#pragma unroll
      for (int j = 0; j < kMicro; ++j) {  // 0 on the columns past B
        const acc_t g_s = s[i][j] * inv_s[i];
        const acc_t diff = g_s - t[i][j] * inv_t[i];
        loss[i] += diff * diff;
        proj[i] += g_s * diff;
      }
    }
  }
  store_row_sums(loss, proj, a.rows, n0, split, parts);
}

// stats[n] and loss = sum_n loss_n / B^2. One block.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) finish_kernel(const acc_t* norms, const acc_t* parts, int splits, int rows,
                                                          acc_t* stats, acc_t* loss) {
  acc_t total[1] = {0};
  for (int n = threadIdx.x; n < rows; n += kThreads) {
    sp_stats_row(split_sum(norms, splits, rows, n, 0), split_sum(norms, splits, rows, n, 1),
                 split_sum(parts, splits, rows, n, 1), stats + static_cast<int64_t>(n) * kStats);
    total[0] += split_sum(parts, splits, rows, n, 0);
  }
  block_sum<kThreads>(total);
  if (threadIdx.x == 0) *loss = total[0] / static_cast<acc_t>(static_cast<int64_t>(rows) * rows);
}

// g[split][n0 + i] += sum over the column blocks c of this split of sum_j M[n0 + i][m0 + j] X_s[m0 + j].
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) backward_kernel(const SpArgs<acc_t> a, int splits, const acc_t* stats,
                                                            const acc_t* grad_loss, acc_t* g) {
  constexpr int kTile = TileShape<acc_t>::kTile, kMicro = TileShape<acc_t>::kMicro;
  __shared__ ChunkSmem<acc_t> smem;
  __shared__ ProductSmem<acc_t> products;  // p = M[n0 + i][m0 + j]
  const int tx = threadIdx.x % kSide, ty = threadIdx.x / kSide;
  const int n0 = blockIdx.x * kTile, split = blockIdx.y;
  const acc_t size = static_cast<acc_t>(a.rows);
  const acc_t k = acc_t(2) * grad_loss[0] / (size * size);
  acc_t alpha[kMicro], beta[kMicro];  // of the thread's rows
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    const int n = n0 + ty + kSide * i;
    alpha[i] = beta[i] = 0;
    if (n < a.rows) sp_coefficients(stats + static_cast<int64_t>(n) * kStats, k, alpha[i], beta[i]);
  }
  acc_t* gs = g + static_cast<int64_t>(split) * a.rows * a.s.regions.dim;
  for (int c = split; c < a.blocks; c += splits) {
    const int m0 = c * kTile;
    Micro<acc_t> s, t;
    correlation_tile(a.s, a.rows, n0, m0, smem, s);
    correlation_tile(a.t, a.rows, n0, m0, smem, t);
#pragma unroll
    for (int j = 0; j < kMicro; ++j) {
      const int m = m0 + tx + kSide * j;
      acc_t alpha_m = 0, beta_m = 0;
      if (m < a.rows) sp_coefficients(stats + static_cast<int64_t>(m) * kStats, k, alpha_m, beta_m);
#pragma unroll
      for (int i = 0; i < kMicro; ++i) {
        const bool valid = n0 + ty + kSide * i < a.rows && m < a.rows;
        products.p[ty + kSide * i][tx + kSide * j] =
            valid ? (alpha[i] + alpha_m) * s[i][j] - (beta[i] + beta_m) * t[i][j] : acc_t(0);
      }
    }
    add_tile_products(a.s, a.rows, n0, m0, products, gs);
  }
}

// out[i] = sum_k parts[k][i], k < splits, in that order, written in `out_dtype`: the partial
// accumulators of column splits, added.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) sum_splits_kernel(const acc_t* parts, int splits, int64_t size, void* out,
                                                              Dtype out_dtype) {
  for (int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x; i < size; i += int64_t(gridDim.x) * kThreads) {
    acc_t v = 0;
    for (int k = 0; k < splits; ++k) v += parts[k * size + i];
    store(out, out_dtype, i, v);
  }
}

template <typename acc_t>
SpArgs<acc_t> make_args(const RowPair& in, const at::Tensor& x_s, const at::Tensor& x_t) {
  return {net_of<acc_t>(x_s, in.s, nullptr), net_of<acc_t>(x_t, in.t, nullptr), in.rows,
          static_cast<int>(ceil_div(in.rows, TileShape<acc_t>::kTile))};
}

// Column splits: enough blocks for a GPU when B is small, at most `most`.
int64_t column_splits(int blocks, int64_t most) {
  return std::clamp<int64_t>(ceil_div(kTargetBlocks, blocks), 1, std::min<int64_t>(most, blocks));
}

std::tuple<at::Tensor, at::Tensor> sp_forward_cuda(const at::Tensor& x_s, const at::Tensor& x_t) {
  const RowPair in = check_row_pair("sp_forward", x_s, x_t, "x_s", "x_t");
  const c10::cuda::CUDAGuard guard(x_s.device());
  const auto options = x_s.options().dtype(in.acc);
  at::Tensor loss = at::empty({}, options), stats = at::empty({in.rows, kStats}, options);
  AT_DISPATCH_FLOATING_TYPES(in.acc, "sp_forward_cuda", [&] {
    using acc_t = scalar_t;
    const SpArgs<acc_t> args = make_args<acc_t>(in, x_s, x_t);
    const int64_t splits = column_splits(args.blocks, kMaxForwardSplits);
    at::Tensor norms = at::empty({splits, in.rows, 2}, options), parts = at::empty({splits, in.rows, 2}, options);
    const dim3 grid(args.blocks, splits);
    launch(norms_kernel<acc_t>, grid, args, static_cast<int>(splits), norms.mutable_data_ptr<acc_t>());
    launch(loss_kernel<acc_t>, grid, args, static_cast<int>(splits), norms.const_data_ptr<acc_t>(),
           parts.mutable_data_ptr<acc_t>());
    launch(finish_kernel<acc_t>, dim3(1), norms.const_data_ptr<acc_t>(), parts.const_data_ptr<acc_t>(),
           static_cast<int>(splits), in.rows, stats.mutable_data_ptr<acc_t>(), loss.mutable_data_ptr<acc_t>());
  });
  return {loss, stats};
}

at::Tensor sp_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& x_s, const at::Tensor& x_t,
                            const at::Tensor& stats) {
  const char* op = "sp_backward";
  const RowPair in = check_row_pair(op, x_s, x_t, "x_s", "x_t");
  const c10::cuda::CUDAGuard guard(x_s.device());
  const at::Tensor g = upstream_grad(op, "grad_loss", grad_loss, {}, in.acc, x_s);
  const at::Tensor st = check_saved(op, "stats", stats, {in.rows, kStats}, in.acc, x_s, "x_s");
  at::Tensor grad = at::empty(x_s.sizes(), x_s.options());
  AT_DISPATCH_FLOATING_TYPES(in.acc, "sp_backward_cuda", [&] {
    using acc_t = scalar_t;
    const SpArgs<acc_t> args = make_args<acc_t>(in, x_s, x_t);
    const int64_t splits = column_splits(args.blocks, kMaxBackwardSplits);
    at::Tensor parts = at::zeros({splits, in.rows, x_s.size(1)}, x_s.options().dtype(in.acc));
    launch(backward_kernel<acc_t>, dim3(args.blocks, splits), args, static_cast<int>(splits),
           st.const_data_ptr<acc_t>(), g.const_data_ptr<acc_t>(), parts.mutable_data_ptr<acc_t>());
    const int64_t size = grad.numel();
    launch(sum_splits_kernel<acc_t>, dim3(std::min(ceil_div(size, kThreads), kSumBlocks)),
           parts.const_data_ptr<acc_t>(), static_cast<int>(splits), size, grad.mutable_data_ptr(), dtype_of(grad));
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) {
  m.impl("sp_forward", &sp_forward_cuda);
  m.impl("sp_backward", &sp_backward_cuda);
}

}  // namespace kdfast
