// A Switch layer inside a pre-LayerNorm residual block, y = x + SwitchLayer(LayerNorm(x)),
// run once in training mode and once in evaluation mode, printing what the layer did.
//
//   switch_block [tokens] [experts] [capacity_factor]

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <switchmoe/switchmoe.hpp>

namespace {

using switchmoe::Matrix;

/// LayerNorm over each row with unit gain and zero bias (enough for a demonstration).
Matrix<float> layer_norm(const Matrix<float>& x) {
  Matrix<float> out(x.rows(), x.cols());  // [tokens, d_model]
  for (Eigen::Index t = 0; t < x.rows(); ++t) {
    const float mean = x.row(t).mean();
    const float var = (x.row(t).array() - mean).square().mean();
    out.row(t) = (x.row(t).array() - mean) / std::sqrt(var + 1e-5f);
  }
  return out;
}

/// Tokens drawn around a few cluster centres, so that a router has structure to find.
Matrix<float> clustered_tokens(int tokens, int d_model, int clusters) {
  Matrix<float> centres = Matrix<float>::Random(clusters, d_model) * 2.0f;
  Matrix<float> x = Matrix<float>::Random(tokens, d_model) * 0.3f;  // [tokens, d_model]
  for (int t = 0; t < tokens; ++t) x.row(t) += centres.row(t % clusters);
  return x;
}

void print_report(const char* title, const switchmoe::SwitchOutput& out, int experts) {
  const auto& s = out.stats;
  std::printf("\n== %s: %ld tokens, %d experts, capacity %d per expert and group ==\n", title,
              static_cast<long>(out.y.rows()), experts, out.routing.capacity);
  std::printf("  expert   routed   kept   bar (kept)\n");
  for (int e = 0; e < experts; ++e) {
    const int bar = s.kept_tokens_per_expert[e] * 40 / std::max<long>(1, out.y.rows());
    std::printf("  %6d %8d %6d   %s\n", e, s.tokens_per_expert[e], s.kept_tokens_per_expert[e],
                std::string(bar, '#').c_str());
  }
  std::printf("  dropped fraction     %.4f\n", s.dropped_fraction);
  std::printf("  router confidence    %.4f  (mean gate of kept tokens)\n", s.router_confidence);
  std::printf("  expert usage         %.4f  (kept / (experts * capacity * groups))\n",
              s.expert_usage);
  std::printf("  load-balancing loss  %.4f  (1.0 is perfect balance for top-1)\n", s.aux_loss);
  std::printf("  router z-loss        %.4f\n", s.z_loss);
  std::printf("  scaled loss to add   %.6f\n", out.loss);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const int tokens = argc > 1 ? std::atoi(argv[1]) : 512;
    const int experts = argc > 2 ? std::atoi(argv[2]) : 8;
    const double factor = argc > 3 ? std::atof(argv[3]) : 1.25;

    switchmoe::SwitchConfig config;
    config.d_model = 64;
    config.d_ff = 256;
    config.routing.num_experts = experts;
    config.routing.capacity_factor = factor;
    config.seed = 2021;
    switchmoe::SwitchLayer<switchmoe::Bf16, switchmoe::Relu> layer(config);
    // A larger router initialization than the paper's, so an untrained router already has
    // preferences and the report shows some overflow.
    layer.router_weight() *= 8.0f;

    const Matrix<float> x = clustered_tokens(tokens, config.d_model, 6);  // [tokens, d_model]
    for (auto mode : {switchmoe::Mode::kTrain, switchmoe::Mode::kEval}) {
      const switchmoe::SwitchOutput out = layer.forward(layer_norm(x), mode);
      const Matrix<float> y = x + out.y;  // the residual carries dropped tokens on
      print_report(mode == switchmoe::Mode::kTrain ? "training mode (capacity factor 1.25)"
                                                   : "evaluation mode (capacity factor 2.0)",
                   out, experts);
      std::printf("  |y - x| / |x|        %.4f\n", (y - x).norm() / x.norm());
    }

    // The load-balancing loss at work: plain SGD on alpha * aux alone (dy = 0) moves the router
    // towards balance, and fewer tokens overflow their expert.
    std::printf("\n== 40 SGD steps on the load-balancing loss alone (lr 10, alpha 0.01) ==\n");
    std::printf("  step   aux loss   dropped fraction\n");
    const Matrix<float> normed = layer_norm(x);
    const Matrix<float> no_task_gradient = Matrix<float>::Zero(tokens, config.d_model);
    for (int step = 0; step <= 40; ++step) {
      const switchmoe::SwitchOutput out = layer.forward(normed, switchmoe::Mode::kTrain);
      if (step % 10 == 0) {
        std::printf("  %4d   %8.4f   %.4f\n", step, out.stats.aux_loss, out.stats.dropped_fraction);
      }
      layer.zero_grad();
      layer.backward(no_task_gradient);
      layer.router_weight() -= 10.0f * layer.grad_router_weight();
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "switch_block: %s\n", e.what());
    return 1;
  }
}
