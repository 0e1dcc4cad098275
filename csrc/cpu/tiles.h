// Tiles of row-pair reductions on the CPU, shared by the LCC, SP and RKD kernels: the rows of a
// matrix (the region descriptors of csrc/tiles.h's Regions, or a (B, D) matrix as a grid of 1) are
// read in place through their strides, in any floating dtype, and combined tile by tile in the
// accumulation type acc_t, never as a whole N x N matrix:
//
//   tile[c * kBlock + r] = sum_e combine(u[n0 + r][e], u[m0 + c][e])   (u = x * inv_norm per row)
//
// A worker (TileWorker) holds the rows of one row block of kBlock rows (D x kBlock, element-major)
// and gathers kDepth elements of a column block at a time; every sum runs over e in one fixed
// order, so that a tile does not depend on the thread that computes it, and combine(a, b) ==
// combine(b, a) makes the (n, m) and (m, n) entries bitwise equal.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../tiles.h"

namespace kdfast {
namespace cpu {

constexpr int64_t kBlock = 32;  // rows and columns of a tile
constexpr int64_t kDepth = 64;  // elements of a column block gathered at once

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// f(p) with p the data of `t` as a pointer to its dtype (float16, bfloat16, float32 or float64).
template <typename F>
void visit_data(const at::Tensor& t, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "kdfast_cpu",
                                  [&] { f(static_cast<scalar_t*>(t.data_ptr())); });
}

// Offsets in the map of a row's elements, relative to the row's first element.
inline std::vector<int64_t> element_offsets(const Regions& r) {
  std::vector<int64_t> offsets(r.dim);
  for (int64_t e = 0; e < r.dim; ++e) offsets[e] = r.element_offset(e);
  return offsets;
}

// The rows of one network: its map, read in place, and the rows' scales.
template <typename acc_t>
struct Net {
  const at::Tensor& map;
  Regions regions;
  std::vector<int64_t> offsets;  // element_offsets(regions)
  const acc_t* inv_norm;         // (N,) scales of the rows; nullptr: the rows as they are

