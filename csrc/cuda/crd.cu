// CUDA kernels of CRD's contrastive (NCE) loss against a memory bank (op contract in
// kdfast/ops/crd.py, formulas in kdfast/reference/crd.py). With v = emb[b] and w_k = bank[idx[b, k]]:
//
// crd_forward: loss = (1/B) sum_b [log1p((c + eps) / P_0) + sum_{k>=1} log1p((P_k + eps) / c)],
//              grad_b = (1 / (B T)) sum_k coef_k w_k, expsum_b = sum_k exp(s_k)
//
// Two launches. The tiles: block (b, split) holds v in registers (lane l of each warp holds the
// elements d = l, l + 32, ... of it, kChunks per lane) and gives the columns k_start + warp,
// k_start + warp + kWarps, ... of its range to its warps: a warp gathers the row w_k straight from
// the bank (coalesced 32-element runs, through the bank's strides), sums <w_k, v> with a butterfly
// (every lane gets the same sum), computes the entry and adds coef * w_k to its lanes' gradient
// registers. Neither the gathered rows nor the scores are ever stored. The warps' gradients are
// added in warp order through shared memory, the warps' loss terms and exp sums with block_sum;
// the block writes one partial gradient (D) and two partial sums. The finish: block b adds its
// row's partials in split order (gradient, expsum); block 0 also adds every loss partial in order.
// Deterministic, no atomics. The K+1 columns of a row are split over blocks only while the launch
// has fewer than kFillBlocks blocks, each split keeping at least kMinSplitRows columns. An index
// outside [0, N) is not read: its row's results are NaN.
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

#include "../crd.h"
#include "checked_launch.cuh"
#include "launch.cuh"
#include "reduce.cuh"

namespace kdfast {
namespace {

using gpu::block_sum;
using gpu::kWarpSize;
using gpu::sum_over_lanes;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int64_t kFillBlocks = 1024;   // blocks that keep a GPU busy (an H100 holds 1056 of 256 threads)
constexpr int64_t kMinSplitRows = 256;  // columns per block that a split keeps, at least

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// How the blocks cover one launch: block i is (row i / splits, split i % splits), the split over
// the columns [split * per_block, min((split + 1) * per_block, columns)).
struct CrdLaunch {
  CrdShape s;
  int64_t splits, per_block;
};

CrdLaunch make_launch(const CrdShape& s) {
  const int64_t want = std::min(ceil_div(kFillBlocks, s.batch), std::max<int64_t>(s.columns / kMinSplitRows, 1));
  const int64_t per_block = ceil_div(s.columns, want);
  return {s, ceil_div(s.columns, per_block), per_block};
}

template <typename scalar_t, typename acc_t, int kChunks>
__global__ void __launch_bounds__(kThreads)
    crd_forward_kernel(const scalar_t* __restrict__ emb, const scalar_t* __restrict__ bank,
                       const int64_t* __restrict__ idx, const acc_t* __restrict__ z, acc_t* __restrict__ partials,
                       acc_t* __restrict__ grad_partials, const CrdLaunch l, const CrdScalars<acc_t> c) {
  __shared__ acc_t warp_grads[kChunks * kWarpSize];
  const CrdShape& s = l.s;
  const int64_t block = blockIdx.x;
  const int64_t b = block / l.splits;
  const int64_t k_start = (block % l.splits) * l.per_block;
  const int64_t k_end = k_start + l.per_block < s.columns ? k_start + l.per_block : s.columns;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  acc_t v[kChunks], g[kChunks];
#pragma unroll
  for (int i = 0; i < kChunks; ++i) {
    const int64_t d = i * kWarpSize + lane;
    v[i] = d < s.dim ? static_cast<acc_t>(emb[b * s.emb_b + d * s.emb_d]) : acc_t(0);
    g[i] = 0;
  }
  const acc_t zv = *z;
  const acc_t inv_z = acc_t(1) / zv;
  acc_t sums[2] = {0, 0};  // -(loss terms), exp(s): the same on every lane of a warp
  for (int64_t k = k_start + warp; k < k_end; k += kWarps) {  // uniform over the warp
    const int64_t row = idx[b * s.idx_b + k * s.idx_k];
    const bool valid = row >= 0 && row < s.rows;
    const scalar_t* r = bank + (valid ? row : 0) * s.bank_n;
    acc_t w[kChunks];
    acc_t dot = 0;
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      const int64_t d = i * kWarpSize + lane;
      w[i] = valid && d < s.dim ? static_cast<acc_t>(r[d * s.bank_d]) : acc_t(0);
      dot += w[i] * v[i];
    }
    dot = sum_over_lanes(dot, kWarpSize);
    const CrdEntry<acc_t> entry = crd_entry(dot, valid, k == 0, c, inv_z);
    sums[0] += entry.neg_term;
    sums[1] += entry.e;
#pragma unroll
    for (int i = 0; i < kChunks; ++i) g[i] += valid ? entry.coef * w[i] : entry.coef;  // NaN where !valid
  }
  // The warps' gradients, added in warp order.
  for (int w = 0; w < kWarps; ++w) {
    if (warp == w) {
#pragma unroll
      for (int i = 0; i < kChunks; ++i) {
        acc_t& slot = warp_grads[i * kWarpSize + lane];
        slot = w == 0 ? g[i] : slot + g[i];
      }
    }
    __syncthreads();
  }
  for (int64_t d = threadIdx.x; d < s.dim; d += kThreads) grad_partials[block * s.dim + d] = warp_grads[d];
  if (lane != 0) sums[0] = sums[1] = 0;  // one copy per warp
  block_sum<kThreads>(sums);
  if (threadIdx.x == 0) {
    partials[2 * block] = sums[0];
    partials[2 * block + 1] = sums[1];
  }
}

// Block b: grad[b] = grad_scale * sum of its splits' partial gradients, expsum[b] likewise; block 0
// also: loss = inv_b * sum of every loss partial, in order.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    crd_finish_kernel(const acc_t* __restrict__ partials, const acc_t* __restrict__ grad_partials,
                      acc_t* __restrict__ loss, acc_t* __restrict__ grad, acc_t* __restrict__ expsum, int64_t batch,
                      int64_t dim, int64_t splits, acc_t grad_scale, acc_t inv_b) {
  const int64_t b = blockIdx.x;
  for (int64_t d = threadIdx.x; d < dim; d += kThreads) {
    acc_t total = 0;
    for (int64_t split = 0; split < splits; ++split) total += grad_partials[(b * splits + split) * dim + d];
    grad[b * dim + d] = total * grad_scale;
  }
  if (threadIdx.x == 0) {
    acc_t total = 0;
    for (int64_t split = 0; split < splits; ++split) total += partials[2 * (b * splits + split) + 1];
    expsum[b] = total;
  }
  if (b == 0) {  // uniform over the block
    acc_t total[1] = {0};
    for (int64_t i = threadIdx.x; i < batch * splits; i += kThreads) total[0] += partials[2 * i];
    block_sum<kThreads>(total);
    if (threadIdx.x == 0) *loss = total[0] * inv_b;
  }
}

