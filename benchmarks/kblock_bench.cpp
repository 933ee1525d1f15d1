// The GEMM kernels' k block (kKc) against another one, in one process (issue 15, round 6). An
// extra instruction-set tag, `KBlockIsa<kKc>`, refines isa::Avx512Bf16 with
// kernels that differ from the library's only in kKc (the float kernel's k-steps; the bf16
// pair kernel gets twice as many k values, the same bytes). A SwitchLayer built on that tag
// (router and experts) runs next to the default one on the same weights and input, in an order
// that flips every repetition; the report gives median times and the median of the
// per-repetition ratios default / alternative (below 1 when the library's kKc is faster).
//
//   kblock_bench [--reps N] [--alt 256|1024] [--case forward|train|decode|all]
//
// forward: 8 experts of 768 x 3072 at 512 and 2048 tokens, and 128 experts of 512 x 2048 at 2048
// tokens (forward(kEval)); train: forward(kTrain) + backward at 2048 tokens, 1 and 8 experts of
// 768 x 3072 and 128 of 512 x 2048; decode: 8 and 64 tokens (the two layers' weights, 2 x 151
// MB in fp32, do not stay in cache between calls). The outputs of the two layers differ by
// rounding (a k block is one accumulator chain), reported as the largest difference of y; a
// router logit rounded differently could also flip a near tie of top-1, which would show there
// as a large difference.
//
// Needs a target with AVX512_BF16 (e.g. -march=native on Zen 4/5 or Sapphire Rapids): on other
// targets the program says so and exits.

#include <omp.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "switchmoe/switchmoe.hpp"
#include "timing.hpp"

#if SWITCHMOE_KERNELS_HAS_AVX512BF16

namespace switchmoe::kernels::isa {
template <int kKc>
struct KBlockIsa : Avx512Bf16 {};
}  // namespace switchmoe::kernels::isa

namespace switchmoe::kernels::detail {
template <int kSteps>
struct RowConversion<isa::KBlockIsa<kSteps>> : RowConversion<isa::Avx512Bf16> {};
template <int kSteps>
struct MicroKernel<isa::KBlockIsa<kSteps>, float> : Avx512FloatKernel<float> {
  static constexpr int kKc = kSteps;
};
template <int kSteps>
struct MicroKernel<isa::KBlockIsa<kSteps>, Eigen::bfloat16> : Avx512DotBf16Kernel {
  static constexpr int kKc = 2 * kSteps;  // k values in pairs: kSteps pair steps
};
}  // namespace switchmoe::kernels::detail

namespace {

using switchmoe::Matrix;
using switchmoe::Mode;
using switchmoe_bench::Clock;
using switchmoe_bench::median;
using switchmoe_bench::random_matrix;
using switchmoe_bench::seconds_since;

template <class Policy, int kSteps>
using AltLayer =
    switchmoe::SwitchLayer<Policy, switchmoe::Relu,
                           switchmoe::Router<Policy, switchmoe::kernels::isa::KBlockIsa<kSteps>>,
                           switchmoe::FeedForwardBank<Policy, switchmoe::Relu,
                                                      switchmoe::kernels::isa::KBlockIsa<kSteps>>>;

struct Case {
  int experts;
  int d_model;
  int d_ff;
  int tokens;
  bool train;
  int reps_scale;  // small calls repeat more
};

template <class Policy, int kSteps>
void run_case(const char* precision, const Case& c, int reps) {
  const switchmoe::SwitchConfig config =
      switchmoe_bench::dropless_config(c.experts, c.d_model, c.d_ff);
  switchmoe::SwitchLayer<Policy> library(config);
  AltLayer<Policy, kSteps> alternative(config);  // same seed: the same weights
  const Matrix<float> x = random_matrix(c.tokens, c.d_model, 11);
  const Matrix<float> dy = random_matrix(c.tokens, c.d_model, 12);
  Matrix<float> dx;
  switchmoe::SwitchOutput out_library, out_alternative;
  const auto step = [&](auto& layer, switchmoe::SwitchOutput& out) {
    const Clock::time_point start = Clock::now();
    layer.forward(x, c.train ? Mode::kTrain : Mode::kEval, out);
    if (c.train) {
      layer.backward(dy, dx);
      layer.zero_grad();
    }
    return seconds_since(start);
  };
  step(library, out_library);  // warm-up: buffers, packing
  step(alternative, out_alternative);
  const double max_dy = (out_library.y - out_alternative.y).cwiseAbs().maxCoeff();
  std::vector<double> t_library, t_alternative, ratio;
  for (int rep = 0; rep < reps * c.reps_scale; ++rep) {
    double a, b;
    if (rep % 2 == 0) {
      a = step(library, out_library);
      b = step(alternative, out_alternative);
    } else {
      b = step(alternative, out_alternative);
      a = step(library, out_library);
    }
    t_library.push_back(a);
    t_alternative.push_back(b);
    ratio.push_back(a / b);
  }
  std::printf("| %s | %s | %d x %d x %d | %d | %.3f | %.3f | %.3f | %.2g |\n", precision,
              c.train ? "fwd+bwd" : "fwd", c.experts, c.d_model, c.d_ff, c.tokens,
              1e3 * median(t_library), 1e3 * median(t_alternative), median(ratio), max_dy);
  std::fflush(stdout);
}

template <int kSteps>
void run_all(const std::vector<Case>& cases, int reps) {
  for (const Case& c : cases) {
    run_case<switchmoe::Fp32, kSteps>("fp32", c, reps);
    run_case<switchmoe::Bf16, kSteps>("bf16", c, reps);
  }
}

}  // namespace

