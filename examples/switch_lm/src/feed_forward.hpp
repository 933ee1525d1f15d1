#pragma once
// The feed-forward sublayer of a block: the library's DenseFFN or SwitchLayer behind the interface
// Block expects. A block owns exactly one of the two; the model alternates them (paper section 2:
// Switch layers replace every other FFN). Both use the same activation and the same d_ff, so a
// token costs the same FLOPs in either (plus the router's d_model x experts product).

#include <memory>
#include <string>
#include <switchmoe/switchmoe.hpp>
#include <variant>
#include <vector>

#include "tensor.hpp"

namespace switch_lm {

// Per-call expert load of one Switch layer, copied out of the library's RoutingStats.
struct ExpertLoad {
  std::vector<double> routed;  // [experts] tokens that chose each expert (before capacity)
  std::vector<double> kept;    // [experts] tokens each expert processed (after capacity)
  double dropped_fraction = 0.0;
  double router_confidence = 0.0;  // mean gate of kept choices
  int calls = 0;                   // number of forward calls accumulated (for averages)

  void accumulate(const ExpertLoad& other) {
    if (routed.empty()) {
      routed.assign(other.routed.size(), 0.0);
      kept.assign(other.kept.size(), 0.0);
    }
    for (std::size_t e = 0; e < routed.size(); ++e) {
      routed[e] += other.routed[e];
      kept[e] += other.kept[e];
    }
    dropped_fraction += other.dropped_fraction;
    router_confidence += other.router_confidence;
    calls += other.calls;
  }
};

template <class Policy, class Activation = switchmoe::Relu>
class FeedForward {
 public:
  using Dense = switchmoe::DenseFFN<Policy, Activation>;
  using Switch = switchmoe::SwitchLayer<Policy, Activation>;

  explicit FeedForward(const switchmoe::DenseConfig& config)
      : layer_(std::make_unique<Dense>(config)) {}
  explicit FeedForward(const switchmoe::SwitchConfig& config)
      : layer_(std::make_unique<Switch>(config)) {}

  bool is_switch() const { return std::holds_alternative<std::unique_ptr<Switch>>(layer_); }

  // x: [tokens, d_model] -> [tokens, d_model]
  MatrixX<float> forward(const MatrixX<float>& x, switchmoe::Mode mode) {
    if (auto* dense = std::get_if<std::unique_ptr<Dense>>(&layer_))
      return (*dense)->forward(x, mode);
    auto& layer = *std::get<std::unique_ptr<Switch>>(layer_);
    auto out = layer.forward(x, mode);
    aux_loss_ = static_cast<double>(out.loss);
    load_ = expert_load(out.stats);
    return std::move(out.y);
  }

  MatrixX<float> backward(const MatrixX<float>& dy) {
    return std::visit([&](auto& layer) -> MatrixX<float> { return layer->backward(dy); }, layer_);
  }

  void zero_grad() {
    std::visit([](auto& layer) { layer->zero_grad(); }, layer_);
  }

  // Library names are prefixed; only the experts' (and dense) weight matrices get weight decay,
  // not biases and not the router (it is small and the load-balancing loss already shapes it).
  void parameters(ParamList<float>& out, const std::string& prefix) {
    std::visit(
        [&](auto& layer) {
          for (const auto& p : layer->parameters()) {
            const bool matrix = ends_with(p.name, "w_in") || ends_with(p.name, "w_out");
            out.push_back({prefix + p.name, p.value, p.grad, matrix});
          }
        },
        layer_);
  }

  // Scaled auxiliary loss (aux + z) of the last forward; already differentiated in backward.
  double aux_loss() const { return aux_loss_; }
  // Expert load of the last forward (empty for a dense layer).
  const ExpertLoad& load() const { return load_; }

 private:
  static bool ends_with(const std::string& s, const std::string& suffix) {
    return s.size() >= suffix.size() &&
           s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
  }

  static ExpertLoad expert_load(const switchmoe::RoutingStats& stats) {
    ExpertLoad load;
    load.routed.assign(stats.tokens_per_expert.begin(), stats.tokens_per_expert.end());
    load.kept.assign(stats.kept_tokens_per_expert.begin(), stats.kept_tokens_per_expert.end());
    load.dropped_fraction = static_cast<double>(stats.dropped_fraction);
    load.router_confidence = static_cast<double>(stats.router_confidence);
    load.calls = 1;
    return load;
  }

  std::variant<std::unique_ptr<Dense>, std::unique_ptr<Switch>> layer_;
  double aux_loss_ = 0.0;
  ExpertLoad load_;
};

}  // namespace switch_lm
