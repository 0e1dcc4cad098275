// C++ CPU kernels of ReviewKD's hierarchical context loss (op contract in kdfast/ops/hcl.py, formulas in
// csrc/hcl.h and kdfast/reference/hcl.py). One at::parallel_for over the (stage, sample, channel)
// planes of all stages; each plane:
//
// hcl_forward:  sum d^2 over the plane and the mean D_k of d = fs - ft over every active bin (a loop
//               over the bin's window: windows of one level overlap where l does not divide H), written
//               to its cells row; its partial loss full sum d^2 + sum_k scale D_k^2 to a per-plane
//               vector, added per stage in plane order afterwards (deterministic for any thread count)
// hcl_backward: 2 g [full d + sum over the bins holding (y, x) of scale D_k / area_k], built in a
//               thread-local plane buffer (bins added window by window), then written in f_s's dtype
//
// Every tensor is read and written in place through its strides; accumulation in float (double for a
// double f_s).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../dispatch.h"
#include "../hcl.h"

namespace kdfast {
namespace {

using namespace hcl;

// One stage's tensors, plan and first row.
template <typename student_t, typename teacher_t, typename acc_t>
struct Stage {
  const student_t* s;
  const teacher_t* t;
  Map ms, mt;
  Plan<acc_t> plan;
  int64_t first_row;
};

template <typename student_t, typename teacher_t, typename acc_t>
std::vector<Stage<student_t, teacher_t, acc_t>> stages_of(const Inputs& in) {
  const std::vector<int64_t> first = first_rows(in);
  std::vector<Stage<student_t, teacher_t, acc_t>> stages;
  for (size_t i = 0; i < in.f_s.size(); ++i) {
    const at::Tensor &s = in.f_s[i], &t = in.f_t[i];
    stages.push_back({s.const_data_ptr<student_t>(), t.const_data_ptr<teacher_t>(), map_of(s), map_of(t),
                      make_plan<acc_t>(in.levels, in.batch, s.size(1), s.size(2), s.size(3)), first[i]});
  }
  return stages;
}

// The stage of row `row` (stages in order of first_row).
template <typename StageT>
size_t stage_of(const std::vector<StageT>& stages, int64_t row) {
  size_t i = 0;
  while (i + 1 < stages.size() && row >= stages[i + 1].first_row) ++i;
  return i;
}

// d = fs - ft at (y, x) of plane (b, c) of a stage.
template <typename acc_t, typename StageT>
acc_t difference(const StageT& st, int64_t b, int64_t c, int y, int x) {
  return static_cast<acc_t>(st.s[st.ms.offset(b, c, y, x)]) - static_cast<acc_t>(st.t[st.mt.offset(b, c, y, x)]);
}

// The positions of a plane in memory order: x innermost unless the rows are the faster dim.
template <typename Fn>
void for_each_position(const Map& m, Fn&& fn) {
  if (m.stride_h < m.stride_w) {
    for (int x = 0; x < m.width; ++x) {
      for (int y = 0; y < m.height; ++y) fn(y, x);
    }
  } else {
    for (int y = 0; y < m.height; ++y) {
      for (int x = 0; x < m.width; ++x) fn(y, x);
    }
  }
}

template <typename student_t, typename teacher_t>
void forward_impl(const Inputs& in, at::Tensor& losses, at::Tensor& cells) {
  using acc_t = acc_type<student_t>;
  const auto stages = stages_of<student_t, teacher_t, acc_t>(in);
  std::vector<acc_t> partials(in.rows);
  acc_t* out_cells = cells.mutable_data_ptr<acc_t>();
  const int64_t n_cells = in.cells;
  at::parallel_for(0, in.rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const auto& st = stages[stage_of(stages, row)];
      const int64_t plane = row - st.first_row, b = plane / st.ms.channels, c = plane % st.ms.channels;
      acc_t sq = 0;
      for_each_position(st.ms, [&](int y, int x) {
        const acc_t d = difference<acc_t>(st, b, c, y, x);
        sq += d * d;
      });
      acc_t partial = st.plan.full * sq;
      acc_t* row_cells = out_cells + row * n_cells;
      const int count = st.plan.cells();
      for (int k = 0; k < count; ++k) {
        int y0, y1, x0, x1;
        st.plan.bounds(k, st.ms.height, st.ms.width, y0, y1, x0, x1);
        acc_t sum = 0;
        for (int y = y0; y < y1; ++y) {
          for (int x = x0; x < x1; ++x) sum += difference<acc_t>(st, b, c, y, x);
        }
        const acc_t mean = sum / static_cast<acc_t>((y1 - y0) * (x1 - x0));
        row_cells[k] = mean;
        partial += st.plan.scale[st.plan.level_of(k)] * mean * mean;
      }
      std::fill(row_cells + count, row_cells + n_cells, acc_t(0));
      partials[row] = partial;
    }
  });
  acc_t* out = losses.mutable_data_ptr<acc_t>();
  for (size_t i = 0; i < stages.size(); ++i) {
    const int64_t last = i + 1 < stages.size() ? stages[i + 1].first_row : in.rows;
    acc_t total = 0;
    for (int64_t row = stages[i].first_row; row < last; ++row) total += partials[row];
    out[i] = total;
  }
}

