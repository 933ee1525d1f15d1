// Tests of switchmoe::Router<Policy> (SEMANTICS rules 2, 3, 13 and the router part of 10):
// logits = float32(x) * W (+ b) computed in float32 whatever the policy, multiplicative jitter
// U(1 - eps, 1 + eps) on the router input in training only, and the backward pass.
#include "switchmoe/routing/router.hpp"

#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <tuple>

#include "reference/routing_reference.hpp"
#include "support/expect_throw.hpp"

namespace {

namespace ref = switchmoe_test::ref;
using ref::MatD;
using switchmoe::Bf16;
using switchmoe::Fp32;
using switchmoe::Matrix;
using switchmoe::Mode;
using switchmoe::Router;
using switchmoe::RouterConfig;
using switchmoe_test::ThrowsInvalidArgumentNaming;
using switchmoe_test::ref::to_double;

Matrix<float> random_matrix(int rows, int cols, std::mt19937& rng, float scale = 1.0f) {
  std::normal_distribution<float> normal(0.0f, scale);
  Matrix<float> m(rows, cols);
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < cols; ++c) m(r, c) = normal(rng);
  }
  return m;
}

RouterConfig config(int d_model, int experts, float jitter_eps = 0.0f, std::uint64_t seed = 0) {
  RouterConfig c;
  c.d_model = d_model;
  c.num_experts = experts;
  c.jitter_eps = jitter_eps;
  c.seed = seed;
  return c;
}

// Float32 result against the double reference, with a tolerance scaled by float epsilon and
// the magnitude of the products summed (so a bf16 rounding, ~4e-3 relative, cannot pass).
::testing::AssertionResult NearFloat32(const Matrix<float>& got, const MatD& want,
                                       const MatD& scale) {
  if (got.rows() != want.rows() || got.cols() != want.cols()) {
    return ::testing::AssertionFailure() << "shape " << got.rows() << "x" << got.cols()
                                         << ", expected " << want.rows() << "x" << want.cols();
  }
  for (Eigen::Index r = 0; r < got.rows(); ++r) {
    for (Eigen::Index c = 0; c < got.cols(); ++c) {
      const double tol = 1e-6 * (1.0 + scale(r, c));
      if (!(std::abs(got(r, c) - want(r, c)) <= tol)) {
        return ::testing::AssertionFailure()
               << "at (" << r << ", " << c << "): " << got(r, c) << " vs expected " << want(r, c);
      }
    }
  }
  return ::testing::AssertionSuccess();
}

// sum_d |x[t, d] * w[d, e]|: the scale of the rounding error of logits[t, e].
MatD product_scale(const MatD& x, const MatD& w) { return x.cwiseAbs() * w.cwiseAbs(); }

// ----------------------------------------------------------------------------------------------
// Rule 2: logits = float32(x) * W (+ b).

TEST(Router, WeightHasShapeDModelByExpertsAndNoBiasByDefault) {
  const RouterConfig defaults;
  EXPECT_FALSE(defaults.bias);
  EXPECT_FLOAT_EQ(defaults.jitter_eps, 0.01f);  // rule 3 default
  Router<Fp32> router(config(6, 3));
  EXPECT_EQ(router.weight().rows(), 6);
  EXPECT_EQ(router.weight().cols(), 3);
  EXPECT_EQ(router.bias().size(), 0);
}

TEST(Router, LogitsMatchReference) {
  std::mt19937 rng(1);
  for (auto [tokens, d, experts] : {std::tuple{1, 1, 1}, std::tuple{5, 7, 3}, std::tuple{33, 16, 8},
                                    std::tuple{17, 40, 5}, std::tuple{64, 24, 64}}) {
    Router<Fp32> router(config(d, experts));
    router.weight() = random_matrix(d, experts, rng);
    const Matrix<float> x = random_matrix(tokens, d, rng, 2.0f);
    const MatD xd = to_double(x);
    const MatD wd = to_double(router.weight());
    for (Mode mode : {Mode::kEval, Mode::kTrain}) {  // eps 0: train is noise-free too
      EXPECT_TRUE(
          NearFloat32(router.forward(x, mode), ref::router_logits(xd, wd), product_scale(xd, wd)))
          << tokens << "x" << d << "x" << experts;
    }
  }
}

