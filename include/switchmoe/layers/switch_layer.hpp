#pragma once
// The Switch layer (SEMANTICS 1): route each token, run every expert on its contiguous block of
// tokens, combine the outputs with the gates. Replaces a transformer's FFN block; the caller's
// residual connection carries dropped tokens on.
//
// The layer composes four parts and does no arithmetic of its own (STYLE: a composite composes,
// its parts compute). Plain data passes between them:
//
//   x --Router--> logits --RoutingScheme--> Routing --plan--> DispatchPlan (token, expert, gate)
//   x --gather--> rows by expert --Exchange--> ExpertInput --Experts--> outputs --Exchange-->
//   rows by expert --combine(gates)--> y
//
// and backward runs the same chain in reverse (combine_backward, the exchange's gradient trips,
// the experts' backward, the scheme's backward to dlogits, the router's backward, the adjoint
// of gather). Each part is a template argument with a default: a new expert type, routing
// scheme or exchange is a new part, not an edit of this file.

#include <cstdint>
#include <exception>
#include <string>
#include <type_traits>
#include <vector>

#include "switchmoe/dispatch/dispatch_plan.hpp"
#include "switchmoe/dispatch/exchange.hpp"
#include "switchmoe/experts/activation.hpp"
#include "switchmoe/experts/expert_ffn.hpp"
#include "switchmoe/experts/shared_gate.hpp"
#include "switchmoe/layers/stats.hpp"
#include "switchmoe/routing/route.hpp"
#include "switchmoe/routing/router.hpp"
#include "switchmoe/routing/scheme.hpp"

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
  // SEMANTICS 16: an always-on shared expert of this width (0: none), with the routed
  // experts' activation, added to every token; with shared_expert_gate its output is weighted
  // by sigmoid(x . w_s) (Qwen2-MoE), else by 1 (DeepSeekMoE).
  int shared_d_ff = 0;
  bool shared_expert_gate = false;
};

struct SwitchOutput {
  Matrix<float> y;  // [tokens, d_model]
  Routing routing;
  RoutingStats stats;
  float loss = 0.0f;  // aux_loss_coef * aux_loss + z_loss_coef * z_loss, to add to the task loss
};

/// Policy: precision (Fp32, Bf16). Activation: the experts' (Relu, Gelu).
/// RouterT: produces float32 logits from the tokens (Router<Policy>).
/// ExpertsT: the expert bank, run on rows grouped by expert (FeedForwardBank<Policy, Activation>).
/// SchemeT: logits to routing, plan and losses (RoutingScheme).
/// ExchangeT: moves rows to the experts' owners and back (LocalExchange: one process).
/// All parts must use the layer's precision policy.
///
/// Thread safety: one layer object serves one caller at a time (like an Eigen object); distinct
/// layers may be used from distinct threads concurrently. The OpenMP parallelism inside a call
/// is the library's own.
template <class Policy = Fp32, class Activation = Relu, class RouterT = Router<Policy>,
          class ExpertsT = FeedForwardBank<Policy, Activation>, class SchemeT = RoutingScheme,
          class ExchangeT = LocalExchange>
class SwitchLayer {
  static_assert(is_precision_v<Policy>,
                "SwitchLayer's first template argument must be a switchmoe precision policy "
                "(switchmoe::Fp32 or switchmoe::Bf16).");
  static_assert(std::is_same_v<typename RouterT::PolicyType, Policy>,
                "The router and the SwitchLayer disagree on the precision policy.");
  static_assert(std::is_same_v<typename ExpertsT::PolicyType, Policy>,
                "The experts and the SwitchLayer disagree on the precision policy.");

 public:
  using PolicyType = Policy;
  using ActivationType = Activation;
  using RouterType = RouterT;
  using Experts = ExpertsT;
  using Scheme = SchemeT;
  using Exchange = ExchangeT;

