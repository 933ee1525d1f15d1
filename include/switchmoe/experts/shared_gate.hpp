#pragma once
// The per-token weight of the shared expert's output (SEMANTICS 16): y[t] = routed[t] + s[t] *
// Shared(x[t]), with s[t] = 1 (DeepSeekMoE) or s[t] = sigmoid(x[t] . w_s) for a learned w_s
// [d_model, 1] (Qwen2-MoE). SharedExpertGate owns w_s and computes s, the weighted sum and their
// adjoints; the shared FFN itself is part of the expert bank (expert_ffn.hpp).

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "switchmoe/core/buffer.hpp"
#include "switchmoe/core/init.hpp"
#include "switchmoe/core/parallel.hpp"
#include "switchmoe/core/parameter.hpp"
#include "switchmoe/core/types.hpp"

namespace switchmoe {

class SharedExpertGate {
 public:
  /// `learned` false: s = 1 and no parameter. w_s is initialized as rule 11 says.
  SharedExpertGate(int d_model, bool learned, float init_scale, std::uint64_t seed)
      : learned_(learned),
        d_model_(d_model),
        weight_(learned ? d_model : 0, 1),
        grad_weight_(Matrix<float>::Zero(learned ? d_model : 0, 1)) {
    if (learned) truncated_normal_init(weight_, init_scale, d_model, seed, kSubstream);
  }

  bool learned() const { return learned_; }
  Matrix<float>& weight() { return weight_; }  // [d_model, 1]
  Matrix<float>& grad_weight() { return grad_weight_; }
  /// Zeroes the gradient, restoring its configured shape if a caller resized it.
  void zero_grad() { grad_weight_.setZero(learned_ ? d_model_ : 0, 1); }

  /// prefix + "gate_weight" (owner kShared), if learned.
  void append_parameters(const std::string& prefix, std::vector<ParameterRef>& out) {
    if (!learned_) return;
    out.push_back({prefix + "gate_weight", &weight_, &grad_weight_, ParameterRole::kWeight,
                   ParameterOwner::kShared, -1});
  }

  void check_parameter_shapes(int d_model) const {
    if (!learned_) return;
    detail::check_shape("shared_gate_weight", weight_, d_model, 1);
    detail::check_shape("grad_shared_gate_weight", grad_weight_, d_model, 1);
  }

  void reserve(Eigen::Index tokens, int d_model) {
    scale_.reserve(static_cast<std::size_t>(tokens));
    dpre_.reserve(static_cast<std::size_t>(tokens));
    if (learned_) x_.reserve(tokens * d_model);
  }

  /// y [tokens, d_model] += s[t] * ys [tokens, d_model]; s from x [tokens, d_model]. In
  /// training, s (and x, for a learned gate) are kept for backward.
  void forward(const Eigen::Ref<const Matrix<float>>& x, const Eigen::Ref<const Matrix<float>>& ys,
               Mode mode, Eigen::Ref<Matrix<float>> y) {
    const Eigen::Index tokens = x.rows();
    if (learned_ && mode == Mode::kTrain) x_.resize(tokens, x.cols()) = x;
    scale_.resize(static_cast<std::size_t>(tokens));
    detail::parallel_for(tokens, x.cols(), [&](Eigen::Index t) {
      float s = 1.0f;
      if (learned_) s = 1.0f / (1.0f + std::exp(-x.row(t).dot(weight_.col(0).transpose())));
      scale_[t] = s;
      if (learned_) {
        y.row(t) += s * ys.row(t);
      } else {
        y.row(t) += ys.row(t);
      }
    });
  }

  /// From dy [tokens, d_model] of the weighted sum: dys = s * dy (the shared FFN's output
  /// gradient, into `dys`); with a learned gate, ds = dy . ys, d(x . w_s) = ds * s (1 - s),
  /// accumulated into the gradient of w_s and added to dx [tokens, d_model].
  void backward_scale(const Eigen::Ref<const Matrix<float>>& dy,
                      const Eigen::Ref<const Matrix<float>>& ys, Eigen::Ref<Matrix<float>> dys) {
    const Eigen::Index tokens = dy.rows();
    dpre_.resize(static_cast<std::size_t>(tokens));
    detail::parallel_for(tokens, dy.cols(), [&](Eigen::Index t) {
      const float s = scale_[t];
      dys.row(t) = s * dy.row(t);
      dpre_[t] = learned_ ? dy.row(t).dot(ys.row(t)) * s * (1.0f - s) : 0.0f;
    });
  }

  /// The learned gate's part of the input gradient and its weight gradient, after
  /// backward_scale: dx += dpre * w_s^T, grad w_s += x^T dpre (x of the training forward).
  void backward_input(Eigen::Ref<Matrix<float>> dx) {
    if (!learned_) return;
    const auto x = x_.view();
    const Eigen::Index tokens = x.rows();
    detail::parallel_for(tokens, x.cols(), [&](Eigen::Index t) {
      dx.row(t) += dpre_[t] * weight_.col(0).transpose();
    });
    for (Eigen::Index t = 0; t < tokens; ++t)
      grad_weight_.col(0) += dpre_[t] * x.row(t).transpose();
  }

 private:
  static constexpr std::uint64_t kSubstream = std::uint64_t{1} << 42;  // apart from the experts'

  bool learned_ = false;
  int d_model_ = 0;
  detail::RowBuffer<float> x_;  // [tokens, d_model] input of the last training forward
  Matrix<float> weight_;        // [d_model, 1] w_s
  Matrix<float> grad_weight_;   // [d_model, 1]
  std::vector<float> scale_;    // [tokens] s of the last forward
  std::vector<float> dpre_;     // [tokens] d loss / d(x . w_s)
};

}  // namespace switchmoe
