// A program outside the project that uses the optional target switchmoe::io: saves a layer to a
// safetensors file, loads it into a differently seeded layer and compares. Exits non-zero on a
// mismatch.
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
  switchmoe::save_weights(writer, layer, switchmoe::WeightNames::kHuggingFaceSwitch, "mlp.");
  writer.write(path);

  const switchmoe::io::SafetensorsReader reader(path);
  const switchmoe::Matrix<float> read = reader.tensor("mlp.router.classifier.weight");  // [E, d]
  config.seed = 4;
  switchmoe::SwitchLayer<> loaded(config);
  switchmoe::load_weights(reader, loaded, switchmoe::WeightNames::kHuggingFaceSwitch, "mlp.");
  std::remove(path.c_str());
  if (read != layer.router_weight().transpose() || loaded.w_out(3) != layer.w_out(3) ||
      reader.metadata().at("format") != "pt") {
    std::fprintf(stderr, "io_consumer: FAILED: the weight did not round-trip\n");
    return 1;
  }
  std::printf("io_consumer: switchmoe::io round-trips a [%d, %d] weight\n",
              static_cast<int>(read.rows()), static_cast<int>(read.cols()));
  return 0;
}
