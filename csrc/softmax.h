// Online (max-shifted) log-sum-exp machinery of the logit losses KD and DKD, shared by both ops and
// by both devices; formulas in kdfast/reference/kd.py and kdfast/reference/dkd.py.
//
// Each row b of a (B, K) problem is processed by a "team" of lanes (one CPU thread, one CUDA warp or
// one CUDA block) in two passes:
//   1. forward only: one pass over the row builds a KlState (running maxima and rescaled sums of both
//      softmaxes and of the teacher-weighted log-ratio terms); the team merges its lanes' states in
//      a fixed tree, and its leader turns the row's state into the loss and the statistics (log-sum-
//      exps, kept as exact-max + log-sum pairs, stored as their sums);
//   2. when a gradient is wanted: from the statistics (just computed, or given to the backward), a
//      second pass writes d loss / d z_s of every element, scaled by grad_loss[b] (1 in the forward).
// A Rule (KdRule, DkdRule) says what the statistics, the loss and the gradient are; process_row is
// the one row algorithm for every rule, device and dtype pair. Accumulation is in acc_t (double for
// a double student, float otherwise); the order of every sum is fixed (no atomics): deterministic.
//
// Host/device-neutral: the math (Lse, KlState, the rules, process_row) is KDFAST_HOST_DEVICE; the
// CPU row loop (CpuRows) is compiled by the host compiler only, the CUDA teams, kernel and launcher
// (CudaRows) by nvcc only; the argument checks, outputs, dtype dispatch and the ops' entry points
// (kd_forward<Device>, ...) are shared host code.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <tuple>

#include "common.h"
#include "dispatch.h"

namespace kdfast {
namespace logits {

// ---------------------------------------------------------------------------------------------
// Math in acc_t (expf/logf/log1pf for float, exp/log/log1p for double, on host and device)
// ---------------------------------------------------------------------------------------------

KDFAST_HOST_DEVICE float exp_acc(float x) { return ::expf(x); }
KDFAST_HOST_DEVICE double exp_acc(double x) { return ::exp(x); }
KDFAST_HOST_DEVICE float log_acc(float x) { return ::logf(x); }
KDFAST_HOST_DEVICE double log_acc(double x) { return ::log(x); }
KDFAST_HOST_DEVICE float log1p_acc(float x) { return ::log1pf(x); }
KDFAST_HOST_DEVICE double log1p_acc(double x) { return ::log1p(x); }

template <typename acc_t>
KDFAST_HOST_DEVICE acc_t nan_acc() {
  return static_cast<acc_t>(NAN);
}

template <typename acc_t>
KDFAST_HOST_DEVICE acc_t neg_inf_acc() {
  return -static_cast<acc_t>(INFINITY);
}

// A log-sum-exp kept as max + log_sum (max: one of the logits, exactly; 0 <= log_sum <= log K), as
// log_softmax keeps it: x - lse = (x - max) - log_sum loses nothing to the rounding of a large lse
// (for |x| ~ 1e4, ulp(lse) ~ 1e-3 in float). From a stored statistic: {lse, 0}.
template <typename acc_t>
struct Lse {
  acc_t max, log_sum;

  KDFAST_HOST_DEVICE acc_t value() const { return max + log_sum; }
  // log p = x - lse
  KDFAST_HOST_DEVICE acc_t log_prob(acc_t x) const { return (x - max) - log_sum; }
  // this - o
  KDFAST_HOST_DEVICE acc_t minus(const Lse& o) const { return (max - o.max) + (log_sum - o.log_sum); }
  // log(exp(this) + exp(x)), x finite
  KDFAST_HOST_DEVICE Lse add(acc_t x) const {
    const acc_t d = log_prob(x);
    return d > acc_t(0) ? Lse{x, log1p_acc(exp_acc(-d))} : Lse{max, log_sum + log1p_acc(exp_acc(d))};
  }
};

// p (log p - log q) with p = exp(log_p); 0 where p == 0 (as the references' KL terms), NaN where
// log_p or log_q is NaN.
template <typename acc_t>
KDFAST_HOST_DEVICE acc_t kl_term(acc_t log_p, acc_t log_q) {
  const acc_t p = exp_acc(log_p);
  return p != acc_t(0) ? p * (log_p - log_q) : acc_t(0);
}

// ---------------------------------------------------------------------------------------------
// Online state of one set of (student, teacher) logit pairs
// ---------------------------------------------------------------------------------------------

// Over the pairs (x_k, y_k) = (z_s[k] / T, z_t[k] / T) pushed so far, with ms = max x, mt = max y:
//   ss = sum_k exp(x_k - ms)                 lse_s = ms + log ss
//   st = sum_k exp(y_k - mt)                 lse_t = mt + log st
//   w  = sum_k exp(y_k - mt) ((y_k - mt) - (x_k - ms))
// so that KL(softmax y || softmax x) = w / st + log(ss / st): every term is max-shifted, and no
// large lse_s - lse_t difference ever cancels. When a maximum rises, the sums are rescaled and w
// is corrected for the shifted offsets.
// -inf logits (masked classes, probability 0) are legitimate: a -inf x adds nothing to ss, a -inf
// y nothing to st nor to w (0 log 0 = 0, also where x = -inf); only a -inf x under a finite y
// makes w (the KL) +inf. A softmax with no finite logit yet has max -inf and sum 0 (the empty
// state has both); a sum is never rescaled by exp(-inf - -inf). A term whose weight underflows to
// 0 adds 0, as in the Triton kernels. A NaN logit makes ss and st NaN for good (every rescale and
// merge keeps a NaN sum NaN), hence the KL and both log-sum-exps: a NaN row, as the references
// have it. An aggregate (no constructors): it lives in CUDA shared memory.
template <typename acc_t>
struct KlState {
  acc_t ms, ss, mt, st, w;

