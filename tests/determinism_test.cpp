// Determinism (STYLE: results do not depend on the thread count; SEMANTICS 3: the random stream
// is seeded by the caller). Forward output, dx and every gradient are bitwise identical with 1
// and 2 OpenMP threads, with jitter and expert dropout on; the same seed reproduces a run
// bitwise and another seed changes the jitter.
//
// The shapes are large enough that the GEMMs and element-wise loops actually run in parallel
// (thousands of rows x d_ff per expert), and small enough for a sanitizer build.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <random>
#include <string>
#include <vector>

#include "reference/common.hpp"
#include "switchmoe/switchmoe.hpp"

namespace {

using switchmoe::Bf16;
using switchmoe::DenseConfig;
using switchmoe::DenseFFN;
using switchmoe::Fp32;
using switchmoe::Gelu;
using switchmoe::Matrix;
using switchmoe::Mode;
using switchmoe::Relu;
using switchmoe::SwitchConfig;
using switchmoe::SwitchLayer;
namespace ref = switchmoe_test::ref;

SwitchConfig big_config(std::uint64_t seed) {
  SwitchConfig cfg;
  cfg.d_model = 64;
  cfg.d_ff = 128;
  cfg.routing.num_experts = 4;
  cfg.routing.top_k = 2;
  cfg.routing.group_size = 256;
  cfg.routing.priority = switchmoe::Priority::kRouterProbability;
  cfg.expert_bias = true;
  cfg.aux_loss_coef = 0.01f;
  cfg.z_loss_coef = 0.001f;
  cfg.jitter_eps = 0.05f;
  cfg.expert_dropout = 0.2f;
  cfg.init_scale = 1.0f;
  cfg.seed = seed;
  return cfg;
}

struct Outcome {
  Matrix<float> y, dx, logits;
  Matrix<int> slot;
  float loss = 0;
  std::vector<Matrix<float>> grads;
};

// Two training steps (forward + backward each), so the second step's jitter/dropout draws and the
// accumulated gradients are covered too.
template <class Policy, class Act>
Outcome run_layer(int threads, std::uint64_t seed, const Matrix<float>& x,
                  const Matrix<float>& dy) {
  omp_set_num_threads(threads);
  SwitchLayer<Policy, Act> layer(big_config(seed));
  Outcome run;
  for (int step = 0; step < 2; ++step) {
    const auto out = layer.forward(x, Mode::kTrain);
    run.y = out.y;
    run.logits = out.routing.logits;
    run.slot = out.routing.slot;
    run.loss = out.loss;
    run.dx = layer.backward(dy);
  }
  for (auto& p : layer.parameters()) run.grads.push_back(*p.grad);
  omp_set_num_threads(2);
  return run;
}

void expect_bitwise_equal(const Outcome& a, const Outcome& b) {
  EXPECT_EQ(a.logits, b.logits);
  EXPECT_EQ(a.slot, b.slot);
  EXPECT_EQ(a.y, b.y);
  EXPECT_EQ(a.dx, b.dx);
  EXPECT_EQ(a.loss, b.loss);
  ASSERT_EQ(a.grads.size(), b.grads.size());
  for (std::size_t i = 0; i < a.grads.size(); ++i) EXPECT_EQ(a.grads[i], b.grads[i]) << i;
}

void inputs(Matrix<float>& x, Matrix<float>& dy) {
  std::mt19937 gen(1);
  x.resize(512, 64);
  dy.resize(512, 64);
  ref::fill_uniform(x, gen, -1, 1);
  ref::fill_uniform(dy, gen, -1, 1);
}

template <class Policy, class Act>
void thread_count_independent() {
  SCOPED_TRACE(std::string(Policy::name()) + " " + Act::name());
  ASSERT_GE(omp_get_num_procs(), 1);
  Matrix<float> x, dy;
  inputs(x, dy);
  const Outcome one = run_layer<Policy, Act>(1, 7, x, dy);
  const Outcome two = run_layer<Policy, Act>(2, 7, x, dy);
  expect_bitwise_equal(one, two);
  const Outcome three = run_layer<Policy, Act>(3, 7, x, dy);  // oversubscribed: uneven splits
  expect_bitwise_equal(one, three);
  // The run did drop units and tokens: dropout and capacity are really exercised.
  EXPECT_TRUE((one.slot.array() < 0).any());
}

TEST(Determinism, ThreadCountFp32Relu) { thread_count_independent<Fp32, Relu>(); }
TEST(Determinism, ThreadCountFp32Gelu) { thread_count_independent<Fp32, Gelu>(); }
TEST(Determinism, ThreadCountBf16Relu) { thread_count_independent<Bf16, Relu>(); }
TEST(Determinism, ThreadCountBf16Gelu) { thread_count_independent<Bf16, Gelu>(); }

TEST(Determinism, DenseThreadCount) {
  Matrix<float> x, dy;
  inputs(x, dy);
  auto run = [&](int threads) {
    omp_set_num_threads(threads);
    DenseConfig cfg;
    cfg.d_model = 64;
    cfg.d_ff = 256;
    cfg.bias = true;
    cfg.dropout = 0.3f;
    cfg.seed = 5;
    DenseFFN<Bf16, Gelu> ffn(cfg);
    Outcome r;
    r.y = ffn.forward(x, Mode::kTrain);
    r.dx = ffn.backward(dy);
    for (auto& p : ffn.parameters()) r.grads.push_back(*p.grad);
    omp_set_num_threads(2);
    return r;
  };
  const Outcome a = run(1), b = run(2);
  EXPECT_EQ(a.y, b.y);
  EXPECT_EQ(a.dx, b.dx);
  ASSERT_EQ(a.grads.size(), b.grads.size());
  for (std::size_t i = 0; i < a.grads.size(); ++i) EXPECT_EQ(a.grads[i], b.grads[i]) << i;
}

TEST(Determinism, SameSeedSameRun) {
  Matrix<float> x, dy;
  inputs(x, dy);
  expect_bitwise_equal(run_layer<Fp32, Gelu>(2, 11, x, dy), run_layer<Fp32, Gelu>(2, 11, x, dy));
}

// Another seed draws other jitter (and other dropout masks): same weights, different seeds.
TEST(Determinism, DifferentSeedDifferentJitter) {
  Matrix<float> x, dy;
  inputs(x, dy);
  SwitchConfig cfg = big_config(1);
  cfg.expert_dropout = 0.0f;
  SwitchLayer<Fp32, Relu> a(cfg);
  cfg.seed = 2;
  SwitchLayer<Fp32, Relu> b(cfg);
  auto pa = a.parameters();
  auto pb = b.parameters();
  for (std::size_t i = 0; i < pa.size(); ++i) *pb[i].value = *pa[i].value;
  const auto ea = a.forward(x, Mode::kEval), eb = b.forward(x, Mode::kEval);
  EXPECT_EQ(ea.routing.logits, eb.routing.logits) << "evaluation must be noise-free";
  EXPECT_EQ(ea.y, eb.y);
  const auto ta = a.forward(x, Mode::kTrain), tb = b.forward(x, Mode::kTrain);
  EXPECT_NE(ta.routing.logits, tb.routing.logits);
  EXPECT_NE(ta.routing.logits, ea.routing.logits);
  // Successive training calls draw fresh jitter.
  const auto ta2 = a.forward(x, Mode::kTrain);
  EXPECT_NE(ta2.routing.logits, ta.routing.logits);
  // Dropout masks depend on the seed too.
  cfg = big_config(1);
  cfg.jitter_eps = 0.0f;
  SwitchLayer<Fp32, Relu> c(cfg);
  cfg.seed = 2;
  SwitchLayer<Fp32, Relu> d(cfg);
  auto pc = c.parameters();
  auto pd = d.parameters();
  for (std::size_t i = 0; i < pc.size(); ++i) *pd[i].value = *pc[i].value;
  const auto tc = c.forward(x, Mode::kTrain), td = d.forward(x, Mode::kTrain);
  EXPECT_EQ(tc.routing.logits, td.routing.logits);
  EXPECT_NE(tc.y, td.y);
}

// Rule 1 is per token: dropping one token's choices (and re-numbering the slots after it)
// leaves every other token's output unchanged up to float32 rounding (the gathered rows move, so
// bitwise equality is not required) and gives the dropped token exactly 0.
TEST(Determinism, OutputsIndependentOfOtherTokensRouting) {
  SwitchConfig cfg = big_config(3);
  cfg.routing.group_size = 0;
  SwitchLayer<Fp32, Gelu> layer(cfg);
  Matrix<float> x, dy;
  inputs(x, dy);
  auto routing = layer.forward(x, Mode::kEval).routing;
  const Matrix<float> y1 = layer.forward(x, routing);
  // Drop token 0's choices: every other token's output must be bitwise unchanged.
  routing.slot.row(0).setConstant(-1);
  routing.gate.row(0).setZero();
  // Slots of the affected experts are no longer dense; re-number them.
  for (int e = 0; e < cfg.routing.num_experts; ++e) {
    int next = 0;
    std::vector<std::pair<int, std::pair<int, int>>> members;
    for (int t = 0; t < routing.slot.rows(); ++t)
      for (int c = 0; c < routing.slot.cols(); ++c)
        if (routing.expert(t, c) == e && routing.slot(t, c) >= 0)
          members.push_back({routing.slot(t, c), {t, c}});
    std::sort(members.begin(), members.end());
    for (auto& m : members) routing.slot(m.second.first, m.second.second) = next++;
  }
  const Matrix<float> y2 = layer.forward(x, routing);
  EXPECT_TRUE((y2.row(0).array() == 0.0f).all());
  EXPECT_LT(ref::max_abs_diff(y1.bottomRows(y1.rows() - 1), y2.bottomRows(y2.rows() - 1)), 1e-5);
}

}  // namespace
