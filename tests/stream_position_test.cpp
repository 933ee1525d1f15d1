// The positions of the layers' random streams (Router::jitter_calls, FeedForwardBank and
// DenseFFN::dropout_calls) are layer state: a layer whose position is set to k draws what a
// layer of the same seed draws at its (k + 1)-th training call (SEMANTICS 3, 12), so a
// checkpoint that keeps the positions resumes training exactly.
#include <gtest/gtest.h>

#include <random>

#include "switchmoe/layers/dense_ffn.hpp"
#include "switchmoe/routing/router.hpp"

namespace {

using switchmoe::DenseConfig;
using switchmoe::DenseFFN;
using switchmoe::Matrix;
using switchmoe::Mode;
using switchmoe::Router;
using switchmoe::RouterConfig;

Matrix<float> random_matrix(int rows, int cols, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  Matrix<float> m(rows, cols);
  for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = u(rng);
  return m;
}

TEST(StreamPosition, RouterJitterResumesAtTheSetCall) {
  RouterConfig config;
  config.d_model = 6;
  config.num_experts = 3;
  config.jitter_eps = 0.1f;
  config.seed = 17;
  const Matrix<float> x = random_matrix(5, 6, 1);  // [tokens, d_model]
  Router<> first(config), resumed(config);
  EXPECT_EQ(first.jitter_calls(), 0u);
  const Matrix<float> call0 = first.forward(x, Mode::kTrain);  // [tokens, experts]
  const Matrix<float> call1 = first.forward(x, Mode::kTrain);
  first.forward(x, Mode::kEval);  // evaluation draws nothing
  EXPECT_EQ(first.jitter_calls(), 2u);
  ASSERT_NE(call0, call1);  // the draws differ per call, so the position matters

  resumed.set_jitter_calls(1);
  EXPECT_EQ(resumed.forward(x, Mode::kTrain), call1);
  EXPECT_EQ(resumed.jitter_calls(), 2u);
}

TEST(StreamPosition, DenseDropoutResumesAtTheSetCall) {
  DenseConfig config;
  config.d_model = 4;
  config.d_ff = 16;
  config.dropout = 0.5f;
  config.seed = 3;
  const Matrix<float> x = random_matrix(7, 4, 2);  // [tokens, d_model]
  DenseFFN<> first(config), resumed(config);
  const Matrix<float> call0 = first.forward(x, Mode::kTrain);
  const Matrix<float> call1 = first.forward(x, Mode::kTrain);
  EXPECT_EQ(first.dropout_calls(), 2u);
  ASSERT_NE(call0, call1);

  resumed.set_dropout_calls(1);
  EXPECT_EQ(resumed.forward(x, Mode::kTrain), call1);
  EXPECT_EQ(resumed.dropout_calls(), 2u);
}

}  // namespace
