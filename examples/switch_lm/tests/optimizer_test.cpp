// AdamW, gradient clipping and the learning-rate schedule against hand-computed values.

#include "optimizer.hpp"

#include <gtest/gtest.h>

namespace switch_lm {
namespace {

TEST(AdamWTest, FirstStepMovesEachWeightByLearningRateAgainstItsGradientSign) {
  MatrixX<double> w(1, 3), g(1, 3);
  w << 1.0, -2.0, 0.5;
  g << 0.3, -4.0, 1e-3;
  AdamWConfig config;
  config.weight_decay = 0.0;
  AdamW<double> adam(config);
  adam.step({{"w", &w, &g, true}}, 0.01);
  // Bias-corrected m / sqrt(v) = g / |g| on the first step.
  EXPECT_NEAR(w(0, 0), 1.0 - 0.01, 1e-6);
  EXPECT_NEAR(w(0, 1), -2.0 + 0.01, 1e-6);
  EXPECT_NEAR(w(0, 2), 0.5 - 0.01, 1e-4);
}

TEST(AdamWTest, WeightDecayIsDecoupledAndOnlyOnFlaggedTensors) {
  MatrixX<double> w = MatrixX<double>::Constant(1, 2, 2.0), g = MatrixX<double>::Zero(1, 2);
  MatrixX<double> b = MatrixX<double>::Constant(1, 2, 2.0), gb = MatrixX<double>::Zero(1, 2);
  AdamWConfig config;
  config.weight_decay = 0.1;
  AdamW<double> adam(config);
  adam.step({{"w", &w, &g, true}, {"b", &b, &gb, false}}, 0.5);
  EXPECT_NEAR(w(0, 0), 2.0 * (1.0 - 0.5 * 0.1), 1e-12);  // zero gradient: only the decay moves it
  EXPECT_EQ(b(0, 0), 2.0);
}

TEST(ClipGradNormTest, ScalesToMaxNormAndReportsTheNormBefore) {
  MatrixX<double> w1(1, 1), g1(1, 1), w2(1, 1), g2(1, 1);
  g1 << 3.0;
  g2 << 4.0;
  ParamList<double> params{{"a", &w1, &g1, true}, {"b", &w2, &g2, true}};
  EXPECT_NEAR(clip_grad_norm(params, 1.0), 5.0, 1e-12);
  EXPECT_NEAR(g1(0, 0), 0.6, 1e-9);
  EXPECT_NEAR(g2(0, 0), 0.8, 1e-9);
  EXPECT_NEAR(clip_grad_norm(params, 10.0), 1.0, 1e-9);  // below the limit: unchanged
  EXPECT_NEAR(g1(0, 0), 0.6, 1e-9);
}

TEST(LrScheduleTest, WarmsUpLinearlyThenDecaysByCosineToTheFloor) {
  const LrSchedule s{1.0, 10, 110, 0.1};
  EXPECT_NEAR(s.at(1), 0.1, 1e-12);
  EXPECT_NEAR(s.at(10), 1.0, 1e-12);
  EXPECT_NEAR(s.at(60), 0.1 + 0.9 * 0.5, 1e-12);  // halfway through the decay
  EXPECT_NEAR(s.at(110), 0.1, 1e-12);
  EXPECT_NEAR(s.at(500), 0.1, 1e-12);
  for (int step = 11; step < 110; ++step) EXPECT_LE(s.at(step + 1), s.at(step));
}

}  // namespace
}  // namespace switch_lm
