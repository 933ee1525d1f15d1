#pragma once
// Expert capacity (SEMANTICS 6): C = max(min_capacity, min(T_g, floor(factor * T_g / E))).

#include <algorithm>
#include <cmath>

#include "switchmoe/routing/options.hpp"

namespace switchmoe {

namespace detail {

/// expert_capacity for validated options, mode and group size.
inline int expert_capacity_validated(int group_tokens, const RoutingOptions& options, Mode mode) {
  if (options.dropless) return group_tokens;
  if (options.expert_capacity > 0) return options.expert_capacity;
  const double factor =
      mode == Mode::kTrain ? options.capacity_factor : options.eval_capacity_factor;
  const double per_expert =
      std::floor(factor * static_cast<double>(group_tokens) / options.num_experts);
  const int capped = static_cast<int>(std::min<double>(group_tokens, per_expert));
  return std::max(options.min_capacity, capped);
}

}  // namespace detail

/// Slots per expert in a group of `group_tokens` tokens. An explicit `expert_capacity` is used
/// as given. In dropless mode no token can be dropped, so the capacity is the group itself.
inline int expert_capacity(int group_tokens, const RoutingOptions& options, Mode mode) {
  detail::validate(options);
  detail::check_mode(mode);
  if (group_tokens < 0) detail::fail("group_tokens is ", group_tokens, ", expected >= 0");
  return detail::expert_capacity_validated(group_tokens, options, mode);
}

}  // namespace switchmoe
