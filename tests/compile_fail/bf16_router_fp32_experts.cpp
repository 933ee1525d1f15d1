// A bfloat16 router is an ablation of the all-bfloat16 model (paper Table 2): with float32
// experts it is refused.
// expect: or bfloat16 only for the Bf16RouterAblation policy (bfloat16 experts)
#include "switchmoe/core/precision.hpp"

using Odd = switchmoe::Precision<float, float, Eigen::bfloat16>;
constexpr auto size = sizeof(Odd);
