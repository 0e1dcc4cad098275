// C++ CPU kernels of local correlation consistency (LCC, Li et al. 2020); formulas in
// kdfast/reference/lcc.py, descriptor layout in csrc/tiles.h (Regions), checks in csrc/lcc.h, tiles in csrc/cpu/tiles.h.
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

#include "../lcc.h"
#include "tiles.h"

namespace kdfast {
namespace {

using namespace cpu;

constexpr int64_t kGrainElements = 32768;  // at least this many elements per task of inverse_norms

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

// tile_s = (S_s - S_t)[n0 + r, m0 + c] of the worker's row block, S[n, m] = <u[n], u[m]>.
template <typename acc_t>
void delta(TileWorker<acc_t>& w, int64_t m0, int64_t cols) {
  w.tiles(m0, cols);
  for (int64_t i = 0; i < kBlock * kBlock; ++i) w.tile_s[i] -= w.tile_t[i];
}

template <typename acc_t>
void forward_sums(const Net<acc_t>& s, const Net<acc_t>& t, int64_t total_rows, acc_t* sums) {
  const int64_t blocks = ceil_div(total_rows, kBlock), items = upper_items(blocks);
  const int64_t positions = s.regions.positions;
  std::vector<acc_t> partial(items * 3);
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    TileWorker<acc_t> w(s, t);
    for (int64_t item = begin; item < end; ++item) {
      acc_t item_sums[3] = {0, 0, 0};
      for_item_row_blocks(item, blocks, [&](int64_t r) {
        w.load_rows(r, total_rows);
        for (int64_t c = r; c < blocks; ++c) {
          const int64_t m0 = c * kBlock, cols = std::min(kBlock, total_rows - m0);
          delta(w, m0, cols);
          acc_t tile_sums[3] = {0, 0, 0};
          for (int64_t j = 0; j < cols; ++j) {
            for (int64_t i = 0; i < w.rows; ++i) {
              const acc_t d = w.tile_s[j * kBlock + i];
              tile_sums[lcc_pair_class(w.n0 + i, m0 + j, positions)] += d * d;
            }
          }
          const acc_t weight = c == r ? acc_t(1) : acc_t(2);  // tile (c, r) of the lower triangle
          for (int k = 0; k < 3; ++k) item_sums[k] += weight * tile_sums[k];
        }
      });
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
        delta(w, m0, cols);
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
