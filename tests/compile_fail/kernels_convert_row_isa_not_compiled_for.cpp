// flags: -mno-avx512f
// expect: convert_row has no conversion for this instruction-set tag in this translation unit
#include "switchmoe/kernels/convert.hpp"

void use(const float* src, float* dst) {
  switchmoe::kernels::convert_row<switchmoe::kernels::isa::Avx512>(src, dst, 4);
}
