// expect: An activation must provide static float value(float) and derivative(float).
#include "switchmoe/experts/activation.hpp"
#include "switchmoe/experts/expert_ffn.hpp"

struct NoDerivative {
  static float value(float x) { return x; }
  static int derivative(const char*) { return 0; }
};
constexpr auto size = sizeof(switchmoe::FeedForwardBank<switchmoe::Fp32, NoDerivative>);
