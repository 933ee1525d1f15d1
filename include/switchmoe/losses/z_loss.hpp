#pragma once
// Router z-loss (SEMANTICS 9, ST-MoE eq. 5): mean over tokens of logsumexp(logits)^2. It keeps
// router logits small, which keeps the float32 softmax well conditioned.

#include <algorithm>
#include <cmath>

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

/// `logits` [tokens, experts]; 0 for zero tokens.
inline float router_z_loss(const Eigen::Ref<const Matrix<float>>& logits) {
  detail::check_finite("logits", logits);
  if (logits.rows() == 0) return 0.0f;
  if (logits.cols() == 0) detail::fail("logits has 0 columns, expected >= 1 expert");
  double total = 0.0;
  for (Eigen::Index t = 0; t < logits.rows(); ++t) {
    const double lse = detail::logsumexp(logits.row(t));
    total += lse * lse;
  }
  return static_cast<float>(total / static_cast<double>(logits.rows()));
}

/// d z / d logits = 2 * lse_t * softmax(logits_t) / tokens, [tokens, experts].
inline Matrix<float> router_z_loss_grad(const Eigen::Ref<const Matrix<float>>& logits) {
  detail::check_finite("logits", logits);
  Matrix<float> grad(logits.rows(), logits.cols());
  const double tokens = static_cast<double>(logits.rows());
  for (Eigen::Index t = 0; t < logits.rows(); ++t) {
    const double lse = detail::logsumexp(logits.row(t));
    for (Eigen::Index e = 0; e < logits.cols(); ++e) {
      grad(t, e) = static_cast<float>(2.0 * lse *
                                      std::exp(static_cast<double>(logits(t, e)) - lse) / tokens);
    }
  }
  return grad;
}

}  // namespace switchmoe
