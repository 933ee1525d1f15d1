#pragma once
// Instruction-set tags of the GEMM kernels (xsimd / Highway style): the ISA is part of every
// kernel's type, as a defaulted template parameter.
//
// Why in the type (the one-definition rule): a header-only library is compiled into every
// translation unit (TU) of a program, possibly with different -march flags. If one name, say
// MicroKernel<Avx512, bfloat16>, had a vdpbf16ps body (and a uint16 packed layout) in a TU built
// with AVX512_BF16 and a widened-float body elsewhere, the program would hold two different
// definitions of one entity; the linker keeps one of them for both TUs, and the other TU then
// runs code whose layout it does not expect (or instructions its target lacks). So every tag
// names one fixed body:
//   MicroKernel<Avx512, bfloat16>      always the widened-float kernel;
//   MicroKernel<Avx512Bf16, bfloat16>  always the vdpbf16ps kernel;
// and a kernel exists in a TU only when the TU is compiled for its instructions (using a tag the
// TU was not compiled for is a static_assert, not a silent fallback). Only `Native`, an alias,
// differs between TUs: gemm<float> means gemm<float, Avx512Bf16> in one TU and
// gemm<float, Portable> in another, which are two different functions. The same holds for every
// non-template function whose body would depend on ISA macros: there are none; convert_row is
// templated on the tag for this reason (convert.hpp).
//
// What remains the user's business: code of one tag compiled with different flags (e.g.
// -mavx512f and -march=sapphirerapids) is the same source, hence one definition, but the linker
// keeps one compiled copy; build the TUs of one program for targets the machine supports.

namespace switchmoe::kernels::isa {

// Plain C++ micro-kernel on float; bf16 operands are widened to float while packing. Always
// available, and the tested reference path everywhere.
struct Portable {};

// AVX-512F fp32 FMA micro-kernel; bf16 operands are widened to float while packing (as for
// Portable, products exact, float32 accumulation). Needs a TU compiled for AVX-512F.
struct Avx512 {};

// Avx512 plus AVX512_BF16 (with AVX512BW): bf16 operands use vdpbf16ps on pairs of k values,
// float32 accumulation; float operands use Avx512's kernel (the tag refines Avx512, xsimd style).
// Needs a TU compiled for AVX512F, AVX512BW and AVX512_BF16 (e.g. -march=native on
// Zen 4/5, Sapphire Rapids).
struct Avx512Bf16 : Avx512 {};

}  // namespace switchmoe::kernels::isa

// Internal: which tags this TU can use. Macros (not inline variables), so that no entity with
// linkage has a value that depends on the compiler flags.
#if defined(__AVX512F__)
#define SWITCHMOE_KERNELS_HAS_AVX512 1
#else
#define SWITCHMOE_KERNELS_HAS_AVX512 0
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define SWITCHMOE_KERNELS_HAS_AVX512BF16 1
#else
#define SWITCHMOE_KERNELS_HAS_AVX512BF16 0
#endif

namespace switchmoe::kernels::isa {

// The best tag the TU's target supports: the default of every kernels entry point.
#if SWITCHMOE_KERNELS_HAS_AVX512BF16
using Native = Avx512Bf16;
#elif SWITCHMOE_KERNELS_HAS_AVX512
using Native = Avx512;
#else
using Native = Portable;
#endif

}  // namespace switchmoe::kernels::isa
