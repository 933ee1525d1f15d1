// Tests of the instruction-set tags (switchmoe/kernels/isa.hpp): which kernel each tag names,
// the row conversion of each tag against an independent rounding reference, two translation
// units with different targets linked together, and leading dimensions above 2^31 elements.

#include <gtest/gtest.h>
#include <sys/mman.h>

#include <Eigen/Core>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "switchmoe/kernels/convert.hpp"
#include "switchmoe/kernels/gemm.hpp"
#include "switchmoe/kernels/packed_b.hpp"

namespace {

namespace kernels = switchmoe::kernels;
namespace isa = switchmoe::kernels::isa;
using kernels::GemmProblem;
using kernels::Transpose;
using Bf16 = Eigen::bfloat16;

// ---- which kernel each tag names --------------------------------------------------------------

TEST(IsaTags, NativeIsTheBestTagOfTheTarget) {
  static_assert(std::is_base_of_v<isa::Avx512, isa::Avx512Bf16>);
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
  EXPECT_TRUE((std::is_same_v<isa::Native, isa::Avx512Bf16>));
#elif defined(__AVX512F__)
  EXPECT_TRUE((std::is_same_v<isa::Native, isa::Avx512>));
#else
  EXPECT_TRUE((std::is_same_v<isa::Native, isa::Portable>));
#endif
}

#if SWITCHMOE_KERNELS_HAS_AVX512
// Avx512 always widens bf16 to float (whatever the flags); only Avx512Bf16 packs bf16 pairs.
TEST(IsaTags, Avx512Bf16KernelIsWidenedFloat) {
  using Kernel = kernels::detail::MicroKernel<isa::Avx512, Bf16>;
  EXPECT_TRUE((std::is_same_v<Kernel::Packed, float>));
  EXPECT_EQ(Kernel::kKPack, 1);
}
#endif

#if SWITCHMOE_KERNELS_HAS_AVX512BF16
TEST(IsaTags, Avx512Bf16TagPacksBf16PairsAndReusesTheFloatKernel) {
  using Dot = kernels::detail::MicroKernel<isa::Avx512Bf16, Bf16>;
  EXPECT_TRUE((std::is_same_v<Dot::Packed, std::uint16_t>));
  EXPECT_EQ(Dot::kKPack, 2);
  using Float = kernels::detail::MicroKernel<isa::Avx512Bf16, float>;
  EXPECT_TRUE((std::is_base_of_v<kernels::detail::MicroKernel<isa::Avx512, float>, Float>));

  // Same float kernel: the same bits.
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  const int m = 37, n = 70, k = 300;
  std::vector<float> a(m * k), b(k * n), c1(m * n), c2(m * n);
  for (float& x : a) x = dist(rng);
  for (float& x : b) x = dist(rng);
  kernels::gemm<float, isa::Avx512>(
      {m, n, k, a.data(), k, Transpose::kNo, b.data(), n, Transpose::kNo, c1.data(), n, 0.0f});
  kernels::gemm<float, isa::Avx512Bf16>(
      {m, n, k, a.data(), k, Transpose::kNo, b.data(), n, Transpose::kNo, c2.data(), n, 0.0f});
  EXPECT_EQ(0, std::memcmp(c1.data(), c2.data(), c1.size() * sizeof(float)));
}
#endif

// ---- row conversion ---------------------------------------------------------------------------

// Round to nearest even of a float32 to bf16, on the bit pattern (finite inputs).
std::uint16_t bf16_bits_reference(float x) {
  std::uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const std::uint32_t rounding = 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<std::uint16_t>((bits + rounding) >> 16);
}

bool is_denormal(float x) { return x != 0.0f && std::fpclassify(x) == FP_SUBNORMAL; }

// Values with every rounding case: ties (even and odd), just above and below ties, powers of
// two, large and tiny normal numbers, zeros, and denormals.
std::vector<float> conversion_inputs() {
  std::vector<float> v = {0.0f,
                          -0.0f,
                          1.0f,
                          -1.0f,
                          3.0f,
                          1e-30f,
                          -1e30f,
                          65504.0f,
                          std::numeric_limits<float>::min(),
                          std::numeric_limits<float>::max(),
                          std::numeric_limits<float>::denorm_min(),
                          -1e-40f,
                          3e-39f};
  for (std::uint32_t base : {0x3F800000u, 0x40490000u, 0xC1230000u}) {
    for (std::uint32_t low : {0x8000u, 0x18000u, 0x7FFFu, 0x8001u, 0x17FFFu, 0x1u, 0xFFFFu}) {
      const std::uint32_t bits = base | low;
      float x;
      std::memcpy(&x, &bits, sizeof(x));
      v.push_back(x);
    }
  }
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> dist(-100.0f, 100.0f);
  for (int i = 0; i < 200; ++i) v.push_back(dist(rng));
  return v;
}

template <class Isa>
const char* isa_name_for_message() {
  return std::is_same_v<Isa, isa::Portable>
             ? "Portable"
             : (std::is_same_v<Isa, isa::Avx512> ? "Avx512" : "Avx512Bf16");
}

template <class Isa>
void check_conversion(bool flushes_denormals) {
  const std::vector<float> input = conversion_inputs();
  // Every length 0..40 from every start 0..2, so that masked tails and offsets are covered.
  for (int start = 0; start < 3; ++start) {
    for (int n = 0; n <= 40; ++n) {
      std::vector<Bf16> out(64, Bf16(-7.0f));  // sentinel beyond n
      kernels::convert_row<Isa>(input.data() + start, out.data(), n);
      for (int j = 0; j < 64; ++j) {
        const std::uint16_t got = Eigen::numext::bit_cast<std::uint16_t>(out[j]);
        if (j >= n) {
          ASSERT_EQ(static_cast<float>(out[j]), -7.0f) << "wrote past n = " << n;
          continue;
        }
        const float x = input[start + j];
        const float expected_input =
            flushes_denormals && is_denormal(x) ? std::copysign(0.0f, x) : x;
        ASSERT_EQ(got, bf16_bits_reference(expected_input))
            << isa_name_for_message<Isa>() << ": x = " << x << " at " << j << " of " << n;
      }
    }
  }
  std::vector<float> copy(5);
  const float src[5] = {1.5f, -2.0f, 1e-40f, 7.0f, 0.1f};
  kernels::convert_row<Isa>(src, copy.data(), 5);
  EXPECT_EQ(0, std::memcmp(src, copy.data(), sizeof(src)));
}

TEST(ConvertRow, PortableRoundsToNearestEven) { check_conversion<isa::Portable>(false); }

#if SWITCHMOE_KERNELS_HAS_AVX512
TEST(ConvertRow, Avx512RoundsToNearestEven) { check_conversion<isa::Avx512>(false); }
#endif

#if SWITCHMOE_KERNELS_HAS_AVX512BF16
// vcvtneps2bf16 treats float32 denormal inputs as zero (documented in convert.hpp).
TEST(ConvertRow, Avx512Bf16RoundsToNearestEvenAndFlushesDenormals) {
  check_conversion<isa::Avx512Bf16>(true);
}
#endif

// ---- two translation units with different targets in one program ---------------------------

#if defined(SWITCHMOE_TEST_OTHER_UNIT) && SWITCHMOE_KERNELS_HAS_AVX512BF16
}  // namespace
namespace other_unit {
void gemm_native(const GemmProblem<Bf16>& p);
void convert_native(const float* src, Bf16* dst, int n);
}  // namespace other_unit
namespace {

// The other unit (no AVX512_BF16) calls gemm and convert_row by their default names, as this
// unit does; each must get the kernel of its own target, not whichever copy the linker kept.
TEST(IsaTags, UnitsBuiltForDifferentTargetsKeepTheirOwnKernels) {
  std::mt19937 rng(9);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  const int m = 29, n = 65, k = 301;  // odd k: the pair kernel pads, the float one does not
  std::vector<Bf16> a(m * k), b(k * n);
  for (Bf16& x : a) x = Bf16(dist(rng));
  for (Bf16& x : b) x = Bf16(dist(rng));
  auto run = [&](auto gemm_call) {
    std::vector<float> c(m * n);
    gemm_call(GemmProblem<Bf16>{m, n, k, a.data(), k, Transpose::kNo, b.data(), n, Transpose::kNo,
                                c.data(), n, 0.0f});
    return c;
  };
  const std::vector<float> other =
      run([](const GemmProblem<Bf16>& p) { other_unit::gemm_native(p); });
  const std::vector<float> here = run([](const GemmProblem<Bf16>& p) { kernels::gemm(p); });
  const std::vector<float> widened =
      run([](const GemmProblem<Bf16>& p) { kernels::gemm<Bf16, isa::Avx512>(p); });
  const std::vector<float> dot =
      run([](const GemmProblem<Bf16>& p) { kernels::gemm<Bf16, isa::Avx512Bf16>(p); });
  EXPECT_EQ(0, std::memcmp(other.data(), widened.data(), other.size() * sizeof(float)));
  EXPECT_EQ(0, std::memcmp(here.data(), dot.data(), here.size() * sizeof(float)));

  // A denormal: rounded by the other unit (scalar conversion), flushed to zero by this one.
  const float denormal = 3e-39f;
  Bf16 from_other, from_here;
  other_unit::convert_native(&denormal, &from_other, 1);
  kernels::convert_row(&denormal, &from_here, 1);
  EXPECT_EQ(Eigen::numext::bit_cast<std::uint16_t>(from_other), bf16_bits_reference(denormal));
  EXPECT_EQ(Eigen::numext::bit_cast<std::uint16_t>(from_here), 0u);
}
#endif

// ---- sizes and strides ------------------------------------------------------------------------

TEST(KernelSizes, ToIntAcceptsIntsAndNamesWhatDoesNotFit) {
  EXPECT_EQ(kernels::detail::to_int("rows", 0), 0);
  EXPECT_EQ(kernels::detail::to_int("rows", INT_MAX), INT_MAX);
  EXPECT_EQ(kernels::detail::to_int("rows", -3), -3);
  try {
    kernels::detail::to_int("x.rows()", std::int64_t{INT_MAX} + 1);
    ADD_FAILURE() << "no exception";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("x.rows() = 2147483648"), std::string::npos) << e.what();
  }
  EXPECT_THROW(kernels::detail::to_int("n", std::int64_t{INT_MIN} - 1), std::invalid_argument);
}

