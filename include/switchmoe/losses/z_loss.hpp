#pragma once
// Router z-loss (SEMANTICS 9, ST-MoE eq. 5): mean over tokens of logsumexp(logits)^2. It keeps
// router logits small, which keeps the float32 softmax well conditioned.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "switchmoe/core/types.hpp"

namespace switchmoe {
namespace detail {

/// exp(x) in double for x <= 0, in plain arithmetic that compilers vectorize (std::exp is a
/// library call per element): x = n ln2 + r with |r| <= ln2 / 2, exp(r) by its Taylor series to
/// degree 13 (truncation below 1e-17 relative), times 2^n built from the exponent bits. Within
/// about 2 ulp of the exact value. x is clamped at -708 (exp(-708) ~ 3e-308, still normal):
/// the terms that clamping raises are below 1e-300, and they are only ever added to a sum of
/// at least 1 (the largest term of a log-sum-exp is exp(0)), where they do not show.
///
/// Domain: finite x <= 0 (logsumexp passes only those). Outside it the result is defined but
/// meaningless: x > 0 (and +NaN) are taken as 0, -inf and -NaN as -708.
inline double exp_nonpositive(double x) {
  constexpr double kLog2e = 1.4426950408889634;
  constexpr double kLn2Hi = 0.693147180369123816490;  // ln2 split: n * kLn2Hi is exact
  constexpr double kLn2Lo = 1.90821492927058770002e-10;
  // x = max(x, -708) on the bits (a floating-point compare would keep compilers from
  // vectorizing under -ftrapping-math): as unsigned integers, +0.0 is 0 and a negative x is
  // 2^63 plus its magnitude's bits, which grow with the magnitude. A non-negative x (sign bit
  // 0) becomes 0 through a mask rather than a conditional, which GCC 12 would not vectorize.
  std::uint64_t x_bits = 0, floor_bits = 0;
  constexpr double kFloor = -708.0;
  std::memcpy(&x_bits, &x, sizeof(x));
  std::memcpy(&floor_bits, &kFloor, sizeof(kFloor));
  const std::uint64_t negative_mask = std::uint64_t{0} - (x_bits >> 63);  // all ones if x < 0
  x_bits = std::min(x_bits, floor_bits) & negative_mask;
  std::memcpy(&x, &x_bits, sizeof(x));
  // n = round(x log2 e) for x <= 0 (truncation of y - 0.5 toward zero; ties away from zero)
  const auto n_int = static_cast<std::int64_t>(x * kLog2e - 0.5);
  const auto n = static_cast<double>(n_int);
  const double r = (x - n * kLn2Hi) - n * kLn2Lo;
  double p = 1.0 / 6227020800.0;  // 1/13!
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  // 2^n: n + 1023 in the exponent field (n >= -1022 after the clamp)
  const std::int64_t exponent = n_int + 1023;
  const std::uint64_t scale_bits = static_cast<std::uint64_t>(exponent) << 52;
  double scale = 0.0;
  std::memcpy(&scale, &scale_bits, sizeof(scale));
  return p * scale;
}

/// log(sum_e exp(row(e))) in double: the max, then the exps of the differences (in chunks a
/// compiler vectorizes), summed in column order. A row with a non-finite value (the public
/// entries reject those before, with check_finite) takes std::exp, as exp_nonpositive's domain
/// is finite values: NaN and infinities then give what they always gave.
template <class Row>
double logsumexp(const Row& row) {
  const double max = static_cast<double>(row.maxCoeff());
  constexpr Eigen::Index kChunk = 64;
  double terms[kChunk];
  double sum = 0.0;
  double finite = 0.0;  // 0 * every difference: NaN once any of them is NaN or infinite
  for (Eigen::Index e0 = 0; e0 < row.size(); e0 += kChunk) {
    const Eigen::Index n = std::min(kChunk, row.size() - e0);
    for (Eigen::Index i = 0; i < n; ++i) terms[i] = static_cast<double>(row(e0 + i)) - max;
    for (Eigen::Index i = 0; i < n; ++i) finite += 0.0 * terms[i];
    for (Eigen::Index i = 0; i < n; ++i) terms[i] = exp_nonpositive(terms[i]);
    for (Eigen::Index i = 0; i < n; ++i) sum += terms[i];
  }
  if (finite != 0.0) {  // NaN: a non-finite value somewhere in the row
    sum = 0.0;
    for (Eigen::Index e = 0; e < row.size(); ++e) {
      sum += std::exp(static_cast<double>(row(e)) - max);
    }
  }
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
