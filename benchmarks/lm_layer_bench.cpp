// The feed-forward layer of the LM demonstration (examples/switch_lm) against its FLOP-matched
// dense twin, interleaved in one process (issue 15): SwitchLayer with 16 experts of d_model 64 x
// d_ff 256 (capacity factor 1.25, jitter 0.01, aux loss 0.01: the demo's settings) and a
// DenseFFN of d_model 64 x d_ff 256 (the FLOPs per token of one expert), 2048 tokens, one
// thread by default. Each repetition times forward(x, kTrain) + backward(dy) of both, in an
// order that flips every repetition; the report gives median times and the median of the
// per-repetition ratios Switch / Dense.
//
// The Switch side is also timed in parts, in the same repetitions, so that the extra time has
// names: the router alone (forward + backward), the expert bank alone on the rows of the
// layer's last plan (forward + backward), and the rest (routing, plan, gather, combine,
// losses, statistics) as the difference.
//
//   lm_layer_bench [--reps N] [--threads T] [--precision fp32|bf16] [--tokens N]
//                  [--schedule auto|split|whole] [--only switch|dense]
// --schedule forces the experts' forward schedule (FeedForwardBank::whole_ffn_schedule); --only
// runs one side in a loop, for perf record.

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "switchmoe/switchmoe.hpp"
#include "timing.hpp"

