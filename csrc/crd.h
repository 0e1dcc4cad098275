// Host and device helpers of the crd op shared by csrc/cpu/crd.cpp and csrc/cuda/crd.cu (op contract
// in kdfast/ops/crd.py, formulas in kdfast/reference/crd.py): argument checks, the scalars of a
// call and the per-entry math of the NCE loss.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>

#include "common.h"

namespace kdfast {

constexpr int64_t kCrdMaxDim = 1024;  // D at most (kdfast/ops/crd.py MAX_DIM)
constexpr double kCrdEps = 1e-7;      // the peers' constant in the NCE denominators

// The sizes and strides of a crd_forward call (strides of a dim of size 1 are irrelevant).
struct CrdShape {
  int64_t batch, dim, columns, rows;  // B, D, K + 1, N
  int64_t emb_b, emb_d, bank_n, bank_d, idx_b, idx_k;
};

inline CrdShape check_crd(const char* op, const at::Tensor& emb, const at::Tensor& bank, const at::Tensor& idx,
                          const at::Tensor& z, double temperature) {
  TORCH_CHECK(emb.dim() == 2 && emb.size(0) >= 1 && emb.size(1) >= 1 && emb.size(1) <= kCrdMaxDim, op,
              ": emb must be 2-D (B >= 1, 1 <= D <= ", kCrdMaxDim, "), got shape ", emb.sizes());
  TORCH_CHECK(is_float_dtype(emb.scalar_type()) && bank.scalar_type() == emb.scalar_type(), op,
              ": emb and bank must share one floating dtype, got ", emb.scalar_type(), " and ", bank.scalar_type());
  TORCH_CHECK(bank.dim() == 2 && bank.size(0) >= 1 && bank.size(1) == emb.size(1), op, ": bank must be (N >= 1, D = ",
              emb.size(1), "), got shape ", bank.sizes());
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.dim() == 2 && idx.size(0) == emb.size(0) && idx.size(1) >= 1, op,
              ": idx must be int64 (B = ", emb.size(0), ", K + 1 >= 1), got ", idx.scalar_type(), " of shape ",
              idx.sizes());
  TORCH_CHECK(z.dim() == 0 && is_float_dtype(z.scalar_type()), op, ": z must be a 0-d floating tensor, got ",
              z.scalar_type(), " of shape ", z.sizes());
  TORCH_CHECK(bank.device() == emb.device() && idx.device() == emb.device() && z.device() == emb.device(), op,
              ": emb, bank, idx and z must be on one device");
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, op, ": temperature must be a finite number > 0, got ",
              temperature);
  return {emb.size(0),   emb.size(1),   idx.size(1),   bank.size(0),  emb.stride(0),
          emb.stride(1), bank.stride(0), bank.stride(1), idx.stride(0), idx.stride(1)};
}

// The host scalars of a call in acc_t: 1 / T, c + eps and 1 / c (0 without negatives), c = K / N.
template <typename acc_t>
struct CrdScalars {
  acc_t inv_t, noise_eps, inv_noise;
};

template <typename acc_t>
CrdScalars<acc_t> crd_scalars(const CrdShape& s, double temperature) {
  const double noise = static_cast<double>(s.columns - 1) / static_cast<double>(s.rows);
  return {static_cast<acc_t>(1.0 / temperature), static_cast<acc_t>(noise + kCrdEps),
          static_cast<acc_t>(noise > 0 ? 1.0 / noise : 0.0)};
}

KDFAST_HOST_DEVICE float crd_exp(float x) { return ::expf(x); }
KDFAST_HOST_DEVICE double crd_exp(double x) { return ::exp(x); }
KDFAST_HOST_DEVICE float crd_log1p(float x) { return ::log1pf(x); }
KDFAST_HOST_DEVICE double crd_log1p(double x) { return ::log1p(x); }

// What one entry (b, k) adds: -(its loss term), exp(s) and the coefficient of its bank row in the
// gradient (before the 1 / (B T)).
template <typename acc_t>
struct CrdEntry {
  acc_t neg_term, e, coef;
};

// The entry of score product `dot` = <w, v> (unused where !valid: the entry is NaN), the positive
// column when `positive`; inv_z = 1 / z. -(loss term) = log1p((c + eps) / P) for the positive,
// log1p((P + eps) / c) for a negative: the peers' log(P / (P + c + eps)) and log(c / (P + c + eps))
// without the cancellation of a log near 1.
template <typename acc_t>
KDFAST_HOST_DEVICE CrdEntry<acc_t> crd_entry(acc_t dot, bool valid, bool positive, const CrdScalars<acc_t>& c,
                                             acc_t inv_z) {
  const acc_t s = valid ? dot * c.inv_t : static_cast<acc_t>(NAN);
  const acc_t e = crd_exp(s);
  const acc_t p = e * inv_z;
  const acc_t neg_term = crd_log1p(positive ? c.noise_eps / p : (p + static_cast<acc_t>(kCrdEps)) * c.inv_noise);
  return {neg_term, e, (positive ? -c.noise_eps : p) / (p + c.noise_eps)};
}

}  // namespace kdfast
