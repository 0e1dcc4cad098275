// C++ CPU kernels of the attention-transfer (AT) op family; formulas in kdfast/reference/at.py.
//
// at_maps:          m[b, hw] = scale * sum_c g(f[b, c, hw])    one pass over each feature map
// at_maps_backward: df[b, c, hw] = dm[b, hw] * scale * g'(f[b, c, hw])
// at_map_loss:      per (stage, sample): normalise both maps, the loss and d loss / d m_s
//
// Every call covers all stages in one parallel region. Accumulation is in float (double for
// double inputs); no f^p tensor is ever materialised.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../at.h"

namespace kdfast {
namespace {

constexpr int64_t kHwChunk = 256;  // positions per work item

// Work items of all stages, each a (stage, sample, hw chunk), flattened in one index space.
struct StageChunks {
  std::vector<int64_t> first;  // first item of each stage; back() = total

  explicit StageChunks(const std::vector<Bchw>& shapes) {
    first.push_back(0);
    for (const auto& d : shapes) {
      first.push_back(first.back() + d.batch * ((d.hw + kHwChunk - 1) / kHwChunk));
    }
  }
  int64_t total() const { return first.back(); }
  // (stage, sample, first hw) of item `i`.
  void locate(const std::vector<Bchw>& shapes, int64_t i, size_t& stage, int64_t& b, int64_t& hw0) const {
    stage = std::upper_bound(first.begin(), first.end(), i) - first.begin() - 1;
    const int64_t local = i - first[stage];
    const int64_t chunks = (shapes[stage].hw + kHwChunk - 1) / kHwChunk;
    b = local / chunks;
    hw0 = (local % chunks) * kHwChunk;
  }
};

std::vector<at::Tensor> at_maps_cpu(const std::vector<at::Tensor>& feats_in, double p, c10::string_view mode_name) {
  const AtFeatures in = check_at_maps(feats_in, p, mode_name);
  const std::vector<at::Tensor>& feats = in.feats;
  const MapMode mode = in.mode;
  const Power power = in.power;
  std::vector<at::Tensor> maps = empty_maps(in);
  std::vector<Bchw> shapes;
  for (const auto& f : feats) shapes.push_back(bchw(f));
  const StageChunks chunks(shapes);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats[0].scalar_type(), "at_maps_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const acc_t pp = static_cast<acc_t>(power.p);
    at::parallel_for(0, chunks.total(), 1, [&](int64_t begin, int64_t end) {
      acc_t acc[kHwChunk];
      for (int64_t i = begin; i < end; ++i) {
        size_t s;
        int64_t b, hw0;
        chunks.locate(shapes, i, s, b, hw0);
        const Bchw& d = shapes[s];
        const int64_t n = std::min(kHwChunk, d.hw - hw0);
        const scalar_t* x = feats[s].const_data_ptr<scalar_t>() + b * d.stride_b + hw0 * d.stride_hw;
        std::fill(acc, acc + n, acc_t(0));
        if (d.stride_c < d.stride_hw) {  // channels_last: reduce along the contiguous channels
          for (int64_t j = 0; j < n; ++j) {
            acc_t sum = 0;
            for (int64_t c = 0; c < d.channels; ++c) {
              sum += power_value(static_cast<acc_t>(x[j * d.stride_hw + c * d.stride_c]), pp, power.odd_signed);
            }
            acc[j] = sum;
          }
        } else {
          for (int64_t c = 0; c < d.channels; ++c) {
            const scalar_t* row = x + c * d.stride_c;
            for (int64_t j = 0; j < n; ++j) {
              acc[j] += power_value(static_cast<acc_t>(row[j * d.stride_hw]), pp, power.odd_signed);
            }
          }
        }
        const acc_t scale = map_scale<acc_t>(mode, d.channels);
        acc_t* y = maps[s].mutable_data_ptr<acc_t>() + b * d.hw + hw0;
        for (int64_t j = 0; j < n; ++j) y[j] = acc[j] * scale;
      }
    });
  });
  return maps;
}

