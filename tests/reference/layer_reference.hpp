// Double-precision, plain-loop reference of the expert FFN, the Switch layer contract and the
// dense FFN (SEMANTICS.md rules 1, 2, 4-9, 14). Written from the specification, not from the
// library: it does not include any switchmoe header, so the tests compare two independent
// implementations. Slow and obviously correct on purpose.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

namespace switchmoe_test::ref {

using MatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MatI = Eigen::Matrix<int, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

enum class Act { kRelu, kGelu };

// ReLU, or the exact erf form of GELU: 0.5 * v * (1 + erf(v / sqrt(2))).
inline double activate(double v, Act act) {
  if (act == Act::kRelu) return v > 0.0 ? v : 0.0;
  return 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0)));
}

// Largest |activation'(v)| over all v: 1 for ReLU, 1.1289 for GELU (at v ~ 1.4142 * 1.0);
// used to propagate rounding errors through the activation in the precision bounds.
inline double activation_slope_bound(Act act) { return act == Act::kRelu ? 1.0 : 1.13; }

// One feed-forward network (an expert, or the dense FFN) in double precision.
struct Ffn {
  MatD w_in;   // [d_model, d_ff]
  MatD b_in;   // [1, d_ff], empty when the network has no bias
  MatD w_out;  // [d_ff, d_model]
  MatD b_out;  // [1, d_model], empty when the network has no bias
};

// Hidden pre-activation of one token: x[t] * w_in + b_in.  // [1, d_ff]
inline std::vector<double> ffn_pre_activation(const MatD& x, int t, const Ffn& f) {
  const int d_model = static_cast<int>(f.w_in.rows());
  const int d_ff = static_cast<int>(f.w_in.cols());
  std::vector<double> pre(d_ff, 0.0);
  for (int j = 0; j < d_ff; ++j) {
    double acc = f.b_in.size() ? f.b_in(0, j) : 0.0;
    for (int i = 0; i < d_model; ++i) acc += x(t, i) * f.w_in(i, j);
    pre[j] = acc;
  }
  return pre;
}

// FFN applied to row t of x: act(x w_in + b_in) .* hidden_scale * w_out + b_out. hidden_scale
// (optional, [tokens, d_ff]) models expert dropout: 0 for a dropped unit, 1/(1-p) for a kept one.
inline std::vector<double> ffn_row(const MatD& x, int t, const Ffn& f, Act act,
                                   const MatD* hidden_scale = nullptr) {
  const int d_model = static_cast<int>(f.w_out.cols());
  const int d_ff = static_cast<int>(f.w_out.rows());
  std::vector<double> hidden = ffn_pre_activation(x, t, f);
  for (int j = 0; j < d_ff; ++j) {
    hidden[j] = activate(hidden[j], act);
    if (hidden_scale) hidden[j] *= (*hidden_scale)(t, j);
  }
  std::vector<double> out(d_model, 0.0);
  for (int k = 0; k < d_model; ++k) {
    double acc = f.b_out.size() ? f.b_out(0, k) : 0.0;
    for (int j = 0; j < d_ff; ++j) acc += hidden[j] * f.w_out(j, k);
    out[k] = acc;
  }
  return out;
}

// Dense FFN over every token.  // [tokens, d_model]
inline MatD ffn(const MatD& x, const Ffn& f, Act act, const MatD* hidden_scale = nullptr) {
  MatD y = MatD::Zero(x.rows(), f.w_out.cols());
  for (int t = 0; t < x.rows(); ++t) {
    const std::vector<double> row = ffn_row(x, t, f, act, hidden_scale);
    for (int k = 0; k < y.cols(); ++k) y(t, k) = row[k];
  }
  return y;
}

// Rule 1: y[t] = sum over kept choices c (slot >= 0) of gate[t,c] * Expert_{expert[t,c]}(x[t]);
// a token whose every choice was dropped keeps y[t] = 0 exactly.
inline MatD switch_combine(const MatD& x, const std::vector<Ffn>& experts, const MatI& expert,
                           const MatI& slot, const MatD& gate, Act act) {
  const int d_model = experts.empty() ? 0 : static_cast<int>(experts[0].w_out.cols());
  MatD y = MatD::Zero(x.rows(), d_model);
  for (int t = 0; t < x.rows(); ++t) {
    for (int c = 0; c < expert.cols(); ++c) {
      if (slot(t, c) < 0) continue;
      const std::vector<double> out = ffn_row(x, t, experts[expert(t, c)], act);
      for (int k = 0; k < d_model; ++k) y(t, k) += gate(t, c) * out[k];
    }
  }
  return y;
}

// Rule 2: logits = x * W_r (+ b).  // [tokens, experts]
inline MatD router_logits(const MatD& x, const MatD& w_r) {
  MatD logits = MatD::Zero(x.rows(), w_r.cols());
  for (int t = 0; t < x.rows(); ++t)
    for (int e = 0; e < w_r.cols(); ++e) {
      double acc = 0.0;
      for (int i = 0; i < x.cols(); ++i) acc += x(t, i) * w_r(i, e);
      logits(t, e) = acc;
    }
  return logits;
}

