// DenseFFN forward against the double-precision reference, and the Switch layer with one expert
// as a dense FFN (SEMANTICS 1, 11, 12).
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "reference/expert_reference.hpp"
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
namespace ref = switchmoe_test::ref;

template <class A>
constexpr ref::Act act_of() {
  return std::is_same_v<A, Gelu> ? ref::Act::kGelu : ref::Act::kRelu;
}

template <class Ffn>
ref::Ffn reference_of(Ffn& ffn, bool bias) {
  ref::Ffn f;
  f.w_in = ref::to_double(ffn.w_in());
  f.w_out = ref::to_double(ffn.w_out());
  if (bias) {
    f.b_in = ref::to_double(ffn.b_in());
    f.b_out = ref::to_double(ffn.b_out());
  }
  return f;
}

template <class Act>
void dense_matches_reference(int tokens, int d_model, int d_ff, bool bias, unsigned seed) {
  SCOPED_TRACE(std::string(Act::name()) + " tokens " + std::to_string(tokens) + " d_model " +
               std::to_string(d_model) + " d_ff " + std::to_string(d_ff) + (bias ? " bias" : ""));
  DenseConfig cfg;
  cfg.d_model = d_model;
  cfg.d_ff = d_ff;
  cfg.bias = bias;
  cfg.seed = seed;
  DenseFFN<Fp32, Act> ffn(cfg);
  std::mt19937 gen(seed);
  switchmoe_test::randomize_ffn(ffn, bias, gen);
  Matrix<float> x(tokens, d_model);
  ref::fill_uniform(x, gen, -1, 1);
  const MatD y_ref = ref::ffn(ref::to_double(x), reference_of(ffn, bias), act_of<Act>());
  for (Mode mode : {Mode::kEval, Mode::kTrain}) {  // no dropout configured: modes agree
    const Matrix<float> y = ffn.forward(x, mode);
    ASSERT_EQ(y.rows(), tokens);
    ASSERT_EQ(y.cols(), d_model);
    // float32 sums of <= 48 O(1) products: error far below 2e-5.
    EXPECT_LT(ref::max_abs_diff(y, y_ref), 2e-5);
  }
}

TEST(DenseFFNForward, MatchesReference) {
  std::mt19937 gen(1);
  for (int i = 0; i < 12; ++i) {
    const int tokens = 1 + gen() % 40, d_model = 1 + gen() % 16, d_ff = 1 + gen() % 32;
    const bool bias = i % 2;
    if (i % 3 == 0)
      dense_matches_reference<Relu>(tokens, d_model, d_ff, bias, 10 + i);
    else
      dense_matches_reference<Gelu>(tokens, d_model, d_ff, bias, 10 + i);
  }
  dense_matches_reference<Relu>(1, 1, 1, false, 3);
  dense_matches_reference<Gelu>(1, 16, 32, true, 4);
}

// GELU is the exact erf form, not the tanh approximation: they differ by up to ~1e-3 near
// |x| ~ 2, far above the float32 error of a single unit.
TEST(DenseFFNForward, GeluIsExactErfForm) {
  DenseConfig cfg;
  cfg.d_model = 1;
  cfg.d_ff = 1;
  DenseFFN<Fp32, Gelu> ffn(cfg);
  ffn.w_in().setConstant(1.0f);
  ffn.w_out().setConstant(1.0f);
  Matrix<float> x(7, 1);
  x << -3.0f, -2.0f, -0.5f, 0.0f, 0.7f, 2.0f, 3.5f;
  const Matrix<float> y = ffn.forward(x);
  for (int t = 0; t < 7; ++t) {
    const double v = x(t, 0);
    EXPECT_NEAR(y(t, 0), 0.5 * v * (1 + std::erf(v / std::sqrt(2.0))), 2e-7 * (1 + std::abs(v)));
  }
}

