// Interoperability with an independent implementation of the format: tests/io/interop.py
// (Python, numpy) writes files the C++ reader must read bit for bit, and reads files the C++
// writer wrote, checking every element against its own round-to-nearest-even conversion.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <switchmoe/io/safetensors.hpp>
#include <switchmoe/switchmoe.hpp>

namespace {

using switchmoe::Matrix;
using switchmoe::io::Finite;
using switchmoe::io::SafetensorsReader;
using switchmoe::io::SafetensorsWriter;
namespace fs = std::filesystem;

std::uint32_t bits_of(float x) {
  std::uint32_t b;
  std::memcpy(&b, &x, 4);
  return b;
}

class Interop : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = ::testing::TempDir() + "switchmoe_interop_XXXXXX";
    ASSERT_NE(::mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
  }
  void TearDown() override {
    if (!HasFailure()) fs::remove_all(dir_);  // kept for a look when something failed
  }
  // Runs interop.py COMMAND on the folder; its exit status.
  int python(const std::string& command) const {
    const std::string line = std::string("\"") + SWITCHMOE_PYTHON + "\" \"" +
                             SWITCHMOE_INTEROP_SCRIPT + "\" " + command + " \"" + dir_.string() +
                             "\"";
    const int status = std::system(line.c_str());
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }
  fs::path dir_;
};

TEST_F(Interop, ReadsPythonWrittenFilesBitForBit) {
  ASSERT_EQ(python("write-tensors"), 0);
  std::ifstream in(path("python_tensors.json"));
  const auto manifest = nlohmann::json::parse(in);
  const SafetensorsReader reader(path("python_tensors.safetensors"));
  ASSERT_EQ(reader.names().size(), manifest["tensors"].size());
  EXPECT_EQ(reader.metadata().at("writer"), "interop.py");
  int checked = 0;
  for (const auto& [name, want] : manifest["tensors"].items()) {
    SCOPED_TRACE(name);
    ASSERT_TRUE(reader.contains(name));
    EXPECT_EQ(reader.dtype(name), want["dtype"].get<std::string>());
    EXPECT_EQ(reader.shape(name), want["shape"].get<std::vector<std::int64_t>>());
    // The special values include infinities, which only kAllow lets through.
    const Matrix<float> value = reader.tensor(name, Finite::kAllow);
    const auto bits = want["bits"].get<std::vector<std::uint32_t>>();
    ASSERT_EQ(static_cast<std::size_t>(value.size()), bits.size());
    for (std::size_t i = 0; i < bits.size(); ++i) {
      ASSERT_EQ(bits_of(value.data()[i]), bits[i]) << "element " << i;
    }
    ++checked;
  }
  EXPECT_EQ(checked, 8);
  EXPECT_THROW(reader.tensor("vector.f32"), switchmoe::io::FormatError);  // has infinities
  EXPECT_NO_THROW(reader.tensor("dense.bf16"));
}

