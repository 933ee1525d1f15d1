// Expert parallelism over MPI (issue 11): throughput of ExpertParallelSwitchLayer against one
// SwitchLayer, forward and forward+backward, fp32 and bf16, at (d_model, d_ff) = (768, 3072) and
// 8 experts. A plain timed program (the ranks must time the same calls together, which Google
// Benchmark's adaptive iteration counts would not guarantee).
//
//   mpirun -np 2 --bind-to none -x OMP_NUM_THREADS=1 mpi_bench            # 2 ranks x 1 thread
//   OMP_NUM_THREADS=2 mpi_bench --single --tokens 4096                     # 1 rank x 2 threads
//   options: --tokens N (per rank, default 2048) --iters N (timed, default 3) --single
//
// --single runs switchmoe::SwitchLayer (no exchange) on N tokens; otherwise every rank runs the
// expert-parallel layer on its own N tokens. Reported per configuration: tokens/s over all ranks,
// the bytes each token sends to other ranks (rows of MPI_Alltoallv, whose payload is the policy's
// element type: bf16 must be half of fp32), and the fraction of the wall-clock spent inside the
// layer's MPI collectives (which includes waiting for a slower rank). The byte and time counts
// come from this program's own PMPI wrappers of the collectives the exchange calls (the MPI
// profiling interface), so the library carries no instrumentation.
//
// Measured (2-core VM shared with other jobs, load average ~3.7; tokens/s of two runs each,
// 1 x 2 = SwitchLayer on 4096 tokens, 2 x 1 = 2 ranks of 2048 tokens, the same global batch):
//   pass          1 rank x 2 threads   2 ranks x 1 thread   bytes sent/token   exchange share
//   fp32 fwd      14138, 13973         11308, 14894         3038               17-35%
//   fp32 fwd+bwd   4806,  4546          2248,  4989         6073               9-60%
//   bf16 fwd      23344, 23739         22295, 19781         1521               17-37%
//   bf16 fwd+bwd   8987,  8078          5231,  9213         3038               19-56%
// bf16 sends exactly half of fp32's bytes (rows of d_model 16-bit values; about half of the
// rows go to the other rank, there and back, and once more each way in backward). In the quiet
// runs 2 x 1 is within 0.9-1.15x of 1 x 2; the exchange share includes waiting for the other
// rank, which dominates when another job takes one rank's core.

#include <mpi.h>
#include <omp.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <switchmoe/distributed.hpp>
#include <switchmoe/switchmoe.hpp>

namespace {

// What the wrappers below accumulate on this rank.
struct CommCounters {
  double seconds = 0.0;       // inside the wrapped collectives
  double remote_bytes = 0.0;  // row payload sent by MPI_Alltoallv to other ranks
};
CommCounters g_counters;

double now() { return MPI_Wtime(); }

}  // namespace

// PMPI wrappers (the MPI standard's profiling interface): each times the call and forwards it.
extern "C" {
int MPI_Alltoallv(const void* sendbuf, const int sendcounts[], const int sdispls[],
                  MPI_Datatype sendtype, void* recvbuf, const int recvcounts[], const int rdispls[],
                  MPI_Datatype recvtype, MPI_Comm comm) {
  int rank = 0, size = 1, type_size = 0;
  PMPI_Comm_rank(comm, &rank);
  PMPI_Comm_size(comm, &size);
  PMPI_Type_size(sendtype, &type_size);
  for (int r = 0; r < size; ++r)
    if (r != rank) g_counters.remote_bytes += static_cast<double>(sendcounts[r]) * type_size;
  const double start = now();
  const int rc = PMPI_Alltoallv(sendbuf, sendcounts, sdispls, sendtype, recvbuf, recvcounts,
                                rdispls, recvtype, comm);
  g_counters.seconds += now() - start;
  return rc;
}
int MPI_Alltoall(const void* sendbuf, int sendcount, MPI_Datatype sendtype, void* recvbuf,
                 int recvcount, MPI_Datatype recvtype, MPI_Comm comm) {
  const double start = now();
  const int rc = PMPI_Alltoall(sendbuf, sendcount, sendtype, recvbuf, recvcount, recvtype, comm);
  g_counters.seconds += now() - start;
  return rc;
}
int MPI_Allgather(const void* sendbuf, int sendcount, MPI_Datatype sendtype, void* recvbuf,
                  int recvcount, MPI_Datatype recvtype, MPI_Comm comm) {
  const double start = now();
  const int rc = PMPI_Allgather(sendbuf, sendcount, sendtype, recvbuf, recvcount, recvtype, comm);
  g_counters.seconds += now() - start;
  return rc;
}
}

