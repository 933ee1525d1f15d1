#pragma once
// Router z-loss (SEMANTICS 9, ST-MoE eq. 5): mean over tokens of logsumexp(logits)^2. It keeps
// router logits small, which keeps the float32 softmax well conditioned.

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "switchmoe/core/types.hpp"

namespace switchmoe {
namespace detail {

template <class Row>
double logsumexp(const Row& row) {
  const double max = static_cast<double>(row.maxCoeff());
  double sum = 0.0;
  for (Eigen::Index e = 0; e < row.size(); ++e) sum += std::exp(static_cast<double>(row(e)) - max);
  return max + std::log(sum);
}

}  // namespace detail

namespace detail {

/// router_z_loss of logits known to be finite, with at least one column when not empty.
inline float router_z_loss_validated(const Eigen::Ref<const Matrix<float>>& logits) {
  if (logits.rows() == 0) return 0.0f;
  double total = 0.0;
  for (Eigen::Index t = 0; t < logits.rows(); ++t) {
    const double lse = detail::logsumexp(logits.row(t));
    total += lse * lse;
  }
  return static_cast<float>(total / static_cast<double>(logits.rows()));
}

}  // namespace detail

/// `logits` [tokens, experts]; 0 for zero tokens. Throws std::invalid_argument on a non-finite
/// logit or zero columns.
inline float router_z_loss(const Eigen::Ref<const Matrix<float>>& logits) {
  detail::check_finite("logits", logits);
  if (logits.rows() > 0 && logits.cols() == 0) {
    detail::fail("logits has 0 columns, expected >= 1 expert");
  }
  return detail::router_z_loss_validated(logits);
}

namespace detail {

/// Calls visit(t, e, g) for every element, where g = d z / d logits(t, e)
/// = 2 * lse_t * softmax(logits_t)_e / tokens, in float32.
/// `total_tokens` is the number of tokens z averages over (0: the rows of `logits`; under
/// expert parallelism, the tokens of all processes, SEMANTICS 21).
template <class Visit>
void for_each_router_z_loss_grad(const Eigen::Ref<const Matrix<float>>& logits, const Visit& visit,
                                 std::int64_t total_tokens = 0) {
  const double tokens = static_cast<double>(total_tokens > 0 ? total_tokens : logits.rows());
  for (Eigen::Index t = 0; t < logits.rows(); ++t) {
    const double lse = logsumexp(logits.row(t));
    for (Eigen::Index e = 0; e < logits.cols(); ++e) {
      const double logit = static_cast<double>(logits(t, e));
      visit(t, e, static_cast<float>(2.0 * lse * std::exp(logit - lse) / tokens));
    }
  }
}

/// target += coef * router_z_loss_grad(logits), without the gradient matrix. Trusts its inputs
/// (finite logits, target of the same shape).
inline void add_router_z_loss_grad(const Eigen::Ref<const Matrix<float>>& logits, float coef,
                                   Matrix<float>& target, std::int64_t total_tokens = 0) {
  for_each_router_z_loss_grad(
      logits, [&](Eigen::Index t, Eigen::Index e, float g) { target(t, e) += coef * g; },
      total_tokens);
}

}  // namespace detail

/// d z / d logits = 2 * lse_t * softmax(logits_t) / tokens into `grad` [tokens, experts],
/// reusing its storage.
inline void router_z_loss_grad(const Eigen::Ref<const Matrix<float>>& logits, Matrix<float>& grad) {
  detail::check_finite("logits", logits);
  grad.resize(logits.rows(), logits.cols());
  detail::for_each_router_z_loss_grad(
      logits, [&](Eigen::Index t, Eigen::Index e, float g) { grad(t, e) = g; });
}

/// d z / d logits, [tokens, experts].
inline Matrix<float> router_z_loss_grad(const Eigen::Ref<const Matrix<float>>& logits) {
  Matrix<float> grad;
  router_z_loss_grad(logits, grad);
  return grad;
}

}  // namespace switchmoe