TEST_F(Interop, PythonChecksCppWrittenFilesBitForBit) {
  std::mt19937 random(2021);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<std::uint32_t> any_bits;
  const float kSpecials[] = {0.0f,
                             -0.0f,
                             std::numeric_limits<float>::infinity(),
                             -std::numeric_limits<float>::infinity(),
                             1 + std::ldexp(1.0f, -8),
                             1 + 3 * std::ldexp(1.0f, -8),
                             1 + std::ldexp(1.0f, -11),
                             1 + 3 * std::ldexp(1.0f, -11),
                             65519.0f,
                             std::numeric_limits<float>::denorm_min(),
                             std::ldexp(1.0f, -25),
                             3 * std::ldexp(1.0f, -26),
                             std::numeric_limits<float>::min()};
  SafetensorsWriter writer;
  nlohmann::json manifest = {{"metadata", {{"writer", "switchmoe"}}},
                             {"tensors", nlohmann::json::object()}};
  const auto add = [&](const std::string& name, const Matrix<float>& value,
                       const std::string& dtype) {
    writer.add(name, value, dtype);
    std::vector<std::uint32_t> bits;
    for (Eigen::Index i = 0; i < value.size(); ++i) bits.push_back(bits_of(value.data()[i]));
    manifest["tensors"][name] = {
        {"dtype", dtype}, {"shape", {value.rows(), value.cols()}}, {"source_bits", bits}};
  };
  for (const std::string dtype : {"F32", "BF16", "F16"}) {
    Matrix<float> normal_values(13, 9);  // [13, 9]
    for (Eigen::Index i = 0; i < normal_values.size(); ++i) {
      normal_values.data()[i] = normal(random) * (dtype == "F16" ? 100.0f : 1e3f);
    }
    add("normal." + dtype, normal_values, dtype);
    Matrix<float> specials(1, std::size(kSpecials));  // [1, specials]
    for (Eigen::Index i = 0; i < specials.size(); ++i) specials.data()[i] = kSpecials[i];
    add("special." + dtype, specials, dtype);
  }
  // Arbitrary bit patterns (NaN excluded) test rounding over the whole float32 range.
  Matrix<float> patterns(64, 64);  // [64, 64]
  for (Eigen::Index i = 0; i < patterns.size(); ++i) {
    float x;
    do {
      const std::uint32_t b = any_bits(random);
      std::memcpy(&x, &b, 4);
    } while (std::isnan(x) || std::abs(x) > 3.38e38f);  // bf16 overflow is refused
    patterns.data()[i] = x;
  }
  add("patterns.BF16", patterns, "BF16");
  add("patterns.F32", patterns, "F32");
  writer.set_metadata("writer", "switchmoe");
  writer.write(path("cpp_tensors.safetensors"));
  std::ofstream(path("cpp_tensors.json")) << manifest.dump();
  EXPECT_EQ(python("check-tensors"), 0);
}

// A SwitchTransformers sparse MLP and a dense T5 FFN written by interop.py under Hugging Face
// names (F32, BF16 and F16 weights), with the outputs numpy computed for them: loaded into
// switchmoe layers, they must compute the same outputs (float32 against numpy's float64).
TEST_F(Interop, HuggingFaceSwitchFilesComputeNumpysOutputs) {
  ASSERT_EQ(python("write-switch"), 0);
  for (const std::string dtype : {"F32", "BF16", "F16"}) {
    SCOPED_TRACE(dtype);
    const SafetensorsReader reader(path("hf_switch_" + dtype + ".safetensors"));
    const auto& meta = reader.metadata();
    switchmoe::SwitchConfig config;
    config.d_model = std::stoi(meta.at("d_model"));
    config.d_ff = std::stoi(meta.at("d_ff"));
    config.routing.num_experts = std::stoi(meta.at("num_experts"));
    config.routing.expert_capacity = std::stoi(meta.at("expert_capacity"));
    config.seed = 99;
    switchmoe::SwitchLayer<> layer(config);
    switchmoe::load_weights(reader, layer, switchmoe::WeightNames::kHuggingFaceSwitch,
                            "encoder.block.1.layer.1.mlp.");
    const Matrix<float> x = reader.tensor("input");  // [tokens, d_model]
    const auto out = layer.forward(x, switchmoe::Mode::kEval);
    const Matrix<float> expected = reader.tensor("expected.switch");  // [tokens, d_model]
    ASSERT_EQ(out.y.rows(), expected.rows());
    const float scale = expected.cwiseAbs().maxCoeff();
    EXPECT_GT(scale, 0.0f);
    EXPECT_LE((out.y - expected).cwiseAbs().maxCoeff(), 1e-5f * scale);
    int dropped = 0;
    for (Eigen::Index t = 0; t < out.routing.slot.rows(); ++t)
      dropped += out.routing.slot(t, 0) < 0;
    EXPECT_EQ(dropped, std::stoi(meta.at("dropped")));
    EXPECT_GT(dropped, 0);  // the capacity is exercised

    switchmoe::DenseConfig dense_config{config.d_model, config.d_ff, false, 0.0f, 0.1f, 98};
    switchmoe::DenseFFN<> dense(dense_config);
    switchmoe::load_weights(reader, dense, switchmoe::WeightNames::kHuggingFaceSwitch,
                            "encoder.block.0.layer.1.DenseReluDense.");
    const Matrix<float> dense_expected = reader.tensor("expected.dense");  // [tokens, d_model]
    EXPECT_LE((dense.forward(x) - dense_expected).cwiseAbs().maxCoeff(),
              1e-5f * dense_expected.cwiseAbs().maxCoeff());
  }
}

