// expect: FeedForwardBank's first template argument must be a switchmoe precision policy.
#include "switchmoe/experts/activation.hpp"
#include "switchmoe/experts/expert_ffn.hpp"

constexpr auto size = sizeof(switchmoe::FeedForwardBank<float, switchmoe::Relu>);
