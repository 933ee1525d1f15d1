// Gradient checks (double precision) of the pre-LN residual block and of the whole language
// model (embeddings, blocks, final LayerNorm, output projection, cross-entropy), using the plain
// Mlp<double> as the feed-forward layer.

#include <gtest/gtest.h>

#include "block.hpp"
#include "cross_entropy.hpp"
#include "gradient_check.hpp"
#include "language_model.hpp"
#include "mlp.hpp"

namespace switch_lm {
namespace {

using testing::expect_gradient;
using testing::random_matrix;
using testing::weighted_sum;

TEST(BlockTest, GradientsMatchFiniteDifferences) {
  std::mt19937_64 rng(1);
  const int batch = 2, seq = 4, features = 8;
  Block<double, Mlp<double>> block(features, 2, Mlp<double>(features, 16, 0.5, rng), 0.5, 0.5, rng);
  ParamList<double> params;
  block.parameters(params, "");
  MatrixX<double> x = random_matrix<double>(batch * seq, features, 2);
  const MatrixX<double> r = random_matrix<double>(batch * seq, features, 3);
  auto loss = [&] {
    return weighted_sum(block.forward(x, batch, seq, switchmoe::Mode::kTrain), r);
  };
  loss();
  const MatrixX<double> dx = block.backward(r);
  expect_gradient("x", x, dx, loss, 1e-6, 1e-6);
  for (auto& p : params) expect_gradient(p.name, *p.value, *p.grad, loss, 1e-6, 1e-6);
}

TEST(LanguageModelTest, GradientsMatchFiniteDifferences) {
  ModelConfig config;
  config.vocab = 11;
  config.context = 6;
  config.d_model = 8;
  config.layers = 2;
  config.heads = 2;
  config.d_ff = 12;
  LanguageModel<double, Mlp<double>> model(config, 5, [&](int, std::mt19937_64& rng) {
    return Mlp<double>(config.d_model, config.d_ff, 0.3, rng);
  });
  const int batch = 2, seq = 5;
  const std::vector<int> tokens{1, 4, 10, 0, 3, 3, 3, 7, 2, 9};
  const std::vector<int> targets{4, 10, 0, 3, 6, 3, 7, 2, 9, 5};
  auto loss = [&] {
    return softmax_cross_entropy(model.forward(tokens, batch, seq, switchmoe::Mode::kTrain),
                                 targets, false)
        .loss;
  };
  model.zero_grad();
  const auto ce = softmax_cross_entropy(model.forward(tokens, batch, seq, switchmoe::Mode::kTrain),
                                        targets, true);
  model.backward(ce.d_logits);
  const ParamList<double> params = model.parameters();
  EXPECT_EQ(params.size(), 2u + 2u * (2u + 4u + 2u + 4u) + 2u + 1u);
  for (const auto& p : params) expect_gradient(p.name, *p.value, *p.grad, loss, 1e-6, 1e-6, 60);
}

TEST(LanguageModelTest, SameSeedGivesSameNonFeedForwardWeights) {
  ModelConfig config;
  config.vocab = 11;
  config.context = 4;
  config.d_model = 8;
  config.layers = 2;
  config.heads = 2;
  config.d_ff = 12;
  int calls = 0;
  auto make = [&](int, std::mt19937_64&) {
    std::mt19937_64 own(100 + calls++);  // the feed-forward seeds itself, like the library layers
    return Mlp<double>(config.d_model, config.d_ff, 0.3, own);
  };
  LanguageModel<double, Mlp<double>> a(config, 7, make), b(config, 7, make);
  const auto pa = a.parameters(), pb = b.parameters();
  for (std::size_t i = 0; i < pa.size(); ++i) {
    if (pa[i].name.find(".ffn.") != std::string::npos) continue;
    EXPECT_EQ(*pa[i].value, *pb[i].value) << pa[i].name;
  }
}

}  // namespace
}  // namespace switch_lm