  explicit SwitchLayer(const SwitchConfig& config, ExchangeT exchange = ExchangeT())
      : config_(checked(config)),
        exchange_(std::move(exchange)),
        router_(RouterConfig{config.d_model, config.routing.num_experts, config.router_bias,
                             config.jitter_eps, config.init_scale, config.seed}),
        experts_(FeedForwardConfig{
            exchange_.num_local_experts(config.routing.num_experts), config.d_model, config.d_ff,
            config.expert_bias, config.expert_dropout, config.init_scale, config.seed,
            exchange_.first_expert(config.routing.num_experts), config.shared_d_ff}),
        shared_gate_(config.d_model, config.shared_expert_gate, config.init_scale, config.seed),
        scheme_(config.routing, LossCoefficients{config.aux_loss_coef, config.z_loss_coef},
                config.seed) {
    router_.append_parameters("router.", router_parameters_);
    // The shared expert is replicated like the router: its gradient is summed over processes.
    append_shared_parameters(router_parameters_);
  }

  const SwitchConfig& config() const { return config_; }
  int num_experts() const { return config_.routing.num_experts; }

  Matrix<float>& router_weight() { return router_.weight(); }  // [d_model, experts]
  Matrix<float>& router_bias() { return router_.bias(); }      // [1, experts] or empty
  Matrix<float>& grad_router_weight() { return router_.grad_weight(); }
  Matrix<float>& grad_router_bias() { return router_.grad_bias(); }
  // Per-expert accessors, by global expert index, reached through the expert bank.
  Matrix<float>& w_in(int e) { return experts_.w_in(e); }    // [d_model, d_ff]
  Matrix<float>& w_out(int e) { return experts_.w_out(e); }  // [d_ff, d_model]
  Matrix<float>& b_in(int e) { return experts_.b_in(e); }    // [1, d_ff]
  Matrix<float>& b_out(int e) { return experts_.b_out(e); }  // [1, d_model]
  Matrix<float>& grad_w_in(int e) { return experts_.grad_w_in(e); }
  Matrix<float>& grad_w_out(int e) { return experts_.grad_w_out(e); }
  Matrix<float>& grad_b_in(int e) { return experts_.grad_b_in(e); }
  Matrix<float>& grad_b_out(int e) { return experts_.grad_b_out(e); }
  // Gated activations (SwiGlu, GeGlu; SEMANTICS 15) only; otherwise they throw.
  Matrix<float>& w_gate(int e) { return experts_.w_gate(e); }  // [d_model, d_ff]
  Matrix<float>& b_gate(int e) { return experts_.b_gate(e); }  // [1, d_ff] or empty
  Matrix<float>& grad_w_gate(int e) { return experts_.grad_w_gate(e); }
  Matrix<float>& grad_b_gate(int e) { return experts_.grad_b_gate(e); }
  // The shared expert (SEMANTICS 16); each throws without one (shared_d_ff 0), the gate ones
  // without shared_expert_gate, the w_gate ones unless the activation is gated.
  Matrix<float>& shared_w_in() { return experts_.shared_w_in(); }      // [d_model, shared_d_ff]
  Matrix<float>& shared_w_out() { return experts_.shared_w_out(); }    // [shared_d_ff, d_model]
  Matrix<float>& shared_w_gate() { return experts_.shared_w_gate(); }  // [d_model, shared_d_ff]
  Matrix<float>& shared_b_in() { return experts_.shared_b_in(); }
  Matrix<float>& shared_b_out() { return experts_.shared_b_out(); }
  Matrix<float>& shared_b_gate() { return experts_.shared_b_gate(); }
  Matrix<float>& shared_gate_weight() { return gate_part("shared_gate_weight").weight(); }
  Matrix<float>& grad_shared_w_in() { return experts_.grad_shared_w_in(); }
  Matrix<float>& grad_shared_w_out() { return experts_.grad_shared_w_out(); }
  Matrix<float>& grad_shared_w_gate() { return experts_.grad_shared_w_gate(); }
  Matrix<float>& grad_shared_b_in() { return experts_.grad_shared_b_in(); }
  Matrix<float>& grad_shared_b_out() { return experts_.grad_shared_b_out(); }
  Matrix<float>& grad_shared_b_gate() { return experts_.grad_shared_b_gate(); }
  Matrix<float>& grad_shared_gate_weight() {
    return gate_part("grad_shared_gate_weight").grad_weight();
  }
  // SEMANTICS 19's selection bias [1, experts] (a buffer: see buffers()).
  Matrix<float>& balancing_bias() { return scheme_.balancing_bias(); }
  RouterType& router() { return router_; }
  Experts& experts() { return experts_; }
  Scheme& scheme() { return scheme_; }
  Exchange& exchange() { return exchange_; }

