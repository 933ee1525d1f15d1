// Tests of switchmoe/kernels/gemm.hpp: every ISA path (portable and AVX-512) and element type
// (float, bf16) against a double-precision reference, with a tolerance scaled by the float32
// epsilon and k; thread-count independence; argument validation.

#include <gtest/gtest.h>
#include <omp.h>

#include <Eigen/Core>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "switchmoe/kernels/gemm.hpp"
#include "switchmoe/kernels/packed_b.hpp"

namespace {

using switchmoe::kernels::gemm;
using switchmoe::kernels::gemm_batch;
using switchmoe::kernels::GemmProblem;
using switchmoe::kernels::PackedB;
using switchmoe::kernels::PackedGemmProblem;
using switchmoe::kernels::Transpose;
namespace isa = switchmoe::kernels::isa;
using Bf16 = Eigen::bfloat16;

template <class IsaT, class T>
struct Path {
  using Isa = IsaT;
  using Element = T;
};

// A problem with its own storage: op(A) [m, k], op(B) [k, n], C [m, n] with padded leading
// dimensions; the padding of C holds a sentinel that must survive.
template <class T>
struct OwnedProblem {
  int m, n, k;
  Transpose trans_a, trans_b;
  int lda, ldb, ldc;
  float beta;
  std::vector<T> a, b;
  std::vector<float> c;

