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
// Shared expert (SEMANTICS 16, FeedForwardConfig::shared_d_ff > 0): the bank also holds one
// always-on FFN of width shared_d_ff, applied to every token of the call (its own input rows,
// not the gathered ones). Its products join the routed experts' in the same gemm_batch calls, so
// the whole bank runs under one OpenMP loop per stage. Each group of FFNs of one width (the
// routed experts; the shared FFN) is a `Part` with its own masters, packs and buffers.
//
// Precision contract (SEMANTICS 13): master weights and gradients are float32; the policy's
// Element type stores the packed compute copies of the weights and the activations that enter a
// matrix product (x, hidden, dy, dhidden); every product accumulates in float32.

#include <omp.h>

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
#include "switchmoe/experts/activation.hpp"
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
  int shared_d_ff = 0;  // SEMANTICS 16: width of the shared FFN; 0: none
};

namespace detail {

/// How FeedForwardBank::forward runs its products (see its whole_ffn_schedule): chosen per
/// call (kAuto), or forced on the calling thread by a test that compares the schedules (the
/// results are bitwise the same; only speed differs).
enum class FfnSchedule { kAuto, kSplitTiles, kWholeFfns };
inline FfnSchedule& forced_ffn_schedule() {
  thread_local FfnSchedule schedule = FfnSchedule::kAuto;
  return schedule;
}

}  // namespace detail