  static KDFAST_HOST_DEVICE KlState empty() {
    return {neg_inf_acc<acc_t>(), acc_t(0), neg_inf_acc<acc_t>(), acc_t(0), acc_t(0)};
  }

  // Adds one pair: one exp per finite logit.
  KDFAST_HOST_DEVICE void push(acc_t x, acc_t y) {
    if (x != x || y != y) {  // a NaN logit
      ss = st = nan_acc<acc_t>();
      return;
    }
    const acc_t neg_inf = neg_inf_acc<acc_t>();
    acc_t rise_s = 0;  // the old student offsets x_k - ms all drop by rise_s (0 while ss == 0)
    if (x > ms) {
      rise_s = ms > neg_inf ? x - ms : acc_t(0);
      ss = ss * exp_acc(ms - x) + acc_t(1);  // exp(-inf) = 0 while ss == 0
      ms = x;
    } else if (x > neg_inf) {
      ss += exp_acc(x - ms);
    }
    const acc_t xo = x > neg_inf ? x - ms : neg_inf;  // the new pair's student offset
    if (y > mt) {
      // The old terms are scaled by et (0 while st == 0) and their teacher offsets drop by -dt;
      // the new pair has weight 1 and teacher offset 0.
      const acc_t dt = mt - y;
      const acc_t et = exp_acc(dt);
      w = (et > acc_t(0) ? et * (w + (rise_s + dt) * st) : acc_t(0)) - xo;
      st = st * et + acc_t(1);
      mt = y;
    } else {
      w += rise_s * st;
      if (y > neg_inf) {  // weight et, teacher offset dt
        const acc_t dt = y - mt;
        const acc_t et = exp_acc(dt);
        w += et > acc_t(0) ? et * (dt - xo) : acc_t(0);
        st += et;
      }
    }
  }

  // Adds the pairs of another state (either may be empty).
  KDFAST_HOST_DEVICE void merge(const KlState& o) {
    const acc_t new_ms = ms > o.ms ? ms : o.ms, new_mt = mt > o.mt ? mt : o.mt;
    const acc_t ct = rescale(mt, new_mt), o_ct = rescale(o.mt, new_mt);
    w = shifted_w(ct, new_ms, new_mt) + o.shifted_w(o_ct, new_ms, new_mt);
    ss = ss * rescale(ms, new_ms) + o.ss * rescale(o.ms, new_ms);
    st = st * ct + o.st * o_ct;
    ms = new_ms;
    mt = new_mt;
  }

  // exp(m - new_m) for m <= new_m: the factor of a sum whose maximum rises to new_m; 0 for a
  // softmax without a finite logit (m = -inf, sum 0).
  static KDFAST_HOST_DEVICE acc_t rescale(acc_t m, acc_t new_m) {
    return m > neg_inf_acc<acc_t>() ? exp_acc(m - new_m) : acc_t(0);
  }

  // w with the maxima raised to new_ms, new_mt and the weights scaled by ct = rescale(mt, new_mt):
  // every student offset drops by new_ms - ms, every teacher offset by new_mt - mt. 0 where ct is.
  KDFAST_HOST_DEVICE acc_t shifted_w(acc_t ct, acc_t new_ms, acc_t new_mt) const {
    if (!(ct > acc_t(0))) return acc_t(0);
    const acc_t rise_s = new_ms > ms ? new_ms - ms : acc_t(0);  // inf where ss == 0: w is +inf then
    return ct * (w + (rise_s - (new_mt - mt)) * st);
  }

  KDFAST_HOST_DEVICE Lse<acc_t> lse_s() const { return {ms, log_acc(ss)}; }
  KDFAST_HOST_DEVICE Lse<acc_t> lse_t() const { return {mt, log_acc(st)}; }
  // KL(softmax y || softmax x) over the pushed pairs.
  KDFAST_HOST_DEVICE acc_t kl() const { return w / st + log_acc(ss / st); }
};

// ---------------------------------------------------------------------------------------------
// Rules: what each op makes of a row's state, and its gradient
// ---------------------------------------------------------------------------------------------

struct LossParams {
  double temperature;
  double alpha = 0;  // DKD only
  double beta = 0;   // DKD only
};

// Interface of a Rule<acc_t> (x = z_s / T, y = z_t / T, g the target class of the row):
//   kStats: the row's statistics (log-sum-exps), kept as Lse pairs and stored as their values;
//   kTargeted: pass 1 leaves out k == g, and finalize needs x_g, y_g;
//   finalize(state, x_g, y_g, valid, lse) -> the row's loss; writes lse[kStats];
//   gradient(lse, g, valid, grad_loss) -> a functor (k, x_k, y_k) -> grad_loss * d loss / d z_s[k].
// `valid` is false when g lies outside [0, K): the row's loss, stats and gradient are NaN.

// KD: loss = T^2 KL(pt || ps); stats [lse_s, lse_t]; d loss / d z_s = T (ps - pt).
template <typename acc_t_>
struct KdRule {
  using acc_t = acc_t_;
  static constexpr int kStats = 2;
  static constexpr bool kTargeted = false;
  acc_t temperature, t2;  // T, T^2

