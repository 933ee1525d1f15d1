#pragma once
// switchmoe: Switch Transformer / Mixture-of-Experts layers as C++17 templates.
// Include this one header.

#include "switchmoe/core/init.hpp"
#include "switchmoe/core/parameter.hpp"
#include "switchmoe/core/precision.hpp"
#include "switchmoe/core/types.hpp"
#include "switchmoe/dispatch/dispatch_plan.hpp"
#include "switchmoe/dispatch/exchange.hpp"
#include "switchmoe/experts/activation.hpp"
#include "switchmoe/experts/expert_ffn.hpp"
#include "switchmoe/kernels/gemm.hpp"
#include "switchmoe/layers/dense_ffn.hpp"
#include "switchmoe/layers/stats.hpp"
#include "switchmoe/layers/switch_layer.hpp"
#include "switchmoe/losses/load_balancing.hpp"
#include "switchmoe/losses/z_loss.hpp"
#include "switchmoe/routing/capacity.hpp"
#include "switchmoe/routing/options.hpp"
#include "switchmoe/routing/route.hpp"
#include "switchmoe/routing/router.hpp"
#include "switchmoe/routing/scheme.hpp"
