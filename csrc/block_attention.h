// Block attention (LAKD's NDAM, AFT-KD's attention and feature blocks): the input checks and the
// math shared by csrc/cpu/block_attention.cpp and csrc/cuda/block_attention.cu. The op contract is
// in kdfast/ops/block_attention.py, the formulas in kdfast/reference/block_attention.py. Per module
// l and sample b, with P(f) = adaptive_avg_pool2d(mean_c |f|^p, (g, g)) flattened to g^2 and
// A = P / max(||P||, eps):
//
//   map_l  = sum_b ||A(f_s) - A(f_t)||^2 / (B g^2)
//   feat_l = sum_b sum_{c,y,x} w[y, x] (h - t)^2 / (B C H W)           feature_grid 0 (w = 1 unweighted)
//          = sum_b sum_{c,i,j} (pool(h)[c, i, j] - pool(t)[c, i, j])^2 / (B C fg^2)   feature_grid fg > 0
//   w[y, x] = A_t[floor(y g / H), floor(x g / W)] / max(mean_{y,x} of that, eps)   (teacher weighting)
//
// Host/device-neutral (no CUDA headers).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "common.h"
#include "dispatch.h"

namespace kdfast {
namespace block_attention {

// Bin i of torch's adaptive average pooling of `size` positions to `bins` bins: the positions
// [start(i), end(i)), start = floor(i size / bins), end = ceil((i + 1) size / bins). Neighbouring bins
// overlap where bins does not divide size, and bins may exceed size.
struct AdaptiveBins {
  int size, bins;

  KDFAST_HOST_DEVICE int start(int i) const { return static_cast<int>(int64_t{i} * size / bins); }
  KDFAST_HOST_DEVICE int end(int i) const { return static_cast<int>(((int64_t{i} + 1) * size + bins - 1) / bins); }
  // The bins that hold position y: first(y) .. last(y). first(y) = floor(y bins / size) is also
  // the bin that nearest upsampling of the bins to `size` positions reads at y.
  KDFAST_HOST_DEVICE int first(int y) const { return static_cast<int>(int64_t{y} * bins / size); }
  KDFAST_HOST_DEVICE int last(int y) const {
    const int i = static_cast<int>(((int64_t{y} + 1) * bins + size - 1) / size) - 1;
    return i < bins - 1 ? i : bins - 1;
  }
  // The number of positions y with first(y) == i: ceil((i + 1) size / bins) - ceil(i size / bins).
  KDFAST_HOST_DEVICE int nearest_count(int i) const {
    return static_cast<int>(((int64_t{i} + 1) * size + bins - 1) / bins - (int64_t{i} * size + bins - 1) / bins);
  }
};

// One (B, C, H, W) tensor, read in place through its element strides; per-sample sizes below 2^31
// (check_inputs), so that the indices within a sample are 32-bit.
struct Map4 {
  int channels, height, width;
  int64_t stride_b, stride_c, stride_h, stride_w;

