// Thread safety (issue #14, item 9). The contract, as in the README:
//
//   A layer object (SwitchLayer, DenseFFN, Router and the other stateful components) is used by
//   one caller at a time, like an Eigen matrix: forward and backward change the object (saved
//   activations, the random stream, the gradients, reused buffers), so calling one object from
//   two threads at once, even two evaluation-mode forwards, is a data race. Distinct objects on
//   distinct threads are independent and may run concurrently; the library keeps no shared
//   mutable state between objects (its per-thread GEMM packing buffers are thread_local). The
//   OpenMP parallelism inside one call is the library's own: each calling thread gets its own
//   OpenMP team, and results stay bitwise independent of the thread count.
//
// The supported case is tested here: layers trained on two std::threads at the same time give
// bitwise the results of the same calls made serially. Under ThreadSanitizer (the `threads`
// ctest label, run by .ci/run with libomp's Archer so that OpenMP synchronization is understood)
// this also shows that the concurrent calls share no unsynchronized memory.
#include <gtest/gtest.h>

#include <atomic>
#include <exception>
#include <string>
#include <thread>
#include <vector>

#include "support/matrices.hpp"
#include "switchmoe/switchmoe.hpp"

namespace {

using switchmoe::Matrix;
using switchmoe::Mode;
using switchmoe_test::random_matrix;
using switchmoe_test::SameBits;

// Large enough that the GEMMs cut into several tiles and the element-wise loops go parallel
// (core/parallel.hpp), small enough for a TSan build.
constexpr int kTokens = 256, kDModel = 64, kDff = 128, kSteps = 3;

switchmoe::SwitchConfig config_with_seed(std::uint64_t seed) {
  switchmoe::SwitchConfig config;
  config.d_model = kDModel;
  config.d_ff = kDff;
  config.routing.num_experts = 4;
  config.routing.top_k = 2;
  config.routing.capacity_factor = 1.0;  // tight: some choices are dropped
  config.expert_bias = true;
  config.router_bias = true;
  config.z_loss_coef = 1e-3f;
  config.jitter_eps = 0.05f;     // the per-layer random stream is used...
  config.expert_dropout = 0.1f;  // ...twice per training forward
  config.init_scale = 1.0f;
  config.seed = seed;
  return config;
}

// Everything a training run produces.
struct Training {
  std::vector<Matrix<float>> y, dx, eval_y;
  std::vector<float> loss;
  std::vector<Matrix<float>> grads;
};

// kSteps training steps (forward + backward, gradients accumulate) and an evaluation forward
// after each, on a fresh layer.
template <class Policy>
Training train(std::uint64_t seed) {
  switchmoe::SwitchLayer<Policy> layer(config_with_seed(seed));
  Training run;
  for (int step = 0; step < kSteps; ++step) {
    const Matrix<float> x = random_matrix(kTokens, kDModel, 10 * step + 1);
    const Matrix<float> dy = random_matrix(kTokens, kDModel, 10 * step + 2);
    const switchmoe::SwitchOutput out = layer.forward(x, Mode::kTrain);
    run.y.push_back(out.y);
    run.loss.push_back(out.loss);
    run.dx.push_back(layer.backward(dy));
    run.eval_y.push_back(layer.forward(x, Mode::kEval).y);
  }
  for (auto& p : layer.parameters()) run.grads.push_back(*p.grad);
  return run;
}

void expect_same_run(const Training& got, const Training& want, const std::string& what) {
  SCOPED_TRACE(what);
  ASSERT_EQ(got.y.size(), want.y.size());
  for (std::size_t s = 0; s < want.y.size(); ++s) {
    EXPECT_TRUE(SameBits(got.y[s], want.y[s])) << "y, step " << s;
    EXPECT_TRUE(SameBits(got.dx[s], want.dx[s])) << "dx, step " << s;
    EXPECT_TRUE(SameBits(got.eval_y[s], want.eval_y[s])) << "eval y, step " << s;
    EXPECT_EQ(got.loss[s], want.loss[s]) << "step " << s;
  }
  ASSERT_EQ(got.grads.size(), want.grads.size());
  for (std::size_t i = 0; i < want.grads.size(); ++i) {
    EXPECT_TRUE(SameBits(got.grads[i], want.grads[i])) << "gradient " << i;
  }
}

// Runs first() and second() on two std::threads released together, so that their calls
// overlap; an exception in either is rethrown here.
template <class First, class Second>
void run_concurrently(First&& first, Second&& second) {
  std::atomic<int> ready{0};
  std::exception_ptr errors[2];
  auto body = [&](auto& work, int index) {
    return [&, index] {
      ready.fetch_add(1);
      while (ready.load() < 2) std::this_thread::yield();
      try {
        work();
      } catch (...) {
        errors[index] = std::current_exception();
      }
    };
  };
  std::thread a(body(first, 0)), b(body(second, 1));
  a.join();
  b.join();
  for (const std::exception_ptr& e : errors) {
    if (e) std::rethrow_exception(e);
  }
}

TEST(ThreadSafety, Fp32AndBf16LayersTrainOnTwoThreads) {
  const Training fp32_serial = train<switchmoe::Fp32>(7);
  const Training bf16_serial = train<switchmoe::Bf16>(8);
  Training fp32, bf16;
  run_concurrently([&] { fp32 = train<switchmoe::Fp32>(7); },
                   [&] { bf16 = train<switchmoe::Bf16>(8); });
  expect_same_run(fp32, fp32_serial, "fp32");
  expect_same_run(bf16, bf16_serial, "bf16");
  // The runs are not trivially equal: the two layers did different work.
  EXPECT_FALSE(SameBits(fp32.y[0], bf16.y[0]));
}

// Two objects of the same instantiation share every function-local static of the library's
// templates; they must not share mutable state through them either.
TEST(ThreadSafety, TwoFp32LayersTrainOnTwoThreads) {
  const Training first_serial = train<switchmoe::Fp32>(21);
  const Training second_serial = train<switchmoe::Fp32>(22);
  Training first, second;
  run_concurrently([&] { first = train<switchmoe::Fp32>(21); },
                   [&] { second = train<switchmoe::Fp32>(22); });
  expect_same_run(first, first_serial, "first");
  expect_same_run(second, second_serial, "second");
  EXPECT_FALSE(SameBits(first.y[0], second.y[0]));  // the seeds differ
}

}  // namespace
