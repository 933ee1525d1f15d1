// SwitchLayer forward against the double-precision reference (SEMANTICS 1, 2, 4-9, 11, 12, 14).
#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "reference/layer_reference.hpp"
#include "support/random_weights.hpp"
#include "switchmoe/switchmoe.hpp"

namespace {

using switchmoe::Fp32;
using switchmoe::Gelu;
using switchmoe::Matrix;
using switchmoe::Mode;
using switchmoe::Priority;
using switchmoe::Relu;
using switchmoe::SwitchConfig;
using switchmoe::SwitchLayer;
using switchmoe_test::ref::MatD;
using switchmoe_test::ref::MatI;
namespace ref = switchmoe_test::ref;

template <class A>
constexpr ref::Act act_of() {
  return std::is_same_v<A, Gelu> ? ref::Act::kGelu : ref::Act::kRelu;
}

struct Case {
  std::string name;
  int tokens = 8, d_model = 4, d_ff = 8, experts = 4, top_k = 1;
  int group_size = 0, expert_capacity = 0, min_capacity = 4;
  double capacity_factor = 1.25, eval_capacity_factor = 2.0;
  Priority priority = Priority::kTokenOrder;
  bool dropless = false, renormalize = false, bias = false;
  Mode mode = Mode::kEval;
  unsigned seed = 1;
};

SwitchConfig config_of(const Case& c) {
  SwitchConfig cfg;
  cfg.d_model = c.d_model;
  cfg.d_ff = c.d_ff;
  cfg.routing.num_experts = c.experts;
  cfg.routing.top_k = c.top_k;
  cfg.routing.group_size = c.group_size;
  cfg.routing.expert_capacity = c.expert_capacity;
  cfg.routing.min_capacity = c.min_capacity;
  cfg.routing.capacity_factor = c.capacity_factor;
  cfg.routing.eval_capacity_factor = c.eval_capacity_factor;
  cfg.routing.priority = c.priority;
  cfg.routing.dropless = c.dropless;
  cfg.routing.renormalize = c.renormalize;
  cfg.expert_bias = c.bias;
  cfg.jitter_eps = 0.0f;  // the reference is noise-free; jitter has its own tests
  cfg.aux_loss_coef = 0.01f;
  cfg.z_loss_coef = 0.001f;
  cfg.seed = c.seed;
  return cfg;
}

// Random weights of O(1) size so routing decisions are well spread and outputs are O(1).
template <class Layer>
void randomize(Layer& layer, const Case& c, std::mt19937& gen) {
  ref::fill_uniform(layer.router_weight(), gen, -1.5, 1.5);
  switchmoe_test::randomize_experts(layer, c.experts, c.bias, gen);
}

int reference_capacity(const Case& c) {
  const int tg = c.group_size > 0 ? c.group_size : c.tokens;
  const double factor = c.mode == Mode::kTrain ? c.capacity_factor : c.eval_capacity_factor;
  return ref::capacity(tg, c.experts, factor, c.min_capacity, c.expert_capacity);
}

// fp32 forward vs double reference: each output is a sum of d_model + d_ff products of O(1)
// terms; float32 rounding (u = 2^-24) accumulates to well below 1e-5 absolute at these sizes.
constexpr double kFp32Tol = 2e-5;

template <class Out>
void expect_stats_match(const Out& out, const ref::Routing& r, int experts, double z) {
  const ref::Stats s = ref::stats(r, experts);
  const auto& st = out.stats;
  ASSERT_EQ(static_cast<int>(st.tokens_per_expert.size()), experts);
  ASSERT_EQ(static_cast<int>(st.kept_tokens_per_expert.size()), experts);
  for (int e = 0; e < experts; ++e) {
    EXPECT_EQ(st.tokens_per_expert[e], s.tokens_before[e]) << "expert " << e;
    EXPECT_EQ(st.kept_tokens_per_expert[e], s.tokens_after[e]) << "expert " << e;
  }
  EXPECT_NEAR(st.dropped_fraction, s.dropped_choice_fraction, 1e-6);
  EXPECT_NEAR(st.dropped_token_fraction, s.dropped_token_fraction, 1e-6);
  EXPECT_NEAR(st.router_confidence, s.router_confidence, 1e-5);
  EXPECT_NEAR(st.expert_usage, s.expert_usage, 1e-6);
  EXPECT_NEAR(st.aux_loss, r.aux_loss, 1e-5 * (1 + std::abs(r.aux_loss)));
  EXPECT_NEAR(st.z_loss, z, 1e-5 * (1 + z));
}

template <class Act>
void run_case(const Case& c) {
  SCOPED_TRACE(c.name);
  const SwitchConfig cfg = config_of(c);
  SwitchLayer<Fp32, Act> layer(cfg);
  std::mt19937 gen(c.seed);
  randomize(layer, c, gen);
  Matrix<float> x(c.tokens, c.d_model);  // [tokens, d_model]
  ref::fill_uniform(x, gen, -1.0, 1.0);

  const auto out = layer.forward(x, c.mode);
  const MatD xd = ref::to_double(x);

  // Rule 2: logits = x * W_r, probs = softmax, in float32.
  const MatD logits = ref::router_logits(xd, ref::to_double(layer.router_weight()));
  ASSERT_EQ(out.routing.logits.rows(), c.tokens);
  ASSERT_EQ(out.routing.logits.cols(), c.experts);
  EXPECT_LT(ref::max_abs_diff(ref::to_double(out.routing.logits), logits), 1e-5);
  EXPECT_LT(ref::max_abs_diff(ref::to_double(out.routing.probs), ref::softmax(logits)), 1e-6);

  // Rules 4-7 from the layer's own float probabilities (so near-ties resolve identically).
  ref::RouteOptions ro;
  ro.top_k = c.top_k;
  ro.capacity = reference_capacity(c);
  ro.group_size = c.group_size;
  ro.by_probability = c.priority == Priority::kRouterProbability;
  ro.dropless = c.dropless;
  ro.renormalize = c.renormalize;
  const MatD layer_logits = ref::to_double(out.routing.logits);
  const ref::Routing r = ref::route_probs(ref::to_double(out.routing.probs), ro, &layer_logits);
  ASSERT_EQ(out.routing.expert.rows(), c.tokens);
  ASSERT_EQ(out.routing.expert.cols(), c.top_k);
  EXPECT_EQ(MatI(out.routing.expert), r.expert);
  EXPECT_EQ(MatI(out.routing.slot), r.slot);
  EXPECT_LT(ref::max_abs_diff(ref::to_double(out.routing.gate), r.gate), 1e-6);
  EXPECT_EQ(out.routing.capacity, r.capacity);
  EXPECT_EQ(out.routing.group_size, r.group_size);

  // Rule 1 against the double reference, with the reference gates.
  const MatD y_ref = ref::switch_combine(xd, ref::experts_of(layer, c.experts, c.bias), r.expert,
                                         r.slot, r.gate, ref::Act(act_of<Act>()));
  ASSERT_EQ(out.y.rows(), c.tokens);
  ASSERT_EQ(out.y.cols(), c.d_model);
  EXPECT_LT(ref::max_abs_diff(ref::to_double(out.y), y_ref), kFp32Tol);
  for (int t = 0; t < c.tokens; ++t) {
    bool any_kept = false;
    for (int k = 0; k < c.top_k; ++k) any_kept |= r.slot(t, k) >= 0;
    if (!any_kept) {
      for (int j = 0; j < c.d_model; ++j) EXPECT_EQ(out.y(t, j), 0.0f) << "dropped token " << t;
    }
  }

  // Rules 8, 9 and the scaled loss.
  const double z = ref::router_z_loss(logits);
  EXPECT_NEAR(out.routing.aux_loss, r.aux_loss, 1e-5 * (1 + r.aux_loss));
  EXPECT_NEAR(out.routing.z_loss, z, 1e-5 * (1 + z));
  EXPECT_NEAR(out.loss, cfg.aux_loss_coef * r.aux_loss + cfg.z_loss_coef * z, 1e-6);
  expect_stats_match(out, r, c.experts, z);
}

std::vector<Case> forward_cases() {
  std::vector<Case> cases;
  auto add = [&](Case c) { cases.push_back(c); };
  Case c;
  c.name = "default top1";
  add(c);
  c = Case{};
  c.name = "one token";
  c.tokens = 1;
  add(c);
  c = Case{};
  c.name = "fewer tokens than experts";
  c.tokens = 3;
  c.experts = 8;
  add(c);
  c = Case{};
  c.name = "capacity 1 drops";
  c.tokens = 12;
  c.expert_capacity = 1;
  c.experts = 3;
  add(c);
  c.name = "capacity 1 drops top2 priority";
  c.top_k = 2;
  c.priority = Priority::kRouterProbability;
  add(c);
  c = Case{};
  c.name = "train capacity factor with drops";
  c.mode = Mode::kTrain;
  c.tokens = 40;
  c.experts = 4;
  c.min_capacity = 1;
  c.capacity_factor = 0.75;  // C = 7 < 10 per expert on average: many drops
  add(c);
  c.name = "train capacity factor with drops, probability priority";
  c.priority = Priority::kRouterProbability;
  add(c);
  c = Case{};
  c.name = "eval capacity factor small";
  c.tokens = 32;
  c.min_capacity = 0;
  c.eval_capacity_factor = 0.5;
  add(c);
  c = Case{};
  c.name = "dropless";
  c.tokens = 30;
  c.experts = 5;
  c.dropless = true;
  c.top_k = 2;
  add(c);
  c = Case{};
  c.name = "groups";
  c.tokens = 36;
  c.group_size = 12;
  c.experts = 3;
  c.min_capacity = 1;
  c.capacity_factor = 0.5;
  c.mode = Mode::kTrain;
  add(c);
  c.name = "groups top2 probability priority bias";
  c.top_k = 2;
  c.priority = Priority::kRouterProbability;
  c.bias = true;
  add(c);
  c = Case{};
  c.name = "top3 renormalize bias";
  c.tokens = 24;
  c.experts = 6;
  c.top_k = 3;
  c.renormalize = true;
  c.bias = true;
  c.expert_capacity = 5;
  add(c);
  c.name = "top3 probability priority";
  c.renormalize = false;
  c.priority = Priority::kRouterProbability;
  add(c);
  c = Case{};
  c.name = "larger shapes";
  c.tokens = 40;
  c.d_model = 16;
  c.d_ff = 32;
  c.experts = 8;
  c.top_k = 2;
  c.bias = true;
  add(c);
  c = Case{};
  c.name = "top-k equals experts";
  c.tokens = 10;
  c.experts = 3;
  c.top_k = 3;
  c.expert_capacity = 6;
  add(c);
  return cases;
}

TEST(SwitchLayerForward, ReluMatchesReference) {
  unsigned seed = 100;
  for (Case c : forward_cases()) {
    c.seed = seed++;
    run_case<Relu>(c);
  }
}

TEST(SwitchLayerForward, GeluMatchesReference) {
  unsigned seed = 200;
  for (Case c : forward_cases()) {
    c.seed = seed++;
    run_case<Gelu>(c);
  }
}

TEST(SwitchLayerForward, RandomShapesMatchReference) {
  std::mt19937 gen(7);
  for (int i = 0; i < 30; ++i) {
    Case c;
    c.name = "random " + std::to_string(i);
    c.seed = 300 + i;
    c.d_model = 1 + gen() % 16;
    c.d_ff = 1 + gen() % 32;
    c.experts = 1 + gen() % 6;
    c.top_k = 1 + gen() % std::min(3, c.experts);
    c.group_size = (gen() % 2) ? 4 : 0;
    c.tokens = c.group_size ? 4 * (1 + gen() % 10) : 1 + gen() % 40;
    c.min_capacity = gen() % 3;
    c.capacity_factor = 0.5 + (gen() % 4) * 0.5;
    c.priority = (gen() % 2) ? Priority::kRouterProbability : Priority::kTokenOrder;
    c.dropless = gen() % 5 == 0;
    c.bias = gen() % 2;
    c.renormalize = c.top_k > 1 && gen() % 2;
    c.mode = (gen() % 2) ? Mode::kTrain : Mode::kEval;
    if (gen() % 2)
      run_case<Relu>(c);
    else
      run_case<Gelu>(c);
  }
}

// Every token prefers expert 0: in token order the first C tokens are kept and the rest get
// y = 0 exactly; with probability priority the C most confident tokens are kept.
TEST(SwitchLayerForward, EveryTokenChoosesOneExpert) {
  for (Priority priority : {Priority::kTokenOrder, Priority::kRouterProbability}) {
    Case c;
    c.tokens = 10;
    c.d_model = 3;
    c.experts = 3;
    c.expert_capacity = 4;
    c.priority = priority;
    SwitchLayer<Fp32, Relu> layer(config_of(c));
    std::mt19937 gen(11);
    randomize(layer, c, gen);
    layer.router_weight().setZero();
    layer.router_weight().col(0).setConstant(2.0f);  // x >= 0, so expert 0 wins every token
    Matrix<float> x(c.tokens, c.d_model);
    for (int t = 0; t < c.tokens; ++t) x.row(t).setConstant(0.1f * ((t * 7) % 10 + 1));
    const auto out = layer.forward(x, Mode::kEval);
    std::vector<int> kept;
    for (int t = 0; t < c.tokens; ++t) {
      EXPECT_EQ(out.routing.expert(t, 0), 0);
      if (out.routing.slot(t, 0) >= 0) kept.push_back(t);
    }
    ASSERT_EQ(static_cast<int>(kept.size()), 4);
    if (priority == Priority::kTokenOrder) {
      EXPECT_EQ(kept, (std::vector<int>{0, 1, 2, 3}));
    } else {
      // x[t] = 0.1 * ((7t mod 10) + 1): largest for t = 7 (1.0), 4 (0.9), 1 (0.8), 8 (0.7).
      EXPECT_EQ(kept, (std::vector<int>{1, 4, 7, 8}));
      EXPECT_EQ(out.routing.slot(7, 0), 0);
      EXPECT_EQ(out.routing.slot(4, 0), 1);
      EXPECT_EQ(out.routing.slot(1, 0), 2);
      EXPECT_EQ(out.routing.slot(8, 0), 3);
    }
    const MatD xd = ref::to_double(x);
    const ref::Ffn f = ref::expert_of(layer, 0, false);
    for (int t = 0; t < c.tokens; ++t) {
      if (out.routing.slot(t, 0) < 0) {
        for (int j = 0; j < c.d_model; ++j) EXPECT_EQ(out.y(t, j), 0.0f);
        EXPECT_EQ(out.routing.gate(t, 0), 0.0f);
      } else {
        const auto row = ref::ffn_row(xd, t, f, ref::Act::kRelu);
        for (int j = 0; j < c.d_model; ++j)
          EXPECT_NEAR(out.y(t, j), out.routing.probs(t, 0) * row[j], kFp32Tol);
      }
    }
    EXPECT_NEAR(out.stats.dropped_fraction, 0.6, 1e-6);
  }
}

// Rule 14 with hand-computed values: 8 tokens, 2 experts, capacity 3. Tokens 0-5 are [1, 0]
// (logits [2, 0], expert 0) and 6-7 are [0, 1] (logits [0, 2], expert 1).
TEST(SwitchLayerStats, HandComputed) {
  Case c;
  c.tokens = 8;
  c.d_model = 2;
  c.experts = 2;
  c.expert_capacity = 3;
  SwitchConfig cfg = config_of(c);
  cfg.aux_loss_coef = 0.5f;
  cfg.z_loss_coef = 0.25f;
  SwitchLayer<Fp32, Relu> layer(cfg);
  layer.router_weight() << 2, 0, 0, 2;
  Matrix<float> x = Matrix<float>::Zero(8, 2);
  for (int t = 0; t < 6; ++t) x(t, 0) = 1;
  for (int t = 6; t < 8; ++t) x(t, 1) = 1;
  const auto out = layer.forward(x, Mode::kEval);
  const double p = std::exp(2.0) / (std::exp(2.0) + 1.0);  // 0.8808, the winner's probability
  const auto& st = out.stats;
  EXPECT_EQ(st.tokens_per_expert, (std::vector<int>{6, 2}));
  EXPECT_EQ(st.kept_tokens_per_expert, (std::vector<int>{3, 2}));
  EXPECT_NEAR(st.dropped_fraction, 3.0 / 8.0, 1e-7);
  EXPECT_NEAR(st.dropped_token_fraction, 3.0 / 8.0, 1e-7);
  EXPECT_NEAR(st.router_confidence, p, 1e-6);             // every kept gate is p
  EXPECT_NEAR(st.expert_usage, 5.0 / (2 * 3 * 1), 1e-7);  // kept / (E * C * groups)
  const double p0 = (6 * p + 2 * (1 - p)) / 8, p1 = (6 * (1 - p) + 2 * p) / 8;
  const double aux = 2 * (6.0 / 8 * p0 + 2.0 / 8 * p1);
  const double lse = std::log(std::exp(2.0) + 1.0);
  EXPECT_NEAR(st.aux_loss, aux, 1e-6);
  EXPECT_NEAR(st.z_loss, lse * lse, 1e-5);
  EXPECT_NEAR(out.routing.aux_loss, aux, 1e-6);
  EXPECT_NEAR(out.routing.z_loss, lse * lse, 1e-5);
  EXPECT_NEAR(out.loss, 0.5 * aux + 0.25 * lse * lse, 1e-5);
  for (int t = 3; t < 6; ++t) EXPECT_EQ(out.routing.slot(t, 0), -1);
}

// Rule 14 with k = 2 and groups: usage divides by E * C * groups; confidence averages kept gates.
TEST(SwitchLayerStats, TopTwoGroups) {
  Case c;
  c.tokens = 12;
  c.group_size = 6;
  c.experts = 3;
  c.top_k = 2;
  c.expert_capacity = 2;
  c.seed = 5;
  SwitchLayer<Fp32, Gelu> layer(config_of(c));
  std::mt19937 gen(5);
  randomize(layer, c, gen);
  Matrix<float> x(c.tokens, c.d_model);
  ref::fill_uniform(x, gen, -1, 1);
  const auto out = layer.forward(x, Mode::kEval);
  int kept = 0, kept_tokens = 0;
  double gate_sum = 0;
  std::vector<int> before(3, 0), after(3, 0);
  for (int t = 0; t < 12; ++t) {
    bool any = false;
    for (int k = 0; k < 2; ++k) {
      ++before[out.routing.expert(t, k)];
      if (out.routing.slot(t, k) >= 0) {
        ++kept;
        any = true;
        gate_sum += out.routing.gate(t, k);
        ++after[out.routing.expert(t, k)];
      }
    }
    kept_tokens += any;
  }
  ASSERT_LT(kept, 24) << "the case is meant to drop choices";
  EXPECT_EQ(out.stats.tokens_per_expert, before);
  EXPECT_EQ(out.stats.kept_tokens_per_expert, after);
  EXPECT_NEAR(out.stats.expert_usage, kept / (3.0 * 2 * 2), 1e-7);
  EXPECT_NEAR(out.stats.router_confidence, gate_sum / kept, 1e-6);
  EXPECT_NEAR(out.stats.dropped_token_fraction, (12.0 - kept_tokens) / 12.0, 1e-7);
  EXPECT_NEAR(out.stats.dropped_fraction, (24.0 - kept) / 24.0, 1e-7);
}

// forward(x, routing): the experts applied to a hand-built routing, gates used as given.
TEST(SwitchLayerForward, HandBuiltRouting) {
  for (bool bias : {false, true}) {
    Case c;
    c.tokens = 5;
    c.d_model = 3;
    c.d_ff = 4;
    c.experts = 3;
    c.top_k = 2;
    c.bias = bias;
    SwitchLayer<Fp32, Gelu> layer(config_of(c));
    std::mt19937 gen(21);
    randomize(layer, c, gen);
    Matrix<float> x(5, 3);
    ref::fill_uniform(x, gen, -1, 1);
    switchmoe::Routing routing;
    routing.logits = Matrix<float>::Zero(5, 3);
    routing.probs = Matrix<float>::Constant(5, 3, 1.0f / 3);
    routing.expert.resize(5, 2);
    routing.slot.resize(5, 2);
    routing.gate.resize(5, 2);
    routing.expert << 0, 1, 1, 2, 0, 2, 2, 0, 1, 0;
    routing.slot << 0, 0, 1, 0, 1, 1, -1, 2, -1, -1;  // token 4: everything dropped
    routing.gate << 0.3f, 0.9f, 0.25f, 0.5f, 1.5f, -0.75f, 0.0f, 2.0f, 0.0f, 0.0f;
    routing.capacity = 3;
    routing.group_size = 5;
    const Matrix<float> y = layer.forward(x, routing);
    const MatD y_ref =
        ref::switch_combine(ref::to_double(x), ref::experts_of(layer, 3, bias), routing.expert,
                            routing.slot, ref::to_double(routing.gate), ref::Act::kGelu);
    ASSERT_EQ(y.rows(), 5);
    ASSERT_EQ(y.cols(), 3);
    EXPECT_LT(ref::max_abs_diff(ref::to_double(y), y_ref), kFp32Tol);
    for (int j = 0; j < 3; ++j) EXPECT_EQ(y(4, j), 0.0f);

    // Every choice dropped: y is exactly zero (even with biases).
    routing.slot.setConstant(-1);
    routing.gate.setZero();
    const Matrix<float> y0 = layer.forward(x, routing);
    ASSERT_EQ(y0.rows(), 5);
    EXPECT_TRUE((y0.array() == 0.0f).all());
  }
}

template <class Policy>
void weights_edit_takes_effect() {
  Case c;
  c.tokens = 12;
  c.experts = 2;
  c.bias = true;
  SwitchLayer<Policy, Relu> layer(config_of(c));
  std::mt19937 gen(3);
  randomize(layer, c, gen);
  Matrix<float> x(c.tokens, c.d_model);
  ref::fill_uniform(x, gen, -1, 1);
  const auto before = layer.forward(x, Mode::kEval);
  const double tol = std::is_same_v<Policy, Fp32> ? kFp32Tol : 0.05;
  auto check = [&](const char* what) {
    SCOPED_TRACE(what);
    const auto out = layer.forward(x, Mode::kEval);
    const MatD y_ref =
        ref::switch_combine(ref::to_double(x), ref::experts_of(layer, 2, true), out.routing.expert,
                            out.routing.slot, ref::to_double(out.routing.gate), ref::Act::kRelu);
    EXPECT_LT(ref::max_abs_diff(ref::to_double(out.y), y_ref), tol);
    EXPECT_LT(ref::max_abs_diff(
                  out.routing.logits,
                  ref::router_logits(ref::to_double(x), ref::to_double(layer.router_weight()))),
              1e-5);
    return out;
  };
  layer.w_in(0) *= 2.0f;
  layer.w_out(1) *= -3.0f;
  auto out1 = check("w_in / w_out accessors");
  EXPECT_GT(ref::max_abs_diff(out1.y, before.y), 0.05f);
  layer.b_out(0).setConstant(1.0f);
  layer.b_in(1).setConstant(0.5f);
  auto out2 = check("bias accessors");
  EXPECT_GT(ref::max_abs_diff(out2.y, out1.y), 0.05f);
  layer.router_weight() = -layer.router_weight();
  auto out3 = check("router accessor");
  EXPECT_NE(MatI(out3.routing.expert), MatI(out2.routing.expert));
  // Through parameters(): scale every expert weight by 0.5.
  for (auto& p : layer.parameters())
    if (p.name.find("experts.") == 0) *p.value *= 0.5f;
  auto out4 = check("parameters()");
  EXPECT_GT(ref::max_abs_diff(out4.y, out3.y), 0.05f);
  // Eval after a training forward also sees the edits (no stale compute copies across modes).
  layer.forward(x, Mode::kTrain);
  layer.w_out(0).setZero();
  layer.w_out(1).setZero();
  layer.b_out(0).setZero();
  layer.b_out(1).setZero();
  const auto zero = layer.forward(x, Mode::kEval);
  EXPECT_TRUE((zero.y.array() == 0.0f).all());
}

TEST(SwitchLayerForward, WeightEditsTakeEffectFp32) { weights_edit_takes_effect<Fp32>(); }
TEST(SwitchLayerForward, WeightEditsTakeEffectBf16) {
  weights_edit_takes_effect<switchmoe::Bf16>();
}

// Through ParameterRefs obtained once, before a forward, and written after it (an optimizer keeps
// them for the whole run): the next forward must see the edit (core/parameter.hpp).
template <class Policy>
void cached_parameter_refs_take_effect() {
  Case c;
  c.tokens = 12;
  c.experts = 2;
  SwitchLayer<Policy, Relu> layer(config_of(c));
  std::mt19937 gen(3);
  randomize(layer, c, gen);
  Matrix<float> x(c.tokens, c.d_model);
  ref::fill_uniform(x, gen, -1, 1);
  auto cached = layer.parameters();
  const Matrix<float> y5 = layer.forward(x, Mode::kEval).y;
  for (auto& p : cached)
    if (p.name == "experts.0.w_in" || p.name == "experts.1.w_in") *p.value *= -1.0f;
  const Matrix<float> y6 = layer.forward(x, Mode::kEval).y;  // no accessor call in between
  EXPECT_GT(ref::max_abs_diff(y6, y5), 0.05f) << "edit through a cached ParameterRef ignored";
}

TEST(SwitchLayerForward, CachedParameterRefEditsTakeEffectFp32) {
  cached_parameter_refs_take_effect<Fp32>();
}
TEST(SwitchLayerForward, CachedParameterRefEditsTakeEffectBf16) {
  cached_parameter_refs_take_effect<switchmoe::Bf16>();
}

TEST(SwitchLayerParameters, NamesShapesAndPointers) {
  for (bool bias : {false, true}) {
    Case c;
    c.experts = 3;
    c.bias = bias;
    SwitchLayer<Fp32, Relu> layer(config_of(c));
    const auto params = layer.parameters();
    std::vector<std::string> expected = {"router.weight"};
    for (int e = 0; e < 3; ++e) {
      const std::string p = "experts." + std::to_string(e) + ".";
      expected.push_back(p + "w_in");
      if (bias) expected.push_back(p + "b_in");
      expected.push_back(p + "w_out");
      if (bias) expected.push_back(p + "b_out");
    }
    std::vector<std::string> names;
    for (const auto& p : params) names.push_back(p.name);
    std::vector<std::string> sorted_names = names, sorted_expected = expected;
    std::sort(sorted_names.begin(), sorted_names.end());
    std::sort(sorted_expected.begin(), sorted_expected.end());
    EXPECT_EQ(sorted_names, sorted_expected);
    for (const auto& p : params) {
      ASSERT_NE(p.value, nullptr);
      ASSERT_NE(p.grad, nullptr);
      EXPECT_EQ(p.value->rows(), p.grad->rows()) << p.name;
      EXPECT_EQ(p.value->cols(), p.grad->cols()) << p.name;
      if (p.name == "router.weight") {
        EXPECT_EQ(p.value, &layer.router_weight());
        EXPECT_EQ(p.grad, &layer.grad_router_weight());
      }
      if (p.name == "experts.2.w_in") {
        EXPECT_EQ(p.value, &layer.w_in(2));
        EXPECT_EQ(p.grad, &layer.grad_w_in(2));
      }
      if (p.name == "experts.1.w_out") {
        EXPECT_EQ(p.value, &layer.w_out(1));
        EXPECT_EQ(p.grad, &layer.grad_w_out(1));
      }
    }
    EXPECT_EQ(layer.router_weight().rows(), c.d_model);
    EXPECT_EQ(layer.router_weight().cols(), 3);
    EXPECT_EQ(layer.w_in(0).rows(), c.d_model);
    EXPECT_EQ(layer.w_in(0).cols(), c.d_ff);
    EXPECT_EQ(layer.w_out(0).rows(), c.d_ff);
    EXPECT_EQ(layer.w_out(0).cols(), c.d_model);
    if (bias) {
      EXPECT_EQ(layer.b_in(0).rows(), 1);
      EXPECT_EQ(layer.b_in(0).cols(), c.d_ff);
      EXPECT_EQ(layer.b_out(0).rows(), 1);
      EXPECT_EQ(layer.b_out(0).cols(), c.d_model);
    }
  }
}

TEST(SwitchLayerForward, ZeroTokensGiveEmptyResult) {
  Case c;
  SwitchLayer<Fp32, Relu> layer(config_of(c));
  const Matrix<float> x(0, c.d_model);
  for (Mode mode : {Mode::kEval, Mode::kTrain}) {
    const auto out = layer.forward(x, mode);
    EXPECT_EQ(out.y.rows(), 0);
    EXPECT_EQ(out.y.cols(), c.d_model);
    EXPECT_EQ(out.routing.expert.rows(), 0);
    EXPECT_TRUE(std::isfinite(out.loss));
  }
  const Matrix<float> dx = layer.backward(Matrix<float>(0, c.d_model));
  EXPECT_EQ(dx.rows(), 0);
  EXPECT_EQ(dx.cols(), c.d_model);
  EXPECT_TRUE((layer.grad_w_in(0).array() == 0.0f).all());
}

// True if `name` occurs in `message` as a whole identifier (so "x" is not found in "expected").
bool names(const std::string& message, const std::string& name) {
  auto ident = [](char ch) { return std::isalnum(static_cast<unsigned char>(ch)) || ch == '_'; };
  for (std::size_t pos = message.find(name); pos != std::string::npos;
       pos = message.find(name, pos + 1)) {
    const bool start = pos == 0 || !ident(message[pos - 1]);
    const std::size_t end = pos + name.size();
    if (start && (end == message.size() || !ident(message[end]))) return true;
  }
  return false;
}

template <class F>
void expect_invalid_argument(F&& f, const std::string& names_this) {
  try {
    f();
    ADD_FAILURE() << "expected std::invalid_argument naming " << names_this;
  } catch (const std::invalid_argument& e) {
    EXPECT_TRUE(names(e.what(), names_this))
        << "message '" << e.what() << "' does not name " << names_this;
  } catch (...) {
    ADD_FAILURE() << "expected std::invalid_argument, got another exception";
  }
}

TEST(SwitchLayerErrors, BadInput) {
  Case c;
  c.top_k = 2;
  SwitchLayer<Fp32, Relu> layer(config_of(c));
  expect_invalid_argument(
      [&] { layer.forward(Matrix<float>::Zero(3, c.d_model + 1), Mode::kEval); }, "x");
  expect_invalid_argument(
      [&] { layer.forward(Matrix<float>::Zero(3, c.d_model - 1), Mode::kTrain); }, "x");
  Matrix<float> x = Matrix<float>::Zero(4, c.d_model);
  x(1, 2) = std::nanf("");
  EXPECT_THROW(layer.forward(x, Mode::kEval), std::invalid_argument);
  x.setOnes();
  auto routing = layer.forward(x, Mode::kEval).routing;
  // routing has 4 tokens, x 5 (or 3: reading past the end of x).
  expect_invalid_argument([&] { layer.forward(Matrix<float>::Ones(5, c.d_model), routing); },
                          "routing");
  expect_invalid_argument([&] { layer.forward(Matrix<float>::Ones(3, c.d_model), routing); },
                          "routing");
  expect_invalid_argument([&] { layer.forward(Matrix<float>::Ones(4, c.d_model + 2), routing); },
                          "x");
  auto bad = routing;
  bad.expert(0, 0) = c.experts;
  expect_invalid_argument([&] { layer.forward(x, bad); }, "routing.expert");
  bad = routing;
  bad.gate.resize(4, 1);
  expect_invalid_argument([&] { layer.forward(x, bad); }, "routing.gate");
  bad = routing;
  bad.slot.resize(3, 2);
  expect_invalid_argument([&] { layer.forward(x, bad); }, "routing.slot");
  bad = routing;
  bad.expert.resize(4, 1);  // k = 1 while slot/gate have 2 columns
  EXPECT_THROW(layer.forward(x, bad), std::invalid_argument);
}

TEST(SwitchLayerErrors, BadConfig) {
  auto make = [](auto edit) {
    SwitchConfig cfg = config_of(Case{});
    edit(cfg);
    SwitchLayer<Fp32, Relu> layer(cfg);
  };
  expect_invalid_argument([&] { make([](SwitchConfig& c) { c.d_model = 0; }); }, "d_model");
  expect_invalid_argument([&] { make([](SwitchConfig& c) { c.d_ff = -1; }); }, "d_ff");
  expect_invalid_argument([&] { make([](SwitchConfig& c) { c.routing.num_experts = 0; }); },
                          "num_experts");
  expect_invalid_argument([&] { make([](SwitchConfig& c) { c.routing.top_k = 5; }); }, "top_k");
  expect_invalid_argument([&] { make([](SwitchConfig& c) { c.expert_dropout = 1.0f; }); },
                          "expert_dropout");
  expect_invalid_argument([&] { make([](SwitchConfig& c) { c.expert_dropout = -0.1f; }); },
                          "expert_dropout");
  expect_invalid_argument([&] { make([](SwitchConfig& c) { c.jitter_eps = -0.5f; }); },
                          "jitter_eps");
  expect_invalid_argument([&] { make([](SwitchConfig& c) { c.routing.capacity_factor = 0.0; }); },
                          "capacity_factor");
  expect_invalid_argument([&] { make([](SwitchConfig& c) { c.init_scale = -1.0f; }); },
                          "init_scale");
}

// Rule 11: truncated normal, std sqrt(s / fan_in), truncated at 2 sigma (sample std 0.8796 sigma).
void expect_truncated_normal(const Matrix<float>& w, double sigma, const std::string& what) {
  SCOPED_TRACE(what);
  const double n = static_cast<double>(w.size());
  double sum = 0, sq = 0, max_abs = 0;
  for (int i = 0; i < w.size(); ++i) {
    const double v = w.data()[i];
    sum += v;
    sq += v * v;
    max_abs = std::max(max_abs, std::abs(v));
  }
  const double mean = sum / n;
  const double std = std::sqrt(sq / n - mean * mean);
  // Truncated at +-2: variance 1 - 2*2*phi(2)/(2*Phi(2)-1) = 0.77374, std 0.87962.
  EXPECT_NEAR(std, 0.87962 * sigma, 0.03 * 0.87962 * sigma);
  EXPECT_NEAR(mean, 0.0, 5 * 0.88 * sigma / std::sqrt(n));
  EXPECT_LE(max_abs, 2.0 * sigma * (1 + 1e-6));
  EXPECT_GT(max_abs, 1.8 * sigma);  // the tails are actually populated, not clipped narrower
  // Fraction beyond 1 sigma for the truncated normal: (2*(Phi(2)-Phi(1)))/0.9545 = 0.2854.
  int beyond = 0;
  for (int i = 0; i < w.size(); ++i) beyond += std::abs(w.data()[i]) > sigma;
  EXPECT_NEAR(beyond / n, 0.2854, 0.03);
}

TEST(SwitchLayerInit, TruncatedNormal) {
  for (float scale : {0.1f, 1.0f}) {
    SwitchConfig cfg;
    cfg.d_model = 96;
    cfg.d_ff = 160;
    cfg.routing.num_experts = 4;
    cfg.expert_bias = true;
    cfg.init_scale = scale;
    cfg.seed = 42;
    SwitchLayer<Fp32, Relu> layer(cfg);
    expect_truncated_normal(layer.router_weight(), std::sqrt(scale / 96.0), "router");
    for (int e = 0; e < 4; ++e) {
      expect_truncated_normal(layer.w_in(e), std::sqrt(scale / 96.0), "w_in " + std::to_string(e));
      expect_truncated_normal(layer.w_out(e), std::sqrt(scale / 160.0),
                              "w_out " + std::to_string(e));
    }
    // Experts are initialized independently of each other.
    EXPECT_NE(layer.w_in(0), layer.w_in(1));
    EXPECT_NE(layer.w_out(2), layer.w_out(3));
    // Same seed, same weights; another seed, other weights.
    SwitchLayer<Fp32, Relu> same(cfg);
    EXPECT_EQ(same.w_in(3), layer.w_in(3));
    EXPECT_EQ(same.router_weight(), layer.router_weight());
    cfg.seed = 43;
    SwitchLayer<Fp32, Relu> other(cfg);
    EXPECT_NE(other.w_in(3), layer.w_in(3));
  }
}

// Rule 12: with identity expert weights, x > 0 and one expert (gate 1, no drops), y shows the
// hidden activation directly: each unit is 0 with probability p, else x / (1 - p).
template <class Policy>
void dropout_through_outputs() {
  const int d = 64, tokens = 64;
  const float p = 0.4f;
  SwitchConfig cfg;
  cfg.d_model = d;
  cfg.d_ff = d;
  cfg.routing.num_experts = 1;
  cfg.expert_dropout = p;
  cfg.seed = 9;
  SwitchLayer<Policy, Relu> layer(cfg);
  layer.w_in(0).setIdentity();
  layer.w_out(0).setIdentity();
  Matrix<float> x(tokens, d);
  for (int t = 0; t < tokens; ++t)
    for (int j = 0; j < d; ++j) x(t, j) = 0.25f + 0.125f * ((t + 3 * j) % 8);  // bf16-exact
  const auto train = layer.forward(x, Mode::kTrain);
  ASSERT_EQ(train.y.rows(), tokens);
  int zeros = 0;
  const double scale = 1.0 / (1.0 - p);
  // Bf16 activations: the scaled value may be rounded to bf16 (relative 2^-8).
  const double rel = std::is_same_v<Policy, Fp32> ? 1e-6 : 1.0 / 128;
  for (int t = 0; t < tokens; ++t) {
    ASSERT_GE(train.routing.slot(t, 0), 0);
    for (int j = 0; j < d; ++j) {
      if (train.y(t, j) == 0.0f) {
        ++zeros;
      } else {
        EXPECT_NEAR(train.y(t, j), x(t, j) * scale, rel * x(t, j) * scale) << t << "," << j;
      }
    }
  }
  const double frac = static_cast<double>(zeros) / (tokens * d);
  // Binomial(4096, 0.4): std 0.0077; 4 std.
  EXPECT_NEAR(frac, p, 0.031);
  // Evaluation: no dropout at all.
  const auto eval = layer.forward(x, Mode::kEval);
  EXPECT_TRUE(eval.y.isApprox(x, std::is_same_v<Policy, Fp32> ? 1e-6f : 1e-2f));
  EXPECT_TRUE((eval.y.array() != 0.0f).all());
  // Another training call draws a fresh mask.
  const auto train2 = layer.forward(x, Mode::kTrain);
  EXPECT_NE(train2.y, train.y);
}

TEST(SwitchLayerDropout, ExpertHiddenDropoutFp32) { dropout_through_outputs<Fp32>(); }
TEST(SwitchLayerDropout, ExpertHiddenDropoutBf16) { dropout_through_outputs<switchmoe::Bf16>(); }

// Rule 3: jitter only in training, on the router's input; eval is noise-free.
TEST(SwitchLayerJitter, TrainingOnlyAndBounded) {
  Case c;
  c.tokens = 16;
  SwitchConfig cfg = config_of(c);
  cfg.jitter_eps = 0.1f;
  SwitchLayer<Fp32, Relu> layer(cfg);
  std::mt19937 gen(4);
  randomize(layer, c, gen);
  Matrix<float> x(c.tokens, c.d_model);
  ref::fill_uniform(x, gen, 0.5, 1.0);
  const MatD clean = ref::router_logits(ref::to_double(x), ref::to_double(layer.router_weight()));
  const auto eval = layer.forward(x, Mode::kEval);
  EXPECT_LT(ref::max_abs_diff(ref::to_double(eval.routing.logits), clean), 1e-5);
  const auto train = layer.forward(x, Mode::kTrain);
  const MatD diff = ref::to_double(train.routing.logits) - clean;
  EXPECT_GT(ref::max_abs_diff(diff, MatD::Zero(diff.rows(), diff.cols())), 1e-4);
  // |x_i * n_i - x_i| <= eps |x_i|: logit changes bounded by eps * sum_i |x_i w_ie|.
  const MatD w = ref::to_double(layer.router_weight());
  for (int t = 0; t < c.tokens; ++t)
    for (int e = 0; e < c.experts; ++e) {
      double bound = 0;
      for (int i = 0; i < c.d_model; ++i) bound += std::abs(x(t, i) * w(i, e));
      EXPECT_LE(std::abs(diff(t, e)), 0.1 * bound + 1e-5);
    }
  // Experts see the clean input: with the train routing given back, forward(x, routing)
  // reproduces train.y (no jitter on the expert path, no dropout configured).
  const Matrix<float> y = layer.forward(x, train.routing);
  EXPECT_LT(ref::max_abs_diff(y, train.y), 1e-6f);
}

}  // namespace