TEST(Router, OptionalBiasIsAdded) {
  std::mt19937 rng(2);
  RouterConfig c = config(5, 4);
  c.bias = true;
  Router<Fp32> router(c);
  ASSERT_EQ(router.bias().rows(), 1);
  ASSERT_EQ(router.bias().cols(), 4);
  router.weight() = random_matrix(5, 4, rng);
  router.bias() = random_matrix(1, 4, rng);
  const Matrix<float> x = random_matrix(9, 5, rng);
  const MatD b = to_double(router.bias());
  const MatD xd = to_double(x), wd = to_double(router.weight());
  EXPECT_TRUE(NearFloat32(router.forward(x, Mode::kEval), ref::router_logits(xd, wd, &b),
                          product_scale(xd, wd) + MatD::Constant(9, 4, 1.0)));
}

TEST(Router, ZeroTokens) {
  Router<Fp32> router(config(4, 3));
  const Matrix<float> logits = router.forward(Matrix<float>(0, 4), Mode::kTrain);
  EXPECT_EQ(logits.rows(), 0);
  EXPECT_EQ(logits.cols(), 3);
}

TEST(Router, AcceptsABlockOfTheCallersBuffer) {
  std::mt19937 rng(3);
  Router<Fp32> router(config(4, 3));
  const Matrix<float> big = random_matrix(10, 8, rng);
  const Matrix<float> copy = big.block(2, 3, 5, 4);
  EXPECT_TRUE(router.forward(big.block(2, 3, 5, 4), Mode::kEval) ==
              router.forward(copy, Mode::kEval));
}

// ----------------------------------------------------------------------------------------------
// Rule 2 / 13: selective precision.

TEST(Router, Bf16PolicyComputesInFloat32) {
  // W = identity: logits = x exactly. 1 + 2^-12 is not a bfloat16 (8 significand bits): a
  // router that rounded its input or weights to bf16 would return 1.
  Router<Bf16> router(config(2, 2));
  router.weight() = Matrix<float>::Identity(2, 2);
  Matrix<float> x(1, 2);
  x << 1.0f + std::ldexp(1.0f, -12), -3.0f - std::ldexp(1.0f, -10);
  EXPECT_TRUE(router.forward(x, Mode::kEval) == x) << router.forward(x, Mode::kEval);
  router.weight()(0, 0) = 1.0f + std::ldexp(1.0f, -13);
  Matrix<float> one = Matrix<float>::Ones(1, 2);
  EXPECT_EQ(router.forward(one, Mode::kEval)(0, 0), 1.0f + std::ldexp(1.0f, -13));
}

TEST(Router, Fp32AndBf16PoliciesGiveIdenticalResults) {
  std::mt19937 rng(4);
  for (float eps : {0.0f, 0.05f}) {
    RouterConfig c = config(24, 8, eps, 1234);
    c.bias = true;
    Router<Fp32> fp32(c);
    Router<Bf16> bf16(c);
    EXPECT_TRUE(fp32.weight() == bf16.weight()) << "same seed, same initial weights";
    fp32.bias() = random_matrix(1, 8, rng);
    bf16.bias() = fp32.bias();
    const Matrix<float> x = random_matrix(37, 24, rng);
    for (Mode mode : {Mode::kTrain, Mode::kEval, Mode::kTrain}) {
      const Matrix<float> a = fp32.forward(x, mode);
      const Matrix<float> b = bf16.forward(x, mode);
      EXPECT_TRUE(a == b) << "eps " << eps;
      if (mode == Mode::kTrain) {
        const Matrix<float> dl = random_matrix(37, 8, rng);
        EXPECT_TRUE(fp32.backward(dl) == bf16.backward(dl));
        EXPECT_TRUE(fp32.grad_weight() == bf16.grad_weight());
        EXPECT_TRUE(fp32.grad_bias() == bf16.grad_bias());
      }
    }
  }
}

// ----------------------------------------------------------------------------------------------
// Rule 3: jitter.

// With W = identity (d_model = E) the logits are the jittered input itself, so the noise is
// logits / x elementwise.
Matrix<float> observed_noise(Router<Fp32>& router, const Matrix<float>& x, Mode mode) {
  router.weight() = Matrix<float>::Identity(x.cols(), x.cols());
  const Matrix<float> logits = router.forward(x, mode);
  return (logits.array() / x.array()).matrix();
}

