// expect: SwitchLayer's first template argument must be a switchmoe precision policy
#include "switchmoe/layers/switch_layer.hpp"

constexpr auto size = sizeof(switchmoe::SwitchLayer<float>);
