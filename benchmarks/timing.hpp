#pragma once
// What the timed benchmark programs share: a clock, the median of repetitions, random inputs,
// and the configuration of their dropless layers.

#include <algorithm>
#include <chrono>
#include <random>
#include <vector>

#include "switchmoe/core/types.hpp"
#include "switchmoe/layers/switch_layer.hpp"

namespace switchmoe_bench {

using Clock = std::chrono::steady_clock;

inline double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// [rows, cols] of standard normal values, reproducible from the seed.
inline switchmoe::Matrix<float> random_matrix(int rows, int cols, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  switchmoe::Matrix<float> m(rows, cols);
  for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = dist(rng);
  return m;
}

// A top-1 SwitchLayer configuration with nothing dropped (the benchmarks' MoE), seed 7: two
// layers made from it start with the same weights.
inline switchmoe::SwitchConfig dropless_config(int experts, int d_model, int d_ff) {
  switchmoe::SwitchConfig config;
  config.d_model = d_model;
  config.d_ff = d_ff;
  config.routing.num_experts = experts;
  config.routing.dropless = true;
  config.seed = 7;
  return config;
}

}  // namespace switchmoe_bench
