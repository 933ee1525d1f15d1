// Issue #4: steady-state calls of the routing path allocate nothing. Every component is called
// once to size its output (warm-up), then again with different values of the same sizes while
// heap allocations are counted (tests/support/allocation_counter.hpp: operator new and Eigen).
// The reused output must also equal, bitwise, what the value-returning function gives on fresh
// objects, so stale state left from the previous call would fail the test.
#include <gtest/gtest.h>
#include <omp.h>

#include <cstring>
#include <string>
#include <vector>

#include "support/allocation_counter.hpp"  // first: it configures Eigen
#include "support/matrices.hpp"
#include "switchmoe/dispatch/dispatch_plan.hpp"
#include "switchmoe/kernels/gemm.hpp"
#include "switchmoe/layers/stats.hpp"
#include "switchmoe/routing/route.hpp"
#include "switchmoe/routing/router.hpp"

namespace {

using switchmoe::DispatchPlan;
using switchmoe::Matrix;
using switchmoe::Mode;
using switchmoe::Priority;
using switchmoe::Router;
using switchmoe::RouterConfig;
using switchmoe::Routing;
using switchmoe::RoutingOptions;
using switchmoe::RoutingStats;
using switchmoe_test::AllocationCount;
using switchmoe_test::count_allocations;
using switchmoe_test::random_matrix;
using switchmoe_test::SameBits;

std::string describe(const AllocationCount& count) {
  return std::to_string(count.operator_new) + " operator new, " + std::to_string(count.eigen) +
         " Eigen";
}

bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof(a)) == 0; }

void expect_same_routing(const Routing& got, const Routing& want) {
  EXPECT_TRUE(SameBits(got.logits, want.logits));
  EXPECT_TRUE(SameBits(got.probs, want.probs));
  EXPECT_TRUE(SameBits(got.expert, want.expert));
  EXPECT_TRUE(SameBits(got.slot, want.slot));
  EXPECT_TRUE(SameBits(got.gate, want.gate));
  EXPECT_TRUE(same_bits(got.aux_loss, want.aux_loss)) << got.aux_loss << " vs " << want.aux_loss;
  EXPECT_TRUE(same_bits(got.z_loss, want.z_loss)) << got.z_loss << " vs " << want.z_loss;
  EXPECT_EQ(got.capacity, want.capacity);
  EXPECT_EQ(got.group_size, want.group_size);
}

void expect_same_plan(const DispatchPlan& got, const DispatchPlan& want) {
  EXPECT_EQ(got.num_experts, want.num_experts);
  EXPECT_EQ(got.top_k, want.top_k);
  EXPECT_EQ(got.offsets, want.offsets);
  EXPECT_EQ(got.token, want.token);
  EXPECT_EQ(got.choice, want.choice);
  EXPECT_EQ(got.row, want.row);
}

void expect_same_stats(const RoutingStats& got, const RoutingStats& want) {
  EXPECT_EQ(got.tokens_per_expert, want.tokens_per_expert);
  EXPECT_EQ(got.kept_tokens_per_expert, want.kept_tokens_per_expert);
  EXPECT_EQ(got.dropped_fraction, want.dropped_fraction);
  EXPECT_EQ(got.dropped_token_fraction, want.dropped_token_fraction);
  EXPECT_EQ(got.router_confidence, want.router_confidence);
  EXPECT_EQ(got.expert_usage, want.expert_usage);
  EXPECT_TRUE(same_bits(got.aux_loss, want.aux_loss));
  EXPECT_TRUE(same_bits(got.z_loss, want.z_loss));
}

// ---- The counter itself -----------------------------------------------------------------------

TEST(AllocationCounter, CountsOperatorNew) {
  std::vector<int> v;  // outlives the call, so the allocation cannot be optimized away
  const AllocationCount count = count_allocations([&] { v.push_back(1); });
  EXPECT_GE(count.operator_new, 1) << describe(count);
  EXPECT_EQ(v.size(), 1u);
}

TEST(AllocationCounter, CountsEigenAllocations) {
  Matrix<float> m;
  const AllocationCount count = count_allocations([&] { m = Matrix<float>::Ones(100, 100); });
  EXPECT_GE(count.eigen, 1) << describe(count);
  EXPECT_EQ(m.sum(), 10000.0f);
  // Eigen may still allocate after counting stops.
  Matrix<float> after(100, 100);
  after.setZero();
  EXPECT_EQ(after.sum(), 0.0f);
}

