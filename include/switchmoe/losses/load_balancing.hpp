#pragma once
// Load-balancing loss (SEMANTICS 8, paper eq. 4): per group aux = E * sum_e f_e * P_e, averaged
// over groups. f_e is the fraction of the group's tokens that chose expert e among their k
// choices (before capacity); P_e is the group's mean router probability of e. Perfect balance
// gives k. Only P carries gradient: f is a count.

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

/// f_e * E / groups for every group and expert: the factor that multiplies P_e.
/// Returned as [groups, experts].
inline Matrix<double> load_balancing_weights(const Eigen::Ref<const Matrix<int>>& expert,
                                             Eigen::Index num_experts, int group_size) {
  const Eigen::Index tokens = expert.rows();
  const Eigen::Index groups = group_size > 0 ? tokens / group_size : 0;
  Matrix<double> weights = Matrix<double>::Zero(groups, num_experts);
  for (Eigen::Index t = 0; t < tokens; ++t) {
    for (Eigen::Index c = 0; c < expert.cols(); ++c) weights(t / group_size, expert(t, c)) += 1.0;
  }
  // f_e = count / T_g; aux = (1/G) sum_g E sum_e f_e P_e.
  weights *= static_cast<double>(num_experts) / (static_cast<double>(group_size) * groups);
  return weights;
}

}  // namespace detail

/// `probs` [tokens, experts], `expert` [tokens, k]; `group_size` 0 means one group.
inline float load_balancing_loss(const Eigen::Ref<const Matrix<float>>& probs,
                                 const Eigen::Ref<const Matrix<int>>& expert, int group_size = 0) {
  detail::check_load_balancing_inputs(probs, expert);
  const int g = detail::resolve_group_size(probs.rows(), group_size);
  if (probs.rows() == 0) return 0.0f;
  const Matrix<double> weights = detail::load_balancing_weights(expert, probs.cols(), g);
  double aux = 0.0;
  for (Eigen::Index t = 0; t < probs.rows(); ++t) {
    for (Eigen::Index e = 0; e < probs.cols(); ++e) {
      aux += weights(t / g, e) * static_cast<double>(probs(t, e)) / g;  // P_e = mean over group
    }
  }
  return static_cast<float>(aux);
}

/// d aux / d probs, [tokens, experts].
inline Matrix<float> load_balancing_loss_grad(const Eigen::Ref<const Matrix<float>>& probs,
                                              const Eigen::Ref<const Matrix<int>>& expert,
                                              int group_size = 0) {
  detail::check_load_balancing_inputs(probs, expert);
  const int g = detail::resolve_group_size(probs.rows(), group_size);
  Matrix<float> grad(probs.rows(), probs.cols());
  if (probs.rows() == 0) return grad;
  const Matrix<double> weights = detail::load_balancing_weights(expert, probs.cols(), g);
  for (Eigen::Index t = 0; t < probs.rows(); ++t) {
    for (Eigen::Index e = 0; e < probs.cols(); ++e) {
      grad(t, e) = static_cast<float>(weights(t / g, e) / g);
    }
  }
  return grad;
}

}  // namespace switchmoe
