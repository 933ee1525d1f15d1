// Sharded checkpoints (io/sharded.hpp): write_sharded's shards and index checked against the
// format (every tensor in the shard the index names, total_size, names), a layer saved in shards
// loading bitwise into another, and every check of the index with a crafted index file: not
// JSON, no weight_map, a non-string entry, a duplicate tensor, shard names escaping the folder, a
// missing shard file, a tensor missing from its shard, a tensor in two shards, a wrong
// total_size; load_weights through a bad index leaves the layer unchanged.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
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
using switchmoe::io::SafetensorsIndex;
using switchmoe::io::SafetensorsReader;
using switchmoe::io::SafetensorsWriter;
using switchmoe::io::ShardedSafetensorsReader;
using switchmoe::io::ShardOpening;
namespace fs = std::filesystem;

constexpr const char* kPrefix = "encoder.block.1.layer.1.mlp.";

SwitchConfig switch_config(std::uint64_t seed) {
  SwitchConfig config;
  config.d_model = 8;
  config.d_ff = 12;
  config.routing.num_experts = 4;
  config.seed = seed;
  return config;
}

bool bitwise_equal(const Matrix<float>& a, const Matrix<float>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         (a.size() == 0 || std::memcmp(a.data(), b.data(), sizeof(float) * a.size()) == 0);
}

// The message of the FormatError that `body` throws, with its path and tensor checked.
template <class Body>
std::string format_error(Body&& body, const std::string& path, const std::string& tensor) {
  try {
    body();
  } catch (const FormatError& error) {
    EXPECT_EQ(error.path(), path);
    EXPECT_EQ(error.tensor(), tensor);
    return error.what();
  }
  ADD_FAILURE() << "no FormatError";
  return "";
}

class Sharded : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = ::testing::TempDir() + "switchmoe_sharded_XXXXXX";
    ASSERT_NE(::mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
  }
  void TearDown() override {
    if (!HasFailure()) fs::remove_all(dir_);
  }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }
  std::string write_text(const std::string& name, const std::string& text) const {
    std::ofstream(path(name), std::ios::binary) << text;
    return path(name);
  }
  // Two shards: a.safetensors with "x" [2, 3] and "y" [1, 4], b.safetensors with "z" [3, 1].
  void write_two_shards() const {
    SafetensorsWriter a, b;
    a.add("x", Matrix<float>::Constant(2, 3, 1.5f));
    a.add("y", Matrix<float>::Constant(1, 4, -2.0f));
    b.add("z", Matrix<float>::Constant(3, 1, 0.25f));
    a.write(path("a.safetensors"));
    b.write(path("b.safetensors"));
  }
  fs::path dir_;
};

TEST_F(Sharded, WriterSplitsByBytesAndIndexesEveryTensor) {
  SwitchLayer<> layer(switch_config(5));
  SafetensorsWriter writer;
  switchmoe::save_weights(writer, layer, WeightNames::kHuggingFaceSwitch, kPrefix);
  const std::string index_path = switchmoe::io::write_sharded(writer, dir_.string(), 3);
  EXPECT_EQ(index_path, path("model.safetensors.index.json"));

  // The index as JSON, read independently of SafetensorsIndex.
  std::ifstream in(index_path);
  const nlohmann::json index = nlohmann::json::parse(in);
  const auto& map = index.at("weight_map");
  EXPECT_EQ(map.size(), 9u);  // router + 4 experts x (wi, wo)
  std::set<std::string> files;
  std::uint64_t bytes = 0;
  for (const auto& [name, file] : map.items()) files.insert(file.get<std::string>());
  EXPECT_EQ(files, (std::set<std::string>{"model-00001-of-00003.safetensors",
                                          "model-00002-of-00003.safetensors",
                                          "model-00003-of-00003.safetensors"}));
  std::size_t tensors_in_shards = 0;
  for (const std::string& file : files) {
    const SafetensorsReader shard(path(file));
    EXPECT_EQ(shard.metadata().at("format"), "pt");
    for (const std::string& name : shard.names()) {
      ASSERT_TRUE(map.contains(name)) << name;
      EXPECT_EQ(map.at(name), file) << name;
      const auto [begin, end] = shard.file_offsets(name);
      bytes += end - begin;
      ++tensors_in_shards;
    }
  }
  EXPECT_EQ(tensors_in_shards, map.size());  // each tensor in exactly one shard
  EXPECT_EQ(bytes, (8 * 4 + 4 * 2 * 8 * 12) * sizeof(float));
  EXPECT_EQ(index.at("metadata").at("total_size").get<std::uint64_t>(), bytes);

  // Balanced: the router (128 bytes) and 8 matrices of 384 bytes over 3 shards, 3 matrices at
  // most in one.
  for (const std::string& file : files) {
    EXPECT_LE(SafetensorsReader(path(file)).names().size(), 4u) << file;
  }
  EXPECT_THROW(switchmoe::io::write_sharded(writer, dir_.string(), 10), std::invalid_argument);
  EXPECT_THROW(switchmoe::io::write_sharded(writer, dir_.string(), 2, "../model"),
               std::invalid_argument);
}

