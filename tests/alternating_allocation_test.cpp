// What "allocates nothing" promises when the token count changes from call to call (issue 14,
// item 8). Everything sized by the number of kept rows (gathered tokens, hidden activations,
// packing buffers, GEMM tiles, plan vectors) is grow-only, so after one call with the largest
// token count no call makes a global operator new, whatever the sizes that follow. The matrices
// sized by the token count itself (the Routing's and SwitchOutput's Eigen matrices, the router's
// cached input, dx) are Eigen matrices, which reallocate whenever their size changes: a call
// whose token count differs from the previous call's reallocates those (and only those), and a
// call with the previous call's token count allocates nothing at all.

#include <gtest/gtest.h>

#include "support/allocation_counter.hpp"  // first: configures Eigen
#include "support/matrices.hpp"
#include "switchmoe/switchmoe.hpp"

namespace {

using switchmoe::Matrix;
using switchmoe::Mode;
using switchmoe_test::count_allocations;
using switchmoe_test::random_matrix;

template <class Policy>
void check_alternating(int top_k) {
  switchmoe::SwitchConfig config;
  config.d_model = 32;
  config.d_ff = 48;
  config.routing.num_experts = 6;
  config.routing.top_k = top_k;
  config.routing.capacity_factor = 1.0;
  config.expert_dropout = 0.1f;
  config.z_loss_coef = 1e-3f;
  config.init_scale = 1.0f;
  config.seed = 3;
  switchmoe::SwitchLayer<Policy> layer(config);
  switchmoe::SwitchOutput out;
  Matrix<float> dx;
  auto step = [&](int tokens, unsigned seed) {
    const Matrix<float> x = random_matrix(tokens, 32, seed);
    const Matrix<float> dy = random_matrix(tokens, 32, seed + 1000);
    return count_allocations([&] {
      layer.forward(x, Mode::kTrain, out);
      layer.backward(dy, dx);
      layer.forward(x, Mode::kEval, out);
    });
  };
  step(512, 1);  // the largest call first: every grow-only buffer reaches its size
  step(512, 2);
  const int sizes[] = {256, 512, 128, 128, 512, 384, 384, 256, 512};
  int previous = 512;
  for (int i = 0; i < 9; ++i) {
    const switchmoe_test::AllocationCount count = step(sizes[i], 10 + i);
    EXPECT_EQ(count.operator_new, 0) << "call " << i << " with " << sizes[i] << " tokens";
    if (sizes[i] == previous) {
      EXPECT_EQ(count.eigen, 0) << "call " << i << ": same token count as the previous call";
    }
    previous = sizes[i];
  }
}

TEST(AlternatingAllocation, Fp32Top1) { check_alternating<switchmoe::Fp32>(1); }
TEST(AlternatingAllocation, Bf16Top2) { check_alternating<switchmoe::Bf16>(2); }

}  // namespace
