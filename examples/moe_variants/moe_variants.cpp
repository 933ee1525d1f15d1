// Modern MoE layers built from switchmoe's parts (SEMANTICS 15-20), run on clustered tokens,
// printing what each did:
//   - Mixtral-shaped: SwiGLU experts, top-2 with renormalized gates, dropless;
//   - DeepSeek-V3-shaped: sigmoid scores, auxiliary-loss-free bias balancing, top-2
//     renormalized with routed scaling 2.5, and an always-on shared expert;
//   - expert choice (Zhou et al. 2022): every expert takes its top-C tokens.
//
//   moe_variants [tokens] [experts]

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <switchmoe/switchmoe.hpp>
#include <vector>

namespace {

using switchmoe::Matrix;
using switchmoe::Mode;

/// Tokens drawn around a few cluster centres, so that a router has structure to find.
Matrix<float> clustered_tokens(int tokens, int d_model, int clusters) {
  Matrix<float> centres = Matrix<float>::Random(clusters, d_model) * 2.0f;
  Matrix<float> x = Matrix<float>::Random(tokens, d_model) * 0.3f;  // [tokens, d_model]
  for (int t = 0; t < tokens; ++t) x.row(t) += centres.row(t % clusters);
  return x;
}

void print_loads(const char* what, const std::vector<int>& load) {
  std::printf("  %-22s", what);
  for (int l : load) std::printf(" %5d", l);
  std::printf("\n");
}

double mean_gate_sum(const switchmoe::Routing& r) {  // per token, over its kept choices
  return r.num_tokens() ? r.gate.sum() / r.num_tokens() : 0.0;
}

void mixtral(int tokens, int experts, const Matrix<float>& x) {
  switchmoe::SwitchConfig config;
  config.d_model = static_cast<int>(x.cols());
  config.d_ff = 128;
  config.routing.num_experts = experts;
  config.routing.top_k = 2;
  config.routing.renormalize = true;
  config.routing.dropless = true;
  config.aux_loss_coef = 0.02f;  // Mixtral's router_aux_loss_coef
  config.seed = 1;
  switchmoe::SwitchLayer<switchmoe::Bf16, switchmoe::SwiGlu> layer(config);
  layer.router_weight() *= 8.0f;  // an opinionated untrained router
  const switchmoe::SwitchOutput out = layer.forward(x, Mode::kTrain);
  const Matrix<float> dx = layer.backward(Matrix<float>::Ones(tokens, config.d_model));
  std::printf("\n== Mixtral-shaped: bf16 SwiGLU experts, top-2 renormalized, dropless ==\n");
  print_loads("choices per expert", out.stats.tokens_per_expert);
  print_loads("kept per expert", out.stats.kept_tokens_per_expert);
  std::printf("  dropped fraction       %.4f  (dropless)\n", out.stats.dropped_fraction);
  std::printf("  gate sum per token     %.4f  (renormalized: 1)\n", mean_gate_sum(out.routing));
  std::printf("  load-balancing loss    %.4f  (2.0 is perfect balance for top-2)\n",
              out.stats.aux_loss);
  std::printf("  parameters             %zu  (router, then w_gate, w_in, w_out per expert)\n",
              layer.parameters().size());
  std::printf("  |grad w_gate(0)|       %.4g   |dx| %.4g\n", layer.grad_w_gate(0).norm(),
              dx.norm());
}

void deepseek(int tokens, int experts, const Matrix<float>& x) {
  switchmoe::SwitchConfig config;
  config.d_model = static_cast<int>(x.cols());
  config.d_ff = 64;
  config.shared_d_ff = 128;  // two shared experts of width 64, fused (DeepSeekMoE)
  config.routing.num_experts = experts;
  config.routing.top_k = 2;
  config.routing.score = switchmoe::ScoreFunction::kSigmoid;
  config.routing.renormalize = true;
  config.routing.routed_scaling = 2.5f;
  config.routing.bias_update_rate = 0.01f;  // DeepSeek-V3: 1e-3 over many more steps
  config.routing.capacity_factor = 2.0;     // 1.0 per choice: balance decides what is dropped
  config.aux_loss_coef = 0.0f;              // auxiliary-loss-free: the bias balances
  config.seed = 2;
  switchmoe::SwitchLayer<switchmoe::Fp32, switchmoe::SwiGlu> layer(config);
  layer.router_weight() *= 8.0f;
  std::printf(
      "\n== DeepSeek-V3-shaped: sigmoid scores, bias balancing (u = 0.01), top-2 renormalized "
      "x 2.5, shared expert (width 128) ==\n");
  std::printf("  step   max load   min load   dropped   bias range\n");
  switchmoe::SwitchOutput out;
  for (int step = 0; step <= 100; ++step) {
    layer.forward(x, Mode::kTrain, out);  // each training forward updates the bias (rule 19)
    if (step % 20 == 0) {
      const auto& load = out.stats.tokens_per_expert;
      const Matrix<float>& b = layer.balancing_bias();
      std::printf("  %4d   %8d   %8d   %7.4f   [%+.3f, %+.3f]\n", step,
                  *std::max_element(load.begin(), load.end()),
                  *std::min_element(load.begin(), load.end()), out.stats.dropped_fraction,
                  b.minCoeff(), b.maxCoeff());
    }
  }
  std::printf("  mean load              %d  (tokens * k / experts)\n", tokens * 2 / experts);
  std::printf("  gate sum per token     %.4f  (2.5 x renormalized, less the dropped choices)\n",
              mean_gate_sum(out.routing));
  std::printf("  router confidence      %.4f  (mean kept gate; from the unbiased scores)\n",
              out.stats.router_confidence);
  // Rule 16: with every routed choice dropped, a token still gets the shared expert.
  switchmoe::Routing none_kept = out.routing;
  none_kept.slot.setConstant(-1);
  none_kept.gate.setZero();
  const Matrix<float> shared_only = layer.forward(x, none_kept);  // [tokens, d_model]
  std::printf("  every choice dropped   mean |y| = %.4f per token (the shared expert alone)\n",
              shared_only.rowwise().norm().mean());
  std::printf("  buffers                %s [1, %ld]\n", layer.buffers()[0].name.c_str(),
              static_cast<long>(layer.balancing_bias().cols()));
}

void expert_choice(int experts, const Matrix<float>& x) {
  switchmoe::SwitchConfig config;
  config.d_model = static_cast<int>(x.cols());
  config.d_ff = 128;
  config.routing.num_experts = experts;
  config.routing.method = switchmoe::RoutingMethod::kExpertChoice;
  config.routing.capacity_factor = 2.0;  // the paper's c: each token gets 2 experts on average
  config.seed = 3;
  switchmoe::SwitchLayer<switchmoe::Fp32, switchmoe::SwiGlu> layer(config);
  layer.router_weight() *= 8.0f;
  const switchmoe::SwitchOutput out = layer.forward(x, Mode::kTrain);
  std::vector<int> experts_of_token(experts + 1, 0);  // histogram of experts per token
  for (Eigen::Index t = 0; t < out.routing.num_tokens(); ++t) {
    ++experts_of_token[(out.routing.slot.row(t).array() >= 0).count()];
  }
  std::printf("\n== Expert choice (capacity factor 2): each expert takes its top %d tokens ==\n",
              out.routing.capacity);
  print_loads("tokens per expert", out.stats.kept_tokens_per_expert);
  std::printf("  experts per token      ");
  for (int n = 0; n <= experts; ++n) {
    if (experts_of_token[n]) std::printf(" %d: %d tokens ", n, experts_of_token[n]);
  }
  std::printf("\n  tokens no expert took  %ld (their output is 0; the residual carries them)\n",
              static_cast<long>(out.stats.dropped_tokens));
  std::printf("  load-balancing loss    %.4f  (none: balanced by construction)\n",
              out.stats.aux_loss);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const int tokens = argc > 1 ? std::atoi(argv[1]) : 512;
    const int experts = argc > 2 ? std::atoi(argv[2]) : 8;
    const Matrix<float> x = clustered_tokens(tokens, 64, 6);  // [tokens, d_model]
    mixtral(tokens, experts, x);
    deepseek(tokens, experts, x);
    expert_choice(experts, x);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moe_variants: %s\n", e.what());
    return 1;
  }
}
