// CUDA kernels of the relational KD loss (RKD, Park et al. 2019): the op contract of
// kdfast/ops/rkd.py with the algorithm of kernels/rkd.py (which states the formulas) and
// csrc/cpu/rkd.cpp; the per-entry math is csrc/relational.h's (RkdTriplets, rkd_*). 256 threads per
// block; within a row, a thread takes the columns k = threadIdx.x mod 256:
//
// rkd_forward:  gram_kernel      (csrc/cuda/tiles.cuh) block (upper tile (r, c >= r), split of the
//                                elements, network): R[a][b] = ||e_a - e_b||^2 (summed squared
//                                differences), written at (r, c) and mirrored at (c, r), each pair by
//                                one thread; splits (small B) are added in order by sum_splits_kernel:
//                                bitwise symmetric, exactly 0 for duplicated rows
//               pairs_kernel     a block per row i: (length, inv) of R_s[i] and R_t[i], and (SUMS)
//                                the row's positive-distance sums and counts
//               scales_kernel    one block: the rows' sums added, scales into stats[0..1]
//               anchor_kernel    a block per anchor i: the distance sums of row i and
//                                sum_jk smooth_l1(cos_s - cos_t)
//               finish_kernel    one block: terms and stats[2]
// rkd_backward: pairs_kernel, then anchor_backward_kernel (a block per anchor i): dR[i][k] without the
//               triplet part; triplet_backward_kernel (a block per row j): dR[j][k] -= sum_i A_ijk / 2;
//               symmetrize_kernel: M = dR + dR^T in place; product_kernel (tiles.cuh, a tile of 64 rows
//               x 64 elements per block, a 1-D grid): dE_i = 2 sum_j M_ij (e_i - e_j), the tiled
//               product of M with E through shared memory
//
// Memory: R (an output), the (length, inv) of both networks (4 B x B), dR, O(B) row sums, the
// splits of R at small B; nothing of size B x B x D. Every reduction has a fixed order (no
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

// The pairs of both networks (csrc/relational.h's RkdPairs) of B rows, in device memory.
template <typename acc_t>
struct Pairs {
  RkdPairs<acc_t> s, t;
  int n;
};

// Row i = blockIdx.x of both networks' (length, inv); kSums: positive[i] = the row's rkd_add_positive sums.
template <bool kSums, typename acc_t>
__global__ void __launch_bounds__(kThreads) pairs_kernel(const acc_t* sq_dist, int n, acc_t* scratch,
                                                         acc_t* positive) {
  const int i = blockIdx.x;
  const int64_t nn = static_cast<int64_t>(n) * n;
  acc_t sums[4] = {0, 0, 0, 0};
  for (int k = threadIdx.x; k < n; k += kThreads) {
    const int64_t idx = static_cast<int64_t>(i) * n + k;
    for (int net = 0; net < 2; ++net) {
      rkd_pair(sq_dist + net * nn, idx, scratch + 2 * net * nn, scratch + (2 * net + 1) * nn);
    }
    if constexpr (kSums) rkd_add_positive(sq_dist[idx], sq_dist[nn + idx], k != i, sums);
  }
  if constexpr (kSums) {
    block_sum<kThreads>(sums);
    if (threadIdx.x == 0) {
      for (int k = 0; k < 4; ++k) positive[i * 4 + k] = sums[k];
    }
  }
}

// v = the column sums of a (n, C) row-major matrix, rows in order (strided by thread, then block_sum).
template <int C, typename acc_t>
__device__ void sum_rows(const acc_t* rows, int n, acc_t (&v)[C]) {
  for (int k = 0; k < C; ++k) v[k] = 0;
  for (int i = threadIdx.x; i < n; i += kThreads) {
    for (int k = 0; k < C; ++k) v[k] += rows[static_cast<int64_t>(i) * C + k];
  }
  block_sum<kThreads>(v);
}

// totals = the sums of the rows' positive sums; stats[0..1] = scales. One block.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) scales_kernel(const acc_t* positive, int n, acc_t* totals, acc_t* stats) {
  acc_t v[4];
  sum_rows(positive, n, v);
  if (threadIdx.x == 0) {
    for (int k = 0; k < 4; ++k) totals[k] = v[k];
    rkd_scales(v, stats);
  }
}