  /// Named parameters: "router.weight", ["router.bias"], "experts.<e>.w_in", ["experts.<e>.b_in"],
  /// "experts.<e>.w_out", ["experts.<e>.b_out"], in that order (gated: "experts.<e>.w_gate"
  /// ["b_gate"] before w_in); then the shared expert's "shared.w_in" etc. and
  /// "shared.gate_weight"; each with its role, owner and (for experts) global expert index.
  std::vector<ParameterRef> parameters() {
    std::vector<ParameterRef> out;
    router_.append_parameters("router.", out);
    experts_.append_parameters("experts.", false, out);
    append_shared_parameters(out);
    return out;
  }

  /// Layer state that is not trained by gradient (role kBuffer, grad nullptr), which
  /// checkpoints keep too.
  std::vector<ParameterRef> buffers() {
    std::vector<ParameterRef> out;
    scheme_.append_buffers("routing.", out);
    return out;
  }

  void zero_grad() {
    router_.zero_grad();
    experts_.zero_grad();
    shared_gate_.zero_grad();
  }

  /// See FeedForwardBank::sync_weights: call after the last edit of the weights when only
  /// forward calls follow, so the experts' compute copies (and the router's packed weight, for
  /// a router that keeps one) are not rebuilt at every call.
  void sync_weights() {
    sync_router_weights(router_, 0);
    experts_.sync_weights();
  }

  /// Routes x [tokens, d_model] and applies the experts. Mode::kTrain uses the training capacity
  /// factor, jitter and expert dropout, and keeps what backward needs.
  SwitchOutput forward(const Eigen::Ref<const Matrix<float>>& x, Mode mode) {
    SwitchOutput out;
    forward(x, mode, out);
    return out;
  }

  /// As above, into `out`, reusing its storage: once the layer and `out` have seen a call with
  /// as many tokens, a call allocates nothing. `x` must not alias `out.y`. On invalid input
  /// (shapes, non-finite values, resized parameters) the layer is as before the call; after any
  /// throw a following backward raises "no preceding training forward". An exception from
  /// inside the computation (std::bad_alloc, a user activation) leaves the call's outputs
  /// unspecified and may have advanced the dropout stream.
  void forward(const Eigen::Ref<const Matrix<float>>& x, Mode mode, SwitchOutput& out) {
    has_forward_ = false;
    std::exception_ptr error;
    try {
      detail::check_mode(mode);
      check_input("x", x);
      check_parameter_shapes();
    } catch (...) {
      error = std::current_exception();
    }
    first_token_ = exchange_.begin_call(x.rows(), mode, error);
    const std::uint64_t jitter_calls = router_.jitter_calls();
    try {
      router_.forward(x, mode, out.routing.logits, first_token_);
      scheme_.route(out.routing.logits, mode, first_token_, out.routing);
      // Bf16RouterAblation (paper Table 2, breaks SEMANTICS 13 on purpose): a bfloat16
      // softmax's output; the losses were computed from the float32 probabilities.
      if constexpr (std::is_same_v<typename Policy::RouterElement, Eigen::bfloat16>) {
        detail::round_to_bf16(out.routing.probs);
        detail::round_to_bf16(out.routing.gate);
      }
    } catch (...) {
      error = std::current_exception();
      router_.set_jitter_calls(jitter_calls);  // the failed call draws nothing
    }
    exchange_.agree(error);  // e.g. non-finite logits from a non-finite router weight
    exchange_.reduce_losses(out.routing, loss_scale_);
    scheme_.plan(out.routing, plan_);
    apply_experts(x, mode, out.y);
    scheme_.end_route(out.routing, mode, exchange_);  // e.g. state updated from global loads
    detail::routing_stats_unchecked(out.routing, num_experts(), out.stats);
    exchange_.reduce_stats(out.stats);
    out.loss = scheme_.loss(out.routing);
    if (mode == Mode::kTrain) routing_ = out.routing;
    has_forward_ = mode == Mode::kTrain;
  }

