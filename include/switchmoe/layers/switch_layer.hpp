#pragma once
// The Switch layer (SEMANTICS 1): route each token, run every expert on its contiguous block of
// tokens, combine the outputs with the gates. Replaces a transformer's FFN block; the caller's
// residual connection carries dropped tokens on.

#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "switchmoe/dispatch/dispatch_plan.hpp"
#include "switchmoe/experts/activation.hpp"
#include "switchmoe/experts/expert_ffn.hpp"
#include "switchmoe/layers/stats.hpp"
#include "switchmoe/routing/route.hpp"
#include "switchmoe/routing/router.hpp"

namespace switchmoe {

struct SwitchConfig {
  int d_model = 0, d_ff = 0;  // d_ff of one expert
  RoutingOptions routing;
  bool expert_bias = false;
  bool router_bias = false;
  float aux_loss_coef = 0.01f, z_loss_coef = 0.0f;  // alpha of SEMANTICS 8, SEMANTICS 9
  float jitter_eps = 0.01f;                         // SEMANTICS 3; 0 turns jitter off
  float expert_dropout = 0.0f;                      // SEMANTICS 12
  float init_scale = 0.1f;                          // SEMANTICS 11
  std::uint64_t seed = 0;                           // drives initialization, jitter and dropout
};

struct SwitchOutput {
  Matrix<float> y;  // [tokens, d_model]
  Routing routing;
  RoutingStats stats;
  float loss = 0.0f;  // aux_loss_coef * aux_loss + z_loss_coef * z_loss, to add to the task loss
};

/// Policy: precision (Fp32, Bf16). Activation: the experts' (Relu, Gelu). RouterT: produces
/// float32 logits from the tokens (forward, backward, weight, grad_weight, append_parameters);
/// it must use the same precision policy as the layer.
template <class Policy = Fp32, class Activation = Relu, class RouterT = Router<Policy>>
class SwitchLayer {
  static_assert(is_precision_v<Policy>,
                "SwitchLayer's first template argument must be a switchmoe precision policy "
                "(switchmoe::Fp32 or switchmoe::Bf16).");

 public:
  using PolicyType = Policy;
  using ActivationType = Activation;
  using Experts = FeedForwardBank<Policy, Activation>;
  using RouterType = RouterT;
  static_assert(std::is_same_v<typename RouterType::PolicyType, typename Experts::PolicyType>,
                "The router and the experts of a SwitchLayer disagree on the precision policy.");

  explicit SwitchLayer(const SwitchConfig& config)
      : config_(checked(config)),
        router_(RouterConfig{config.d_model, config.routing.num_experts, config.router_bias,
                             config.jitter_eps, config.init_scale, config.seed}),
        experts_(FeedForwardConfig{config.routing.num_experts, config.d_model, config.d_ff,
                                   config.expert_bias, config.expert_dropout, config.init_scale,
                                   config.seed}) {}

  const SwitchConfig& config() const { return config_; }
  int num_experts() const { return config_.routing.num_experts; }

  Matrix<float>& router_weight() { return router_.weight(); }  // [d_model, experts]
  Matrix<float>& router_bias() { return router_.bias(); }      // [1, experts] or empty
  Matrix<float>& w_in(int e) { return experts_.w_in(e); }      // [d_model, d_ff]
  Matrix<float>& w_out(int e) { return experts_.w_out(e); }    // [d_ff, d_model]
  Matrix<float>& b_in(int e) { return experts_.b_in(e); }      // [1, d_ff]
  Matrix<float>& b_out(int e) { return experts_.b_out(e); }    // [1, d_model]
  Matrix<float>& grad_router_weight() { return router_.grad_weight(); }
  Matrix<float>& grad_router_bias() { return router_.grad_bias(); }
  Matrix<float>& grad_w_in(int e) { return experts_.grad_w_in(e); }
  Matrix<float>& grad_w_out(int e) { return experts_.grad_w_out(e); }
  Matrix<float>& grad_b_in(int e) { return experts_.grad_b_in(e); }
  Matrix<float>& grad_b_out(int e) { return experts_.grad_b_out(e); }
  RouterType& router() { return router_; }
  Experts& experts() { return experts_; }

  /// Named parameters: "router.weight", ["router.bias"], "experts.<e>.w_in", ["experts.<e>.b_in"],
  /// "experts.<e>.w_out", ["experts.<e>.b_out"], in that order.
  std::vector<ParameterRef> parameters() {
    std::vector<ParameterRef> out;
    router_.append_parameters("router.", out);
    experts_.append_parameters("experts.", false, out);
    return out;
  }

  void zero_grad() {
    router_.zero_grad();
    experts_.zero_grad();
  }

  /// See FeedForwardBank::sync_weights: call after the last edit of the weights when only
  /// forward calls follow, so bf16 compute copies are not rebuilt at every call.
  void sync_weights() { experts_.sync_weights(); }

