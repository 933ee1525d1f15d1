// Every address the GEMM kernels prefetch lies inside a buffer the call reads or writes: a
// packed weight (PackedB, from its first panel to the end of its last k block's panels), the
// calling thread's B scratch (plain gemm), A or C. A prefetch cannot fault, so no sanitizer sees
// an address formed past a buffer (undefined behaviour all the same): this test records the
// addresses instead. It replaces _mm_prefetch and __builtin_prefetch by a recorder before it
// includes the kernels, so it is an executable of its own that takes no shared instances
// (tests/CMakeLists.txt). Thin (decode) and tile paths, plain and packed B, B transposed or
// not, short last k blocks, narrow C rows, the two-stage batch, 1 and 2 threads.
#include <gtest/gtest.h>
#include <immintrin.h>
#include <omp.h>

#include <Eigen/Core>
#include <atomic>
#include <cstddef>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace prefetch_record {

struct Range {
  const char* begin;
  const char* end;
};

// Set before each call, read (not written) by every thread during it.
inline std::vector<Range> allowed;
inline std::atomic<long> seen{0};
inline std::atomic<long> outside{0};
inline std::atomic<long> first_outside_distance{0};  // bytes from the nearest buffer

inline void record(const void* address) {
  seen.fetch_add(1, std::memory_order_relaxed);
  const char* p = static_cast<const char*>(address);
  long nearest = -1;
  for (const Range& r : allowed) {
    if (p >= r.begin && p < r.end) return;
    const long d = p < r.begin ? static_cast<long>(r.begin - p) : static_cast<long>(p - r.end);
    if (nearest < 0 || d < nearest) nearest = d;
  }
  if (outside.fetch_add(1, std::memory_order_relaxed) == 0) first_outside_distance = nearest;
}

}  // namespace prefetch_record

#undef _mm_prefetch  // a macro in clang's xmmintrin.h, a function in GCC's
#define _mm_prefetch(address, hint) ::prefetch_record::record(address)
#define __builtin_prefetch(address, ...) ::prefetch_record::record(address)

#include "switchmoe/kernels/gemm.hpp"
#include "switchmoe/kernels/packed_b.hpp"

