// C++ CPU kernels of the relational KD loss (RKD, Park et al. 2019): the op contract of
// kdfast/ops/rkd.py with the algorithm of kernels/rkd.py (which states the formulas). Everything
// comes from the squared distances R[a][b] = ||e_a - e_b||^2 of each network, never from the
// B x B x D difference tensor:
//
// rkd_forward:  R = (2, B, B) [R_s, R_t] by upper-triangle tiles of summed squared differences
//               (csrc/cpu/tiles.h), each entry mirrored: bitwise symmetric, exactly 0 for
//               duplicated rows; then per entry length = sqrt(R) and inv = 1 / max(length, eps);
//               per row the positive-distance sums and counts (scale = count / sum), per row the
//               sums of smooth_l1(x_s - x_t) and smooth_l1'(x_s - x_t) x_s, per anchor i the sum of
//               smooth_l1(cos_s - cos_t) over (j, k); terms = [L_dist, L_angle], stats =
//               [scale_s, scale_t, mean_gx]
// rkd_backward: dR = d loss / d R_s: per anchor i, dR[i][k] (the sums over j of the angle weights,
//               the inv terms and the distance term), then per row j, dR[j][k] -= sum_i A_ijk / 2;
//               dE_i = 2 sum_j (dR_ij + dR_ji) (e_i - e_j) by tiles of rows
//
// Memory: R (an output), the (length, inv) of both networks (4 B x B), dR and per thread O(B)
// vectors, a row block (kBlock x D) and its gradient; nothing of size B x B x D. The embeddings
// are read in place through their strides (any floating dtypes). Accumulation is in float (double
// for a double e_s). Rows and anchors are work items and the sums over them run in row order: the
// results do not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../relational.h"
#include "tiles.h"

namespace kdfast {
namespace {

using namespace cpu;

constexpr int64_t kGrainPairs = 4096;  // at least this many pairs per task of the B x B passes

template <typename acc_t>
Net<acc_t> rows_of(const at::Tensor& x, const Regions& regions) {
  return {x, regions, element_offsets(regions), nullptr};
}

// The pairs of both networks (csrc/relational.h's RkdPairs) of B rows.
template <typename acc_t>
struct Pairs {
  RkdPairs<acc_t> s, t;
  int64_t n;
};

// The pairs of both networks from sq_dist (2, B, B); `scratch` (2, 2, B, B) receives length and inv.
template <typename acc_t>
Pairs<acc_t> pair_lengths(const acc_t* sq_dist, int64_t n, acc_t* scratch) {
  const int64_t nn = n * n;
  at::parallel_for(0, 2 * nn, kGrainPairs, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t net = idx / nn;
      rkd_pair(sq_dist + net * nn, idx % nn, scratch + 2 * net * nn, scratch + (2 * net + 1) * nn);
    }
  });
  return {{sq_dist, scratch, scratch + nn}, {sq_dist + nn, scratch + 2 * nn, scratch + 3 * nn}, n};
}

template <typename acc_t>
void squared_distances(const Net<acc_t>& s, const Net<acc_t>& t, int64_t n, acc_t* sq_dist) {
  const int64_t blocks = ceil_div(n, kBlock);
  at::parallel_for(0, upper_items(blocks), 1, [&](int64_t begin, int64_t end) {
    TileWorker<acc_t> w(s, t);
    for (int64_t item = begin; item < end; ++item) {
      for_item_row_blocks(item, blocks, [&](int64_t r) {
        w.load_rows(r, n);
        for (int64_t c = r; c < blocks; ++c) {
          const int64_t m0 = c * kBlock, cols = std::min(kBlock, n - m0);
          w.tiles(m0, cols, SquaredDifference());
          for (int net = 0; net < 2; ++net) {
            const acc_t* tile = net == 0 ? w.tile_s.data() : w.tile_t.data();
            acc_t* out = sq_dist + net * n * n;
            for (int64_t j = 0; j < cols; ++j) {
              for (int64_t i = 0; i < w.rows; ++i) {
                out[(w.n0 + i) * n + m0 + j] = out[(m0 + j) * n + w.n0 + i] = tile[j * kBlock + i];
              }
            }
          }
        }
      });
    }
  });
}

// sums[c] = sum over the rows i of row(i, values)[c], C values per row, rows in parallel, added in
// row order.
template <int C, typename acc_t, typename F>
void sum_rows(int64_t n, int64_t grain, acc_t (&sums)[C], F&& row) {
  std::vector<acc_t> partial(n * C);
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) row(i, partial.data() + i * C);
  });
  std::fill(sums, sums + C, acc_t(0));
  for (int64_t i = 0; i < n; ++i) {
    for (int c = 0; c < C; ++c) sums[c] += partial[i * C + c];
  }
}

