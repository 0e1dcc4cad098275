// C++ CPU kernels of local correlation consistency (LCC, Li et al. 2020); formulas in
// kdfast/reference/lcc.py, descriptor layout in csrc/common.h (Regions).
//
// lcc_forward:  inv_norm[n] = 1 / max(||x[n]||, eps) of both networks, then the class sums of
//               (S_s - S_t)^2, S[n, m] = <u[n], u[m]>, u[n] = x[n] inv_norm[n], tile by tile: the
//               upper-triangle tiles only (S is symmetric), the off-diagonal ones counted twice
// lcc_backward: g[n] = 4 sum_m w(n, m) (S_s - S_t)[n, m] u_s[m] over the recomputed tiles of a row
//               block, w(n, m) = grad_sums[class(n, m)]; then the normalisation's backward
//               inv_s[n] (g[n] - u_s[n] <u_s[n], g[n]>) (inv_s[n] g[n] where the norm was clamped),
//               written to the region's map positions
//
// No N x N matrix is ever stored: a thread holds the normalised descriptors of one row block of
// kBlock rows (D x kBlock per network, element-major), kDepth elements of a column block at a time,
// two kBlock x kBlock tiles, and in the backward the row block's g (kBlock x Ds). The maps are read
// in place through their strides (any layout; f_t may have another dtype than f_s). Accumulation
// is in float (double for a double f_s). The work items are row blocks (the forward pairs row block
// r with T - 1 - r, T row blocks, so that every item has T + 1 tiles), and the forward's per-item
// sums are added in item order: the results do not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../common.h"

namespace kdfast {
namespace {

constexpr int64_t kBlock = 32;             // rows and columns of a tile
constexpr int64_t kDepth = 64;             // elements of a column block gathered at once
constexpr int64_t kGrainElements = 32768;  // at least this many elements per task of inverse_norms

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// f(p) with p the data of `t` as a pointer to its dtype (float16, bfloat16, float32 or float64).
template <typename F>
void visit_data(const at::Tensor& t, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "lcc_cpu",
                                  [&] { f(static_cast<scalar_t*>(t.data_ptr())); });
}

// Offsets in the map of a row's elements, relative to the row's first element.
std::vector<int64_t> element_offsets(const Regions& r) {
  std::vector<int64_t> offsets(r.dim);
  for (int64_t e = 0; e < r.dim; ++e) offsets[e] = r.element_offset(e);
  return offsets;
}

// One network's descriptors: its map, read in place, and their inverse norms.
template <typename acc_t>
struct Net {
  const at::Tensor& map;
  Regions regions;
  std::vector<int64_t> offsets;  // element_offsets(regions)
  const acc_t* inv_norm;         // (N,)
};

template <typename acc_t>
void inverse_norms(const Net<acc_t>& net, int64_t rows, acc_t* out) {
  const int64_t dim = net.regions.dim;
  visit_data(net.map, [&](const auto* x) {
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElements / dim), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const auto* row = x + net.regions.row_offset(n);
        acc_t sum = 0;
        for (int64_t e = 0; e < dim; ++e) {
          const acc_t v = static_cast<acc_t>(row[net.offsets[e]]);
          sum += v * v;
        }
        out[n] = lcc_inv_norm(sum);
      }
    });
  });
}

// u of rows [n0, n0 + rows) into out[e * kBlock + r] for every element e; rows r >= `rows` are 0.
template <typename acc_t>
void gather_rows(const Net<acc_t>& net, int64_t n0, int64_t rows, acc_t* out) {
  const int64_t dim = net.regions.dim;
  std::fill(out, out + dim * kBlock, acc_t(0));
  visit_data(net.map, [&](const auto* x) {
    for (int64_t r = 0; r < rows; ++r) {
      const auto* row = x + net.regions.row_offset(n0 + r);
      const acc_t inv = net.inv_norm[n0 + r];
      for (int64_t e = 0; e < dim; ++e) out[e * kBlock + r] = static_cast<acc_t>(row[net.offsets[e]]) * inv;
    }
  });
}

