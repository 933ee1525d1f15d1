#pragma once
// Double-precision reference of the MoE variants, written from SEMANTICS.md rules 15-20 (and
// the rules 1-9 they build on), not from the library's code: straightforward loops, no
// performance concerns. Used by tests/variants_*_test.cpp.

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <numeric>
#include <vector>

namespace switchmoe_test {
namespace vref {

using MatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MatI = Eigen::Matrix<int, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

template <class Derived>
MatD to_double(const Eigen::MatrixBase<Derived>& m) {
  return m.template cast<double>();
}

enum class Act { kSilu, kGelu };

inline double sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }

// Rule 15: SwiGlu's act is SiLU z * sigmoid(z); GeGlu's the exact-erf GELU.
inline double act(double z, Act a) {
  if (a == Act::kSilu) return z * sigmoid(z);
  return 0.5 * z * (1.0 + std::erf(z / std::sqrt(2.0)));
}

/// One gated expert (rule 15): w_gate, w_in [d_model, d_ff], w_out [d_ff, d_model]; biases
/// [1, n] or empty.
struct GatedFfn {
  MatD w_gate, w_in, w_out, b_gate, b_in, b_out;
};

/// (act(x W_gate + b_gate) * (x W_in + b_in)) W_out + b_out for every row of x.
inline MatD gated_ffn(const MatD& x, const GatedFfn& f, Act a) {
  const Eigen::Index d_ff = f.w_in.cols(), d_model = f.w_out.cols();
  MatD y = MatD::Zero(x.rows(), d_model);
  for (Eigen::Index t = 0; t < x.rows(); ++t) {
    for (Eigen::Index j = 0; j < d_ff; ++j) {
      double g = f.b_gate.size() ? f.b_gate(0, j) : 0.0;
      double u = f.b_in.size() ? f.b_in(0, j) : 0.0;
      for (Eigen::Index i = 0; i < x.cols(); ++i) {
        g += x(t, i) * f.w_gate(i, j);
        u += x(t, i) * f.w_in(i, j);
      }
      const double h = act(g, a) * u;
      for (Eigen::Index o = 0; o < d_model; ++o) y(t, o) += h * f.w_out(j, o);
    }
    if (f.b_out.size()) {
      for (Eigen::Index o = 0; o < d_model; ++o) y(t, o) += f.b_out(0, o);
    }
  }
  return y;
}

enum class Score { kSoftmax, kSigmoid };

/// Rule 2 / rule 20: softmax over experts, or an elementwise sigmoid.
inline MatD scores(const MatD& logits, Score s) {
  MatD p(logits.rows(), logits.cols());
  for (Eigen::Index t = 0; t < logits.rows(); ++t) {
    if (s == Score::kSigmoid) {
      for (Eigen::Index e = 0; e < logits.cols(); ++e) p(t, e) = sigmoid(logits(t, e));
      continue;
    }
    const double m = logits.row(t).maxCoeff();
    double sum = 0.0;
    for (Eigen::Index e = 0; e < logits.cols(); ++e) sum += std::exp(logits(t, e) - m);
    for (Eigen::Index e = 0; e < logits.cols(); ++e) p(t, e) = std::exp(logits(t, e) - m) / sum;
  }
  return p;
}

/// Rule 9.
inline double z_loss(const MatD& logits) {
  double z = 0.0;
  for (Eigen::Index t = 0; t < logits.rows(); ++t) {
    const double m = logits.row(t).maxCoeff();
    double sum = 0.0;
    for (Eigen::Index e = 0; e < logits.cols(); ++e) sum += std::exp(logits(t, e) - m);
    const double lse = m + std::log(sum);
    z += lse * lse;
  }
  return logits.rows() ? z / logits.rows() : 0.0;
}

/// Rule 6.
inline int capacity(int group_tokens, int experts, double factor, int min_capacity) {
  const int c = static_cast<int>(std::floor(factor * group_tokens / experts));
  return std::max(min_capacity, std::min(group_tokens, c));
}

struct TokenChoiceOptions {
  int experts = 0, k = 1;
  Score score = Score::kSoftmax;
  bool renormalize = false;
  double scaling = 1.0;      // rule 20: multiplies every gate
  int capacity = 0;          // per expert and group; < 0: dropless
  int group_size = 0;        // 0: one group
  std::vector<double> bias;  // rule 19: added to the scores to choose only (empty: none)
  // Rule 18: with k = 2, the second choice is dispatched only if u(t) < 2 * p2 (empty: always).
  std::vector<double> second_choice_u;
};

struct RoutingResult {
  MatD scores;  // [tokens, experts]
  MatI expert;  // [tokens, k]
  MatI slot;    // [tokens, k] -1: dropped
  MatD gate;    // [tokens, k] 0 when dropped
  double aux = 0.0;
};

/// Token-choice routing (rules 4-8 with 18-20), token-order priority.
inline RoutingResult route_token_choice(const MatD& logits, const TokenChoiceOptions& o) {
  const int T = static_cast<int>(logits.rows()), E = o.experts, k = o.k;
  RoutingResult r;
  r.scores = scores(logits, o.score);
  r.expert = MatI::Constant(T, k, -1);
  r.slot = MatI::Constant(T, k, -1);
  r.gate = MatD::Zero(T, k);
  for (int t = 0; t < T; ++t) {
    std::vector<int> order(E);
    std::iota(order.begin(), order.end(), 0);
    auto key = [&](int e) { return r.scores(t, e) + (o.bias.empty() ? 0.0 : o.bias[e]); };
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return key(a) > key(b); });
    double chosen = 0.0;
    for (int c = 0; c < k; ++c) chosen += r.scores(t, order[c]);
    for (int c = 0; c < k; ++c) {
      r.expert(t, c) = order[c];
      const double s = r.scores(t, order[c]);
      r.gate(t, c) = (o.renormalize ? s / chosen : s) * o.scaling;
    }
  }
  const int g = o.group_size > 0 ? o.group_size : T;
  std::vector<bool> dispatched(static_cast<std::size_t>(T * k), true);
  if (!o.second_choice_u.empty()) {
    for (int t = 0; t < T; ++t) {
      dispatched[t * k + 1] = o.second_choice_u[t] < 2.0 * r.scores(t, r.expert(t, 1));
    }
  }
  double aux = 0.0;
  int groups = 0;
  for (int first = 0; first < T; first += g, ++groups) {
    std::vector<int> load(E, 0);
    for (int c = 0; c < k; ++c) {
      for (int t = first; t < first + g; ++t) {
        if (!dispatched[t * k + c]) continue;
        int& used = load[r.expert(t, c)];
        if (o.capacity < 0 || used < o.capacity) r.slot(t, c) = used++;
      }
    }
    // Rule 8 (with rule 20's normalized sigmoid scores for P).
    std::vector<double> f(E, 0.0), P(E, 0.0);
    for (int t = first; t < first + g; ++t) {
      for (int c = 0; c < k; ++c) f[r.expert(t, c)] += 1.0 / g;
      const double sum = r.scores.row(t).sum();
      for (int e = 0; e < E; ++e) {
        P[e] += (o.score == Score::kSigmoid ? r.scores(t, e) / sum : r.scores(t, e)) / g;
      }
    }
    double a = 0.0;
    for (int e = 0; e < E; ++e) a += f[e] * P[e];
    aux += E * a;
  }
  r.aux = groups ? aux / groups : 0.0;
  for (int t = 0; t < T; ++t) {
    for (int c = 0; c < k; ++c) {
      if (r.slot(t, c) < 0) r.gate(t, c) = 0.0;
    }
  }
  return r;
}

