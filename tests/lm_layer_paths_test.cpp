// Tests of the code paths added for the small LM-shaped layer (issue 15, round 3):
// - the router's transposed ("narrow") products for fewer experts than a kernel panel is wide:
//   bitwise the plain GEMM form, and near a double-precision reference;
// - the vectorizable exp of the z-loss's log-sum-exp: within 2 ulp of std::exp, exp(0) == 1,
//   and the log-sum-exp near a long double reference;
// - (round 4) the router's packed weight (the plain-form logits, e.g. decode, after
//   sync_weights()): never stale after a write through weight() or parameters(), in the layer
//   too;
//   the bits against the plain GEMM are NarrowRouterProducts' (its plain-form cases);
// - (round 4) the vectorized float -> bf16 conversion of the gather: bitwise Eigen's, denormals,
//   infinities and NaNs included; and the gather of bf16 rows bitwise Eigen's cast;
// - (round 4) the load-balancing loss's reciprocal for power-of-two groups: bitwise the
//   division per term, for power-of-two and other group sizes;
// - the top-1 choice: the first column of the general top-k, ties to the lower index.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "switchmoe/dispatch/dispatch_plan.hpp"
#include "switchmoe/kernels/convert.hpp"
#include "switchmoe/kernels/gemm.hpp"
#include "switchmoe/layers/switch_layer.hpp"
#include "switchmoe/losses/z_loss.hpp"
#include "switchmoe/routing/route.hpp"
#include "switchmoe/routing/router.hpp"

namespace {

using switchmoe::Fp32;
using switchmoe::Matrix;
using switchmoe::Mode;
using switchmoe::Router;
using switchmoe::RouterConfig;
namespace kernels = switchmoe::kernels;

Matrix<float> random_matrix(int rows, int cols, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Matrix<float> m(rows, cols);
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < cols; ++c) m(r, c) = normal(rng);
  }
  return m;
}

bool same_bits(const Matrix<float>& a, const Matrix<float>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         (a.size() == 0 || std::memcmp(a.data(), b.data(), sizeof(float) * a.size()) == 0);
}

// Router forward and backward (no jitter, so the router multiplies x itself) against the plain
// GEMM form [tokens, d] x [d, experts] and dW += x^T dlogits, bitwise; and against a double
// reference. Token counts on both sides of the narrow-products switch, experts below and above
// a panel's width, one and two threads, and two backwards (dW accumulates).
TEST(NarrowRouterProducts, BitwiseThePlainFormAndNearDouble) {
  std::mt19937 rng(7);
  const int saved = omp_get_max_threads();
  for (int threads : {1, 2}) {
    omp_set_num_threads(threads);
    for (int experts : {16, 5, 40}) {
      for (int tokens : {0, 3, 31, 32, 700, 2048}) {
        const int d = 64;
        RouterConfig c;
        c.d_model = d;
        c.num_experts = experts;
        c.jitter_eps = 0.0f;
        c.seed = 11;
        Router<Fp32> router(c);
        const Matrix<float> x = random_matrix(tokens, d, rng);
        Matrix<float> logits, dx;
        router.forward(x, Mode::kTrain, logits);
        Matrix<float> want(tokens, experts);
        kernels::gemm<float>({tokens, experts, d, x.data(), d, kernels::Transpose::kNo,
                              router.weight().data(), experts, kernels::Transpose::kNo, want.data(),
                              experts, 0.0f});
        EXPECT_TRUE(same_bits(logits, want))
            << "logits, experts " << experts << ", tokens " << tokens << ", threads " << threads;
        Matrix<float> want_dw = random_matrix(d, experts, rng);
        router.grad_weight() = want_dw;
        const Matrix<float> dw0 = want_dw;
        for (int pass = 0; pass < 2; ++pass) {
          const Matrix<float> dlogits = random_matrix(tokens, experts, rng);
          router.backward(dlogits, dx);
          kernels::gemm<float>({d, experts, tokens, x.data(), d, kernels::Transpose::kYes,
                                dlogits.data(), experts, kernels::Transpose::kNo, want_dw.data(),
                                experts, 1.0f});
          EXPECT_TRUE(same_bits(router.grad_weight(), want_dw))
              << "dW, experts " << experts << ", tokens " << tokens << ", pass " << pass;
          // The double reference of this pass's increment.
          const Eigen::MatrixXd inc =
              x.cast<double>().transpose() * dlogits.cast<double>();  // [d, experts]
          if (pass == 0 && tokens > 0) {
            const Eigen::MatrixXd got = router.grad_weight().cast<double>() - dw0.cast<double>();
            EXPECT_LT((got - inc).cwiseAbs().maxCoeff(), 1e-4 * std::sqrt(tokens + 1.0));
          }
        }
        if (tokens > 0) {
          const Eigen::MatrixXd ref = x.cast<double>() * router.weight().cast<double>();
          EXPECT_LT((logits.cast<double>() - ref).cwiseAbs().maxCoeff(), 1e-4);
        }
      }
    }
  }
  omp_set_num_threads(saved);
}

