// ReviewKD's hierarchical context loss (HCL): the input checks and the per-stage plan shared by
// csrc/cpu/hcl.cpp and csrc/cuda/hcl.cu. The op contract is in kdfast/ops/hcl.py, the formulas in
// kdfast/reference/hcl.py. Per stage (B, C, H, W), with d = fs - ft, the active levels l_j < H
// (halving weights w_j = 2^-(j + 1), tot = 1 + sum w_j) and D_k the mean of d over bin k:
//
//   loss       = sum_{b,c} [ full sum_{y,x} d^2 + sum_k scale_j(k) D_k^2 ]
//   full       = 1 / (B C H W tot),  scale_j = w_j / (B C l_j^2 tot)
//   d loss / d fs[y, x] = 2 [ full d[y, x] + sum_{bins k holding (y, x)} scale_j(k) D_k / area_k ]
//
// A stage's active bins are numbered level by level (in the call's order), row-major in a level:
// "cell" k of the saved (R, N) cells. Host/device-neutral (no CUDA headers).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "common.h"

namespace kdfast {
namespace hcl {

constexpr int kMaxLevels = 4;   // levels of a call
constexpr int kMaxCells = 32;   // bins of all levels together (sum l^2): the peers' 4, 2, 1 has 21

// Bin i of torch's adaptive average pooling of `size` positions to `bins` bins: [start, end) with
// start = floor(i size / bins), end = ceil((i + 1) size / bins) (neighbours overlap where bins does
// not divide size).
KDFAST_HOST_DEVICE int bin_start(int i, int size, int bins) { return static_cast<int>(int64_t{i} * size / bins); }
KDFAST_HOST_DEVICE int bin_end(int i, int size, int bins) {
  return static_cast<int>(((int64_t{i} + 1) * size + bins - 1) / bins);
}

// One stage's levels: the active ones (l < H) in order, their first cell and their loss scale.
template <typename acc_t>
struct Plan {
  int levels;                // active levels
  int level[kMaxLevels];     // their l
  int first[kMaxLevels + 1]; // first cell of each; first[levels] = the stage's cell count
  acc_t scale[kMaxLevels];   // w_j / (B C l^2 tot)
  acc_t full;                // 1 / (B C H W tot)

  KDFAST_HOST_DEVICE int cells() const { return first[levels]; }
  // The level (index j) of cell k < cells().
  KDFAST_HOST_DEVICE int level_of(int k) const {
    int j = 0;
    while (j + 1 < levels && k >= first[j + 1]) ++j;
    return j;
  }
  // The bounds [y0, y1) x [x0, x1) of cell k < cells() in an H x W map.
  KDFAST_HOST_DEVICE void bounds(int k, int height, int width, int& y0, int& y1, int& x0, int& x1) const {
    const int j = level_of(k), l = level[j], r = k - first[j];
    const int i = r / l, c = r % l;
    y0 = bin_start(i, height, l), y1 = bin_end(i, height, l);
    x0 = bin_start(c, width, l), x1 = bin_end(c, width, l);
  }
};

// The plan of a (B, C, H, W) stage for the call's levels (the reference's active_levels).
template <typename acc_t>
Plan<acc_t> make_plan(const std::vector<int64_t>& levels, int64_t batch, int64_t channels, int64_t height,
                      int64_t width) {
  Plan<acc_t> p{};
  double weight = 1.0, total = 1.0, weights[kMaxLevels] = {};
  p.first[0] = 0;
  for (int64_t l : levels) {
    if (l >= height) continue;
    weight /= 2.0;
    weights[p.levels] = weight;
    total += weight;
    p.level[p.levels] = static_cast<int>(l);
    p.first[p.levels + 1] = p.first[p.levels] + static_cast<int>(l * l);
    ++p.levels;
  }
  const double planes = static_cast<double>(batch) * static_cast<double>(channels);
  p.full = static_cast<acc_t>(1.0 / (planes * static_cast<double>(height * width) * total));
  for (int j = 0; j < p.levels; ++j) {
    p.scale[j] = static_cast<acc_t>(weights[j] / (planes * static_cast<double>(p.level[j]) * p.level[j] * total));
  }
  return p;
}

// One (B, C, H, W) tensor read in place through its strides (sizes within a sample below 2^31).
struct Map {
  int channels, height, width;
  int64_t stride_b, stride_c, stride_h, stride_w;

