#pragma once
// AVX-512 micro-kernels, register tile kMr x 32 (two zmm per row), one per tag (isa.hpp):
//   MicroKernel<isa::Avx512, float>: vfmadd231ps, one k value per step.
//   MicroKernel<isa::Avx512, bfloat16>: bf16 operands widened to float while packing, then the
//     float kernel (products exact, float32 accumulation).
//   MicroKernel<isa::Avx512Bf16, bfloat16>: vdpbf16ps on pairs of consecutive k values, float32
//     accumulation. The products of bf16 values are exact in float32; only the sums round.
//     (vdpbf16ps flushes float32 denormals to zero, like every bf16 dot-product instruction.)
//   MicroKernel<isa::Avx512Bf16, float>: Avx512's float kernel.
// Each specialization is defined only in TUs compiled for its instructions, and always with the
// same body: no flag changes what a name means (isa.hpp explains why).

#include <Eigen/Core>
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "switchmoe/kernels/isa.hpp"
#include "switchmoe/kernels/micro_kernel_portable.hpp"
#include "switchmoe/kernels/pack.hpp"

#if SWITCHMOE_KERNELS_HAS_AVX512
#include <immintrin.h>

// GCC 12's AVX-512 intrinsics initialise their "undefined" operand from itself, which
// -W(maybe-)uninitialized reports wherever they are inlined (GCC bug 105593); not a real read.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace switchmoe::kernels::detail {

// In-register transpose of a 16 x 16 block of 32-bit elements (floats or bf16 pairs):
// on return r[c] holds column c.
inline void transpose_16x16_epi32(__m512i (&r)[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  __m512i u[16];  // u[4g + c], lane L: rows 4g..4g+3 of column 4L + c
  for (int g = 0; g < 4; ++g) {
    u[4 * g + 0] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
    u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
  }
  for (int c = 0; c < 4; ++c) {  // 4 x 4 transpose of 128-bit lanes
    const __m512i x0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44);
    const __m512i x1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xEE);
    const __m512i x2 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44);
    const __m512i x3 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xEE);
    r[c] = _mm512_shuffle_i32x4(x0, x2, 0x88);
    r[4 + c] = _mm512_shuffle_i32x4(x0, x2, 0xDD);
    r[8 + c] = _mm512_shuffle_i32x4(x1, x3, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(x1, x3, 0xDD);
  }
}

inline __mmask16 first_lanes16(int count) {
  return count >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << count) - 1u);
}

// Panel whose k-steps are contiguous 32-bit units in memory (a float, or a bf16 pair):
// op(A) not transposed, op(B) transposed. Transposes 16 x 16 blocks in registers.
// dst unit (s * kPanel + r) = unit s of panel row r for the first valid_rows rows, zero for the
// rows after them (an edge panel; rows past valid_rows are never read).
template <int kPanel>
inline void pack_transposed_32bit(const char* base, std::ptrdiff_t row_bytes, int steps, char* dst,
                                  int valid_rows = kPanel) {
  for (int s0 = 0; s0 < steps; s0 += 16) {
    const int cols = std::min(16, steps - s0);
    const __mmask16 load_mask = first_lanes16(cols);
#pragma GCC unroll 2
    for (int g = 0; g < kPanel; g += 16) {
      const int rows = std::min(16, kPanel - g);
      const int loaded = std::min(rows, valid_rows - g);
      __m512i r[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) {
        r[i] = i < loaded ? _mm512_maskz_loadu_epi32(load_mask, base + (g + i) * row_bytes + s0 * 4)
                          : _mm512_setzero_si512();
      }
      transpose_16x16_epi32(r);
      const __mmask16 store_mask = first_lanes16(rows);
      for (int c = 0; c < cols; ++c) {
        _mm512_mask_storeu_epi32(dst + (static_cast<std::ptrdiff_t>(s0 + c) * kPanel + g) * 4,
                                 store_mask, r[c]);
      }
    }
  }
}

