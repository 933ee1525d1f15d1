// A policy whose router element is not float32 (SEMANTICS 13).
// expect: The router computes in float32 whatever the layer's precision (SEMANTICS 13)
#include "switchmoe/routing/router.hpp"

struct DoubleRouterPolicy {
  using Element = float;
  using Accumulator = float;
  using RouterElement = double;
  using Master = float;
};
template <>
struct switchmoe::is_precision<DoubleRouterPolicy> : std::true_type {};

constexpr auto size = sizeof(switchmoe::Router<DoubleRouterPolicy>);