namespace {

struct Settings {
  int tokens = 2048;  // per rank
  int iters = 3;
  bool single = false;
};

struct Result {
  double seconds = 0.0;  // wall-clock per timed iteration (slowest rank)
  double comm_seconds = 0.0;
  double remote_bytes = 0.0;  // all ranks, per iteration
};

template <class Layer>
Result time_layer(Layer& layer, const switchmoe::Matrix<float>& x,
                  const switchmoe::Matrix<float>& dy, bool backward, int iters) {
  switchmoe::SwitchOutput out;
  switchmoe::Matrix<float> dx;
  auto step = [&] {
    layer.forward(x, switchmoe::Mode::kTrain, out);
    if (backward) layer.backward(dy, dx);
  };
  step();  // warm-up: buffers grow to size, pages are touched
  MPI_Barrier(MPI_COMM_WORLD);
  g_counters = CommCounters{};
  const double start = now();
  for (int i = 0; i < iters; ++i) step();
  double local[3] = {now() - start, g_counters.seconds, g_counters.remote_bytes};
  double global[3];
  MPI_Reduce(local, global, 1, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
  MPI_Reduce(local + 1, global + 1, 1, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
  MPI_Reduce(local + 2, global + 2, 1, MPI_DOUBLE, MPI_SUM, 0, MPI_COMM_WORLD);
  return {global[0] / iters, global[1] / iters, global[2] / iters};
}

template <class Policy>
void run(const Settings& s, int rank, int ranks) {
  switchmoe::SwitchConfig config;
  config.d_model = 768;
  config.d_ff = 3072;
  config.routing.num_experts = 8;
  config.seed = 7;
  // [tokens, d_model] inputs and output gradients, different on every rank.
  std::mt19937_64 rng(1000 + static_cast<std::uint64_t>(rank));
  std::normal_distribution<float> normal(0.0f, 1.0f);
  switchmoe::Matrix<float> x(s.tokens, config.d_model), dy(s.tokens, config.d_model);
  for (Eigen::Index i = 0; i < x.size(); ++i) x.data()[i] = normal(rng);
  for (Eigen::Index i = 0; i < dy.size(); ++i) dy.data()[i] = 1e-3f * normal(rng);
  for (const bool backward : {false, true}) {
    Result r;
    if (s.single) {
      switchmoe::SwitchLayer<Policy> layer(config);
      r = time_layer(layer, x, dy, backward, s.iters);
    } else {
      switchmoe::ExpertParallelSwitchLayer<Policy> layer(config, MPI_COMM_WORLD);
      r = time_layer(layer, x, dy, backward, s.iters);
    }
    if (rank == 0) {
      const double tokens = static_cast<double>(s.tokens) * ranks;
      std::printf(
          "%-5s %-7s %s %d rank(s) x %d thread(s), %5d tokens/rank: %8.0f tokens/s  "
          "%7.0f bytes sent/token  exchange %5.1f%% of the time  (%.3f s/iter)\n",
          Policy::name(), backward ? "fwd+bwd" : "fwd",
          s.single ? "SwitchLayer         " : "ExpertParallelSwitch", ranks, omp_get_max_threads(),
          s.tokens, tokens / r.seconds, r.remote_bytes / tokens, 100.0 * r.comm_seconds / r.seconds,
          r.seconds);
      std::fflush(stdout);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, ranks = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &ranks);
  Settings s;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--single") {
      s.single = true;
    } else if ((a == "--tokens" || a == "--iters") && i + 1 < argc) {
      const int v = std::atoi(argv[++i]);
      if (v < 1) {
        if (rank == 0)
          std::fprintf(stderr, "mpi_bench: %s = %s: expected >= 1\n", a.c_str(), argv[i]);
        MPI_Abort(MPI_COMM_WORLD, 2);
      }
      (a == "--tokens" ? s.tokens : s.iters) = v;
    } else {
      if (rank == 0) std::fprintf(stderr, "mpi_bench: unknown option '%s'\n", a.c_str());
      MPI_Abort(MPI_COMM_WORLD, 2);
    }
  }
  if (s.single && ranks != 1) {
    if (rank == 0) std::fprintf(stderr, "mpi_bench: --single runs on one rank\n");
    MPI_Abort(MPI_COMM_WORLD, 2);
  }
  run<switchmoe::Fp32>(s, rank, ranks);
  run<switchmoe::Bf16>(s, rank, ranks);
  MPI_Finalize();
  return 0;
}
