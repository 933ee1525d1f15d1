// A program outside the project using the optional MPI part: one include, one expert-parallel
// layer, a training step. Exits non-zero when the layer does not behave as the API says.
#include <mpi.h>

#include <cmath>
#include <cstdio>
#include <switchmoe/distributed.hpp>

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int failures = 0;
  {
    switchmoe::SwitchConfig config;
    config.d_model = 8;
    config.d_ff = 16;
    int ranks = 1;
    MPI_Comm_size(MPI_COMM_WORLD, &ranks);
    config.routing.num_experts = 2 * ranks;
    switchmoe::ExpertParallelSwitchLayer<> layer(config, MPI_COMM_WORLD);
    switchmoe::Matrix<float> x(6, 8);  // [tokens, d_model]
    for (int t = 0; t < 6; ++t) {
      for (int j = 0; j < 8; ++j) x(t, j) = std::sin(0.7f * t + 1.3f * j + layer.rank());
    }
    const switchmoe::SwitchOutput out = layer.forward(x, switchmoe::Mode::kTrain);
    const switchmoe::Matrix<float> dx = layer.backward(out.y);
    if (layer.num_local_experts() != 2 || layer.first_expert() != 2 * layer.rank()) ++failures;
    if (!out.y.allFinite() || dx.rows() != 6 || out.stats.tokens != 6 * ranks) ++failures;
    switchmoe::allreduce_gradients(layer.parameters(), MPI_COMM_WORLD);
    if (failures == 0 && layer.rank() == 0) {
      std::printf("consumer: switchmoe ExpertParallelSwitchLayer<> works on %d ranks\n", ranks);
    }
  }
  int worst = 0;
  MPI_Allreduce(&failures, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();
  return worst == 0 ? 0 : 1;
}
