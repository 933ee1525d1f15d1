#pragma once
// Token embedding (a table lookup) and learned positional embedding.

#include <stdexcept>
#include <string>
#include <vector>

#include "tensor.hpp"

namespace switch_lm {

template <class T>
class TokenEmbedding {
 public:
  TokenEmbedding(int vocab, int features, double init_std, std::mt19937_64& rng)
      : table_(vocab, features), grad_table_(MatrixX<T>::Zero(vocab, features)) {
    init_truncated_normal(table_, init_std, rng);
  }

  // tokens: [tokens] ids in [0, vocab) -> [tokens, features].
  MatrixX<T> forward(const std::vector<int>& tokens) {
    tokens_ = tokens;
    MatrixX<T> y(static_cast<Eigen::Index>(tokens.size()), table_.cols());
    for (std::size_t t = 0; t < tokens.size(); ++t) {
      if (tokens[t] < 0 || tokens[t] >= table_.rows())
        throw std::invalid_argument("TokenEmbedding: token id " + std::to_string(tokens[t]) +
                                    " outside [0, " + std::to_string(table_.rows()) + ")");
      y.row(static_cast<Eigen::Index>(t)) = table_.row(tokens[t]);
    }
    return y;
  }

  // Scatter-add of dy rows into the rows of the looked-up tokens (serial: deterministic order).
  void backward(const MatrixX<T>& dy) {
    for (std::size_t t = 0; t < tokens_.size(); ++t)
      grad_table_.row(tokens_[t]) += dy.row(static_cast<Eigen::Index>(t));
  }

  void parameters(ParamList<T>& out, const std::string& prefix) {
    out.push_back({prefix + "token_embedding", &table_, &grad_table_, false});
  }

 private:
  MatrixX<T> table_, grad_table_;  // [vocab, features]
  std::vector<int> tokens_;
};

template <class T>
class PositionalEmbedding {
 public:
  PositionalEmbedding(int context, int features, double init_std, std::mt19937_64& rng)
      : table_(context, features), grad_table_(MatrixX<T>::Zero(context, features)) {
    init_truncated_normal(table_, init_std, rng);
  }

  // Returns [batch * seq, features] with row b*seq + p = table[p].
  MatrixX<T> forward(int batch, int seq) {
    if (seq > table_.rows())
      throw std::invalid_argument("PositionalEmbedding: sequence length " + std::to_string(seq) +
                                  " exceeds the context " + std::to_string(table_.rows()));
    batch_ = batch;
    seq_ = seq;
    MatrixX<T> y(static_cast<Eigen::Index>(batch) * seq, table_.cols());
    for (int b = 0; b < batch; ++b)
      y.middleRows(static_cast<Eigen::Index>(b) * seq, seq) = table_.topRows(seq);
    return y;
  }

  void backward(const MatrixX<T>& dy) {
    for (int b = 0; b < batch_; ++b)
      grad_table_.topRows(seq_) += dy.middleRows(static_cast<Eigen::Index>(b) * seq_, seq_);
  }

  void parameters(ParamList<T>& out, const std::string& prefix) {
    out.push_back({prefix + "position_embedding", &table_, &grad_table_, false});
  }

 private:
  MatrixX<T> table_, grad_table_;  // [context, features]
  int batch_ = 0, seq_ = 0;
};

}  // namespace switch_lm
