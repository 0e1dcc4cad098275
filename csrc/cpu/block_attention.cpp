// C++ CPU kernels of the block-attention op (LAKD's NDAM, AFT-KD's attention and feature blocks):
// the op contract of kdfast/ops/block_attention.py, the formulas of csrc/block_attention.h (and of
// kdfast/reference/block_attention.py). One at::parallel_for over the (module, sample) pairs of all
// modules; each pair:
//
// forward:  the channel sums sum_c |f|^p of f_s and f_t (one pass over each map, in its own layout),
//           pooled into P_s, P_t (written to `maps`); the pair's map and feature partials
// backward: dP from the saved P_s, P_t; d f_s = (sum over the bins holding (y, x) of dP / area) / C
//           * p |f|^(p-1) sign(f); d h_s = k w (h - t), or in block mode the pooled difference spread
//           back over its bins
//
// The partials (L, B, 2) are then added over the samples in order: deterministic. Every tensor is
// read in place through its strides (no copies); accumulation is in float (double for a double
// f_s), the gradients are written contiguous in the inputs' dtype.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../block_attention.h"
#include "../dispatch.h"

namespace kdfast {
namespace {

using namespace block_attention;

// One module's tensors.
template <typename student_t, typename teacher_t>
struct Module {
  const student_t* f_s;
  const student_t* h_s;
  const teacher_t* f_t;
  Map4 fs, hs, ft;
};

// The modules of a call and the per-pair work buffers' sizes.
template <typename student_t, typename teacher_t>
struct Modules {
  std::vector<Module<student_t, teacher_t>> list;
  int max_positions = 0;  // largest H W of any map

  Modules(const std::vector<at::Tensor>& f_s, const std::vector<at::Tensor>& h_s, const std::vector<at::Tensor>& f_t) {
    for (size_t l = 0; l < f_s.size(); ++l) {
      list.push_back({f_s[l].const_data_ptr<student_t>(), h_s[l].const_data_ptr<student_t>(),
                      f_t[l].const_data_ptr<teacher_t>(), map4(f_s[l]), map4(h_s[l]), map4(f_t[l])});
      max_positions = std::max({max_positions, list.back().fs.positions(), list.back().ft.positions()});
    }
  }
};

// Work buffers of one thread.
template <typename acc_t>
struct Buffers {
  std::vector<acc_t> plane;  // H W values: channel sums, differences, d P spread back
  std::vector<acc_t> bins;   // grid^2 or feature_grid^2 values