TEST_F(Sharded, LayerRoundTripsBitwiseThroughShardsLazilyOrAll) {
  SwitchLayer<> saved(switch_config(5));
  SafetensorsWriter writer;
  switchmoe::save_weights(writer, saved, WeightNames::kSwitchmoe, kPrefix);
  const std::string index_path = switchmoe::io::write_sharded(writer, dir_.string(), 4, "layer");
  Matrix<float> x(6, 8);  // [tokens, d_model]
  for (Eigen::Index i = 0; i < x.size(); ++i) x.data()[i] = std::sin(0.7f * i);
  const Matrix<float> expected = saved.forward(x, Mode::kEval).y;
  for (const ShardOpening opening : {ShardOpening::kLazy, ShardOpening::kAll}) {
    const ShardedSafetensorsReader reader(index_path, opening);
    EXPECT_EQ(reader.open_shards(), opening == ShardOpening::kAll ? 4u : 0u);
    SwitchLayer<> loaded(switch_config(6));  // other initial weights
    ASSERT_FALSE(bitwise_equal(loaded.router_weight(), saved.router_weight()));
    switchmoe::load_weights(reader, loaded, WeightNames::kSwitchmoe, kPrefix);
    EXPECT_EQ(reader.open_shards(), 4u);
    const auto a = saved.parameters(), b = loaded.parameters();
    ASSERT_EQ(a.size(), b.size());
    for (std::size_t i = 0; i < a.size(); ++i) {
      EXPECT_TRUE(bitwise_equal(*a[i].value, *b[i].value)) << a[i].name;
    }
    EXPECT_TRUE(bitwise_equal(loaded.forward(x, Mode::kEval).y, expected));
  }
}

TEST_F(Sharded, ReadsACraftedIndex) {
  write_two_shards();
  const std::string index_path =
      write_text("model.safetensors.index.json",
                 R"({"metadata": {"total_size": 52}, "weight_map": {"x": "a.safetensors",
          "y": "a.safetensors", "z": "b.safetensors"}})");
  const SafetensorsIndex index(index_path);
  EXPECT_EQ(index.names(), (std::vector<std::string>{"x", "y", "z"}));
  EXPECT_EQ(index.shards(), (std::vector<std::string>{"a.safetensors", "b.safetensors"}));
  EXPECT_EQ(index.shard("z"), "b.safetensors");
  EXPECT_EQ(index.total_size(), std::optional<std::uint64_t>(52));
  const ShardedSafetensorsReader reader(index_path);
  EXPECT_EQ(reader.tensor("z"), Matrix<float>::Constant(3, 1, 0.25f));
  EXPECT_EQ(reader.open_shards(), 1u);  // lazily: only b so far
  EXPECT_EQ(reader.shape("x"), (std::vector<std::int64_t>{2, 3}));
  EXPECT_EQ(reader.open_shards(), 2u);
  EXPECT_NO_THROW(ShardedSafetensorsReader(index_path, ShardOpening::kAll));
  const std::string message = format_error([&] { reader.shard_of("w"); }, index_path, "w");
  EXPECT_NE(message.find("not in the index"), std::string::npos) << message;
}