/// The rows of one call for the shared FFN (SEMANTICS 16): every token of this process.
template <class T>
struct SharedRows {
  Eigen::Ref<const Matrix<T>> x;  // [tokens, d_model]
  std::int64_t first_token;       // global index of x's first row: dropout keys (SEMANTICS 21)
  // [tokens, d_model] output (forward) or dx (backward); mutable: written through a const view.
  mutable Eigen::Ref<Matrix<float>> y;
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
    if (config.shared_d_ff < 0) {
      detail::fail("shared_d_ff is ", config.shared_d_ff, ", expected >= 0 (0: no shared expert)");
    }
    if (!(config.dropout >= 0.0f && config.dropout < 1.0f)) {
      detail::fail("dropout rate is ", config.dropout, ", expected in [0, 1)");
    }
    init_part(routed_, config.num_ffns, config.d_ff, [&](int e, int which) {
      // W_in 2g + 1, W_out 2g + 2 (g the global index); W_gate a range of its own, so that the
      // other two are those of an ungated bank.
      const std::uint64_t global = static_cast<std::uint64_t>(config.first_ffn) + e;
      return which == 0 ? 2 * global + 1 : which == 1 ? 2 * global + 2 : kGateSubstream + global;
    });
    if (config.shared_d_ff > 0) {
      init_part(shared_, 1, config.shared_d_ff, [](int, int which) {
        return kSharedSubstream + static_cast<std::uint64_t>(which);
      });
    }
    zero_grad();
  }

  const FeedForwardConfig& config() const { return config_; }
  int size() const { return config_.num_ffns; }
  int first() const { return config_.first_ffn; }  // global index of the first FFN held
  bool has_shared() const { return shared_.count > 0; }

  /// Refreshes the compute copies from the master weights now and promises that references
  /// handed out so far will not be written through again: later forwards reuse the copies
  /// until the next non-const access. For inference after loading or editing weights.
  void sync_weights() {
    for (Part* part : {&routed_, &shared_}) {
      std::fill(part->stale.begin(), part->stale.end(), 1);
      std::fill(part->exposed.begin(), part->exposed.end(), 0);
    }
    refresh_forward_weights();
  }

  // Accessors take global expert indices. A non-const reference to a weight may be written
  // through at any later time, so from then on the expert's compute copy is refreshed at every
  // forward, until sync_weights().
  Matrix<float>& w_in(int e) { return expose(routed_, local(e), routed_.w_in); }  // [d_model, d_ff]
  Matrix<float>& w_out(int e) {
    return expose(routed_, local(e), routed_.w_out);
  }                                                                // [d_ff, d_model]
  Matrix<float>& b_in(int e) { return routed_.b_in[local(e)]; }    // [1, d_ff] (empty: no bias)
  Matrix<float>& b_out(int e) { return routed_.b_out[local(e)]; }  // [1, d_model]
  const Matrix<float>& w_in(int e) const { return routed_.w_in[local(e)]; }
  const Matrix<float>& w_out(int e) const { return routed_.w_out[local(e)]; }
  Matrix<float>& grad_w_in(int e) { return routed_.grad_w_in[local(e)]; }
  Matrix<float>& grad_w_out(int e) { return routed_.grad_w_out[local(e)]; }
  Matrix<float>& grad_b_in(int e) { return routed_.grad_b_in[local(e)]; }
  Matrix<float>& grad_b_out(int e) { return routed_.grad_b_out[local(e)]; }
  // Gated activations only (SEMANTICS 15); otherwise they throw std::invalid_argument.
  Matrix<float>& w_gate(int e) {  // [d_model, d_ff]
    return expose(routed_, local(e), gated("w_gate", routed_.w_gate));
  }
  Matrix<float>& b_gate(int e) { return gated("b_gate", routed_.b_gate)[local(e)]; }
  Matrix<float>& grad_w_gate(int e) { return gated("grad_w_gate", routed_.grad_w_gate)[local(e)]; }
  Matrix<float>& grad_b_gate(int e) { return gated("grad_b_gate", routed_.grad_b_gate)[local(e)]; }

  // The shared FFN (SEMANTICS 16); each throws std::invalid_argument without one.
  Matrix<float>& shared_w_in() { return expose(shared_, 0, shared("w_in", shared_.w_in)); }
  Matrix<float>& shared_w_out() { return expose(shared_, 0, shared("w_out", shared_.w_out)); }
  Matrix<float>& shared_w_gate() {
    return expose(shared_, 0, shared("w_gate", gated("shared_w_gate", shared_.w_gate)));
  }
  Matrix<float>& shared_b_in() { return shared("b_in", shared_.b_in)[0]; }
  Matrix<float>& shared_b_out() { return shared("b_out", shared_.b_out)[0]; }
  Matrix<float>& shared_b_gate() { return shared("b_gate", gated("b_gate", shared_.b_gate))[0]; }
  Matrix<float>& grad_shared_w_in() { return shared("grad_w_in", shared_.grad_w_in)[0]; }
  Matrix<float>& grad_shared_w_out() { return shared("grad_w_out", shared_.grad_w_out)[0]; }
  Matrix<float>& grad_shared_w_gate() {
    return shared("grad_w_gate", gated("grad_shared_w_gate", shared_.grad_w_gate))[0];
  }
  Matrix<float>& grad_shared_b_in() { return shared("grad_b_in", shared_.grad_b_in)[0]; }
  Matrix<float>& grad_shared_b_out() { return shared("grad_b_out", shared_.grad_b_out)[0]; }
  Matrix<float>& grad_shared_b_gate() {
    return shared("grad_b_gate", gated("grad_b_gate", shared_.grad_b_gate))[0];
  }

  /// Training-mode calls that have drawn dropout masks so far: the position of the dropout
  /// stream (SEMANTICS 12). Layer state for a checkpoint that resumes training exactly.
  std::uint64_t dropout_calls() const { return dropout_calls_; }
  void set_dropout_calls(std::uint64_t calls) { dropout_calls_ = calls; }

  void zero_grad() {
    for (Part* part : {&routed_, &shared_}) {
      for (int e = 0; e < part->count; ++e) {
        const int d_ff = part->width;
        part->grad_w_in[e] = Matrix<float>::Zero(config_.d_model, d_ff);
        part->grad_w_out[e] = Matrix<float>::Zero(d_ff, config_.d_model);
        part->grad_b_in[e] = Matrix<float>::Zero(part->b_in[e].rows(), d_ff);
        part->grad_b_out[e] = Matrix<float>::Zero(part->b_out[e].rows(), config_.d_model);
        if constexpr (kGated) {
          part->grad_w_gate[e] = Matrix<float>::Zero(config_.d_model, d_ff);
          part->grad_b_gate[e] = Matrix<float>::Zero(part->b_gate[e].rows(), d_ff);
        }
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
      append_ffn(routed_, e, p, single ? single_owner : ParameterOwner::kExpert,
                 single ? -1 : global, out);
    }
  }

  /// The shared FFN's parameters, prefix + "w_in" etc., owned by kShared (none without one).
  void append_shared_parameters(const std::string& prefix, std::vector<ParameterRef>& out) {
    if (has_shared()) append_ffn(shared_, 0, prefix, ParameterOwner::kShared, -1, out);
  }

  /// Throws std::invalid_argument naming the first master weight or gradient whose shape is no
  /// longer the configured one (resized through an accessor or a ParameterRef). Cheap: shapes
  /// only. Every forward and backward runs it before touching the storage.
  void check_parameter_shapes() const { check_shapes(/*gradients=*/false); }
  void check_gradient_shapes() const { check_shapes(/*gradients=*/true); }

  /// Sizes the per-call buffers for up to `rows` routed rows (and `shared_rows` rows of the
  /// shared FFN), so that later calls with at most that many rows allocate nothing.
  void reserve_rows(Eigen::Index rows, Eigen::Index shared_rows = 0) {
    reserve_part(routed_, rows);
    if (has_shared()) reserve_part(shared_, shared_rows);
    if constexpr (!kElementIsFloat)
      dy_element_.reserve(std::max(rows, shared_rows) * config_.d_model);
    const std::size_t problems = static_cast<std::size_t>(2 * (config_.num_ffns + 1));
    packed_problems_.reserve(problems), plain_problems_.reserve(problems);
    block_owner_.reserve(problems);
  }

  /// Runs FFN e on rows [offsets[e], offsets[e+1]) of xg [rows, d_model] and writes yg
  /// [rows, d_model] in float32. `row_keys` (one per row, or empty for the row index) name the
  /// rows for the dropout draw, so masks do not depend on how rows were laid out.
  /// In Mode::kTrain the hidden activations are kept for backward.
  void forward(const Eigen::Ref<const Matrix<Element>>& xg, const std::vector<int>& offsets,
               Mode mode, const std::vector<std::uint64_t>& row_keys,
               Eigen::Ref<Matrix<float>> yg) {
    forward_parts(xg, offsets, mode, row_keys, yg, nullptr);
  }

  /// As above, and the shared FFN on `shared.x` (every token) into `shared.y`, in the same
  /// batched products (SEMANTICS 16). Requires a bank with a shared FFN.
  void forward(const Eigen::Ref<const Matrix<Element>>& xg, const std::vector<int>& offsets,
               Mode mode, const std::vector<std::uint64_t>& row_keys, Eigen::Ref<Matrix<float>> yg,
               const SharedRows<Element>& shared) {
    forward_parts(xg, offsets, mode, row_keys, yg, &shared);
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
    backward_parts(xg, offsets, dyg, dxg, nullptr, nullptr);
  }

  /// As above, and the shared FFN's backward: `dy_shared` [tokens, d_model] is the gradient of
  /// its output, `shared.x` its input of the last training forward, `shared.y` receives its dx.
  void backward(const Eigen::Ref<const Matrix<Element>>& xg, const std::vector<int>& offsets,
                const Eigen::Ref<const Matrix<float>>& dyg, Eigen::Ref<Matrix<float>> dxg,
                const Eigen::Ref<const Matrix<float>>& dy_shared,
                const SharedRows<Element>& shared) {
    backward_parts(xg, offsets, dyg, dxg, &dy_shared, &shared);
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
  // Init substreams of W_gate and of the shared FFN: above every 2 * e + 2 of W_in and W_out.
  static constexpr std::uint64_t kGateSubstream = std::uint64_t{1} << 40;
  static constexpr std::uint64_t kSharedSubstream = std::uint64_t{1} << 41;
  // The shared FFN's dropout stream: keyed like the routed rows' but apart from them.
  static constexpr std::uint64_t kSharedDropoutSubstream = std::uint64_t{1} << 62;

  /// FFNs of one width: masters, gradients, packs and per-call buffers.
  struct Part {
    int count = 0;                                                        // FFNs
    int width = 0;                                                        // d_ff
    std::vector<Matrix<float>> w_in, w_out, b_in, b_out, w_gate, b_gate;  // float32 masters
    std::vector<Matrix<float>> grad_w_in, grad_w_out, grad_b_in, grad_b_out, grad_w_gate,
        grad_b_gate;
    // Weights packed for the kernels (converted to Element): forward operands W_in (gated: the
    // fused pairs) and W_out; built at the first backward after a change, W_out^T and W_in^T
    // (gated: [W_gate | W_in]^T).
    std::vector<PackedWeight> in_packed, out_packed, out_transposed, in_transposed;
    std::vector<char> stale;             // forward packs out of date
    std::vector<char> transposed_stale;  // backward packs out of date
    std::vector<char> exposed;  // a writable reference to the master is out: refresh each forward
    // Per-call buffers, kept between calls (grow only).
    detail::RowBuffer<float> hidden_pre;     // [rows, d_ff] x W_in + b_in (gated: [rows, 2 d_ff])
    detail::RowBuffer<Element> hidden;       // [rows, d_ff] activation after dropout
    detail::RowBuffer<float> dropout_scale;  // [rows, d_ff] or empty
    detail::RowBuffer<float> dhidden;        // [rows, d_ff] backward: dL/dh, then dL/dpre
    detail::RowBuffer<float> dpre;           // [rows, 2 d_ff] gated backward: [d gate | d up]
    detail::RowBuffer<Element> dhidden_element;  // bf16 copy of what enters the products
    const std::vector<int>* offsets = nullptr;   // row blocks of the current call
    Matrix<float> pack_source;  // [d_model, 2 d_ff] gated: the fused operand before packing
  };

  /// Where a batched problem's rows belong: a part, its FFN, and the rows' dropout keys.
  struct BlockOwner {
    Part* part;
    int ffn;
  };

  template <class Substream>
  void init_part(Part& part, int count, int d_ff, const Substream& substream) {
    const int d_model = config_.d_model;
    part.count = count;
    part.width = d_ff;
    for (auto* v : {&part.w_in, &part.w_out, &part.b_in, &part.b_out, &part.grad_w_in,
                    &part.grad_w_out, &part.grad_b_in, &part.grad_b_out}) {
      v->resize(count);
    }
    if constexpr (kGated) {
      part.w_gate.resize(count), part.b_gate.resize(count);
      part.grad_w_gate.resize(count), part.grad_b_gate.resize(count);
    }
    part.in_packed.resize(count), part.out_packed.resize(count);
    part.in_transposed.resize(count), part.out_transposed.resize(count);
    part.stale.assign(count, 1);
    part.transposed_stale.assign(count, 1);
    part.exposed.assign(count, 0);
    for (int e = 0; e < count; ++e) {
      part.w_in[e].resize(d_model, d_ff);
      part.w_out[e].resize(d_ff, d_model);
      truncated_normal_init(part.w_in[e], config_.init_scale, d_model, config_.seed,
                            substream(e, 0));
      truncated_normal_init(part.w_out[e], config_.init_scale, d_ff, config_.seed, substream(e, 1));
      part.b_in[e] = Matrix<float>::Zero(config_.bias ? 1 : 0, d_ff);
      part.b_out[e] = Matrix<float>::Zero(config_.bias ? 1 : 0, d_model);
      if constexpr (kGated) {
        part.w_gate[e].resize(d_model, d_ff);
        truncated_normal_init(part.w_gate[e], config_.init_scale, d_model, config_.seed,
                              substream(e, 2));
        part.b_gate[e] = Matrix<float>::Zero(config_.bias ? 1 : 0, d_ff);
      }
    }
  }

  void reserve_part(Part& part, Eigen::Index rows) {
    const Eigen::Index hidden = rows * part.width;
    part.hidden_pre.reserve(hidden * kProducts);
    part.hidden.reserve(hidden);
    part.dhidden.reserve(hidden);
    if constexpr (kGated) part.dpre.reserve(hidden * kProducts);
    if (config_.dropout > 0.0f) part.dropout_scale.reserve(hidden);
    if constexpr (!kElementIsFloat) part.dhidden_element.reserve(hidden * kProducts);
  }

  void append_ffn(Part& part, int e, const std::string& p, ParameterOwner owner, int id,
                  std::vector<ParameterRef>& out) {
    part.exposed[e] = 1;  // the caller may write through the pointers at any time
    const bool bias = config_.bias;
    if constexpr (kGated) {
      out.push_back(
          {p + "w_gate", &part.w_gate[e], &part.grad_w_gate[e], ParameterRole::kWeight, owner, id});
      if (bias) {
        out.push_back(
            {p + "b_gate", &part.b_gate[e], &part.grad_b_gate[e], ParameterRole::kBias, owner, id});
      }
    }
    out.push_back(
        {p + "w_in", &part.w_in[e], &part.grad_w_in[e], ParameterRole::kWeight, owner, id});
    if (bias) {
      out.push_back(
          {p + "b_in", &part.b_in[e], &part.grad_b_in[e], ParameterRole::kBias, owner, id});
    }
    out.push_back(
        {p + "w_out", &part.w_out[e], &part.grad_w_out[e], ParameterRole::kWeight, owner, id});
    if (bias) {
      out.push_back(
          {p + "b_out", &part.b_out[e], &part.grad_b_out[e], ParameterRole::kBias, owner, id});
    }
  }

  template <class V>
  V& gated(const char* name, V& v) {
    if constexpr (!kGated) {
      detail::fail(name, ": the activation \"", Activation::name(),
                   "\" is not gated (SEMANTICS 15), so the experts have no gate matrix; use "
                   "SwiGlu or GeGlu");
    }
    return v;
  }

  template <class V>
  V& shared(const char* name, V& v) {
    if (!has_shared()) {
      detail::fail("shared expert ", name,
                   ": the layer has no shared expert (shared_d_ff is 0; "
                   "SEMANTICS 16)");
    }
    return v;
  }

  void forward_parts(const Eigen::Ref<const Matrix<Element>>& xg, const std::vector<int>& offsets,
                     Mode mode, const std::vector<std::uint64_t>& row_keys,
                     Eigen::Ref<Matrix<float>> yg, const SharedRows<Element>* shared) {
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
    if (shared != nullptr) {
      if (!has_shared()) detail::fail("shared rows given to a bank without a shared expert");
      detail::check_shape("shared x", shared->x, -1, config_.d_model);
      detail::check_shape("shared y", shared->y, shared->x.rows(), config_.d_model);
      shared_offsets_.assign({0, static_cast<int>(shared->x.rows())});
    }
    refresh_forward_weights();
    const bool drop = mode == Mode::kTrain && config_.dropout > 0.0f;
    const detail::CounterRng rng(config_.seed, detail::Stream::kDropout, dropout_calls_);
    const detail::CounterRng shared_rng(config_.seed, detail::Stream::kDropout,
                                        kSharedDropoutSubstream + dropout_calls_);
    if (drop) ++dropout_calls_;
    auto prepare = [&](Part& part, Eigen::Index part_rows, const std::vector<int>& part_offsets) {
      part.offsets = &part_offsets;
      part.hidden_pre.resize(part_rows, kProducts * part.width);    // float32
      part.hidden.resize(part_rows, part.width);                    // Element
      part.dropout_scale.resize(drop ? part_rows : 0, part.width);  // 0 or 1 / (1 - p)
    };
    prepare(routed_, rows, offsets);
    if (shared != nullptr) prepare(shared_, shared->x.rows(), shared_offsets_);
    // h = dropout(act(x W_in + b_in)) (gated: dropout(act(x W_gate + b_gate) * (x W_in +
    // b_in))), computed block by block as the (fused) product finishes.
    const auto finish_in = [&](Part& part, int e, Eigen::Index r, int j0, int cols) {
      const bool is_shared = &part == &shared_;
      std::uint64_t key = static_cast<std::uint64_t>(r);
      if (is_shared) {
        key = static_cast<std::uint64_t>(shared->first_token + r);
      } else if (!row_keys.empty()) {
        key = row_keys[r];
      }
      const detail::CounterRng* dropout = drop ? (is_shared ? &shared_rng : &rng) : nullptr;
      if constexpr (kGated) {
        finish_gated_hidden(part, e, r, j0, cols, dropout, key);
      } else {
        finish_hidden(part, e, r, j0, cols, dropout, key);
      }
    };
    const Eigen::Index ldy = yg.outerStride();
    float* const y_shared = shared != nullptr ? shared->y.data() : nullptr;
    const Eigen::Index ldy_shared = shared != nullptr ? shared->y.outerStride() : 0;
    const auto finish_out = [&](Part& part, int e, Eigen::Index r, int j0, int cols) {
      float* base = &part == &shared_ ? y_shared : yg.data();
      const Eigen::Index ld = &part == &shared_ ? ldy_shared : ldy;
      float* y = base + r * ld + j0;
      const float* b = part.b_out[e].data() + j0;
      for (int j = 0; j < cols; ++j) y[j] += b[j];
    };
    const Element* const x_shared = shared != nullptr ? shared->x.data() : nullptr;
    const Eigen::Index ldx_shared = shared != nullptr ? shared->x.outerStride() : 0;
    if (whole_ffn_schedule(shared != nullptr)) {
      // Each thread takes whole FFNs: both products of an FFN run on one thread, back to back,
      // so its hidden rows are still in cache for the second (see whole_ffn_schedule).
      run_whole_ffns(shared != nullptr, [&](Part& part, int e) {
        const bool is_shared = &part == &shared_;
        const int first = (*part.offsets)[e], m = (*part.offsets)[e + 1] - first;
        const Element* x = is_shared ? x_shared : xg.data();
        const Eigen::Index ldx = is_shared ? ldx_shared : xg.outerStride();
        run_packed_one(part, e, m, x + first * ldx, ldx, part.in_packed[e],
                       part.hidden_pre.data() + first * kProducts * part.width,
                       kProducts * part.width, finish_in);
        float* y = is_shared ? y_shared : yg.data();
        const Eigen::Index ld = is_shared ? ldy_shared : ldy;
        const Element* h = part.hidden.data() + first * part.width;
        if (config_.bias) {
          run_packed_one(part, e, m, h, part.width, part.out_packed[e], y + first * ld, ld,
                         finish_out);
        } else {
          run_packed_one(part, e, m, h, part.width, part.out_packed[e], y + first * ld, ld,
                         NoFinish());
        }
      });
    } else {
      // Both products in one batch of two stages: the down product (second stage) starts when
      // the up product and finish_in are done; a decode (thin) call runs both in one region.
      begin_batch();
      add_packed(routed_, xg.data(), xg.outerStride(), routed_.in_packed, routed_.hidden_pre.data(),
                 kProducts * routed_.width);
      if (shared != nullptr) {
        add_packed(shared_, x_shared, ldx_shared, shared_.in_packed, shared_.hidden_pre.data(),
                   kProducts * shared_.width);
      }
      const std::size_t second_stage = packed_problems_.size();
      add_packed(routed_, routed_.hidden.data(), routed_.width, routed_.out_packed, yg.data(), ldy);
      if (shared != nullptr) {
        add_packed(shared_, shared_.hidden.data(), shared_.width, shared_.out_packed, y_shared,
                   ldy_shared);
      }
      const bool bias = config_.bias;
      run_packed(
          finish_in,
          [&](Part& part, int e, Eigen::Index r, int j0, int cols) {
            if (bias) finish_out(part, e, r, j0, cols);
          },
          second_stage);
    }
    shared_forward_ = shared != nullptr;
    has_forward_ = mode == Mode::kTrain;
  }

  void backward_parts(const Eigen::Ref<const Matrix<Element>>& xg, const std::vector<int>& offsets,
                      const Eigen::Ref<const Matrix<float>>& dyg, Eigen::Ref<Matrix<float>> dxg,
                      const Eigen::Ref<const Matrix<float>>* dy_shared,
                      const SharedRows<Element>* shared) {
    if (!has_forward_) detail::fail("backward called before a Mode::kTrain forward");
    check_parameter_shapes();
    check_gradient_shapes();
    check_blocks(xg.rows(), offsets);
    detail::check_shape("x", xg, -1, config_.d_model);
    detail::check_shape("dy", dyg, xg.rows(), config_.d_model);
    detail::check_shape("x (rows of the last training forward)", xg, routed_.hidden.rows(), -1);
    detail::check_shape("dx", dxg, xg.rows(), config_.d_model);
    if (shared != nullptr) {
      if (!shared_forward_) detail::fail("shared rows given, but the last forward had none");
      detail::check_shape("shared x (rows of the last training forward)", shared->x,
                          shared_.hidden.rows(), config_.d_model);
      detail::check_shape("shared dy", *dy_shared, shared->x.rows(), config_.d_model);
      detail::check_shape("shared dx", shared->y, shared->x.rows(), config_.d_model);
    }
    refresh_backward_weights();
    const Eigen::Index rows = xg.rows();
    const int d_model = config_.d_model;
    // dy as Element: itself for fp32, a converted copy for bf16 (routed rows, then shared).
    const Element* dy = nullptr;
    const Element* dys = nullptr;
    Eigen::Index ldd = d_model, ldds = d_model;
    if constexpr (kElementIsFloat) {
      dy = dyg.data();
      ldd = dyg.outerStride();
      if (shared != nullptr) {
        dys = dy_shared->data();
        ldds = dy_shared->outerStride();
      }
    } else {
      const Eigen::Index shared_rows = shared != nullptr ? shared->x.rows() : 0;
      dy_element_.resize(rows + shared_rows, d_model);
      detail::parallel_for(rows + shared_rows, d_model, [&](Eigen::Index r) {
        const float* src = r < rows ? dyg.data() + r * dyg.outerStride()
                                    : dy_shared->data() + (r - rows) * dy_shared->outerStride();
        kernels::convert_row<Isa>(src, dy_element_.data() + r * d_model, d_model);
      });
      dy = dy_element_.data();
      dys = dy + rows * d_model;
    }
    std::vector<Part*>& parts = parts_;
    parts.assign({&routed_});
    if (shared != nullptr) parts.push_back(&shared_);
    auto dy_of = [&](const Part* part) { return part == &routed_ ? dy : dys; };
    auto ldd_of = [&](const Part* part) { return part == &routed_ ? ldd : ldds; };
    auto x_of = [&](const Part* part) { return part == &routed_ ? xg.data() : shared->x.data(); };
    auto ldx_of = [&](const Part* part) {
      return part == &routed_ ? xg.outerStride() : shared->x.outerStride();
    };
    if (config_.bias) {
      // An expert without rows adds nothing (and a block of a row-less buffer would offset a
      // null pointer).
      for (int e = 0; e < config_.num_ffns; ++e) {
        const int m = offsets[e + 1] - offsets[e];
        if (m > 0) routed_.grad_b_out[e] += dyg.middleRows(offsets[e], m).colwise().sum();
      }
      if (shared != nullptr && dy_shared->rows() > 0) {
        shared_.grad_b_out[0] += dy_shared->colwise().sum();
      }
    }
    // dh = dy * W_out^T, then through dropout and the activation (in place; gated: into
    // dpre), block by block.
    for (Part* part : parts) {
      const Eigen::Index part_rows = part == &routed_ ? rows : shared->x.rows();
      part->dhidden.resize(part_rows, part->width);
      if constexpr (kGated) part->dpre.resize(part_rows, 2 * part->width);
      if constexpr (!kElementIsFloat) {
        part->dhidden_element.resize(part_rows, kProducts * part->width);
      }
    }
    // dL/dpre as Element: [rows, d_ff] (gated: [rows, 2 d_ff] = [d gate | d up]).
    auto dpre_of = [&](Part* part) -> const Element* {
      if constexpr (!kElementIsFloat) {
        return part->dhidden_element.data();
      } else if constexpr (kGated) {
        return part->dpre.data();
      } else {
        return part->dhidden.data();
      }
    };
    const auto finish_dpre = [&](Part& part, int, Eigen::Index r, int j0, int cols) {
      if constexpr (kGated) {
        finish_gated_dhidden(part, r, j0, cols);
      } else {
        finish_dhidden(part, r, j0, cols);
      }
    };
    auto dx_of = [&](Part* part) { return part == &routed_ ? dxg.data() : shared->y.data(); };
    auto lddx_of = [&](Part* part) {
      return part == &routed_ ? dxg.outerStride() : shared->y.outerStride();
    };
    if (whole_ffn_backward_schedule()) {
      // Each thread takes whole FFNs: the four products of one FFN run back to back, so its
      // dpre, hidden and dy rows and its weights and gradients (~0.5 MB at 128 rows of 64 x
      // 256) are still in cache for the next product (see whole_ffn_backward_schedule).
      run_whole_ffns(shared != nullptr, [&](Part& part, int e) {
        const int first = (*part.offsets)[e], m = (*part.offsets)[e + 1] - first;
        const int d_ff = part.width;
        const Element* dy_e = dy_of(&part) + first * ldd_of(&part);
        const Element* dpre_e = dpre_of(&part) + first * kProducts * d_ff;
        // dh = dy W_out^T, then dL/dpre (finish_dpre), row tile by row tile.
        run_packed_one(part, e, m, dy_e, ldd_of(&part), part.out_transposed[e],
                       part.dhidden.data() + first * d_ff, d_ff, finish_dpre);
        // dx = dpre W_in^T (gated: dpre [W_gate | W_in]^T).
        run_packed_one(part, e, m, dpre_e, kProducts * d_ff, part.in_transposed[e],
                       dx_of(&part) + first * lddx_of(&part), lddx_of(&part), NoFinish());
        // dW_in += x^T dpre (gated: dW_gate, dW_in), dW_out += h^T dy: one problem each, on
        // this thread (the kernels run single-threaded inside the loop's region).
        const Element* x_e = x_of(&part) + first * ldx_of(&part);
        const auto add_grad = [&](const Element* a, Eigen::Index lda, const Element* b,
                                  Eigen::Index ldb, Matrix<float>& grad) {
          kernels::gemm<Element, Isa>(kernels::GemmProblem<Element>{
              static_cast<int>(grad.rows()), static_cast<int>(grad.cols()), m, a, lda,
              kernels::Transpose::kYes, b, ldb, kernels::Transpose::kNo, grad.data(),
              static_cast<int>(grad.cols()), 1.0f});
        };
        if constexpr (kGated) {
          add_grad(x_e, ldx_of(&part), dpre_e, 2 * d_ff, part.grad_w_gate[e]);
          add_grad(x_e, ldx_of(&part), dpre_e + d_ff, 2 * d_ff, part.grad_w_in[e]);
        } else {
          add_grad(x_e, ldx_of(&part), dpre_e, d_ff, part.grad_w_in[e]);
        }
        add_grad(part.hidden.data() + first * d_ff, d_ff, dy_e, ldd_of(&part), part.grad_w_out[e]);
      });
      add_hidden_bias_grads(parts);
      return;
    }
    begin_batch();
    for (Part* part : parts) {
      add_packed(*part, dy_of(part), ldd_of(part), part->out_transposed, part->dhidden.data(),
                 part->width);
    }
    run_packed(finish_dpre);
    // dW_out += h^T * dy
    plain_problems_.clear();
    for (Part* part : parts) {
      add_weight_grads(*part, part->hidden.data(), part->width, dy_of(part), ldd_of(part),
                       part->grad_w_out);
    }
    run_plain();
    add_hidden_bias_grads(parts);
    // dW_in += x^T * dpre (gated: dW_gate from the left half, dW_in from the right), one batch.
    plain_problems_.clear();
    for (Part* part : parts) {
      const int d_ff = part->width;
      if constexpr (kGated) {
        add_weight_grads(*part, x_of(part), ldx_of(part), dpre_of(part), 2 * d_ff,
                         part->grad_w_gate);
        add_weight_grads(*part, x_of(part), ldx_of(part), dpre_of(part) + d_ff, 2 * d_ff,
                         part->grad_w_in);
      } else {
        add_weight_grads(*part, x_of(part), ldx_of(part), dpre_of(part), d_ff, part->grad_w_in);
      }
    }
    run_plain();
    // dx = dpre * W_in^T (gated: dpre * [W_gate | W_in]^T, one product over k = 2 d_ff).
    begin_batch();
    for (Part* part : parts) {
      add_packed(*part, dpre_of(part), kProducts * part->width, part->in_transposed, dx_of(part),
                 lddx_of(part));
    }
    run_packed(NoFinish());
  }

  /// db_in (gated: db_gate, db_in) += the column sums of each FFN's block of dL/dpre.
  void add_hidden_bias_grads(const std::vector<Part*>& parts) {
    if (!config_.bias) return;
    for (Part* part : parts) {
      const int d_ff = part->width;
      for (int e = 0; e < part->count; ++e) {
        const int first = (*part->offsets)[e], m = (*part->offsets)[e + 1] - first;
        if (m == 0) continue;
        if constexpr (kGated) {
          const auto block = part->dpre.view().middleRows(first, m);
          part->grad_b_gate[e] += block.leftCols(d_ff).colwise().sum();
          part->grad_b_in[e] += block.rightCols(d_ff).colwise().sum();
        } else {
          part->grad_b_in[e] += part->dhidden.view().middleRows(first, m).colwise().sum();
        }
      }
    }
  }

  /// Whether backward gives each thread whole FFNs (all four products of one FFN back to back)
  /// rather than running each product as one batch of all FFNs' tiles. Results are bitwise the
  /// same either way (every element is the same kernel operations in the same k order; see
  /// whole_ffn_schedule); forced_ffn_schedule() forces both directions.
  bool whole_ffn_backward_schedule() const {
    if (detail::forced_ffn_schedule() != detail::FfnSchedule::kAuto) {
      return detail::forced_ffn_schedule() == detail::FfnSchedule::kWholeFfns;
    }
    // Measured on one thread (benchmarks/RESULTS_issue15.md, round 4, LM layer: 16 experts of
    // 64 x 256, ~128 rows each): the bank 2-3% faster with whole FFNs, whose dpre, hidden rows,
    // weights and gradients stay in L2 between an FFN's four products, where the batched
    // schedule streams each of them for all FFNs from L3 between products. On more threads the
    // batched schedule (tiles of all FFNs split across threads) stays, as it was not measured.
    return omp_get_max_threads() == 1;
  }

  /// The local index of global expert e; throws unless the bank holds it.
  /// The shape check of every master (or, with `gradients`, every gradient) of both parts.
  void check_shapes(bool gradients) const {
    using Tensors = std::vector<Matrix<float>> Part::*;
    for (const Part* part : {&routed_, &shared_}) {
      const int d_model = config_.d_model, d_ff = part->width, bias = config_.bias ? 1 : 0;
      for (int e = 0; e < part->count; ++e) {
        const int id = part == &routed_ ? config_.first_ffn + e : -1;
        auto check = [&](const char* name, const char* grad_name, Tensors master, Tensors grad,
                         Eigen::Index rows, Eigen::Index cols) {
          check_parameter(gradients ? grad_name : name, id, (part->*(gradients ? grad : master))[e],
                          rows, cols);
        };
        check("w_in", "grad_w_in", &Part::w_in, &Part::grad_w_in, d_model, d_ff);
        check("w_out", "grad_w_out", &Part::w_out, &Part::grad_w_out, d_ff, d_model);
        check("b_in", "grad_b_in", &Part::b_in, &Part::grad_b_in, bias, d_ff);
        check("b_out", "grad_b_out", &Part::b_out, &Part::grad_b_out, bias, d_model);
        if constexpr (kGated) {
          check("w_gate", "grad_w_gate", &Part::w_gate, &Part::grad_w_gate, d_model, d_ff);
          check("b_gate", "grad_b_gate", &Part::b_gate, &Part::grad_b_gate, bias, d_ff);
        }
      }
    }
  }

  int local(int e) const {
    const int first = config_.first_ffn;
    if (e < first || e >= first + config_.num_ffns) {
      detail::fail("expert index is ", e, ", expected in [", first, ", ", first + config_.num_ffns,
                   ")", first > 0 ? " (the experts this bank holds)" : "");
    }
    return e - first;
  }

  static Matrix<float>& expose(Part& part, int i, std::vector<Matrix<float>>& masters) {
    part.exposed[i] = 1;
    return masters[i];
  }

  /// `e` is the global expert index, or -1 for the shared FFN.
  static void check_parameter(const char* name, int e, const Matrix<float>& m, Eigen::Index rows,
                              Eigen::Index cols) {
    if (m.rows() != rows || m.cols() != cols) {
      if (e < 0) {
        detail::fail("shared expert ", name, " has shape [", m.rows(), ", ", m.cols(),
                     "], expected [", rows, ", ", cols,
                     "] (parameter shapes are fixed by the configuration)");
      }
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
    const int d_model = config_.d_model;
    for (Part* part : {&routed_, &shared_}) {
      const int d_ff = part->width;
      for (int e = 0; e < part->count; ++e) {
        if (!part->stale[e] && !part->exposed[e]) continue;
        if constexpr (kGated) {
          // [d_model, 2 d_ff], columns interleaved: 2j gate j, 2j + 1 up j (see the top).
          part->pack_source.resize(d_model, 2 * d_ff);
          for (int i = 0; i < d_model; ++i) {
            for (int j = 0; j < d_ff; ++j) {
              part->pack_source(i, 2 * j) = part->w_gate[e](i, j);
              part->pack_source(i, 2 * j + 1) = part->w_in[e](i, j);
            }
          }
          part->in_packed[e].pack(part->pack_source.data(), 2 * d_ff, kernels::Transpose::kNo,
                                  d_model, 2 * d_ff);
        } else {
          part->in_packed[e].pack(part->w_in[e].data(), d_ff, kernels::Transpose::kNo, d_model,
                                  d_ff);
        }
        part->out_packed[e].pack(part->w_out[e].data(), d_model, kernels::Transpose::kNo, d_ff,
                                 d_model);
        part->stale[e] = 0;
        part->transposed_stale[e] = 1;
      }
    }
  }

  void refresh_backward_weights() {
    const int d_model = config_.d_model;
    for (Part* part : {&routed_, &shared_}) {
      const int d_ff = part->width;
      for (int e = 0; e < part->count; ++e) {
        if (!part->transposed_stale[e]) continue;
        // W_out^T [d_model, d_ff] and W_in^T [d_ff, d_model].
        part->out_transposed[e].pack(part->w_out[e].data(), d_model, kernels::Transpose::kYes,
                                     d_model, d_ff);
        if constexpr (kGated) {
          // [W_gate | W_in]^T [2 d_ff, d_model], the order of dpre's columns.
          part->pack_source.resize(d_model, 2 * d_ff);
          part->pack_source.leftCols(d_ff) = part->w_gate[e];
          part->pack_source.rightCols(d_ff) = part->w_in[e];
          part->in_transposed[e].pack(part->pack_source.data(), 2 * d_ff, kernels::Transpose::kYes,
                                      2 * d_ff, d_model);
        } else {
          part->in_transposed[e].pack(part->w_in[e].data(), d_ff, kernels::Transpose::kYes, d_ff,
                                      d_model);
        }
        part->transposed_stale[e] = 0;
      }
    }
  }

  struct NoFinish {
    void operator()(Part&, int, Eigen::Index, int, int) const {}
  };

  /// Bias, activation and dropout of hidden row r, columns [j0, j0 + cols), of FFN e of `part`:
  /// reads the product from hidden_pre, leaves x W_in + b_in there and writes h to hidden.
  void finish_hidden(Part& part, int e, Eigen::Index r, int j0, int cols,
                     const detail::CounterRng* dropout, std::uint64_t key) {
    const int d_ff = part.width;
    float* pre = part.hidden_pre.data() + r * d_ff + j0;
    Element* out = part.hidden.data() + r * d_ff + j0;
    if (config_.bias) {
      const float* b = part.b_in[e].data() + j0;
      for (int j = 0; j < cols; ++j) pre[j] += b[j];
    }
    const float keep_scale = 1.0f / (1.0f - config_.dropout);
    constexpr int kChunk = 64;
    alignas(64) float h[kChunk];
    for (int c0 = 0; c0 < cols; c0 += kChunk) {
      const int n = std::min(kChunk, cols - c0);
      for (int j = 0; j < n; ++j) h[j] = Activation::value(pre[c0 + j]);
      if (dropout != nullptr) {
        float* scale = part.dropout_scale.data() + r * d_ff + j0 + c0;
        for (int j = 0; j < n; ++j) {
          const std::uint64_t unit = key * d_ff + static_cast<std::uint64_t>(j0 + c0 + j);
          scale[j] = dropout->uniform(unit) < config_.dropout ? 0.0f : keep_scale;
          h[j] *= scale[j];
        }
      }
      kernels::convert_row<Isa>(h, out + c0, n);
    }
  }

  /// Gated finish of fused columns [j0, j0 + cols) of row r (even j0 and cols: whole pairs):
  /// adds b_gate and b_in to the pairs in hidden_pre, writes h = dropout(act(g) * u) for hidden
  /// columns [j0 / 2, (j0 + cols) / 2) to hidden.
  void finish_gated_hidden(Part& part, int e, Eigen::Index r, int j0, int cols,
                           const detail::CounterRng* dropout, std::uint64_t key) {
    const int d_ff = part.width;
    const int h0 = j0 / 2, count = cols / 2;
    float* pre = part.hidden_pre.data() + r * 2 * d_ff + 2 * h0;  // pairs (g, u)
    Element* out = part.hidden.data() + r * d_ff + h0;
    if (config_.bias) {
      const float* bg = part.b_gate[e].data() + h0;
      const float* bu = part.b_in[e].data() + h0;
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
        float* scale = part.dropout_scale.data() + r * d_ff + h0 + c0;
        for (int j = 0; j < n; ++j) {
          const std::uint64_t unit = key * d_ff + static_cast<std::uint64_t>(h0 + c0 + j);
          scale[j] = dropout->uniform(unit) < config_.dropout ? 0.0f : keep_scale;
          h[j] *= scale[j];
        }
      }
      kernels::convert_row<Isa>(h, out + c0, n);
    }
  }

  /// Gated: dL/dh of row r, hidden columns [j0, j0 + cols) -> d(gate pre) = dh * u * act'(g)
  /// and d(up) = dh * act(g) into dpre [rows, 2 d_ff] = [d gate | d up] (and the Element copy).
  void finish_gated_dhidden(Part& part, Eigen::Index r, int j0, int cols) {
    const int d_ff = part.width;
    float* g = part.dhidden.data() + r * d_ff + j0;
    if (part.dropout_scale.size() > 0) {
      const float* scale = part.dropout_scale.data() + r * d_ff + j0;
      for (int j = 0; j < cols; ++j) g[j] *= scale[j];
    }
    const float* pre = part.hidden_pre.data() + r * 2 * d_ff + 2 * j0;
    float* dgate = part.dpre.data() + r * 2 * d_ff + j0;
    float* dup = dgate + d_ff;
    for (int j = 0; j < cols; ++j) {
      const float gate = pre[2 * j], up = pre[2 * j + 1];
      dgate[j] = g[j] * up * Activation::derivative(gate);
      dup[j] = g[j] * Activation::value(gate);
    }
    if constexpr (!kElementIsFloat) {
      Element* d = part.dhidden_element.data() + r * 2 * d_ff + j0;
      kernels::convert_row<Isa>(dgate, d, cols);
      kernels::convert_row<Isa>(dup, d + d_ff, cols);
    }
  }

  /// dL/dh -> dL/d(x W_in + b_in) for row r, columns [j0, j0 + cols), in place in dhidden (and
  /// converted into dhidden_element for bf16).
  void finish_dhidden(Part& part, Eigen::Index r, int j0, int cols) {
    const int d_ff = part.width;
    float* g = part.dhidden.data() + r * d_ff + j0;
    const float* pre = part.hidden_pre.data() + r * d_ff + j0;
    for (int j = 0; j < cols; ++j) g[j] *= Activation::derivative(pre[j]);
    if (part.dropout_scale.size() > 0) {
      const float* scale = part.dropout_scale.data() + r * d_ff + j0;
      for (int j = 0; j < cols; ++j) g[j] *= scale[j];
    }
    if constexpr (!kElementIsFloat) {
      kernels::convert_row<Isa>(g, part.dhidden_element.data() + r * d_ff + j0, cols);
    }
  }

  void begin_batch() {
    packed_problems_.clear();
    block_owner_.clear();
  }

  /// Adds c[block e] = a[block e] * weights[e] for every row block of `part` (its offsets); a
  /// is [rows, lda], c [rows, ldc].
  void add_packed(Part& part, const Element* a, Eigen::Index lda,
                  const std::vector<PackedWeight>& weights, float* c, Eigen::Index ldc) {
    const std::vector<int>& offsets = *part.offsets;
    for (int e = 0; e < part.count; ++e) {
      const int m = offsets[e + 1] - offsets[e];
      if (m == 0) continue;
      const Eigen::Index first = offsets[e];
      packed_problems_.push_back(
          kernels::PackedGemmProblem<Element, Isa>{m, a + first * lda, lda, kernels::Transpose::kNo,
                                                   &weights[e], c + first * ldc, ldc, 0.0f});
      block_owner_.push_back(BlockOwner{&part, e});
    }
  }

  /// Runs the added problems in one gemm_batch; `finish(part, e, r, j0, cols)` runs on row r
  /// (of FFN e's block of `part`), columns [j0, j0 + cols), once its product is complete.
  template <class Finish>
  void run_packed(const Finish& finish) {
    if constexpr (std::is_same_v<Finish, NoFinish>) {
      if (!packed_problems_.empty()) kernels::gemm_batch(packed_problems_);
    } else {
      run_packed(finish, finish, packed_problems_.size());
    }
  }

  /// As above for a batch of two stages: problems [0, second_stage) with finish_first, then,
  /// once they are complete, the rest with finish_second (kernels::detail::run_thin_problems).
  template <class FinishFirst, class FinishSecond>
  void run_packed(const FinishFirst& finish_first, const FinishSecond& finish_second,
                  std::size_t second_stage) {
    if (packed_problems_.empty()) return;
    const auto finish_rows = [&](const auto& finish, const BlockOwner owner, int i0, int rows,
                                 int j0, int cols) {
      const int first = (*owner.part->offsets)[owner.ffn];
      for (int i = i0; i < i0 + rows; ++i) finish(*owner.part, owner.ffn, first + i, j0, cols);
    };
    kernels::detail::gemm_packed_problems(
        packed_problems_.data(), packed_problems_.size(),
        [&](int problem, int i0, int rows, int j0, int cols) {
          const BlockOwner owner = block_owner_[problem];
          if (static_cast<std::size_t>(problem) < second_stage) {
            finish_rows(finish_first, owner, i0, rows, j0, cols);
          } else {
            finish_rows(finish_second, owner, i0, rows, j0, cols);
          }
        },
        second_stage);
  }

  /// The schedule of the forward products (issue 15). Either every product runs as one batched
  /// GEMM whose tiles (of all FFNs) are split across threads, or each thread takes whole FFNs
  /// (run_whole_ffns): an FFN's hidden rows then stay in cache between its two products and no
  /// barrier separates them. Results are bitwise the same either way: every output element is
  /// computed by the same kernel operations in the same k order whatever the tile shapes or
  /// the thread (kernels/gemm.hpp), and the epilogues act element by element.
  bool whole_ffn_schedule(bool with_shared) const {
    if (detail::forced_ffn_schedule() != detail::FfnSchedule::kAuto) {
      return detail::forced_ffn_schedule() == detail::FfnSchedule::kWholeFfns;
    }
    (void)with_shared;  // the shared FFN is one more unit when whole FFNs are chosen
    // Measured (benchmarks/RESULTS_issue15.md, same-process A/B): whole FFNs were 9-15% slower
    // than split tiles at 128 experts x 16 rows on 2 threads, equal at 8 experts x 256 rows,
    // and 2-3% slower on one thread (a kernel call per product and FFN). The cause at 128
    // experts was the thin kernel path that whole FFNs gave their <= 16-row experts (no
    // prefetch; slower than the tile path at 10-16 rows on one thread): with that fixed in
    // round 3 (packed_b.hpp) the two schedules measured equal (whole / split 0.78-1.16,
    // median 1.01, 24 A/Bs on 1-2 threads), so split tiles stay the automatic choice; whole FFNs
    // remain selectable (forced_ffn_schedule) and tested bitwise against them.
    return false;
  }

  /// Runs body(part, e) for every FFN with rows, in one OpenMP loop whose iterations are whole
  /// FFNs (dynamic: the loaded machine's threads take what they can). Inside, the kernels run
  /// on the calling thread. The exception of the lowest FFN that threw is rethrown after the
  /// loop (core/parallel.hpp); the outputs are then unspecified.
  template <class Body>
  void run_whole_ffns(bool with_shared, const Body& body) {
    block_owner_.clear();
    for (Part* part : {&routed_, &shared_}) {
      if (part == &shared_ && !with_shared) continue;
      for (int e = 0; e < part->count; ++e) {
        if ((*part->offsets)[e + 1] > (*part->offsets)[e]) block_owner_.push_back({part, e});
      }
    }
    const int count = static_cast<int>(block_owner_.size());
    detail::LoopExceptions exceptions;
#pragma omp parallel
    {
      // Every thread grows its kernels' per-call vectors now, unit or no unit, so that
      // steady-state calls allocate nothing (as run_tiles does for its packing buffers).
      exceptions.run(-1, [] { kernels::detail::reserve_single_call_buffers<Element, Isa>(); });
#pragma omp for schedule(dynamic, 1)
      for (int u = 0; u < count; ++u) {
        exceptions.run(u, [&] { body(*block_owner_[u].part, block_owner_[u].ffn); });
      }
    }
    exceptions.rethrow_if_failed();
  }

  /// c [m, ldc] = a [m, lda] * weight, one GEMM on the calling thread; finish(part, e, r, j0,
  /// cols) as in run_packed (r counts from the start of part's rows).
  template <class Finish>
  void run_packed_one(Part& part, int e, int m, const Element* a, Eigen::Index lda,
                      const PackedWeight& weight, float* c, Eigen::Index ldc,
                      const Finish& finish) {
    const kernels::PackedGemmProblem<Element, Isa> problem{m,       a, lda, kernels::Transpose::kNo,
                                                           &weight, c, ldc, 0.0f};
    const int first = (*part.offsets)[e];
    if constexpr (std::is_same_v<Finish, NoFinish>) {
      kernels::detail::gemm_packed_problems(&problem, 1, kernels::detail::NoEpilogue());
    } else {
      kernels::detail::gemm_packed_problems(&problem, 1,
                                            [&](int, int i0, int rows, int j0, int cols) {
                                              for (int i = i0; i < i0 + rows; ++i) {
                                                finish(part, e, first + i, j0, cols);
                                              }
                                            });
    }
  }

  /// Adds grads[e] += a[block e]^T * b[block e] for the blocks of `part`; a is [rows, lda], b
  /// [rows, ldb], grads [cols of a, cols of b].
  void add_weight_grads(Part& part, const Element* a, Eigen::Index lda, const Element* b,
                        Eigen::Index ldb, std::vector<Matrix<float>>& grads) {
    const std::vector<int>& offsets = *part.offsets;
    for (int e = 0; e < part.count; ++e) {
      const int m = offsets[e + 1] - offsets[e];
      if (m == 0) continue;
      const Eigen::Index first = offsets[e];
      plain_problems_.push_back(kernels::GemmProblem<Element>{
          static_cast<int>(grads[e].rows()), static_cast<int>(grads[e].cols()), m, a + first * lda,
          lda, kernels::Transpose::kYes, b + first * ldb, ldb, kernels::Transpose::kNo,
          grads[e].data(), static_cast<int>(grads[e].cols()), 1.0f});
    }
  }

  void run_plain() {
    if (!plain_problems_.empty()) kernels::gemm_batch<Element, Isa>(plain_problems_);
  }

  FeedForwardConfig config_;
  Part routed_;  // the num_ffns experts, width d_ff
  Part shared_;  // the shared FFN (count 1, width shared_d_ff) or nothing (count 0)
  detail::RowBuffer<Element> dy_element_;  // bf16 copy of dy (routed rows, then shared rows)
  std::vector<int> shared_offsets_;        // {0, tokens} of the shared FFN's one block
  std::vector<kernels::PackedGemmProblem<Element, Isa>> packed_problems_;
  std::vector<kernels::GemmProblem<Element>> plain_problems_;
  std::vector<BlockOwner> block_owner_;  // part and FFN of each packed problem
  std::vector<Part*> parts_;             // parts of the current backward
  std::uint64_t dropout_calls_ = 0;
  bool has_forward_ = false;
  bool shared_forward_ = false;  // the last forward ran the shared FFN
};

}  // namespace switchmoe
