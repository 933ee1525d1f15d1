#pragma once
// Linear map y = x W (+ b), with backward.

#include <string>

#include "tensor.hpp"

namespace switch_lm {

template <class T>
class Linear {
 public:
  Linear(std::string name, int in_features, int out_features, bool bias, double init_std,
         std::mt19937_64& rng)
      : name_(std::move(name)),
        weight_(in_features, out_features),
        grad_weight_(MatrixX<T>::Zero(in_features, out_features)),
        has_bias_(bias) {
    init_truncated_normal(weight_, init_std, rng);
    if (has_bias_) {
      bias_ = MatrixX<T>::Zero(1, out_features);
      grad_bias_ = MatrixX<T>::Zero(1, out_features);
    }
  }

  // x: [tokens, in] -> [tokens, out]. Keeps x for backward.
  MatrixX<T> forward(const MatrixX<T>& x) {
    input_ = x;
    MatrixX<T> y(x.rows(), weight_.cols());  // [tokens, out]
    y.noalias() = x * weight_;
    if (has_bias_) y.rowwise() += bias_.row(0);
    return y;
  }

  // dy: [tokens, out] -> dx [tokens, in]; accumulates dW = x^T dy, db = sum_rows dy.
  MatrixX<T> backward(const MatrixX<T>& dy) {
    grad_weight_.noalias() += input_.transpose() * dy;
    if (has_bias_) grad_bias_.row(0) += dy.colwise().sum();
    MatrixX<T> dx(dy.rows(), weight_.rows());  // [tokens, in]
    dx.noalias() = dy * weight_.transpose();
    return dx;
  }

  void parameters(ParamList<T>& out, const std::string& prefix) {
    out.push_back({prefix + name_ + ".weight", &weight_, &grad_weight_, true});
    if (has_bias_) out.push_back({prefix + name_ + ".bias", &bias_, &grad_bias_, false});
  }

  MatrixX<T>& weight() { return weight_; }

 private:
  std::string name_;
  MatrixX<T> weight_, grad_weight_;  // [in, out]
  bool has_bias_;
  MatrixX<T> bias_, grad_bias_;  // [1, out]
  MatrixX<T> input_;             // [tokens, in]
};

}  // namespace switch_lm
