#pragma once
// Checkpoints of the expert-parallel layer (SEMANTICS 21, 22): each rank writes and reads the
// experts it owns, under their global names ("experts.<e>.w_in", "experts.expert_<e>.wi.weight",
// ... with e the global index), and the replicated router (and buffers, shared expert). Needs
// both switchmoe::io and switchmoe::distributed (link both); the io core stays free of MPI.
//
//   // Collective: one shard per rank, model-0000<r+1>-of-0000P.safetensors, then rank 0 writes
//   // model.safetensors.index.json mapping every tensor to its shard.
//   save_weights_sharded("ckpt", layer);
//   // Collective: from that index, or from one file written by a single-process SwitchLayer
//   // (each rank takes its experts from it).
//   load_weights("ckpt/model.safetensors.index.json", layer);
//   load_weights("single.safetensors", layer);
//
// The replicated tensors are written once, by rank 0 (they are the same on every rank), so each
// tensor is in exactly one shard as Hugging Face's index requires. A file written this way loads
// into a single-process layer (or into another number of ranks) through
// io::ShardedSafetensorsReader.
//
// Errors agree across ranks: loading stages every tensor on every rank, then the ranks agree
// (SEMANTICS 21's rule that no rank enters a collective another has left); if any rank failed
// (a missing tensor in its shard, a bad shape, an unreadable file), every rank throws the same
// std::invalid_argument with the first failing rank's message (it names the file and the
// tensor) and no rank's layer changes. Saving agrees the same way before the index is written,
// so a failed save never leaves an index naming shards that are not all there.

#include <mpi.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "switchmoe/distributed.hpp"
#include "switchmoe/io/safetensors.hpp"
#include "switchmoe/io/sharded.hpp"

