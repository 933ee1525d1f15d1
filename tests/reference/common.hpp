// What every double-precision reference (tests/reference/) and the tests that compare against
// them share: the matrix types, conversion to double, the largest elementwise difference, seeded
// uniform fills and central finite differences. Like the references themselves, it includes no
// switchmoe header: the helpers are templates that use only Eigen's accessors.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <functional>
#include <initializer_list>
#include <limits>
#include <random>

namespace switchmoe_test::ref {

using MatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MatI = Eigen::Matrix<int, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// [rows, cols] matrices written out by hand, values in row-major order.
inline MatD make_double(int rows, int cols, std::initializer_list<double> values) {
  MatD m(rows, cols);
  auto it = values.begin();
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) m(r, c) = *it++;
  return m;
}

inline MatI make_int(int rows, int cols, std::initializer_list<int> values) {
  MatI m(rows, cols);
  auto it = values.begin();
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) m(r, c) = *it++;
  return m;
}

// Any Eigen matrix (float, bfloat16, double) as a row-major double matrix.
template <class Derived>
MatD to_double(const Eigen::MatrixBase<Derived>& m) {
  return m.template cast<double>();
}

// max |a - b| over all elements, in double (plain loop); infinity when the shapes differ.
template <class A, class B>
double max_abs_diff(const A& a, const B& b) {
  if (a.rows() != b.rows() || a.cols() != b.cols()) return std::numeric_limits<double>::infinity();
  double m = 0.0;
  for (Eigen::Index r = 0; r < a.rows(); ++r)
    for (Eigen::Index c = 0; c < a.cols(); ++c)
      m = std::max(m, std::abs(static_cast<double>(a(r, c)) - static_cast<double>(b(r, c))));
  return m;
}

// Uniform values in [lo, hi) from a fixed-seed generator, in row-major order.
template <class MatrixT>
void fill_uniform(MatrixT& m, std::mt19937& gen, double lo, double hi) {
  std::uniform_real_distribution<double> dist(lo, hi);
  for (int r = 0; r < m.rows(); ++r)
    for (int c = 0; c < m.cols(); ++c) m(r, c) = static_cast<typename MatrixT::Scalar>(dist(gen));
}

// Central finite differences (f(x + h) - f(x - h)) / 2h of a scalar function of a matrix, one
// entry at a time; the oracle for every analytic gradient of the references.
inline MatD finite_difference(const std::function<double(const MatD&)>& f, const MatD& at,
                              double h = 1e-6) {
  MatD grad(at.rows(), at.cols());
  MatD x = at;
  for (Eigen::Index r = 0; r < at.rows(); ++r) {
    for (Eigen::Index c = 0; c < at.cols(); ++c) {
      const double saved = x(r, c);
      x(r, c) = saved + h;
      const double up = f(x);
      x(r, c) = saved - h;
      const double down = f(x);
      x(r, c) = saved;
      grad(r, c) = (up - down) / (2.0 * h);
    }
  }
  return grad;
}

}  // namespace switchmoe_test::ref
