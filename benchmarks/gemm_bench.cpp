// switchmoe::kernels GEMM vs Eigen's fp32 GEMM at expert-sized shapes.
//
// Arguments of every benchmark: m (tokens), k (input features), n (output features), threads,
// op: 0 = forward      C[m,n]  = A[m,k] * W[k,n]
//     1 = data grad    dA[m,k] = dC[m,n] * W[k,n]^T          (trans_b)
//     2 = weight grad  dW[k,n] += A[m,k]^T * dC[m,n]         (trans_a, beta = 1)
// Counter GFLOPS = 2 m k n / time (real time; the peak benchmarks of peak.hpp run in the same
// program so report.py can express it as a percent of the measured peak).
//
//   gemm_bench --benchmark_filter='peak|gemm/' --benchmark_min_time=0.3
//              --benchmark_repetitions=3 --benchmark_format=json > gemm.json

#include <benchmark/benchmark.h>
#include <omp.h>

#include <Eigen/Core>
#include <random>
#include <string>
#include <vector>

#include "peak.hpp"
#include "switchmoe/core/buffer.hpp"
#include "switchmoe/kernels/gemm.hpp"
#include "switchmoe/kernels/packed_b.hpp"

namespace switchmoe_bench {
namespace {

namespace kernels = switchmoe::kernels;
template <class T>
using RowMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

enum Op { kForward = 0, kDataGrad = 1, kWeightGrad = 2 };

template <class T>
RowMatrix<T> random_matrix(int rows, int cols, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  RowMatrix<float> m(rows, cols);
  for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = dist(rng);
  return m.cast<T>();
}

// Sets the OpenMP (and so Eigen) thread count for one benchmark and restores it afterwards.
class ThreadScope {
 public:
  explicit ThreadScope(int threads) : saved_(omp_get_max_threads()) {
    omp_set_num_threads(threads);
    Eigen::setNbThreads(threads);
  }
  ~ThreadScope() {
    omp_set_num_threads(saved_);
    Eigen::setNbThreads(saved_);
  }

 private:
  int saved_;
};

// GFLOPS: per wall-clock second. GFLOP: work of one iteration, so that report.py can also
// divide by the process CPU time (cpu_time, MeasureProcessCPUTime), which on a shared machine
// measures the efficiency of the cycles the benchmark actually got.
void set_counters(benchmark::State& state, double flops_per_iteration, int threads) {
  state.counters["GFLOPS"] = benchmark::Counter(flops_per_iteration * 1e-9 * state.iterations(),
                                                benchmark::Counter::kIsRate);
  state.counters["GFLOP"] = flops_per_iteration * 1e-9;
  state.counters["threads"] = threads;
}

// The GEMM problem of `op` for a layer of shape (m, k, n) over the given buffers.
template <class T>
kernels::GemmProblem<T> make_problem(int op, int m, int k, int n, const RowMatrix<T>& act,
                                     const RowMatrix<T>& weight, const RowMatrix<T>& grad_out,
                                     RowMatrix<float>& out) {
  kernels::GemmProblem<T> p;
  switch (op) {
    case kForward:  // act [m,k] * weight [k,n] -> out [m,n]
      p = {m,
           n,
           k,
           act.data(),
           k,
           kernels::Transpose::kNo,
           weight.data(),
           n,
           kernels::Transpose::kNo,
           out.data(),
           n,
           0.0f};
      break;
    case kDataGrad:  // grad_out [m,n] * weight^T [n,k] -> out [m,k]
      p = {m,
           k,
           n,
           grad_out.data(),
           n,
           kernels::Transpose::kNo,
           weight.data(),
           n,
           kernels::Transpose::kYes,
           out.data(),
           k,
           0.0f};
      break;
    default:  // act^T [k,m] * grad_out [m,n] -> out [k,n], accumulated
      p = {k,
           n,
           m,
           act.data(),
           k,
           kernels::Transpose::kYes,
           grad_out.data(),
           n,
           kernels::Transpose::kNo,
           out.data(),
           n,
           1.0f};
      break;
  }
  return p;
}

template <class T, class Isa>
void BM_switchmoe_gemm(benchmark::State& state) {
  const int m = static_cast<int>(state.range(0)), k = static_cast<int>(state.range(1)),
            n = static_cast<int>(state.range(2)), op = static_cast<int>(state.range(4));
  ThreadScope threads(static_cast<int>(state.range(3)));
  const RowMatrix<T> act = random_matrix<T>(m, k, 1), weight = random_matrix<T>(k, n, 2),
                     grad_out = random_matrix<T>(m, n, 3);
  RowMatrix<float> out = RowMatrix<float>::Zero(op == kWeightGrad ? k : m, op == kDataGrad ? k : n);
  const kernels::GemmProblem<T> problem = make_problem(op, m, k, n, act, weight, grad_out, out);
  for (auto _ : state) {
    kernels::gemm<T, Isa>(problem);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, 2.0 * m * k * n, static_cast<int>(state.range(3)));
}

// Forward with the weight pre-packed once (PackedB, packed from the float32 master).
template <class T>
void BM_switchmoe_packed_gemm(benchmark::State& state) {
  const int m = static_cast<int>(state.range(0)), k = static_cast<int>(state.range(1)),
            n = static_cast<int>(state.range(2));
  ThreadScope threads(static_cast<int>(state.range(3)));
  const RowMatrix<T> act = random_matrix<T>(m, k, 1);
  const RowMatrix<float> master = random_matrix<float>(k, n, 2);
  RowMatrix<float> out(m, n);
  const kernels::PackedB<T> weight(master.data(), n, kernels::Transpose::kNo, k, n);
  kernels::PackedGemmProblem<T> problem;
  problem.m = m;
  problem.a = act.data();
  problem.lda = k;
  problem.b = &weight;
  problem.c = out.data();
  problem.ldc = n;
  for (auto _ : state) {
    kernels::gemm(problem);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, 2.0 * m * k * n, static_cast<int>(state.range(3)));
}

void BM_eigen_gemm(benchmark::State& state) {
  const int m = static_cast<int>(state.range(0)), k = static_cast<int>(state.range(1)),
            n = static_cast<int>(state.range(2)), op = static_cast<int>(state.range(4));
  ThreadScope threads(static_cast<int>(state.range(3)));
  const RowMatrix<float> act = random_matrix<float>(m, k, 1),
                         weight = random_matrix<float>(k, n, 2),
                         grad_out = random_matrix<float>(m, n, 3);
  RowMatrix<float> out = RowMatrix<float>::Zero(op == kWeightGrad ? k : m, op == kDataGrad ? k : n);
  for (auto _ : state) {
    if (op == kForward) {
      out.noalias() = act * weight;
    } else if (op == kDataGrad) {
      out.noalias() = grad_out * weight.transpose();
    } else {
      out.noalias() += act.transpose() * grad_out;
    }
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, 2.0 * m * k * n, static_cast<int>(state.range(3)));
}

// m in {256, 320, 2048} x (k, n) in {(512,2048), (768,3072), (2048,512), (3072,768)} x
// threads {1, 2} x op {forward, data grad, weight grad}.
void expert_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"m", "k", "n", "threads", "op"});
  for (int op : {kForward, kDataGrad, kWeightGrad}) {
    for (int threads : {1, 2}) {
      for (int m : {256, 320, 2048}) {
        for (auto [k, n] : {std::pair{512, 2048}, {768, 3072}, {2048, 512}, {3072, 768}}) {
          b->Args({m, k, n, threads, op});
        }
      }
    }
  }
  b->UseRealTime()->MeasureProcessCPUTime()->Unit(benchmark::kMillisecond);
}

