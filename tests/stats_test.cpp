// RoutingStats (SEMANTICS 14) and their merge: the statistics of two calls merged equal the
// statistics of one call over both calls' tokens (same groups), counts and fractions alike.
#include <gtest/gtest.h>

#include "support/matrices.hpp"
#include "switchmoe/switchmoe.hpp"

namespace {

using switchmoe::Matrix;
using switchmoe::Mode;
using switchmoe::RoutingStats;

// Hand-built: 4 tokens, k = 2, 3 experts, capacity 2, one group.
//   t0: e0 kept (0.5), e1 kept (0.25)   t1: e0 kept (0.5), e2 dropped
//   t2: e0 dropped, e1 dropped          t3: e2 kept (1.0), e1 kept (0.25)
TEST(RoutingStats, HandComputedCounts) {
  switchmoe::Routing r;
  r.expert.resize(4, 2);
  r.slot.resize(4, 2);
  r.gate.resize(4, 2);
  r.expert << 0, 1, 0, 2, 0, 1, 2, 1;
  r.slot << 0, 0, 1, -1, -1, -1, 0, 1;
  r.gate << 0.5f, 0.25f, 0.5f, 0.0f, 0.0f, 0.0f, 1.0f, 0.25f;
  r.capacity = 2;
  r.group_size = 4;
  const RoutingStats s = switchmoe::routing_stats(r, 3);
  EXPECT_EQ(s.tokens_per_expert, (std::vector<int>{3, 3, 2}));
  EXPECT_EQ(s.kept_tokens_per_expert, (std::vector<int>{2, 2, 1}));
  EXPECT_EQ(s.tokens, 4);
  EXPECT_EQ(s.choices, 8);
  EXPECT_EQ(s.kept_choices, 5);
  EXPECT_EQ(s.dropped_tokens, 1);
  EXPECT_DOUBLE_EQ(s.dropped_fraction, 3.0 / 8);
  EXPECT_DOUBLE_EQ(s.dropped_token_fraction, 1.0 / 4);
  EXPECT_DOUBLE_EQ(s.router_confidence, 2.5 / 5);
  EXPECT_DOUBLE_EQ(s.expert_usage, 5.0 / (3 * 2 * 1));
}

TEST(RoutingStats, MergeEqualsOneCallOverAllTokens) {
  switchmoe::RoutingOptions o;
  o.num_experts = 5;
  o.top_k = 2;
  o.group_size = 8;
  o.capacity_factor = 1.0;
  const Matrix<float> logits = switchmoe_test::random_matrix(24, 5, 9, 2.0f);
  const auto whole = switchmoe::routing_stats(switchmoe::route(logits, o, Mode::kTrain), 5);
  const auto first =
      switchmoe::routing_stats(switchmoe::route(logits.topRows(16), o, Mode::kTrain), 5);
  const auto last =
      switchmoe::routing_stats(switchmoe::route(logits.bottomRows(8), o, Mode::kTrain), 5);
  RoutingStats merged;
  merged.merge(first);
  merged.merge(last);
  EXPECT_EQ(merged.tokens_per_expert, whole.tokens_per_expert);
  EXPECT_EQ(merged.kept_tokens_per_expert, whole.kept_tokens_per_expert);
  EXPECT_EQ(merged.tokens, 24);
  EXPECT_EQ(merged.groups, 3);
  EXPECT_EQ(merged.kept_choices, whole.kept_choices);
  EXPECT_NEAR(merged.dropped_fraction, whole.dropped_fraction, 1e-12);
  EXPECT_NEAR(merged.dropped_token_fraction, whole.dropped_token_fraction, 1e-12);
  EXPECT_NEAR(merged.router_confidence, whole.router_confidence, 1e-6);
  EXPECT_NEAR(merged.expert_usage, whole.expert_usage, 1e-12);
  EXPECT_NEAR(merged.aux_loss, whole.aux_loss, 1e-6);  // mean over groups
  EXPECT_NEAR(merged.z_loss, whole.z_loss, 1e-5);      // mean over tokens
  RoutingStats other_width;
  other_width.tokens_per_expert.assign(3, 0);
  EXPECT_THROW(merged.merge(other_width), std::invalid_argument);
}

}  // namespace