// The same sparse MLP in BF16, sharded by interop.py as Hugging Face does (three files and
// model.safetensors.index.json, experts dealt round-robin): loaded through the index, lazily or
// with every shard opened and checked first, it computes numpy's outputs.
TEST_F(Interop, HuggingFaceShardedSwitchComputesNumpysOutputs) {
  ASSERT_EQ(python("write-sharded"), 0);
  const SafetensorsReader io(path("hf_sharded_io.safetensors"));
  const auto& meta = io.metadata();
  switchmoe::SwitchConfig config;
  config.d_model = std::stoi(meta.at("d_model"));
  config.d_ff = std::stoi(meta.at("d_ff"));
  config.routing.num_experts = std::stoi(meta.at("num_experts"));
  config.routing.expert_capacity = std::stoi(meta.at("expert_capacity"));
  config.seed = 99;
  const Matrix<float> x = io.tensor("input");                   // [tokens, d_model]
  const Matrix<float> expected = io.tensor("expected.switch");  // [tokens, d_model]
  for (const auto opening :
       {switchmoe::io::ShardOpening::kLazy, switchmoe::io::ShardOpening::kAll}) {
    const switchmoe::io::ShardedSafetensorsReader reader(path("model.safetensors.index.json"),
                                                         opening);
    EXPECT_EQ(reader.index().shards().size(), 3u);
    EXPECT_EQ(reader.dtype("encoder.block.1.layer.1.mlp.router.classifier.weight"), "BF16");
    switchmoe::SwitchLayer<> layer(config);
    switchmoe::load_weights(reader, layer, switchmoe::WeightNames::kHuggingFaceSwitch,
                            "encoder.block.1.layer.1.mlp.");
    const auto out = layer.forward(x, switchmoe::Mode::kEval);
    ASSERT_EQ(out.y.rows(), expected.rows());
    const float scale = expected.cwiseAbs().maxCoeff();
    EXPECT_GT(scale, 0.0f);
    EXPECT_LE((out.y - expected).cwiseAbs().maxCoeff(), 1e-5f * scale);
    int dropped = 0;
    for (Eigen::Index t = 0; t < out.routing.slot.rows(); ++t)
      dropped += out.routing.slot(t, 0) < 0;
    EXPECT_EQ(dropped, std::stoi(meta.at("dropped")));
  }
}