double ulp_distance(double got, double want) {
  const double ulp = std::nextafter(want, std::numeric_limits<double>::infinity()) - want;
  return std::fabs(got - want) / ulp;
}

TEST(ZLossExp, WithinTwoUlpOfStdExp) {
  using switchmoe::detail::exp_nonpositive;
  EXPECT_EQ(exp_nonpositive(0.0), 1.0);
  EXPECT_EQ(exp_nonpositive(-0.0), 1.0);
  // Outside the domain, as documented: x > 0 and +inf are taken as 0 (the clamp's mask).
  EXPECT_EQ(exp_nonpositive(3.0), 1.0);
  EXPECT_EQ(exp_nonpositive(std::numeric_limits<double>::infinity()), 1.0);
  std::mt19937_64 rng(3);
  double worst = 0.0;
  for (int i = 0; i < 200000; ++i) {
    const double range = i % 3 == 0 ? 1.0 : i % 3 == 1 ? 50.0 : 700.0;
    const double x = -std::uniform_real_distribution<double>(0.0, range)(rng);
    worst = std::max(worst, ulp_distance(exp_nonpositive(x), std::exp(x)));
  }
  EXPECT_LE(worst, 2.0);
  // Below the clamp: tiny, positive, finite (and invisible next to the exp(0) of a row's max).
  for (double x : {-708.5, -1000.0, -1e30}) {
    const double v = exp_nonpositive(x);
    EXPECT_TRUE(v >= 0.0 && v < 1e-300) << x << " -> " << v;
  }
}

TEST(ZLossExp, LogSumExpNearLongDouble) {
  std::mt19937 rng(5);
  for (int experts : {1, 2, 16, 63, 64, 65, 200}) {
    for (float scale : {0.01f, 1.0f, 30.0f, 1e4f}) {
      Matrix<float> row = random_matrix(1, experts, rng) * scale;
      long double max = row.maxCoeff(), sum = 0.0L;
      for (int e = 0; e < experts; ++e) sum += std::exp(static_cast<long double>(row(0, e)) - max);
      const long double want = max + std::log(sum);
      const double got = switchmoe::detail::logsumexp(row.row(0));
      EXPECT_NEAR(got, static_cast<double>(want), 1e-14 * std::max(1.0L, std::fabs(want)))
          << experts << " experts, scale " << scale;
    }
  }
}

