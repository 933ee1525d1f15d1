#pragma once
// Per-thread packing buffers of the GEMM kernels: grown on first use, then reused by every
// later call on the same thread (no allocation in steady state; OpenMP keeps its threads).

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <Eigen/Core>
#include <cstddef>
#include <cstdlib>
#include <memory>
#include <new>

namespace switchmoe::kernels::detail {

inline constexpr std::size_t kCacheLine = 64;

inline constexpr std::size_t kHugePageBytes = std::size_t{2} << 20;

// A 64-byte aligned, uninitialized, growable byte buffer.
class AlignedBuffer {
 public:
  // Returns at least `bytes` bytes, 64-byte aligned; contents are unspecified after growth.
  // Throws std::bad_alloc (the buffer is then unchanged).
  //
  // With `huge_pages`, a buffer of at least kHugePageBytes is aligned to and rounded up to
  // whole 2 MB pages and advised as transparent huge pages (Linux MADV_HUGEPAGE; elsewhere, or
  // when the kernel declines, plain pages), unless the rounding would waste more than 1/8 of
  // the buffer. Packed expert weights are streamed from memory at every call, and on 4 KB pages
  // every 4 KB of a stream costs a TLB miss (a 4 MB expert spans 1024 pages, more than the L2
  // TLB holds across 128 experts).
  void* reserve(std::size_t bytes, bool huge_pages = false) {
    if (bytes > capacity_) {
      Eigen::internal::check_that_malloc_is_allowed();  // visible to EIGEN_RUNTIME_NO_MALLOC
      const std::size_t whole_pages =
          (bytes + kHugePageBytes - 1) / kHugePageBytes * kHugePageBytes;
      const bool huge = huge_pages && bytes >= kHugePageBytes && whole_pages - bytes <= bytes / 8;
      const std::size_t align = huge ? kHugePageBytes : kCacheLine;
      const std::size_t rounded = (bytes + align - 1) / align * align;
      void* p = std::aligned_alloc(align, rounded);
      if (p == nullptr) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
      if (huge) madvise(p, rounded, MADV_HUGEPAGE);  // a hint: failure leaves plain pages
#endif
      data_.reset(p);
      capacity_ = rounded;
    }
    return data_.get();
  }

 private:
  struct Free {
    void operator()(void* p) const { std::free(p); }
  };
  std::unique_ptr<void, Free> data_;
  std::size_t capacity_ = 0;
};

// The packed A block and packed B block of one thread.
struct Workspace {
  AlignedBuffer a;
  AlignedBuffer b;
};

inline Workspace& thread_workspace() {
  thread_local Workspace workspace;
  return workspace;
}

}  // namespace switchmoe::kernels::detail
