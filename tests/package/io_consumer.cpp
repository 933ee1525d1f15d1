// A program outside the project that uses the optional target switchmoe::io: writes a layer's
// router weight to a safetensors file, reads it back and compares. Exits non-zero on a mismatch.
#include <cstdio>
#include <string>
#include <switchmoe/io/safetensors.hpp>
#include <switchmoe/switchmoe.hpp>

int main() {
  switchmoe::SwitchConfig config;
  config.d_model = 8;
  config.d_ff = 16;
  config.routing.num_experts = 4;
  config.seed = 3;
  switchmoe::SwitchLayer<> layer(config);

  const std::string path = "io_consumer.safetensors";
  switchmoe::io::SafetensorsWriter writer;
  writer.add("router.weight", layer.router_weight());  // [d_model, experts]
  writer.write(path);

  const switchmoe::io::SafetensorsReader reader(path);
  const switchmoe::Matrix<float> read = reader.tensor("router.weight");
  std::remove(path.c_str());
  if (read != layer.router_weight() || reader.metadata().at("format") != "pt") {
    std::fprintf(stderr, "io_consumer: FAILED: the weight did not round-trip\n");
    return 1;
  }
  std::printf("io_consumer: switchmoe::io round-trips a [%d, %d] weight\n",
              static_cast<int>(read.rows()), static_cast<int>(read.cols()));
  return 0;
}
