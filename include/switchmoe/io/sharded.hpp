#pragma once
// Checkpoints split in shards the way Hugging Face writes them: shard files
// model-00001-of-00003.safetensors, ... in one folder, and the index
// model.safetensors.index.json = {"metadata": {"total_size": N}, "weight_map": {tensor: shard}}
// naming the shard of every tensor (N is the tensors' bytes of data, all shards together).
//
//   io::SafetensorsWriter writer;
//   save_weights(writer, layer, WeightNames::kHuggingFaceSwitch, prefix);
//   io::write_sharded(writer, "ckpt", 3);  // 3 shards, then ckpt/model.safetensors.index.json
//   io::ShardedSafetensorsReader reader("ckpt/model.safetensors.index.json");
//   load_weights(reader, layer, WeightNames::kHuggingFaceSwitch, prefix);
//
// The index is never trusted: a shard's name must be a plain file name in the index's folder
// (no "/", no ".."), no tensor may be named twice, and each shard, when opened (and validated
// whole by SafetensorsReader), must hold every tensor the index maps to it and none that the
// index maps to another shard. Errors are FormatErrors naming the index file and the tensor.

#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "switchmoe/io/format.hpp"
#include "switchmoe/io/safetensors_reader.hpp"
#include "switchmoe/io/safetensors_writer.hpp"
#include "switchmoe/io/weights.hpp"

namespace switchmoe::io {

/// When a ShardedSafetensorsReader opens its shards: each when a tensor of it is first asked
/// for (kLazy), or all at construction, which then checks the whole checkpoint (kAll).
enum class ShardOpening { kLazy, kAll };

namespace detail {

/// Why `name` cannot be a shard's file name next to the index, or empty when it can be.
inline std::string unsafe_file_name(const std::string& name) {
  if (name.empty()) return "is empty";
  if (name == "." || name == "..") return "is '" + name + "', not a file";
  if (name.find('/') != std::string::npos || name.find('\\') != std::string::npos) {
    return "has a path separator: shards must be files in the index's folder (no '/', no '..')";
  }
  if (name.find('\0') != std::string::npos) return "contains a NUL byte";
  if (!is_utf8(name)) return "is not valid UTF-8";
  return "";
}

}  // namespace detail

/// A parsed and validated model.safetensors.index.json. Throws IoError when the file cannot be
/// read, FormatError (naming the file and, where one is concerned, the tensor) when it is not a
/// valid index.
class SafetensorsIndex {
 public:
  explicit SafetensorsIndex(const std::string& path)
      : path_(path), folder_(detail::parent_folder(path)) {
    std::vector<unsigned char> bytes;
    {
      std::unique_ptr<std::FILE, int (*)(std::FILE*)> file(std::fopen(path.c_str(), "rb"),
                                                           &std::fclose);
      if (!file) throw IoError(path, "cannot open the index");
      unsigned char buffer[65536];
      std::size_t got;
      while ((got = std::fread(buffer, 1, sizeof buffer, file.get())) > 0) {
        bytes.insert(bytes.end(), buffer, buffer + got);
        if (bytes.size() > kMaxIndexSize) {
          fail("", "index is larger than " + std::to_string(kMaxIndexSize) + " bytes");
        }
      }
      if (std::ferror(file.get())) throw IoError(path, "read failed");
    }
    parse(bytes);
  }

  /// Hugging Face indexes are a few MB at most; anything far larger is refused unparsed.
  static constexpr std::size_t kMaxIndexSize = 256u << 20;

  const std::string& path() const { return path_; }
  const std::string& folder() const { return folder_; }  // where the shards are