  explicit KdRule(const LossParams& p)
      : temperature(static_cast<acc_t>(p.temperature)), t2(static_cast<acc_t>(p.temperature * p.temperature)) {}

  KDFAST_HOST_DEVICE acc_t finalize(const KlState<acc_t>& s, acc_t, acc_t, bool, Lse<acc_t>* lse) const {
    lse[0] = s.lse_s();
    lse[1] = s.lse_t();
    return t2 * s.kl();
  }

  struct Gradient {
    Lse<acc_t> lse_s, lse_t;
    acc_t scale;
    KDFAST_HOST_DEVICE acc_t operator()(int, acc_t x, acc_t y) const {
      return scale * (exp_acc(lse_s.log_prob(x)) - exp_acc(lse_t.log_prob(y)));
    }
  };

  KDFAST_HOST_DEVICE Gradient gradient(const Lse<acc_t>* lse, int, bool, acc_t grad_loss) const {
    return {lse[0], lse[1], grad_loss * temperature};
  }
};

// DKD (mdistiller): loss = T^2 (alpha TCKD + beta NCKD); stats [lse_s, lse_t, lse_other_s,
// lse_other_t, lse_masked_s, lse_masked_t]. Pass 1 runs over the non-target classes only (the
// "other" softmaxes); the full and the masked (z - 1000 [k == g]) log-sum-exps add z[g] at the end.
template <typename acc_t_>
struct DkdRule {
  using acc_t = acc_t_;
  static constexpr int kStats = 6;
  static constexpr bool kTargeted = true;
  static constexpr double kMask = 1000.0;  // mdistiller's gt-mask magnitude (kdfast/reference/dkd.py MASK)
  acc_t temperature, t2, alpha, beta;

  explicit DkdRule(const LossParams& p)
      : temperature(static_cast<acc_t>(p.temperature)),
        t2(static_cast<acc_t>(p.temperature * p.temperature)),
        alpha(static_cast<acc_t>(p.alpha)),
        beta(static_cast<acc_t>(p.beta)) {}

  KDFAST_HOST_DEVICE acc_t finalize(const KlState<acc_t>& o, acc_t x_g, acc_t y_g, bool valid, Lse<acc_t>* lse) const {
    if (!valid) {
      for (int i = 0; i < kStats; ++i) lse[i] = {nan_acc<acc_t>(), nan_acc<acc_t>()};
      return nan_acc<acc_t>();
    }
    const acc_t mask = static_cast<acc_t>(kMask);
    const Lse<acc_t> os = o.lse_s(), ot = o.lse_t();
    const Lse<acc_t> s = os.add(x_g), t = ot.add(y_g);
    const Lse<acc_t> ms = os.add(x_g - mask), mt = ot.add(y_g - mask);
    lse[0] = s, lse[1] = t, lse[2] = os, lse[3] = ot, lse[4] = ms, lse[5] = mt;
    // TCKD: binary KL of (p_target, p_other), log p_other = lse_other - lse.
    const acc_t tckd = kl_term(t.log_prob(y_g), s.log_prob(x_g)) + kl_term(ot.minus(t), os.minus(s));
    // NCKD over k != g: qt_k = Qt * pt_other_k with Qt = exp(lse_ot - lse_mt), the teacher's masked
    // mass off the target, and log qt_k - log qs_k = (log pt_other_k - log ps_other_k)
    // + (lse_ot - lse_mt) - (lse_os - lse_ms); summed: Qt (KL_other + log Qt - log Qs). Plus k == g.
    const acc_t log_qt_other = ot.minus(mt);
    const acc_t qt_other = exp_acc(log_qt_other);
    const acc_t nckd_other = qt_other != acc_t(0) ? qt_other * (o.kl() + log_qt_other - os.minus(ms)) : acc_t(0);
    const acc_t nckd = nckd_other + kl_term(mt.log_prob(y_g - mask), ms.log_prob(x_g - mask));
    return t2 * (alpha * tckd + beta * nckd);
  }

  // With e_k = exp(x_k - lse_os) <= 1 (k != g), ps_k = e_k exp(lse_os - lse_s), the middle term
  // (1 - pt_g) ps_k / (1 - ps_g) = e_k exp(lse_ot - lse_t) and qs_k = e_k exp(lse_os - lse_ms):
  //   k != g: T alpha e_k (exp(lse_os - lse_s) - exp(lse_ot - lse_t)) + T beta (e_k exp(lse_os - lse_ms) - qt_k)
  //   k == g: T alpha (ps_g - pt_g) + T beta (qs_g - qt_g)
  // (the alpha and beta parts added last, as the reference), all times grad_loss.
  struct Gradient {
    int target;
    Lse<acc_t> s, t, os, ms, mt;
    acc_t mask, alpha_scale, beta_scale;
    acc_t alpha_other;  // T alpha (exp(lse_os - lse_s) - exp(lse_ot - lse_t)) grad_loss
    acc_t qs_other;     // exp(lse_os - lse_ms)
    KDFAST_HOST_DEVICE acc_t operator()(int k, acc_t x, acc_t y) const {
      if (k == target) {
        return alpha_scale * (exp_acc(s.log_prob(x)) - exp_acc(t.log_prob(y))) +
               beta_scale * (exp_acc(ms.log_prob(x - mask)) - exp_acc(mt.log_prob(y - mask)));
      }
      const acc_t e = exp_acc(os.log_prob(x));
      return alpha_other * e + beta_scale * (e * qs_other - exp_acc(mt.log_prob(y)));
    }
  };

