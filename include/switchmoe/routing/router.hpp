#pragma once
// The router (SEMANTICS 2, 3, 13): logits = float32(x) * W_r (+ b_r), with multiplicative
// jitter on its input in training. It computes in float32 whatever the policy, except under the
// Bf16RouterAblation policy (paper Table 2's ablation), where it rounds its input, weights and
// logits to bfloat16.

#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "switchmoe/core/init.hpp"
#include "switchmoe/core/parallel.hpp"
#include "switchmoe/core/parameter.hpp"
#include "switchmoe/core/precision.hpp"
#include "switchmoe/core/random.hpp"
#include "switchmoe/kernels/gemm.hpp"
#include "switchmoe/kernels/packed_b.hpp"

namespace switchmoe {
namespace detail {

/// Rounds every element of m to the nearest bfloat16 (ties to even), kept as float: how the
/// Bf16RouterAblation policy stores router values.
inline void round_to_bf16(Matrix<float>& m) {
  for (Eigen::Index i = 0; i < m.size(); ++i)
    m.data()[i] = static_cast<float>(Eigen::bfloat16(m.data()[i]));
}

}  // namespace detail

struct RouterConfig {
  int d_model = 0;
  int num_experts = 0;
  bool bias = false;
  float jitter_eps = 0.01f;  // noise U(1 - eps, 1 + eps) on the input in training; 0: none
  float init_scale = 0.1f;   // SEMANTICS 11
  std::uint64_t seed = 0;
};

/// Policy: the layer's precision policy (the router is float32 whatever it says). Isa: the
/// kernels' instruction-set tag (part of the type; see kernels/isa.hpp).
template <class Policy = Fp32, class Isa = kernels::isa::Native>
class Router {
  static_assert(is_precision_v<Policy>,
                "Router's first template argument must be a switchmoe precision policy.");
  static_assert(std::is_same_v<typename Policy::RouterElement, float> ||
                    std::is_same_v<typename Policy::RouterElement, Eigen::bfloat16>,
                "The router computes in float32 whatever the layer's precision (SEMANTICS 13), "
                "or in emulated bfloat16 for the Bf16RouterAblation policy only.");
  static constexpr bool kBf16 = std::is_same_v<typename Policy::RouterElement, Eigen::bfloat16>;

 public:
  using PolicyType = Policy;
  using IsaType = Isa;

  explicit Router(const RouterConfig& config) : config_(config) {
    if (config.d_model < 1)
      detail::fail("RouterConfig::d_model is ", config.d_model, ", expected >= 1");
    if (config.num_experts < 1) {
      detail::fail("RouterConfig::num_experts is ", config.num_experts, ", expected >= 1");
    }
    if (!(config.jitter_eps >= 0.0f && config.jitter_eps < 1.0f)) {
      detail::fail("jitter_eps is ", config.jitter_eps, ", expected in [0, 1)");
    }
    weight_.resize(config.d_model, config.num_experts);
    truncated_normal_init(weight_, config.init_scale, config.d_model, config.seed, kInitSubstream);
    grad_weight_ = Matrix<float>::Zero(config.d_model, config.num_experts);
    if (config.bias) {
      bias_ = Matrix<float>::Zero(1, config.num_experts);
      grad_bias_ = Matrix<float>::Zero(1, config.num_experts);
    }
  }

  const RouterConfig& config() const { return config_; }
  // The logits product of few tokens (or 32+ experts) uses a packed copy of the weight, made on
  // the first forward that needs it. A non-const reference to the weight may be written through
  // at any later time, so once one is handed out (weight(), parameters(); a SwitchLayer's
  // router from its construction on) forward packs W inside every product instead, until
  // sync_weights() (the expert bank's mechanism, FeedForwardBank::sync_weights).
  Matrix<float>& weight() {  // [d_model, experts]
    weight_exposed_ = true;
    return weight_;
  }
  const Matrix<float>& weight() const { return weight_; }