// rows[i] = [sum_k smooth_l1(x_s - x_t), sum_k smooth_l1'(x_s - x_t) x_s, sum_jk smooth_l1(cos_s - cos_t)]
// of the anchor i = blockIdx.x.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) anchor_kernel(const Pairs<acc_t> p, const acc_t* stats, acc_t* rows) {
  const int i = blockIdx.x, n = p.n;
  acc_t sums[3] = {0, 0, 0};
  for (int k = threadIdx.x; k < n; k += kThreads) {
    const int64_t ik = static_cast<int64_t>(i) * n + k;
    rkd_add_distance(p.s.r[ik], p.t.r[ik], k != i, stats, sums);
    for (int j = 0; j < n; ++j) {
      const RkdTriplets<acc_t> s(p.s, n, i, j), t(p.t, n, i, j);
      sums[2] += smooth_l1(s.cosine(k) - t.cosine(k));
    }
  }
  block_sum<kThreads>(sums);
  if (threadIdx.x == 0) {
    for (int k = 0; k < 3; ++k) rows[i * 3 + k] = sums[k];
  }
}

// terms and stats[2] from the anchor rows and the positive totals. One block.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) finish_kernel(const acc_t* rows, const acc_t* totals, int n, acc_t* terms,
                                                          acc_t* stats) {
  acc_t v[3];
  sum_rows(rows, n, v);
  if (threadIdx.x == 0) rkd_terms(totals, v, v[2], n, terms, stats);
}

// dR[i][k] without the triplet part for the anchor i = blockIdx.x (rkd_anchor_grad).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) anchor_backward_kernel(const Pairs<acc_t> p, const acc_t* grad_terms,
                                                                   const acc_t* stats, acc_t* dr) {
  const int i = blockIdx.x, n = p.n;
  const RkdUpstream<acc_t> up(grad_terms, n);
  for (int k = threadIdx.x; k < n; k += kThreads) {
    acc_t a = 0, q = 0;
    for (int j = 0; j < n; ++j) {
      const RkdTriplets<acc_t> s(p.s, n, i, j), t(p.t, n, i, j);
      rkd_add_anchor(s, t, k, up.ga, a, q);
    }
    const int64_t ik = static_cast<int64_t>(i) * n + k;
    dr[ik] = rkd_anchor_grad(a, q, p.s, p.t, ik, k != i, up.gd, stats);
  }
}

// dR[j][k] -= sum_i A_ijk / 2 for the row j = blockIdx.x.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) triplet_backward_kernel(const Pairs<acc_t> p, const acc_t* grad_terms,
                                                                    acc_t* dr) {
  const int j = blockIdx.x, n = p.n;
  const RkdUpstream<acc_t> up(grad_terms, n);
  for (int k = threadIdx.x; k < n; k += kThreads) {
    acc_t acc = 0;
    for (int i = 0; i < n; ++i) {
      const RkdTriplets<acc_t> s(p.s, n, i, j), t(p.t, n, i, j);
      acc += rkd_triplet_weight(s, t, k, up.ga);
    }
    const int64_t jk = static_cast<int64_t>(j) * n + k;
    dr[jk] = dr[jk] - acc_t(0.5) * acc;
  }
}

// m[i][j] = m[j][i] = m[i][j] + m[j][i] (B x B, in place): a thread per pair i <= j.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) symmetrize_kernel(acc_t* m, int n) {
  const int64_t nn = static_cast<int64_t>(n) * n;
  for (int64_t idx = blockIdx.x * int64_t(kThreads) + threadIdx.x; idx < nn; idx += int64_t(gridDim.x) * kThreads) {
    const int64_t i = idx / n, j = idx % n;
    if (i <= j) {
      const acc_t v = m[i * n + j] + m[j * n + i];
      m[i * n + j] = v;
      m[j * n + i] = v;
    }
  }
}