// A Mixtral sparse MoE block written by interop.py under Hugging Face names (F32 and BF16
// weights) with the output numpy computed following HF's MixtralSparseMoeBlock (softmax in
// float32, top-2, renormalized, SwiGLU experts, no capacity). Loaded into SwitchLayer<Fp32,
// SwiGlu> it matches within 1e-5; into SwitchLayer<Bf16, SwiGlu> (bfloat16 expert inputs,
// hidden activations and weights) within the first-order rounding bound numpy derived per
// element. A gate/up (w1/w3) swap moves most elements far past either tolerance.
template <class Layer>
void expect_mixtral_outputs(const SafetensorsReader& reader, bool bf16_layer) {
  const auto& meta = reader.metadata();
  switchmoe::SwitchConfig config;
  config.d_model = std::stoi(meta.at("d_model"));
  config.d_ff = std::stoi(meta.at("d_ff"));
  config.routing.num_experts = std::stoi(meta.at("num_experts"));
  config.routing.top_k = std::stoi(meta.at("top_k"));
  config.routing.dropless = true;     // Mixtral has no capacity
  config.routing.renormalize = true;  // the top-2 weights sum to 1 (SEMANTICS 4)
  config.jitter_eps = 0.0f;
  config.seed = 31;
  Layer layer(config);
  switchmoe::load_weights(reader, layer, switchmoe::WeightNames::kHuggingFaceMixtral,
                          "model.layers.0.block_sparse_moe.");
  const Matrix<float> x = reader.tensor("input");                    // [tokens, d_model]
  const Matrix<float> expected = reader.tensor("expected.mixtral");  // [tokens, d_model]
  const Matrix<float> tolerance = reader.tensor("tolerance.bf16");   // [tokens, d_model]
  const auto out = layer.forward(x, switchmoe::Mode::kEval);
  ASSERT_EQ(out.y.rows(), expected.rows());
  ASSERT_EQ(out.y.cols(), expected.cols());
  const float scale = expected.cwiseAbs().maxCoeff();
  EXPECT_GT(scale, 0.1f);
  EXPECT_EQ(out.stats.kept_choices, config.routing.top_k * x.rows());  // dropless
  for (Eigen::Index t = 0; t < x.rows(); ++t) {
    for (Eigen::Index j = 0; j < x.cols(); ++j) {
      const float allowed = bf16_layer ? tolerance(t, j) : 1e-5f * scale;
      EXPECT_LE(std::abs(out.y(t, j) - expected(t, j)), allowed) << "token " << t << " dim " << j;
    }
  }
}

TEST_F(Interop, HuggingFaceMixtralFilesComputeNumpysOutputs) {
  ASSERT_EQ(python("write-mixtral"), 0);
  for (const std::string dtype : {"F32", "BF16"}) {
    SCOPED_TRACE(dtype);
    const SafetensorsReader reader(path("hf_mixtral_" + dtype + ".safetensors"));
    EXPECT_EQ(reader.dtype("model.layers.0.block_sparse_moe.experts.3.w3.weight"), dtype);
    {
      SCOPED_TRACE("SwitchLayer<Fp32, SwiGlu>");
      expect_mixtral_outputs<switchmoe::SwitchLayer<switchmoe::Fp32, switchmoe::SwiGlu>>(reader,
                                                                                         false);
    }
    {
      SCOPED_TRACE("SwitchLayer<Bf16, SwiGlu>");
      expect_mixtral_outputs<switchmoe::SwitchLayer<switchmoe::Bf16, switchmoe::SwiGlu>>(reader,
                                                                                         true);
    }
  }
}

// write_sharded's shards and index, read by interop.py: every tensor in the shard the index
// names and in no other, total_size right, every element bit for bit.
TEST_F(Interop, PythonChecksCppWrittenShards) {
  switchmoe::SwitchConfig config;
  config.d_model = 8;
  config.d_ff = 12;
  config.routing.num_experts = 5;
  config.router_bias = true;
  config.seed = 7;
  switchmoe::SwitchLayer<> layer(config);
  layer.balancing_bias() << 0.5f, -0.25f, 0.0f, 1e-3f, -2.0f;  // a buffer, saved too
  SafetensorsWriter writer;
  switchmoe::save_weights(writer, layer, switchmoe::WeightNames::kSwitchmoe, "layers.3.");
  nlohmann::json manifest = nlohmann::json::object();
  auto tensors = layer.parameters();
  for (const auto& p : layer.buffers()) tensors.push_back(p);
  for (const auto& p : tensors) {
    std::vector<std::uint32_t> bits;
    for (Eigen::Index i = 0; i < p.value->size(); ++i) bits.push_back(bits_of(p.value->data()[i]));
    manifest["layers.3." + p.name] = {{"shape", {p.value->rows(), p.value->cols()}},
                                      {"bits", bits}};
  }
  fs::create_directory(dir_ / "cpp_sharded");
  switchmoe::io::write_sharded(writer, path("cpp_sharded"), 4);
  std::ofstream(path("cpp_sharded.json")) << manifest.dump();
  EXPECT_EQ(python("check-sharded"), 0);
}

}  // namespace