// An anonymous private mapping reserved but not committed: only the pages touched use memory.
class SparseMapping {
 public:
  explicit SparseMapping(std::size_t bytes) : bytes_(bytes) {
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    data_ = p == MAP_FAILED ? nullptr : p;
  }
  ~SparseMapping() {
    if (data_ != nullptr) munmap(data_, bytes_);
  }
  SparseMapping(const SparseMapping&) = delete;
  SparseMapping& operator=(const SparseMapping&) = delete;
  void* data() const { return data_; }

 private:
  std::size_t bytes_;
  void* data_ = nullptr;
};

// A stride just above INT_MAX elements: every operand's rows (or columns, transposed) lie
// 2^31 + 64 elements apart, in mappings of tens of GB of which a few pages are touched. A, B and
// C share one row stride; B and C sit at offsets 4096 and 8192 of each row so they do not overlap
// A. m = 16 covers a full AVX-512 panel (14 rows) and an edge panel.
template <class T, class Isa>
void check_huge_strides(Transpose ta, Transpose tb) {
  constexpr std::ptrdiff_t kStride = (std::ptrdiff_t{1} << 31) + 64;
  const int m = 16, n = 40, k = 4;
  const int a_rows = ta == Transpose::kNo ? m : k;
  const int b_rows = tb == Transpose::kNo ? k : n;
  const int rows = std::max({a_rows, b_rows, m});
  SparseMapping operands(static_cast<std::size_t>(rows + 1) * kStride * sizeof(T));
  SparseMapping output(static_cast<std::size_t>(m + 1) * kStride * sizeof(float));
  if (operands.data() == nullptr || output.data() == nullptr) {
    GTEST_SKIP() << "cannot map " << (rows + 1) * kStride * sizeof(T) << " bytes of address space";
  }
  T* a = static_cast<T*>(operands.data());
  T* b = a + 4096;
  float* c = static_cast<float*>(output.data()) + 8192;
  // op(A)(i, p) = a[i * kStride + p] or a[p * kStride + i]; likewise B.
  auto a_at = [&](int i, int p) -> T& {
    return ta == Transpose::kNo ? a[i * kStride + p] : a[p * kStride + i];
  };
  auto b_at = [&](int p, int j) -> T& {
    return tb == Transpose::kNo ? b[p * kStride + j] : b[j * kStride + p];
  };
  for (int i = 0; i < m; ++i) {
    for (int p = 0; p < k; ++p) a_at(i, p) = T(static_cast<float>(i - 2 * p) * 0.25f);
  }
  for (int p = 0; p < k; ++p) {
    for (int j = 0; j < n; ++j) b_at(p, j) = T(static_cast<float>(j % 7 + p) * 0.5f);
  }
  for (int i = 0; i < m; ++i) {
    for (int j = 0; j <= n; ++j) c[i * kStride + j] = 100.0f;  // j == n: must survive
  }
  GemmProblem<T> problem{m, n, k, a, kStride, ta, b, kStride, tb, c, kStride, 1.0f};
  kernels::gemm<T, Isa>(problem);
  auto expect_c = [&](const char* what) {
    for (int i = 0; i < m; ++i) {
      for (int j = 0; j < n; ++j) {
        double sum = 100.0;  // beta * old C; small exact values: the result is exact
        for (int p = 0; p < k; ++p) {
          sum += static_cast<double>(static_cast<float>(a_at(i, p))) *
                 static_cast<double>(static_cast<float>(b_at(p, j)));
        }
        ASSERT_EQ(c[i * kStride + j], sum) << what << " at (" << i << ", " << j << ")";
      }
      ASSERT_EQ(c[i * kStride + n], 100.0f) << what << ": wrote past n in row " << i;
    }
  };
  expect_c("gemm");

  // The same through a PackedB packed with the huge ldb, and a PackedGemmProblem.
  kernels::PackedB<T, Isa> packed(b, kStride, tb, k, n);
  for (int i = 0; i < m; ++i) {
    for (int j = 0; j <= n; ++j) c[i * kStride + j] = 100.0f;
  }
  kernels::PackedGemmProblem<T, Isa> packed_problem;
  packed_problem.m = m;
  packed_problem.a = a;
  packed_problem.lda = kStride;
  packed_problem.trans_a = ta;
  packed_problem.b = &packed;
  packed_problem.c = c;
  packed_problem.ldc = kStride;
  packed_problem.beta = 1.0f;
  kernels::gemm(packed_problem);
  expect_c("packed gemm");
}

template <class Isa>
void check_huge_strides_all() {
  for (Transpose ta : {Transpose::kNo, Transpose::kYes}) {
    for (Transpose tb : {Transpose::kNo, Transpose::kYes}) {
      check_huge_strides<float, Isa>(ta, tb);
      check_huge_strides<Bf16, Isa>(ta, tb);
      if (::testing::Test::HasFatalFailure() || ::testing::Test::IsSkipped()) return;
    }
  }
}

TEST(KernelSizes, LeadingDimensionsAboveIntMaxPortable) { check_huge_strides_all<isa::Portable>(); }

#if SWITCHMOE_KERNELS_HAS_AVX512
TEST(KernelSizes, LeadingDimensionsAboveIntMaxAvx512) { check_huge_strides_all<isa::Avx512>(); }
#endif

#if SWITCHMOE_KERNELS_HAS_AVX512BF16
TEST(KernelSizes, LeadingDimensionsAboveIntMaxAvx512Bf16) {
  check_huge_strides_all<isa::Avx512Bf16>();
}
#endif

}  // namespace
