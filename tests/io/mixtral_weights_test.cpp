// save_weights / load_weights under WeightNames::kHuggingFaceMixtral (SEMANTICS 22) for gated
// SwiGLU layers: the names and torch layouts read back with the plain reader (every transpose
// checked element by element against the layer's accessors), bitwise round trips in fp32 and
// bf16 layers, the strong guarantee on bad Mixtral files, and the layers the names cannot hold
// refused with errors that say why. Numerical agreement with Hugging Face's semantics is
// interop_test's (a file written by tests/io/interop.py with numpy's outputs).
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
#include <vector>

namespace {

using switchmoe::Matrix;
using switchmoe::Mode;
using switchmoe::SwitchConfig;
using switchmoe::SwitchLayer;
using switchmoe::WeightNames;
using switchmoe::io::FormatError;
using switchmoe::io::SafetensorsReader;
using switchmoe::io::SafetensorsWriter;

constexpr int kDModel = 8, kDff = 12, kExperts = 4;
const std::string kPrefix = "model.layers.0.block_sparse_moe.";

SwitchConfig mixtral_config(std::uint64_t seed) {
  SwitchConfig config;
  config.d_model = kDModel;
  config.d_ff = kDff;
  config.routing.num_experts = kExperts;
  config.routing.top_k = 2;
  config.routing.dropless = true;
  config.routing.renormalize = true;
  config.jitter_eps = 0.0f;
  config.seed = seed;
  return config;
}

Matrix<float> input(int tokens) {
  Matrix<float> x(tokens, kDModel);  // [tokens, d_model]
  for (int t = 0; t < tokens; ++t) {
    for (int j = 0; j < kDModel; ++j) x(t, j) = std::cos(0.41f * t - 0.9f * j + 0.3f);
  }
  return x;
}

bool bitwise_equal(const Matrix<float>& a, const Matrix<float>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         (a.size() == 0 || std::memcmp(a.data(), b.data(), sizeof(float) * a.size()) == 0);
}

// Every parameter and buffer, by value, in parameters() then buffers() order.
template <class Layer>
std::vector<Matrix<float>> snapshot(Layer& layer) {
  std::vector<Matrix<float>> out;
  for (const auto& p : layer.parameters()) out.push_back(*p.value);
  for (const auto& p : layer.buffers()) out.push_back(*p.value);
  return out;
}

template <class Layer>
void expect_state(Layer& layer, const std::vector<Matrix<float>>& expected) {
  std::vector<switchmoe::ParameterRef> all = layer.parameters();
  for (const auto& p : layer.buffers()) all.push_back(p);
  ASSERT_EQ(all.size(), expected.size());
  for (std::size_t i = 0; i < expected.size(); ++i) {
    EXPECT_TRUE(bitwise_equal(*all[i].value, expected[i])) << all[i].name;
  }
}

SafetensorsReader reread(const SafetensorsWriter& writer) {
  return SafetensorsReader::from_memory(writer.serialize(), "mixtral.safetensors");
}

std::string expert_name(int e, const char* w) {
  return kPrefix + "experts." + std::to_string(e) + "." + w + ".weight";
}

template <class Layer>
class MixtralNames : public ::testing::Test {};
using GatedLayers = ::testing::Types<SwitchLayer<switchmoe::Fp32, switchmoe::SwiGlu>,
                                     SwitchLayer<switchmoe::Bf16, switchmoe::SwiGlu>>;
TYPED_TEST_SUITE(MixtralNames, GatedLayers);

// The file holds exactly Mixtral's tensors, each the transpose of the layer's [in, out] master:
// gate.weight = W_r^T [E, d_model], w1 = W_gate^T and w3 = W_in^T [d_ff, d_model], w2 = W_out^T
// [d_model, d_ff].
TYPED_TEST(MixtralNames, NamesShapesAndTorchLayout) {
  TypeParam layer(mixtral_config(3));
  SafetensorsWriter writer;
  switchmoe::save_weights(writer, layer, WeightNames::kHuggingFaceMixtral, kPrefix);
  const SafetensorsReader reader = reread(writer);
  std::vector<std::string> expected = {kPrefix + "gate.weight"};
  for (int e = 0; e < kExperts; ++e) {
    for (const char* w : {"w1", "w2", "w3"}) expected.push_back(expert_name(e, w));
  }
  std::sort(expected.begin(), expected.end());
  EXPECT_EQ(reader.names(), expected);
  EXPECT_EQ(reader.shape(kPrefix + "gate.weight"), (std::vector<std::int64_t>{kExperts, kDModel}));
  const Matrix<float> gate = reader.tensor(kPrefix + "gate.weight");  // [E, d_model]
  for (int i = 0; i < kDModel; ++i) {
    for (int e = 0; e < kExperts; ++e) ASSERT_EQ(gate(e, i), layer.router_weight()(i, e));
  }
  for (int e = 0; e < kExperts; ++e) {
    SCOPED_TRACE(e);
    EXPECT_EQ(reader.shape(expert_name(e, "w1")), (std::vector<std::int64_t>{kDff, kDModel}));
    EXPECT_EQ(reader.shape(expert_name(e, "w3")), (std::vector<std::int64_t>{kDff, kDModel}));
    EXPECT_EQ(reader.shape(expert_name(e, "w2")), (std::vector<std::int64_t>{kDModel, kDff}));
    const Matrix<float> w1 = reader.tensor(expert_name(e, "w1"));  // [d_ff, d_model]
    const Matrix<float> w3 = reader.tensor(expert_name(e, "w3"));  // [d_ff, d_model]
    const Matrix<float> w2 = reader.tensor(expert_name(e, "w2"));  // [d_model, d_ff]
    for (int i = 0; i < kDModel; ++i) {
      for (int f = 0; f < kDff; ++f) {
        ASSERT_EQ(w1(f, i), layer.w_gate(e)(i, f));  // the gate goes through SiLU
        ASSERT_EQ(w3(f, i), layer.w_in(e)(i, f));    // the up projection
        ASSERT_EQ(w2(i, f), layer.w_out(e)(f, i));
      }
    }
    // w1 and w3 differ: a swap of them would show above.
    EXPECT_FALSE(bitwise_equal(w1, w3));
  }
  EXPECT_EQ(reader.metadata().at("format"), "pt");
}

// Under Mixtral's names and under switchmoe's own (which keep w_gate and the balancing bias).
TYPED_TEST(MixtralNames, RoundTripIsBitwiseAndComputesAtOnce) {
  for (const WeightNames names : {WeightNames::kHuggingFaceMixtral, WeightNames::kSwitchmoe}) {
    SCOPED_TRACE(switchmoe::to_string(names));
    TypeParam source(mixtral_config(1));
    TypeParam target(mixtral_config(2));
    if (names == WeightNames::kSwitchmoe) source.balancing_bias() << 0.0f, 0.5f, -0.25f, 1.0f;
    const Matrix<float> x = input(20);                              // [tokens, d_model]
    const Matrix<float> before = target.forward(x, Mode::kEval).y;  // packs target's weights
    SafetensorsWriter writer;
    switchmoe::save_weights(writer, source, names, kPrefix);
    switchmoe::load_weights(reread(writer), target, names, kPrefix);
    expect_state(target, snapshot(source));
    // No sync_weights(): the next forward computes with the loaded weights (bf16 copies
    // rebuilt).
    const Matrix<float> expected = source.forward(x, Mode::kEval).y;
    EXPECT_TRUE(bitwise_equal(target.forward(x, Mode::kEval).y, expected));
    EXPECT_FALSE(bitwise_equal(before, expected));
  }
}

// A BF16 Mixtral file holds the masters rounded to nearest even; loading gives those values.
TYPED_TEST(MixtralNames, Bf16FileHoldsRoundedMasters) {
  TypeParam source(mixtral_config(5));
  TypeParam target(mixtral_config(6));
  SafetensorsWriter writer;
  switchmoe::save_weights(writer, source, WeightNames::kHuggingFaceMixtral, kPrefix, "BF16");
  const SafetensorsReader reader = reread(writer);
  EXPECT_EQ(reader.dtype(expert_name(1, "w1")), "BF16");
  switchmoe::load_weights(reader, target, WeightNames::kHuggingFaceMixtral, kPrefix);
  const auto rounded = [](float v) {
    std::uint32_t b;
    std::memcpy(&b, &v, 4);
    b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16;
    float r;
    std::memcpy(&r, &b, 4);
    return r;
  };
  for (int e = 0; e < kExperts; ++e) {
    for (int i = 0; i < kDModel; ++i) {
      for (int f = 0; f < kDff; ++f) {
        ASSERT_EQ(target.w_gate(e)(i, f), rounded(source.w_gate(e)(i, f)));
        ASSERT_EQ(target.w_in(e)(i, f), rounded(source.w_in(e)(i, f)));
        ASSERT_EQ(target.w_out(e)(f, i), rounded(source.w_out(e)(f, i)));
      }
    }
  }
}

// A Mixtral checkpoint of `source` in which `edit` changes one tensor (false: leave it out), in
// a file with other layers' tensors too.
template <class Layer>
SafetensorsReader edited_mixtral(
    Layer& source,
    const std::function<bool(const std::string&, Matrix<float>&, std::string&)>& edit) {
  SafetensorsWriter saved;
  switchmoe::save_weights(saved, source, WeightNames::kHuggingFaceMixtral, kPrefix);
  const SafetensorsReader full = reread(saved);
  SafetensorsWriter writer;
  for (const std::string& name : full.names()) {
    Matrix<float> value = full.tensor(name);
    std::string dtype = "F32";
    if (!edit(name, value, dtype)) continue;
    writer.add(name, value, dtype);
  }
  writer.add("model.layers.1.block_sparse_moe.gate.weight", Matrix<float>::Ones(4, 8));
  return reread(writer);
}

TYPED_TEST(MixtralNames, StrongGuaranteeOnABadFile) {
  TypeParam source(mixtral_config(11));
  const Matrix<float> x = input(16);  // [tokens, d_model]
  struct Case {
    const char* what;
    bool format_error;  // else std::invalid_argument
    const char* message;
    std::function<bool(const std::string&, Matrix<float>&, std::string&)> edit;
  };
  const std::string w3_of_2 = expert_name(2, "w3"), w2_of_3 = expert_name(3, "w2");
  const std::string w1_of_0 = expert_name(0, "w1"), gate = kPrefix + "gate.weight";
  const std::vector<Case> cases = {
      {"missing w3", true, "experts.2.w3.weight",
       [&](const std::string& name, Matrix<float>&, std::string&) { return name != w3_of_2; }},
      {"w2 in switchmoe's [in, out] layout", false,
       "tensor 'model.layers.0.block_sparse_moe.experts.3.w2.weight' has shape [12, 8], "
       "expected [8, 12]",
       [&](const std::string& name, Matrix<float>& v, std::string&) {
         if (name == w2_of_3) v = Matrix<float>(v.transpose());
         return true;
       }},
      {"w1 with a wrong d_ff", false, "experts.0.w1.weight' has shape [13, 8]",
       [&](const std::string& name, Matrix<float>& v, std::string&) {
         if (name == w1_of_0) v = Matrix<float>::Ones(kDff + 1, kDModel);
         return true;
       }},
      {"gate with a wrong E", false, "gate.weight' has shape [5, 8], expected [4, 8]",
       [&](const std::string& name, Matrix<float>& v, std::string&) {
         if (name == gate) v = Matrix<float>::Ones(kExperts + 1, kDModel);
         return true;
       }},
      {"NaN in w3", true, "experts.2.w3.weight",
       [&](const std::string& name, Matrix<float>& v, std::string&) {
         if (name == w3_of_2) v(4, 5) = std::numeric_limits<float>::quiet_NaN();
         return true;
       }},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    TypeParam target(mixtral_config(12));
    target.balancing_bias() << 0.5f, -0.5f, 0.25f, 0.0f;  // a load would reset it
    const Matrix<float> before_y = target.forward(x, Mode::kEval).y;
    const auto before = snapshot(target);
    const SafetensorsReader reader = edited_mixtral(source, c.edit);
    std::string message;
    try {
      switchmoe::load_weights(reader, target, WeightNames::kHuggingFaceMixtral, kPrefix);
      ADD_FAILURE() << "loaded";
    } catch (const FormatError& error) {
      EXPECT_TRUE(c.format_error) << error.what();
      message = error.what();
    } catch (const std::invalid_argument& error) {
      EXPECT_FALSE(c.format_error) << error.what();
      message = error.what();
    }
    EXPECT_NE(message.find(c.message), std::string::npos) << message;
    EXPECT_NE(message.find("mixtral.safetensors"), std::string::npos) << message;
    expect_state(target, before);
    EXPECT_TRUE(bitwise_equal(target.forward(x, Mode::kEval).y, before_y));
  }
}

// Mixtral's checkpoints have no selection bias (SEMANTICS 19): loading one sets the layer's to
// zero, the model the file describes, and saving refuses a non-zero bias rather than lose it.
TYPED_TEST(MixtralNames, BalancingBiasIsZeroedOnLoadAndANonZeroOneIsNotSaved) {
  TypeParam source(mixtral_config(13));
  SafetensorsWriter writer;
  switchmoe::save_weights(writer, source, WeightNames::kHuggingFaceMixtral, kPrefix);
  TypeParam target(mixtral_config(14));
  target.balancing_bias() << 0.5f, -0.5f, 0.25f, 0.0f;
  switchmoe::load_weights(reread(writer), target, WeightNames::kHuggingFaceMixtral, kPrefix);
  EXPECT_EQ(target.balancing_bias(), Matrix<float>::Zero(1, kExperts));
  const Matrix<float> x = input(12);  // [tokens, d_model]
  EXPECT_TRUE(bitwise_equal(target.forward(x, Mode::kEval).y, source.forward(x, Mode::kEval).y));

  SafetensorsWriter refused;
  try {
    switchmoe::save_weights(refused, source, WeightNames::kHuggingFaceMixtral, kPrefix);
    source.balancing_bias()(0, 2) = 1e-3f;
    switchmoe::save_weights(refused, source, WeightNames::kHuggingFaceMixtral, "other.");
    ADD_FAILURE() << "saved";
  } catch (const std::invalid_argument& error) {
    EXPECT_NE(std::string(error.what()).find("routing.balancing_bias"), std::string::npos)
        << error.what();
  }
  // The refused call added nothing.
  EXPECT_EQ(reread(refused).names().size(), 1u + 3u * kExperts);
}

// Only SwiGLU experts are Mixtral's: ReLU, GELU and GeGLU layers are refused on save and on
// load with an error naming their activation, before the file or the layer is touched.
TEST(MixtralNamesRefuse, LayersThatAreNotSwiGlu) {
  SwitchLayer<switchmoe::Fp32, switchmoe::SwiGlu> gated(mixtral_config(1));
  SafetensorsWriter writer;
  switchmoe::save_weights(writer, gated, WeightNames::kHuggingFaceMixtral, kPrefix);
  const SafetensorsReader reader = reread(writer);
  const auto expect_refused = [&](auto& layer, const char* activation) {
    SCOPED_TRACE(activation);
    const auto before = snapshot(layer);
    for (int save = 0; save < 2; ++save) {
      try {
        if (save) {
          SafetensorsWriter other;
          switchmoe::save_weights(other, layer, WeightNames::kHuggingFaceMixtral, kPrefix);
        } else {
          switchmoe::load_weights(reader, layer, WeightNames::kHuggingFaceMixtral, kPrefix);
        }
        ADD_FAILURE() << (save ? "saved" : "loaded");
      } catch (const std::invalid_argument& error) {
        const std::string message = error.what();
        EXPECT_NE(message.find("WeightNames::kHuggingFaceMixtral"), std::string::npos) << message;
        EXPECT_NE(message.find(std::string("activation \"") + activation + "\""), std::string::npos)
            << message;
        EXPECT_NE(message.find("SwiGlu"), std::string::npos) << message;
      }
    }
    expect_state(layer, before);
  };
  SwitchLayer<> relu(mixtral_config(2));
  expect_refused(relu, "relu");
  SwitchLayer<switchmoe::Bf16, switchmoe::Gelu> gelu(mixtral_config(3));
  expect_refused(gelu, "gelu");
  SwitchLayer<switchmoe::Fp32, switchmoe::GeGlu> geglu(mixtral_config(4));
  expect_refused(geglu, "geglu");
}

// What Mixtral's names cannot hold: expert biases, a router bias, a shared expert; and gated
// experts under SwitchTransformers' names (wi/wo have no gate).
TEST(MixtralNamesRefuse, StateTheNamesCannotHold) {
  SafetensorsWriter writer;
  const auto refused = [&](SwitchConfig config, WeightNames names, const char* why) {
    SCOPED_TRACE(why);
    SwitchLayer<switchmoe::Fp32, switchmoe::SwiGlu> layer(config);
    try {
      switchmoe::save_weights(writer, layer, names, kPrefix);
      ADD_FAILURE() << "saved";
    } catch (const std::invalid_argument& error) {
      EXPECT_NE(std::string(error.what()).find(why), std::string::npos) << error.what();
    }
  };
  SwitchConfig config = mixtral_config(1);
  config.expert_bias = true;
  refused(config, WeightNames::kHuggingFaceMixtral, "expert_bias");
  config = mixtral_config(1);
  config.router_bias = true;
  refused(config, WeightNames::kHuggingFaceMixtral, "router_bias");
  config = mixtral_config(1);
  config.shared_d_ff = 6;
  refused(config, WeightNames::kHuggingFaceMixtral, "shared expert");
  refused(mixtral_config(1), WeightNames::kHuggingFaceSwitch, "gated experts");
  EXPECT_TRUE(reread(writer).names().empty());
}

}  // namespace
