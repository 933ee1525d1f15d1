#pragma once
// A plain two-layer ReLU MLP in any scalar type. It has the feed-forward interface the blocks
// expect (forward(x, mode), backward, parameters, zero_grad, aux_loss), so blocks and whole models
// can be gradient-checked in double precision without the float-only library layers.

#include <string>
#include <switchmoe/core/types.hpp>

#include "linear.hpp"
#include "tensor.hpp"

namespace switch_lm {

template <class T>
class Mlp {
 public:
  Mlp(int features, int hidden, double init_std, std::mt19937_64& rng)
      : in_("w_in", features, hidden, true, init_std, rng),
        out_("w_out", hidden, features, true, init_std, rng) {}

  // x: [tokens, features] -> [tokens, features]
  MatrixX<T> forward(const MatrixX<T>& x, switchmoe::Mode /*mode*/) {
    hidden_ = in_.forward(x).cwiseMax(T(0));
    return out_.forward(hidden_);
  }

  MatrixX<T> backward(const MatrixX<T>& dy) {
    const MatrixX<T> d_hidden =
        out_.backward(dy).cwiseProduct((hidden_.array() > T(0)).template cast<T>().matrix());
    return in_.backward(d_hidden);
  }

  void parameters(ParamList<T>& out, const std::string& prefix) {
    in_.parameters(out, prefix + "mlp.");
    out_.parameters(out, prefix + "mlp.");
  }

  void zero_grad() {
    ParamList<T> params;
    parameters(params, "");
    for (auto& p : params) p.grad->setZero();
  }

  double aux_loss() const { return 0.0; }

 private:
  Linear<T> in_, out_;
  MatrixX<T> hidden_;  // [tokens, hidden] after ReLU
};

}  // namespace switch_lm
