// Tiles of row-pair products on the GPU, shared by the LCC, SP and RKD kernels. The rows of a
// matrix (the region descriptors of csrc/tiles.h's Regions, or a (B, D) matrix as a grid of 1) are
// read in place through their strides and combined tile by tile in the accumulation type acc_t
// (float; double for double inputs):
//
//   correlation_tile:  s[n0 + i][m0 + j] += sign sum_e combine(u[n0 + i][e], u[m0 + j][e])   (u = x * inv_norm per row)
//   product_tile:      o[n0 + i][e0 + j] = sum_m P(n0 + i, m) u[m][e0 + j]
//                      (or, kDifference: sum_m P(n0 + i, m) (u[n0 + i][e0 + j] - u[m][e0 + j]))
//
// and the kernels built on them: gram_kernel (the Gram matrices of a combine of two networks, B x B,
// upper tiles mirrored, split along the elements when B is small: launch_gram adds the splits in
// order) and product_kernel (P times the rows of a network, a 1-D grid of (64-row block, 64-element
// block) tiles: no grid dimension limit but 2^31 - 1 blocks, walked in a loop beyond that).
//
// A block of kThreads = 16 x 16 threads computes a kTile x kTile tile (64 in float, 32 in double);
// thread (tx, ty) = (t % 16, t / 16) holds the kMicro x kMicro block of rows ty kMicro + i and columns
// tx kMicro + j (4 x 4 in float, 2 x 2 in double). Both operands of a chunk of kDepth = 32 reduction
// steps sit in shared memory, step-major (operand[d][row]), so that a thread reads its kMicro rows
// and its kMicro columns of a step with two 16-byte loads and then does kMicro^2 FMAs; the chunks are
// double-buffered (the next chunk is written while the current one is read: one barrier per chunk).
// Every sum runs over e (or m) in one fixed order: the results do not depend on the block order.
//
// Tensor cores: correlation tiles of Product over a float16 or bfloat16 network (acc_t float) run
// on WMMA 16 x 16 x 16 with float accumulators: the raw 16-bit values x (not u) are multiplied, and
// the tile is scaled by inv_norm[n] inv_norm[m] afterwards. float32 inputs stay IEEE float FMAs (no
// TF32), float64 stays float64. The WMMA path needs sm_80 (bfloat16); in the host C++ emulation
// (csrc/emu/cuda_emu.h) a plain C++ stand-in of the four WMMA calls runs it (every lane holds a
// whole 16 x 16 fragment: the tile and pointer logic is exercised, not the fragment layout).
//
// The input dtypes (float16, bfloat16, float32, float64, one per network) are switched on at run
// time per load, so that the kernels are instantiated only for acc_t.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>

#include "../tiles.h"
#include "launch.cuh"
#include "reduce.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#define KDFAST_TENSOR_CORES 1
#elif !defined(__CUDACC__)  // host C++: the emulation
#define KDFAST_TENSOR_CORES 1
#else  // nvcc's host pass and GPUs before sm_80: the FMA path only
#define KDFAST_TENSOR_CORES 0
#endif

namespace kdfast {
namespace gpu {

constexpr int kSide = 16;                // threads per side of a tile: 16 x 16
constexpr int kThreads = kSide * kSide;  // threads per block of every kernel
constexpr int kDepth = 32;               // reduction steps of a shared-memory chunk
constexpr int64_t kMaxGrid = std::numeric_limits<int32_t>::max();  // blocks of a 1-D grid, at most

// Each thread holds the kMicro x kMicro block of a tile at rows row(i), columns col(j).
template <typename acc_t>
struct TileShape {
  static constexpr int kMicro = sizeof(acc_t) == sizeof(float) ? 4 : 2;
  static constexpr int kTile = kSide * kMicro;             // 64 (float), 32 (double)
  static constexpr int kLine = kTile + 16 / sizeof(acc_t);  // a chunk's row: 16-byte aligned, banks shifted