  GemmProblem<T> view() {
    GemmProblem<T> p;
    p.m = m;
    p.n = n;
    p.k = k;
    p.a = a.empty() ? nullptr : a.data();
    p.lda = lda;
    p.trans_a = trans_a;
    p.b = b.empty() ? nullptr : b.data();
    p.ldb = ldb;
    p.trans_b = trans_b;
    p.c = c.empty() ? nullptr : c.data();
    p.ldc = ldc;
    p.beta = beta;
    return p;
  }
  // op(A)(i, p) and op(B)(p, j) as double.
  double op_a(int i, int p) const {
    return static_cast<double>(static_cast<float>(trans_a == Transpose::kNo
                                                      ? a[static_cast<std::size_t>(i) * lda + p]
                                                      : a[static_cast<std::size_t>(p) * lda + i]));
  }
  double op_b(int p, int j) const {
    return static_cast<double>(static_cast<float>(trans_b == Transpose::kNo
                                                      ? b[static_cast<std::size_t>(p) * ldb + j]
                                                      : b[static_cast<std::size_t>(j) * ldb + p]));
  }
};

constexpr float kSentinel = -12345.0f;

template <class T>
OwnedProblem<T> make_problem(int m, int n, int k, Transpose ta, Transpose tb, float beta, int pad,
                             std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  OwnedProblem<T> p{m, n, k, ta, tb, 0, 0, 0, beta, {}, {}, {}};
  const int a_rows = ta == Transpose::kNo ? m : k;
  const int a_cols = ta == Transpose::kNo ? k : m;
  const int b_rows = tb == Transpose::kNo ? k : n;
  const int b_cols = tb == Transpose::kNo ? n : k;
  p.lda = a_cols + pad;
  p.ldb = b_cols + pad;
  p.ldc = n + pad;
  p.a.resize(static_cast<std::size_t>(a_rows) * p.lda);
  p.b.resize(static_cast<std::size_t>(b_rows) * p.ldb);
  p.c.resize(static_cast<std::size_t>(m) * p.ldc);
  for (auto& x : p.a) x = static_cast<T>(dist(rng));
  for (auto& x : p.b) x = static_cast<T>(dist(rng));
  for (int i = 0; i < m; ++i) {
    for (int j = 0; j < p.ldc; ++j) {
      // beta == 0 must not read C: fill it with NaN then.
      p.c[static_cast<std::size_t>(i) * p.ldc + j] =
          j >= n ? kSentinel : (beta == 0.0f ? std::numeric_limits<float>::quiet_NaN() : dist(rng));
    }
  }
  return p;
}

// Checks C against the double reference computed from `before` (the inputs and the old C).
// Float32 accumulation of k products: |error| <= ~k * 2^-24 * sum_p |a_ip||b_pj| (+ the
// rounding of beta * C); bf16 products are exact in float32, so the same bound holds.
template <class T>
void expect_matches_reference(const OwnedProblem<T>& before, const std::vector<float>& c,
                              const std::string& label) {
  const double u = std::ldexp(1.0, -24);
  int failures = 0;
  for (int i = 0; i < before.m && failures < 5; ++i) {
    for (int j = 0; j < before.ldc; ++j) {
      const std::size_t idx = static_cast<std::size_t>(i) * before.ldc + j;
      if (j >= before.n) {
        ASSERT_EQ(c[idx], kSentinel) << label << ": wrote C padding at (" << i << ", " << j << ")";
        continue;
      }
      double sum = 0.0, magnitude = 0.0;
      for (int p = 0; p < before.k; ++p) {
        const double prod = before.op_a(i, p) * before.op_b(p, j);
        sum += prod;
        magnitude += std::abs(prod);
      }
      const double old_c = before.beta == 0.0f ? 0.0 : static_cast<double>(before.c[idx]);
      const double expected = sum + before.beta * old_c;
      const double tol =
          2.0 * (before.k + 2) * u * (magnitude + std::abs(before.beta * old_c)) + 1e-30;
      if (!(std::abs(c[idx] - expected) <= tol)) {
        ADD_FAILURE() << label << ": C(" << i << ", " << j << ") = " << c[idx] << ", expected "
                      << expected << " +- " << tol;
        ++failures;
      }
    }
  }
}

template <class P>
class GemmPathTest : public ::testing::Test {
 protected:
  using Isa = typename P::Isa;
  using T = typename P::Element;
  // The kernel's k block (256 to 1024 k values by path): shapes below cross it to run several
  // k blocks.
  static constexpr int kKc = switchmoe::kernels::detail::MicroKernel<Isa, T>::kKc;
  void check(int m, int n, int k, Transpose ta, Transpose tb, float beta, int pad) {
    const std::string label = "m=" + std::to_string(m) + " n=" + std::to_string(n) +
                              " k=" + std::to_string(k) +
                              " ta=" + std::to_string(ta == Transpose::kYes) +
                              " tb=" + std::to_string(tb == Transpose::kYes) +
                              " beta=" + std::to_string(beta) + " pad=" + std::to_string(pad);
    OwnedProblem<T> p = make_problem<T>(m, n, k, ta, tb, beta, pad, 1000u * m + 31u * n + k);
    const OwnedProblem<T> before = p;
    gemm<T, Isa>(p.view());
    expect_matches_reference(before, p.c, label);
  }
};

// The AVX-512 paths exist only when the test is compiled for their instructions (e.g.
// -march=native): Avx512 for AVX-512F, Avx512Bf16 also for AVX512BW and AVX512_BF16.
#if SWITCHMOE_KERNELS_HAS_AVX512BF16
using Paths = ::testing::Types<Path<isa::Portable, float>, Path<isa::Portable, Bf16>,
                               Path<isa::Avx512, float>, Path<isa::Avx512, Bf16>,
                               Path<isa::Avx512Bf16, float>, Path<isa::Avx512Bf16, Bf16>>;
#elif SWITCHMOE_KERNELS_HAS_AVX512
using Paths = ::testing::Types<Path<isa::Portable, float>, Path<isa::Portable, Bf16>,
                               Path<isa::Avx512, float>, Path<isa::Avx512, Bf16>>;
#else
using Paths = ::testing::Types<Path<isa::Portable, float>, Path<isa::Portable, Bf16>>;
#endif

template <class Isa>
std::string isa_name() {
  if constexpr (std::is_same_v<Isa, isa::Portable>) return "Portable";
  if constexpr (std::is_same_v<Isa, isa::Avx512>) return "Avx512";
  if constexpr (std::is_same_v<Isa, isa::Avx512Bf16>) return "Avx512Bf16";
  return "Unknown";
}

struct PathNames {
  template <class P>
  static std::string GetName(int) {
    return isa_name<typename P::Isa>() +
           (std::is_same_v<typename P::Element, float> ? "Fp32" : "Bf16");
  }
};
TYPED_TEST_SUITE(GemmPathTest, Paths, PathNames);

constexpr Transpose kBoth[] = {Transpose::kNo, Transpose::kYes};

// Odd sizes 1..70 (not multiples of any register tile; last row tiles of every height class the
// AVX-512 kernels specialize: 1-2, 3-4, 5-8, 9-14 rows), every transpose combination, beta 0/1,
// tight and padded leading dimensions.
TYPED_TEST(GemmPathTest, OddSizesAllTransposesMatchReference) {
  const int shapes[][3] = {{1, 1, 1},   {1, 70, 3},   {70, 1, 5},   {2, 3, 2},   {13, 33, 17},
                           {14, 32, 8}, {15, 31, 9},  {29, 65, 70}, {6, 17, 64}, {41, 48, 1},
                           {4, 9, 5},   {17, 40, 12}, {22, 33, 20}};
  for (const auto& s : shapes) {
    for (Transpose ta : kBoth) {
      for (Transpose tb : kBoth) {
        for (float beta : {0.0f, 1.0f}) {
          for (int pad : {0, 3}) this->check(s[0], s[1], s[2], ta, tb, beta, pad);
        }
      }
    }
  }
}

// Sizes crossing the cache blocks (k beyond each path's kKc, m beyond kMc, n beyond kNc), so
// several k blocks accumulate and several tiles run in parallel.
TYPED_TEST(GemmPathTest, MultipleCacheBlocksMatchReference) {
  const int kc = TestFixture::kKc;
  this->check(19, 45, kc + 88, Transpose::kNo, Transpose::kNo, 1.0f, 1);
  this->check(23, 37, 2 * kc + 52, Transpose::kYes, Transpose::kYes, 0.0f, 0);
  this->check(150, 530, 7, Transpose::kNo, Transpose::kYes, 0.0f, 2);
  this->check(143, 40, 33, Transpose::kYes, Transpose::kNo, 1.0f, 0);
}

TYPED_TEST(GemmPathTest, GeneralBetaScalesC) {
  this->check(9, 21, 13, Transpose::kNo, Transpose::kNo, 0.5f, 1);
}

// m, n or k == 0: nothing to compute; k == 0 gives C = beta * C (zeros for beta 0, even over NaN).
TYPED_TEST(GemmPathTest, ZeroSizes) {
  using T = typename TestFixture::T;
  using Isa = typename TestFixture::Isa;
  GemmProblem<T> empty;  // all zero, all nullptr
  EXPECT_NO_THROW((gemm<T, Isa>(empty)));
  EXPECT_NO_THROW((gemm_batch<T, Isa>(std::vector<GemmProblem<T>>{})));

  for (float beta : {0.0f, 1.0f}) {
    OwnedProblem<T> p = make_problem<T>(5, 7, 0, Transpose::kNo, Transpose::kNo, beta, 2, 7u);
    const std::vector<float> old_c = p.c;
    gemm<T, Isa>(p.view());
    for (int i = 0; i < p.m; ++i) {
      for (int j = 0; j < p.ldc; ++j) {
        const std::size_t idx = static_cast<std::size_t>(i) * p.ldc + j;
        const float expected = j >= p.n ? kSentinel : (beta == 0.0f ? 0.0f : old_c[idx]);
        EXPECT_EQ(p.c[idx], expected)
            << "k = 0, beta = " << beta << " at (" << i << ", " << j << ")";
      }
    }
  }
  // m == 0 or n == 0: C (possibly nullptr) untouched, operands may be nullptr.
  GemmProblem<T> no_rows;
  no_rows.n = 4;
  no_rows.k = 3;
  EXPECT_NO_THROW((gemm<T, Isa>(no_rows)));
  OwnedProblem<T> no_cols = make_problem<T>(3, 0, 4, Transpose::kNo, Transpose::kNo, 0.0f, 1, 8u);
  gemm<T, Isa>(no_cols.view());
  for (float v : no_cols.c) EXPECT_EQ(v, kSentinel);
}

// A batch of expert-like problems with very different m: results identical bit for bit with 1
// and 2 threads, and identical to running each problem alone.
TYPED_TEST(GemmPathTest, BitwiseIndependentOfThreadCountAndBatching) {
  using T = typename TestFixture::T;
  using Isa = typename TestFixture::Isa;
  // The tall narrow last problem gives enough row blocks for the tiles to span several kMc
  // blocks with 1 thread but not with 2: the tiling differs, the bits must not.
  const int rows[] = {0, 1, 37, 150, 5, 90, 700};
  std::vector<OwnedProblem<T>> owned;
  for (int e = 0; e < 7; ++e) {
    const Transpose ta = e % 2 ? Transpose::kYes : Transpose::kNo;
    const Transpose tb = e % 3 ? Transpose::kNo : Transpose::kYes;
    const int n = e == 6 ? 33 : 530;
    const int k = TestFixture::kKc + 44 + e;  // two k blocks, the second partial
    owned.push_back(make_problem<T>(rows[e], n, k, ta, tb, e % 2 ? 1.0f : 0.0f, 1, e));
  }
  auto run = [&](int threads, bool batched) {
    std::vector<OwnedProblem<T>> work = owned;
    std::vector<GemmProblem<T>> problems;
    for (auto& w : work) problems.push_back(w.view());
    const int saved = omp_get_max_threads();
    omp_set_num_threads(threads);
    if (batched) {
      gemm_batch<T, Isa>(problems);
    } else {
      for (const auto& p : problems) gemm<T, Isa>(p);
    }
    omp_set_num_threads(saved);
    std::vector<float> all;
    for (const auto& w : work) all.insert(all.end(), w.c.begin(), w.c.end());
    return all;
  };
  const std::vector<float> one = run(1, true);
  const std::vector<float> two = run(2, true);
  const std::vector<float> alone = run(2, false);
  ASSERT_EQ(one.size(), two.size());
  EXPECT_EQ(0, std::memcmp(one.data(), two.data(), one.size() * sizeof(float)))
      << "1 thread and 2 threads differ";
  EXPECT_EQ(0, std::memcmp(one.data(), alone.data(), one.size() * sizeof(float)))
      << "batched and one-by-one differ";
}

// compute_tile's balanced row tiles (a row block split into tiles of nearly equal height,
// kernels::detail::balanced_row_tiles) against kMr-row tiles and a remainder: every row count
// from 1 to 70 and some beyond a kMc block (139-141, 256), k over several k blocks, op(A) as
// stored and transposed (which keeps kMr-row tiles): the same bits either way, and the double
// reference.
TYPED_TEST(GemmPathTest, BalancedRowTilesBitwiseEqualKmrRowTiles) {
  using T = typename TestFixture::T;
  using Isa = typename TestFixture::Isa;
  std::atomic<bool>& balanced = switchmoe::kernels::detail::balanced_row_tiles();
  std::vector<int> rows;
  for (int m = 1; m <= 70; ++m) rows.push_back(m);
  for (int m : {139, 140, 141, 256}) rows.push_back(m);
  for (int m : rows) {
    for (Transpose ta : kBoth) {
      // several k blocks for a third of the row counts
      const int k = m % 3 == 0 ? TestFixture::kKc + 88 : 77;
      const OwnedProblem<T> before =
          make_problem<T>(m, 70, k, ta, Transpose::kNo, m % 2 ? 1.0f : 0.0f, 1, 500u + m);
      OwnedProblem<T> even = before, kmr = before;
      balanced = true;
      gemm<T, Isa>(even.view());
      balanced = false;
      gemm<T, Isa>(kmr.view());
      balanced = true;
      const std::string label = "m=" + std::to_string(m) + " k=" + std::to_string(k) +
                                " ta=" + std::to_string(ta == Transpose::kYes);
      ASSERT_EQ(0, std::memcmp(even.c.data(), kmr.c.data(), even.c.size() * sizeof(float)))
          << label << ": balanced and kMr row tiles differ";
      expect_matches_reference(before, even.c, label);
    }
  }
}

template <class T>
std::string error_of(const GemmProblem<T>& p) {
  try {
    gemm(p);
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "<no exception>";
}

TEST(GemmArguments, BadArgumentsThrowNamingTheArgument) {
  OwnedProblem<float> owned =
      make_problem<float>(4, 5, 6, Transpose::kNo, Transpose::kNo, 0.0f, 0, 3u);
  const GemmProblem<float> good = owned.view();
  EXPECT_EQ(error_of(good), "<no exception>");

  auto with = [&](auto edit) {
    GemmProblem<float> p = good;
    edit(p);
    return error_of(p);
  };
  EXPECT_NE(with([](auto& p) { p.m = -1; }).find("m = -1"), std::string::npos);
  EXPECT_NE(with([](auto& p) { p.k = -2; }).find("k = -2"), std::string::npos);
  EXPECT_NE(with([](auto& p) { p.a = nullptr; }).find("a is nullptr"), std::string::npos);
  EXPECT_NE(with([](auto& p) { p.b = nullptr; }).find("b is nullptr"), std::string::npos);
  EXPECT_NE(with([](auto& p) { p.c = nullptr; }).find("c is nullptr"), std::string::npos);
  EXPECT_NE(with([](auto& p) { p.lda = 5; }).find("lda = 5"), std::string::npos);
  EXPECT_NE(with([](auto& p) { p.ldb = 4; }).find("ldb = 4"), std::string::npos);
  EXPECT_NE(with([](auto& p) { p.ldc = 4; }).find("ldc = 4"), std::string::npos);
  // Transposed operands: lda >= m, ldb >= k.
  EXPECT_NE(with([](auto& p) {
              p.trans_a = Transpose::kYes;
              p.lda = 3;
            }).find("lda = 3, expected >= m"),
            std::string::npos);
  EXPECT_NE(with([](auto& p) {
              p.trans_b = Transpose::kYes;
              p.ldb = 5;
            }).find("ldb = 5, expected >= k"),
            std::string::npos);
  EXPECT_NE(with([](auto& p) { p.beta = std::numeric_limits<float>::infinity(); }).find("beta"),
            std::string::npos);

  // The failing problem of a batch is named, and nothing runs before validation completes.
  std::vector<GemmProblem<float>> batch = {good, good};
  batch[1].ldc = 1;
  try {
    gemm_batch(batch);
    ADD_FAILURE() << "no exception";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("problem 1"), std::string::npos) << e.what();
  }

  GemmProblem<Bf16> bf16_problem;
  bf16_problem.m = 2;
  bf16_problem.n = 2;
  bf16_problem.k = 2;
  EXPECT_NE(error_of(bf16_problem).find("is nullptr"), std::string::npos);
}

// A pre-packed B gives the same bits as packing inside the call, from T data or (for bf16) from
// the float32 master rounded by static_cast; repacking a smaller matrix reuses the storage.
TYPED_TEST(GemmPathTest, PackedBMatchesPlainGemmBitwise) {
  using T = typename TestFixture::T;
  using Isa = typename TestFixture::Isa;
  const int kc = TestFixture::kKc;
  const int shapes[][3] = {{7, 45, 33}, {31, 530, kc + 18}, {1, 1, 1}, {20, 64, 2 * kc + 52}};
  PackedB<T, Isa> packed;  // reused across shapes
  for (const auto& s : shapes) {
    for (Transpose tb : kBoth) {
      for (float beta : {0.0f, 1.0f}) {
        const int m = s[0], n = s[1], k = s[2];
        OwnedProblem<T> plain = make_problem<T>(m, n, k, Transpose::kYes, tb, beta, 2, 77u + k);
        OwnedProblem<T> pre = plain;
        gemm<T, Isa>(plain.view());

        // Pack from a float32 master whose rounding to T is exactly the T operand.
        std::vector<float> master(pre.b.size());
        for (std::size_t i = 0; i < master.size(); ++i) master[i] = static_cast<float>(pre.b[i]);
        packed.pack(master.data(), pre.ldb, tb, k, n);
        ASSERT_EQ(packed.k(), k);
        ASSERT_EQ(packed.n(), n);
        PackedGemmProblem<T, Isa> problem;
        problem.m = m;
        problem.a = pre.a.data();
        problem.lda = pre.lda;
        problem.trans_a = Transpose::kYes;
        problem.b = &packed;
        problem.c = pre.c.data();
        problem.ldc = pre.ldc;
        problem.beta = beta;
        gemm(problem);
        EXPECT_EQ(0, std::memcmp(plain.c.data(), pre.c.data(), plain.c.size() * sizeof(float)))
            << "m=" << m << " n=" << n << " k=" << k << " tb=" << (tb == Transpose::kYes);

        // Packing from T directly gives the same panels.
        PackedB<T, Isa> from_t(pre.b.data(), pre.ldb, tb, k, n);
        OwnedProblem<T> again = make_problem<T>(m, n, k, Transpose::kYes, tb, beta, 2, 77u + k);
        problem.b = &from_t;
        problem.c = again.c.data();
        gemm_batch(std::vector<PackedGemmProblem<T, Isa>>{problem});
        EXPECT_EQ(0, std::memcmp(plain.c.data(), again.c.data(), plain.c.size() * sizeof(float)));
      }
    }
  }
}

// PackedB::end() is the end of the packed panels, the bound up to which the kernels prefetch
// the panels after the current ones (compute_tile, run_thin_rows): the total of every k block's
// panels (a last k block of fewer steps has smaller panels), also after a larger earlier pack
// left more storage; and the last block's last panel ends there.
TYPED_TEST(GemmPathTest, PackedBEndIsTheEndOfThePackedPanels) {
  using T = typename TestFixture::T;
  using Isa = typename TestFixture::Isa;
  using Kernel = switchmoe::kernels::detail::MicroKernel<Isa, T>;
  const int kc = Kernel::kKc;
  const int shapes[][2] = {{2 * kc + 52, 530}, {33, 45}, {1, 1}, {2 * kc, 64}, {kc + 188, 1}};
  PackedB<T, Isa> packed;  // reused: the first shape leaves the largest storage
  for (const auto& s : shapes) {
    const int k = s[0], n = s[1];
    std::vector<float> b(static_cast<std::size_t>(k) * n, 0.5f);  // [k, n]
    packed.pack(b.data(), n, Transpose::kNo, k, n);
    const int panels = (n + Kernel::kNr - 1) / Kernel::kNr;
    const auto panel_size = [&](int kc) {
      return static_cast<std::ptrdiff_t>((kc + Kernel::kKPack - 1) / Kernel::kKPack) * Kernel::kNr *
             Kernel::kKPack;
    };
    std::ptrdiff_t total = 0;
    for (int p0 = 0; p0 < k; p0 += Kernel::kKc) {
      total += panels * panel_size(std::min(Kernel::kKc, k - p0));
    }
    const PackedB<T, Isa>& view = packed;  // the public (const) block()
    EXPECT_EQ(view.end() - view.block(0, 0), total) << "k=" << k << " n=" << n;
    const int last_p0 = (k - 1) / Kernel::kKc * Kernel::kKc;
    EXPECT_EQ(view.block(last_p0, (panels - 1) * Kernel::kNr) + panel_size(k - last_p0), view.end())
        << "k=" << k << " n=" << n;
  }
}

// The epilogue of a batched packed GEMM sees every element of C exactly once, after its product
// is complete (including k == 0 problems, for which C = beta * C), on any thread count; empty
// problems get no call. Checked with an element-wise transform against plain gemm + transform.
TYPED_TEST(GemmPathTest, PackedEpilogueVisitsEveryFinishedElementOnce) {
  using T = typename TestFixture::T;
  using Isa = typename TestFixture::Isa;
  const int n = 530;                        // several kNc blocks and a partial kNr panel
  const int rows[] = {300, 0, 15, 1, 143};  // tall, empty, thin tiles
  // several k blocks; k == 0
  const int ks[] = {TestFixture::kKc + 188, 40, 33, 0, 2 * TestFixture::kKc + 52};
  std::vector<OwnedProblem<T>> expected, actual;
  std::vector<PackedB<T, Isa>> packed(std::size(rows));
  for (std::size_t e = 0; e < std::size(rows); ++e) {
    expected.push_back(make_problem<T>(rows[e], n, ks[e], Transpose::kNo, Transpose::kNo,
                                       e % 2 ? 1.0f : 0.0f, 1, 500u + e));
    actual.push_back(expected.back());
    gemm<T, Isa>(expected.back().view());
    packed[e].pack(actual[e].b.data(), actual[e].ldb, Transpose::kNo, ks[e], n);
  }
  auto transform = [](float v) { return 2.0f * v + 1.0f; };
  for (OwnedProblem<T>& p : expected) {
    for (int i = 0; i < p.m; ++i) {
      for (int j = 0; j < n; ++j) p.c[i * p.ldc + j] = transform(p.c[i * p.ldc + j]);
    }
  }
  const int saved = omp_get_max_threads();
  for (int threads : {1, 2, 3}) {
    omp_set_num_threads(threads);
    std::vector<OwnedProblem<T>> run = actual;
    std::vector<PackedGemmProblem<T, Isa>> problems;
    std::vector<std::vector<std::atomic<int>>> visits(std::size(rows));
    for (std::size_t e = 0; e < run.size(); ++e) {
      visits[e] = std::vector<std::atomic<int>>(static_cast<std::size_t>(rows[e]) * n);
      PackedGemmProblem<T, Isa> q;
      q.m = rows[e];
      q.a = run[e].a.empty() ? nullptr : run[e].a.data();
      q.lda = run[e].lda;
      q.b = &packed[e];
      q.c = run[e].c.data();
      q.ldc = run[e].ldc;
      q.beta = run[e].beta;
      problems.push_back(q);
    }
    std::atomic<int> bad_calls{0};
    gemm_batch(problems, [&](int problem, int i0, int block_rows, int j0, int cols) {
      const OwnedProblem<T>& p = run[problem];
      if (block_rows < 1 || cols < 1 || i0 < 0 || i0 + block_rows > p.m || j0 < 0 ||
          j0 + cols > n) {
        ++bad_calls;
        return;
      }
      for (int i = i0; i < i0 + block_rows; ++i) {
        for (int j = j0; j < j0 + cols; ++j) {
          ++visits[problem][static_cast<std::size_t>(i) * n + j];
          float& c = run[problem].c[static_cast<std::size_t>(i) * p.ldc + j];
          c = transform(c);
        }
      }
    });
    EXPECT_EQ(bad_calls.load(), 0);
    for (std::size_t e = 0; e < run.size(); ++e) {
      for (const std::atomic<int>& v : visits[e]) ASSERT_EQ(v.load(), 1) << "problem " << e;
      EXPECT_EQ(expected[e].c, run[e].c) << "problem " << e << ", " << threads << " threads";
    }
  }
  omp_set_num_threads(saved);
}

TEST(GemmArguments, PackedBBadArgumentsThrow) {
  std::vector<float> w(12, 1.0f);
  PackedB<float> packed;
  try {
    packed.pack(w.data(), 3, Transpose::kNo, 3, 4);
    ADD_FAILURE() << "no exception";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("ldb = 3, expected >= n"), std::string::npos) << e.what();
  }
  EXPECT_THROW(packed.pack(static_cast<const float*>(nullptr), 4, Transpose::kNo, 3, 4),
               std::invalid_argument);
  EXPECT_THROW(packed.pack(w.data(), 4, Transpose::kNo, -1, 4), std::invalid_argument);
  packed.pack(w.data(), 4, Transpose::kNo, 3, 4);
  std::vector<float> a(6, 1.0f), c(8, 0.0f);
  PackedGemmProblem<float> p;
  p.m = 2;
  p.a = a.data();
  p.lda = 3;
  p.b = nullptr;
  p.c = c.data();
  p.ldc = 4;
  try {
    gemm(p);
    ADD_FAILURE() << "no exception";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("b is nullptr"), std::string::npos) << e.what();
  }
  p.b = &packed;
  p.lda = 2;
  try {
    gemm(p);
    ADD_FAILURE() << "no exception";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("lda = 2"), std::string::npos) << e.what();
  }
  p.lda = 3;
  gemm(p);
  for (float v : c) EXPECT_EQ(v, 3.0f);
}

}  // namespace