inline double logsumexp_row(const MatD& logits, int t) {
  double m = -std::numeric_limits<double>::infinity();
  for (int e = 0; e < logits.cols(); ++e) m = std::max(m, logits(t, e));
  double s = 0.0;
  for (int e = 0; e < logits.cols(); ++e) s += std::exp(logits(t, e) - m);
  return m + std::log(s);
}

inline MatD softmax_rows(const MatD& logits) {
  MatD p(logits.rows(), logits.cols());
  for (int t = 0; t < logits.rows(); ++t) {
    const double lse = logsumexp_row(logits, t);
    for (int e = 0; e < logits.cols(); ++e) p(t, e) = std::exp(logits(t, e) - lse);
  }
  return p;
}

// Rule 9: z = mean over tokens of logsumexp(logits[t])^2.
inline double z_loss(const MatD& logits) {
  if (logits.rows() == 0) return 0.0;
  double s = 0.0;
  for (int t = 0; t < logits.rows(); ++t) {
    const double lse = logsumexp_row(logits, t);
    s += lse * lse;
  }
  return s / static_cast<double>(logits.rows());
}

// Rule 6: C = max(min_capacity, min(T_g, floor(capacity_factor * T_g / E))); explicit > 0 wins.
inline int capacity(int group_tokens, int num_experts, double capacity_factor, int min_capacity,
                    int explicit_capacity) {
  if (explicit_capacity > 0) return explicit_capacity;
  const int by_factor = static_cast<int>(
      std::floor(capacity_factor * group_tokens / static_cast<double>(num_experts)));
  return std::max(min_capacity, std::min(group_tokens, by_factor));
}

struct RouteOptions {
  int top_k = 1;
  int capacity = 0;             // C per expert per group (ignored when dropless)
  int group_size = 0;           // 0: the whole call is one group
  bool by_probability = false;  // rule 7 priority: false = token order
  bool dropless = false;
  bool renormalize = false;
};

// The routing decisions of rules 4-8, computed from given probabilities.
struct RouteResult {
  MatI expert;  // [tokens, k] chosen experts before capacity
  MatI slot;    // [tokens, k] position in the expert's buffer of its group, -1 if dropped
  MatD gate;    // [tokens, k] combine weight, 0 if dropped
  int capacity = 0;
  int group_size = 0;
  int groups = 0;
  double aux = 0.0;                // rule 8, unscaled
  std::vector<int> tokens_before;  // [E] choices per expert before capacity (all groups)
  std::vector<int> tokens_after;   // [E] kept choices per expert (all groups)
};

// `rank_by` (optional, [tokens, experts], e.g. the logits) orders the experts of a token for the
// top-k choice instead of the probabilities: softmax is monotone, so the order is the same, but
// logits cannot collapse into false ties when float32 probabilities round to equal values.
inline RouteResult route(const MatD& probs, const RouteOptions& o, const MatD* rank_by = nullptr) {
  const int n = static_cast<int>(probs.rows());
  const int num_experts = static_cast<int>(probs.cols());
  const int k = o.top_k;
  RouteResult r;
  r.expert = MatI::Zero(n, k);
  r.slot = MatI::Constant(n, k, -1);
  r.gate = MatD::Zero(n, k);
  r.tokens_before.assign(num_experts, 0);
  r.tokens_after.assign(num_experts, 0);
  r.group_size = o.group_size > 0 ? o.group_size : n;
  r.groups = r.group_size > 0 ? (n + r.group_size - 1) / r.group_size : 0;

  // Rule 4: top-k by probability, ties to the lower expert index.
  for (int t = 0; t < n; ++t) {
    std::vector<int> order(num_experts);
    std::iota(order.begin(), order.end(), 0);
    const MatD& score = rank_by ? *rank_by : probs;
    std::stable_sort(order.begin(), order.end(),
                     [&](int a, int b) { return score(t, a) > score(t, b); });
    double sum = 0.0;
    for (int c = 0; c < k; ++c) {
      r.expert(t, c) = order[c];
      r.gate(t, c) = probs(t, order[c]);
      sum += r.gate(t, c);
    }
    if (o.renormalize)
      for (int c = 0; c < k; ++c) r.gate(t, c) /= sum;
  }

  int max_load = 0;
  double aux_sum = 0.0;
  for (int g = 0; g < r.groups; ++g) {
    const int begin = g * r.group_size;
    const int end = std::min(n, begin + r.group_size);
    const int tg = end - begin;
    std::vector<int> visit(tg);
    std::iota(visit.begin(), visit.end(), begin);
    if (o.by_probability) {
      // Rule 7: descending top-1 probability, stable so ties keep token order.
      std::stable_sort(visit.begin(), visit.end(), [&](int a, int b) {
        return probs(a, r.expert(a, 0)) > probs(b, r.expert(b, 0));
      });
    }
    std::vector<int> fill(num_experts, 0);
    std::vector<int> chosen(num_experts, 0);
    for (int c = 0; c < k; ++c) {
      for (int t : visit) {
        const int e = r.expert(t, c);
        ++chosen[e];
        if (o.dropless || fill[e] < o.capacity) {
          r.slot(t, c) = fill[e]++;
        } else {
          r.gate(t, c) = 0.0;
        }
      }
    }
    // Rule 8: aux = E * sum_e f_e * P_e for this group.
    double aux = 0.0;
    for (int e = 0; e < num_experts; ++e) {
      double p_mean = 0.0;
      for (int t = begin; t < end; ++t) p_mean += probs(t, e);
      p_mean /= tg;
      aux += (static_cast<double>(chosen[e]) / tg) * p_mean;
      r.tokens_before[e] += chosen[e];
      r.tokens_after[e] += fill[e];
      max_load = std::max(max_load, fill[e]);
    }
    aux_sum += num_experts * aux;
  }
  r.aux = r.groups ? aux_sum / r.groups : 0.0;
  r.capacity = o.dropless ? max_load : o.capacity;
  return r;
}

