#pragma once
// Precision policies (SEMANTICS 13, "selective precision").
//
// A policy names the element type that expert weights and activations are stored and multiplied
// in, and the accumulator type of every sum. The router is float32 whatever the policy: the paper
// (section 2.4) found bfloat16 routing unstable and casts the router's input to float32.

#include <Eigen/Core>
#include <type_traits>

namespace switchmoe {

template <class Element_, class Accumulator_ = float, class RouterElement_ = float>
struct Precision {
  using Element = Element_;          // expert weights (compute copies) and activations
  using Accumulator = Accumulator_;  // every dot product and reduction
  // Router input, weights, logits, softmax: float32 (SEMANTICS 13). Eigen::bfloat16 only in the
  // Bf16RouterAblation policy, where the router rounds each of them to bfloat16.
  using RouterElement = RouterElement_;
  using Master = float;  // master weights and gradients: always float32

  static_assert(std::is_same_v<Element, float> || std::is_same_v<Element, Eigen::bfloat16>,
                "switchmoe supports float and Eigen::bfloat16 as the expert element type.");
  static_assert(std::is_same_v<Accumulator, float>,
                "switchmoe accumulates in float32; other accumulator types are not supported.");
  static_assert(std::is_same_v<RouterElement, float> ||
                    (std::is_same_v<RouterElement, Eigen::bfloat16> &&
                     std::is_same_v<Element, Eigen::bfloat16>),
                "The router element type is float32, or bfloat16 only for the Bf16RouterAblation "
                "policy (bfloat16 experts).");

  static constexpr bool kBf16Router = std::is_same_v<RouterElement, Eigen::bfloat16>;
  static constexpr const char* name() {
    return kBf16Router ? "bf16-router" : std::is_same_v<Element, float> ? "fp32" : "bf16";
  }
};

/// Everything float32.
using Fp32 = Precision<float>;
/// Selective precision: router float32, expert weights and activations bfloat16, float32
/// accumulation, float32 master weights and gradients.
using Bf16 = Precision<Eigen::bfloat16>;
/// ABLATION ONLY (paper Table 2, "bfloat16" row): bfloat16 everywhere, the router included. It
/// deliberately breaks SEMANTICS 13 (the router is float32): the router rounds its input (after
/// jitter), its weights and its logits to bfloat16, and the layer rounds the softmax
/// probabilities and gates to bfloat16 -- each value a bfloat16 router would store, emulated with
/// float arithmetic and a rounding at each of those stages. Gradients and master weights stay
/// float32 (straight through the roundings). Use Bf16 for training; this policy exists to show
/// why the router is kept in float32.
using Bf16RouterAblation = Precision<Eigen::bfloat16, float, Eigen::bfloat16>;

template <class T>
struct is_precision : std::false_type {};
template <class E, class A, class R>
struct is_precision<Precision<E, A, R>> : std::true_type {};
template <class T>
inline constexpr bool is_precision_v = is_precision<T>::value;

}  // namespace switchmoe
