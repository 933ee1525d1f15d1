#pragma once
// Row conversion from float32 to a GEMM element type: a copy for float, round to nearest even for
// bf16 (vcvtneps2bf16 on AVX512_BF16 targets, Eigen's scalar conversion elsewhere; the two agree
// except on float32 denormals, which the instruction flushes to zero, as vdpbf16ps does anyway).

#include <Eigen/Core>
#include <algorithm>
#include <cstdint>

#if defined(__AVX512BF16__) && defined(__AVX512VL__) && defined(__AVX512BW__)
#include <immintrin.h>
#endif

namespace switchmoe::kernels {

inline void convert_row(const float* src, float* dst, int n) { std::copy(src, src + n, dst); }

inline void convert_row(const float* src, Eigen::bfloat16* dst, int n) {
#if defined(__AVX512BF16__) && defined(__AVX512VL__) && defined(__AVX512BW__)
  // Every element, the tail included, goes through the same instruction, so the result of an
  // element does not depend on where a row segment starts.
  for (int j = 0; j < n; j += 16) {
    const int left = n - j;
    const __mmask16 mask =
        left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
    const __m256bh converted = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, src + j));
    _mm256_mask_storeu_epi16(dst + j, mask, reinterpret_cast<__m256i>(converted));
  }
#else
  for (int j = 0; j < n; ++j) dst[j] = static_cast<Eigen::bfloat16>(src[j]);
#endif
}

}  // namespace switchmoe::kernels
