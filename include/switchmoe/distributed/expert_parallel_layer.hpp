#pragma once
// The expert-parallel Switch layer (SEMANTICS 21): a SwitchLayer whose exchange is MPI. Each
// rank holds its own tokens and the experts [r E / P, (r + 1) E / P); the router is replicated.
// With the same configuration on every rank, its results equal one SwitchLayer applied to all
// ranks' tokens concatenated in rank order (with the same groups): the same weights at
// construction (initialization streams are keyed by global expert index), the same routing
// randomness (keyed by global token index), global losses and statistics, a router gradient
// summed over ranks and identical on each.
//
// Every forward and backward is collective over the communicator: all ranks call them in the
// same order (a rank with no tokens passes a [0, d_model] input). Bad input on one rank makes
// every rank throw the same std::invalid_argument, before any rank waits in a collective.

#include <mpi.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "switchmoe/distributed/communicator.hpp"
#include "switchmoe/distributed/mpi_exchange.hpp"
#include "switchmoe/layers/switch_layer.hpp"

namespace switchmoe {
namespace detail {

class Fingerprint {
 public:
  template <class T>
  Fingerprint& add(const T& value) {
    static_assert(std::is_trivially_copyable_v<T>, "fingerprints hash plain values");
    unsigned char bytes[sizeof(T)];
    std::memcpy(bytes, &value, sizeof(T));
    for (const unsigned char b : bytes) hash_ = (hash_ ^ b) * 1099511628211ull;  // FNV-1a
    return *this;
  }
  Fingerprint& add(const char* text) {
    for (; *text != '\0'; ++text) add(*text);
    return add('\0');
  }
  std::uint64_t value() const { return hash_; }

 private:
  std::uint64_t hash_ = 1469598103934665603ull;
};

/// A hash of every field of the configuration and of the layer's type parameters.
template <class Policy, class Activation>
std::uint64_t fingerprint(const SwitchConfig& c) {
  const RoutingOptions& r = c.routing;
  Fingerprint f;
  f.add(Policy::name()).add(Activation::name());
  f.add(c.d_model).add(c.d_ff).add(c.expert_bias).add(c.router_bias);
  f.add(c.aux_loss_coef).add(c.z_loss_coef).add(c.jitter_eps).add(c.expert_dropout);
  f.add(c.init_scale).add(c.seed);
  f.add(r.num_experts).add(r.top_k).add(r.capacity_factor).add(r.eval_capacity_factor);
  f.add(r.expert_capacity).add(r.min_capacity).add(r.group_size).add(r.priority);
  f.add(r.dropless).add(r.renormalize);
  f.add(r.method).add(r.score).add(r.routed_scaling).add(r.random_second_choice);
  f.add(r.bias_update_rate).add(c.shared_d_ff).add(c.shared_expert_gate);
  return f.value();
}

/// Collective: returns `config` if every rank of `comm` passed the same one; otherwise every
/// rank throws the same std::invalid_argument naming the first rank that differs from rank 0.
template <class Policy, class Activation>
const SwitchConfig& agreed_config(const SwitchConfig& config, MPI_Comm comm) {
  check_mpi_initialized("ExpertParallelSwitchLayer");
  if (comm == MPI_COMM_NULL) fail("ExpertParallelSwitchLayer: comm is MPI_COMM_NULL");
  const std::uint64_t mine = fingerprint<Policy, Activation>(config);
  std::vector<std::uint64_t> all(static_cast<std::size_t>(mpi_size(comm)));
  MPI_Allgather(&mine, 1, MPI_UINT64_T, all.data(), 1, MPI_UINT64_T, comm);
  for (std::size_t r = 1; r < all.size(); ++r) {
    if (all[r] != all[0]) {
      fail("ExpertParallelSwitchLayer: the SwitchConfig (or precision or activation) of rank ", r,
           " differs from rank 0's (fingerprint ", std::hex, all[r], " vs ", all[0], std::dec,
           "); every rank must construct the layer with the same configuration");
    }
  }
  return config;
}

}  // namespace detail

/// Policy: precision (Fp32, Bf16; rows travel in its element type). Activation: the experts'.
template <class Policy = Fp32, class Activation = Relu>
class ExpertParallelSwitchLayer {
 public:
  using Layer = SwitchLayer<Policy, Activation, Router<Policy>, FeedForwardBank<Policy, Activation>,
                            RoutingScheme, MpiExchange<Policy>>;