  KDFAST_HOST_DEVICE int positions() const { return height * width; }
  KDFAST_HOST_DEVICE int64_t offset(int64_t b, int c, int y, int x) const {
    return b * stride_b + c * stride_c + y * stride_h + x * stride_w;
  }
  // Whether the channels are the faster dim (channels_last): then loops run over c innermost.
  KDFAST_HOST_DEVICE bool channels_inner() const { return stride_c < stride_w; }
  // The bins of a grid x grid adaptive pooling along the rows and the columns.
  KDFAST_HOST_DEVICE AdaptiveBins rows(int grid) const { return {height, grid}; }
  KDFAST_HOST_DEVICE AdaptiveBins cols(int grid) const { return {width, grid}; }
};

inline Map4 map4(const at::Tensor& t) {
  return {static_cast<int>(t.size(1)), static_cast<int>(t.size(2)), static_cast<int>(t.size(3)),
          t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// The area of bin (i, j) of the pooling `rows` x `cols`.
KDFAST_HOST_DEVICE int bin_area(const AdaptiveBins& rows, const AdaptiveBins& cols, int i, int j) {
  return (rows.end(i) - rows.start(i)) * (cols.end(j) - cols.start(j));
}

// sum over the bins (i, j) that hold position (y, x) of value(i, j) / area(i, j): the adjoint of the
// adaptive pooling, read back at (y, x).
template <typename acc_t, typename Value>
KDFAST_HOST_DEVICE acc_t sum_over_bins(const AdaptiveBins& rows, const AdaptiveBins& cols, int y, int x,
                                       Value&& value) {
  acc_t sum = 0;
  const int i1 = rows.last(y), j0 = cols.first(x), j1 = cols.last(x);
  for (int i = rows.first(y); i <= i1; ++i) {
    for (int j = j0; j <= j1; ++j) sum += value(i, j) / static_cast<acc_t>(bin_area(rows, cols, i, j));
  }
  return sum;
}

// P_t[i, j] count_i count_j, count = nearest_count of the rows / columns of the teacher's map t:
// a term of the sum sum_{y,x} P_t[first(y), first(x)] over the nearest-upsampled map.
template <typename acc_t>
KDFAST_HOST_DEVICE acc_t nearest_term(const Map4& t, int grid, int k, acc_t pt) {
  return pt * static_cast<acc_t>(t.rows(grid).nearest_count(k / grid)) *
         static_cast<acc_t>(t.cols(grid).nearest_count(k % grid));
}

// The teacher weighting of a sample, w[y, x] = P_t[first(y), first(x)] scale (1 when off), from
// nearest_sum = sum_k nearest_term(k): scale = inv_t / max(mean_{y,x} inv_t P_t[first(y), first(x)], eps),
// so that mean_{y,x} w = 1.
template <typename acc_t>
struct TeacherWeight {
  const acc_t* pt;
  AdaptiveBins rows, cols;
  acc_t scale;
  bool on;

  KDFAST_HOST_DEVICE TeacherWeight(const Map4& t, int grid, const acc_t* pt_, acc_t nearest_sum, acc_t inv_t, bool on_)
      : pt(pt_), rows(t.rows(grid)), cols(t.cols(grid)), scale(1), on(on_) {
    const acc_t mean = inv_t * nearest_sum / static_cast<acc_t>(t.positions());
    const acc_t eps = static_cast<acc_t>(kNormEps);
    if (on) scale = inv_t / (mean < eps ? eps : mean);  // NaN propagates
  }
  KDFAST_HOST_DEVICE acc_t operator()(int y, int x) const {
    return on ? pt[rows.first(y) * rows.bins + cols.first(x)] * scale : acc_t(1);
  }
};

// The number of terms the feature term of a module averages over: B C H W (feature_grid 0) or
// B C fg^2.
KDFAST_HOST_DEVICE int64_t feature_count(const Map4& h, int64_t batch, int feature_grid) {
  return batch * h.channels * (feature_grid == 0 ? int64_t{h.height} * h.width : int64_t{feature_grid} * feature_grid);
}

// The arguments of a block_attention_forward / _backward call, checked.
struct Inputs {
  int64_t modules, batch;
  int grid, feature_grid;
  double power;
  bool weighting;
  at::ScalarType student, teacher;  // of f_s and h_s; of f_t
  at::ScalarType acc;               // float64 for a float64 f_s, else float32: outputs and accumulation
};

inline Inputs check_inputs(const char* op, const std::vector<at::Tensor>& f_s, const std::vector<at::Tensor>& h_s,
                           const std::vector<at::Tensor>& f_t, int64_t grid, double power, int64_t feature_grid,
                           bool weighting) {
  TORCH_CHECK(!f_s.empty() && h_s.size() == f_s.size() && f_t.size() == f_s.size(), op,
              ": f_s, h_s and f_t must be lists of one length L >= 1, got ", f_s.size(), ", ", h_s.size(), " and ",
              f_t.size());
  constexpr int64_t kMaxIndex = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(grid >= 1 && grid * grid <= kMaxIndex, op, ": grid must be >= 1 (and grid^2 < 2^31), got ", grid);
  TORCH_CHECK(feature_grid >= 0 && feature_grid * feature_grid <= kMaxIndex, op,
              ": feature_grid must be >= 0 (and feature_grid^2 < 2^31), got ", feature_grid);
  TORCH_CHECK(std::isfinite(power) && power >= 1.0, op, ": power must be a finite number >= 1, got ", power);
  TORCH_CHECK(!weighting || feature_grid == 0, op, ": teacher_weighting needs feature_grid 0, got feature_grid ",
              feature_grid);
  const at::Tensor& first = f_s[0];
  const at::ScalarType student = first.scalar_type(), teacher = f_t[0].scalar_type();
  TORCH_CHECK(is_float_dtype(student) && is_float_dtype(teacher), op,
              ": f_s and f_t must be float16, bfloat16, float32 or float64, got ", student, " and ", teacher);
  for (size_t l = 0; l < f_s.size(); ++l) {
    const at::Tensor* lists[3] = {&f_s[l], &h_s[l], &f_t[l]};
    const char* names[3] = {"f_s", "h_s", "f_t"};
    for (int n = 0; n < 3; ++n) {
      const at::Tensor& x = *lists[n];
      TORCH_CHECK(x.dim() == 4, op, ": ", names[n], "[", l, "] must be 4-D (B, C, H, W), got shape ", x.sizes());
      TORCH_CHECK(x.numel() > 0, op, ": ", names[n], "[", l, "] is empty (shape ", x.sizes(), ")");
      TORCH_CHECK(x.size(0) == first.size(0), op, ": ", names[n], "[", l, "] has batch size ", x.size(0),
                  ", f_s[0] has ", first.size(0));
      TORCH_CHECK(x.scalar_type() == (n == 2 ? teacher : student), op, ": ", names[n], "[", l, "] is ",
                  x.scalar_type(), n == 2 ? ", f_t[0] is " : ", f_s[0] is ", n == 2 ? teacher : student,
                  " (f_s and h_s share one dtype, f_t another)");
      TORCH_CHECK(x.device() == first.device(), op, ": ", names[n], "[", l, "] is on ", x.device(), ", f_s[0] on ",
                  first.device());
      TORCH_CHECK(x.numel() / x.size(0) <= kMaxIndex, op, ": ", names[n], "[", l, "] ", x.sizes(),
                  ": C H W must be below 2^31");
    }
    TORCH_CHECK(h_s[l].sizes() == f_t[l].sizes(), op, ": h_s[", l, "] ", h_s[l].sizes(), " and f_t[", l, "] ",
                f_t[l].sizes(), " must have equal shapes");
    TORCH_CHECK(h_s[l].size(1) * feature_grid * feature_grid <= kMaxIndex, op, ": h_s[", l,
                "]: C feature_grid^2 must be below 2^31");
  }
  return {static_cast<int64_t>(f_s.size()), first.size(0), static_cast<int>(grid), static_cast<int>(feature_grid),
          power, weighting, student, teacher, acc_dtype(student)};
}

// The inputs of a block_attention_backward call, checked: those of the forward, and in the
// accumulation dtype, contiguous, the upstream gradient of the terms (L, 2) and the saved maps
// (L, 2, B, g^2).
struct BackwardInputs {
  Inputs in;
  at::Tensor grad_terms, maps;
};

inline BackwardInputs check_backward(const at::Tensor& grad_terms, const std::vector<at::Tensor>& f_s,
                                     const std::vector<at::Tensor>& h_s, const std::vector<at::Tensor>& f_t,
                                     const at::Tensor& maps, int64_t grid, double power, int64_t feature_grid,
                                     bool weighting) {
  const char* op = "block_attention_backward";
  const Inputs in = check_inputs(op, f_s, h_s, f_t, grid, power, feature_grid, weighting);
  const int64_t bins = int64_t{in.grid} * in.grid;
  return {in, upstream_grad(op, "grad_terms", grad_terms, {in.modules, 2}, in.acc, f_s[0]),
          check_saved(op, "maps", maps, {in.modules, 2, in.batch, bins}, in.acc, f_s[0], "f_s[0]")};
}

// ---------------------------------------------------------------------------------------------
// The ops on a Device (CpuDevice of csrc/cpu/block_attention.cpp, CudaDevice of
// csrc/cuda/block_attention.cu), registered by those files: the checks and the outputs here, the
// kernels of the dtypes of f_s and f_t in Device::forward<student_t, teacher_t> and
// Device::backward<student_t, teacher_t>. Device::Guard makes the device of f_s[0] current (CpuGuard:
// nothing).
// ---------------------------------------------------------------------------------------------

// (terms (L, 2): [feat_l, map_l], maps (L, 2, B, g^2): P_s, P_t), in the accumulation dtype.
template <typename Device>
std::tuple<at::Tensor, at::Tensor> forward(const std::vector<at::Tensor>& f_s, const std::vector<at::Tensor>& h_s,
                                           const std::vector<at::Tensor>& f_t, int64_t grid, double power,
                                           int64_t feature_grid, bool teacher_weighting) {
  const Inputs in =
      check_inputs("block_attention_forward", f_s, h_s, f_t, grid, power, feature_grid, teacher_weighting);
  const typename Device::Guard guard(f_s[0].device());
  const auto options = f_s[0].options().dtype(in.acc);
  const at::Tensor terms = at::empty({in.modules, 2}, options);
  const at::Tensor maps = at::empty({in.modules, 2, in.batch, int64_t{in.grid} * in.grid}, options);
  dispatch_float_pair(in.student, in.teacher, [&](auto student, auto teacher) {
    using student_t = typename decltype(student)::type;
    using teacher_t = typename decltype(teacher)::type;
    Device::template forward<student_t, teacher_t>(in, f_s, h_s, f_t, terms, maps);
  });
  return {terms, maps};
}

// (d f_s, d h_s): contiguous, in the dtypes of f_s and h_s.
template <typename Device>
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> backward(
    const at::Tensor& grad_terms, const std::vector<at::Tensor>& f_s, const std::vector<at::Tensor>& h_s,
    const std::vector<at::Tensor>& f_t, const at::Tensor& maps, int64_t grid, double power, int64_t feature_grid,
    bool teacher_weighting) {
  const BackwardInputs checked =
      check_backward(grad_terms, f_s, h_s, f_t, maps, grid, power, feature_grid, teacher_weighting);
  const typename Device::Guard guard(f_s[0].device());
  std::vector<at::Tensor> grad_f_s, grad_h_s;
  for (size_t l = 0; l < f_s.size(); ++l) {
    grad_f_s.push_back(at::empty(f_s[l].sizes(), f_s[l].options()));
    grad_h_s.push_back(at::empty(h_s[l].sizes(), h_s[l].options()));
  }
  dispatch_float_pair(checked.in.student, checked.in.teacher, [&](auto student, auto teacher) {
    using student_t = typename decltype(student)::type;
    using teacher_t = typename decltype(teacher)::type;
    Device::template backward<student_t, teacher_t>(checked, f_s, h_s, f_t, grad_f_s, grad_h_s);
  });
  return {grad_f_s, grad_h_s};
}

}  // namespace block_attention
}  // namespace kdfast
