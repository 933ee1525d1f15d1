// Counts heap allocations between start() and stop(), for tests that check that steady-state
// calls allocate nothing (issue #4). Two sources are counted, on every thread:
//   1. the global operator new / new[] (every variant: plain, nothrow, aligned), replaced below
//      by versions that forward to std::malloc / std::aligned_alloc: std::vector, std::string,
//      std::function, std::stable_sort's buffer and anything else that goes through new;
//   2. Eigen's heap allocations, which use malloc directly: with EIGEN_RUNTIME_NO_MALLOC, Eigen
//      asserts is_malloc_allowed() before every heap allocation (Memory.h), and the eigen_assert
//      defined here counts that assertion instead of aborting. switchmoe's own grow-only
//      buffers call Eigen::internal::check_that_malloc_is_allowed() when they grow, so they are
//      counted the same way.
// Plain malloc calls elsewhere (the C library, the OpenMP runtime) are not counted.
//
// Eigen keeps the is_malloc_allowed flag in a function-local `static bool` (Eigen 3.4,
// Memory.h: is_malloc_allowed_impl), shared by all threads, not thread_local: start() therefore
// also forbids allocations on OpenMP worker threads, and Eigen allocations made there are counted
// too. The flag is a plain bool, so start() and stop() must run outside parallel regions (as
// tests do). Operator new counting is a global atomic and sees every thread regardless.
// Such a count on a worker is a real allocation by the library, not noise: it is how issue #14
// item 10 showed (a GEMM worker that got no tile in the warm-up reserved its thread_local
// packing buffers in a later call: "0 operator new, 2 Eigen"). Nothing else runs on other
// threads while a test counts, so no other code's allocation is counted.
//
// Usage: include this header FIRST, before anything that includes Eigen, in exactly ONE
// translation unit per test executable. It defines the replaceable global operator new/delete
// (one definition per program, and they cannot be inline) and configures Eigen, which must be
// configured the same way in the whole program. Works under AddressSanitizer: a program may
// replace operator new, and the replacements allocate through malloc, which ASan still checks.
#pragma once

#if defined(EIGEN_CORE_H) || defined(EIGEN_WORLD_VERSION)
#error "allocation_counter.hpp must be included before Eigen (it configures eigen_assert)"
#endif

#include <atomic>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>