TEST_F(Sharded, RefusesAnIndexThatIsNotJsonOrHasNoWeightMap) {
  const struct {
    const char* text;
    const char* says;
  } cases[] = {
      {"{\"weight_map\": {\"x\": ", "not valid JSON"},
      {"[1, 2]", "is a JSON array, expected an object"},
      {"{\"metadata\": {}}", "no \"weight_map\""},
      {"{\"weight_map\": [\"a.safetensors\"]}", "weight_map is a JSON array"},
      {"{\"metadata\": {\"total_size\": \"52\"}, \"weight_map\": {}}", "total_size is \"52\""},
      {"{\"metadata\": {\"total_size\": -1}, \"weight_map\": {}}", "total_size is -1"},
      {"{\"metadata\": 3, \"weight_map\": {}}", "metadata is a JSON number"},
      {"{\"weight_map\": {}, \"weight_map\": {}}", "key 'weight_map' twice"},
      {"{\"weight_map\": {\"x\": \"a\xff.safetensors\"}}", "not valid UTF-8"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.text);
    const std::string index_path = write_text("index.json", c.text);
    const std::string message = format_error([&] { SafetensorsIndex{index_path}; }, index_path, "");
    EXPECT_NE(message.find(c.says), std::string::npos) << message;
    EXPECT_NE(message.find(index_path), std::string::npos) << message;
  }
  EXPECT_THROW(SafetensorsIndex(path("absent.json")), switchmoe::io::IoError);
}

TEST_F(Sharded, RefusesANonStringEntryAndADuplicateTensor) {
  write_two_shards();
  std::string index_path = write_text("index.json", R"({"weight_map": {"x": 1}})");
  std::string message = format_error([&] { SafetensorsIndex{index_path}; }, index_path, "x");
  EXPECT_NE(message.find("is a JSON number, expected the shard's file name"), std::string::npos);
  // nlohmann alone would keep the second "x" silently.
  index_path =
      write_text("index.json", R"({"weight_map": {"x": "a.safetensors", "x": "b.safetensors"}})");
  message = format_error([&] { SafetensorsIndex{index_path}; }, index_path, "x");
  EXPECT_NE(message.find("appears twice in weight_map"), std::string::npos) << message;
}

TEST_F(Sharded, RefusesShardNamesOutsideTheFolder) {
  for (const char* shard : {"../a.safetensors", "/tmp/a.safetensors", "sub/a.safetensors", "..",
                            ".", "", "sub\\\\a.safetensors"}) {
    SCOPED_TRACE(shard);
    const std::string index_path =
        write_text("index.json",
                   std::string(R"({"weight_map": {"x": "a.safetensors", "y": ")") + shard + "\"}}");
    const std::string message =
        format_error([&] { SafetensorsIndex{index_path}; }, index_path, "y");
    EXPECT_NE(message.find("shard file name"), std::string::npos) << message;
  }
}

TEST_F(Sharded, RefusesAMissingShardFileWhenItIsNeeded) {
  write_two_shards();
  const std::string index_path = write_text(
      "index.json", R"({"weight_map": {"x": "a.safetensors", "q": "gone.safetensors"}})");
  const ShardedSafetensorsReader lazy(index_path);  // nothing opened yet
  EXPECT_EQ(lazy.tensor("x"), Matrix<float>::Constant(2, 3, 1.5f));
  std::string message = format_error([&] { lazy.tensor("q"); }, index_path, "q");
  EXPECT_NE(message.find("shard 'gone.safetensors' named by the index cannot be read"),
            std::string::npos)
      << message;
  message = format_error([&] { ShardedSafetensorsReader(index_path, ShardOpening::kAll); },
                         index_path, "q");
  EXPECT_NE(message.find("gone.safetensors"), std::string::npos) << message;
}

