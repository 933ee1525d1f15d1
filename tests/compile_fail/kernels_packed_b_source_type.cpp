// A PackedB packs its own element type or a float32 master, nothing else.
// expect: PackedB::pack takes the element type itself or a float32 master matrix.
#include "switchmoe/kernels/packed_b.hpp"

void use(switchmoe::kernels::PackedB<float>& packed, const double* b) {
  packed.pack(b, 4, switchmoe::kernels::Transpose::kNo, 4, 4);
}
