// Tests of switchmoe::route and switchmoe::route_backward against SEMANTICS rules 4-10, by hand
// on small cases (expected numbers worked out in the comments) and against the double-precision
// reference of tests/reference/routing_reference.hpp on random shapes and options.
#include "switchmoe/routing/route.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "reference/routing_reference.hpp"
#include "support/expect_throw.hpp"

namespace {

namespace ref = switchmoe_test::ref;
using ref::make_int;
using ref::MatD;
using ref::MatI;
using switchmoe::Matrix;
using switchmoe::Mode;
using switchmoe::Priority;
using switchmoe::RoutingOptions;
using switchmoe_test::ThrowsInvalidArgumentNaming;
using switchmoe_test::ref::to_double;

Matrix<float> make_logits(int rows, int cols, std::initializer_list<float> values) {
  Matrix<float> m(rows, cols);
  auto it = values.begin();
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < cols; ++c) m(r, c) = *it++;
  }
  return m;
}

// Options with a fixed capacity C and no min_capacity, so that small hand cases overflow.
RoutingOptions fixed_capacity(int experts, int k, int capacity) {
  RoutingOptions o;
  o.num_experts = experts;
  o.top_k = k;
  o.expert_capacity = capacity;
  o.min_capacity = 1;
  return o;
}

::testing::AssertionResult SameInts(const Matrix<int>& got, const MatI& want) {
  if (got.rows() != want.rows() || got.cols() != want.cols()) {
    return ::testing::AssertionFailure() << "shape " << got.rows() << "x" << got.cols()
                                         << ", expected " << want.rows() << "x" << want.cols();
  }
  if (got != want) {
    return ::testing::AssertionFailure() << "got\n" << got << "\nexpected\n" << want;
  }
  return ::testing::AssertionSuccess();
}

::testing::AssertionResult Near(const Matrix<float>& got, const MatD& want, double tol) {
  if (got.rows() != want.rows() || got.cols() != want.cols()) {
    return ::testing::AssertionFailure() << "shape " << got.rows() << "x" << got.cols()
                                         << ", expected " << want.rows() << "x" << want.cols();
  }
  for (Eigen::Index r = 0; r < got.rows(); ++r) {
    for (Eigen::Index c = 0; c < got.cols(); ++c) {
      if (!(std::abs(got(r, c) - want(r, c)) <= tol)) {
        return ::testing::AssertionFailure()
               << "at (" << r << ", " << c << "): " << got(r, c) << " vs expected " << want(r, c)
               << " (tolerance " << tol << ")\ngot\n"
               << got << "\nexpected\n"
               << want;
      }
    }
  }
  return ::testing::AssertionSuccess();
}

// Everything route() returns, compared with a reference routing.
void ExpectRoutingMatches(const switchmoe::Routing& got, const ref::Routing& want,
                          const Matrix<float>& logits) {
  EXPECT_TRUE(got.logits == logits) << "routing.logits must be the input logits";
  EXPECT_TRUE(Near(got.probs, want.probs, 2e-6)) << "probs";
  EXPECT_TRUE(SameInts(got.expert, want.expert)) << "expert";
  EXPECT_TRUE(SameInts(got.slot, want.slot)) << "slot";
  EXPECT_TRUE(Near(got.gate, want.gate, 2e-6)) << "gate";
  EXPECT_NEAR(got.aux_loss, want.aux_loss, 2e-6 * std::max(1.0, want.aux_loss)) << "aux_loss";
  EXPECT_NEAR(got.z_loss, want.z_loss, 2e-6 * std::max(1.0, want.z_loss)) << "z_loss";
  EXPECT_EQ(got.capacity, want.capacity) << "capacity";
  EXPECT_EQ(got.group_size, want.group_size) << "group_size";
}

// ----------------------------------------------------------------------------------------------
// Random inputs.

// Continuous logits in [-3, 3] with every decision far from rounding: within a row the logits
// differ by > 1e-2, and across rows the top-1 probabilities differ by > 1e-4 relative (rows are
// redrawn until so). With one expert every top-1 probability is exactly 1: exact ties.
Matrix<float> separated_logits(int tokens, int experts, std::mt19937& rng) {
  std::uniform_real_distribution<float> uniform(-3.0f, 3.0f);
  Matrix<float> logits(tokens, experts);
  std::vector<double> top1;
  for (int t = 0; t < tokens; ++t) {
    for (int attempt = 0;; ++attempt) {
      for (int e = 0; e < experts; ++e) logits(t, e) = uniform(rng);
      bool ok = true;
      for (int a = 0; a < experts; ++a) {
        for (int b = 0; b < a; ++b) ok = ok && std::abs(logits(t, a) - logits(t, b)) > 1e-2f;
      }
      const MatD p = ref::softmax(to_double(logits.row(t)));
      const double max_p = p.maxCoeff();
      if (experts > 1) {
        for (double other : top1) ok = ok && std::abs(other - max_p) > 1e-4 * max_p;
      }
      if (ok || attempt > 1000) {
        top1.push_back(max_p);
        break;
      }
    }
  }
  return logits;
}

// Logits on a coarse grid (eighths in [-1, 1]): many exactly equal logits within and across
// rows, so ties are everywhere.
Matrix<float> tied_logits(int tokens, int experts, std::mt19937& rng) {
  std::uniform_int_distribution<int> grid(-8, 8);
  Matrix<float> logits(tokens, experts);
  for (int t = 0; t < tokens; ++t) {
    for (int e = 0; e < experts; ++e) logits(t, e) = static_cast<float>(grid(rng)) / 8.0f;
  }
  return logits;
}

struct Case {
  RoutingOptions options;
  Mode mode;
  int tokens;
};

Case random_case(std::mt19937& rng) {
  auto pick = [&](std::initializer_list<int> values) {
    std::uniform_int_distribution<std::size_t> index(0, values.size() - 1);
    return *(values.begin() + index(rng));
  };
  auto coin = [&](double p) { return std::bernoulli_distribution(p)(rng); };
  Case c;
  RoutingOptions& o = c.options;
  o.num_experts = pick({1, 2, 3, 4, 5, 8});
  o.top_k = std::uniform_int_distribution<int>(1, std::min(3, o.num_experts))(rng);
  const int groups = pick({1, 1, 2, 3, 4});
  const int group_size = pick({1, 2, 3, 5, 8, 12});
  c.tokens = groups * group_size;
  o.group_size = (groups == 1 && coin(0.5)) ? 0 : group_size;
  o.priority = coin(0.5) ? Priority::kTokenOrder : Priority::kRouterProbability;
  o.dropless = coin(0.2);
  o.renormalize = coin(0.5);
  c.mode = coin(0.5) ? Mode::kTrain : Mode::kEval;
  o.capacity_factor = pick({1, 2, 4, 5, 8}) / 4.0;  // 0.25 .. 2.0
  o.eval_capacity_factor = pick({2, 4, 8, 12}) / 4.0;
  o.min_capacity = pick({0, 1, 2, 4});
  const int low = std::max(1, o.min_capacity);
  if (coin(0.2) && low <= group_size) {
    o.expert_capacity = std::uniform_int_distribution<int>(low, group_size)(rng);
  }
  return c;
}

