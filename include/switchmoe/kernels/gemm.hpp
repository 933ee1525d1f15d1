#pragma once
// Batched GEMM of the expert layers: C = op(A) * op(B) + beta * C.
//
// Precision contract: A and B are float or Eigen::bfloat16 (both the same type); C and the
// accumulator are always float32. bf16 products are exact in float32, only the sums round
// (the AVX512_BF16 kernel, like every vdpbf16ps user, flushes float32 denormals to zero).
//
// ISA: the last template parameter, an instruction-set tag defaulted to isa::Native (isa.hpp):
// the best kernel the translation unit is compiled for. Every tag the unit is compiled for is
// callable explicitly, e.g. gemm<float, isa::Portable>(problem); isa::Portable always is.
//
// Sizes: m, n, k are int (a kernel-internal range; callers convert with detail::to_int, which
// throws when a size does not fit); leading dimensions are std::ptrdiff_t, so a caller's strides
// (Eigen::Index) pass unchanged, above 2^31 elements too.
//
// Callbacks (the epilogue of packed_b.hpp) may throw. The exception reaches the caller after the
// parallel region (the one of the lowest tile, in the order problem, row, column), remaining
// tiles are skipped, and C is then unspecified (partially computed); std::bad_alloc from the
// per-thread packing buffers reaches the caller the same way.
//
// Structure (BLIS style): the output of every problem is cut into tiles of up to
// kMaxRowBlocksPerTile x kMc rows by kNc columns; one OpenMP `parallel for schedule(dynamic)`
// runs over the tiles of all problems (the only OpenMP level of the library; a call of a single
// tile runs on the calling thread without a region, see run_tiles). A tile walks k in
// blocks of kKc in increasing order; per k block it packs its B block once (or takes it from a
// PackedB, packed_b.hpp), then for each kMc-row block packs A and runs the kMr x kNr
// micro-kernel over the block. Packing buffers are per thread and reused (workspace.hpp). A
// tile is always computed whole by one thread, so every C element sees the same operation
// sequence whatever the thread count: results are bitwise independent of the number of threads.

#include <omp.h>

#include <Eigen/Core>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "switchmoe/core/parallel.hpp"
#include "switchmoe/kernels/isa.hpp"
#include "switchmoe/kernels/micro_kernel_avx512.hpp"
#include "switchmoe/kernels/micro_kernel_portable.hpp"
#include "switchmoe/kernels/pack.hpp"
#include "switchmoe/kernels/workspace.hpp"

