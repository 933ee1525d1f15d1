#pragma once
// save_weights / load_weights: a layer's tensors in a safetensors file, under switchmoe's own
// names or the Hugging Face names of SEMANTICS 22.
//
//   switchmoe's names   parameters() and buffers() as they are, [in, out] layout:
//                       "router.weight" [d_model, E], "experts.<e>.w_in" [d_model, d_ff], ...
//   kHuggingFaceSwitch  "router.classifier.weight" [E, d_model] (and ".bias" [E]),
//                       "experts.expert_<e>.wi.weight" [d_ff, d_model],
//                       "experts.expert_<e>.wo.weight" [d_model, d_ff]; a dense T5 FFN
//                       "wi.weight", "wo.weight". torch's [out, in] layout: every matrix is
//                       transposed on save and on load.
//   kHuggingFaceMixtral "gate.weight" [E, d_model], "experts.<e>.w1.weight" (W_gate),
//                       "w3" (W_in) [d_ff, d_model], "w2" (W_out) [d_model, d_ff]; gated experts
//                       only (SEMANTICS 15), e.g. SwitchLayer<Fp32, SwiGlu>.
//   Neither Hugging Face set has a name for the layer's buffers (SEMANTICS 19's balancing bias):
//   saving refuses a non-zero bias (it would be lost), loading sets it to zero; a shared expert
//   or expert biases are refused.
//
// Loading has the strong guarantee: every tensor is found and checked (shape against the layer,
// a float dtype, finite values) and read before the first weight changes, so on any error the
// layer is as before. The weights are written through the layer's accessors, which mark its
// compute copies out of date: the next forward uses the loaded weights without sync_weights().
// Tensors of the file that the layer does not use (other layers, other prefixes) are ignored.
//
// The expert-parallel layer: switchmoe/io/distributed_weights.hpp (needs switchmoe::distributed).

#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "switchmoe/core/parameter.hpp"
#include "switchmoe/core/types.hpp"
#include "switchmoe/experts/activation.hpp"
#include "switchmoe/io/safetensors_reader.hpp"
#include "switchmoe/io/safetensors_writer.hpp"

