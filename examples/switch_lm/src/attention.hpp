#pragma once
// Causal multi-head self-attention: qkv = x Wqkv, per (sequence, head) softmax(q k^T / sqrt(dh) +
// causal mask) v, then an output projection. Heads of all sequences run in parallel with OpenMP;
// each (sequence, head) pair is computed by one thread, so results do not depend on the schedule.

#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "linear.hpp"
#include "tensor.hpp"

namespace switch_lm {

template <class T>
class CausalSelfAttention {
 public:
  // out_init_std: std of the output projection (GPT-2 scales it down with depth).
  CausalSelfAttention(int features, int heads, double init_std, double out_init_std,
                      std::mt19937_64& rng)
      : features_(features),
        heads_(heads),
        qkv_("qkv", features, 3 * features, true, init_std, rng),
        out_("out", features, features, true, out_init_std, rng) {
    if (heads <= 0 || features % heads != 0)
      throw std::invalid_argument(
          "CausalSelfAttention: heads = " + std::to_string(heads) +
          " must be positive and divide d_model = " + std::to_string(features));
  }

  // x: [batch * seq, features], rows of one sequence contiguous -> [batch * seq, features].
  MatrixX<T> forward(const MatrixX<T>& x, int batch, int seq) {
    batch_ = batch;
    seq_ = seq;
    qkv_cache_ = qkv_.forward(x);  // [tokens, 3 * features]: q | k | v, head h at columns h*dh
    const int dh = features_ / heads_;
    const T scale = T(1) / std::sqrt(static_cast<T>(dh));
    probs_.resize(static_cast<std::size_t>(batch) * heads_);
    MatrixX<T> context(x.rows(), features_);  // [tokens, features]
#pragma omp parallel for schedule(static)
    for (int bh = 0; bh < batch * heads_; ++bh) {
      const int b = bh / heads_, h = bh % heads_;
      const Eigen::Index row = static_cast<Eigen::Index>(b) * seq;
      const auto q = qkv_cache_.block(row, h * dh, seq, dh);
      const auto k = qkv_cache_.block(row, features_ + h * dh, seq, dh);
      const auto v = qkv_cache_.block(row, 2 * features_ + h * dh, seq, dh);
      MatrixX<T>& p = probs_[bh];  // [seq, seq]
      p.resize(seq, seq);
      p.noalias() = q * k.transpose();
      for (int i = 0; i < seq; ++i) {
        // Causal mask: position i attends to positions 0..i only.
        const T max = (p.row(i).head(i + 1) * scale).maxCoeff();
        T sum = 0;
        for (int j = 0; j <= i; ++j) {
          const T e = std::exp(p(i, j) * scale - max);
          p(i, j) = e;
          sum += e;
        }
        p.row(i).head(i + 1) /= sum;
        p.row(i).tail(seq - i - 1).setZero();
      }
      context.block(row, h * dh, seq, dh).noalias() = p * v;
    }
    return out_.forward(context);
  }

  MatrixX<T> backward(const MatrixX<T>& dy) {
    const MatrixX<T> d_context = out_.backward(dy);  // [tokens, features]
    const int dh = features_ / heads_;
    const int seq = seq_;
    const T scale = T(1) / std::sqrt(static_cast<T>(dh));
    MatrixX<T> d_qkv(d_context.rows(), 3 * features_);  // [tokens, 3 * features]
#pragma omp parallel for schedule(static)
    for (int bh = 0; bh < batch_ * heads_; ++bh) {
      const int b = bh / heads_, h = bh % heads_;
      const Eigen::Index row = static_cast<Eigen::Index>(b) * seq;
      const auto q = qkv_cache_.block(row, h * dh, seq, dh);
      const auto k = qkv_cache_.block(row, features_ + h * dh, seq, dh);
      const auto v = qkv_cache_.block(row, 2 * features_ + h * dh, seq, dh);
      const auto d_out = d_context.block(row, h * dh, seq, dh);
      const MatrixX<T>& p = probs_[bh];
      MatrixX<T> dp(seq, seq);  // [seq, seq]
      dp.noalias() = d_out * v.transpose();
      d_qkv.block(row, 2 * features_ + h * dh, seq, dh).noalias() = p.transpose() * d_out;
      // Softmax backward: ds = p * (dp - sum_j p dp); masked entries have p = 0.
      const Eigen::Matrix<T, Eigen::Dynamic, 1> row_dot = p.cwiseProduct(dp).rowwise().sum();
      MatrixX<T> ds = p.cwiseProduct(dp.colwise() - row_dot) * scale;  // [seq, seq]
      d_qkv.block(row, h * dh, seq, dh).noalias() = ds * k;
      d_qkv.block(row, features_ + h * dh, seq, dh).noalias() = ds.transpose() * q;
    }
    return qkv_.backward(d_qkv);
  }

  void parameters(ParamList<T>& out, const std::string& prefix) {
    qkv_.parameters(out, prefix + "attention.");
    out_.parameters(out, prefix + "attention.");
  }

 private:
  int features_, heads_;
  Linear<T> qkv_, out_;
  int batch_ = 0, seq_ = 0;
  MatrixX<T> qkv_cache_;           // [tokens, 3 * features]
  std::vector<MatrixX<T>> probs_;  // per (sequence, head): [seq, seq] attention probabilities
};

}  // namespace switch_lm