  KDFAST_HOST_DEVICE Gradient gradient(const Lse<acc_t>* lse, int g, bool valid, acc_t grad_loss) const {
    if (!valid) {
      const acc_t nan = nan_acc<acc_t>();
      const Lse<acc_t> l{nan, nan};
      return {-1, l, l, l, l, l, nan, nan, nan, nan, nan};
    }
    const Lse<acc_t> s = lse[0], t = lse[1], os = lse[2], ot = lse[3], ms = lse[4], mt = lse[5];
    const acc_t scale = grad_loss * temperature;
    const acc_t alpha_scale = scale * alpha, beta_scale = scale * beta;
    const acc_t alpha_other = alpha_scale * (exp_acc(os.minus(s)) - exp_acc(ot.minus(t)));
    return {g, s, t, os, ms, mt, static_cast<acc_t>(kMask), alpha_scale, beta_scale, alpha_other, exp_acc(os.minus(ms))};
  }
};

// ---------------------------------------------------------------------------------------------
// One row, processed by a team of lanes
// ---------------------------------------------------------------------------------------------

// Columns per row: in-row indices are int (a chunk start plus kChunk never overflows).
constexpr int kMaxCols = 1 << 30;

// Arguments of one forward or backward call (stats_in == nullptr: forward).
template <typename Rule, typename student_t, typename teacher_t>
struct RowsArgs {
  using acc_t = typename Rule::acc_t;
  const student_t* z_s;
  const teacher_t* z_t;
  int64_t stride_s, stride_t;  // row strides; the class dim is unit-stride
  int64_t rows;                // B
  int cols;                    // K (< kMaxCols)
  const int64_t* target;       // (B,) when Rule::kTargeted
  Rule rule;
  acc_t* loss;                 // forward: (B,)
  acc_t* stats_out;            // forward: (B, kStats)
  const acc_t* stats_in;       // backward: (B, kStats)
  const acc_t* grad_loss;      // backward: (B,)
  student_t* grad;             // (B, K) contiguous, or nullptr (forward without gradient)
};

// Elements per vector load: 16 bytes of the wider of the two logit dtypes.
template <typename student_t, typename teacher_t>
constexpr int pack_width() {
  return static_cast<int>(16 / (sizeof(student_t) > sizeof(teacher_t) ? sizeof(student_t) : sizeof(teacher_t)));
}

#if defined(__CUDA_ARCH__)  // nvcc's device pass (the host compiler does not know the pragma)
#define KDFAST_UNROLL _Pragma("unroll")
#else
#define KDFAST_UNROLL
#endif

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Index of p in units of T, modulo N: 0 when p may be read as a Pack<T, N>.
template <int N, typename T>
KDFAST_HOST_DEVICE int misalignment(const T* p) {
  return static_cast<int>((reinterpret_cast<uintptr_t>(p) / sizeof(T)) % N);
}

// f(k, x_k, y_k) for the elements k = lane, lane + lanes, ... of a row in Pack<., N> units (with
// x_k = z_s[k] and y_k = z_t[k] in acc_t); kWrite: out[k] = f(...). A scalar head runs up to the
// first index where all the row pointers are vector-aligned, a scalar tail after the last full pack;
// when the pointers are aligned differently, every element is scalar.
template <int N, bool kWrite, typename acc_t, typename student_t, typename teacher_t, typename F>
KDFAST_HOST_DEVICE void for_each_element(const student_t* zs, const teacher_t* zt, student_t* out, int cols, int lane,
                                         int lanes, F&& f) {
  const int mis = misalignment<N>(zs);
  const bool aligned = mis == misalignment<N>(zt) && (!kWrite || mis == misalignment<N>(out));
  const int head = aligned ? (cols < (N - mis) % N ? cols : (N - mis) % N) : cols;
  const int packs = (cols - head) / N;
  const int tail = head + packs * N;
  auto scalar = [&](int k) {
    if constexpr (kWrite) {
      out[k] = static_cast<student_t>(f(k, static_cast<acc_t>(zs[k]), static_cast<acc_t>(zt[k])));
    } else {
      f(k, static_cast<acc_t>(zs[k]), static_cast<acc_t>(zt[k]));
    }
  };
  for (int k = lane; k < head; k += lanes) scalar(k);
  for (int v = lane; v < packs; v += lanes) {
    const int k0 = head + v * N;
    const Pack<student_t, N> xs = *reinterpret_cast<const Pack<student_t, N>*>(zs + k0);
    const Pack<teacher_t, N> ys = *reinterpret_cast<const Pack<teacher_t, N>*>(zt + k0);
    if constexpr (kWrite) {
      Pack<student_t, N> o;
      KDFAST_UNROLL
      for (int j = 0; j < N; ++j) {
        o.v[j] = static_cast<student_t>(f(k0 + j, static_cast<acc_t>(xs.v[j]), static_cast<acc_t>(ys.v[j])));
      }
      *reinterpret_cast<Pack<student_t, N>*>(out + k0) = o;
    } else {
      KDFAST_UNROLL
      for (int j = 0; j < N; ++j) f(k0 + j, static_cast<acc_t>(xs.v[j]), static_cast<acc_t>(ys.v[j]));
    }
  }
  for (int k = tail + lane; k < cols; k += lanes) scalar(k);
}

// The row algorithm (see the top of this file). A Team has `lane` and `lanes` (this lane's index
// and the team size), kChunk (columns per partial state in pass 1), reduce(state) (the team's
// merged state, valid in the leader), leader() and broadcast(lse) (the leader's values to every
// lane). All lanes of a team call it for one row.
#if defined(__CUDACC__)
#pragma nv_exec_check_disable  // instantiated for the CPU team by the host compiler, for CUDA teams by nvcc
#endif
template <typename Rule, typename student_t, typename teacher_t, typename Team>
KDFAST_HOST_DEVICE void process_row(const RowsArgs<Rule, student_t, teacher_t>& a, int64_t row, Team& team) {
  using acc_t = typename Rule::acc_t;
  constexpr int N = pack_width<student_t, teacher_t>();
  const student_t* zs = a.z_s + row * a.stride_s;
  const teacher_t* zt = a.z_t + row * a.stride_t;
  const acc_t T = a.rule.temperature;
  const int64_t target = Rule::kTargeted ? a.target[row] : 0;
  const bool valid = !Rule::kTargeted || (target >= 0 && target < a.cols);
  const int g = Rule::kTargeted && valid ? static_cast<int>(target) : -1;  // -1: no column left out of pass 1
  Lse<acc_t> lse[Rule::kStats];
  if (a.stats_in == nullptr) {
    // Each lane's elements in chunks of Team::kChunk columns, one state per chunk merged into the
    // lane's state: short sequential sums (CPU); a GPU lane has one chunk of few elements.
    KlState<acc_t> state = KlState<acc_t>::empty();
    for (int c0 = 0; c0 < a.cols; c0 += Team::kChunk) {
      const int n = a.cols - c0 < Team::kChunk ? a.cols - c0 : Team::kChunk;
      KlState<acc_t> part = KlState<acc_t>::empty();
      for_each_element<N, false, acc_t>(zs + c0, zt + c0, static_cast<student_t*>(nullptr), n, team.lane, team.lanes,
                                        [&](int k, acc_t x, acc_t y) {
                                          if (c0 + k != g) part.push(x / T, y / T);
                                        });
      state.merge(part);
    }
    state = team.reduce(state);
    if (team.leader()) {
      acc_t x_g = 0, y_g = 0;
      if (g >= 0) {
        x_g = static_cast<acc_t>(zs[g]) / T;
        y_g = static_cast<acc_t>(zt[g]) / T;
      }
      a.loss[row] = a.rule.finalize(state, x_g, y_g, valid, lse);
      for (int i = 0; i < Rule::kStats; ++i) a.stats_out[row * Rule::kStats + i] = lse[i].value();
    }
    if (a.grad == nullptr) return;
    team.broadcast(lse);
  } else {
    for (int i = 0; i < Rule::kStats; ++i) lse[i] = {a.stats_in[row * Rule::kStats + i], acc_t(0)};
  }
  const acc_t grad_loss = a.grad_loss != nullptr ? a.grad_loss[row] : acc_t(1);
  const auto gradient = a.rule.gradient(lse, g, valid, grad_loss);
  for_each_element<N, true, acc_t>(zs, zt, a.grad + row * a.cols, a.cols, team.lane, team.lanes,
                                   [&](int k, acc_t x, acc_t y) { return gradient(k, x / T, y / T); });
}

// ---------------------------------------------------------------------------------------------
// Host side: argument checks, outputs, dtype dispatch (shared by the CPU and CUDA ops)
// ---------------------------------------------------------------------------------------------

// The logits of one call, each with a unit-stride class dim (copied only when it has not).
struct Logits {
  at::Tensor z_s, z_t;
  int64_t rows;
  int cols;
};

inline Logits check_logits(const char* op, const at::Tensor& z_s, const at::Tensor& z_t, double temperature,
                           int64_t min_classes) {
  TORCH_CHECK(z_s.dim() == 2, op, ": z_s must be a 2-D (B, K) tensor, got shape ", z_s.sizes());
  TORCH_CHECK(z_t.sizes() == z_s.sizes(), op, ": z_t must have the shape of z_s ", z_s.sizes(), ", got ",
              z_t.sizes());
  TORCH_CHECK(is_float_dtype(z_s.scalar_type()), op, ": z_s must be float16, bfloat16, float32 or float64, got ",
              z_s.scalar_type());
  TORCH_CHECK(is_float_dtype(z_t.scalar_type()), op, ": z_t must be float16, bfloat16, float32 or float64, got ",
              z_t.scalar_type());
  TORCH_CHECK(z_t.device() == z_s.device(), op, ": z_t must be on the device of z_s (", z_s.device(), "), got ",
              z_t.device());
  TORCH_CHECK(z_s.size(1) >= min_classes && z_s.size(1) < kMaxCols, op, ": z_s must have at least ", min_classes,
              " and fewer than 2^30 classes, got K = ", z_s.size(1));
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, op, ": temperature must be a finite number > 0, got ",
              temperature);
  auto unit_stride = [](const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); };
  return {unit_stride(z_s), unit_stride(z_t), z_s.size(0), static_cast<int>(z_s.size(1))};
}

