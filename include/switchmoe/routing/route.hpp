#pragma once
// Routing (SEMANTICS 2, 4-9): softmax over experts, top-k choice, capacity and priority per
// group, the auxiliary losses; and the gradient of all of it with respect to the logits
// (SEMANTICS 10). The variants of rules 17-20: expert choice, random second choice, a
// selection bias, sigmoid scores and routed scaling.

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "switchmoe/core/random.hpp"
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

/// Elementwise sigmoid in float32 into `scores` (SEMANTICS 20).
inline void sigmoid(const Eigen::Ref<const Matrix<float>>& logits, Matrix<float>& scores) {
  scores.resize(logits.rows(), logits.cols());
  for (Eigen::Index t = 0; t < logits.rows(); ++t) {
    for (Eigen::Index e = 0; e < logits.cols(); ++e) {
      scores(t, e) = 1.0f / (1.0f + std::exp(-logits(t, e)));
    }
  }
}

/// Each row of `scores` divided by its sum, into `normalized` (rule 20's P_e inputs).
inline void normalize_rows(const Matrix<float>& scores, Matrix<float>& normalized) {
  normalized.resize(scores.rows(), scores.cols());
  for (Eigen::Index t = 0; t < scores.rows(); ++t) {
    normalized.row(t) = scores.row(t) / scores.row(t).sum();
  }
}