std::string describe(const Case& c) {
  const RoutingOptions& o = c.options;
  std::ostringstream s;
  s << "tokens=" << c.tokens << " E=" << o.num_experts << " k=" << o.top_k
    << " group_size=" << o.group_size << " priority=" << switchmoe::to_string(o.priority)
    << " dropless=" << o.dropless << " renormalize=" << o.renormalize
    << " mode=" << (c.mode == Mode::kTrain ? "train" : "eval") << " f=" << o.capacity_factor
    << " eval_f=" << o.eval_capacity_factor << " min_capacity=" << o.min_capacity
    << " expert_capacity=" << o.expert_capacity;
  return s.str();
}

TEST(Route, RandomCasesMatchReference) {
  std::mt19937 rng(20260101);
  for (int i = 0; i < 300; ++i) {
    const Case c = random_case(rng);
    const Matrix<float> logits = separated_logits(c.tokens, c.options.num_experts, rng);
    SCOPED_TRACE(describe(c));
    const switchmoe::Routing got = switchmoe::route(logits, c.options, c.mode);
    ExpectRoutingMatches(got, ref::route(to_double(logits), c.options, c.mode == Mode::kTrain),
                         logits);
    if (HasFailure()) break;
  }
}

// With ties everywhere the decisions are checked against the reference applied to the
// library's own float probabilities (equal logits must give equal probabilities: see the
// tie tests below), so that no float/double rounding can decide a tie.
TEST(Route, RandomTiedCasesMatchReferenceDecisions) {
  std::mt19937 rng(7);
  for (int i = 0; i < 300; ++i) {
    const Case c = random_case(rng);
    const Matrix<float> logits = tied_logits(c.tokens, c.options.num_experts, rng);
    SCOPED_TRACE(describe(c));
    const switchmoe::Routing got = switchmoe::route(logits, c.options, c.mode);
    ASSERT_TRUE(Near(got.probs, ref::softmax(to_double(logits)), 2e-6));
    ExpectRoutingMatches(got,
                         ref::route_from_probs(to_double(logits), to_double(got.probs), c.options,
                                               c.mode == Mode::kTrain),
                         logits);
    if (HasFailure()) break;
  }
}

TEST(Route, AcceptsAMapOfTheCallersBuffer) {
  // Eigen::Ref input: a row-major block of a larger buffer routes like a copy of it.
  std::mt19937 rng(3);
  const Matrix<float> big = separated_logits(6, 6, rng);
  RoutingOptions o;
  o.num_experts = 4;
  o.top_k = 2;
  const Matrix<float> copy = big.block(1, 1, 4, 4);
  const switchmoe::Routing from_block = switchmoe::route(big.block(1, 1, 4, 4), o, Mode::kTrain);
  const switchmoe::Routing from_copy = switchmoe::route(copy, o, Mode::kTrain);
  EXPECT_TRUE(from_block.logits == copy);
  EXPECT_TRUE(from_block.probs == from_copy.probs);
  EXPECT_TRUE(from_block.expert == from_copy.expert);
  EXPECT_TRUE(from_block.slot == from_copy.slot);
  EXPECT_TRUE(from_block.gate == from_copy.gate);
}

// ----------------------------------------------------------------------------------------------
// Rule 2 / 4: softmax and choice.

TEST(Route, ProbabilitiesAreTheSoftmaxOfTheLogits) {
  // logits [0, 2, 1]: probs = [1, e^2, e] / (1 + e^2 + e)
  //   = [1, 7.389056, 2.718282] / 11.107338 = [0.0900306, 0.6652410, 0.2447285].
  RoutingOptions o;
  o.num_experts = 3;
  const Matrix<float> logits = make_logits(1, 3, {0.0f, 2.0f, 1.0f});
  const switchmoe::Routing r = switchmoe::route(logits, o, Mode::kTrain);
  EXPECT_NEAR(r.probs(0, 0), 0.0900306, 1e-6);
  EXPECT_NEAR(r.probs(0, 1), 0.6652410, 1e-6);
  EXPECT_NEAR(r.probs(0, 2), 0.2447285, 1e-6);
  EXPECT_EQ(r.expert(0, 0), 1);
  EXPECT_EQ(r.slot(0, 0), 0);
  EXPECT_NEAR(r.gate(0, 0), 0.6652410, 1e-6);  // raw softmax probability
}

TEST(Route, SoftmaxIsStableForLargeLogits) {
  // logits [1000, 999, 0]: probs = [1, e^-1, ~0] / (1 + e^-1) = [0.7310586, 0.2689414, 0].
  RoutingOptions o;
  o.num_experts = 3;
  o.top_k = 2;
  const Matrix<float> logits = make_logits(1, 3, {1000.0f, 999.0f, 0.0f});
  const switchmoe::Routing r = switchmoe::route(logits, o, Mode::kTrain);
  EXPECT_NEAR(r.probs(0, 0), 0.7310586, 1e-6);
  EXPECT_NEAR(r.probs(0, 1), 0.2689414, 1e-6);
  EXPECT_NEAR(r.probs(0, 2), 0.0, 1e-6);
  // z = (1000 + log(1 + e^-1))^2 = (1000.3132617)^2 = 1000626.62...
  EXPECT_NEAR(r.z_loss, 1000626.6, 1.0);
}

TEST(Route, TopTwoAndTopThreeGatesAreRawProbabilities) {
  // logits log[1, 2, 3, 6]: probs [1, 2, 3, 6] / 12 -> top-2 experts [3, 2], gates [1/2, 1/4];
  // top-3 experts [3, 2, 1], gates [1/2, 1/4, 1/6].
  const Matrix<float> logits =
      make_logits(1, 4, {0.0f, std::log(2.0f), std::log(3.0f), std::log(6.0f)});
  RoutingOptions o;
  o.num_experts = 4;
  o.top_k = 2;
  switchmoe::Routing r = switchmoe::route(logits, o, Mode::kTrain);
  EXPECT_TRUE(SameInts(r.expert, make_int(1, 2, {3, 2})));
  EXPECT_TRUE(Near(r.gate, (MatD(1, 2) << 0.5, 0.25).finished(), 1e-6));
  o.top_k = 3;
  r = switchmoe::route(logits, o, Mode::kTrain);
  EXPECT_TRUE(SameInts(r.expert, make_int(1, 3, {3, 2, 1})));
  EXPECT_TRUE(Near(r.gate, (MatD(1, 3) << 0.5, 0.25, 1.0 / 6).finished(), 1e-6));
}