namespace switchmoe_test {
namespace allocation_counter_detail {

inline std::atomic<bool> counting{false};
inline std::atomic<long> operator_new_count{0};
inline std::atomic<long> eigen_count{0};

inline void* allocate(std::size_t size) {
  if (counting.load(std::memory_order_relaxed)) {
    operator_new_count.fetch_add(1, std::memory_order_relaxed);
  }
  return std::malloc(size == 0 ? 1 : size);
}

inline void* allocate_aligned(std::size_t size, std::align_val_t align) {
  if (counting.load(std::memory_order_relaxed)) {
    operator_new_count.fetch_add(1, std::memory_order_relaxed);
  }
  const std::size_t alignment = static_cast<std::size_t>(align);
  // aligned_alloc wants a size that is a multiple of the alignment (ASan checks it).
  const std::size_t rounded = (size + alignment - 1) / alignment * alignment;
  return std::aligned_alloc(alignment, rounded == 0 ? alignment : rounded);
}

// Not inlined into delete expressions: GCC would otherwise see free() applied to the result of
// operator new and warn (-Wmismatched-new-delete), not knowing that our operator new mallocs.
[[gnu::noinline]] inline void deallocate(void* p) noexcept { std::free(p); }

// The message of Eigen's check_that_malloc_is_allowed() (Memory.h).
inline constexpr const char* kEigenMallocMessage = "heap allocation is forbidden";

// eigen_assert(x): a failed "heap allocation is forbidden" check is counted (Eigen goes on to
// allocate); any other failed assertion aborts like assert() would.
inline void eigen_assert_handler(bool ok, const char* expression, const char* file, int line) {
  if (ok) return;
  if (std::strstr(expression, kEigenMallocMessage) != nullptr) {
    eigen_count.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  std::fprintf(stderr, "%s:%d: Eigen assertion failed: %s\n", file, line, expression);
  std::abort();
}

}  // namespace allocation_counter_detail
}  // namespace switchmoe_test

#define EIGEN_RUNTIME_NO_MALLOC
#define eigen_assert(x)                                                                       \
  ::switchmoe_test::allocation_counter_detail::eigen_assert_handler(static_cast<bool>(x), #x, \
                                                                    __FILE__, __LINE__)

#include <Eigen/Core>

namespace switchmoe_test {

/// Allocations seen while counting, by source.
struct AllocationCount {
  long operator_new = 0;  // global operator new / new[], any thread
  long eigen = 0;         // Eigen heap allocations (and switchmoe buffers growing)
  long total() const { return operator_new + eigen; }
};

namespace allocation_counter {

/// Resets the counts and starts counting. Call outside any parallel region.
inline void start() {
  allocation_counter_detail::operator_new_count.store(0);
  allocation_counter_detail::eigen_count.store(0);
  Eigen::internal::set_is_malloc_allowed(false);
  allocation_counter_detail::counting.store(true);
}

/// Stops counting and returns what was counted since start().
inline AllocationCount stop() {
  allocation_counter_detail::counting.store(false);
  Eigen::internal::set_is_malloc_allowed(true);
  return {allocation_counter_detail::operator_new_count.load(),
          allocation_counter_detail::eigen_count.load()};
}

}  // namespace allocation_counter

/// The allocations made by call(); counting stops even if it throws.
template <class Call>
AllocationCount count_allocations(Call&& call) {
  struct Stop {
    ~Stop() {
      if (allocation_counter_detail::counting.load()) allocation_counter::stop();
    }
  } guard;
  allocation_counter::start();
  call();
  return allocation_counter::stop();
}

}  // namespace switchmoe_test

// ---- Replacement global allocation functions (one definition per program) -----------------------

void* operator new(std::size_t size) {
  void* p = switchmoe_test::allocation_counter_detail::allocate(size);
  if (p == nullptr) throw std::bad_alloc();
  return p;
}
void* operator new[](std::size_t size) { return ::operator new(size); }
void* operator new(std::size_t size, const std::nothrow_t&) noexcept {
  return switchmoe_test::allocation_counter_detail::allocate(size);
}
void* operator new[](std::size_t size, const std::nothrow_t&) noexcept {
  return switchmoe_test::allocation_counter_detail::allocate(size);
}
void* operator new(std::size_t size, std::align_val_t align) {
  void* p = switchmoe_test::allocation_counter_detail::allocate_aligned(size, align);
  if (p == nullptr) throw std::bad_alloc();
  return p;
}
void* operator new[](std::size_t size, std::align_val_t align) {
  return ::operator new(size, align);
}
void* operator new(std::size_t size, std::align_val_t align, const std::nothrow_t&) noexcept {
  return switchmoe_test::allocation_counter_detail::allocate_aligned(size, align);
}
void* operator new[](std::size_t size, std::align_val_t align, const std::nothrow_t&) noexcept {
  return switchmoe_test::allocation_counter_detail::allocate_aligned(size, align);
}

void operator delete(void* p) noexcept { switchmoe_test::allocation_counter_detail::deallocate(p); }
void operator delete[](void* p) noexcept {
  switchmoe_test::allocation_counter_detail::deallocate(p);
}
void operator delete(void* p, const std::nothrow_t&) noexcept {
  switchmoe_test::allocation_counter_detail::deallocate(p);
}
void operator delete[](void* p, const std::nothrow_t&) noexcept {
  switchmoe_test::allocation_counter_detail::deallocate(p);
}
void operator delete(void* p, std::size_t) noexcept {
  switchmoe_test::allocation_counter_detail::deallocate(p);
}
void operator delete[](void* p, std::size_t) noexcept {
  switchmoe_test::allocation_counter_detail::deallocate(p);
}
void operator delete(void* p, std::align_val_t) noexcept {
  switchmoe_test::allocation_counter_detail::deallocate(p);
}
void operator delete[](void* p, std::align_val_t) noexcept {
  switchmoe_test::allocation_counter_detail::deallocate(p);
}
void operator delete(void* p, std::align_val_t, const std::nothrow_t&) noexcept {
  switchmoe_test::allocation_counter_detail::deallocate(p);
}
void operator delete[](void* p, std::align_val_t, const std::nothrow_t&) noexcept {
  switchmoe_test::allocation_counter_detail::deallocate(p);
}
void operator delete(void* p, std::size_t, std::align_val_t) noexcept {
  switchmoe_test::allocation_counter_detail::deallocate(p);
}
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept {
  switchmoe_test::allocation_counter_detail::deallocate(p);
}