/// Top-k experts of every token into `expert` [tokens, k], best first; ties go to the lower
/// index. Chosen on the logits, which order experts exactly as the probabilities do but cannot
/// underflow into false ties. "Better" is a strict total order (higher logit, then lower index),
/// so choice c is the best expert among those after choice c - 1: no "taken" flags are needed.
inline void top_k_experts(const Eigen::Ref<const Matrix<float>>& logits, int k,
                          Matrix<int>& expert) {
  expert.resize(logits.rows(), k);
  if (k == 1) {  // the argmax (first of equals) of each row: the loop below for c = 0, on pointers
    for (Eigen::Index t = 0; t < logits.rows(); ++t) {
      const float* row = logits.data() + t * logits.outerStride();
      int best = 0;
      for (int e = 1; e < static_cast<int>(logits.cols()); ++e) {
        if (row[e] > row[best]) best = e;
      }
      expert(t, 0) = best;
    }
    return;
  }
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
  const std::vector<char>& skipped = routing.scratch.skipped;  // SEMANTICS 18, or empty
  for (Eigen::Index first = 0; first < tokens; first += g) {
    load.assign(static_cast<std::size_t>(options.num_experts), 0);
    priority_order(routing, first, g, options.priority, order);
    for (int c = 0; c < k; ++c) {
      for (int i : order) {
        const Eigen::Index t = first + i;
        if (!skipped.empty() && skipped[t * k + c]) {  // takes no slot, counts as dropped
          routing.slot(t, c) = -1;
          routing.gate(t, c) = 0.0f;
          continue;
        }
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

/// What a stateful routing scheme adds to one call of route (SEMANTICS 18, 19).
struct RouteContext {
  const Matrix<float>* bias = nullptr;  // [1, experts] added to the scores to choose, or null
  // Draws of rule 18 in training (u of global token first_token + t), or null: no draw.
  const CounterRng* second_choice = nullptr;
  std::int64_t first_token = 0;
};

/// Expert-choice routing (SEMANTICS 17) of a group-resolved call: every expert takes the C
/// tokens of each group with its highest probability (ties: lower token). The routing has E
/// positions per token, position c being expert c: expert(t, c) = c, slot(t, c) the token's rank
/// among the tokens expert c took in its group (-1: not taken), gate(t, c) its probability times
/// routed_scaling (0: not taken). C is rule 6's capacity, at most the group's size.
inline void route_expert_choice(const RoutingOptions& options, Mode mode, Routing& routing) {
  const Eigen::Index tokens = routing.probs.rows();
  const int experts = options.num_experts;
  const int g = routing.group_size;
  routing.expert.resize(tokens, experts);
  routing.slot.resize(tokens, experts);
  routing.gate.resize(tokens, experts);
  for (Eigen::Index t = 0; t < tokens; ++t) {
    for (int e = 0; e < experts; ++e) routing.expert(t, e) = e;
  }
  routing.slot.setConstant(-1);
  routing.gate.setZero();
  const int capacity = std::min(g, expert_capacity_validated(g, options, mode));
  routing.capacity = capacity;
  std::vector<int>& order = routing.scratch.order;
  for (Eigen::Index first = 0; first < tokens; first += g) {
    for (int e = 0; e < experts; ++e) {
      order.resize(static_cast<std::size_t>(g));
      std::iota(order.begin(), order.end(), 0);
      // Descending probability, ties to the lower token: a strict total order, so a partial
      // sort gives the stable result without a buffer.
      auto better = [&](int a, int b) {
        const float pa = routing.probs(first + a, e), pb = routing.probs(first + b, e);
        return pa > pb || (pa == pb && a < b);
      };
      std::partial_sort(order.begin(), order.begin() + capacity, order.end(), better);
      for (int rank = 0; rank < capacity; ++rank) {
        const Eigen::Index t = first + order[rank];
        routing.slot(t, e) = rank;
        routing.gate(t, e) = routing.probs(t, e) * options.routed_scaling;
      }
    }
  }
}

/// Whether any entry of the bias is nonzero: a zero bias chooses as no bias, on the logits.
inline bool has_selection_bias(const Matrix<float>* bias) {
  return bias != nullptr && bias->size() > 0 && (bias->array() != 0.0f).any();
}

/// route() for options and mode that were validated (e.g. once, at a layer's construction); the
/// logits are still checked (their width, and that they are finite: a NaN weight shows here).
inline void route_validated(const Eigen::Ref<const Matrix<float>>& logits,
                            const RoutingOptions& options, Mode mode, Routing& routing,
                            const RouteContext& context = RouteContext()) {
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
  const bool sigmoid_scores = options.score == ScoreFunction::kSigmoid;
  if (sigmoid_scores) {
    detail::sigmoid(logits, routing.probs);
  } else {
    detail::softmax(logits, routing.probs);
  }
  routing.scratch.skipped.clear();
  if (options.method == RoutingMethod::kExpertChoice) {
    if (logits.rows() == 0) {
      routing.expert.resize(0, options.num_experts);
      routing.slot.resize(0, options.num_experts);
      routing.gate.resize(0, options.num_experts);
      routing.capacity = 0;
    } else {
      detail::route_expert_choice(options, mode, routing);
    }
    routing.aux_loss = 0.0f;  // SEMANTICS 17: no load-balancing loss
    routing.z_loss = logits.rows() > 0 ? router_z_loss(logits) : 0.0f;
    return;
  }
  // SEMANTICS 19: the bias takes part in the choice only. Without it (or while it is zero) the
  // choice is made on the logits, which order experts as the scores do without false ties.
  if (has_selection_bias(context.bias)) {
    Matrix<float>& selection = routing.scratch.selection;
    selection.resize(logits.rows(), logits.cols());
    for (Eigen::Index t = 0; t < logits.rows(); ++t) {
      selection.row(t) = routing.probs.row(t) + *context.bias;
    }
    detail::top_k_experts(selection, options.top_k, routing.expert);
  } else {
    detail::top_k_experts(logits, options.top_k, routing.expert);
  }
  routing.gate.resize(logits.rows(), options.top_k);
  for (Eigen::Index t = 0; t < logits.rows(); ++t) {
    float chosen = 0.0f;
    for (int c = 0; c < options.top_k; ++c) {
      routing.gate(t, c) = routing.probs(t, routing.expert(t, c));
      chosen += routing.gate(t, c);
    }
    // Rule 4, and rule 20: with sigmoid scores too, divided by the sum of the k chosen ones.
    if (options.renormalize) routing.gate.row(t) /= chosen;
    if (options.routed_scaling != 1.0f) routing.gate.row(t) *= options.routed_scaling;
  }
  if (options.random_second_choice && mode == Mode::kTrain && context.second_choice != nullptr) {
    // SEMANTICS 18: the second choice goes only if u < 2 * g2, g2 its raw score.
    std::vector<char>& skipped = routing.scratch.skipped;
    skipped.assign(static_cast<std::size_t>(logits.rows() * 2), 0);
    for (Eigen::Index t = 0; t < logits.rows(); ++t) {
      const float u =
          context.second_choice->uniform(static_cast<std::uint64_t>(context.first_token + t));
      skipped[t * 2 + 1] = !(u < 2.0f * routing.probs(t, routing.expert(t, 1)));
    }
  }
  if (logits.rows() == 0) {
    routing.slot.resize(0, options.top_k);
    routing.capacity = expert_capacity_validated(0, options, mode);
    routing.aux_loss = 0.0f;
    routing.z_loss = 0.0f;
    return;
  }
  detail::assign_slots(routing, options, mode);
  if (sigmoid_scores) {  // SEMANTICS 20: P_e from each token's scores divided by their sum
    detail::normalize_rows(routing.probs, routing.scratch.normalized);
    routing.aux_loss = detail::load_balancing_loss(routing.scratch.normalized, routing.expert,
                                                   group_size, routing.scratch.weight);
  } else {
    routing.aux_loss = detail::load_balancing_loss(routing.probs, routing.expert, group_size,
                                                   routing.scratch.weight);
  }
  routing.z_loss = detail::router_z_loss_validated(logits);
}

}  // namespace detail

/// Routes tokens given router logits [tokens, experts] into `routing`, reusing its storage:
/// (expert choice, SEMANTICS 17: [tokens, experts] positions, one per expert)
/// with the sizes of its previous routing, nothing is allocated. `logits` may be
/// `routing.logits` itself (e.g. written there by Router::forward), but not a part of it or of
/// another member of `routing`. Zero tokens give empty results. On a throw (bad options or
/// logits), `routing` is unchanged.
inline void route(const Eigen::Ref<const Matrix<float>>& logits, const RoutingOptions& options,
                  Mode mode, Routing& routing) {
  detail::validate(options);
  detail::check_mode(mode);
  // Rule 18's draws from seed 0 and call 0, tokens numbered from 0 (a RoutingScheme keys them
  // by its seed, its call count and the global token index).
  const detail::CounterRng second_choice(0, detail::Stream::kSecondChoice, 0);
  detail::RouteContext context;
  context.second_choice = &second_choice;
  detail::route_validated(logits, options, mode, routing, context);
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
                                     std::int64_t z_tokens = 0, Matrix<float>* scratch = nullptr) {
  const Eigen::Index tokens = routing.probs.rows();
  const Eigen::Index experts = routing.probs.cols();
  Matrix<float>& dprobs = dlogits;  // d/dprobs first; the softmax backward below is in place
  dprobs.setZero(tokens, experts);
  const float scaling = options.routed_scaling;  // SEMANTICS 20: gate = scaling * (...)
  const bool expert_choice = options.method == RoutingMethod::kExpertChoice;
  if (expert_choice) aux_coef = 0.0f;  // SEMANTICS 17: no load-balancing loss
  for (Eigen::Index t = 0; t < tokens; ++t) {
    if (expert_choice) {  // gate(t, c) = scaling * probs(t, c) where expert c took t
      for (Eigen::Index c = 0; c < experts; ++c) {
        if (routing.slot(t, c) >= 0) dprobs(t, c) += dgate(t, c) * scaling;
      }
      continue;
    }
    float chosen = 0.0f;  // S = sum of the k chosen probabilities (renormalized gate = p / S)
    for (Eigen::Index c = 0; c < routing.expert.cols(); ++c)
      chosen += routing.probs(t, routing.expert(t, c));
    for (Eigen::Index c = 0; c < routing.expert.cols(); ++c) {
      if (routing.slot(t, c) < 0) continue;
      const int e = routing.expert(t, c);
      const float dg = scaling == 1.0f ? dgate(t, c) : dgate(t, c) * scaling;
      if (!options.renormalize) {
        dprobs(t, e) += dg;
        continue;
      }
      // d(p_c / S)/d p_j = [c == j] / S - p_c / S^2 for every chosen j.
      const float gate = routing.probs(t, e) / chosen;
      dprobs(t, e) += dg / chosen;
      for (Eigen::Index j = 0; j < routing.expert.cols(); ++j) {
        dprobs(t, routing.expert(t, j)) -= dg * gate / chosen;
      }
    }
  }
  const bool sigmoid_scores = options.score == ScoreFunction::kSigmoid;
  if (aux_coef != 0.0f && !sigmoid_scores) {
    detail::add_load_balancing_loss_grad(routing.probs, routing.expert, routing.group_size,
                                         aux_coef, dprobs, aux_groups);
  }
  if (aux_coef != 0.0f && sigmoid_scores && tokens > 0) {
    // SEMANTICS 20: aux on q = s / sum(s); dq first (aux is linear in q), then
    // ds_j = (dq_j - sum_i q_i dq_i) / sum(s).
    Matrix<float> local;
    Matrix<float>& dq = scratch != nullptr ? *scratch : local;
    dq.setZero(tokens, experts);
    detail::add_load_balancing_loss_grad(routing.probs, routing.expert, routing.group_size,
                                         aux_coef, dq, aux_groups);
    for (Eigen::Index t = 0; t < tokens; ++t) {
      const float sum = routing.probs.row(t).sum();
      const float dot = routing.probs.row(t).dot(dq.row(t)) / sum;
      dprobs.row(t).array() += (dq.row(t).array() - dot) / sum;
    }
  }
  if (sigmoid_scores) {  // d sigmoid(l) / dl = s (1 - s)
    dlogits.array() = dprobs.array() * routing.probs.array() * (1.0f - routing.probs.array());
  } else {
    // Softmax backward, row by row in place: dlogit_e = p_e * (dp_e - sum_j p_j dp_j).
    for (Eigen::Index t = 0; t < tokens; ++t) {
      const float dot = routing.probs.row(t).dot(dprobs.row(t));
      dlogits.row(t) = routing.probs.row(t).array() * (dprobs.row(t).array() - dot);
    }
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
  // The routing must be one these options make: k choices per token, or (expert choice,
  // SEMANTICS 17) one position per expert, position c being expert c.
  if (options.method == RoutingMethod::kExpertChoice) {
    detail::check_shape("routing.expert (expert choice: one position per expert)", routing.expert,
                        -1, options.num_experts);
    for (Eigen::Index t = 0; t < routing.expert.rows(); ++t) {
      for (Eigen::Index c = 0; c < routing.expert.cols(); ++c) {
        if (routing.expert(t, c) != c) {
          detail::fail("routing.expert(", t, ", ", c, ") is ", routing.expert(t, c), ", expected ",
                       c, " (expert choice: position c is expert c)");
        }
      }
    }
  } else {
    detail::check_shape("routing.expert", routing.expert, -1, options.top_k);
  }
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