inline at::Tensor check_target(const char* op, const at::Tensor& target, const Logits& in) {
  TORCH_CHECK(target.dim() == 1 && target.size(0) == in.rows, op, ": target must have shape (B,) = (", in.rows,
              ",), got ", target.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong, op, ": target must be int64, got ", target.scalar_type());
  TORCH_CHECK(target.device() == in.z_s.device(), op, ": target must be on the device of z_s (", in.z_s.device(),
              "), got ", target.device());
  return target.contiguous();
}

// A per-row input of a backward: (B,) when cols == 0, else (B, cols); in the loss dtype of z_s.
inline at::Tensor check_row_values(const char* op, const char* name, const at::Tensor& t, const Logits& in,
                                   int64_t cols) {
  const bool shape_ok = cols == 0 ? t.dim() == 1 && t.size(0) == in.rows
                                  : t.dim() == 2 && t.size(0) == in.rows && t.size(1) == cols;
  if (cols == 0) {
    TORCH_CHECK(shape_ok, op, ": ", name, " must have shape (B,) = (", in.rows, ",), got ", t.sizes());
  } else {
    TORCH_CHECK(shape_ok, op, ": ", name, " must have shape (B, ", cols, ") = (", in.rows, ", ", cols, "), got ",
                t.sizes());
  }
  const at::ScalarType dtype = acc_dtype(in.z_s.scalar_type());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, " (the loss dtype of a ",
              in.z_s.scalar_type(), " z_s), got ", t.scalar_type());
  TORCH_CHECK(t.device() == in.z_s.device(), op, ": ", name, " must be on the device of z_s (", in.z_s.device(),
              "), got ", t.device());
  return t.contiguous();
}

