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
    SwitchOutput out;
    forward(x, mode, out);
    return out;
  }

  /// As above, into `out`, reusing its storage: once the layer and `out` have seen a call with
  /// as many tokens, a call allocates nothing.
  void forward(const Eigen::Ref<const Matrix<float>>& x, Mode mode, SwitchOutput& out) {
    detail::check_shape("x", x, -1, config_.d_model);
    detail::check_finite("x", x);
    has_forward_ = false;
    router_.forward(x, mode, out.routing.logits);
    route(out.routing.logits, config_.routing, mode, out.routing);
    apply_experts(x, out.routing, mode, out.y);
    routing_stats(out.routing, num_experts(), out.stats);
    out.loss =
        config_.aux_loss_coef * out.routing.aux_loss + config_.z_loss_coef * out.routing.z_loss;
    if (mode == Mode::kTrain) routing_ = out.routing;
    has_forward_ = mode == Mode::kTrain;
  }

  /// Applies the experts to x [tokens, d_model] under a given routing (no router, no losses,
  /// evaluation mode). Returns y [tokens, d_model].
  Matrix<float> forward(const Eigen::Ref<const Matrix<float>>& x, const Routing& routing) {
    detail::check_shape("x", x, -1, config_.d_model);
    detail::check_finite("x", x);
    detail::check_routing(routing, x.rows(), num_experts());
    has_forward_ = false;
    Matrix<float> y;
    apply_experts(x, routing, Mode::kEval, y);
    return y;
  }

  /// Gradient of sum(dy .* y) + aux_loss_coef * aux + z_loss_coef * z with respect to x, after a
  /// forward(x, Mode::kTrain); parameter gradients accumulate until zero_grad(). dy is
  /// [tokens, d_model]; returns dx [tokens, d_model].
  Matrix<float> backward(const Eigen::Ref<const Matrix<float>>& dy) {
    Matrix<float> dx;
    backward(dy, dx);
    return dx;
  }

  /// As above, into dx (resized to [tokens, d_model]; no allocation when it already has that
  /// shape).
  void backward(const Eigen::Ref<const Matrix<float>>& dy, Matrix<float>& dx) {
    if (!has_forward_) {
      detail::fail("SwitchLayer::backward called without a preceding forward(x, Mode::kTrain)");
    }
    const Eigen::Index tokens = routing_.expert.rows();
    const int k = static_cast<int>(routing_.expert.cols());
    const int d_model = config_.d_model;
    detail::check_shape("dy", dy, tokens, d_model);
    // Combine backward: dyg[r] = gate * dy[t]; dgate(t, c) = dy[t] . yg[r] (kept choices only).
    const Eigen::Index rows = plan_.num_rows();
    auto dyg = dyg_.resize(rows, d_model);
    const auto yg = yg_.view();
    dgate_.setZero(tokens, k);
    detail::parallel_for(rows, 2 * d_model, [&](Eigen::Index r) {
      const int t = plan_.token[r], c = plan_.choice[r];
      dyg.row(r) = routing_.gate(t, c) * dy.row(t);
      dgate_(t, c) = dy.row(t).dot(yg.row(r));
    });
    auto dxg = dxg_.resize(rows, d_model);
    experts_.backward(xg_.view(), plan_.offsets, dyg, dxg);
    route_backward(routing_, dgate_, config_.routing, config_.aux_loss_coef, config_.z_loss_coef,
                   dlogits_);
    router_.backward(dlogits_, dx);  // [tokens, d_model]
    detail::parallel_for(tokens, k * d_model, [&](Eigen::Index t) {
      for (int c = 0; c < k; ++c) {  // in choice order, so the sum does not depend on threads
        const int r = plan_.row[t * k + c];
        if (r >= 0) dx.row(t) += dxg.row(r);
      }
    });
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

  /// y [tokens, d_model] = the experts applied to x under `routing` (gather, expert bank,
  /// combine), through buffers kept between calls.
  void apply_experts(const Eigen::Ref<const Matrix<float>>& x, const Routing& routing, Mode mode,
                     Matrix<float>& y) {
    using Element = typename Policy::Element;
    const int d_model = config_.d_model;
    make_dispatch_plan(routing, num_experts(), plan_);
    const Eigen::Index rows = plan_.num_rows();
    // Reserve for the most rows any routing of this many tokens can keep, so that the buffers
    // stop growing after the first call.
    const Eigen::Index max_rows = x.rows() * plan_.top_k;
    experts_.reserve_rows(max_rows);
    xg_.reserve(max_rows * d_model);
    yg_.reserve(max_rows * d_model);
    dyg_.reserve(max_rows * d_model);
    dxg_.reserve(max_rows * d_model);
    row_keys_.reserve(static_cast<std::size_t>(max_rows));
    auto xg = xg_.resize(rows, d_model);  // gathered tokens, Element
    gather<Element>(x, plan_, xg);
    row_keys_.resize(static_cast<std::size_t>(rows));
    for (Eigen::Index r = 0; r < rows; ++r) {
      row_keys_[r] = static_cast<std::uint64_t>(plan_.token[r]) * plan_.top_k + plan_.choice[r];
    }
    auto yg = yg_.resize(rows, d_model);  // expert outputs before the gates
    experts_.forward(xg, plan_.offsets, mode, row_keys_, yg);
    combine(yg, plan_, routing, y);
  }

  SwitchConfig config_;
  RouterType router_;
  Experts experts_;
  // Kept from the last forward for backward, and per-call buffers (reused, grow only).
  Routing routing_;
  DispatchPlan plan_;
  detail::RowBuffer<typename Policy::Element> xg_;  // [rows, d_model] gathered tokens
  detail::RowBuffer<float> yg_;                     // [rows, d_model] expert outputs, no gates
  detail::RowBuffer<float> dyg_, dxg_;              // [rows, d_model] backward
  std::vector<std::uint64_t> row_keys_;             // [rows] dropout key of each gathered row
  Matrix<float> dlogits_, dgate_;                   // [tokens, experts], [tokens, k]
  bool has_forward_ = false;
};

}  // namespace switchmoe