  /// Applies the experts to x [tokens, d_model] under a given routing (no router, no losses,
  /// evaluation mode). Returns y [tokens, d_model]. Throws std::invalid_argument if the routing
  /// is not a consistent routing of x's tokens over this layer's experts.
  Matrix<float> forward(const Eigen::Ref<const Matrix<float>>& x, const Routing& routing) {
    has_forward_ = false;
    std::exception_ptr error;
    try {
      check_input("x", x);
      check_parameter_shapes();
      detail::check_routing(routing, x.rows(), num_experts());
      detail::build_dispatch_plan(routing, num_experts(), /*check_slots=*/true, plan_);
    } catch (...) {
      error = std::current_exception();
    }
    first_token_ = exchange_.begin_call(x.rows(), Mode::kEval, error);
    Matrix<float> y;
    apply_experts(x, Mode::kEval, y);
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
    std::exception_ptr error;
    try {
      if (!has_forward_) {
        detail::fail("SwitchLayer::backward called without a preceding forward(x, Mode::kTrain)");
      }
      detail::check_shape("dy", dy, routing_.num_tokens(), config_.d_model);
      check_input("dy", dy);
      check_parameter_shapes();
      experts_.check_gradient_shapes();
    } catch (...) {
      error = std::current_exception();
    }
    exchange_.agree(error);
    // Replicated parameters (the router, the shared expert and its gate) get this call's
    // gradient summed over processes: everything they accumulate from here on is included.
    exchange_.begin_replicated_backward(router_parameters_);
    const Eigen::Index rows = plan_.num_rows();
    const int d_model = config_.d_model;
    // Combine backward: dyg[r] = gate[r] * dy[t]; dgate[r] = dy[t] . yg[r] (kept rows only).
    auto dyg = dyg_.resize(rows, d_model);
    detail::combine_backward_rows(dy, yg_.view(), plan_, dyg, dgate_rows_);
    dxg_.resize(rows, d_model);
    const ExpertInput<Element> input = exchange_.received(xg_, plan_.offsets, row_keys_);
    if (experts_.has_shared()) {
      // The shared FFN's output gradient s * dy, in the same batched products (SEMANTICS 16).
      const Eigen::Index tokens = dy.rows();
      auto dys = dys_.resize(tokens, d_model);
      shared_gate_.backward_scale(dy, ys_.view(), dys);
      experts_.backward(
          input.rows, input.offsets, exchange_.dispatch_gradient(dyg_),
          exchange_.expert_input_gradient(dxg_), dys_.view(),
          SharedRows<Element>{xs_.view(), first_token_, dxs_.resize(tokens, d_model)});
    } else {
      experts_.backward(input.rows, input.offsets, exchange_.dispatch_gradient(dyg_),
                        exchange_.expert_input_gradient(dxg_));
    }
    exchange_.return_input_gradient(dxg_);
    scheme_.backward(routing_, plan_, dgate_rows_, loss_scale_, dlogits_);
    router_.backward(dlogits_, dx);  // [tokens, d_model]
    if (experts_.has_shared()) {
      // SEMANTICS 16: the shared FFN ran on every token; its input gradient and the learned
      // gate's join the router's (all replicated parameters inside the replicated section).
      dx += dxs_.view();
      shared_gate_.backward_input(Eigen::Ref<Matrix<float>>(dx));
    }
    exchange_.end_replicated_backward(router_parameters_);
    detail::gather_backward_rows(dxg_.view(), plan_, dx);
  }

