#pragma once
// Per-thread packing buffers of the GEMM kernels: grown on first use, then reused by every
// later call on the same thread (no allocation in steady state; OpenMP keeps its threads).

#include <Eigen/Core>
#include <cstddef>
#include <cstdlib>
#include <memory>
#include <new>

namespace switchmoe::kernels::detail {

inline constexpr std::size_t kCacheLine = 64;

// A 64-byte aligned, uninitialized, growable byte buffer.
class AlignedBuffer {
 public:
  // Returns at least `bytes` bytes, 64-byte aligned; contents are unspecified after growth.
  void* reserve(std::size_t bytes) {
    if (bytes > capacity_) {
      Eigen::internal::check_that_malloc_is_allowed();  // visible to EIGEN_RUNTIME_NO_MALLOC
      const std::size_t rounded = (bytes + kCacheLine - 1) / kCacheLine * kCacheLine;
      void* p = std::aligned_alloc(kCacheLine, rounded);
      if (p == nullptr) throw std::bad_alloc();
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
