// Checkpoints of the expert-parallel layer (issue 12, SEMANTICS 21, 22), under mpirun with 1, 2
// and 4 ranks: a single-process SwitchLayer's file loads into P ranks (each its experts), the
// P-rank sharded save loads into a single-process layer, all bit for bit and with the same
// forward outputs as the single-process layer; a tensor missing on one rank makes every rank
// throw the same error and leaves every rank's layer as it was.
#include <gtest/gtest.h>
#include <mpi.h>
#include <stdlib.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <switchmoe/io/distributed_weights.hpp>
#include <vector>

#include "distributed/harness.hpp"
#include "support/matrices.hpp"

namespace {

using switchmoe_test::thrown;

using switchmoe::ExpertParallelSwitchLayer;
using switchmoe::Matrix;
using switchmoe::Mode;
using switchmoe::SwitchConfig;
using switchmoe::SwitchLayer;
using switchmoe::SwitchOutput;
using switchmoe::WeightNames;
using switchmoe_test::MpiTest;
using switchmoe_test::SameBits;
using switchmoe_test::world_rank;
using switchmoe_test::world_size;

constexpr int kExperts = 4;        // a multiple of 1, 2 and 4 ranks
constexpr int kTokensPerRank = 8;  // two groups of 4 on each rank

SwitchConfig make_config(std::uint64_t seed) {
  SwitchConfig config;
  config.d_model = 8;
  config.d_ff = 16;
  config.routing.num_experts = kExperts;
  config.routing.group_size = 4;
  config.routing.capacity_factor = 2.0;
  config.routing.min_capacity = 1;
  config.router_bias = true;  // a second replicated tensor (HF names have no expert biases)
  config.init_scale = 0.5f;
  config.seed = seed;
  return config;
}

/// Rank 0's string on every rank.
std::string rank0(std::string s) {
  int length = static_cast<int>(s.size());
  MPI_Bcast(&length, 1, MPI_INT, 0, MPI_COMM_WORLD);
  s.resize(static_cast<std::size_t>(length));
  MPI_Bcast(s.data(), length, MPI_CHAR, 0, MPI_COMM_WORLD);
  return s;
}

/// A folder shared by the ranks (made by rank 0), removed at the end of the test.
class Folder {
 public:
  Folder() {
    std::string made;
    if (world_rank() == 0) {
      std::string pattern =
          (std::filesystem::temp_directory_path() / "switchmoe_ep_XXXXXX").string();
      made = mkdtemp(pattern.data()) ? pattern : "";
    }
    path_ = rank0(made);
  }
  ~Folder() {
    MPI_Barrier(MPI_COMM_WORLD);
    if (world_rank() == 0 && !path_.empty()) std::filesystem::remove_all(path_);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

/// Expects the router and the owned experts of `got` to equal `want`'s bit for bit.
template <class Got, class Want>
void expect_same_weights(Got& got, Want& want, int first, int local, const std::string& what) {
  EXPECT_TRUE(SameBits(got.router_weight(), want.router_weight())) << what;
  EXPECT_TRUE(SameBits(got.router_bias(), want.router_bias())) << what;
  for (int e = first; e < first + local; ++e) {
    EXPECT_TRUE(SameBits(got.w_in(e), want.w_in(e))) << what << ", expert " << e;
    EXPECT_TRUE(SameBits(got.w_out(e), want.w_out(e))) << what << ", expert " << e;
  }
}

/// Forward of all ranks' tokens: the P-rank layer's rows equal the single-process layer's.
template <class Single>
void expect_same_forward(ExpertParallelSwitchLayer<>& layer, Single& single) {
  const int rank = world_rank(), ranks = world_size();
  const Matrix<float> x_all =
      switchmoe_test::random_matrix(ranks * kTokensPerRank, 8, 31);  // [tokens, d_model]
  const Matrix<float> x = x_all.middleRows(rank * kTokensPerRank, kTokensPerRank);
  const SwitchOutput out = layer.forward(x, Mode::kEval);
  const SwitchOutput want = single.forward(x_all, Mode::kEval);
  EXPECT_TRUE(SameBits(out.y, want.y.middleRows(rank * kTokensPerRank, kTokensPerRank)));
  EXPECT_TRUE(SameBits(out.routing.expert,
                       want.routing.expert.middleRows(rank * kTokensPerRank, kTokensPerRank)));
}

const WeightNames kNames[] = {WeightNames::kSwitchmoe, WeightNames::kHuggingFaceSwitch};

class ExpertParallelWeights : public MpiTest {};

TEST_F(ExpertParallelWeights, SingleProcessFileLoadsIntoEveryRank) {
  Folder folder;
  for (const WeightNames names : kNames) {
    const std::string what = switchmoe::to_string(names);
    SwitchLayer<> single(make_config(7));  // the same on every rank
    const std::string path = folder.path() + "/single.safetensors";
    if (world_rank() == 0) {
      switchmoe::io::SafetensorsWriter writer;
      switchmoe::save_weights(writer, single, names, "block.");
      writer.write(path);
    }
    MPI_Barrier(MPI_COMM_WORLD);

    ExpertParallelSwitchLayer<> layer(make_config(99), MPI_COMM_WORLD);  // other weights
    EXPECT_FALSE(SameBits(layer.router_weight(), single.router_weight())) << what;
    EXPECT_EQ(thrown([&] { switchmoe::load_weights(path, layer, names, "block."); }), "") << what;
    expect_same_weights(layer, single, layer.first_expert(), layer.num_local_experts(), what);
    expect_same_forward(layer, single);

    // Through a reader the caller opened: the same.
    ExpertParallelSwitchLayer<> again(make_config(99), MPI_COMM_WORLD);
    const switchmoe::io::SafetensorsReader reader(path);
    EXPECT_EQ(thrown([&] { switchmoe::load_weights(reader, again, names, "block."); }), "");
    expect_same_weights(again, single, again.first_expert(), again.num_local_experts(), what);
  }
}

TEST_F(ExpertParallelWeights, ShardedSaveLoadsIntoOneProcess) {
  const int rank = world_rank(), ranks = world_size();
  Folder folder;
  for (const WeightNames names : kNames) {
    const std::string what = switchmoe::to_string(names);
    ExpertParallelSwitchLayer<> layer(make_config(99), MPI_COMM_WORLD);
    const int first = layer.first_expert(), local = layer.num_local_experts();
    // Weights that are not the initialization's, different on each expert.
    for (int e = first; e < first + local; ++e) {
      layer.w_in(e) = switchmoe_test::random_matrix(8, 16, 100 + e);
    }
    std::string index;
    EXPECT_EQ(thrown([&] { index = switchmoe::save_weights_sharded(folder.path(), layer, names); }),
              "")
        << what;
    EXPECT_EQ(index, folder.path() + "/model.safetensors.index.json");

    // The index, read as plain JSON: one shard per rank, the router in rank 0's, each expert in
    // its owner's.
    std::ifstream in(index);
    const nlohmann::json json = nlohmann::json::parse(in, nullptr, false);
    EXPECT_TRUE(json.is_object()) << what;  // no ASSERT: every rank must reach the collectives
    const nlohmann::json map =
        json.is_object() ? json.value("weight_map", nlohmann::json::object()) : nlohmann::json();
    char shard[64];
    std::snprintf(shard, sizeof shard, "model-00001-of-%05d.safetensors", ranks);
    const bool hf = names == WeightNames::kHuggingFaceSwitch;
    EXPECT_EQ(map.value(hf ? "router.classifier.weight" : "router.weight", ""), shard) << what;
    EXPECT_EQ(map.value(hf ? "router.classifier.bias" : "router.bias", ""), shard) << what;
    for (int e = 0; e < kExperts; ++e) {
      std::snprintf(shard, sizeof shard, "model-%05d-of-%05d.safetensors",
                    e / (kExperts / ranks) + 1, ranks);
      const std::string name = hf ? "experts.expert_" + std::to_string(e) + ".wi.weight"
                                  : "experts." + std::to_string(e) + ".w_in";
      EXPECT_EQ(map.value(name, ""), shard) << what << ", " << name;
    }
    // The buffers (SEMANTICS 19's balancing bias) are replicated too: rank 0's shard, under
    // switchmoe's names only.
    const std::size_t buffers = hf ? 0 : layer.buffers().size();
    if (!hf) {
      std::snprintf(shard, sizeof shard, "model-00001-of-%05d.safetensors", ranks);
      for (const switchmoe::ParameterRef& p : layer.buffers()) {
        EXPECT_EQ(map.value(p.name, ""), shard) << p.name;
      }
    }
    EXPECT_EQ(map.size(), 2u + 2u * kExperts + buffers) << what;

    // Into one process (every rank does it: all shards, total_size checked).
    SwitchLayer<> single(make_config(7));
    EXPECT_EQ(thrown([&] {
                const switchmoe::io::ShardedSafetensorsReader reader(
                    index, switchmoe::io::ShardOpening::kAll);
                switchmoe::load_weights(reader, single, names);
              }),
              "")
        << what;
    expect_same_weights(single, layer, first, local, what);
    expect_same_forward(layer, single);

    // And back into P ranks.
    ExpertParallelSwitchLayer<> back(make_config(5), MPI_COMM_WORLD);
    EXPECT_EQ(thrown([&] { switchmoe::load_weights(index, back, names); }), "") << what;
    expect_same_weights(back, layer, first, local, what);
    (void)rank;
  }
}

/// Copies every tensor of the file at `from` but `skip` into a new file at `to`.
void copy_without(const std::string& from, const std::string& to, const std::string& skip) {
  const switchmoe::io::SafetensorsReader reader(from);
  switchmoe::io::SafetensorsWriter writer;
  for (const std::string& name : reader.names()) {
    if (name != skip) writer.add(name, reader.tensor(name));
  }
  writer.write(to);
}

/// Loads `path` into a P-rank layer that must fail on the last rank only: every rank throws the
/// same message naming `tensor`, and no rank's layer changes.
void expect_agreed_failure(const std::string& path, const std::string& tensor) {
  const int ranks = world_size();
  ExpertParallelSwitchLayer<> layer(make_config(99), MPI_COMM_WORLD);
  SwitchLayer<> before(make_config(99));  // the same initial weights as the P-rank layer
  const std::string message = thrown([&] { switchmoe::load_weights(path, layer); });
  EXPECT_NE(message, "");
  EXPECT_EQ(message, rank0(message)) << "ranks disagree on the error";
  EXPECT_NE(message.find(tensor), std::string::npos) << message;
  if (ranks > 1) {
    EXPECT_NE(message.find("(on rank " + std::to_string(ranks - 1) + " of " +
                           std::to_string(ranks) + ")"),
              std::string::npos)
        << message;
  }
  expect_same_weights(layer, before, layer.first_expert(), layer.num_local_experts(), "unchanged");
}

TEST_F(ExpertParallelWeights, TensorMissingOnOneRankFailsOnEveryRank) {
  Folder folder;
  const std::string missing = "experts." + std::to_string(kExperts - 1) + ".w_out";
  // One file without the last expert's w_out (only the last rank needs it).
  const std::string full = folder.path() + "/full.safetensors";
  const std::string partial = folder.path() + "/partial.safetensors";
  if (world_rank() == 0) {
    SwitchLayer<> single(make_config(7));
    switchmoe::io::SafetensorsWriter writer;
    switchmoe::save_weights(writer, single);
    writer.write(full);
    copy_without(full, partial, missing);
  }
  MPI_Barrier(MPI_COMM_WORLD);
  expect_agreed_failure(partial, missing);

  // A sharded checkpoint whose last shard lost that tensor (the index still maps it there).
  ExpertParallelSwitchLayer<> layer(make_config(7), MPI_COMM_WORLD);
  const std::string index = switchmoe::save_weights_sharded(folder.path(), layer);
  if (world_rank() == 0) {
    char shard[64];
    std::snprintf(shard, sizeof shard, "/model-%05d-of-%05d.safetensors", world_size(),
                  world_size());
    const std::string last = folder.path() + shard;
    copy_without(last, last + ".cut", missing);
    std::filesystem::rename(last + ".cut", last);
  }
  MPI_Barrier(MPI_COMM_WORLD);
  expect_agreed_failure(index, missing);

  // A file no rank can open.
  ExpertParallelSwitchLayer<> other(make_config(7), MPI_COMM_WORLD);
  const std::string message =
      thrown([&] { switchmoe::load_weights(folder.path() + "/absent.safetensors", other); });
  EXPECT_NE(message.find("absent.safetensors"), std::string::npos) << message;
  EXPECT_EQ(message, rank0(message));
}

}  // namespace
