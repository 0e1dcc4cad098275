// Tiles of row-pair reductions on the GPU, shared by the LCC, SP and RKD kernels: the rows of a
// matrix (the region descriptors of csrc/common.h's Regions, or a (B, D) matrix as a grid of 1) are
// read in place through their strides and combined tile by tile in the accumulation type acc_t
// (float; double for double inputs):
//
//   tile[n0 + i][m0 + j] = sum_e combine(u[n0 + i][e], u[m0 + j][e])   (u = x * inv_norm per row)
//
// A block of kThreads = 16 x 16 threads computes a kTile x kTile tile (64 in float, 32 in double),
// each thread a kMicro x kMicro block of it, from shared-memory chunks of kDepth elements; every
// sum runs over e in one fixed order. The input dtypes (float16, bfloat16, float32, float64, one
// per network) are switched on at run time per load, so that the kernels are instantiated only
// for acc_t.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <utility>

#include "../common.h"
#include "reduce.cuh"

namespace kdfast {
namespace gpu {

constexpr int kSide = 16;                // threads per side of a tile: 16 x 16
constexpr int kThreads = kSide * kSide;  // threads per block of every kernel
constexpr int kDepth = 16;               // elements of a shared-memory chunk of the tiles

// Each thread holds a kMicro x kMicro block of a tile: rows ty + kSide i, columns tx + kSide j.
template <typename acc_t>
struct TileShape {
  static constexpr int kMicro = sizeof(acc_t) == sizeof(float) ? 4 : 2;
  static constexpr int kTile = kSide * kMicro;  // 64 (float), 32 (double): shared memory < 48 KiB
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

enum class Dtype : int { kHalf, kBFloat16, kFloat, kDouble };

inline Dtype dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf:
      return Dtype::kHalf;
    case at::kBFloat16:
      return Dtype::kBFloat16;
    case at::kFloat:
      return Dtype::kFloat;
    default:
      return Dtype::kDouble;  // floating dtypes only: checked by the ops
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

// The rows of one network: the map, read in place, and the rows' scales.
template <typename acc_t>
struct Net {
  const void* data;
  Dtype dtype;
  Regions regions;
  const acc_t* inv_norm;  // (N,) scales of the rows; nullptr: the rows as they are

  __device__ __forceinline__ acc_t scale(int n) const { return inv_norm == nullptr ? acc_t(1) : inv_norm[n]; }
};

template <typename acc_t>
Net<acc_t> net_of(const at::Tensor& x, const Regions& regions, const acc_t* inv_norm) {
  return {x.const_data_ptr(), dtype_of(x), regions, inv_norm};
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
      inv[q] = valid[q] ? net.scale(n) : acc_t(0);
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

// s[i][j] = sum_e combine(u[n0 + ty + kSide i][e], u[m0 + tx + kSide j][e]) of one network, rows past N
// read as 0 (combine: csrc/common.h's Product or SquaredDifference). Every thread calls it.
template <typename acc_t, typename Combine = Product>
__device__ void correlation_tile(const Net<acc_t>& net, int rows, int n0, int m0, ChunkSmem<acc_t>& smem,
                                 acc_t (&s)[TileShape<acc_t>::kMicro][TileShape<acc_t>::kMicro],
                                 Combine combine = Combine()) {
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
        for (int j = 0; j < kMicro; ++j) s[i][j] += combine(a[i], b[j]);
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

// Shared memory of add_tile_products: the weights p of a tile and a chunk of the column rows.
template <typename acc_t>
struct ProductSmem {
  static constexpr int kTile = TileShape<acc_t>::kTile;
  acc_t p[kTile][kTile + 1];  // p[i][j]: weight of the pair (n0 + i, m0 + j)
  acc_t u[kTile][kTile + 1];  // u[j][e] = u[m0 + j][e0 + e]
  int64_t col_offset[kTile];  // where row m0 + j starts in the map
  acc_t col_inv[kTile];       // its scale, 0 past N
};

// g[n0 + i][e] += sum_j p[i][j] u[m0 + j][e] for the rows n0 + i < N and every element e of the net's
// rows (g: N x D, row-major, rows owned by the calling block). The caller has written smem.p (no
// barrier needed) and may write it again when this returns. Every thread calls it.
template <typename acc_t>
__device__ void add_tile_products(const Net<acc_t>& net, int rows, int n0, int m0, ProductSmem<acc_t>& smem,
                                  acc_t* g) {
  constexpr int kTile = TileShape<acc_t>::kTile, kMicro = TileShape<acc_t>::kMicro;
  const int tx = threadIdx.x % kSide, ty = threadIdx.x / kSide, dim = net.regions.dim;
  for (int j = threadIdx.x; j < kTile; j += kThreads) {
    const int m = m0 + j;
    smem.col_offset[j] = m < rows ? net.regions.row_offset(m) : 0;
    smem.col_inv[j] = m < rows ? net.scale(m) : acc_t(0);
  }
  __syncthreads();
  for (int e0 = 0; e0 < dim; e0 += kTile) {
    // u[j][e]: thread k loads element e = k % kTile of rows k / kTile + (kThreads / kTile) q
    const int e = threadIdx.x % kTile;
    const bool inside = e0 + e < dim;
    const int64_t element = inside ? net.regions.element_offset(e0 + e) : 0;
    for (int j = threadIdx.x / kTile; j < kTile; j += kThreads / kTile) {
      const bool valid = inside && m0 + j < rows;
      smem.u[j][e] = valid ? load_as<acc_t>(net.data, net.dtype, smem.col_offset[j] + element) * smem.col_inv[j]
                           : acc_t(0);
    }
    __syncthreads();
    acc_t acc[kMicro][kMicro] = {};
    for (int j = 0; j < kTile; ++j) {
      acc_t pv[kMicro], uv[kMicro];
#pragma unroll
      for (int i = 0; i < kMicro; ++i) {
        pv[i] = smem.p[ty + kSide * i][j];
        uv[i] = smem.u[j][tx + kSide * i];
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
        if (n < rows && el < dim) g[static_cast<int64_t>(n) * dim + el] += acc[i][k];
      }
    }
    __syncthreads();  // u (and, after the last chunk, p, col_offset, col_inv) are written again next
  }
}

// kernel<<<grid, kThreads>>>(args...) on the current stream.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, Args&&... args) {
  kernel<<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace gpu
}  // namespace kdfast
