// The layer configurations that most tests use, compiled once in a library (instances_fp32.cpp,
// instances_bf16.cpp) rather than in every test file that uses them. The test sources of tests/
// and tests/io/ are compiled with this header force-included (tests/support/CMakeLists.txt;
// tests/CMakeLists.txt lists those that are not), so the declarations below stop them from
// instantiating these classes themselves: the kernels, reached through their members, are then
// compiled once per build instead of once per test file. A layer test's compile time went from
// 30-45 s to 10-17 s (g++ 12 -O3), and that of all test units from 964 s to 682 s. The tests'
// own code does not depend on it: CI's ThreadSanitizer stage builds without it
// (SWITCHMOE_TEST_INSTANCES=OFF).
#pragma once

#include <switchmoe/switchmoe.hpp>

// One explicit instantiation of a layer's parts: `keyword` is `extern` for a declaration (test
// files) and empty for the definition (instances_*.cpp).
#define SWITCHMOE_TEST_LAYER_INSTANCES(keyword, Policy, Activation)                            \
  keyword template class switchmoe::FeedForwardBank<switchmoe::Policy, switchmoe::Activation>; \
  keyword template class switchmoe::SwitchLayer<switchmoe::Policy, switchmoe::Activation>;     \
  keyword template class switchmoe::DenseFFN<switchmoe::Policy, switchmoe::Activation>;

#define SWITCHMOE_TEST_POLICY_INSTANCES(keyword, Policy)       \
  keyword template class switchmoe::Router<switchmoe::Policy>; \
  SWITCHMOE_TEST_LAYER_INSTANCES(keyword, Policy, Relu)        \
  SWITCHMOE_TEST_LAYER_INSTANCES(keyword, Policy, Gelu)        \
  SWITCHMOE_TEST_LAYER_INSTANCES(keyword, Policy, SwiGlu)

#define SWITCHMOE_TEST_FP32_INSTANCES(keyword) SWITCHMOE_TEST_POLICY_INSTANCES(keyword, Fp32)
#define SWITCHMOE_TEST_BF16_INSTANCES(keyword)                             \
  SWITCHMOE_TEST_POLICY_INSTANCES(keyword, Bf16)                           \
  keyword template class switchmoe::Router<switchmoe::Bf16RouterAblation>; \
  SWITCHMOE_TEST_LAYER_INSTANCES(keyword, Bf16RouterAblation, Relu)

SWITCHMOE_TEST_FP32_INSTANCES(extern)
SWITCHMOE_TEST_BF16_INSTANCES(extern)
