#pragma once
// What a forward call did (SEMANTICS 14), and how the statistics of several calls (or of several
// ranks' shares of one call) add up.

#include <cstdint>
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

  // The counts the fractions above are made of, so that statistics can be merged exactly.
  std::int64_t tokens = 0;          // tokens routed
  std::int64_t choices = 0;         // tokens * k
  std::int64_t kept_choices = 0;    // choices that found a slot
  std::int64_t dropped_tokens = 0;  // tokens whose every choice was dropped
  std::int64_t groups = 0;          // routing groups (SEMANTICS 5)
  double slots = 0.0;               // experts * capacity * groups
  double gate_sum = 0.0;            // sum of the gates of kept choices

  /// Adds the statistics of another call (or another rank's tokens of the same call): counts
  /// add, fractions are recomputed from the sums, the losses become the means over all groups
  /// (aux) and all tokens (z), as one call over all those tokens would report them.
  void merge(const RoutingStats& other) {
    if (tokens_per_expert.empty()) {
      tokens_per_expert.assign(other.tokens_per_expert.size(), 0);
      kept_tokens_per_expert.assign(other.kept_tokens_per_expert.size(), 0);
    }
    if (other.tokens_per_expert.size() != tokens_per_expert.size()) {
      detail::fail("RoutingStats::merge: statistics of ", other.tokens_per_expert.size(),
                   " experts merged into statistics of ", tokens_per_expert.size());
    }
    for (std::size_t e = 0; e < tokens_per_expert.size(); ++e) {
      tokens_per_expert[e] += other.tokens_per_expert[e];
      kept_tokens_per_expert[e] += other.kept_tokens_per_expert[e];
    }
    const double aux_sum =
        static_cast<double>(aux_loss) * groups + static_cast<double>(other.aux_loss) * other.groups;
    const double z_sum =
        static_cast<double>(z_loss) * tokens + static_cast<double>(other.z_loss) * other.tokens;
    tokens += other.tokens;
    choices += other.choices;
    kept_choices += other.kept_choices;
    dropped_tokens += other.dropped_tokens;
    groups += other.groups;
    slots += other.slots;
    gate_sum += other.gate_sum;
    aux_loss = groups > 0 ? static_cast<float>(aux_sum / groups) : 0.0f;
    z_loss = tokens > 0 ? static_cast<float>(z_sum / tokens) : 0.0f;
    update_fractions();
  }

  /// Recomputes the fractions from the counts.
  void update_fractions() {
    dropped_fraction = choices > 0 ? static_cast<double>(choices - kept_choices) / choices : 0.0;
    dropped_token_fraction = tokens > 0 ? static_cast<double>(dropped_tokens) / tokens : 0.0;
    router_confidence = kept_choices > 0 ? gate_sum / kept_choices : 0.0;
    expert_usage = slots > 0 ? kept_choices / slots : 0.0;
  }
};

namespace detail {

/// routing_stats without the consistency check of `routing` (the caller built it).
inline void routing_stats_unchecked(const Routing& routing, int num_experts, RoutingStats& stats) {
  // Every other field back to its default; the vectors keep their storage.
  stats = RoutingStats{std::move(stats.tokens_per_expert), std::move(stats.kept_tokens_per_expert)};
  stats.tokens_per_expert.assign(num_experts, 0);
  stats.kept_tokens_per_expert.assign(num_experts, 0);
  stats.aux_loss = routing.aux_loss;
  stats.z_loss = routing.z_loss;
  const Eigen::Index tokens = routing.expert.rows(), k = routing.expert.cols();
  if (tokens == 0) return;
  std::int64_t kept = 0, dropped_tokens = 0;
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
  stats.tokens = tokens;
  stats.choices = tokens * k;
  stats.kept_choices = kept;
  stats.dropped_tokens = dropped_tokens;
  stats.groups = routing.num_groups();
  stats.slots = static_cast<double>(num_experts) * routing.capacity * routing.num_groups();
  stats.gate_sum = gate_sum;
  stats.update_fractions();
}

}  // namespace detail

/// The statistics of `routing` into `stats`, reusing its vectors (no allocation for the same
/// number of experts). Throws std::invalid_argument if `routing` is not a consistent routing
/// over `num_experts` experts (expert ids out of range, shapes that disagree).
inline void routing_stats(const Routing& routing, int num_experts, RoutingStats& stats) {
  detail::check_routing(routing, routing.expert.rows(), num_experts);
  detail::routing_stats_unchecked(routing, num_experts, stats);
}

inline RoutingStats routing_stats(const Routing& routing, int num_experts) {
  RoutingStats stats;
  routing_stats(routing, num_experts, stats);
  return stats;
}

}  // namespace switchmoe