  /// Routes x [tokens, d_model] and applies the experts. Mode::kTrain uses the training capacity
  /// factor, jitter and expert dropout, and keeps what backward needs.
  SwitchOutput forward(const Eigen::Ref<const Matrix<float>>& x, Mode mode) {
    detail::check_shape("x", x, -1, config_.d_model);
    detail::check_finite("x", x);
    SwitchOutput out;
    out.routing = route(router_.forward(x, mode), config_.routing, mode);
    out.y = apply_experts(x, out.routing, mode);
    out.stats = routing_stats(out.routing, num_experts());
    out.loss =
        config_.aux_loss_coef * out.routing.aux_loss + config_.z_loss_coef * out.routing.z_loss;
    if (mode == Mode::kTrain) routing_ = out.routing;
    has_forward_ = mode == Mode::kTrain;
    return out;
  }

  /// Applies the experts to x [tokens, d_model] under a given routing (no router, no losses,
  /// evaluation mode). Returns y [tokens, d_model].
  Matrix<float> forward(const Eigen::Ref<const Matrix<float>>& x, const Routing& routing) {
    detail::check_shape("x", x, -1, config_.d_model);
    detail::check_finite("x", x);
    detail::check_routing(routing, x.rows(), num_experts());
    has_forward_ = false;
    return apply_experts(x, routing, Mode::kEval);
  }

  /// Gradient of sum(dy .* y) + aux_loss_coef * aux + z_loss_coef * z with respect to x, after a
  /// forward(x, Mode::kTrain); parameter gradients accumulate until zero_grad(). dy is
  /// [tokens, d_model]; returns dx [tokens, d_model].
  Matrix<float> backward(const Eigen::Ref<const Matrix<float>>& dy) {
    if (!has_forward_) {
      detail::fail("SwitchLayer::backward called without a preceding forward(x, Mode::kTrain)");
    }
    const Eigen::Index tokens = routing_.expert.rows();
    const int k = static_cast<int>(routing_.expert.cols());
    detail::check_shape("dy", dy, tokens, config_.d_model);
    // Combine backward: dyg[r] = gate * dy[t]; dgate(t, c) = dy[t] . yg[r] (kept choices only).
    Matrix<float>& dyg = dyg_;  // [rows, d_model]
    dyg.resize(plan_.num_rows(), config_.d_model);
    Matrix<float> dgate = Matrix<float>::Zero(tokens, k);  // [tokens, k]
    detail::parallel_for(plan_.num_rows(), 2 * config_.d_model, [&](Eigen::Index r) {
      const int t = plan_.token[r], c = plan_.choice[r];
      dyg.row(r) = routing_.gate(t, c) * dy.row(t);
      dgate(t, c) = dy.row(t).dot(yg_.row(r));
    });
    Matrix<float>& dxg = dxg_;  // [rows, d_model]
    experts_.backward(xg_, plan_.offsets, dyg, dxg);
    const Matrix<float> dlogits = route_backward(routing_, dgate, config_.routing,
                                                 config_.aux_loss_coef, config_.z_loss_coef);
    Matrix<float> dx = router_.backward(dlogits);  // [tokens, d_model]
    detail::parallel_for(tokens, k * config_.d_model, [&](Eigen::Index t) {
      for (int c = 0; c < k; ++c) {  // in choice order, so the sum does not depend on threads
        const int r = plan_.row[t * k + c];
        if (r >= 0) dx.row(t) += dxg.row(r);
      }
    });
    return dx;
  }

 private:
  static const SwitchConfig& checked(const SwitchConfig& config) {
    detail::validate(config.routing);
    if (config.d_model < 1)
      detail::fail("SwitchConfig::d_model is ", config.d_model, ", expected >= 1");
    if (config.d_ff < 1) detail::fail("SwitchConfig::d_ff is ", config.d_ff, ", expected >= 1");
    if (!(config.expert_dropout >= 0.0f && config.expert_dropout < 1.0f)) {
      detail::fail("SwitchConfig::expert_dropout is ", config.expert_dropout,
                   ", expected in [0, 1)");
    }
    if (!(config.jitter_eps >= 0.0f && config.jitter_eps < 1.0f)) {
      detail::fail("SwitchConfig::jitter_eps is ", config.jitter_eps, ", expected in [0, 1)");
    }
    return config;
  }

  Matrix<float> apply_experts(const Eigen::Ref<const Matrix<float>>& x, const Routing& routing,
                              Mode mode) {
    plan_ = make_dispatch_plan(routing, num_experts());
    gather(x, plan_, xg_);
    std::vector<std::uint64_t> keys(static_cast<std::size_t>(plan_.num_rows()));
    for (int r = 0; r < plan_.num_rows(); ++r) {
      keys[r] = static_cast<std::uint64_t>(plan_.token[r]) * plan_.top_k + plan_.choice[r];
    }
    experts_.forward(xg_, plan_.offsets, mode, keys, yg_);
    Matrix<float> y;  // [tokens, d_model]
    combine(yg_, plan_, routing, y);
    return y;
  }

  SwitchConfig config_;
  RouterType router_;
  Experts experts_;
  // Kept from the last forward for backward.
  Routing routing_;
  DispatchPlan plan_;
  Matrix<typename Policy::Element> xg_;  // [rows, d_model] gathered tokens
  Matrix<float> yg_;                     // [rows, d_model] expert outputs before the gates
  Matrix<float> dyg_, dxg_;              // [rows, d_model] backward workspaces
  bool has_forward_ = false;
};

}  // namespace switchmoe