template <typename student_t, typename teacher_t>
void backward_impl(const Inputs& in, const at::Tensor& grad_losses, const at::Tensor& cells,
                   std::vector<at::Tensor>& grads) {
  using acc_t = acc_type<student_t>;
  const auto stages = stages_of<student_t, teacher_t, acc_t>(in);
  std::vector<student_t*> outs;
  std::vector<Map> out_maps;
  for (auto& g : grads) {
    outs.push_back(g.mutable_data_ptr<student_t>());
    out_maps.push_back(map_of(g));
  }
  const acc_t* g_losses = grad_losses.const_data_ptr<acc_t>();
  const acc_t* saved = cells.const_data_ptr<acc_t>();
  const int64_t n_cells = in.cells;
  at::parallel_for(0, in.rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> plane_grad;
    for (int64_t row = begin; row < end; ++row) {
      const size_t i = stage_of(stages, row);
      const auto& st = stages[i];
      const int64_t plane = row - st.first_row, b = plane / st.ms.channels, c = plane % st.ms.channels;
      const int width = st.ms.width;
      const acc_t k2 = acc_t(2) * g_losses[i];
      plane_grad.assign(static_cast<size_t>(st.ms.height) * width, acc_t(0));
      for_each_position(st.ms, [&](int y, int x) {
        plane_grad[static_cast<size_t>(y) * width + x] = st.plan.full * difference<acc_t>(st, b, c, y, x);
      });
      const acc_t* row_cells = saved + row * n_cells;
      for (int k = 0; k < st.plan.cells(); ++k) {
        int y0, y1, x0, x1;
        st.plan.bounds(k, st.ms.height, width, y0, y1, x0, x1);
        const acc_t v = st.plan.scale[st.plan.level_of(k)] * row_cells[k] / static_cast<acc_t>((y1 - y0) * (x1 - x0));
        for (int y = y0; y < y1; ++y) {
          for (int x = x0; x < x1; ++x) plane_grad[static_cast<size_t>(y) * width + x] += v;
        }
      }
      student_t* out = outs[i];
      const Map& mo = out_maps[i];
      for_each_position(st.ms, [&](int y, int x) {
        out[mo.offset(b, c, y, x)] = static_cast<student_t>(k2 * plane_grad[static_cast<size_t>(y) * width + x]);
      });
    }
  });
}

std::tuple<at::Tensor, at::Tensor> hcl_forward_cpu(const std::vector<at::Tensor>& f_s,
                                                   const std::vector<at::Tensor>& f_t, at::IntArrayRef levels) {
  const Inputs in = check_inputs("hcl_forward", f_s, f_t, levels);
  const auto options = f_s[0].options().dtype(in.acc);
  at::Tensor losses = at::empty({static_cast<int64_t>(f_s.size())}, options);
  at::Tensor cells = at::empty({in.rows, in.cells}, options);
  dispatch_float_pair(f_s[0].scalar_type(), f_t[0].scalar_type(), [&](auto s_tag, auto t_tag) {
    forward_impl<typename decltype(s_tag)::type, typename decltype(t_tag)::type>(in, losses, cells);
  });
  return {losses, cells};
}

std::vector<at::Tensor> hcl_backward_cpu(const at::Tensor& grad_losses, const std::vector<at::Tensor>& f_s,
                                         const std::vector<at::Tensor>& f_t, const at::Tensor& cells,
                                         at::IntArrayRef levels) {
  const char* op = "hcl_backward";
  const Inputs in = check_inputs(op, f_s, f_t, levels);
  const at::Tensor g = upstream_grad(op, "grad_losses", grad_losses, {static_cast<int64_t>(f_s.size())}, in.acc, f_s[0]);
  const at::Tensor saved = check_saved(op, "cells", cells, {in.rows, in.cells}, in.acc, f_s[0], "f_s[0]");
  std::vector<at::Tensor> grads;
  for (const auto& s : f_s) grads.push_back(at::empty_like(s));
  dispatch_float_pair(f_s[0].scalar_type(), f_t[0].scalar_type(), [&](auto s_tag, auto t_tag) {
    backward_impl<typename decltype(s_tag)::type, typename decltype(t_tag)::type>(in, g, saved, grads);
  });
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("hcl_forward", &hcl_forward_cpu);
  m.impl("hcl_backward", &hcl_backward_cpu);
}

}  // namespace kdfast