TEST(AllocationCounter, CountsOnOpenMpWorkerThreads) {
  const int threads = omp_get_max_threads();
  std::vector<std::vector<int>> per_thread(static_cast<std::size_t>(threads));
  std::vector<Matrix<float>> matrices(static_cast<std::size_t>(threads));
  const AllocationCount count = count_allocations([&] {
#pragma omp parallel num_threads(threads)
    {
      const int id = omp_get_thread_num();
      per_thread[id].push_back(id);
      matrices[id].resize(64, 64);
    }
  });
  EXPECT_GE(count.operator_new, threads) << describe(count);
  EXPECT_GE(count.eigen, threads) << describe(count);
}

TEST(AllocationCounter, CountsNothingWithoutAllocations) {
  Matrix<float> a = Matrix<float>::Ones(16, 16), b(16, 16);
  std::vector<int> v;
  v.reserve(8);
  const AllocationCount count = count_allocations([&] {
    b = 2.0f * a;
    v.push_back(3);
  });
  EXPECT_EQ(count.total(), 0) << describe(count);
  EXPECT_EQ(b.sum(), 512.0f);
}

// ---- GEMM workspace ---------------------------------------------------------------------------

// Issue #14, item 10: the GEMM's per-thread packing buffers were reserved by a thread when it got
// its first tile, so with dynamic scheduling a worker that got no tile in the warm-up (a
// one-tile product, as the router's) allocated in a later call. Every thread of the team now
// reserves them at the start of the region. Warm-up: a one-tile product on 2 threads (the worker
// may get no tile), then the big product on 1 thread (it sizes the caller's tile list); the big
// product on 2 threads must then allocate nothing (the buffers' sizes do not depend on the
// problem). Each ctest entry is its own process, so no earlier test has warmed the worker up.
TEST(Allocation, GemmWorkersReserveEvenWithoutATile) {
  using switchmoe::kernels::Transpose;
  const int saved = omp_get_max_threads();
  const Matrix<float> a_small = random_matrix(4, 8, 60), b_small = random_matrix(8, 4, 61);
  Matrix<float> c_small(4, 4);  // [4, 4]: one tile
  // [512, 64] x [64, 512]: dozens of tiles, so both threads take some.
  const Matrix<float> a = random_matrix(512, 64, 62), b = random_matrix(64, 512, 63);
  Matrix<float> c(512, 512);
  auto big = [&] {
    switchmoe::kernels::gemm<float>(
        {512, 512, 64, a.data(), 64, Transpose::kNo, b.data(), 512, Transpose::kNo, c.data(), 512});
  };
  omp_set_num_threads(2);
  switchmoe::kernels::gemm<float>({4, 4, 8, a_small.data(), 8, Transpose::kNo, b_small.data(), 4,
                                   Transpose::kNo, c_small.data(), 4});
  omp_set_num_threads(1);
  big();
  c.setZero();
  omp_set_num_threads(2);
  const AllocationCount count = count_allocations(big);
  omp_set_num_threads(saved);
  EXPECT_EQ(count.total(), 0) << describe(count);
  // The products themselves, against a double-precision reference.
  const Eigen::MatrixXd want = a.cast<double>() * b.cast<double>();
  EXPECT_LT((c.cast<double>() - want).cwiseAbs().maxCoeff(), 1e-3);
  const Eigen::MatrixXd want_small = a_small.cast<double>() * b_small.cast<double>();
  EXPECT_LT((c_small.cast<double>() - want_small).cwiseAbs().maxCoeff(), 1e-4);
}

// ---- route and route_backward -----------------------------------------------------------------

struct RouteCase {
  const char* name;
  int experts;
  int top_k;
  int group_size;
  Priority priority;
  Mode mode;
  bool dropless;
  bool renormalize;
};

const RouteCase kRouteCases[] = {
    {"top1", 8, 1, 0, Priority::kTokenOrder, Mode::kTrain, false, false},
    {"top1 groups probability-priority eval", 8, 1, 16, Priority::kRouterProbability, Mode::kEval,
     false, false},
    {"top2 groups", 8, 2, 16, Priority::kTokenOrder, Mode::kTrain, false, false},
    {"top2 probability-priority renormalized", 8, 2, 0, Priority::kRouterProbability, Mode::kTrain,
     false, true},
    {"top2 groups dropless", 8, 2, 16, Priority::kTokenOrder, Mode::kTrain, true, false},
    {"top1 dropless eval", 8, 1, 0, Priority::kRouterProbability, Mode::kEval, true, false},
    {"top2 300 experts groups", 300, 2, 32, Priority::kRouterProbability, Mode::kTrain, false,
     true},
};

constexpr int kTokens = 64;