// terms = [L_dist, L_angle] and stats = [scale_s, scale_t, mean_gx] from the pairs.
template <typename acc_t>
void forward_terms(const Pairs<acc_t>& p, acc_t* terms, acc_t* stats) {
  const int64_t n = p.n, grain = std::max<int64_t>(1, kGrainPairs / n);
  acc_t positive[4];
  sum_rows(n, grain, positive, [&](int64_t i, acc_t* out) {
    std::fill(out, out + 4, acc_t(0));
    for (int64_t k = 0; k < n; ++k) rkd_add_positive(p.s.r[i * n + k], p.t.r[i * n + k], k != i, out);
  });
  rkd_scales(positive, stats);
  acc_t distance[2];
  sum_rows(n, grain, distance, [&](int64_t i, acc_t* out) {
    std::fill(out, out + 2, acc_t(0));
    for (int64_t k = 0; k < n; ++k) rkd_add_distance(p.s.r[i * n + k], p.t.r[i * n + k], k != i, stats, out);
  });
  acc_t angle[1];
  sum_rows(n, 1, angle, [&](int64_t i, acc_t* out) {
    std::vector<acc_t> acc(n, acc_t(0));  // per k, summed over j
    for (int64_t j = 0; j < n; ++j) {
      const RkdTriplets<acc_t> s(p.s, n, i, j), t(p.t, n, i, j);
      for (int64_t k = 0; k < n; ++k) acc[k] += smooth_l1(s.cosine(k) - t.cosine(k));
    }
    out[0] = 0;
    for (const acc_t v : acc) out[0] += v;
  });
  rkd_terms(positive, distance, angle[0], n, terms, stats);
}

// rkd_add_anchor for every k (__restrict__: a and q alias nothing, and the loop vectorises).
template <typename acc_t>
void add_anchor_row(const RkdTriplets<acc_t>& s, const RkdTriplets<acc_t>& t, int64_t n, acc_t ga,
                    acc_t* __restrict__ a, acc_t* __restrict__ q) {
  for (int64_t k = 0; k < n; ++k) rkd_add_anchor(s, t, k, ga, a[k], q[k]);
}

// dR[i][k] without the triplet part, per anchor i (rkd_anchor_grad).
template <typename acc_t>
void anchor_backward(const Pairs<acc_t>& p, const RkdUpstream<acc_t>& up, const acc_t* stats, acc_t* dr) {
  const int64_t n = p.n;
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> a(n), q(n);  // per k, summed over j
    for (int64_t i = begin; i < end; ++i) {
      std::fill(a.begin(), a.end(), acc_t(0));
      std::fill(q.begin(), q.end(), acc_t(0));
      for (int64_t j = 0; j < n; ++j) {
        const RkdTriplets<acc_t> s(p.s, n, i, j), t(p.t, n, i, j);
        add_anchor_row(s, t, n, up.ga, a.data(), q.data());
      }
      for (int64_t k = 0; k < n; ++k) {
        dr[i * n + k] = rkd_anchor_grad(a[k], q[k], p.s, p.t, i * n + k, k != i, up.gd, stats);
      }
    }
  });
}

// dR[j][k] -= sum_i A_ijk / 2, per row j.
template <typename acc_t>
void triplet_backward(const Pairs<acc_t>& p, const RkdUpstream<acc_t>& up, acc_t* dr) {
  const int64_t n = p.n;
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(n);  // per k, summed over i
    for (int64_t j = begin; j < end; ++j) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t i = 0; i < n; ++i) {
        const RkdTriplets<acc_t> s(p.s, n, i, j), t(p.t, n, i, j);
        for (int64_t k = 0; k < n; ++k) acc[k] += rkd_triplet_weight(s, t, k, up.ga);
      }
      for (int64_t k = 0; k < n; ++k) dr[j * n + k] = dr[j * n + k] - acc_t(0.5) * acc[k];
    }
  });
}

// g[e * kBlock + i] += sum_{j < cols} m[j * kBlock + i] (rows[e * kBlock + i] - chunk[j * kDepth + e]),
// e < depth, for the row block's elements `rows` and gradient `g` of one chunk (element-major).
template <typename acc_t>
void add_difference_products(const acc_t* m, const acc_t* rows, const acc_t* chunk, int64_t cols, int64_t depth,
                             acc_t* g) {
  for (int64_t e = 0; e < depth; ++e) {
    acc_t sum[kBlock];
    std::copy_n(g + e * kBlock, kBlock, sum);
    const acc_t* xi = rows + e * kBlock;
    for (int64_t j = 0; j < cols; ++j) {
      const acc_t xj = chunk[j * kDepth + e];
      const acc_t* mj = m + j * kBlock;
      for (int64_t i = 0; i < kBlock; ++i) sum[i] += mj[i] * (xi[i] - xj);
    }
    std::copy_n(sum, kBlock, g + e * kBlock);
  }
}