// aux = sum over groups, tokens and experts, in that order, of f-weight * p / g: the loss must
// give these bits whether it divides (any g) or multiplies by the exact 1 / g (power-of-two g).
// Many small cases, so that a last-bit difference of a term is not lost in a large sum.
TEST(LoadBalancingLoss, BitwiseTheDivisionPerTerm) {
  std::mt19937 rng(9);
  int cases = 0;
  for (int trial = 0; trial < 400; ++trial) {
    for (int g : {1, 2, 3, 4, 6, 7, 8, 12, 16, 64}) {
      const int experts = 2 + trial % 3, tokens = g * (1 + trial % 2);
      Matrix<float> logits = random_matrix(tokens, experts, rng) * 3.0f;
      Matrix<float> probs;
      switchmoe::detail::softmax(logits, probs);
      Matrix<int> expert;
      switchmoe::detail::top_k_experts(logits, 1 + trial % 2, expert);
      double want = 0.0;
      for (int first = 0; first < tokens; first += g) {
        std::vector<double> weight(static_cast<std::size_t>(experts), 0.0);
        for (int t = first; t < first + g; ++t) {
          for (int c = 0; c < expert.cols(); ++c) weight[expert(t, c)] += 1.0;
        }
        const double groups = tokens / g;
        for (double& w : weight) {
          w *= static_cast<double>(experts) / (static_cast<double>(g) * groups);
        }
        for (int t = first; t < first + g; ++t) {
          for (int e = 0; e < experts; ++e) {
            want += weight[e] * static_cast<double>(probs(t, e)) / g;
          }
        }
      }
      std::vector<double> scratch;
      const double got = switchmoe::detail::load_balancing_loss_double(probs, expert, g, scratch);
      ASSERT_EQ(std::memcmp(&got, &want, sizeof(double)), 0)
          << "trial " << trial << ", groups of " << g << ": " << got << " vs " << want;
      ++cases;
    }
  }
  EXPECT_EQ(cases, 4000);
}

// The logits after each way of changing the router weight, against a router built with the
// new weight from the start (bitwise: the same product of the same operands).
TEST(RouterPackedWeight, RefreshedAfterEveryChange) {
  std::mt19937 rng(12);
  for (int tokens : {1, 7, 100}) {  // plain form below 32 tokens (8 experts); 40 experts: always
    for (int experts : {8, 40}) {
      RouterConfig config;
      config.d_model = 24;
      config.num_experts = experts;
      config.jitter_eps = 0.0f;
      config.seed = 3;
      Router<Fp32> router(config);
      const Matrix<float> x = random_matrix(tokens, 24, rng);
      auto expect_logits_of = [&](const Matrix<float>& w, const char* when) {
        Router<Fp32> fresh(config);
        fresh.weight() = w;
        Matrix<float> got, want;
        router.forward(x, Mode::kEval, got);
        fresh.forward(x, Mode::kEval, want);
        EXPECT_TRUE(same_bits(got, want)) << when << ", " << tokens << " tokens, " << experts;
      };
      const Router<Fp32>& view = router;
      expect_logits_of(view.weight(), "first call");
      // Through weight(): the reference stays writable, so every later forward repacks.
      Matrix<float>& w = router.weight();
      w(3, 1) += 1.0f;
      expect_logits_of(view.weight(), "after a write through weight()");
      w(5, 0) -= 2.0f;
      expect_logits_of(view.weight(), "after a second write through the same reference");
      // After sync_weights(): packed once, then reused; a new weight() access repacks.
      router.sync_weights();
      expect_logits_of(view.weight(), "after sync_weights");
      expect_logits_of(view.weight(), "again after sync_weights");
      router.weight()(0, 2) = 0.5f;
      expect_logits_of(view.weight(), "after weight() following sync_weights");
      // Through parameters(), as an optimizer writes.
      router.sync_weights();
      Matrix<float> ignored;
      router.forward(x, Mode::kEval, ignored);
      std::vector<switchmoe::ParameterRef> params;
      router.append_parameters("router.", params);
      params[0].value->array() *= 0.5f;
      expect_logits_of(view.weight(), "after a write through parameters()");
      router.sync_weights();  // the copy packed before the write must not come back
      expect_logits_of(view.weight(), "after sync_weights following the write");
    }
  }
  // The layer: sync_weights() reaches the router; router_weight() exposes it again.
  switchmoe::SwitchConfig lc;
  lc.d_model = 16;
  lc.d_ff = 8;
  lc.routing.num_experts = 40;
  lc.routing.dropless = true;
  lc.seed = 2;
  switchmoe::SwitchLayer<> layer(lc), fresh(lc);
  layer.sync_weights();
  const Matrix<float> x = random_matrix(3, 16, rng);
  EXPECT_TRUE(same_bits(layer.forward(x, Mode::kEval).y, fresh.forward(x, Mode::kEval).y));
  layer.router_weight()(1, 7) = 3.0f;
  fresh.router_weight()(1, 7) = 3.0f;
  const switchmoe::SwitchOutput a = layer.forward(x, Mode::kEval);
  const switchmoe::SwitchOutput b = fresh.forward(x, Mode::kEval);
  EXPECT_TRUE(same_bits(a.routing.logits, b.routing.logits));
  EXPECT_TRUE(same_bits(a.y, b.y));
}