  __device__ static int row(int i) { return static_cast<int>(threadIdx.x) / kSide * kMicro + i; }
  __device__ static int col(int j) { return static_cast<int>(threadIdx.x) % kSide * kMicro + j; }
};

// kMicro consecutive values of a chunk row: one 16-byte shared-memory load.
template <typename acc_t>
struct alignas(16) MicroVector {
  acc_t v[TileShape<acc_t>::kMicro];
};

template <typename acc_t>
using Micro = acc_t[TileShape<acc_t>::kMicro][TileShape<acc_t>::kMicro];

KDFAST_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

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
inline Dtype dtype_of_acc() {
  return std::is_same_v<acc_t, double> ? Dtype::kDouble : Dtype::kFloat;
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

// Both operands of a chunk: chunk[0][d][r] (rows of the tile), chunk[1][d][c] (its columns).
template <typename acc_t>
using Chunk = acc_t[2][kDepth][TileShape<acc_t>::kLine];

// A chunk of raw 16-bit values for the tensor cores: [operand][row][d], rows of kDepth + 8 (WMMA's
// ldm: a multiple of 8; every 16 x 16 fragment starts 32-byte aligned).
constexpr int kTcLine = kDepth + 8;
using TcChunk = uint16_t[2][64][kTcLine];
constexpr int kTcOutLine = 64 + 4;  // the float tile the accumulators are stored to

template <typename acc_t>
struct TileSmem {
  union Buffers {
    Chunk<acc_t> chunk[2];          // double-buffered chunks of the FMA path
    TcChunk tc[2];                  // double-buffered chunks of the tensor-core path
    float tc_out[64][kTcOutLine];   // the tensor-core tile, read back by micro-tile
  };
  alignas(32) Buffers buf;
  int64_t offset[2][TileShape<acc_t>::kTile];  // where the tile's rows (0) and columns (1) start; -1 past N
  acc_t inv[2][TileShape<acc_t>::kTile];       // their scales, 0 past N
};

// The loop of a tile over `chunks` chunks: load(k, chunk) writes both operands of chunk k (every
// thread calls it; it may read shared memory written before the call), then step(a, b) runs for
// every step d of the chunk with the thread's rows a = chunk[0][d][row(0..)] and columns
// b = chunk[1][d][col(0..)]. Ends with a barrier: the buffers may be written again. Every thread calls it.
template <typename acc_t, typename Load, typename Step>
__device__ __forceinline__ void chunk_loop(int chunks, Chunk<acc_t> (&buffers)[2], Load&& load, Step&& step) {
  using Shape = TileShape<acc_t>;
  using Vector = MicroVector<acc_t>;
  if (chunks > 0) load(0, buffers[0]);
  __syncthreads();
  for (int k = 0; k < chunks; ++k) {
    if (k + 1 < chunks) load(k + 1, buffers[(k + 1) & 1]);  // the other buffer: read two barriers ago
    const Chunk<acc_t>& chunk = buffers[k & 1];
#pragma unroll
    for (int d = 0; d < kDepth; ++d) {
      const Vector a = *reinterpret_cast<const Vector*>(&chunk[0][d][Shape::row(0)]);
      const Vector b = *reinterpret_cast<const Vector*>(&chunk[1][d][Shape::col(0)]);
      step(a.v, b.v);
    }
    __syncthreads();
  }
}

// The chunk positions that thread t writes: row-operand layout (16 consecutive threads read 16
// consecutive steps d of a row): rows t / 16 + 16 a, steps t % 16 + 16 b; line layout (16
// consecutive threads read 16 consecutive lines): lines t % 16 + 16 a, steps t / 16 + 16 b.
// a < kMicro, b < 2: kTile kDepth / kThreads positions per thread.
template <typename acc_t>
struct ChunkPositions {
  static constexpr int kLines = TileShape<acc_t>::kMicro, kSteps = 2;
  __device__ static int by_step_line(int a) { return static_cast<int>(threadIdx.x) / 16 + 16 * a; }
  __device__ static int by_step_step(int b) { return static_cast<int>(threadIdx.x) % 16 + 16 * b; }
  __device__ static int by_line_line(int a) { return static_cast<int>(threadIdx.x) % 16 + 16 * a; }
  __device__ static int by_line_step(int b) { return static_cast<int>(threadIdx.x) / 16 + 16 * b; }
};

// smem.offset / smem.inv of the rows n0 + r (operand 0, scales times `sign`) and m0 + r (operand 1),
// then a barrier.
template <typename acc_t>
__device__ void load_tile_rows(const Net<acc_t>& net, int rows, int n0, int m0, acc_t sign, TileSmem<acc_t>& smem) {
  constexpr int kTile = TileShape<acc_t>::kTile;
  for (int k = threadIdx.x; k < 2 * kTile; k += kThreads) {
    const int op = k / kTile, r = k % kTile, n = (op == 0 ? n0 : m0) + r;
    smem.offset[op][r] = n < rows ? net.regions.row_offset(n) : -1;
    smem.inv[op][r] = n < rows ? (op == 0 ? sign : acc_t(1)) * net.scale(n) : acc_t(0);
  }
  __syncthreads();
}

// put(op, r, d, index) for every (operand op, tile line r, depth d) element that the thread loads
// of chunk k of the elements [e_begin, e_end) (ChunkPositions' row-operand order): index is the
// element's offset in net.data, -1 past e_end or for a tile line past N (smem.offset < 0).
template <typename acc_t, typename Put>
__device__ __forceinline__ void for_chunk_elements(const Net<acc_t>& net, const TileSmem<acc_t>& smem, int e_begin,
                                                   int e_end, int k, Put put) {
  using Positions = ChunkPositions<acc_t>;
#pragma unroll
  for (int b = 0; b < Positions::kSteps; ++b) {
    const int d = Positions::by_step_step(b), e = e_begin + k * kDepth + d;
    const bool inside = e < e_end;
    const int64_t element = inside ? net.regions.element_offset(e) : 0;
#pragma unroll
    for (int a = 0; a < Positions::kLines; ++a) {
      const int r = Positions::by_step_line(a);
#pragma unroll
      for (int op = 0; op < 2; ++op) {
        const int64_t row = smem.offset[op][r];
        put(op, r, d, inside && row >= 0 ? row + element : int64_t(-1));
      }
    }
  }
}

#if KDFAST_TENSOR_CORES
namespace tc {
#if defined(__CUDA_ARCH__)
namespace wmma = nvcuda::wmma;
using half_t = __half;
using bfloat16_t = __nv_bfloat16;
#else
// The emulation's stand-in of the WMMA calls used here: every lane holds the whole 16 x 16 fragment
// in float; each call is a warp operation (all 32 lanes, as on the GPU).
using half_t = c10::Half;
using bfloat16_t = c10::BFloat16;
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  float x[16][16];
};

template <typename Use, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  __syncwarp();
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c) {
      f.x[r][c] = static_cast<float>(std::is_same_v<Layout, row_major> ? p[r * ldm + c] : p[c * ldm + r]);
    }
  }
}

