// Seeded random FFN weights shared by the tests that compare a layer against the double
// reference: O(1) weights keep every output O(1) and give the activations inputs of both signs,
// so a missing bias, activation or gate shows up well above float32 rounding. The draws are
// made in a fixed order (per network: w_in, w_out, then b_in, b_out when there are biases), so a
// test that fills the same matrices from the same generator always sees the same numbers.
#pragma once

#include <random>

#include "reference/common.hpp"

namespace switchmoe_test {

// w_in, w_out uniform in [-0.6, 0.6], then b_in, b_out in [-0.3, 0.3] when `bias`, of a network
// with unindexed accessors (DenseFFN).
template <class Network>
void randomize_ffn(Network& ffn, bool bias, std::mt19937& gen) {
  ref::fill_uniform(ffn.w_in(), gen, -0.6, 0.6);
  ref::fill_uniform(ffn.w_out(), gen, -0.6, 0.6);
  if (bias) {
    ref::fill_uniform(ffn.b_in(), gen, -0.3, 0.3);
    ref::fill_uniform(ffn.b_out(), gen, -0.3, 0.3);
  }
}

// The same draws for experts 0 .. num_experts - 1 of anything with per-expert accessors
// (FeedForwardBank, SwitchLayer), one expert after the other.
template <class Experts>
void randomize_experts(Experts& experts, int num_experts, bool bias, std::mt19937& gen) {
  for (int e = 0; e < num_experts; ++e) {
    ref::fill_uniform(experts.w_in(e), gen, -0.6, 0.6);
    ref::fill_uniform(experts.w_out(e), gen, -0.6, 0.6);
    if (bias) {
      ref::fill_uniform(experts.b_in(e), gen, -0.3, 0.3);
      ref::fill_uniform(experts.b_out(e), gen, -0.3, 0.3);
    }
  }
}

}  // namespace switchmoe_test