 private:
  using Element = typename Policy::Element;

  static const SwitchConfig& checked(const SwitchConfig& config) {
    detail::validate(config.routing);
    if (config.d_model < 1)
      detail::fail("SwitchConfig::d_model is ", config.d_model, ", expected >= 1");
    if (config.d_ff < 1) detail::fail("SwitchConfig::d_ff is ", config.d_ff, ", expected >= 1");
    if (config.shared_d_ff < 0) {
      detail::fail("SwitchConfig::shared_d_ff is ", config.shared_d_ff,
                   ", expected >= 0 (0: no shared expert)");
    }
    if (config.shared_expert_gate && config.shared_d_ff == 0) {
      detail::fail(
          "SwitchConfig::shared_expert_gate is true with shared_d_ff = 0, expected a "
          "shared expert (shared_d_ff > 0) to gate");
    }
    if (!(config.expert_dropout >= 0.0f && config.expert_dropout < 1.0f)) {
      detail::fail("SwitchConfig::expert_dropout is ", config.expert_dropout,
                   ", expected in [0, 1)");
    }
    if (!(config.jitter_eps >= 0.0f && config.jitter_eps < 1.0f)) {
      detail::fail("SwitchConfig::jitter_eps is ", config.jitter_eps, ", expected in [0, 1)");
    }
    if (!(config.init_scale >= 0.0f) || !std::isfinite(config.init_scale)) {
      detail::fail("SwitchConfig::init_scale is ", config.init_scale,
                   ", expected a finite value >= 0");
    }
    detail::check_coefficient("SwitchConfig::aux_loss_coef", config.aux_loss_coef);
    detail::check_coefficient("SwitchConfig::z_loss_coef", config.z_loss_coef);
    return config;
  }

  void check_input(const char* name, const Eigen::Ref<const Matrix<float>>& m) const {
    detail::check_shape(name, m, -1, config_.d_model);
    detail::check_finite(name, m);
  }

  void check_parameter_shapes() const {
    router_.check_parameter_shapes();
    experts_.check_parameter_shapes();
    shared_gate_.check_parameter_shapes(config_.d_model);
  }

  template <class R>
  static auto sync_router_weights(R& router, int) -> decltype(router.sync_weights(), void()) {
    router.sync_weights();
  }
  template <class R>
  static void sync_router_weights(R&, long) {}  // a router without packed weights

  SharedExpertGate& gate_part(const char* name) {
    if (!shared_gate_.learned()) {
      detail::fail(name,
                   ": the layer has no shared expert gate (SwitchConfig::shared_expert_gate "
                   "is false; SEMANTICS 16)");
    }
    return shared_gate_;
  }

  void append_shared_parameters(std::vector<ParameterRef>& out) {
    experts_.append_shared_parameters("shared.", out);
    shared_gate_.append_parameters("shared.", out);
  }

