// Routing variants (SEMANTICS 17-20): sigmoid scores, routed scaling, expert choice, random
// second choice and bias balancing, against the double-precision reference of
// tests/reference/variants_reference.hpp; gradients against finite differences in double; the
// bad-option cases.
#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

#include "reference/variants_reference.hpp"
#include "support/matrices.hpp"
#include "switchmoe/switchmoe.hpp"

namespace {

using switchmoe::LocalExchange;
using switchmoe::LossCoefficients;
using switchmoe::Matrix;
using switchmoe::Mode;
using switchmoe::Routing;
using switchmoe::RoutingMethod;
using switchmoe::RoutingOptions;
using switchmoe::RoutingScheme;
using switchmoe::ScoreFunction;
using switchmoe_test::random_matrix;
namespace vref = switchmoe_test::vref;
using vref::MatD;
using vref::MatI;

vref::TokenChoiceOptions reference_options(const RoutingOptions& o, int capacity) {
  vref::TokenChoiceOptions r;
  r.experts = o.num_experts;
  r.k = o.top_k;
  r.score = o.score == ScoreFunction::kSigmoid ? vref::Score::kSigmoid : vref::Score::kSoftmax;
  r.renormalize = o.renormalize;
  r.scaling = o.routed_scaling;
  r.capacity = o.dropless ? -1 : capacity;
  r.group_size = o.group_size;
  return r;
}

void expect_routing_matches(const Routing& got, const vref::RoutingResult& want, double aux_tol) {
  ASSERT_EQ(got.expert.rows(), want.expert.rows());
  EXPECT_TRUE((got.expert.array() == want.expert.array()).all()) << got.expert << "\n\n"
                                                                 << want.expert;
  EXPECT_TRUE((got.slot.array() == want.slot.array()).all()) << got.slot << "\n\n" << want.slot;
  EXPECT_LT(vref::relative_error(vref::to_double(got.gate), want.gate), 1e-6);
  EXPECT_LT(vref::relative_error(vref::to_double(got.probs), want.scores), 1e-6);
  EXPECT_NEAR(got.aux_loss, want.aux, aux_tol);
}

// Rule 20 with rules 4-8: sigmoid scores, renormalized by the k chosen scores, scaled, with
// capacity and groups, on random shapes.
TEST(SigmoidScores, RandomCasesMatchReference) {
  std::mt19937 gen(3);
  for (int trial = 0; trial < 30; ++trial) {
    RoutingOptions o;
    o.num_experts = 2 + static_cast<int>(gen() % 7);
    o.top_k = 1 + static_cast<int>(gen() % std::min(3, o.num_experts));
    o.score = ScoreFunction::kSigmoid;
    o.renormalize = gen() % 2;
    o.routed_scaling = trial % 3 == 0 ? 1.0f : 2.5f;
    o.group_size = trial % 2 ? 4 : 0;
    o.expert_capacity = 1 + static_cast<int>(gen() % 3);
    const int tokens = 4 * (1 + static_cast<int>(gen() % 5));
    SCOPED_TRACE("trial " + std::to_string(trial));
    const Matrix<float> logits = random_matrix(tokens, o.num_experts, 100 + trial, 2.0f);
    const Routing got = switchmoe::route(logits, o, Mode::kTrain);
    expect_routing_matches(
        got,
        vref::route_token_choice(vref::to_double(logits), reference_options(o, o.expert_capacity)),
        1e-5);
  }
}

// Rule 20's scaling multiplies every gate (softmax scores, no renormalization); the choice,
// slots and losses are those of the unscaled routing.
TEST(RoutedScaling, MultipliesEveryGateOnly) {
  RoutingOptions o;
  o.num_experts = 6;
  o.top_k = 2;
  const Matrix<float> logits = random_matrix(24, 6, 5);
  const Routing plain = switchmoe::route(logits, o, Mode::kTrain);
  o.routed_scaling = 2.5f;
  const Routing scaled = switchmoe::route(logits, o, Mode::kTrain);
  EXPECT_TRUE((plain.expert.array() == scaled.expert.array()).all());
  EXPECT_TRUE((plain.slot.array() == scaled.slot.array()).all());
  EXPECT_EQ(plain.aux_loss, scaled.aux_loss);
  EXPECT_EQ(plain.z_loss, scaled.z_loss);
  EXPECT_LT((scaled.gate - 2.5f * plain.gate).cwiseAbs().maxCoeff(), 1e-6f);
}

// Rule 17 on random shapes, groups and capacity factors.
TEST(ExpertChoice, RandomCasesMatchReference) {
  std::mt19937 gen(8);
  for (int trial = 0; trial < 30; ++trial) {
    RoutingOptions o;
    o.method = RoutingMethod::kExpertChoice;
    o.num_experts = 2 + static_cast<int>(gen() % 6);
    o.capacity_factor = 0.5 + (gen() % 5) * 0.5;
    o.min_capacity = static_cast<int>(gen() % 3);
    o.group_size = trial % 2 ? 6 : 0;
    o.routed_scaling = trial % 3 ? 1.0f : 1.5f;
    const int tokens = 6 * (1 + static_cast<int>(gen() % 4));
    SCOPED_TRACE("trial " + std::to_string(trial));
    const Matrix<float> logits = random_matrix(tokens, o.num_experts, 300 + trial, 1.5f);
    const Routing got = switchmoe::route(logits, o, Mode::kTrain);
    const int g = o.group_size ? o.group_size : tokens;
    const int capacity =
        std::min(g, vref::capacity(g, o.num_experts, o.capacity_factor, o.min_capacity));
    const vref::ExpertChoiceResult want = vref::route_expert_choice(
        vref::to_double(logits), capacity, o.group_size, o.routed_scaling);
    ASSERT_EQ(got.expert.cols(), o.num_experts);
    EXPECT_EQ(got.capacity, capacity);
    for (int t = 0; t < tokens; ++t) {
      for (int e = 0; e < o.num_experts; ++e) {
        EXPECT_EQ(got.expert(t, e), e);
        EXPECT_EQ(got.slot(t, e) >= 0, want.taken(t, e) == 1) << t << " " << e;
        EXPECT_NEAR(got.gate(t, e), want.gate(t, e), 1e-6);
      }
    }
    EXPECT_EQ(got.aux_loss, 0.0f);
    EXPECT_NEAR(got.z_loss, vref::z_loss(vref::to_double(logits)), 1e-4);
    // Each expert holds exactly C tokens of each group, in slots 0..C-1.
    for (int first = 0; first < tokens; first += g) {
      for (int e = 0; e < o.num_experts; ++e) {
        std::vector<int> slots;
        for (int t = first; t < first + g; ++t)
          if (got.slot(t, e) >= 0) slots.push_back(got.slot(t, e));
        std::sort(slots.begin(), slots.end());
        ASSERT_EQ(static_cast<int>(slots.size()), capacity);
        for (int i = 0; i < capacity; ++i) EXPECT_EQ(slots[i], i);
      }
    }
  }
}

Matrix<float> logits_of_probs(const std::vector<std::vector<float>>& probs) {
  Matrix<float> l(static_cast<int>(probs.size()), static_cast<int>(probs[0].size()));
  for (std::size_t t = 0; t < probs.size(); ++t)
    for (std::size_t e = 0; e < probs[t].size(); ++e) l(t, e) = std::log(probs[t][e]);
  return l;
}

// Hand-built: a token that every expert takes, and one that no expert takes (its output is 0).
TEST(ExpertChoice, TokenChosenByEveryExpertAndByNone) {
  RoutingOptions o;
  o.method = RoutingMethod::kExpertChoice;
  o.num_experts = 3;
  o.min_capacity = 0;
  o.capacity_factor = 1.5;  // C = floor(1.5 * 4 / 3) = 2
  // Token 0 uniform; tokens 1-3 each peaked on one expert: every expert takes its own peaked
  // token and token 0.
  const Routing every = switchmoe::route(logits_of_probs({{1 / 3.f, 1 / 3.f, 1 / 3.f},
                                                          {.98f, .01f, .01f},
                                                          {.01f, .98f, .01f},
                                                          {.01f, .01f, .98f}}),
                                         o, Mode::kTrain);
  for (int e = 0; e < 3; ++e) EXPECT_GE(every.slot(0, e), 0) << e;
  o.capacity_factor = 1.0;  // 6 tokens: C = 2
  // Tokens 1-3 peaked on expert 0: it takes tokens 1 and 2; token 3 is last for the others.
  const Routing none = switchmoe::route(logits_of_probs({{1 / 3.f, 1 / 3.f, 1 / 3.f},
                                                         {.98f, .01f, .01f},
                                                         {.98f, .01f, .01f},
                                                         {.97f, .015f, .015f},
                                                         {.01f, .98f, .01f},
                                                         {.01f, .01f, .98f}}),
                                        o, Mode::kTrain);
  for (int e = 0; e < 3; ++e) EXPECT_EQ(none.slot(3, e), -1) << e;
  EXPECT_EQ(none.slot(0, 0), -1);
  EXPECT_GE(none.slot(0, 1), 0);
  // In a layer, the unchosen token's output is exactly 0 (rule 1 / 17).
  switchmoe::SwitchConfig config;
  config.d_model = 4;
  config.d_ff = 8;
  config.routing = o;
  switchmoe::SwitchLayer<switchmoe::Fp32, switchmoe::SwiGlu> layer(config);
  const Matrix<float> y = layer.forward(random_matrix(6, 4, 1), none);
  EXPECT_TRUE((y.row(3).array() == 0.0f).all());
  EXPECT_TRUE((y.row(0).array() != 0.0f).any());
  // Statistics: every token is a candidate of every expert, C of them are kept per expert.
  const switchmoe::RoutingStats stats = switchmoe::routing_stats(none, 3);
  for (int e = 0; e < 3; ++e) {
    EXPECT_EQ(stats.tokens_per_expert[e], 6);
    EXPECT_EQ(stats.kept_tokens_per_expert[e], 2);
  }
  EXPECT_EQ(stats.dropped_tokens, 1);
}

// Rule 18: the documented stream decides, keyed by the global token index and the call.
TEST(RandomSecondChoice, DrawsFromTheDocumentedStream) {
  RoutingOptions o;
  o.num_experts = 4;
  o.top_k = 2;
  o.random_second_choice = true;
  o.dropless = true;
  const std::uint64_t seed = 17;
  RoutingScheme scheme(o, LossCoefficients{}, seed);
  const int tokens = 64;
  const std::int64_t first_token = 1000;
  LocalExchange exchange;
  int kept = 0, discarded = 0;
  for (std::uint64_t call = 0; call < 3; ++call) {
    const Matrix<float> logits = random_matrix(tokens, 4, 40 + static_cast<unsigned>(call), 0.7f);
    Routing got;
    scheme.route(logits, Mode::kTrain, first_token, got);
    // The stream moves on when the call has succeeded everywhere (the scheme concept's
    // end_route), as a layer's forward does.
    scheme.end_route(got, Mode::kTrain, exchange);
    const switchmoe::detail::CounterRng rng(seed, switchmoe::detail::Stream::kSecondChoice, call);
    vref::TokenChoiceOptions r = reference_options(o, 0);
    for (int t = 0; t < tokens; ++t) r.second_choice_u.push_back(rng.uniform(first_token + t));
    const vref::RoutingResult want = vref::route_token_choice(vref::to_double(logits), r);
    expect_routing_matches(got, want, 1e-5);  // aux counts the discarded choices too
    for (int t = 0; t < tokens; ++t) (got.slot(t, 1) >= 0 ? kept : discarded)++;
    for (int t = 0; t < tokens; ++t) EXPECT_GE(got.slot(t, 0), 0);  // the first always goes
  }
  EXPECT_GT(kept, 10);
  EXPECT_GT(discarded, 10);
  // Evaluation draws nothing: every second choice is dispatched.
  Routing eval;
  scheme.route(random_matrix(tokens, 4, 99), Mode::kEval, 0, eval);
  EXPECT_TRUE((eval.slot.array() >= 0).all());
}

// A discarded second choice takes no slot: the capacity it leaves goes to the next token.
TEST(RandomSecondChoice, DiscardedChoiceTakesNoSlotAndCountsAsDropped) {
  RoutingOptions o;
  o.num_experts = 2;
  o.top_k = 2;
  o.random_second_choice = true;
  o.expert_capacity = 1;
  // Token 0: second choice expert 1 with p = 0.001 (u < 0.002 almost never); token 1: second
  // choice expert 1 too. With the first discarded, token 1's second choice gets the slot unless
  // it is discarded too; find a seed where the draws are (discard, keep).
  Matrix<float> logits(2, 2);
  logits << std::log(0.999f), std::log(0.001f), std::log(0.6f), std::log(0.6f) - 10.0f;
  logits(1, 0) = 0.0f;  // token 1: experts 0 and 1 with p = 0.5 each (second: expert 1)
  logits(1, 1) = 0.0f;
  for (std::uint64_t seed = 0; seed < 50; ++seed) {
    const switchmoe::detail::CounterRng rng(seed, switchmoe::detail::Stream::kSecondChoice, 0);
    if (!(rng.uniform(0) >= 0.002f && rng.uniform(1) < 1.0f)) continue;
    RoutingScheme scheme(o, LossCoefficients{}, seed);
    Routing got;
    scheme.route(logits, Mode::kTrain, 0, got);
    EXPECT_EQ(got.slot(0, 1), -1);
    EXPECT_EQ(got.gate(0, 1), 0.0f);
    EXPECT_EQ(got.slot(1, 1), 0);  // the slot token 0 did not take
    const switchmoe::RoutingStats stats = switchmoe::routing_stats(got, 2);
    EXPECT_EQ(stats.kept_tokens_per_expert[1], 1);
    EXPECT_EQ(stats.tokens_per_expert[1], 2);
    return;
  }
  FAIL() << "no seed found";
}

// Rule 19: over a few steps the bias drives a skewed router towards balance, the bias moves by
// exactly u * sign(mean - load), and gates stay the unbiased scores.
TEST(BiasBalancing, DrivesASkewedRouterTowardsBalance) {
  RoutingOptions o;
  o.num_experts = 4;
  o.top_k = 2;
  o.score = ScoreFunction::kSigmoid;
  o.renormalize = true;
  o.dropless = true;
  o.bias_update_rate = 0.02f;
  RoutingScheme scheme(o, LossCoefficients{}, 0);
  LocalExchange exchange;
  Matrix<float> logits = random_matrix(128, 4, 6, 0.5f);
  logits.col(0).array() += 1.5f;  // expert 0 favoured by most tokens
  logits.col(1).array() += 0.8f;
  auto max_load = [&](const Routing& r) {
    std::vector<int> load(4, 0);
    for (Eigen::Index i = 0; i < r.expert.size(); ++i) ++load[r.expert.data()[i]];
    return *std::max_element(load.begin(), load.end());
  };
  Routing r;
  int first_max = 0;
  for (int step = 0; step < 80; ++step) {
    const Matrix<float> before = scheme.balancing_bias();
    scheme.route(logits, Mode::kTrain, 0, r);
    // Reference choice on scores + bias, gates from the unbiased scores.
    vref::TokenChoiceOptions ro = reference_options(o, 0);
    ro.bias.assign(before.data(), before.data() + 4);
    const vref::RoutingResult want = vref::route_token_choice(vref::to_double(logits), ro);
    ASSERT_TRUE((r.expert.array() == want.expert.array()).all()) << "step " << step;
    EXPECT_LT(vref::relative_error(vref::to_double(r.gate), want.gate), 1e-6);
    if (step == 0) first_max = max_load(r);
    scheme.end_route(r, Mode::kTrain, exchange);
    std::vector<int> load(4, 0);
    for (int i = 0; i < want.expert.size(); ++i) ++load[want.expert.data()[i]];
    const double mean = 128.0 * 2 / 4;
    for (int e = 0; e < 4; ++e) {
      const float sign = mean > load[e] ? 1.0f : (mean < load[e] ? -1.0f : 0.0f);
      EXPECT_FLOAT_EQ(scheme.balancing_bias()(0, e), before(0, e) + 0.02f * sign);
    }
  }
  EXPECT_GT(first_max, 110);   // skewed at first (expert 0 nearly always chosen)
  EXPECT_LE(max_load(r), 80);  // near the mean load 64 after (it oscillates around it)
  // Evaluation and a zero rate leave the bias alone.
  const Matrix<float> kept = scheme.balancing_bias();
  scheme.route(logits, Mode::kEval, 0, r);
  scheme.end_route(r, Mode::kEval, exchange);
  EXPECT_TRUE((scheme.balancing_bias().array() == kept.array()).all());
}

// Finite differences in double of L = sum dgate * gate + a * aux + z * z_loss through the
// reference, against route_backward, with the decisions checked unchanged at every step.
void check_route_gradient(RoutingOptions o, unsigned seed) {
  const int tokens = 12;
  const Matrix<float> logits = random_matrix(tokens, o.num_experts, seed, 1.0f);
  const Routing routing = switchmoe::route(logits, o, Mode::kTrain);
  const Matrix<float> dgate = random_matrix(tokens, routing.expert.cols(), seed + 1);
  const float aux_coef = 0.3f, z_coef = 0.05f;
  const Matrix<float> dlogits = switchmoe::route_backward(routing, dgate, o, aux_coef, z_coef);
  const bool ec = o.method == RoutingMethod::kExpertChoice;
  const int capacity = routing.capacity;
  MatD l = vref::to_double(logits);
  auto decisions = [&](const MatD& at) {
    if (ec) return vref::route_expert_choice(at, capacity, o.group_size).taken;
    const vref::RoutingResult r = vref::route_token_choice(at, reference_options(o, capacity));
    MatI d(tokens, 2 * r.expert.cols());
    d << r.expert, r.slot;
    return d;
  };
  const MatI base = decisions(l);
  bool same_decisions = true;
  auto loss = [&] {
    same_decisions = same_decisions && (decisions(l).array() == base.array()).all();
    double task = 0.0, aux = 0.0;
    if (ec) {
      const MatD gate = vref::route_expert_choice(l, capacity, o.group_size, o.routed_scaling).gate;
      task = (gate.array() * vref::to_double(dgate).array()).sum();
    } else {
      const vref::RoutingResult r = vref::route_token_choice(l, reference_options(o, capacity));
      task = (r.gate.array() * vref::to_double(dgate).array()).sum();
      aux = r.aux;
    }
    return task + aux_coef * aux + z_coef * vref::z_loss(l);
  };
  const MatD fd = vref::finite_difference(loss, l, 1e-6);
  EXPECT_TRUE(same_decisions) << "a tie within the finite-difference step";
  EXPECT_LT(vref::relative_error(vref::to_double(dlogits), fd), 2e-4);
}

TEST(VariantGradients, SigmoidRenormalizedScaledTopTwo) {
  RoutingOptions o;
  o.num_experts = 5;
  o.top_k = 2;
  o.score = ScoreFunction::kSigmoid;
  o.renormalize = true;
  o.routed_scaling = 2.5f;
  o.expert_capacity = 4;
  check_route_gradient(o, 11);
}

TEST(VariantGradients, SigmoidTopOneGroups) {
  RoutingOptions o;
  o.num_experts = 4;
  o.score = ScoreFunction::kSigmoid;
  o.group_size = 6;
  o.expert_capacity = 2;
  check_route_gradient(o, 12);
}

TEST(VariantGradients, SoftmaxScaled) {
  RoutingOptions o;
  o.num_experts = 4;
  o.top_k = 2;
  o.routed_scaling = 0.5f;
  o.renormalize = true;
  o.dropless = true;
  check_route_gradient(o, 13);
}

TEST(VariantGradients, ExpertChoice) {
  RoutingOptions o;
  o.method = RoutingMethod::kExpertChoice;
  o.num_experts = 4;
  o.routed_scaling = 1.5f;
  o.group_size = 6;
  check_route_gradient(o, 14);
}

void expect_rejected(const RoutingOptions& o, const std::string& option,
                     const std::string& detail) {
  try {
    RoutingScheme scheme(o, LossCoefficients{});
    FAIL() << "expected std::invalid_argument for " << option;
  } catch (const std::invalid_argument& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find(option), std::string::npos) << what;
    EXPECT_NE(what.find(detail), std::string::npos) << what;
    EXPECT_EQ(what.rfind("switchmoe: ", 0), 0u) << what;
  }
}

