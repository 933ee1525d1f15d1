// The Bf16RouterAblation policy (paper Table 2's "bfloat16 everywhere", an ablation that breaks
// SEMANTICS 13 on purpose): the router rounds its input, weights and logits to bfloat16 and the
// layer rounds the softmax probabilities and gates. Checked against a double-precision reference
// that rounds at the same stages, and against the float32 router of the Bf16 policy, which must
// differ (otherwise the ablation would not be one).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "switchmoe/switchmoe.hpp"

namespace {

using switchmoe::Matrix;
using switchmoe::Mode;
using switchmoe::SwitchConfig;
using switchmoe::SwitchLayer;
using MatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Round to nearest bfloat16, ties to even, by bit manipulation of the float (independent of
// Eigen's conversion): bfloat16 keeps the top 16 bits of a float32.
double bf16(double v) {
  float f = static_cast<float>(v);
  std::uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  const std::uint32_t lsb = (bits >> 16) & 1u;
  bits += 0x7fffu + lsb;
  bits &= 0xffff0000u;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// One unit in the last place of bfloat16 at |v| (8 significant bits).
double bf16_ulp(double v) { return std::ldexp(1.0, std::ilogb(v) - 7); }

SwitchConfig config() {
  SwitchConfig c;
  c.d_model = 24;
  c.d_ff = 16;
  c.routing.num_experts = 6;
  c.routing.capacity_factor = 2.0;
  c.seed = 7;
  c.init_scale = 1.0f;  // logits of order 1: the softmax is far from uniform
  return c;
}

Matrix<float> tokens(int n, int d) {
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Matrix<float> x(n, d);  // [tokens, d_model]
  for (Eigen::Index i = 0; i < x.size(); ++i) x.data()[i] = normal(rng);
  return x;
}

// The reference: bf16(x) * bf16(W) in double, logits rounded, softmax in double, rounded.
MatD reference_probs(const Matrix<float>& x, const Matrix<float>& w) {
  MatD xr(x.rows(), x.cols()), wr(w.rows(), w.cols());
  for (Eigen::Index i = 0; i < x.size(); ++i) xr.data()[i] = bf16(x.data()[i]);
  for (Eigen::Index i = 0; i < w.size(); ++i) wr.data()[i] = bf16(w.data()[i]);
  MatD logits = xr * wr;  // [tokens, experts]
  MatD probs(logits.rows(), logits.cols());
  for (Eigen::Index t = 0; t < logits.rows(); ++t) {
    double max = -1e300, sum = 0.0;
    for (Eigen::Index e = 0; e < logits.cols(); ++e) {
      logits(t, e) = bf16(logits(t, e));
      max = std::max(max, logits(t, e));
    }
    for (Eigen::Index e = 0; e < logits.cols(); ++e) sum += std::exp(logits(t, e) - max);
    for (Eigen::Index e = 0; e < logits.cols(); ++e)
      probs(t, e) = bf16(std::exp(logits(t, e) - max) / sum);
  }
  return probs;
}

TEST(Bf16RouterAblation, ProbabilitiesMatchARoundingDoubleReference) {
  SwitchLayer<switchmoe::Bf16RouterAblation> layer(config());
  const Matrix<float> x = tokens(64, 24);
  const auto out = layer.forward(x, Mode::kEval);
  const MatD ref = reference_probs(x, layer.router_weight());
  ASSERT_EQ(out.routing.probs.rows(), ref.rows());
  int exact = 0;
  for (Eigen::Index t = 0; t < ref.rows(); ++t) {
    for (Eigen::Index e = 0; e < ref.cols(); ++e) {
      const double p = out.routing.probs(t, e);
      EXPECT_EQ(p, bf16(p)) << "probability (" << t << ", " << e << ") is not a bfloat16";
      // float32 softmax against double may straddle a bfloat16 rounding boundary: one ulp.
      EXPECT_LE(std::abs(p - ref(t, e)), bf16_ulp(ref(t, e))) << t << ", " << e;
      exact += p == ref(t, e);
    }
    // Top-1 gate = the chosen expert's (rounded) probability.
    const int chosen = out.routing.expert(t, 0);
    if (out.routing.slot(t, 0) >= 0) {
      EXPECT_EQ(out.routing.gate(t, 0), out.routing.probs(t, chosen));
    }
  }
  EXPECT_GE(exact, static_cast<int>(0.9 * static_cast<double>(ref.size())));
}

TEST(Bf16RouterAblation, DiffersFromTheFloat32Router) {
  // Same config and seed: the same router weights; the Bf16 policy keeps its router in float32.
  SwitchLayer<switchmoe::Bf16> selective(config());
  SwitchLayer<switchmoe::Bf16RouterAblation> ablation(config());
  ASSERT_TRUE(selective.router_weight() == ablation.router_weight());
  const Matrix<float> x = tokens(64, 24);
  const auto a = selective.forward(x, Mode::kEval);
  const auto b = ablation.forward(x, Mode::kEval);
  const MatD ref = reference_probs(x, ablation.router_weight());
  int not_bf16 = 0;
  double largest = 0.0;
  for (Eigen::Index i = 0; i < ref.size(); ++i) {
    const double p = a.routing.probs.data()[i];
    not_bf16 += p != bf16(p);
    largest = std::max(largest, std::abs(p - b.routing.probs.data()[i]));
  }
  EXPECT_GT(not_bf16, static_cast<int>(ref.size() / 2));  // float32 probabilities
  EXPECT_GT(largest, 1e-3);  // the ablation's roundings show in the probabilities
}

TEST(Bf16RouterAblation, TrainsWithFloat32Gradients) {
  // Straight through the roundings: a training step runs and yields finite router gradients.
  SwitchLayer<switchmoe::Bf16RouterAblation> layer(config());
  const Matrix<float> x = tokens(32, 24);
  const auto out = layer.forward(x, Mode::kTrain);
  layer.zero_grad();
  const Matrix<float> dx = layer.backward(Matrix<float>::Ones(32, 24));
  EXPECT_TRUE(dx.allFinite());
  EXPECT_TRUE(layer.grad_router_weight().allFinite());
  EXPECT_GT(layer.grad_router_weight().norm(), 0.0f);
  EXPECT_STREQ(switchmoe::Bf16RouterAblation::name(), "bf16-router");
}

}  // namespace
