#pragma once
// A bank of independent feed-forward networks, y = act(x * W_in + b_in) * W_out + b_out, each
// applied to its own contiguous block of rows. A Switch layer's experts are a bank of E; the
// dense FFN is a bank of one. Expert dropout (SEMANTICS 12) acts on the hidden activation.
//
// Gated activations (SEMANTICS 15, is_gated_v<Activation>): each FFN also holds W_gate
// [d_model, d_ff] and computes h = act(x W_gate + b_gate) * (x W_in + b_in). The gate and up
// products are ONE GEMM over a packed [d_model, 2 d_ff] operand whose columns interleave them
// pairwise (column 2j: gate column j, column 2j + 1: up column j). The GEMM epilogue gets blocks
// that start at a multiple of kNr columns (even) and end at a multiple of kNr or at 2 d_ff, so
// every block holds both members of each pair it touches, whatever the thread count or tile
// shape: the epilogue forms h for its columns while they are in cache. (Interleaving whole
// kNr-wide panels would not give that guarantee: a tile may hold an odd number of panels.)
//
// Precision contract (SEMANTICS 13): master weights and gradients are float32; the policy's
// Element type stores the packed compute copies of the weights and the activations that enter a
// matrix product (x, hidden, dy, dhidden); every product accumulates in float32.

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "switchmoe/core/buffer.hpp"
#include "switchmoe/core/init.hpp"
#include "switchmoe/core/parallel.hpp"
#include "switchmoe/core/parameter.hpp"
#include "switchmoe/core/precision.hpp"
#include "switchmoe/core/random.hpp"
#include "switchmoe/kernels/convert.hpp"
#include "switchmoe/kernels/gemm.hpp"
#include "switchmoe/kernels/packed_b.hpp"

namespace switchmoe {

struct FeedForwardConfig {
  int num_ffns = 1;
  int d_model = 0;
  int d_ff = 0;
  bool bias = false;
  float dropout = 0.0f;     // on the hidden activation, training only
  float init_scale = 0.1f;  // SEMANTICS 11
  std::uint64_t seed = 0;
  // Global index of the bank's first FFN: a bank may hold the slice [first_ffn, first_ffn +
  // num_ffns) of a layer's experts (expert parallelism, SEMANTICS 21). Initialization streams,
  // accessors and parameter names use global indices, so a slice starts with exactly the weights
  // the same experts have in a bank of all of them.
  int first_ffn = 0;
};

/// Policy: precision (SEMANTICS 13). Activation: the hidden activation. Isa: the instruction-set
/// tag of the kernels (part of the type, so that code compiled for different targets never
/// shares one class layout under one name).
template <class Policy, class Activation, class Isa = kernels::isa::Native>
class FeedForwardBank {
  static_assert(is_precision_v<Policy>,
                "FeedForwardBank's first template argument must be a switchmoe precision policy.");
  static_assert(std::is_invocable_r_v<float, decltype(&Activation::value), float> &&
                    std::is_invocable_r_v<float, decltype(&Activation::derivative), float>,
                "An activation must provide static float value(float) and derivative(float).");

 public:
  using Element = typename Policy::Element;
  using PolicyType = Policy;
  using ActivationType = Activation;
  using IsaType = Isa;

  static constexpr bool kGated = is_gated_v<Activation>;

  explicit FeedForwardBank(const FeedForwardConfig& config) : config_(config) {
    if (config.num_ffns < 1) detail::fail("num_experts is ", config.num_ffns, ", expected >= 1");
    if (config.first_ffn < 0) {
      detail::fail("first_ffn is ", config.first_ffn, ", expected >= 0");
    }
    if (config.d_model < 1) detail::fail("d_model is ", config.d_model, ", expected >= 1");
    if (config.d_ff < 1) detail::fail("d_ff is ", config.d_ff, ", expected >= 1");
    if (!(config.dropout >= 0.0f && config.dropout < 1.0f)) {
      detail::fail("dropout rate is ", config.dropout, ", expected in [0, 1)");
    }
    const int n = config.num_ffns;
    w_in_.resize(n), w_out_.resize(n), b_in_.resize(n), b_out_.resize(n);
    grad_w_in_.resize(n), grad_w_out_.resize(n), grad_b_in_.resize(n), grad_b_out_.resize(n);
    if constexpr (kGated) {
      w_gate_.resize(n), b_gate_.resize(n), grad_w_gate_.resize(n), grad_b_gate_.resize(n);
    }
    w_in_packed_.resize(n), w_out_packed_.resize(n);
    w_in_transposed_.resize(n), w_out_transposed_.resize(n);
    packed_problems_.reserve(n), plain_problems_.reserve(n), block_expert_.reserve(n);
    stale_.assign(n, 1);
    transposed_stale_.assign(n, 1);
    exposed_.assign(n, 0);
    for (int e = 0; e < n; ++e) {
      w_in_[e].resize(config.d_model, config.d_ff);
      w_out_[e].resize(config.d_ff, config.d_model);
      const std::uint64_t global = static_cast<std::uint64_t>(config.first_ffn) + e;
      truncated_normal_init(w_in_[e], config.init_scale, config.d_model, config.seed,
                            2 * global + 1);
      truncated_normal_init(w_out_[e], config.init_scale, config.d_ff, config.seed, 2 * global + 2);
      b_in_[e] = Matrix<float>::Zero(config.bias ? 1 : 0, config.d_ff);
      b_out_[e] = Matrix<float>::Zero(config.bias ? 1 : 0, config.d_model);
      if constexpr (kGated) {
        w_gate_[e].resize(config.d_model, config.d_ff);
        // A substream range of its own, so W_in and W_out are those of an ungated bank.
        truncated_normal_init(w_gate_[e], config.init_scale, config.d_model, config.seed,
                              kGateSubstream + global);
        b_gate_[e] = Matrix<float>::Zero(config.bias ? 1 : 0, config.d_ff);
      }
    }
    zero_grad();
  }