  /// Packs the weight now (so that no later forward allocates for it) and promises that
  /// references to the weight handed out so far will not be written through again: later
  /// forwards use the packed copy until the next non-const access. Throws, changing nothing,
  /// when the weight's shape is not [d_model, experts].
  void sync_weights() {
    check_parameter_shapes();
    pack_weight();
    weight_exposed_ = false;
  }
  Matrix<float>& bias() { return bias_; }  // [1, experts], empty without bias
  Matrix<float>& grad_weight() { return grad_weight_; }
  Matrix<float>& grad_bias() { return grad_bias_; }

  /// Training-mode calls that have drawn jitter so far: the position of the jitter stream (each
  /// call draws afresh, SEMANTICS 3). Layer state for a checkpoint that resumes training exactly.
  std::uint64_t jitter_calls() const { return calls_; }
  void set_jitter_calls(std::uint64_t calls) { calls_ = calls; }

  /// logits [tokens, experts] for x [tokens, d_model], into `logits` reusing its storage (no
  /// allocation when the token count is unchanged). In Mode::kTrain the input is jittered (a
  /// fresh draw per call, from the seed) and cached for backward. `logits` must not alias x.
  /// `first_token` is the global index of x's first token: the jitter of a token is keyed by its
  /// global index (SEMANTICS 3, 21), so it does not depend on how tokens are split over calls'
  /// processes.
  void forward(const Eigen::Ref<const Matrix<float>>& x, Mode mode, Matrix<float>& logits,
               std::int64_t first_token = 0) {
    has_forward_ = false;  // a forward that throws leaves nothing for backward
    detail::check_mode(mode);
    detail::check_shape("x", x, -1, config_.d_model);
    check_parameter_shapes();
    const int tokens = kernels::detail::to_int("x.rows()", x.rows());
    if (first_token < 0) detail::fail("first_token is ", first_token, ", expected >= 0");
    const float* input = x.data();  // [tokens, d_model] what the router multiplies
    Eigen::Index input_stride = x.outerStride();
    if (mode == Mode::kTrain || kBf16) {  // keep the (jittered, rounded) input for backward
      if (mode == Mode::kTrain && config_.jitter_eps > 0.0f) {
        jitter_input(x, first_token, calls_++);
      } else {
        input_ = x;
        noise_.resize(0, 0);
      }
      input = input_.data();
      input_stride = config_.d_model;
    }
    const float* weight = weight_.data();  // [d_model, experts]
    if constexpr (kBf16) {  // the ablation: what a bfloat16 router would store, rounded
      detail::round_to_bf16(input_);
      weight_bf16_ = weight_;
      detail::round_to_bf16(weight_bf16_);
      weight = weight_bf16_.data();
    }
    logits.resize(x.rows(), config_.num_experts);  // [tokens, experts]
    const int e = config_.num_experts;
    if (narrow_products(tokens)) {  // logits^T = W^T * input^T, then transposed into place
      logits_t_.resize(e, tokens);  // [experts, tokens]
      kernels::gemm<float, Isa>({e, tokens, config_.d_model, weight, e, kernels::Transpose::kYes,
                                 input, input_stride, kernels::Transpose::kYes, logits_t_.data(),
                                 tokens, 0.0f});
      logits = logits_t_.transpose();
    } else if (!kBf16 && !weight_exposed_) {
      // While no writable reference is out (see weight()), W packed once per change rather than
      // inside every call's product (a decode call's product is otherwise mostly the packing of
      // W). The packed product runs every element through the same kernel operations in the
      // same k order as the plain one, so the logits are bitwise those of the other forms.
      if (packed_weight_.stale) pack_weight();
      kernels::gemm<float, Isa>(kernels::PackedGemmProblem<float, Isa>{
          tokens, input, input_stride, kernels::Transpose::kNo, &packed_weight_.b, logits.data(), e,
          0.0f});
    } else {
      kernels::gemm<float, Isa>({tokens, e, config_.d_model, input, input_stride,
                                 kernels::Transpose::kNo, weight, e, kernels::Transpose::kNo,
                                 logits.data(), e, 0.0f});
    }
    if (config_.bias) logits.rowwise() += bias_.row(0);
    if constexpr (kBf16) detail::round_to_bf16(logits);
    has_forward_ = mode == Mode::kTrain;
  }