  /// Collective over `comm`. Throws std::invalid_argument on every rank if the configurations
  /// differ between ranks, are invalid, or E is not a multiple of the number of ranks.
  ExpertParallelSwitchLayer(const SwitchConfig& config, MPI_Comm comm)
      : config_(detail::agreed_config<Policy, Activation>(config, comm)),
        layer_(config_, MpiExchange<Policy>(comm, config_.routing.num_experts)),
        rank_(layer_.exchange().rank()),
        num_ranks_(layer_.exchange().num_ranks()),
        first_expert_(layer_.exchange().first_expert(config_.routing.num_experts)),
        num_local_experts_(layer_.exchange().num_local_experts(config_.routing.num_experts)) {}

  const SwitchConfig& config() const { return config_; }
  int rank() const { return rank_; }
  int num_ranks() const { return num_ranks_; }
  int num_experts() const { return config_.routing.num_experts; }
  int first_expert() const { return first_expert_; }
  int num_local_experts() const { return num_local_experts_; }

  // The replicated router: the same values on every rank; its gradient is summed over ranks.
  Matrix<float>& router_weight() { return layer_.router_weight(); }  // [d_model, experts]
  Matrix<float>& router_bias() { return layer_.router_bias(); }      // [1, experts] or empty
  Matrix<float>& grad_router_weight() { return layer_.grad_router_weight(); }
  Matrix<float>& grad_router_bias() { return layer_.grad_router_bias(); }
  // The owned experts, by global index (another rank's expert throws std::invalid_argument).
  Matrix<float>& w_in(int e) { return layer_.w_in(e); }    // [d_model, d_ff]
  Matrix<float>& w_out(int e) { return layer_.w_out(e); }  // [d_ff, d_model]
  Matrix<float>& b_in(int e) { return layer_.b_in(e); }    // [1, d_ff]
  Matrix<float>& b_out(int e) { return layer_.b_out(e); }  // [1, d_model]
  Matrix<float>& grad_w_in(int e) { return layer_.grad_w_in(e); }
  Matrix<float>& grad_w_out(int e) { return layer_.grad_w_out(e); }
  Matrix<float>& grad_b_in(int e) { return layer_.grad_b_in(e); }
  Matrix<float>& grad_b_out(int e) { return layer_.grad_b_out(e); }

  /// The router's parameters and the owned experts' (ParameterRef::owner tells them apart:
  /// kRouter ones are replicated, kExpert ones exist on their owner only).
  std::vector<ParameterRef> parameters() { return layer_.parameters(); }
  std::vector<ParameterRef> buffers() { return layer_.buffers(); }
  void zero_grad() { layer_.zero_grad(); }
  void sync_weights() { layer_.sync_weights(); }

  /// Collective. x [tokens, d_model] holds this rank's tokens (any count, 0 included); y,
  /// routing are this rank's, losses and stats global.
  SwitchOutput forward(const Eigen::Ref<const Matrix<float>>& x, Mode mode) {
    SwitchOutput out;
    forward(x, mode, out);
    return out;
  }
  void forward(const Eigen::Ref<const Matrix<float>>& x, Mode mode, SwitchOutput& out) {
    layer_.forward(x, mode, out);
  }

  /// Collective. dy [tokens, d_model] of this rank's tokens; returns dx of them.
  Matrix<float> backward(const Eigen::Ref<const Matrix<float>>& dy) { return layer_.backward(dy); }
  void backward(const Eigen::Ref<const Matrix<float>>& dy, Matrix<float>& dx) {
    layer_.backward(dy, dx);
  }

  Layer& layer() { return layer_; }
  MpiExchange<Policy>& exchange() { return layer_.exchange(); }

 private:
  SwitchConfig config_;  // first: agreed across ranks before any part is built
  Layer layer_;
  int rank_, num_ranks_, first_expert_, num_local_experts_;
};

}  // namespace switchmoe
