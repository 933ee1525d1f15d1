// Selective precision (SEMANTICS 2, 13): the Bf16 policy keeps the router in float32 and runs
// the experts with bfloat16 weights and activations and float32 accumulation.
//
// Error bound of the Bf16 expert path against the exact (double) FFN. bfloat16 has 8
// significant bits: eps_bf16 = 2^-8 and round-to-nearest has relative error u <= 2^-9.
// For one token and expert, with A_j = sum_i |x_i W_in[i,j]| and hidden a_j = act(pre_j):
//   pre_j   = sum_i bf16(x_i) bf16(W_in[i,j]) (+ b_j) in float32:
//             |d pre_j| <= (2u + u^2 + d_model 2^-24) A_j        (both factors rounded once)
//   a_j     = act(pre_j), then stored as bf16:
//             |d a_j| <= L |d pre_j| + u |a_j|                    (L = max|act'| <= 1.13)
//   y_k     = sum_j bf16(a_j) bf16(W_out[j,k]) (+ b_k) in float32:
//             |d y_k| <= sum_j |W_out[j,k]| |d a_j| + (u + d_ff 2^-24) sum_j |a_j W_out[j,k]|
// and the combine adds sum_c |gate_c| |d y_k(e_c)| (gates are float32, identical to fp32).
// Second-order terms (products of two roundings) are covered by a 1.25 factor, plus 1e-6
// absolute for float32 output rounding. This bound is per element and a few times eps_bf16
// times the sum of |terms|, not of |y|, so it stays valid under cancellation.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "reference/layer_reference.hpp"
#include "support/random_weights.hpp"
#include "switchmoe/switchmoe.hpp"