TEST(Route, RenormalizedGatesSumToOne) {
  // Same probs [1, 2, 3, 6] / 12. Top-2 renormalized: [6, 3] / 9 = [2/3, 1/3];
  // top-3 renormalized: [6, 3, 2] / 11.
  const Matrix<float> logits =
      make_logits(1, 4, {0.0f, std::log(2.0f), std::log(3.0f), std::log(6.0f)});
  RoutingOptions o;
  o.num_experts = 4;
  o.top_k = 2;
  o.renormalize = true;
  switchmoe::Routing r = switchmoe::route(logits, o, Mode::kTrain);
  EXPECT_TRUE(Near(r.gate, (MatD(1, 2) << 2.0 / 3, 1.0 / 3).finished(), 1e-6));
  o.top_k = 3;
  r = switchmoe::route(logits, o, Mode::kTrain);
  EXPECT_TRUE(Near(r.gate, (MatD(1, 3) << 6.0 / 11, 3.0 / 11, 2.0 / 11).finished(), 1e-6));
  // The probabilities themselves are not renormalized.
  EXPECT_NEAR(r.probs(0, 3), 0.5, 1e-6);
}

TEST(Route, RenormalizedTopOneGateIsOne) {
  RoutingOptions o;
  o.num_experts = 4;
  o.renormalize = true;
  const Matrix<float> logits = make_logits(2, 4, {0.1f, 0.7f, -2.0f, 0.3f, 3.0f, 0.0f, 1.0f, 2.9f});
  const switchmoe::Routing r = switchmoe::route(logits, o, Mode::kTrain);
  EXPECT_TRUE(SameInts(r.expert, make_int(2, 1, {1, 0})));
  EXPECT_FLOAT_EQ(r.gate(0, 0), 1.0f);
  EXPECT_FLOAT_EQ(r.gate(1, 0), 1.0f);
}

TEST(Route, RenormalizationHappensBeforeCapacity) {
  // E=3, k=2, C=1. Token 0 probs [0.6, 0.3, 0.1] -> experts [0, 1]; token 1 probs
  // [0.3, 0.6, 0.1] -> experts [1, 0]. First choices: t0 -> e0 slot 0, t1 -> e1 slot 0.
  // Second choices: t0 -> e1 full, t1 -> e0 full: dropped.
  // Kept gates renormalized over both chosen experts: 0.6 / (0.6 + 0.3) = 2/3 (not 1, which
  // renormalizing after capacity would give). Without renormalization: 0.6.
  const Matrix<float> logits = make_logits(2, 3,
                                           {std::log(0.6f), std::log(0.3f), std::log(0.1f),
                                            std::log(0.3f), std::log(0.6f), std::log(0.1f)});
  RoutingOptions o = fixed_capacity(3, 2, 1);
  o.renormalize = true;
  switchmoe::Routing r = switchmoe::route(logits, o, Mode::kTrain);
  EXPECT_TRUE(SameInts(r.expert, make_int(2, 2, {0, 1, 1, 0})));
  EXPECT_TRUE(SameInts(r.slot, make_int(2, 2, {0, -1, 0, -1})));
  EXPECT_TRUE(Near(r.gate, (MatD(2, 2) << 2.0 / 3, 0.0, 2.0 / 3, 0.0).finished(), 1e-6));
  o.renormalize = false;
  r = switchmoe::route(logits, o, Mode::kTrain);
  EXPECT_TRUE(Near(r.gate, (MatD(2, 2) << 0.6, 0.0, 0.6, 0.0).finished(), 1e-6));
}

TEST(Route, TiesGoToTheLowerExpertIndex) {
  // Identical logits are an exact tie: the lower index wins, and the tied probabilities are
  // equal. Row 0 [1,1,1,1,1,1,1,1] top-3 -> [0, 1, 2], gates 1/8.
  // Row 1 [0,5,5,0,0,5,0,0] -> [1, 2, 5]. Row 2 [2,0,2,2,0,0,0,2] -> [0, 2, 3].
  // Row 3 [0,0,0,0,0,0,0,3] -> [7, 0, 1].
  const Matrix<float> logits = make_logits(4, 8, {1, 1, 1, 1, 1, 1, 1, 1,  //
                                                  0, 5, 5, 0, 0, 5, 0, 0,  //
                                                  2, 0, 2, 2, 0, 0, 0, 2,  //
                                                  0, 0, 0, 0, 0, 0, 0, 3});
  RoutingOptions o;
  o.num_experts = 8;
  o.top_k = 3;
  const switchmoe::Routing r = switchmoe::route(logits, o, Mode::kEval);
  EXPECT_TRUE(SameInts(r.expert, make_int(4, 3, {0, 1, 2, 1, 2, 5, 0, 2, 3, 7, 0, 1})));
  for (int t = 0; t < 4; ++t) {
    for (int a = 0; a < 8; ++a) {
      for (int b = 0; b < 8; ++b) {
        if (logits(t, a) == logits(t, b)) {
          EXPECT_EQ(r.probs(t, a), r.probs(t, b))
              << "equal logits must give equal probs, token " << t << " experts " << a << ", " << b;
        }
      }
    }
  }
  EXPECT_NEAR(r.gate(0, 0), 0.125, 1e-7);
  EXPECT_EQ(r.gate(0, 0), r.gate(0, 1));
  EXPECT_EQ(r.gate(0, 1), r.gate(0, 2));
}

TEST(Route, TiesGoToTheLowerIndexForEveryWidth) {
  // All-equal logits of every width (the implementation may vectorize): top-k is [0..k).
  for (int experts = 1; experts <= 40; ++experts) {
    for (int k : {1, 2, 3}) {
      if (k > experts) continue;
      RoutingOptions o;
      o.num_experts = experts;
      o.top_k = k;
      const Matrix<float> logits = Matrix<float>::Constant(3, experts, 0.37f);
      const switchmoe::Routing r = switchmoe::route(logits, o, Mode::kTrain);
      for (int t = 0; t < 3; ++t) {
        for (int c = 0; c < k; ++c) {
          EXPECT_EQ(r.expert(t, c), c) << "E=" << experts << " k=" << k << " token " << t;
        }
      }
    }
  }
}

// ----------------------------------------------------------------------------------------------
// Rule 5: groups.