namespace {

namespace kernels = switchmoe::kernels;
using kernels::GemmProblem;
using kernels::PackedB;
using kernels::PackedGemmProblem;
using kernels::Transpose;
using prefetch_record::Range;

template <class T>
Range range_of(const std::vector<T>& v) {
  return {reinterpret_cast<const char*>(v.data()),
          reinterpret_cast<const char*>(v.data() + v.size())};
}

// The packed panels of b, from the layout (the k blocks' panels one after the other, a block of
// kc values of k taking packed_steps(kc) x kNr x kKPack elements per panel), not from end().
template <class T, class Isa>
Range packed_range(const PackedB<T, Isa>& b) {
  using Kernel = kernels::detail::MicroKernel<Isa, T>;
  const int last = (b.k() - 1) / Kernel::kKc * Kernel::kKc;
  const int panels = (b.n() + Kernel::kNr - 1) / Kernel::kNr;
  const auto* end = b.block(last, 0) + static_cast<std::ptrdiff_t>(panels) *
                                           ((b.k() - last + Kernel::kKPack - 1) / Kernel::kKPack) *
                                           Kernel::kNr * Kernel::kKPack;
  return {reinterpret_cast<const char*>(b.block(0, 0)), reinterpret_cast<const char*>(end)};
}

// Every thread's B scratch of the plain gemm (the buffers are per thread and never move once
// reserved at their fixed size).
template <class Kernel>
std::vector<Range> scratch_ranges() {
  std::vector<Range> ranges(omp_get_max_threads() + 1);
  const auto add = [](Range& r) {
    const auto* b = kernels::detail::thread_pack_buffers<Kernel>().second;
    r = {reinterpret_cast<const char*>(b),
         reinterpret_cast<const char*>(b + kernels::detail::b_block_elements<Kernel>())};
  };
#pragma omp parallel
  add(ranges[omp_get_thread_num()]);
  add(ranges.back());
  return ranges;
}

template <class T>
std::vector<T> random_values(std::size_t count, std::mt19937& rng) {
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<T> v(count);
  for (T& x : v) x = static_cast<T>(dist(rng));
  return v;
}

struct Counts {
  long seen = 0, outside = 0;
  std::string first_case;
};

// One plain and one two-stage packed call of shape [m, k] x [k, n] (C rows exactly n wide, so
// no padding hides an overrun), recording the prefetches.
template <class T, class Isa>
void run_case(int m, int n, int k, Transpose trans_b, std::mt19937& rng, Counts& counts) {
  using Kernel = kernels::detail::MicroKernel<Isa, T>;
  const std::vector<T> a = random_values<T>(static_cast<std::size_t>(m) * k, rng);
  const std::vector<T> b = random_values<T>(static_cast<std::size_t>(k) * n, rng);
  const std::ptrdiff_t ldb = trans_b == Transpose::kYes ? k : n;
  std::vector<float> c(static_cast<std::size_t>(m) * n, 0.5f);
  const long outside_before = prefetch_record::outside;
  prefetch_record::allowed = scratch_ranges<Kernel>();
  prefetch_record::allowed.push_back(range_of(a));
  prefetch_record::allowed.push_back(range_of(c));
  GemmProblem<T> plain;
  plain.m = m, plain.n = n, plain.k = k, plain.a = a.data(), plain.lda = k, plain.b = b.data();
  plain.ldb = ldb, plain.trans_b = trans_b, plain.c = c.data(), plain.ldc = n, plain.beta = 0.5f;
  kernels::gemm<T, Isa>(plain);

  // Two stages: C2 [m2, 37] = C-shaped A2 [m2, n] x B2 [n, 37] after the first.
  const int m2 = m <= 16 ? m : 3, n2 = 37;
  const std::vector<T> a2 = random_values<T>(static_cast<std::size_t>(m2) * n, rng);
  const std::vector<T> b2 = random_values<T>(static_cast<std::size_t>(n) * n2, rng);
  std::vector<float> c2(static_cast<std::size_t>(m2) * n2, 0.25f);
  const PackedB<T, Isa> packed(b.data(), ldb, trans_b, k, n);
  const PackedB<T, Isa> packed2(b2.data(), n2, Transpose::kNo, n, n2);
  prefetch_record::allowed = {range_of(a),  range_of(c),          range_of(a2),
                              range_of(c2), packed_range(packed), packed_range(packed2)};
  PackedGemmProblem<T, Isa> problems[2];
  problems[0].m = m, problems[0].a = a.data(), problems[0].lda = k, problems[0].b = &packed;
  problems[0].c = c.data(), problems[0].ldc = n, problems[0].beta = 0.5f;
  problems[1].m = m2, problems[1].a = a2.data(), problems[1].lda = n, problems[1].b = &packed2;
  problems[1].c = c2.data(), problems[1].ldc = n2;
  kernels::detail::gemm_packed_problems(problems, 2, kernels::detail::NoEpilogue(), 1);

  if (prefetch_record::outside > outside_before && counts.first_case.empty()) {
    std::ostringstream s;
    s << "m " << m << ", n " << n << ", k " << k
      << (trans_b == Transpose::kYes ? ", B transposed" : "") << ": "
      << prefetch_record::first_outside_distance << " bytes from the nearest buffer";
    counts.first_case = s.str();
  }
}

template <class T, class Isa>
Counts sweep(int threads) {
  const int saved_threads = omp_get_max_threads();
  omp_set_num_threads(threads);
  prefetch_record::seen = 0;
  prefetch_record::outside = 0;
  Counts counts;
  std::mt19937 rng(7);
  for (int m : {1, 5, 9, 17, 40, 150}) {  // thin (1-16 rows) and tile paths
    const int kc = switchmoe::kernels::detail::MicroKernel<Isa, T>::kKc;
    for (int k : {2, 34, kc + 2, 2 * kc + 2, 2 * kc + 6}) {  // short last k blocks
      for (int n : {1, 16, 17, 33, 100}) {  // C rows of one or two halves, several panels
        for (Transpose t : {Transpose::kNo, Transpose::kYes}) {
          run_case<T, Isa>(m, n, k, t, rng, counts);
        }
      }
    }
  }
  omp_set_num_threads(saved_threads);
  counts.seen = prefetch_record::seen;
  counts.outside = prefetch_record::outside;
  return counts;
}

template <class T, class Isa>
void expect_every_prefetch_inside(const char* name) {
  for (int threads : {1, 2}) {
    const Counts counts = sweep<T, Isa>(threads);
    // The recorder is reached (the kernels prefetch on these shapes), and never outside.
    EXPECT_GT(counts.seen, 0) << name << ", " << threads << " threads";
    EXPECT_EQ(counts.outside, 0) << name << ", " << threads << " threads: of " << counts.seen
                                 << " prefetches; first in " << counts.first_case;
  }
}

#if SWITCHMOE_KERNELS_HAS_AVX512
TEST(KernelPrefetch, EveryAddressIsInsideABufferFloatAvx512) {
  expect_every_prefetch_inside<float, kernels::isa::Avx512>("float, Avx512");
}

TEST(KernelPrefetch, EveryAddressIsInsideABufferBf16Avx512) {
  expect_every_prefetch_inside<Eigen::bfloat16, kernels::isa::Avx512>("bf16, Avx512");
}
#endif

#if SWITCHMOE_KERNELS_HAS_AVX512BF16
TEST(KernelPrefetch, EveryAddressIsInsideABufferBf16Avx512Bf16) {
  expect_every_prefetch_inside<Eigen::bfloat16, kernels::isa::Avx512Bf16>("bf16, Avx512Bf16");
}
#endif

#if !SWITCHMOE_KERNELS_HAS_AVX512
TEST(KernelPrefetch, PortableKernelsDoNotPrefetch) {
  GTEST_SKIP() << "compiled without AVX-512: the portable kernels issue no prefetch";
}
#endif

}  // namespace
