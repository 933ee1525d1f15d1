#pragma once
// The feed-forward sublayer of a block: the library's DenseFFN or SwitchLayer behind the interface
// Block expects. A block owns exactly one of the two; the model alternates them (paper section 2:
// Switch layers replace every other FFN). Both use the same activation and the same d_ff, so a
// token costs the same FLOPs in either (plus the router's d_model x experts product).

#include <cmath>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <switchmoe/io/safetensors.hpp>
#include <switchmoe/switchmoe.hpp>
#include <type_traits>
#include <variant>
#include <vector>

#include "ranks.hpp"
#include "tensor.hpp"

namespace switch_lm {

// Expert load of one Switch layer accumulated over forward calls: the library's statistics,
// merged call by call (RoutingStats::merge keeps the counts, so fractions stay exact).
struct ExpertLoad {
  switchmoe::RoutingStats stats;
  int calls = 0;  // number of forward calls accumulated (for per-call averages)

  void accumulate(const ExpertLoad& other) {
    stats.merge(other.stats);
    calls += other.calls;
  }
};

struct StreamPositions {
  std::uint64_t jitter_calls = 0;  // Switch layers only
  std::uint64_t dropout_calls = 0;
};

template <class Policy, class Activation = switchmoe::Relu>
class FeedForward {
 public:
  using Dense = switchmoe::DenseFFN<Policy, Activation>;
  using Switch = switchmoe::SwitchLayer<Policy, Activation>;
#ifdef SWITCH_LM_EXPERT_PARALLEL
  // --expert-parallel: this rank's experts of the layer, the others' reached over MPI.
  using Parallel = switchmoe::ExpertParallelSwitchLayer<Policy, Activation>;
#endif

  explicit FeedForward(const switchmoe::DenseConfig& config)
      : layer_(std::make_unique<Dense>(config)) {}
  explicit FeedForward(const switchmoe::SwitchConfig& config)
      : layer_(std::make_unique<Switch>(config)) {}
  // A Switch layer split over `ranks` when they are enabled (collective over them).
  FeedForward(const switchmoe::SwitchConfig& config, const Ranks& ranks) {
#ifdef SWITCH_LM_EXPERT_PARALLEL
    if (ranks.enabled) {
      layer_ = std::make_unique<Parallel>(config, ranks.comm);
      return;
    }
#endif
    (void)ranks;
    layer_ = std::make_unique<Switch>(config);
  }

  bool is_switch() const { return !std::holds_alternative<std::unique_ptr<Dense>>(layer_); }