TEST(Route, CapacityAndSlotsArePerGroup) {
  // N=8, E=2, k=1, C=2, every token prefers expert 0 (logits [1, 0]).
  // group_size 4: each group keeps its first two tokens, slots restart at 0 in each group:
  // slots [0, 1, -1, -1, 0, 1, -1, -1]. One group of 8: [0, 1, -1, -1, -1, -1, -1, -1].
  Matrix<float> logits(8, 2);
  logits.col(0).setConstant(1.0f);
  logits.col(1).setConstant(0.0f);
  RoutingOptions o = fixed_capacity(2, 1, 2);
  o.group_size = 4;
  switchmoe::Routing r = switchmoe::route(logits, o, Mode::kTrain);
  EXPECT_EQ(r.group_size, 4);
  EXPECT_EQ(r.capacity, 2);
  EXPECT_TRUE(SameInts(r.slot, make_int(8, 1, {0, 1, -1, -1, 0, 1, -1, -1})));
  o.group_size = 0;
  r = switchmoe::route(logits, o, Mode::kTrain);
  EXPECT_EQ(r.group_size, 8);  // 0: the whole call is one group
  EXPECT_TRUE(SameInts(r.slot, make_int(8, 1, {0, 1, -1, -1, -1, -1, -1, -1})));
}

TEST(Route, CapacityIsComputedFromTheGroupTokens) {
  // N=16, E=2, factor 1.0, min 1: group_size 8 -> C = floor(8 / 2) = 4; one group -> 8.
  std::mt19937 rng(11);
  const Matrix<float> logits = separated_logits(16, 2, rng);
  RoutingOptions o;
  o.num_experts = 2;
  o.capacity_factor = 1.0;
  o.min_capacity = 1;
  o.group_size = 8;
  EXPECT_EQ(switchmoe::route(logits, o, Mode::kTrain).capacity, 4);
  o.group_size = 0;
  EXPECT_EQ(switchmoe::route(logits, o, Mode::kTrain).capacity, 8);
  o.group_size = 16;
  EXPECT_EQ(switchmoe::route(logits, o, Mode::kTrain).group_size, 16);
}

TEST(Route, AuxLossIsAveragedOverGroups) {
  // N=4, E=2, k=1, group_size 2.
  // Group A: probs [0.8, 0.2], [0.6, 0.4], both choose e0: f = (1, 0), P = (0.7, 0.3)
  //   -> 2 * 0.7 = 1.4.
  // Group B: probs [0.5, 0.5] (tie -> e0), [0.2, 0.8] (-> e1): f = (0.5, 0.5),
  //   P = (0.35, 0.65) -> 2 * (0.175 + 0.325) = 1.0.
  // Mean over groups: 1.2. One group of 4 instead: f = (3/4, 1/4), P = (0.525, 0.475)
  //   -> 2 * (0.39375 + 0.11875) = 1.025.
  const Matrix<float> logits =
      make_logits(4, 2,
                  {std::log(0.8f), std::log(0.2f), std::log(0.6f), std::log(0.4f), 0.0f, 0.0f,
                   std::log(0.2f), std::log(0.8f)});
  RoutingOptions o;
  o.num_experts = 2;
  o.group_size = 2;
  switchmoe::Routing r = switchmoe::route(logits, o, Mode::kTrain);
  EXPECT_NEAR(r.aux_loss, 1.2, 1e-6);
  o.group_size = 0;
  r = switchmoe::route(logits, o, Mode::kTrain);
  EXPECT_NEAR(r.aux_loss, 1.025, 1e-6);
}

TEST(Route, ZLossIsAMeanOverAllTokensWhateverTheGroups) {
  // Rule 9 has no groups. logits [0, 0] and [log 3, 0]: lse = log 2, log 4
  // -> z = ((log 2)^2 + (log 4)^2) / 2 = (0.480453 + 1.921812) / 2 = 1.201133.
  const Matrix<float> logits = make_logits(2, 2, {0.0f, 0.0f, std::log(3.0f), 0.0f});
  RoutingOptions o;
  o.num_experts = 2;
  o.group_size = 1;
  EXPECT_NEAR(switchmoe::route(logits, o, Mode::kTrain).z_loss, 1.201133, 1e-5);
  o.group_size = 0;
  EXPECT_NEAR(switchmoe::route(logits, o, Mode::kTrain).z_loss, 1.201133, 1e-5);
}

// ----------------------------------------------------------------------------------------------
// Rule 6 through route().

TEST(Route, TrainAndEvalUseTheirOwnFactor) {
  // N=64, E=4, defaults: train C = floor(1.25 * 16) = 20, eval C = floor(2.0 * 16) = 32.
  std::mt19937 rng(5);
  const Matrix<float> logits = separated_logits(64, 4, rng);
  RoutingOptions o;
  o.num_experts = 4;
  EXPECT_EQ(switchmoe::route(logits, o, Mode::kTrain).capacity, 20);
  EXPECT_EQ(switchmoe::route(logits, o, Mode::kEval).capacity, 32);
  o.expert_capacity = 9;  // explicit capacity overrides both
  EXPECT_EQ(switchmoe::route(logits, o, Mode::kTrain).capacity, 9);
  EXPECT_EQ(switchmoe::route(logits, o, Mode::kEval).capacity, 9);
}

TEST(Route, EveryTokenChoosingOneExpertOverflowsAtCapacity) {
  // N=10, E=4, factor 1.25, min 1 -> C = floor(3.125) = 3; all prefer expert 2.
  Matrix<float> logits = Matrix<float>::Zero(10, 4);
  logits.col(2).setConstant(2.0f);
  RoutingOptions o;
  o.num_experts = 4;
  o.min_capacity = 1;
  const switchmoe::Routing r = switchmoe::route(logits, o, Mode::kTrain);
  EXPECT_EQ(r.capacity, 3);
  EXPECT_TRUE(SameInts(r.slot, make_int(10, 1, {0, 1, 2, -1, -1, -1, -1, -1, -1, -1})));
  // p = e^2 / (e^2 + 3) = 7.389056 / 10.389056 = 0.711234
  for (int t = 0; t < 10; ++t) EXPECT_NEAR(r.gate(t, 0), t < 3 ? 0.711234 : 0.0, 1e-6);
  // Default min_capacity 4 keeps one more token.
  o.min_capacity = 4;
  EXPECT_EQ(switchmoe::route(logits, o, Mode::kTrain).slot(3, 0), 3);
}

// ----------------------------------------------------------------------------------------------
// Rule 7: priority.

TEST(Route, TokenOrderFillsSlotsInTokenOrder) {
  // N=3, E=2, C=1, all prefer expert 0: slots [0, -1, -1], gates [sigma(1), 0, 0].
  Matrix<float> logits(3, 2);
  logits << 1, 0, 1, 0, 1, 0;
  const switchmoe::Routing r = switchmoe::route(logits, fixed_capacity(2, 1, 1), Mode::kTrain);
  EXPECT_TRUE(SameInts(r.slot, make_int(3, 1, {0, -1, -1})));
  EXPECT_TRUE(Near(r.gate, (MatD(3, 1) << 0.7310586, 0.0, 0.0).finished(), 1e-6));
}

