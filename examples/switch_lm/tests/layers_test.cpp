// Gradient checks (double precision) of the building blocks: linear, LayerNorm, token and
// positional embeddings, causal multi-head self-attention.

#include <gtest/gtest.h>

#include "attention.hpp"
#include "embedding.hpp"
#include "gradient_check.hpp"
#include "layer_norm.hpp"
#include "linear.hpp"

namespace switch_lm {
namespace {

using testing::expect_gradient;
using testing::random_matrix;
using testing::weighted_sum;
constexpr double kH = 1e-6;
constexpr double kTol = 1e-6;

TEST(LinearTest, GradientsMatchFiniteDifferences) {
  std::mt19937_64 rng(1);
  Linear<double> layer("fc", 5, 7, true, 0.5, rng);
  MatrixX<double> x = random_matrix<double>(4, 5, 2);
  const MatrixX<double> r = random_matrix<double>(4, 7, 3);
  ParamList<double> params;
  layer.parameters(params, "");
  auto loss = [&] { return weighted_sum(layer.forward(x), r); };
  loss();
  const MatrixX<double> dx = layer.backward(r);
  expect_gradient("x", x, dx, loss, kH, kTol);
  for (auto& p : params) expect_gradient(p.name, *p.value, *p.grad, loss, kH, kTol);
}

TEST(LinearTest, BackwardAccumulatesGradients) {
  std::mt19937_64 rng(1);
  Linear<double> layer("fc", 3, 2, false, 0.5, rng);
  const MatrixX<double> x = random_matrix<double>(4, 3, 2);
  const MatrixX<double> r = random_matrix<double>(4, 2, 3);
  ParamList<double> params;
  layer.parameters(params, "");
  layer.forward(x);
  layer.backward(r);
  const MatrixX<double> once = *params[0].grad;
  layer.forward(x);
  layer.backward(r);
  EXPECT_TRUE(params[0].grad->isApprox(2.0 * once));
}

TEST(LayerNormTest, GradientsMatchFiniteDifferences) {
  LayerNorm<double> ln("ln", 6);
  ParamList<double> params;
  ln.parameters(params, "");
  *params[0].value = random_matrix<double>(1, 6, 4);  // gamma
  *params[1].value = random_matrix<double>(1, 6, 5);  // beta
  MatrixX<double> x = random_matrix<double>(3, 6, 6, 2.0);
  const MatrixX<double> r = random_matrix<double>(3, 6, 7);
  auto loss = [&] { return weighted_sum(ln.forward(x), r); };
  loss();
  const MatrixX<double> dx = ln.backward(r);
  expect_gradient("x", x, dx, loss, kH, kTol);
  for (auto& p : params) expect_gradient(p.name, *p.value, *p.grad, loss, kH, kTol);
}

TEST(LayerNormTest, OutputRowsAreNormalized) {
  LayerNorm<double> ln("ln", 8);
  const MatrixX<double> y = ln.forward(random_matrix<double>(5, 8, 8, 3.0));
  for (Eigen::Index t = 0; t < y.rows(); ++t) {
    EXPECT_NEAR(y.row(t).mean(), 0.0, 1e-12);
    EXPECT_NEAR((y.row(t).array() - y.row(t).mean()).square().mean(), 1.0, 1e-4);
  }
}

TEST(TokenEmbeddingTest, GradientsMatchFiniteDifferencesWithRepeatedTokens) {
  std::mt19937_64 rng(9);
  TokenEmbedding<double> emb(10, 4, 1.0, rng);
  ParamList<double> params;
  emb.parameters(params, "");
  const std::vector<int> tokens{3, 1, 3, 9, 0, 3};
  const MatrixX<double> r = random_matrix<double>(6, 4, 10);
  auto loss = [&] { return weighted_sum(emb.forward(tokens), r); };
  loss();
  emb.backward(r);
  expect_gradient(params[0].name, *params[0].value, *params[0].grad, loss, kH, kTol);
  EXPECT_EQ(params[0].grad->row(2).cwiseAbs().sum(), 0.0)
      << "unused token row must get no gradient";
}

TEST(TokenEmbeddingTest, RejectsOutOfRangeToken) {
  std::mt19937_64 rng(9);
  TokenEmbedding<double> emb(10, 4, 1.0, rng);
  EXPECT_THROW(emb.forward({1, 10}), std::invalid_argument);
}

TEST(PositionalEmbeddingTest, GradientsMatchFiniteDifferences) {
  std::mt19937_64 rng(11);
  PositionalEmbedding<double> pos(8, 3, 1.0, rng);
  ParamList<double> params;
  pos.parameters(params, "");
  const MatrixX<double> r = random_matrix<double>(2 * 5, 3, 12);
  auto loss = [&] { return weighted_sum(pos.forward(2, 5), r); };
  loss();
  pos.backward(r);
  expect_gradient(params[0].name, *params[0].value, *params[0].grad, loss, kH, kTol);
  EXPECT_EQ(params[0].grad->bottomRows(3).cwiseAbs().sum(), 0.0)
      << "positions past seq get no gradient";
  EXPECT_THROW(pos.forward(1, 9), std::invalid_argument);
}

TEST(CausalSelfAttentionTest, GradientsMatchFiniteDifferences) {
  std::mt19937_64 rng(13);
  const int batch = 2, seq = 5, features = 8, heads = 2;
  CausalSelfAttention<double> attention(features, heads, 0.5, 0.5, rng);
  ParamList<double> params;
  attention.parameters(params, "");
  MatrixX<double> x = random_matrix<double>(batch * seq, features, 14);
  const MatrixX<double> r = random_matrix<double>(batch * seq, features, 15);
  auto loss = [&] { return weighted_sum(attention.forward(x, batch, seq), r); };
  loss();
  const MatrixX<double> dx = attention.backward(r);
  expect_gradient("x", x, dx, loss, kH, kTol);
  for (auto& p : params) expect_gradient(p.name, *p.value, *p.grad, loss, kH, kTol);
}

TEST(CausalSelfAttentionTest, OutputDoesNotDependOnLaterPositions) {
  std::mt19937_64 rng(16);
  CausalSelfAttention<double> attention(8, 2, 0.5, 0.5, rng);
  MatrixX<double> x = random_matrix<double>(6, 8, 17);
  const MatrixX<double> before = attention.forward(x, 1, 6);
  x.row(4) = random_matrix<double>(1, 8, 18);  // change position 4
  const MatrixX<double> after = attention.forward(x, 1, 6);
  EXPECT_TRUE(before.topRows(4).isApprox(after.topRows(4), 1e-14))
      << "positions 0..3 saw position 4";
  EXPECT_FALSE(before.row(4).isApprox(after.row(4)));
}

TEST(CausalSelfAttentionTest, SequencesOfABatchAreIndependent) {
  std::mt19937_64 rng(19);
  CausalSelfAttention<double> attention(8, 4, 0.5, 0.5, rng);
  const MatrixX<double> x = random_matrix<double>(2 * 3, 8, 20);
  const MatrixX<double> both = attention.forward(x, 2, 3);
  const MatrixX<double> second = attention.forward(x.bottomRows(3), 1, 3);
  EXPECT_TRUE(both.bottomRows(3).isApprox(second, 1e-14));
}

TEST(CausalSelfAttentionTest, RejectsHeadsNotDividingFeatures) {
  std::mt19937_64 rng(21);
  EXPECT_THROW(CausalSelfAttention<double>(10, 3, 0.5, 0.5, rng), std::invalid_argument);
}

}  // namespace
}  // namespace switch_lm
