// switch_lm: dense vs Switch Transformer language models on real text (see README.md).

#include <malloc.h>
#include <omp.h>

#include <Eigen/Core>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <optional>
#include <stdexcept>
#include <string>

#include "checkpoint.hpp"
#include "experiment.hpp"
#include "options.hpp"
#include "ranks.hpp"
#include "text_data.hpp"

namespace {

// --expert-parallel: initializes MPI (finalized on exit) and describes MPI_COMM_WORLD; ranks other
// than 0 print nothing (their stdout goes to /dev/null) so the output is rank 0's alone.
class MpiSession {
 public:
  explicit MpiSession(bool wanted) {
    if (!wanted) return;
#ifdef SWITCH_LM_EXPERT_PARALLEL
    MPI_Init(nullptr, nullptr);
    ranks_.enabled = true;
    ranks_.comm = MPI_COMM_WORLD;
    MPI_Comm_rank(ranks_.comm, &ranks_.rank);
    MPI_Comm_size(ranks_.comm, &ranks_.size);
    if (ranks_.rank != 0 && std::freopen("/dev/null", "w", stdout) == nullptr)
      throw std::runtime_error("cannot silence stdout of rank " + std::to_string(ranks_.rank));
#else
    throw std::invalid_argument(
        "option --expert-parallel: this switch_lm was built without MPI (switchmoe::distributed)");
#endif
  }
  ~MpiSession() {
#ifdef SWITCH_LM_EXPERT_PARALLEL
    if (ranks_.enabled) MPI_Finalize();
#endif
  }
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;

  const switch_lm::Ranks& ranks() const { return ranks_; }

  // A failure on one rank would leave the others waiting in a collective: end them all.
  [[noreturn]] void abort(int code) const {
#ifdef SWITCH_LM_EXPERT_PARALLEL
    if (ranks_.enabled && ranks_.size > 1) MPI_Abort(ranks_.comm, code);
#endif
    std::exit(code);
  }

 private:
  switch_lm::Ranks ranks_;
};

}  // namespace

int main(int argc, char** argv) {
  using namespace switch_lm;
  // Every step allocates the same large activation matrices; keep them on the heap instead of
  // mmap/munmap-ing them each time (page faults were ~15% of the run time).
  mallopt(M_MMAP_THRESHOLD, 256 << 20);
  mallopt(M_TRIM_THRESHOLD, 512 << 20);
  Options options;
  try {
    options = parse_options(argc, argv);
    // A checkpoint's options are the defaults of a resumed or loaded run.
    const std::string& checkpoint = options.resume.empty() ? options.load : options.resume;
    const bool fine_tune = options.resume.empty() && !options.load.empty() && !options.generate;
    if (!checkpoint.empty() && !options.help) {
      const nlohmann::json saved = read_state(checkpoint).at("config");
      options = fine_tune ? fine_tune_options(options, checkpoint, saved)
                          : checkpoint_options(argc, argv, checkpoint, saved);
    }
  } catch (const std::invalid_argument& e) {
    std::fprintf(stderr, "error: %s\n(see switch_lm --help)\n", e.what());
    return 2;
  } catch (const std::exception& e) {  // an unreadable checkpoint
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  if (options.help) {
    std::fputs(usage(), stdout);
    return 0;
  }
  if (options.threads > 0) {
    omp_set_num_threads(options.threads);
    Eigen::setNbThreads(options.threads);
  }
  // One level of parallelism: with a thread per run (experiment.hpp, step_runs) the parallel
  // regions inside a run's step stay single-threaded instead of oversubscribing the cores.
  omp_set_max_active_levels(1);
  std::optional<MpiSession> mpi;
  try {
    mpi.emplace(options.expert_parallel);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
  const Ranks& ranks = mpi->ranks();
  if (ranks.enabled && (options.train.batch % ranks.size != 0)) {
    std::fprintf(stderr, "error: option --batch = %d: expected a multiple of the %d ranks\n",
                 options.train.batch, ranks.size);
    mpi->abort(2);
  }
  try {
    if (options.generate) {
      if (options.precision == "bf16") return generate_from_checkpoint<switchmoe::Bf16>(options);
      if (options.precision == "bf16-router")
        return generate_from_checkpoint<switchmoe::Bf16RouterAblation>(options);
      return generate_from_checkpoint<switchmoe::Fp32>(options);
    }
    const TextData data = options.data.empty() ? load_fortunes() : load_text_path(options.data);
    std::printf("data: %s: %zu training bytes, %zu validation bytes; %d OpenMP threads\n",
                data.source.c_str(), data.train.size(), data.valid.size(), omp_get_max_threads());
    if (ranks.enabled)
      std::printf("expert parallel: %d MPI ranks x %d OpenMP threads\n", ranks.size,
                  omp_get_max_threads());
    if (options.precision == "bf16") return run_experiment<switchmoe::Bf16>(options, data, ranks);
    if (options.precision == "bf16-router")
      return run_experiment<switchmoe::Bf16RouterAblation>(options, data, ranks);
    return run_experiment<switchmoe::Fp32>(options, data, ranks);
  } catch (const std::exception& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "error: %s\n", e.what());
    if (ranks.enabled && ranks.size > 1) mpi->abort(1);
    return 1;
  }
}
