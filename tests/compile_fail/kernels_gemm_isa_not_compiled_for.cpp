// A tag whose instructions the translation unit is not compiled for has no kernel.
// flags: -mno-avx512f
// expect: The GEMM kernels have no micro-kernel for this instruction-set tag in this translation
// unit
#include "switchmoe/kernels/gemm.hpp"

void use(const switchmoe::kernels::GemmProblem<float>& p) {
  switchmoe::kernels::gemm<float, switchmoe::kernels::isa::Avx512Bf16>(p);
}
