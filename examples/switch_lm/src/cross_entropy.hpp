#pragma once
// Softmax cross-entropy over the vocabulary, mean over tokens, in nats.
// With a teacher (distillation, paper section 4.2) the target distribution is the mixture
// (1 - teacher_weight) * one_hot(target) + teacher_weight * teacher_probs; cross-entropy is linear
// in the target, so this is exactly the mixed hard/soft loss, and its gradient is (p - target) / N.

#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "tensor.hpp"

namespace switch_lm {

template <class T>
struct CrossEntropyResult {
  double loss = 0.0;       // mean mixed loss, nats
  double hard_loss = 0.0;  // mean cross-entropy against the labels alone, nats
  MatrixX<T> d_logits;     // [tokens, vocab]: gradient of `loss` (empty if not requested)
};

// logits: [tokens, vocab]; targets: [tokens]; teacher_probs: [tokens, vocab] or nullptr.
template <class T>
CrossEntropyResult<T> softmax_cross_entropy(const MatrixX<T>& logits,
                                            const std::vector<int>& targets, bool with_gradient,
                                            const MatrixX<T>* teacher_probs = nullptr,
                                            double teacher_weight = 0.0) {
  const Eigen::Index n = logits.rows(), v = logits.cols();
  if (static_cast<Eigen::Index>(targets.size()) != n)
    throw std::invalid_argument("softmax_cross_entropy: targets has " +
                                std::to_string(targets.size()) + " entries, expected " +
                                std::to_string(n));
  CrossEntropyResult<T> result;
  if (with_gradient) result.d_logits.resize(n, v);
  const double w_soft = teacher_probs ? teacher_weight : 0.0;
  double total = 0.0, total_hard = 0.0;
  Eigen::Matrix<T, 1, Eigen::Dynamic> log_p(v);
  for (Eigen::Index t = 0; t < n; ++t) {
    const T max = logits.row(t).maxCoeff();
    const T log_sum = max + std::log((logits.row(t).array() - max).exp().sum());
    log_p = logits.row(t).array() - log_sum;
    const double hard = -static_cast<double>(log_p[targets[t]]);
    double soft = 0.0;
    if (w_soft > 0.0) soft = -static_cast<double>(teacher_probs->row(t).dot(log_p));
    total_hard += hard;
    total += (1.0 - w_soft) * hard + w_soft * soft;
    if (with_gradient) {
      auto g = result.d_logits.row(t);
      g = log_p.array().exp();
      if (w_soft > 0.0) g -= static_cast<T>(w_soft) * teacher_probs->row(t);
      g[targets[t]] -= static_cast<T>(1.0 - w_soft);
      g /= static_cast<T>(n);
    }
  }
  result.loss = total / static_cast<double>(n);
  result.hard_loss = total_hard / static_cast<double>(n);
  return result;
}

// Row-wise softmax: [tokens, vocab] -> probabilities.
template <class T>
MatrixX<T> softmax_rows(const MatrixX<T>& logits) {
  MatrixX<T> p(logits.rows(), logits.cols());
  for (Eigen::Index t = 0; t < logits.rows(); ++t) {
    const T max = logits.row(t).maxCoeff();
    p.row(t) = (logits.row(t).array() - max).exp();
    p.row(t) /= p.row(t).sum();
  }
  return p;
}

}  // namespace switch_lm
