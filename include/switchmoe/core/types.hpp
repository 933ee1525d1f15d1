#pragma once
// Basic vocabulary of switchmoe: the matrix type, the train/eval mode and argument checks.

#include <Eigen/Core>
#include <atomic>
#include <cmath>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

#include "switchmoe/core/parallel.hpp"

namespace switchmoe {

/// Row-major dynamic matrix; every activation is one token per row.
template <class T>
using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Training enables jitter, expert dropout and the training capacity factor (SEMANTICS 3, 6, 12).
enum class Mode { kTrain, kEval };

inline const char* to_string(Mode mode) { return mode == Mode::kTrain ? "kTrain" : "kEval"; }

namespace detail {

/// Throws std::invalid_argument built from the streamed pieces.
template <class... Pieces>
[[noreturn]] void fail(const Pieces&... pieces) {
  std::ostringstream message;
  message << "switchmoe: ";
  (message << ... << pieces);
  throw std::invalid_argument(message.str());
}

/// Rejects a Mode that is not one of the enumerators (e.g. cast from an integer).
inline void check_mode(Mode mode) {
  if (mode != Mode::kTrain && mode != Mode::kEval) {
    fail("mode is ", static_cast<int>(mode), ", expected Mode::kTrain or Mode::kEval");
  }
}

/// Checks that `matrix` is [rows, cols]; a negative expectation means "any".
template <class Derived>
void check_shape(const char* name, const Eigen::DenseBase<Derived>& matrix, Eigen::Index rows,
                 Eigen::Index cols) {
  if ((rows >= 0 && matrix.rows() != rows) || (cols >= 0 && matrix.cols() != cols)) {
    fail(name, " has shape [", matrix.rows(), ", ", matrix.cols(), "], expected [",
         rows >= 0 ? std::to_string(rows) : std::string("any"), ", ",
         cols >= 0 ? std::to_string(cols) : std::string("any"), "]");
  }
}

/// Throws naming the first non-finite element of `matrix` (row-major order). The scan runs in
/// parallel over rows: x - x is 0 for finite x and NaN for an infinity or a NaN, so one
/// vectorized sum per row decides.
template <class Derived>
void check_finite(const char* name, const Eigen::DenseBase<Derived>& matrix) {
  const Derived& m = matrix.derived();
  std::atomic<bool> bad{false};
  parallel_for(m.rows(), m.cols(), [&](Eigen::Index r) {
    if (!((m.row(r).array() - m.row(r).array()).sum() == 0)) bad.store(true);
  });
  if (!bad.load()) return;
  for (Eigen::Index r = 0; r < m.rows(); ++r) {
    for (Eigen::Index c = 0; c < m.cols(); ++c) {
      if (!std::isfinite(static_cast<double>(m(r, c)))) {
        fail(name, "(", r, ", ", c, ") is ", static_cast<double>(m(r, c)),
             ", expected a finite value");
      }
    }
  }
}

}  // namespace detail
}  // namespace switchmoe