/// Expert-choice routing (rule 17): per group, each expert takes the C tokens with its highest
/// probability (ties: lower token). Returns kept[t][e] and the gate (probability or 0).
struct ExpertChoiceResult {
  MatD probs;  // [tokens, experts]
  MatD gate;   // [tokens, experts] probability where expert e took token t, else 0
  MatI taken;  // [tokens, experts] 1 where expert e took token t
};

inline ExpertChoiceResult route_expert_choice(const MatD& logits, int capacity_per_group,
                                              int group_size, double scaling = 1.0) {
  const int T = static_cast<int>(logits.rows()), E = static_cast<int>(logits.cols());
  ExpertChoiceResult r;
  r.probs = scores(logits, Score::kSoftmax);
  r.gate = MatD::Zero(T, E);
  r.taken = MatI::Zero(T, E);
  const int g = group_size > 0 ? group_size : T;
  for (int first = 0; first < T; first += g) {
    for (int e = 0; e < E; ++e) {
      std::vector<int> order(g);
      std::iota(order.begin(), order.end(), first);
      std::stable_sort(order.begin(), order.end(),
                       [&](int a, int b) { return r.probs(a, e) > r.probs(b, e); });
      for (int i = 0; i < std::min(capacity_per_group, g); ++i) {
        r.taken(order[i], e) = 1;
        r.gate(order[i], e) = r.probs(order[i], e) * scaling;
      }
    }
  }
  return r;
}