namespace switchmoe {

enum class WeightNames { kSwitchmoe, kHuggingFaceSwitch, kHuggingFaceMixtral };

inline const char* to_string(WeightNames names) {
  switch (names) {
    case WeightNames::kSwitchmoe:
      return "kSwitchmoe";
    case WeightNames::kHuggingFaceSwitch:
      return "kHuggingFaceSwitch";
    case WeightNames::kHuggingFaceMixtral:
      return "kHuggingFaceMixtral";
  }
  return "unknown";
}

namespace detail {

/// One tensor of a checkpoint: its name in the file and the layer's matrix it holds.
struct CheckpointTensor {
  std::string name;      // in the file, prefix included
  Matrix<float>* value;  // the layer's float32 master [rows, cols]
  bool transposed;       // stored as [cols, rows] (torch's [out, in])
  bool vector;           // a [1, n] row stored 1-D as [n] (torch's biases)
};

template <class Layer, class = void>
struct IsSwitchLayer : std::false_type {};
template <class Layer>
struct IsSwitchLayer<Layer, std::void_t<decltype(std::declval<Layer&>().router_weight())>>
    : std::true_type {};

// Gated experts (SEMANTICS 15) have a third matrix per expert, w_gate(e) [d_model, d_ff]. The
// accessor exists on every SwitchLayer (it throws unless the activation is gated), so the test is
// on the activation itself.
template <class Layer, class = void>
struct HasGatedExperts : std::false_type {};
template <class Layer>
struct HasGatedExperts<Layer, std::void_t<typename Layer::ActivationType>>
    : IsGated<typename Layer::ActivationType> {};

template <class Layer>
void append_own_names(Layer& layer, const std::string& prefix, std::vector<CheckpointTensor>& out) {
  for (const ParameterRef& p : layer.parameters()) {
    out.push_back({prefix + p.name, p.value, false, false});
  }
  if constexpr (IsSwitchLayer<Layer>::value) {
    for (const ParameterRef& p : layer.buffers()) {
      out.push_back({prefix + p.name, p.value, false, false});
    }
  }
}

[[noreturn]] inline void no_such_names(WeightNames names, const char* layer, const char* why) {
  fail("WeightNames::", to_string(names), " cannot name a ", layer, ": ", why);
}

/// The tensors `layer` keeps under `names`, in a fixed order. Throws std::invalid_argument when
/// the layer has state those names cannot hold (e.g. expert biases under Hugging Face names).
template <class Layer>
std::vector<CheckpointTensor> checkpoint_tensors(Layer& layer, WeightNames names,
                                                 const std::string& prefix) {
  std::vector<CheckpointTensor> out;
  if (names == WeightNames::kSwitchmoe) {
    append_own_names(layer, prefix, out);
    return out;
  }
  if (names != WeightNames::kHuggingFaceSwitch && names != WeightNames::kHuggingFaceMixtral) {
    fail("names is WeightNames(", static_cast<int>(names), "), expected a WeightNames value");
  }
  const bool mixtral = names == WeightNames::kHuggingFaceMixtral;
  if constexpr (IsSwitchLayer<Layer>::value) {
    const auto& config = layer.config();
    if (config.expert_bias) {
      no_such_names(names, "SwitchLayer with expert_bias", "Hugging Face experts have no bias");
    }
    if (config.shared_d_ff > 0) {
      no_such_names(names, "SwitchLayer with a shared expert",
                    "the Hugging Face names of SEMANTICS 22 have no shared expert (SEMANTICS 16)");
    }
    // The layer's buffers (SEMANTICS 19's balancing bias) have no Hugging Face name: see
    // unnamed_state().
    const int first = layer.exchange().first_expert(layer.num_experts());
    const int local = layer.exchange().num_local_experts(layer.num_experts());
    if (!mixtral) {
      if constexpr (HasGatedExperts<Layer>::value) {
        no_such_names(names, "SwitchLayer with gated experts",
                      "SwitchTransformers experts are wi/wo only (Mixtral names have w1/w3/w2)");
      } else {
        out.push_back({prefix + "router.classifier.weight", &layer.router_weight(), true, false});
        if (config.router_bias) {
          out.push_back({prefix + "router.classifier.bias", &layer.router_bias(), false, true});
        }
        for (int e = first; e < first + local; ++e) {
          const std::string p = prefix + "experts.expert_" + std::to_string(e) + ".";
          out.push_back({p + "wi.weight", &layer.w_in(e), true, false});
          out.push_back({p + "wo.weight", &layer.w_out(e), true, false});
        }
      }
    } else {
      // Mixtral's experts are SwiGLU (SEMANTICS 15): w1 through SiLU times w3, then w2. Another
      // activation would load the file into a different model, so it is refused.
      if constexpr (std::is_same_v<typename Layer::ActivationType, SwiGlu>) {
        if (config.router_bias) {
          no_such_names(names, "SwitchLayer with router_bias", "Mixtral's gate has no bias");
        }
        out.push_back({prefix + "gate.weight", &layer.router_weight(), true, false});
        for (int e = first; e < first + local; ++e) {
          const std::string p = prefix + "experts." + std::to_string(e) + ".";
          out.push_back({p + "w1.weight", &layer.w_gate(e), true, false});  // act(x W_gate)
          out.push_back({p + "w3.weight", &layer.w_in(e), true, false});    // x W_in
          out.push_back({p + "w2.weight", &layer.w_out(e), true, false});
        }
      } else {
        fail("WeightNames::", to_string(names), " cannot name a SwitchLayer with activation \"",
             Layer::ActivationType::name(),
             "\": Mixtral experts are SwiGLU (w1 gate through SiLU, w3 up, w2 down; SEMANTICS "
             "15); use SwitchLayer<Policy, SwiGlu>");
      }
    }
  } else {
    if (mixtral) no_such_names(names, "DenseFFN", "Mixtral names are for sparse MoE layers");
    if constexpr (HasGatedExperts<Layer>::value) {
      no_such_names(names, "gated DenseFFN", "T5's dense wi/wo FFN is not gated");
    }
    if (layer.config().bias) {
      no_such_names(names, "DenseFFN with bias", "T5's wi/wo have no bias");
    }
    out.push_back({prefix + "wi.weight", &layer.w_in(), true, false});
    out.push_back({prefix + "wo.weight", &layer.w_out(), true, false});
  }
  return out;
}

/// Layer state that `names` has no tensor for: a layer's buffers (SEMANTICS 19's balancing
/// bias) under the Hugging Face names, whose models have no such state. Saving refuses it unless
/// it is all zeros (else it would be lost); loading sets it to zero, the state of the model the
/// file describes.
template <class Layer>
std::vector<ParameterRef> unnamed_state(Layer& layer, WeightNames names) {
  if constexpr (IsSwitchLayer<Layer>::value) {
    if (names != WeightNames::kSwitchmoe) return layer.buffers();
  }
  return {};
}

inline std::string shape_string(const std::vector<std::int64_t>& shape) {
  std::string out = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}

/// Adds `tensors` (checkpoint_tensors(layer, names, ...) or a part of it, e.g. one rank's share
/// under expert parallelism) to `writer` as save_weights does.
template <class Layer>
void save_tensors(io::SafetensorsWriter& writer, Layer& layer, WeightNames names,
                  const std::string& dtype, const std::vector<CheckpointTensor>& tensors) {
  for (const ParameterRef& p : unnamed_state(layer, names)) {
    if (!p.value->isZero(0.0f)) {
      fail("WeightNames::", to_string(names), " cannot hold the layer's ", p.name,
           " (SEMANTICS 19), which is not zero: it would be lost; save under "
           "WeightNames::kSwitchmoe to keep it");
    }
  }
  io::SafetensorsWriter staged;
  for (const CheckpointTensor& t : tensors) {
    if (writer.contains(t.name)) fail("tensor '", t.name, "' is already in the writer");
    if (t.vector) {
      staged.add(t.name, *t.value, dtype, {t.value->cols()});
    } else if (t.transposed) {
      const Matrix<float> torch_layout = t.value->transpose();  // [out, in]
      staged.add(t.name, torch_layout, dtype);
    } else {
      staged.add(t.name, *t.value, dtype);
    }
  }
  writer.merge(std::move(staged));
}

/// The tensors of a load, read and checked, not yet in the layer: load_weights is
/// stage_weights then commit(), and only commit() changes the layer (it cannot throw).
template <class Layer>
class StagedWeights {
 public:
  StagedWeights(Layer& layer, WeightNames names, std::vector<CheckpointTensor> tensors,
                std::vector<Matrix<float>> values)
      : layer_(&layer), names_(names), tensors_(std::move(tensors)), values_(std::move(values)) {}

