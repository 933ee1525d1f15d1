#pragma once
// The routing part of a Switch layer: from router logits to a routing (SEMANTICS 2, 4-9), the
// dispatch plan the experts consume, the auxiliary losses, and the gradient of all of it with
// respect to the logits (SEMANTICS 10). RoutingScheme routes as its RoutingOptions say; another
// scheme is another class with the same members, passed to SwitchLayer as a template argument.
//
// Members a layer relies on (the routing-scheme concept):
//   RoutingScheme(const RoutingOptions&, LossCoefficients)  validates once
//   int num_experts() const; const RoutingOptions& options() const
//   void route(logits, mode, first_token, Routing&)   the logits are checked to be finite
//   void end_route(const Routing&, mode, Exchange&)   after the losses are made global
//   void plan(const Routing&, DispatchPlan&)          rows of (token, expert, gate) by expert
//   Eigen::Index max_rows(tokens, mode) const         the most rows a routing can keep
//   float loss(const Routing&) const                  what the layer adds to the task loss
//   void backward(routing, plan, dgate_rows, LossScale, dlogits)
//   void append_buffers(prefix, std::vector<ParameterRef>&)  layer state that is not trained

#include <cstdint>
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

class RoutingScheme {
 public:
  RoutingScheme(const RoutingOptions& options, LossCoefficients coefficients)
      : options_(validated(options)), coefficients_(validated(coefficients)) {}

  const RoutingOptions& options() const { return options_; }
  int num_experts() const { return options_.num_experts; }
  LossCoefficients coefficients() const { return coefficients_; }

  /// Routes the logits [tokens, experts] of one call into `routing` (reusing its storage).
  /// `first_token` is the global index of the first token (for randomness keyed by token).
  void route(const Eigen::Ref<const Matrix<float>>& logits, Mode mode, std::int64_t first_token,
             Routing& routing) {
    (void)first_token;
    detail::route_validated(logits, options_, mode, routing);
  }

  /// After the losses were made global: a scheme with state (SEMANTICS 19) updates it here,
  /// reducing over processes through `exchange` (its sum(values, count)). Nothing for now.
  template <class ExchangeT>
  void end_route(const Routing& /*routing*/, Mode /*mode*/, ExchangeT& /*exchange*/) {}

  /// The most rows a routing of `tokens` tokens can keep (buffers are reserved for it, so that
  /// they stop growing after the first call).
  Eigen::Index max_rows(Eigen::Index tokens, Mode /*mode*/) const {
    return tokens * options_.top_k;
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
                                     dlogits, scale.groups, scale.tokens);
  }

  /// Layer state of the routing that is not trained by gradient (none for this scheme).
  void append_buffers(const std::string& /*prefix*/, std::vector<ParameterRef>& /*out*/) {}

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
  Matrix<float> dgate_;  // [tokens, k] backward scratch
};

}  // namespace switchmoe