  Buffers(int positions, int grid, int feature_grid)
      : plane(positions), bins(std::max(grid * grid, feature_grid * feature_grid)) {}
};

// sums[y W + x] = sum_c |f[b, c, y, x]|^p, in the map's layout order.
template <typename acc_t, typename scalar_t>
void channel_power_sums(const scalar_t* f, const Map4& m, int64_t b, acc_t p, acc_t* sums) {
  if (m.channels_inner()) {
    for (int y = 0; y < m.height; ++y) {
      for (int x = 0; x < m.width; ++x) {
        const scalar_t* v = f + m.offset(b, 0, y, x);
        acc_t sum = 0;
        for (int c = 0; c < m.channels; ++c) sum += power_value(static_cast<acc_t>(v[c * m.stride_c]), p, false);
        sums[y * m.width + x] = sum;
      }
    }
    return;
  }
  std::fill(sums, sums + m.positions(), acc_t(0));
  for (int c = 0; c < m.channels; ++c) {
    for (int y = 0; y < m.height; ++y) {
      const scalar_t* row = f + m.offset(b, c, y, 0);
      acc_t* out = sums + y * m.width;
      for (int x = 0; x < m.width; ++x) out[x] += power_value(static_cast<acc_t>(row[x * m.stride_w]), p, false);
    }
  }
}

// out[i grid + j] = scale * mean over bin (i, j) of the (height, width) plane.
template <typename acc_t>
void pool(const acc_t* plane, int height, int width, int grid, acc_t scale, acc_t* out) {
  const AdaptiveBins rows{height, grid}, cols{width, grid};
  for (int i = 0; i < grid; ++i) {
    for (int j = 0; j < grid; ++j) {
      acc_t sum = 0;
      for (int y = rows.start(i); y < rows.end(i); ++y) {
        for (int x = cols.start(j); x < cols.end(j); ++x) sum += plane[y * width + x];
      }
      out[i * grid + j] = sum * scale / static_cast<acc_t>(bin_area(rows, cols, i, j));
    }
  }
}

// P of map `m` of sample b into `out` (grid^2).
template <typename acc_t, typename scalar_t>
void block_map(const scalar_t* f, const Map4& m, int64_t b, int grid, acc_t p, acc_t* plane, acc_t* out) {
  channel_power_sums(f, m, b, p, plane);
  pool(plane, m.height, m.width, grid, acc_t(1) / static_cast<acc_t>(m.channels), out);
}

// pool_fg(h - t)[c] of sample b into `out` (fg^2).
template <typename acc_t, typename student_t, typename teacher_t>
void pooled_difference(const Module<student_t, teacher_t>& m, int64_t b, int c, int feature_grid, acc_t* plane,
                       acc_t* out) {
  const Map4 &h = m.hs, &t = m.ft;
  for (int y = 0; y < h.height; ++y) {
    for (int x = 0; x < h.width; ++x) {
      plane[y * h.width + x] =
          static_cast<acc_t>(m.h_s[h.offset(b, c, y, x)]) - static_cast<acc_t>(m.f_t[t.offset(b, c, y, x)]);
    }
  }
  pool(plane, h.height, h.width, feature_grid, acc_t(1), out);
}

// The teacher weighting of a sample (csrc/block_attention.h).
template <typename acc_t>
TeacherWeight<acc_t> teacher_weight(const Inputs& in, const Map4& t, const acc_t* pt, const MapScalars<acc_t>& s) {
  acc_t nearest_sum = 0;
  if (in.weighting) {
    for (int k = 0; k < in.grid * in.grid; ++k) nearest_sum += nearest_term(t, in.grid, k, pt[k]);
  }
  return TeacherWeight<acc_t>(t, in.grid, pt, nearest_sum, s.inv_t, in.weighting);
}

// fn(c, y, x) over every element of a (C, H, W) sample, in the layout order of `m`.
template <typename Fn>
void for_each_element(const Map4& m, Fn&& fn) {
  if (m.channels_inner()) {
    for (int y = 0; y < m.height; ++y)
      for (int x = 0; x < m.width; ++x)
        for (int c = 0; c < m.channels; ++c) fn(c, y, x);
  } else {
    for (int c = 0; c < m.channels; ++c)
      for (int y = 0; y < m.height; ++y)
        for (int x = 0; x < m.width; ++x) fn(c, y, x);
  }
}

// Forward of pair (module m, sample b): writes P_s, P_t and partial = [feat sum, map sum].
template <typename acc_t, typename student_t, typename teacher_t>
void forward_pair(const Inputs& in, const Module<student_t, teacher_t>& m, int64_t b, acc_t p, acc_t* ps, acc_t* pt,
                  acc_t* partial, Buffers<acc_t>& buf) {
  const int bins = in.grid * in.grid;
  block_map(m.f_s, m.fs, b, in.grid, p, buf.plane.data(), ps);
  block_map(m.f_t, m.ft, b, in.grid, p, buf.plane.data(), pt);
  const MapScalars<acc_t> s = map_scalars(ps, pt, bins);
  acc_t map_sum = 0;
  for (int k = 0; k < bins; ++k) {
    const acc_t d = s.difference(ps[k], pt[k]);
    map_sum += d * d;
  }
  acc_t feat_sum = 0;
  if (in.feature_grid > 0) {
    for (int c = 0; c < m.hs.channels; ++c) {
      pooled_difference(m, b, c, in.feature_grid, buf.plane.data(), buf.bins.data());
      for (int k = 0; k < in.feature_grid * in.feature_grid; ++k) feat_sum += buf.bins[k] * buf.bins[k];
    }
  } else {
    const TeacherWeight<acc_t> w = teacher_weight(in, m.ft, pt, s);
    for_each_element(m.hs, [&](int c, int y, int x) {
      const acc_t d =
          static_cast<acc_t>(m.h_s[m.hs.offset(b, c, y, x)]) - static_cast<acc_t>(m.f_t[m.ft.offset(b, c, y, x)]);
      feat_sum += w(y, x) * (d * d);
    });
  }
  partial[0] = feat_sum;
  partial[1] = map_sum;
}

// Backward of pair (module m, sample b): writes sample b of grad_f_s and grad_h_s (contiguous).
template <typename acc_t, typename student_t, typename teacher_t>
void backward_pair(const Inputs& in, const Module<student_t, teacher_t>& m, int64_t b, acc_t p, const acc_t* ps,
                   const acc_t* pt, const acc_t* grad_terms, student_t* grad_f, student_t* grad_h,
                   Buffers<acc_t>& buf) {
  const int bins = in.grid * in.grid;
  const MapScalars<acc_t> s = map_scalars(ps, pt, bins);
  const acc_t k_map = acc_t(2) * grad_terms[1] / static_cast<acc_t>(in.batch * bins);
  acc_t* dp = buf.bins.data();
  for (int k = 0; k < bins; ++k) dp[k] = s.map_grad(ps[k], pt[k], k_map);

  // d f_s[c, y, x] = dm[y, x] g'(f), dm = (sum over the bins of (y, x) of dP / area) / C
  const Map4& f = m.fs;
  const AdaptiveBins rows = f.rows(in.grid), cols = f.cols(in.grid);
  const acc_t inv_channels = acc_t(1) / static_cast<acc_t>(f.channels);
  acc_t* dm = buf.plane.data();
  for (int y = 0; y < f.height; ++y) {
    for (int x = 0; x < f.width; ++x) {
      dm[y * f.width + x] =
          sum_over_bins<acc_t>(rows, cols, y, x, [&](int i, int j) { return dp[i * in.grid + j]; }) * inv_channels;
    }
  }
  const int fhw = f.positions();
  student_t* gf = grad_f + b * f.channels * int64_t{fhw};
  for_each_element(f, [&](int c, int y, int x) {
    const acc_t v = static_cast<acc_t>(m.f_s[f.offset(b, c, y, x)]);
    gf[c * int64_t{fhw} + y * f.width + x] = static_cast<student_t>(dm[y * f.width + x] * power_grad(v, p, false));
  });

  // d h_s = k (w (h - t), or the pooled difference spread back over its bins), k = 2 grad_feat / count
  const Map4 &h = m.hs, &t = m.ft;
  const int hw = h.positions();
  const acc_t k_feat = acc_t(2) * grad_terms[0] / static_cast<acc_t>(feature_count(h, in.batch, in.feature_grid));
  student_t* gh = grad_h + b * h.channels * int64_t{hw};
  if (in.feature_grid > 0) {
    const int fg = in.feature_grid;
    const AdaptiveBins feature_rows = h.rows(fg), feature_cols = h.cols(fg);
    acc_t* pooled = buf.bins.data();  // dp is no longer needed
    // The bins of every column, found once (the bins of a row once per row): sum_over_bins's
    // arithmetic without its integer divisions in the inner loop.
    std::vector<int> first_col(h.width), last_col(h.width);
    for (int x = 0; x < h.width; ++x) {
      first_col[x] = feature_cols.first(x);
      last_col[x] = feature_cols.last(x);
    }
    for (int c = 0; c < h.channels; ++c) {
      pooled_difference(m, b, c, fg, buf.plane.data(), pooled);
      for (int i = 0; i < fg; ++i) {
        for (int j = 0; j < fg; ++j) {
          pooled[i * fg + j] *= k_feat / static_cast<acc_t>(bin_area(feature_rows, feature_cols, i, j));
        }
      }
      student_t* out = gh + c * int64_t{hw};
      for (int y = 0; y < h.height; ++y) {
        const int i0 = feature_rows.first(y), i1 = feature_rows.last(y);
        for (int x = 0; x < h.width; ++x) {
          acc_t spread = 0;
          for (int i = i0; i <= i1; ++i) {
            for (int j = first_col[x]; j <= last_col[x]; ++j) spread += pooled[i * fg + j];
          }
          out[y * h.width + x] = static_cast<student_t>(spread);
        }
      }
    }
  } else {
    const TeacherWeight<acc_t> w = teacher_weight(in, t, pt, s);
    for_each_element(h, [&](int c, int y, int x) {
      const acc_t d = static_cast<acc_t>(m.h_s[h.offset(b, c, y, x)]) - static_cast<acc_t>(m.f_t[t.offset(b, c, y, x)]);
      gh[c * int64_t{hw} + y * h.width + x] = static_cast<student_t>(k_feat * w(y, x) * d);
    });
  }
}

// fn(pair, module, sample, buffers) for every (module, sample) pair, in parallel.
template <typename acc_t, typename student_t, typename teacher_t, typename Fn>
void for_each_pair(const Inputs& in, const Modules<student_t, teacher_t>& modules, Fn&& fn) {
  at::parallel_for(0, in.modules * in.batch, 1, [&](int64_t begin, int64_t end) {
    Buffers<acc_t> buf(modules.max_positions, in.grid, in.feature_grid);
    for (int64_t pair = begin; pair < end; ++pair) {
      fn(pair, modules.list[pair / in.batch], pair % in.batch, buf);
    }
  });
}

// The kernels of block_attention::forward and ::backward (csrc/block_attention.h) on the CPU.
struct CpuDevice {
  using Guard = CpuGuard;