RoutingOptions options_of(const RouteCase& c) {
  RoutingOptions o;
  o.num_experts = c.experts;
  o.top_k = c.top_k;
  o.group_size = c.group_size;
  o.priority = c.priority;
  o.dropless = c.dropless;
  o.renormalize = c.renormalize;
  return o;
}

TEST(Allocation, RouteReusesItsOutput) {
  for (const RouteCase& c : kRouteCases) {
    SCOPED_TRACE(c.name);
    const RoutingOptions o = options_of(c);
    const Matrix<float> warm = random_matrix(kTokens, c.experts, 1, 2.0f);
    const Matrix<float> logits = random_matrix(kTokens, c.experts, 2, 2.0f);
    Routing routing;
    switchmoe::route(warm, o, c.mode, routing);
    const Routing before = routing;
    const AllocationCount count =
        count_allocations([&] { switchmoe::route(logits, o, c.mode, routing); });
    EXPECT_EQ(count.total(), 0) << describe(count);
    EXPECT_FALSE(SameBits(routing.expert, before.expert));  // the routing did change
    expect_same_routing(routing, switchmoe::route(logits, o, c.mode));
  }
}

TEST(Allocation, RouteBackwardReusesItsOutput) {
  for (const RouteCase& c : kRouteCases) {
    SCOPED_TRACE(c.name);
    const RoutingOptions o = options_of(c);
    const Routing warm = switchmoe::route(random_matrix(kTokens, c.experts, 3), o, c.mode);
    const Routing routing = switchmoe::route(random_matrix(kTokens, c.experts, 4), o, c.mode);
    const Matrix<float> dgate_warm = random_matrix(kTokens, c.top_k, 5);
    const Matrix<float> dgate = random_matrix(kTokens, c.top_k, 6);
    for (const float z_coef : {0.0f, 0.25f}) {
      Matrix<float> dlogits;
      switchmoe::route_backward(warm, dgate_warm, o, 0.01f, z_coef, dlogits);
      const AllocationCount count = count_allocations(
          [&] { switchmoe::route_backward(routing, dgate, o, 0.01f, z_coef, dlogits); });
      EXPECT_EQ(count.total(), 0) << describe(count);
      EXPECT_TRUE(SameBits(dlogits, switchmoe::route_backward(routing, dgate, o, 0.01f, z_coef)));
    }
  }
}

// Sizes that shrink, then grow again (and zero tokens) still give the fresh results.
TEST(Allocation, RouteAfterShrinkingAndGrowing) {
  const RouteCase& c = kRouteCases[2];  // top-2, groups of 16
  const RoutingOptions o = options_of(c);
  Routing routing;
  Matrix<float> dlogits;
  DispatchPlan plan;
  RoutingStats stats;
  unsigned seed = 10;
  for (const int tokens : {64, 16, 0, 96, 64}) {
    SCOPED_TRACE("tokens " + std::to_string(tokens));
    const Matrix<float> logits = random_matrix(tokens, c.experts, seed++, 2.0f);
    const Matrix<float> dgate = random_matrix(tokens, c.top_k, seed++);
    switchmoe::route(logits, o, c.mode, routing);
    const Routing want = switchmoe::route(logits, o, c.mode);
    expect_same_routing(routing, want);
    switchmoe::route_backward(routing, dgate, o, 0.01f, 0.1f, dlogits);
    EXPECT_TRUE(SameBits(dlogits, switchmoe::route_backward(want, dgate, o, 0.01f, 0.1f)));
    switchmoe::make_dispatch_plan(routing, c.experts, plan);
    expect_same_plan(plan, switchmoe::make_dispatch_plan(want, c.experts));
    switchmoe::routing_stats(routing, c.experts, stats);
    expect_same_stats(stats, switchmoe::routing_stats(want, c.experts));
  }
}

// ---- Router -----------------------------------------------------------------------------------

RouterConfig router_config() {
  RouterConfig config;
  config.d_model = 48;
  config.num_experts = 8;
  config.bias = true;
  config.jitter_eps = 0.01f;
  config.seed = 11;
  return config;
}