  const FeedForwardConfig& config() const { return config_; }
  int size() const { return config_.num_ffns; }
  int first() const { return config_.first_ffn; }  // global index of the first FFN held

  /// Refreshes the compute copies from the master weights now and promises that references
  /// handed out so far will not be written through again: later forwards reuse the copies
  /// until the next non-const access. For inference after loading or editing weights.
  void sync_weights() {
    std::fill(stale_.begin(), stale_.end(), 1);
    std::fill(exposed_.begin(), exposed_.end(), 0);
    refresh_forward_weights();
  }

  // Accessors take global expert indices. A non-const reference to a weight may be written
  // through at any later time, so from then on the expert's compute copy is refreshed at every
  // forward, until sync_weights().
  Matrix<float>& w_in(int e) { return expose(local(e), w_in_); }    // [d_model, d_ff]
  Matrix<float>& w_out(int e) { return expose(local(e), w_out_); }  // [d_ff, d_model]
  Matrix<float>& b_in(int e) { return b_in_[local(e)]; }            // [1, d_ff] (empty: no bias)
  Matrix<float>& b_out(int e) { return b_out_[local(e)]; }          // [1, d_model]
  const Matrix<float>& w_in(int e) const { return w_in_[local(e)]; }
  const Matrix<float>& w_out(int e) const { return w_out_[local(e)]; }
  Matrix<float>& grad_w_in(int e) { return grad_w_in_[local(e)]; }
  Matrix<float>& grad_w_out(int e) { return grad_w_out_[local(e)]; }
  Matrix<float>& grad_b_in(int e) { return grad_b_in_[local(e)]; }
  Matrix<float>& grad_b_out(int e) { return grad_b_out_[local(e)]; }
  // Gated activations only (SEMANTICS 15); otherwise they throw std::invalid_argument.
  Matrix<float>& w_gate(int e) {
    return expose(local(e), gated("w_gate", w_gate_));
  }                                                                            // [d_model, d_ff]
  Matrix<float>& b_gate(int e) { return gated("b_gate", b_gate_)[local(e)]; }  // [1, d_ff] or empty
  Matrix<float>& grad_w_gate(int e) { return gated("grad_w_gate", grad_w_gate_)[local(e)]; }
  Matrix<float>& grad_b_gate(int e) { return gated("grad_b_gate", grad_b_gate_)[local(e)]; }

  void zero_grad() {
    for (int e = 0; e < config_.num_ffns; ++e) {
      grad_w_in_[e] = Matrix<float>::Zero(config_.d_model, config_.d_ff);
      grad_w_out_[e] = Matrix<float>::Zero(config_.d_ff, config_.d_model);
      grad_b_in_[e] = Matrix<float>::Zero(b_in_[e].rows(), config_.d_ff);
      grad_b_out_[e] = Matrix<float>::Zero(b_out_[e].rows(), config_.d_model);
      if constexpr (kGated) {
        grad_w_gate_[e] = Matrix<float>::Zero(config_.d_model, config_.d_ff);
        grad_b_gate_[e] = Matrix<float>::Zero(b_gate_[e].rows(), config_.d_ff);
      }
    }
  }