std::vector<at::Tensor> at_maps_backward_cpu(const std::vector<at::Tensor>& grad_maps_in,
                                             const std::vector<at::Tensor>& feats_in, double p,
                                             c10::string_view mode_name) {
  const AtMapsBackwardInputs in = check_at_maps_backward(grad_maps_in, feats_in, p, mode_name);
  const std::vector<at::Tensor> &feats = in.f.feats, &grad_maps = in.grad_maps;
  const MapMode mode = in.f.mode;
  const Power power = in.f.power;
  std::vector<at::Tensor> grads;
  std::vector<Bchw> shapes;
  for (const auto& f : feats) {
    shapes.push_back(bchw(f));
    grads.push_back(at::empty_like(f));
  }
  const StageChunks chunks(shapes);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats[0].scalar_type(), "at_maps_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const acc_t pp = static_cast<acc_t>(power.p);
    at::parallel_for(0, chunks.total(), 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        size_t s;
        int64_t b, hw0;
        chunks.locate(shapes, i, s, b, hw0);
        const Bchw& d = shapes[s];
        const Bchw o = bchw(grads[s]);
        const int64_t n = std::min(kHwChunk, d.hw - hw0);
        const acc_t scale = map_scale<acc_t>(mode, d.channels);
        const acc_t* gm = grad_maps[s].const_data_ptr<acc_t>() + b * d.hw + hw0;
        const scalar_t* x = feats[s].const_data_ptr<scalar_t>() + b * d.stride_b + hw0 * d.stride_hw;
        scalar_t* y = grads[s].mutable_data_ptr<scalar_t>() + b * o.stride_b + hw0 * o.stride_hw;
        auto element = [&](int64_t c, int64_t j) {
          const acc_t v = static_cast<acc_t>(x[c * d.stride_c + j * d.stride_hw]);
          y[c * o.stride_c + j * o.stride_hw] =
              static_cast<scalar_t>(gm[j] * scale * power_grad(v, pp, power.odd_signed));
        };
        if (d.stride_c < d.stride_hw) {
          for (int64_t j = 0; j < n; ++j)
            for (int64_t c = 0; c < d.channels; ++c) element(c, j);
        } else {
          for (int64_t c = 0; c < d.channels; ++c)
            for (int64_t j = 0; j < n; ++j) element(c, j);
        }
      }
    });
  });
  return grads;
}

std::tuple<at::Tensor, std::vector<at::Tensor>> at_map_loss_cpu(const std::vector<at::Tensor>& maps_s_in,
                                                                 const std::vector<at::Tensor>& maps_t_in,
                                                                 c10::string_view loss_name) {
  const AtMapLossInputs in = check_at_map_loss(maps_s_in, maps_t_in, loss_name);
  const std::vector<at::Tensor> &maps_s = in.maps_s, &maps_t = in.maps_t;
  const int64_t batch = in.batch;
  const AtMapLossOutputs out = empty_map_loss_outputs(in);
  AT_DISPATCH_FLOATING_TYPES(in.dtype, "at_map_loss_cpu", [&] {
    using acc_t = scalar_t;
    acc_t* loss_out = out.losses.mutable_data_ptr<acc_t>();
    at::parallel_for(0, out.losses.numel(), 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t s = i / batch, b = i % batch;
        const int64_t hw = maps_s[s].size(1);
        const acc_t* ms = maps_s[s].const_data_ptr<acc_t>() + b * hw;
        const acc_t* mt = maps_t[s].const_data_ptr<acc_t>() + b * hw;
        const MapScalars<acc_t> u = map_scalars(ms, mt, hw);
        acc_t sq = 0;
        for (int64_t j = 0; j < hw; ++j) {
          const acc_t diff = u.difference(ms[j], mt[j]);
          sq += diff * diff;
        }
        const SampleLoss<acc_t> l = sample_loss(sq, in.mse, batch, hw);
        loss_out[i] = l.loss;
        acc_t* g = out.grads[s].mutable_data_ptr<acc_t>() + b * hw;
        for (int64_t j = 0; j < hw; ++j) g[j] = u.map_grad(ms[j], mt[j], l.k);
      }
    });
  });
  return {out.losses, out.grads};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("at_maps", &at_maps_cpu);
  m.impl("at_maps_backward", &at_maps_backward_cpu);
  m.impl("at_map_loss", &at_map_loss_cpu);
}

}  // namespace kdfast