template <typename scalar_t, typename acc_t, int kChunks>
void launch_forward(const char* op, const at::Tensor& emb, const at::Tensor& bank, const at::Tensor& idx,
                    const at::Tensor& z, const CrdLaunch& l, const CrdScalars<acc_t>& c, at::Tensor& partials,
                    at::Tensor& grad_partials) {
  gpu::launch_checked(op, crd_forward_kernel<scalar_t, acc_t, kChunks>, l.s.batch * l.splits, kThreads, 0,
                      emb.const_data_ptr<scalar_t>(), bank.const_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(),
                      z.const_data_ptr<acc_t>(), partials.mutable_data_ptr<acc_t>(),
                      grad_partials.mutable_data_ptr<acc_t>(), l, c);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> crd_forward_cuda(const at::Tensor& emb, const at::Tensor& bank,
                                                                const at::Tensor& idx, const at::Tensor& z,
                                                                double temperature) {
  const char* op = "crd_forward";
  const CrdShape s = check_crd(op, emb, bank, idx, z, temperature);
  const c10::cuda::CUDAGuard guard(emb.device());
  const at::ScalarType acc = acc_dtype(emb.scalar_type());
  const auto options = emb.options().dtype(acc);
  const CrdLaunch l = make_launch(s);
  const int64_t blocks = s.batch * l.splits;
  at::Tensor partials = at::empty({blocks, 2}, options), grad_partials = at::empty({blocks, s.dim}, options);
  at::Tensor loss = at::empty({}, options), grad = at::empty({s.batch, s.dim}, options);
  at::Tensor expsum = at::empty({s.batch}, options);
  const at::Tensor zc = z.to(acc).contiguous();  // on the device: never read on the host
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, emb.scalar_type(), "crd_forward", [&] {
    using acc_t = acc_type<scalar_t>;
    const CrdScalars<acc_t> c = crd_scalars<acc_t>(s, temperature);
    if (s.dim <= 4 * kWarpSize) {
      launch_forward<scalar_t, acc_t, 4>(op, emb, bank, idx, zc, l, c, partials, grad_partials);
    } else {
      launch_forward<scalar_t, acc_t, kCrdMaxDim / kWarpSize>(op, emb, bank, idx, zc, l, c, partials, grad_partials);
    }
    const acc_t grad_scale = static_cast<acc_t>(1.0 / (static_cast<double>(s.batch) * temperature));
    gpu::launch_checked(op, crd_finish_kernel<acc_t>, s.batch, kThreads, 0, partials.const_data_ptr<acc_t>(),
                        grad_partials.const_data_ptr<acc_t>(), loss.mutable_data_ptr<acc_t>(),
                        grad.mutable_data_ptr<acc_t>(), expsum.mutable_data_ptr<acc_t>(), s.batch, s.dim, l.splits,
                        grad_scale, static_cast<acc_t>(1.0 / static_cast<double>(s.batch)));
  });
  return {loss, grad, expsum};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) { m.impl("crd_forward", &crd_forward_cuda); }

}  // namespace kdfast