TEST_F(Sharded, RefusesATensorMissingFromItsShard) {
  write_two_shards();
  const std::string index_path =
      write_text("index.json", R"({"weight_map": {"x": "a.safetensors", "w": "b.safetensors",
                        "z": "b.safetensors"}})");
  const ShardedSafetensorsReader lazy(index_path);
  EXPECT_NO_THROW(lazy.tensor("x"));
  // Opening b checks all of b's entries, whichever tensor is asked for.
  const std::string message = format_error([&] { lazy.tensor("z"); }, index_path, "w");
  EXPECT_NE(message.find("maps it to shard 'b.safetensors', which has no such tensor"),
            std::string::npos)
      << message;
  EXPECT_THROW(ShardedSafetensorsReader(index_path, ShardOpening::kAll), FormatError);
}

TEST_F(Sharded, RefusesATensorInTwoShards) {
  write_two_shards();
  SafetensorsWriter c;
  c.add("z", Matrix<float>::Constant(3, 1, 9.0f));  // a second "z"
  c.add("u", Matrix<float>::Constant(1, 1, 1.0f));
  c.write(path("c.safetensors"));
  const std::string index_path =
      write_text("index.json", R"({"weight_map": {"z": "b.safetensors", "u": "c.safetensors"}})");
  const ShardedSafetensorsReader lazy(index_path);
  EXPECT_NO_THROW(lazy.tensor("z"));
  const std::string message = format_error([&] { lazy.tensor("u"); }, index_path, "z");
  EXPECT_NE(message.find("a duplicate"), std::string::npos) << message;
}

TEST_F(Sharded, RefusesAWrongTotalSizeWhenAllShardsAreOpen) {
  write_two_shards();
  const std::string index_path = write_text(
      "index.json", R"({"metadata": {"total_size": 51}, "weight_map": {"x": "a.safetensors",
          "y": "a.safetensors", "z": "b.safetensors"}})");
  EXPECT_NO_THROW(ShardedSafetensorsReader{index_path});  // lazily: not checked
  const std::string message = format_error(
      [&] { ShardedSafetensorsReader(index_path, ShardOpening::kAll); }, index_path, "");
  EXPECT_NE(message.find("total_size is 51, but the indexed tensors hold 52 bytes"),
            std::string::npos)
      << message;
}

TEST_F(Sharded, FailedLoadThroughAnIndexLeavesTheLayerUnchanged) {
  SwitchLayer<> saved(switch_config(5));
  SafetensorsWriter writer;
  switchmoe::save_weights(writer, saved, WeightNames::kHuggingFaceSwitch, kPrefix);
  const std::string index_path = switchmoe::io::write_sharded(writer, dir_.string(), 3);
  // Shards by bytes: [expert 0 wi, wo; expert 1 wi], [expert 1 wo; expert 2 wi, wo], [expert 3
  // wi, wo; router]. The middle one disappears after the index was written: the load reads the
  // router (shard 3) and expert 0 (shard 1) before it fails on expert 1's wo.
  fs::remove(path("model-00002-of-00003.safetensors"));
  SwitchLayer<> layer(switch_config(6));
  std::vector<Matrix<float>> before;
  for (const auto& p : layer.parameters()) before.push_back(*p.value);
  const ShardedSafetensorsReader reader(index_path);
  EXPECT_THROW(switchmoe::load_weights(reader, layer, WeightNames::kHuggingFaceSwitch, kPrefix),
               FormatError);
  EXPECT_EQ(reader.open_shards(), 2u);
  const auto after = layer.parameters();
  for (std::size_t i = 0; i < before.size(); ++i) {
    EXPECT_TRUE(bitwise_equal(*after[i].value, before[i])) << after[i].name;
  }
  // A prefix the index does not have: the missing tensor is named with the index's path.
  const ShardedSafetensorsReader other(path("model.safetensors.index.json"));
  const std::string message = format_error(
      [&] { switchmoe::load_weights(other, layer, WeightNames::kHuggingFaceSwitch, "decoder."); },
      index_path, "decoder.router.classifier.weight");
  EXPECT_NE(message.find("missing"), std::string::npos) << message;
}

}  // namespace
