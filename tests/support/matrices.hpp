#pragma once
// Helpers shared by the tests that compare two ways of computing the same result: random
// inputs, and bitwise comparison of whole matrices.

#include <gtest/gtest.h>

#include <Eigen/Core>
#include <cstring>
#include <random>

#include "switchmoe/core/types.hpp"

namespace switchmoe_test {

/// [rows, cols] of N(0, scale^2) draws, filled in row-major order from `seed`.
inline switchmoe::Matrix<float> random_matrix(Eigen::Index rows, Eigen::Index cols, unsigned seed,
                                              float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, scale);
  switchmoe::Matrix<float> m(rows, cols);
  for (Eigen::Index r = 0; r < rows; ++r) {
    for (Eigen::Index c = 0; c < cols; ++c) m(r, c) = normal(rng);
  }
  return m;
}

/// Same shape and the same bits in every element (so -0 differs from 0, and a NaN matches
/// only the same NaN).
template <class Derived, class OtherDerived>
::testing::AssertionResult SameBits(const Eigen::DenseBase<Derived>& got,
                                    const Eigen::DenseBase<OtherDerived>& want) {
  if (got.rows() != want.rows() || got.cols() != want.cols()) {
    return ::testing::AssertionFailure()
           << "shape [" << got.rows() << ", " << got.cols() << "], expected [" << want.rows()
           << ", " << want.cols() << "]";
  }
  for (Eigen::Index r = 0; r < got.rows(); ++r) {
    for (Eigen::Index c = 0; c < got.cols(); ++c) {
      const auto a = got(r, c);
      const auto b = want(r, c);
      if (std::memcmp(&a, &b, sizeof(a)) != 0) {
        return ::testing::AssertionFailure()
               << "element (" << r << ", " << c << ") is " << a << ", expected " << b;
      }
    }
  }
  return ::testing::AssertionSuccess();
}

}  // namespace switchmoe_test