// u of columns [m0, m0 + cols), elements [e0, e0 + depth), into out[c * kDepth + e].
template <typename acc_t>
void gather_columns(const Net<acc_t>& net, int64_t m0, int64_t cols, int64_t e0, int64_t depth, acc_t* out) {
  const int64_t* offsets = net.offsets.data() + e0;
  visit_data(net.map, [&](const auto* x) {
    for (int64_t c = 0; c < cols; ++c) {
      const auto* row = x + net.regions.row_offset(m0 + c);
      const acc_t inv = net.inv_norm[m0 + c];
      for (int64_t e = 0; e < depth; ++e) out[c * kDepth + e] = static_cast<acc_t>(row[offsets[e]]) * inv;
    }
  });
}

// The inner loops below run over a contiguous, register- or L1-resident array (the rows of a tile
// column, a chunk of g's row): they vectorise without reassociating any sum. kDepth keeps a row
// block's chunk and a column chunk (2 x 8 KiB in float) in L1.

// tile[c * kBlock + r] = S[n0 + r, m0 + c] for c < cols and every r < kBlock, from the row block
// gathered by gather_rows; `chunk` is kBlock x kDepth scratch.
template <typename acc_t>
void correlation_tile(const Net<acc_t>& net, const acc_t* row_block, int64_t m0, int64_t cols, acc_t* chunk,
                      acc_t* tile) {
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
        for (int64_t r = 0; r < kBlock; ++r) sum[r] += v * rows[r];
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

// A thread's scratch and current row block: delta(m0, cols) leaves (S_s - S_t)[n0 + r, m0 + c] in
// tile_s[c * kBlock + r].
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

  void delta(int64_t m0, int64_t cols) {
    correlation_tile(s, rows_s.data(), m0, cols, chunk.data(), tile_s.data());
    correlation_tile(t, rows_t.data(), m0, cols, chunk.data(), tile_t.data());
    for (int64_t i = 0; i < kBlock * kBlock; ++i) tile_s[i] -= tile_t[i];
  }
};

template <typename acc_t>
void forward_sums(const Net<acc_t>& s, const Net<acc_t>& t, int64_t total_rows, acc_t* sums) {
  const int64_t blocks = ceil_div(total_rows, kBlock), items = (blocks + 1) / 2;
  const int64_t positions = s.regions.positions;
  std::vector<acc_t> partial(items * 3);
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    TileWorker<acc_t> w(s, t);
    for (int64_t item = begin; item < end; ++item) {
      acc_t item_sums[3] = {0, 0, 0};
      const int64_t row_blocks[2] = {item, blocks - 1 - item};
      for (int k = 0; k < (row_blocks[0] == row_blocks[1] ? 1 : 2); ++k) {
        const int64_t r = row_blocks[k];
        w.load_rows(r, total_rows);
        for (int64_t c = r; c < blocks; ++c) {
          const int64_t m0 = c * kBlock, cols = std::min(kBlock, total_rows - m0);
          w.delta(m0, cols);
          acc_t tile_sums[3] = {0, 0, 0};
          for (int64_t j = 0; j < cols; ++j) {
            for (int64_t i = 0; i < w.rows; ++i) {
              const acc_t d = w.tile_s[j * kBlock + i];
              tile_sums[lcc_pair_class(w.n0 + i, m0 + j, positions)] += d * d;
            }
          }
          const acc_t weight = c == r ? acc_t(1) : acc_t(2);  // tile (c, r) of the lower triangle
          for (int k2 = 0; k2 < 3; ++k2) item_sums[k2] += weight * tile_sums[k2];
        }
      }
      std::copy(item_sums, item_sums + 3, partial.begin() + item * 3);
    }
  });
  std::fill(sums, sums + 3, acc_t(0));
  for (int64_t item = 0; item < items; ++item) {
    for (int k = 0; k < 3; ++k) sums[k] += partial[item * 3 + k];
  }
}