  /// As above, returning the logits [tokens, experts].
  Matrix<float> forward(const Eigen::Ref<const Matrix<float>>& x, Mode mode) {
    Matrix<float> logits;
    forward(x, mode, logits);
    return logits;
  }

  /// Accumulates dW (and db) and writes dx [tokens, d_model] into `dx` reusing its storage, for
  /// dlogits [tokens, experts] of the last training-mode forward. No allocation when the token
  /// count is unchanged (dlogits with a row stride other than `experts` is copied into a
  /// buffer kept for the next call). `dx` must not alias dlogits.
  void backward(const Eigen::Ref<const Matrix<float>>& dlogits, Matrix<float>& dx) {
    if (!has_forward_) detail::fail("Router::backward called before a Mode::kTrain forward");
    detail::check_shape("dlogits", dlogits, input_.rows(), config_.num_experts);
    check_parameter_shapes();
    detail::check_shape("router grad_weight", grad_weight_, config_.d_model, config_.num_experts);
    check_bias_shape("router grad_bias", grad_bias_);
    const int tokens = static_cast<int>(dlogits.rows());
    const int d = config_.d_model, e = config_.num_experts;
    const float* dl = dlogits.data();  // [tokens, experts] contiguous for the kernel
    if (tokens > 0 && dlogits.outerStride() != e) {
      dlogits_ = dlogits;
      dl = dlogits_.data();
    }
    dx.resize(tokens, d);  // [tokens, d_model]
    kernels::gemm<float, Isa>({tokens, d, e, dl, e, kernels::Transpose::kNo, weight_.data(), e,
                               kernels::Transpose::kYes, dx.data(), d, 0.0f});
    if (narrow_products(tokens)) {                // dW^T += dlogits^T * input, on dW^T's own copy
      grad_weight_t_ = grad_weight_.transpose();  // [experts, d_model]
      kernels::gemm<float, Isa>({e, d, tokens, dl, e, kernels::Transpose::kYes, input_.data(), d,
                                 kernels::Transpose::kNo, grad_weight_t_.data(), d, 1.0f});
      grad_weight_ = grad_weight_t_.transpose();
    } else {
      kernels::gemm<float, Isa>({d, e, tokens, input_.data(), d, kernels::Transpose::kYes, dl, e,
                                 kernels::Transpose::kNo, grad_weight_.data(), e, 1.0f});
    }
    if (config_.bias && tokens > 0) {  // no tokens: nothing to add (and no null-based Map)
      grad_bias_ += Eigen::Map<const Matrix<float>>(dl, tokens, e).colwise().sum();
    }
    if (noise_.size() > 0) dx.array() *= noise_.array();  // x_jittered = x .* noise
  }

  /// As above, returning dx [tokens, d_model].
  Matrix<float> backward(const Eigen::Ref<const Matrix<float>>& dlogits) {
    Matrix<float> dx;
    backward(dlogits, dx);
    return dx;
  }

  /// Zeroes the gradients, restoring their configured shapes if a caller resized them.
  void zero_grad() {
    grad_weight_.setZero(config_.d_model, config_.num_experts);
    grad_bias_.setZero(config_.bias ? 1 : 0, config_.num_experts);
  }

  void append_parameters(const std::string& prefix, std::vector<ParameterRef>& out) {
    weight_exposed_ = true;  // the caller may write through the pointer at any time
    out.push_back({prefix + "weight", &weight_, &grad_weight_, ParameterRole::kWeight,
                   ParameterOwner::kRouter});
    if (config_.bias) {
      out.push_back(
          {prefix + "bias", &bias_, &grad_bias_, ParameterRole::kBias, ParameterOwner::kRouter});
    }
  }

  /// Throws std::invalid_argument if the weight or bias no longer has its configured shape.
  void check_parameter_shapes() const {
    detail::check_shape("router weight", weight_, config_.d_model, config_.num_experts);
    check_bias_shape("router bias", bias_);
  }

