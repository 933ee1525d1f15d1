// expect: The router and the SwitchLayer disagree on the precision policy.
#include "switchmoe/layers/switch_layer.hpp"

constexpr auto size = sizeof(
    switchmoe::SwitchLayer<switchmoe::Fp32, switchmoe::Relu, switchmoe::Router<switchmoe::Bf16>>);
