#pragma once
// Load-balancing loss (SEMANTICS 8, paper eq. 4): per group aux = E * sum_e f_e * P_e, averaged
// over groups. f_e is the fraction of the group's tokens that chose expert e among their k
// choices (before capacity); P_e is the group's mean router probability of e. Perfect balance
// gives k. Only P carries gradient: f is a count.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "switchmoe/routing/options.hpp"

namespace switchmoe {
namespace detail {

inline void check_load_balancing_inputs(const Eigen::Ref<const Matrix<float>>& probs,
                                        const Eigen::Ref<const Matrix<int>>& expert) {
  if (expert.rows() != probs.rows()) {
    fail("expert has ", expert.rows(), " rows, expected ", probs.rows(), " (one per row of probs)");
  }
  for (Eigen::Index t = 0; t < expert.rows(); ++t) {
    for (Eigen::Index c = 0; c < expert.cols(); ++c) {
      if (expert(t, c) < 0 || expert(t, c) >= probs.cols()) {
        fail("expert(", t, ", ", c, ") is ", expert(t, c), ", expected in [0, ", probs.cols(), ")");
      }
    }
  }
}

/// weight[i] = f_e * E / groups for the experts e = e0 + i, i < n, of the group of tokens
/// [first, first + group_size): the factor that multiplies P_e in the loss. `total_groups` is
/// the number of groups the loss averages over (0: the groups of `expert`; under expert
/// parallelism, the groups of all processes, SEMANTICS 21).
inline void load_balancing_group_weights(const Eigen::Ref<const Matrix<int>>& expert,
                                         Eigen::Index num_experts, int group_size,
                                         Eigen::Index first, Eigen::Index e0, Eigen::Index n,
                                         double* weight, std::int64_t total_groups = 0) {
  const Eigen::Index groups = total_groups > 0 ? total_groups : expert.rows() / group_size;
  std::fill(weight, weight + n, 0.0);
  for (Eigen::Index t = first; t < first + group_size; ++t) {
    for (Eigen::Index c = 0; c < expert.cols(); ++c) {
      const Eigen::Index i = expert(t, c) - e0;
      if (i >= 0 && i < n) weight[i] += 1.0;
    }
  }
  // f_e = count / T_g; aux = (1/G) sum_g E sum_e f_e P_e.
  const double scale =
      static_cast<double>(num_experts) / (static_cast<double>(group_size) * groups);
  for (Eigen::Index i = 0; i < n; ++i) weight[i] *= scale;
}

/// The loss in double, before its rounding to float (load_balancing_loss below), with `weight`
/// as reusable scratch ([experts]; no allocation once it is large enough).
inline double load_balancing_loss_double(const Eigen::Ref<const Matrix<float>>& probs,
                                         const Eigen::Ref<const Matrix<int>>& expert,
                                         int group_size, std::vector<double>& weight) {
  const int g = resolve_group_size(probs.rows(), group_size);
  if (probs.rows() == 0) return 0.0;
  weight.resize(static_cast<std::size_t>(probs.cols()));
  double aux = 0.0;
  // P_e = mean over the group: each term is divided by g. When g is a power of two, 1 / g is
  // exact and multiplying by it rounds exactly as dividing does (both are the correctly rounded
  // value of the same real number), at a fraction of a division's cost; other g divide.
  const bool power_of_two = (g & (g - 1)) == 0;
  const double inverse_g = 1.0 / g;
  for (Eigen::Index first = 0; first < probs.rows(); first += g) {
    load_balancing_group_weights(expert, probs.cols(), g, first, 0, probs.cols(), weight.data());
    for (Eigen::Index t = first; t < first + g; ++t) {
      const float* p = probs.data() + t * probs.outerStride();  // row t, contiguous
      if (power_of_two) {
        for (Eigen::Index e = 0; e < probs.cols(); ++e) {
          aux += weight[e] * static_cast<double>(p[e]) * inverse_g;
        }
      } else {
        for (Eigen::Index e = 0; e < probs.cols(); ++e) {
          aux += weight[e] * static_cast<double>(p[e]) / g;
        }
      }
    }
  }
  return aux;
}

/// The loss, with `weight` as reusable scratch. `group_size` is resolved (> 0 unless there are
/// no tokens).
inline float load_balancing_loss(const Eigen::Ref<const Matrix<float>>& probs,
                                 const Eigen::Ref<const Matrix<int>>& expert, int group_size,
                                 std::vector<double>& weight) {
  return static_cast<float>(load_balancing_loss_double(probs, expert, group_size, weight));
}

/// Calls visit(first, e0, row) for every group of tokens [first, first + g) and every chunk of
/// experts [e0, e0 + row.size()), where `row` ([1, chunk]) is d aux / d probs of those experts,
/// the same for every token of the group. The chunks live on the stack: no heap scratch.
template <class Visit>
void for_each_load_balancing_grad_row(const Eigen::Ref<const Matrix<int>>& expert,
                                      Eigen::Index num_experts, int g, std::int64_t total_groups,
                                      const Visit& visit) {
  constexpr Eigen::Index kChunk = 256;  // experts per stack buffer
  double weight[kChunk];
  float row[kChunk];
  for (Eigen::Index first = 0; first < expert.rows(); first += g) {
    for (Eigen::Index e0 = 0; e0 < num_experts; e0 += kChunk) {
      const Eigen::Index n = std::min(kChunk, num_experts - e0);
      load_balancing_group_weights(expert, num_experts, g, first, e0, n, weight, total_groups);
      for (Eigen::Index i = 0; i < n; ++i) row[i] = static_cast<float>(weight[i] / g);
      visit(first, e0, Eigen::Map<const Eigen::Matrix<float, 1, Eigen::Dynamic>>(row, n));
    }
  }
}

/// target += coef * load_balancing_loss_grad(probs, expert, group_size), without the gradient
/// matrix; `target` is [tokens, experts]. Trusts its inputs (public callers check them);
/// `total_groups` as in load_balancing_group_weights.
inline void add_load_balancing_loss_grad(const Eigen::Ref<const Matrix<float>>& probs,
                                         const Eigen::Ref<const Matrix<int>>& expert,
                                         int group_size, float coef, Matrix<float>& target,
                                         std::int64_t total_groups = 0) {
  const int g = resolve_group_size(probs.rows(), group_size);
  if (probs.rows() == 0) return;
  for_each_load_balancing_grad_row(expert, probs.cols(), g, total_groups,
                                   [&](Eigen::Index first, Eigen::Index e0, const auto& row) {
                                     for (Eigen::Index t = first; t < first + g; ++t)
                                       target.row(t).segment(e0, row.size()) += coef * row;
                                   });
}

}  // namespace detail

/// `probs` [tokens, experts], `expert` [tokens, k]; `group_size` 0 means one group.
inline float load_balancing_loss(const Eigen::Ref<const Matrix<float>>& probs,
                                 const Eigen::Ref<const Matrix<int>>& expert, int group_size = 0) {
  detail::check_load_balancing_inputs(probs, expert);
  std::vector<double> weight;
  return detail::load_balancing_loss(probs, expert, group_size, weight);
}

/// d aux / d probs into `grad` [tokens, experts], reusing its storage.
inline void load_balancing_loss_grad(const Eigen::Ref<const Matrix<float>>& probs,
                                     const Eigen::Ref<const Matrix<int>>& expert, int group_size,
                                     Matrix<float>& grad) {
  detail::check_load_balancing_inputs(probs, expert);
  const int g = detail::resolve_group_size(probs.rows(), group_size);
  grad.resize(probs.rows(), probs.cols());
  if (probs.rows() == 0) return;
  detail::for_each_load_balancing_grad_row(
      expert, probs.cols(), g, 0, [&](Eigen::Index first, Eigen::Index e0, const auto& row) {
        for (Eigen::Index t = first; t < first + g; ++t) grad.row(t).segment(e0, row.size()) = row;
      });
}

/// d aux / d probs, [tokens, experts].
inline Matrix<float> load_balancing_loss_grad(const Eigen::Ref<const Matrix<float>>& probs,
                                              const Eigen::Ref<const Matrix<int>>& expert,
                                              int group_size = 0) {
  Matrix<float> grad;
  load_balancing_loss_grad(probs, expert, group_size, grad);
  return grad;
}

}  // namespace switchmoe