// Full float panel whose panel rows are contiguous (op(B) not transposed, op(A) transposed).
template <int kPanel>
inline void pack_rows_contiguous_f32(const float* base, std::ptrdiff_t k_stride, int steps,
                                     float* dst) {
  for (int s = 0; s < steps; ++s) {
    const float* src = base + s * k_stride;
#pragma GCC unroll 2
    for (int g = 0; g < kPanel; g += 16) {
      const __mmask16 mask = first_lanes16(kPanel - g);
      _mm512_mask_storeu_ps(dst + s * kPanel + g, mask, _mm512_maskz_loadu_ps(mask, src + g));
    }
  }
}

// The register tile shared by the AVX-512 kernels: kMr rows x 32 columns of float32
// accumulators (two zmm per row, 2 * kMr of the 32 registers).
template <int kRows>
struct Avx512Tile {
  static constexpr int kMr = kRows;
  static constexpr int kNr = 32;

  // Brings the C tile into L1 while the k loop runs (C rows are ldc apart and were last touched
  // one k block earlier, so they are usually out of L1): per row its first element and the one
  // 64 bytes on, or its last when it has no more than 16 (an address inside C either way).
  static inline void prefetch_c(const float* c, std::ptrdiff_t ldc, int rows, int cols) {
    const int second = std::min(cols, 17) - 1;
    for (int i = 0; i < rows; ++i) {
      const float* ci = c + i * ldc;
      _mm_prefetch(reinterpret_cast<const char*>(ci), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(ci + second), _MM_HINT_T0);
    }
  }

  // Calls run_tile<R> with R = rows from 5 rows on, else the smallest of 2 and 4 that covers
  // `rows`, so that a row tile pays only for its own rows: compute_tile splits a row block
  // into tiles of nearly equal height (64 rows: 4 x 13 + 12), and 5 or more rows keep at
  // least 10 independent fma chains, enough for the 2 fma pipes at 4 cycles of latency.
  template <class Run>
  static inline void dispatch_rows(int rows, const Run& run) {
    if (rows > 4) {
      dispatch_height(rows, run, std::make_integer_sequence<int, kMr - 5>());
    } else if (rows > 2) {
      run(std::integral_constant<int, 4>());
    } else {
      run(std::integral_constant<int, 2>());
    }
  }

  // run(R) for R = rows when rows is one of the heights 5 + kI (5 .. kMr - 1), else run(kMr).
  template <class Run, int... kI>
  static inline void dispatch_height(int rows, const Run& run, std::integer_sequence<int, kI...>) {
    const bool matched =
        ((rows == 5 + kI && (run(std::integral_constant<int, 5 + kI>()), true)) || ...);
    if (!matched) run(std::integral_constant<int, kMr>());
  }

  // Zeroes the accumulators of the first kRowsUsed (>= rows) rows, adds `steps` packed k-steps
  // with `step(rows_used, lo, hi, a, b)` (a, b point at
  // the step's A and B values; the A and B pointers advance by a_stride / b_stride packed
  // elements per step), then stores C = acc + beta * C. When `b_next` is not null, each step
  // also prefetches into L2 the matching step of the B micro-panel the caller uses next, so
  // that weights streamed from memory arrive while this tile computes.
  template <int kRowsUsed, class Packed, class Step>
  static inline __attribute__((always_inline)) void run_tile(
      int steps, const Packed* a, int a_stride, const Packed* b, int b_stride, float* c,
      std::ptrdiff_t ldc, float beta, int rows, int cols, const Packed* b_next, Step step) {
    prefetch_c(c, ldc, rows, cols);
    __m512 lo[kMr];
    __m512 hi[kMr];
#pragma GCC unroll 32
    for (int i = 0; i < kRowsUsed; ++i) {
      lo[i] = _mm512_setzero_ps();
      hi[i] = _mm512_setzero_ps();
    }
    if (b_next != nullptr) {
      for (int s = 0; s < steps; ++s) {
        _mm_prefetch(reinterpret_cast<const char*>(b_next), _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(b_next) + 64, _MM_HINT_T1);
        step(std::integral_constant<int, kRowsUsed>(), lo, hi, a, b);
        a += a_stride;
        b += b_stride;
        b_next += b_stride;
      }
    } else {
      for (int s = 0; s < steps; ++s) {
        step(std::integral_constant<int, kRowsUsed>(), lo, hi, a, b);
        a += a_stride;
        b += b_stride;
      }
    }
    store(lo, hi, c, ldc, beta, rows, cols);
  }

