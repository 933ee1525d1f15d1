// Double-precision, plain-loop reference of one feed-forward network: an expert of the Switch
// layer, or the dense FFN (SEMANTICS.md rules 1 and 12: act(x W_in + b_in) W_out + b_out, with
// expert dropout as a per-unit scale of the hidden activation). Written from the specification,
// not from the library: it includes no switchmoe header. Slow and obviously correct on purpose.
#pragma once

#include <Eigen/Core>
#include <cmath>
#include <vector>

#include "reference/common.hpp"

namespace switchmoe_test::ref {

enum class Act { kRelu, kGelu };

// ReLU, or the exact erf form of GELU: 0.5 * v * (1 + erf(v / sqrt(2))).
inline double activate(double v, Act act) {
  if (act == Act::kRelu) return v > 0.0 ? v : 0.0;
  return 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0)));
}

// Largest |activation'(v)| over all v: 1 for ReLU, 1.1289 for GELU (at v ~ 1.4142 * 1.0);
// used to propagate rounding errors through the activation in the precision bounds.
inline double activation_slope_bound(Act act) { return act == Act::kRelu ? 1.0 : 1.13; }

// One feed-forward network (an expert, or the dense FFN) in double precision.
struct Ffn {
  MatD w_in;   // [d_model, d_ff]
  MatD b_in;   // [1, d_ff], empty when the network has no bias
  MatD w_out;  // [d_ff, d_model]
  MatD b_out;  // [1, d_model], empty when the network has no bias
};

// Hidden pre-activation of one token: x[t] * w_in + b_in.  // [1, d_ff]
inline std::vector<double> ffn_pre_activation(const MatD& x, int t, const Ffn& f) {
  const int d_model = static_cast<int>(f.w_in.rows());
  const int d_ff = static_cast<int>(f.w_in.cols());
  std::vector<double> pre(d_ff, 0.0);
  for (int j = 0; j < d_ff; ++j) {
    double acc = f.b_in.size() ? f.b_in(0, j) : 0.0;
    for (int i = 0; i < d_model; ++i) acc += x(t, i) * f.w_in(i, j);
    pre[j] = acc;
  }
  return pre;
}

// FFN applied to row t of x: act(x w_in + b_in) .* hidden_scale * w_out + b_out. hidden_scale
// (optional, [tokens, d_ff]) models expert dropout: 0 for a dropped unit, 1/(1-p) for a kept one.
inline std::vector<double> ffn_row(const MatD& x, int t, const Ffn& f, Act act,
                                   const MatD* hidden_scale = nullptr) {
  const int d_model = static_cast<int>(f.w_out.cols());
  const int d_ff = static_cast<int>(f.w_out.rows());
  std::vector<double> hidden = ffn_pre_activation(x, t, f);
  for (int j = 0; j < d_ff; ++j) {
    hidden[j] = activate(hidden[j], act);
    if (hidden_scale) hidden[j] *= (*hidden_scale)(t, j);
  }
  std::vector<double> out(d_model, 0.0);
  for (int k = 0; k < d_model; ++k) {
    double acc = f.b_out.size() ? f.b_out(0, k) : 0.0;
    for (int j = 0; j < d_ff; ++j) acc += hidden[j] * f.w_out(j, k);
    out[k] = acc;
  }
  return out;
}

// Dense FFN over every token.  // [tokens, d_model]
inline MatD ffn(const MatD& x, const Ffn& f, Act act, const MatD* hidden_scale = nullptr) {
  MatD y = MatD::Zero(x.rows(), f.w_out.cols());
  for (int t = 0; t < x.rows(); ++t) {
    const std::vector<double> row = ffn_row(x, t, f, act, hidden_scale);
    for (int k = 0; k < y.cols(); ++k) y(t, k) = row[k];
  }
  return y;
}

// Expert e of a layer (w_in/b_in/w_out/b_out accessors by expert index) as a double reference
// FFN. A template, so this header needs no switchmoe header.
template <class Layer>
Ffn expert_of(Layer& layer, int e, bool bias) {
  Ffn f;
  f.w_in = to_double(layer.w_in(e));
  f.w_out = to_double(layer.w_out(e));
  if (bias) {
    f.b_in = to_double(layer.b_in(e));
    f.b_out = to_double(layer.b_out(e));
  }
  return f;
}

template <class Layer>
std::vector<Ffn> experts_of(Layer& layer, int num_experts, bool bias) {
  std::vector<Ffn> out;
  for (int e = 0; e < num_experts; ++e) out.push_back(expert_of(layer, e, bias));
  return out;
}

}  // namespace switchmoe_test::ref
