// SwitchLayer vs DenseFFN, forward and forward+backward (issue #4).
//
//   layer/switch/<precision>/<pass>/experts:E/tokens:N/d_model:D/d_ff:F/threads:T
//   layer/dense_same_flops/...   DenseFFN with d_ff = F (the FLOPs per token of one expert)
//   layer/dense_same_params/...  DenseFFN with d_ff = E * F (the expert parameter count)
// pass "fwd" = forward(x, kTrain); "fwdbwd" = forward(x, kTrain) + backward(dy).
// Counters: GFLOPS = useful FLOPs / wall-clock s, GFLOP = useful FLOPs of one iteration (report.py
// divides it by the process CPU time too, MeasureProcessCPUTime), counting only the expert matmuls
// of kept token choices (routing.slot >= 0; 4 d_model d_ff per kept choice forward, 3x that
// forward+backward; router and dispatch excluded), tokens_per_s, kept (fraction of kept choices),
// params_M (expert or FFN weights, millions).
//
//   layer/variant/<precision>/<variant>/<pass>/experts:8/tokens:2048/d_model:768/threads:T
// (issue #10) the variants next to the plain ReLU layer at d_ff 3072: "relu"; "swiglu" (gated
// experts at d_ff 2048, so the FLOPs per choice match: 6 d_model d_ff); "shared" (ReLU plus a
// shared expert of width 3072; its FLOPs count for every token); "expert_choice" (ReLU, capacity
// factor 1.25, so as many kept rows as token choice at full capacity would have).
//
// The default sweep is reduced (d_model x d_ff = 512 x 2048, experts up to 32, dense
// same-params up to 8 experts). --full_sweep runs the whole issue #4 grid: experts
// {1,2,8,32,128}, tokens {512,2048}, (512,2048) and (768,3072); 128 x 768 x 3072 experts are
// 600M parameters (2.4 GB fp32 plus gradients) and slow to initialise.
//
//   layer_bench --benchmark_min_time=0.2 --benchmark_format=json > layer.json
// The peak benchmarks of peak.hpp run in the same program, so report.py can express every rate
// as a percent of the peak measured in the same run.

#include <benchmark/benchmark.h>
#include <omp.h>

#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "peak.hpp"
#include "switchmoe/switchmoe.hpp"
#include "timing.hpp"

namespace switchmoe_bench {
namespace {

using switchmoe::Matrix;
using switchmoe::Mode;

enum class Pass { kForward, kForwardBackward };

struct LayerShape {
  int experts, tokens, d_model, d_ff, threads;
  Pass pass;
};

using switchmoe_bench::random_matrix;

class ThreadScope {
 public:
  explicit ThreadScope(int threads) : saved_(omp_get_max_threads()) {
    omp_set_num_threads(threads);
  }
  ~ThreadScope() { omp_set_num_threads(saved_); }

