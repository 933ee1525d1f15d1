// Tests of the test references themselves (tests/reference/). All of them are included together,
// with the shared fixtures, in this one translation unit: that they compile side by side is the
// first check (they used to define two route, capacity, router_logits, softmax and z-loss
// functions in one namespace). Each quantity that had two implementations before the merge is
// checked here against small cases worked out by hand in the comments, never against the library,
// so that a mistake in the surviving implementation cannot hide behind the code it is used to
// test.
#include <gtest/gtest.h>

#include <cmath>
#include <initializer_list>
#include <vector>

#include "reference/common.hpp"
#include "reference/expert_reference.hpp"
#include "reference/layer_reference.hpp"
#include "reference/routing_reference.hpp"
#include "support/expect_throw.hpp"
#include "support/matrices.hpp"

namespace {

namespace ref = switchmoe_test::ref;
using ref::make_double;
using ref::make_int;
using ref::MatD;
using ref::MatI;

constexpr double kTol = 1e-12;

// A stand-in for switchmoe::RoutingOptions with its field names (the templates of
// routing_reference.hpp read nothing else), so that these tests need no library header.
struct Options {
  enum class Priority { kTokenOrder, kRouterProbability };
  int num_experts = 0;
  int top_k = 1;
  double capacity_factor = 1.25;
  double eval_capacity_factor = 2.0;
  int expert_capacity = 0;
  int min_capacity = 4;
  int group_size = 0;
  Priority priority = Priority::kTokenOrder;
  bool dropless = false;
  bool renormalize = false;
};

// Four tokens over three experts, each row summing to 1. Top-1: e0, e0, e1, e2 (top-1
// probabilities 0.5, 0.6, 0.7, 0.7); top-2: (0,1), (0,2), (1,0), (2,1).
MatD four_tokens() {  // [tokens, experts]
  return make_double(4, 3,
                     {0.5, 0.3, 0.2,  //
                      0.6, 0.1, 0.3,  //
                      0.2, 0.7, 0.1,  //
                      0.1, 0.2, 0.7});
}

// ---------------------------------------------------------------------------------------------
// Rule 2 (router_logits and softmax had a copy in each header).

TEST(Reference, RouterLogitsByHand) {
  const MatD x = make_double(1, 2, {1.0, 2.0});                       // [tokens, d_model]
  const MatD w = make_double(2, 3, {1.0, 0.0, -1.0, 0.5, 2.0, 3.0});  // [d_model, experts]
  const MatD b = make_double(1, 3, {0.5, -1.0, 0.0});                 // [1, experts]
  // 1 * 1 + 2 * 0.5 = 2, 1 * 0 + 2 * 2 = 4, 1 * -1 + 2 * 3 = 5; plus the bias: 2.5, 3, 5.
  EXPECT_LT(ref::max_abs_diff(ref::router_logits(x, w), make_double(1, 3, {2.0, 4.0, 5.0})), kTol);
  EXPECT_LT(ref::max_abs_diff(ref::router_logits(x, w, &b), make_double(1, 3, {2.5, 3.0, 5.0})),
            kTol);
}

TEST(Reference, SoftmaxByHand) {
  // exp(0) : exp(ln 3) = 1 : 3; equal logits share evenly even when exp() would overflow.
  const MatD logits = make_double(3, 2, {0.0, std::log(3.0), 1000.0, 1000.0, -7.0, -7.0});
  const MatD want = make_double(3, 2, {0.25, 0.75, 0.5, 0.5, 0.5, 0.5});
  EXPECT_LT(ref::max_abs_diff(ref::softmax(logits), want), kTol);
}

// ---------------------------------------------------------------------------------------------
// Rule 9 (logsumexp and the z-loss had a copy in each header).

TEST(Reference, LogsumexpByHand) {
  const MatD logits = make_double(3, 2, {0.0, std::log(3.0), 1000.0, 1000.0, 0.0, 0.0});
  const std::vector<double> lse = ref::logsumexp(logits);
  ASSERT_EQ(lse.size(), 3u);
  EXPECT_NEAR(lse[0], std::log(4.0), kTol);  // log(1 + 3)
  EXPECT_NEAR(lse[1], 1000.0 + std::log(2.0), 1e-9);
  EXPECT_NEAR(lse[2], std::log(2.0), kTol);
}

TEST(Reference, RouterZLossByHand) {
  // lse = log 4 = 2 log 2 and log 2: z = (4 + 1) (log 2)^2 / 2.
  const MatD logits = make_double(2, 2, {0.0, std::log(3.0), 0.0, 0.0});
  const double ln2 = std::log(2.0);
  EXPECT_NEAR(ref::router_z_loss(logits), 2.5 * ln2 * ln2, kTol);
  EXPECT_EQ(ref::router_z_loss(MatD(0, 3)), 0.0);
}

// ---------------------------------------------------------------------------------------------
// Rule 6 (capacity had a five-argument form in one header and an options form in the other;
// the options form now forwards to the other).

TEST(Reference, CapacityByHand) {
  // floor(1.25 * 8 / 4) = 2, raised to min_capacity when that is larger.
  EXPECT_EQ(ref::capacity(8, 4, 1.25, 1, 0), 2);
  EXPECT_EQ(ref::capacity(8, 4, 1.25, 4, 0), 4);
  // floor(8 * 8 / 2) = 32, capped at the group's 8 tokens.
  EXPECT_EQ(ref::capacity(8, 2, 8.0, 1, 0), 8);
  // floor(1.0 * 4 / 3) = 1; an explicit capacity is used as given.
  EXPECT_EQ(ref::capacity(4, 3, 1.0, 0, 0), 1);
  EXPECT_EQ(ref::capacity(8, 4, 1.25, 4, 3), 3);

  Options o;
  o.num_experts = 4;
  o.capacity_factor = 1.25;
  o.eval_capacity_factor = 2.0;
  o.min_capacity = 1;
  EXPECT_EQ(ref::capacity(8, o, true), 2);   // floor(1.25 * 8 / 4)
  EXPECT_EQ(ref::capacity(8, o, false), 4);  // floor(2.0 * 8 / 4)
  o.expert_capacity = 3;
  EXPECT_EQ(ref::capacity(8, o, true), 3);
  EXPECT_EQ(ref::capacity(8, o, false), 3);
}

// ---------------------------------------------------------------------------------------------
// Rules 4-8 (route had a form on probabilities with the capacity given, and a form on logits
// with the options; both now go through route_probs).

TEST(Reference, RouteTopOneTokenOrderByHand) {
  ref::RouteOptions o;
  o.top_k = 1;
  o.capacity = 1;
  const ref::Routing r = ref::route_probs(four_tokens(), o);
  // Expert 0 is full after token 0, so token 1's choice is dropped.
  EXPECT_EQ(r.expert, make_int(4, 1, {0, 0, 1, 2}));
  EXPECT_EQ(r.slot, make_int(4, 1, {0, -1, 0, 0}));
  EXPECT_LT(ref::max_abs_diff(r.gate, make_double(4, 1, {0.5, 0.0, 0.7, 0.7})), kTol);
  EXPECT_EQ(r.capacity, 1);
  EXPECT_EQ(r.group_size, 4);
  EXPECT_EQ(r.groups, 1);
  EXPECT_EQ(r.tokens_before, (std::vector<int>{2, 1, 1}));
  EXPECT_EQ(r.tokens_after, (std::vector<int>{1, 1, 1}));
  // f = (2, 1, 1) / 4, P = (1.4, 1.3, 1.3) / 4: aux = 3 (0.5 * 0.35 + 2 * 0.25 * 0.325).
  EXPECT_NEAR(r.aux_loss, 1.0125, kTol);
  EXPECT_NEAR(ref::load_balancing_loss(four_tokens(), r.expert, 0), 1.0125, kTol);
}

TEST(Reference, RouteTopOneByProbabilityByHand) {
  ref::RouteOptions o;
  o.top_k = 1;
  o.capacity = 1;
  o.by_probability = true;
  const ref::Routing r = ref::route_probs(four_tokens(), o);
  // Visiting order t2, t3 (0.7, ties keep token order), t1 (0.6), t0 (0.5): token 1 now takes
  // expert 0's slot and token 0 is dropped.
  EXPECT_EQ(r.slot, make_int(4, 1, {-1, 0, 0, 0}));
  EXPECT_LT(ref::max_abs_diff(r.gate, make_double(4, 1, {0.0, 0.6, 0.7, 0.7})), kTol);
  EXPECT_NEAR(r.aux_loss, 1.0125, kTol);  // before capacity: the same as in token order
}

TEST(Reference, RouteTopTwoGroupsRenormalizedByHand) {
  ref::RouteOptions o;
  o.top_k = 2;
  o.capacity = 1;
  o.group_size = 2;
  o.renormalize = true;
  const ref::Routing r = ref::route_probs(four_tokens(), o);
  EXPECT_EQ(r.expert, make_int(4, 2, {0, 1, 0, 2, 1, 0, 2, 1}));
  // Group {t0, t1}: first choices t0 -> e0 (slot 0), t1 -> e0 (full); second choices t0 -> e1,
  // t1 -> e2. Group {t2, t3}: first t2 -> e1, t3 -> e2; second t2 -> e0, t3 -> e1 (full).
  EXPECT_EQ(r.slot, make_int(4, 2, {0, 0, -1, 0, 0, 0, 0, -1}));
  // Gates renormalized over both choices before capacity: 0.5 / 0.8, 0.3 / 0.8, 0.3 / 0.9, ...
  EXPECT_LT(
      ref::max_abs_diff(
          r.gate,
          make_double(4, 2, {0.625, 0.375, 0.0, 1.0 / 3.0, 7.0 / 9.0, 2.0 / 9.0, 7.0 / 9.0, 0.0})),
      kTol);
  EXPECT_EQ(r.capacity, 1);
  EXPECT_EQ(r.group_size, 2);
  EXPECT_EQ(r.groups, 2);
  EXPECT_EQ(r.tokens_before, (std::vector<int>{3, 3, 2}));
  EXPECT_EQ(r.tokens_after, (std::vector<int>{2, 2, 2}));
  // Group 0: f = (1, 0.5, 0.5), P = (0.55, 0.2, 0.25): 3 * 0.775 = 2.325.
  // Group 1: f = (0.5, 1, 0.5), P = (0.15, 0.45, 0.4): 3 * 0.725 = 2.175. Mean 2.25.
  EXPECT_NEAR(r.aux_loss, 2.25, kTol);
  EXPECT_NEAR(ref::load_balancing_loss(four_tokens(), r.expert, 2), 2.25, kTol);
}

TEST(Reference, RouteDroplessByHand) {
  ref::RouteOptions o;
  o.top_k = 2;
  o.group_size = 2;
  o.dropless = true;
  const ref::Routing r = ref::route_probs(four_tokens(), o);
  // The largest load of one expert in one group: e0 in group 0, e1 in group 1, two choices each.
  EXPECT_EQ(r.capacity, 2);
  EXPECT_EQ(r.slot, make_int(4, 2, {0, 0, 1, 0, 0, 0, 0, 1}));
  EXPECT_LT(ref::max_abs_diff(r.gate, make_double(4, 2, {0.5, 0.3, 0.6, 0.3, 0.7, 0.2, 0.7, 0.2})),
            kTol);
  EXPECT_EQ(r.tokens_after, r.tokens_before);
}

TEST(Reference, RouteRankByBreaksProbabilityTies) {
  // Equal probabilities go to the lower expert; a ranking given beside them decides instead,
  // while the gate stays the probability.
  const MatD probs = make_double(1, 3, {0.4, 0.4, 0.2});
  const MatD rank = make_double(1, 3, {1.0, 2.0, 0.0});
  ref::RouteOptions o;
  o.capacity = 1;
  EXPECT_EQ(ref::route_probs(probs, o).expert, make_int(1, 1, {0}));
  const ref::Routing ranked = ref::route_probs(probs, o, &rank);
  EXPECT_EQ(ranked.expert, make_int(1, 1, {1}));
  EXPECT_NEAR(ranked.gate(0, 0), 0.4, kTol);
}

TEST(Reference, RouteFromLogitsWithOptionsByHand) {
  // logits = log(probs) + t: softmax gives the probabilities back and lse_t = t, so
  // z = (0 + 1 + 4 + 9) / 4.
  const MatD probs = four_tokens();
  MatD logits(4, 3);
  for (int t = 0; t < 4; ++t)
    for (int e = 0; e < 3; ++e) logits(t, e) = std::log(probs(t, e)) + t;
  Options o;
  o.num_experts = 3;
  o.capacity_factor = 1.0;       // training: floor(1.0 * 4 / 3) = 1
  o.eval_capacity_factor = 2.0;  // evaluation: floor(2.0 * 4 / 3) = 2
  o.min_capacity = 1;
  const ref::Routing train = ref::route(logits, o, true);
  EXPECT_LT(ref::max_abs_diff(train.probs, probs), kTol);
  EXPECT_EQ(train.capacity, 1);
  EXPECT_EQ(train.slot, make_int(4, 1, {0, -1, 0, 0}));
  EXPECT_NEAR(train.aux_loss, 1.0125, kTol);
  EXPECT_NEAR(train.z_loss, 3.5, 1e-12);
  const ref::Routing eval = ref::route(logits, o, false);
  EXPECT_EQ(eval.capacity, 2);
  EXPECT_EQ(eval.slot, make_int(4, 1, {0, 1, 0, 0}));
  o.priority = Options::Priority::kRouterProbability;
  EXPECT_EQ(ref::route(logits, o, true).slot, make_int(4, 1, {-1, 0, 0, 0}));
}

// ---------------------------------------------------------------------------------------------
// The layer reference composes the two others.

TEST(Reference, StatsByHand) {
  ref::RouteOptions o;
  o.top_k = 2;
  o.capacity = 1;
  o.group_size = 2;
  o.renormalize = true;
  const ref::Stats s = ref::stats(ref::route_probs(four_tokens(), o), 3);
  EXPECT_EQ(s.tokens_before, (std::vector<int>{3, 3, 2}));
  EXPECT_EQ(s.tokens_after, (std::vector<int>{2, 2, 2}));
  EXPECT_NEAR(s.dropped_token_fraction, 0.0, kTol);    // every token kept one choice
  EXPECT_NEAR(s.dropped_choice_fraction, 0.25, kTol);  // 2 of 8 choices
  // Kept gates 0.625 + 0.375 + 1/3 + 7/9 + 2/9 + 7/9 = 28/9 over 6 choices.
  EXPECT_NEAR(s.router_confidence, 14.0 / 27.0, kTol);
  EXPECT_NEAR(s.expert_usage, 1.0, kTol);  // 6 kept of 3 experts * 1 slot * 2 groups
}

TEST(Reference, SwitchCombineByHand) {
  // d_model = d_ff = 1: expert 0 is relu(2 x) * 3, expert 1 is relu(-x) * 5 + 1 (with biases).
  ref::Ffn e0{make_double(1, 1, {2.0}), MatD(), make_double(1, 1, {3.0}), MatD()};
  ref::Ffn e1{make_double(1, 1, {-1.0}), make_double(1, 1, {0.0}), make_double(1, 1, {5.0}),
              make_double(1, 1, {1.0})};
  const MatD x = make_double(3, 1, {1.0, -2.0, 4.0});  // [tokens, d_model]
  const MatI expert = make_int(3, 2, {0, 1, 1, 0, 0, 1});
  const MatI slot = make_int(3, 2, {0, 0, 0, -1, -1, -1});
  const MatD gate = make_double(3, 2, {0.5, 0.25, 0.75, 0.0, 0.0, 0.0});
  // t0: 0.5 * 6 + 0.25 * (0 + 1) = 3.25; t1: 0.75 * (10 + 1) = 8.25; t2: both dropped, 0.
  const MatD y =
      ref::switch_combine(x, {e0, e1}, expert, slot, gate, ref::Act::kRelu);  // [tokens, d_model]
  EXPECT_LT(ref::max_abs_diff(y, make_double(3, 1, {3.25, 8.25, 0.0})), kTol);
  EXPECT_EQ(y(2, 0), 0.0);
}

// ---------------------------------------------------------------------------------------------
// The shared fixtures (common.hpp; to_double had a copy in each header).

TEST(Reference, CommonFixturesByHand) {
  Eigen::Matrix<float, 1, 2> f;
  f << 0.5f, -2.0f;
  EXPECT_EQ(ref::to_double(f), make_double(1, 2, {0.5, -2.0}));
  EXPECT_EQ(ref::max_abs_diff(make_double(1, 2, {1.0, 2.0}), make_double(1, 2, {1.5, 1.0})), 1.0);
  EXPECT_TRUE(std::isinf(ref::max_abs_diff(MatD(1, 2), MatD(2, 1))));
  // d/dx sum x^3 = 3 x^2.
  const MatD at = make_double(1, 2, {1.0, 2.0});
  const MatD grad =
      ref::finite_difference([](const MatD& m) { return m.array().cube().sum(); }, at, 1e-4);
  EXPECT_LT(ref::max_abs_diff(grad, make_double(1, 2, {3.0, 12.0})), 1e-6);
}

}  // namespace