// The tensors of one pass of the rows; undefined ones are nullptr in RowsArgs. Forward: loss,
// stats_out and, with a gradient, grad; backward: stats_in, grad_loss and grad.
struct RowsTensors {
  at::Tensor loss, stats_out, stats_in, grad_loss, grad;
};

template <typename T>
T* mutable_ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

template <typename T>
const T* const_ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

template <template <typename> class Rule, typename student_t, typename teacher_t>
RowsArgs<Rule<acc_type<student_t>>, student_t, teacher_t> make_args(const Logits& in, const at::Tensor& target,
                                                                    const LossParams& params, const RowsTensors& t) {
  using acc_t = acc_type<student_t>;
  return {in.z_s.const_data_ptr<student_t>(),
          in.z_t.const_data_ptr<teacher_t>(),
          in.z_s.stride(0),
          in.z_t.stride(0),
          in.rows,
          in.cols,
          const_ptr_or_null<int64_t>(target),
          Rule<acc_t>(params),
          mutable_ptr_or_null<acc_t>(t.loss),
          mutable_ptr_or_null<acc_t>(t.stats_out),
          const_ptr_or_null<acc_t>(t.stats_in),
          const_ptr_or_null<acc_t>(t.grad_loss),
          mutable_ptr_or_null<student_t>(t.grad)};
}

// One pass of a Rule on a Device (CpuRows or CudaRows) over the rows of `in`, on the tensors `t`.
template <template <typename> class Rule, typename Device>
void run_rows(const Logits& in, const at::Tensor& target, const LossParams& params, const RowsTensors& t) {
  dispatch_float_pair(in.z_s.scalar_type(), in.z_t.scalar_type(), [&](auto student, auto teacher) {
    using student_t = typename decltype(student)::type;
    using teacher_t = typename decltype(teacher)::type;
    Device::run(make_args<Rule, student_t, teacher_t>(in, target, params, t));
  });
}

// The forward of a Rule on a Device: (loss (B,), stats (B, kStats), grad (B, K) in the dtype of z_s,
// or an empty (0,) tensor without with_grad). `target`: undefined for rules without a target class,
// else checked by check_target.
template <template <typename> class Rule, typename Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_rows(const Logits& in, const at::Tensor& target,
                                                            const LossParams& params, bool with_grad) {
  const auto options = in.z_s.options();
  const auto acc_options = options.dtype(acc_dtype(in.z_s.scalar_type()));
  at::Tensor loss = at::empty({in.rows}, acc_options);
  at::Tensor stats = at::empty({in.rows, Rule<float>::kStats}, acc_options);
  at::Tensor grad = with_grad ? at::empty({in.rows, in.cols}, options) : at::empty({0}, options);
  run_rows<Rule, Device>(in, target, params, {loss, stats, {}, {}, with_grad ? grad : at::Tensor()});
  return {loss, stats, grad};
}

// The backward of a Rule on a Device: grad_loss[b] * d loss_b / d z_s, (B, K) in the dtype of z_s.
template <template <typename> class Rule, typename Device>
at::Tensor backward_rows(const char* op, const at::Tensor& grad_loss_in, const Logits& in, const at::Tensor& target,
                         const at::Tensor& stats_in, const LossParams& params) {
  const at::Tensor grad_loss = check_row_values(op, "grad_loss", grad_loss_in, in, 0);
  const at::Tensor stats = check_row_values(op, "stats", stats_in, in, Rule<float>::kStats);
  at::Tensor grad = at::empty({in.rows, in.cols}, in.z_s.options());
  run_rows<Rule, Device>(in, target, params, {{}, {}, stats, grad_loss, grad});
  return grad;
}

// ---------------------------------------------------------------------------------------------
// The ops on a Device (CpuRows or CudaRows), registered by csrc/cpu/kd.cpp, csrc/cpu/dkd.cpp,
// csrc/cuda/kd.cu and csrc/cuda/dkd.cu: the checks, then the rows. Device::Guard makes the device of
// z_s current (z_t and the other tensors are checked to share it) or, on the CPU, does nothing.
// ---------------------------------------------------------------------------------------------