TEST(Route, FirstChoicesArePlacedBeforeSecondChoices) {
  // N=2, E=2, k=2, C=1. Token 0 logits [0, 1] -> experts [1, 0]; token 1 [1, 0] -> [0, 1].
  // First choices: t0 -> e1 slot 0, t1 -> e0 slot 0. Second choices: both experts full.
  // (Placing token 0's two choices before token 1 would give t0 both slots instead.)
  Matrix<float> logits(2, 2);
  logits << 0, 1, 1, 0;
  for (Priority p : {Priority::kTokenOrder, Priority::kRouterProbability}) {
    RoutingOptions o = fixed_capacity(2, 2, 1);
    o.priority = p;
    const switchmoe::Routing r = switchmoe::route(logits, o, Mode::kTrain);
    EXPECT_TRUE(SameInts(r.expert, make_int(2, 2, {1, 0, 0, 1})));
    EXPECT_TRUE(SameInts(r.slot, make_int(2, 2, {0, -1, 0, -1}))) << switchmoe::to_string(p);
    EXPECT_EQ(r.gate(0, 1), 0.0f);
    EXPECT_EQ(r.gate(1, 1), 0.0f);
  }
}

TEST(Route, RouterProbabilityOrderVisitsMostConfidentTokensFirst) {
  // N=3, E=2, k=1, all prefer expert 0 with p0 = 0.6, 0.9, 0.7 (logits [log(p/(1-p)), 0]).
  // Descending top-1 order: t1, t2, t0. C=1: slots [-1, 0, -1]; C=2: [-1, 0, 1].
  // Token order, C=2: [0, 1, -1].
  Matrix<float> logits(3, 2);
  logits << std::log(1.5f), 0, std::log(9.0f), 0, std::log(7.0f / 3.0f), 0;
  RoutingOptions o = fixed_capacity(2, 1, 1);
  o.priority = Priority::kRouterProbability;
  EXPECT_TRUE(
      SameInts(switchmoe::route(logits, o, Mode::kTrain).slot, make_int(3, 1, {-1, 0, -1})));
  o.expert_capacity = 2;
  const switchmoe::Routing r = switchmoe::route(logits, o, Mode::kTrain);
  EXPECT_TRUE(SameInts(r.slot, make_int(3, 1, {-1, 0, 1})));
  EXPECT_TRUE(Near(r.gate, (MatD(3, 1) << 0.0, 0.9, 0.7).finished(), 1e-6));
  o.priority = Priority::kTokenOrder;
  EXPECT_TRUE(SameInts(switchmoe::route(logits, o, Mode::kTrain).slot, make_int(3, 1, {0, 1, -1})));
}

TEST(Route, RouterProbabilityOrderIsStableForTies) {
  // Four identical tokens: equal top-1 probabilities keep token order. C=2: [0, 1, -1, -1].
  Matrix<float> logits(4, 3);
  for (int t = 0; t < 4; ++t) logits.row(t) << 0.3f, 1.2f, -0.4f;
  RoutingOptions o = fixed_capacity(3, 1, 2);
  o.priority = Priority::kRouterProbability;
  const switchmoe::Routing r = switchmoe::route(logits, o, Mode::kTrain);
  EXPECT_TRUE(SameInts(r.slot, make_int(4, 1, {0, 1, -1, -1})));
}

TEST(Route, RouterProbabilityOrdersSecondChoicesByTopOneProbability) {
  // N=2, E=3, k=2, C=1. Token 0 probs [0.5, 0.1, 0.4] -> experts [0, 2]; token 1 probs
  // [0.1, 0.6, 0.3] -> experts [1, 2]. Order by top-1: t1 (0.6), t0 (0.5).
  // First choices: t1 -> e1 slot 0, t0 -> e0 slot 0. Second choices, same order:
  // t1 -> e2 slot 0, t0 -> e2 full. Slots [[0, -1], [0, 0]].
  // (Ordering second choices by their own probability, 0.4 > 0.3, or token order would give
  // e2 to token 0.)
  const Matrix<float> logits = make_logits(2, 3,
                                           {std::log(0.5f), std::log(0.1f), std::log(0.4f),
                                            std::log(0.1f), std::log(0.6f), std::log(0.3f)});
  RoutingOptions o = fixed_capacity(3, 2, 1);
  o.priority = Priority::kRouterProbability;
  switchmoe::Routing r = switchmoe::route(logits, o, Mode::kTrain);
  EXPECT_TRUE(SameInts(r.expert, make_int(2, 2, {0, 2, 1, 2})));
  EXPECT_TRUE(SameInts(r.slot, make_int(2, 2, {0, -1, 0, 0})));
  EXPECT_TRUE(Near(r.gate, (MatD(2, 2) << 0.5, 0.0, 0.6, 0.3).finished(), 1e-6));
  o.priority = Priority::kTokenOrder;
  r = switchmoe::route(logits, o, Mode::kTrain);
  EXPECT_TRUE(SameInts(r.slot, make_int(2, 2, {0, 0, 0, -1})));
}

TEST(Route, RouterProbabilityOrderIsPerGroup) {
  // N=4, group_size 2, E=2, k=1, C=1, all prefer expert 0 with p0 = 0.6, 0.7 | 0.9, 0.8.
  // Each group keeps its own most confident token: slots [-1, 0, 0, -1].
  Matrix<float> logits(4, 2);
  logits << std::log(1.5f), 0, std::log(7.0f / 3.0f), 0, std::log(9.0f), 0, std::log(4.0f), 0;
  RoutingOptions o = fixed_capacity(2, 1, 1);
  o.priority = Priority::kRouterProbability;
  o.group_size = 2;
  EXPECT_TRUE(
      SameInts(switchmoe::route(logits, o, Mode::kTrain).slot, make_int(4, 1, {-1, 0, 0, -1})));
}

TEST(Route, TokenWithEveryChoiceDroppedGetsZeroGatesAndNoSlots) {
  // N=3, E=2, k=2, C=1, all tokens prefer [0, 1]. Token 0 takes both slot 0s; tokens 1 and 2
  // lose every choice: slots -1, gates 0.
  Matrix<float> logits(3, 2);
  logits << 1, 0, 1, 0, 1, 0;
  for (bool renormalize : {false, true}) {
    RoutingOptions o = fixed_capacity(2, 2, 1);
    o.renormalize = renormalize;
    const switchmoe::Routing r = switchmoe::route(logits, o, Mode::kTrain);
    EXPECT_TRUE(SameInts(r.expert, make_int(3, 2, {0, 1, 0, 1, 0, 1})));
    EXPECT_TRUE(SameInts(r.slot, make_int(3, 2, {0, 0, -1, -1, -1, -1})));
    for (int t = 1; t < 3; ++t) {
      EXPECT_EQ(r.gate(t, 0), 0.0f);
      EXPECT_EQ(r.gate(t, 1), 0.0f);
    }
  }
}