// The pairs of sq_dist (2, B, B), with their (length, inv) in `scratch` (2, 2, B, B).
template <typename acc_t>
Pairs<acc_t> pairs_of(const at::Tensor& sq_dist, const at::Tensor& scratch, int n) {
  const acc_t* r = sq_dist.const_data_ptr<acc_t>();
  const acc_t* l = scratch.const_data_ptr<acc_t>();
  const int64_t nn = static_cast<int64_t>(n) * n;
  return {{r, l, l + nn}, {r + nn, l + 2 * nn, l + 3 * nn}, n};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rkd_forward_cuda(const at::Tensor& e_s, const at::Tensor& e_t) {
  const RowPair in = check_row_pair("rkd_forward", e_s, e_t, "e_s", "e_t");
  const c10::cuda::CUDAGuard guard(e_s.device());
  const int n = in.rows;
  const auto options = e_s.options().dtype(in.acc);
  at::Tensor terms = at::empty({2}, options), sq_dist = at::empty({2, n, n}, options), stats = at::empty({3}, options);
  AT_DISPATCH_FLOATING_TYPES(in.acc, "rkd_forward_cuda", [&] {
    using acc_t = scalar_t;
    at::Tensor scratch = at::empty({2, 2, n, n}, options);
    at::Tensor positive = at::empty({n, 4}, options), rows = at::empty({n, 3}, options);
    at::Tensor totals = at::empty({4}, options);
    launch_gram<acc_t, SquaredDifference>(net_of<acc_t>(e_s, in.s, nullptr), net_of<acc_t>(e_t, in.t, nullptr), n,
                                          sq_dist);
    launch(pairs_kernel<true, acc_t>, dim3(n), sq_dist.const_data_ptr<acc_t>(), n, scratch.mutable_data_ptr<acc_t>(),
           positive.mutable_data_ptr<acc_t>());
    launch(scales_kernel<acc_t>, dim3(1), positive.const_data_ptr<acc_t>(), n, totals.mutable_data_ptr<acc_t>(),
           stats.mutable_data_ptr<acc_t>());
    launch(anchor_kernel<acc_t>, dim3(n), pairs_of<acc_t>(sq_dist, scratch, n), stats.const_data_ptr<acc_t>(),
           rows.mutable_data_ptr<acc_t>());
    launch(finish_kernel<acc_t>, dim3(1), rows.const_data_ptr<acc_t>(), totals.const_data_ptr<acc_t>(), n,
           terms.mutable_data_ptr<acc_t>(), stats.mutable_data_ptr<acc_t>());
  });
  return {terms, sq_dist, stats};
}

at::Tensor rkd_backward_cuda(const at::Tensor& grad_terms, const at::Tensor& e_s, const at::Tensor& sq_dist_in,
                             const at::Tensor& stats) {
  const RkdBackwardInputs checked = check_rkd_backward(grad_terms, e_s, sq_dist_in, stats);
  const c10::cuda::CUDAGuard guard(e_s.device());
  const RowPair& in = checked.rows;
  const int n = in.rows;
  const at::Tensor &g = checked.grad_terms, &sq_dist = checked.sq_dist, &st = checked.stats;
  at::Tensor grad = at::empty(e_s.sizes(), e_s.options());
  AT_DISPATCH_FLOATING_TYPES(in.acc, "rkd_backward_cuda", [&] {
    using acc_t = scalar_t;
    const auto options = e_s.options().dtype(in.acc);
    at::Tensor scratch = at::empty({2, 2, n, n}, options), dr = at::empty({n, n}, options);
    launch(pairs_kernel<false, acc_t>, dim3(n), sq_dist.const_data_ptr<acc_t>(), n, scratch.mutable_data_ptr<acc_t>(),
           static_cast<acc_t*>(nullptr));
    const Pairs<acc_t> pairs = pairs_of<acc_t>(sq_dist, scratch, n);
    launch(anchor_backward_kernel<acc_t>, dim3(n), pairs, g.const_data_ptr<acc_t>(), st.const_data_ptr<acc_t>(),
           dr.mutable_data_ptr<acc_t>());
    launch(triplet_backward_kernel<acc_t>, dim3(n), pairs, g.const_data_ptr<acc_t>(), dr.mutable_data_ptr<acc_t>());
    const int64_t nn = static_cast<int64_t>(n) * n;
    launch(symmetrize_kernel<acc_t>, dim3(std::min(ceil_div(nn, kThreads), kSumBlocks)), dr.mutable_data_ptr<acc_t>(),
           n);
    launch_product<true, acc_t>({dr.const_data_ptr<acc_t>(), n, 0, n, n}, net_of<acc_t>(e_s, in.s, nullptr), 0,
                                {grad.mutable_data_ptr(), dtype_of(grad), in.s.dim, acc_t(2), false});
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) {
  m.impl("rkd_forward", &rkd_forward_cuda);
  m.impl("rkd_backward", &rkd_backward_cuda);
}

}  // namespace kdfast