  // The address of columns [16, 32) of a C row of `cols` columns; with cols <= 16 (nothing
  // there: the masks are empty) the row's end, so that no address past C is formed.
  static inline float* upper_half(float* c, int cols) { return c + std::min(cols, 16); }

  // C row [cols] = acc + beta * C row, the store of run_tile for one row (same rounding).
  static inline __attribute__((always_inline)) void store_row(__m512 lo, __m512 hi, float* c,
                                                              float beta, int cols) {
    const __mmask16 mask_lo = first_lanes16(cols);
    const __mmask16 mask_hi = cols <= 16 ? static_cast<__mmask16>(0) : first_lanes16(cols - 16);
    if (beta != 0.0f) {
      const __m512 vbeta = _mm512_set1_ps(beta);
      lo = _mm512_fmadd_ps(vbeta, _mm512_maskz_loadu_ps(mask_lo, c), lo);
      hi = _mm512_fmadd_ps(vbeta, _mm512_maskz_loadu_ps(mask_hi, upper_half(c, cols)), hi);
    }
    _mm512_mask_storeu_ps(c, mask_lo, lo);
    _mm512_mask_storeu_ps(upper_half(c, cols), mask_hi, hi);
  }

  // The thin-row (decode) kernel: kThin rows of op(A), read in place (no packing; row i at
  // a_rows[i], k-step s at a_rows[i] + s * kKPack), times kPanels consecutive packed B panels
  // (panel_stride packed elements apart), over `steps` k-steps; then C = acc + beta * C for the
  // first `rows` rows and `cols` columns. Every accumulator is the same chain of the same
  // instructions as in run_tile (zero, then one `fma` per k-step in increasing k), so results
  // are bitwise those of run_tile; only more column panels are in flight, which keeps enough
  // independent chains (2 * kThin * kPanels) busy when there are few rows, and reads kPanels
  // streams of B at once.
  //
  // When `b_next` is not null, each step also prefetches into L2 the same step of the kPanels
  // panels the caller runs next (b_next, panel_stride apart), as run_tile does for its next
  // micro-panel: the weights streamed from memory then arrive while this tile computes.
  template <int kThin, int kPanels, class Packed, class E, class Broadcast, class Fma>
  static inline __attribute__((always_inline)) void run_thin_tile(
      int steps, const E* const* a_rows, const Packed* b, std::ptrdiff_t panel_stride, int b_stride,
      float* c, std::ptrdiff_t ldc, float beta, int rows, int cols, const Packed* b_next,
      Broadcast broadcast, Fma fma) {
    __m512 acc[kThin][kPanels][2];
#pragma GCC unroll 16
    for (int i = 0; i < kThin; ++i) {
#pragma GCC unroll 16
      for (int g = 0; g < kPanels; ++g) acc[i][g][0] = acc[i][g][1] = _mm512_setzero_ps();
    }
    const E* ar[kThin];
#pragma GCC unroll 16
    for (int i = 0; i < kThin; ++i) ar[i] = a_rows[i];
    // One step: the same fma chain with or without the prefetch (results do not depend on it).
    const auto step = [&](int s) __attribute__((always_inline)) {
      const Packed* bs = b + static_cast<std::ptrdiff_t>(s) * b_stride;
#pragma GCC unroll 16
      for (int i = 0; i < kThin; ++i) {
        const auto ai = broadcast(ar[i], s);
#pragma GCC unroll 16
        for (int g = 0; g < kPanels; ++g) {
          acc[i][g][0] = fma(acc[i][g][0], ai, bs + g * panel_stride);
          acc[i][g][1] = fma(acc[i][g][1], ai, bs + g * panel_stride + b_stride / 2);
        }
      }
    };
    if (b_next != nullptr) {
      for (int s = 0; s < steps; ++s) {
        const char* next =
            reinterpret_cast<const char*>(b_next + static_cast<std::ptrdiff_t>(s) * b_stride);
#pragma GCC unroll 16
        for (int g = 0; g < kPanels; ++g) {
          const char* line = next + g * panel_stride * static_cast<std::ptrdiff_t>(sizeof(Packed));
          _mm_prefetch(line, _MM_HINT_T1);
          _mm_prefetch(line + 64, _MM_HINT_T1);
        }
        step(s);
      }
    } else {
      for (int s = 0; s < steps; ++s) step(s);
    }
#pragma GCC unroll 16
    for (int g = 0; g < kPanels; ++g) {
      const int panel_cols = std::min(kNr, cols - g * kNr);
      if (panel_cols <= 0) break;
      for (int i = 0; i < rows; ++i) {
        store_row(acc[i][g][0], acc[i][g][1], c + i * ldc + g * kNr, beta, panel_cols);
      }
    }
  }

