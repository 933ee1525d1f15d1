// expect: convert_row has no conversion for this instruction-set tag in this translation unit
#include "switchmoe/kernels/convert.hpp"

struct NotAnIsa {};
void use(const float* src, Eigen::bfloat16* dst) {
  switchmoe::kernels::convert_row<NotAnIsa>(src, dst, 4);
}
