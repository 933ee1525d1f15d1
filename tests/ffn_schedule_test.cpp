// The experts' forward scheduler (issue 15): FeedForwardBank::forward either splits the tiles of
// all FFNs across threads or gives each thread whole FFNs (both products back to back). The
// choice is about speed only: outputs, the kept activations (hence backward) and dropout masks
// must be bitwise the same under both schedules and for 1, 2 and 3 threads. The schedule is
// forced through detail::forced_ffn_schedule(); the split-tiles result on one thread is the
// baseline, itself checked against a double-precision reference. Since round 4 the schedule
// applies to backward too (whole FFNs: an FFN's four backward products back to back), which
// the dx and gradient comparisons below cover.
#include <gtest/gtest.h>
#include <omp.h>

#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "reference/expert_reference.hpp"
#include "support/random_weights.hpp"
#include "switchmoe/switchmoe.hpp"

namespace {

using switchmoe::Bf16;
using switchmoe::FeedForwardBank;
using switchmoe::FeedForwardConfig;
using switchmoe::Fp32;
using switchmoe::Gelu;
using switchmoe::Matrix;
using switchmoe::Mode;
using switchmoe::Relu;
using switchmoe::SwiGlu;
using switchmoe::detail::FfnSchedule;
namespace ref = switchmoe_test::ref;

// Row blocks of mixed sizes: empty experts, single rows (thin path), 16 and 17 rows (both
// sides of the thin-path bound), and blocks of several kernel row tiles.
std::vector<int> mixed_offsets(int experts, std::mt19937& gen) {
  const int sizes[] = {0, 1, 2, 5, 16, 17, 3, 30, 0, 45, 150, 8};
  std::vector<int> offsets{0};
  for (int e = 0; e < experts; ++e) {
    offsets.push_back(offsets.back() + sizes[(e + static_cast<int>(gen() % 3)) % 12]);
  }
  return offsets;
}

bool same_bits(const Matrix<float>& a, const Matrix<float>& b) {
  // An empty matrix may have no storage: memcmp must not see its null pointer.
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         (a.size() == 0 || std::memcmp(a.data(), b.data(), sizeof(float) * a.size()) == 0);
}

// Everything one schedule produces: y, and after a backward dx and every gradient.
struct Outputs {
  Matrix<float> y, dx;
  std::vector<Matrix<float>> grads;
};

template <class Policy, class Act>
struct Case {
  using Bank = FeedForwardBank<Policy, Act>;
  using Element = typename Policy::Element;

  FeedForwardConfig config;
  std::vector<int> offsets;
  Matrix<Element> x;   // [rows, d_model]
  Matrix<Element> xs;  // [tokens, d_model] the shared FFN's rows (when it has one)
  Matrix<float> dy, dys;

  Outputs run(FfnSchedule schedule, int threads, Mode mode) const {
    Bank bank(config);
    std::mt19937 gen(11);
    switchmoe_test::randomize_experts(bank, config.num_ffns, config.bias, gen);
    const int saved = omp_get_max_threads();
    omp_set_num_threads(threads);
    switchmoe::detail::forced_ffn_schedule() = schedule;
    Outputs out;
    out.y.resize(x.rows(), config.d_model);
    Matrix<float> ys(xs.rows(), config.d_model);
    const switchmoe::SharedRows<Element> shared{xs, 5, ys};
    // Two calls: the second runs with warm buffers (and a second dropout draw).
    for (int call = 0; call < 2; ++call) {
      if (config.shared_d_ff > 0) {
        bank.forward(x, offsets, mode, {}, out.y, shared);
      } else {
        bank.forward(x, offsets, mode, {}, out.y);
      }
    }
    if (config.shared_d_ff > 0) out.y.conservativeResize(x.rows() + xs.rows(), config.d_model);
    if (config.shared_d_ff > 0) out.y.bottomRows(xs.rows()) = ys;
    if (mode == Mode::kTrain) {
      out.dx.resize(x.rows(), config.d_model);
      Matrix<float> dxs(xs.rows(), config.d_model);
      if (config.shared_d_ff > 0) {
        const switchmoe::SharedRows<Element> back{xs, 5, dxs};
        bank.backward(x, offsets, dy, out.dx, dys, back);
        out.grads.push_back(dxs);
      } else {
        bank.backward(x, offsets, dy, out.dx);
      }
      std::vector<switchmoe::ParameterRef> params;
      bank.append_parameters("e", false, params);
      bank.append_shared_parameters("s.", params);
      for (const auto& p : params) out.grads.push_back(*p.grad);
    }
    switchmoe::detail::forced_ffn_schedule() = FfnSchedule::kAuto;
    omp_set_num_threads(saved);
    return out;
  }

