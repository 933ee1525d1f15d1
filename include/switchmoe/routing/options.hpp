#pragma once
// Routing configuration and the routing result that the router, dispatch and losses exchange.

#include <cmath>
#include <vector>

#include "switchmoe/core/types.hpp"

namespace switchmoe {

/// Who wins an overflowing expert's slots (SEMANTICS 7).
enum class Priority {
  kTokenOrder,         // slots fill in token order within the group (the original)
  kRouterProbability,  // tokens visited by descending top-1 probability (batch prioritized)
};

inline const char* to_string(Priority p) {
  return p == Priority::kTokenOrder ? "kTokenOrder" : "kRouterProbability";
}

/// Who chooses (SEMANTICS 4 and 17).
enum class RoutingMethod {
  kTokenChoice,   // each token takes its top-k experts (the original, and top-k MoE)
  kExpertChoice,  // each expert takes its top-C tokens of the group (Zhou et al. 2022)
};

/// How logits become scores (SEMANTICS 2 and 20).
enum class ScoreFunction {
  kSoftmax,  // over experts (the original)
  kSigmoid,  // elementwise (DeepSeek-V3)
};

inline const char* to_string(RoutingMethod m) {
  return m == RoutingMethod::kTokenChoice ? "kTokenChoice" : "kExpertChoice";
}
inline const char* to_string(ScoreFunction f) {
  return f == ScoreFunction::kSoftmax ? "kSoftmax" : "kSigmoid";
}

struct RoutingOptions {
  int num_experts = 0;
  int top_k = 1;                      // 1 is Switch routing
  double capacity_factor = 1.25;      // Mode::kTrain
  double eval_capacity_factor = 2.0;  // Mode::kEval
  int expert_capacity = 0;            // > 0: used as given (no min_capacity, no cap at T_g)
  int min_capacity = 4;
  int group_size = 0;  // 0: all tokens of the call are one group
  Priority priority = Priority::kTokenOrder;
  bool dropless = false;     // no capacity: nothing is dropped
  bool renormalize = false;  // top-k gates renormalized to sum to 1 before capacity
  // Variants (SEMANTICS 17-20); the defaults are the original Switch routing.
  // Expert choice: top_k must stay 1 (it is not the number of experts per token, which varies
  // from 0 to E); capacity_factor (or expert_capacity) sets C; dropless, renormalize, priority,
  // random_second_choice, sigmoid scores and bias balancing do not apply and are rejected.
  RoutingMethod method = RoutingMethod::kTokenChoice;
  ScoreFunction score = ScoreFunction::kSoftmax;
  float routed_scaling = 1.0f;        // multiplies every gate (SEMANTICS 20; DeepSeek-V3: 2.5)
  bool random_second_choice = false;  // SEMANTICS 18, top_k = 2, training only
  float bias_update_rate = 0.0f;      // u of SEMANTICS 19 (DeepSeek-V3: 1e-3); 0: no update
};

namespace detail {

/// Temporaries of route() (routing/route.hpp), kept with its result so that routing again with
/// the same sizes allocates nothing. Not part of the result: its contents are unspecified.
/// std::vector keeps its capacity when shrunk, so smaller sizes never reallocate either.
struct RoutingScratch {
  std::vector<int> order;      // [group_size] the group's tokens in priority order (SEMANTICS 7)
  std::vector<int> load;       // [experts] slots used so far in the current group
  std::vector<double> weight;  // [experts] load-balancing weights of the current group
  std::vector<char> skipped;   // [tokens * k] choices not dispatched (SEMANTICS 18), or empty
  Matrix<float> selection;     // [tokens, experts] biased scores that choose (SEMANTICS 19)
  Matrix<float> normalized;    // [tokens, experts] sigmoid scores / their sum (SEMANTICS 20)
};

}  // namespace detail

/// The outcome of routing N tokens over E experts with k choices each.
struct Routing {
  Matrix<float> logits;   // [tokens, experts]
  Matrix<float> probs;    // [tokens, experts] scores: softmax of logits (sigmoid: rule 20)
  Matrix<int> expert;     // [tokens, k] chosen experts, best first, before capacity
  Matrix<int> slot;       // [tokens, k] position in the expert's buffer of its group, -1 if dropped
  Matrix<float> gate;     // [tokens, k] combine weight, 0 if dropped
  float aux_loss = 0.0f;  // SEMANTICS 8, unscaled
  float z_loss = 0.0f;    // SEMANTICS 9, unscaled
  int capacity = 0;       // C per expert and group (dropless: the largest load of any expert)
  int group_size = 0;     // tokens per group actually used
  detail::RoutingScratch scratch;  // route()'s reusable temporaries, not part of the result

