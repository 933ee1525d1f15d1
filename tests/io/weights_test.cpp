// save_weights / load_weights: bitwise round trips under every name set, the Hugging Face
// layouts read back with the plain reader (transposes checked element by element), the strong
// guarantee of a failed load, and a loaded layer computing with the new weights at once.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <switchmoe/io/safetensors.hpp>
#include <switchmoe/switchmoe.hpp>
#include <type_traits>
#include <vector>

namespace {

using switchmoe::DenseConfig;
using switchmoe::DenseFFN;
using switchmoe::Matrix;
using switchmoe::Mode;
using switchmoe::SwitchConfig;
using switchmoe::SwitchLayer;
using switchmoe::WeightNames;
using switchmoe::io::FormatError;
using switchmoe::io::SafetensorsReader;
using switchmoe::io::SafetensorsWriter;

SwitchConfig switch_config(std::uint64_t seed, bool biases) {
  SwitchConfig config;
  config.d_model = 8;
  config.d_ff = 12;
  config.routing.num_experts = 4;
  config.router_bias = biases;
  config.expert_bias = biases;
  config.seed = seed;
  return config;
}

Matrix<float> input(int tokens, int d_model) {
  Matrix<float> x(tokens, d_model);  // [tokens, d_model]
  for (int t = 0; t < tokens; ++t) {
    for (int j = 0; j < d_model; ++j) x(t, j) = std::sin(0.37f * t + 1.1f * j + 0.2f);
  }
  return x;
}

bool bitwise_equal(const Matrix<float>& a, const Matrix<float>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         (a.size() == 0 || std::memcmp(a.data(), b.data(), sizeof(float) * a.size()) == 0);
}

// Every parameter and (for SwitchLayer) buffer, by value, in parameters() then buffers() order.
template <class Layer>
std::vector<switchmoe::ParameterRef> state(Layer& layer) {
  std::vector<switchmoe::ParameterRef> out = layer.parameters();
  if constexpr (!std::is_same_v<Layer, DenseFFN<>>) {
    for (const auto& p : layer.buffers()) out.push_back(p);
  }
  return out;
}

template <class Layer>
std::vector<Matrix<float>> snapshot(Layer& layer) {
  std::vector<Matrix<float>> out;
  for (const auto& p : state(layer)) out.push_back(*p.value);
  return out;
}

template <class Layer>
void expect_parameters(Layer& layer, const std::vector<Matrix<float>>& expected) {
  const auto parameters = state(layer);
  ASSERT_EQ(parameters.size(), expected.size());
  for (std::size_t i = 0; i < expected.size(); ++i) {
    EXPECT_TRUE(bitwise_equal(*parameters[i].value, expected[i])) << parameters[i].name;
  }
}

SafetensorsReader reread(const SafetensorsWriter& writer) {
  return SafetensorsReader::from_memory(writer.serialize(), "checkpoint");
}

template <class Layer>
class SwitchRoundTrip : public ::testing::Test {};
using Layers = ::testing::Types<SwitchLayer<>, SwitchLayer<switchmoe::Bf16, switchmoe::Gelu>,
                                SwitchLayer<switchmoe::Fp32, switchmoe::Gelu>>;
TYPED_TEST_SUITE(SwitchRoundTrip, Layers);

TYPED_TEST(SwitchRoundTrip, BitwiseUnderBothNameSets) {
  for (const WeightNames names : {WeightNames::kSwitchmoe, WeightNames::kHuggingFaceSwitch}) {
    SCOPED_TRACE(switchmoe::to_string(names));
    const bool biases = names == WeightNames::kSwitchmoe;  // HF experts have no biases
    TypeParam source(switch_config(1, biases));
    TypeParam target(switch_config(2, biases));
    if (biases) {
      // Non-zero biases, so that a bias that does not load shows.
      source.router_bias().setConstant(0.25f);
      for (int e = 0; e < 4; ++e) source.b_out(e).setConstant(0.1f * (e + 1));
    }
    const Matrix<float> x = input(20, 8);                           // [tokens, d_model]
    const Matrix<float> before = target.forward(x, Mode::kEval).y;  // packs target's weights
    SafetensorsWriter writer;
    switchmoe::save_weights(writer, source, names, "encoder.block.1.layer.1.mlp.");
    switchmoe::load_weights(reread(writer), target, names, "encoder.block.1.layer.1.mlp.");
    expect_parameters(target, snapshot(source));
    // No sync_weights(): the next forward already computes with the loaded weights.
    const Matrix<float> expected = source.forward(x, Mode::kEval).y;
    const Matrix<float> loaded = target.forward(x, Mode::kEval).y;
    EXPECT_TRUE(bitwise_equal(loaded, expected));
    EXPECT_FALSE(bitwise_equal(before, expected));
  }
}

TEST(SaveWeights, HuggingFaceSwitchNamesAndTorchLayout) {
  SwitchLayer<> layer(switch_config(3, false));
  SwitchConfig with_bias = switch_config(3, false);
  with_bias.router_bias = true;
  SwitchLayer<> biased(with_bias);
  biased.router_bias() << 1, 2, 3, 4;
  SafetensorsWriter writer;
  switchmoe::save_weights(writer, layer, WeightNames::kHuggingFaceSwitch, "p.");
  switchmoe::save_weights(writer, biased, WeightNames::kHuggingFaceSwitch, "q.");
  const SafetensorsReader reader = reread(writer);
  std::vector<std::string> expected = {"p.router.classifier.weight", "q.router.classifier.bias",
                                       "q.router.classifier.weight"};
  for (const char* p : {"p.", "q."}) {
    for (int e = 0; e < 4; ++e) {
      expected.push_back(p + ("experts.expert_" + std::to_string(e)) + ".wi.weight");
      expected.push_back(p + ("experts.expert_" + std::to_string(e)) + ".wo.weight");
    }
  }
  std::sort(expected.begin(), expected.end());
  EXPECT_EQ(reader.names(), expected);
  EXPECT_EQ(reader.shape("p.router.classifier.weight"), (std::vector<std::int64_t>{4, 8}));
  EXPECT_EQ(reader.shape("q.router.classifier.bias"), (std::vector<std::int64_t>{4}));
  EXPECT_EQ(reader.shape("p.experts.expert_2.wi.weight"), (std::vector<std::int64_t>{12, 8}));
  EXPECT_EQ(reader.shape("p.experts.expert_2.wo.weight"), (std::vector<std::int64_t>{8, 12}));
  const Matrix<float> router = reader.tensor("p.router.classifier.weight");  // [E, d_model]
  const Matrix<float> wi = reader.tensor("p.experts.expert_2.wi.weight");    // [d_ff, d_model]
  const Matrix<float> wo = reader.tensor("p.experts.expert_2.wo.weight");    // [d_model, d_ff]
  for (int i = 0; i < 8; ++i) {
    for (int e = 0; e < 4; ++e) EXPECT_EQ(router(e, i), layer.router_weight()(i, e));
    for (int f = 0; f < 12; ++f) {
      EXPECT_EQ(wi(f, i), layer.w_in(2)(i, f));
      EXPECT_EQ(wo(i, f), layer.w_out(2)(f, i));
    }
  }
  EXPECT_EQ(reader.tensor("q.router.classifier.bias"), biased.router_bias());
  EXPECT_EQ(reader.metadata().at("format"), "pt");
}

TEST(SaveWeights, DenseFfnUnderBothNameSets) {
  DenseConfig config{8, 16, false, 0.0f, 0.1f, 5};
  DenseFFN<> source(config);
  config.seed = 6;
  DenseFFN<> target(config);
  SafetensorsWriter writer;
  switchmoe::save_weights(writer, source, WeightNames::kHuggingFaceSwitch, "ffn.");
  switchmoe::save_weights(writer, source, WeightNames::kSwitchmoe, "own.");
  const SafetensorsReader reader = reread(writer);
  EXPECT_EQ(reader.names(),
            (std::vector<std::string>{"ffn.wi.weight", "ffn.wo.weight", "own.w_in", "own.w_out"}));
  EXPECT_EQ(reader.tensor("ffn.wi.weight"), source.w_in().transpose());  // [d_ff, d_model]
  EXPECT_EQ(reader.tensor("own.w_out"), source.w_out());                 // [d_ff, d_model]
  const Matrix<float> x = input(5, 8);
  for (const auto& [names, prefix] : {std::pair{WeightNames::kHuggingFaceSwitch, "ffn."},
                                      std::pair{WeightNames::kSwitchmoe, "own."}}) {
    DenseFFN<> fresh(config);
    fresh.forward(x);
    switchmoe::load_weights(reader, fresh, names, prefix);
    expect_parameters(fresh, snapshot(source));
    EXPECT_TRUE(bitwise_equal(fresh.forward(x), source.forward(x)));
  }
  config.bias = true;
  DenseFFN<> biased(config);
  EXPECT_THROW(switchmoe::save_weights(writer, biased, WeightNames::kHuggingFaceSwitch, "b."),
               std::invalid_argument);
  EXPECT_THROW(switchmoe::save_weights(writer, source, WeightNames::kHuggingFaceMixtral, "m."),
               std::invalid_argument);
}

TEST(SaveWeights, Bf16CheckpointsHoldRoundedMasters) {
  SwitchLayer<> source(switch_config(7, false));
  SwitchLayer<> target(switch_config(8, false));
  SafetensorsWriter writer;
  switchmoe::save_weights(writer, source, WeightNames::kSwitchmoe, "", "BF16");
  switchmoe::load_weights(reread(writer), target);
  const auto expected = snapshot(source);
  const auto loaded = state(target);  // parameters and buffers, in snapshot's order
  ASSERT_EQ(loaded.size(), expected.size());
  for (std::size_t i = 0; i < expected.size(); ++i) {
    for (Eigen::Index k = 0; k < expected[i].size(); ++k) {
      std::uint32_t b;
      std::memcpy(&b, expected[i].data() + k, 4);
      const std::uint32_t rounded = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16;  // RNE
      std::uint32_t got;
      std::memcpy(&got, loaded[i].value->data() + k, 4);
      ASSERT_EQ(got, rounded) << loaded[i].name << " element " << k;
    }
  }
}

TEST(SaveWeights, RefusesWhatTheNamesCannotHoldAndLeavesTheWriterAsItWas) {
  SwitchLayer<> with_expert_bias(switch_config(1, true));
  SafetensorsWriter writer;
  EXPECT_THROW(switchmoe::save_weights(writer, with_expert_bias, WeightNames::kHuggingFaceSwitch),
               std::invalid_argument);
  SwitchLayer<> plain(switch_config(1, false));
  // Mixtral names need gated experts (SEMANTICS 15), which ReLU experts are not.
  EXPECT_THROW(switchmoe::save_weights(writer, plain, WeightNames::kHuggingFaceMixtral),
               std::invalid_argument);
  EXPECT_THROW(switchmoe::load_weights(reread(writer), plain, WeightNames::kHuggingFaceMixtral),
               std::invalid_argument);
  Matrix<float> taken = Matrix<float>::Zero(1, 1);  // [1, 1]
  writer.add("l.experts.3.w_out", taken);
  EXPECT_THROW(switchmoe::save_weights(writer, plain, WeightNames::kSwitchmoe, "l."),
               std::invalid_argument);
  EXPECT_EQ(reread(writer).names(), (std::vector<std::string>{"l.experts.3.w_out"}));
}

// A checkpoint of `source` in switchmoe's names in which `edit` changes one thing.
template <class Edit>
SafetensorsReader edited_checkpoint(SwitchLayer<>& source, Edit edit) {
  SafetensorsWriter writer;
  for (const auto& p : state(source)) {
    Matrix<float> value = *p.value;
    std::string dtype = "F32";
    if (!edit(p.name, value, dtype)) continue;
    writer.add(p.name, value, dtype);
  }
  writer.add("unrelated.tensor", Matrix<float>::Ones(3, 3));
  return reread(writer);
}

TEST(LoadWeights, StrongGuaranteeOnEveryKindOfBadTensor) {
  SwitchLayer<> source(switch_config(11, true));
  const Matrix<float> x = input(16, 8);  // [tokens, d_model]
  struct Case {
    const char* what;
    bool format_error;  // else std::invalid_argument
    std::function<bool(const std::string&, Matrix<float>&, std::string&)> edit;
  };
  const std::vector<Case> cases = {
      {"wrong shape", false,
       [](const std::string& name, Matrix<float>& v, std::string&) {
         if (name == "experts.3.w_out") v = Matrix<float>::Ones(v.rows() + 1, v.cols());
         return true;
       }},
      {"transposed shape", false,
       [](const std::string& name, Matrix<float>& v, std::string&) {
         if (name == "router.weight") v = Matrix<float>(v.transpose());
         return true;
       }},
      {"missing", true,
       [](const std::string& name, Matrix<float>&, std::string&) {
         return name != "experts.2.b_in";
       }},
      {"not finite", true,
       [](const std::string& name, Matrix<float>& v, std::string&) {
         if (name == "experts.3.w_out") v(2, 1) = std::numeric_limits<float>::quiet_NaN();
         return true;
       }},
      {"infinite bias", true,
       [](const std::string& name, Matrix<float>& v, std::string&) {
         if (name == "router.bias") v(0, 3) = std::numeric_limits<float>::infinity();
         return true;
       }},
      {"missing balancing bias", true,
       [](const std::string& name, Matrix<float>&, std::string&) {
         return name != "routing.balancing_bias";
       }},
      {"balancing bias of another E", false,
       [](const std::string& name, Matrix<float>& v, std::string&) {
         if (name == "routing.balancing_bias") v = Matrix<float>::Zero(1, 5);
         return true;
       }},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    SwitchLayer<> target(switch_config(12, true));
    target.balancing_bias() << 0.125f, 0.0f, -0.5f, 0.25f;
    const Matrix<float> before_y = target.forward(x, Mode::kEval).y;
    const auto before = snapshot(target);
    const SafetensorsReader reader = edited_checkpoint(source, c.edit);
    if (c.format_error) {
      EXPECT_THROW(switchmoe::load_weights(reader, target), FormatError);
    } else {
      EXPECT_THROW(switchmoe::load_weights(reader, target), std::invalid_argument);
    }
    expect_parameters(target, before);
    EXPECT_TRUE(bitwise_equal(target.forward(x, Mode::kEval).y, before_y));
  }
  // The error names the file and the tensor.
  SwitchLayer<> target(switch_config(12, true));
  try {
    switchmoe::load_weights(
        edited_checkpoint(source,
                          [](const std::string& name, Matrix<float>& v, std::string&) {
                            if (name == "experts.1.w_in") v.resize(3, 3);
                            return true;
                          }),
        target);
    ADD_FAILURE() << "loaded";
  } catch (const std::invalid_argument& error) {
    EXPECT_NE(std::string(error.what())
                  .find("checkpoint: tensor 'experts.1.w_in' has shape "
                        "[3, 3], expected [8, 12]"),
              std::string::npos)
        << error.what();
  }
}

TEST(LoadWeights, ANonFloatDtypeIsAFormatError) {
  SafetensorsWriter writer;
  writer.add("wi.weight", Matrix<float>::Ones(16, 8));
  writer.add("wo.weight", Matrix<float>::Ones(8, 16));
  std::vector<unsigned char> bytes = writer.serialize();
  const std::string from = "\"F32\"", to = "\"I32\"";
  const auto at = std::search(bytes.begin(), bytes.end(), from.begin(), from.end());
  std::copy(to.begin(), to.end(), at);
  const auto reader = SafetensorsReader::from_memory(bytes, "ints");
  DenseFFN<> layer(DenseConfig{8, 16, false, 0.0f, 0.1f, 1});
  const auto before = snapshot(layer);
  EXPECT_THROW(switchmoe::load_weights(reader, layer, WeightNames::kHuggingFaceSwitch),
               FormatError);
  expect_parameters(layer, before);
}

TEST(LoadWeights, Accepts1dOr2dBiasesAndF16Files) {
  SwitchLayer<> source(switch_config(21, true));
  for (int e = 0; e < 4; ++e) source.b_in(e).setConstant(0.5f * e);
  SafetensorsWriter writer;
  for (const auto& p : state(source)) {
    if (p.value->rows() == 1) {
      writer.add(p.name, *p.value, "F16", {p.value->cols()});  // 1-D, half precision
    } else {
      writer.add(p.name, *p.value, "F32");
    }
  }
  SwitchLayer<> target(switch_config(22, true));
  switchmoe::load_weights(reread(writer), target);
  for (int e = 0; e < 4; ++e) {
    EXPECT_EQ(target.b_in(e), Matrix<float>::Constant(1, 12, 0.5f * e));
    EXPECT_EQ(target.w_in(e), source.w_in(e));
  }
}

// SEMANTICS 19: the balancing bias is layer state, saved under switchmoe's names as the buffer
// "routing.balancing_bias" [1, E]. A layer trained with bias_update_rate > 0 (so its bias moved
// away from zero) round-trips bitwise, and the loaded layer continues training exactly as the
// original: same outputs, same bias updates.
TEST(BalancingBias, SavedAndRestoredUnderSwitchmoeNames) {
  SwitchConfig config = switch_config(31, false);
  config.routing.top_k = 2;
  config.routing.bias_update_rate = 1e-2f;
  config.jitter_eps = 0.0f;  // the jitter stream's position is not layer state
  SwitchLayer<> trained(config);
  const Matrix<float> x = input(24, 8);  // [tokens, d_model]
  for (int step = 0; step < 5; ++step) {
    const auto out = trained.forward(x, Mode::kTrain);
    trained.zero_grad();
    trained.backward(Matrix<float>::Constant(out.y.rows(), out.y.cols(), 0.1f));
    for (const auto& p : trained.parameters()) *p.value -= 0.05f * *p.grad;  // SGD
  }
  // The training steps moved the bias (each step moves each entry by 0 or +-u).
  const Matrix<float> bias = trained.balancing_bias();  // [1, E]
  ASSERT_GT(bias.cwiseAbs().maxCoeff(), 0.0f);

  SafetensorsWriter writer;
  switchmoe::save_weights(writer, trained, WeightNames::kSwitchmoe, "layers.2.mlp.");
  const SafetensorsReader reader = reread(writer);
  ASSERT_TRUE(reader.contains("layers.2.mlp.routing.balancing_bias"));
  EXPECT_EQ(reader.shape("layers.2.mlp.routing.balancing_bias"), (std::vector<std::int64_t>{1, 4}));
  EXPECT_TRUE(bitwise_equal(reader.tensor("layers.2.mlp.routing.balancing_bias"), bias));

  SwitchLayer<> loaded(config);
  ASSERT_EQ(loaded.balancing_bias(), Matrix<float>::Zero(1, 4));
  switchmoe::load_weights(reader, loaded, WeightNames::kSwitchmoe, "layers.2.mlp.");
  expect_parameters(loaded, snapshot(trained));
  EXPECT_TRUE(bitwise_equal(loaded.balancing_bias(), bias));
  for (int step = 0; step < 3; ++step) {
    SCOPED_TRACE(step);
    const auto a = trained.forward(x, Mode::kTrain);
    const auto b = loaded.forward(x, Mode::kTrain);
    EXPECT_TRUE(bitwise_equal(a.y, b.y));
    EXPECT_TRUE(bitwise_equal(trained.balancing_bias(), loaded.balancing_bias()));
  }
  // Loading the same weights without the bias would choose differently: the bias matters here.
  SwitchLayer<> unbiased(config);
  switchmoe::load_weights(reader, unbiased, WeightNames::kSwitchmoe, "layers.2.mlp.");
  unbiased.balancing_bias().setZero();
  SwitchLayer<> restored(config);
  switchmoe::load_weights(reader, restored, WeightNames::kSwitchmoe, "layers.2.mlp.");
  EXPECT_FALSE(
      bitwise_equal(unbiased.forward(x, Mode::kEval).y, restored.forward(x, Mode::kEval).y));

  // Hugging Face names cannot hold it: a non-zero bias is refused rather than lost.
  SafetensorsWriter hf;
  EXPECT_THROW(switchmoe::save_weights(hf, trained, WeightNames::kHuggingFaceSwitch, "p."),
               std::invalid_argument);
  EXPECT_TRUE(reread(hf).names().empty());
}

}  // namespace
