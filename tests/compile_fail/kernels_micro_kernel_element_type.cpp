// The portable kernel (and the primary template) accept float and bfloat16 elements only.
// expect: The GEMM kernels support float and Eigen::bfloat16 operands only.
#include "switchmoe/kernels/micro_kernel_portable.hpp"

struct NotAnIsa {};
constexpr int portable =
    switchmoe::kernels::detail::MicroKernel<switchmoe::kernels::isa::Portable, int>::kMr;
constexpr int primary = switchmoe::kernels::detail::MicroKernel<NotAnIsa, double>::kMr;
