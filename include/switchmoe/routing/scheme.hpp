#pragma once
// The routing part of a Switch layer: from router logits to a routing (SEMANTICS 2, 4-9), the
// dispatch plan the experts consume, the auxiliary losses, and the gradient of all of it with
// respect to the logits (SEMANTICS 10). RoutingScheme routes as its RoutingOptions say; another
// scheme is another class with the same members, passed to SwitchLayer as a template argument.
//
// Members a layer relies on (the routing-scheme concept):
//   RoutingScheme(const RoutingOptions&, LossCoefficients, seed)  validates once
//   int num_experts() const; const RoutingOptions& options() const
//   void route(logits, mode, first_token, Routing&)   the logits are checked to be finite
//   void end_route(const Routing&, mode, Exchange&)   after the losses are made global
//   void plan(const Routing&, DispatchPlan&)          rows of (token, expert, gate) by expert
//   Eigen::Index max_rows(tokens, mode) const         the most rows a routing can keep
//   float loss(const Routing&) const                  what the layer adds to the task loss
//   void backward(routing, plan, dgate_rows, LossScale, dlogits)
//   void append_buffers(prefix, std::vector<ParameterRef>&)  layer state that is not trained

#include <cstdint>
#include <string>
#include <vector>

#include "switchmoe/core/parameter.hpp"
#include "switchmoe/dispatch/dispatch_plan.hpp"
#include "switchmoe/dispatch/exchange.hpp"
#include "switchmoe/routing/route.hpp"

namespace switchmoe {

/// The coefficients of the auxiliary losses: alpha of SEMANTICS 8 and that of SEMANTICS 9.
struct LossCoefficients {
  float aux = 0.01f;
  float z = 0.0f;
};

/// State: the balancing bias of SEMANTICS 19 ([1, experts], zero at first; a buffer that
/// checkpoints keep) and the count of training calls that keys rule 18's draws.
class RoutingScheme {
 public:
  RoutingScheme(const RoutingOptions& options, LossCoefficients coefficients,
                std::uint64_t seed = 0)
      : options_(validated(options)),
        coefficients_(validated(coefficients)),
        seed_(seed),
        bias_(Matrix<float>::Zero(1, options.num_experts)) {
    load_.reserve(static_cast<std::size_t>(options.num_experts));
  }

  /// The selection bias of SEMANTICS 19 [1, experts]: added to the scores to choose the top-k,
  /// never to the gates or losses. Updated by end_route when bias_update_rate > 0.
  Matrix<float>& balancing_bias() { return bias_; }
  const Matrix<float>& balancing_bias() const { return bias_; }

  const RoutingOptions& options() const { return options_; }
  int num_experts() const { return options_.num_experts; }
  LossCoefficients coefficients() const { return coefficients_; }

  /// Routes the logits [tokens, experts] of one call into `routing` (reusing its storage).
  /// `first_token` is the global index of the first token (for randomness keyed by token).
  void route(const Eigen::Ref<const Matrix<float>>& logits, Mode mode, std::int64_t first_token,
             Routing& routing) {
    if (bias_.rows() != 1 || bias_.cols() != options_.num_experts || !bias_.allFinite()) {
      detail::fail("balancing_bias has shape [", bias_.rows(), ", ", bias_.cols(),
                   "] or a non-finite entry, expected finite values of shape [1, ",
                   options_.num_experts, "]");
    }
    // SEMANTICS 18: u keyed by the global token index, in a stream of this training call.
    const bool draw = options_.random_second_choice && mode == Mode::kTrain;
    const detail::CounterRng second_choice(seed_, detail::Stream::kSecondChoice, train_calls_);
    detail::RouteContext context;
    context.bias = &bias_;
    context.second_choice = draw ? &second_choice : nullptr;
    context.first_token = first_token;
    detail::route_validated(logits, options_, mode, routing, context);
  }

  /// The position of the second-choice stream (SEMANTICS 18): training calls so far. Kept by
  /// checkpoints that resume training exactly.
  std::uint64_t second_choice_calls() const { return train_calls_; }
  void set_second_choice_calls(std::uint64_t calls) { train_calls_ = calls; }

