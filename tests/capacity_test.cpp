// Tests of switchmoe::expert_capacity (SEMANTICS rule 6):
//   C = max(min_capacity, min(T_g, floor(capacity_factor * T_g / E)))
// with capacity_factor 1.25 in training and 2.0 in evaluation; an explicit capacity overrides
// the factor. Expected values are worked out by hand in the comments.
#include "switchmoe/routing/capacity.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "reference/routing_reference.hpp"
#include "support/expect_throw.hpp"

namespace {

using switchmoe::expert_capacity;
using switchmoe::Mode;
using switchmoe::RoutingOptions;
using switchmoe_test::ThrowsInvalidArgumentNaming;

RoutingOptions options(int experts, double factor, int min_capacity) {
  RoutingOptions o;
  o.num_experts = experts;
  o.capacity_factor = factor;
  o.eval_capacity_factor = factor;
  o.min_capacity = min_capacity;
  return o;
}

TEST(ExpertCapacity, DefaultsAreTrainFactor125EvalFactor2MinCapacity4) {
  const RoutingOptions o;
  EXPECT_EQ(o.capacity_factor, 1.25);
  EXPECT_EQ(o.eval_capacity_factor, 2.0);
  EXPECT_EQ(o.min_capacity, 4);
  EXPECT_EQ(o.expert_capacity, 0);
  EXPECT_EQ(o.top_k, 1);
  EXPECT_EQ(o.group_size, 0);
  EXPECT_EQ(o.priority, switchmoe::Priority::kTokenOrder);
  EXPECT_FALSE(o.dropless);
  EXPECT_FALSE(o.renormalize);
}

TEST(ExpertCapacity, MinCapacityRaisesTheFloor) {
  // T=10, E=4, f=1.25: 1.25 * 10 / 4 = 3.125 -> floor 3; max(4, min(10, 3)) = 4.
  EXPECT_EQ(expert_capacity(10, options(4, 1.25, 4), Mode::kTrain), 4);
}

TEST(ExpertCapacity, FloorNotRoundNotCeil) {
  // T=10, E=4, f=1.25: 3.125 -> floor 3, round 3, ceil 4.
  EXPECT_EQ(expert_capacity(10, options(4, 1.25, 1), Mode::kTrain), 3);
  // T=14, E=4, f=1.25: 4.375 -> floor 4, round 4, ceil 5.
  EXPECT_EQ(expert_capacity(14, options(4, 1.25, 1), Mode::kTrain), 4);
  // T=12, E=8, f=1.25: 1.875 -> floor 1, round 2, ceil 2.
  EXPECT_EQ(expert_capacity(12, options(8, 1.25, 1), Mode::kTrain), 1);
  // T=12, E=8, f=1.25, min 0: still 1.
  EXPECT_EQ(expert_capacity(12, options(8, 1.25, 0), Mode::kTrain), 1);
  // T=6, E=4, f=1.5: 2.25 -> floor 2 (ceil 3).
  EXPECT_EQ(expert_capacity(6, options(4, 1.5, 0), Mode::kTrain), 2);
  // T=7, E=2, f=1.0: 3.5 -> floor 3, round 4, ceil 4.
  EXPECT_EQ(expert_capacity(7, options(2, 1.0, 0), Mode::kTrain), 3);
}

TEST(ExpertCapacity, ExactMultipleIsNotRoundedDown) {
  // T=64, E=4, f=1.25: exactly 20. T=16, E=8, f=2.0: exactly 4. T=8, E=8, f=1.0: exactly 1.
  EXPECT_EQ(expert_capacity(64, options(4, 1.25, 0), Mode::kTrain), 20);
  EXPECT_EQ(expert_capacity(16, options(8, 2.0, 0), Mode::kTrain), 4);
  EXPECT_EQ(expert_capacity(8, options(8, 1.0, 0), Mode::kTrain), 1);
}

TEST(ExpertCapacity, CanBeZeroWhenMinCapacityIsZero) {
  // T=2, E=8, f=1.25: 0.3125 -> 0; max(0, min(2, 0)) = 0: every choice will be dropped.
  EXPECT_EQ(expert_capacity(2, options(8, 1.25, 0), Mode::kTrain), 0);
  // T=0: max(0, min(0, 0)) = 0.
  EXPECT_EQ(expert_capacity(0, options(8, 1.25, 0), Mode::kTrain), 0);
}

TEST(ExpertCapacity, NeverAboveGroupTokensFromTheFactor) {
  // T=8, E=2, f=10: 40 -> min(8, 40) = 8 (an expert never needs more slots than tokens).
  EXPECT_EQ(expert_capacity(8, options(2, 10.0, 1), Mode::kTrain), 8);
  // T=5, E=1, f=1.25: 6.25 -> floor 6 -> min(5, 6) = 5.
  EXPECT_EQ(expert_capacity(5, options(1, 1.25, 0), Mode::kTrain), 5);
  // E=1, f=2 (eval): 2*T -> T.
  EXPECT_EQ(expert_capacity(9, options(1, 2.0, 0), Mode::kEval), 9);
}

TEST(ExpertCapacity, MinCapacityAppliesAfterTheTokenCap) {
  // Literal formula: max(min_capacity, min(T_g, ...)). T=1, E=4, f=1.25, min 4:
  // min(1, floor(0.3125)=0) = 0 -> max(4, 0) = 4.
  EXPECT_EQ(expert_capacity(1, options(4, 1.25, 4), Mode::kTrain), 4);
  // T=2, E=1, f=10, min 3: min(2, 20) = 2 -> max(3, 2) = 3.
  EXPECT_EQ(expert_capacity(2, options(1, 10.0, 3), Mode::kTrain), 3);
}

TEST(ExpertCapacity, ModeSelectsTheFactor) {
  RoutingOptions o = options(4, 1.25, 0);
  o.eval_capacity_factor = 2.0;
  // T=64, E=4: train 1.25 * 16 = 20, eval 2.0 * 16 = 32.
  EXPECT_EQ(expert_capacity(64, o, Mode::kTrain), 20);
  EXPECT_EQ(expert_capacity(64, o, Mode::kEval), 32);
  // Swapping the factors swaps the results: each mode reads only its own factor.
  o.capacity_factor = 2.0;
  o.eval_capacity_factor = 1.25;
  EXPECT_EQ(expert_capacity(64, o, Mode::kTrain), 32);
  EXPECT_EQ(expert_capacity(64, o, Mode::kEval), 20);
}

TEST(ExpertCapacity, DefaultOptionsTrainAndEval) {
  RoutingOptions o;
  o.num_experts = 8;
  // T=128, E=8: train floor(1.25 * 16) = 20, eval floor(2.0 * 16) = 32.
  EXPECT_EQ(expert_capacity(128, o, Mode::kTrain), 20);
  EXPECT_EQ(expert_capacity(128, o, Mode::kEval), 32);
  // T=20, E=8: train floor(3.125) = 3 -> min_capacity 4; eval floor(5.0) = 5.
  EXPECT_EQ(expert_capacity(20, o, Mode::kTrain), 4);
  EXPECT_EQ(expert_capacity(20, o, Mode::kEval), 5);
}

TEST(ExpertCapacity, ExplicitCapacityOverridesBothFactors) {
  RoutingOptions o = options(4, 1.25, 4);
  o.eval_capacity_factor = 2.0;
  o.expert_capacity = 7;  // within [min_capacity, T_g]: every reading of rule 6 agrees
  // The factors would give 20 (train) and 32 (eval) for T=64.
  EXPECT_EQ(expert_capacity(64, o, Mode::kTrain), 7);
  EXPECT_EQ(expert_capacity(64, o, Mode::kEval), 7);
  o.expert_capacity = 64;
  EXPECT_EQ(expert_capacity(64, o, Mode::kTrain), 64);
}

TEST(ExpertCapacity, MatchesReferenceOnAGrid) {
  for (int experts : {1, 2, 3, 4, 7, 8, 16}) {
    for (int tokens : {0, 1, 2, 3, 5, 8, 10, 12, 14, 31, 64, 100}) {
      for (double factor : {0.5, 1.0, 1.25, 1.5, 2.0, 3.0}) {
        for (int min_capacity : {0, 1, 4}) {
          for (Mode mode : {Mode::kTrain, Mode::kEval}) {
            RoutingOptions o = options(experts, factor, min_capacity);
            if (mode == Mode::kTrain) o.eval_capacity_factor = 2.0;
            if (mode == Mode::kEval) o.capacity_factor = 1.25;
            SCOPED_TRACE(::testing::Message() << "T=" << tokens << " E=" << experts
                                              << " f=" << factor << " min=" << min_capacity);
            EXPECT_EQ(expert_capacity(tokens, o, mode),
                      switchmoe_test::ref::capacity(tokens, o, mode == Mode::kTrain));
          }
        }
      }
    }
  }
}

TEST(ExpertCapacity, RejectsBadNumExperts) {
  for (int experts : {0, -3}) {
    RoutingOptions o = options(experts, 1.25, 4);
    EXPECT_TRUE(ThrowsInvalidArgumentNaming([&] { expert_capacity(8, o, Mode::kTrain); },
                                            {"num_experts", std::to_string(experts)}));
  }
}

TEST(ExpertCapacity, RejectsBadTrainFactor) {
  RoutingOptions o = options(4, 1.25, 4);
  for (double bad : {0.0, -1.5, std::numeric_limits<double>::quiet_NaN()}) {
    o.capacity_factor = bad;
    o.eval_capacity_factor = 2.0;
    EXPECT_TRUE(ThrowsInvalidArgumentNaming([&] { expert_capacity(8, o, Mode::kTrain); },
                                            {"capacity_factor"}));
  }
  o.capacity_factor = -1.5;
  EXPECT_TRUE(ThrowsInvalidArgumentNaming([&] { expert_capacity(8, o, Mode::kTrain); },
                                          {"capacity_factor", "-1.5"}));
}

TEST(ExpertCapacity, RejectsBadEvalFactor) {
  RoutingOptions o = options(4, 1.25, 4);
  for (double bad : {0.0, -2.5, std::numeric_limits<double>::quiet_NaN()}) {
    o.capacity_factor = 1.25;
    o.eval_capacity_factor = bad;
    EXPECT_TRUE(ThrowsInvalidArgumentNaming([&] { expert_capacity(8, o, Mode::kEval); },
                                            {"eval_capacity_factor"}));
  }
}

TEST(ExpertCapacity, RejectsNegativeSizes) {
  RoutingOptions o = options(4, 1.25, 4);
  o.expert_capacity = -2;
  EXPECT_TRUE(ThrowsInvalidArgumentNaming([&] { expert_capacity(8, o, Mode::kTrain); },
                                          {"expert_capacity", "-2"}));
  o = options(4, 1.25, -1);
  EXPECT_TRUE(ThrowsInvalidArgumentNaming([&] { expert_capacity(8, o, Mode::kTrain); },
                                          {"min_capacity", "-1"}));
  o = options(4, 1.25, 4);
  EXPECT_TRUE(ThrowsInvalidArgumentNaming([&] { expert_capacity(-5, o, Mode::kTrain); },
                                          {"group_tokens", "-5"}));
}

}  // namespace