  // The fewest rows (kThin) of a thin tile that prefetches. Measured (RESULTS_issue15.md, round
  // 3): with 4 to 8 rows the prefetch cut the time of streamed weights by 2-29%; with one row
  // (8 panels, 16 prefetches a step next to 16 loads) it made the kernel 1-17% slower.
  static constexpr int kThinPrefetchRows = 4;

  // Rows [0, rows) (1 <= rows <= 8) of op(A) times `panels` consecutive B panels: groups of
  // kPanels = 8 / kThin panels (16 accumulators), the last panels one at a time. With a
  // `prefetch_end` (the end of the buffer that holds b's panels), each group prefetches the
  // panels that follow it in memory (the next group's, and after the last one the panels the
  // caller reads next in the packed layout) when they lie wholly before prefetch_end; nullptr:
  // no prefetch.
  template <int kThin, class Packed, class E, class Broadcast, class Fma>
  static inline void run_thin_rows(int steps, const E* const* a_rows, const Packed* b,
                                   std::ptrdiff_t panel_stride, int b_stride, int panels, float* c,
                                   std::ptrdiff_t ldc, float beta, int rows, int cols,
                                   const Packed* prefetch_end, Broadcast broadcast, Fma fma) {
    constexpr int kGroup = 8 / kThin;
    // Whole panels of the current size from b to the buffer end (0: no prefetch).
    const std::ptrdiff_t room = prefetch_end != nullptr && kThin >= kThinPrefetchRows
                                    ? (prefetch_end - b) / panel_stride
                                    : 0;
    // The `count` panels from panel `first` on, when they lie before the buffer end.
    const auto next_panels = [&](int first, int count) __attribute__((always_inline)) {
      return first + count <= room ? b + first * panel_stride : nullptr;
    };
    int q = 0;
    for (; q + kGroup <= panels; q += kGroup) {
      run_thin_tile<kThin, kGroup>(steps, a_rows, b + q * panel_stride, panel_stride, b_stride,
                                   c + q * kNr, ldc, beta, rows, cols - q * kNr,
                                   next_panels(q + kGroup, kGroup), broadcast, fma);
    }
    for (; q < panels; ++q) {
      run_thin_tile<kThin, 1>(steps, a_rows, b + q * panel_stride, panel_stride, b_stride,
                              c + q * kNr, ldc, beta, rows, cols - q * kNr, next_panels(q + 1, 1),
                              broadcast, fma);
    }
  }

