// CUDA kernels of local correlation consistency (LCC, Li et al. 2020); formulas in
// kdfast/reference/lcc.py, descriptor layout in csrc/common.h (Regions). The algorithm of
// csrc/cpu/lcc.cpp, in tiles of kTile x kTile (n, m) pairs, 256 threads per block:
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
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <utility>

#include "../common.h"

namespace kdfast {
namespace {

constexpr int kWarpSize = 32;
constexpr int kSide = 16;                  // threads per side of a tile: 16 x 16
constexpr int kThreads = kSide * kSide;    // threads per block of every kernel
constexpr int kDepth = 16;                 // elements of a shared-memory chunk of the correlation tiles
constexpr int64_t kForwardBlocks = 1024;   // blocks of forward_kernel, at most
constexpr int64_t kBackwardBlocks = 256;   // blocks of backward_kernel that splitting aims at
constexpr int64_t kMaxSplits = 4;          // copies of the g accumulator, at most

// Each thread holds a kMicro x kMicro block of a tile: rows ty + kSide i, columns tx + kSide j.
template <typename acc_t>
struct TileShape {
  static constexpr int kMicro = sizeof(acc_t) == sizeof(float) ? 4 : 2;
  static constexpr int kTile = kSide * kMicro;  // 64 (float), 32 (double): shared memory < 48 KiB
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

enum class Dtype : int { kHalf, kBFloat16, kFloat, kDouble };

Dtype dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf:
      return Dtype::kHalf;
    case at::kBFloat16:
      return Dtype::kBFloat16;
    case at::kFloat:
      return Dtype::kFloat;
    default:
      return Dtype::kDouble;  // checked by check_lcc_maps
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t load_as(const void* data, Dtype dtype, int64_t i) {
  switch (dtype) {
    case Dtype::kHalf:
      return static_cast<acc_t>(static_cast<float>(static_cast<const c10::Half*>(data)[i]));
    case Dtype::kBFloat16:
      return static_cast<acc_t>(static_cast<float>(static_cast<const c10::BFloat16*>(data)[i]));
    case Dtype::kFloat:
      return static_cast<acc_t>(static_cast<const float*>(data)[i]);
    default:
      return static_cast<acc_t>(static_cast<const double*>(data)[i]);
  }
}

template <typename acc_t>
__device__ __forceinline__ void store(void* data, Dtype dtype, int64_t i, acc_t v) {
  switch (dtype) {
    case Dtype::kHalf:
      static_cast<c10::Half*>(data)[i] = c10::Half(static_cast<float>(v));
      break;
    case Dtype::kBFloat16:
      static_cast<c10::BFloat16*>(data)[i] = c10::BFloat16(static_cast<float>(v));
      break;
    case Dtype::kFloat:
      static_cast<float*>(data)[i] = static_cast<float>(v);
      break;
    default:
      static_cast<double*>(data)[i] = static_cast<double>(v);
  }
}

// One network's descriptors: the map, read in place, and their inverse norms (N,).
template <typename acc_t>
struct Net {
  const void* data;
  Dtype dtype;
  Regions regions;
  const acc_t* inv_norm;  // (N,); not read by inv_norm_kernel, which writes it
};

template <typename acc_t>
struct LccArgs {
  Net<acc_t> s, t;
  int rows;    // N
  int blocks;  // row (and column) blocks of kTile: ceil(N / kTile)
};

// Sums each v[k] over the block; every thread gets the totals (warps added in order: deterministic).
// All threads of the block call it.
template <int N, typename acc_t>
__device__ __forceinline__ void block_sum(acc_t (&v)[N]) {
  __shared__ acc_t partial[kThreads / kWarpSize][N];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int k = 0; k < N; ++k) {
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v[k] += __shfl_down_sync(0xffffffffu, v[k], offset);
  }
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) partial[warp][k] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < N; ++k) {
    v[k] = 0;
    for (int w = 0; w < kThreads / kWarpSize; ++w) v[k] += partial[w][k];
  }
  __syncthreads();  // `partial` may be written again by the next call
}

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
  block_sum(sum);
  if (threadIdx.x == 0) inv_norm[n] = lcc_inv_norm(sum[0]);
}