TEST(Route, CapacityZeroDropsEverythingButKeepsTheAuxLoss) {
  // N=2, E=8, factor 1.25, min 0: C = floor(0.3125) = 0, every choice is dropped. The aux
  // loss counts choices before capacity (rule 8): both tokens choose expert 3 (logit 1, others
  // 0): f_3 = 1, P_3 = e / (e + 7) = 0.279707 -> aux = 8 * 0.279707 = 2.237655.
  Matrix<float> logits = Matrix<float>::Zero(2, 8);
  logits.col(3).setConstant(1.0f);
  RoutingOptions o;
  o.num_experts = 8;
  o.min_capacity = 0;
  const switchmoe::Routing r = switchmoe::route(logits, o, Mode::kTrain);
  EXPECT_EQ(r.capacity, 0);
  EXPECT_TRUE(SameInts(r.slot, make_int(2, 1, {-1, -1})));
  EXPECT_TRUE(r.gate.isZero(0.0));
  EXPECT_TRUE(SameInts(r.expert, make_int(2, 1, {3, 3})));
  EXPECT_NEAR(r.aux_loss, 2.237655, 1e-5);
}

// ----------------------------------------------------------------------------------------------
// Dropless.

// Slots of every expert in every group are exactly 0 .. load-1, none dropped.
void ExpectDroplessSlots(const switchmoe::Routing& r, int experts) {
  const int g = r.group_size;
  int max_load = 0;
  for (int group = 0; g > 0 && group < r.expert.rows() / g; ++group) {
    std::vector<std::vector<int>> slots(experts);
    for (int t = group * g; t < (group + 1) * g; ++t) {
      for (int c = 0; c < r.expert.cols(); ++c) {
        EXPECT_GE(r.slot(t, c), 0) << "dropless dropped token " << t << " choice " << c;
        slots[r.expert(t, c)].push_back(r.slot(t, c));
      }
    }
    for (int e = 0; e < experts; ++e) {
      std::sort(slots[e].begin(), slots[e].end());
      for (int i = 0; i < static_cast<int>(slots[e].size()); ++i) {
        EXPECT_EQ(slots[e][i], i) << "group " << group << " expert " << e;
      }
      max_load = std::max(max_load, static_cast<int>(slots[e].size()));
    }
  }
  EXPECT_EQ(r.capacity, max_load) << "dropless capacity is the largest per-group load";
}

TEST(Route, DroplessKeepsEveryChoice) {
  // N=5, E=2, all prefer expert 0; factor 0.25 and min 0 would give C = 0, but dropless
  // keeps all: slots 0..4, capacity 5.
  Matrix<float> logits(5, 2);
  for (int t = 0; t < 5; ++t) logits.row(t) << 1.0f, 0.0f;
  RoutingOptions o;
  o.num_experts = 2;
  o.capacity_factor = 0.25;
  o.min_capacity = 0;
  o.dropless = true;
  const switchmoe::Routing r = switchmoe::route(logits, o, Mode::kTrain);
  EXPECT_TRUE(SameInts(r.slot, make_int(5, 1, {0, 1, 2, 3, 4})));
  EXPECT_EQ(r.capacity, 5);
  EXPECT_TRUE(Near(r.gate, MatD::Constant(5, 1, 0.7310586), 1e-6));
}

TEST(Route, DroplessCapacityIsTheLargestPerGroupLoad) {
  // N=6, group_size 3, E=3, k=2. Group 0: all prefer [0, 1] -> loads e0 3, e1 3.
  // Group 1: [2, 0], [2, 1], [0, 1] -> loads e2 2, e0 2, e1 2. Capacity = 3.
  Matrix<float> logits(6, 3);
  logits << 2, 1, 0, 2, 1, 0, 2, 1, 0,  //
      1, 0, 2, 0, 1, 2, 2, 1, 0;
  RoutingOptions o;
  o.num_experts = 3;
  o.top_k = 2;
  o.group_size = 3;
  o.dropless = true;
  const switchmoe::Routing r = switchmoe::route(logits, o, Mode::kEval);
  EXPECT_EQ(r.capacity, 3);
  ExpectDroplessSlots(r, 3);
}

TEST(Route, DroplessRandomSlotsAreUniquePerExpertPerGroup) {
  std::mt19937 rng(99);
  for (int i = 0; i < 100; ++i) {
    Case c = random_case(rng);
    c.options.dropless = true;
    const Matrix<float> logits = tied_logits(c.tokens, c.options.num_experts, rng);
    SCOPED_TRACE(describe(c));
    ExpectDroplessSlots(switchmoe::route(logits, c.options, c.mode), c.options.num_experts);
    if (HasFailure()) break;
  }
}

// ----------------------------------------------------------------------------------------------
// Edge shapes.

TEST(Route, OneToken) {
  std::mt19937 rng(1);
  const Matrix<float> logits = separated_logits(1, 4, rng);
  for (int k = 1; k <= 4; ++k) {
    RoutingOptions o;
    o.num_experts = 4;
    o.top_k = k;
    const switchmoe::Routing r = switchmoe::route(logits, o, Mode::kTrain);
    // C = max(4, min(1, 0)) = 4: nothing dropped.
    EXPECT_EQ(r.capacity, 4);
    EXPECT_TRUE(SameInts(r.slot, MatI::Zero(1, k)));
    ExpectRoutingMatches(r, ref::route(to_double(logits), o, true), logits);
  }
}

TEST(Route, FewerTokensThanExperts) {
  std::mt19937 rng(2);
  const Matrix<float> logits = separated_logits(3, 8, rng);
  RoutingOptions o;
  o.num_experts = 8;
  o.top_k = 2;
  ExpectRoutingMatches(switchmoe::route(logits, o, Mode::kTrain),
                       ref::route(to_double(logits), o, true), logits);
  o.min_capacity = 0;  // C = floor(1.25 * 3 / 8) = 0: all dropped
  const switchmoe::Routing r = switchmoe::route(logits, o, Mode::kTrain);
  EXPECT_EQ(r.capacity, 0);
  EXPECT_TRUE(SameInts(r.slot, MatI::Constant(3, 2, -1)));
  EXPECT_TRUE(r.gate.isZero(0.0));
}

TEST(Route, OneExpert) {
  // E=1: every token chooses expert 0 with probability exactly 1.
  Matrix<float> logits(5, 1);
  logits << -3, 0, 2, 7, 1;
  RoutingOptions o = fixed_capacity(1, 1, 3);
  const switchmoe::Routing r = switchmoe::route(logits, o, Mode::kTrain);
  EXPECT_TRUE(r.probs.isOnes(0.0));
  EXPECT_TRUE(SameInts(r.slot, make_int(5, 1, {0, 1, 2, -1, -1})));
  // aux = 1 * f_0 * P_0 = 1; z = mean(logit^2) = (9 + 0 + 4 + 49 + 1) / 5 = 12.6.
  EXPECT_NEAR(r.aux_loss, 1.0, 1e-6);
  EXPECT_NEAR(r.z_loss, 12.6, 1e-5);
}