  acc_t scale(int64_t n) const { return inv_norm == nullptr ? acc_t(1) : inv_norm[n]; }
};

// u of rows [n0, n0 + rows) into out[e * kBlock + r] for every element e; rows r >= `rows` are 0.
template <typename acc_t>
void gather_rows(const Net<acc_t>& net, int64_t n0, int64_t rows, acc_t* out) {
  const int64_t dim = net.regions.dim;
  std::fill(out, out + dim * kBlock, acc_t(0));
  visit_data(net.map, [&](const auto* x) {
    for (int64_t r = 0; r < rows; ++r) {
      const auto* row = x + net.regions.row_offset(n0 + r);
      const acc_t inv = net.scale(n0 + r);
      for (int64_t e = 0; e < dim; ++e) out[e * kBlock + r] = static_cast<acc_t>(row[net.offsets[e]]) * inv;
    }
  });
}

// u of rows [m0, m0 + cols), elements [e0, e0 + depth), into out[c * kDepth + e] (row-major).
template <typename acc_t>
void gather_columns(const Net<acc_t>& net, int64_t m0, int64_t cols, int64_t e0, int64_t depth, acc_t* out) {
  const int64_t* offsets = net.offsets.data() + e0;
  visit_data(net.map, [&](const auto* x) {
    for (int64_t c = 0; c < cols; ++c) {
      const auto* row = x + net.regions.row_offset(m0 + c);
      const acc_t inv = net.scale(m0 + c);
      for (int64_t e = 0; e < depth; ++e) out[c * kDepth + e] = static_cast<acc_t>(row[offsets[e]]) * inv;
    }
  });
}

// The inner loops below run over a contiguous, register- or L1-resident array (the rows of a tile
// column, a chunk of g's row): they vectorise without reassociating any sum. kDepth keeps a row
// block's chunk and a column chunk (2 x 8 KiB in float) in L1.

// tile[c * kBlock + r] = sum_e combine(u[n0 + r][e], u[m0 + c][e]) for c < cols and every r < kBlock,
// from the row block gathered by gather_rows (combine: csrc/tiles.h's Product or SquaredDifference);
// `chunk` is kBlock x kDepth scratch.
template <typename acc_t, typename Combine>
void row_block_tile(const Net<acc_t>& net, const acc_t* row_block, int64_t m0, int64_t cols, acc_t* chunk,
                    acc_t* tile, Combine combine) {
  const int64_t dim = net.regions.dim;
  std::fill(tile, tile + kBlock * kBlock, acc_t(0));
  for (int64_t e0 = 0; e0 < dim; e0 += kDepth) {
    const int64_t depth = std::min(kDepth, dim - e0);
    gather_columns(net, m0, cols, e0, depth, chunk);
    for (int64_t c = 0; c < cols; ++c) {
      acc_t sum[kBlock];
      std::copy_n(tile + c * kBlock, kBlock, sum);
      const acc_t* column = chunk + c * kDepth;
      for (int64_t e = 0; e < depth; ++e) {
        const acc_t v = column[e];
        const acc_t* rows = row_block + (e0 + e) * kBlock;
        for (int64_t r = 0; r < kBlock; ++r) sum[r] += combine(rows[r], v);
      }
      std::copy_n(sum, kBlock, tile + c * kBlock);
    }
  }
}

// g[i * dim + e0 + e] += sum_{j < cols} p[j * kBlock + i] chunk[j * kDepth + e], i < kBlock, e < depth.
template <typename acc_t>
void add_products(const acc_t* p, const acc_t* chunk, int64_t cols, int64_t depth, int64_t dim, int64_t e0,
                  acc_t* g) {
  for (int64_t i = 0; i < kBlock; ++i) {
    acc_t sum[kDepth];
    acc_t* gi = g + i * dim + e0;
    std::copy_n(gi, depth, sum);
    for (int64_t j = 0; j < cols; ++j) {
      const acc_t pij = p[j * kBlock + i];
      const acc_t* column = chunk + j * kDepth;
      for (int64_t e = 0; e < depth; ++e) sum[e] += pij * column[e];
    }
    std::copy_n(sum, depth, gi);
  }
}

// A thread's scratch and current row block of both networks: tiles(m0, cols, combine) leaves the
// (n0 + r, m0 + c) entries of the student's and the teacher's tiles in tile_s and tile_t.
template <typename acc_t>
struct TileWorker {
  const Net<acc_t>& s;
  const Net<acc_t>& t;
  std::vector<acc_t> rows_s, rows_t;  // u of the row block, element-major (D x kBlock)
  std::vector<acc_t> chunk, tile_s, tile_t;
  int64_t n0 = 0, rows = 0;

  TileWorker(const Net<acc_t>& s_, const Net<acc_t>& t_)
      : s(s_),
        t(t_),
        rows_s(s_.regions.dim * kBlock),
        rows_t(t_.regions.dim * kBlock),
        chunk(kBlock * kDepth),
        tile_s(kBlock * kBlock),
        tile_t(kBlock * kBlock) {}

  void load_rows(int64_t block, int64_t total_rows) {
    n0 = block * kBlock;
    rows = std::min(kBlock, total_rows - n0);
    gather_rows(s, n0, rows, rows_s.data());
    gather_rows(t, n0, rows, rows_t.data());
  }

  template <typename Combine = Product>
  void tiles(int64_t m0, int64_t cols, Combine combine = Combine()) {
    row_block_tile(s, rows_s.data(), m0, cols, chunk.data(), tile_s.data(), combine);
    row_block_tile(t, rows_t.data(), m0, cols, chunk.data(), tile_t.data(), combine);
  }
};

// The upper-triangle tiles (r, c >= r) of `blocks` row blocks as (blocks + 1) / 2 work items of
// blocks + 1 tiles each: item pairs row block `item` with row block `blocks - 1 - item`.
inline int64_t upper_items(int64_t blocks) { return (blocks + 1) / 2; }

// fn(r) for the row blocks r of work item `item`.
template <typename F>
void for_item_row_blocks(int64_t item, int64_t blocks, F&& fn) {
  fn(item);
  if (blocks - 1 - item != item) fn(blocks - 1 - item);
}

}  // namespace cpu
}  // namespace kdfast