  /// Parameters named prefix + "<e>.w_in" etc. by global expert index, owned by kExpert; with
  /// `single` (a dense FFN) just prefix + "w_in", owned by `single_owner`. Gated: "w_gate"
  /// ["b_gate"] come first (Mixtral's w1), then w_in (w3), then w_out (w2).
  void append_parameters(const std::string& prefix, bool single, std::vector<ParameterRef>& out,
                         ParameterOwner single_owner = ParameterOwner::kDense) {
    for (int e = 0; e < config_.num_ffns; ++e) {
      const int global = config_.first_ffn + e;
      const std::string p = single ? prefix : prefix + std::to_string(global) + ".";
      const ParameterOwner owner = single ? single_owner : ParameterOwner::kExpert;
      const int id = single ? -1 : global;
      exposed_[e] = 1;  // the caller may write through the pointers at any time
      if constexpr (kGated) {
        out.push_back(
            {p + "w_gate", &w_gate_[e], &grad_w_gate_[e], ParameterRole::kWeight, owner, id});
        if (config_.bias) {
          out.push_back(
              {p + "b_gate", &b_gate_[e], &grad_b_gate_[e], ParameterRole::kBias, owner, id});
        }
      }
      out.push_back({p + "w_in", &w_in_[e], &grad_w_in_[e], ParameterRole::kWeight, owner, id});
      if (config_.bias) {
        out.push_back({p + "b_in", &b_in_[e], &grad_b_in_[e], ParameterRole::kBias, owner, id});
      }
      out.push_back({p + "w_out", &w_out_[e], &grad_w_out_[e], ParameterRole::kWeight, owner, id});
      if (config_.bias) {
        out.push_back({p + "b_out", &b_out_[e], &grad_b_out_[e], ParameterRole::kBias, owner, id});
      }
    }
  }

  /// Throws std::invalid_argument naming the first master weight or gradient whose shape is no
  /// longer the configured one (resized through an accessor or a ParameterRef). Cheap: shapes
  /// only. Every forward and backward runs it before touching the storage.
  void check_parameter_shapes() const {
    const int d_model = config_.d_model, d_ff = config_.d_ff, bias = config_.bias ? 1 : 0;
    for (int e = 0; e < config_.num_ffns; ++e) {
      check_parameter("w_in", config_.first_ffn + e, w_in_[e], d_model, d_ff);
      check_parameter("w_out", config_.first_ffn + e, w_out_[e], d_ff, d_model);
      check_parameter("b_in", config_.first_ffn + e, b_in_[e], bias, d_ff);
      check_parameter("b_out", config_.first_ffn + e, b_out_[e], bias, d_model);
      if constexpr (kGated) {
        check_parameter("w_gate", config_.first_ffn + e, w_gate_[e], d_model, d_ff);
        check_parameter("b_gate", config_.first_ffn + e, b_gate_[e], bias, d_ff);
      }
    }
  }
  void check_gradient_shapes() const {
    const int d_model = config_.d_model, d_ff = config_.d_ff, bias = config_.bias ? 1 : 0;
    for (int e = 0; e < config_.num_ffns; ++e) {
      check_parameter("grad_w_in", config_.first_ffn + e, grad_w_in_[e], d_model, d_ff);
      check_parameter("grad_w_out", config_.first_ffn + e, grad_w_out_[e], d_ff, d_model);
      check_parameter("grad_b_in", config_.first_ffn + e, grad_b_in_[e], bias, d_ff);
      check_parameter("grad_b_out", config_.first_ffn + e, grad_b_out_[e], bias, d_model);
      if constexpr (kGated) {
        check_parameter("grad_w_gate", config_.first_ffn + e, grad_w_gate_[e], d_model, d_ff);
        check_parameter("grad_b_gate", config_.first_ffn + e, grad_b_gate_[e], bias, d_ff);
      }
    }
  }

  /// Sizes the per-call buffers for up to `rows` rows, so that later calls with at most that
  /// many rows allocate nothing.
  void reserve_rows(Eigen::Index rows) {
    const Eigen::Index hidden = rows * config_.d_ff;
    hidden_pre_.reserve(hidden * kProducts);
    hidden_.reserve(hidden);
    dhidden_.reserve(hidden);
    if constexpr (kGated) dpre_.reserve(hidden * kProducts);
    if (config_.dropout > 0.0f) dropout_scale_.reserve(hidden);
    if constexpr (!kElementIsFloat) {
      dhidden_element_.reserve(hidden * kProducts);
      dy_element_.reserve(rows * config_.d_model);
    }
  }