  /// After the losses were made global (SEMANTICS 19): in a training call with
  /// bias_update_rate u > 0, b_e += u * sign(mean load - load_e), load_e the choices of expert
  /// e before capacity in this call summed over all processes (exchange.sum).
  template <class ExchangeT>
  void end_route(const Routing& routing, Mode mode, ExchangeT& exchange) {
    // The call succeeded on every process: only now does the second-choice stream move on, so
    // a call that failed anywhere leaves every process's stream where it was.
    if (mode == Mode::kTrain && options_.random_second_choice) ++train_calls_;
    if (mode != Mode::kTrain || options_.bias_update_rate == 0.0f) return;
    const int experts = options_.num_experts;
    load_.assign(static_cast<std::size_t>(experts), 0.0);
    for (Eigen::Index i = 0; i < routing.expert.size(); ++i) load_[routing.expert.data()[i]] += 1;
    exchange.sum(load_.data(), experts);
    double mean = 0.0;
    for (double l : load_) mean += l;
    mean /= experts;
    for (int e = 0; e < experts; ++e) {
      const double diff = mean - load_[e];
      const float sign = diff > 0 ? 1.0f : (diff < 0 ? -1.0f : 0.0f);
      bias_(0, e) += options_.bias_update_rate * sign;
    }
  }

  /// The most rows a routing of `tokens` tokens can keep (buffers are reserved for it, so that
  /// they stop growing after the first call).
  Eigen::Index max_rows(Eigen::Index tokens, Mode mode) const {
    if (options_.method != RoutingMethod::kExpertChoice || tokens == 0) {
      return tokens * options_.top_k;
    }
    // SEMANTICS 17: every expert takes exactly C tokens of each group (C at most the group).
    const Eigen::Index g = options_.group_size > 0 ? options_.group_size : tokens;
    if (tokens % g != 0) return tokens * options_.top_k;  // route() rejects this call
    const Eigen::Index capacity = std::min<Eigen::Index>(
        g, detail::expert_capacity_validated(static_cast<int>(g), options_, mode));
    return tokens / g * options_.num_experts * capacity;
  }

  /// The rows the experts process, grouped by expert.
  void plan(const Routing& routing, DispatchPlan& plan) const {
    detail::build_dispatch_plan(routing, options_.num_experts, /*check_slots=*/false, plan);
  }

  /// alpha * aux + z_coef * z for the (global) losses in `routing`; a zero coefficient gives an
  /// exactly zero term.
  float loss(const Routing& routing) const {
    return detail::scaled_loss(coefficients_.aux, routing.aux_loss) +
           detail::scaled_loss(coefficients_.z, routing.z_loss);
  }

  /// dlogits [tokens, experts] for the gradient of the combine weights of the plan's rows
  /// (`dgate_rows`, one per row) plus this process's share (`scale`) of the losses.
  void backward(const Routing& routing, const DispatchPlan& plan,
                const std::vector<float>& dgate_rows, LossScale scale, Matrix<float>& dlogits) {
    detail::rows_to_positions(plan, dgate_rows, dgate_);  // [tokens, k]
    detail::route_backward_validated(routing, dgate_, options_, coefficients_.aux, coefficients_.z,
                                     dlogits, scale.groups, scale.tokens, &scores_grad_);
  }

  /// Layer state of the routing that is not trained by gradient: prefix + "balancing_bias"
  /// (SEMANTICS 19, role kBuffer, owner kRouter).
  void append_buffers(const std::string& prefix, std::vector<ParameterRef>& out) {
    out.push_back({prefix + "balancing_bias", &bias_, nullptr, ParameterRole::kBuffer,
                   ParameterOwner::kRouter, -1});
  }

 private:
  static const RoutingOptions& validated(const RoutingOptions& options) {
    detail::validate(options);
    return options;
  }
  static LossCoefficients validated(LossCoefficients coefficients) {
    detail::check_coefficient("SwitchConfig::aux_loss_coef", coefficients.aux);
    detail::check_coefficient("SwitchConfig::z_loss_coef", coefficients.z);
    return coefficients;
  }

  RoutingOptions options_;
  LossCoefficients coefficients_;
  std::uint64_t seed_ = 0;
  std::uint64_t train_calls_ = 0;  // training calls that drew (SEMANTICS 18)
  Matrix<float> bias_;             // [1, experts] SEMANTICS 19
  std::vector<double> load_;       // [experts] end_route scratch
  Matrix<float> dgate_;            // [tokens, k] backward scratch
  Matrix<float> scores_grad_;      // [tokens, experts] backward scratch (sigmoid aux)
};

}  // namespace switchmoe
