// CUDA kernels of the similarity-preserving loss (SP, Tung & Mori 2019): the op contract of
// kdfast/ops/sp.py with the algorithm of kernels/sp.py and csrc/cpu/sp.cpp, 256 threads per block,
// on the Gram matrices S = X X^T of both networks (tiles of csrc/cuda/tiles.cuh):
//
// sp_forward:  gram_kernel        block (upper tile (r, c >= r), split of the elements, network): the
//                                 tile of S_s or S_t, mirrored; splits (small B: enough blocks for a
//                                 GPU) are added in order by sum_splits_kernel
//              rows_kernel        a block per row i: ||S_s[i]||^2, ||S_t[i]||^2, then with
//                                 G = S / ||S row||: stats[i] = [inv_s, inv_t, proj] and the row's
//                                 sum_j (G_s - G_t)_ij^2
//              finish_kernel      one block: loss = the rows' sums added in order / B^2
// sp_backward: gram_kernel        S_s and S_t again
//              weights_kernel     M_ij = (a_i + a_j) S_s_ij - (b_i + b_j) S_t_ij, in place of S_s
//              product_kernel     (tiles.cuh) a tile of 64 rows x 64 elements per block, a 1-D grid:
//                                 dX_s = M X_s, the tiled product through shared memory, written
//                                 once in x_s's dtype
//
// Memory: the two B x B Gram matrices (and their splits at small B: at most kTargetBlocks tiles'
// worth), O(B) row sums; no B x D accumulator (the gradient is written in place). Float16 and
// bfloat16 inputs are multiplied on the tensor cores (float accumulators). X_s and X_t are read in
// place through their strides, in their own dtypes. Every reduction has a fixed order (no
// atomics): the results are deterministic on a given device, and the grid sizes depend only on
// the shapes.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "../relational.h"
#include "tiles.cuh"

namespace kdfast {
namespace {

using namespace gpu;


// stats[i] and row_loss[i] = sum_j (G_s - G_t)_ij^2 of the row i = blockIdx.x, from gram (2, B, B).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) rows_kernel(const acc_t* gram, int rows, acc_t* stats, acc_t* row_loss) {
  const int i = blockIdx.x;
  const acc_t* s = gram + static_cast<int64_t>(i) * rows;
  const acc_t* t = s + static_cast<int64_t>(rows) * rows;
  acc_t norms[2] = {0, 0};
  for (int j = threadIdx.x; j < rows; j += kThreads) {
    norms[0] += s[j] * s[j];
    norms[1] += t[j] * t[j];
  }
  block_sum<kThreads>(norms);
  const acc_t inv_s = inv_clamped(std::sqrt(norms[0])), inv_t = inv_clamped(std::sqrt(norms[1]));
  acc_t sums[2] = {0, 0};  // loss, proj
  for (int j = threadIdx.x; j < rows; j += kThreads) {
    const acc_t g_s = s[j] * inv_s;
    const acc_t diff = g_s - t[j] * inv_t;
    sums[0] += diff * diff;
    sums[1] += g_s * diff;
  }
  block_sum<kThreads>(sums);
  if (threadIdx.x == 0) {
    sp_stats_row(norms[0], norms[1], sums[1], stats + static_cast<int64_t>(i) * kSpStats);
    row_loss[i] = sums[0];
  }
}

// loss = sum_i row_loss[i] / B^2. One block.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) finish_kernel(const acc_t* row_loss, int rows, acc_t* loss) {
  acc_t total[1] = {0};
  for (int i = threadIdx.x; i < rows; i += kThreads) total[0] += row_loss[i];
  block_sum<kThreads>(total);
  if (threadIdx.x == 0) *loss = total[0] / static_cast<acc_t>(static_cast<int64_t>(rows) * rows);
}