template <typename acc_t>
using Chunk = acc_t[kDepth][TileShape<acc_t>::kTile + 1];  // chunk[d][r] = u[n0 + r][e0 + d]

template <typename acc_t>
struct ChunkSmem {
  Chunk<acc_t> rows, cols;
};

// The rows of a tile that this thread loads into the chunks, and where they start in the map:
// rows threadIdx.x / kDepth + (kThreads / kDepth) q, q < kMicro, each at element e0 + threadIdx.x % kDepth
// of chunk e0 (16 consecutive threads read 16 consecutive elements of a row).
template <typename acc_t>
struct ChunkRows {
  static constexpr int kMicro = TileShape<acc_t>::kMicro;
  int64_t offset[kMicro];
  acc_t inv[kMicro];
  bool valid[kMicro];  // n < N

  __device__ ChunkRows(const Net<acc_t>& net, int rows, int n0) {
#pragma unroll
    for (int q = 0; q < kMicro; ++q) {
      const int n = n0 + threadIdx.x / kDepth + (kThreads / kDepth) * q;
      valid[q] = n < rows;
      offset[q] = valid[q] ? net.regions.row_offset(n) : 0;
      inv[q] = valid[q] ? net.inv_norm[n] : acc_t(0);
    }
  }

  // chunk[d][r] = u[n0 + r][e0 + d], 0 past N or D. Every thread calls it.
  __device__ void load(const Net<acc_t>& net, int e0, Chunk<acc_t>& chunk) const {
    const int d = threadIdx.x % kDepth, e = e0 + d;
    const bool inside = e < net.regions.dim;
    const int64_t element = inside ? net.regions.element_offset(e) : 0;
#pragma unroll
    for (int q = 0; q < kMicro; ++q) {
      const int r = threadIdx.x / kDepth + (kThreads / kDepth) * q;
      chunk[d][r] = inside && valid[q] ? load_as<acc_t>(net.data, net.dtype, offset[q] + element) * inv[q] : acc_t(0);
    }
  }
};

// s[i][j] = S[n0 + ty + kSide i][m0 + tx + kSide j] of one network (0 past N). Every thread calls it.
template <typename acc_t>
__device__ void correlation_tile(const Net<acc_t>& net, int rows, int n0, int m0, ChunkSmem<acc_t>& smem,
                                 acc_t (&s)[TileShape<acc_t>::kMicro][TileShape<acc_t>::kMicro]) {
  constexpr int kMicro = TileShape<acc_t>::kMicro;
  const int tx = threadIdx.x % kSide, ty = threadIdx.x / kSide;
  const ChunkRows<acc_t> row_loads(net, rows, n0), col_loads(net, rows, m0);
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
#pragma unroll
    for (int j = 0; j < kMicro; ++j) s[i][j] = 0;
  }
  for (int e0 = 0; e0 < net.regions.dim; e0 += kDepth) {
    row_loads.load(net, e0, smem.rows);
    col_loads.load(net, e0, smem.cols);
    __syncthreads();
#pragma unroll
    for (int d = 0; d < kDepth; ++d) {
      acc_t a[kMicro], b[kMicro];
#pragma unroll
      for (int i = 0; i < kMicro; ++i) {
        a[i] = smem.rows[d][ty + kSide * i];
        b[i] = smem.cols[d][tx + kSide * i];
      }
#pragma unroll
      for (int i = 0; i < kMicro; ++i) {
#pragma unroll
        for (int j = 0; j < kMicro; ++j) s[i][j] += a[i] * b[j];
      }
    }
    __syncthreads();
  }
}

