// C++ CPU kernels of SoKD's masked feature loss (op contract in kdfast/ops/masked_mse.py, formulas in
// kdfast/reference/masked_mse.py). With x, y read as (B, C, HW) and the mask m as (B, HW):
//
// masked_mse_forward:  loss = scale * sum_{b,c,hw} m^2 (x - y)^2, scale = 1 / denom of the reduction
// masked_mse_backward: grad_x = 2 grad_loss scale m^2 (x - y), grad_y = -grad_x, in one pass
//
// Work items are (sample, chunk of kHwChunk positions), all channels: an item reads its mask values
// once and walks the channels in x's memory order (channels outside, positions inside for
// channels-first maps; the reverse for channels_last). The forward writes two partial sums per item
// ([sum m^2 (x - y)^2, sum m^2]) and adds them in item order afterwards: the result depends neither
// on the thread count nor on the scheduling. Every tensor is read through its own strides.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../masked_mse.h"

namespace kdfast {
namespace {

constexpr int64_t kHwChunk = 256;  // positions per work item

int64_t hw_chunks(const Bchw& d) { return (d.hw + kHwChunk - 1) / kHwChunk; }

// The work item i: sample b and positions [hw0, hw0 + n), with w[j] = scale * m[b, hw0 + j]^2.
template <typename mask_t, typename acc_t>
struct Item {
  int64_t b, hw0, n;
  acc_t w[kHwChunk];

  Item(const MaskedMseInputs& in, int64_t i, acc_t scale) {
    const int64_t chunks = hw_chunks(in.dx);
    b = i / chunks;
    hw0 = (i % chunks) * kHwChunk;
    n = std::min(kHwChunk, in.dx.hw - hw0);
    const mask_t* m = in.mask.const_data_ptr<mask_t>() + b * in.dm.stride_b + hw0 * in.dm.stride_hw;
    for (int64_t j = 0; j < n; ++j) {
      const acc_t v = static_cast<acc_t>(m[j * in.dm.stride_hw]);
      w[j] = scale * v * v;
    }
  }
  // Offset of element (b, c, hw0 + j) of a tensor of strides `d`.
  int64_t offset(const Bchw& d, int64_t c, int64_t j) const {
    return b * d.stride_b + c * d.stride_c + (hw0 + j) * d.stride_hw;
  }
  // x - y at element (b, c, hw0 + j).
  template <typename scalar_t>
  acc_t difference(const MaskedMseInputs& in, const scalar_t* x, const scalar_t* y, int64_t c, int64_t j) const {
    return static_cast<acc_t>(x[offset(in.dx, c, j)]) - static_cast<acc_t>(y[offset(in.dy, c, j)]);
  }
};

bool channels_last(const Bchw& d) { return d.stride_c < d.stride_hw; }

// fn(c, j) for every element of the item, in x's memory order.
template <typename ItemT, typename Fn>
void for_each_element(const ItemT& item, const Bchw& dx, Fn&& fn) {
  if (channels_last(dx)) {
    for (int64_t j = 0; j < item.n; ++j) {
      for (int64_t c = 0; c < dx.channels; ++c) fn(c, j);
    }
  } else {
    for (int64_t c = 0; c < dx.channels; ++c) {
      for (int64_t j = 0; j < item.n; ++j) fn(c, j);
    }
  }
}

template <typename scalar_t, typename mask_t, typename acc_t>
std::pair<acc_t, acc_t> forward_sums(const MaskedMseInputs& in) {
  const int64_t items = in.dx.batch * hw_chunks(in.dx);
  std::vector<acc_t> partials(2 * items);
  const scalar_t* x = in.x.const_data_ptr<scalar_t>();
  const scalar_t* y = in.y.const_data_ptr<scalar_t>();
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    acc_t sq[kHwChunk];  // per position: sum_c (x - y)^2
    for (int64_t i = begin; i < end; ++i) {
      const Item<mask_t, acc_t> item(in, i, acc_t(1));
      std::fill(sq, sq + item.n, acc_t(0));
      for_each_element(item, in.dx, [&](int64_t c, int64_t j) {
        const acc_t d = item.difference(in, x, y, c, j);
        sq[j] += d * d;
      });
      acc_t total = 0, mask_sq = 0;
      for (int64_t j = 0; j < item.n; ++j) {
        total += item.w[j] * sq[j];
        mask_sq += item.w[j];
      }
      partials[2 * i] = total;
      partials[2 * i + 1] = mask_sq;
    }
  });
  acc_t total = 0, mask_sq = 0;
  for (int64_t i = 0; i < items; ++i) {
    total += partials[2 * i];
    mask_sq += partials[2 * i + 1];
  }
  return {total, mask_sq};
}

