// The thin-row (decode) path of the packed GEMM (packed_b.hpp, run_thin_problems): calls whose
// problems all have at most kMaxThinRows rows take it. Its results must be bitwise those of the
// tile path, which the same rows get when they are part of a taller problem, for any thread
// count; and close to a double-precision reference.

#include <gtest/gtest.h>
#include <omp.h>

#include <Eigen/Core>
#include <atomic>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "switchmoe/kernels/packed_b.hpp"

namespace {

namespace kernels = switchmoe::kernels;
using kernels::PackedB;
using kernels::PackedGemmProblem;
using kernels::Transpose;
using Bf16 = Eigen::bfloat16;

template <class T>
std::vector<T> random_values(std::size_t count, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<T> v(count);
  for (T& x : v) x = static_cast<T>(dist(rng));
  return v;
}

template <class T, class Isa>
struct Path {
  using Element = T;
  using IsaType = Isa;
};

template <class P>
class ThinPathTest : public ::testing::Test {};

#if SWITCHMOE_KERNELS_HAS_AVX512BF16
using Paths =
    ::testing::Types<Path<float, kernels::isa::Avx512>, Path<Bf16, kernels::isa::Avx512>,
                     Path<float, kernels::isa::Avx512Bf16>, Path<Bf16, kernels::isa::Avx512Bf16>,
                     Path<float, kernels::isa::Portable>>;
#elif SWITCHMOE_KERNELS_HAS_AVX512
using Paths = ::testing::Types<Path<float, kernels::isa::Avx512>, Path<Bf16, kernels::isa::Avx512>,
                               Path<float, kernels::isa::Portable>>;
#else
using Paths = ::testing::Types<Path<float, kernels::isa::Portable>>;
#endif
TYPED_TEST_SUITE(ThinPathTest, Paths);

// Runs C [m, n] = A [m, k] * B with one packed problem per entry of `rows` (A rows taken in
// order from `a`, C rows likewise), on `threads` threads, with an epilogue that counts visits.
template <class T, class Isa>
std::vector<float> run_batch(const std::vector<int>& rows, const std::vector<T>& a, int k,
                             const std::vector<PackedB<T, Isa>>& b, int n, float beta,
                             const std::vector<float>& c0, int threads, int* bad_visits) {
  const int saved = omp_get_max_threads();
  omp_set_num_threads(threads);
  std::vector<float> c = c0;
  std::vector<PackedGemmProblem<T, Isa>> problems;
  int first = 0;
  for (std::size_t e = 0; e < rows.size(); ++e) {
    PackedGemmProblem<T, Isa> p;
    p.m = rows[e];
    p.a = a.data() + static_cast<std::size_t>(first) * k;
    p.lda = k;
    p.b = &b[e];
    p.c = c.data() + static_cast<std::size_t>(first) * n;
    p.ldc = n;
    p.beta = beta;
    problems.push_back(p);
    first += rows[e];
  }
  std::vector<std::atomic<int>> visits(static_cast<std::size_t>(first) * n);
  std::vector<int> starts(rows.size(), 0);
  for (std::size_t e = 1; e < rows.size(); ++e) starts[e] = starts[e - 1] + rows[e - 1];
  kernels::gemm_batch(problems, [&](int problem, int i0, int block_rows, int j0, int cols) {
    for (int i = i0; i < i0 + block_rows; ++i) {
      for (int j = j0; j < j0 + cols; ++j) {
        ++visits[static_cast<std::size_t>(starts[problem] + i) * n + j];
      }
    }
  });
  omp_set_num_threads(saved);
  int bad = 0;
  for (const std::atomic<int>& v : visits) bad += v.load() != 1;
  *bad_visits = bad;
  return c;
}

// Every row count 1..kMaxThinRows (+1, the first tile-path size), k spanning several k blocks with
// a partial one, n with a partial panel; beta 0 and 1; 1-3 threads. The thin call computes each
// expert's few rows; the reference call puts the same rows into one problem of 40 rows (tile
// path). Same B for all.
TYPED_TEST(ThinPathTest, BitwiseEqualToTilePathAndIndependentOfThreads) {
  using T = typename TypeParam::Element;
  using Isa = typename TypeParam::IsaType;
  // bf16: k even, so the thin path takes it
  const int k = 2 * switchmoe::kernels::detail::MicroKernel<Isa, T>::kKc + 52, n = 530;
  const std::vector<T> a = random_values<T>(40 * k, 11);
  const std::vector<T> w = random_values<T>(static_cast<std::size_t>(k) * n, 12);
  for (float beta : {0.0f, 1.0f}) {
    const std::vector<float> c0 = random_values<float>(40 * n, 13);
    // Reference: all 40 rows in one problem (tile path).
    std::vector<PackedB<T, Isa>> one(1);
    one[0].pack(w.data(), n, Transpose::kNo, k, n);
    int bad = 0;
    const std::vector<float> want = run_batch<T, Isa>({40}, a, k, one, n, beta, c0, 2, &bad);
    ASSERT_EQ(bad, 0);
    // Double-precision check of the reference itself (the products of T values are exact).
    for (int i : {0, 17, 39}) {
      for (int j : {0, 31, 32, 529}) {
        double sum = beta * c0[i * n + j];
        double mag = std::abs(beta * c0[i * n + j]);
        for (int p = 0; p < k; ++p) {
          const double prod = static_cast<double>(static_cast<float>(a[i * k + p])) *
                              static_cast<float>(w[static_cast<std::size_t>(p) * n + j]);
          sum += prod;
          mag += std::abs(prod);
        }
        EXPECT_NEAR(want[i * n + j], sum, 1e-5 * mag + 1e-6) << i << ", " << j;
      }
    }
    for (int m = 1; m <= 17; ++m) {
      // Experts of m, 1 and m rows, then the rest of the 40 rows in experts of at most m rows.
      std::vector<int> rows;
      int left = 40;
      while (left > 0) {
        const int r = std::min(left, rows.size() % 3 == 1 ? 1 : m);
        rows.push_back(r);
        left -= r;
      }
      std::vector<PackedB<T, Isa>> b(rows.size());
      for (auto& pb : b) pb.pack(w.data(), n, Transpose::kNo, k, n);
      for (int threads : {1, 2, 3}) {
        const std::vector<float> got = run_batch<T, Isa>(rows, a, k, b, n, beta, c0, threads, &bad);
        EXPECT_EQ(bad, 0) << "m=" << m << " threads=" << threads;
        EXPECT_EQ(0, std::memcmp(got.data(), want.data(), want.size() * sizeof(float)))
            << "m=" << m << " threads=" << threads << " beta=" << beta;
      }
    }
  }
}

// Shapes at the edges of the thin kernel: one column, fewer columns than a panel, a single k
// value (bf16: two), k below one k-step block; against the tile path, bitwise.
TYPED_TEST(ThinPathTest, SmallShapesMatchTilePath) {
  using T = typename TypeParam::Element;
  using Isa = typename TypeParam::IsaType;
  const int kc = switchmoe::kernels::detail::MicroKernel<Isa, T>::kKc;
  const int shapes[][2] = {{2, 1}, {2, 31}, {6, 33}, {256, 64}, {kc, 96}, {kc + 2, 300}};
  for (const auto& s : shapes) {
    const int k = s[0], n = s[1];
    const std::vector<T> a = random_values<T>(20 * k, 21 + k);
    const std::vector<T> w = random_values<T>(static_cast<std::size_t>(k) * n, 22 + n);
    const std::vector<float> c0(20 * n, 0.0f);
    std::vector<PackedB<T, Isa>> one(1);
    one[0].pack(w.data(), n, Transpose::kNo, k, n);
    int bad = 0;
    const std::vector<float> want = run_batch<T, Isa>({20}, a, k, one, n, 0.0f, c0, 2, &bad);
    std::vector<PackedB<T, Isa>> b(4);
    for (auto& pb : b) pb.pack(w.data(), n, Transpose::kNo, k, n);
    const std::vector<float> got = run_batch<T, Isa>({1, 3, 8, 8}, a, k, b, n, 0.0f, c0, 2, &bad);
    EXPECT_EQ(bad, 0);
    EXPECT_EQ(0, std::memcmp(got.data(), want.data(), want.size() * sizeof(float)))
        << "k=" << k << " n=" << n;
  }
}

}  // namespace
