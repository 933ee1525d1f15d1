#pragma once
// Instruction-set tags of the GEMM kernels (xsimd / Highway style: the ISA is a defaulted
// template parameter, the portable path is always available and tested).

namespace switchmoe::kernels::isa {

// Plain C++ micro-kernel on float; bf16 operands are widened to float while packing.
struct Portable {};

// AVX-512F fp32 FMA micro-kernel; with AVX512_BF16 the bf16 kernel uses vdpbf16ps
// (pairs of bf16 along k, float32 accumulation). Only usable when the translation unit is
// compiled for a target with AVX-512F (e.g. -march=native on Zen 4/5, Sapphire Rapids).
struct Avx512 {};

#if defined(__AVX512F__)
inline constexpr bool kHasAvx512 = true;
using Native = Avx512;
#else
inline constexpr bool kHasAvx512 = false;
using Native = Portable;
#endif

#if defined(__AVX512F__) && defined(__AVX512BF16__)
inline constexpr bool kHasAvx512Bf16 = true;
#else
inline constexpr bool kHasAvx512Bf16 = false;
#endif

}  // namespace switchmoe::kernels::isa