  /// Runs FFN e on rows [offsets[e], offsets[e+1]) of xg [rows, d_model] and writes yg
  /// [rows, d_model] in float32. `row_keys` (one per row, or empty for the row index) name the
  /// rows for the dropout draw, so masks do not depend on how rows were laid out.
  /// In Mode::kTrain the hidden activations are kept for backward.
  void forward(const Eigen::Ref<const Matrix<Element>>& xg, const std::vector<int>& offsets,
               Mode mode, const std::vector<std::uint64_t>& row_keys,
               Eigen::Ref<Matrix<float>> yg) {
    has_forward_ = false;  // a forward that throws leaves nothing for backward
    detail::check_mode(mode);
    check_parameter_shapes();
    check_blocks(xg.rows(), offsets);
    detail::check_shape("x", xg, -1, config_.d_model);
    detail::check_shape("y", yg, xg.rows(), config_.d_model);
    const Eigen::Index rows = xg.rows();
    if (!row_keys.empty() && static_cast<Eigen::Index>(row_keys.size()) != rows) {
      detail::fail("row_keys has ", row_keys.size(), " entries, expected 0 or ", rows);
    }
    refresh_forward_weights();
    const int d_ff = config_.d_ff;
    const bool drop = mode == Mode::kTrain && config_.dropout > 0.0f;
    const detail::CounterRng rng(config_.seed, detail::Stream::kDropout, dropout_calls_);
    if (drop) ++dropout_calls_;
    hidden_pre_.resize(rows, kProducts * d_ff);    // x * W_in + b_in (gated: pairs), float32
    hidden_.resize(rows, d_ff);                    // act(...) after dropout, Element
    dropout_scale_.resize(drop ? rows : 0, d_ff);  // 0 or 1 / (1 - p)
    // h = dropout(act(x W_in + b_in)) (gated: dropout(act(x W_gate + b_gate) * (x W_in +
    // b_in))), computed block by block as the (fused) product finishes.
    multiply_blocks(
        offsets, xg.data(), static_cast<int>(xg.outerStride()), w_in_packed_, hidden_pre_.data(),
        kProducts * d_ff, [&](int e, Eigen::Index r, int j0, int cols) {
          const std::uint64_t key = row_keys.empty() ? static_cast<std::uint64_t>(r) : row_keys[r];
          if constexpr (kGated) {
            finish_gated_hidden(e, r, j0, cols, drop ? &rng : nullptr, key);
          } else {
            finish_hidden(e, r, j0, cols, drop ? &rng : nullptr, key);
          }
        });
    const int ldy = static_cast<int>(yg.outerStride());
    if (config_.bias) {
      multiply_blocks(offsets, hidden_.data(), d_ff, w_out_packed_, yg.data(), ldy,
                      [&](int e, Eigen::Index r, int j0, int cols) {
                        float* y = yg.data() + r * ldy + j0;
                        const float* b = b_out_[e].data() + j0;
                        for (int j = 0; j < cols; ++j) y[j] += b[j];
                      });
    } else {
      multiply_blocks(offsets, hidden_.data(), d_ff, w_out_packed_, yg.data(), ldy, NoFinish());
    }
    has_forward_ = mode == Mode::kTrain;
  }

  /// Resizes yg to [rows, d_model], then forward as above.
  void forward(const Eigen::Ref<const Matrix<Element>>& xg, const std::vector<int>& offsets,
               Mode mode, const std::vector<std::uint64_t>& row_keys, Matrix<float>& yg) {
    yg.resize(xg.rows(), config_.d_model);
    forward(xg, offsets, mode, row_keys, Eigen::Ref<Matrix<float>>(yg));
  }

  /// Given xg of the last training forward and dyg [rows, d_model], accumulates the parameter
  /// gradients and writes dxg [rows, d_model].
  void backward(const Eigen::Ref<const Matrix<Element>>& xg, const std::vector<int>& offsets,
                const Eigen::Ref<const Matrix<float>>& dyg, Eigen::Ref<Matrix<float>> dxg) {
    if (!has_forward_) detail::fail("backward called before a Mode::kTrain forward");
    check_parameter_shapes();
    check_gradient_shapes();
    check_blocks(xg.rows(), offsets);
    detail::check_shape("x", xg, -1, config_.d_model);
    detail::check_shape("dy", dyg, xg.rows(), config_.d_model);
    detail::check_shape("x (rows of the last training forward)", xg, hidden_.rows(), -1);
    detail::check_shape("dx", dxg, xg.rows(), config_.d_model);
    refresh_backward_weights();
    const Eigen::Index rows = xg.rows();
    const int d_model = config_.d_model, d_ff = config_.d_ff;
    const int ldx = static_cast<int>(xg.outerStride());
    // dy as Element: itself for fp32, a converted copy for bf16.
    const Element* dy = nullptr;
    int ldd = d_model;
    if constexpr (kElementIsFloat) {
      dy = dyg.data();
      ldd = static_cast<int>(dyg.outerStride());
    } else {
      dy_element_.resize(rows, d_model);
      detail::parallel_for(rows, d_model, [&](Eigen::Index r) {
        kernels::convert_row(dyg.data() + r * dyg.outerStride(), dy_element_.data() + r * d_model,
                             d_model);
      });
      dy = dy_element_.data();
    }
    if (config_.bias) {
      for (int e = 0; e < config_.num_ffns; ++e) {
        grad_b_out_[e] += dyg.middleRows(offsets[e], offsets[e + 1] - offsets[e]).colwise().sum();
      }
    }
    if constexpr (kGated) {
      backward_gated(xg, offsets, dy, ldd, dxg);
      return;
    }
    // dh = dy * W_out^T, then through dropout and the activation (in place), block by block.
    dhidden_.resize(rows, d_ff);
    if constexpr (!kElementIsFloat) dhidden_element_.resize(rows, d_ff);
    multiply_blocks(offsets, dy, ldd, w_out_transposed_, dhidden_.data(), d_ff,
                    [&](int, Eigen::Index r, int j0, int cols) { finish_dhidden(r, j0, cols); });
    // dW_out += h^T * dy
    accumulate_weight_grads(offsets, hidden_.data(), d_ff, dy, ldd, grad_w_out_);
    if (config_.bias) {
      const auto dhidden = dhidden_.view();
      for (int e = 0; e < config_.num_ffns; ++e) {
        grad_b_in_[e] +=
            dhidden.middleRows(offsets[e], offsets[e + 1] - offsets[e]).colwise().sum();
      }
    }
    const Element* dpre = nullptr;  // [rows, d_ff] dL/d(x W_in + b_in) as Element
    if constexpr (kElementIsFloat) {
      dpre = dhidden_.data();
    } else {
      dpre = dhidden_element_.data();
    }
    // dW_in += x^T * dpre; dx = dpre * W_in^T
    accumulate_weight_grads(offsets, xg.data(), ldx, dpre, d_ff, grad_w_in_);
    multiply_blocks(offsets, dpre, d_ff, w_in_transposed_, dxg.data(),
                    static_cast<int>(dxg.outerStride()), NoFinish());
  }