namespace switchmoe {
namespace detail {

/// The tensors of `layer` this rank writes: its own experts, and on rank 0 the replicated ones
/// (router, buffers, shared expert). checkpoint_tensors of the wrapped layer already lists the
/// owned experts only, by global index.
template <class Policy, class Activation>
std::vector<CheckpointTensor> rank_share(ExpertParallelSwitchLayer<Policy, Activation>& layer,
                                         WeightNames names, const std::string& prefix) {
  std::vector<CheckpointTensor> all = checkpoint_tensors(layer.layer(), names, prefix);
  if (layer.rank() == 0) return all;
  std::vector<const Matrix<float>*> experts;  // the owned experts' tensors
  for (const ParameterRef& p : layer.parameters()) {
    if (p.owner == ParameterOwner::kExpert) experts.push_back(p.value);
  }
  // Every naming reaches an expert's matrices through the same masters parameters() views.
  std::vector<CheckpointTensor> out;
  for (const CheckpointTensor& t : all) {
    if (std::find(experts.begin(), experts.end(), t.value) != experts.end()) out.push_back(t);
  }
  return out;
}

/// Rank 0's string on every rank of `comm`.
inline std::string broadcast_string(std::string text, MPI_Comm comm) {
  int length = static_cast<int>(text.size());
  MPI_Bcast(&length, 1, MPI_INT, 0, comm);
  text.resize(static_cast<std::size_t>(length));
  MPI_Bcast(text.data(), length, MPI_CHAR, 0, comm);
  return text;
}

/// Every rank's `text`, on rank 0 (empty elsewhere), in rank order.
inline std::vector<std::string> gather_strings(const std::string& text, MPI_Comm comm) {
  const int rank = mpi_rank(comm), size = mpi_size(comm);
  int length = static_cast<int>(text.size());
  std::vector<int> lengths(static_cast<std::size_t>(size)), displs(lengths.size());
  MPI_Gather(&length, 1, MPI_INT, lengths.data(), 1, MPI_INT, 0, comm);
  int total = 0;
  for (int r = 0; r < size; ++r) {
    displs[r] = total;
    total += lengths[r];
  }
  std::string all(static_cast<std::size_t>(rank == 0 ? total : 0), '\0');
  MPI_Gatherv(text.data(), length, MPI_CHAR, all.data(), lengths.data(), displs.data(), MPI_CHAR, 0,
              comm);
  std::vector<std::string> out;
  if (rank == 0) {
    for (int r = 0; r < size; ++r) out.push_back(all.substr(displs[r], lengths[r]));
  }
  return out;
}

/// Collective load from a reader each rank has (or failed to open: `opened` holds the error).
template <class Reader, class Policy, class Activation>
void load_expert_parallel(const Reader* reader, std::exception_ptr opened,
                          ExpertParallelSwitchLayer<Policy, Activation>& layer, WeightNames names,
                          const std::string& prefix) {
  using Layer = typename ExpertParallelSwitchLayer<Policy, Activation>::Layer;
  std::exception_ptr error = opened;
  std::vector<StagedWeights<Layer>> staged;  // empty or one
  if (!error) {
    try {
      staged.push_back(stage_weights(*reader, layer.layer(), names, prefix,
                                     checkpoint_tensors(layer.layer(), names, prefix)));
    } catch (...) {
      error = std::current_exception();
    }
  }
  agree_on_error(layer.exchange().comm(), error);  // every rank throws, or none
  staged.front().commit();
}

}  // namespace detail

/// This rank's share of `layer` into `writer` (not collective): its experts under global names,
/// and on rank 0 the replicated tensors too. A writer per rank, written to one file per rank,
/// makes a sharded checkpoint; save_weights_sharded does that and writes the index.
template <class Policy, class Activation>
void save_weights(io::SafetensorsWriter& writer,
                  ExpertParallelSwitchLayer<Policy, Activation>& layer,
                  WeightNames names = WeightNames::kSwitchmoe, const std::string& prefix = "",
                  const std::string& dtype = "F32") {
  detail::save_tensors(writer, layer.layer(), names, dtype,
                       detail::rank_share(layer, names, prefix));
}

/// Collective: writes `folder`/`base`-0000<r+1>-of-0000P.safetensors on each rank r (its share,
/// see save_weights above), then, once every rank has written its shard, rank 0 writes
/// `folder`/`base`.safetensors.index.json mapping each tensor to its shard (Hugging Face's
/// format, metadata.total_size included). `folder` must exist and be the same folder for every
/// rank. Returns the index's path on every rank. Errors agree across ranks (every rank throws the
/// first failing rank's message); then no index is written.
template <class Policy, class Activation>
std::string save_weights_sharded(const std::string& folder,
                                 ExpertParallelSwitchLayer<Policy, Activation>& layer,
                                 WeightNames names = WeightNames::kSwitchmoe,
                                 const std::string& prefix = "", const std::string& dtype = "F32",
                                 const std::string& base = "model") {
  const MPI_Comm comm = layer.exchange().comm();
  const int rank = layer.rank(), ranks = layer.num_ranks();
  std::exception_ptr error;
  std::string file;
  io::SafetensorsWriter writer;
  try {
    const std::string why = io::detail::unsafe_file_name(base);
    if (!why.empty()) detail::fail("base '", base, "' ", why);
    char name[64];
    std::snprintf(name, sizeof name, "-%05d-of-%05d.safetensors", rank + 1, ranks);
    file = base + name;
    save_weights(writer, layer, names, prefix, dtype);
    writer.write(folder + "/" + file);
  } catch (...) {
    error = std::current_exception();
  }
  detail::agree_on_error(comm, error);

  // Rank 0 gathers each shard's tensor names and byte count, and writes the index last.
  nlohmann::json mine = {{"file", file}, {"names", writer.names()}, {"bytes", writer.data_size()}};
  const std::vector<std::string> shards = detail::gather_strings(mine.dump(), comm);
  const std::string path = folder + "/" + base + ".safetensors.index.json";
  if (rank == 0) {
    try {
      nlohmann::ordered_json weight_map = nlohmann::ordered_json::object();
      std::uint64_t total = 0;
      for (const std::string& text : shards) {
        const nlohmann::json shard = nlohmann::json::parse(text);
        for (const auto& tensor : shard["names"])
          weight_map[tensor.get<std::string>()] = shard["file"];
        total += shard["bytes"].get<std::uint64_t>();
      }
      const nlohmann::ordered_json index = {{"metadata", {{"total_size", total}}},
                                            {"weight_map", weight_map}};
      const std::string text = index.dump(2) + "\n";
      io::detail::write_atomically(path, reinterpret_cast<const unsigned char*>(text.data()),
                                   text.size());
    } catch (...) {
      error = std::current_exception();
    }
  }
  detail::agree_on_error(comm, error);
  return path;
}

/// Collective: loads each rank's share of `layer` (the router and its experts, by global index)
/// from `reader`, one file (e.g. written by a single-process SwitchLayer) or a sharded checkpoint
/// (e.g. written by save_weights_sharded with any number of ranks). Every rank stages and checks
/// its tensors first; if any rank fails, every rank throws the same std::invalid_argument (the
/// first failing rank's message, naming the file and the tensor) and no layer changes.
template <class Policy, class Activation>
void load_weights(const io::SafetensorsReader& reader,
                  ExpertParallelSwitchLayer<Policy, Activation>& layer,
                  WeightNames names = WeightNames::kSwitchmoe, const std::string& prefix = "") {
  detail::load_expert_parallel(&reader, nullptr, layer, names, prefix);
}
template <class Policy, class Activation>
void load_weights(const io::ShardedSafetensorsReader& reader,
                  ExpertParallelSwitchLayer<Policy, Activation>& layer,
                  WeightNames names = WeightNames::kSwitchmoe, const std::string& prefix = "") {
  detail::load_expert_parallel(&reader, nullptr, layer, names, prefix);
}

/// Collective: as above from `path`, a Hugging Face index (a name ending in ".index.json", its
/// shards opened only as this rank's tensors need them) or one safetensors file. A file that one
/// rank cannot open makes every rank throw too.
template <class Policy, class Activation>
void load_weights(const std::string& path, ExpertParallelSwitchLayer<Policy, Activation>& layer,
                  WeightNames names = WeightNames::kSwitchmoe, const std::string& prefix = "") {
  const std::string suffix = ".index.json";
  const bool sharded = path.size() >= suffix.size() &&
                       path.compare(path.size() - suffix.size(), suffix.size(), suffix) == 0;
  std::exception_ptr error;
  if (sharded) {
    std::unique_ptr<io::ShardedSafetensorsReader> reader;
    try {
      reader = std::make_unique<io::ShardedSafetensorsReader>(path);
    } catch (...) {
      error = std::current_exception();
    }
    detail::load_expert_parallel(reader.get(), error, layer, names, prefix);
  } else {
    std::unique_ptr<io::SafetensorsReader> reader;
    try {
      reader = std::make_unique<io::SafetensorsReader>(path);
    } catch (...) {
      error = std::current_exception();
    }
    detail::load_expert_parallel(reader.get(), error, layer, names, prefix);
  }
}

}  // namespace switchmoe
