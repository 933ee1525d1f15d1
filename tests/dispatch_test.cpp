// Dispatch (SEMANTICS 1, 5, 7): a routing becomes contiguous per-expert row blocks (gather) and
// expert outputs come back weighted by the gates (combine); dropped choices vanish.
#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <vector>

#include "reference/common.hpp"
#include "switchmoe/switchmoe.hpp"

namespace {

using switchmoe::DispatchPlan;
using switchmoe::Matrix;
using switchmoe::Mode;
using switchmoe::Routing;
namespace ref = switchmoe_test::ref;

// 5 tokens, k = 2, 3 experts, one group. Kept choices (expert, slot):
//   t0: (0,0) (1,0)   t1: (1,1) (2,0)   t2: (0,1) dropped   t3: (2,1) (0,2)   t4: dropped dropped
Routing hand_routing() {
  Routing r;
  r.expert.resize(5, 2);
  r.slot.resize(5, 2);
  r.gate.resize(5, 2);
  r.expert << 0, 1, 1, 2, 0, 2, 2, 0, 1, 0;
  r.slot << 0, 0, 1, 0, 1, -1, 1, 2, -1, -1;
  r.gate << 0.5f, 0.25f, 0.75f, 0.125f, 1.0f, 0.0f, 0.5f, 2.0f, 0.0f, 0.0f;
  r.logits = Matrix<float>::Zero(5, 3);
  r.probs = Matrix<float>::Constant(5, 3, 1.0f / 3);
  r.capacity = 3;
  r.group_size = 5;
  return r;
}

TEST(DispatchPlan, HandBuiltLayout) {
  const DispatchPlan plan = switchmoe::make_dispatch_plan(hand_routing(), 3);
  EXPECT_EQ(plan.num_experts, 3);
  EXPECT_EQ(plan.top_k, 2);
  // Expert 0: slots 0,1,2 = (t0,c0), (t2,c0), (t3,c1); expert 1: (t0,c1), (t1,c0);
  // expert 2: (t1,c1), (t3,c0).
  EXPECT_EQ(plan.offsets, (std::vector<int>{0, 3, 5, 7}));
  EXPECT_EQ(plan.num_rows(), 7);
  EXPECT_EQ(plan.rows_of(0), 3);
  EXPECT_EQ(plan.rows_of(1), 2);
  EXPECT_EQ(plan.rows_of(2), 2);
  EXPECT_EQ(plan.token, (std::vector<int>{0, 2, 3, 0, 1, 1, 3}));
  EXPECT_EQ(plan.choice, (std::vector<int>{0, 0, 1, 1, 0, 1, 0}));
  EXPECT_EQ(plan.row, (std::vector<int>{0, 3, 4, 5, 1, -1, 6, 2, -1, -1}));
}

TEST(DispatchPlan, GroupsOrderedByGroupThenSlot) {
  // 4 tokens in 2 groups of 2, k = 1, 2 experts; slots restart in every group.
  Routing r;
  r.expert.resize(4, 1);
  r.slot.resize(4, 1);
  r.gate = Matrix<float>::Ones(4, 1);
  r.expert << 1, 1, 0, 1;
  r.slot << 1, 0, 0, 0;  // group 0: t1 before t0 in expert 1 (probability priority)
  r.group_size = 2;
  r.capacity = 2;
  const DispatchPlan plan = switchmoe::make_dispatch_plan(r, 2);
  EXPECT_EQ(plan.offsets, (std::vector<int>{0, 1, 4}));
  EXPECT_EQ(plan.token, (std::vector<int>{2, 1, 0, 3}));
  EXPECT_EQ(plan.row, (std::vector<int>{2, 1, 0, 3}));
}

TEST(DispatchPlan, GatherAndCombine) {
  const Routing r = hand_routing();
  const DispatchPlan plan = switchmoe::make_dispatch_plan(r, 3);
  Matrix<float> x(5, 3);
  std::mt19937 gen(1);
  ref::fill_uniform(x, gen, -1, 1);
  Matrix<float> xg;
  switchmoe::gather(x, plan, xg);
  ASSERT_EQ(xg.rows(), 7);
  ASSERT_EQ(xg.cols(), 3);
  for (int row = 0; row < 7; ++row) EXPECT_EQ(xg.row(row), x.row(plan.token[row]));
  Matrix<Eigen::bfloat16> xb;
  switchmoe::gather(x, plan, xb);
  for (int row = 0; row < 7; ++row)
    for (int j = 0; j < 3; ++j)
      EXPECT_EQ(static_cast<float>(xb(row, j)),
                static_cast<float>(static_cast<Eigen::bfloat16>(x(plan.token[row], j))));
  // Into a view of kept storage: the same rows; a view of the wrong shape is refused.
  Matrix<float> storage = Matrix<float>::Zero(9, 3);
  switchmoe::gather<float>(x, plan, storage.topRows(7));
  EXPECT_EQ(storage.topRows(7), xg);
  EXPECT_EQ(storage.bottomRows(2), Matrix<float>::Zero(2, 3));
  EXPECT_THROW(switchmoe::gather<float>(x, plan, storage.topRows(6)), std::invalid_argument);
  // Combine: yg rows are distinct, y[t] = sum over kept c of gate(t,c) * yg[row(t,c)].
  Matrix<float> yg(7, 2);
  for (int row = 0; row < 7; ++row) yg.row(row) << float(row + 1), float(10 * (row + 1));
  Matrix<float> y;
  switchmoe::combine(yg, plan, r, y);
  ASSERT_EQ(y.rows(), 5);
  ASSERT_EQ(y.cols(), 2);
  // t0 = 0.5*row0 + 0.25*row3; t1 = 0.75*row4 + 0.125*row5; t2 = 1*row1;
  // t3 = 0.5*row6 + 2*row2; t4 = 0 exactly.
  const float expect0[] = {0.5f * 1 + 0.25f * 4, 0.75f * 5 + 0.125f * 6, 1.0f * 2,
                           0.5f * 7 + 2.0f * 3, 0.0f};
  for (int t = 0; t < 5; ++t) {
    EXPECT_FLOAT_EQ(y(t, 0), expect0[t]) << t;
    EXPECT_FLOAT_EQ(y(t, 1), 10 * expect0[t]) << t;
  }
  EXPECT_EQ(y(4, 0), 0.0f);
  EXPECT_EQ(y(4, 1), 0.0f);
}

// Plans of real routings: every kept choice appears once, in its expert's block, ordered by
// (group, slot); dropped ones nowhere.
TEST(DispatchPlan, ConsistentWithRoute) {
  std::mt19937 gen(3);
  for (int trial = 0; trial < 20; ++trial) {
    switchmoe::RoutingOptions o;
    o.num_experts = 1 + gen() % 6;
    o.top_k = 1 + gen() % std::min(3, o.num_experts);
    o.group_size = (gen() % 2) ? 6 : 0;
    o.min_capacity = 1;
    o.capacity_factor = 0.5 + 0.25 * (gen() % 4);
    o.priority =
        (gen() % 2) ? switchmoe::Priority::kRouterProbability : switchmoe::Priority::kTokenOrder;
    const int tokens = 6 * (1 + gen() % 5);
    Matrix<float> logits(tokens, o.num_experts);
    ref::fill_uniform(logits, gen, -2, 2);
    const Routing r = switchmoe::route(logits, o, Mode::kTrain);
    const DispatchPlan plan = switchmoe::make_dispatch_plan(r, o.num_experts);
    int kept = 0;
    for (int t = 0; t < tokens; ++t)
      for (int c = 0; c < o.top_k; ++c) {
        const int row = plan.row[t * o.top_k + c];
        if (r.slot(t, c) < 0) {
          EXPECT_EQ(row, -1);
          continue;
        }
        ++kept;
        ASSERT_GE(row, 0);
        const int e = r.expert(t, c);
        EXPECT_GE(row, plan.offsets[e]);
        EXPECT_LT(row, plan.offsets[e + 1]);
        EXPECT_EQ(plan.token[row], t);
        EXPECT_EQ(plan.choice[row], c);
      }
    EXPECT_EQ(plan.num_rows(), kept);
    const int g = r.group_size;
    for (int e = 0; e < o.num_experts; ++e)
      for (int row = plan.offsets[e]; row + 1 < plan.offsets[e + 1]; ++row) {
        const int t0 = plan.token[row], t1 = plan.token[row + 1];
        const auto key0 = std::make_pair(t0 / g, r.slot(t0, plan.choice[row]));
        const auto key1 = std::make_pair(t1 / g, r.slot(t1, plan.choice[row + 1]));
        EXPECT_LT(key0, key1);
      }
  }
}

TEST(DispatchPlan, BadRouting) {
  Routing r = hand_routing();
  r.expert(2, 0) = 3;
  EXPECT_THROW(switchmoe::make_dispatch_plan(r, 3), std::invalid_argument);
  r = hand_routing();
  r.expert(2, 0) = -1;
  EXPECT_THROW(switchmoe::make_dispatch_plan(r, 3), std::invalid_argument);
  r = hand_routing();
  r.slot(3, 1) = 1;  // expert 0 now has slots 0, 1, 1
  EXPECT_THROW(switchmoe::make_dispatch_plan(r, 3), std::invalid_argument);
  r = hand_routing();
  r.slot(3, 1) = 5;  // expert 0 slots 0, 1, 5: not dense
  EXPECT_THROW(switchmoe::make_dispatch_plan(r, 3), std::invalid_argument);
  r = hand_routing();
  r.slot(0, 0) = -2;
  EXPECT_THROW(switchmoe::make_dispatch_plan(r, 3), std::invalid_argument);
  r = hand_routing();
  r.slot.resize(4, 2);
  EXPECT_THROW(switchmoe::make_dispatch_plan(r, 3), std::invalid_argument);
  r = hand_routing();
  r.gate.resize(5, 1);
  EXPECT_THROW(switchmoe::make_dispatch_plan(r, 3), std::invalid_argument);
  r = hand_routing();
  EXPECT_THROW(switchmoe::make_dispatch_plan(r, 1), std::invalid_argument);  // k = 2 > 1 expert
}

// A routing whose group_size does not divide its token count is malformed (SEMANTICS 5: tokens
// are split into groups of group_size); walking its last group would read past the last token.
TEST(DispatchPlan, GroupSizeMustDivideTokens) {
  // 5 tokens, k = 1, 2 experts, slots consistent with groups of 3: {t0, t1, t2}, {t3, t4, -}.
  Routing r;
  r.expert.resize(5, 1);
  r.slot.resize(5, 1);
  r.gate = Matrix<float>::Ones(5, 1);
  r.expert << 0, 0, 1, 0, 1;
  r.slot << 0, 1, 0, 0, 0;
  r.capacity = 2;
  r.group_size = 3;
  EXPECT_THROW(switchmoe::make_dispatch_plan(r, 2), std::invalid_argument);
  r.group_size = -1;
  EXPECT_THROW(switchmoe::make_dispatch_plan(r, 2), std::invalid_argument);
}

TEST(DispatchPlan, ZeroTokens) {
  Routing r;
  r.expert.resize(0, 1);
  r.slot.resize(0, 1);
  r.gate.resize(0, 1);
  const DispatchPlan plan = switchmoe::make_dispatch_plan(r, 4);
  EXPECT_EQ(plan.num_rows(), 0);
  EXPECT_EQ(plan.offsets, (std::vector<int>(5, 0)));
  Matrix<float> y;
  switchmoe::combine(Matrix<float>(0, 3), plan, r, y);
  EXPECT_EQ(y.rows(), 0);
}

}  // namespace