  /// Resizes dxg to [rows, d_model], then backward as above.
  void backward(const Eigen::Ref<const Matrix<Element>>& xg, const std::vector<int>& offsets,
                const Eigen::Ref<const Matrix<float>>& dyg, Matrix<float>& dxg) {
    dxg.resize(xg.rows(), config_.d_model);
    backward(xg, offsets, dyg, Eigen::Ref<Matrix<float>>(dxg));
  }

 private:
  static constexpr bool kElementIsFloat = std::is_same_v<Element, float>;
  using PackedWeight = kernels::PackedB<Element, Isa>;
  // Products of x per hidden column: 2 (gate and up) for a gated activation.
  static constexpr int kProducts = kGated ? 2 : 1;
  // Init substreams of W_gate: above every 2 * e + 2 of W_in and W_out.
  static constexpr std::uint64_t kGateSubstream = std::uint64_t{1} << 40;

  template <class V>
  V& gated(const char* name, V& v) {
    if constexpr (!kGated) {
      detail::fail(name, ": the activation \"", Activation::name(),
                   "\" is not gated (SEMANTICS 15), so the experts have no gate matrix; use "
                   "SwiGlu or GeGlu");
    }
    return v;
  }

  /// Backward of a gated bank from dy (Element, [rows, ldd]): dh = dy W_out^T; per hidden
  /// column d(gate pre) = dh * up * act'(g) and d(up) = dh * act(g), into dpre_ [rows, 2 d_ff]
  /// laid out [d gate | d up]; then dW_gate, dW_in (one batch) and dx = dpre [W_gate | W_in]^T
  /// (one product over k = 2 d_ff).
  void backward_gated(const Eigen::Ref<const Matrix<Element>>& xg, const std::vector<int>& offsets,
                      const Element* dy, int ldd, Eigen::Ref<Matrix<float>> dxg) {
    const Eigen::Index rows = xg.rows();
    const int d_ff = config_.d_ff;
    const int ldx = static_cast<int>(xg.outerStride());
    dhidden_.resize(rows, d_ff);
    dpre_.resize(rows, 2 * d_ff);
    if constexpr (!kElementIsFloat) dhidden_element_.resize(rows, 2 * d_ff);
    multiply_blocks(
        offsets, dy, ldd, w_out_transposed_, dhidden_.data(), d_ff,
        [&](int, Eigen::Index r, int j0, int cols) { finish_gated_dhidden(r, j0, cols); });
    accumulate_weight_grads(offsets, hidden_.data(), d_ff, dy, ldd, grad_w_out_);
    if (config_.bias) {
      const auto dpre = dpre_.view();  // [rows, 2 d_ff]
      for (int e = 0; e < config_.num_ffns; ++e) {
        const auto block = dpre.middleRows(offsets[e], offsets[e + 1] - offsets[e]);
        grad_b_gate_[e] += block.leftCols(d_ff).colwise().sum();
        grad_b_in_[e] += block.rightCols(d_ff).colwise().sum();
      }
    }
    const Element* dpre = nullptr;  // [rows, 2 d_ff] as Element
    if constexpr (kElementIsFloat) {
      dpre = dpre_.data();
    } else {
      dpre = dhidden_element_.data();
    }
    // dW_gate += x^T dpre[:, :d_ff] and dW_in += x^T dpre[:, d_ff:], one batch.
    plain_problems_.clear();
    for (int e = 0; e < config_.num_ffns; ++e) {
      const int m = offsets[e + 1] - offsets[e];
      if (m == 0) continue;
      const Eigen::Index first = offsets[e];
      for (int half = 0; half < 2; ++half) {
        Matrix<float>& grad = half == 0 ? grad_w_gate_[e] : grad_w_in_[e];
        plain_problems_.push_back(kernels::GemmProblem<Element>{
            config_.d_model, d_ff, m, xg.data() + first * ldx, ldx, kernels::Transpose::kYes,
            dpre + first * 2 * d_ff + half * d_ff, 2 * d_ff, kernels::Transpose::kNo, grad.data(),
            d_ff, 1.0f});
      }
    }
    if (!plain_problems_.empty()) kernels::gemm_batch<Element, Isa>(plain_problems_);
    multiply_blocks(offsets, dpre, 2 * d_ff, w_in_transposed_, dxg.data(),
                    static_cast<int>(dxg.outerStride()), NoFinish());
  }

