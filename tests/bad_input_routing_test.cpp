// Bad input to the routing components (issue 14): route, route_backward, expert_capacity,
// routing_stats, the losses and the Router validate their arguments against each other before
// touching memory, and name what was wrong.
#include <gtest/gtest.h>

#include <limits>

#include "support/expect_throw.hpp"
#include "support/matrices.hpp"
#include "switchmoe/switchmoe.hpp"

namespace {

using switchmoe::Matrix;
using switchmoe::Mode;
using switchmoe::Routing;
using switchmoe::RoutingOptions;
using switchmoe_test::random_matrix;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

RoutingOptions options(int experts = 4, int k = 2) {
  RoutingOptions o;
  o.num_experts = experts;
  o.top_k = k;
  return o;
}

TEST(BadInputRoute, RejectsBadOptionsModesAndLogits) {
  const Matrix<float> logits = random_matrix(6, 4, 1);
  RoutingOptions o = options();
  o.priority = static_cast<switchmoe::Priority>(9);
  EXPECT_THROW_WITH(switchmoe::route(logits, o, Mode::kTrain), std::invalid_argument,
                    "priority is 9");
  EXPECT_THROW_WITH(switchmoe::route(logits, options(), static_cast<Mode>(3)),
                    std::invalid_argument, "mode is 3");
  EXPECT_THROW_WITH(switchmoe::expert_capacity(8, options(), static_cast<Mode>(3)),
                    std::invalid_argument, "mode is 3");
  Matrix<float> bad = logits;
  bad(2, 3) = kNaN;
  Routing routing = switchmoe::route(logits, options(), Mode::kTrain);
  const Routing before = routing;
  EXPECT_THROW_WITH(switchmoe::route(bad, options(), Mode::kTrain, routing), std::invalid_argument,
                    "logits(2, 3) is nan");
  EXPECT_EQ(routing.expert, before.expert) << "a failed route changed its output";
  EXPECT_THROW_WITH(switchmoe::route(random_matrix(6, 3, 1), options(), Mode::kTrain),
                    std::invalid_argument, "logits has 3 columns, expected num_experts = 4");
}

TEST(BadInputRouteBackward, ChecksRoutingGateGradientsAndCoefficients) {
  const Matrix<float> logits = random_matrix(6, 4, 1);
  Routing routing = switchmoe::route(logits, options(), Mode::kTrain);
  const Matrix<float> dgate = random_matrix(6, 2, 2);
  EXPECT_THROW_WITH(switchmoe::route_backward(routing, random_matrix(6, 1, 2), options(), 0.01f, 0),
                    std::invalid_argument, "dgate has shape [6, 1], expected [6, 2]");
  Matrix<float> bad = dgate;
  bad(1, 1) = kNaN;
  EXPECT_THROW_WITH(switchmoe::route_backward(routing, bad, options(), 0.01f, 0),
                    std::invalid_argument, "dgate(1, 1) is nan");
  EXPECT_THROW_WITH(switchmoe::route_backward(routing, dgate, options(), kNaN, 0),
                    std::invalid_argument, "aux_coef is nan");
  EXPECT_THROW_WITH(switchmoe::route_backward(routing, dgate, options(), 0.01f,
                                              std::numeric_limits<float>::infinity()),
                    std::invalid_argument, "z_coef is inf");
  Routing broken = routing;
  broken.expert(0, 0) = 17;  // would index probs out of bounds
  EXPECT_THROW_WITH(switchmoe::route_backward(broken, dgate, options(), 0.01f, 0),
                    std::invalid_argument, "routing.expert(0, 0) is 17");
  broken = routing;
  broken.probs.resize(5, 4);
  EXPECT_THROW_WITH(switchmoe::route_backward(broken, dgate, options(), 0.01f, 0),
                    std::invalid_argument, "routing.probs has shape [5, 4]");
}

TEST(BadInputRoutingStats, ChecksIdsAndShapes) {
  Routing routing = switchmoe::route(random_matrix(6, 4, 1), options(), Mode::kTrain);
  routing.expert(2, 0) = 3;  // valid with 4 experts, out of range with 3
  EXPECT_NO_THROW(switchmoe::routing_stats(routing, 4));
  EXPECT_THROW_WITH(switchmoe::routing_stats(routing, 3), std::invalid_argument,
                    "routing.expert(2, 0) is 3, expected in [0, 3)");
  Routing broken = routing;
  broken.expert(5, 1) = -2;
  EXPECT_THROW_WITH(switchmoe::routing_stats(broken, 4), std::invalid_argument,
                    "routing.expert(5, 1) is -2");
  broken = routing;
  broken.slot.resize(6, 1);
  EXPECT_THROW_WITH(switchmoe::routing_stats(broken, 4), std::invalid_argument,
                    "routing.slot has shape [6, 1]");
}

TEST(BadInputLosses, ChecksExpertIdsAndFiniteness) {
  const Matrix<float> probs = Matrix<float>::Constant(4, 3, 1.0f / 3);
  Matrix<int> expert(4, 1);
  expert << 0, 1, 2, 3;  // 3 is out of range
  EXPECT_THROW_WITH(switchmoe::load_balancing_loss(probs, expert, 0), std::invalid_argument,
                    "expert(3, 0) is 3");
  Matrix<float> logits = random_matrix(3, 3, 1);
  logits(1, 0) = kNaN;
  EXPECT_THROW_WITH(switchmoe::router_z_loss(logits), std::invalid_argument, "logits(1, 0) is nan");
}

TEST(BadInputRouter, ChecksShapesModeAndParameters) {
  switchmoe::Router<> router(switchmoe::RouterConfig{4, 3, true, 0.0f, 0.1f, 1});
  Matrix<float> logits;
  EXPECT_THROW_WITH(router.forward(random_matrix(2, 5, 1), Mode::kEval, logits),
                    std::invalid_argument, "x has shape [2, 5], expected [any, 4]");
  EXPECT_THROW_WITH(router.forward(random_matrix(2, 4, 1), static_cast<Mode>(2), logits),
                    std::invalid_argument, "mode is 2");
  router.forward(random_matrix(2, 4, 1), Mode::kTrain, logits);
  router.weight() = Matrix<float>::Zero(4, 1);
  EXPECT_THROW_WITH(router.forward(random_matrix(2, 4, 1), Mode::kEval, logits),
                    std::invalid_argument, "router weight has shape [4, 1], expected [4, 3]");
  // The failed forward must not leave the earlier training state for backward.
  EXPECT_THROW_WITH(router.backward(random_matrix(2, 3, 1)), std::invalid_argument,
                    "before a Mode::kTrain forward");
}

// A caller's view whose row stride does not fit in int computed wrong logits before (the
// stride was cast to int). The stride is only read, so a strided Map over a small buffer with
// one row exercises it without touching memory beyond the row.
TEST(BadInputRouter, RowStrideBeyondIntIsHandled) {
  switchmoe::Router<> router(switchmoe::RouterConfig{4, 3, false, 0.0f, 0.1f, 1});
  Matrix<float> one_row = random_matrix(1, 4, 3);
  const Eigen::Index huge = Eigen::Index(std::numeric_limits<int>::max()) + 17;
  Eigen::Map<const Matrix<float>, 0, Eigen::OuterStride<>> strided(one_row.data(), 1, 4,
                                                                   Eigen::OuterStride<>(huge));
  Matrix<float> got, want;
  router.forward(strided, Mode::kEval, got);
  router.forward(one_row, Mode::kEval, want);
  EXPECT_TRUE(switchmoe_test::SameBits(got, want));
}

// A routing that these options could not have made (token choice with k = 1, given to the
// expert-choice backward, which visits one position per expert) read out of bounds before.
TEST(BadInputRouteBackward, RoutingMustMatchTheMethod) {
  RoutingOptions token = options(4, 1);
  Routing routing = switchmoe::route(random_matrix(6, 4, 1), token, Mode::kTrain);
  RoutingOptions expert_choice = token;
  expert_choice.method = switchmoe::RoutingMethod::kExpertChoice;
  EXPECT_THROW_WITH(
      switchmoe::route_backward(routing, random_matrix(6, 1, 2), expert_choice, 0.0f, 0.0f),
      std::invalid_argument, "expert choice: one position per expert");
  EXPECT_THROW_WITH(
      switchmoe::route_backward(routing, random_matrix(6, 1, 2), options(4, 2), 0.0f, 0.0f),
      std::invalid_argument, "routing.expert has shape [6, 1], expected [any, 2]");
}

}  // namespace