TEST(VariantOptions, BadOptionsAreRejectedByName) {
  RoutingOptions base;
  base.num_experts = 4;
  RoutingOptions o = base;
  o.random_second_choice = true;
  o.top_k = 1;
  expect_rejected(o, "random_second_choice", "top_k = 1");
  o.top_k = 3;
  expect_rejected(o, "random_second_choice", "top_k = 3");
  o = base;
  o.method = RoutingMethod::kExpertChoice;
  RoutingOptions e = o;
  e.dropless = true;
  expect_rejected(e, "dropless", "kExpertChoice");
  e = o;
  e.top_k = 2;
  expect_rejected(e, "top_k is 2", "kExpertChoice");
  e = o;
  e.priority = switchmoe::Priority::kRouterProbability;
  expect_rejected(e, "priority is kRouterProbability", "kExpertChoice");
  e = o;
  e.renormalize = true;
  expect_rejected(e, "renormalize", "kExpertChoice");
  e = o;
  e.score = ScoreFunction::kSigmoid;
  expect_rejected(e, "score is kSigmoid", "kExpertChoice");
  e = o;
  e.bias_update_rate = 1e-3f;
  expect_rejected(e, "bias_update_rate", "kExpertChoice");
  o = base;
  o.bias_update_rate = -1e-3f;
  expect_rejected(o, "bias_update_rate is -0.001", ">= 0");
  o.bias_update_rate = std::nanf("");
  expect_rejected(o, "bias_update_rate is nan", ">= 0");
  o = base;
  o.routed_scaling = -2.5f;
  expect_rejected(o, "routed_scaling is -2.5", "> 0");
  o.routed_scaling = std::nanf("");
  expect_rejected(o, "routed_scaling is nan", "> 0");
  o.routed_scaling = 0.0f;
  expect_rejected(o, "routed_scaling is 0", "> 0");
  o = base;
  o.method = static_cast<RoutingMethod>(7);
  expect_rejected(o, "method is 7", "kExpertChoice");
  o = base;
  o.score = static_cast<ScoreFunction>(5);
  expect_rejected(o, "score is 5", "kSigmoid");
  // The free function and the layer reject them the same way.
  o = base;
  o.routed_scaling = -1.0f;
  EXPECT_THROW(switchmoe::route(random_matrix(4, 4, 1), o, Mode::kTrain), std::invalid_argument);
  switchmoe::SwitchConfig config;
  config.d_model = 4;
  config.d_ff = 4;
  config.routing = o;
  EXPECT_THROW(switchmoe::SwitchLayer<>{config}, std::invalid_argument);
}

// A bias of the wrong shape or with a NaN (written through balancing_bias()) is rejected at the
// next call, naming it, and the routing is left as it was.
TEST(BiasBalancing, BadBiasIsRejected) {
  RoutingOptions o;
  o.num_experts = 3;
  RoutingScheme scheme(o, LossCoefficients{});
  Routing r;
  scheme.balancing_bias()(0, 1) = std::nanf("");
  try {
    scheme.route(random_matrix(4, 3, 1), Mode::kTrain, 0, r);
    FAIL();
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("balancing_bias"), std::string::npos);
  }
  EXPECT_EQ(r.expert.size(), 0);
  scheme.balancing_bias() = Matrix<float>::Zero(1, 2);
  EXPECT_THROW(scheme.route(random_matrix(4, 3, 1), Mode::kTrain, 0, r), std::invalid_argument);
}

}  // namespace
