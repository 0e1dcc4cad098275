// C++ CPU kernel of CRD's contrastive (NCE) loss against a memory bank (op contract in
// kdfast/ops/crd.py, formulas in kdfast/reference/crd.py). With v = emb[b] and w_k = bank[idx[b, k]]:
//
// crd_forward: loss = (1/B) sum_b [log1p((c + eps) / P_0) + sum_{k>=1} log1p((P_k + eps) / c)],
//              grad_b = (1 / (B T)) sum_k coef_k w_k, expsum_b = sum_k exp(s_k), in one pass over the rows
//
// Work items are (row b, chunk of kChunk columns of idx): an item converts its embedding once, then
// for each column gathers the bank row (through its strides, never copied), takes the dot product,
// and adds the entry's loss term, exp(s) and coef * w into its own accumulators. The items' partial
// sums are added in item order afterwards: the result depends neither on the thread count nor on
// the scheduling. An index outside [0, N) is not read: its row's results are NaN.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../crd.h"

namespace kdfast {
namespace {

constexpr int64_t kChunk = 1024;  // columns per work item
constexpr int kLanes = 8;         // independent partial sums of a dot product (vectorisable)

template <typename scalar_t, typename acc_t>
void forward_items(const at::Tensor& emb, const at::Tensor& bank, const at::Tensor& idx, acc_t z,
                   const CrdShape& s, const CrdScalars<acc_t>& c, std::vector<acc_t>& partials,
                   std::vector<acc_t>& grad_partials) {
  const int64_t chunks = (s.columns + kChunk - 1) / kChunk;
  const scalar_t* e_ptr = emb.const_data_ptr<scalar_t>();
  const scalar_t* b_ptr = bank.const_data_ptr<scalar_t>();
  const int64_t* i_ptr = idx.const_data_ptr<int64_t>();
  const acc_t inv_z = acc_t(1) / z;
  const int64_t dim = s.dim;
  at::parallel_for(0, s.batch * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> v(dim), w(dim);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / chunks, k0 = (item % chunks) * kChunk, k1 = std::min(k0 + kChunk, s.columns);
      for (int64_t d = 0; d < dim; ++d) v[d] = static_cast<acc_t>(e_ptr[b * s.emb_b + d * s.emb_d]);
      acc_t* g = grad_partials.data() + item * dim;
      std::fill(g, g + dim, acc_t(0));
      acc_t neg = 0, ex = 0;
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t row = i_ptr[b * s.idx_b + k * s.idx_k];
        const bool valid = row >= 0 && row < s.rows;
        acc_t dot = 0;
        if (valid) {
          const scalar_t* r = b_ptr + row * s.bank_n;
          for (int64_t d = 0; d < dim; ++d) w[d] = static_cast<acc_t>(r[d * s.bank_d]);
          acc_t lanes[kLanes] = {};
          int64_t d = 0;
          for (; d + kLanes <= dim; d += kLanes) {
            for (int j = 0; j < kLanes; ++j) lanes[j] += w[d + j] * v[d + j];
          }
          for (; d < dim; ++d) lanes[0] += w[d] * v[d];
          for (int j = 0; j < kLanes; ++j) dot += lanes[j];
        }
        const CrdEntry<acc_t> entry = crd_entry(dot, valid, k == 0, c, inv_z);
        neg += entry.neg_term;
        ex += entry.e;
        if (valid) {
          for (int64_t d = 0; d < dim; ++d) g[d] += entry.coef * w[d];
        } else {
          std::fill(g, g + dim, entry.coef);  // NaN
        }
      }
      partials[2 * item] = neg;
      partials[2 * item + 1] = ex;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> crd_forward_cpu(const at::Tensor& emb, const at::Tensor& bank,
                                                               const at::Tensor& idx, const at::Tensor& z,
                                                               double temperature) {
  const CrdShape s = check_crd("crd_forward", emb, bank, idx, z, temperature);
  const at::ScalarType acc = acc_dtype(emb.scalar_type());
  const auto options = emb.options().dtype(acc);
  at::Tensor loss = at::empty({}, options), grad = at::empty({s.batch, s.dim}, options);
  at::Tensor expsum = at::empty({s.batch}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, emb.scalar_type(), "crd_forward", [&] {
    using acc_t = acc_type<scalar_t>;
    const int64_t chunks = (s.columns + kChunk - 1) / kChunk;
    std::vector<acc_t> partials(2 * s.batch * chunks), grad_partials(s.batch * chunks * s.dim);
    const acc_t zv = z.to(acc).item<acc_t>();
    const CrdScalars<acc_t> c = crd_scalars<acc_t>(s, temperature);
    forward_items<scalar_t, acc_t>(emb, bank, idx, zv, s, c, partials, grad_partials);
    const acc_t grad_scale = static_cast<acc_t>(1.0 / (static_cast<double>(s.batch) * temperature));
    acc_t* g = grad.mutable_data_ptr<acc_t>();
    acc_t* e = expsum.mutable_data_ptr<acc_t>();
    acc_t total = 0;
    for (int64_t b = 0; b < s.batch; ++b) {
      acc_t* gb = g + b * s.dim;
      std::fill(gb, gb + s.dim, acc_t(0));
      acc_t eb = 0;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        const int64_t item = b * chunks + chunk;
        const acc_t* gp = grad_partials.data() + item * s.dim;
        for (int64_t d = 0; d < s.dim; ++d) gb[d] += gp[d];
        total += partials[2 * item];
        eb += partials[2 * item + 1];
      }
      for (int64_t d = 0; d < s.dim; ++d) gb[d] *= grad_scale;
      e[b] = eb;
    }
    *loss.mutable_data_ptr<acc_t>() = total / static_cast<acc_t>(s.batch);
  });
  return {loss, grad, expsum};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CPU, m) { m.impl("crd_forward", &crd_forward_cpu); }

}  // namespace kdfast