  template <typename student_t, typename teacher_t>
  static void forward(const Inputs& in, const std::vector<at::Tensor>& f_s, const std::vector<at::Tensor>& h_s,
                      const std::vector<at::Tensor>& f_t, const at::Tensor& terms, const at::Tensor& maps) {
    using acc_t = acc_type<student_t>;
    const int64_t bins = in.grid * in.grid;
    const Modules<student_t, teacher_t> modules(f_s, h_s, f_t);
    std::vector<acc_t> partials(in.modules * in.batch * 2);
    acc_t* out = maps.mutable_data_ptr<acc_t>();
    for_each_pair<acc_t>(in, modules, [&](int64_t pair, const auto& m, int64_t b, Buffers<acc_t>& buf) {
      acc_t* ps = out + ((pair / in.batch) * 2 * in.batch + b) * bins;
      forward_pair(in, m, b, static_cast<acc_t>(in.power), ps, ps + in.batch * bins, partials.data() + 2 * pair, buf);
    });
    acc_t* t = terms.mutable_data_ptr<acc_t>();
    for (int64_t l = 0; l < in.modules; ++l) {
      acc_t sums[2] = {0, 0};
      for (int64_t b = 0; b < in.batch; ++b) {
        sums[0] += partials[(l * in.batch + b) * 2];
        sums[1] += partials[(l * in.batch + b) * 2 + 1];
      }
      t[2 * l] = sums[0] / static_cast<acc_t>(feature_count(modules.list[l].hs, in.batch, in.feature_grid));
      t[2 * l + 1] = sums[1] / static_cast<acc_t>(in.batch * bins);
    }
  }

