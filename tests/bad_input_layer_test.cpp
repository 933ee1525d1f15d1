// Bad input to the layers (issue 14): every public entry of SwitchLayer and DenseFFN validates
// what it is given, including the shapes of user-reachable parameter storage, and a failed call
// leaves the layer as it was. Each case here read or wrote out of bounds, propagated a NaN, or
// silently reused stale state before the checks existed.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "support/expect_throw.hpp"
#include "support/matrices.hpp"
#include "switchmoe/switchmoe.hpp"

namespace {

using switchmoe::Bf16;
using switchmoe::DenseConfig;
using switchmoe::DenseFFN;
using switchmoe::Fp32;
using switchmoe::Matrix;
using switchmoe::Mode;
using switchmoe::SwitchConfig;
using switchmoe::SwitchLayer;
using switchmoe_test::random_matrix;
using switchmoe_test::SameBits;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

SwitchConfig small_config() {
  SwitchConfig c;
  c.d_model = 6;
  c.d_ff = 10;
  c.routing.num_experts = 3;
  c.routing.top_k = 2;
  c.expert_bias = true;
  c.router_bias = true;
  c.z_loss_coef = 1e-3f;
  c.seed = 5;
  return c;
}

template <class Layer>
void expect_forward_rejects(Layer& layer, const char* substring) {
  const Matrix<float> x = random_matrix(8, layer.config().d_model, 1);
  EXPECT_THROW_WITH(layer.forward(x, Mode::kTrain), std::invalid_argument, substring);
}

template <class Policy>
void resized_parameters_are_rejected() {
  SwitchLayer<Policy> layer(small_config());
  const Matrix<float> x = random_matrix(8, 6, 1);
  // Through the accessors: each weight, bias and the router.
  layer.w_in(1) = Matrix<float>::Zero(2, 2);
  expect_forward_rejects(layer, "w_in has shape [2, 2], expected [6, 10]");
  layer.w_in(1) = Matrix<float>::Zero(6, 10);
  layer.b_out(2) = Matrix<float>::Zero(1, 3);
  expect_forward_rejects(layer, "b_out has shape [1, 3], expected [1, 6]");
  layer.b_out(2) = Matrix<float>::Zero(1, 6);
  layer.router_weight() = Matrix<float>::Zero(6, 2);
  expect_forward_rejects(layer, "router weight has shape [6, 2], expected [6, 3]");
  layer.router_weight() = random_matrix(6, 3, 2);
  layer.router_bias() = Matrix<float>::Zero(1, 7);
  expect_forward_rejects(layer, "router bias");
  layer.router_bias() = Matrix<float>::Zero(1, 3);
  // Through parameters(): a gradient replaced by a smaller matrix is never written.
  layer.forward(x, Mode::kTrain);
  for (auto& p : layer.parameters()) {
    if (p.name == "experts.0.w_out") *p.grad = Matrix<float>::Zero(1, 1);
  }
  const Matrix<float> dy = random_matrix(8, 6, 3);
  EXPECT_THROW_WITH(layer.backward(dy), std::invalid_argument, "grad_w_out has shape [1, 1]");
  layer.zero_grad();  // restores every gradient's shape
  layer.forward(x, Mode::kTrain);
  layer.grad_router_weight() = Matrix<float>::Zero(3, 3);
  EXPECT_THROW_WITH(layer.backward(dy), std::invalid_argument, "router grad_weight");
  layer.zero_grad();
  layer.forward(x, Mode::kTrain);
  EXPECT_NO_THROW(layer.backward(dy));
}

TEST(BadInputSwitchLayer, ResizedParametersAreRejectedFp32) {
  resized_parameters_are_rejected<Fp32>();
}
TEST(BadInputSwitchLayer, ResizedParametersAreRejectedBf16) {
  resized_parameters_are_rejected<Bf16>();
}

TEST(BadInputSwitchLayer, NonFiniteInputsAreRejected) {
  SwitchLayer<> layer(small_config());
  Matrix<float> x = random_matrix(8, 6, 1);
  x(3, 2) = kNaN;
  EXPECT_THROW_WITH(layer.forward(x, Mode::kEval), std::invalid_argument, "x(3, 2) is nan");
  x(3, 2) = 0.5f;
  layer.forward(x, Mode::kTrain);
  Matrix<float> dy = random_matrix(8, 6, 2);
  dy(7, 5) = kInf;
  EXPECT_THROW_WITH(layer.backward(dy), std::invalid_argument, "dy(7, 5) is inf");
  // A non-finite router weight shows as non-finite logits.
  layer.router_weight()(0, 1) = kNaN;
  EXPECT_THROW_WITH(layer.forward(x, Mode::kEval), std::invalid_argument, "logits");
}

TEST(BadInputSwitchLayer, NonFiniteGatesOfAGivenRoutingAreRejected) {
  SwitchLayer<> layer(small_config());
  const Matrix<float> x = random_matrix(8, 6, 1);
  switchmoe::Routing routing = layer.forward(x, Mode::kEval).routing;
  routing.gate(4, 1) = kNaN;
  EXPECT_THROW_WITH(layer.forward(x, routing), std::invalid_argument, "routing.gate(4, 1) is nan");
  routing.gate(4, 1) = 0.25f;
  routing.expert(2, 0) = 3;
  EXPECT_THROW_WITH(layer.forward(x, routing), std::invalid_argument, "routing.expert(2, 0) is 3");
}

TEST(BadInputSwitchLayer, NonFiniteCoefficientsAreRejected) {
  for (float bad : {kNaN, kInf, -kInf}) {
    SwitchConfig c = small_config();
    c.aux_loss_coef = bad;
    EXPECT_THROW_WITH(SwitchLayer<>{c}, std::invalid_argument, "aux_loss_coef");
    c = small_config();
    c.z_loss_coef = bad;
    EXPECT_THROW_WITH(SwitchLayer<>{c}, std::invalid_argument, "z_loss_coef");
    c = small_config();
    c.init_scale = bad;
    EXPECT_THROW_WITH(SwitchLayer<>{c}, std::invalid_argument, "init_scale");
  }
}

// A zero coefficient makes its term exactly zero, even when the loss itself overflows: huge
// finite logits give z = inf, and 0 * inf would be NaN.
TEST(BadInputSwitchLayer, ZeroCoefficientGivesAnExactlyZeroTerm) {
  SwitchConfig c = small_config();
  c.z_loss_coef = 0.0f;
  c.aux_loss_coef = 0.0f;
  c.router_bias = false;
  SwitchLayer<> layer(c);
  layer.router_weight().setConstant(1e19f);  // logits ~ 6e19: (logsumexp)^2 overflows float
  const Matrix<float> x = Matrix<float>::Constant(4, 6, 1.0f);
  const switchmoe::SwitchOutput out = layer.forward(x, Mode::kEval);
  EXPECT_TRUE(std::isinf(out.routing.z_loss));
  EXPECT_EQ(out.loss, 0.0f);
}

TEST(BadInputSwitchLayer, OutOfRangeEnumsAreRejected) {
  SwitchLayer<> layer(small_config());
  const Matrix<float> x = random_matrix(8, 6, 1);
  EXPECT_THROW_WITH(layer.forward(x, static_cast<Mode>(7)), std::invalid_argument, "mode is 7");
  SwitchConfig c = small_config();
  c.routing.priority = static_cast<switchmoe::Priority>(5);
  EXPECT_THROW_WITH(SwitchLayer<>{c}, std::invalid_argument, "priority is 5");
}

// A forward that throws leaves the layer as if it had not been called: the following backward
// must not run on the previous call's saved state.
TEST(BadInputSwitchLayer, FailedForwardLeavesNoStaleState) {
  SwitchLayer<> layer(small_config());
  const Matrix<float> x = random_matrix(8, 6, 1);
  layer.forward(x, Mode::kTrain);
  Matrix<float> bad = x;
  bad(0, 0) = kNaN;
  EXPECT_THROW(layer.forward(bad, Mode::kTrain), std::invalid_argument);
  EXPECT_THROW_WITH(layer.backward(random_matrix(8, 6, 2)), std::invalid_argument,
                    "without a preceding forward");
  // Also when the failure is a wrong width, or a resized parameter.
  layer.forward(x, Mode::kTrain);
  EXPECT_THROW(layer.forward(random_matrix(8, 5, 1), Mode::kTrain), std::invalid_argument);
  EXPECT_THROW_WITH(layer.backward(random_matrix(8, 6, 2)), std::invalid_argument,
                    "without a preceding forward");
  // The layer still works, and gives what a fresh layer gives.
  SwitchLayer<> fresh(small_config());
  EXPECT_TRUE(SameBits(layer.forward(x, Mode::kEval).y, fresh.forward(x, Mode::kEval).y));
}

TEST(BadInputSwitchLayer, BackwardWithWrongShapeLeavesGradientsUntouched) {
  SwitchLayer<> layer(small_config());
  const Matrix<float> x = random_matrix(8, 6, 1);
  layer.forward(x, Mode::kTrain);
  EXPECT_THROW_WITH(layer.backward(random_matrix(7, 6, 2)), std::invalid_argument,
                    "dy has shape [7, 6], expected [8, 6]");
  for (auto& p : layer.parameters()) EXPECT_TRUE(p.grad->isZero(0.0f)) << p.name;
}

TEST(BadInputDenseFFN, RejectsBadInputAndStaleState) {
  DenseConfig c;
  c.d_model = 4;
  c.d_ff = 8;
  DenseFFN<> dense(c);
  const Matrix<float> x = random_matrix(5, 4, 1);
  dense.forward(x, Mode::kTrain);
  Matrix<float> bad = x;
  bad(1, 1) = kNaN;
  EXPECT_THROW_WITH(dense.forward(bad, Mode::kTrain), std::invalid_argument, "x(1, 1) is nan");
  EXPECT_THROW_WITH(dense.backward(random_matrix(5, 4, 2)), std::invalid_argument,
                    "without a preceding forward");
  dense.forward(x, Mode::kTrain);
  Matrix<float> dy = random_matrix(5, 4, 2);
  dy(0, 3) = kNaN;
  EXPECT_THROW_WITH(dense.backward(dy), std::invalid_argument, "dy(0, 3) is nan");
  EXPECT_THROW_WITH(dense.backward(random_matrix(4, 4, 2)), std::invalid_argument,
                    "dy has shape [4, 4]");
  dense.w_out() = Matrix<float>::Zero(3, 3);
  EXPECT_THROW_WITH(dense.forward(x, Mode::kEval), std::invalid_argument,
                    "w_out has shape [3, 3], expected [8, 4]");
  EXPECT_THROW_WITH(dense.forward(x, static_cast<Mode>(-1)), std::invalid_argument, "mode is -1");
}

// The layer does not scan x before routing (the router promises that a non-finite x makes its
// token's logits non-finite, and the logits are checked): the error must still name x, with the
// first bad element in row-major order, whatever the mode, jitter, router weights (zero
// weights: inf * 0), capacity (the token dropped) or precision; it must still come before a
// resized parameter's error; and the failed call draws no jitter.
template <class Policy>
void non_finite_input_is_named() {
  for (const float bad : {kNaN, kInf, -kInf}) {
    for (const Mode mode : {Mode::kEval, Mode::kTrain}) {
      for (const float jitter : {0.0f, 0.1f}) {
        SwitchConfig c = small_config();
        c.jitter_eps = jitter;
        c.routing.capacity_factor = 0.25;  // most tokens dropped in training
        c.routing.eval_capacity_factor = 0.25;
        SwitchLayer<Policy> layer(c), fresh(c);
        const Matrix<float> x = random_matrix(32, 6, 1);
        // Row 29 comes before row 30 in the scan, whichever of them routing would keep.
        Matrix<float> bad_x = x;
        bad_x(29, 4) = bad;
        bad_x(30, 1) = bad;
        const std::string expected = "x(29, 4) is " + std::string(std::isnan(bad) ? "nan"
                                                                  : bad > 0       ? "inf"
                                                                                  : "-inf");
        EXPECT_THROW_WITH(layer.forward(bad_x, mode), std::invalid_argument, expected.c_str());
        // Zero router weights: the bad element's terms are inf * 0 = NaN.
        const Matrix<float> saved = layer.router_weight();
        layer.router_weight().setZero();
        EXPECT_THROW_WITH(layer.forward(bad_x, mode), std::invalid_argument, expected.c_str());
        layer.router_weight() = saved;
        // Before the error of a resized parameter, as when x was scanned first.
        layer.w_in(1) = Matrix<float>::Zero(2, 2);
        EXPECT_THROW_WITH(layer.forward(bad_x, mode), std::invalid_argument, expected.c_str());
        EXPECT_THROW_WITH(layer.forward(x, mode), std::invalid_argument, "w_in has shape");
        layer.w_in(1) = fresh.w_in(1);
        // Nothing drawn, nothing kept: the next calls are a fresh layer's.
        EXPECT_TRUE(SameBits(layer.forward(x, Mode::kTrain).y, fresh.forward(x, Mode::kTrain).y));
        EXPECT_TRUE(SameBits(layer.forward(x, mode).y, fresh.forward(x, mode).y));
      }
    }
  }
}

TEST(BadInputSwitchLayer, NonFiniteInputIsNamedFp32) { non_finite_input_is_named<Fp32>(); }
TEST(BadInputSwitchLayer, NonFiniteInputIsNamedBf16) { non_finite_input_is_named<Bf16>(); }
TEST(BadInputSwitchLayer, NonFiniteInputIsNamedBf16RouterAblation) {
  non_finite_input_is_named<switchmoe::Bf16RouterAblation>();
}

// A training forward that fails (here: non-finite logits from a non-finite router weight) draws
// no jitter: after the weight is restored, the next call gives what a fresh layer gives.
TEST(BadInputSwitchLayer, FailedTrainingForwardDrawsNoJitter) {
  SwitchConfig c = small_config();
  c.jitter_eps = 0.1f;
  SwitchLayer<> layer(c), fresh(c);
  const Matrix<float> x = random_matrix(8, 6, 1);
  const float saved = layer.router_weight()(2, 1);
  layer.router_weight()(2, 1) = kNaN;
  EXPECT_THROW_WITH(layer.forward(x, Mode::kTrain), std::invalid_argument, "logits");
  layer.router_weight()(2, 1) = saved;
  EXPECT_TRUE(SameBits(layer.forward(x, Mode::kTrain).y, fresh.forward(x, Mode::kTrain).y));
}

}  // namespace