namespace {

using switchmoe::Matrix;
using switchmoe::Mode;
using switchmoe_bench::Clock;

using switchmoe_bench::median;
using switchmoe_bench::random_matrix;
using switchmoe_bench::seconds_since;

struct Options {
  int reps = 41, threads = 1, tokens = 2048;
  std::string precision = "fp32", only;
  std::string schedule = "auto";  // the experts' forward schedule: auto, split or whole
};

template <class Policy>
int run(const Options& o) {
  constexpr int kDModel = 64, kDff = 256, kExperts = 16;
  switchmoe::SwitchConfig sc;
  sc.d_model = kDModel;
  sc.d_ff = kDff;
  sc.routing.num_experts = kExperts;
  sc.routing.capacity_factor = 1.25;
  sc.routing.eval_capacity_factor = 2.0;
  sc.aux_loss_coef = 0.01f;
  sc.jitter_eps = 0.01f;
  sc.seed = 3;
  switchmoe::SwitchLayer<Policy> sw(sc);
  switchmoe::DenseConfig dc;
  dc.d_model = kDModel;
  dc.d_ff = kDff;
  dc.seed = 3;
  switchmoe::DenseFFN<Policy> dense(dc);
  // The parts of the Switch layer, timed alone: its router and an expert bank like its own.
  switchmoe::RouterConfig rc;
  rc.d_model = kDModel;
  rc.num_experts = kExperts;
  rc.jitter_eps = sc.jitter_eps;
  rc.seed = 3;
  switchmoe::Router<Policy> router(rc);
  switchmoe::FeedForwardConfig fc;
  fc.num_ffns = kExperts;
  fc.d_model = kDModel;
  fc.d_ff = kDff;
  fc.seed = 3;
  switchmoe::FeedForwardBank<Policy, switchmoe::Relu> bank(fc);

  const Matrix<float> x = random_matrix(o.tokens, kDModel, 1);
  const Matrix<float> dy = random_matrix(o.tokens, kDModel, 2);
  switchmoe::SwitchOutput out;
  Matrix<float> y_dense, dx_switch, dx_dense, logits, dlogits, dx_router;
  using Element = typename Policy::Element;
  Matrix<Element> xg;
  Matrix<float> yg, dyg, dxg;
  std::vector<int> offsets;

  auto switch_step = [&] {
    sw.forward(x, Mode::kTrain, out);
    sw.backward(dy, dx_switch);
  };
  auto dense_step = [&] {
    dense.forward(x, Mode::kTrain, y_dense);
    dense.backward(dy, dx_dense);
  };
  auto router_step = [&] {
    router.forward(x, Mode::kTrain, logits, 0);
    router.backward(dlogits, dx_router);
  };
  auto bank_step = [&] {
    bank.forward(xg, offsets, Mode::kTrain, {}, yg);
    bank.backward(xg, offsets, dyg, dxg);
  };
  // Warm-up; then the bank's rows: as many per expert as the layer's routing kept.
  switch_step();
  dense_step();
  offsets.assign(1, 0);
  for (int e = 0; e < kExperts; ++e) {
    int kept = 0;
    for (Eigen::Index t = 0; t < o.tokens; ++t) {
      kept += out.routing.expert(t, 0) == e && out.routing.slot(t, 0) >= 0;
    }
    offsets.push_back(offsets.back() + kept);
  }
  xg = random_matrix(offsets.back(), kDModel, 3).template cast<Element>();
  dyg = random_matrix(offsets.back(), kDModel, 4);
  dlogits = random_matrix(o.tokens, kExperts, 5);
  router_step();
  bank_step();

  if (!o.only.empty()) {
    for (int rep = 0; rep < o.reps; ++rep) {
      if (o.only == "dense") {
        dense_step();
      } else {
        switch_step();
      }
    }
    return 0;
  }
  std::vector<double> ts, td, tr, tb, ratio;
  for (int rep = 0; rep < o.reps; ++rep) {
    double t_switch = 0.0, t_dense = 0.0;
    for (int side = 0; side < 2; ++side) {
      const auto start = Clock::now();
      if ((side == 0) == (rep % 2 == 0)) {
        switch_step();
        t_switch = seconds_since(start);
      } else {
        dense_step();
        t_dense = seconds_since(start);
      }
    }
    auto start = Clock::now();
    router_step();
    tr.push_back(seconds_since(start));
    start = Clock::now();
    bank_step();
    tb.push_back(seconds_since(start));
    ts.push_back(t_switch);
    td.push_back(t_dense);
    ratio.push_back(t_switch / t_dense);
  }
  const double s = median(ts), d = median(td), r = median(tr), b = median(tb);
  std::printf("| %s | %s | %d | %d | %d | %.3f | %.3f | %.3f | %.3f | %.3f | %.3f | %d |\n",
              o.precision.c_str(), o.schedule.c_str(), o.tokens, o.threads, offsets.back(), s * 1e3,
              d * 1e3, median(ratio), r * 1e3, b * 1e3, (s - r - b) * 1e3, o.reps);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const bool value = i + 1 < argc;
    if (arg == "--reps" && value) {
      o.reps = std::stoi(argv[++i]);
    } else if (arg == "--threads" && value) {
      o.threads = std::stoi(argv[++i]);
    } else if (arg == "--tokens" && value) {
      o.tokens = std::stoi(argv[++i]);
    } else if (arg == "--precision" && value) {
      o.precision = argv[++i];
    } else if (arg == "--schedule" && value) {
      o.schedule = argv[++i];
    } else if (arg == "--only" && value) {
      o.only = argv[++i];
    } else {
      std::fprintf(stderr,
                   "usage: %s [--reps N] [--threads T] [--precision fp32|bf16] [--tokens N] "
                   "[--schedule auto|split|whole] [--only switch|dense]\n",
                   argv[0]);
      return 2;
    }
  }
  omp_set_num_threads(o.threads);
  // A hook of the library's tests: forcing a schedule changes the speed, never the results.
  switchmoe::detail::forced_ffn_schedule() =
      o.schedule == "split"   ? switchmoe::detail::FfnSchedule::kSplitTiles
      : o.schedule == "whole" ? switchmoe::detail::FfnSchedule::kWholeFfns
                              : switchmoe::detail::FfnSchedule::kAuto;
  if (o.only.empty()) {
    std::printf(
        "fwd+bwd, d_model 64, d_ff 256, 16 experts (capacity 1.25) vs DenseFFN d_ff 256; times "
        "are medians in ms; ratio = median of Switch / Dense per repetition; rest = Switch - "
        "router - bank\n\n");
    std::printf(
        "| precision | schedule | tokens | threads | kept rows | Switch ms | Dense ms | ratio | "
        "router ms | "
        "bank ms | rest ms | reps |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- "
        "| --- | --- |\n");
  }
  return o.precision == "bf16" ? run<switchmoe::Bf16>(o) : run<switchmoe::Fp32>(o);
}