template <typename T>
inline void fill_fragment(fragment<accumulator, 16, 16, 16, T>& f, float v) {
  for (auto& row : f.x) std::fill(row, row + 16, v);
}

template <typename T, typename La, typename Lb>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, La>& a,
                     const fragment<matrix_b, 16, 16, 16, T, Lb>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
  __syncwarp();
  fragment<accumulator, 16, 16, 16, float> out;
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 16; ++j) {
      float v = c.x[i][j];
      for (int k = 0; k < 16; ++k) v += a.x[i][k] * b.x[k][j];
      out.x[i][j] = v;
    }
  }
  d = out;
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm, layout_t) {
  __syncwarp();
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c) p[r * ldm + c] = f.x[r][c];
  }
}
}  // namespace wmma
#endif

// s += the Product tile of the raw 16-bit rows (T: half_t or bfloat16_t) over elements
// [e_begin, e_end), scaled by smem.inv of its rows and columns (acc_t float, kTile 64). Warp w
// computes the 16 x 32 block at rows 16 (w % 4), columns 32 (w / 4). Every thread calls it, after
// load_tile_rows.
template <typename T>
__device__ void correlation_tile_tc(const Net<float>& net, int e_begin, int e_end, TileSmem<float>& smem,
                                    Micro<float>& s) {
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize, wr = 16 * (warp % 4), wc = 32 * (warp / 4);
  const uint16_t* data = static_cast<const uint16_t*>(net.data);
  auto load = [&](int k, TcChunk& chunk) {
    for_chunk_elements(net, smem, e_begin, e_end, k, [&](int op, int r, int d, int64_t index) {
      chunk[op][r][d] = index >= 0 ? data[index] : uint16_t(0);
    });
  };
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
  wmma::fill_fragment(acc[0], 0.0f);
  wmma::fill_fragment(acc[1], 0.0f);
  const int chunks = static_cast<int>(ceil_div(e_end - e_begin, kDepth));
  if (chunks > 0) load(0, smem.buf.tc[0]);
  __syncthreads();
  for (int k = 0; k < chunks; ++k) {
    if (k + 1 < chunks) load(k + 1, smem.buf.tc[(k + 1) & 1]);
    const TcChunk& chunk = smem.buf.tc[k & 1];
#pragma unroll
    for (int kk = 0; kk < kDepth; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::load_matrix_sync(a, reinterpret_cast<const T*>(&chunk[0][wr][kk]), kTcLine);
#pragma unroll
      for (int f = 0; f < 2; ++f) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;  // B[k][c] = column c's element k
        wmma::load_matrix_sync(b, reinterpret_cast<const T*>(&chunk[1][wc + 16 * f][kk]), kTcLine);
        wmma::mma_sync(acc[f], a, b, acc[f]);
      }
    }
    __syncthreads();
  }
  for (int f = 0; f < 2; ++f) {
    wmma::store_matrix_sync(&smem.buf.tc_out[wr][wc + 16 * f], acc[f], kTcOutLine, wmma::mem_row_major);
  }
  __syncthreads();
  using Shape = TileShape<float>;
  const MicroVector<float> inv_c = *reinterpret_cast<const MicroVector<float>*>(&smem.inv[1][Shape::col(0)]);
