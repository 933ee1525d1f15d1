#pragma once
// Row conversion from float32 to a GEMM element type: a copy for float, round to nearest even for
// bf16. isa::Avx512Bf16 converts with vcvtneps2bf16, the other tags with Eigen's scalar
// conversion; the two agree except on float32 denormals, which the instruction flushes to zero
// (as vdpbf16ps does anyway).
//
// The conversion is a template on the instruction-set tag (default isa::Native), not a plain
// inline function whose body depends on -march: two TUs built with different flags would
// otherwise hold two definitions of one function (isa.hpp).

#include <Eigen/Core>
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "switchmoe/kernels/isa.hpp"
#include "switchmoe/kernels/micro_kernel_portable.hpp"

#if SWITCHMOE_KERNELS_HAS_AVX512BF16
#include <immintrin.h>
#endif

namespace switchmoe::kernels {

namespace detail {

// The float32 -> bf16 row conversion of a tag; defined for the tags this TU is compiled for.
template <class Isa>
struct RowConversion {
  static_assert(kDependentFalse<Isa>,
                "convert_row has no conversion for this instruction-set tag in this translation "
                "unit: either the unit is not compiled for the tag's instructions, or the tag is "
                "not one of isa::Portable, isa::Avx512, isa::Avx512Bf16.");
};

template <>
struct RowConversion<isa::Portable> {
  static void run(const float* src, Eigen::bfloat16* dst, int n) {
    for (int j = 0; j < n; ++j) dst[j] = static_cast<Eigen::bfloat16>(src[j]);
  }
};

#if SWITCHMOE_KERNELS_HAS_AVX512
// AVX-512F has no bf16 conversion instruction: Eigen's scalar rounding, as for Portable.
template <>
struct RowConversion<isa::Avx512> : RowConversion<isa::Portable> {};
#endif

#if SWITCHMOE_KERNELS_HAS_AVX512BF16
template <>
struct RowConversion<isa::Avx512Bf16> {
  static void run(const float* src, Eigen::bfloat16* dst, int n) {
    // Every element, the tail included, goes through the same instruction, so the result of an
    // element does not depend on where a row segment starts.
    for (int j = 0; j < n; j += 16) {
      const int left = n - j;
      const __mmask16 mask =
          left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
      const __m256bh converted = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, src + j));
      // The 16 bf16 values fill the low half of a zmm; a 16-bit-lane masked store (AVX512BW)
      // writes the first `left` of them.
      _mm512_mask_storeu_epi16(dst + j, static_cast<__mmask32>(mask),
                               _mm512_castsi256_si512(reinterpret_cast<__m256i>(converted)));
    }
  }
};
#endif

}  // namespace detail

/// Eigen's float32 -> bf16 conversion exactly (round to nearest even, denormals kept, a NaN to
/// the quiet NaN of its sign), written in 32-bit integer arithmetic that compilers vectorize
/// (Eigen's conversion is a scalar function with a branch). For data whose bits must not depend
/// on the instruction set, e.g. the gathered tokens, which kernels without vdpbf16ps also read.
inline void convert_row_exact(const float* src, Eigen::bfloat16* dst, int n) {
  static_assert(sizeof(Eigen::bfloat16) == sizeof(std::uint16_t));
  for (int j = 0; j < n; ++j) {
    std::uint32_t u = 0;
    std::memcpy(&u, src + j, sizeof(u));
    const std::uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const std::uint32_t quiet_nan = ((u >> 16) & 0x8000u) | 0x7FC0u;
    const std::uint16_t bits =
        static_cast<std::uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? quiet_nan : rounded);
    std::memcpy(static_cast<void*>(dst + j), &bits, sizeof(bits));  // its raw bits
  }
}

template <class Isa = isa::Native>
void convert_row(const float* src, float* dst, int n) {
  static_assert(sizeof(detail::RowConversion<Isa>) > 0);  // the tag must be usable here
  std::copy(src, src + n, dst);
}

template <class Isa = isa::Native>
void convert_row(const float* src, Eigen::bfloat16* dst, int n) {
  detail::RowConversion<Isa>::run(src, dst, n);
}

}  // namespace switchmoe::kernels