BENCHMARK(BM_switchmoe_gemm<float, kernels::isa::Native>)
    ->Name("gemm/switchmoe/fp32")
    ->Apply(expert_shapes);
BENCHMARK(BM_switchmoe_gemm<Eigen::bfloat16, kernels::isa::Native>)
    ->Name("gemm/switchmoe/bf16")
    ->Apply(expert_shapes);
BENCHMARK(BM_eigen_gemm)->Name("gemm/eigen/fp32")->Apply(expert_shapes);

void forward_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"m", "k", "n", "threads", "op"});
  for (int threads : {1, 2}) {
    for (int m : {256, 320, 2048}) {
      for (auto [k, n] : {std::pair{512, 2048}, {768, 3072}, {2048, 512}, {3072, 768}}) {
        b->Args({m, k, n, threads, kForward});
      }
    }
  }
  b->UseRealTime()->MeasureProcessCPUTime()->Unit(benchmark::kMillisecond);
}
BENCHMARK(BM_switchmoe_packed_gemm<float>)
    ->Name("gemm_packed/switchmoe/fp32")
    ->Apply(forward_shapes);
BENCHMARK(BM_switchmoe_packed_gemm<Eigen::bfloat16>)
    ->Name("gemm_packed/switchmoe/bf16")
    ->Apply(forward_shapes);
// The portable path, for reference (one shape).
BENCHMARK(BM_switchmoe_gemm<float, kernels::isa::Portable>)
    ->Name("gemm_portable/fp32")
    ->Args({320, 768, 3072, 2, kForward})
    ->UseRealTime()
    ->MeasureProcessCPUTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_switchmoe_gemm<Eigen::bfloat16, kernels::isa::Portable>)
    ->Name("gemm_portable/bf16")
    ->Args({320, 768, 3072, 2, kForward})
    ->UseRealTime()
    ->MeasureProcessCPUTime()
    ->Unit(benchmark::kMillisecond);

