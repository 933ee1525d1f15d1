// Bad input to dispatch (issue 14): make_dispatch_plan, gather, combine, combine_backward and
// gather_backward check that the plan, the routing and the buffers belong together before any
// row is read or written. Before these checks, a plan naming a token beyond x, or a plan and
// buffers of different sizes, read or wrote out of bounds.
#include <gtest/gtest.h>

#include <vector>

#include "support/expect_throw.hpp"
#include "support/matrices.hpp"
#include "switchmoe/switchmoe.hpp"

namespace {

using switchmoe::DispatchPlan;
using switchmoe::Matrix;
using switchmoe::Mode;
using switchmoe::Routing;
using switchmoe_test::random_matrix;

struct Fixture {
  Matrix<float> x = random_matrix(8, 5, 1);
  Routing routing;
  DispatchPlan plan;
  Fixture() {
    switchmoe::RoutingOptions o;
    o.num_experts = 4;
    o.top_k = 2;
    o.expert_capacity = 3;  // drops some choices
    routing = switchmoe::route(random_matrix(8, 4, 2), o, Mode::kTrain);
    plan = switchmoe::make_dispatch_plan(routing, 4);
  }
};

TEST(BadInputDispatch, PlanOfAnInconsistentRouting) {
  Fixture f;
  Routing r = f.routing;
  r.slot(0, 0) = 99;  // beyond the group: would place a row out of bounds
  EXPECT_THROW_WITH(switchmoe::make_dispatch_plan(r, 4), std::invalid_argument,
                    "routing.slot(0, 0) is 99");
  r = f.routing;
  r.gate.resize(8, 1);
  EXPECT_THROW_WITH(switchmoe::make_dispatch_plan(r, 4), std::invalid_argument,
                    "routing.gate has shape [8, 1]");
  EXPECT_THROW_WITH(switchmoe::make_dispatch_plan(f.routing, 0), std::invalid_argument,
                    "num_experts is 0");
}

TEST(BadInputDispatch, GatherChecksTokensAgainstX) {
  Fixture f;
  Matrix<float> xg(f.plan.num_rows(), 5);
  EXPECT_THROW_WITH(switchmoe::gather<float>(f.x.topRows(4), f.plan, xg), std::invalid_argument,
                    "x has 4 rows");
  DispatchPlan broken = f.plan;
  broken.token[0] = 1000;
  EXPECT_THROW_WITH(switchmoe::gather<float>(f.x, broken, xg), std::invalid_argument, "plan row 0");
  broken = f.plan;
  broken.offsets.back() += 1;
  EXPECT_THROW_WITH(switchmoe::gather<float>(f.x, broken, xg), std::invalid_argument, "plan");
}

TEST(BadInputDispatch, CombineChecksPlanRoutingAndRows) {
  Fixture f;
  const Matrix<float> yg = random_matrix(f.plan.num_rows(), 5, 3);
  Matrix<float> y;
  EXPECT_THROW_WITH(switchmoe::combine(yg.topRows(f.plan.num_rows() - 1), f.plan, f.routing, y),
                    std::invalid_argument, "yg has shape");
  Routing fewer = f.routing;
  fewer.expert.conservativeResize(6, 2);
  fewer.gate.conservativeResize(6, 2);
  EXPECT_THROW_WITH(switchmoe::combine(yg, f.plan, fewer, y), std::invalid_argument, "plan.row");
  DispatchPlan broken = f.plan;
  broken.row[3] = 500;
  EXPECT_THROW_WITH(switchmoe::combine(yg, broken, y), std::invalid_argument, "plan");
  broken = f.plan;
  broken.gate.pop_back();
  EXPECT_THROW_WITH(switchmoe::combine(yg, broken, y), std::invalid_argument, "gates");
}

TEST(BadInputDispatch, AdjointsCheckShapes) {
  Fixture f;
  const Matrix<float> yg = random_matrix(f.plan.num_rows(), 5, 3);
  Matrix<float> dyg;
  std::vector<float> dgate;
  EXPECT_THROW_WITH(switchmoe::combine_backward(random_matrix(7, 5, 4), yg, f.plan, dyg, dgate),
                    std::invalid_argument, "dy has shape [7, 5]");
  Matrix<float> dx = Matrix<float>::Zero(8, 5);
  EXPECT_THROW_WITH(switchmoe::gather_backward(random_matrix(2, 5, 5), f.plan, dx),
                    std::invalid_argument, "dxg has shape [2, 5]");
  Matrix<float> small_dx = Matrix<float>::Zero(3, 5);
  EXPECT_THROW_WITH(
      switchmoe::gather_backward(random_matrix(f.plan.num_rows(), 5, 5), f.plan, small_dx),
      std::invalid_argument, "dx has shape [3, 5]");
}

// The adjoints against a hand-derived reference: y = sum gate * yg, so dyg = gate * dy and
// dgate = dy . yg; and gather_backward sums each token's rows.
TEST(Dispatch, AdjointsMatchTheirDefinitions) {
  Fixture f;
  const Matrix<float> yg = random_matrix(f.plan.num_rows(), 5, 3);
  const Matrix<float> dy = random_matrix(8, 5, 4);
  Matrix<float> dyg;
  std::vector<float> dgate;
  switchmoe::combine_backward(dy, yg, f.plan, dyg, dgate);
  for (int r = 0; r < f.plan.num_rows(); ++r) {
    const int t = f.plan.token[r], c = f.plan.choice[r];
    double dot = 0.0;
    for (int j = 0; j < 5; ++j) {
      EXPECT_FLOAT_EQ(dyg(r, j), f.routing.gate(t, c) * dy(t, j));
      dot += static_cast<double>(dy(t, j)) * yg(r, j);
    }
    EXPECT_NEAR(dgate[r], dot, 1e-5);
  }
  Matrix<float> dx = Matrix<float>::Zero(8, 5);
  switchmoe::gather_backward(yg, f.plan, dx);
  Matrix<double> want = Matrix<double>::Zero(8, 5);
  for (int r = 0; r < f.plan.num_rows(); ++r) {
    want.row(f.plan.token[r]) += yg.row(r).cast<double>();
  }
  EXPECT_LT((dx.cast<double>() - want).cwiseAbs().maxCoeff(), 1e-6);
}

// A plan whose `row` names one row from two positions would combine that row twice.
TEST(BadInputDispatch, RowNamedTwiceIsRejected) {
  Fixture f;
  DispatchPlan broken = f.plan;
  int dropped = -1, kept = -1;
  for (int i = 0; i < static_cast<int>(broken.row.size()); ++i) {
    if (broken.row[i] < 0 && dropped < 0) dropped = i;
    if (broken.row[i] >= 0 && kept < 0) kept = i;
  }
  ASSERT_GE(dropped, 0) << "the fixture is meant to drop a choice";
  broken.row[dropped] = broken.row[kept];
  const Matrix<float> yg = random_matrix(f.plan.num_rows(), 5, 3);
  Matrix<float> y;
  EXPECT_THROW_WITH(switchmoe::combine(yg, broken, y), std::invalid_argument, "exactly once");
}

}  // namespace
