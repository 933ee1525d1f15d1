// Steady state of the expert-parallel layer allocates nothing (issue 11: exchange buffers
// reused): training steps with as many tokens per rank but different routings (other rows per
// expert and per rank, call to call) make no operator new and no Eigen heap allocation on any
// rank once each has been seen. MPI's own buffers (malloc inside the library) are not counted.
#include <gtest/gtest.h>
#include <mpi.h>

#include "distributed/harness.hpp"
#include "support/allocation_counter.hpp"  // first: configures Eigen
#include "support/matrices.hpp"
#include "switchmoe/distributed.hpp"

namespace {

using switchmoe::Matrix;
using switchmoe::Mode;

class ExpertParallelAllocation : public switchmoe_test::MpiTest {};

template <class Policy>
void check_steady_state() {
  const int rank = switchmoe_test::world_rank(), ranks = switchmoe_test::world_size();
  switchmoe::SwitchConfig config;
  config.d_model = 8;
  config.d_ff = 16;
  config.routing.num_experts = 2 * ranks;
  config.routing.top_k = 2;
  config.routing.group_size = 8;
  config.expert_dropout = 0.1f;
  config.z_loss_coef = 0.001f;
  switchmoe::ExpertParallelSwitchLayer<Policy> layer(config, MPI_COMM_WORLD);
  const int tokens = 8 * (rank % 2 + 1);
  switchmoe::SwitchOutput out;
  Matrix<float> dx;
  const Matrix<float> dy = switchmoe_test::random_matrix(tokens, 8, 5 + rank);
  std::vector<Matrix<float>> inputs;
  for (int call = 0; call < 4; ++call) {
    inputs.push_back(switchmoe_test::random_matrix(tokens, 8, 100 * call + rank, 1.0f + call));
  }
  // A first pass over the inputs grows every buffer to its size; the second pass is counted.
  // (SwitchLayer does not reserve its per-row gate gradients yet, so a routing that keeps more
  // rows than any before may still grow that one vector.)
  for (const Matrix<float>& x : inputs) {
    layer.forward(x, Mode::kTrain, out);
    layer.backward(dy, dx);
  }
  std::vector<long> counts;
  for (const Matrix<float>& x : inputs) {
    const switchmoe_test::AllocationCount count = switchmoe_test::count_allocations([&] {
      layer.forward(x, Mode::kTrain, out);
      layer.backward(dy, dx);
    });
    counts.push_back(count.total());
  }
  for (int call = 0; call < 4; ++call) EXPECT_EQ(counts[call], 0) << "call " << call;
}

TEST_F(ExpertParallelAllocation, Fp32StepsAllocateNothing) {
  check_steady_state<switchmoe::Fp32>();
}
TEST_F(ExpertParallelAllocation, Bf16StepsAllocateNothing) {
  check_steady_state<switchmoe::Bf16>();
}

}  // namespace