// Tile t of the upper triangle, row-block-major by diagonal position: t = c (c + 1) / 2 + r, r <= c.
__device__ __forceinline__ void upper_tile(int64_t t, int& r, int& c) {
  int64_t h = static_cast<int64_t>((sqrt(8.0 * static_cast<double>(t) + 1.0) - 1.0) / 2.0);
  while (h * (h + 1) / 2 > t) --h;  // exact, whatever the rounding of sqrt
  while ((h + 1) * (h + 2) / 2 <= t) ++h;
  c = static_cast<int>(h);
  r = static_cast<int>(t - h * (h + 1) / 2);
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
  block_sum(sums);
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
  block_sum(v);
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
  __shared__ acc_t p[kTile][kTile + 1];   // w 4 (S_s - S_t)[n0 + i][m0 + j]
  __shared__ acc_t us[kTile][kTile + 1];  // u_s[m0 + j][e0 + e]
  __shared__ int64_t col_offset[kTile];   // where u_s[m0 + j] starts in f_s
  __shared__ acc_t col_inv[kTile];        // inv_s[m0 + j], 0 past N
  const int tx = threadIdx.x % kSide, ty = threadIdx.x / kSide;
  const int positions = a.s.regions.positions, dim = a.s.regions.dim;
  const int n0 = blockIdx.x * kTile, split = blockIdx.y;
  const acc_t weight[3] = {4 * grad_sums[0], 4 * grad_sums[1], 4 * grad_sums[2]};
  acc_t* gs = g + static_cast<int64_t>(split) * a.rows * dim;
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
        p[ty + kSide * i][tx + kSide * j] =
            valid ? class_value(weight, lcc_pair_class(n, m, positions)) * (ss[i][j] - st[i][j]) : acc_t(0);
      }
    }
    for (int j = threadIdx.x; j < kTile; j += kThreads) {
      const int m = m0 + j;
      col_offset[j] = m < a.rows ? a.s.regions.row_offset(m) : 0;
      col_inv[j] = m < a.rows ? a.s.inv_norm[m] : acc_t(0);
    }
    __syncthreads();
    for (int e0 = 0; e0 < dim; e0 += kTile) {
      // us[j][e]: thread k loads element e = k % kTile of rows k / kTile + (kThreads / kTile) q
      const int e = threadIdx.x % kTile;
      const bool inside = e0 + e < dim;
      const int64_t element = inside ? a.s.regions.element_offset(e0 + e) : 0;
      for (int j = threadIdx.x / kTile; j < kTile; j += kThreads / kTile) {
        const bool valid = inside && m0 + j < a.rows;
        us[j][e] = valid ? load_as<acc_t>(a.s.data, a.s.dtype, col_offset[j] + element) * col_inv[j] : acc_t(0);
      }
      __syncthreads();
      acc_t acc[kMicro][kMicro] = {};
      for (int j = 0; j < kTile; ++j) {
        acc_t pv[kMicro], uv[kMicro];
#pragma unroll
        for (int i = 0; i < kMicro; ++i) {
          pv[i] = p[ty + kSide * i][j];
          uv[i] = us[j][tx + kSide * i];
        }
#pragma unroll
        for (int i = 0; i < kMicro; ++i) {
#pragma unroll
          for (int k = 0; k < kMicro; ++k) acc[i][k] += pv[i] * uv[k];
        }
      }
#pragma unroll
      for (int i = 0; i < kMicro; ++i) {
#pragma unroll
        for (int k = 0; k < kMicro; ++k) {
          const int n = n0 + ty + kSide * i, el = e0 + tx + kSide * k;
          if (n < a.rows && el < dim) gs[static_cast<int64_t>(n) * dim + el] += acc[i][k];
        }
      }
      __syncthreads();  // us (and, after the last chunk, p, col_offset, col_inv) are written again next
    }
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
    block_sum(dot);
  }
  for (int e = threadIdx.x; e < dim; e += kThreads) {
    store(grad, grad_dtype, out_row + out.element_offset(e), inv * (g_at(e) - u_at(e) * dot[0]));
  }
}

// kernel<<<grid, kThreads>>>(args...) on the current stream.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, Args&&... args) {
  kernel<<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename acc_t>
LccArgs<acc_t> make_args(const LccMaps& in, const at::Tensor& f_s, const at::Tensor& f_t, const at::Tensor& inv_s,
                         const at::Tensor& inv_t) {
  return {{f_s.const_data_ptr(), dtype_of(f_s), in.s, inv_s.const_data_ptr<acc_t>()},
          {f_t.const_data_ptr(), dtype_of(f_t), in.t, inv_t.const_data_ptr<acc_t>()},
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
