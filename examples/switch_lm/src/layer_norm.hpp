#pragma once
// LayerNorm over the feature dimension: y = (x - mean) / sqrt(var + eps) * gamma + beta.

#include <string>

#include "tensor.hpp"

namespace switch_lm {

template <class T>
class LayerNorm {
 public:
  LayerNorm(std::string name, int features, T eps = T(1e-5))
      : name_(std::move(name)),
        gamma_(MatrixX<T>::Ones(1, features)),
        beta_(MatrixX<T>::Zero(1, features)),
        grad_gamma_(MatrixX<T>::Zero(1, features)),
        grad_beta_(MatrixX<T>::Zero(1, features)),
        eps_(eps) {}

  // x: [tokens, features] -> [tokens, features]. Keeps the normalized input and 1/std for backward.
  MatrixX<T> forward(const MatrixX<T>& x) {
    const Eigen::Index n = x.rows(), d = x.cols();
    normalized_.resize(n, d);
    inv_std_.resize(n);
    MatrixX<T> y(n, d);
    for (Eigen::Index t = 0; t < n; ++t) {
      const T mean = x.row(t).mean();
      const T var = (x.row(t).array() - mean).square().mean();
      const T inv_std = T(1) / std::sqrt(var + eps_);
      inv_std_[t] = inv_std;
      normalized_.row(t) = (x.row(t).array() - mean) * inv_std;
      y.row(t) = normalized_.row(t).cwiseProduct(gamma_.row(0)) + beta_.row(0);
    }
    return y;
  }

  // dx = inv_std * (g - mean(g) - xhat * mean(g * xhat)), g = dy * gamma.
  MatrixX<T> backward(const MatrixX<T>& dy) {
    const Eigen::Index n = dy.rows(), d = dy.cols();
    grad_gamma_.row(0) += dy.cwiseProduct(normalized_).colwise().sum();
    grad_beta_.row(0) += dy.colwise().sum();
    MatrixX<T> dx(n, d);
    for (Eigen::Index t = 0; t < n; ++t) {
      const Eigen::Matrix<T, 1, Eigen::Dynamic> g = dy.row(t).cwiseProduct(gamma_.row(0));
      const T mean_g = g.mean();
      const T mean_gx = g.cwiseProduct(normalized_.row(t)).mean();
      dx.row(t) = (g.array() - mean_g - normalized_.row(t).array() * mean_gx) * inv_std_[t];
    }
    return dx;
  }

  void parameters(ParamList<T>& out, const std::string& prefix) {
    out.push_back({prefix + name_ + ".gamma", &gamma_, &grad_gamma_, false});
    out.push_back({prefix + name_ + ".beta", &beta_, &grad_beta_, false});
  }

 private:
  std::string name_;
  MatrixX<T> gamma_, beta_, grad_gamma_, grad_beta_;  // [1, features]
  T eps_;
  MatrixX<T> normalized_;                        // [tokens, features]
  Eigen::Matrix<T, Eigen::Dynamic, 1> inv_std_;  // [tokens]
};

}  // namespace switch_lm