  /// Tensor names, sorted.
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const auto& entry : weight_map_) out.push_back(entry.first);
    return out;
  }
  bool contains(const std::string& name) const { return weight_map_.count(name) != 0; }

  /// The shard file of `name`; a FormatError when the index has no such tensor.
  const std::string& shard(const std::string& name) const {
    const auto it = weight_map_.find(name);
    if (it == weight_map_.end()) fail(name, "is not in the index's weight_map");
    return it->second;
  }
  /// The shard files, sorted, each once.
  std::vector<std::string> shards() const {
    const std::set<std::string> distinct = shard_set();
    return {distinct.begin(), distinct.end()};
  }
  /// The tensors the index maps to `shard_file`, sorted.
  std::vector<std::string> tensors_of(const std::string& shard_file) const {
    std::vector<std::string> out;
    for (const auto& [name, shard] : weight_map_) {
      if (shard == shard_file) out.push_back(name);
    }
    return out;
  }
  std::string shard_path(const std::string& shard_file) const { return folder_ + "/" + shard_file; }
  /// metadata.total_size, when the index gives it.
  std::optional<std::uint64_t> total_size() const { return total_size_; }

 private:
  [[noreturn]] void fail(const std::string& tensor, const std::string& what) const {
    throw FormatError(path_, what, tensor);
  }

  std::set<std::string> shard_set() const {
    std::set<std::string> out;
    for (const auto& entry : weight_map_) out.insert(entry.second);
    return out;
  }

  void parse(const std::vector<unsigned char>& bytes) {
    const std::size_t bad = detail::invalid_utf8(bytes.data(), bytes.size());
    if (bad != bytes.size()) throw FormatError(path_, "index is not valid UTF-8", "", bad);
    // nlohmann keeps the last of duplicate keys; the callback sees each key first, so a tensor
    // named twice in weight_map (or any repeated key) is refused.
    std::vector<std::set<std::string>> keys;
    std::vector<std::string> parents;  // key of each open object ("" for the root)
    std::string last_key;
    const auto callback = [&](int depth, nlohmann::json::parse_event_t event,
                              nlohmann::json& parsed) {
      using Event = nlohmann::json::parse_event_t;
      if (depth > 8) fail("", "index nests JSON deeper than 8 levels");
      if (event == Event::object_start) {
        keys.emplace_back();
        parents.push_back(depth == 0 ? "" : last_key);
      } else if (event == Event::object_end) {
        keys.pop_back();
        parents.pop_back();
      } else if (event == Event::key) {
        last_key = parsed.get<std::string>();
        if (!keys.back().insert(last_key).second) {
          if (depth == 2 && parents.back() == "weight_map") {
            fail(last_key, "appears twice in weight_map");
          }
          fail("", "index has the key '" + last_key + "' twice in one object");
        }
      }
      return true;
    };
    nlohmann::json root;
    try {
      root = nlohmann::json::parse(bytes.begin(), bytes.end(), callback);
    } catch (const nlohmann::json::exception& error) {
      fail("", std::string("index is not valid JSON: ") + error.what());
    }
    if (!root.is_object()) {
      fail("", std::string("index is a JSON ") + root.type_name() + ", expected an object");
    }
    if (root.contains("metadata")) {
      const nlohmann::json& metadata = root["metadata"];
      if (!metadata.is_object()) {
        fail("",
             std::string("metadata is a JSON ") + metadata.type_name() + ", expected an object");
      }
      if (metadata.contains("total_size")) {
        // Written by torch as an integer (some writers give a float of an integer value).
        const nlohmann::json& size = metadata["total_size"];
        if (size.is_number_unsigned()) {
          total_size_ = size.get<std::uint64_t>();
        } else if (size.is_number_float() && size.get<double>() >= 0 &&
                   size.get<double>() < 1.8e19 &&
                   size.get<double>() == static_cast<double>(size.get<std::uint64_t>())) {
          total_size_ = size.get<std::uint64_t>();
        } else {
          fail("", "metadata.total_size is " + size.dump() + ", expected a byte count");
        }
      }
    }
    if (!root.contains("weight_map")) fail("", "index has no \"weight_map\"");
    const nlohmann::json& map = root["weight_map"];
    if (!map.is_object()) {
      fail("", std::string("weight_map is a JSON ") + map.type_name() + ", expected an object");
    }
    for (const auto& item : map.items()) {
      if (item.key().empty() || item.key() == "__metadata__") {
        fail(item.key(), "is not a tensor name");
      }
      if (!item.value().is_string()) {
        fail(item.key(), std::string("weight_map value is a JSON ") + item.value().type_name() +
                             ", expected the shard's file name");
      }
      const std::string shard = item.value().get<std::string>();
      const std::string why = detail::unsafe_file_name(shard);
      if (!why.empty()) fail(item.key(), "shard file name '" + shard + "' " + why);
      weight_map_.emplace(item.key(), shard);
    }
  }

  std::string path_;
  std::string folder_;
  std::map<std::string, std::string> weight_map_;  // tensor -> shard file name
  std::optional<std::uint64_t> total_size_;
};

/// Reads tensors of a sharded checkpoint through its index, with SafetensorsReader's interface
/// (names, contains, shape, dtype, tensor), so load_weights takes it as it takes one file. A
/// shard is read and validated whole when opened, and kept. Not safe for concurrent use from
/// several threads (shards open on first use).
class ShardedSafetensorsReader {
 public:
  explicit ShardedSafetensorsReader(const std::string& index_path,
                                    ShardOpening opening = ShardOpening::kLazy)
      : index_(index_path) {
    if (opening != ShardOpening::kLazy && opening != ShardOpening::kAll) {
      switchmoe::detail::fail("opening is ShardOpening(", static_cast<int>(opening),
                              "), expected kLazy or kAll");
    }
    if (opening == ShardOpening::kAll) {
      for (const std::string& shard : index_.shards()) open(shard);
      check_total_size();
    }
  }

  const SafetensorsIndex& index() const { return index_; }
  /// The index's path: errors about the checkpoint name it.
  const std::string& path() const { return index_.path(); }

