// Double-precision, plain-loop reference of the Switch layer: the layer contract (SEMANTICS.md
// rule 1) composed from the routing reference (rules 2, 4-9: routing_reference.hpp) and the
// expert reference (expert_reference.hpp), and the statistics of rule 14. Written from the
// specification, not from the library: it includes no switchmoe header, so the tests compare
// two independent implementations. Slow and obviously correct on purpose.
#pragma once

#include <Eigen/Core>
#include <vector>

#include "reference/common.hpp"
#include "reference/expert_reference.hpp"
#include "reference/routing_reference.hpp"

namespace switchmoe_test::ref {

// Rule 1: y[t] = sum over kept choices c (slot >= 0) of gate[t,c] * Expert_{expert[t,c]}(x[t]);
// a token whose every choice was dropped keeps y[t] = 0 exactly.
inline MatD switch_combine(const MatD& x,                    // [tokens, d_model]
                           const std::vector<Ffn>& experts,  // [experts]
                           const MatI& expert,               // [tokens, k]
                           const MatI& slot,                 // [tokens, k]
                           const MatD& gate,                 // [tokens, k]
                           Act act) {
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

// Rule 14 statistics from a routing result.
struct Stats {
  std::vector<int> tokens_before;
  std::vector<int> tokens_after;
  double dropped_token_fraction = 0.0;   // tokens whose every choice was dropped / tokens
  double dropped_choice_fraction = 0.0;  // dropped choices / all choices
  double router_confidence = 0.0;        // mean gate of kept choices
  double expert_usage = 0.0;             // kept choices / (E * C * groups)
};

inline Stats stats(const Routing& r, int num_experts) {
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

}  // namespace switchmoe_test::ref
