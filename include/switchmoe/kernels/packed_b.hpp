#pragma once
// A GEMM right-hand operand packed once into the micro-kernel's panel layout, for weights that
// serve many GEMMs between two updates (inference, or several forward calls per step).
//
// PackedB<T, Isa> holds op(B) [k, n] as T (bf16 weights: rounded from the float32 master with
// static_cast, round to nearest even, exactly like a bf16 compute copy). A GEMM on a PackedB
// gives results bitwise identical to gemm() on the same T values: same packing, same kernel,
// same k order; it only skips packing B inside every call.

#include <omp.h>

#include <Eigen/Core>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "switchmoe/kernels/gemm.hpp"
#include "switchmoe/kernels/workspace.hpp"

namespace switchmoe::kernels {

namespace detail {

// Whether PackedB asks for huge pages (AlignedBuffer::reserve). A switch for same-process A/B
// benchmarks (RESULTS_issue15.md, round 3): it applies to buffers grown after it is set; it
// never changes a result.
inline std::atomic<bool>& packed_huge_pages() {
  static std::atomic<bool> on{true};
  return on;
}

}  // namespace detail

template <class T, class Isa = isa::Native>
class PackedB {
  static_assert(detail::kIsGemmElement<T>,
                "switchmoe::kernels::PackedB supports float and Eigen::bfloat16 elements only.");

 public:
  using Element = T;
  using IsaType = Isa;
  using Kernel = detail::MicroKernel<Isa, T>;
  using Packed = typename Kernel::Packed;

  PackedB() = default;
  // See pack().
  template <class S>
  PackedB(const S* b, std::ptrdiff_t ldb, Transpose trans_b, int k, int n) {
    pack(b, ldb, trans_b, k, n);
  }

  // Packs op(B) [k, n], stored row-major in `b` with leading dimension ldb ([k, n] stored, or
  // [n, k] when trans_b). S is T or float (a float32 master converted to T while packing).
  // Reuses the storage of an earlier pack of the same or a larger size. Parallel over blocks.
  // Throws std::invalid_argument on bad arguments and std::bad_alloc when growing fails; the
  // object is then unchanged.
  template <class S>
  void pack(const S* b, std::ptrdiff_t ldb, Transpose trans_b, int k, int n) {
    static_assert(std::is_same_v<S, T> || std::is_same_v<S, float>,
                  "PackedB::pack takes the element type itself or a float32 master matrix.");
    check(b, ldb, trans_b, k, n);
    const int panels = (n + Kernel::kNr - 1) / Kernel::kNr;
    const int blocks = (k + Kernel::kKc - 1) / Kernel::kKc;
    const std::size_t bytes =
        static_cast<std::size_t>(blocks) * block_stride(panels) * sizeof(Packed);
    // Grown before the parallel region, and before any member changes.
    data_ = static_cast<Packed*>(
        storage_.reserve(std::max<std::size_t>(bytes, 1), detail::packed_huge_pages()));
    k_ = k;
    n_ = n;
    panels_ = panels;
    if (k == 0 || n == 0) return;
    const detail::OperandView<S> view = trans_b == Transpose::kNo
                                            ? detail::OperandView<S>{b, 1, ldb}
                                            : detail::OperandView<S>{b, ldb, 1};
    // One task per (k block, kNc column block): the layout does not depend on the split.
    const int column_blocks = (n + Kernel::kNc - 1) / Kernel::kNc;
    const int tasks = blocks * column_blocks;
    // Packing itself does not throw today; the guard keeps a future conversion that does from
    // ending the program inside the region (the contents are then unspecified).
    switchmoe::detail::LoopExceptions exceptions;
#pragma omp parallel for schedule(dynamic, 1)
    for (int t = 0; t < tasks; ++t) {
      exceptions.run(t, [&] {
        const int p0 = (t / column_blocks) * Kernel::kKc;
        const int j0 = (t % column_blocks) * Kernel::kNc;
        const int kc = std::min(Kernel::kKc, k - p0);
        detail::pack_panels<Kernel, Kernel::kNr>(view, j0, std::min(Kernel::kNc, n - j0), p0, kc,
                                                 block(p0, j0));
      });
    }
    exceptions.rethrow_if_failed();
  }

  int k() const { return k_; }
  int n() const { return n_; }