  // Dispatches 1 <= rows <= 8 to kThin in {1, 2, 4, 8}; rows beyond `rows` repeat the last row
  // (computed, never stored), so that A is never read out of bounds.
  template <class Packed, class E, class Broadcast, class Fma>
  static inline void run_thin_dispatch(int steps, const E* a, std::ptrdiff_t lda, int rows,
                                       const Packed* b, std::ptrdiff_t panel_stride, int b_stride,
                                       int panels, float* c, std::ptrdiff_t ldc, float beta,
                                       int cols, const Packed* prefetch_end, Broadcast broadcast,
                                       Fma fma) {
    const E* a_rows[8];
    for (int i = 0; i < 8; ++i) a_rows[i] = a + std::min(i, rows - 1) * lda;
    if (rows > 4) {
      run_thin_rows<8>(steps, a_rows, b, panel_stride, b_stride, panels, c, ldc, beta, rows, cols,
                       prefetch_end, broadcast, fma);
    } else if (rows > 2) {
      run_thin_rows<4>(steps, a_rows, b, panel_stride, b_stride, panels, c, ldc, beta, rows, cols,
                       prefetch_end, broadcast, fma);
    } else if (rows > 1) {
      run_thin_rows<2>(steps, a_rows, b, panel_stride, b_stride, panels, c, ldc, beta, rows, cols,
                       prefetch_end, broadcast, fma);
    } else {
      run_thin_rows<1>(steps, a_rows, b, panel_stride, b_stride, panels, c, ldc, beta, rows, cols,
                       prefetch_end, broadcast, fma);
    }
  }

  // C[rows, cols] = acc + beta * C (beta == 0: C is not read); columns beyond `cols` are
  // masked off.
  static inline void store(const __m512 (&lo)[kMr], const __m512 (&hi)[kMr], float* c,
                           std::ptrdiff_t ldc, float beta, int rows, int cols) {
    const __mmask16 mask_lo =
        cols >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << cols) - 1u);
    const __mmask16 mask_hi = cols >= 32
                                  ? static_cast<__mmask16>(0xFFFF)
                                  : (cols <= 16 ? static_cast<__mmask16>(0)
                                                : static_cast<__mmask16>((1u << (cols - 16)) - 1u));
    if (beta == 0.0f) {
      for (int i = 0; i < rows; ++i) {
        float* ci = c + i * ldc;
        _mm512_mask_storeu_ps(ci, mask_lo, lo[i]);
        _mm512_mask_storeu_ps(upper_half(ci, cols), mask_hi, hi[i]);
      }
    } else {
      const __m512 vbeta = _mm512_set1_ps(beta);
      for (int i = 0; i < rows; ++i) {
        float* ci = c + i * ldc;
        float* ci_hi = upper_half(ci, cols);
        const __m512 c_lo = _mm512_maskz_loadu_ps(mask_lo, ci);
        const __m512 c_hi = _mm512_maskz_loadu_ps(mask_hi, ci_hi);
        _mm512_mask_storeu_ps(ci, mask_lo, _mm512_fmadd_ps(vbeta, c_lo, lo[i]));
        _mm512_mask_storeu_ps(ci_hi, mask_hi, _mm512_fmadd_ps(vbeta, c_hi, hi[i]));
      }
    }
  }
};

// float operands, and bf16 operands widened to float while packing (isa::Avx512).
template <class T>
struct Avx512FloatKernel : Avx512Tile<14> {
  using Element = T;
  using Packed = float;
  static constexpr int kKPack = 1;
  // k block: the A block (kMc x kKc, 280 KB) and a B micro-panel (kKc x kNr, 64 KB) sit in a
  // 1 MB L2, not in L1 (a plain gemm's packed B block, kNc x kKc, is 1 MB and is read from L2
  // or L3 one micro-panel at a time). A longer block means fewer passes over the C tile: with kKc
  // 256, a layer's first product (k = d_model) reloaded C from L3 once per k block, since a
  // packed-weight tile spans all d_ff columns. Measured on Zen 5 in one process
  // (benchmarks/kblock_bench.cpp, RESULTS_issue15.md round 6): against 256, the forward of 8
  // experts (768 x 3072) and of 128 (512 x 2048) 1-6% faster on 2 threads; 1024 was 0-3%
  // faster again with 8 experts but 5% slower with 128 experts; a 128-step block was 5-8%
  // slower than 256.
  static constexpr int kKc = 512;
  static constexpr int kMc = 10 * kMr;
  static constexpr int kNc = 16 * kNr;

  static Packed pack(T value) { return static_cast<float>(value); }