TEST(DenseFFNForward, ZeroTokensAndBadInput) {
  DenseConfig cfg;
  cfg.d_model = 4;
  cfg.d_ff = 8;
  DenseFFN<Fp32, Relu> ffn(cfg);
  const Matrix<float> y = ffn.forward(Matrix<float>(0, 4));
  EXPECT_EQ(y.rows(), 0);
  EXPECT_EQ(y.cols(), 4);
  EXPECT_THROW(ffn.forward(Matrix<float>::Zero(3, 5)), std::invalid_argument);
  EXPECT_THROW(ffn.forward(Matrix<float>::Zero(3, 3), Mode::kTrain), std::invalid_argument);
  for (auto edit : std::vector<void (*)(DenseConfig&)>{
           [](DenseConfig& c) { c.d_model = 0; }, [](DenseConfig& c) { c.d_ff = 0; },
           [](DenseConfig& c) { c.dropout = 1.0f; }, [](DenseConfig& c) { c.dropout = -0.5f; },
           [](DenseConfig& c) { c.init_scale = -1.0f; }}) {
    DenseConfig bad = cfg;
    edit(bad);
    EXPECT_THROW((DenseFFN<Fp32, Relu>(bad)), std::invalid_argument);
  }
}

TEST(DenseFFNParameters, NamesAndEditsTakeEffect) {
  for (bool bias : {false, true}) {
    DenseConfig cfg;
    cfg.d_model = 3;
    cfg.d_ff = 5;
    cfg.bias = bias;
    DenseFFN<Bf16, Relu> ffn(cfg);
    std::vector<std::string> names;
    for (auto& p : ffn.parameters()) names.push_back(p.name);
    if (bias) {
      EXPECT_EQ(names, (std::vector<std::string>{"w_in", "b_in", "w_out", "b_out"}));
    } else {
      EXPECT_EQ(names, (std::vector<std::string>{"w_in", "w_out"}));
    }
    const Matrix<float> x = Matrix<float>::Constant(2, 3, 1.0f);
    ffn.w_in().setConstant(0.5f);
    ffn.w_out().setConstant(0.25f);
    Matrix<float> y = ffn.forward(x);
    EXPECT_NEAR(y(0, 0), 5 * 1.5 * 0.25, 1e-6);  // bf16-exact values
    ffn.w_out().setConstant(-0.5f);              // Relu(1.5) * -0.5 * 5
    y = ffn.forward(x);
    EXPECT_NEAR(y(1, 2), -3.75, 1e-6);
  }
}

// Edits through a ParameterRef obtained once and written after a forward apply too
// (core/parameter.hpp: "Writing through `value` takes effect on the layer's next forward").
TEST(DenseFFNParameters, CachedParameterRefEditsTakeEffectBf16) {
  DenseConfig cfg;
  cfg.d_model = 3;
  cfg.d_ff = 5;
  DenseFFN<Bf16, Relu> ffn(cfg);
  const Matrix<float> x = Matrix<float>::Constant(2, 3, 1.0f);
  ffn.w_in().setConstant(0.5f);
  ffn.w_out().setConstant(-0.5f);
  auto params = ffn.parameters();
  Matrix<float> y = ffn.forward(x);
  EXPECT_NEAR(y(0, 1), 5 * 1.5 * -0.5, 1e-6);
  for (auto& p : params)
    if (p.name == "w_in") p.value->setConstant(1.0f);
  y = ffn.forward(x);
  EXPECT_NEAR(y(0, 1), 5 * 3.0 * -0.5, 1e-6) << "cached ParameterRef edit ignored";
}

// Rule 12 in the dense FFN: identity weights, x > 0: y = x .* s with s in {0, 1/(1-p)}.
TEST(DenseFFNDropout, TrainingOnlyWithInvertedScaling) {
  DenseConfig cfg;
  cfg.d_model = cfg.d_ff = 32;
  cfg.dropout = 0.25f;
  cfg.seed = 6;
  DenseFFN<Fp32, Relu> ffn(cfg);
  ffn.w_in().setIdentity();
  ffn.w_out().setIdentity();
  Matrix<float> x = Matrix<float>::Constant(96, 32, 0.75f);
  const Matrix<float> y = ffn.forward(x, Mode::kTrain);
  int zeros = 0;
  for (int i = 0; i < y.size(); ++i) {
    if (y.data()[i] == 0.0f)
      ++zeros;
    else
      EXPECT_NEAR(y.data()[i], 0.75 / 0.75, 1e-6);
  }
  // Binomial(3072, 0.25): std 0.0078; 4 std.
  EXPECT_NEAR(zeros / 3072.0, 0.25, 0.032);
  EXPECT_EQ(ffn.forward(x, Mode::kEval), x);
}

