#pragma once
// The library's single level of OpenMP parallelism for element-wise work. Every iteration is
// independent, so results never depend on the thread count.
//
// Exceptions: an exception escaping an OpenMP region calls std::terminate, so every parallel
// loop of the library catches inside each iteration (LoopExceptions below), skips the iterations
// after the first failure, and rethrows after the region. The exception rethrown is the one of
// the lowest iteration index that threw, whatever the thread count and scheduling (provided an
// iteration's throwing does not depend on other iterations): iteration i is skipped only when a
// lower index has already thrown, so the lowest throwing index always runs.

#include <Eigen/Core>
#include <atomic>
#include <cstdint>
#include <exception>
#include <limits>
#include <mutex>

namespace switchmoe {
namespace detail {

/// The first (lowest-index) exception of a parallel loop. No allocation unless something throws.
class LoopExceptions {
 public:
  /// Runs f() for iteration `index` unless a lower index has already failed; an exception is
  /// kept (the lowest index wins), never propagated, so this may run inside an OpenMP region.
  template <class F>
  void run(std::int64_t index, F&& f) noexcept {
    if (index > first_.load(std::memory_order_relaxed)) return;  // a lower index failed: skip
    try {
      f();
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (index < first_.load(std::memory_order_relaxed)) {
        exception_ = std::current_exception();
        first_.store(index, std::memory_order_relaxed);
      }
    }
  }

  /// After the region: rethrows the kept exception, if any.
  void rethrow_if_failed() {
    if (exception_) std::rethrow_exception(exception_);
  }

 private:
  static constexpr std::int64_t kNone = std::numeric_limits<std::int64_t>::max();
  std::atomic<std::int64_t> first_{kNone};
  std::mutex mutex_;
  std::exception_ptr exception_;
};

/// Below this much work (iterations x work per iteration, in elements) a loop runs on the
/// calling thread: opening an OpenMP region costs a fork and a barrier, which on a loaded
/// machine wait for a thread that may not be running. Measured on the 2-core VM (issue 15,
/// benchmarks/RESULTS_issue15.md round 3): a region around the gather or combine of 64 tokens x
/// 768 (49152 elements) took 35-45 us warm and 180-290 us cold (the static schedule waits for a
/// descheduled worker's half), against a few us for the plain loop. 2^17 elements (tens of
/// microseconds of copying on one thread) keeps every decode and small-batch loop on the calling
/// thread and still splits the large ones (2048 tokens x 64 and more).
inline constexpr Eigen::Index kMinParallelWork = Eigen::Index{1} << 17;

/// Whether parallel_for(n, work_per_item, ...) opens an OpenMP region. Decided from the shape
/// only; as every iteration is independent, it never changes a result.
inline bool parallel_loop(Eigen::Index n, Eigen::Index work_per_item) {
  return n > 1 && n * work_per_item >= kMinParallelWork;
}

/// Runs body(i) for i in [0, n); in parallel when there is enough work (parallel_loop) and we
/// are not already inside a parallel region. A loop below the threshold opens no region at all
/// (not even a one-thread one): it is a plain loop on the calling thread.
///
/// The body may throw (std::bad_alloc, or a user callback's exception): the exception of the
/// lowest index i that threw reaches the caller, after the loop; the iterations after a failure
/// may or may not have run, so the output of the call is then unspecified (partially written).
template <class Body>
void parallel_for(Eigen::Index n, Eigen::Index work_per_item, const Body& body) {
  if (!parallel_loop(n, work_per_item)) {
    for (Eigen::Index i = 0; i < n; ++i) body(i);  // the first throw is the lowest index's
    return;
  }
  LoopExceptions exceptions;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static)
#endif
  for (Eigen::Index i = 0; i < n; ++i) exceptions.run(i, [&] { body(i); });
  exceptions.rethrow_if_failed();
}

}  // namespace detail
}  // namespace switchmoe
