// A type that is not an instruction-set tag has no kernel.
// expect: The GEMM kernels have no micro-kernel for this instruction-set tag in this translation
// unit
#include "switchmoe/kernels/packed_b.hpp"

struct NotAnIsa {};
switchmoe::kernels::PackedB<float, NotAnIsa> packed;