namespace switchmoe::kernels {

enum class Transpose { kNo, kYes };

template <class T>  // T = float or Eigen::bfloat16; output and accumulation always float
struct GemmProblem {
  int m = 0, n = 0, k = 0;
  const T* a = nullptr;  // op(A) is [m, k], row-major storage ([k, m] stored when trans_a)
  std::ptrdiff_t lda = 0;
  Transpose trans_a = Transpose::kNo;
  const T* b = nullptr;  // op(B) is [k, n], row-major storage ([n, k] stored when trans_b)
  std::ptrdiff_t ldb = 0;
  Transpose trans_b = Transpose::kNo;
  float* c = nullptr;  // C is [m, n], row-major; must not overlap A or B
  std::ptrdiff_t ldc = 0;
  float beta = 0.0f;  // C = op(A) * op(B) + beta * C; beta == 0 never reads C
};

namespace detail {

// A size for the kernels' int range (m, n, k): `value` itself, or std::invalid_argument naming
// `name` and the value when it does not fit.
inline int to_int(const char* name, std::int64_t value) {
  if (value < std::numeric_limits<int>::min() || value > std::numeric_limits<int>::max()) {
    throw std::invalid_argument("switchmoe: " + std::string(name) + " = " + std::to_string(value) +
                                ", expected a value that fits in int (at most " +
                                std::to_string(std::numeric_limits<int>::max()) +
                                ", the GEMM kernels' size type)");
  }
  return static_cast<int>(value);
}

inline const char* transpose_name(Transpose t) { return t == Transpose::kNo ? "kNo" : "kYes"; }

[[noreturn]] inline void throw_bad_problem(std::size_t index, const std::string& what) {
  throw std::invalid_argument("switchmoe::kernels::gemm: problem " + std::to_string(index) + ": " +
                              what);
}

// Checks sizes, pointers, leading dimensions and beta; `check_b` is false for a pre-packed B
// (validated by its own caller).
template <class T>
void validate(const GemmProblem<T>& p, std::size_t index, bool check_b = true) {
  auto check_size = [&](const char* name, int value) {
    if (value < 0) {
      throw_bad_problem(index,
                        std::string(name) + " = " + std::to_string(value) + ", expected >= 0");
    }
  };
  check_size("m", p.m);
  check_size("n", p.n);
  check_size("k", p.k);
  // min_ld_name and transpose describe the bound in the message; the strings are built only
  // when a check fails, so valid calls allocate nothing.
  auto check_operand = [&](const char* name, const void* ptr, const char* ld_name,
                           std::ptrdiff_t ld, int min_ld, const char* min_ld_name,
                           const char* transpose, bool used) {
    if (!used) return;
    if (ptr == nullptr) {
      throw_bad_problem(index,
                        std::string(name) +
                            " is nullptr, expected a valid pointer for m = " + std::to_string(p.m) +
                            ", n = " + std::to_string(p.n) + ", k = " + std::to_string(p.k));
    }
    if (ld < min_ld) {
      throw_bad_problem(index, std::string(ld_name) + " = " + std::to_string(ld) +
                                   ", expected >= " + min_ld_name + transpose + " = " +
                                   std::to_string(min_ld));
    }
  };
  const bool ta = p.trans_a == Transpose::kYes;
  const bool tb = p.trans_b == Transpose::kYes;
  check_operand("a", p.a, "lda", p.lda, ta ? p.m : p.k, ta ? "m" : "k",
                ta ? " (trans_a = kYes)" : " (trans_a = kNo)", p.m > 0 && p.n > 0 && p.k > 0);
  check_operand("b", p.b, "ldb", p.ldb, tb ? p.k : p.n, tb ? "k" : "n",
                tb ? " (trans_b = kYes)" : " (trans_b = kNo)",
                check_b && p.m > 0 && p.n > 0 && p.k > 0);
  check_operand("c", p.c, "ldc", p.ldc, p.n, "n", "", p.m > 0 && p.n > 0);
  if (!std::isfinite(p.beta)) {
    throw_bad_problem(index, "beta = " + std::to_string(p.beta) + ", expected a finite value");
  }
}

template <class T>
OperandView<T> view_a(const GemmProblem<T>& p) {
  return p.trans_a == Transpose::kNo ? OperandView<T>{p.a, p.lda, 1}
                                     : OperandView<T>{p.a, 1, p.lda};
}

template <class T>
OperandView<T> view_b(const GemmProblem<T>& p) {
  return p.trans_b == Transpose::kNo ? OperandView<T>{p.b, 1, p.ldb}
                                     : OperandView<T>{p.b, p.ldb, 1};
}

// Number of packed k-steps of a block of kc values of k.
template <class Kernel>
constexpr int packed_steps(int kc) {
  return (kc + Kernel::kKPack - 1) / Kernel::kKPack;
}

// Elements of one packed B panel (kNr columns) of a block of kc values of k.
template <class Kernel>
constexpr std::ptrdiff_t b_panel_elements(int kc) {
  return static_cast<std::ptrdiff_t>(packed_steps<Kernel>(kc)) * Kernel::kNr * Kernel::kKPack;
}

// k-steps per chunk when pack_panels packs panel rows contiguous in memory: 16 source rows of
// a 140-row block (kMc) are 9 KB (float), so a chunk stays in L1 while all panels take it.
inline constexpr int kPackChunkSteps = 16;

// Kernels that pack edge panels (fewer than kPanel valid rows) themselves define
// pack_edge_panel (micro_kernel_avx512.hpp).
template <class Kernel, class = void>
inline constexpr bool kHasEdgePacker = false;
template <class Kernel>
inline constexpr bool
    kHasEdgePacker<Kernel, std::void_t<decltype(&Kernel::template pack_edge_panel<Kernel::kMr>)>> =
        true;

// Packs rows [r0, r0 + rows) x k values [p0, p0 + kc) of `view` into panels of `kPanel` rows
// (the layout documented in pack.hpp); partial panels and k-steps are padded
// with zeros. Shared by A (kPanel = kMr) and B (kPanel = kNr).
template <class Kernel, int kPanel, class S>
void pack_panels(const OperandView<S>& view, int r0, int rows, int p0, int kc,
                 typename Kernel::Packed* dst) {
  using Packed = typename Kernel::Packed;
  using Element = typename Kernel::Element;
  constexpr int kKPack = Kernel::kKPack;
  const int steps = packed_steps<Kernel>(kc);
  const int full_steps = kc / kKPack;  // k-steps with kKPack valid k values
  const std::ptrdiff_t panel_size = static_cast<std::ptrdiff_t>(steps) * kPanel * kKPack;
  // Full panels with full k-steps go to the kernel's packer. The layout of a panel's first s
  // k-steps does not depend on the steps after them, so a packer call may cover any run of
  // steps: an odd kc (bf16 pairs) packs all but its last step there, and when panel rows are
  // contiguous in memory (A transposed, as in weight gradients: a k value's row holds the
  // panel rows of every panel) the steps are cut into chunks, each packed for all panels
  // before the next, so that each source row is read from L1 once rather than from L2 once per
  // panel.
  int packed_panels = 0;  // full panels whose first full_steps k-steps are packed
  if constexpr (std::is_same_v<S, Element>) {
    packed_panels = full_steps > 0 ? rows / kPanel : 0;
    const int chunk = view.row_stride == 1 ? kPackChunkSteps : std::max(1, full_steps);
    for (int s0 = 0; s0 < full_steps; s0 += chunk) {
      const int n = std::min(chunk, full_steps - s0);
      for (int q = 0; q < packed_panels; ++q) {
        Kernel::template pack_full_panel<kPanel>(
            view,
            view.data + (r0 + q * kPanel) * view.row_stride +
                (p0 + static_cast<std::ptrdiff_t>(s0) * kKPack) * view.k_stride,
            n, dst + q * panel_size + static_cast<std::ptrdiff_t>(s0) * kPanel * kKPack);
      }
    }
  }
  for (int q0 = 0; q0 < rows; q0 += kPanel) {
    const int valid_rows = std::min(kPanel, rows - q0);
    const S* base = view.data + (r0 + q0) * view.row_stride + p0 * view.k_stride;
    int s0 = q0 / kPanel < packed_panels ? full_steps : 0;  // first step left to pack
    // An edge panel's full k-steps go to the kernel's edge packer where it has one for this
    // layout (the tile path's row tiles of compute_tile are mostly edge panels).
    if constexpr (std::is_same_v<S, Element> && kHasEdgePacker<Kernel>) {
      if (valid_rows < kPanel && full_steps > 0 &&
          Kernel::template pack_edge_panel<kPanel>(view, base, full_steps, valid_rows, dst)) {
        s0 = full_steps;
      }
    }
    // Edge panels (fewer rows), the last odd k-step, and sources of another type (a float
    // master matrix packed for bf16): S -> Element is an explicit rounding conversion (Eigen's
    // round-to-nearest-even for bf16). Rows and k values past the end are zeros.
    for (int s = s0; s < steps; ++s) {
      Packed* out = dst + static_cast<std::ptrdiff_t>(s) * kPanel * kKPack;
      std::fill(out + valid_rows * kKPack, out + kPanel * kKPack, Packed(0));
      for (int q = 0; q < kKPack; ++q) {
        const int kk = s * kKPack + q;
        if (kk >= kc) {
          for (int r = 0; r < valid_rows; ++r) out[r * kKPack + q] = Packed(0);
          continue;
        }
        const S* src = base + kk * view.k_stride;
        for (int r = 0; r < valid_rows; ++r) {
          out[r * kKPack + q] = Kernel::pack(static_cast<Element>(src[r * view.row_stride]));
        }
      }
    }
    dst += panel_size;
  }
}

// Asks for rows [0, rows) x columns [0, cols) of C (rows ldc apart) in L2, for writing: the C
// block of the next micro-tile, while the current one runs its k loop. Weight gradients
// (C += A^T B over one expert's rows) have a short k loop and a C that is out of cache (the
// gradients of all experts do not fit in L2), so the kernel's own prefetch at the start of a
// tile comes too late. A hint only: it changes no result.
inline void prefetch_rows(const float* c, std::ptrdiff_t ldc, int rows, int cols) {
  for (int i = 0; i < rows; ++i) {
    const char* ci = reinterpret_cast<const char*>(c + i * ldc);
    for (int b = 0; b < cols * static_cast<int>(sizeof(float)); b += 64) {
      __builtin_prefetch(ci + b, 1, 2);
    }
  }
}

// Whether compute_tile splits a row block into row tiles of nearly equal height rather than
// full kMr-row tiles and a remainder. A switch for same-process A/B benchmarks
// (RESULTS_issue15.md, round 4): set it only between calls; it changes the speed, never a
// result.
inline std::atomic<bool>& balanced_row_tiles() {
  static std::atomic<bool> on{true};
  return on;
}

// The row tiles of a block of `rows` rows: `count` tiles, the first `taller` of them base + 1
// rows high and the rest `base`. Balanced (op(A) not transposed): as even as kMr allows, so
// that every micro-kernel call runs nearly full (64 rows: 4 x 13 + 12 rather than 4 x 14 + 8,
// 61 rows: 13 + 4 x 12 rather than 4 x 14 + 5, which ran as 8 rows). Otherwise kMr-row tiles
// and the remainder: op(A) transposed (weight gradients) is packed for all panels at once,
// k-chunk by chunk (pack_panels), which needs whole kMr-row panels. Every C element is one
// accumulator chain of one micro-kernel call whatever the tile heights (zero, one fma per
// k-step in increasing k, then acc + beta * C), so results do not depend on the split.
struct RowTiles {
  int rows, count, base, taller;
  int offset(int t) const { return t * base + std::min(t, taller); }
  int height(int t) const { return std::min(base + (t < taller ? 1 : 0), rows - offset(t)); }
};

template <int kMr>
RowTiles row_tiles(int rows, bool balanced) {
  const int count = (rows + kMr - 1) / kMr;
  if (!balanced) return RowTiles{rows, count, kMr, 0};  // the last tile is the remainder
  return RowTiles{rows, count, rows / count, rows % count};
}

// A packed B block as compute_tile reads it: the tile's panels, and the end of the buffer that
// holds them (the panels after the tile's, possibly of the next k block, lie before it). The
// kernels prefetch the panel after the current one only when a panel of the current size fits
// before `end`, so no prefetch address is ever formed past the buffer.
template <class Packed>
struct PackedBlock {
  const Packed* panels;
  const Packed* end;
};

// One output tile: rows [i0, i0 + rows) and columns [j0, j0 + nc) of C over the whole k range.
// For each k block (in increasing k), the B block is packed once and reused by every
// kMc-row block of the tile; `b_panels(p0, kc, j0, nc)` returns that packed B block (a
// PackedBlock).
// When the last k block of a kMc-row block is done, `finish(i, rows, j0, nc)` runs on that block
// of C (rows [i, i + rows), columns [j0, j0 + nc)) while it is still in cache.
template <class Kernel, class T, class BPanels, class Finish>
void compute_tile(const GemmProblem<T>& p, int i0, int rows, int j0, int nc,
                  typename Kernel::Packed* a_pack, const BPanels& b_panels, const Finish& finish) {
  using Packed = typename Kernel::Packed;
  const OperandView<T> a = view_a(p);
  const bool balanced =
      p.trans_a == Transpose::kNo && balanced_row_tiles().load(std::memory_order_relaxed);
  for (int p0 = 0; p0 < p.k; p0 += Kernel::kKc) {
    const int kc = std::min(Kernel::kKc, p.k - p0);
    const int steps = packed_steps<Kernel>(kc);
    const std::ptrdiff_t a_panel =
        static_cast<std::ptrdiff_t>(steps) * Kernel::kMr * Kernel::kKPack;
    const std::ptrdiff_t b_panel = b_panel_elements<Kernel>(kc);
    const PackedBlock<Packed> b_block = b_panels(p0, kc, j0, nc);
    const Packed* b_pack = b_block.panels;
    const float beta = p0 == 0 ? p.beta : 1.0f;  // later k blocks accumulate
    for (int ic = 0; ic < rows; ic += Kernel::kMc) {
      const int mc = std::min(Kernel::kMc, rows - ic);
      const RowTiles tiles = row_tiles<Kernel::kMr>(mc, balanced);
      if (balanced) {  // one panel per row tile, each of its own height
        for (int t = 0; t < tiles.count; ++t) {
          pack_panels<Kernel, Kernel::kMr>(a, i0 + ic + tiles.offset(t), tiles.height(t), p0, kc,
                                           a_pack + t * a_panel);
        }
      } else {
        pack_panels<Kernel, Kernel::kMr>(a, i0 + ic, mc, p0, kc, a_pack);
      }
      // The B micro-panel (kc x kNr) is read by every row tile of the block from L2, as the A
      // block is. The first row tile of each micro-panel prefetches the next one (contiguous
      // in both packed layouts), which hides memory latency when thin experts stream their
      // weights, but only when a whole panel of the current size follows before the buffer's
      // end: not after the buffer's last panel, nor before a last k block shorter than the
      // current one.
      for (int jr = 0; jr < nc; jr += Kernel::kNr) {
        const Packed* bj = b_pack + (jr / Kernel::kNr) * b_panel;
        const Packed* b_next = b_block.end - bj >= 2 * b_panel ? bj + b_panel : nullptr;
        const int cols = std::min(Kernel::kNr, nc - jr);
        for (int t = 0; t < tiles.count; ++t) {
          const int ir = tiles.offset(t), height = tiles.height(t);
          float* cij = p.c + static_cast<std::ptrdiff_t>(i0 + ic + ir) * p.ldc + (j0 + jr);
          if (t + 1 < tiles.count) {
            prefetch_rows(cij + height * p.ldc, p.ldc, tiles.height(t + 1), cols);
          }
          Kernel::run(steps, a_pack + t * a_panel, bj, cij, p.ldc, beta, height, cols,
                      t == 0 ? b_next : nullptr);
        }
      }
      if (p0 + kc == p.k) finish(i0 + ic, mc, j0, nc);
    }
  }
}

// C = beta * C for k == 0 (beta == 0 writes zeros without reading C).
inline void scale_output(float* c, std::ptrdiff_t ldc, int m, int n, float beta) {
  for (int i = 0; i < m; ++i) {
    float* ci = c + i * ldc;
    if (beta == 0.0f) {
      std::fill(ci, ci + n, 0.0f);
    } else if (beta != 1.0f) {
      for (int j = 0; j < n; ++j) ci[j] *= beta;
    }
  }
}

// A unit of parallel work: rows [i0, i0 + rows) x columns [j0, j0 + cols) of one problem.
struct Tile {
  int problem;
  int i0;
  int rows;
  int j0;
  int cols;
};

template <class Kernel>
constexpr std::size_t a_block_elements() {
  return static_cast<std::size_t>(Kernel::kMc) * packed_steps<Kernel>(Kernel::kKc) * Kernel::kKPack;
}

template <class Kernel>
constexpr std::size_t b_block_elements() {
  return static_cast<std::size_t>(Kernel::kNc) * packed_steps<Kernel>(Kernel::kKc) * Kernel::kKPack;
}

// Tiles span up to this many kMc-row blocks, so that a packed B block serves more rows when
// there is enough work to keep every thread busy anyway.
inline constexpr int kMaxRowBlocksPerTile = 4;
// Aim for at least this many tiles per thread (dynamic scheduling evens out the rest).
inline constexpr int kTilesPerThread = 6;

// Cuts every problem into tiles. Tile shapes may depend on the thread count: they change which
// thread computes an element, never the order of its operations (k blocks always run in
// increasing order inside one tile), so results stay bitwise identical.
//
// With B packed inside the tile (`b_prepacked` false), a tile spans kNc columns and up to
// kMaxRowBlocksPerTile row blocks, so that one packed B block serves many rows. With a
// pre-packed B nothing is packed per tile except A, so tiles are one row block high and as wide
// as the thread count allows (all n when there are enough row blocks): each packed A block
// then serves every column.
//
// A problem with k == 0 is one tile (C = beta * C, then the epilogue). Tiles are listed in the
// order (problem, row, column), the order in which their exceptions take precedence.
template <class Kernel, class T>
void make_tiles(const GemmProblem<T>* problems, std::size_t count, int threads, bool b_prepacked,
                std::vector<Tile>& tiles) {
  const bool balanced = balanced_row_tiles().load(std::memory_order_relaxed);
  long long row_blocks = 0;  // kMc-row blocks of all problems
  long long blocks = 0;      // kMc x kNc blocks of all problems
  long long scale_only = 0;  // problems with k == 0
  for (std::size_t i = 0; i < count; ++i) {
    const GemmProblem<T>& p = problems[i];
    if (p.m == 0 || p.n == 0) continue;
    if (p.k == 0) {
      ++scale_only;
      continue;
    }
    const long long rb = (p.m + Kernel::kMc - 1) / Kernel::kMc;
    row_blocks += rb;
    blocks += rb * ((p.n + Kernel::kNc - 1) / Kernel::kNc);
  }
  // One thread balances nothing: tiles as large as the blocking allows, so that a packed A
  // block serves every column and a packed B block every row block of the tile.
  const long long wanted_tiles =
      threads == 1 ? 1 : static_cast<long long>(kTilesPerThread) * threads;
  const int blocks_per_tile =
      b_prepacked ? 1
                  : static_cast<int>(std::clamp<long long>(blocks / std::max(1LL, wanted_tiles), 1,
                                                           kMaxRowBlocksPerTile));
  const int max_tile_rows = blocks_per_tile * Kernel::kMc;  // a multiple of kMr
  const long long column_splits =
      (wanted_tiles + std::max(1LL, row_blocks) - 1) / std::max(1LL, row_blocks);
  // An upper bound of the tiles below; growing with slack lets the tile list settle after a few
  // calls whose row counts vary, so that steady-state calls allocate nothing.
  const std::size_t most_tiles =
      static_cast<std::size_t>((b_prepacked ? row_blocks * column_splits : blocks) + scale_only);
  if (tiles.capacity() < most_tiles) tiles.reserve(most_tiles + most_tiles / 2);
  for (std::size_t i = 0; i < count; ++i) {
    const GemmProblem<T>& p = problems[i];
    if (p.m == 0 || p.n == 0) continue;
    if (p.k == 0) {  // nothing to multiply: one tile for C = beta * C and the epilogue
      tiles.push_back(Tile{static_cast<int>(i), 0, p.m, 0, p.n});
      continue;
    }
    // Even row tiles rather than full tiles and a thin rest: 256 rows as 128 + 128. Rounded up
    // to the register tile where compute_tile uses kMr-row tiles (op(A) transposed, or without
    // balanced_row_tiles; 256 rows as 140 + 116 then), so that only the last one has a
    // remainder.
    const int row_tiles = (p.m + max_tile_rows - 1) / max_tile_rows;
    const int even_rows = (p.m + row_tiles - 1) / row_tiles;
    const int tile_rows = balanced && p.trans_a == Transpose::kNo
                              ? even_rows
                              : (even_rows + Kernel::kMr - 1) / Kernel::kMr * Kernel::kMr;
    int tile_cols = Kernel::kNc;
    if (b_prepacked) {  // n split evenly into column_splits parts, in whole kNr panels
      const int panels = (p.n + Kernel::kNr - 1) / Kernel::kNr;
      const int splits = static_cast<int>(std::min<long long>(column_splits, panels));
      tile_cols = (panels + splits - 1) / splits * Kernel::kNr;
    }
    for (int i0 = 0; i0 < p.m; i0 += tile_rows) {
      for (int j0 = 0; j0 < p.n; j0 += tile_cols) {
        tiles.push_back(Tile{static_cast<int>(i), i0, std::min(tile_rows, p.m - i0), j0,
                             std::min(tile_cols, p.n - j0)});
      }
    }
  }
}

// The packed A block and B scratch block of the calling thread, grown on first use (may throw
// std::bad_alloc).
template <class Kernel>
std::pair<typename Kernel::Packed*, typename Kernel::Packed*> thread_pack_buffers() {
  using Packed = typename Kernel::Packed;
  Workspace& ws = thread_workspace();
  auto* a_pack = static_cast<Packed*>(ws.a.reserve(a_block_elements<Kernel>() * sizeof(Packed)));
  auto* b_scratch = static_cast<Packed*>(ws.b.reserve(b_block_elements<Kernel>() * sizeof(Packed)));
  return {a_pack, b_scratch};
}

// The largest team whose threads have all grown their packing buffers in run_tiles, for
// regions opened by the calling thread (OpenMP keeps a thread's pool of workers between its
// regions).
// One record per kernel, since the buffers' sizes depend on the kernel.
template <class Kernel>
int& reserved_team_size() {
  thread_local int size = 0;
  return size;
}

// Runs `tiles` in one OpenMP loop; `b_panels_for(problem_index, b_scratch)` returns the
// B-block provider of a problem (packing into the thread's scratch, or a pre-packed B).
// Exceptions (the epilogue's, std::bad_alloc from a worker's buffers) are caught per tile; the
// one of the lowest tile index is rethrown after the region (core/parallel.hpp).
template <class Kernel, class T, class BPanelsFor, class Epilogue>
void run_tiles(const GemmProblem<T>* problems, const std::vector<Tile>& tiles,
               const BPanelsFor& b_panels_for, const Epilogue& epilogue) {
  const int count = static_cast<int>(tiles.size());
  // The calling thread's buffers are grown here, where a failure simply propagates. Every other
  // thread of the team grows its own at the start of the region, tile or no tile: with dynamic
  // scheduling, a thread that got no tile in a warm-up call would otherwise allocate in a later
  // call (steady-state calls allocate nothing). A failure there is kept like a tile's, at an
  // index below every tile.
  thread_pack_buffers<Kernel>();
  switchmoe::detail::LoopExceptions exceptions;
  const auto run_tile = [&](int t) {
    exceptions.run(t, [&] {
      const Tile tile = tiles[t];
      const GemmProblem<T>& p = problems[tile.problem];
      if (p.k == 0) {
        scale_output(p.c, p.ldc, p.m, p.n, p.beta);
        epilogue(tile.problem, 0, p.m, 0, p.n);
        return;
      }
      const auto [a_pack, b_scratch] = thread_pack_buffers<Kernel>();
      compute_tile<Kernel>(
          p, tile.i0, tile.rows, tile.j0, tile.cols, a_pack, b_panels_for(tile.problem, b_scratch),
          [&](int i, int rows, int j0, int cols) { epilogue(tile.problem, i, rows, j0, cols); });
    });
  };
  // One tile (the router's product at a few tokens) runs on the calling thread without opening
  // a region, not even a one-thread one: a region would only add a fork and a barrier (issue
  // 15). A tile's operations do not depend on the thread that runs it, so this never changes a
  // result. The region is opened anyway until a team of this size has grown its buffers
  // (reserved_team_size), for the reason above.
  const int team = omp_in_parallel() ? 1 : omp_get_max_threads();
  int& reserved = reserved_team_size<Kernel>();
  if (count == 1 && team <= reserved) {
    run_tile(0);
    exceptions.rethrow_if_failed();
    return;
  }
  int ran = 0;  // the size of the team that ran the region
#pragma omp parallel
  {
    exceptions.run(-1, [] { thread_pack_buffers<Kernel>(); });
#pragma omp master
    ran = omp_get_num_threads();
#pragma omp for schedule(dynamic, 1)
    for (int t = 0; t < count; ++t) run_tile(t);
  }
  exceptions.rethrow_if_failed();
  reserved = std::max(reserved, ran);
}

// The tile list of the calling thread, reused across calls.
inline std::vector<Tile>& thread_tiles() {
  thread_local std::vector<Tile> tiles;
  tiles.clear();
  return tiles;
}

// Cuts the problems into tiles and runs them; `b_panels_for` as in run_tiles.
template <class Kernel, class T, class BPanelsFor, class Epilogue>
void run_problems(const GemmProblem<T>* problems, std::size_t count, bool b_prepacked,
                  const BPanelsFor& b_panels_for, const Epilogue& epilogue) {
  std::vector<Tile>& tiles = thread_tiles();
  make_tiles<Kernel>(problems, count, omp_in_parallel() ? 1 : omp_get_max_threads(), b_prepacked,
                     tiles);
  if (!tiles.empty()) run_tiles<Kernel>(problems, tiles, b_panels_for, epilogue);
}

// The epilogue of plain gemm calls.
struct NoEpilogue {
  void operator()(int, int, int, int, int) const {}
};

template <class T, class Isa>
void gemm_problems(const GemmProblem<T>* problems, std::size_t count) {
  static_assert(kIsGemmElement<T>,
                "switchmoe::kernels::gemm supports float and Eigen::bfloat16 operands only.");
  using Kernel = MicroKernel<Isa, T>;
  using Packed = typename Kernel::Packed;
  for (std::size_t i = 0; i < count; ++i) validate(problems[i], i);
  run_problems<Kernel>(
      problems, count, false,
      [problems](int index, Packed* scratch) {
        const OperandView<T> b = view_b(problems[index]);
        return [b, scratch](int p0, int kc, int j0, int nc) {
          pack_panels<Kernel, Kernel::kNr>(b, j0, nc, p0, kc, scratch);
          // The scratch holds this block's panels only: what follows them is stale.
          const int panels = (nc + Kernel::kNr - 1) / Kernel::kNr;
          return PackedBlock<Packed>{scratch, scratch + panels * b_panel_elements<Kernel>(kc)};
        };
      },
      NoEpilogue());
}

}  // namespace detail

// Runs every problem; the only OpenMP level of the library lives here (parallel over tiles of
// all problems). Call it from outside any parallel region to use all threads (inside one it
// runs on the calling thread). Results are bitwise independent of the thread count.
// Throws std::invalid_argument naming the problem and argument on a negative size, a nullptr
// operand of nonzero size, a leading dimension too small, or a non-finite beta.
template <class T, class Isa = isa::Native>
void gemm_batch(const std::vector<GemmProblem<T>>& problems) {
  detail::gemm_problems<T, Isa>(problems.data(), problems.size());
}

template <class T, class Isa = isa::Native>
void gemm(const GemmProblem<T>& p) {
  detail::gemm_problems<T, Isa>(&p, 1);
}

}  // namespace switchmoe::kernels
