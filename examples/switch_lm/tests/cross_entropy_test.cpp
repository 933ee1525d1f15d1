// Softmax cross-entropy: value against a direct computation, gradients (hard labels and the
// distillation mixture) against central finite differences in double precision.

#include "cross_entropy.hpp"

#include <gtest/gtest.h>

#include "gradient_check.hpp"

namespace switch_lm {
namespace {

using testing::expect_gradient;
using testing::random_matrix;

TEST(CrossEntropyTest, ValueMatchesDirectComputation) {
  const MatrixX<double> logits = random_matrix<double>(3, 5, 1, 2.0);
  const std::vector<int> targets{4, 0, 2};
  double expected = 0.0;
  for (int t = 0; t < 3; ++t) {
    expected -= std::log(std::exp(logits(t, targets[t])) / logits.row(t).array().exp().sum());
  }
  const auto result = softmax_cross_entropy(logits, targets, false);
  EXPECT_NEAR(result.loss, expected / 3.0, 1e-12);
  EXPECT_NEAR(result.hard_loss, result.loss, 1e-15);
}

TEST(CrossEntropyTest, UniformLogitsGiveLogVocab) {
  const MatrixX<double> logits = MatrixX<double>::Zero(2, 256);
  EXPECT_NEAR(softmax_cross_entropy<double>(logits, {7, 200}, false).loss, std::log(256.0), 1e-12);
}

TEST(CrossEntropyTest, HardLabelGradientMatchesFiniteDifferences) {
  MatrixX<double> logits = random_matrix<double>(4, 6, 2);
  const std::vector<int> targets{1, 5, 0, 1};
  auto loss = [&] { return softmax_cross_entropy(logits, targets, false).loss; };
  const auto result = softmax_cross_entropy(logits, targets, true);
  expect_gradient("logits", logits, result.d_logits, loss, 1e-6, 1e-6);
}

TEST(CrossEntropyTest, DistillationMixtureGradientMatchesFiniteDifferences) {
  MatrixX<double> logits = random_matrix<double>(4, 6, 3);
  const MatrixX<double> teacher = softmax_rows<double>(random_matrix<double>(4, 6, 4));
  const std::vector<int> targets{2, 2, 3, 0};
  auto loss = [&] { return softmax_cross_entropy(logits, targets, false, &teacher, 0.25).loss; };
  const auto result = softmax_cross_entropy(logits, targets, true, &teacher, 0.25);
  expect_gradient("logits", logits, result.d_logits, loss, 1e-6, 1e-6);
  // loss = 0.75 * hard + 0.25 * soft
  const double soft = softmax_cross_entropy(logits, targets, false, &teacher, 1.0).loss;
  EXPECT_NEAR(result.loss, 0.75 * result.hard_loss + 0.25 * soft, 1e-12);
}

TEST(CrossEntropyTest, RejectsTargetCountMismatch) {
  EXPECT_THROW(softmax_cross_entropy<double>(MatrixX<double>::Zero(3, 4), {1, 2}, false),
               std::invalid_argument);
}

}  // namespace
}  // namespace switch_lm
