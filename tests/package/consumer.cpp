// A program outside the project, as a user writes it: one include, one layer, one forward call.
// Exits non-zero when the layer does not behave as the API contract says.
#include <cmath>
#include <cstdio>
#include <switchmoe/switchmoe.hpp>

namespace {

int failures = 0;

void expect(bool condition, const char* what) {
  if (!condition) {
    std::fprintf(stderr, "consumer: FAILED: %s\n", what);
    ++failures;
  }
}

}  // namespace

int main() {
  constexpr int kTokens = 10;
  constexpr int kModel = 8;
  constexpr int kExperts = 4;

  switchmoe::SwitchConfig config;
  config.d_model = kModel;
  config.d_ff = 16;
  config.routing.num_experts = kExperts;
  config.seed = 7;
  switchmoe::SwitchLayer<> layer(config);

  expect(layer.router_weight().rows() == kModel && layer.router_weight().cols() == kExperts,
         "router weight is [d_model, experts]");

  switchmoe::Matrix<float> x(kTokens, kModel);  // [tokens, d_model]
  for (int t = 0; t < kTokens; ++t) {
    for (int j = 0; j < kModel; ++j) {
      x(t, j) = std::sin(0.7f * static_cast<float>(t) + 1.3f * static_cast<float>(j));
    }
  }

  const auto out = layer.forward(x, switchmoe::Mode::kEval);
  expect(out.y.rows() == kTokens && out.y.cols() == kModel, "output is [tokens, d_model]");
  expect(out.y.allFinite(), "output is finite");
  expect(out.y.cwiseAbs().maxCoeff() > 0.0f, "output is not all zero");
  expect(out.routing.probs.rows() == kTokens && out.routing.probs.cols() == kExperts,
         "router probabilities are [tokens, experts]");
  for (int t = 0; t < kTokens; ++t) {
    expect(std::abs(out.routing.probs.row(t).sum() - 1.0f) < 1e-5f,
           "router probabilities sum to one");
  }
  // Rule 6 in evaluation: C = max(min_capacity 4, min(10, floor(2.0 * 10 / 4))) = 5.
  expect(out.routing.capacity == 5, "evaluation capacity is 5");

  if (failures != 0) return 1;
  std::printf("consumer: switchmoe SwitchLayer<> works (%d tokens, %d experts)\n", kTokens,
              kExperts);
  return 0;
}