TEST(Route, ZeroTokensGiveEmptyResults) {
  for (int group_size : {0, 4}) {
    RoutingOptions o;
    o.num_experts = 5;
    o.top_k = 2;
    o.group_size = group_size;
    const Matrix<float> logits(0, 5);
    const switchmoe::Routing r = switchmoe::route(logits, o, Mode::kTrain);
    EXPECT_EQ(r.logits.rows(), 0);
    EXPECT_EQ(r.logits.cols(), 5);
    EXPECT_EQ(r.probs.rows(), 0);
    EXPECT_EQ(r.probs.cols(), 5);
    EXPECT_EQ(r.expert.rows(), 0);
    EXPECT_EQ(r.expert.cols(), 2);
    EXPECT_EQ(r.slot.rows(), 0);
    EXPECT_EQ(r.slot.cols(), 2);
    EXPECT_EQ(r.gate.rows(), 0);
    EXPECT_EQ(r.gate.cols(), 2);
    EXPECT_TRUE(std::isfinite(r.aux_loss)) << "an empty call must not produce a NaN loss";
    EXPECT_TRUE(std::isfinite(r.z_loss)) << "an empty call must not produce a NaN loss";
  }
}

TEST(Route, ZeroTokensKeepTheRequestedGroupSize) {
  // Routing::group_size is "the effective group size (tokens when options.group_size == 0)"
  // (API.md): an explicit group size stays what was asked for even when there are no tokens
  // (zero groups of 4); only 0 resolves to the token count.
  RoutingOptions o;
  o.num_experts = 5;
  o.group_size = 4;
  EXPECT_EQ(switchmoe::route(Matrix<float>(0, 5), o, Mode::kTrain).group_size, 4);
  o.group_size = 0;
  EXPECT_EQ(switchmoe::route(Matrix<float>(0, 5), o, Mode::kTrain).group_size, 0);
}

// ----------------------------------------------------------------------------------------------
// Bad input.

RoutingOptions valid_options() {
  RoutingOptions o;
  o.num_experts = 4;
  o.top_k = 2;
  return o;
}

TEST(Route, RejectsBadNumExperts) {
  for (int experts : {0, -1}) {
    RoutingOptions o = valid_options();
    o.num_experts = experts;
    o.top_k = 1;
    const Matrix<float> logits = Matrix<float>::Zero(4, std::max(experts, 0));
    EXPECT_TRUE(ThrowsInvalidArgumentNaming([&] { switchmoe::route(logits, o, Mode::kTrain); },
                                            {"num_experts", std::to_string(experts)}));
  }
}

TEST(Route, RejectsTopKOutsideOneToNumExperts) {
  const Matrix<float> logits = Matrix<float>::Zero(4, 4);
  for (int k : {0, -1, 5}) {
    RoutingOptions o = valid_options();
    o.top_k = k;
    EXPECT_TRUE(ThrowsInvalidArgumentNaming([&] { switchmoe::route(logits, o, Mode::kTrain); },
                                            {"top_k", std::to_string(k)}));
  }
}

TEST(Route, RejectsBadCapacityFactorOfTheModeUsed) {
  const Matrix<float> logits = Matrix<float>::Zero(4, 4);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  for (double bad : {0.0, -1.5, nan}) {
    RoutingOptions o = valid_options();
    o.capacity_factor = bad;
    EXPECT_TRUE(ThrowsInvalidArgumentNaming([&] { switchmoe::route(logits, o, Mode::kTrain); },
                                            {"capacity_factor"}));
    o = valid_options();
    o.eval_capacity_factor = bad;
    EXPECT_TRUE(ThrowsInvalidArgumentNaming([&] { switchmoe::route(logits, o, Mode::kEval); },
                                            {"eval_capacity_factor"}));
  }
}

TEST(Route, RejectsNegativeSizes) {
  const Matrix<float> logits = Matrix<float>::Zero(4, 4);
  RoutingOptions o = valid_options();
  o.expert_capacity = -1;
  EXPECT_TRUE(ThrowsInvalidArgumentNaming([&] { switchmoe::route(logits, o, Mode::kTrain); },
                                          {"expert_capacity", "-1"}));
  o = valid_options();
  o.min_capacity = -2;
  EXPECT_TRUE(ThrowsInvalidArgumentNaming([&] { switchmoe::route(logits, o, Mode::kTrain); },
                                          {"min_capacity", "-2"}));
  o = valid_options();
  o.group_size = -4;
  EXPECT_TRUE(ThrowsInvalidArgumentNaming([&] { switchmoe::route(logits, o, Mode::kTrain); },
                                          {"group_size", "-4"}));
}

TEST(Route, RejectsGroupSizeThatDoesNotDivideTheTokens) {
  const Matrix<float> logits = Matrix<float>::Zero(8, 4);
  RoutingOptions o = valid_options();
  o.group_size = 3;
  EXPECT_TRUE(ThrowsInvalidArgumentNaming([&] { switchmoe::route(logits, o, Mode::kTrain); },
                                          {"group_size", "3"}));
  o.group_size = 16;  // larger than the token count
  EXPECT_TRUE(ThrowsInvalidArgumentNaming([&] { switchmoe::route(logits, o, Mode::kTrain); },
                                          {"group_size", "16"}));
}

TEST(Route, RejectsNonFiniteLogits) {
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                    -std::numeric_limits<float>::infinity()}) {
    Matrix<float> logits = Matrix<float>::Zero(4, 4);
    logits(2, 1) = bad;
    EXPECT_TRUE(ThrowsInvalidArgumentNaming(
        [&] { switchmoe::route(logits, valid_options(), Mode::kTrain); }, {"logits"}));
  }
}

TEST(Route, RejectsLogitsWithWrongColumnCount) {
  RoutingOptions o = valid_options();  // 4 experts
  for (int cols : {3, 5}) {
    const Matrix<float> logits = Matrix<float>::Zero(4, cols);
    EXPECT_TRUE(ThrowsInvalidArgumentNaming([&] { switchmoe::route(logits, o, Mode::kTrain); },
                                            {"logits"}));
  }
  // Also with zero tokens: the column count still has to match.
  const Matrix<float> empty(0, 3);
  EXPECT_TRUE(
      ThrowsInvalidArgumentNaming([&] { switchmoe::route(empty, o, Mode::kTrain); }, {"logits"}));
}

// ----------------------------------------------------------------------------------------------
// Rule 10: route_backward.

MatD random_dgate(int tokens, int k, std::mt19937& rng) {
  std::uniform_real_distribution<double> uniform(-1.0, 1.0);
  MatD d(tokens, k);
  for (int t = 0; t < tokens; ++t) {
    for (int c = 0; c < k; ++c) d(t, c) = static_cast<float>(uniform(rng));
  }
  return d;
}