template <typename Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_forward(const at::Tensor& z_s, const at::Tensor& z_t,
                                                          double temperature, bool with_grad) {
  const Logits in = check_logits("kd_forward", z_s, z_t, temperature, 1);
  const typename Device::Guard guard(z_s.device());
  return forward_rows<KdRule, Device>(in, at::Tensor(), {temperature}, with_grad);
}

template <typename Device>
at::Tensor kd_backward(const at::Tensor& grad_loss, const at::Tensor& z_s, const at::Tensor& z_t,
                       const at::Tensor& stats, double temperature) {
  const Logits in = check_logits("kd_backward", z_s, z_t, temperature, 1);
  const typename Device::Guard guard(z_s.device());
  return backward_rows<KdRule, Device>("kd_backward", grad_loss, in, at::Tensor(), stats, {temperature});
}

template <typename Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor> dkd_forward(const at::Tensor& z_s, const at::Tensor& z_t,
                                                           const at::Tensor& target, double alpha, double beta,
                                                           double temperature, bool with_grad) {
  const Logits in = check_logits("dkd_forward", z_s, z_t, temperature, 2);
  const typename Device::Guard guard(z_s.device());
  const at::Tensor g = check_target("dkd_forward", target, in);
  return forward_rows<DkdRule, Device>(in, g, {temperature, alpha, beta}, with_grad);
}

template <typename Device>
at::Tensor dkd_backward(const at::Tensor& grad_loss, const at::Tensor& z_s, const at::Tensor& z_t,
                        const at::Tensor& target, const at::Tensor& stats, double alpha, double beta,
                        double temperature) {
  const Logits in = check_logits("dkd_backward", z_s, z_t, temperature, 2);
  const typename Device::Guard guard(z_s.device());
  const at::Tensor g = check_target("dkd_backward", target, in);
  return backward_rows<DkdRule, Device>("dkd_backward", grad_loss, in, g, stats, {temperature, alpha, beta});
}

}  // namespace logits
}  // namespace kdfast

// ---------------------------------------------------------------------------------------------
// CPU: rows in parallel (at::parallel_for), one row per thread at a time
// ---------------------------------------------------------------------------------------------
#if !defined(__CUDACC__)
#include <ATen/Parallel.h>

#include <algorithm>

namespace kdfast {
namespace logits {

struct SerialTeam {
  static constexpr int kChunk = 512;  // sequential sums of <= 512 terms, then one merge per chunk
  int lane = 0, lanes = 1;
  bool leader() const { return true; }
  template <typename State>
  State reduce(const State& s) const {
    return s;
  }
  template <typename acc_t, int n>
  void broadcast(Lse<acc_t> (&)[n]) const {}
};

constexpr int64_t kCpuGrainElements = 32768;  // at least this many elements per parallel task

struct CpuRows {
  using Guard = CpuGuard;

  template <typename Rule, typename student_t, typename teacher_t>
  static void run(const RowsArgs<Rule, student_t, teacher_t>& a) {
    const int64_t grain = std::max<int64_t>(1, kCpuGrainElements / std::max<int64_t>(1, a.cols));
    at::parallel_for(0, a.rows, grain, [&](int64_t begin, int64_t end) {
      SerialTeam team;
      for (int64_t row = begin; row < end; ++row) process_row(a, row, team);
    });
  }
};

}  // namespace logits
}  // namespace kdfast
#endif  // !__CUDACC__

// ---------------------------------------------------------------------------------------------
// CUDA: a warp per row (small K, 4 rows per block) or a block per row (large K)
// ---------------------------------------------------------------------------------------------
#if defined(__CUDACC__) || defined(KDFAST_CUDA_EMU)
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>

#include "cuda/launch.cuh"

namespace kdfast {
namespace logits {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpRowsThreads = 128;  // warp-per-row kernel: 4 rows per block

// Register budgets (no spills at these bounds: benchmarks/results/cuda-resources-sm90.csv). float:
// the block-per-row kernel takes up to 512 threads per row, 2 blocks per SM (<= 64 registers; it
// uses 42-64), so that one block's barrier does not idle its SM; the warp-per-row kernel 8 blocks
// of 128 threads per SM (<= 64 registers); double needs about 100 registers: up to 256 threads per
// row, 1 block (block per row) or 4 blocks (warp per row) per SM.
template <typename acc_t>
struct LaunchBounds {
  static constexpr bool kDouble = sizeof(acc_t) == sizeof(double);
  static constexpr int kRowThreads = kDouble ? 256 : 512;
  static constexpr int kRowBlocksPerSm = kDouble ? 1 : 2;
  static constexpr int kWarpRowsBlocksPerSm = kDouble ? 4 : 8;
};

template <typename acc_t>
__device__ __forceinline__ KlState<acc_t> shfl_down(const KlState<acc_t>& s, int offset) {
  return {__shfl_down_sync(kFullMask, s.ms, offset), __shfl_down_sync(kFullMask, s.ss, offset),
          __shfl_down_sync(kFullMask, s.mt, offset), __shfl_down_sync(kFullMask, s.st, offset),
          __shfl_down_sync(kFullMask, s.w, offset)};
}

// The merged state of the 32 lanes, in lane 0 (a fixed tree: deterministic). All lanes call it.
template <typename acc_t>
__device__ __forceinline__ KlState<acc_t> warp_reduce(KlState<acc_t> s) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) s.merge(shfl_down(s, offset));
  return s;
}

