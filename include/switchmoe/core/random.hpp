#pragma once
// Counter-based random numbers: every draw is a pure function of (seed, stream, index), so the
// values do not depend on the number of threads or the order in which work is done.

#include <cstdint>

namespace switchmoe {
namespace detail {

/// SplitMix64 finalizer (Steele, Lea, Flood 2014): a bijective 64-bit mixer.
inline std::uint64_t mix64(std::uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

/// Streams keep the draws of different uses of one seed apart.
enum class Stream : std::uint64_t {
  kInit = 1,
  kJitter = 2,
  kDropout = 3,
  kSecondChoice = 4,  // SEMANTICS 18
};

struct CounterRng {
  std::uint64_t key = 0;

  CounterRng(std::uint64_t seed, Stream stream, std::uint64_t substream = 0)
      : key(mix64(mix64(seed) ^ mix64((static_cast<std::uint64_t>(stream) << 56) ^ substream))) {}

  std::uint64_t bits(std::uint64_t index) const { return mix64(key ^ mix64(index)); }

  /// Uniform on [0, 1) with 24 random bits (exactly representable in float).
  float uniform(std::uint64_t index) const {
    return static_cast<float>(bits(index) >> 40) * (1.0f / 16777216.0f);
  }
};

}  // namespace detail
}  // namespace switchmoe
