// expect: switchmoe::kernels::PackedB supports float and Eigen::bfloat16 elements only.
#include "switchmoe/kernels/packed_b.hpp"

switchmoe::kernels::PackedB<double, switchmoe::kernels::isa::Portable> packed;