#pragma unroll
  for (int i = 0; i < Shape::kMicro; ++i) {
    const float* row = &smem.buf.tc_out[Shape::row(i)][Shape::col(0)];
    const MicroVector<float> v = *reinterpret_cast<const MicroVector<float>*>(row);
    const float inv_r = smem.inv[0][Shape::row(i)];
#pragma unroll
    for (int j = 0; j < Shape::kMicro; ++j) s[i][j] += v.v[j] * (inv_r * inv_c.v[j]);
  }
  __syncthreads();  // tc_out and smem.offset / smem.inv are written again next
}
}  // namespace tc
#endif

// s[i][j] += sign sum_{e in [e_begin, e_end)} combine(u[n0 + row(i)][e], u[m0 + col(j)][e]) of one
// network, rows past N read as 0 (combine: csrc/tiles.h's Product or SquaredDifference; sign -1:
// Product only, as the row operand's scale). Every thread calls it.
template <typename acc_t, typename Combine = Product>
__device__ void correlation_tile(const Net<acc_t>& net, int rows, int n0, int m0, int e_begin, int e_end,
                                 TileSmem<acc_t>& smem, Micro<acc_t>& s, Combine combine = Combine(),
                                 acc_t sign = acc_t(1)) {
  constexpr int kMicro = TileShape<acc_t>::kMicro;
  load_tile_rows(net, rows, n0, m0, sign, smem);
#if KDFAST_TENSOR_CORES
  if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<Combine, Product>) {
    if (net.dtype == Dtype::kHalf) return tc::correlation_tile_tc<tc::half_t>(net, e_begin, e_end, smem, s);
    if (net.dtype == Dtype::kBFloat16) return tc::correlation_tile_tc<tc::bfloat16_t>(net, e_begin, e_end, smem, s);
  }
#endif
  auto load = [&](int k, Chunk<acc_t>& chunk) {
    for_chunk_elements(net, smem, e_begin, e_end, k, [&](int op, int r, int d, int64_t index) {
      chunk[op][d][r] = index >= 0 ? load_as<acc_t>(net.data, net.dtype, index) * smem.inv[op][r] : acc_t(0);
    });
  };
  auto step = [&](const acc_t (&a)[kMicro], const acc_t (&b)[kMicro]) {
#pragma unroll
    for (int i = 0; i < kMicro; ++i) {
#pragma unroll
      for (int j = 0; j < kMicro; ++j) s[i][j] += combine(a[i], b[j]);
    }
  };
  chunk_loop<acc_t>(static_cast<int>(ceil_div(e_end - e_begin, kDepth)), smem.buf.chunk, load, step);
}

// The same over all the elements of the rows.
template <typename acc_t, typename Combine = Product>
__device__ void correlation_tile(const Net<acc_t>& net, int rows, int n0, int m0, TileSmem<acc_t>& smem,
                                 Micro<acc_t>& s, Combine combine = Combine(), acc_t sign = acc_t(1)) {
  correlation_tile(net, rows, n0, m0, 0, net.regions.dim, smem, s, combine, sign);
}

