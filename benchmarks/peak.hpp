#pragma once
// Peak arithmetic throughput of one core, measured with independent chains in registers, so
// that kernel benchmarks can report a fraction of the peak measured in the same run:
//   peak_fp32_fma:  vfmadd231ps zmm (2 flops x 16 lanes per instruction)
//   peak_bf16_dot:  vdpbf16ps zmm  (2 products + 2 adds x 16 lanes = 64 flops per instruction)
// Counter "GFLOPS" is per thread and per wall-clock second (kAvgThreads); ->Threads(2) shows
// whether both cores reach it. On a shared machine, report.py uses the threads:1 run and
// GFLOP / cpu_time (the flops per second of CPU time actually given to the benchmark).

#include <benchmark/benchmark.h>

#include <cstddef>
#include <cstdlib>
#include <memory>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace switchmoe_bench {

inline constexpr int kPeakChains = 24;  // > latency x throughput (4 x 2) with margin
inline constexpr int kPeakInnerIters = 4096;

// Sets counter `amount_name` to `giga`, the amount one thread handles per iteration in 10^9
// units (Google Benchmark sums it over threads, so amount / cpu_time is a per-core rate), and
// `rate_name` to that amount per wall-clock second and thread.
inline void set_amount_counters(benchmark::State& state, const char* amount_name,
                                const char* rate_name, double giga) {
  state.counters[amount_name] = giga;
  state.counters[rate_name] =
      benchmark::Counter(giga * static_cast<double>(state.iterations()),
                         benchmark::Counter::kIsRate | benchmark::Counter::kAvgThreads);
}

#if defined(__AVX512F__)
inline void BM_peak_fp32_fma(benchmark::State& state) {
  __m512 acc[kPeakChains];
  for (int i = 0; i < kPeakChains; ++i) acc[i] = _mm512_set1_ps(0.001f * i);
  const __m512 x = _mm512_set1_ps(0.999999f);
  const __m512 y = _mm512_set1_ps(1e-7f);
  for (auto _ : state) {
    for (int it = 0; it < kPeakInnerIters; ++it) {
#pragma GCC unroll 32
      for (int i = 0; i < kPeakChains; ++i) acc[i] = _mm512_fmadd_ps(acc[i], x, y);
    }
#pragma GCC unroll 32
    for (int i = 0; i < kPeakChains; ++i) benchmark::DoNotOptimize(acc[i]);
  }
  set_amount_counters(state, "GFLOP", "GFLOPS", 2.0 * 16 * kPeakChains * kPeakInnerIters * 1e-9);
}
BENCHMARK(BM_peak_fp32_fma)->Name("peak_fp32_fma")->UseRealTime()->Threads(1)->Threads(2);
#endif

#if defined(__AVX512F__) && defined(__AVX512BF16__)
inline void BM_peak_bf16_dot(benchmark::State& state) {
  __m512 acc[kPeakChains];
  for (int i = 0; i < kPeakChains; ++i) acc[i] = _mm512_set1_ps(0.001f * i);
  const __m512bh x = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3f), _mm512_set1_ps(-1e-3f));
  const __m512bh y = _mm512_cvtne2ps_pbh(_mm512_set1_ps(0.5f), _mm512_set1_ps(0.25f));
  for (auto _ : state) {
    for (int it = 0; it < kPeakInnerIters; ++it) {
#pragma GCC unroll 32
      for (int i = 0; i < kPeakChains; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], x, y);
    }
#pragma GCC unroll 32
    for (int i = 0; i < kPeakChains; ++i) benchmark::DoNotOptimize(acc[i]);
  }
  set_amount_counters(state, "GFLOP", "GFLOPS", 4.0 * 16 * kPeakChains * kPeakInnerIters * 1e-9);
}
BENCHMARK(BM_peak_bf16_dot)->Name("peak_bf16_dot")->UseRealTime()->Threads(1)->Threads(2);
#endif

// Memory read bandwidth: every thread streams its own 256 MiB buffer (far beyond the caches),
// summing it with AVX-512 loads. Counter "GBs" is per thread (kAvgThreads); threads:2 times 2
// is what both cores get together. The expert weights of a many-expert layer are streamed from
// memory at every call, so this bounds the time of a call from below (report.py).
#if defined(__AVX512F__)
inline void BM_peak_mem_read(benchmark::State& state) {
  constexpr std::size_t kFloats = std::size_t{64} << 20;  // 256 MiB
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  std::unique_ptr<float, Free> buffer(
      static_cast<float*>(std::aligned_alloc(64, kFloats * sizeof(float))));
  float* data = buffer.get();
  for (std::size_t i = 0; i < kFloats; ++i) data[i] = 1e-9f * static_cast<float>(i & 1023);
  for (auto _ : state) {
    __m512 acc[8];
    for (__m512& a : acc) a = _mm512_setzero_ps();
    for (std::size_t i = 0; i < kFloats; i += 128) {
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) acc[j] = _mm512_add_ps(acc[j], _mm512_load_ps(data + i + 16 * j));
    }
    for (const __m512& a : acc) benchmark::DoNotOptimize(a);
  }
  set_amount_counters(state, "GB", "GBs", static_cast<double>(kFloats) * sizeof(float) * 1e-9);
}
BENCHMARK(BM_peak_mem_read)->Name("peak_mem_read")->UseRealTime()->Threads(1)->Threads(2);
#endif

}  // namespace switchmoe_bench