Matrix<float> nonzero_input(int tokens, int d, std::mt19937& rng) {
  std::uniform_real_distribution<float> magnitude(0.5f, 2.0f);
  Matrix<float> x(tokens, d);
  for (int t = 0; t < tokens; ++t) {
    for (int j = 0; j < d; ++j) x(t, j) = (rng() % 2 ? 1.0f : -1.0f) * magnitude(rng);
  }
  return x;
}

TEST(RouterJitter, TrainingNoiseIsUniformWithinOneMinusEpsOnePlusEps) {
  std::mt19937 rng(5);
  const float eps = 0.1f;
  Router<Fp32> router(config(16, 16, eps, 42));
  const Matrix<float> x = nonzero_input(64, 16, rng);
  const Matrix<float> noise = observed_noise(router, x, Mode::kTrain);
  const float slack = 1e-6f;
  EXPECT_GE(noise.minCoeff(), 1.0f - eps - slack);
  EXPECT_LE(noise.maxCoeff(), 1.0f + eps + slack);
  // 1024 draws of U(0.9, 1.1): the extremes are near the ends, the mean near 1 (its standard
  // error is eps / sqrt(3 * 1024) = 0.0018), and the variance near eps^2 / 3.
  EXPECT_LT(noise.minCoeff(), 1.0f - 0.9f * eps);
  EXPECT_GT(noise.maxCoeff(), 1.0f + 0.9f * eps);
  const double mean = noise.cast<double>().mean();
  EXPECT_NEAR(mean, 1.0, 0.01);
  const double var = (noise.cast<double>().array() - mean).square().mean();
  EXPECT_NEAR(var, eps * eps / 3.0, 0.15 * eps * eps / 3.0);
  // Elementwise: not one factor per token or per column.
  int distinct_in_row = 0;
  for (int j = 1; j < 16; ++j) distinct_in_row += noise(0, j) != noise(0, 0);
  EXPECT_GT(distinct_in_row, 10);
  int distinct_in_col = 0;
  for (int t = 1; t < 64; ++t) distinct_in_col += noise(t, 0) != noise(0, 0);
  EXPECT_GT(distinct_in_col, 50);
}

TEST(RouterJitter, MultipliesTheInputNotTheLogits) {
  // x = [1, 1], W column 0 = [1, -1]: noise-free logit 0 = 1 - 1 = 0, and multiplicative noise
  // on the logit keeps it 0; noise on the input gives n_1 - n_2 != 0.
  Router<Fp32> router(config(2, 2, 0.2f, 7));
  router.weight() << 1, 0, -1, 1;
  const Matrix<float> x = Matrix<float>::Ones(32, 2);
  const Matrix<float> logits = router.forward(x, Mode::kTrain);
  int nonzero = 0;
  for (int t = 0; t < 32; ++t) {
    nonzero += logits(t, 0) != 0.0f;
    EXPECT_LE(std::abs(logits(t, 0)), 2 * 0.2f + 1e-6f);  // |n_1 - n_2| <= 2 eps
  }
  EXPECT_GT(nonzero, 28);
}

TEST(RouterJitter, EvaluationIsNoiseFree) {
  std::mt19937 rng(6);
  Router<Fp32> noisy(config(12, 5, 0.3f, 9));
  Router<Fp32> clean(config(12, 5, 0.0f, 9));
  clean.weight() = noisy.weight();
  const Matrix<float> x = random_matrix(20, 12, rng);
  const Matrix<float> want = clean.forward(x, Mode::kEval);
  EXPECT_TRUE(noisy.forward(x, Mode::kEval) == want);
  EXPECT_FALSE(noisy.forward(x, Mode::kTrain) == want);
  EXPECT_TRUE(noisy.forward(x, Mode::kEval) == want);  // still clean after a training call
  const MatD xd = to_double(x), wd = to_double(clean.weight());
  EXPECT_TRUE(NearFloat32(want, ref::router_logits(xd, wd), product_scale(xd, wd)));
}