  /// The local index of global expert e; throws unless the bank holds it.
  int local(int e) const {
    const int first = config_.first_ffn;
    if (e < first || e >= first + config_.num_ffns) {
      detail::fail("expert index is ", e, ", expected in [", first, ", ", first + config_.num_ffns,
                   ")", first > 0 ? " (the experts this bank holds)" : "");
    }
    return e - first;
  }

  Matrix<float>& expose(int i, std::vector<Matrix<float>>& masters) {
    exposed_[i] = 1;
    return masters[i];
  }

  static void check_parameter(const char* name, int e, const Matrix<float>& m, Eigen::Index rows,
                              Eigen::Index cols) {
    if (m.rows() != rows || m.cols() != cols) {
      detail::fail("expert ", e, " ", name, " has shape [", m.rows(), ", ", m.cols(),
                   "], expected [", rows, ", ", cols,
                   "] (parameter shapes are fixed by the configuration)");
    }
  }

  void check_blocks(Eigen::Index rows, const std::vector<int>& offsets) const {
    if (static_cast<int>(offsets.size()) != config_.num_ffns + 1 || offsets.front() != 0 ||
        offsets.back() != rows) {
      detail::fail("row blocks: expected ", config_.num_ffns + 1, " offsets from 0 to ", rows);
    }
    for (int e = 0; e < config_.num_ffns; ++e) {
      if (offsets[e + 1] < offsets[e]) {
        detail::fail("row blocks: offsets[", e + 1, "] = ", offsets[e + 1], " is below offsets[", e,
                     "] = ", offsets[e]);
      }
    }
  }

  /// Packs the weights for the forward products (converting to Element) where they changed;
  /// the transposed packs for backward follow lazily.
  void refresh_forward_weights() {
    const int d_model = config_.d_model, d_ff = config_.d_ff;
    for (int e = 0; e < config_.num_ffns; ++e) {
      if (!stale_[e] && !exposed_[e]) continue;
      if constexpr (kGated) {
        // [d_model, 2 d_ff], columns interleaved: 2j gate j, 2j + 1 up j (see the top).
        pack_source_.resize(d_model, 2 * d_ff);
        for (int i = 0; i < d_model; ++i) {
          for (int j = 0; j < d_ff; ++j) {
            pack_source_(i, 2 * j) = w_gate_[e](i, j);
            pack_source_(i, 2 * j + 1) = w_in_[e](i, j);
          }
        }
        w_in_packed_[e].pack(pack_source_.data(), 2 * d_ff, kernels::Transpose::kNo, d_model,
                             2 * d_ff);
      } else {
        w_in_packed_[e].pack(w_in_[e].data(), d_ff, kernels::Transpose::kNo, d_model, d_ff);
      }
      w_out_packed_[e].pack(w_out_[e].data(), d_model, kernels::Transpose::kNo, d_ff, d_model);
      stale_[e] = 0;
      transposed_stale_[e] = 1;
    }
  }

  void refresh_backward_weights() {
    const int d_model = config_.d_model, d_ff = config_.d_ff;
    for (int e = 0; e < config_.num_ffns; ++e) {
      if (!transposed_stale_[e]) continue;
      // W_out^T [d_model, d_ff] and W_in^T [d_ff, d_model].
      w_out_transposed_[e].pack(w_out_[e].data(), d_model, kernels::Transpose::kYes, d_model, d_ff);
      if constexpr (kGated) {
        // [W_gate | W_in]^T [2 d_ff, d_model], the order of dpre's columns.
        pack_source_.resize(d_model, 2 * d_ff);
        pack_source_.leftCols(d_ff) = w_gate_[e];
        pack_source_.rightCols(d_ff) = w_in_[e];
        w_in_transposed_[e].pack(pack_source_.data(), 2 * d_ff, kernels::Transpose::kYes, 2 * d_ff,
                                 d_model);
      } else {
        w_in_transposed_[e].pack(w_in_[e].data(), d_ff, kernels::Transpose::kYes, d_ff, d_model);
      }
      transposed_stale_[e] = 0;
    }
  }

  struct NoFinish {
    void operator()(int, Eigen::Index, int, int) const {}
  };

