// Slow, obviously-correct double-precision reference of the routing rules 4-9 of
// SEMANTICS.md (choice, groups, capacity, priority, load-balancing loss, z-loss) and of the
// gradients that reach the router logits (rule 10). Written from SEMANTICS.md alone, with plain
// loops, so that the tests compare the library against an independent reading of the spec.
//
// The reference does not include the library: functions that need routing options are
// templates over any struct with the field names of switchmoe::RoutingOptions.
#pragma once

#include <gtest/gtest.h>

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <functional>
#include <initializer_list>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

namespace switchmoe_test::ref {

using MatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MatI = Eigen::Matrix<int, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

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

// log(sum_e exp(logits[t, e])) for every token.
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

// Rule 4: the top-k experts of every token by probability; ties go to the lower expert index
// (a strict '>' while scanning experts in increasing order keeps the first maximum).
inline MatI top_k(const MatD& probs, int k) {  // [tokens, k]
  MatI expert(probs.rows(), k);
  for (Eigen::Index t = 0; t < probs.rows(); ++t) {
    std::vector<bool> taken(probs.cols(), false);
    for (int c = 0; c < k; ++c) {
      int best = -1;
      for (int e = 0; e < probs.cols(); ++e) {
        if (taken[e]) continue;
        if (best < 0 || probs(t, e) > probs(t, best)) best = e;
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
template <class Options>
int capacity(int group_tokens, const Options& o, bool train) {
  if (o.expert_capacity > 0) return o.expert_capacity;
  const double factor = train ? o.capacity_factor : o.eval_capacity_factor;
  const int by_factor = static_cast<int>(std::floor(factor * group_tokens / o.num_experts));
  return std::max(o.min_capacity, std::min(group_tokens, by_factor));
}

struct Routing {
  MatD probs;   // [tokens, experts]
  MatI expert;  // [tokens, k] before capacity
  MatI slot;    // [tokens, k], -1 if dropped
  MatD gate;    // [tokens, k], 0 if dropped
  double aux_loss = 0.0;
  double z_loss = 0.0;
  int capacity = 0;
  int group_size = 0;
};

// Rule 8, per group then averaged over groups: aux = E * sum_e f_e * P_e with f_e the fraction
// of the group's tokens that chose e among their k choices (before capacity) and P_e the mean
// probability of e over the group.
inline double load_balancing_loss(const MatD& probs, const MatI& expert, int group_size) {
  const int tokens = static_cast<int>(probs.rows());
  const int experts = static_cast<int>(probs.cols());
  const int g = group_size > 0 ? group_size : tokens;
  if (tokens == 0) return 0.0;
  const int groups = tokens / g;
  double total = 0.0;
  for (int group = 0; group < groups; ++group) {
    std::vector<double> f(experts, 0.0), p(experts, 0.0);
    for (int t = group * g; t < (group + 1) * g; ++t) {
      for (int c = 0; c < expert.cols(); ++c) f[expert(t, c)] += 1.0 / g;
      for (int e = 0; e < experts; ++e) p[e] += probs(t, e) / g;
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

// Rule 7: the order in which the tokens of one group (given by global indices
// [begin, begin + size)) claim their slots.
template <class Options>
std::vector<int> priority_order(const MatD& probs, const MatI& expert, int begin, int size,
                                const Options& o) {
  std::vector<int> order(size);
  std::iota(order.begin(), order.end(), begin);
  using Priority = decltype(o.priority);
  if (o.priority == Priority::kRouterProbability) {
    std::stable_sort(order.begin(), order.end(),
                     [&](int a, int b) { return probs(a, expert(a, 0)) > probs(b, expert(b, 0)); });
  }
  return order;
}

// Rules 4-9 on already computed probabilities and logits. The discrete decisions (top-k,
// priority, slots) are taken on `probs` exactly as given.
template <class Options>
Routing route_from_probs(const MatD& logits, const MatD& probs, const Options& o, bool train) {
  Routing r;
  const int tokens = static_cast<int>(probs.rows());
  const int k = o.top_k;
  const int experts = o.num_experts;
  r.probs = probs;
  r.group_size = o.group_size > 0 ? o.group_size : tokens;
  r.expert = top_k(probs, k);
  r.slot = MatI::Constant(tokens, k, -1);
  r.gate = MatD::Zero(tokens, k);
  const int groups = r.group_size > 0 ? tokens / r.group_size : 0;
  if (o.dropless) {
    // Dropless: C is the largest per-group load, counted over all k choices.
    r.capacity = 0;
    for (int group = 0; group < groups; ++group) {
      std::vector<int> load(experts, 0);
      for (int t = group * r.group_size; t < (group + 1) * r.group_size; ++t) {
        for (int c = 0; c < k; ++c) ++load[r.expert(t, c)];
      }
      for (int e = 0; e < experts; ++e) r.capacity = std::max(r.capacity, load[e]);
    }
  } else {
    r.capacity = capacity(r.group_size, o, train);
  }
  for (int group = 0; group < groups; ++group) {
    const std::vector<int> order =
        priority_order(probs, r.expert, group * r.group_size, r.group_size, o);
    std::vector<int> filled(experts, 0);
    for (int c = 0; c < k; ++c) {  // every first choice before any second choice
      for (int t : order) {
        const int e = r.expert(t, c);
        if (filled[e] < r.capacity) r.slot(t, c) = filled[e]++;
      }
    }
  }
  for (int t = 0; t < tokens; ++t) {
    double chosen_sum = 0.0;
    for (int c = 0; c < k; ++c) chosen_sum += probs(t, r.expert(t, c));
    for (int c = 0; c < k; ++c) {
      if (r.slot(t, c) < 0) continue;
      const double p = probs(t, r.expert(t, c));
      r.gate(t, c) = o.renormalize ? p / chosen_sum : p;  // renormalized before capacity
    }
  }
  r.aux_loss = load_balancing_loss(probs, r.expert, r.group_size);
  r.z_loss = router_z_loss(logits);
  return r;
}

template <class Options>
Routing route(const MatD& logits, const Options& o, bool train) {
  return route_from_probs(logits, softmax(logits), o, train);
}

// ---------------------------------------------------------------------------------------------
// Gradients with respect to the logits (issue #3). Analytic forms below; finite differences
// on the functions above serve as their oracle in the tests.

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
  if (tokens == 0) return dprobs;
  const int g = group_size > 0 ? group_size : tokens;
  const int groups = tokens / g;
  for (int group = 0; group < groups; ++group) {
    std::vector<double> f(experts, 0.0);
    for (int t = group * g; t < (group + 1) * g; ++t) {
      for (int c = 0; c < expert.cols(); ++c) f[expert(t, c)] += 1.0 / g;
    }
    for (int t = group * g; t < (group + 1) * g; ++t) {
      for (int e = 0; e < experts; ++e) dprobs(t, e) = experts * f[e] / g / groups;
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

// Central finite differences of a scalar function of the logits.
inline MatD finite_difference(const std::function<double(const MatD&)>& f, const MatD& logits,
                              double h = 1e-6) {
  MatD grad(logits.rows(), logits.cols());
  MatD x = logits;
  for (Eigen::Index t = 0; t < logits.rows(); ++t) {
    for (Eigen::Index e = 0; e < logits.cols(); ++e) {
      const double saved = x(t, e);
      x(t, e) = saved + h;
      const double up = f(x);
      x(t, e) = saved - h;
      const double down = f(x);
      x(t, e) = saved;
      grad(t, e) = (up - down) / (2.0 * h);
    }
  }
  return grad;
}

// ---------------------------------------------------------------------------------------------
// Router (rule 2): logits = x * W (+ b) in double.
inline MatD router_logits(const MatD& x, const MatD& w, const MatD* bias = nullptr) {
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

}  // namespace switchmoe_test::ref

// ---------------------------------------------------------------------------------------------
// Helpers shared by the routing tests.
namespace switchmoe_test {

template <class Derived>
ref::MatD to_double(const Eigen::MatrixBase<Derived>& m) {
  return m.template cast<double>();
}

// Passes when `call` throws std::invalid_argument whose what() contains every one of `words`
// (the argument's name, and where given its value): the error contract of STYLE.md.
template <class Call>
::testing::AssertionResult ThrowsInvalidArgumentNaming(Call&& call,
                                                       std::initializer_list<std::string> words) {
  try {
    call();
  } catch (const std::invalid_argument& e) {
    const std::string message = e.what();
    for (const std::string& word : words) {
      if (message.find(word) == std::string::npos) {
        return ::testing::AssertionFailure() << "std::invalid_argument(\"" << message
                                             << "\") does not contain \"" << word << "\"";
      }
    }
    return ::testing::AssertionSuccess();
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "threw another exception: " << e.what();
  } catch (...) {
    return ::testing::AssertionFailure() << "threw a non-std exception";
  }
  return ::testing::AssertionFailure() << "did not throw";
}

}  // namespace switchmoe_test