template <typename acc_t>
__device__ __forceinline__ void zero(Micro<acc_t>& s) {
#pragma unroll
  for (int i = 0; i < TileShape<acc_t>::kMicro; ++i) {
#pragma unroll
    for (int j = 0; j < TileShape<acc_t>::kMicro; ++j) s[i][j] = 0;
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

// Entries P(n, m) of a symmetric N x N matrix of which the rows [base, stripe_end) are stored,
// from column `base` on: data[(n - base) ld + (m - base)]. Rows n past the stripe read their
// entries of the stripe's columns through the symmetry, P(n, m) = data[(m - base) ld + (n - base)].
// A whole matrix: base 0, stripe_end = ld = N.
template <typename acc_t>
struct Weights {
  const acc_t* data;
  int64_t ld;
  int base, stripe_end, rows;

  // The m range of the rows of a tile from n0: [base, N) in the stripe, [base, stripe_end) past it.
  __device__ int m_end(int n0) const { return n0 < stripe_end ? rows : stripe_end; }
};

// Where product_tile writes: out[n ld + e] = scale * o (in `dtype`), or out[n ld + e] += scale * o
// (`accumulate`: out is acc_t).
template <typename acc_t>
struct Output {
  void* data;
  Dtype dtype;
  int64_t ld;
  acc_t scale;
  bool accumulate;
};

// o[i][j] = sum_{m in [w.base, w.m_end(n0))} P(n, m) u[m][e] for n = n0 + row(i), e = e0 + col(j) (u:
// the rows of `net`), or with kDifference P(n, m) (u[n][e] - u[m][e]); 0 past N or D. smem.offset[0]
// holds the element offsets of the tile's columns (load_columns). Every thread calls it.
template <bool kDifference, typename acc_t>
__device__ void product_tile(const Weights<acc_t>& w, const Net<acc_t>& net, int n0, int e0, TileSmem<acc_t>& smem,
                             Micro<acc_t>& o) {
  using Shape = TileShape<acc_t>;
  using Positions = ChunkPositions<acc_t>;
  constexpr int kMicro = Shape::kMicro;
  const int m_begin = w.base, m_end = w.m_end(n0);
  const bool direct = n0 < w.stripe_end;
  Micro<acc_t> own;  // u[n][e] of the thread's entries (kDifference)
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    const int n = n0 + Shape::row(i);
    const bool row_inside = n < w.rows;
    const int64_t row = row_inside ? net.regions.row_offset(n) : 0;
    const acc_t inv = row_inside ? net.scale(n) : acc_t(0);
#pragma unroll
    for (int j = 0; j < kMicro; ++j) {
      o[i][j] = 0;
      if constexpr (kDifference) {
        const int64_t element = smem.offset[0][Shape::col(j)];
        own[i][j] = row_inside && element >= 0 ? load_as<acc_t>(net.data, net.dtype, row + element) * inv : acc_t(0);
      }
    }
  }
  auto load = [&](int k, Chunk<acc_t>& chunk) {
    const int m0 = m_begin + k * kDepth;
    // operand 0: chunk[0][d][r] = P(n0 + r, m0 + d)
#pragma unroll
    for (int b = 0; b < Positions::kSteps; ++b) {
#pragma unroll
      for (int a = 0; a < Positions::kLines; ++a) {
        const int d = direct ? Positions::by_step_step(b) : Positions::by_line_step(b);
        const int r = direct ? Positions::by_step_line(a) : Positions::by_line_line(a);
        const int n = n0 + r, m = m0 + d;
        const int64_t at = direct ? (n - w.base) * w.ld + (m - w.base) : (m - w.base) * w.ld + (n - w.base);
        chunk[0][d][r] = n < w.rows && m < m_end ? w.data[at] : acc_t(0);
      }
    }
    // operand 1: chunk[1][d][c] = u[m0 + d][e0 + c]
#pragma unroll
    for (int b = 0; b < Positions::kSteps; ++b) {
      const int d = Positions::by_line_step(b), m = m0 + d;
      const bool row_inside = m < m_end;
      const int64_t row = row_inside ? net.regions.row_offset(m) : 0;
      const acc_t inv = row_inside ? net.scale(m) : acc_t(0);
#pragma unroll
      for (int a = 0; a < Positions::kLines; ++a) {
        const int c = Positions::by_line_line(a);
        const int64_t element = smem.offset[0][c];
        chunk[1][d][c] =
            row_inside && element >= 0 ? load_as<acc_t>(net.data, net.dtype, row + element) * inv : acc_t(0);
      }
    }
  };
  auto step = [&](const acc_t (&p)[kMicro], const acc_t (&u)[kMicro]) {
#pragma unroll
    for (int i = 0; i < kMicro; ++i) {
#pragma unroll
      for (int j = 0; j < kMicro; ++j) {
        if constexpr (kDifference) {
          o[i][j] += p[i] * (own[i][j] - u[j]);
        } else {
          o[i][j] += p[i] * u[j];
        }
      }
    }
  };
  chunk_loop<acc_t>(static_cast<int>(ceil_div(m_end - m_begin, kDepth)), smem.buf.chunk, load, step);
}

// smem.offset[0][c] = the element offset of element e0 + c of the net's rows (-1 past D), then a barrier.
template <typename acc_t>
__device__ void load_columns(const Regions& regions, int e0, TileSmem<acc_t>& smem) {
  for (int c = threadIdx.x; c < TileShape<acc_t>::kTile; c += kThreads) {
    smem.offset[0][c] = e0 + c < regions.dim ? regions.element_offset(e0 + c) : -1;
  }
  __syncthreads();
}

// out = scale o of product_tile for the tiles (row block q >= first_block, element block) t =
// (q - first_block) element_blocks + element block, tiles walked by a 1-D grid.
template <bool kDifference, typename acc_t>
__global__ void __launch_bounds__(kThreads) product_kernel(const Weights<acc_t> w, const Net<acc_t> net,
                                                           int first_block, int64_t tiles, const Output<acc_t> out) {
  using Shape = TileShape<acc_t>;
  __shared__ TileSmem<acc_t> smem;
  const int dim = net.regions.dim;
  const int64_t element_blocks = ceil_div(dim, Shape::kTile);
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int n0 = static_cast<int>((first_block + t / element_blocks) * Shape::kTile);
    const int e0 = static_cast<int>(t % element_blocks * Shape::kTile);
    load_columns(net.regions, e0, smem);
    Micro<acc_t> o;
    product_tile<kDifference>(w, net, n0, e0, smem, o);
#pragma unroll
    for (int i = 0; i < Shape::kMicro; ++i) {
#pragma unroll
      for (int j = 0; j < Shape::kMicro; ++j) {
        const int n = n0 + Shape::row(i), e = e0 + Shape::col(j);
        if (n < w.rows && e < dim) {
          const int64_t at = n * out.ld + e;
          if (out.accumulate) {
            static_cast<acc_t*>(out.data)[at] += out.scale * o[i][j];
          } else {
            store(out.data, out.dtype, at, out.scale * o[i][j]);
          }
        }
      }
    }
  }
}