 private:
  // packed_weight_ from weight_ (shapes checked by the caller).
  void pack_weight() {
    packed_weight_.b.pack(weight_.data(), config_.num_experts, kernels::Transpose::kNo,
                          config_.d_model, config_.num_experts);
    packed_weight_.stale = false;
  }

  static constexpr std::uint64_t kInitSubstream = 0;

  // [1, experts] with a bias; empty without one.
  void check_bias_shape(const char* name, const Matrix<float>& b) const {
    if (config_.bias) {
      detail::check_shape(name, b, 1, config_.num_experts);
    } else if (b.size() != 0) {
      detail::check_shape(name, b, 0, 0);
    }
  }

  /// Whether the products with `experts` as their n (the logits, dW) run transposed, experts
  /// as their m: fewer experts than the kernel's register tile is wide would leave most of every
  /// column panel empty, while m is cut into row tiles as small as the kernel's. Each element
  /// is the same chain of fused multiply-adds either way (the same k blocks, in the same order;
  /// a product's two factors only swap places), so the results are bitwise the same; only the
  /// speed differs. Calls of fewer tokens than a panel is wide keep the plain form.
  bool narrow_products(int tokens) const {
    constexpr int kPanel = kernels::detail::MicroKernel<Isa, float>::kNr;
    return config_.num_experts < kPanel && tokens >= kPanel;
  }

  /// noise_ = U(1 - eps, 1 + eps) per element of the input (SEMANTICS 3), drawn from
  /// (seed, call) and keyed by global token index, and input_ = x .* noise_, in one pass (both
  /// refilled in place).
  void jitter_input(const Eigen::Ref<const Matrix<float>>& x, std::int64_t first_token,
                    std::uint64_t call) {
    const detail::CounterRng rng(config_.seed, detail::Stream::kJitter, call);
    const Eigen::Index tokens = x.rows(), d = config_.d_model;
    noise_.resize(tokens, d);  // [tokens, d_model]
    input_.resize(tokens, d);  // [tokens, d_model]
    const float lo = 1.0f - config_.jitter_eps, width = 2.0f * config_.jitter_eps;
    detail::parallel_for(tokens, 8 * d, [&](Eigen::Index t) {
      const float* xt = x.data() + t * x.outerStride();
      float* noise = noise_.data() + t * d;
      float* input = input_.data() + t * d;
      const auto first = static_cast<std::uint64_t>((first_token + t) * d);
      for (Eigen::Index j = 0; j < d; ++j) {
        noise[j] = lo + width * rng.uniform(first + static_cast<std::uint64_t>(j));
        input[j] = xt[j] * noise[j];
      }
    });
  }

  RouterConfig config_;
  Matrix<float> weight_, bias_, grad_weight_, grad_bias_;
  Matrix<float> input_;     // [tokens, d_model] router input of the last forward, after jitter
  Matrix<float> noise_;     // [tokens, d_model] jitter factors of the last forward, empty if none
  Matrix<float> dlogits_;   // [tokens, experts] contiguous copy of a strided dlogits in backward
  Matrix<float> logits_t_;  // [experts, tokens] the transposed logits (narrow_products)
  Matrix<float> grad_weight_t_;  // [experts, d_model] the transposed dW (narrow_products)
  Matrix<float> weight_bf16_;    // [d_model, experts] Bf16RouterAblation only: the rounded weights
  // W packed for the plain-form logits product: a cache, which a copy of the router does not
  // take (PackedB owns its buffer and is move-only); the copy packs its own when it needs one,
  // so Router stays copyable.
  struct PackedWeight {
    kernels::PackedB<float, Isa> b;
    bool stale = true;  // b out of date
    PackedWeight() = default;
    PackedWeight(const PackedWeight&) {}
    PackedWeight(PackedWeight&&) = default;
    PackedWeight& operator=(const PackedWeight&) {
      b = kernels::PackedB<float, Isa>();
      stale = true;
      return *this;
    }
    PackedWeight& operator=(PackedWeight&&) = default;
  };
  PackedWeight packed_weight_;
  bool weight_exposed_ = false;  // a writable reference to weight_ is out: the plain product
  std::uint64_t calls_ = 0;
  bool has_forward_ = false;
};

}  // namespace switchmoe