  /// Bias, activation and dropout of hidden row r, columns [j0, j0 + cols), of expert e: reads
  /// the product from hidden_pre_, leaves x W_in + b_in there and writes h to hidden_.
  void finish_hidden(int e, Eigen::Index r, int j0, int cols, const detail::CounterRng* dropout,
                     std::uint64_t key) {
    const int d_ff = config_.d_ff;
    float* pre = hidden_pre_.data() + r * d_ff + j0;
    Element* out = hidden_.data() + r * d_ff + j0;
    if (config_.bias) {
      const float* b = b_in_[e].data() + j0;
      for (int j = 0; j < cols; ++j) pre[j] += b[j];
    }
    const float keep_scale = 1.0f / (1.0f - config_.dropout);
    constexpr int kChunk = 64;
    alignas(64) float h[kChunk];
    for (int c0 = 0; c0 < cols; c0 += kChunk) {
      const int n = std::min(kChunk, cols - c0);
      for (int j = 0; j < n; ++j) h[j] = Activation::value(pre[c0 + j]);
      if (dropout != nullptr) {
        float* scale = dropout_scale_.data() + r * d_ff + j0 + c0;
        for (int j = 0; j < n; ++j) {
          const std::uint64_t unit = key * d_ff + static_cast<std::uint64_t>(j0 + c0 + j);
          scale[j] = dropout->uniform(unit) < config_.dropout ? 0.0f : keep_scale;
          h[j] *= scale[j];
        }
      }
      kernels::convert_row(h, out + c0, n);
    }
  }

  /// Gated finish of fused columns [j0, j0 + cols) of row r (even j0 and cols: whole pairs):
  /// adds b_gate and b_in to the pairs in hidden_pre_, writes h = dropout(act(g) * u) for hidden
  /// columns [j0 / 2, (j0 + cols) / 2) to hidden_.
  void finish_gated_hidden(int e, Eigen::Index r, int j0, int cols,
                           const detail::CounterRng* dropout, std::uint64_t key) {
    const int d_ff = config_.d_ff;
    const int h0 = j0 / 2, count = cols / 2;
    float* pre = hidden_pre_.data() + r * 2 * d_ff + 2 * h0;  // pairs (g, u)
    Element* out = hidden_.data() + r * d_ff + h0;
    if (config_.bias) {
      const float* bg = b_gate_[e].data() + h0;
      const float* bu = b_in_[e].data() + h0;
      for (int j = 0; j < count; ++j) {
        pre[2 * j] += bg[j];
        pre[2 * j + 1] += bu[j];
      }
    }
    const float keep_scale = 1.0f / (1.0f - config_.dropout);
    constexpr int kChunk = 64;
    alignas(64) float h[kChunk];
    for (int c0 = 0; c0 < count; c0 += kChunk) {
      const int n = std::min(kChunk, count - c0);
      for (int j = 0; j < n; ++j) {
        h[j] = Activation::value(pre[2 * (c0 + j)]) * pre[2 * (c0 + j) + 1];
      }
      if (dropout != nullptr) {
        float* scale = dropout_scale_.data() + r * d_ff + h0 + c0;
        for (int j = 0; j < n; ++j) {
          const std::uint64_t unit = key * d_ff + static_cast<std::uint64_t>(h0 + c0 + j);
          scale[j] = dropout->uniform(unit) < config_.dropout ? 0.0f : keep_scale;
          h[j] *= scale[j];
        }
      }
      kernels::convert_row(h, out + c0, n);
    }
  }

  /// Gated: dL/dh of row r, hidden columns [j0, j0 + cols) -> d(gate pre) = dh * u * act'(g)
  /// and d(up) = dh * act(g) into dpre_ [rows, 2 d_ff] = [d gate | d up] (and the Element copy).
  void finish_gated_dhidden(Eigen::Index r, int j0, int cols) {
    const int d_ff = config_.d_ff;
    float* g = dhidden_.data() + r * d_ff + j0;
    if (dropout_scale_.size() > 0) {
      const float* scale = dropout_scale_.data() + r * d_ff + j0;
      for (int j = 0; j < cols; ++j) g[j] *= scale[j];
    }
    const float* pre = hidden_pre_.data() + r * 2 * d_ff + 2 * j0;
    float* dgate = dpre_.data() + r * 2 * d_ff + j0;
    float* dup = dgate + d_ff;
    for (int j = 0; j < cols; ++j) {
      const float gate = pre[2 * j], up = pre[2 * j + 1];
      dgate[j] = g[j] * up * Activation::derivative(gate);
      dup[j] = g[j] * Activation::value(gate);
    }
    if constexpr (!kElementIsFloat) {
      Element* d = dhidden_element_.data() + r * 2 * d_ff + j0;
      kernels::convert_row(dgate, d, cols);
      kernels::convert_row(dup, d + d_ff, cols);
    }
  }

  /// dL/dh -> dL/d(x W_in + b_in) for row r, columns [j0, j0 + cols), in place in dhidden_ (and
  /// converted into dhidden_element_ for bf16).
  void finish_dhidden(Eigen::Index r, int j0, int cols) {
    const int d_ff = config_.d_ff;
    float* g = dhidden_.data() + r * d_ff + j0;
    const float* pre = hidden_pre_.data() + r * d_ff + j0;
    for (int j = 0; j < cols; ++j) g[j] *= Activation::derivative(pre[j]);
    if (dropout_scale_.size() > 0) {
      const float* scale = dropout_scale_.data() + r * d_ff + j0;
      for (int j = 0; j < cols; ++j) g[j] *= scale[j];
    }
    if constexpr (!kElementIsFloat) {
      kernels::convert_row(g, dhidden_element_.data() + r * d_ff + j0, cols);
    }
  }

