// C++ CPU kernels of the similarity-preserving loss (SP, Tung & Mori 2019): the op contract of
// kdfast/ops/sp.py with the algorithm of kernels/sp.py. With S = X X^T per network, n_i = ||S[i]||,
// inv_i = 1 / max(n_i, eps) and G = diag(inv) S:
//
// sp_forward:  per row block of kBlock rows i, the column tiles j of S_s and S_t are computed
//              twice from X (csrc/cpu/tiles.h): pass 1 the row norms, pass 2 the loss rows
//              sum_j (G_s - G_t)_ij^2 and proj_i = sum_j G_s_ij (G_s - G_t)_ij (0 where
//              n_s_i < eps); loss = sum_i loss_i / B^2, stats[i] = [inv_s, inv_t, proj]
// sp_backward: per row block, the recomputed tiles give M_ij = (a_i + a_j) S_s_ij - (b_i + b_j) S_t_ij,
//              a = k inv_s^2 (1 - proj), b = k inv_s inv_t, k = 2 grad_loss / B^2, and
//              dX_s[i] = sum_j M_ij X_s[j] is accumulated in the thread's kBlock x Ds buffer
//
// No B x B matrix is ever stored: per thread, the row block (kBlock x (Ds + Dt)), the tiles and
// the backward's kBlock x Ds accumulator; O(B) loss rows and coefficients. X_s and X_t are read in
// place through their strides (any floating dtypes). Accumulation is in float (double for a double
// x_s). The work items are row blocks and the loss rows are added in row order: the results do
// not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "tiles.h"

