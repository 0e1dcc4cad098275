// The attention-transfer (AT) op family (at_maps, at_maps_backward, at_map_loss): the argument
// checks and the map math shared by csrc/cpu/at.cpp and csrc/cuda/at.cu, so that both backends take
// and refuse the same inputs with the same messages. The op contract is in kdfast/ops/at.py, the
// formulas in kdfast/reference/at.py. Host/device-neutral (no CUDA headers).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "common.h"

namespace kdfast {

enum class MapMode { kMean, kSum };

inline MapMode parse_map_mode(c10::string_view mode) {
  if (mode == "mean") return MapMode::kMean;
  if (mode == "sum") return MapMode::kSum;
  TORCH_CHECK(false, "at_maps: mode must be 'mean' or 'sum', got '", std::string(mode), "'");
}

// g(x) = |x|^p, signed (x^p) when `odd_signed` (power_value, power_grad: csrc/common.h); p >= 1.
struct Power {
  double p;
  bool odd_signed;  // mode "mean" with an odd integer p: g(x) = x^p keeps the sign of x
};

inline Power make_power(double p, MapMode mode) {
  TORCH_CHECK(std::isfinite(p) && p >= 1.0, "at_maps: p must be a finite number >= 1, got ", p);
  const bool integer = std::floor(p) == p;
  TORCH_CHECK(mode == MapMode::kSum || integer,
              "at_maps: mode 'mean' computes f^p and needs an integer p, got ", p);
  return {p, mode == MapMode::kMean && integer && std::fmod(p, 2.0) == 1.0};
}

// The scale of a map of `channels` channels: 1/C (mode "mean") or 1 (mode "sum").
template <typename acc_t>
KDFAST_HOST_DEVICE acc_t map_scale(MapMode mode, int64_t channels) {
  return mode == MapMode::kMean ? acc_t(1) / static_cast<acc_t>(channels) : acc_t(1);
}

inline void check_feature_list(const std::vector<at::Tensor>& feats, const char* name) {
  TORCH_CHECK(!feats.empty(), name, ": expected at least one tensor");
  for (const auto& f : feats) {
    TORCH_CHECK(f.dim() == 4, name, ": expected 4-D (B, C, H, W) tensors, got ", f.dim(), "-D");
    TORCH_CHECK(f.scalar_type() == feats[0].scalar_type(), name, ": all tensors must share one dtype");
    TORCH_CHECK(f.device() == feats[0].device(), name, ": all tensors must be on one device");
    TORCH_CHECK(f.numel() > 0, name, ": empty tensor of shape ", f.sizes());
  }
}

// The feature maps of an at_maps / at_maps_backward call, checked, in their launch views (h and w
// flattened into one strided dim: a contiguous copy of a map where they do not flatten, see bchw).
struct AtFeatures {
  MapMode mode;
  Power power;
  std::vector<at::Tensor> feats;
};

// The mode, power and launch views of feature maps that passed check_feature_list.
inline AtFeatures at_features(const std::vector<at::Tensor>& feats, double p, c10::string_view mode_name) {
  const MapMode mode = parse_map_mode(mode_name);
  AtFeatures in{mode, make_power(p, mode), {}};
  for (const auto& f : feats) in.feats.push_back(hw_flattenable_view(f));
  return in;
}

// The inputs of at_maps, checked.
inline AtFeatures check_at_maps(const std::vector<at::Tensor>& feats, double p, c10::string_view mode_name) {
  check_feature_list(feats, "at_maps");
  return at_features(feats, p, mode_name);
}

// The maps that at_maps writes: (B, HW) each, in the accumulation dtype of its feature map.
inline std::vector<at::Tensor> empty_maps(const AtFeatures& in) {
  std::vector<at::Tensor> maps;
  for (const auto& f : in.feats) {
    maps.push_back(at::empty({f.size(0), f.size(2) * f.size(3)}, f.options().dtype(acc_dtype(f.scalar_type()))));
  }
  return maps;
}

// The inputs of at_maps_backward, checked: the feature maps as check_at_maps gives them, the maps'
// gradients (each (B, HW) in the accumulation dtype of its feature map, on its device) contiguous.
struct AtMapsBackwardInputs {
  AtFeatures f;
  std::vector<at::Tensor> grad_maps;
};

inline AtMapsBackwardInputs check_at_maps_backward(const std::vector<at::Tensor>& grad_maps,
                                                   const std::vector<at::Tensor>& feats, double p,
                                                   c10::string_view mode_name) {
  const char* op = "at_maps_backward";
  check_feature_list(feats, op);
  TORCH_CHECK(grad_maps.size() == feats.size(), op, ": ", grad_maps.size(), " grad_maps for ", feats.size(), " feats");
  AtMapsBackwardInputs in{at_features(feats, p, mode_name), {}};
  for (size_t s = 0; s < feats.size(); ++s) {
    const auto& f = feats[s];
    const auto& g = grad_maps[s];
    TORCH_CHECK(g.dim() == 2 && g.size(0) == f.size(0) && g.size(1) == f.size(2) * f.size(3), op, ": grad_maps[", s,
                "] must have shape (B, H*W) of feats[", s, "]");
    TORCH_CHECK(g.scalar_type() == acc_dtype(f.scalar_type()), op, ": grad_maps[", s, "] must be ",
                acc_dtype(f.scalar_type()));
    TORCH_CHECK(g.device() == f.device(), op, ": grad_maps[", s, "] must be on the device of feats[", s, "]");
    in.grad_maps.push_back(g.contiguous());
  }
  return in;
}

// The inputs of at_map_loss, checked: the (B, HW) maps of every stage, contiguous, in one float32
// or float64 dtype on one device.
struct AtMapLossInputs {
  bool mse;  // loss "mse", else "l2"
  at::ScalarType dtype;
  int64_t batch;
  c10::Device device;
  std::vector<at::Tensor> maps_s, maps_t;
};

inline AtMapLossInputs check_at_map_loss(const std::vector<at::Tensor>& maps_s, const std::vector<at::Tensor>& maps_t,
                                         c10::string_view loss_name) {
  TORCH_CHECK(!maps_s.empty() && maps_s.size() == maps_t.size(),
              "at_map_loss: expected equally many (>= 1) student and teacher maps");
  TORCH_CHECK(loss_name == "mse" || loss_name == "l2", "at_map_loss: loss must be 'mse' or 'l2', got '",
              std::string(loss_name), "'");
  const auto dtype = maps_s[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "at_map_loss: maps must be float32 or float64");
  AtMapLossInputs in{loss_name == "mse", dtype, maps_s[0].size(0), maps_s[0].device(), {}, {}};
  for (size_t s = 0; s < maps_s.size(); ++s) {
    const auto &ms = maps_s[s], &mt = maps_t[s];
    TORCH_CHECK(ms.dim() == 2 && ms.sizes() == mt.sizes() && ms.size(0) == in.batch && ms.size(1) > 0,
                "at_map_loss: maps_s[", s, "] and maps_t[", s, "] must both be (B, HW) with one B for all");
    TORCH_CHECK(ms.scalar_type() == dtype && mt.scalar_type() == dtype, "at_map_loss: maps must share one dtype");
    TORCH_CHECK(ms.device() == in.device && mt.device() == in.device, "at_map_loss: maps must be on one device");
    in.maps_s.push_back(ms.contiguous());
    in.maps_t.push_back(mt.contiguous());
  }
  return in;
}

// The outputs of at_map_loss, uninitialised: the losses (stages, B) and d loss / d maps_s.
struct AtMapLossOutputs {
  at::Tensor losses;
  std::vector<at::Tensor> grads;
};

inline AtMapLossOutputs empty_map_loss_outputs(const AtMapLossInputs& in) {
  AtMapLossOutputs out{at::empty({static_cast<int64_t>(in.maps_s.size()), in.batch}, in.maps_s[0].options()), {}};
  for (const auto& ms : in.maps_s) out.grads.push_back(at::empty_like(ms));
  return out;
}

// The at_map_loss of one (stage, sample) from sq = ||u_s - u_t||^2 over its hw positions
// (u = m / max(||m||, eps), MapScalars): sq / (B hw) ("mse") or ||u_s - u_t|| / B ("l2"), and k with
// d loss / d u_s = k (u_s - u_t).
template <typename acc_t>
struct SampleLoss {
  acc_t loss, k;
};

template <typename acc_t>
KDFAST_HOST_DEVICE SampleLoss<acc_t> sample_loss(acc_t sq, bool mse, int64_t batch, int64_t hw) {
  if (mse) return {sq / static_cast<acc_t>(batch * hw), acc_t(2) / static_cast<acc_t>(batch * hw)};
  const acc_t l = std::sqrt(sq);
  return {l / static_cast<acc_t>(batch), l > acc_t(0) ? acc_t(1) / (l * static_cast<acc_t>(batch)) : acc_t(0)};
}

}  // namespace kdfast
