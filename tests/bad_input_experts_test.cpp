// Bad input to the expert bank (issue 14): forward and backward check the row blocks, the
// buffers and the shapes of the weights and gradients a caller can reach, and a bank holding a
// slice of the experts only answers for the experts it holds.
#include <gtest/gtest.h>

#include <vector>

#include "support/expect_throw.hpp"
#include "support/matrices.hpp"
#include "switchmoe/switchmoe.hpp"

namespace {

using switchmoe::FeedForwardBank;
using switchmoe::FeedForwardConfig;
using switchmoe::Fp32;
using switchmoe::Matrix;
using switchmoe::Mode;
using switchmoe::Relu;
using switchmoe_test::random_matrix;

FeedForwardConfig config(int first = 0) {
  FeedForwardConfig c;
  c.num_ffns = 2;
  c.d_model = 4;
  c.d_ff = 6;
  c.bias = true;
  c.seed = 3;
  c.first_ffn = first;
  return c;
}

TEST(BadInputExperts, ForwardChecksBlocksKeysAndBuffers) {
  FeedForwardBank<Fp32, Relu> bank(config());
  const Matrix<float> x = random_matrix(5, 4, 1);
  Matrix<float> y;
  EXPECT_THROW_WITH(bank.forward(x, {0, 2, 6}, Mode::kEval, {}, y), std::invalid_argument,
                    "row blocks");
  EXPECT_THROW_WITH(bank.forward(x, {0, 3, 2, 5}, Mode::kEval, {}, y), std::invalid_argument,
                    "row blocks");
  EXPECT_THROW_WITH(bank.forward(x, {0, 2, 5}, Mode::kEval, {1, 2}, y), std::invalid_argument,
                    "row_keys has 2 entries");
  EXPECT_THROW_WITH(bank.forward(x, {0, 2, 5}, static_cast<Mode>(4), {}, y), std::invalid_argument,
                    "mode is 4");
  Matrix<float> small(3, 4);
  EXPECT_THROW_WITH(bank.forward(x, {0, 2, 5}, Mode::kEval, {}, Eigen::Ref<Matrix<float>>(small)),
                    std::invalid_argument, "y has shape [3, 4]");
}

TEST(BadInputExperts, ResizedWeightsAndGradientsAreRejected) {
  FeedForwardBank<Fp32, Relu> bank(config());
  const Matrix<float> x = random_matrix(5, 4, 1);
  Matrix<float> y, dx;
  bank.b_in(1) = Matrix<float>::Zero(1, 2);
  EXPECT_THROW_WITH(bank.forward(x, {0, 2, 5}, Mode::kTrain, {}, y), std::invalid_argument,
                    "expert 1 b_in has shape [1, 2], expected [1, 6]");
  bank.b_in(1) = Matrix<float>::Zero(1, 6);
  bank.forward(x, {0, 2, 5}, Mode::kTrain, {}, y);
  bank.grad_w_in(0) = Matrix<float>::Zero(2, 6);
  EXPECT_THROW_WITH(bank.backward(x, {0, 2, 5}, random_matrix(5, 4, 2), dx), std::invalid_argument,
                    "expert 0 grad_w_in has shape [2, 6], expected [4, 6]");
}

TEST(BadInputExperts, SliceAnswersOnlyForItsExperts) {
  FeedForwardBank<Fp32, Relu> slice(config(/*first=*/4));
  EXPECT_NO_THROW(slice.w_in(4));
  EXPECT_NO_THROW(slice.w_out(5));
  EXPECT_THROW_WITH(slice.w_in(0), std::invalid_argument, "expert index is 0, expected in [4, 6)");
  EXPECT_THROW_WITH(slice.grad_b_out(6), std::invalid_argument, "expected in [4, 6)");
  FeedForwardConfig c = config();
  c.first_ffn = -1;
  EXPECT_THROW_WITH((FeedForwardBank<Fp32, Relu>{c}), std::invalid_argument, "first_ffn is -1");
}

// A slice starts with the weights the same experts have in a bank of all of them, and names
// and tags its parameters by global expert index (SEMANTICS 21, issue 9).
TEST(ExpertSlices, SameWeightsNamesAndRolesAsTheWholeBank) {
  FeedForwardConfig all = config();
  all.num_ffns = 6;
  FeedForwardBank<Fp32, Relu> whole(all);
  FeedForwardBank<Fp32, Relu> slice(config(/*first=*/4));
  for (int e = 4; e < 6; ++e) {
    EXPECT_TRUE(switchmoe_test::SameBits(slice.w_in(e), whole.w_in(e))) << e;
    EXPECT_TRUE(switchmoe_test::SameBits(slice.w_out(e), whole.w_out(e))) << e;
  }
  std::vector<switchmoe::ParameterRef> params;
  slice.append_parameters("experts.", false, params);
  ASSERT_EQ(params.size(), 8u);
  EXPECT_EQ(params[0].name, "experts.4.w_in");
  EXPECT_EQ(params[0].expert, 4);
  EXPECT_EQ(params[0].owner, switchmoe::ParameterOwner::kExpert);
  EXPECT_EQ(params[0].role, switchmoe::ParameterRole::kWeight);
  EXPECT_EQ(params[1].name, "experts.4.b_in");
  EXPECT_EQ(params[1].role, switchmoe::ParameterRole::kBias);
  EXPECT_EQ(params[7].name, "experts.5.b_out");
  EXPECT_EQ(params[7].expert, 5);
}

}  // namespace