int main(int argc, char** argv) {
  int reps = 11, alt = 256;
  std::string which = "all";
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--reps" && i + 1 < argc) {
      reps = std::max(1, std::atoi(argv[++i]));
    } else if (arg == "--alt" && i + 1 < argc) {
      alt = std::atoi(argv[++i]);
    } else if (arg == "--case" && i + 1 < argc) {
      which = argv[++i];
    } else {
      std::fprintf(stderr,
                   "usage: %s [--reps N] [--alt 256|1024] [--case forward|train|decode|all]\n",
                   argv[0]);
      return 2;
    }
  }
  if (alt != 256 && alt != 1024) {
    std::fprintf(stderr, "--alt must be 256 or 1024 (float k-steps of the alternative kKc)\n");
    return 2;
  }
  std::vector<Case> cases;
  if (which == "forward" || which == "all") {
    cases.push_back({8, 768, 3072, 512, false, 1});
    cases.push_back({8, 768, 3072, 2048, false, 1});
    cases.push_back({128, 512, 2048, 2048, false, 1});
  }
  if (which == "train" || which == "all") {
    cases.push_back({1, 768, 3072, 2048, true, 1});
    cases.push_back({8, 768, 3072, 2048, true, 1});
    cases.push_back({128, 512, 2048, 2048, true, 1});
  }
  if (which == "decode" || which == "all") {
    cases.push_back({8, 768, 3072, 8, false, 8});
    cases.push_back({8, 768, 3072, 64, false, 4});
  }
  if (cases.empty()) {
    std::fprintf(stderr, "--case must be forward, train, decode or all\n");
    return 2;
  }
  const int library_kc =
      switchmoe::kernels::detail::MicroKernel<switchmoe::kernels::isa::Native, float>::kKc;
  std::printf(
      "threads: %d; library kKc %d float k-steps against %d, interleaved; times are medians in "
      "ms; ratio = median of library / alternative per repetition (below 1: the library's kKc "
      "is faster)\n\n",
      omp_get_max_threads(), library_kc, alt);
  std::printf(
      "| precision | pass | experts x d_model x d_ff | tokens | kKc %d ms | kKc %d ms | ratio | "
      "max abs y diff |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n",
      library_kc, alt);
  if (alt == 256) {
    run_all<256>(cases, reps);
  } else {
    run_all<1024>(cases, reps);
  }
  return 0;
}

#else

int main() {
  std::fprintf(stderr, "kblock_bench needs a target with AVX512_BF16 (e.g. -march=native)\n");
  return 1;
}

#endif