  /// y [tokens, d_model] = the experts applied to x under plan_ (gather, exchange, expert bank,
  /// exchange, combine), through buffers kept between calls.
  void apply_experts(const Eigen::Ref<const Matrix<float>>& x, Mode mode, Matrix<float>& y) {
    const int d_model = config_.d_model;
    const Eigen::Index rows = plan_.num_rows();
    // Reserve for the most rows any routing of this many tokens can keep (and the experts for
    // the most rows they can receive), so that the buffers stop growing after the first call.
    const auto rows_for_tokens = [&](Eigen::Index n) { return scheme_.max_rows(n, mode); };
    const Eigen::Index max_rows = rows_for_tokens(x.rows());
    const bool shared = experts_.has_shared();
    experts_.reserve_rows(exchange_.max_received_rows(x.rows(), rows_for_tokens),
                          shared ? x.rows() : 0);
    dgate_rows_.reserve(static_cast<std::size_t>(max_rows));
    xg_.reserve(max_rows * d_model);
    yg_.reserve(max_rows * d_model);
    dyg_.reserve(max_rows * d_model);
    dxg_.reserve(max_rows * d_model);
    row_keys_.reserve(static_cast<std::size_t>(max_rows));
    auto xg = xg_.resize(rows, d_model);  // [rows, d_model] gathered tokens, Element
    detail::gather_rows<Element>(x, plan_, xg);
    detail::row_keys(plan_, first_token_, row_keys_);
    const ExpertInput<Element> input = exchange_.dispatch(xg_, plan_.offsets, row_keys_);
    yg_.resize(rows, d_model);  // [rows, d_model] expert outputs before the gates
    if (shared) {
      // SEMANTICS 16: the shared FFN on every local token, in the routed experts' products.
      shared_gate_.reserve(x.rows(), d_model);
      auto xs = xs_.resize(x.rows(), d_model);  // [tokens, d_model] Element
      detail::parallel_for(x.rows(), d_model,
                           [&](Eigen::Index t) { xs.row(t) = x.row(t).template cast<Element>(); });
      experts_.forward(
          input.rows, input.offsets, mode, input.dropout_keys, exchange_.expert_output(yg_),
          SharedRows<Element>{xs_.view(), first_token_, ys_.resize(x.rows(), d_model)});
    } else {
      experts_.forward(input.rows, input.offsets, mode, input.dropout_keys,
                       exchange_.expert_output(yg_));
    }
    exchange_.return_output(yg_);
    y.resize(x.rows(), d_model);
    detail::combine_rows(
        yg_.view(), plan_, [&](int r) { return plan_.gate[r]; }, Eigen::Ref<Matrix<float>>(y));
    // y[t] += s[t] * Shared(x[t]): never dropped, whatever the routing kept.
    if (shared) shared_gate_.forward(x, ys_.view(), mode, Eigen::Ref<Matrix<float>>(y));
  }

  SwitchConfig config_;
  ExchangeT exchange_;  // before the experts: it decides which experts this process holds
  RouterType router_;
  Experts experts_;
  SharedExpertGate shared_gate_;  // s[t] of SEMANTICS 16 (1 unless shared_expert_gate)
  Scheme scheme_;
  std::vector<ParameterRef> router_parameters_;  // replicated parameters, for the exchange
  // Kept from the last forward for backward, and per-call buffers (reused, grow only).
  Routing routing_;
  DispatchPlan plan_;
  LossScale loss_scale_;
  std::int64_t first_token_ = 0;         // global index of this call's first token
  detail::RowBuffer<Element> xg_;        // [rows, d_model] gathered tokens
  detail::RowBuffer<float> yg_;          // [rows, d_model] expert outputs, no gates
  detail::RowBuffer<float> dyg_, dxg_;   // [rows, d_model] backward
  detail::RowBuffer<Element> xs_;        // [tokens, d_model] shared expert input (SEMANTICS 16)
  detail::RowBuffer<float> ys_;          // [tokens, d_model] shared expert output, before s
  detail::RowBuffer<float> dys_, dxs_;   // [tokens, d_model] its backward
  std::vector<std::uint64_t> row_keys_;  // [rows] dropout key of each gathered row
  std::vector<float> dgate_rows_;        // [rows] d loss / d gate of each row
  Matrix<float> dlogits_;                // [tokens, experts]
  bool has_forward_ = false;
};

}  // namespace switchmoe
