#pragma once
// Routing (SEMANTICS 2, 4-9): softmax over experts, top-k choice, capacity and priority per
// group, the auxiliary losses; and the gradient of all of it with respect to the logits
// (SEMANTICS 10).

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "switchmoe/losses/load_balancing.hpp"
#include "switchmoe/losses/z_loss.hpp"
#include "switchmoe/routing/capacity.hpp"
#include "switchmoe/routing/options.hpp"

namespace switchmoe {
namespace detail {

/// Row-wise softmax in float32 into `probs` [tokens, experts], reusing its storage.
inline void softmax(const Eigen::Ref<const Matrix<float>>& logits, Matrix<float>& probs) {
  probs.resize(logits.rows(), logits.cols());
  for (Eigen::Index t = 0; t < logits.rows(); ++t) {
    const float max = logits.row(t).maxCoeff();
    float sum = 0.0f;
    for (Eigen::Index e = 0; e < logits.cols(); ++e) {
      probs(t, e) = std::exp(logits(t, e) - max);
      sum += probs(t, e);
    }
    probs.row(t) /= sum;
  }
}

/// Top-k experts of every token into `expert` [tokens, k], best first; ties go to the lower
/// index. Chosen on the logits, which order experts exactly as the probabilities do but cannot
/// underflow into false ties. "Better" is a strict total order (higher logit, then lower index),
/// so choice c is the best expert among those after choice c - 1: no "taken" flags are needed.
inline void top_k_experts(const Eigen::Ref<const Matrix<float>>& logits, int k,
                          Matrix<int>& expert) {
  expert.resize(logits.rows(), k);
  for (Eigen::Index t = 0; t < logits.rows(); ++t) {
    for (int c = 0; c < k; ++c) {
      const Eigen::Index prev = c > 0 ? expert(t, c - 1) : -1;
      auto after_prev = [&](Eigen::Index e) {
        return prev < 0 || logits(t, e) < logits(t, prev) ||
               (logits(t, e) == logits(t, prev) && e > prev);
      };
      Eigen::Index best = -1;
      for (Eigen::Index e = 0; e < logits.cols(); ++e) {
        if (after_prev(e) && (best < 0 || logits(t, e) > logits(t, best))) best = e;
      }
      expert(t, c) = static_cast<int>(best);
    }
  }
}

/// The order in which a group's tokens claim slots (SEMANTICS 7), as offsets within the group,
/// into `order`. Descending top-1 probability with ties in token order is a strict total order,
/// so std::sort (in place) gives what a stable sort would, without its temporary buffer.
inline void priority_order(const Routing& routing, Eigen::Index first, int group_size,
                           Priority priority, std::vector<int>& order) {
  order.resize(static_cast<std::size_t>(group_size));
  std::iota(order.begin(), order.end(), 0);
  if (priority == Priority::kRouterProbability) {
    auto top1 = [&](int i) {
      const Eigen::Index t = first + i;
      return routing.probs(t, routing.expert(t, 0));
    };
    std::sort(order.begin(), order.end(), [&](int a, int b) {
      const float pa = top1(a), pb = top1(b);
      return pa > pb || (pa == pb && a < b);
    });
  }
}

/// Fills slot and zeroes the gates of dropped choices. Within a group every first choice is
/// placed before any second choice, each pass in priority order; a choice that finds its
/// expert full is dropped.
inline void assign_slots(Routing& routing, const RoutingOptions& options, Mode mode) {
  const Eigen::Index tokens = routing.expert.rows();
  const int k = static_cast<int>(routing.expert.cols());
  const int g = routing.group_size;
  const int capacity = expert_capacity_validated(g, options, mode);
  routing.slot.resize(tokens, k);
  routing.capacity = options.dropless ? 0 : capacity;
  std::vector<int>& load = routing.scratch.load;
  std::vector<int>& order = routing.scratch.order;
  for (Eigen::Index first = 0; first < tokens; first += g) {
    load.assign(static_cast<std::size_t>(options.num_experts), 0);
    priority_order(routing, first, g, options.priority, order);
    for (int c = 0; c < k; ++c) {
      for (int i : order) {
        const Eigen::Index t = first + i;
        int& used = load[routing.expert(t, c)];
        if (options.dropless || used < capacity) {
          routing.slot(t, c) = used++;
        } else {
          routing.slot(t, c) = -1;
          routing.gate(t, c) = 0.0f;
        }
      }
    }
    if (options.dropless) {
      routing.capacity = std::max(routing.capacity, *std::max_element(load.begin(), load.end()));
    }
  }
}

}  // namespace detail

namespace detail {

/// route() for options and mode that were validated (e.g. once, at a layer's construction); the
/// logits are still checked (their width, and that they are finite: a NaN weight shows here).
inline void route_validated(const Eigen::Ref<const Matrix<float>>& logits,
                            const RoutingOptions& options, Mode mode, Routing& routing) {
  if (logits.cols() != options.num_experts) {
    detail::fail("logits has ", logits.cols(),
                 " columns, expected num_experts = ", options.num_experts);
  }
  detail::check_finite("logits", logits);
  const int group_size = detail::resolve_group_size(logits.rows(), options.group_size);
  routing.group_size = group_size;
  const bool in_place = logits.data() == routing.logits.data() && logits.size() > 0 &&
                        logits.rows() == routing.logits.rows() &&
                        logits.cols() == routing.logits.cols();
  if (!in_place) routing.logits = logits;
  detail::softmax(logits, routing.probs);
  detail::top_k_experts(logits, options.top_k, routing.expert);
  routing.gate.resize(logits.rows(), options.top_k);
  for (Eigen::Index t = 0; t < logits.rows(); ++t) {
    float chosen = 0.0f;
    for (int c = 0; c < options.top_k; ++c) {
      routing.gate(t, c) = routing.probs(t, routing.expert(t, c));
      chosen += routing.gate(t, c);
    }
    if (options.renormalize) routing.gate.row(t) /= chosen;
  }
  if (logits.rows() == 0) {
    routing.slot.resize(0, options.top_k);
    routing.capacity = expert_capacity_validated(0, options, mode);
    routing.aux_loss = 0.0f;
    routing.z_loss = 0.0f;
    return;
  }
  detail::assign_slots(routing, options, mode);
  routing.aux_loss = detail::load_balancing_loss(routing.probs, routing.expert, group_size,
                                                 routing.scratch.weight);
  routing.z_loss = detail::router_z_loss_validated(logits);
}

}  // namespace detail

/// Routes tokens given router logits [tokens, experts] into `routing`, reusing its storage:
/// with the sizes of its previous routing, nothing is allocated. `logits` may be
/// `routing.logits` itself (e.g. written there by Router::forward), but not a part of it or of
/// another member of `routing`. Zero tokens give empty results. On a throw (bad options or
/// logits), `routing` is unchanged.
inline void route(const Eigen::Ref<const Matrix<float>>& logits, const RoutingOptions& options,
                  Mode mode, Routing& routing) {
  detail::validate(options);
  detail::check_mode(mode);
  detail::route_validated(logits, options, mode, routing);
}

/// Routes tokens given router logits [tokens, experts]. Zero tokens give empty results.
inline Routing route(const Eigen::Ref<const Matrix<float>>& logits, const RoutingOptions& options,
                     Mode mode) {
  Routing routing;
  route(logits, options, mode, routing);
  return routing;
}

namespace detail {

/// route_backward for a routing made by route() with these options; trusts its inputs.
/// `aux_groups` and `z_tokens` are the denominators of the losses' means when they are global
/// (expert parallelism, SEMANTICS 21: all processes' groups and tokens); 0 means this call's.
inline void route_backward_validated(const Routing& routing,
                                     const Eigen::Ref<const Matrix<float>>& dgate,
                                     const RoutingOptions& options, float aux_coef, float z_coef,
                                     Matrix<float>& dlogits, std::int64_t aux_groups = 0,
                                     std::int64_t z_tokens = 0) {
  const Eigen::Index tokens = routing.probs.rows();
  const Eigen::Index experts = routing.probs.cols();
  Matrix<float>& dprobs = dlogits;  // d/dprobs first; the softmax backward below is in place
  dprobs.setZero(tokens, experts);
  for (Eigen::Index t = 0; t < tokens; ++t) {
    float chosen = 0.0f;  // S = sum of the k chosen probabilities (renormalized gate = p / S)
    for (Eigen::Index c = 0; c < routing.expert.cols(); ++c)
      chosen += routing.probs(t, routing.expert(t, c));
    for (Eigen::Index c = 0; c < routing.expert.cols(); ++c) {
      if (routing.slot(t, c) < 0) continue;
      const int e = routing.expert(t, c);
      if (!options.renormalize) {
        dprobs(t, e) += dgate(t, c);
        continue;
      }
      // d(p_c / S)/d p_j = [c == j] / S - p_c / S^2 for every chosen j.
      const float gate = routing.probs(t, e) / chosen;
      dprobs(t, e) += dgate(t, c) / chosen;
      for (Eigen::Index j = 0; j < routing.expert.cols(); ++j) {
        dprobs(t, routing.expert(t, j)) -= dgate(t, c) * gate / chosen;
      }
    }
  }
  if (aux_coef != 0.0f) {
    detail::add_load_balancing_loss_grad(routing.probs, routing.expert, routing.group_size,
                                         aux_coef, dprobs, aux_groups);
  }
  // Softmax backward, row by row in place: dlogit_e = p_e * (dp_e - sum_j p_j dp_j).
  for (Eigen::Index t = 0; t < tokens; ++t) {
    const float dot = routing.probs.row(t).dot(dprobs.row(t));
    dlogits.row(t) = routing.probs.row(t).array() * (dprobs.row(t).array() - dot);
  }
  if (z_coef != 0.0f) {
    detail::add_router_z_loss_grad(routing.logits, z_coef, dlogits, z_tokens);
  }
}

}  // namespace detail

/// Gradient with respect to the logits of
///   sum_{t,c} dgate(t,c) * gate(t,c) + aux_coef * aux_loss + z_coef * z_loss
/// into `dlogits` [tokens, experts], reusing its storage (no allocation when its size is
/// unchanged; all temporaries are in `dlogits` or on the stack).
/// Dropped choices have a constant gate of 0 and pass nothing back (SEMANTICS 10).
/// `dgate` is [tokens, k] and must not alias `dlogits`.
/// Throws std::invalid_argument if the routing is inconsistent, dgate's shape does not match
/// it, or dgate or a coefficient is not finite.
inline void route_backward(const Routing& routing, const Eigen::Ref<const Matrix<float>>& dgate,
                           const RoutingOptions& options, float aux_coef, float z_coef,
                           Matrix<float>& dlogits) {
  detail::validate(options);
  detail::check_routing(routing, routing.expert.rows(), options.num_experts);
  detail::check_shape("routing.probs", routing.probs, routing.expert.rows(), options.num_experts);
  detail::check_shape("routing.logits", routing.logits, routing.expert.rows(), options.num_experts);
  detail::check_shape("dgate", dgate, routing.expert.rows(), routing.expert.cols());
  detail::check_finite("dgate", dgate);
  detail::check_coefficient("aux_coef", aux_coef);
  detail::check_coefficient("z_coef", z_coef);
  detail::route_backward_validated(routing, dgate, options, aux_coef, z_coef, dlogits);
}

/// As above, returning dlogits [tokens, experts].
inline Matrix<float> route_backward(const Routing& routing,
                                    const Eigen::Ref<const Matrix<float>>& dgate,
                                    const RoutingOptions& options, float aux_coef, float z_coef) {
  Matrix<float> dlogits;
  route_backward(routing, dgate, options, aux_coef, z_coef, dlogits);
  return dlogits;
}

}  // namespace switchmoe