  /// c[block e] = a[block e] * weights[e] for every row block; a is [rows, lda], c [rows, ldc].
  /// `finish(e, r, j0, cols)` runs on row r (of block e), columns [j0, j0 + cols), of c once its
  /// product is complete.
  template <class Finish>
  void multiply_blocks(const std::vector<int>& offsets, const Element* a, int lda,
                       const std::vector<PackedWeight>& weights, float* c, int ldc,
                       const Finish& finish) {
    packed_problems_.clear();
    block_expert_.clear();
    for (int e = 0; e < config_.num_ffns; ++e) {
      const int m = offsets[e + 1] - offsets[e];
      if (m == 0) continue;
      const Eigen::Index first = offsets[e];
      packed_problems_.push_back(
          kernels::PackedGemmProblem<Element, Isa>{m, a + first * lda, lda, kernels::Transpose::kNo,
                                                   &weights[e], c + first * ldc, ldc, 0.0f});
      block_expert_.push_back(e);
    }
    if (packed_problems_.empty()) return;
    if constexpr (std::is_same_v<Finish, NoFinish>) {
      kernels::gemm_batch(packed_problems_);
    } else {
      kernels::gemm_batch(packed_problems_, [&](int problem, int i0, int rows, int j0, int cols) {
        const int e = block_expert_[problem];
        for (int i = i0; i < i0 + rows; ++i) finish(e, offsets[e] + i, j0, cols);
      });
    }
  }

  /// grads[e] += a[block e]^T * b[block e]; a is [rows, lda], b [rows, ldb], grads [cols of a,
  /// cols of b] (a has d_model or d_ff columns, as many as grads[e] has rows).
  void accumulate_weight_grads(const std::vector<int>& offsets, const Element* a, int lda,
                               const Element* b, int ldb, std::vector<Matrix<float>>& grads) {
    plain_problems_.clear();
    for (int e = 0; e < config_.num_ffns; ++e) {
      const int m = offsets[e + 1] - offsets[e];
      if (m == 0) continue;
      const Eigen::Index first = offsets[e];
      plain_problems_.push_back(kernels::GemmProblem<Element>{
          static_cast<int>(grads[e].rows()), static_cast<int>(grads[e].cols()), m, a + first * lda,
          lda, kernels::Transpose::kYes, b + first * ldb, ldb, kernels::Transpose::kNo,
          grads[e].data(), static_cast<int>(grads[e].cols()), 1.0f});
    }
    if (!plain_problems_.empty()) kernels::gemm_batch<Element, Isa>(plain_problems_);
  }

  FeedForwardConfig config_;
  std::vector<Matrix<float>> w_in_, w_out_, b_in_, b_out_;  // float32 masters
  std::vector<Matrix<float>> grad_w_in_, grad_w_out_, grad_b_in_, grad_b_out_;
  std::vector<Matrix<float>> w_gate_, b_gate_, grad_w_gate_, grad_b_gate_;  // gated only
  Matrix<float> pack_source_;  // [d_model, 2 d_ff] gated: the fused operand before packing
  // Weights packed for the kernels (converted to Element): forward operands W_in, W_out and,
  // built at the first backward after a change, W_out^T and W_in^T.
  std::vector<PackedWeight> w_in_packed_, w_out_packed_, w_out_transposed_, w_in_transposed_;
  std::vector<char> stale_;             // forward packs out of date
  std::vector<char> transposed_stale_;  // backward packs out of date
  std::vector<char> exposed_;  // a writable reference to the master is out: refresh every forward
  // Per-call buffers, kept between calls (grow only).
  detail::RowBuffer<float> hidden_pre_;     // [rows, d_ff] x W_in + b_in of the last forward
  detail::RowBuffer<Element> hidden_;       // [rows, d_ff] activation after dropout
  detail::RowBuffer<float> dropout_scale_;  // [rows, d_ff] or empty
  detail::RowBuffer<float> dhidden_;        // [rows, d_ff] backward: dL/dh, then dL/dpre
  detail::RowBuffer<float> dpre_;           // [rows, 2 d_ff] gated backward: [d gate | d up]
  detail::RowBuffer<Element> dhidden_element_, dy_element_;  // bf16 copies for the products
  std::vector<kernels::PackedGemmProblem<Element, Isa>> packed_problems_;
  std::vector<kernels::GemmProblem<Element>> plain_problems_;
  std::vector<int> block_expert_;  // expert of each packed problem
  std::uint64_t dropout_calls_ = 0;
  bool has_forward_ = false;
};

}  // namespace switchmoe