namespace {

using switchmoe::Bf16;
using switchmoe::DenseConfig;
using switchmoe::DenseFFN;
using switchmoe::Fp32;
using switchmoe::Gelu;
using switchmoe::Matrix;
using switchmoe::Mode;
using switchmoe::Relu;
using switchmoe::SwitchConfig;
using switchmoe::SwitchLayer;
using switchmoe_test::ref::MatD;
using switchmoe_test::ref::MatI;
namespace ref = switchmoe_test::ref;

constexpr double kU = 1.0 / 512;         // bf16 unit roundoff, eps_bf16 / 2 = 2^-9
constexpr double kU32 = 1.0 / 16777216;  // float32 unit roundoff 2^-24

// Per-element bound |y_bf16 - y_exact| for one expert's output of token t (see file comment).
std::vector<double> expert_error_bound(const MatD& x, int t, const ref::Ffn& f, ref::Act act) {
  const int d_model = static_cast<int>(f.w_in.rows()), d_ff = static_cast<int>(f.w_in.cols());
  const double lip = ref::activation_slope_bound(act);
  const std::vector<double> pre = ref::ffn_pre_activation(x, t, f);
  std::vector<double> da(d_ff), a(d_ff);
  for (int j = 0; j < d_ff; ++j) {
    double sum_abs = f.b_in.size() ? std::abs(f.b_in(0, j)) * kU32 : 0.0;
    for (int i = 0; i < d_model; ++i) sum_abs += std::abs(x(t, i) * f.w_in(i, j));
    a[j] = ref::activate(pre[j], act);
    da[j] = lip * (2 * kU + kU * kU + d_model * kU32) * sum_abs + kU * std::abs(a[j]);
  }
  std::vector<double> bound(d_model);
  for (int k = 0; k < d_model; ++k) {
    double b = 0, terms = 0;
    for (int j = 0; j < d_ff; ++j) {
      b += std::abs(f.w_out(j, k)) * da[j];
      terms += std::abs(a[j] * f.w_out(j, k));
    }
    bound[k] = b + (kU + d_ff * kU32) * terms;
  }
  return bound;
}

template <class Act>
void bf16_layer_within_bound(int tokens, int d_model, int d_ff, int experts, int top_k, bool bias,
                             unsigned seed) {
  constexpr ref::Act kAct = std::is_same_v<Act, Gelu> ? ref::Act::kGelu : ref::Act::kRelu;
  SCOPED_TRACE(std::string(Act::name()) + " seed " + std::to_string(seed));
  SwitchConfig cfg;
  cfg.d_model = d_model;
  cfg.d_ff = d_ff;
  cfg.routing.num_experts = experts;
  cfg.routing.top_k = top_k;
  cfg.routing.expert_capacity = 3;
  cfg.expert_bias = bias;
  cfg.seed = seed;
  SwitchLayer<Bf16, Act> layer(cfg);
  std::mt19937 gen(seed);
  ref::fill_uniform(layer.router_weight(), gen, -1.5, 1.5);
  switchmoe_test::randomize_experts(layer, experts, bias, gen);
  Matrix<float> x(tokens, d_model);
  ref::fill_uniform(x, gen, -1, 1);
  const auto out = layer.forward(x, Mode::kEval);
  const MatD xd = ref::to_double(x);
  const std::vector<ref::Ffn> ffns = ref::experts_of(layer, experts, bias);
  const MatD y_ref = ref::switch_combine(xd, ffns, out.routing.expert, out.routing.slot,
                                         ref::to_double(out.routing.gate), kAct);
  double max_err = 0, max_bound = 0, max_ratio = 0;
  for (int t = 0; t < tokens; ++t) {
    std::vector<double> bound(d_model, 0.0);
    for (int c = 0; c < top_k; ++c) {
      if (out.routing.slot(t, c) < 0) continue;
      const auto b = expert_error_bound(xd, t, ffns[out.routing.expert(t, c)], kAct);
      for (int k = 0; k < d_model; ++k) bound[k] += std::abs(out.routing.gate(t, c)) * b[k];
    }
    for (int k = 0; k < d_model; ++k) {
      const double err = std::abs(out.y(t, k) - y_ref(t, k));
      const double tol = 1.25 * bound[k] + 1e-6;
      EXPECT_LE(err, tol) << "token " << t << " column " << k;
      max_err = std::max(max_err, err);
      max_bound = std::max(max_bound, bound[k]);
      max_ratio = std::max(max_ratio, err / tol);
    }
  }
  // The bf16 path is really bf16: errors of the order of eps_bf16, far above float32's.
  EXPECT_GT(max_err, 1e-4) << "Bf16 policy output is as exact as float32";
  // And the bound is not vacuous: somewhere the actual error reaches a fair part of it.
  EXPECT_GT(max_ratio, 0.05) << "max bound " << max_bound;
}

TEST(PrecisionBf16, SwitchLayerWithinDerivedBound) {
  bf16_layer_within_bound<Relu>(24, 8, 16, 4, 1, false, 1);
  bf16_layer_within_bound<Gelu>(24, 8, 16, 4, 2, true, 2);
  bf16_layer_within_bound<Relu>(40, 16, 32, 6, 2, true, 3);
  bf16_layer_within_bound<Gelu>(40, 16, 32, 3, 3, false, 4);
}

TEST(PrecisionBf16, DenseWithinDerivedBound) {
  for (bool bias : {false, true}) {
    DenseConfig cfg;
    cfg.d_model = 12;
    cfg.d_ff = 24;
    cfg.bias = bias;
    DenseFFN<Bf16, Gelu> ffn(cfg);
    std::mt19937 gen(11 + bias);
    switchmoe_test::randomize_ffn(ffn, bias, gen);
    ref::Ffn f{ref::to_double(ffn.w_in()), MatD(), ref::to_double(ffn.w_out()), MatD()};
    if (bias) {
      f.b_in = ref::to_double(ffn.b_in());
      f.b_out = ref::to_double(ffn.b_out());
    }
    Matrix<float> x(30, 12);
    ref::fill_uniform(x, gen, -1, 1);
    const Matrix<float> y = ffn.forward(x);
    const MatD xd = ref::to_double(x);
    const MatD y_ref = ref::ffn(xd, f, ref::Act::kGelu);
    double max_err = 0;
    for (int t = 0; t < 30; ++t) {
      const auto b = expert_error_bound(xd, t, f, ref::Act::kGelu);
      for (int k = 0; k < 12; ++k) {
        const double err = std::abs(y(t, k) - y_ref(t, k));
        EXPECT_LE(err, 1.25 * b[k] + 1e-6) << t << "," << k;
        max_err = std::max(max_err, err);
      }
    }
    EXPECT_GT(max_err, 1e-4);
  }
}

// Rule 2 / 13: the router is float32 whatever the policy. Same weights and seed give bitwise
// identical logits, probabilities, choices, slots and gates under Fp32 and Bf16, in evaluation
// and in training (where the jitter stream is also shared).
TEST(PrecisionBf16, RouterIsFloat32) {
  SwitchConfig cfg;
  cfg.d_model = 16;
  cfg.d_ff = 8;
  cfg.routing.num_experts = 5;
  cfg.routing.top_k = 2;
  cfg.routing.priority = switchmoe::Priority::kRouterProbability;
  cfg.jitter_eps = 0.05f;
  cfg.seed = 21;
  SwitchLayer<Fp32, Relu> fp32(cfg);
  SwitchLayer<Bf16, Relu> bf16(cfg);
  std::mt19937 gen(3);
  // Weights that are not bf16-representable: a bf16 router would round them.
  ref::fill_uniform(fp32.router_weight(), gen, -1.0, 1.0);
  bf16.router_weight() = fp32.router_weight();
  Matrix<float> x(32, 16);
  ref::fill_uniform(x, gen, -1, 1);
  for (Mode mode : {Mode::kEval, Mode::kTrain}) {
    const auto a = fp32.forward(x, mode);
    const auto b = bf16.forward(x, mode);
    EXPECT_EQ(a.routing.logits, b.routing.logits) << switchmoe::to_string(mode);
    EXPECT_EQ(a.routing.probs, b.routing.probs);
    EXPECT_EQ(a.routing.expert, b.routing.expert);
    EXPECT_EQ(a.routing.slot, b.routing.slot);
    EXPECT_EQ(a.routing.gate, b.routing.gate);
    EXPECT_EQ(a.routing.aux_loss, b.routing.aux_loss);
    EXPECT_EQ(a.routing.z_loss, b.routing.z_loss);
    // Logits match the exact product to float32 accuracy (a bf16 router would be off by ~1e-2).
    if (mode == Mode::kEval) {
      const MatD exact =
          ref::router_logits(ref::to_double(x), ref::to_double(fp32.router_weight()));
      EXPECT_LT(ref::max_abs_diff(b.routing.logits, exact), 1e-5);
    }
  }
}

// Master weights and gradients stay float32 (rule 13): a bf16 forward does not round the
// master weights, and the gradients are float32 matrices close to the fp32 layer's (normwise:
// every gradient entry is a sum of products of 3-4 bf16-rounded factors, so the normwise relative
// error is a small multiple of u ~ 2e-3; 3e-2 allows for cancellation).
TEST(PrecisionBf16, MasterWeightsAndGradientsFloat32) {
  SwitchConfig cfg;
  cfg.d_model = 8;
  cfg.d_ff = 16;
  cfg.routing.num_experts = 3;
  cfg.routing.top_k = 2;
  cfg.jitter_eps = 0.0f;
  cfg.expert_bias = true;
  cfg.seed = 4;
  SwitchLayer<Fp32, Gelu> fp32(cfg);
  SwitchLayer<Bf16, Gelu> bf16(cfg);
  std::mt19937 gen(9);
  auto pf = fp32.parameters();
  auto pb = bf16.parameters();
  ASSERT_EQ(pf.size(), pb.size());
  for (std::size_t i = 0; i < pf.size(); ++i) {
    ref::fill_uniform(*pf[i].value, gen, -0.7, 0.7);
    *pb[i].value = *pf[i].value;
  }
  const std::vector<Matrix<float>> masters = [&] {
    std::vector<Matrix<float>> m;
    for (auto& p : pb) m.push_back(*p.value);
    return m;
  }();
  Matrix<float> x(20, 8), dy(20, 8);
  ref::fill_uniform(x, gen, -1, 1);
  ref::fill_uniform(dy, gen, -1, 1);
  const auto of = fp32.forward(x, Mode::kTrain);
  const auto ob = bf16.forward(x, Mode::kTrain);
  ASSERT_EQ(of.routing.slot, ob.routing.slot);
  const Matrix<float> dxf = fp32.backward(dy);
  const Matrix<float> dxb = bf16.backward(dy);
  for (std::size_t i = 0; i < pb.size(); ++i) {
    EXPECT_EQ(*pb[i].value, masters[i]) << pb[i].name << " master changed by forward/backward";
    const double norm = pf[i].grad->norm();
    const double diff = (*pf[i].grad - *pb[i].grad).norm();
    EXPECT_LE(diff, 3e-2 * norm + 1e-6) << pb[i].name;
  }
  EXPECT_LE((dxf - dxb).norm(), 3e-2 * dxf.norm());
  EXPECT_GT((dxf - dxb).norm(), 0.0) << "Bf16 backward identical to fp32: no bf16 in use?";
}

}  // namespace
