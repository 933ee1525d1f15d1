#pragma once
// Dispatch: the contract between routing and the experts. A routing becomes a plan of
// (token, expert, gate) rows grouped by expert, CSR style: rows [offsets[e], offsets[e+1]) are
// expert e's. Gather copies each row's token into one contiguous buffer per expert, combine
// puts the expert outputs back weighted by the gates (SEMANTICS 1), and the adjoints of both
// (SEMANTICS 10) live here too. No one-hot dispatch tensors: each kept choice is one row.
//
// A plan also maps every (token, choice position) back to its row: `row` has `top_k` entries
// per token, -1 where nothing was kept. A token-choice routing has k positions per token (its
// choices); a routing in which a token can get any number of experts (expert choice,
// SEMANTICS 17) uses E positions, one per expert. Combine visits a token's positions in order,
// so its sum does not depend on the thread count or the row layout.

#include <cstdint>
#include <type_traits>
#include <vector>

#include "switchmoe/core/parallel.hpp"
#include "switchmoe/kernels/convert.hpp"
#include "switchmoe/routing/options.hpp"

namespace switchmoe {

struct DispatchPlan {
  int num_experts = 0;
  int top_k = 0;             // choice positions per token in `row` (k, or E for expert choice)
  std::vector<int> offsets;  // [experts + 1] rows of expert e: [offsets[e], offsets[e + 1])
  std::vector<int> token;    // [rows] source token of each row
  std::vector<int> choice;   // [rows] which of the token's positions it is
  std::vector<float> gate;   // [rows] combine weight of each row
  std::vector<int> row;      // [tokens * top_k] row of (t, c), -1 if nothing was kept
  std::vector<int> cursor;   // [experts] scratch of make_dispatch_plan, not part of the plan