  template <int kPanel>
  static void pack_full_panel(const OperandView<T>& view, const T* base, int steps, Packed* dst) {
    if constexpr (std::is_same_v<T, float>) {
      if (view.k_stride == 1) {
        pack_transposed_32bit<kPanel>(reinterpret_cast<const char*>(base),
                                      view.row_stride * static_cast<std::ptrdiff_t>(sizeof(float)),
                                      steps, reinterpret_cast<char*>(dst));
        return;
      }
      if (view.row_stride == 1) {
        pack_rows_contiguous_f32<kPanel>(base, view.k_stride, steps, dst);
        return;
      }
    }
    pack_full_panel_portable<Avx512FloatKernel, kPanel>(view, base, steps, dst);
  }

  // A panel of valid_rows < kPanel rows (the rest zero) with every k-step valid, in registers
  // like a full one, when its k values are contiguous floats; false: not handled (the caller
  // packs it element by element, with the same result).
  template <int kPanel>
  static bool pack_edge_panel(const OperandView<T>& view, const T* base, int steps, int valid_rows,
                              Packed* dst) {
    if constexpr (std::is_same_v<T, float>) {
      if (view.k_stride == 1) {
        pack_transposed_32bit<kPanel>(reinterpret_cast<const char*>(base),
                                      view.row_stride * static_cast<std::ptrdiff_t>(sizeof(float)),
                                      steps, reinterpret_cast<char*>(dst), valid_rows);
        return true;
      }
    }
    return false;
  }

  // Thin row blocks (decode): op(A) rows read in place, see Avx512Tile::run_thin_tile. The
  // broadcast value is the packed one (pack(): a float, or a bf16 widened exactly).
  static constexpr int kThinRows = 8;
  static void run_thin(int steps, const T* a, std::ptrdiff_t lda, int rows, const Packed* b,
                       std::ptrdiff_t panel_stride, int panels, float* c, std::ptrdiff_t ldc,
                       float beta, int cols, const Packed* prefetch_end = nullptr) {
    run_thin_dispatch(
        steps, a, lda, rows, b, panel_stride, kNr, panels, c, ldc, beta, cols, prefetch_end,
        [](const T* ai, int s)
            __attribute__((always_inline)) { return _mm512_set1_ps(pack(ai[s])); },
        [](__m512 acc, __m512 ai, const Packed* bs) __attribute__((always_inline)) {
          return _mm512_fmadd_ps(ai, _mm512_load_ps(bs), acc);
        });
  }

  static void run(int steps, const Packed* a, const Packed* b, float* c, std::ptrdiff_t ldc,
                  float beta, int rows, int cols, const Packed* b_next = nullptr) {
    dispatch_rows(rows, [&](auto rows_used) {
      run_rows<decltype(rows_used)::value>(steps, a, b, c, ldc, beta, rows, cols, b_next);
    });
  }

  // One register-tile height, out of line: with every height inlined into one caller
  // (compute_tile), GCC 12 kept the accumulators on the stack.
  template <int kRowsUsed>
  static __attribute__((noinline)) void run_rows(int steps, const Packed* a, const Packed* b,
                                                 float* c, std::ptrdiff_t ldc, float beta, int rows,
                                                 int cols, const Packed* b_next) {
    run_tile<kRowsUsed>(
        steps, a, kMr, b, kNr, c, ldc, beta, rows, cols, b_next,
        [](auto used, __m512(&lo)[kMr], __m512(&hi)[kMr], const Packed* as, const Packed* bs)
            __attribute__((always_inline)) {
              const __m512 b_lo = _mm512_load_ps(bs);
              const __m512 b_hi = _mm512_load_ps(bs + 16);
#pragma GCC unroll 32
              for (int i = 0; i < decltype(used)::value; ++i) {
                const __m512 ai = _mm512_set1_ps(as[i]);
                lo[i] = _mm512_fmadd_ps(ai, b_lo, lo[i]);
                hi[i] = _mm512_fmadd_ps(ai, b_hi, hi[i]);
              }
            });
  }
};