namespace kdfast {
namespace {

using namespace cpu;

constexpr int64_t kStats = 3;  // stats columns: inv_s, inv_t, proj

// fn(m0, cols) after w.tiles(m0, cols), for every column block of the n rows.
template <typename acc_t, typename F>
void for_column_tiles(TileWorker<acc_t>& w, int64_t n, F&& fn) {
  for (int64_t m0 = 0; m0 < n; m0 += kBlock) {
    const int64_t cols = std::min(kBlock, n - m0);
    w.tiles(m0, cols);
    fn(m0, cols);
  }
}

template <typename acc_t>
void forward_rows(const Net<acc_t>& s, const Net<acc_t>& t, int64_t n, acc_t* stats, acc_t* loss_rows) {
  at::parallel_for(0, ceil_div(n, kBlock), 1, [&](int64_t begin, int64_t end) {
    TileWorker<acc_t> w(s, t);
    for (int64_t r = begin; r < end; ++r) {
      w.load_rows(r, n);
      acc_t ss[kBlock] = {}, tt[kBlock] = {};
      for_column_tiles(w, n, [&](int64_t, int64_t cols) {
        for (int64_t j = 0; j < cols; ++j) {
          for (int64_t i = 0; i < kBlock; ++i) {
            const acc_t vs = w.tile_s[j * kBlock + i], vt = w.tile_t[j * kBlock + i];
            ss[i] += vs * vs;
            tt[i] += vt * vt;
          }
        }
      });
      acc_t inv_s[kBlock], inv_t[kBlock];
      for (int64_t i = 0; i < kBlock; ++i) {
        inv_s[i] = inv_clamped(std::sqrt(ss[i]));
        inv_t[i] = inv_clamped(std::sqrt(tt[i]));
      }
      acc_t loss[kBlock] = {}, proj[kBlock] = {};
      for_column_tiles(w, n, [&](int64_t, int64_t cols) {
        for (int64_t j = 0; j < cols; ++j) {
          for (int64_t i = 0; i < kBlock; ++i) {
            const acc_t g_s = w.tile_s[j * kBlock + i] * inv_s[i];
            const acc_t diff = g_s - w.tile_t[j * kBlock + i] * inv_t[i];
            loss[i] += diff * diff;
            proj[i] += g_s * diff;
          }
        }
      });
      for (int64_t i = 0; i < w.rows; ++i) {
        sp_stats_row(ss[i], tt[i], proj[i], stats + (w.n0 + i) * kStats);
        loss_rows[w.n0 + i] = loss[i];
      }
    }
  });
}

template <typename acc_t>
void backward_rows(const Net<acc_t>& s, const Net<acc_t>& t, int64_t n, acc_t grad_loss, const acc_t* stats,
                   const at::Tensor& grad) {
  const int64_t dim = s.regions.dim;
  const acc_t size = static_cast<acc_t>(n);
  const acc_t k = acc_t(2) * grad_loss / (size * size);
  std::vector<acc_t> alpha(n), beta(n);
  for (int64_t i = 0; i < n; ++i) sp_coefficients(stats + i * kStats, k, alpha[i], beta[i]);
  at::parallel_for(0, ceil_div(n, kBlock), 1, [&](int64_t begin, int64_t end) {
    TileWorker<acc_t> w(s, t);
    std::vector<acc_t> m(kBlock * kBlock);  // m[j * kBlock + i] = M[n0 + i][m0 + j]
    std::vector<acc_t> g(kBlock * dim);     // g[i * D + e] of the row block
    for (int64_t r = begin; r < end; ++r) {
      w.load_rows(r, n);
      std::fill(g.begin(), g.end(), acc_t(0));
      std::fill(m.begin(), m.end(), acc_t(0));
      for_column_tiles(w, n, [&](int64_t m0, int64_t cols) {
        for (int64_t j = 0; j < cols; ++j) {
          for (int64_t i = 0; i < w.rows; ++i) {
            const int64_t a = w.n0 + i, b = m0 + j, ab = j * kBlock + i;
            m[ab] = (alpha[a] + alpha[b]) * w.tile_s[ab] - (beta[a] + beta[b]) * w.tile_t[ab];
          }
        }
        for (int64_t e0 = 0; e0 < dim; e0 += kDepth) {
          const int64_t depth = std::min(kDepth, dim - e0);
          gather_columns(s, m0, cols, e0, depth, w.chunk.data());
          add_products(m.data(), w.chunk.data(), cols, depth, dim, e0, g.data());
        }
      });
      visit_data(grad, [&](auto* y) {
        using out_t = std::remove_pointer_t<decltype(y)>;
        out_t* rows = y + w.n0 * dim;
        for (int64_t i = 0; i < w.rows * dim; ++i) rows[i] = static_cast<out_t>(g[i]);
      });
    }
  });
}

template <typename acc_t>
Net<acc_t> rows_of(const at::Tensor& x, const Regions& regions) {
  return {x, regions, element_offsets(regions), nullptr};
}

std::tuple<at::Tensor, at::Tensor> sp_forward_cpu(const at::Tensor& x_s, const at::Tensor& x_t) {
  const RowPair in = check_row_pair("sp_forward", x_s, x_t, "x_s", "x_t");
  const auto options = x_s.options().dtype(in.acc);
  at::Tensor loss = at::empty({}, options), stats = at::empty({in.rows, kStats}, options);
  AT_DISPATCH_FLOATING_TYPES(in.acc, "sp_forward_cpu", [&] {
    using acc_t = scalar_t;
    std::vector<acc_t> loss_rows(in.rows);
    forward_rows(rows_of<acc_t>(x_s, in.s), rows_of<acc_t>(x_t, in.t), in.rows, stats.mutable_data_ptr<acc_t>(),
                 loss_rows.data());
    acc_t total = 0;
    for (const acc_t v : loss_rows) total += v;
    *loss.mutable_data_ptr<acc_t>() = total / static_cast<acc_t>(int64_t(in.rows) * in.rows);
  });
  return {loss, stats};
}

at::Tensor sp_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& x_s, const at::Tensor& x_t,
                           const at::Tensor& stats) {
  const char* op = "sp_backward";
  const RowPair in = check_row_pair(op, x_s, x_t, "x_s", "x_t");
  const at::Tensor g = upstream_grad(op, "grad_loss", grad_loss, {}, in.acc, x_s);
  const at::Tensor st = check_saved(op, "stats", stats, {in.rows, kStats}, in.acc, x_s, "x_s");
  at::Tensor grad = at::empty(x_s.sizes(), x_s.options());
  AT_DISPATCH_FLOATING_TYPES(in.acc, "sp_backward_cpu", [&] {
    using acc_t = scalar_t;
    backward_rows(rows_of<acc_t>(x_s, in.s), rows_of<acc_t>(x_t, in.t), in.rows, *g.const_data_ptr<acc_t>(),
                  st.const_data_ptr<acc_t>(), grad);
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("sp_forward", &sp_forward_cpu);
  m.impl("sp_backward", &sp_backward_cpu);
}

}  // namespace kdfast