  int num_rows() const { return offsets.empty() ? 0 : offsets.back(); }
  int rows_of(int e) const { return offsets[e + 1] - offsets[e]; }
  Eigen::Index num_tokens() const {
    return top_k > 0 ? static_cast<Eigen::Index>(row.size()) / top_k : 0;
  }
};

namespace detail {

/// Builds the plan of a routing whose consistency was checked (check_routing): rows follow
/// (group, slot) within each expert. With `check_slots`, also verifies that the kept slots of
/// each expert and group are distinct and dense (what check_routing cannot see) before any row
/// is written out of place.
inline void build_dispatch_plan(const Routing& routing, int num_experts, bool check_slots,
                                DispatchPlan& plan) {
  const Eigen::Index tokens = routing.expert.rows();
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
  const std::size_t most = static_cast<std::size_t>(tokens * k);
  plan.token.reserve(most);
  plan.choice.reserve(most);
  plan.gate.reserve(most);
  plan.token.resize(plan.offsets.back());
  plan.choice.resize(plan.offsets.back());
  plan.gate.resize(plan.offsets.back());
  plan.row.assign(most, -1);
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
        if (check_slots && slot >= plan.offsets[e + 1] - cursor[e]) {
          fail("routing.slot(", t, ", ", c, ") is ", slot, ", expected slots of expert ", e,
               " in its group to be distinct and dense");
        }
        const int r = cursor[e] + slot;
        plan.token[r] = static_cast<int>(t);
        plan.choice[r] = c;
        plan.gate[r] = routing.gate(t, c);
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
  if (!check_slots) return;
  // Every row must have been written exactly once: counts per expert match and slots are dense.
  for (int e = 0; e < num_experts; ++e) {
    if (cursor[e] != plan.offsets[e + 1]) {
      fail("routing.slot of expert ", e, " is inconsistent: slots must be distinct");
    }
  }
  for (std::size_t i = 0; i < plan.row.size(); ++i) {
    const int r = plan.row[i];
    if (r >= 0 &&
        (plan.token[r] != static_cast<int>(i) / k || plan.choice[r] != static_cast<int>(i) % k)) {
      fail("routing.slot is inconsistent: two choices share slot ", r);
    }
  }
}

/// Checks that `plan` is internally consistent (offsets ascending from 0, one token, choice and
/// gate per row, every row reachable from `row` and back) and that its tokens are rows of a
/// matrix with `tokens` rows. O(rows + tokens * top_k).
inline void check_plan(const DispatchPlan& plan, Eigen::Index tokens) {
  if (plan.num_experts < 1 || static_cast<int>(plan.offsets.size()) != plan.num_experts + 1 ||
      plan.offsets.front() != 0) {
    fail("plan.offsets has ", plan.offsets.size(),
         " entries, expected num_experts + 1 = ", plan.num_experts + 1, " starting at 0");
  }
  for (int e = 0; e < plan.num_experts; ++e) {
    if (plan.offsets[e + 1] < plan.offsets[e]) {
      fail("plan.offsets[", e + 1, "] = ", plan.offsets[e + 1], " is below plan.offsets[", e,
           "] = ", plan.offsets[e]);
    }
  }
  const std::size_t rows = static_cast<std::size_t>(plan.num_rows());
  if (plan.token.size() != rows || plan.choice.size() != rows || plan.gate.size() != rows) {
    fail("plan has ", rows, " rows but ", plan.token.size(), " tokens, ", plan.choice.size(),
         " choices and ", plan.gate.size(), " gates");
  }
  if (plan.top_k < 1 || static_cast<Eigen::Index>(plan.row.size()) != tokens * plan.top_k) {
    fail("plan.row has ", plan.row.size(), " entries, expected tokens * top_k = ", tokens, " * ",
         plan.top_k);
  }
  for (std::size_t r = 0; r < rows; ++r) {
    const int t = plan.token[r], c = plan.choice[r];
    if (t < 0 || t >= tokens || c < 0 || c >= plan.top_k ||
        plan.row[static_cast<std::size_t>(t) * plan.top_k + c] != static_cast<int>(r)) {
      fail("plan row ", r, " (token ", t, ", choice ", c, ") is not the row of its (token, choice)",
           " in plan.row, or lies outside the ", tokens, " tokens");
    }
  }
  std::size_t kept = 0;
  for (std::size_t i = 0; i < plan.row.size(); ++i) {
    if (plan.row[i] < -1 || plan.row[i] >= static_cast<int>(rows)) {
      fail("plan.row[", i, "] is ", plan.row[i], ", expected in [-1, ", rows, ")");
    }
    kept += plan.row[i] >= 0;
  }
  // Every row is named by its own position (checked above), so more named positions than rows
  // means some row is named twice and would be combined twice.
  if (kept != rows) {
    fail("plan.row names ", kept, " rows, expected each of the ", rows, " rows exactly once");
  }
}

/// Dropout keys of the rows (SEMANTICS 12, 21): row r of token t, position c draws its mask from
/// (first_token + t) * top_k + c, so masks do not depend on the row layout, nor on which process
/// holds the token (first_token is the global index of the plan's first token).
inline void row_keys(const DispatchPlan& plan, std::int64_t first_token,
                     std::vector<std::uint64_t>& keys) {
  keys.resize(plan.token.size());
  for (std::size_t r = 0; r < keys.size(); ++r) {
    keys[r] = static_cast<std::uint64_t>(first_token + plan.token[r]) * plan.top_k + plan.choice[r];
  }
}

/// xg[r] = T(x[token[r]]); trusts the plan and the shapes.
template <class T, class XgDerived>
void gather_rows(const Eigen::Ref<const Matrix<float>>& x, const DispatchPlan& plan,
                 Eigen::MatrixBase<XgDerived>& xg) {
  if constexpr (std::is_same_v<T, Eigen::bfloat16> && XgDerived::IsRowMajor &&
                static_cast<int>(XgDerived::InnerStrideAtCompileTime) == 1) {
    // Eigen's conversion, bit for bit, in a loop that vectorizes (Eigen's cast is scalar).
    const int cols = static_cast<int>(x.cols());
    if (cols == 0) return;
    detail::parallel_for(plan.num_rows(), x.cols(), [&](Eigen::Index r) {
      kernels::convert_row_exact(x.data() + plan.token[r] * x.outerStride(), &xg.coeffRef(r, 0),
                                 cols);
    });
  } else {
    detail::parallel_for(plan.num_rows(), x.cols(), [&](Eigen::Index r) {
      xg.row(r) = x.row(plan.token[r]).template cast<T>();
    });
  }
}

/// y[t] = sum over t's positions c, in order, of gate_of(r) * yg[r], r = row(t, c); exactly 0
/// where nothing was kept (SEMANTICS 1). Trusts the plan and the shapes.
template <class GateOf>
void combine_rows(const Eigen::Ref<const Matrix<float>>& yg, const DispatchPlan& plan,
                  const GateOf& gate_of, Eigen::Ref<Matrix<float>> y) {
  const int k = plan.top_k;
  detail::parallel_for(y.rows(), yg.cols() * k, [&](Eigen::Index t) {
    bool written = false;
    for (int c = 0; c < k; ++c) {
      const int r = plan.row[t * k + c];
      if (r < 0) continue;
      if (written) {
        y.row(t) += gate_of(r) * yg.row(r);
      } else {
        y.row(t) = gate_of(r) * yg.row(r);
        written = true;
      }
    }
    if (!written) y.row(t).setZero();  // SEMANTICS 1: every choice dropped gives exactly 0
  });
}

/// The adjoint of combine for y = sum_r gate[r] * yg[r] (per token): dyg[r] = gate[r] * dy[t]
/// and dgate[r] = dy[t] . yg[r], t = token[r]. Trusts the plan and the shapes.
inline void combine_backward_rows(const Eigen::Ref<const Matrix<float>>& dy,
                                  const Eigen::Ref<const Matrix<float>>& yg,
                                  const DispatchPlan& plan, Eigen::Ref<Matrix<float>> dyg,
                                  std::vector<float>& dgate) {
  dgate.resize(plan.token.size());
  detail::parallel_for(plan.num_rows(), 2 * dy.cols(), [&](Eigen::Index r) {
    const int t = plan.token[r];
    dyg.row(r) = plan.gate[r] * dy.row(t);
    dgate[r] = dy.row(t).dot(yg.row(r));
  });
}

/// The adjoint of gather: dx[t] += dxg[row(t, c)] over t's positions c in order (so the sum
/// does not depend on threads). Trusts the plan and the shapes.
inline void gather_backward_rows(const Eigen::Ref<const Matrix<float>>& dxg,
                                 const DispatchPlan& plan, Eigen::Ref<Matrix<float>> dx) {
  const int k = plan.top_k;
  detail::parallel_for(dx.rows(), k * dx.cols(), [&](Eigen::Index t) {
    for (int c = 0; c < k; ++c) {
      const int r = plan.row[t * k + c];
      if (r >= 0) dx.row(t) += dxg.row(r);
    }
  });
}

/// Per-row gate gradients back to a [tokens, top_k] matrix by choice position (0 where nothing
/// was kept), the form route_backward takes.
inline void rows_to_positions(const DispatchPlan& plan, const std::vector<float>& per_row,
                              Matrix<float>& per_position) {
  per_position.resize(plan.num_tokens(), plan.top_k);
  for (Eigen::Index i = 0; i < per_position.size(); ++i) {
    const int r = plan.row[i];
    per_position.data()[i] = r >= 0 ? per_row[r] : 0.0f;
  }
}

}  // namespace detail

/// Builds the plan of `routing` into `plan`, reusing its vectors: with the sizes of its previous
/// plan (or smaller), nothing is allocated. Throws std::invalid_argument, leaving `plan` in an
/// unspecified but valid state, if `routing` is not a consistent routing over `num_experts`.
inline void make_dispatch_plan(const Routing& routing, int num_experts, DispatchPlan& plan) {
  detail::check_routing(routing, routing.expert.rows(), num_experts);
  detail::build_dispatch_plan(routing, num_experts, /*check_slots=*/true, plan);
}

inline DispatchPlan make_dispatch_plan(const Routing& routing, int num_experts) {
  DispatchPlan plan;
  make_dispatch_plan(routing, num_experts, plan);
  return plan;
}

/// xg[r] = T(x[token[r]]) into xg, which must already be [rows, d_model] (e.g. a view of a
/// buffer kept between calls; call as gather<T>(x, plan, view)). Throws std::invalid_argument if
/// the plan is inconsistent or names a token that x does not have.
template <class T>
void gather(const Eigen::Ref<const Matrix<float>>& x, const DispatchPlan& plan,
            Eigen::Ref<Matrix<T>> xg) {
  detail::check_shape("xg", xg, plan.num_rows(), x.cols());
  detail::check_plan(plan, plan.num_tokens());
  if (plan.num_tokens() > x.rows()) {
    detail::fail("plan covers ", plan.num_tokens(), " tokens, but x has ", x.rows(), " rows");
  }
  detail::gather_rows<T>(x, plan, xg);
}

/// xg[r] = T(x[token[r]]): xg resized to [rows, d_model] in the expert element type.
template <class T>
void gather(const Eigen::Ref<const Matrix<float>>& x, const DispatchPlan& plan, Matrix<T>& xg) {
  xg.resize(plan.num_rows(), x.cols());
  gather<T>(x, plan, Eigen::Ref<Matrix<T>>(xg));
}

/// y[t] = sum over kept choices c, in order: gate(t, c) * yg[row(t, c)]; 0 if all dropped.
/// y is resized to [tokens, d_model]. Throws std::invalid_argument if the plan, the routing and
/// yg do not belong together.
inline void combine(const Eigen::Ref<const Matrix<float>>& yg, const DispatchPlan& plan,
                    const Routing& routing, Matrix<float>& y) {
  const Eigen::Index tokens = routing.expert.rows();
  detail::check_plan(plan, tokens);
  detail::check_shape("yg", yg, plan.num_rows(), -1);
  detail::check_shape("routing.gate", routing.gate, tokens, plan.top_k);
  y.resize(tokens, yg.cols());
  detail::combine_rows(
      yg, plan, [&](int r) { return routing.gate(plan.token[r], plan.choice[r]); },
      Eigen::Ref<Matrix<float>>(y));
}

/// y[t] = sum over the plan's rows of t, in position order: gate[r] * yg[r]; 0 where nothing was
/// kept. y is resized to [tokens, d_model].
inline void combine(const Eigen::Ref<const Matrix<float>>& yg, const DispatchPlan& plan,
                    Matrix<float>& y) {
  detail::check_plan(plan, plan.num_tokens());
  detail::check_shape("yg", yg, plan.num_rows(), -1);
  y.resize(plan.num_tokens(), yg.cols());
  detail::combine_rows(
      yg, plan, [&](int r) { return plan.gate[r]; }, Eigen::Ref<Matrix<float>>(y));
}

/// The adjoint of combine(yg, plan, y): for dy [tokens, d_model] and the expert outputs yg
/// [rows, d_model], writes dyg [rows, d_model] (resized) and dgate [rows].
inline void combine_backward(const Eigen::Ref<const Matrix<float>>& dy,
                             const Eigen::Ref<const Matrix<float>>& yg, const DispatchPlan& plan,
                             Matrix<float>& dyg, std::vector<float>& dgate) {
  detail::check_plan(plan, plan.num_tokens());
  detail::check_shape("dy", dy, plan.num_tokens(), -1);
  detail::check_shape("yg", yg, plan.num_rows(), dy.cols());
  dyg.resize(plan.num_rows(), dy.cols());
  detail::combine_backward_rows(dy, yg, plan, dyg, dgate);
}

/// The adjoint of gather: dx [tokens, d_model] += the rows of dxg [rows, d_model] of each token.
inline void gather_backward(const Eigen::Ref<const Matrix<float>>& dxg, const DispatchPlan& plan,
                            Eigen::Ref<Matrix<float>> dx) {
  detail::check_plan(plan, plan.num_tokens());
  detail::check_shape("dxg", dxg, plan.num_rows(), dx.cols());
  detail::check_shape("dx", dx, plan.num_tokens(), -1);
  detail::gather_backward_rows(dxg, plan, dx);
}

}  // namespace switchmoe
