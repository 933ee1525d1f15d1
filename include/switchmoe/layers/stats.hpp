#pragma once
// What a forward call did (SEMANTICS 14).

#include <utility>
#include <vector>

#include "switchmoe/routing/options.hpp"

namespace switchmoe {

struct RoutingStats {
  std::vector<int> tokens_per_expert;       // [experts] choices routed to e, before capacity
  std::vector<int> kept_tokens_per_expert;  // [experts] choices e processed, after capacity
  double dropped_fraction = 0.0;            // dropped choices / (tokens * k); tokens when k = 1
  double dropped_token_fraction = 0.0;      // tokens whose every choice was dropped / tokens
  double router_confidence = 0.0;           // mean gate of kept choices
  double expert_usage = 0.0;                // kept choices / (experts * capacity * groups)
  float aux_loss = 0.0f;                    // unscaled, SEMANTICS 8
  float z_loss = 0.0f;                      // unscaled, SEMANTICS 9
};

/// The statistics of `routing` into `stats`, reusing its vectors (no allocation for the same
/// number of experts).
inline void routing_stats(const Routing& routing, int num_experts, RoutingStats& stats) {
  // Every other field back to its default; the vectors keep their storage.
  stats = RoutingStats{std::move(stats.tokens_per_expert), std::move(stats.kept_tokens_per_expert)};
  stats.tokens_per_expert.assign(num_experts, 0);
  stats.kept_tokens_per_expert.assign(num_experts, 0);
  stats.aux_loss = routing.aux_loss;
  stats.z_loss = routing.z_loss;
  const Eigen::Index tokens = routing.expert.rows(), k = routing.expert.cols();
  if (tokens == 0) return;
  long kept = 0, dropped_tokens = 0;
  double gate_sum = 0.0;
  for (Eigen::Index t = 0; t < tokens; ++t) {
    bool any_kept = false;
    for (Eigen::Index c = 0; c < k; ++c) {
      const int e = routing.expert(t, c);
      ++stats.tokens_per_expert[e];
      if (routing.slot(t, c) < 0) continue;
      ++stats.kept_tokens_per_expert[e];
      ++kept;
      gate_sum += routing.gate(t, c);
      any_kept = true;
    }
    if (!any_kept) ++dropped_tokens;
  }
  const double choices = static_cast<double>(tokens * k);
  stats.dropped_fraction = (choices - kept) / choices;
  stats.dropped_token_fraction = static_cast<double>(dropped_tokens) / tokens;
  stats.router_confidence = kept > 0 ? gate_sum / kept : 0.0;
  const double slots = static_cast<double>(num_experts) * routing.capacity * routing.num_groups();
  stats.expert_usage = slots > 0 ? kept / slots : 0.0;
}

inline RoutingStats routing_stats(const Routing& routing, int num_experts) {
  RoutingStats stats;
  routing_stats(routing, num_experts, stats);
  return stats;
}

}  // namespace switchmoe
