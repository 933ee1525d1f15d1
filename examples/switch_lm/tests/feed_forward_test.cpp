// The adapter around the library's DenseFFN and SwitchLayer, checked end to end through a block:
// the gradient the adapter passes back (including the load-balancing loss, which the library
// differentiates inside backward) must match finite differences of the task loss plus the
// reported auxiliary loss. The library layers are float-only: the loss is summed in double, and
// with h = 1e-3 float rounding of the forward pass (~1e-7 relative on ~30 terms of order 1) gives
// finite-difference errors ~ 1e-3; steps that cross a ReLU kink add a little more. A relative
// tolerance of 2e-2 separates those from real mistakes (which are of order 1). Jitter is off and
// every token fits in its expert, so that the steps do not change what the router does.

#include "feed_forward.hpp"

#include <gtest/gtest.h>

#include "block.hpp"
#include "gradient_check.hpp"

namespace switch_lm {
namespace {

using testing::expect_gradient;
using testing::random_matrix;
using testing::weighted_sum;
constexpr double kH = 1e-3;
constexpr double kTol = 2e-2;

template <class Make>
void check_block(Make make_feed_forward) {
  std::mt19937_64 rng(1);
  const int batch = 4, seq = 8, features = 8;
  Block<float, FeedForward<switchmoe::Fp32>> block(features, 2, make_feed_forward(features), 0.5,
                                                   0.5, rng);
  MatrixX<float> x = random_matrix<float>(batch * seq, features, 2);
  const MatrixX<float> r = random_matrix<float>(batch * seq, features, 3);
  auto loss = [&] {
    ParamList<float> touched;
    block.parameters(touched, "");  // non-const access: the library refreshes its compute copies
    const double task = weighted_sum(block.forward(x, batch, seq, switchmoe::Mode::kTrain), r);
    return task + block.feed_forward().aux_loss();
  };
  ParamList<float> params;
  block.parameters(params, "");
  for (auto& p : params) p.grad->setZero();
  block.feed_forward().zero_grad();
  loss();
  const MatrixX<float> dx = block.backward(r);
  expect_gradient("x", x, dx, loss, kH, kTol);
  params.clear();
  block.parameters(params, "");  // fresh references: the library refreshes compute copies
  for (auto& p : params) expect_gradient(p.name, *p.value, *p.grad, loss, kH, kTol, 20);
}

TEST(FeedForwardTest, DenseBlockGradientsMatchFiniteDifferences) {
  check_block([](int features) {
    switchmoe::DenseConfig config;
    config.d_model = features;
    config.d_ff = 16;
    config.init_scale = 1.0f;
    config.seed = 4;
    return FeedForward<switchmoe::Fp32>(config);
  });
}

TEST(FeedForwardTest, SwitchBlockGradientsMatchFiniteDifferences) {
  check_block([](int features) {
    switchmoe::SwitchConfig config;
    config.d_model = features;
    config.d_ff = 16;
    config.routing.num_experts = 2;
    config.routing.capacity_factor = 2.0;  // nothing dropped
    config.jitter_eps = 0.0f;
    config.aux_loss_coef = 0.1f;
    config.init_scale = 1.0f;
    config.seed = 5;
    return FeedForward<switchmoe::Fp32>(config);
  });
}

TEST(FeedForwardTest, SwitchReportsExpertLoadAndAuxLoss) {
  switchmoe::SwitchConfig config;
  config.d_model = 8;
  config.d_ff = 16;
  config.routing.num_experts = 4;
  config.seed = 6;
  FeedForward<switchmoe::Fp32> ffn(config);
  EXPECT_TRUE(ffn.is_switch());
  ffn.forward(random_matrix<float>(32, 8, 7), switchmoe::Mode::kTrain);
  const ExpertLoad& load = ffn.load();
  ASSERT_EQ(load.stats.tokens_per_expert.size(), 4u);
  double routed = 0.0, kept = 0.0;
  for (std::size_t e = 0; e < 4; ++e) {
    routed += load.stats.tokens_per_expert[e];
    kept += load.stats.kept_tokens_per_expert[e];
    EXPECT_LE(load.stats.kept_tokens_per_expert[e], load.stats.tokens_per_expert[e]);
  }
  EXPECT_EQ(routed, 32.0);
  EXPECT_NEAR(load.stats.dropped_fraction, (routed - kept) / routed, 1e-6);
  // Accumulating a second call doubles the counts and keeps the fraction.
  ExpertLoad twice = load;
  twice.accumulate(load);
  EXPECT_EQ(twice.calls, 2);
  EXPECT_EQ(twice.stats.tokens, 64);
  EXPECT_NEAR(twice.stats.dropped_fraction, (routed - kept) / routed, 1e-12);
  EXPECT_GT(ffn.aux_loss(), 0.0);  // alpha * aux with aux >= 1 at any balance
}

}  // namespace
}  // namespace switch_lm
