// Steady-state calls of SwitchLayer and DenseFFN allocate nothing (issue #4): after warm-up calls
// with the same number of tokens, training forward + backward and evaluation forward make no
// heap allocation, although the routing (and with it the number of kept rows, the row blocks of
// every expert and the GEMM tiles) changes from call to call. The allocation-free overloads must
// also give bitwise the results of the value-returning ones, run on a twin layer.

#include <gtest/gtest.h>

#include <set>
#include <vector>

#include "support/allocation_counter.hpp"  // first: configures Eigen
#include "support/matrices.hpp"
#include "switchmoe/switchmoe.hpp"

namespace {

using switchmoe::Matrix;
using switchmoe::Mode;
using switchmoe_test::count_allocations;
using switchmoe_test::random_matrix;

void expect_same(const Matrix<float>& a, const Matrix<float>& b, const char* what, int call) {
  EXPECT_TRUE(switchmoe_test::SameBits(a, b)) << what << ", call " << call;
}

constexpr int kTokens = 512, kDModel = 64, kDff = 96;
constexpr int kWarmUp = 2, kCalls = 6;

template <class Policy>
void check_switch_layer(int top_k, double capacity_factor, float dropout, int group_size) {
  switchmoe::SwitchConfig config;
  config.d_model = kDModel;
  config.d_ff = kDff;
  config.routing.num_experts = 8;
  config.routing.top_k = top_k;
  config.routing.group_size = group_size;
  config.routing.capacity_factor = capacity_factor;  // tight: some choices are dropped
  config.expert_bias = true;
  config.router_bias = true;
  config.z_loss_coef = 1e-3f;
  config.jitter_eps = 0.05f;
  config.expert_dropout = dropout;
  config.init_scale = 1.0f;  // confident routers, so that the routing moves with the input
  config.seed = 11;
  switchmoe::SwitchLayer<Policy> layer(config), twin(config);
  switchmoe::SwitchOutput out, eval_out;
  Matrix<float> dx;
  std::set<std::vector<int>> expert_rows;  // kept choices per expert, per counted call
  for (int call = 0; call < kCalls; ++call) {
    const Matrix<float> x = random_matrix(kTokens, kDModel, 100 + call, 1.0f);
    const Matrix<float> dy = random_matrix(kTokens, kDModel, 200 + call, 1.0f);
    const switchmoe_test::AllocationCount count = count_allocations([&] {
      layer.forward(x, Mode::kTrain, out);
      layer.backward(dy, dx);
      layer.forward(x, Mode::kEval, eval_out);
    });
    if (call >= kWarmUp) {
      EXPECT_EQ(count.operator_new, 0) << "call " << call;
      EXPECT_EQ(count.eigen, 0) << "call " << call;
      std::vector<int> rows(config.routing.num_experts, 0);
      for (Eigen::Index i = 0; i < out.routing.slot.size(); ++i) {
        if (out.routing.slot.data()[i] >= 0) ++rows[out.routing.expert.data()[i]];
      }
      expert_rows.insert(rows);
    }
    const switchmoe::SwitchOutput expected = twin.forward(x, Mode::kTrain);
    const Matrix<float> expected_dx = twin.backward(dy);
    const switchmoe::SwitchOutput expected_eval = twin.forward(x, Mode::kEval);
    expect_same(out.y, expected.y, "y", call);
    expect_same(dx, expected_dx, "dx", call);
    expect_same(eval_out.y, expected_eval.y, "eval y", call);
    EXPECT_TRUE((out.routing.slot.array() == expected.routing.slot.array()).all());
    EXPECT_EQ(out.loss, expected.loss);
    EXPECT_EQ(out.stats.dropped_fraction, expected.stats.dropped_fraction);
  }
  // The experts' row blocks really changed between the counted calls (else the test proves
  // little).
  EXPECT_EQ(expert_rows.size(), static_cast<std::size_t>(kCalls - kWarmUp));
  expect_same(layer.grad_w_in(3), twin.grad_w_in(3), "grad w_in", kCalls);
  expect_same(layer.grad_router_weight(), twin.grad_router_weight(), "grad router", kCalls);
}

TEST(LayerAllocation, SwitchLayerFp32Top1SteadyStateAllocatesNothing) {
  check_switch_layer<switchmoe::Fp32>(1, 1.0, 0.0f, 0);
}

TEST(LayerAllocation, SwitchLayerFp32Top2GroupsDropoutSteadyStateAllocatesNothing) {
  check_switch_layer<switchmoe::Fp32>(2, 2.5, 0.2f, 128);
}

TEST(LayerAllocation, SwitchLayerBf16SteadyStateAllocatesNothing) {
  check_switch_layer<switchmoe::Bf16>(1, 1.0, 0.1f, 0);
}

template <class Policy>
void check_dense() {
  switchmoe::DenseConfig config;
  config.d_model = kDModel;
  config.d_ff = kDff;
  config.bias = true;
  config.dropout = 0.1f;
  config.seed = 5;
  switchmoe::DenseFFN<Policy> dense(config), twin(config);
  Matrix<float> y, dx;
  for (int call = 0; call < kCalls; ++call) {
    const Matrix<float> x = random_matrix(kTokens, kDModel, 300 + call, 1.0f);
    const Matrix<float> dy = random_matrix(kTokens, kDModel, 400 + call, 1.0f);
    const switchmoe_test::AllocationCount count = count_allocations([&] {
      dense.forward(x, Mode::kTrain, y);
      dense.backward(dy, dx);
    });
    if (call >= kWarmUp) {
      EXPECT_EQ(count.total(), 0) << "call " << call;
    }
    expect_same(y, twin.forward(x, Mode::kTrain), "y", call);
    expect_same(dx, twin.backward(dy), "dx", call);
  }
}

TEST(LayerAllocation, DenseFfnSteadyStateAllocatesNothing) {
  check_dense<switchmoe::Fp32>();
  check_dense<switchmoe::Bf16>();
}

// Inference after sync_weights(): the router's packed weight and the experts' compute copies
// are made by sync_weights() itself, so the decode-sized calls that follow (the router's
// product then uses its packed weight) allocate nothing; after an edit and another
// sync_weights() too, with the edited weights in effect.
TEST(LayerAllocation, EvalAfterSyncWeightsAllocatesNothing) {
  switchmoe::SwitchConfig config;
  config.d_model = kDModel;
  config.d_ff = kDff;
  config.routing.num_experts = 8;
  config.routing.dropless = true;
  config.seed = 4;
  switchmoe::SwitchLayer<switchmoe::Fp32> layer(config), twin(config);
  switchmoe::SwitchOutput out;
  const Matrix<float> x = random_matrix(4, kDModel, 7, 1.0f);  // 4 tokens: the packed router
  for (int round = 0; round < 2; ++round) {
    layer.forward(x, Mode::kEval, out);  // warm-up at this token count
    if (round == 1) {
      layer.router_weight()(2, 5) += 0.75f;
      twin.router_weight()(2, 5) += 0.75f;
    }
    layer.sync_weights();
    for (int call = 0; call < 3; ++call) {
      const switchmoe_test::AllocationCount count =
          count_allocations([&] { layer.forward(x, Mode::kEval, out); });
      EXPECT_EQ(count.total(), 0) << "round " << round << ", call " << call;
    }
    expect_same(out.routing.logits, twin.forward(x, Mode::kEval).routing.logits, "logits", round);
    expect_same(out.y, twin.forward(x, Mode::kEval).y, "y", round);
  }
}

// The counter itself sees the allocations a layer makes when it must grow: a call with more
// tokens than ever before allocates.
TEST(LayerAllocation, GrowingCallIsCounted) {
  switchmoe::SwitchConfig config;
  config.d_model = kDModel;
  config.d_ff = kDff;
  config.routing.num_experts = 4;
  switchmoe::SwitchLayer<switchmoe::Fp32> layer(config);
  switchmoe::SwitchOutput out;
  layer.forward(random_matrix(64, kDModel, 1, 1.0f), Mode::kTrain, out);
  const Matrix<float> bigger = random_matrix(kTokens, kDModel, 2, 1.0f);
  EXPECT_GT(count_allocations([&] { layer.forward(bigger, Mode::kTrain, out); }).total(), 0);
}

}  // namespace
