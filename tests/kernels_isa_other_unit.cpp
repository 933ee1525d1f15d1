// A second translation unit of kernels_isa_test, compiled without AVX512_BF16 (tests/
// CMakeLists.txt): its isa::Native is isa::Avx512, the main unit's is isa::Avx512Bf16. Both use
// the kernels under their default names; with the ISA in the type they stay two different
// definitions, so each unit gets its own kernel after linking (kernels/isa.hpp).

#include <Eigen/Core>
#include <type_traits>
#include <vector>

#include "switchmoe/kernels/convert.hpp"
#include "switchmoe/kernels/gemm.hpp"

static_assert(!SWITCHMOE_KERNELS_HAS_AVX512BF16 && SWITCHMOE_KERNELS_HAS_AVX512,
              "kernels_isa_other_unit.cpp must be compiled for AVX-512F without AVX512_BF16.");
static_assert(std::is_same_v<switchmoe::kernels::isa::Native, switchmoe::kernels::isa::Avx512>);

namespace other_unit {

void gemm_native(const switchmoe::kernels::GemmProblem<Eigen::bfloat16>& p) {
  switchmoe::kernels::gemm(p);
}

void convert_native(const float* src, Eigen::bfloat16* dst, int n) {
  switchmoe::kernels::convert_row(src, dst, n);
}

}  // namespace other_unit