  void commit() noexcept {
    // Same-shape assignments reuse the masters' storage: nothing here allocates.
    for (std::size_t i = 0; i < tensors_.size(); ++i) *tensors_[i].value = values_[i];
    for (const ParameterRef& p : unnamed_state(*layer_, names_)) p.value->setZero();
  }

 private:
  Layer* layer_;
  WeightNames names_;
  std::vector<CheckpointTensor> tensors_;
  std::vector<Matrix<float>> values_;  // each in the layer's layout
};

/// Finds, checks and reads `tensors` from `reader` (any reader with SafetensorsReader's
/// interface: one file, or a sharded checkpoint through its index, io/sharded.hpp) without
/// touching the layer.
template <class Reader, class Layer>
StagedWeights<Layer> stage_weights(const Reader& reader, Layer& layer, WeightNames names,
                                   const std::string& prefix,
                                   std::vector<CheckpointTensor> tensors) {
  std::vector<Matrix<float>> staged;  // each in the layer's layout
  staged.reserve(tensors.size());
  for (const CheckpointTensor& t : tensors) {
    if (!reader.contains(t.name)) {
      throw io::FormatError(reader.path(),
                            std::string("missing: the layer needs it under WeightNames::") +
                                to_string(names) + " with prefix '" + prefix + "'",
                            t.name);
    }
    const Eigen::Index rows = t.transposed ? t.value->cols() : t.value->rows();
    const Eigen::Index cols = t.transposed ? t.value->rows() : t.value->cols();
    const std::vector<std::int64_t>& shape = reader.shape(t.name);
    // A [1, n] row may be stored 2-D or 1-D.
    const bool matches = (shape.size() == 2 && shape[0] == rows && shape[1] == cols) ||
                         (shape.size() == 1 && rows == 1 && shape[0] == cols);
    if (!matches) {
      fail(reader.path(), ": tensor '", t.name, "' has shape ", shape_string(shape), ", expected ",
           t.vector ? "[" + std::to_string(cols) + "]" : shape_string({rows, cols}),
           " for this layer");
    }
    Matrix<float> value = reader.tensor(t.name);  // [rows, cols] of the file
    if (t.transposed) {
      staged.emplace_back(value.transpose());
    } else {
      staged.push_back(std::move(value));
    }
  }
  return StagedWeights<Layer>(layer, names, std::move(tensors), std::move(staged));
}

/// load_weights from any reader with SafetensorsReader's interface.
template <class Reader, class Layer>
void load_weights_from(const Reader& reader, Layer& layer, WeightNames names,
                       const std::string& prefix) {
  stage_weights(reader, layer, names, prefix, checkpoint_tensors(layer, names, prefix)).commit();
}

}  // namespace detail

/// Adds `layer`'s tensors under `names` and `prefix` to `writer`, stored as `dtype` (F32 keeps
/// the float32 masters exactly). Strong guarantee: on a throw (a name already in the writer, a
/// value outside BF16/F16's range) the writer is as before.
template <class Layer>
void save_weights(io::SafetensorsWriter& writer, Layer& layer,
                  WeightNames names = WeightNames::kSwitchmoe, const std::string& prefix = "",
                  const std::string& dtype = "F32") {
  detail::save_tensors(writer, layer, names, dtype,
                       detail::checkpoint_tensors(layer, names, prefix));
}

/// Loads `layer`'s tensors under `names` and `prefix` from `reader` (F32, BF16 or F16; the
/// masters are float32). Throws io::FormatError (naming the file and the tensor) for a missing
/// tensor, a dtype that is not a float one or a non-finite value, std::invalid_argument for a
/// shape that does not match the layer; either way the layer is unchanged.
template <class Layer>
void load_weights(const io::SafetensorsReader& reader, Layer& layer,
                  WeightNames names = WeightNames::kSwitchmoe, const std::string& prefix = "") {
  detail::load_weights_from(reader, layer, names, prefix);
}

}  // namespace switchmoe
