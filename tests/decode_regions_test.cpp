// The decode calls' single-thread decisions (issue 15): loops and products too small to pay for
// an OpenMP region run on the calling thread without opening one (core/parallel.hpp's
// parallel_loop for the gather, combine and element-wise loops; one tile of the GEMM for the
// router at a few tokens). The decision comes from the shapes only and must never change a
// result: the pieces of a few-token call are compared bitwise with the same tokens inside a
// large call, which takes the multi-thread path, on 1, 2 and 3 threads, and with a
// double-precision evaluation. Each test also checks which path each side took, so that both
// paths are really compared.

#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "support/matrices.hpp"
#include "switchmoe/switchmoe.hpp"

namespace {

using switchmoe::Matrix;
using switchmoe::Mode;
using switchmoe_test::random_matrix;
using switchmoe_test::SameBits;

// Restores the OpenMP thread count at the end of a test.
class ThreadCount {
 public:
  ThreadCount() : saved_(omp_get_max_threads()) {}
  ~ThreadCount() { omp_set_num_threads(saved_); }
  ThreadCount(const ThreadCount&) = delete;
  ThreadCount& operator=(const ThreadCount&) = delete;

 private:
  int saved_;
};

// parallel_for below the threshold is a plain loop on the calling thread (no region, not even a
// one-thread one), above it a region of every thread; both compute every index exactly once.
TEST(DecodeRegions, ParallelForOpensARegionOnlyAboveTheThreshold) {
  ThreadCount restore;
  const Eigen::Index threshold = switchmoe::detail::kMinParallelWork;
  struct Case {
    Eigen::Index n, work;
  };
  for (int threads : {1, 2, 3}) {
    omp_set_num_threads(threads);
    for (const Case c : {Case{1, 4 * threshold}, Case{4, threshold / 4 - 1}, Case{4, threshold / 4},
                         Case{64, 768}, Case{3, 768}}) {
      const bool parallel = switchmoe::detail::parallel_loop(c.n, c.work);
      EXPECT_EQ(parallel, c.n > 1 && c.n * c.work >= threshold) << c.n << " x " << c.work;
      std::vector<int> calls(static_cast<std::size_t>(c.n), 0), in_region(calls.size(), -1);
      switchmoe::detail::parallel_for(c.n, c.work, [&](Eigen::Index i) {
        calls[i] += 1;
        in_region[i] = omp_get_level();  // 0 outside any region, even a one-thread one
      });
      for (Eigen::Index i = 0; i < c.n; ++i) {
        EXPECT_EQ(calls[i], 1) << "index " << i << " of " << c.n << " x " << c.work;
        EXPECT_EQ(in_region[i], parallel ? 1 : 0)
            << "index " << i << " of " << c.n << " x " << c.work << ", " << threads << " threads";
      }
    }
  }
}

// Both paths rethrow the exception of the lowest index that threw.
TEST(DecodeRegions, ParallelForRethrowsTheLowestIndexOnBothPaths) {
  ThreadCount restore;
  omp_set_num_threads(2);
  for (const Eigen::Index work : {Eigen::Index{8}, switchmoe::detail::kMinParallelWork}) {
    try {
      switchmoe::detail::parallel_for(6, work, [](Eigen::Index i) {
        if (i >= 3) throw std::runtime_error("index " + std::to_string(i));
      });
      ADD_FAILURE() << "no exception, work " << work;
    } catch (const std::runtime_error& e) {
      EXPECT_STREQ(e.what(), "index 3") << "work " << work;
    }
  }
}

// A packed product of one tile (20 rows, one 32-column panel) or of one thin unit (1 row on one
// thread) runs its epilogue outside any region once the team has grown its buffers: the first
// call at a thread count may open one (it grows the workers' buffers), every later one opens
// none. The results are the same bits either way, and match a double-precision product.
TEST(DecodeRegions, OneTileOrThinUnitOpensNoRegionAfterTheFirstCall) {
  namespace k = switchmoe::kernels;
  ThreadCount restore;
  const Matrix<float> a = random_matrix(20, 64, 5);  // [rows, k]
  const Matrix<float> w = random_matrix(64, 32, 6);  // [k, n]
  const k::PackedB<float> b(w.data(), 32, k::Transpose::kNo, 64, 32);
  for (const int rows : {20, 1}) {
    for (const int threads : {1, 2, 3, 2}) {
      if (rows == 1 && threads != 1) continue;  // the thin path splits columns over threads
      omp_set_num_threads(threads);
      Matrix<float> first, c(rows, 32);  // [rows, n]
      for (int call = 0; call < 3; ++call) {
        std::vector<k::PackedGemmProblem<float>> p{
            {rows, a.data(), 64, k::Transpose::kNo, &b, c.data(), 32, 0.0f}};
        int level = -1, epilogues = 0;
        k::gemm_batch(p, [&](int, int, int, int, int) {
          level = omp_get_level();
          ++epilogues;
        });
        EXPECT_EQ(epilogues, 1) << rows << " rows, " << threads << " threads, call " << call;
        if (call > 0) {
          EXPECT_EQ(level, 0) << rows << " rows, " << threads << " threads, call " << call;
          EXPECT_TRUE(SameBits(c, first)) << rows << " rows, call " << call;
        } else {
          first = c;
        }
      }
      const Eigen::MatrixXd reference =
          a.topRows(rows).cast<double>() * w.cast<double>();  // [rows, n]
      EXPECT_LT((first.cast<double>() - reference).cwiseAbs().maxCoeff(), 1e-4) << rows << " rows";
    }
  }
}

// A layer's parts at few tokens against the same tokens in a large call: router logits (one
// GEMM tile on the calling thread vs many tiles in a region), gather (rows converted to the
// policy's element) and combine (top-2 weighted sums), each bitwise, on 1, 2 and 3 threads.
template <class Policy>
void check_parts_against_large_call() {
  using Element = typename Policy::Element;
  ThreadCount restore;
  switchmoe::SwitchConfig config;
  config.d_model = 768;  // a decode row: 768 elements, well below the loop threshold per token
  config.d_ff = 64;
  config.routing.num_experts = 8;
  config.routing.top_k = 2;
  config.routing.dropless = true;
  config.seed = 11;
  switchmoe::SwitchLayer<Policy> layer(config);
  const int pool = 1024, d_model = config.d_model, experts = config.routing.num_experts;
  const Matrix<float> x = random_matrix(pool, d_model, 3);       // [pool, d_model]
  const Matrix<float> yg = random_matrix(2 * pool, d_model, 4);  // [rows, d_model] fake outputs
  auto& router = layer.router();
  auto& scheme = layer.scheme();
  // The large call, on 2 threads: router, routing, plan, gather, combine.
  omp_set_num_threads(2);
  Matrix<float> logits_all;  // [pool, experts]
  router.forward(x, Mode::kEval, logits_all);
  switchmoe::Routing routing_all;
  scheme.route(logits_all, Mode::kEval, 0, routing_all);
  switchmoe::DispatchPlan plan_all;
  scheme.plan(routing_all, plan_all);
  ASSERT_EQ(plan_all.num_rows(), 2 * pool);
  ASSERT_TRUE(switchmoe::detail::parallel_loop(plan_all.num_rows(), d_model));
  Matrix<Element> xg_all(plan_all.num_rows(), d_model);  // [rows, d_model]
  switchmoe::detail::gather_rows<Element>(x, plan_all, xg_all);
  Matrix<float> y_all(pool, d_model);  // [pool, d_model]
  const auto gate_all = [&](int r) { return plan_all.gate[r]; };
  switchmoe::detail::combine_rows(yg.topRows(plan_all.num_rows()), plan_all, gate_all,
                                  Eigen::Ref<Matrix<float>>(y_all));
  // The router's product: one tile for a few tokens, several for the pool.
  using Kernel = switchmoe::kernels::detail::MicroKernel<switchmoe::kernels::isa::Native, float>;
  const auto tiles_of = [&](int tokens, int threads) {
    const switchmoe::kernels::GemmProblem<float> p{
        tokens,   experts, d_model,
        x.data(), d_model, switchmoe::kernels::Transpose::kNo,
        x.data(), experts, switchmoe::kernels::Transpose::kNo,
        nullptr,  experts, 0.0f};
    std::vector<switchmoe::kernels::detail::Tile> tiles;
    switchmoe::kernels::detail::make_tiles<Kernel>(&p, 1, threads, false, tiles);
    return tiles.size();
  };
  ASSERT_GT(tiles_of(pool, 2), 1u);
  // The large call against double precision (logits, gathered rows, combined rows).
  for (int t : {0, 517, pool - 1}) {
    const Eigen::RowVectorXd want =
        x.row(t).cast<double>() * layer.router_weight().template cast<double>();
    EXPECT_LT((logits_all.row(t).cast<double>() - want).cwiseAbs().maxCoeff(), 1e-4) << t;
    double scale = 0.0;
    Eigen::RowVectorXd y_want = Eigen::RowVectorXd::Zero(d_model);
    for (int c = 0; c < 2; ++c) {
      const int r = plan_all.row[t * 2 + c];
      ASSERT_GE(r, 0);
      EXPECT_EQ(plan_all.token[r], t);
      const Eigen::RowVectorXd xr = x.row(t).cast<Element>().template cast<double>();
      EXPECT_EQ((xg_all.row(r).template cast<double>() - xr).cwiseAbs().maxCoeff(), 0.0) << t;
      y_want += static_cast<double>(plan_all.gate[r]) * yg.row(r).cast<double>();
      scale += std::abs(plan_all.gate[r]) * yg.row(r).cwiseAbs().maxCoeff();
    }
    EXPECT_LT((y_all.row(t).cast<double>() - y_want).cwiseAbs().maxCoeff(), 1e-6 * scale) << t;
  }
  for (int threads : {1, 2, 3}) {
    omp_set_num_threads(threads);
    for (int size : {1, 2, 8, 21}) {
      for (int first : {0, 300, pool - size}) {
        const auto xs = x.middleRows(first, size);  // [size, d_model]
        Matrix<float> logits;                       // [size, experts]
        router.forward(xs, Mode::kEval, logits);
        if (size <= 8) {
          EXPECT_EQ(tiles_of(size, threads), 1u) << size;
        }
        EXPECT_TRUE(SameBits(logits, logits_all.middleRows(first, size)))
            << "router, " << size << " tokens from " << first << ", " << threads << " threads";
        switchmoe::Routing routing;
        scheme.route(logits, Mode::kEval, 0, routing);
        switchmoe::DispatchPlan plan;
        scheme.plan(routing, plan);
        ASSERT_EQ(plan.num_rows(), 2 * size);
        EXPECT_FALSE(switchmoe::detail::parallel_loop(plan.num_rows(), d_model)) << size;
        Matrix<Element> xg(plan.num_rows(), d_model);  // [rows, d_model]
        switchmoe::detail::gather_rows<Element>(xs, plan, xg);
        // The rows of the few-token call, in the large call's row order, from the same yg rows.
        Matrix<float> yg_few(plan.num_rows(), d_model);  // [rows, d_model]
        for (int t = 0; t < size; ++t) {
          for (int c = 0; c < 2; ++c) {
            const int r = plan.row[t * 2 + c], r_all = plan_all.row[(first + t) * 2 + c];
            ASSERT_GE(r, 0);
            EXPECT_TRUE(SameBits(xg.row(r), xg_all.row(r_all)))
                << "gather, token " << first + t << ", " << threads << " threads";
            EXPECT_EQ(plan.gate[r], plan_all.gate[r_all]);
            yg_few.row(r) = yg.row(r_all);
          }
        }
        Matrix<float> y(size, d_model);  // [size, d_model]
        switchmoe::detail::combine_rows(
            yg_few, plan, [&](int r) { return plan.gate[r]; }, Eigen::Ref<Matrix<float>>(y));
        EXPECT_TRUE(SameBits(y, y_all.middleRows(first, size)))
            << "combine, " << size << " tokens from " << first << ", " << threads << " threads";
      }
    }
  }
}

TEST(DecodeRegions, Fp32PartsMatchTheLargeCall) {
  check_parts_against_large_call<switchmoe::Fp32>();
}
TEST(DecodeRegions, Bf16PartsMatchTheLargeCall) {
  check_parts_against_large_call<switchmoe::Bf16>();
}

// The whole layer at 1 and 8 tokens (no region for the router, gather and combine; both expert
// products in one region of two stages, the thin path) against the same tokens in a 1024-token
// call (every piece in its own region, the tile path), fp32 and bf16, on 1, 2 and 3 threads;
// with biases and a shared expert, the second stage has an epilogue and two FFNs' products.
template <class Policy>
void check_layer_against_large_call(bool bias_and_shared) {
  ThreadCount restore;
  switchmoe::SwitchConfig config;
  config.d_model = 768;
  config.d_ff = 96;
  config.routing.num_experts = 4;
  config.routing.dropless = true;
  config.seed = 12;
  config.expert_bias = bias_and_shared;
  config.shared_d_ff = bias_and_shared ? 64 : 0;
  switchmoe::SwitchLayer<Policy> layer(config);
  if (bias_and_shared) {  // nonzero biases, so that a skipped or repeated epilogue shows
    for (int e = 0; e < config.routing.num_experts; ++e) {
      layer.b_in(e) = random_matrix(1, config.d_ff, 20 + e, 0.1f);
      layer.b_out(e) = random_matrix(1, config.d_model, 30 + e, 0.1f);
    }
    layer.shared_b_in() = random_matrix(1, config.shared_d_ff, 40, 0.1f);
    layer.shared_b_out() = random_matrix(1, config.d_model, 41, 0.1f);
  }
  const int pool = 1024;
  const Matrix<float> x = random_matrix(pool, config.d_model, 5);  // [pool, d_model]
  omp_set_num_threads(2);
  switchmoe::SwitchOutput full;
  layer.forward(x, Mode::kEval, full);
  // The large call against double precision: gate * FFN_e(x) (+ the shared FFN, weight 1), with
  // the biases; a tolerance for bf16 rounding of x and the hidden layer in the Bf16 policy.
  const bool bf16 = std::is_same_v<Policy, switchmoe::Bf16>;
  const auto ffn = [&](const Eigen::RowVectorXd& xt, const Matrix<float>& w_in,
                       const Matrix<float>& b_in, const Matrix<float>& w_out,
                       const Matrix<float>& b_out) {
    Eigen::RowVectorXd h = xt * w_in.cast<double>();
    if (b_in.size() > 0) h += b_in.cast<double>();
    h = h.cwiseMax(0.0);
    Eigen::RowVectorXd y = h * w_out.cast<double>();
    if (b_out.size() > 0) y += b_out.cast<double>();
    return y;
  };
  for (int t : {0, 1, 700, 707}) {
    const Eigen::RowVectorXd xt = x.row(t).cast<double>();
    const int e = full.routing.expert(t, 0);
    Eigen::RowVectorXd want = full.routing.gate(t, 0) *
                              ffn(xt, layer.w_in(e), layer.b_in(e), layer.w_out(e), layer.b_out(e));
    if (bias_and_shared) {
      want += ffn(xt, layer.shared_w_in(), layer.shared_b_in(), layer.shared_w_out(),
                  layer.shared_b_out());
    }
    const double scale = want.cwiseAbs().maxCoeff() + 1e-3;
    EXPECT_LT((full.y.row(t).cast<double>() - want).cwiseAbs().maxCoeff() / scale,
              bf16 ? 3e-2 : 1e-4)
        << "token " << t;
  }
  layer.sync_weights();  // the accessors above exposed the weights; repacking gives the same
  for (int threads : {1, 2, 3}) {
    omp_set_num_threads(threads);
    for (int size : {1, 8}) {
      for (int first : {0, 700}) {
        switchmoe::SwitchOutput part;
        layer.forward(x.middleRows(first, size), Mode::kEval, part);
        EXPECT_TRUE(SameBits(part.routing.logits, full.routing.logits.middleRows(first, size)));
        EXPECT_TRUE(SameBits(part.y, full.y.middleRows(first, size)))
            << size << " tokens from " << first << ", " << threads << " threads";
      }
    }
  }
}

TEST(DecodeRegions, Fp32LayerMatchesTheLargeCall) {
  check_layer_against_large_call<switchmoe::Fp32>(false);
}
TEST(DecodeRegions, Bf16LayerMatchesTheLargeCall) {
  check_layer_against_large_call<switchmoe::Bf16>(false);
}
TEST(DecodeRegions, Fp32LayerWithBiasesAndSharedExpertMatchesTheLargeCall) {
  check_layer_against_large_call<switchmoe::Fp32>(true);
}
TEST(DecodeRegions, Bf16LayerWithBiasesAndSharedExpertMatchesTheLargeCall) {
  check_layer_against_large_call<switchmoe::Bf16>(true);
}

}  // namespace