template <typename acc_t>
struct WarpTeam {
  static constexpr int kChunk = kMaxCols;  // one chunk: the whole row
  int lane, lanes;
  __device__ bool leader() const { return lane == 0; }
  __device__ KlState<acc_t> reduce(const KlState<acc_t>& s) const { return warp_reduce(s); }
  template <int n>
  __device__ void broadcast(Lse<acc_t> (&v)[n]) const {
#pragma unroll
    for (int i = 0; i < n; ++i) v[i] = {__shfl_sync(kFullMask, v[i].max, 0), __shfl_sync(kFullMask, v[i].log_sum, 0)};
  }
};

// blockDim.x (a multiple of 32) lanes; warp_states and row_lse point to shared memory.
template <typename acc_t>
struct BlockTeam {
  static constexpr int kChunk = kMaxCols;  // one chunk: the whole row
  int lane, lanes;
  KlState<acc_t>* warp_states;  // [blockDim.x / kWarp]
  Lse<acc_t>* row_lse;          // [Rule::kStats]
  __device__ bool leader() const { return lane == 0; }
  __device__ KlState<acc_t> reduce(const KlState<acc_t>& s) const {
    const int warp = threadIdx.x / kWarp, warp_lane = threadIdx.x % kWarp;
    const KlState<acc_t> merged = warp_reduce(s);
    if (warp_lane == 0) warp_states[warp] = merged;
    __syncthreads();
    KlState<acc_t> total = KlState<acc_t>::empty();
    if (warp == 0) {
      if (warp_lane < static_cast<int>(blockDim.x / kWarp)) total = warp_states[warp_lane];
      total = warp_reduce(total);
    }
    return total;
  }
  template <int n>
  __device__ void broadcast(Lse<acc_t> (&v)[n]) const {
    if (lane == 0) {
      for (int i = 0; i < n; ++i) row_lse[i] = v[i];
    }
    __syncthreads();
    for (int i = 0; i < n; ++i) v[i] = row_lse[i];
  }
};

template <typename Rule, typename student_t, typename teacher_t, bool kWarpRows>
__global__ void __launch_bounds__(kWarpRows ? kWarpRowsThreads : LaunchBounds<typename Rule::acc_t>::kRowThreads,
                                  kWarpRows ? LaunchBounds<typename Rule::acc_t>::kWarpRowsBlocksPerSm
                                            : LaunchBounds<typename Rule::acc_t>::kRowBlocksPerSm)
    rows_kernel(const RowsArgs<Rule, student_t, teacher_t> a) {
  using acc_t = typename Rule::acc_t;
  if constexpr (kWarpRows) {
    const int64_t row = static_cast<int64_t>(blockIdx.x) * (kWarpRowsThreads / kWarp) + threadIdx.x / kWarp;
    if (row >= a.rows) return;  // the whole warp
    WarpTeam<acc_t> team{static_cast<int>(threadIdx.x % kWarp), kWarp};
    process_row(a, row, team);
  } else {
    __shared__ KlState<acc_t> warp_states[LaunchBounds<acc_t>::kRowThreads / kWarp];
    __shared__ Lse<acc_t> row_lse[Rule::kStats];
    BlockTeam<acc_t> team{static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x), warp_states, row_lse};
    process_row(a, blockIdx.x, team);
  }
}

// Lanes per row: enough that each lane reads at most ~4 packs of the row (up to max_lanes); then,
// while the rows alone would not fill the GPU (about 1024 resident threads per SM), more lanes per
// row (up to one per pack). 32 lanes: the warp-per-row kernel; more: a block per row.
inline int lanes_per_row(int64_t rows, int cols, int pack, int max_lanes) {
  const int packs = (cols + pack - 1) / pack;
  int lanes = kWarp;
  while (lanes < max_lanes && lanes * int64_t(4) < packs) lanes *= 2;
  const int64_t fill = int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 1024;
  while (lanes < max_lanes && lanes < packs && rows * lanes < fill) lanes *= 2;
  return lanes;
}

struct CudaRows {
  using Guard = c10::cuda::CUDAGuard;

  template <typename Rule, typename student_t, typename teacher_t>
  static void run(const RowsArgs<Rule, student_t, teacher_t>& a) {
    if (a.rows == 0) return;
    TORCH_CHECK(a.rows <= std::numeric_limits<int32_t>::max(), "kdfast: too many rows for one launch (", a.rows, ")");
    const int lanes = lanes_per_row(a.rows, a.cols, pack_width<student_t, teacher_t>(),
                                    LaunchBounds<typename Rule::acc_t>::kRowThreads);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    if (lanes == kWarp) {
      constexpr int rows_per_block = kWarpRowsThreads / kWarp;
      const auto blocks = static_cast<unsigned>((a.rows + rows_per_block - 1) / rows_per_block);
      gpu::launch_kernel(rows_kernel<Rule, student_t, teacher_t, true>, blocks, kWarpRowsThreads, 0, stream, a);
    } else {
      gpu::launch_kernel(rows_kernel<Rule, student_t, teacher_t, false>, static_cast<unsigned>(a.rows), lanes, 0, stream,
                         a);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace logits
}  // namespace kdfast
#endif  // __CUDACC__ || KDFAST_CUDA_EMU