// A router's packed weight is a cache that copies do not share: a copy (or a copy-assigned
// router) gives the original's logits bitwise, and later edits of either, synced, reach only
// that one. sync_weights() with a resized weight throws naming it and changes nothing.
TEST(RouterPackedWeight, CopiesAndMovesKeepTheirOwnWeight) {
  std::mt19937 rng(21);
  RouterConfig config;
  config.d_model = 40;
  config.num_experts = 8;
  config.jitter_eps = 0.0f;
  config.seed = 5;
  const Matrix<float> x = random_matrix(5, 40, rng);  // 5 tokens: the packed product
  const auto logits = [&](Router<Fp32>& r) {
    Matrix<float> l;
    r.forward(x, Mode::kEval, l);
    return l;
  };
  // A reference router whose weight was set before its first forward (no packed copy shared).
  const auto reference = [&](const Matrix<float>& w) {
    Router<Fp32> r(config);
    r.weight() = w;
    return logits(r);
  };
  Router<Fp32> original(config);
  original.sync_weights();
  const Matrix<float> before = logits(original);
  Router<Fp32> copy(original);
  EXPECT_TRUE(same_bits(logits(copy), before)) << "copy";
  original.weight()(1, 2) += 1.0f;
  original.sync_weights();
  const Router<Fp32>& original_view = original;
  EXPECT_TRUE(same_bits(logits(original), reference(original_view.weight()))) << "edited";
  EXPECT_TRUE(same_bits(logits(copy), before)) << "the copy after the original's edit";
  Router<Fp32> assigned(config);
  assigned.weight().setZero();
  assigned.sync_weights();
  (void)logits(assigned);  // packs the zero weight
  assigned = original;
  EXPECT_TRUE(same_bits(logits(assigned), logits(original))) << "copy-assigned";
  Router<Fp32> moved(std::move(assigned));
  EXPECT_TRUE(same_bits(logits(moved), logits(original))) << "moved";
  // A resized weight: sync_weights() names it and leaves the router usable once restored.
  const Matrix<float> kept = original_view.weight();
  original.weight().resize(39, 8);
  try {
    original.sync_weights();
    ADD_FAILURE() << "no exception for a resized weight";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("router weight"), std::string::npos) << e.what();
  }
  original.weight() = kept;
  original.sync_weights();
  EXPECT_TRUE(same_bits(logits(original), reference(kept))) << "after the failed sync";
}

