#pragma once
// A bank of independent feed-forward networks, y = act(x * W_in + b_in) * W_out + b_out, each
// applied to its own contiguous block of rows. A Switch layer's experts are a bank of E; the
// dense FFN is a bank of one. Expert dropout (SEMANTICS 12) acts on the hidden activation.
//
// Precision contract (SEMANTICS 13): master weights and gradients are float32; the policy's
// Element type stores the packed compute copies of the weights and the activations that enter a
// matrix product (x, hidden, dy, dhidden); every product accumulates in float32.

#include <cstdint>
#include <string>
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

struct FeedForwardConfig {
  int num_ffns = 1;
  int d_model = 0;
  int d_ff = 0;
  bool bias = false;
  float dropout = 0.0f;     // on the hidden activation, training only
  float init_scale = 0.1f;  // SEMANTICS 11
  std::uint64_t seed = 0;
};

template <class Policy, class Activation>
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

  explicit FeedForwardBank(const FeedForwardConfig& config) : config_(config) {
    if (config.num_ffns < 1) detail::fail("num_experts is ", config.num_ffns, ", expected >= 1");
    if (config.d_model < 1) detail::fail("d_model is ", config.d_model, ", expected >= 1");
    if (config.d_ff < 1) detail::fail("d_ff is ", config.d_ff, ", expected >= 1");
    if (!(config.dropout >= 0.0f && config.dropout < 1.0f)) {
      detail::fail("dropout rate is ", config.dropout, ", expected in [0, 1)");
    }
    const int n = config.num_ffns;
    w_in_.resize(n), w_out_.resize(n), b_in_.resize(n), b_out_.resize(n);
    grad_w_in_.resize(n), grad_w_out_.resize(n), grad_b_in_.resize(n), grad_b_out_.resize(n);
    w_in_packed_.resize(n), w_out_packed_.resize(n);
    w_in_transposed_.resize(n), w_out_transposed_.resize(n);
    stale_.assign(n, 1);
    transposed_stale_.assign(n, 1);
    exposed_.assign(n, 0);
    for (int e = 0; e < n; ++e) {
      w_in_[e].resize(config.d_model, config.d_ff);
      w_out_[e].resize(config.d_ff, config.d_model);
      truncated_normal_init(w_in_[e], config.init_scale, config.d_model, config.seed, 2 * e + 1);
      truncated_normal_init(w_out_[e], config.init_scale, config.d_ff, config.seed, 2 * e + 2);
      b_in_[e] = Matrix<float>::Zero(config.bias ? 1 : 0, config.d_ff);
      b_out_[e] = Matrix<float>::Zero(config.bias ? 1 : 0, config.d_model);
    }
    zero_grad();
  }

  const FeedForwardConfig& config() const { return config_; }
  int size() const { return config_.num_ffns; }

  /// Refreshes the compute copies from the master weights now and promises that references
  /// handed out so far will not be written through again: later forwards reuse the copies
  /// until the next non-const access. For inference after loading or editing weights.
  void sync_weights() {
    std::fill(stale_.begin(), stale_.end(), 1);
    std::fill(exposed_.begin(), exposed_.end(), 0);
    refresh_forward_weights();
  }

  // A non-const reference to a weight may be written through at any later time, so from then on
  // the expert's compute copy is refreshed at every forward, until sync_weights().
  Matrix<float>& w_in(int e) { return expose(check_index(e), w_in_[e]); }    // [d_model, d_ff]
  Matrix<float>& w_out(int e) { return expose(check_index(e), w_out_[e]); }  // [d_ff, d_model]
  Matrix<float>& b_in(int e) { return b_in_[check_index(e)]; }    // [1, d_ff] (empty: no bias)
  Matrix<float>& b_out(int e) { return b_out_[check_index(e)]; }  // [1, d_model]
  const Matrix<float>& w_in(int e) const { return w_in_[check_index(e)]; }
  const Matrix<float>& w_out(int e) const { return w_out_[check_index(e)]; }
  Matrix<float>& grad_w_in(int e) { return grad_w_in_[check_index(e)]; }
  Matrix<float>& grad_w_out(int e) { return grad_w_out_[check_index(e)]; }
  Matrix<float>& grad_b_in(int e) { return grad_b_in_[check_index(e)]; }
  Matrix<float>& grad_b_out(int e) { return grad_b_out_[check_index(e)]; }

  void zero_grad() {
    for (int e = 0; e < config_.num_ffns; ++e) {
      grad_w_in_[e] = Matrix<float>::Zero(config_.d_model, config_.d_ff);
      grad_w_out_[e] = Matrix<float>::Zero(config_.d_ff, config_.d_model);
      grad_b_in_[e] = Matrix<float>::Zero(b_in_[e].rows(), config_.d_ff);
      grad_b_out_[e] = Matrix<float>::Zero(b_out_[e].rows(), config_.d_model);
    }
  }

  /// Parameters named prefix + "<e>.w_in" etc.; with `single` (dense FFN) just prefix + "w_in".
  void append_parameters(const std::string& prefix, bool single, std::vector<ParameterRef>& out) {
    for (int e = 0; e < config_.num_ffns; ++e) {
      const std::string p = single ? prefix : prefix + std::to_string(e) + ".";
      exposed_[e] = 1;  // the caller may write through the pointers at any time
      out.push_back({p + "w_in", &w_in_[e], &grad_w_in_[e]});
      if (config_.bias) out.push_back({p + "b_in", &b_in_[e], &grad_b_in_[e]});
      out.push_back({p + "w_out", &w_out_[e], &grad_w_out_[e]});
      if (config_.bias) out.push_back({p + "b_out", &b_out_[e], &grad_b_out_[e]});
    }
  }

  /// Runs FFN e on rows [offsets[e], offsets[e+1]) of xg [rows, d_model]; returns yg
  /// [rows, d_model] in float32. `row_keys` (one per row, or empty for the row index) name the
  /// rows for the dropout draw, so masks do not depend on how rows were laid out.
  /// In Mode::kTrain the hidden activations are kept for backward.
  void forward(const Matrix<Element>& xg, const std::vector<int>& offsets, Mode mode,
               const std::vector<std::uint64_t>& row_keys, Matrix<float>& yg) {
    check_blocks(xg, offsets);
    refresh_forward_weights();
    const Eigen::Index rows = xg.rows();
    const int d_model = config_.d_model, d_ff = config_.d_ff;
    hidden_pre_.resize(rows, d_ff);  // [rows, d_ff] x * W_in, float32
    multiply_blocks(offsets, xg.data(), d_model, w_in_packed_, hidden_pre_.data(), d_ff);
    const bool drop = mode == Mode::kTrain && config_.dropout > 0.0f;
    const detail::CounterRng rng(config_.seed, detail::Stream::kDropout, dropout_calls_);
    if (drop) ++dropout_calls_;
    dropout_scale_.resize(drop ? rows : 0, d_ff);  // [rows, d_ff] 0 or 1 / (1 - p)
    hidden_.resize(rows, d_ff);                    // [rows, d_ff] act(x W_in + b_in), Element
    const float keep_scale = 1.0f / (1.0f - config_.dropout);
    for_each_row(offsets, d_ff, [&](int e, Eigen::Index r) {
      float* pre = hidden_pre_.data() + r * d_ff;
      Element* out = hidden_.data() + r * d_ff;
      if (config_.bias) {
        for (int j = 0; j < d_ff; ++j) pre[j] += b_in_[e](0, j);
      }
      const std::uint64_t key = row_keys.empty() ? static_cast<std::uint64_t>(r) : row_keys[r];
      for (int j = 0; j < d_ff; ++j) {
        float h = Activation::value(pre[j]);
        if (drop) {
          const float s = rng.uniform(key * d_ff + j) < config_.dropout ? 0.0f : keep_scale;
          dropout_scale_(r, j) = s;
          h *= s;
        }
        out[j] = static_cast<Element>(h);
      }
    });
    yg.resize(rows, d_model);
    multiply_blocks(offsets, hidden_.data(), d_ff, w_out_packed_, yg.data(), d_model);
    if (config_.bias) {
      for_each_row(offsets, d_model, [&](int e, Eigen::Index r) { yg.row(r) += b_out_[e].row(0); });
    }
    has_forward_ = mode == Mode::kTrain;
  }

  /// Given xg of the last training forward and dyg [rows, d_model], accumulates the parameter
  /// gradients and returns dxg [rows, d_model].
  void backward(const Matrix<Element>& xg, const std::vector<int>& offsets,
                const Matrix<float>& dyg, Matrix<float>& dxg) {
    if (!has_forward_) detail::fail("backward called before a Mode::kTrain forward");
    check_blocks(xg, offsets);
    detail::check_shape("dy", dyg, xg.rows(), config_.d_model);
    detail::check_shape("xg", hidden_, xg.rows(), config_.d_ff);
    refresh_backward_weights();
    const Eigen::Index rows = xg.rows();
    const int d_model = config_.d_model, d_ff = config_.d_ff;
    const Matrix<Element>* dy = &as_element(dyg, dy_element_);  // [rows, d_model]
    if (config_.bias) {
      for (int e = 0; e < config_.num_ffns; ++e) {
        grad_b_out_[e] += dyg.middleRows(offsets[e], offsets[e + 1] - offsets[e]).colwise().sum();
      }
    }
    Matrix<float>& dhidden = dhidden_;  // [rows, d_ff] dL/dh, reused across calls
    dhidden.resize(rows, d_ff);
    // dh = dy * W_out^T; dW_out += h^T * dy
    multiply_blocks(offsets, dy->data(), d_model, w_out_transposed_, dhidden.data(), d_ff);
    accumulate_weight_grads(offsets, hidden_.data(), d_ff, dy->data(), d_model, grad_w_out_);
    for_each_row(offsets, d_ff, [&](int, Eigen::Index r) {  // through dropout and activation
      for (int j = 0; j < d_ff; ++j) {
        float g = dhidden(r, j) * Activation::derivative(hidden_pre_(r, j));
        if (dropout_scale_.size() > 0) g *= dropout_scale_(r, j);
        dhidden(r, j) = g;
      }
    });
    if (config_.bias) {
      for (int e = 0; e < config_.num_ffns; ++e) {
        grad_b_in_[e] +=
            dhidden.middleRows(offsets[e], offsets[e + 1] - offsets[e]).colwise().sum();
      }
    }
    const Matrix<Element>* dpre = &as_element(dhidden, dhidden_element_);  // [rows, d_ff]
    // dW_in += x^T * dpre; dx = dpre * W_in^T
    accumulate_weight_grads(offsets, xg.data(), d_model, dpre->data(), d_ff, grad_w_in_);
    dxg.resize(rows, d_model);
    multiply_blocks(offsets, dpre->data(), d_ff, w_in_transposed_, dxg.data(), d_model);
  }

 private:
  static constexpr bool kElementIsFloat = std::is_same_v<Element, float>;
  using PackedWeight = kernels::PackedB<Element>;

  int check_index(int e) const {
    if (e < 0 || e >= config_.num_ffns) {
      detail::fail("expert index is ", e, ", expected in [0, ", config_.num_ffns, ")");
    }
    return e;
  }

  Matrix<float>& expose(int e, Matrix<float>& m) {
    exposed_[e] = 1;
    return m;
  }

  void check_blocks(const Matrix<Element>& xg, const std::vector<int>& offsets) const {
    if (static_cast<int>(offsets.size()) != config_.num_ffns + 1 || offsets.front() != 0 ||
        offsets.back() != xg.rows()) {
      detail::fail("row blocks: expected ", config_.num_ffns + 1, " offsets from 0 to ", xg.rows());
    }
    detail::check_shape("x", xg, -1, config_.d_model);
  }

  /// Packs the weights for the forward products (converting to Element) where they changed;
  /// the transposed packs for backward follow lazily.
  void refresh_forward_weights() {
    const int d_model = config_.d_model, d_ff = config_.d_ff;
    for (int e = 0; e < config_.num_ffns; ++e) {
      if (!stale_[e] && !exposed_[e]) continue;
      w_in_packed_[e].pack(w_in_[e].data(), d_ff, kernels::Transpose::kNo, d_model, d_ff);
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
      w_in_transposed_[e].pack(w_in_[e].data(), d_ff, kernels::Transpose::kYes, d_ff, d_model);
      transposed_stale_[e] = 0;
    }
  }

  /// c[block e] = a[block e] * weights[e] for every row block; a is [rows, lda], c [rows, ldc].
  static void multiply_blocks(const std::vector<int>& offsets, const Element* a, int lda,
                              const std::vector<PackedWeight>& weights, float* c, int ldc) {
    run_blocks(offsets, [&](int e, Eigen::Index first, int m) {
      return kernels::PackedGemmProblem<Element>{
          m,           a + first * lda, lda, kernels::Transpose::kNo,
          &weights[e], c + first * ldc, ldc, 0.0f};
    });
  }

  /// grads[e] += a[block e]^T * b[block e]; a is [rows, lda], b [rows, ldb], grads [lda, ldb].
  static void accumulate_weight_grads(const std::vector<int>& offsets, const Element* a, int lda,
                                      const Element* b, int ldb,
                                      std::vector<Matrix<float>>& grads) {
    run_blocks(offsets, [&](int e, Eigen::Index first, int m) {
      return kernels::GemmProblem<Element>{lda,
                                           ldb,
                                           m,
                                           a + first * lda,
                                           lda,
                                           kernels::Transpose::kYes,
                                           b + first * ldb,
                                           ldb,
                                           kernels::Transpose::kNo,
                                           grads[e].data(),
                                           ldb,
                                           1.0f};
    });
  }

  /// The Element view of a float32 activation: itself for fp32, a converted copy otherwise.
  static const Matrix<Element>& as_element(const Matrix<float>& m, Matrix<Element>& buffer) {
    if constexpr (kElementIsFloat) {
      return m;
    } else {
      buffer.resize(m.rows(), m.cols());
      detail::parallel_for(m.rows(), m.cols(), [&](Eigen::Index r) {
        buffer.row(r) = m.row(r).template cast<Element>();
      });
      return buffer;
    }
  }

  /// One GEMM per non-empty block, run together so the kernel can balance them across threads.
  template <class MakeProblem>
  static void run_blocks(const std::vector<int>& offsets, const MakeProblem& make) {
    using Problem = std::invoke_result_t<MakeProblem, int, Eigen::Index, int>;
    std::vector<Problem> problems;
    problems.reserve(offsets.size());
    for (std::size_t e = 0; e + 1 < offsets.size(); ++e) {
      const int m = offsets[e + 1] - offsets[e];
      if (m > 0) problems.push_back(make(static_cast<int>(e), offsets[e], m));
    }
    if (!problems.empty()) kernels::gemm_batch(problems);
  }

  /// body(e, r) for every row r of every block e.
  template <class Body>
  static void for_each_row(const std::vector<int>& offsets, int width, const Body& body) {
    const Eigen::Index rows = offsets.back();
    std::vector<int> owner(static_cast<std::size_t>(rows));
    for (std::size_t e = 0; e + 1 < offsets.size(); ++e) {
      for (int r = offsets[e]; r < offsets[e + 1]; ++r) owner[r] = static_cast<int>(e);
    }
    detail::parallel_for(rows, width, [&](Eigen::Index r) { body(owner[r], r); });
  }

  FeedForwardConfig config_;
  std::vector<Matrix<float>> w_in_, w_out_, b_in_, b_out_;  // float32 masters
  std::vector<Matrix<float>> grad_w_in_, grad_w_out_, grad_b_in_, grad_b_out_;
  // Weights packed for the kernels (converted to Element): forward operands W_in, W_out and,
  // built at the first backward after a change, W_out^T and W_in^T.
  std::vector<PackedWeight> w_in_packed_, w_out_packed_, w_out_transposed_, w_in_transposed_;
  std::vector<char> stale_;             // forward packs out of date
  std::vector<char> transposed_stale_;  // backward packs out of date
  std::vector<char> exposed_;    // a writable reference to the master is out: refresh every forward
  Matrix<float> hidden_pre_;     // [rows, d_ff] pre-activation of the last forward
  Matrix<Element> hidden_;       // [rows, d_ff] activation after dropout
  Matrix<float> dropout_scale_;  // [rows, d_ff] or empty
  Matrix<float> dhidden_;        // [rows, d_ff] backward workspace
  Matrix<Element> dy_element_, dhidden_element_;
  std::uint64_t dropout_calls_ = 0;
  bool has_forward_ = false;
};

}  // namespace switchmoe