template <>
struct MicroKernel<isa::Avx512, float> : Avx512FloatKernel<float> {};

template <>
struct MicroKernel<isa::Avx512, Eigen::bfloat16> : Avx512FloatKernel<Eigen::bfloat16> {};

#if SWITCHMOE_KERNELS_HAS_AVX512BF16

// Panel rows contiguous (op(B) not transposed, op(A) transposed): interleave the k values
// 2s and 2s + 1 of each panel row into a pair.
template <int kPanel>
inline void pack_rows_contiguous_bf16(const std::uint16_t* base, std::ptrdiff_t k_stride, int steps,
                                      std::uint16_t* dst) {
  alignas(64) static constexpr std::uint16_t kInterleave[2][32] = {
      {0, 32, 1, 33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
       8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47},
      {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
       24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63}};
  const __m512i lo_index = _mm512_load_si512(kInterleave[0]);
  const __m512i hi_index = _mm512_load_si512(kInterleave[1]);
  for (int s = 0; s < steps; ++s) {
    const std::uint16_t* even = base + 2 * s * k_stride;
    const std::uint16_t* odd = even + k_stride;
    std::uint16_t* out = dst + static_cast<std::ptrdiff_t>(s) * kPanel * 2;
#pragma GCC unroll 2
    for (int g = 0; g < kPanel; g += 32) {
      const int n = std::min(32, kPanel - g);  // panel rows in this group
      const __mmask32 load_mask = n >= 32 ? ~__mmask32(0) : (__mmask32(1) << n) - 1;
      const __m512i x = _mm512_maskz_loadu_epi16(load_mask, even + g);
      const __m512i y = _mm512_maskz_loadu_epi16(load_mask, odd + g);
      const int lo_pairs = std::min(16, n), hi_pairs = n - lo_pairs;
      _mm512_mask_storeu_epi16(
          out + 2 * g, lo_pairs >= 16 ? ~__mmask32(0) : (__mmask32(1) << (2 * lo_pairs)) - 1,
          _mm512_permutex2var_epi16(x, lo_index, y));
      if (hi_pairs > 0) {
        _mm512_mask_storeu_epi16(
            out + 2 * g + 32, hi_pairs >= 16 ? ~__mmask32(0) : (__mmask32(1) << (2 * hi_pairs)) - 1,
            _mm512_permutex2var_epi16(x, hi_index, y));
      }
    }
  }
}

// bf16 operands with vdpbf16ps: a packed step is a pair of consecutive k values, stored as the
// raw bf16 bits so that one 32-bit broadcast of A and one 512-bit load of B feed the kernel.
struct Avx512DotBf16Kernel : Avx512Tile<14> {
  using Element = Eigen::bfloat16;
  using Packed = std::uint16_t;
  static constexpr int kKPack = 2;
  static constexpr int kKc = 1024;  // k values: 512 pair steps, the float kernel's bytes
  static constexpr int kMc = 10 * kMr;
  static constexpr int kNc = 16 * kNr;

  static Packed pack(Eigen::bfloat16 value) { return Eigen::numext::bit_cast<Packed>(value); }

  template <int kPanel>
  static void pack_full_panel(const OperandView<Eigen::bfloat16>& view, const Eigen::bfloat16* base,
                              int steps, Packed* dst) {
    if (view.k_stride == 1) {  // a k-step is a contiguous pair: transpose 32-bit units
      pack_transposed_32bit<kPanel>(reinterpret_cast<const char*>(base),
                                    view.row_stride * static_cast<std::ptrdiff_t>(sizeof(Packed)),
                                    steps, reinterpret_cast<char*>(dst));
    } else if (view.row_stride == 1) {
      pack_rows_contiguous_bf16<kPanel>(reinterpret_cast<const Packed*>(base), view.k_stride, steps,
                                        dst);
    } else {
      pack_full_panel_portable<Avx512DotBf16Kernel, kPanel>(view, base, steps, dst);
    }
  }