  void expect_all_schedules_equal(Mode mode) const {
    const Outputs base = run(FfnSchedule::kSplitTiles, 1, mode);
    for (FfnSchedule schedule :
         {FfnSchedule::kSplitTiles, FfnSchedule::kWholeFfns, FfnSchedule::kAuto}) {
      for (int threads = 1; threads <= 3; ++threads) {
        SCOPED_TRACE("schedule " + std::to_string(static_cast<int>(schedule)) + ", " +
                     std::to_string(threads) + " threads");
        const Outputs o = run(schedule, threads, mode);
        EXPECT_TRUE(same_bits(o.y, base.y));
        EXPECT_TRUE(same_bits(o.dx, base.dx));
        ASSERT_EQ(o.grads.size(), base.grads.size());
        for (std::size_t i = 0; i < o.grads.size(); ++i) {
          EXPECT_TRUE(same_bits(o.grads[i], base.grads[i])) << "gradient " << i;
        }
      }
    }
  }
};

template <class Policy, class Act>
Case<Policy, Act> make_case(int experts, int d_model, int d_ff, bool bias, float dropout,
                            int shared_d_ff, unsigned seed) {
  Case<Policy, Act> c;
  c.config.num_ffns = experts;
  c.config.d_model = d_model;
  c.config.d_ff = d_ff;
  c.config.bias = bias;
  c.config.dropout = dropout;
  c.config.shared_d_ff = shared_d_ff;
  c.config.seed = seed;
  std::mt19937 gen(seed);
  c.offsets = mixed_offsets(experts, gen);
  const int rows = c.offsets.back(), tokens = 37;
  Matrix<float> x(rows, d_model), xs(tokens, d_model);
  ref::fill_uniform(x, gen, -1, 1);
  ref::fill_uniform(xs, gen, -1, 1);
  c.x = x.template cast<typename Policy::Element>();
  c.xs = xs.template cast<typename Policy::Element>();
  c.dy.resize(rows, d_model);
  c.dys.resize(tokens, d_model);
  ref::fill_uniform(c.dy, gen, -1, 1);
  ref::fill_uniform(c.dys, gen, -1, 1);
  return c;
}

// The baseline is right: block e of the rows through FFN e, against doubles.
TEST(FfnSchedule, WholeFfnsMatchReference) {
  const auto c = make_case<Fp32, Relu>(24, 40, 72, true, 0.0f, 0, 3);
  for (FfnSchedule schedule : {FfnSchedule::kSplitTiles, FfnSchedule::kWholeFfns}) {
    const Outputs o = c.run(schedule, 2, Mode::kEval);
    FeedForwardBank<Fp32, Relu> bank(c.config);
    std::mt19937 gen(11);
    switchmoe_test::randomize_experts(bank, c.config.num_ffns, true, gen);
    const ref::MatD xd = ref::to_double(Matrix<float>(c.x));
    int checked = 0;
    for (int e = 0; e < c.config.num_ffns; ++e) {
      const ref::Ffn f = ref::expert_of(bank, e, true);
      for (int r = c.offsets[e]; r < c.offsets[e + 1]; ++r, ++checked) {
        const auto row = ref::ffn_row(xd, r, f, ref::Act::kRelu);
        for (int k = 0; k < c.config.d_model; ++k) ASSERT_NEAR(o.y(r, k), row[k], 2e-5);
      }
    }
    EXPECT_GT(checked, 100);
  }
}

TEST(FfnSchedule, Fp32ManySmallExpertsBitwise) {
  make_case<Fp32, Relu>(40, 48, 80, true, 0.0f, 0, 5).expect_all_schedules_equal(Mode::kEval);
  make_case<Fp32, Gelu>(40, 48, 80, false, 0.25f, 0, 6).expect_all_schedules_equal(Mode::kTrain);
}

TEST(FfnSchedule, Bf16ManySmallExpertsBitwise) {
  make_case<Bf16, Relu>(40, 48, 80, true, 0.0f, 0, 7).expect_all_schedules_equal(Mode::kEval);
  make_case<Bf16, Gelu>(33, 64, 96, true, 0.1f, 0, 8).expect_all_schedules_equal(Mode::kTrain);
}

TEST(FfnSchedule, GatedWithSharedExpertBitwise) {
  make_case<Fp32, SwiGlu>(20, 32, 48, true, 0.2f, 40, 9).expect_all_schedules_equal(Mode::kTrain);
  make_case<Bf16, SwiGlu>(20, 32, 48, false, 0.0f, 40, 10).expect_all_schedules_equal(Mode::kTrain);
}

}  // namespace
