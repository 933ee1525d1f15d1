#pragma once
// Dispatch: turn a routing into contiguous per-expert token blocks (gather), and put the expert
// outputs back, weighted by the gates (combine). No one-hot dispatch tensors: each kept choice
// is one row of the gathered buffer.

#include <vector>

#include "switchmoe/core/parallel.hpp"
#include "switchmoe/routing/options.hpp"

namespace switchmoe {

/// Gathered rows grouped by expert: rows [offsets[e], offsets[e+1]) belong to expert e, ordered
/// by group then slot. `row` maps each (token, choice) back to its gathered row.
struct DispatchPlan {
  int num_experts = 0;
  int top_k = 0;
  std::vector<int> offsets;  // [experts + 1]
  std::vector<int> token;    // [kept] source token of each gathered row
  std::vector<int> choice;   // [kept] which of the token's k choices it is
  std::vector<int> row;      // [tokens * k] gathered row of (t, c), -1 if dropped
  std::vector<int> cursor;   // [experts] scratch of make_dispatch_plan, not part of the plan

  int num_rows() const { return offsets.empty() ? 0 : offsets.back(); }
  int rows_of(int e) const { return offsets[e + 1] - offsets[e]; }
};

namespace detail {

/// Checks that `routing` is a consistent routing of `tokens` tokens over `num_experts`.
inline void check_routing(const Routing& routing, Eigen::Index tokens, int num_experts) {
  const Eigen::Index k = routing.expert.cols();
  if (routing.group_size < 0 || (routing.group_size > 0 && tokens % routing.group_size != 0)) {
    fail("routing.group_size is ", routing.group_size, ", expected 0 or a divisor of the ", tokens,
         " tokens");
  }
  if (routing.expert.rows() != tokens) {
    fail("routing.expert has ", routing.expert.rows(), " rows, expected ", tokens,
         " (one per token of x)");
  }
  if (k < 1 || k > num_experts) {
    fail("routing.expert has ", k, " columns, expected top_k in [1, ", num_experts, "]");
  }
  check_shape("routing.slot", routing.slot, tokens, k);
  check_shape("routing.gate", routing.gate, tokens, k);
  for (Eigen::Index t = 0; t < tokens; ++t) {
    for (Eigen::Index c = 0; c < k; ++c) {
      if (routing.expert(t, c) < 0 || routing.expert(t, c) >= num_experts) {
        fail("routing.expert(", t, ", ", c, ") is ", routing.expert(t, c), ", expected in [0, ",
             num_experts, ")");
      }
      if (routing.slot(t, c) < -1) {
        fail("routing.slot(", t, ", ", c, ") is ", routing.slot(t, c), ", expected >= -1");
      }
    }
  }
}

}  // namespace detail

/// Builds the plan of `routing` into `plan`, reusing its vectors: with the sizes of its previous
/// plan (or smaller), nothing is allocated.
inline void make_dispatch_plan(const Routing& routing, int num_experts, DispatchPlan& plan) {
  const Eigen::Index tokens = routing.expert.rows();
  detail::check_routing(routing, tokens, num_experts);
  const int k = static_cast<int>(routing.expert.cols());
  plan.num_experts = num_experts;
  plan.top_k = k;
  plan.offsets.assign(num_experts + 1, 0);
  for (Eigen::Index t = 0; t < tokens; ++t) {
    for (int c = 0; c < k; ++c) {
      if (routing.slot(t, c) >= 0) ++plan.offsets[routing.expert(t, c) + 1];
    }
  }
  for (int e = 0; e < num_experts; ++e) plan.offsets[e + 1] += plan.offsets[e];
  // Room for every choice, so that a later routing of as many tokens that keeps more of them
  // still needs no allocation.
  plan.token.reserve(static_cast<std::size_t>(tokens * k));
  plan.choice.reserve(static_cast<std::size_t>(tokens * k));
  plan.token.resize(plan.offsets.back());
  plan.choice.resize(plan.offsets.back());
  plan.row.assign(static_cast<std::size_t>(tokens * k), -1);
  // Tokens are visited in order, so within an expert rows follow group order; within a group,
  // by slot, since a counting pass would otherwise reorder ties: place by (group, slot).
  // cursor[e] is the first row of the current group in expert e's block.
  std::vector<int>& cursor = plan.cursor;
  cursor.assign(plan.offsets.begin(), plan.offsets.end() - 1);
  const int g = routing.group_size > 0 ? routing.group_size : static_cast<int>(tokens);
  for (Eigen::Index first = 0; first < tokens; first += g) {
    for (Eigen::Index t = first; t < first + g; ++t) {
      for (int c = 0; c < k; ++c) {
        const int slot = routing.slot(t, c);
        if (slot < 0) continue;
        const int e = routing.expert(t, c);
        if (slot >= plan.offsets[e + 1] - cursor[e]) {
          detail::fail("routing.slot(", t, ", ", c, ") is ", slot, ", expected slots of expert ", e,
                       " in its group to be distinct and dense");
        }
        const int r = cursor[e] + slot;
        plan.token[r] = static_cast<int>(t);
        plan.choice[r] = c;
        plan.row[t * k + c] = r;
      }
    }
    // The group's rows of each expert end where the next group's begin.
    for (Eigen::Index t = first; t < first + g; ++t) {
      for (int c = 0; c < k; ++c) {
        if (routing.slot(t, c) >= 0) ++cursor[routing.expert(t, c)];
      }
    }
  }
  // Every row must have been written exactly once: counts per expert match and slots are dense.
  for (int e = 0; e < num_experts; ++e) {
    if (cursor[e] != plan.offsets[e + 1]) {
      detail::fail("routing.slot of expert ", e, " is inconsistent: slots must be distinct");
    }
  }
  for (std::size_t i = 0; i < plan.row.size(); ++i) {
    const int r = plan.row[i];
    if (r >= 0 &&
        (plan.token[r] != static_cast<int>(i) / k || plan.choice[r] != static_cast<int>(i) % k)) {
      detail::fail("routing.slot is inconsistent: two choices share slot ", r);
    }
  }
}

inline DispatchPlan make_dispatch_plan(const Routing& routing, int num_experts) {
  DispatchPlan plan;
  make_dispatch_plan(routing, num_experts, plan);
  return plan;
}

/// xg[r] = T(x[token[r]]) into xg, which must already be [rows, d_model] (e.g. a view of a
/// buffer kept between calls; call as gather<T>(x, plan, view)).
template <class T>
void gather(const Eigen::Ref<const Matrix<float>>& x, const DispatchPlan& plan,
            Eigen::Ref<Matrix<T>> xg) {
  detail::check_shape("xg", xg, plan.num_rows(), x.cols());
  detail::parallel_for(plan.num_rows(), x.cols(), [&](Eigen::Index r) {
    xg.row(r) = x.row(plan.token[r]).template cast<T>();
  });
}

/// xg[r] = T(x[token[r]]): xg resized to [rows, d_model] in the expert element type.
template <class T>
void gather(const Eigen::Ref<const Matrix<float>>& x, const DispatchPlan& plan, Matrix<T>& xg) {
  xg.resize(plan.num_rows(), x.cols());
  gather<T>(x, plan, Eigen::Ref<Matrix<T>>(xg));
}

/// y[t] = sum over kept choices c, in order: gate(t, c) * yg[row(t, c)]; 0 if all dropped.
inline void combine(const Eigen::Ref<const Matrix<float>>& yg, const DispatchPlan& plan,
                    const Routing& routing, Matrix<float>& y) {
  const Eigen::Index tokens = routing.expert.rows();
  y.resize(tokens, yg.cols());
  detail::parallel_for(tokens, yg.cols() * plan.top_k, [&](Eigen::Index t) {
    bool written = false;
    for (int c = 0; c < plan.top_k; ++c) {
      const int r = plan.row[t * plan.top_k + c];
      if (r < 0) continue;
      if (written) {
        y.row(t) += routing.gate(t, c) * yg.row(r);
      } else {
        y.row(t) = routing.gate(t, c) * yg.row(r);
        written = true;
      }
    }
    if (!written) y.row(t).setZero();  // SEMANTICS 1: every choice dropped gives exactly 0
  });
}

}  // namespace switchmoe
