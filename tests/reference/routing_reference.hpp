// Slow, obviously-correct double-precision reference of the router and of routing: rule 2
// (logits and softmax), rules 4-9 of SEMANTICS.md (choice, groups, capacity, priority,
// load-balancing loss, z-loss) and the gradients that reach the router logits (rule 10).
// Written from SEMANTICS.md alone, with plain loops, so that the tests compare the library
// against an independent reading of the spec.
//
// The reference does not include the library. The routing decisions are taken by route_probs()
// from a plain RouteOptions; the entry points that take the library's options (route(),
// route_from_probs(), capacity()) are templates over any struct with the field names of
// switchmoe::RoutingOptions and only translate them.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "reference/common.hpp"

namespace switchmoe_test::ref {

// Rule 2: logits = x * W_r (+ b) in double.  // [tokens, experts]
inline MatD router_logits(const MatD& x,                 // [tokens, d_model]
                          const MatD& w,                 // [d_model, experts]
                          const MatD* bias = nullptr) {  // [1, experts]
  MatD logits = MatD::Zero(x.rows(), w.cols());
  for (Eigen::Index t = 0; t < x.rows(); ++t) {
    for (Eigen::Index e = 0; e < w.cols(); ++e) {
      double sum = bias != nullptr ? (*bias)(0, e) : 0.0;
      for (Eigen::Index d = 0; d < x.cols(); ++d) sum += x(t, d) * w(d, e);
      logits(t, e) = sum;
    }
  }
  return logits;
}

// Rule 2: probs = softmax(logits) over experts, row by row.
inline MatD softmax(const MatD& logits) {  // [tokens, experts]
  MatD probs(logits.rows(), logits.cols());
  for (Eigen::Index t = 0; t < logits.rows(); ++t) {
    double max_logit = logits(t, 0);
    for (Eigen::Index e = 1; e < logits.cols(); ++e) max_logit = std::max(max_logit, logits(t, e));
    double sum = 0.0;
    for (Eigen::Index e = 0; e < logits.cols(); ++e) sum += std::exp(logits(t, e) - max_logit);
    for (Eigen::Index e = 0; e < logits.cols(); ++e) {
      probs(t, e) = std::exp(logits(t, e) - max_logit) / sum;
    }
  }
  return probs;
}

// log(sum_e exp(logits[t, e])) for every token.  // [tokens]
inline std::vector<double> logsumexp(const MatD& logits) {
  std::vector<double> lse(logits.rows());
  for (Eigen::Index t = 0; t < logits.rows(); ++t) {
    double max_logit = logits(t, 0);
    for (Eigen::Index e = 1; e < logits.cols(); ++e) max_logit = std::max(max_logit, logits(t, e));
    double sum = 0.0;
    for (Eigen::Index e = 0; e < logits.cols(); ++e) sum += std::exp(logits(t, e) - max_logit);
    lse[t] = max_logit + std::log(sum);
  }
  return lse;
}

// Rule 4: the top-k experts of every token by `score` (the probabilities, or anything ordered
// like them); ties go to the lower expert index (a strict '>' while scanning experts in
// increasing order keeps the first maximum).
inline MatI top_k(const MatD& score, int k) {  // [tokens, k]
  MatI expert(score.rows(), k);
  for (Eigen::Index t = 0; t < score.rows(); ++t) {
    std::vector<bool> taken(score.cols(), false);
    for (int c = 0; c < k; ++c) {
      int best = -1;
      for (int e = 0; e < score.cols(); ++e) {
        if (taken[e]) continue;
        if (best < 0 || score(t, e) > score(t, best)) best = e;
      }
      taken[best] = true;
      expert(t, c) = best;
    }
  }
  return expert;
}

// Rule 6: C = max(min_capacity, min(T_g, floor(factor * T_g / E))). An explicit capacity
// (> 0) replaces the formula; the tests only use explicit values in [min_capacity, T_g],
// where every reading of "overrides the factor" agrees.
inline int capacity(int group_tokens, int num_experts, double capacity_factor, int min_capacity,
                    int explicit_capacity) {
  if (explicit_capacity > 0) return explicit_capacity;
  const int by_factor = static_cast<int>(
      std::floor(capacity_factor * group_tokens / static_cast<double>(num_experts)));
  return std::max(min_capacity, std::min(group_tokens, by_factor));
}

// Rule 6 with the fields of switchmoe::RoutingOptions; `train` picks the factor (rule 6's
// defaults differ between training and evaluation).
template <class Options>
int capacity(int group_tokens, const Options& o, bool train) {
  return capacity(group_tokens, o.num_experts, train ? o.capacity_factor : o.eval_capacity_factor,
                  o.min_capacity, o.expert_capacity);
}

// Consecutive groups of `group_size` tokens (rule 5; 0: one group of all tokens). The library
// requires group_size to divide the token count; the reference also accepts a shorter last
// group, which changes nothing when it does.
inline int group_count(int tokens, int group_size) {
  const int g = group_size > 0 ? group_size : tokens;
  return g > 0 ? (tokens + g - 1) / g : 0;
}

// Rule 8, per group then averaged over groups: aux = E * sum_e f_e * P_e with f_e the fraction
// of the group's tokens that chose e among their k choices (before capacity) and P_e the mean
// probability of e over the group.
inline double load_balancing_loss(const MatD& probs,   // [tokens, experts]
                                  const MatI& expert,  // [tokens, k]
                                  int group_size) {
  const int tokens = static_cast<int>(probs.rows());
  const int experts = static_cast<int>(probs.cols());
  const int g = group_size > 0 ? group_size : tokens;
  const int groups = group_count(tokens, group_size);
  if (groups == 0) return 0.0;
  double total = 0.0;
  for (int group = 0; group < groups; ++group) {
    const int begin = group * g;
    const int end = std::min(tokens, begin + g);
    const int tg = end - begin;
    std::vector<double> f(experts, 0.0), p(experts, 0.0);
    for (int t = begin; t < end; ++t) {
      for (int c = 0; c < expert.cols(); ++c) f[expert(t, c)] += 1.0 / tg;
      for (int e = 0; e < experts; ++e) p[e] += probs(t, e) / tg;
    }
    double aux = 0.0;
    for (int e = 0; e < experts; ++e) aux += f[e] * p[e];
    total += experts * aux;
  }
  return total / groups;
}

// Rule 9: z = mean over tokens of logsumexp(logits[t])^2.
inline double router_z_loss(const MatD& logits) {
  if (logits.rows() == 0) return 0.0;
  double total = 0.0;
  for (double lse : logsumexp(logits)) total += lse * lse;
  return total / logits.rows();
}

// The routing decisions in plain terms, with the capacity already worked out.
struct RouteOptions {
  int top_k = 1;
  int capacity = 0;             // C per expert per group (ignored when dropless)
  int group_size = 0;           // 0: the whole call is one group
  bool by_probability = false;  // rule 7 priority: false = token order
  bool dropless = false;
  bool renormalize = false;
};

// Rule 7: the order in which the tokens [begin, end) of one group claim their slots.
inline std::vector<int> priority_order(const MatD& probs, const MatI& expert, int begin, int end,
                                       bool by_probability) {
  std::vector<int> order(end - begin);
  std::iota(order.begin(), order.end(), begin);
  if (by_probability) {
    // Descending top-1 probability, stable so ties keep token order.
    std::stable_sort(order.begin(), order.end(),
                     [&](int a, int b) { return probs(a, expert(a, 0)) > probs(b, expert(b, 0)); });
  }
  return order;
}

struct Routing {
  MatD probs;             // [tokens, experts]
  MatI expert;            // [tokens, k] chosen experts, best first, before capacity
  MatI slot;              // [tokens, k] position in the expert's buffer of its group, -1 if dropped
  MatD gate;              // [tokens, k] combine weight, 0 if dropped
  double aux_loss = 0.0;  // rule 8, unscaled
  double z_loss = 0.0;    // rule 9, unscaled (only when routed from logits)
  int capacity = 0;       // C (dropless: the largest load of any expert in any group)
  int group_size = 0;     // tokens per group
  int groups = 0;         // number of groups
  std::vector<int> tokens_before;  // [experts] choices per expert before capacity (all groups)
  std::vector<int> tokens_after;   // [experts] kept choices per expert (all groups)
};

// Rules 4-8 on given probabilities: the discrete decisions (top-k, priority, slots) are taken
// on `probs` exactly as given. `rank_by` (optional, [tokens, experts], e.g. the logits) orders
// the experts of a token for the top-k choice instead: softmax is monotone, so the order is the
// same, but logits cannot collapse into false ties when float32 probabilities round to equal
// values.
inline Routing route_probs(const MatD& probs, const RouteOptions& o,
                           const MatD* rank_by = nullptr) {
  Routing r;
  const int tokens = static_cast<int>(probs.rows());
  const int experts = static_cast<int>(probs.cols());
  const int k = o.top_k;
  r.probs = probs;
  r.group_size = o.group_size > 0 ? o.group_size : tokens;
  r.groups = group_count(tokens, o.group_size);
  r.expert = top_k(rank_by != nullptr ? *rank_by : probs, k);
  r.slot = MatI::Constant(tokens, k, -1);
  r.gate = MatD::Zero(tokens, k);
  r.tokens_before.assign(experts, 0);
  r.tokens_after.assign(experts, 0);

  // Rule 6, dropless: C is the largest per-group load, counted over all k choices.
  r.capacity = o.dropless ? 0 : o.capacity;
  for (int group = 0; group < r.groups; ++group) {
    const int begin = group * r.group_size;
    const int end = std::min(tokens, begin + r.group_size);
    std::vector<int> load(experts, 0);
    for (int t = begin; t < end; ++t) {
      for (int c = 0; c < k; ++c) ++load[r.expert(t, c)];
    }
    for (int e = 0; e < experts; ++e) {
      r.tokens_before[e] += load[e];
      if (o.dropless) r.capacity = std::max(r.capacity, load[e]);
    }
  }

  // Rule 7: slots fill in priority order, every first choice before any second choice.
  for (int group = 0; group < r.groups; ++group) {
    const int begin = group * r.group_size;
    const int end = std::min(tokens, begin + r.group_size);
    const std::vector<int> order = priority_order(probs, r.expert, begin, end, o.by_probability);
    std::vector<int> filled(experts, 0);
    for (int c = 0; c < k; ++c) {
      for (int t : order) {
        const int e = r.expert(t, c);
        if (filled[e] < r.capacity) r.slot(t, c) = filled[e]++;
      }
    }
    for (int e = 0; e < experts; ++e) r.tokens_after[e] += filled[e];
  }

  // Rule 4: the gate is the raw probability, or renormalized over the k choices before
  // capacity; a dropped choice has gate 0.
  for (int t = 0; t < tokens; ++t) {
    double chosen_sum = 0.0;
    for (int c = 0; c < k; ++c) chosen_sum += probs(t, r.expert(t, c));
    for (int c = 0; c < k; ++c) {
      if (r.slot(t, c) < 0) continue;
      const double p = probs(t, r.expert(t, c));
      r.gate(t, c) = o.renormalize ? p / chosen_sum : p;
    }
  }
  r.aux_loss = load_balancing_loss(probs, r.expert, r.group_size);
  return r;
}

// switchmoe::RoutingOptions-like options in the plain terms of route_probs(); `tokens` is the
// call's token count (a group of all of them when group_size is 0).
template <class Options>
RouteOptions route_options(int tokens, const Options& o, bool train) {
  using Priority = decltype(o.priority);
  RouteOptions plain;
  plain.top_k = o.top_k;
  plain.group_size = o.group_size;
  plain.capacity = capacity(o.group_size > 0 ? o.group_size : tokens, o, train);
  plain.by_probability = o.priority == Priority::kRouterProbability;
  plain.dropless = o.dropless;
  plain.renormalize = o.renormalize;
  return plain;
}

// Rules 4-9 on already computed probabilities and logits (decisions on `probs` as given).
template <class Options>
Routing route_from_probs(const MatD& logits, const MatD& probs, const Options& o, bool train) {
  Routing r = route_probs(probs, route_options(static_cast<int>(probs.rows()), o, train));
  r.z_loss = router_z_loss(logits);
  return r;
}

// Rules 2, 4-9 from the logits.
template <class Options>
Routing route(const MatD& logits, const Options& o, bool train) {
  return route_from_probs(logits, softmax(logits), o, train);
}

// ---------------------------------------------------------------------------------------------
// Gradients with respect to the logits (issue #3). Analytic forms below; finite differences
// (common.hpp) on the functions above serve as their oracle in the tests.

// Backward of softmax: given dL/dprobs, returns dL/dlogits.
inline MatD softmax_backward(const MatD& probs, const MatD& dprobs) {
  MatD dlogits(probs.rows(), probs.cols());
  for (Eigen::Index t = 0; t < probs.rows(); ++t) {
    double dot = 0.0;
    for (Eigen::Index e = 0; e < probs.cols(); ++e) dot += probs(t, e) * dprobs(t, e);
    for (Eigen::Index e = 0; e < probs.cols(); ++e) {
      dlogits(t, e) = probs(t, e) * (dprobs(t, e) - dot);
    }
  }
  return dlogits;
}

// d aux / d logits with the choices (and so f) held constant: only P carries gradient.
inline MatD load_balancing_loss_grad(const MatD& logits, const MatI& expert, int group_size) {
  const int tokens = static_cast<int>(logits.rows());
  const int experts = static_cast<int>(logits.cols());
  const MatD probs = softmax(logits);
  MatD dprobs = MatD::Zero(tokens, experts);
  const int g = group_size > 0 ? group_size : tokens;
  const int groups = group_count(tokens, group_size);
  if (groups == 0) return dprobs;
  for (int group = 0; group < groups; ++group) {
    const int begin = group * g;
    const int end = std::min(tokens, begin + g);
    const int tg = end - begin;
    std::vector<double> f(experts, 0.0);
    for (int t = begin; t < end; ++t) {
      for (int c = 0; c < expert.cols(); ++c) f[expert(t, c)] += 1.0 / tg;
    }
    for (int t = begin; t < end; ++t) {
      for (int e = 0; e < experts; ++e) dprobs(t, e) = experts * f[e] / tg / groups;
    }
  }
  return softmax_backward(probs, dprobs);
}

// d z / d logits = 2 / N * lse_t * probs[t, j].
inline MatD router_z_loss_grad(const MatD& logits) {
  const MatD probs = softmax(logits);
  const std::vector<double> lse = logsumexp(logits);
  MatD d(logits.rows(), logits.cols());
  for (Eigen::Index t = 0; t < logits.rows(); ++t) {
    for (Eigen::Index e = 0; e < logits.cols(); ++e) {
      d(t, e) = 2.0 / logits.rows() * lse[t] * probs(t, e);
    }
  }
  return d;
}

// Backward of the gates (rule 4 + rule 10): given dL/dgate [tokens, k] and the routing
// decisions (expert, slot) held constant, returns dL/dlogits. Dropped choices have gate 0
// whatever the logits, so their dgate is ignored; with renormalization a kept gate
// p_c / sum_i p_i still depends on the probabilities of every chosen expert.
inline MatD gate_backward(const MatD& logits, const MatI& expert, const MatI& slot,
                          bool renormalize, const MatD& dgate) {
  const MatD probs = softmax(logits);
  MatD dprobs = MatD::Zero(logits.rows(), logits.cols());
  for (Eigen::Index t = 0; t < logits.rows(); ++t) {
    double sum = 0.0;
    for (Eigen::Index c = 0; c < expert.cols(); ++c) sum += probs(t, expert(t, c));
    for (Eigen::Index c = 0; c < expert.cols(); ++c) {
      if (slot(t, c) < 0) continue;
      const int e = expert(t, c);
      if (!renormalize) {
        dprobs(t, e) += dgate(t, c);
        continue;
      }
      // gate_c = p_c / S: d/dp_c = 1/S - p_c/S^2, d/dp_i = -p_c/S^2 for the other choices i.
      for (Eigen::Index i = 0; i < expert.cols(); ++i) {
        dprobs(t, expert(t, i)) -= dgate(t, c) * probs(t, e) / (sum * sum);
      }
      dprobs(t, e) += dgate(t, c) / sum;
    }
  }
  return softmax_backward(probs, dprobs);
}

// Gate values as a function of the logits with the decisions held constant (for finite
// differences of gate_backward).
inline MatD gates_given_decisions(const MatD& logits, const MatI& expert, const MatI& slot,
                                  bool renormalize) {
  const MatD probs = softmax(logits);
  MatD gate = MatD::Zero(expert.rows(), expert.cols());
  for (Eigen::Index t = 0; t < expert.rows(); ++t) {
    double sum = 0.0;
    for (Eigen::Index c = 0; c < expert.cols(); ++c) sum += probs(t, expert(t, c));
    for (Eigen::Index c = 0; c < expert.cols(); ++c) {
      if (slot(t, c) < 0) continue;
      gate(t, c) = renormalize ? probs(t, expert(t, c)) / sum : probs(t, expert(t, c));
    }
  }
  return gate;
}

}  // namespace switchmoe_test::ref