 private:
  int saved_;
};

// The most recently built layer, reused by consecutive benchmarks of the same configuration
// (only threads and pass vary between them), so that big expert banks are initialised once.
// One slot for all layer types: the previous layer is freed before the next is built, so that
// a 10 GB bank of 128 big experts does not stay resident (and keep the kernel's memory
// reclaim busy) while later benchmarks run.
struct LayerSlot {
  std::shared_ptr<void> layer;
  std::string key;
};
LayerSlot& layer_slot() {
  static LayerSlot slot;
  return slot;
}

template <class Layer, class Config>
Layer& cached_layer(const std::string& key, const Config& config) {
  std::shared_ptr<void>& layer = layer_slot().layer;
  std::string& layer_key = layer_slot().key;
  const std::string full_key = std::string(typeid(Layer).name()) + "/" + key;
  if (!layer || layer_key != full_key) {
    layer.reset();  // free the old one first
    layer = std::make_shared<Layer>(config);
    layer_key = full_key;
  }
  return *static_cast<Layer*>(layer.get());
}

template <class Policy>
void run_switch(benchmark::State& state, LayerShape s) {
  ThreadScope threads(s.threads);
  switchmoe::SwitchConfig config;
  config.d_model = s.d_model;
  config.d_ff = s.d_ff;
  config.routing.num_experts = s.experts;
  config.seed = 1;
  const std::string key = std::string(typeid(Policy).name()) + "/" + std::to_string(s.experts) +
                          "/" + std::to_string(s.d_model) + "/" + std::to_string(s.d_ff);
  auto& layer = cached_layer<switchmoe::SwitchLayer<Policy>>(key, config);
  const Matrix<float> x = random_matrix(s.tokens, s.d_model, 2);
  const Matrix<float> dy = random_matrix(s.tokens, s.d_model, 3);
  // Untimed warm-up: refreshes the compute copies of the weights and sizes the buffers; the
  // timed calls then allocate nothing (tests/layer_allocation_test.cpp).
  switchmoe::SwitchOutput out;
  Matrix<float> dx;
  layer.forward(x, Mode::kTrain, out);
  layer.backward(dy, dx);
  double kept = 0.0;
  for (auto _ : state) {
    layer.forward(x, Mode::kTrain, out);
    if (s.pass == Pass::kForwardBackward) layer.backward(dy, dx);
    benchmark::DoNotOptimize(out.y.data());
    benchmark::DoNotOptimize(dx.data());
    kept = (out.routing.slot.array() >= 0).count();
  }
  const double flops_per_choice = 4.0 * s.d_model * s.d_ff;
  const double pass_factor = s.pass == Pass::kForward ? 1.0 : 3.0;
  const auto iterations = static_cast<double>(state.iterations());
  state.counters["GFLOPS"] = benchmark::Counter(
      kept * flops_per_choice * pass_factor * 1e-9 * iterations, benchmark::Counter::kIsRate);
  state.counters["GFLOP"] = kept * flops_per_choice * pass_factor * 1e-9;
  state.counters["tokens_per_s"] =
      benchmark::Counter(s.tokens * iterations, benchmark::Counter::kIsRate);
  state.counters["kept"] = kept / s.tokens;
  state.counters["params_M"] = 2.0 * s.experts * s.d_model * s.d_ff * 1e-6;
  state.counters["threads"] = s.threads;
}

enum class Variant { kRelu, kSwiGlu, kShared, kExpertChoice };

const char* variant_name(Variant v) {
  switch (v) {
    case Variant::kRelu:
      return "relu";
    case Variant::kSwiGlu:
      return "swiglu";
    case Variant::kShared:
      return "shared";
    default:
      return "expert_choice";
  }
}

template <class Policy, class Activation>
void run_variant_layer(benchmark::State& state, LayerShape s, Variant v) {
  ThreadScope threads(s.threads);
  switchmoe::SwitchConfig config;
  config.d_model = s.d_model;
  config.d_ff = v == Variant::kSwiGlu ? s.d_ff * 2 / 3 : s.d_ff;
  config.routing.num_experts = s.experts;
  if (v == Variant::kShared) config.shared_d_ff = s.d_ff;
  if (v == Variant::kExpertChoice) config.routing.method = switchmoe::RoutingMethod::kExpertChoice;
  config.seed = 1;
  const std::string key = std::string(typeid(Policy).name()) + "/variant/" + variant_name(v);
  auto& layer = cached_layer<switchmoe::SwitchLayer<Policy, Activation>>(key, config);
  const Matrix<float> x = random_matrix(s.tokens, s.d_model, 2);
  const Matrix<float> dy = random_matrix(s.tokens, s.d_model, 3);
  switchmoe::SwitchOutput out;
  Matrix<float> dx;
  layer.forward(x, Mode::kTrain, out);  // untimed warm-up, as in run_switch
  layer.backward(dy, dx);
  double kept = 0.0;
  for (auto _ : state) {
    layer.forward(x, Mode::kTrain, out);
    if (s.pass == Pass::kForwardBackward) layer.backward(dy, dx);
    benchmark::DoNotOptimize(out.y.data());
    benchmark::DoNotOptimize(dx.data());
    kept = (out.routing.slot.array() >= 0).count();
  }
  const double per_row = (switchmoe::is_gated_v<Activation> ? 6.0 : 4.0) * s.d_model * config.d_ff;
  const double shared = 4.0 * s.d_model * config.shared_d_ff * s.tokens;
  const double flops = (kept * per_row + shared) * (s.pass == Pass::kForward ? 1.0 : 3.0);
  const auto iterations = static_cast<double>(state.iterations());
  state.counters["GFLOPS"] =
      benchmark::Counter(flops * 1e-9 * iterations, benchmark::Counter::kIsRate);
  state.counters["GFLOP"] = flops * 1e-9;
  state.counters["tokens_per_s"] =
      benchmark::Counter(s.tokens * iterations, benchmark::Counter::kIsRate);
  state.counters["kept"] = kept / s.tokens;
  state.counters["threads"] = s.threads;
}

// DenseFFN with hidden width d_ff_dense (= d_ff for same FLOPs, experts * d_ff for same params).
template <class Policy>
void run_dense(benchmark::State& state, LayerShape s, int d_ff_dense) {
  ThreadScope threads(s.threads);
  switchmoe::DenseConfig config;
  config.d_model = s.d_model;
  config.d_ff = d_ff_dense;
  config.seed = 1;
  const std::string key = std::string(typeid(Policy).name()) + "/" + std::to_string(d_ff_dense) +
                          "/" + std::to_string(s.d_model);
  auto& layer = cached_layer<switchmoe::DenseFFN<Policy>>(key, config);
  const Matrix<float> x = random_matrix(s.tokens, s.d_model, 2);
  const Matrix<float> dy = random_matrix(s.tokens, s.d_model, 3);
  Matrix<float> y, dx;
  layer.forward(x, Mode::kTrain, y);  // untimed warm-up, as for the switch layer
  layer.backward(dy, dx);
  for (auto _ : state) {
    layer.forward(x, Mode::kTrain, y);
    if (s.pass == Pass::kForwardBackward) layer.backward(dy, dx);
    benchmark::DoNotOptimize(y.data());
    benchmark::DoNotOptimize(dx.data());
  }
  const double flops =
      4.0 * s.tokens * s.d_model * d_ff_dense * (s.pass == Pass::kForward ? 1.0 : 3.0);
  const auto iterations = static_cast<double>(state.iterations());
  state.counters["GFLOPS"] =
      benchmark::Counter(flops * 1e-9 * iterations, benchmark::Counter::kIsRate);
  state.counters["GFLOP"] = flops * 1e-9;
  state.counters["tokens_per_s"] =
      benchmark::Counter(s.tokens * iterations, benchmark::Counter::kIsRate);
  state.counters["kept"] = 1.0;
  state.counters["params_M"] = 2.0 * s.d_model * d_ff_dense * 1e-6;
  state.counters["threads"] = s.threads;
}

std::string shape_name(const LayerShape& s, bool with_experts) {
  std::string name = s.pass == Pass::kForward ? "fwd" : "fwdbwd";
  if (with_experts) name += "/experts:" + std::to_string(s.experts);
  return name + "/tokens:" + std::to_string(s.tokens) + "/d_model:" + std::to_string(s.d_model) +
         "/d_ff:" + std::to_string(s.d_ff) + "/threads:" + std::to_string(s.threads);
}

template <class Policy>
void register_precision(const char* precision, bool full) {
  const std::vector<std::pair<int, int>> dims =
      full ? std::vector<std::pair<int, int>>{{512, 2048}, {768, 3072}}
           : std::vector<std::pair<int, int>>{{512, 2048}};
  const std::vector<int> experts_list =
      full ? std::vector<int>{1, 2, 8, 32, 128} : std::vector<int>{1, 2, 8, 32};
  const int max_dense_experts = full ? 128 : 8;
  auto each = [&](auto&& body) {
    for (auto [d_model, d_ff] : dims) {
      for (int tokens : {512, 2048}) {
        for (int threads : {1, 2}) {
          for (Pass pass : {Pass::kForward, Pass::kForwardBackward}) {
            body(LayerShape{1, tokens, d_model, d_ff, threads, pass});
          }
        }
      }
    }
  };
  auto finish = [](benchmark::internal::Benchmark* b) {
    b->UseRealTime()->MeasureProcessCPUTime()->Unit(benchmark::kMillisecond);
  };
  // Experts outermost so that consecutive benchmarks share the cached layer.
  for (int experts : experts_list) {
    each([&](LayerShape s) {
      s.experts = experts;
      finish(benchmark::RegisterBenchmark(
          ("layer/switch/" + std::string(precision) + "/" + shape_name(s, true)).c_str(),
          [s](benchmark::State& st) { run_switch<Policy>(st, s); }));
    });
  }
  each([&](LayerShape s) {
    finish(benchmark::RegisterBenchmark(
        ("layer/dense_same_flops/" + std::string(precision) + "/" + shape_name(s, false)).c_str(),
        [s](benchmark::State& st) { run_dense<Policy>(st, s, s.d_ff); }));
  });
  // Issue #10: the variants at 2048 tokens, (768, 3072), 8 experts.
  for (Variant v : {Variant::kRelu, Variant::kSwiGlu, Variant::kShared, Variant::kExpertChoice}) {
    for (int threads : {1, 2}) {
      for (Pass pass : {Pass::kForward, Pass::kForwardBackward}) {
        const LayerShape s{8, 2048, 768, 3072, threads, pass};
        const std::string name = "layer/variant/" + std::string(precision) + "/" + variant_name(v) +
                                 "/" + (pass == Pass::kForward ? "fwd" : "fwdbwd") + "/experts:8" +
                                 "/tokens:2048/d_model:768/threads:" + std::to_string(threads);
        finish(benchmark::RegisterBenchmark(name.c_str(), [s, v](benchmark::State& st) {
          if (v == Variant::kSwiGlu) {
            run_variant_layer<Policy, switchmoe::SwiGlu>(st, s, v);
          } else {
            run_variant_layer<Policy, switchmoe::Relu>(st, s, v);
          }
        }));
      }
    }
  }
  for (int experts : experts_list) {
    if (experts == 1 || experts > max_dense_experts) continue;  // 1: same as same_flops
    each([&](LayerShape s) {
      s.experts = experts;
      finish(benchmark::RegisterBenchmark(
          ("layer/dense_same_params/" + std::string(precision) + "/" + shape_name(s, true)).c_str(),
          [s](benchmark::State& st) { run_dense<Policy>(st, s, s.experts * s.d_ff); }));
    });
  }
}

}  // namespace
}  // namespace switchmoe_bench

int main(int argc, char** argv) {
  bool full = false;
  std::vector<char*> args;
  for (int i = 0; i < argc; ++i) {
    if (std::strcmp(argv[i], "--full_sweep") == 0) {
      full = true;
    } else {
      args.push_back(argv[i]);
    }
  }
  int count = static_cast<int>(args.size());
  switchmoe_bench::register_precision<switchmoe::Fp32>("fp32", full);
  switchmoe_bench::register_precision<switchmoe::Bf16>("bf16", full);
  benchmark::Initialize(&count, args.data());
  if (benchmark::ReportUnrecognizedArguments(count, args.data())) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