// Rule 11 for the dense FFN: std sqrt(s / fan_in) truncated at 2 sigma.
TEST(DenseFFNInit, TruncatedNormal) {
  DenseConfig cfg;
  cfg.d_model = 128;
  cfg.d_ff = 256;
  cfg.bias = true;
  cfg.seed = 1;
  DenseFFN<Fp32, Relu> ffn(cfg);
  for (auto [w, fan_in] : {std::pair<Matrix<float>*, int>{&ffn.w_in(), 128},
                           std::pair<Matrix<float>*, int>{&ffn.w_out(), 256}}) {
    const double sigma = std::sqrt(0.1 / fan_in);
    double sq = 0, max_abs = 0;
    for (int i = 0; i < w->size(); ++i) {
      sq += double(w->data()[i]) * w->data()[i];
      max_abs = std::max(max_abs, std::abs(double(w->data()[i])));
    }
    EXPECT_NEAR(std::sqrt(sq / w->size()), 0.87962 * sigma, 0.02 * sigma);
    EXPECT_LE(max_abs, 2 * sigma * (1 + 1e-6));
  }
}

// A Switch layer with one expert and no drops is the dense FFN times the gate, and the gate of a
// softmax over one expert is exactly 1.
template <class Policy, class Act>
void one_expert_is_dense(bool bias) {
  SCOPED_TRACE(std::string(Policy::name()) + " " + Act::name() + (bias ? " bias" : ""));
  SwitchConfig scfg;
  scfg.d_model = 6;
  scfg.d_ff = 10;
  scfg.routing.num_experts = 1;
  scfg.expert_bias = bias;
  scfg.seed = 2;
  SwitchLayer<Policy, Act> layer(scfg);
  DenseConfig dcfg;
  dcfg.d_model = 6;
  dcfg.d_ff = 10;
  dcfg.bias = bias;
  dcfg.seed = 99;
  DenseFFN<Policy, Act> dense(dcfg);
  std::mt19937 gen(8);
  switchmoe_test::randomize_ffn(dense, bias, gen);
  layer.w_in(0) = dense.w_in();
  layer.w_out(0) = dense.w_out();
  if (bias) {
    layer.b_in(0) = dense.b_in();
    layer.b_out(0) = dense.b_out();
  }
  Matrix<float> x(20, 6);
  ref::fill_uniform(x, gen, -1, 1);
  for (Mode mode : {Mode::kEval, Mode::kTrain}) {
    const auto out = layer.forward(x, mode);
    for (int t = 0; t < 20; ++t) {
      EXPECT_EQ(out.routing.gate(t, 0), 1.0f);
      EXPECT_GE(out.routing.slot(t, 0), 0);  // C = max(4, min(20, 25)) = 20 in training
    }
    const Matrix<float> y = dense.forward(x, mode);
    // Same element type and accumulation on both sides: bf16 rounding is identical, so only
    // float32 summation order could differ.
    EXPECT_LT(ref::max_abs_diff(out.y, y), 1e-6);
  }
  // And their gradients agree (dy on the combined output).
  Matrix<float> dy(20, 6);
  ref::fill_uniform(dy, gen, -1, 1);
  layer.forward(x, Mode::kTrain);
  dense.forward(x, Mode::kTrain);
  const Matrix<float> dx_switch = layer.backward(dy);
  const Matrix<float> dx_dense = dense.backward(dy);
  EXPECT_LT(ref::max_abs_diff(dx_switch, dx_dense), 1e-5);
  EXPECT_LT(ref::max_abs_diff(layer.grad_w_in(0), dense.grad_w_in()), 1e-5);
  EXPECT_LT(ref::max_abs_diff(layer.grad_w_out(0), dense.grad_w_out()), 1e-5);
  EXPECT_TRUE((layer.grad_router_weight().array().abs() < 1e-6f).all())
      << "one expert: the gate is constant 1, the router gets only the aux/z terms, which are "
         "constant too";
}

TEST(DenseFFNEquivalence, SwitchLayerWithOneExpert) {
  for (bool bias : {false, true}) {
    one_expert_is_dense<Fp32, Relu>(bias);
    one_expert_is_dense<Fp32, Gelu>(bias);
    one_expert_is_dense<Bf16, Gelu>(bias);
  }
}

}  // namespace