TEST(RouterJitter, ZeroEpsDisablesJitter) {
  std::mt19937 rng(7);
  Router<Fp32> router(config(12, 5, 0.0f, 9));
  const Matrix<float> x = random_matrix(20, 12, rng);
  EXPECT_TRUE(router.forward(x, Mode::kTrain) == router.forward(x, Mode::kEval));
}

TEST(RouterJitter, SameSeedReproducesTheNoise) {
  std::mt19937 rng(8);
  const Matrix<float> x = nonzero_input(16, 8, rng);
  Router<Fp32> a(config(8, 8, 0.05f, 2024));
  Router<Fp32> b(config(8, 8, 0.05f, 2024));
  for (int step = 0; step < 3; ++step) {  // the whole sequence of training calls
    EXPECT_TRUE(observed_noise(a, x, Mode::kTrain) == observed_noise(b, x, Mode::kTrain))
        << "step " << step;
  }
}

TEST(RouterJitter, SameNoiseWhateverTheThreadCount) {
  // Reproducible runs (rule 3) must not depend on how many threads draw the noise.
  std::mt19937 rng(12);
  const Matrix<float> x = nonzero_input(257, 8, rng);
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  Router<Fp32> one(config(8, 8, 0.05f, 31));
  const Matrix<float> with_one = observed_noise(one, x, Mode::kTrain);
  omp_set_num_threads(std::max(2, threads));
  Router<Fp32> many(config(8, 8, 0.05f, 31));
  const Matrix<float> with_many = observed_noise(many, x, Mode::kTrain);
  omp_set_num_threads(threads);
  EXPECT_TRUE(with_one == with_many);
}

TEST(RouterJitter, DifferentSeedsGiveDifferentNoise) {
  std::mt19937 rng(9);
  const Matrix<float> x = nonzero_input(16, 8, rng);
  Router<Fp32> a(config(8, 8, 0.05f, 1));
  Router<Fp32> b(config(8, 8, 0.05f, 2));
  const Matrix<float> na = observed_noise(a, x, Mode::kTrain);
  const Matrix<float> nb = observed_noise(b, x, Mode::kTrain);
  int same = 0;
  for (int t = 0; t < 16; ++t) {
    for (int j = 0; j < 8; ++j) same += na(t, j) == nb(t, j);
  }
  EXPECT_LT(same, 8) << "seeds 1 and 2 drew (almost) the same noise";
}

// ----------------------------------------------------------------------------------------------
// Backward (rule 10: the router receives dlogits from the gates, aux and z losses).

TEST(RouterBackward, MatchesReferenceWithoutJitter) {
  // logits = x W + b: dW = x^T dl, db = sum_t dl, dx = dl W^T; gradients accumulate.
  std::mt19937 rng(10);
  RouterConfig c = config(6, 4);
  c.bias = true;
  Router<Fp32> router(c);
  router.weight() = random_matrix(6, 4, rng);
  router.zero_grad();
  const Matrix<float> x = random_matrix(11, 6, rng);
  const Matrix<float> dl = random_matrix(11, 4, rng);
  router.forward(x, Mode::kTrain);
  const Matrix<float> dx = router.backward(dl);
  const MatD xd = to_double(x), wd = to_double(router.weight()), dld = to_double(dl);
  EXPECT_TRUE(NearFloat32(dx, dld * wd.transpose(), dld.cwiseAbs() * wd.cwiseAbs().transpose()));
  const MatD dw = xd.transpose() * dld;
  const MatD dw_scale = xd.cwiseAbs().transpose() * dld.cwiseAbs();
  EXPECT_TRUE(NearFloat32(router.grad_weight(), dw, dw_scale));
  EXPECT_TRUE(NearFloat32(router.grad_bias(), dld.colwise().sum(), dld.cwiseAbs().colwise().sum()));
  router.forward(x, Mode::kTrain);
  router.backward(dl);
  EXPECT_TRUE(NearFloat32(router.grad_weight(), 2.0 * dw, 2.0 * dw_scale)) << "accumulates";
  router.zero_grad();
  EXPECT_TRUE(router.grad_weight().isZero(0.0));
  EXPECT_TRUE(router.grad_bias().isZero(0.0));
}