  Eigen::Index num_tokens() const { return expert.rows(); }
  Eigen::Index top_k() const { return expert.cols(); }
  Eigen::Index num_groups() const { return group_size > 0 ? expert.rows() / group_size : 0; }
};

namespace detail {

/// A loss coefficient must be finite (a NaN or infinite one would poison every gradient).
inline void check_coefficient(const char* name, float value) {
  if (!std::isfinite(value)) fail(name, " is ", value, ", expected a finite value");
}

/// coef * loss, exactly 0 when coef is 0 even if the loss overflowed (0 * inf is NaN).
inline float scaled_loss(float coef, float loss) { return coef == 0.0f ? 0.0f : coef * loss; }

inline void check_capacity_factor(const char* name, double value) {
  if (!(value > 0.0) || !std::isfinite(value)) {
    fail("RoutingOptions::", name, " is ", value, ", expected a finite value > 0");
  }
}

/// Validates options independent of the token count.
inline void validate(const RoutingOptions& options) {
  if (options.num_experts < 1) {
    fail("RoutingOptions::num_experts is ", options.num_experts, ", expected >= 1");
  }
  if (options.top_k < 1 || options.top_k > options.num_experts) {
    fail("RoutingOptions::top_k is ", options.top_k,
         ", expected in [1, num_experts = ", options.num_experts, "]");
  }
  check_capacity_factor("capacity_factor", options.capacity_factor);
  check_capacity_factor("eval_capacity_factor", options.eval_capacity_factor);
  if (options.expert_capacity < 0) {
    fail("RoutingOptions::expert_capacity is ", options.expert_capacity,
         ", expected >= 0 (0 derives it from the capacity factor)");
  }
  if (options.min_capacity < 0) {
    fail("RoutingOptions::min_capacity is ", options.min_capacity, ", expected >= 0");
  }
  if (options.group_size < 0) {
    fail("RoutingOptions::group_size is ", options.group_size,
         ", expected >= 0 (0 means one group of all tokens)");
  }
  if (options.priority != Priority::kTokenOrder &&
      options.priority != Priority::kRouterProbability) {
    fail("RoutingOptions::priority is ", static_cast<int>(options.priority),
         ", expected Priority::kTokenOrder or Priority::kRouterProbability");
  }
  if (options.method != RoutingMethod::kTokenChoice &&
      options.method != RoutingMethod::kExpertChoice) {
    fail("RoutingOptions::method is ", static_cast<int>(options.method),
         ", expected RoutingMethod::kTokenChoice or RoutingMethod::kExpertChoice");
  }
  if (options.score != ScoreFunction::kSoftmax && options.score != ScoreFunction::kSigmoid) {
    fail("RoutingOptions::score is ", static_cast<int>(options.score),
         ", expected ScoreFunction::kSoftmax or ScoreFunction::kSigmoid");
  }
  if (!(options.routed_scaling > 0.0f) || !std::isfinite(options.routed_scaling)) {
    fail("RoutingOptions::routed_scaling is ", options.routed_scaling,
         ", expected a finite value > 0");
  }
  if (!(options.bias_update_rate >= 0.0f) || !std::isfinite(options.bias_update_rate)) {
    fail("RoutingOptions::bias_update_rate is ", options.bias_update_rate,
         ", expected a finite value >= 0 (0: no bias balancing)");
  }
  if (options.random_second_choice && options.top_k != 2) {
    fail("RoutingOptions::random_second_choice is true with top_k = ", options.top_k,
         ", expected top_k = 2 (SEMANTICS 18)");
  }
  if (options.method == RoutingMethod::kExpertChoice) {
    const char* why = " with RoutingMethod::kExpertChoice (SEMANTICS 17)";
    if (options.top_k != 1) {
      fail("RoutingOptions::top_k is ", options.top_k, ", expected 1", why,
           ": each expert takes C tokens, set by capacity_factor or expert_capacity");
    }
    if (options.dropless) fail("RoutingOptions::dropless is true, expected false", why);
    if (options.renormalize) fail("RoutingOptions::renormalize is true, expected false", why);
    if (options.priority != Priority::kTokenOrder) {
      fail("RoutingOptions::priority is ", to_string(options.priority),
           ", expected Priority::kTokenOrder", why, ": experts choose, tokens have no priority");
    }
    if (options.random_second_choice) {
      fail("RoutingOptions::random_second_choice is true, expected false", why);
    }
    if (options.score != ScoreFunction::kSoftmax) {
      fail("RoutingOptions::score is ", to_string(options.score), ", expected kSoftmax", why);
    }
    if (options.bias_update_rate != 0.0f) {
      fail("RoutingOptions::bias_update_rate is ", options.bias_update_rate, ", expected 0", why);
    }
  }
}

/// Checks that `routing` is a consistent token-choice routing of `tokens` tokens over
/// `num_experts` experts: shapes agree, expert ids and slots are in range, gates are finite.
/// O(tokens * k); public entry points that take a routing from the caller run it once.
inline void check_routing(const Routing& routing, Eigen::Index tokens, int num_experts) {
  if (num_experts < 1) fail("num_experts is ", num_experts, ", expected >= 1");
  const Eigen::Index k = routing.expert.cols();
  if (routing.group_size < 0 || (routing.group_size > 0 && tokens % routing.group_size != 0)) {
    fail("routing.group_size is ", routing.group_size, ", expected 0 or a divisor of the ", tokens,
         " tokens");
  }
  // 0: one group of all tokens; a slot is a position in its expert's buffer of the group.
  const Eigen::Index group = routing.group_size > 0 ? routing.group_size : tokens;
  if (routing.expert.rows() != tokens) {
    fail("routing.expert has ", routing.expert.rows(), " rows, expected ", tokens,
         " (one per token of x)");
  }
  if (k < 1 || k > num_experts) {
    fail("routing.expert has ", k, " columns, expected top_k in [1, ", num_experts, "]");
  }
  check_shape("routing.slot", routing.slot, tokens, k);
  check_shape("routing.gate", routing.gate, tokens, k);
  if (routing.capacity < 0) fail("routing.capacity is ", routing.capacity, ", expected >= 0");
  for (Eigen::Index t = 0; t < tokens; ++t) {
    for (Eigen::Index c = 0; c < k; ++c) {
      if (routing.expert(t, c) < 0 || routing.expert(t, c) >= num_experts) {
        fail("routing.expert(", t, ", ", c, ") is ", routing.expert(t, c), ", expected in [0, ",
             num_experts, ")");
      }
      if (routing.slot(t, c) < -1 || routing.slot(t, c) >= group) {
        fail("routing.slot(", t, ", ", c, ") is ", routing.slot(t, c), ", expected in [-1, ", group,
             ") (-1: dropped; at most one slot per token of the group)");
      }
      if (!std::isfinite(routing.gate(t, c))) {
        fail("routing.gate(", t, ", ", c, ") is ", routing.gate(t, c), ", expected a finite value");
      }
    }
  }
}

/// The group size used for `tokens` tokens; throws unless it divides the token count.
inline int resolve_group_size(Eigen::Index tokens, int group_size) {
  if (group_size < 0) {
    fail("group_size is ", group_size, ", expected >= 0 (0 means one group of all tokens)");
  }
  if (group_size == 0) return static_cast<int>(tokens);
  if (tokens == 0) return group_size;
  if (tokens % group_size != 0) {
    fail("group_size is ", group_size, ", expected a divisor of the token count ", tokens);
  }
  return group_size;
}

}  // namespace detail
}  // namespace switchmoe