/// Central finite differences of f at m (in place perturbation), step h.
inline MatD finite_difference(const std::function<double()>& f, MatD& m, double h = 1e-5) {
  MatD g(m.rows(), m.cols());
  for (Eigen::Index i = 0; i < m.size(); ++i) {
    const double v = m.data()[i];
    m.data()[i] = v + h;
    const double up = f();
    m.data()[i] = v - h;
    const double down = f();
    m.data()[i] = v;
    g.data()[i] = (up - down) / (2 * h);
  }
  return g;
}

/// max |a - b| / max(1, max |b|).
inline double relative_error(const MatD& a, const MatD& b) {
  const double scale = std::max(1.0, b.cwiseAbs().maxCoeff());
  return (a - b).cwiseAbs().maxCoeff() / scale;
}

}  // namespace vref
}  // namespace switchmoe_test

namespace switchmoe_test {
namespace vref {

/// A plain (ungated) FFN act(x W_in + b_in) W_out + b_out, rule 1's expert; w_gate unused.
inline MatD plain_ffn(const MatD& x, const GatedFfn& f, Act a) {
  MatD pre = x * f.w_in;
  if (f.b_in.size()) pre.rowwise() += f.b_in.row(0);
  for (Eigen::Index i = 0; i < pre.size(); ++i) pre.data()[i] = act(pre.data()[i], a);
  MatD y = pre * f.w_out;
  if (f.b_out.size()) y.rowwise() += f.b_out.row(0);
  return y;
}

/// Everything a variant layer computes, in double (rules 1, 15-20).
struct Layer {
  MatD w_router;                  // [d_model, experts]
  std::vector<GatedFfn> experts;  // routed
  bool gated = true;
  Act act = Act::kSilu;
  bool has_shared = false;
  GatedFfn shared;
  MatD w_shared_gate;  // [d_model, 1] or empty: s = 1
  bool expert_choice = false;
  int capacity = 0;  // per expert and group (token choice: < 0 dropless)
  TokenChoiceOptions routing;
  double aux_coef = 0.0, z_coef = 0.0;
};

struct LayerResult {
  MatD y;
  MatI decisions;  // token choice: [expert | slot]; expert choice: taken
  double aux = 0.0, z = 0.0;
};

inline LayerResult layer_forward(const MatD& x, const Layer& l) {
  const int T = static_cast<int>(x.rows()), E = static_cast<int>(l.experts.size());
  const MatD logits = x * l.w_router;
  std::vector<MatD> out;
  for (const GatedFfn& f : l.experts) {
    out.push_back(l.gated ? gated_ffn(x, f, l.act) : plain_ffn(x, f, l.act));
  }
  LayerResult r;
  r.y = MatD::Zero(T, x.cols());
  if (l.expert_choice) {
    const ExpertChoiceResult ec =
        route_expert_choice(logits, l.capacity, l.routing.group_size, l.routing.scaling);
    for (int t = 0; t < T; ++t)
      for (int e = 0; e < E; ++e) r.y.row(t) += ec.gate(t, e) * out[e].row(t);
    r.decisions = ec.taken;
  } else {
    TokenChoiceOptions o = l.routing;
    o.capacity = l.capacity;
    const RoutingResult rr = route_token_choice(logits, o);
    for (int t = 0; t < T; ++t)
      for (int c = 0; c < o.k; ++c) r.y.row(t) += rr.gate(t, c) * out[rr.expert(t, c)].row(t);
    r.decisions.resize(T, 2 * o.k);
    r.decisions << rr.expert, rr.slot;
    r.aux = rr.aux;
  }
  if (l.has_shared) {
    const MatD ys = l.gated ? gated_ffn(x, l.shared, l.act) : plain_ffn(x, l.shared, l.act);
    for (int t = 0; t < T; ++t) {
      const double s = l.w_shared_gate.size() ? sigmoid((x.row(t) * l.w_shared_gate)(0, 0)) : 1.0;
      r.y.row(t) += s * ys.row(t);
    }
  }
  r.z = z_loss(logits);
  return r;
}

/// sum(dy .* y) + aux_coef * aux + z_coef * z: the loss whose gradient a layer's backward gives.
inline double layer_loss(const MatD& x, const Layer& l, const MatD& dy) {
  const LayerResult r = layer_forward(x, l);
  return (r.y.array() * dy.array()).sum() + l.aux_coef * r.aux + l.z_coef * r.z;
}

}  // namespace vref
}  // namespace switchmoe_test