  // The packed panels of the k block starting at p0 (a multiple of kKc), from column j0 (a
  // multiple of kNr) on.
  const Packed* block(int p0, int j0) const { return data_ + offset(p0, j0); }
  // The end of the packed panels (the last k block's last panel ends here): the kernels'
  // prefetch of the panels that follow the current ones stays before it.
  const Packed* end() const {
    return k_ == 0 || n_ == 0
               ? data_
               : data_ + offset((k_ - 1) / Kernel::kKc * Kernel::kKc, panels_ * Kernel::kNr);
  }

 private:
  Packed* block(int p0, int j0) { return data_ + offset(p0, j0); }

  std::size_t offset(int p0, int j0) const {
    const int kc = std::min(Kernel::kKc, k_ - p0);
    return static_cast<std::size_t>(p0 / Kernel::kKc) * block_stride() +
           static_cast<std::size_t>(j0 / Kernel::kNr * detail::b_panel_elements<Kernel>(kc));
  }
  // Elements of one full k block (all column panels).
  std::size_t block_stride() const { return block_stride(panels_); }
  static std::size_t block_stride(int panels) {
    return static_cast<std::size_t>(panels * detail::b_panel_elements<Kernel>(Kernel::kKc));
  }

  template <class S>
  static void check(const S* b, std::ptrdiff_t ldb, Transpose trans_b, int k, int n) {
    auto fail = [](const std::string& what) {
      throw std::invalid_argument("switchmoe::kernels::PackedB::pack: " + what);
    };
    if (k < 0) fail("k = " + std::to_string(k) + ", expected >= 0");
    if (n < 0) fail("n = " + std::to_string(n) + ", expected >= 0");
    if (k == 0 || n == 0) return;
    if (b == nullptr)
      fail("b is nullptr, expected a valid pointer for k = " + std::to_string(k) +
           ", n = " + std::to_string(n));
    const bool tb = trans_b == Transpose::kYes;
    if (ldb < (tb ? k : n)) {
      fail("ldb = " + std::to_string(ldb) + ", expected >= " + (tb ? "k" : "n") +
           " (trans_b = " + detail::transpose_name(trans_b) + ") = " + std::to_string(tb ? k : n));
    }
  }