  KDFAST_HOST_DEVICE int64_t offset(int64_t b, int64_t c, int y, int x) const {
    return b * stride_b + c * stride_c + y * stride_h + x * stride_w;
  }
};

inline Map map_of(const at::Tensor& t) {
  return {static_cast<int>(t.size(1)), static_cast<int>(t.size(2)), static_cast<int>(t.size(3)),
          t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// The inputs of a call, checked.
struct Inputs {
  std::vector<at::Tensor> f_s, f_t;
  std::vector<int64_t> levels;
  int64_t batch, rows, cells;  // B, R = B sum C, N = sum l^2
  at::ScalarType acc;          // acc_dtype of f_s (csrc/common.h)
};

inline Inputs check_inputs(const char* op, const std::vector<at::Tensor>& f_s, const std::vector<at::Tensor>& f_t,
                           at::IntArrayRef levels) {
  TORCH_CHECK(!f_s.empty(), op, ": f_s must hold at least one stage");
  TORCH_CHECK(f_t.size() == f_s.size(), op, ": f_s and f_t must have as many stages, got ", f_s.size(), " and ",
              f_t.size());
  TORCH_CHECK(static_cast<int64_t>(levels.size()) <= kMaxLevels, op, ": at most ", kMaxLevels, " levels, got ",
              levels.size());
  int64_t cells = 0;
  for (int64_t l : levels) {
    TORCH_CHECK(l >= 1, op, ": levels must be >= 1, got ", levels);
    cells += l * l;
    TORCH_CHECK(cells <= kMaxCells, op, ": the levels ", levels, " have more than ", kMaxCells,
                " bins together (sum l^2)");
  }
  Inputs in{f_s, f_t, levels.vec(), 0, 0, cells, at::kFloat};
  constexpr int64_t kMaxIndex = std::numeric_limits<int32_t>::max();
  for (size_t i = 0; i < f_s.size(); ++i) {
    const at::Tensor &s = f_s[i], &t = f_t[i];
    TORCH_CHECK(s.dim() == 4 && t.dim() == 4, op, ": f_s[", i, "] and f_t[", i, "] must be 4-D (B, C, H, W), got ",
                s.sizes(), " and ", t.sizes());
    TORCH_CHECK(s.sizes() == t.sizes(), op, ": f_s[", i, "] ", s.sizes(), " and f_t[", i, "] ", t.sizes(),
                " must have one shape");
    TORCH_CHECK(s.numel() > 0, op, ": f_s[", i, "] is empty (shape ", s.sizes(), ")");
    TORCH_CHECK(s.size(0) == f_s[0].size(0), op, ": f_s[", i, "] has batch ", s.size(0), ", f_s[0] has ",
                f_s[0].size(0));
    TORCH_CHECK(is_float_dtype(s.scalar_type()) && is_float_dtype(t.scalar_type()), op,
                ": f_s and f_t must be float16, bfloat16, float32 or float64, got ", s.scalar_type(), " and ",
                t.scalar_type(), " (stage ", i, ")");
    TORCH_CHECK(s.scalar_type() == f_s[0].scalar_type() && t.scalar_type() == f_t[0].scalar_type(), op,
                ": all f_s must share one dtype and all f_t one dtype (stage ", i, ")");
    TORCH_CHECK(s.device() == f_s[0].device() && t.device() == f_s[0].device(), op,
                ": all tensors must be on one device (stage ", i, ")");
    TORCH_CHECK(s.size(1) * s.size(2) * s.size(3) <= kMaxIndex && s.size(2) * s.size(3) <= kMaxIndex, op,
                ": f_s[", i, "] ", s.sizes(), ": C H W must be below 2^31");
    in.rows += s.size(0) * s.size(1);
  }
  in.batch = f_s[0].size(0);
  in.acc = acc_dtype(f_s[0].scalar_type());
  return in;
}

// The first row (of the cells and the per-plane partials) of every stage, and the total R.
inline std::vector<int64_t> first_rows(const Inputs& in) {
  std::vector<int64_t> first{0};
  for (const auto& s : in.f_s) first.push_back(first.back() + in.batch * s.size(1));
  return first;
}

}  // namespace hcl
}  // namespace kdfast
