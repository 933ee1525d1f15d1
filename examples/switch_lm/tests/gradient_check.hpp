#pragma once
// Central finite differences for the gradient checks: perturb one entry of a tensor by +-h,
// recompute the scalar loss, and compare (L(+h) - L(-h)) / 2h with the analytic gradient.
// In double precision with h = 1e-6 the truncation error is O(h^2) ~ 1e-12 and the rounding
// error ~ 1e-16 / 1e-6 = 1e-10, so a relative tolerance of 1e-6 leaves a wide margin while any
// real mistake (a missing term, a wrong transpose) gives errors of order 1.

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <random>
#include <string>

#include "tensor.hpp"

namespace switch_lm::testing {

template <class T>
MatrixX<T> random_matrix(Eigen::Index rows, Eigen::Index cols, std::uint64_t seed,
                         double scale = 1.0) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, scale);
  MatrixX<T> m(rows, cols);
  for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<T>(normal(rng));
  return m;
}

// Checks every entry of `value` (or `max_entries` of them spread evenly) against `analytic`.
// `loss` recomputes the scalar loss from the current contents of `value`.
template <class T>
void expect_gradient(const std::string& what, MatrixX<T>& value, const MatrixX<T>& analytic,
                     const std::function<double()>& loss, double h, double tolerance,
                     Eigen::Index max_entries = 200) {
  ASSERT_EQ(value.rows(), analytic.rows()) << what;
  ASSERT_EQ(value.cols(), analytic.cols()) << what;
  const Eigen::Index n = value.size();
  const Eigen::Index stride = std::max<Eigen::Index>(1, n / max_entries);
  double worst = 0.0;
  for (Eigen::Index i = 0; i < n; i += stride) {
    const T saved = value.data()[i];
    value.data()[i] = static_cast<T>(saved + h);
    const double plus = loss();
    value.data()[i] = static_cast<T>(saved - h);
    const double minus = loss();
    value.data()[i] = saved;
    const double numeric = (plus - minus) / (2.0 * h);
    const double exact = static_cast<double>(analytic.data()[i]);
    const double error =
        std::abs(numeric - exact) / std::max(1.0, std::abs(numeric) + std::abs(exact));
    worst = std::max(worst, error);
    EXPECT_LE(error, tolerance) << what << " entry " << i << ": numeric " << numeric
                                << ", analytic " << exact;
    if (error > tolerance) return;  // one report per tensor is enough
  }
  EXPECT_GT(analytic.cwiseAbs().maxCoeff(), T(0)) << what << ": gradient is identically zero";
  ::testing::Test::RecordProperty(what, std::to_string(worst));
}

// Loss used for layer checks: L(y) = sum(y .* r) for a fixed random r, so dL/dy = r.
template <class T>
double weighted_sum(const MatrixX<T>& y, const MatrixX<T>& r) {
  return y.template cast<double>().cwiseProduct(r.template cast<double>()).sum();
}

}  // namespace switch_lm::testing
