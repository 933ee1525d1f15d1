// gemm multiplies float or bfloat16 operands only.
// expect: switchmoe::kernels::gemm supports float and Eigen::bfloat16 operands only.
#include "switchmoe/kernels/gemm.hpp"

void use(const switchmoe::kernels::GemmProblem<double>& p) { switchmoe::kernels::gemm(p); }
