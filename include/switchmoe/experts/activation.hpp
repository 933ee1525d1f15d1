#pragma once
// Expert activations. Each is a stateless type with value(x) and derivative(x) at the
// pre-activation x, used as a template argument (STYLE: customization is a template argument).
// A gated activation (SEMANTICS 15) also declares `static constexpr bool kGated = true`: its
// experts then hold a third matrix W_gate and compute act(x W_gate + b_gate) * (x W_in + b_in);
// value/derivative are those of act, which applies to the gate product only.

#include <cmath>
#include <type_traits>

namespace switchmoe {

/// max(0, x): the Switch Transformer's expert activation.
struct Relu {
  static constexpr const char* name() { return "relu"; }
  static float value(float x) { return x > 0.0f ? x : 0.0f; }
  static float derivative(float x) { return x > 0.0f ? 1.0f : 0.0f; }
};

/// Exact GELU, 0.5 * x * (1 + erf(x / sqrt(2))).
struct Gelu {
  static constexpr const char* name() { return "gelu"; }
  static float value(float x) { return 0.5f * x * (1.0f + std::erf(x * kInvSqrt2)); }
  static float derivative(float x) {
    return 0.5f * (1.0f + std::erf(x * kInvSqrt2)) + x * kInvSqrt2Pi * std::exp(-0.5f * x * x);
  }

 private:
  static constexpr float kInvSqrt2 = 0.70710678118654752440f;
  static constexpr float kInvSqrt2Pi = 0.39894228040143267794f;
};

/// SiLU (swish), x * sigmoid(x), as a plain (ungated) activation.
struct Silu {
  static constexpr const char* name() { return "silu"; }
  static float value(float x) { return x / (1.0f + std::exp(-x)); }
  static float derivative(float x) {
    const float s = 1.0f / (1.0f + std::exp(-x));
    return s * (1.0f + x * (1.0f - s));
  }
};

/// SwiGLU (SEMANTICS 15): silu(x W_gate) * (x W_in), as in Mixtral, Qwen and DeepSeek.
struct SwiGlu : Silu {
  static constexpr const char* name() { return "swiglu"; }
  static constexpr bool kGated = true;
};

/// GeGLU (SEMANTICS 15): gelu(x W_gate) * (x W_in) with the exact-erf GELU (T5 v1.1).
struct GeGlu : Gelu {
  static constexpr const char* name() { return "geglu"; }
  static constexpr bool kGated = true;
};

namespace detail {
template <class A, class = void>
struct IsGated : std::false_type {};
template <class A>
struct IsGated<A, std::void_t<decltype(A::kGated)>> : std::bool_constant<A::kGated> {};
}  // namespace detail

/// Whether experts with activation A are gated (hold W_gate; SEMANTICS 15).
template <class A>
inline constexpr bool is_gated_v = detail::IsGated<A>::value;

}  // namespace switchmoe