// Rule 14 statistics from a routing result.
struct Stats {
  std::vector<int> tokens_before;
  std::vector<int> tokens_after;
  double dropped_token_fraction = 0.0;   // tokens whose every choice was dropped / tokens
  double dropped_choice_fraction = 0.0;  // dropped choices / all choices
  double router_confidence = 0.0;        // mean gate of kept choices
  double expert_usage = 0.0;             // kept choices / (E * C * groups)
};

inline Stats stats(const RouteResult& r, int num_experts) {
  Stats s;
  s.tokens_before = r.tokens_before;
  s.tokens_after = r.tokens_after;
  const int n = static_cast<int>(r.slot.rows());
  const int k = static_cast<int>(r.slot.cols());
  int kept = 0, dropped_tokens = 0;
  double gate_sum = 0.0;
  for (int t = 0; t < n; ++t) {
    int kept_here = 0;
    for (int c = 0; c < k; ++c)
      if (r.slot(t, c) >= 0) {
        ++kept_here;
        gate_sum += r.gate(t, c);
      }
    kept += kept_here;
    if (kept_here == 0) ++dropped_tokens;
  }
  if (n > 0) {
    s.dropped_token_fraction = static_cast<double>(dropped_tokens) / n;
    s.dropped_choice_fraction = static_cast<double>(n * k - kept) / (n * k);
  }
  s.router_confidence = kept ? gate_sum / kept : 0.0;
  const double slots = static_cast<double>(num_experts) * r.capacity * r.groups;
  s.expert_usage = slots > 0 ? kept / slots : 0.0;
  return s;
}

// ---------------------------------------------------------------------------------------------
// Small helpers shared by the layer test files (templated, so this header needs no switchmoe
// header; they use only the accessors of the public API).

template <class Derived>
MatD to_double(const Eigen::MatrixBase<Derived>& m) {
  return m.template cast<double>();
}

// max |a - b| over all elements, in double (plain loop; shapes must agree).
template <class A, class B>
double max_abs_diff(const A& a, const B& b) {
  if (a.rows() != b.rows() || a.cols() != b.cols()) return std::numeric_limits<double>::infinity();
  double m = 0.0;
  for (Eigen::Index r = 0; r < a.rows(); ++r)
    for (Eigen::Index c = 0; c < a.cols(); ++c)
      m = std::max(m, std::abs(static_cast<double>(a(r, c)) - static_cast<double>(b(r, c))));
  return m;
}

// Uniform values in [lo, hi) from a fixed-seed generator.
template <class MatrixT>
void fill_uniform(MatrixT& m, std::mt19937& gen, double lo, double hi) {
  std::uniform_real_distribution<double> dist(lo, hi);
  for (int r = 0; r < m.rows(); ++r)
    for (int c = 0; c < m.cols(); ++c) m(r, c) = static_cast<typename MatrixT::Scalar>(dist(gen));
}

// Expert e of a SwitchLayer (w_in/b_in/w_out/b_out accessors) as a double reference FFN.
template <class Layer>
Ffn expert_of(Layer& layer, int e, bool bias) {
  Ffn f;
  f.w_in = to_double(layer.w_in(e));
  f.w_out = to_double(layer.w_out(e));
  if (bias) {
    f.b_in = to_double(layer.b_in(e));
    f.b_out = to_double(layer.b_out(e));
  }
  return f;
}

template <class Layer>
std::vector<Ffn> experts_of(Layer& layer, int num_experts, bool bias) {
  std::vector<Ffn> out;
  for (int e = 0; e < num_experts; ++e) out.push_back(expert_of(layer, e, bias));
  return out;
}

}  // namespace switchmoe_test::ref