// The partial Gram matrices of both networks over a split of the elements: for the upper tile
// (r, c) = blockIdx.x, split = blockIdx.y and network = blockIdx.z,
// gram[split][net][a][b] = gram[split][net][b][a] = sum_{e in the split's elements} combine(u_a[e], u_b[e])
// (bitwise symmetric: each pair is written by one thread). A split covers the elements
// [split span, (split + 1) span), span = ceil(D / splits) rounded up to kDepth.
template <typename acc_t, typename Combine>
__global__ void __launch_bounds__(kThreads) gram_kernel(const Net<acc_t> s, const Net<acc_t> t, int rows,
                                                        acc_t* gram) {
  using Shape = TileShape<acc_t>;
  constexpr int kTile = Shape::kTile;
  __shared__ TileSmem<acc_t> smem;
  const int split = blockIdx.y, splits = gridDim.y, net = blockIdx.z;
  int r, c;
  upper_tile(blockIdx.x, r, c);
  Micro<acc_t> tile;
  zero(tile);
  auto add_split = [&](const Net<acc_t>& x) {
    const int64_t dim = x.regions.dim, span = ceil_div(ceil_div(dim, splits), kDepth) * kDepth;
    const int64_t begin = std::min(split * span, dim), end = std::min(begin + span, dim);
    correlation_tile(x, rows, r * kTile, c * kTile, static_cast<int>(begin), static_cast<int>(end), smem, tile,
                     Combine());
  };
  if (net == 0) {  // uniform over the block; one call per network keeps the Net in parameter space
    add_split(s);
  } else {
    add_split(t);
  }
  acc_t* out = gram + (static_cast<int64_t>(split) * 2 + net) * rows * rows;
#pragma unroll
  for (int i = 0; i < Shape::kMicro; ++i) {
#pragma unroll
    for (int j = 0; j < Shape::kMicro; ++j) {
      const int a = r * kTile + Shape::row(i), b = c * kTile + Shape::col(j);
      if (a < rows && b < rows && (r != c || a <= b)) {
        out[static_cast<int64_t>(a) * rows + b] = out[static_cast<int64_t>(b) * rows + a] = tile[i][j];
      }
    }
  }
}