  // x: [tokens, d_model] -> [tokens, d_model]
  MatrixX<float> forward(const MatrixX<float>& x, switchmoe::Mode mode) {
    if (auto* dense = std::get_if<std::unique_ptr<Dense>>(&layer_))
      return (*dense)->forward(x, mode);
    // Expert parallel: the losses and statistics are the global ones (SEMANTICS 21).
    auto out = std::visit(
        [&](auto& layer) -> switchmoe::SwitchOutput {
          if constexpr (std::is_same_v<std::decay_t<decltype(*layer)>, Dense>) {
            return {};  // unreachable: handled above
          } else {
            return layer->forward(x, mode);
          }
        },
        layer_);
    aux_loss_ = static_cast<double>(out.loss);
    load_ = expert_load(out.stats);
    if (mode == switchmoe::Mode::kTrain) router_entropy_ = mean_entropy(out.routing.probs);
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
  // The library says what each tensor is, so no name is matched.
  void parameters(ParamList<float>& out, const std::string& prefix) {
    std::visit(
        [&](auto& layer) {
          for (const auto& p : layer->parameters()) {
            const bool decay = p.is_weight() && p.owner != switchmoe::ParameterOwner::kRouter;
            out.push_back({prefix + p.name, p.value, p.grad, decay, 1.0, p.owner, p.expert});
          }
        },
        layer_);
  }

  // Checkpoints: the library layer's tensors under switchmoe's own names (SEMANTICS 22) with
  // `prefix`, its buffers included; load_weights checks every tensor before changing any.
  void save(switchmoe::io::SafetensorsWriter& writer, const std::string& prefix) {
    with_local_layer([&](auto& layer) { switchmoe::save_weights(writer, layer, kNames, prefix); });
  }
  void load(const switchmoe::io::SafetensorsReader& reader, const std::string& prefix) {
    with_local_layer([&](auto& layer) { switchmoe::load_weights(reader, layer, kNames, prefix); });
  }

  // Positions of the layer's random streams (router jitter, dropout): state that a checkpoint
  // keeps so that a resumed run draws what the uninterrupted one would.
  StreamPositions stream_positions() {
    return std::visit(
        [](auto& layer) -> StreamPositions {
          if constexpr (std::is_same_v<std::decay_t<decltype(*layer)>, Dense>) {
            return {0, layer->dropout_calls()};
          } else if constexpr (is_parallel<decltype(layer)>()) {
            return {layer->layer().router().jitter_calls(),
                    layer->layer().experts().dropout_calls()};
          } else {
            return {layer->router().jitter_calls(), layer->experts().dropout_calls()};
          }
        },
        layer_);
  }
  void set_stream_positions(const StreamPositions& positions) {
    if (auto* dense = std::get_if<std::unique_ptr<Dense>>(&layer_)) {
      (*dense)->set_dropout_calls(positions.dropout_calls);
      return;
    }
    std::visit(
        [&](auto& layer) {
          if constexpr (is_parallel<decltype(layer)>()) {
            layer->layer().router().set_jitter_calls(positions.jitter_calls);
            layer->layer().experts().set_dropout_calls(positions.dropout_calls);
          } else if constexpr (!std::is_same_v<std::decay_t<decltype(*layer)>, Dense>) {
            layer->router().set_jitter_calls(positions.jitter_calls);
            layer->experts().set_dropout_calls(positions.dropout_calls);
          }
        },
        layer_);
  }

  // Scaled auxiliary loss (aux + z) of the last forward; already differentiated in backward.
  double aux_loss() const { return aux_loss_; }
  // Expert load of the last forward (empty for a dense layer).
  const ExpertLoad& load() const { return load_; }
  // Mean over tokens of the router's softmax entropy (nats) in the last training forward: log E
  // for a uniform router, 0 for a one-hot one (paper section 2.4's stability diagnostic).
  double router_entropy() const { return router_entropy_; }

  // probs: [tokens, experts] rows summing to 1 -> mean of -sum_e p log p over the rows.
  static double mean_entropy(const switchmoe::Matrix<float>& probs) {
    if (probs.rows() == 0) return 0.0;
    double total = 0.0;
    for (Eigen::Index t = 0; t < probs.rows(); ++t) {
      for (Eigen::Index e = 0; e < probs.cols(); ++e) {
        const double p = probs(t, e);
        if (p > 0.0) total -= p * std::log(p);
      }
    }
    return total / static_cast<double>(probs.rows());
  }

 private:
  static constexpr switchmoe::WeightNames kNames = switchmoe::WeightNames::kSwitchmoe;
  static ExpertLoad expert_load(const switchmoe::RoutingStats& stats) { return {stats, 1}; }

  // f(layer) on a layer of this process (dense or Switch); checkpoints of an expert-parallel
  // layer, whose experts are spread over the ranks, are refused.
  template <class F>
  void with_local_layer(F&& f) {
    std::visit(
        [&](auto& layer) {
          if constexpr (is_parallel<decltype(layer)>()) {
            throw std::invalid_argument(
                "switch_lm: checkpoints of --expert-parallel runs are not supported");
          } else {
            f(*layer);
          }
        },
        layer_);
  }

  template <class Pointer>
  static constexpr bool is_parallel() {
#ifdef SWITCH_LM_EXPERT_PARALLEL
    return std::is_same_v<std::decay_t<Pointer>, std::unique_ptr<Parallel>>;
#else
    return false;
#endif
  }

  std::variant<std::unique_ptr<Dense>, std::unique_ptr<Switch>
#ifdef SWITCH_LM_EXPERT_PARALLEL
               ,
               std::unique_ptr<Parallel>
#endif
               >
      layer_;
  double aux_loss_ = 0.0;
  double router_entropy_ = 0.0;
  ExpertLoad load_;
};

}  // namespace switch_lm