  template <typename student_t, typename teacher_t>
  static void backward(const BackwardInputs& checked, const std::vector<at::Tensor>& f_s,
                       const std::vector<at::Tensor>& h_s, const std::vector<at::Tensor>& f_t,
                       const std::vector<at::Tensor>& grad_f_s, const std::vector<at::Tensor>& grad_h_s) {
    using acc_t = acc_type<student_t>;
    const Inputs& in = checked.in;
    const int64_t bins = in.grid * in.grid;
    const Modules<student_t, teacher_t> modules(f_s, h_s, f_t);
    const acc_t* p = checked.maps.const_data_ptr<acc_t>();
    const acc_t* gt = checked.grad_terms.const_data_ptr<acc_t>();
    for_each_pair<acc_t>(in, modules, [&](int64_t pair, const auto& m, int64_t b, Buffers<acc_t>& buf) {
      const int64_t l = pair / in.batch;
      const acc_t* ps = p + (l * 2 * in.batch + b) * bins;
      backward_pair(in, m, b, static_cast<acc_t>(in.power), ps, ps + in.batch * bins, gt + 2 * l,
                    grad_f_s[l].mutable_data_ptr<student_t>(), grad_h_s[l].mutable_data_ptr<student_t>(), buf);
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("block_attention_forward", &block_attention::forward<CpuDevice>);
  m.impl("block_attention_backward", &block_attention::backward<CpuDevice>);
}

}  // namespace kdfast