template <typename acc_t>
void backward_rows(const Net<acc_t>& s, const Net<acc_t>& t, int64_t total_rows, const acc_t* grad_sums,
                   const at::Tensor& grad, const Regions& out) {
  const int64_t blocks = ceil_div(total_rows, kBlock), dim = s.regions.dim;
  const int64_t positions = s.regions.positions;
  const acc_t weight[3] = {4 * grad_sums[0], 4 * grad_sums[1], 4 * grad_sums[2]};
  const std::vector<int64_t> out_offsets = element_offsets(out);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    TileWorker<acc_t> w(s, t);
    std::vector<acc_t> g(kBlock * dim);  // g[r * D + e] of the row block
    for (int64_t r = begin; r < end; ++r) {
      w.load_rows(r, total_rows);
      std::fill(g.begin(), g.end(), acc_t(0));
      for (int64_t c = 0; c < blocks; ++c) {
        const int64_t m0 = c * kBlock, cols = std::min(kBlock, total_rows - m0);
        w.delta(m0, cols);
        for (int64_t j = 0; j < cols; ++j) {
          for (int64_t i = 0; i < w.rows; ++i) {
            w.tile_s[j * kBlock + i] *= weight[lcc_pair_class(w.n0 + i, m0 + j, positions)];
          }
        }
        // g[n0 + i] += sum_j tile_s[j, i] u_s[m0 + j] (rows past w.rows: tile_s = 0), kDepth elements at a time
        for (int64_t e0 = 0; e0 < dim; e0 += kDepth) {
          const int64_t depth = std::min(kDepth, dim - e0);
          gather_columns(s, m0, cols, e0, depth, w.chunk.data());
          add_products(w.tile_s.data(), w.chunk.data(), cols, depth, dim, e0, g.data());
        }
      }
      visit_data(grad, [&](auto* y) {
        using out_t = std::remove_pointer_t<decltype(y)>;
        for (int64_t i = 0; i < w.rows; ++i) {
          const int64_t n = w.n0 + i;
          const acc_t inv = s.inv_norm[n];
          const acc_t* gi = g.data() + i * dim;
          acc_t dot = 0;  // <u_s[n], g[n]>, 0 where the norm was clamped
          if (!lcc_norm_clamped(inv)) {
            for (int64_t e = 0; e < dim; ++e) dot += w.rows_s[e * kBlock + i] * gi[e];
          }
          out_t* row = y + out.row_offset(n);
          for (int64_t e = 0; e < dim; ++e) {
            row[out_offsets[e]] = static_cast<out_t>(inv * (gi[e] - w.rows_s[e * kBlock + i] * dot));
          }
        }
      });
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lcc_forward_cpu(const at::Tensor& f_s, const at::Tensor& f_t,
                                                               int64_t grid) {
  const LccMaps in = check_lcc_maps("lcc_forward", f_s, f_t, grid);
  const auto options = f_s.options().dtype(in.acc);
  at::Tensor sums = at::empty({3}, options);
  at::Tensor inv_s = at::empty({in.rows}, options), inv_t = at::empty({in.rows}, options);
  AT_DISPATCH_FLOATING_TYPES(in.acc, "lcc_forward_cpu", [&] {
    using acc_t = scalar_t;
    const Net<acc_t> s{f_s, in.s, element_offsets(in.s), inv_s.const_data_ptr<acc_t>()};
    const Net<acc_t> t{f_t, in.t, element_offsets(in.t), inv_t.const_data_ptr<acc_t>()};
    inverse_norms(s, in.rows, inv_s.mutable_data_ptr<acc_t>());
    inverse_norms(t, in.rows, inv_t.mutable_data_ptr<acc_t>());
    forward_sums(s, t, in.rows, sums.mutable_data_ptr<acc_t>());
  });
  return {sums, inv_s, inv_t};
}

at::Tensor lcc_backward_cpu(const at::Tensor& grad_sums, const at::Tensor& f_s, const at::Tensor& f_t,
                            const at::Tensor& inv_norm_s, const at::Tensor& inv_norm_t, int64_t grid) {
  const LccBackwardInputs in = check_lcc_backward(grad_sums, f_s, f_t, inv_norm_s, inv_norm_t, grid);
  at::Tensor grad = at::empty_like(f_s);
  const LccMaps& maps = in.maps;
  AT_DISPATCH_FLOATING_TYPES(maps.acc, "lcc_backward_cpu", [&] {
    using acc_t = scalar_t;
    const Net<acc_t> s{f_s, maps.s, element_offsets(maps.s), in.inv_norm_s.const_data_ptr<acc_t>()};
    const Net<acc_t> t{f_t, maps.t, element_offsets(maps.t), in.inv_norm_t.const_data_ptr<acc_t>()};
    backward_rows(s, t, maps.rows, in.grad_sums.const_data_ptr<acc_t>(), grad, regions_like(maps.s, grad));
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("lcc_forward", &lcc_forward_cpu);
  m.impl("lcc_backward", &lcc_backward_cpu);
}

}  // namespace kdfast