template <typename scalar_t, typename mask_t, typename acc_t>
void backward_items(const MaskedMseInputs& in, acc_t k, at::Tensor& grad_x, at::Tensor& grad_y) {
  const bool need_x = grad_x.numel() > 0, need_y = grad_y.numel() > 0;
  const Bchw gx = need_x ? bchw(grad_x) : in.dx, gy = need_y ? bchw(grad_y) : in.dy;
  scalar_t* out_x = need_x ? grad_x.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* out_y = need_y ? grad_y.mutable_data_ptr<scalar_t>() : nullptr;
  const scalar_t* x = in.x.const_data_ptr<scalar_t>();
  const scalar_t* y = in.y.const_data_ptr<scalar_t>();
  at::parallel_for(0, in.dx.batch * hw_chunks(in.dx), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Item<mask_t, acc_t> item(in, i, k);  // w = k m^2
      for_each_element(item, in.dx, [&](int64_t c, int64_t j) {
        const acc_t d = item.difference(in, x, y, c, j);
        const acc_t g = item.w[j] * d;
        if (need_x) out_x[item.offset(gx, c, j)] = static_cast<scalar_t>(g);
        if (need_y) out_y[item.offset(gy, c, j)] = static_cast<scalar_t>(-g);
      });
    }
  });
}

std::tuple<at::Tensor, at::Tensor> masked_mse_forward_cpu(const at::Tensor& x, const at::Tensor& y,
                                                          const at::Tensor& mask, c10::string_view reduction_name) {
  const MaskedMseReduction reduction = parse_masked_mse_reduction(reduction_name);
  const MaskedMseInputs in = check_masked_mse("masked_mse_forward", x, y, mask);
  at::Tensor loss = at::empty({}, x.options().dtype(in.acc)), scale = at::empty_like(loss);
  dispatch_masked_mse(in, [&](auto x_tag, auto mask_tag) {
    using scalar_t = decltype(x_tag);
    using acc_t = acc_type<scalar_t>;
    const auto sums = forward_sums<scalar_t, decltype(mask_tag), acc_t>(in);
    const acc_t s = masked_mse_scale(reduction, sums.second, x.numel(), x.size(1));
    *loss.mutable_data_ptr<acc_t>() = sums.first * s;
    *scale.mutable_data_ptr<acc_t>() = s;
  });
  return {loss, scale};
}

std::tuple<at::Tensor, at::Tensor> masked_mse_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& x,
                                                           const at::Tensor& y, const at::Tensor& mask,
                                                           const at::Tensor& scale, bool x_grad, bool y_grad) {
  const MaskedMseBackwardInputs checked = check_masked_mse_backward(grad_loss, x, y, mask, scale);
  const MaskedMseInputs& in = checked.in;
  const at::Tensor &g = checked.grad_loss, &s = checked.scale;
  at::Tensor grad_x = masked_mse_grad_buffer(in.x, x_grad), grad_y = masked_mse_grad_buffer(in.y, y_grad);
  if (!x_grad && !y_grad) return {grad_x, grad_y};
  dispatch_masked_mse(in, [&](auto x_tag, auto mask_tag) {
    using scalar_t = decltype(x_tag);
    using acc_t = acc_type<scalar_t>;
    const acc_t k = acc_t(2) * *g.const_data_ptr<acc_t>() * *s.const_data_ptr<acc_t>();
    backward_items<scalar_t, decltype(mask_tag), acc_t>(in, k, grad_x, grad_y);
  });
  return {grad_x, grad_y};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("masked_mse_forward", &masked_mse_forward_cpu);
  m.impl("masked_mse_backward", &masked_mse_backward_cpu);
}

}  // namespace kdfast
