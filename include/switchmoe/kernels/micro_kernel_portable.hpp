#pragma once
// Portable micro-kernel: plain C++ on float. bf16 operands are widened to float while packing,
// so the products are exact and accumulation is float32 (the precision contract of the bf16
// path). Used where AVX-512 is not available, and as the tested reference path everywhere.

#include <Eigen/Core>
#include <cstddef>
#include <type_traits>

#include "switchmoe/kernels/isa.hpp"
#include "switchmoe/kernels/pack.hpp"

namespace switchmoe::kernels::detail {

template <class T>
inline constexpr bool kIsGemmElement =
    std::is_same_v<T, float> || std::is_same_v<T, Eigen::bfloat16>;

// false, but only once the template arguments are known (CUTLASS's dependent_false): a
// static_assert on it fires when the primary template is instantiated, not when it is parsed.
template <class...>
inline constexpr bool kDependentFalse = false;

// The micro-kernel of an instruction-set tag (isa.hpp) and element type. Only the
// specializations exist: isa::Portable (here, always) and isa::Avx512 / isa::Avx512Bf16
// (micro_kernel_avx512.hpp, in TUs compiled for their instructions).
template <class Isa, class T>
struct MicroKernel {
  static_assert(kIsGemmElement<T>,
                "The GEMM kernels support float and Eigen::bfloat16 operands only.");
  static_assert(!kIsGemmElement<T> || kDependentFalse<Isa, T>,
                "The GEMM kernels have no micro-kernel for this instruction-set tag in this "
                "translation unit: either the unit is not compiled for the tag's instructions "
                "(isa::Avx512 needs AVX-512F; isa::Avx512Bf16 needs AVX-512F, BW and BF16, "
                "e.g. -march=native on a machine that has them), or the tag is not one of "
                "isa::Portable, isa::Avx512, isa::Avx512Bf16 (isa::Native names the best one "
                "available).");
};

// Layouts of the packed panels: see pack.hpp.
template <class T>
struct MicroKernel<isa::Portable, T> {
  static_assert(kIsGemmElement<T>,
                "The GEMM kernels support float and Eigen::bfloat16 operands only.");
  using Element = T;
  using Packed = float;
  static constexpr int kMr = 6;
  static constexpr int kNr = 16;
  static constexpr int kKPack = 1;
  static constexpr int kKc = 256;
  static constexpr int kMc = 16 * kMr;
  static constexpr int kNc = 16 * kNr;

  static Packed pack(T value) { return static_cast<float>(value); }

  template <int kPanel>
  static void pack_full_panel(const OperandView<T>& view, const T* base, int steps, Packed* dst) {
    pack_full_panel_portable<MicroKernel, kPanel>(view, base, steps, dst);
  }

  // C[rows, cols] (leading dimension ldc) = A_panel * B_panel + beta * C over `steps` k-steps;
  // beta == 0 overwrites C without reading it. `b_next` (the B micro-panel used next) is a
  // prefetch hint that the portable kernel leaves to the hardware.
  static void run(int steps, const Packed* a, const Packed* b, float* c, std::ptrdiff_t ldc,
                  float beta, int rows, int cols, const Packed* /*b_next*/ = nullptr) {
    float acc[kMr][kNr] = {};
    for (int s = 0; s < steps; ++s) {
      const float* as = a + s * kMr;
      const float* bs = b + s * kNr;
      for (int i = 0; i < kMr; ++i) {
        for (int j = 0; j < kNr; ++j) acc[i][j] += as[i] * bs[j];
      }
    }
    for (int i = 0; i < rows; ++i) {
      float* ci = c + i * ldc;
      if (beta == 0.0f) {
        for (int j = 0; j < cols; ++j) ci[j] = acc[i][j];
      } else {
        for (int j = 0; j < cols; ++j) ci[j] = acc[i][j] + beta * ci[j];
      }
    }
  }
};

}  // namespace switchmoe::kernels::detail
