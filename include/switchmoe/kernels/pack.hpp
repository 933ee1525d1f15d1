#pragma once
// Packed operand layouts shared by every micro-kernel, and the portable packing loops.
//
// A micro-kernel multiplies a panel of kMr rows of op(A) by a panel of kNr columns of op(B)
// over `steps` packed k-steps; a k-step holds kKPack consecutive k values (1 for float
// kernels, 2 for the bf16 dot-product kernel, which consumes pairs along k):
//   A panel: a[(s * kMr + i) * kKPack + q] = op(A)(i, s * kKPack + q)
//   B panel: b[(s * kNr + j) * kKPack + q] = op(B)(s * kKPack + q, j)
// Rows, columns and k values past the end of the matrix are packed as zeros.
// The same routine packs both operands: a "panel row" is a row of op(A) or a column of op(B).

#include <cstddef>

namespace switchmoe::kernels::detail {

// A strided read-only view of an operand: element (r, p) = data[r * row_stride + p * k_stride],
// where r is a row of op(A) or a column of op(B) and p runs along k.
template <class T>
struct OperandView {
  const T* data;
  std::ptrdiff_t row_stride;
  std::ptrdiff_t k_stride;
};

// Packs one full panel (kPanel valid panel rows, steps * kKPack valid k values) starting at
// `base`, in plain C++. Panel rows contiguous in memory (B not transposed, A transposed) copy
// kPanel elements per k value; k contiguous (A not transposed, B transposed) transpose.
template <class Kernel, int kPanel, class T>
void pack_full_panel_portable(const OperandView<T>& view, const T* base, int steps,
                              typename Kernel::Packed* dst) {
  constexpr int kKPack = Kernel::kKPack;
  if (view.row_stride == 1) {
    for (int s = 0; s < steps; ++s) {
      for (int q = 0; q < kKPack; ++q) {
        const T* src = base + (s * kKPack + q) * view.k_stride;
        typename Kernel::Packed* out = dst + s * kPanel * kKPack + q;
        for (int r = 0; r < kPanel; ++r) out[r * kKPack] = Kernel::pack(src[r]);
      }
    }
  } else {
    for (int r = 0; r < kPanel; ++r) {
      const T* src = base + r * view.row_stride;
      typename Kernel::Packed* out = dst + r * kKPack;
      for (int s = 0; s < steps; ++s) {
        for (int q = 0; q < kKPack; ++q) {
          out[s * kPanel * kKPack + q] = Kernel::pack(src[(s * kKPack + q) * view.k_stride]);
        }
      }
    }
  }
}

}  // namespace switchmoe::kernels::detail
