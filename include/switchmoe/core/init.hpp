#pragma once
// Weight initialization (SEMANTICS 11): a normal distribution with mean 0 and
// std = sqrt(scale / fan_in), truncated at two standard deviations. The Switch Transformer uses
// scale 0.1, a tenth of the usual 1.0 (paper section 2.4, Table 3).

#include <cmath>
#include <cstdint>

#include "switchmoe/core/random.hpp"
#include "switchmoe/core/types.hpp"

namespace switchmoe {

/// Fills `weight` with truncated-normal values drawn from (seed, substream); the result depends
/// only on those and the shape.
inline void truncated_normal_init(Matrix<float>& weight, double scale, Eigen::Index fan_in,
                                  std::uint64_t seed, std::uint64_t substream) {
  if (!(scale >= 0.0) || !std::isfinite(scale)) {
    detail::fail("init_scale is ", scale, ", expected a finite value >= 0");
  }
  if (fan_in < 1) detail::fail("fan_in is ", fan_in, ", expected >= 1");
  const double stddev = std::sqrt(scale / static_cast<double>(fan_in));
  const detail::CounterRng rng(seed, detail::Stream::kInit, substream);
  constexpr double kTwoPi = 6.283185307179586476925286766559;
  std::uint64_t draw = 0;
  for (Eigen::Index i = 0; i < weight.size(); ++i) {
    double z = 0.0;
    do {  // rejection keeps |z| <= 2: accepted with probability 0.954
      const double u1 = (static_cast<double>(rng.bits(draw++) >> 11) + 1.0) * 0x1.0p-53;
      const double u2 = static_cast<double>(rng.bits(draw++) >> 11) * 0x1.0p-53;
      z = std::sqrt(-2.0 * std::log(u1)) * std::cos(kTwoPi * u2);
    } while (std::abs(z) > 2.0);
    weight.data()[i] = static_cast<float>(z * stddev);
  }
}

}  // namespace switchmoe
