#pragma once
// The dense feed-forward block a Switch layer replaces: y = act(x W_in + b_in) W_out + b_out,
// with the same activation, precision policy and initialization as one expert.

#include <cstdint>
#include <limits>
#include <vector>

#include "switchmoe/experts/activation.hpp"
#include "switchmoe/experts/expert_ffn.hpp"

namespace switchmoe {

struct DenseConfig {
  int d_model = 0, d_ff = 0;
  bool bias = false;
  float dropout = 0.0f;     // on the hidden activation, training only
  float init_scale = 0.1f;  // SEMANTICS 11
  std::uint64_t seed = 0;
};

template <class Policy = Fp32, class Activation = Relu>
class DenseFFN {
 public:
  using PolicyType = Policy;
  using ActivationType = Activation;

  explicit DenseFFN(const DenseConfig& config)
      : config_(config),
        ffn_(FeedForwardConfig{1, config.d_model, config.d_ff, config.bias, config.dropout,
                               config.init_scale, config.seed}) {}

  const DenseConfig& config() const { return config_; }
  Matrix<float>& w_in() { return ffn_.w_in(0); }    // [d_model, d_ff]
  Matrix<float>& w_out() { return ffn_.w_out(0); }  // [d_ff, d_model]
  Matrix<float>& b_in() { return ffn_.b_in(0); }    // [1, d_ff] or empty
  Matrix<float>& b_out() { return ffn_.b_out(0); }  // [1, d_model] or empty
  Matrix<float>& grad_w_in() { return ffn_.grad_w_in(0); }
  Matrix<float>& grad_w_out() { return ffn_.grad_w_out(0); }
  Matrix<float>& grad_b_in() { return ffn_.grad_b_in(0); }
  Matrix<float>& grad_b_out() { return ffn_.grad_b_out(0); }
  // Gated activations (SwiGlu, GeGlu; SEMANTICS 15) only; otherwise they throw.
  Matrix<float>& w_gate() { return ffn_.w_gate(0); }  // [d_model, d_ff]
  Matrix<float>& b_gate() { return ffn_.b_gate(0); }  // [1, d_ff] or empty
  Matrix<float>& grad_w_gate() { return ffn_.grad_w_gate(0); }
  Matrix<float>& grad_b_gate() { return ffn_.grad_b_gate(0); }

  /// The dropout stream's position (FeedForwardBank::dropout_calls): kept by checkpoints that
  /// resume training exactly.
  std::uint64_t dropout_calls() const { return ffn_.dropout_calls(); }
  void set_dropout_calls(std::uint64_t calls) { ffn_.set_dropout_calls(calls); }

  /// ["w_gate", ["b_gate"],] "w_in", ["b_in"], "w_out", ["b_out"].
  std::vector<ParameterRef> parameters() {
    std::vector<ParameterRef> out;
    ffn_.append_parameters("", true, out);
    return out;
  }
  void zero_grad() { ffn_.zero_grad(); }
  void sync_weights() { ffn_.sync_weights(); }

  /// x [tokens, d_model] -> y [tokens, d_model].
  Matrix<float> forward(const Eigen::Ref<const Matrix<float>>& x, Mode mode = Mode::kEval) {
    Matrix<float> y;
    forward(x, mode, y);
    return y;
  }

  /// As above, into y (resized; no allocation once the layer and y have seen as many tokens).
  /// On a throw the layer is as before the call (a following backward raises).
  void forward(const Eigen::Ref<const Matrix<float>>& x, Mode mode, Matrix<float>& y) {
    has_forward_ = false;
    detail::check_mode(mode);
    detail::check_shape("x", x, -1, config_.d_model);
    detail::check_finite("x", x);
    if (x.rows() > std::numeric_limits<int>::max()) {
      detail::fail("x has ", x.rows(), " rows, expected at most ", std::numeric_limits<int>::max());
    }
    x_ = x.template cast<typename Policy::Element>();
    offsets_.assign({0, static_cast<int>(x.rows())});
    ffn_.forward(x_, offsets_, mode, {}, y);
    has_forward_ = mode == Mode::kTrain;
  }

  /// dy [tokens, d_model] -> dx [tokens, d_model], after forward(x, Mode::kTrain).
  Matrix<float> backward(const Eigen::Ref<const Matrix<float>>& dy) {
    Matrix<float> dx;
    backward(dy, dx);
    return dx;
  }

  /// As above, into dx.
  void backward(const Eigen::Ref<const Matrix<float>>& dy, Matrix<float>& dx) {
    if (!has_forward_) {
      detail::fail("DenseFFN::backward called without a preceding forward(x, Mode::kTrain)");
    }
    detail::check_shape("dy", dy, x_.rows(), config_.d_model);
    detail::check_finite("dy", dy);
    ffn_.backward(x_, offsets_, dy, dx);
  }

 private:
  DenseConfig config_;
  FeedForwardBank<Policy, Activation> ffn_;
  Matrix<typename Policy::Element> x_;  // [tokens, d_model] input of the last forward
  std::vector<int> offsets_;
  bool has_forward_ = false;
};

}  // namespace switchmoe