  // As Avx512FloatKernel::pack_edge_panel: k-steps that are contiguous bf16 pairs.
  template <int kPanel>
  static bool pack_edge_panel(const OperandView<Eigen::bfloat16>& view, const Eigen::bfloat16* base,
                              int steps, int valid_rows, Packed* dst) {
    if (view.k_stride != 1) return false;
    pack_transposed_32bit<kPanel>(reinterpret_cast<const char*>(base),
                                  view.row_stride * static_cast<std::ptrdiff_t>(sizeof(Packed)),
                                  steps, reinterpret_cast<char*>(dst), valid_rows);
    return true;
  }

  // Thin row blocks (decode): op(A) rows read in place, a k-step is the pair of bf16 values
  // at 2s and 2s + 1 (the caller guarantees k is even, so no pair runs past the row).
  static constexpr int kThinRows = 8;
  static void run_thin(int steps, const Eigen::bfloat16* a, std::ptrdiff_t lda, int rows,
                       const Packed* b, std::ptrdiff_t panel_stride, int panels, float* c,
                       std::ptrdiff_t ldc, float beta, int cols,
                       const Packed* prefetch_end = nullptr) {
    run_thin_dispatch(
        steps, a, lda, rows, b, panel_stride, 2 * kNr, panels, c, ldc, beta, cols, prefetch_end,
        [](const Eigen::bfloat16* ai, int s) __attribute__((always_inline)) {
          std::int32_t pair;  // op(A)(i, 2s) and op(A)(i, 2s + 1)
          std::memcpy(&pair, ai + 2 * s, sizeof(pair));
          return reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair));
        },
        [](__m512 acc, __m512bh ai, const Packed* bs) __attribute__((always_inline)) {
          return _mm512_dpbf16_ps(acc, ai, reinterpret_cast<__m512bh>(_mm512_load_si512(bs)));
        });
  }

  static void run(int steps, const Packed* a, const Packed* b, float* c, std::ptrdiff_t ldc,
                  float beta, int rows, int cols, const Packed* b_next = nullptr) {
    dispatch_rows(rows, [&](auto rows_used) {
      run_rows<decltype(rows_used)::value>(steps, a, b, c, ldc, beta, rows, cols, b_next);
    });
  }

  // One register-tile height, out of line: with every height inlined into one caller
  // (compute_tile), GCC 12 kept the accumulators on the stack.
  template <int kRowsUsed>
  static __attribute__((noinline)) void run_rows(int steps, const Packed* a, const Packed* b,
                                                 float* c, std::ptrdiff_t ldc, float beta, int rows,
                                                 int cols, const Packed* b_next) {
    run_tile<kRowsUsed>(
        steps, a, 2 * kMr, b, 2 * kNr, c, ldc, beta, rows, cols, b_next,
        [](auto used, __m512(&lo)[kMr], __m512(&hi)[kMr], const Packed* as, const Packed* bs)
            __attribute__((always_inline)) {
              const __m512bh b_lo = reinterpret_cast<__m512bh>(_mm512_load_si512(bs));
              const __m512bh b_hi = reinterpret_cast<__m512bh>(_mm512_load_si512(bs + 32));
#pragma GCC unroll 32
              for (int i = 0; i < decltype(used)::value; ++i) {
                std::int32_t pair;  // op(A)(i, 2s) and op(A)(i, 2s + 1)
                std::memcpy(&pair, as + 2 * i, sizeof(pair));
                const __m512bh ai = reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair));
                lo[i] = _mm512_dpbf16_ps(lo[i], ai, b_lo);
                hi[i] = _mm512_dpbf16_ps(hi[i], ai, b_hi);
              }
            });
  }
};

template <>
struct MicroKernel<isa::Avx512Bf16, Eigen::bfloat16> : Avx512DotBf16Kernel {};

// The tag refines Avx512: float operands use its kernel.
template <>
struct MicroKernel<isa::Avx512Bf16, float> : MicroKernel<isa::Avx512, float> {};

#endif  // SWITCHMOE_KERNELS_HAS_AVX512BF16

}  // namespace switchmoe::kernels::detail

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#endif  // SWITCHMOE_KERNELS_HAS_AVX512
