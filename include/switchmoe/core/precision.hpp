#pragma once
// Precision policies (SEMANTICS 13, "selective precision").
//
// A policy names the element type that expert weights and activations are stored and multiplied
// in, and the accumulator type of every sum. The router is float32 whatever the policy: the paper
// (section 2.4) found bfloat16 routing unstable and casts the router's input to float32.

#include <Eigen/Core>
#include <type_traits>

namespace switchmoe {

template <class Element_, class Accumulator_ = float>
struct Precision {
  using Element = Element_;          // expert weights (compute copies) and activations
  using Accumulator = Accumulator_;  // every dot product and reduction
  using RouterElement = float;       // router input, weights, logits, softmax: always float32
  using Master = float;              // master weights and gradients: always float32

  static_assert(std::is_same_v<Element, float> || std::is_same_v<Element, Eigen::bfloat16>,
                "switchmoe supports float and Eigen::bfloat16 as the expert element type.");
  static_assert(std::is_same_v<Accumulator, float>,
                "switchmoe accumulates in float32; other accumulator types are not supported.");

  static constexpr const char* name() { return std::is_same_v<Element, float> ? "fp32" : "bf16"; }
};

/// Everything float32.
using Fp32 = Precision<float>;
/// Selective precision: router float32, expert weights and activations bfloat16, float32
/// accumulation, float32 master weights and gradients.
using Bf16 = Precision<Eigen::bfloat16>;

template <class T>
struct is_precision : std::false_type {};
template <class E, class A>
struct is_precision<Precision<E, A>> : std::true_type {};
template <class T>
inline constexpr bool is_precision_v = is_precision<T>::value;

}  // namespace switchmoe