  std::vector<std::string> names() const { return index_.names(); }
  bool contains(const std::string& name) const { return index_.contains(name); }
  const std::vector<std::int64_t>& shape(const std::string& name) const {
    return shard_of(name).shape(name);
  }
  const std::string& dtype(const std::string& name) const { return shard_of(name).dtype(name); }
  Matrix<float> tensor(const std::string& name, Finite finite = Finite::kRequire) const {
    return shard_of(name).tensor(name, finite);
  }
  /// The reader of the shard holding `name` (opened now if it was not yet).
  const SafetensorsReader& shard_of(const std::string& name) const {
    return open(index_.shard(name));
  }
  /// Shards opened so far.
  std::size_t open_shards() const { return shards_.size(); }

 private:
  const SafetensorsReader& open(const std::string& shard) const {
    const auto found = shards_.find(shard);
    if (found != shards_.end()) return *found->second;
    const std::vector<std::string> expected = index_.tensors_of(shard);
    const std::string first = expected.empty() ? "" : expected.front();
    std::unique_ptr<SafetensorsReader> reader;
    try {
      reader = std::make_unique<SafetensorsReader>(index_.shard_path(shard));
    } catch (const std::runtime_error& error) {  // IoError or FormatError of the shard
      throw FormatError(index_.path(),
                        "shard '" + shard + "' named by the index cannot be read: " + error.what(),
                        first);
    }
    for (const std::string& name : expected) {
      if (!reader->contains(name)) {
        throw FormatError(index_.path(),
                          "the index maps it to shard '" + shard + "', which has no such tensor",
                          name);
      }
    }
    for (const std::string& name : reader->names()) {
      if (index_.contains(name) && index_.shard(name) != shard) {
        throw FormatError(index_.path(),
                          "is in shard '" + shard + "' and in shard '" + index_.shard(name) +
                              "' (where the index maps it): a duplicate",
                          name);
      }
    }
    return *shards_.emplace(shard, std::move(reader)).first->second;
  }

  // With every shard open: metadata.total_size, when given, is the tensors' bytes of data.
  void check_total_size() const {
    if (!index_.total_size()) return;
    std::uint64_t bytes = 0;
    for (const std::string& name : index_.names()) {
      const auto [begin, end] = shard_of(name).file_offsets(name);
      bytes += end - begin;
    }
    if (bytes != *index_.total_size()) {
      throw FormatError(index_.path(),
                        "metadata.total_size is " + std::to_string(*index_.total_size()) +
                            ", but the indexed tensors hold " + std::to_string(bytes) + " bytes");
    }
  }

  SafetensorsIndex index_;
  mutable std::map<std::string, std::unique_ptr<SafetensorsReader>> shards_;
};

/// Splits `writer`'s tensors over `shards` files (balanced by bytes, SafetensorsWriter::split)
/// named Hugging Face's way, `base`-00001-of-0000N.safetensors ..., in `folder`, then writes
/// `base`.safetensors.index.json there, last, so that the index names complete files. Each file
/// is written atomically. Returns the index's path.
inline std::string write_sharded(const SafetensorsWriter& writer, const std::string& folder,
                                 int shards, const std::string& base = "model") {
  const std::string why = detail::unsafe_file_name(base);
  if (!why.empty()) switchmoe::detail::fail("base '", base, "' ", why);
  if (shards > 99999) switchmoe::detail::fail("shards is ", shards, ", expected at most 99999");
  const std::vector<SafetensorsWriter> parts = writer.split(shards);
  nlohmann::ordered_json weight_map = nlohmann::ordered_json::object();
  for (std::size_t i = 0; i < parts.size(); ++i) {
    char name[64];
    std::snprintf(name, sizeof name, "-%05zu-of-%05zu.safetensors", i + 1, parts.size());
    const std::string file = base + name;
    parts[i].write(folder + "/" + file);
    for (const std::string& tensor : parts[i].names()) weight_map[tensor] = file;
  }
  const nlohmann::ordered_json index = {{"metadata", {{"total_size", writer.data_size()}}},
                                        {"weight_map", weight_map}};
  const std::string text = index.dump(2) + "\n";
  const std::string path = folder + "/" + base + ".safetensors.index.json";
  detail::write_atomically(path, reinterpret_cast<const unsigned char*>(text.data()), text.size());
  return path;
}

}  // namespace switchmoe::io

namespace switchmoe {

/// load_weights from a sharded checkpoint: as from one file (same checks, same strong
/// guarantee); the shards holding the layer's tensors are opened as needed.
template <class Layer>
void load_weights(const io::ShardedSafetensorsReader& reader, Layer& layer,
                  WeightNames names = WeightNames::kSwitchmoe, const std::string& prefix = "") {
  detail::load_weights_from(reader, layer, names, prefix);
}

}  // namespace switchmoe
