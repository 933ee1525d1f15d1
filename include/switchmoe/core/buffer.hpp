#pragma once
// Grow-only storage for per-call activations. The number of rows a layer processes changes from
// call to call (kept tokens depend on the routing), and an Eigen::Matrix reallocates whenever its
// size changes; a RowBuffer keeps its memory and hands out row-major [rows, cols] views of it, so
// calls allocate only when a size exceeds every earlier one (or what reserve() asked for).

#include <Eigen/Core>
#include <cstddef>
#include <cstdlib>
#include <memory>
#include <new>
#include <type_traits>

#include "switchmoe/core/types.hpp"

namespace switchmoe {
namespace detail {

template <class T>
class RowBuffer {
  static_assert(std::is_trivially_copyable_v<T>, "RowBuffer holds plain numbers only.");

 public:
  using View = Eigen::Map<Matrix<T>, Eigen::Aligned64>;
  using ConstView = Eigen::Map<const Matrix<T>, Eigen::Aligned64>;

  /// Makes room for `elements` elements without changing the view's shape.
  void reserve(Eigen::Index elements) {
    if (elements <= capacity_) return;
    Eigen::internal::check_that_malloc_is_allowed();  // visible to EIGEN_RUNTIME_NO_MALLOC
    const std::size_t bytes = (static_cast<std::size_t>(elements) * sizeof(T) + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, bytes);
    if (p == nullptr) throw std::bad_alloc();
    data_.reset(static_cast<T*>(p));
    capacity_ = elements;
  }

  /// Reshapes to [rows, cols]; the contents are unspecified afterwards.
  View resize(Eigen::Index rows, Eigen::Index cols) {
    reserve(rows * cols);
    rows_ = rows;
    cols_ = cols;
    return view();
  }

  View view() { return View(data_.get(), rows_, cols_); }
  ConstView view() const { return ConstView(data_.get(), rows_, cols_); }
  T* data() { return data_.get(); }
  const T* data() const { return data_.get(); }
  Eigen::Index rows() const { return rows_; }
  Eigen::Index cols() const { return cols_; }
  Eigen::Index size() const { return rows_ * cols_; }

 private:
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> data_;
  Eigen::Index capacity_ = 0;
  Eigen::Index rows_ = 0, cols_ = 0;
};

}  // namespace detail
}  // namespace switchmoe