  int k_ = 0, n_ = 0, panels_ = 0;
  Packed* data_ = nullptr;
  detail::AlignedBuffer storage_;
};

// C = op(A) * B + beta * C with a pre-packed B: op(A) is [m, b->k()], C is [m, b->n()].
template <class T, class Isa = isa::Native>
struct PackedGemmProblem {
  int m = 0;
  const T* a = nullptr;  // op(A) [m, k], row-major storage ([k, m] stored when trans_a)
  std::ptrdiff_t lda = 0;
  Transpose trans_a = Transpose::kNo;
  const PackedB<T, Isa>* b = nullptr;
  float* c = nullptr;  // C [m, n], row-major; must not overlap A
  std::ptrdiff_t ldc = 0;
  float beta = 0.0f;  // beta == 0 never reads C
};

namespace detail {

// Kernels with a thin-row (decode) path define kThinRows and run_thin (micro_kernel_avx512.hpp).
template <class Kernel, class = void>
inline constexpr bool kHasThinRows = false;
template <class Kernel>
inline constexpr bool kHasThinRows<Kernel, std::void_t<decltype(Kernel::kThinRows)>> = true;

// The most rows of op(A) a problem of a thin call may have: two row groups of the kernel's.
template <class Kernel>
inline constexpr int kMaxThinRows = 2 * Kernel::kThinRows;

// A call takes the thin path when every problem with work is thin: few rows (decode, or many
// experts with a few tokens each), op(A) row-major, k > 0, and whole k-steps (bf16 pairs).
// Which path runs never changes a result (run_thin_problems), so this is only about speed.
//
// `threads` is the call's thread count. With one thread (a call inside a parallel region, as
// in the experts' whole-FFN schedule) nothing is gained by splitting columns without a
// barrier, and a second row group re-reads every weight panel from L2 while the tile path's
// 14-row tile reads it once: measured (RESULTS_issue15.md, round 3, weights from memory), the
// tile path was faster in 16 of 24 A/Bs at 10-16 rows (in all 8 at 12 and 14 rows, by up to
// 40%), so one-thread calls take the thin path only for up to one row group.
template <class Kernel, class T>
bool thin_call(const GemmProblem<T>* problems, std::size_t count, int threads) {
  const int max_rows = threads == 1 ? Kernel::kThinRows : kMaxThinRows<Kernel>;
  bool any = false;
  for (std::size_t i = 0; i < count; ++i) {
    const GemmProblem<T>& p = problems[i];
    if (p.m == 0 || p.n == 0) continue;
    if (p.m > max_rows || p.k == 0 || p.trans_a != Transpose::kNo || p.k % Kernel::kKPack != 0) {
      return false;
    }
    any = true;
  }
  return any;
}

// A unit of the thin schedule: column panels [q0, q1) of one problem, all its rows and k.
struct ThinUnit {
  int problem;
  int q0;
  int q1;
};

// Column panels per chunk of the thin schedule (see run_thin_problems).
inline constexpr int kThinChunkPanels = 8;

// Whether the thin schedule's first row group prefetches the next weight panels (run_thin).
// A hook for same-process A/B benchmarks (RESULTS_issue15.md, round 3): set it only between
// calls; it changes the speed, never a result.
inline std::atomic<bool>& thin_prefetch() {
  static std::atomic<bool> on{true};
  return on;
}

inline std::vector<ThinUnit>& thread_thin_units() {
  thread_local std::vector<ThinUnit> units;
  return units;
}

// The thin-row schedule: every problem's columns are cut into units of whole B panels, and
// one dynamic OpenMP loop runs the units of all problems, so both threads stream the weights
// of one expert (split by columns) and move on to the next expert without a barrier. Each unit
// reads its rows of op(A) in place (nothing is packed), walks k in blocks of kKc in increasing
// order and, per block, runs the thin kernel over its panels with C = acc + beta * C (beta of
// the problem for the first block, 1 after): per C element exactly the operations of
// compute_tile and Kernel::run, so the results are bitwise those of the tile path, for any
// thread count and unit split. Epilogues run once per unit, on all rows of its columns.
// Problems [second_stage, count) are a second stage (the experts' down product, whose A is what
// the first stage's epilogue writes): it starts once every unit of the first stage and its
// epilogue have finished, behind the barrier of the first loop, in the same region, so a decode
// call opens one region for both products (issue 15).
template <class Kernel, class T, class Isa, class Epilogue>
void run_thin_problems(const GemmProblem<T>* problems, std::size_t count,
                       const PackedGemmProblem<T, Isa>* packed, const Epilogue& epilogue,
                       std::size_t second_stage) {
  constexpr int kNr = Kernel::kNr;
  const int threads = omp_in_parallel() ? 1 : omp_get_max_threads();
  std::vector<ThinUnit>& units = thread_thin_units();  // the calling thread's, reused
  units.clear();
  const auto add_units = [&](std::size_t begin, std::size_t end) {
    double work = 0.0;  // panels x k of the stage's problems
    for (std::size_t i = begin; i < end; ++i) {
      const GemmProblem<T>& p = problems[i];
      if (p.m > 0 && p.n > 0) work += static_cast<double>((p.n + kNr - 1) / kNr) * p.k;
    }
    // About kTilesPerThread units per thread: dynamic scheduling evens out a loaded machine.
    const double unit_work = work / (static_cast<double>(kTilesPerThread) * threads);
    for (std::size_t i = begin; i < end; ++i) {
      const GemmProblem<T>& p = problems[i];
      if (p.m == 0 || p.n == 0) continue;
      const int panels = (p.n + kNr - 1) / kNr;
      const int splits =
          threads == 1
              ? 1
              : static_cast<int>(std::clamp<double>(
                    std::round(panels * static_cast<double>(p.k) / std::max(unit_work, 1.0)), 1.0,
                    panels));
      const int per_unit = (panels + splits - 1) / splits;
      for (int q0 = 0; q0 < panels; q0 += per_unit) {
        units.push_back(ThinUnit{static_cast<int>(i), q0, std::min(panels, q0 + per_unit)});
      }
    }
  };
  add_units(0, second_stage);
  const int first_stage_units = static_cast<int>(units.size());
  add_units(second_stage, count);
  const int unit_count = static_cast<int>(units.size());
  // As in run_tiles: every thread holds its packing buffers from the region start on (the thin
  // path packs nothing, but a later tile-path call then allocates nothing either).
  thread_pack_buffers<Kernel>();
  switchmoe::detail::LoopExceptions exceptions;
  const auto run_unit = [&](int u) {
    exceptions.run(u, [&] {
      const ThinUnit unit = units[u];
      const GemmProblem<T>& p = problems[unit.problem];
      const PackedB<T, Isa>& b = *packed[unit.problem].b;
      const int j0 = unit.q0 * kNr;
      const int cols = std::min(p.n, unit.q1 * kNr) - j0;
      for (int p0 = 0; p0 < p.k; p0 += Kernel::kKc) {
        const int kc = std::min(Kernel::kKc, p.k - p0);
        const int steps = packed_steps<Kernel>(kc);
        const std::ptrdiff_t panel_stride = b_panel_elements<Kernel>(kc);
        const float beta = p0 == 0 ? p.beta : 1.0f;
        // Chunks of kThinChunkPanels panels, each run for every row group before the next:
        // a chunk's B block (8 panels of kc k-steps, up to 512 KB) stays in L2 for the second
        // row group (9-16 rows) rather than being streamed from memory twice. The order of
        // chunks and row groups changes no element's operations (each is within one run_thin
        // call). The first row group prefetches the panels after its own into L2 (the second
        // finds its chunk there), up to the end of the packed weight.
        for (int q = unit.q0; q < unit.q1; q += kThinChunkPanels) {
          const int panels = std::min(kThinChunkPanels, unit.q1 - q);
          const int c0 = q * kNr, chunk_cols = std::min(p.n, (q + panels) * kNr) - c0;
          for (int r0 = 0; r0 < p.m; r0 += Kernel::kThinRows) {
            Kernel::run_thin(
                steps, p.a + r0 * p.lda + p0, p.lda, std::min(Kernel::kThinRows, p.m - r0),
                b.block(p0, c0), panel_stride, panels, p.c + r0 * p.ldc + c0, p.ldc, beta,
                chunk_cols,
                r0 == 0 && thin_prefetch().load(std::memory_order_relaxed) ? b.end() : nullptr);
          }
        }
      }
      epilogue(unit.problem, 0, p.m, j0, cols);
    });
  };
  if (unit_count <= 1) {  // one unit (one thread's call): no region, not even a one-thread one
    for (int u = 0; u < unit_count; ++u) run_unit(u);
    exceptions.rethrow_if_failed();
    return;
  }
  // The first loop ends in a barrier: the second stage starts once the first stage's C and
  // epilogue writes are complete and visible to every thread.
#pragma omp parallel
  {
    exceptions.run(-1, [] { thread_pack_buffers<Kernel>(); });
#pragma omp for schedule(dynamic, 1)
    for (int u = 0; u < first_stage_units; ++u) run_unit(u);
#pragma omp for schedule(dynamic, 1)
    for (int u = first_stage_units; u < unit_count; ++u) run_unit(u);
  }
  exceptions.rethrow_if_failed();
}

// The calling thread's plain view of the problems of a packed call, reused across calls.
template <class T>
std::vector<GemmProblem<T>>& thread_plain_problems() {
  thread_local std::vector<GemmProblem<T>> plain;
  return plain;
}

// Problems [second_stage, count) run after [0, second_stage) has finished, epilogues included
// (run_thin_problems); the epilogue sees problem indices shifted by `first_index`.
template <class T, class Isa, class Epilogue>
void run_packed_stages(const PackedGemmProblem<T, Isa>* problems, std::size_t count,
                       const Epilogue& epilogue, std::size_t second_stage,
                       std::size_t first_index) {
  const auto shifted = [&](int problem, int i0, int rows, int j0, int cols) {
    epilogue(problem + static_cast<int>(first_index), i0, rows, j0, cols);
  };
  using Kernel = detail::MicroKernel<Isa, T>;
  using Packed = typename Kernel::Packed;
  std::vector<GemmProblem<T>>& plain = thread_plain_problems<T>();
  plain.clear();
  plain.reserve(count);
  for (std::size_t i = 0; i < count; ++i) {
    const PackedGemmProblem<T, Isa>& p = problems[i];
    if (p.b == nullptr) {
      throw_bad_problem(i, "b is nullptr, expected a PackedB (also for m = 0)");
    }
    GemmProblem<T> q;
    q.m = p.m;
    q.n = p.b->n();
    q.k = p.b->k();
    q.a = p.a;
    q.lda = p.lda;
    q.trans_a = p.trans_a;
    q.c = p.c;
    q.ldc = p.ldc;
    q.beta = p.beta;
    validate(q, i, /*check_b=*/false);
    plain.push_back(q);
  }
  const PackedGemmProblem<T, Isa>* packed = problems;
  if constexpr (kHasThinRows<Kernel>) {
    // Sized on every call, whichever path runs, so that a thin call after the largest call
    // allocates nothing (at most 2 units per problem plus kTilesPerThread per thread and stage).
    std::vector<ThinUnit>& units = thread_thin_units();
    const std::size_t most_units =
        2 * count + 2 * static_cast<std::size_t>(kTilesPerThread) * omp_get_max_threads();
    if (units.capacity() < most_units) units.reserve(most_units);
    const int threads = omp_in_parallel() ? 1 : omp_get_max_threads();
    if (thin_call<Kernel>(plain.data(), plain.size(), threads)) {
      run_thin_problems<Kernel>(plain.data(), plain.size(), packed, shifted, second_stage);
      return;
    }
  }
  if (second_stage < count && second_stage > 0) {  // two stages, not both thin: one at a time
    run_packed_stages(problems, second_stage, epilogue, second_stage, first_index);
    run_packed_stages(problems + second_stage, count - second_stage, epilogue, count - second_stage,
                      first_index + second_stage);
    return;
  }
  run_problems<Kernel>(
      plain.data(), plain.size(), true,
      [packed](int index, Packed*) {
        const PackedB<T, Isa>* b = packed[index].b;
        return [b](int p0, int, int j0, int) {
          return PackedBlock<Packed>{b->block(p0, j0), b->end()};
        };
      },
      shifted);
}

// Runs the problems, all at once or, with second_stage < count, [0, second_stage) and then the
// rest (see run_packed_stages).
template <class T, class Isa, class Epilogue>
void gemm_packed_problems(const PackedGemmProblem<T, Isa>* problems, std::size_t count,
                          const Epilogue& epilogue, std::size_t second_stage = ~std::size_t{0}) {
  run_packed_stages(problems, count, epilogue, std::min(second_stage, count), 0);
}

// Grows the calling thread's per-call vectors and packing buffers for calls of one problem made
// inside a parallel region (each thread then runs its own calls, as the experts' whole-FFN
// schedule does), so that such calls allocate nothing once every thread has run this. Tiles:
// one problem on one thread has at most row blocks + kTilesPerThread tiles (make_tiles); 64
// covers problems of up to 58 row blocks, and larger ones make their own room.
template <class T, class Isa>
void reserve_single_call_buffers() {
  using Kernel = detail::MicroKernel<Isa, T>;
  std::vector<GemmProblem<T>>& plain = thread_plain_problems<T>();
  if (plain.capacity() < 1) plain.reserve(1);
  std::vector<ThinUnit>& units = thread_thin_units();
  const std::size_t most_units =
      2 + static_cast<std::size_t>(kTilesPerThread) * omp_get_max_threads();
  if (units.capacity() < most_units) units.reserve(most_units);
  std::vector<Tile>& tiles = thread_tiles();
  if (tiles.capacity() < 64) tiles.reserve(64);
  thread_pack_buffers<Kernel>();
}

}  // namespace detail

// Runs every problem, like gemm_batch on plain problems (threads, determinism).
template <class T, class Isa>
void gemm_batch(const std::vector<PackedGemmProblem<T, Isa>>& problems) {
  detail::gemm_packed_problems(problems.data(), problems.size(), detail::NoEpilogue());
}

// As above, then `epilogue(problem, i0, rows, j0, cols)` runs on every finished block of C:
// problem `problem`'s rows [i0, i0 + rows) x columns [j0, j0 + cols), each element exactly once,
// on the thread that computed it, while the block is still in cache (bias, activation,
// conversion). It may write C in that block and anything it owns for those elements; it runs
// concurrently for different blocks. Blocks start at multiples of kNr columns, but their shapes
// depend on the thread count: an epilogue must act element by element so that results stay
// independent of the thread count. It may throw: the call then rethrows, after the parallel
// region, the exception of the first block in (problem, row, column) tile order that threw,
// skips the blocks not yet started, and leaves C (and what the epilogue writes) unspecified.
template <class T, class Isa, class Epilogue>
void gemm_batch(const std::vector<PackedGemmProblem<T, Isa>>& problems, const Epilogue& epilogue) {
  detail::gemm_packed_problems(problems.data(), problems.size(), epilogue);
}

template <class T, class Isa>
void gemm(const PackedGemmProblem<T, Isa>& p) {
  detail::gemm_packed_problems(&p, 1, detail::NoEpilogue());
}

}  // namespace switchmoe::kernels