TEST(ReferenceGradients, GateBackwardMatchesFiniteDifferences) {
  // Self-check of the oracle: the analytic gate backward of the reference against central
  // differences of the reference gates (decisions held fixed).
  std::mt19937 rng(17);
  for (bool renormalize : {false, true}) {
    for (int k : {1, 2, 3}) {
      const MatD logits = to_double(separated_logits(6, 4, rng));
      const MatD probs = ref::softmax(logits);
      const MatI expert = ref::top_k(probs, k);
      MatI slot = MatI::Zero(6, k);
      slot(1, 0) = -1;  // some dropped choices
      if (k > 1) slot(2, 1) = -1;
      const MatD dgate = random_dgate(6, k, rng);
      auto loss = [&](const MatD& x) {
        return (ref::gates_given_decisions(x, expert, slot, renormalize).array() * dgate.array())
            .sum();
      };
      const MatD analytic = ref::gate_backward(logits, expert, slot, renormalize, dgate);
      const MatD numeric = ref::finite_difference(loss, logits);
      EXPECT_LT((analytic - numeric).cwiseAbs().maxCoeff(), 1e-8)
          << "renormalize " << renormalize << " k " << k;
    }
  }
}

// The full oracle of route_backward: d/dlogits of sum dgate*gate + aux_coef*aux + z_coef*z.
MatD reference_route_backward(const Matrix<float>& logits, const switchmoe::Routing& r,
                              const MatD& dgate, bool renormalize, double aux_coef, double z_coef) {
  const MatD x = to_double(logits);
  const MatI expert = r.expert;
  const MatI slot = r.slot;
  return ref::gate_backward(x, expert, slot, renormalize, dgate) +
         aux_coef * ref::load_balancing_loss_grad(x, expert, r.group_size) +
         z_coef * ref::router_z_loss_grad(x);
}

TEST(RouteBackward, MatchesReferenceOnRandomCases) {
  std::mt19937 rng(4242);
  for (int i = 0; i < 150; ++i) {
    const Case c = random_case(rng);
    const Matrix<float> logits = separated_logits(c.tokens, c.options.num_experts, rng);
    const MatD dgate = random_dgate(c.tokens, c.options.top_k, rng);
    const Matrix<float> dgate_f = dgate.cast<float>();
    const switchmoe::Routing r = switchmoe::route(logits, c.options, c.mode);
    for (auto [aux_coef, z_coef] : {std::pair{0.0f, 0.0f}, std::pair{1.0f, 0.0f},
                                    std::pair{0.0f, 1.0f}, std::pair{0.01f, 0.001f}}) {
      SCOPED_TRACE(describe(c) + " aux_coef=" + std::to_string(aux_coef) +
                   " z_coef=" + std::to_string(z_coef));
      const Matrix<float> got = switchmoe::route_backward(r, dgate_f, c.options, aux_coef, z_coef);
      const MatD want =
          reference_route_backward(logits, r, dgate, c.options.renormalize, aux_coef, z_coef);
      EXPECT_TRUE(Near(got, want, 1e-5));
    }
    if (HasFailure()) break;
  }
}

TEST(RouteBackward, DroppedChoicesPassNoGradient) {
  // N=3, E=2, k=2, C=1 (tokens 1 and 2 lose everything, token 0 keeps both). A dgate that is
  // nonzero only on dropped choices gives exactly zero gradient (no aux, no z).
  Matrix<float> logits(3, 2);
  logits << 1, 0, 0.5f, 0, 2, 0;
  for (bool renormalize : {false, true}) {
    RoutingOptions o = fixed_capacity(2, 2, 1);
    o.renormalize = renormalize;
    const switchmoe::Routing r = switchmoe::route(logits, o, Mode::kTrain);
    ASSERT_TRUE(SameInts(r.slot, make_int(3, 2, {0, 0, -1, -1, -1, -1})));
    Matrix<float> dgate(3, 2);
    dgate << 0, 0, 1.5f, -2, 3, 0.25f;
    const Matrix<float> d = switchmoe::route_backward(r, dgate, o, 0.0f, 0.0f);
    EXPECT_TRUE(d.isZero(0.0)) << d;
  }
}

TEST(RouteBackward, RawGateGradientHandWorked) {
  // One token, logits [0, 0] -> p = [0.5, 0.5], k=1 chooses expert 0, gate = p_0.
  // d p_0 / d logits = p_0 * ([1, 0] - p) = [0.25, -0.25]; with dgate 2 -> [0.5, -0.5].
  const Matrix<float> logits = Matrix<float>::Zero(1, 2);
  RoutingOptions o;
  o.num_experts = 2;
  const switchmoe::Routing r = switchmoe::route(logits, o, Mode::kTrain);
  const Matrix<float> dgate = Matrix<float>::Constant(1, 1, 2.0f);
  EXPECT_TRUE(Near(switchmoe::route_backward(r, dgate, o, 0.0f, 0.0f),
                   (MatD(1, 2) << 0.5, -0.5).finished(), 1e-7));
  // Renormalized top-1 gate is constantly 1: zero gradient.
  o.renormalize = true;
  const switchmoe::Routing rn = switchmoe::route(logits, o, Mode::kTrain);
  EXPECT_TRUE(Near(switchmoe::route_backward(rn, dgate, o, 0.0f, 0.0f), MatD::Zero(1, 2), 1e-7));
}

TEST(RouteBackward, ZLossGradientHandWorked) {
  // One token, logits [0, 0]: lse = log 2, d z / d logits = 2 * lse * p = [log 2, log 2]
  // = [0.693147, 0.693147]; with z_coef 0.5 -> 0.346574 each.
  const Matrix<float> logits = Matrix<float>::Zero(1, 2);
  RoutingOptions o;
  o.num_experts = 2;
  const switchmoe::Routing r = switchmoe::route(logits, o, Mode::kTrain);
  EXPECT_TRUE(Near(switchmoe::route_backward(r, Matrix<float>::Zero(1, 1), o, 0.0f, 0.5f),
                   (MatD(1, 2) << 0.346574, 0.346574).finished(), 1e-6));
}

TEST(RouteBackward, RejectsDgateOfTheWrongShape) {
  std::mt19937 rng(8);
  const Matrix<float> logits = separated_logits(4, 4, rng);
  RoutingOptions o = valid_options();
  const switchmoe::Routing r = switchmoe::route(logits, o, Mode::kTrain);
  for (auto [rows, cols] : {std::pair{4, 1}, std::pair{3, 2}, std::pair{4, 4}}) {
    const Matrix<float> dgate = Matrix<float>::Zero(rows, cols);
    EXPECT_TRUE(ThrowsInvalidArgumentNaming(
        [&] { switchmoe::route_backward(r, dgate, o, 0.0f, 0.0f); }, {"dgate"}));
  }
}

}  // namespace