// out[i] = sum_k parts[k size + i], k < splits, in that order, written in `out_dtype`: the partial
// results of splits, added.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) sum_splits_kernel(const acc_t* parts, int splits, int64_t size, void* out,
                                                              Dtype out_dtype) {
  for (int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x; i < size; i += int64_t(gridDim.x) * kThreads) {
    acc_t v = 0;
    for (int k = 0; k < splits; ++k) v += parts[k * size + i];
    store(out, out_dtype, i, v);
  }
}

// kernel<<<grid, kThreads>>>(args...) on the current stream.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, Args&&... args) {
  launch_kernel(kernel, grid, kThreads, 0, c10::cuda::getCurrentCUDAStream(), std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

constexpr int64_t kTargetBlocks = 264;        // blocks that splitting aims at (2 per SM of a 132-SM H100/H200)
constexpr int64_t kMinSplitSpan = 8 * kDepth;  // elements of a split of gram_kernel, at least
constexpr int64_t kSumBlocks = 4096;           // blocks of sum_splits_kernel, at most

// The splits of the elements for gram_kernel over `tiles` tiles of two networks of `dim` elements
// (the larger): enough blocks for a GPU when B is small.
inline int gram_splits(int64_t tiles, int dim) {
  return static_cast<int>(std::clamp<int64_t>(ceil_div(kTargetBlocks, 2 * tiles), 1,
                                              std::max<int64_t>(1, ceil_div(dim, kMinSplitSpan))));
}

// gram (2, B, B), acc_t, contiguous) = both networks' Gram matrices of `Combine` (gram_kernel over
// gram_splits splits, added in split order by sum_splits_kernel when there are several).
template <typename acc_t, typename Combine>
void launch_gram(const Net<acc_t>& s, const Net<acc_t>& t, int rows, const at::Tensor& gram) {
  const int64_t blocks = ceil_div(rows, TileShape<acc_t>::kTile), tiles = blocks * (blocks + 1) / 2;
  const int splits = gram_splits(tiles, std::max(s.regions.dim, t.regions.dim));
  if (splits == 1) {
    launch(gram_kernel<acc_t, Combine>, dim3(tiles, 1, 2), s, t, rows, gram.mutable_data_ptr<acc_t>());
    return;
  }
  const at::Tensor parts = at::empty({splits, 2, rows, rows}, gram.options());
  launch(gram_kernel<acc_t, Combine>, dim3(tiles, splits, 2), s, t, rows, parts.mutable_data_ptr<acc_t>());
  const int64_t size = gram.numel();
  launch(sum_splits_kernel<acc_t>, dim3(std::min(ceil_div(size, kThreads), kSumBlocks)), parts.const_data_ptr<acc_t>(),
         splits, size, gram.mutable_data_ptr(), dtype_of_acc<acc_t>());
}

// product_kernel over the row blocks from `first_block` and every element block of the net's rows.
template <bool kDifference, typename acc_t>
void launch_product(const Weights<acc_t>& w, const Net<acc_t>& net, int first_block, const Output<acc_t>& out) {
  const int64_t row_blocks = ceil_div(w.rows, TileShape<acc_t>::kTile) - first_block;
  const int64_t tiles = row_blocks * ceil_div(net.regions.dim, TileShape<acc_t>::kTile);
  launch(product_kernel<kDifference, acc_t>, dim3(std::min(tiles, kMaxGrid)), w, net, first_block, tiles, out);
}

}  // namespace gpu
}  // namespace kdfast