TEST(ExactBf16Conversion, BitwiseEigensRounding) {
  // Every upper half (sign, exponent, 7 mantissa bits: zeros, denormals, infinities, NaNs) with
  // lower halves at and around the rounding boundary, and random ones.
  std::mt19937 rng(4);
  std::vector<float> src;
  for (std::uint32_t high = 0; high < 0x10000u; ++high) {
    for (std::uint32_t low : {0x0000u, 0x0001u, 0x7FFFu, 0x8000u, 0x8001u, 0xFFFFu,
                              static_cast<std::uint32_t>(rng() & 0xFFFFu)}) {
      const std::uint32_t u = high << 16 | low;
      float f = 0.0f;
      std::memcpy(&f, &u, sizeof(f));
      src.push_back(f);
    }
  }
  std::vector<Eigen::bfloat16> got(src.size());
  // Row segments of odd lengths, so the vectorized loop's tails run too.
  for (std::size_t j = 0; j < src.size();) {
    const int n = static_cast<int>(std::min<std::size_t>(src.size() - j, 1 + j % 37));
    switchmoe::kernels::convert_row_exact(src.data() + j, got.data() + j, n);
    j += static_cast<std::size_t>(n);
  }
  for (std::size_t j = 0; j < src.size(); ++j) {
    const Eigen::bfloat16 want(src[j]);
    ASSERT_EQ(Eigen::numext::bit_cast<std::uint16_t>(got[j]),
              Eigen::numext::bit_cast<std::uint16_t>(want))
        << "float bits " << std::hex << Eigen::numext::bit_cast<std::uint32_t>(src[j]);
  }
}

TEST(ExactBf16Conversion, GatherOfBf16RowsIsEigensCast) {
  std::mt19937 rng(6);
  Matrix<float> x = random_matrix(40, 19, rng);
  x(3, 4) = 1e-40f;  // a denormal, which vcvtneps2bf16 would flush
  switchmoe::Routing routing;
  switchmoe::RoutingOptions options;
  options.num_experts = 3;
  options.top_k = 2;
  switchmoe::route(random_matrix(40, 3, rng), options, Mode::kTrain, routing);
  const switchmoe::DispatchPlan plan = switchmoe::make_dispatch_plan(routing, 3);
  Matrix<Eigen::bfloat16> xg(plan.num_rows(), 19);
  switchmoe::gather<Eigen::bfloat16>(x, plan, Eigen::Ref<Matrix<Eigen::bfloat16>>(xg));
  int denormal_rows = 0;
  for (Eigen::Index r = 0; r < xg.rows(); ++r) {
    const int t = plan.token[r];
    denormal_rows += t == 3;
    for (Eigen::Index c = 0; c < 19; ++c) {
      ASSERT_EQ(Eigen::numext::bit_cast<std::uint16_t>(xg(r, c)),
                Eigen::numext::bit_cast<std::uint16_t>(Eigen::bfloat16(x(t, c))))
          << r << ", " << c;
    }
  }
  EXPECT_GT(denormal_rows, 0);
}

// k = 1 on logits with many ties: the first column of the general top-2 (the loop the k = 1
// path replaces), and the lowest index among the row's maxima.
TEST(TopOneChoice, FirstOfTheGeneralTopKAndTiesToTheLowerIndex) {
  std::mt19937 rng(9);
  std::uniform_int_distribution<int> level(0, 3);
  for (int experts : {1, 2, 16, 33}) {
    Matrix<float> logits(300, experts);
    for (int t = 0; t < logits.rows(); ++t) {
      for (int e = 0; e < experts; ++e) logits(t, e) = static_cast<float>(level(rng));
    }
    Matrix<int> top1, top2;
    switchmoe::detail::top_k_experts(logits, 1, top1);
    if (experts >= 2) switchmoe::detail::top_k_experts(logits, 2, top2);
    for (int t = 0; t < logits.rows(); ++t) {
      int want = 0;
      for (int e = 0; e < experts; ++e) {
        if (logits(t, e) > logits(t, want)) want = e;
      }
      EXPECT_EQ(top1(t, 0), want) << "token " << t << ", " << experts << " experts";
      if (experts >= 2) {
        EXPECT_EQ(top1(t, 0), top2(t, 0)) << "token " << t;
      }
    }
  }
}

}  // namespace