// grad[i] = 2 sum_j (dR_ij + dR_ji) (e_i - e_j), per row block.
template <typename acc_t>
void embedding_grad(const Net<acc_t>& e, int64_t n, const acc_t* dr, const at::Tensor& grad) {
  const int64_t dim = e.regions.dim;
  at::parallel_for(0, ceil_div(n, kBlock), 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> rows(dim * kBlock), g(dim * kBlock), chunk(kBlock * kDepth), m(kBlock * kBlock);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n0 = r * kBlock, count = std::min(kBlock, n - n0);
      gather_rows(e, n0, count, rows.data());
      std::fill(g.begin(), g.end(), acc_t(0));
      for (int64_t m0 = 0; m0 < n; m0 += kBlock) {
        const int64_t cols = std::min(kBlock, n - m0);
        for (int64_t j = 0; j < cols; ++j) {
          for (int64_t i = 0; i < kBlock; ++i) {
            m[j * kBlock + i] = i < count ? dr[(n0 + i) * n + m0 + j] + dr[(m0 + j) * n + n0 + i] : acc_t(0);
          }
        }
        for (int64_t e0 = 0; e0 < dim; e0 += kDepth) {
          const int64_t depth = std::min(kDepth, dim - e0);
          gather_columns(e, m0, cols, e0, depth, chunk.data());
          add_difference_products(m.data(), rows.data() + e0 * kBlock, chunk.data(), cols, depth,
                                  g.data() + e0 * kBlock);
        }
      }
      visit_data(grad, [&](auto* y) {
        using out_t = std::remove_pointer_t<decltype(y)>;
        for (int64_t i = 0; i < count; ++i) {
          out_t* row = y + (n0 + i) * dim;
          for (int64_t k = 0; k < dim; ++k) row[k] = static_cast<out_t>(acc_t(2) * g[k * kBlock + i]);
        }
      });
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rkd_forward_cpu(const at::Tensor& e_s, const at::Tensor& e_t) {
  const RowPair in = check_row_pair("rkd_forward", e_s, e_t, "e_s", "e_t");
  const int64_t n = in.rows;
  const auto options = e_s.options().dtype(in.acc);
  at::Tensor terms = at::empty({2}, options), sq_dist = at::empty({2, n, n}, options), stats = at::empty({3}, options);
  AT_DISPATCH_FLOATING_TYPES(in.acc, "rkd_forward_cpu", [&] {
    using acc_t = scalar_t;
    squared_distances(rows_of<acc_t>(e_s, in.s), rows_of<acc_t>(e_t, in.t), n, sq_dist.mutable_data_ptr<acc_t>());
    std::vector<acc_t> scratch(4 * n * n);
    const Pairs<acc_t> pairs = pair_lengths(sq_dist.const_data_ptr<acc_t>(), n, scratch.data());
    forward_terms(pairs, terms.mutable_data_ptr<acc_t>(), stats.mutable_data_ptr<acc_t>());
  });
  return {terms, sq_dist, stats};
}

at::Tensor rkd_backward_cpu(const at::Tensor& grad_terms, const at::Tensor& e_s, const at::Tensor& sq_dist_in,
                            const at::Tensor& stats) {
  const RkdBackwardInputs checked = check_rkd_backward(grad_terms, e_s, sq_dist_in, stats);
  const RowPair& in = checked.rows;
  const int64_t n = in.rows;
  const at::Tensor &g = checked.grad_terms, &sq_dist = checked.sq_dist, &st = checked.stats;
  at::Tensor grad = at::empty(e_s.sizes(), e_s.options());
  AT_DISPATCH_FLOATING_TYPES(in.acc, "rkd_backward_cpu", [&] {
    using acc_t = scalar_t;
    std::vector<acc_t> scratch(4 * n * n), dr(n * n);
    const Pairs<acc_t> pairs = pair_lengths(sq_dist.const_data_ptr<acc_t>(), n, scratch.data());
    const RkdUpstream<acc_t> up(g.const_data_ptr<acc_t>(), n);
    anchor_backward(pairs, up, st.const_data_ptr<acc_t>(), dr.data());
    triplet_backward(pairs, up, dr.data());
    embedding_grad(rows_of<acc_t>(e_s, in.s), n, dr.data(), grad);
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("rkd_forward", &rkd_forward_cpu);
  m.impl("rkd_backward", &rkd_backward_cpu);
}

}  // namespace kdfast