// gram[0][i][j] = M_ij = (alpha_i + alpha_j) S_s_ij - (beta_i + beta_j) S_t_ij, in place (alpha, beta:
// sp_coefficients of the rows' stats with k = 2 grad_loss / B^2).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) weights_kernel(acc_t* gram, int rows, const acc_t* stats,
                                                           const acc_t* grad_loss) {
  const int64_t size = static_cast<int64_t>(rows) * rows;
  const acc_t b = static_cast<acc_t>(rows);
  const acc_t k = acc_t(2) * grad_loss[0] / (b * b);
  for (int64_t idx = blockIdx.x * int64_t(kThreads) + threadIdx.x; idx < size; idx += int64_t(gridDim.x) * kThreads) {
    const int64_t i = idx / rows, j = idx % rows;
    acc_t alpha_i, beta_i, alpha_j, beta_j;
    sp_coefficients(stats + i * kSpStats, k, alpha_i, beta_i);
    sp_coefficients(stats + j * kSpStats, k, alpha_j, beta_j);
    gram[idx] = (alpha_i + alpha_j) * gram[idx] - (beta_i + beta_j) * gram[size + idx];
  }
}

template <typename acc_t>
void launch_gram_of(const RowPair& in, const at::Tensor& x_s, const at::Tensor& x_t, const at::Tensor& gram) {
  launch_gram<acc_t, Product>(net_of<acc_t>(x_s, in.s, nullptr), net_of<acc_t>(x_t, in.t, nullptr), in.rows, gram);
}

std::tuple<at::Tensor, at::Tensor> sp_forward_cuda(const at::Tensor& x_s, const at::Tensor& x_t) {
  const RowPair in = check_row_pair("sp_forward", x_s, x_t, "x_s", "x_t");
  const c10::cuda::CUDAGuard guard(x_s.device());
  const auto options = x_s.options().dtype(in.acc);
  at::Tensor loss = at::empty({}, options), stats = at::empty({in.rows, kSpStats}, options);
  AT_DISPATCH_FLOATING_TYPES(in.acc, "sp_forward_cuda", [&] {
    using acc_t = scalar_t;
    const at::Tensor gram = at::empty({2, in.rows, in.rows}, options), row_loss = at::empty({in.rows}, options);
    launch_gram_of<acc_t>(in, x_s, x_t, gram);
    launch(rows_kernel<acc_t>, dim3(in.rows), gram.const_data_ptr<acc_t>(), in.rows, stats.mutable_data_ptr<acc_t>(),
           row_loss.mutable_data_ptr<acc_t>());
    launch(finish_kernel<acc_t>, dim3(1), row_loss.const_data_ptr<acc_t>(), in.rows, loss.mutable_data_ptr<acc_t>());
  });
  return {loss, stats};
}

at::Tensor sp_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& x_s, const at::Tensor& x_t,
                            const at::Tensor& stats) {
  const SpBackwardInputs checked = check_sp_backward(grad_loss, x_s, x_t, stats);
  const c10::cuda::CUDAGuard guard(x_s.device());
  const RowPair& in = checked.rows;
  const at::Tensor &g = checked.grad_loss, &st = checked.stats;
  at::Tensor grad = at::empty(x_s.sizes(), x_s.options());
  AT_DISPATCH_FLOATING_TYPES(in.acc, "sp_backward_cuda", [&] {
    using acc_t = scalar_t;
    const int n = in.rows;
    const at::Tensor gram = at::empty({2, n, n}, x_s.options().dtype(in.acc));
    launch_gram_of<acc_t>(in, x_s, x_t, gram);
    launch(weights_kernel<acc_t>, dim3(std::min(ceil_div(int64_t(n) * n, kThreads), kSumBlocks)),
           gram.mutable_data_ptr<acc_t>(), n, st.const_data_ptr<acc_t>(), g.const_data_ptr<acc_t>());
    launch_product<false, acc_t>({gram.const_data_ptr<acc_t>(), n, 0, n, n}, net_of<acc_t>(x_s, in.s, nullptr), 0,
                                 {grad.mutable_data_ptr(), dtype_of(grad), in.s.dim, acc_t(1), false});
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) {
  m.impl("sp_forward", &sp_forward_cuda);
  m.impl("sp_backward", &sp_backward_cuda);
}

}  // namespace kdfast
