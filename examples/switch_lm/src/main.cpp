// switch_lm: dense vs Switch Transformer language models on real text (see README.md).

#include <malloc.h>
#include <omp.h>

#include <Eigen/Core>
#include <cstdio>
#include <exception>
#include <stdexcept>

#include "checkpoint.hpp"
#include "experiment.hpp"
#include "options.hpp"
#include "text_data.hpp"

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
    if (!checkpoint.empty() && !options.help)
      options = checkpoint_options(argc, argv, checkpoint, read_state(checkpoint).at("config"));
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
  try {
    if (options.generate) {
      if (options.precision == "bf16") return generate_from_checkpoint<switchmoe::Bf16>(options);
      return generate_from_checkpoint<switchmoe::Fp32>(options);
    }
    const TextData data = options.data.empty() ? load_fortunes() : load_text_file(options.data);
    std::printf("data: %s: %zu training bytes, %zu validation bytes; %d OpenMP threads\n",
                data.source.c_str(), data.train.size(), data.valid.size(), omp_get_max_threads());
    if (options.precision == "bf16") return run_experiment<switchmoe::Bf16>(options, data);
    return run_experiment<switchmoe::Fp32>(options, data);
  } catch (const std::exception& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