TEST(Allocation, RouterForwardBackwardReuseTheirOutputs) {
  Router<> router(router_config()), fresh(router_config());
  router.bias().setConstant(0.125f);
  fresh.bias().setConstant(0.125f);
  Matrix<float> logits, dx;
  // Warm-up, mirrored on `fresh` through the value-returning functions (the jitter stream
  // advances per call, so both routers must see the same calls).
  const Matrix<float> x0 = random_matrix(kTokens, 48, 20), dl0 = random_matrix(kTokens, 8, 21);
  router.forward(x0, Mode::kTrain, logits);
  router.backward(dl0, dx);
  fresh.forward(x0, Mode::kTrain);
  fresh.backward(dl0);
  for (const Mode mode : {Mode::kTrain, Mode::kEval}) {
    SCOPED_TRACE(switchmoe::to_string(mode));
    const Matrix<float> x = random_matrix(kTokens, 48, mode == Mode::kTrain ? 22 : 23);
    AllocationCount count = count_allocations([&] { router.forward(x, mode, logits); });
    EXPECT_EQ(count.total(), 0) << "forward: " << describe(count);
    EXPECT_TRUE(SameBits(logits, fresh.forward(x, mode)));
  }
  // Backward of the last training forward: forward again in training mode first.
  const Matrix<float> x = random_matrix(kTokens, 48, 24), dl = random_matrix(kTokens, 8, 25);
  router.forward(x, Mode::kTrain, logits);
  EXPECT_TRUE(SameBits(logits, fresh.forward(x, Mode::kTrain)));
  const AllocationCount count = count_allocations([&] { router.backward(dl, dx); });
  EXPECT_EQ(count.total(), 0) << "backward: " << describe(count);
  EXPECT_TRUE(SameBits(dx, fresh.backward(dl)));
  EXPECT_TRUE(SameBits(router.grad_weight(), fresh.grad_weight()));
  EXPECT_TRUE(SameBits(router.grad_bias(), fresh.grad_bias()));
}

// dlogits with a row stride other than the expert count (a block of a wider matrix) is copied
// into a buffer that the next call reuses.
TEST(Allocation, RouterBackwardOfStridedGradient) {
  Router<> router(router_config()), fresh(router_config());
  const Matrix<float> x = random_matrix(kTokens, 48, 30);
  const Matrix<float> wide0 = random_matrix(kTokens, 20, 31), wide = random_matrix(kTokens, 20, 32);
  Matrix<float> dx;
  router.forward(x, Mode::kTrain);
  fresh.forward(x, Mode::kTrain);
  router.backward(wide0.leftCols(8), dx);
  fresh.backward(Matrix<float>(wide0.leftCols(8)));
  const AllocationCount count = count_allocations([&] { router.backward(wide.leftCols(8), dx); });
  EXPECT_EQ(count.total(), 0) << describe(count);
  EXPECT_TRUE(SameBits(dx, fresh.backward(Matrix<float>(wide.leftCols(8)))));
  EXPECT_TRUE(SameBits(router.grad_weight(), fresh.grad_weight()));
  EXPECT_TRUE(SameBits(router.grad_bias(), fresh.grad_bias()));
}

// The layer's flow: the router writes the logits straight into the routing, which routes them
// in place.
TEST(Allocation, RouterIntoRoutingInPlace) {
  Router<> router(router_config()), fresh(router_config());
  const RoutingOptions o = options_of(kRouteCases[2]);
  Routing routing;
  for (unsigned seed : {40u, 41u}) {
    const Matrix<float> x = random_matrix(kTokens, 48, seed);
    const AllocationCount count = count_allocations([&] {
      router.forward(x, Mode::kTrain, routing.logits);
      switchmoe::route(routing.logits, o, Mode::kTrain, routing);
    });
    if (seed != 40u) {  // 40 is the warm-up
      EXPECT_EQ(count.total(), 0) << describe(count);
    }
    expect_same_routing(routing, switchmoe::route(fresh.forward(x, Mode::kTrain), o, Mode::kTrain));
  }
}

// ---- Dispatch plan and statistics -------------------------------------------------------------

TEST(Allocation, DispatchPlanAndStatsReuseTheirOutputs) {
  for (const RouteCase& c : kRouteCases) {
    SCOPED_TRACE(c.name);
    const RoutingOptions o = options_of(c);
    const Routing warm = switchmoe::route(random_matrix(kTokens, c.experts, 50, 2.0f), o, c.mode);
    const Routing routing =
        switchmoe::route(random_matrix(kTokens, c.experts, 51, 2.0f), o, c.mode);
    DispatchPlan plan;
    RoutingStats stats;
    switchmoe::make_dispatch_plan(warm, c.experts, plan);
    switchmoe::routing_stats(warm, c.experts, stats);
    const AllocationCount count = count_allocations([&] {
      switchmoe::make_dispatch_plan(routing, c.experts, plan);
      switchmoe::routing_stats(routing, c.experts, stats);
    });
    EXPECT_EQ(count.total(), 0) << describe(count);
    expect_same_plan(plan, switchmoe::make_dispatch_plan(routing, c.experts));
    expect_same_stats(stats, switchmoe::routing_stats(routing, c.experts));
  }
}

}  // namespace
