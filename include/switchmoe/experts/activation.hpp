#pragma once
// Expert activations. Each is a stateless type with value(x) and derivative(x) at the
// pre-activation x, used as a template argument (STYLE: customization is a template argument).

#include <cmath>

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

}  // namespace switchmoe