// One gemm_batch over E experts with uneven token counts (a skewed routing of `tokens`
// tokens), forward shape: the scheduling over the tiles of all problems.
template <class T>
void BM_expert_batch(benchmark::State& state) {
  const int experts = static_cast<int>(state.range(0)), tokens = static_cast<int>(state.range(1));
  const int k = static_cast<int>(state.range(2)), n = static_cast<int>(state.range(3));
  ThreadScope threads(static_cast<int>(state.range(4)));
  // Expert e gets a share proportional to (e + 1) (sum = tokens up to rounding).
  std::vector<int> rows(experts);
  const double total_weight = experts * (experts + 1) / 2.0;
  for (int e = 0; e < experts; ++e) rows[e] = static_cast<int>(tokens * (e + 1) / total_weight);
  std::vector<RowMatrix<T>> act, weight;
  std::vector<RowMatrix<float>> out;
  std::vector<kernels::GemmProblem<T>> problems;
  double flops = 0.0;
  for (int e = 0; e < experts; ++e) {
    act.push_back(random_matrix<T>(rows[e], k, 10 + e));
    weight.push_back(random_matrix<T>(k, n, 100 + e));
    out.emplace_back(rows[e], n);
    flops += 2.0 * rows[e] * k * n;
  }
  for (int e = 0; e < experts; ++e) {
    problems.push_back({rows[e], n, k, act[e].data(), k, kernels::Transpose::kNo, weight[e].data(),
                        n, kernels::Transpose::kNo, out[e].data(), n, 0.0f});
  }
  for (auto _ : state) {
    kernels::gemm_batch(problems);
    benchmark::ClobberMemory();
  }
  set_counters(state, flops, static_cast<int>(state.range(4)));
}

void batch_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"experts", "tokens", "k", "n", "threads"});
  for (int threads : {1, 2}) {
    for (int experts : {8, 32}) b->Args({experts, 2048, 512, 2048, threads});
  }
  b->UseRealTime()->MeasureProcessCPUTime()->Unit(benchmark::kMillisecond);
}
BENCHMARK(BM_expert_batch<float>)->Name("gemm_batch/switchmoe/fp32")->Apply(batch_shapes);
BENCHMARK(BM_expert_batch<Eigen::bfloat16>)->Name("gemm_batch/switchmoe/bf16")->Apply(batch_shapes);

// The register-tile kernel alone (no packing, no scheduling, no prefetch hint, one thread): a
// full kMr x kNr tile over one k block of packed A and B, C += A B, repeated; `panels` B
// micro-panels are used in turn (on AVX-512 a micro-panel is 64 KB, so with A both settings,
// 1 and 8 panels, are read from L2, not L1, on a 1 MB L2). The rate is the kernel's own ceiling
// with its operands in cache. Compare with gemm/ and a layer's forward to see what packing,
// scheduling and the memory hierarchy cost on top of it.
template <class T>
void BM_micro_kernel(benchmark::State& state) {
  using Kernel = kernels::detail::MicroKernel<kernels::isa::Native, T>;
  using Packed = typename Kernel::Packed;
  const int panels = static_cast<int>(state.range(0));
  const int steps = Kernel::kKc / Kernel::kKPack;  // packed steps of one k block
  const std::size_t a_size = static_cast<std::size_t>(Kernel::kMr) * steps * Kernel::kKPack;
  const std::size_t b_size = static_cast<std::size_t>(Kernel::kNr) * steps * Kernel::kKPack;
  // 64-byte aligned storage, as the library's packed buffers (the AVX-512 kernels load aligned).
  switchmoe::detail::RowBuffer<Packed> a_buffer, b_buffer;
  a_buffer.reserve(static_cast<Eigen::Index>(a_size));
  b_buffer.reserve(static_cast<Eigen::Index>(b_size * panels));
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  Packed* const a = a_buffer.data();
  Packed* const b = b_buffer.data();
  for (std::size_t i = 0; i < a_size; ++i) a[i] = Kernel::pack(static_cast<T>(dist(rng)));
  for (std::size_t i = 0; i < b_size * panels; ++i) b[i] = Kernel::pack(static_cast<T>(dist(rng)));
  std::vector<float, Eigen::aligned_allocator<float>> c(
      static_cast<std::size_t>(Kernel::kMr) * Kernel::kNr, 0.0f);
  int panel = 0;
  for (auto _ : state) {
    Kernel::run(steps, a, b + b_size * panel, c.data(), Kernel::kNr, 1.0f, Kernel::kMr,
                Kernel::kNr);
    panel = panel + 1 == panels ? 0 : panel + 1;
    benchmark::ClobberMemory();
  }
  benchmark::DoNotOptimize(c.data());
  set_counters(state, 2.0 * Kernel::kMr * Kernel::kNr * Kernel::kKc, 1);
}
BENCHMARK(BM_micro_kernel<float>)
    ->Name("micro_kernel/switchmoe/fp32")
    ->ArgNames({"panels"})
    ->Arg(1)
    ->Arg(8)
    ->UseRealTime()
    ->MeasureProcessCPUTime();
BENCHMARK(BM_micro_kernel<Eigen::bfloat16>)
    ->Name("micro_kernel/switchmoe/bf16")
    ->ArgNames({"panels"})
    ->Arg(1)
    ->Arg(8)
    ->UseRealTime()
    ->MeasureProcessCPUTime();

}  // namespace
}  // namespace switchmoe_bench