TEST(RouterBackward, UsesTheJitteredInput) {
  // Two routers with the same seed draw the same noise on their first training call; the one
  // with W = I shows the noise n, the other must give logits (x .* n) W, dW = (x .* n)^T dl
  // and dx = (dl W^T) .* n.
  std::mt19937 rng(11);
  const int d = 6, experts = 6;
  const Matrix<float> x = nonzero_input(10, d, rng);
  Router<Fp32> probe(config(d, experts, 0.1f, 77));
  const MatD noise = to_double(observed_noise(probe, x, Mode::kTrain));
  Router<Fp32> router(config(d, experts, 0.1f, 77));
  router.weight() = random_matrix(d, experts, rng);
  router.zero_grad();
  const MatD xn = (to_double(x).array() * noise.array()).matrix();
  const MatD wd = to_double(router.weight());
  const Matrix<float> logits = router.forward(x, Mode::kTrain);
  EXPECT_TRUE(NearFloat32(logits, xn * wd, product_scale(xn, wd)));
  const Matrix<float> dl = random_matrix(10, experts, rng);
  const MatD dld = to_double(dl);
  const Matrix<float> dx = router.backward(dl);
  const MatD want_dx = ((dld * wd.transpose()).array() * noise.array()).matrix();
  EXPECT_TRUE(NearFloat32(dx, want_dx, 2.0 * dld.cwiseAbs() * wd.cwiseAbs().transpose()));
  EXPECT_TRUE(NearFloat32(router.grad_weight(), xn.transpose() * dld,
                          xn.cwiseAbs().transpose() * dld.cwiseAbs()));
}

// ----------------------------------------------------------------------------------------------
// Rule 11 for the router weight: truncated normal, std sqrt(s / d_model), cut at 2 std.

TEST(Router, InitialWeightsAreATruncatedNormal) {
  RouterConfig c = config(64, 64);
  c.init_scale = 0.1f;
  Router<Fp32> router(c);
  const double sigma = std::sqrt(0.1 / 64);
  const Matrix<float>& w = router.weight();
  EXPECT_LE(w.cwiseAbs().maxCoeff(), 2.0 * sigma * (1 + 1e-6));
  const double mean = w.cast<double>().mean();
  const double std = std::sqrt((w.cast<double>().array() - mean).square().mean());
  EXPECT_NEAR(mean, 0.0, 0.05 * sigma);
  // A normal truncated at 2 sigma has standard deviation 0.880 sigma; a plain normal 1.0.
  EXPECT_GT(std, 0.8 * sigma);
  EXPECT_LT(std, 1.02 * sigma);
  EXPECT_FALSE(Router<Fp32>(config(64, 64, 0.0f, 1)).weight() == w) << "the seed matters";
}

// ----------------------------------------------------------------------------------------------
// Bad input.

TEST(Router, RejectsBadConfig) {
  EXPECT_TRUE(ThrowsInvalidArgumentNaming([] { Router<Fp32> r(config(0, 4)); }, {"d_model", "0"}));
  EXPECT_TRUE(
      ThrowsInvalidArgumentNaming([] { Router<Fp32> r(config(4, 0)); }, {"num_experts", "0"}));
  EXPECT_TRUE(
      ThrowsInvalidArgumentNaming([] { Router<Fp32> r(config(4, -2)); }, {"num_experts", "-2"}));
  for (float bad : {-0.1f, std::numeric_limits<float>::quiet_NaN()}) {
    EXPECT_TRUE(
        ThrowsInvalidArgumentNaming([&] { Router<Fp32> r(config(4, 4, bad)); }, {"jitter_eps"}));
  }
}

TEST(Router, RejectsInputOfTheWrongWidth) {
  Router<Fp32> router(config(4, 3));
  EXPECT_TRUE(ThrowsInvalidArgumentNaming(
      [&] { router.forward(Matrix<float>::Zero(2, 5), Mode::kEval); }, {"x"}));
  router.forward(Matrix<float>::Zero(2, 4), Mode::kTrain);
  EXPECT_TRUE(ThrowsInvalidArgumentNaming([&] { router.backward(Matrix<float>::Zero(2, 4)); },
                                          {"dlogits"}));
  EXPECT_TRUE(ThrowsInvalidArgumentNaming([&] { router.backward(Matrix<float>::Zero(3, 3)); },
                                          {"dlogits"}));
}

}  // namespace
