// Tests of switchmoe::load_balancing_loss (SEMANTICS rule 8) and switchmoe::router_z_loss
// (rule 9) and their gradients (rule 10), by hand and against tests/reference.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "reference/routing_reference.hpp"
#include "support/expect_throw.hpp"
#include "switchmoe/losses/load_balancing.hpp"
#include "switchmoe/losses/z_loss.hpp"

namespace {

namespace ref = switchmoe_test::ref;
using ref::MatD;
using ref::MatI;
using switchmoe::load_balancing_loss;
using switchmoe::load_balancing_loss_grad;
using switchmoe::Matrix;
using switchmoe::router_z_loss;
using switchmoe::router_z_loss_grad;
using switchmoe_test::ThrowsInvalidArgumentNaming;
using switchmoe_test::ref::to_double;

::testing::AssertionResult Near(const Matrix<float>& got, const MatD& want, double tol) {
  if (got.rows() != want.rows() || got.cols() != want.cols()) {
    return ::testing::AssertionFailure() << "shape " << got.rows() << "x" << got.cols()
                                         << ", expected " << want.rows() << "x" << want.cols();
  }
  if (got.size() > 0 && !((got.cast<double>() - want).cwiseAbs().maxCoeff() <= tol)) {
    return ::testing::AssertionFailure() << "got\n" << got << "\nexpected\n" << want;
  }
  return ::testing::AssertionSuccess();
}

Matrix<float> random_probs(int tokens, int experts, std::mt19937& rng) {
  std::uniform_real_distribution<double> uniform(-2.0, 2.0);
  MatD logits(tokens, experts);
  for (int t = 0; t < tokens; ++t) {
    for (int e = 0; e < experts; ++e) logits(t, e) = uniform(rng);
  }
  return ref::softmax(logits).cast<float>();
}

Matrix<int> random_choices(int tokens, int experts, int k, std::mt19937& rng) {
  // k distinct experts per token, in random order (the loss does not require them sorted).
  Matrix<int> expert(tokens, k);
  std::vector<int> all(experts);
  for (int t = 0; t < tokens; ++t) {
    std::iota(all.begin(), all.end(), 0);
    std::shuffle(all.begin(), all.end(), rng);
    for (int c = 0; c < k; ++c) expert(t, c) = all[c];
  }
  return expert;
}

// ----------------------------------------------------------------------------------------------
// Rule 8: load-balancing loss.

TEST(LoadBalancingLoss, PerfectBalanceGivesK) {
  // E=4, 4 tokens, uniform probs P_e = 1/4; token t chooses experts t, t+1, ... (mod 4), so
  // each expert is chosen k times: f_e = k/4. aux = 4 * sum_e (k/4)(1/4) = k.
  const Matrix<float> probs = Matrix<float>::Constant(4, 4, 0.25f);
  for (int k = 1; k <= 4; ++k) {
    Matrix<int> expert(4, k);
    for (int t = 0; t < 4; ++t) {
      for (int c = 0; c < k; ++c) expert(t, c) = (t + c) % 4;
    }
    EXPECT_NEAR(load_balancing_loss(probs, expert), static_cast<double>(k), 1e-6) << "k=" << k;
  }
}

TEST(LoadBalancingLoss, PerfectBalanceWithNonUniformProbsAndGroups) {
  // f_e = k/E for every expert makes aux = E * (k/E) * sum_e P_e = k whatever P is.
  std::mt19937 rng(1);
  const Matrix<float> probs = random_probs(8, 4, rng);
  Matrix<int> expert(8, 2);
  for (int t = 0; t < 8; ++t) expert.row(t) << t % 4, (t + 2) % 4;
  EXPECT_NEAR(load_balancing_loss(probs, expert, 4), 2.0, 1e-6);
  EXPECT_NEAR(load_balancing_loss(probs, expert, 0), 2.0, 1e-6);
}

TEST(LoadBalancingLoss, CollapseHandWorked) {
  // E=2, both tokens choose e0, probs [0.8, 0.2], [0.6, 0.4]: f = (1, 0), P = (0.7, 0.3),
  // aux = 2 * (1 * 0.7 + 0 * 0.3) = 1.4.
  Matrix<float> probs(2, 2);
  probs << 0.8f, 0.2f, 0.6f, 0.4f;
  Matrix<int> expert(2, 1);
  expert << 0, 0;
  EXPECT_NEAR(load_balancing_loss(probs, expert), 1.4, 1e-6);
  // Full collapse with confident router: probs [1, 0] -> aux = E = 2.
  probs << 1, 0, 1, 0;
  EXPECT_NEAR(load_balancing_loss(probs, expert), 2.0, 1e-6);
}

TEST(LoadBalancingLoss, TopTwoHandWorked) {
  // E=3, k=2, 2 tokens. Choices [0, 1] and [0, 2]: f = (2/2, 1/2, 1/2) = (1, 0.5, 0.5).
  // probs [0.5, 0.3, 0.2], [0.4, 0.1, 0.5]: P = (0.45, 0.2, 0.35).
  // aux = 3 * (0.45 + 0.1 + 0.175) = 3 * 0.725 = 2.175.
  Matrix<float> probs(2, 3);
  probs << 0.5f, 0.3f, 0.2f, 0.4f, 0.1f, 0.5f;
  Matrix<int> expert(2, 2);
  expert << 0, 1, 0, 2;
  EXPECT_NEAR(load_balancing_loss(probs, expert), 2.175, 1e-6);
}

TEST(LoadBalancingLoss, IsAveragedOverGroups) {
  // N=4, E=2, group_size 2. Group A: probs [0.8, 0.2], [0.6, 0.4], choices e0, e0:
  // 2 * 0.7 = 1.4. Group B: probs [0.5, 0.5], [0.2, 0.8], choices e0, e1: f = (0.5, 0.5),
  // P = (0.35, 0.65) -> 1.0. Mean 1.2. One group: f = (0.75, 0.25), P = (0.525, 0.475)
  // -> 2 * (0.39375 + 0.11875) = 1.025. group_size 1: per token E * p_chosen:
  // 2 * (0.8 + 0.6 + 0.5 + 0.8) / 4 = 1.35.
  Matrix<float> probs(4, 2);
  probs << 0.8f, 0.2f, 0.6f, 0.4f, 0.5f, 0.5f, 0.2f, 0.8f;
  Matrix<int> expert(4, 1);
  expert << 0, 0, 0, 1;
  EXPECT_NEAR(load_balancing_loss(probs, expert, 2), 1.2, 1e-6);
  EXPECT_NEAR(load_balancing_loss(probs, expert, 0), 1.025, 1e-6);
  EXPECT_NEAR(load_balancing_loss(probs, expert, 4), 1.025, 1e-6);
  EXPECT_NEAR(load_balancing_loss(probs, expert, 1), 1.35, 1e-6);
}

TEST(LoadBalancingLoss, MatchesReferenceOnRandomInputs) {
  std::mt19937 rng(123);
  for (int i = 0; i < 200; ++i) {
    const int experts = std::uniform_int_distribution<int>(1, 9)(rng);
    const int k = std::uniform_int_distribution<int>(1, std::min(3, experts))(rng);
    const int groups = std::uniform_int_distribution<int>(1, 4)(rng);
    const int g = std::uniform_int_distribution<int>(1, 9)(rng);
    const Matrix<float> probs = random_probs(groups * g, experts, rng);
    const Matrix<int> expert = random_choices(groups * g, experts, k, rng);
    const int group_size = groups == 1 ? 0 : g;
    SCOPED_TRACE(::testing::Message()
                 << "E=" << experts << " k=" << k << " groups=" << groups << " g=" << g);
    const double want = ref::load_balancing_loss(to_double(probs), expert, group_size);
    EXPECT_NEAR(load_balancing_loss(probs, expert, group_size), want, 1e-6 * std::max(1.0, want));
    // d aux / d probs = E * f_e / (T_g * groups) for every token of the group.
    MatD dprobs(groups * g, experts);
    for (int group = 0; group < groups; ++group) {
      for (int e = 0; e < experts; ++e) {
        int count = 0;
        for (int t = group * g; t < (group + 1) * g; ++t) {
          for (int c = 0; c < k; ++c) count += expert(t, c) == e;
        }
        for (int t = group * g; t < (group + 1) * g; ++t) {
          dprobs(t, e) = static_cast<double>(experts) * count / g / g / groups;
        }
      }
    }
    EXPECT_TRUE(Near(load_balancing_loss_grad(probs, expert, group_size), dprobs, 1e-6));
    if (HasFailure()) break;
  }
}

TEST(LoadBalancingLoss, GradientWithRespectToProbsHandWorked) {
  // Collapse case above: aux = (E / T) * sum_t sum_e f_e p_te with f = (1, 0), E=2, T=2:
  // d aux / d p_t0 = 2 * 1 / 2 = 1, d aux / d p_t1 = 0.
  Matrix<float> probs(2, 2);
  probs << 0.8f, 0.2f, 0.6f, 0.4f;
  Matrix<int> expert(2, 1);
  expert << 0, 0;
  EXPECT_TRUE(
      Near(load_balancing_loss_grad(probs, expert), (MatD(2, 2) << 1, 0, 1, 0).finished(), 1e-7));
  // Two groups of one token: each group weighs 1/2: 2 * 1 / 1 / 2 = 1 again.
  EXPECT_TRUE(Near(load_balancing_loss_grad(probs, expert, 1),
                   (MatD(2, 2) << 1, 0, 1, 0).finished(), 1e-7));
}

TEST(ReferenceGradients, LoadBalancingGradientMatchesFiniteDifferences) {
  // Self-check of the oracle: only P carries gradient (the choices are held fixed).
  std::mt19937 rng(5);
  std::uniform_real_distribution<double> uniform(-2.0, 2.0);
  MatD logits(6, 4);
  for (int t = 0; t < 6; ++t) {
    for (int e = 0; e < 4; ++e) logits(t, e) = uniform(rng);
  }
  const MatI expert = random_choices(6, 4, 2, rng);
  for (int group_size : {0, 2, 3}) {
    auto loss = [&](const MatD& x) {
      return ref::load_balancing_loss(ref::softmax(x), expert, group_size);
    };
    EXPECT_LT((ref::load_balancing_loss_grad(logits, expert, group_size) -
               ref::finite_difference(loss, logits))
                  .cwiseAbs()
                  .maxCoeff(),
              1e-8);
  }
}

TEST(LoadBalancingLoss, ZeroTokens) {
  const Matrix<float> probs(0, 4);
  const Matrix<int> expert(0, 2);
  EXPECT_TRUE(std::isfinite(load_balancing_loss(probs, expert)));
  const Matrix<float> grad = load_balancing_loss_grad(probs, expert);
  EXPECT_EQ(grad.rows(), 0);
  EXPECT_EQ(grad.cols(), 4);
}

TEST(LoadBalancingLoss, RejectsMismatchedRows) {
  const Matrix<float> probs = Matrix<float>::Constant(4, 2, 0.5f);
  const Matrix<int> expert = Matrix<int>::Zero(3, 1);
  EXPECT_TRUE(ThrowsInvalidArgumentNaming([&] { load_balancing_loss(probs, expert); }, {"expert"}));
  EXPECT_TRUE(
      ThrowsInvalidArgumentNaming([&] { load_balancing_loss_grad(probs, expert); }, {"expert"}));
}

TEST(LoadBalancingLoss, RejectsExpertIndexOutOfRange) {
  const Matrix<float> probs = Matrix<float>::Constant(4, 2, 0.5f);
  for (int bad : {-1, 2}) {
    Matrix<int> expert = Matrix<int>::Zero(4, 1);
    expert(2, 0) = bad;
    EXPECT_TRUE(ThrowsInvalidArgumentNaming([&] { load_balancing_loss(probs, expert); },
                                            {"expert", std::to_string(bad)}));
    EXPECT_TRUE(ThrowsInvalidArgumentNaming([&] { load_balancing_loss_grad(probs, expert); },
                                            {"expert", std::to_string(bad)}));
  }
}

TEST(LoadBalancingLoss, RejectsBadGroupSize) {
  const Matrix<float> probs = Matrix<float>::Constant(4, 2, 0.5f);
  const Matrix<int> expert = Matrix<int>::Zero(4, 1);
  for (int bad : {3, -2, 8}) {
    EXPECT_TRUE(ThrowsInvalidArgumentNaming([&] { load_balancing_loss(probs, expert, bad); },
                                            {"group_size", std::to_string(bad)}));
    EXPECT_TRUE(ThrowsInvalidArgumentNaming([&] { load_balancing_loss_grad(probs, expert, bad); },
                                            {"group_size"}));
  }
}

// ----------------------------------------------------------------------------------------------
// Rule 9: router z-loss.

TEST(RouterZLoss, UniformLogitsGiveLogESquared) {
  // logits all 0: lse = log E -> z = (log E)^2. E=8: (2.0794415)^2 = 4.3240771.
  for (int experts : {1, 2, 3, 8, 17}) {
    const Matrix<float> logits = Matrix<float>::Zero(5, experts);
    const double log_e = std::log(static_cast<double>(experts));
    EXPECT_NEAR(router_z_loss(logits), log_e * log_e, 1e-6) << "E=" << experts;
  }
  EXPECT_NEAR(router_z_loss(Matrix<float>::Zero(3, 8)), 4.3240771, 1e-6);
  // Constant c: lse = c + log E. c=-2, E=4: (-2 + 1.3862944)^2 = 0.3766344.
  EXPECT_NEAR(router_z_loss(Matrix<float>::Constant(2, 4, -2.0f)), 0.3766344, 1e-6);
}

TEST(RouterZLoss, IsTheMeanOverTokensHandWorked) {
  // logits [0, 0] and [log 3, 0]: lse = log 2, log 4 -> z = ((log 2)^2 + (log 4)^2) / 2
  // = (0.480453 + 1.921812) / 2 = 1.201133.
  Matrix<float> logits(2, 2);
  logits << 0, 0, std::log(3.0f), 0;
  EXPECT_NEAR(router_z_loss(logits), 1.201133, 1e-6);
}

TEST(RouterZLoss, IsStableForLargeLogits) {
  // logits [200, 200] -> lse = 200 + log 2 -> z = 200.693147^2 = 40277.74. exp(200) overflows
  // float (and exp(1000) double) if computed naively.
  EXPECT_NEAR(router_z_loss(Matrix<float>::Constant(1, 2, 200.0f)), 40277.74, 0.05);
  // [-1000, -1000, -1000]: lse = -1000 + log 3 -> (998.901388)^2 = 997804.0.
  EXPECT_NEAR(router_z_loss(Matrix<float>::Constant(1, 3, -1000.0f)), 997804.0, 1.0);
}

TEST(RouterZLoss, MatchesReferenceOnRandomInputs) {
  std::mt19937 rng(77);
  for (int i = 0; i < 100; ++i) {
    const int tokens = std::uniform_int_distribution<int>(1, 20)(rng);
    const int experts = std::uniform_int_distribution<int>(1, 12)(rng);
    const float scale = std::uniform_real_distribution<float>(0.1f, 10.0f)(rng);
    std::normal_distribution<float> normal(0.0f, scale);
    Matrix<float> logits(tokens, experts);
    for (int t = 0; t < tokens; ++t) {
      for (int e = 0; e < experts; ++e) logits(t, e) = normal(rng);
    }
    const MatD x = to_double(logits);
    const double want = ref::router_z_loss(x);
    EXPECT_NEAR(router_z_loss(logits), want, 2e-6 * std::max(1.0, want));
    const MatD grad = ref::router_z_loss_grad(x);
    EXPECT_TRUE(
        Near(router_z_loss_grad(logits), grad, 2e-6 * std::max(1.0, grad.cwiseAbs().maxCoeff())));
    if (HasFailure()) break;
  }
}

TEST(RouterZLoss, GradientHandWorked) {
  // d z / d logits[t, j] = 2 / N * lse_t * p_tj. logits [0, 0]: 2 * log 2 * 0.5 = log 2.
  // logits [log 3, 0] (second token of two): lse = log 4, p = [3/4, 1/4]:
  // 2 / 2 * log 4 * [0.75, 0.25] = [1.0397208, 0.3465736]; first token: 2/2 * log 2 * 0.5
  // = 0.3465736 each.
  Matrix<float> logits(2, 2);
  logits << 0, 0, std::log(3.0f), 0;
  EXPECT_TRUE(Near(router_z_loss_grad(logits),
                   (MatD(2, 2) << 0.3465736, 0.3465736, 1.0397208, 0.3465736).finished(), 1e-6));
}

TEST(ReferenceGradients, ZLossGradientMatchesFiniteDifferences) {
  std::mt19937 rng(6);
  std::uniform_real_distribution<double> uniform(-3.0, 3.0);
  MatD logits(5, 3);
  for (int t = 0; t < 5; ++t) {
    for (int e = 0; e < 3; ++e) logits(t, e) = uniform(rng);
  }
  EXPECT_LT((ref::router_z_loss_grad(logits) -
             ref::finite_difference([](const MatD& x) { return ref::router_z_loss(x); }, logits))
                .cwiseAbs()
                .maxCoeff(),
            1e-8);
}

TEST(RouterZLoss, ZeroTokens) {
  const Matrix<float> logits(0, 4);
  EXPECT_TRUE(std::isfinite(router_z_loss(logits)));
  const Matrix<float> grad = router_z_loss_grad(logits);
  EXPECT_EQ(grad.rows(), 0);
  EXPECT_EQ(grad.cols(), 4);
}

TEST(RouterZLoss, RejectsNonFiniteLogits) {
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                    -std::numeric_limits<float>::infinity()}) {
    Matrix<float> logits = Matrix<float>::Zero(3, 4);
    logits(1, 3) = bad;
    EXPECT_TRUE(ThrowsInvalidArgumentNaming([&] { router_z_loss(logits); }, {"logits"}));
    EXPECT_TRUE(ThrowsInvalidArgumentNaming([&] { router_z_loss_grad(logits); }, {"logits"}));
  }
}

}  // namespace
