#pragma once
// Checkpoints of switch_lm: one folder holding both runs, so that `--resume DIR` continues them
// exactly (same weights, bit for bit, as a run that never stopped) and `--load DIR --generate`
// samples from them.
//
//   DIR/dense.safetensors, DIR/switch.safetensors   the models' float32 weights: the library
//       layers through switchmoe::save_weights under switchmoe's names with the prefix
//       "blocks.<i>.ffn." ("blocks.1.ffn.router.weight", "blocks.1.ffn.experts.3.w_in", ...,
//       "blocks.0.ffn.w_in"), the demo's own tensors under their parameter names
//       ("token_embedding", "position_embedding", "blocks.<i>.qkv.weight", "blocks.<i>.out.bias",
//       "blocks.<i>.ln_attention.gamma", "final_ln.beta", "head.weight", ...)
//   DIR/dense.adamw.safetensors, ...   AdamW's moments "<tensor>.exp_avg", "<tensor>.exp_avg_sq"
//       and its step count (metadata "switch_lm.adamw_steps")
//   DIR/state.json   the step reached, the options that shape training, the training text's
//       checksum, and per run the batch sampler's generator, the library layers' random-stream
//       positions, timing and the curve so far
//
// Each file is written atomically (safetensors by the library's writer, state.json through a
// temporary file and a rename) and state.json last; every file carries the step, and loading
// refuses a folder whose files disagree (a save interrupted between two files).

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>
#include <string>
#include <switchmoe/io/safetensors.hpp>
#include <utility>
#include <vector>

#include "optimizer.hpp"
#include "tensor.hpp"

namespace switch_lm {

inline constexpr const char* kStepKey = "switch_lm.step";
inline constexpr const char* kAdamWStepsKey = "switch_lm.adamw_steps";

inline std::string model_file(const std::string& dir, const std::string& run) {
  return dir + "/" + run + ".safetensors";
}
inline std::string adamw_file(const std::string& dir, const std::string& run) {
  return dir + "/" + run + ".adamw.safetensors";
}
inline std::string state_file(const std::string& dir) { return dir + "/state.json"; }

// The integer of a metadata entry, or a FormatError naming the file and the key.
inline long long metadata_integer(const switchmoe::io::SafetensorsReader& reader,
                                  const std::string& key) {
  const auto it = reader.metadata().find(key);
  if (it == reader.metadata().end())
    throw switchmoe::io::FormatError(reader.path(), "no metadata \"" + key +
                                                        "\": not a switch_lm "
                                                        "checkpoint file");
  char* end = nullptr;
  const long long value = std::strtoll(it->second.c_str(), &end, 10);
  if (it->second.empty() || *end != '\0' || value < 0)
    throw switchmoe::io::FormatError(reader.path(), "metadata \"" + key + "\" is '" + it->second +
                                                        "', expected a non-negative integer");
  return value;
}

inline void check_step(const switchmoe::io::SafetensorsReader& reader, int step) {
  const long long saved = metadata_integer(reader, kStepKey);
  if (saved != step)
    throw switchmoe::io::FormatError(
        reader.path(), "holds step " + std::to_string(saved) + ", but state.json " + "step " +
                           std::to_string(step) + ": the folder mixes two saves");
}

// Reads `name` [rows, cols] of the file, checking that it is there with that shape.
inline MatrixX<float> read_tensor(const switchmoe::io::SafetensorsReader& reader,
                                  const std::string& name, Eigen::Index rows, Eigen::Index cols) {
  if (!reader.contains(name))
    throw switchmoe::io::FormatError(reader.path(), "missing: the model needs it", name);
  const std::vector<std::int64_t>& shape = reader.shape(name);
  if (shape.size() != 2 || shape[0] != rows || shape[1] != cols) {
    std::string got;
    for (const auto extent : shape) got += (got.empty() ? "" : ", ") + std::to_string(extent);
    throw std::invalid_argument("switchmoe: " + reader.path() + ": tensor '" + name +
                                "' has shape [" + got + "], expected [" + std::to_string(rows) +
                                ", " + std::to_string(cols) +
                                "] for this model (were the model options the same?)");
  }
  return reader.tensor(name);
}

// Writes `model`'s weights to `path` (see the top of the file for the names).
template <class Model>
void save_model(Model& model, const std::string& path, int step) {
  switchmoe::io::SafetensorsWriter writer;
  for (const auto& p : model.own_parameters()) writer.add(p.name, *p.value);
  for (std::size_t i = 0; i < model.blocks().size(); ++i)
    model.blocks()[i].feed_forward().save(writer, Model::feed_forward_prefix(i));
  writer.set_metadata(kStepKey, std::to_string(step));
  writer.write(path);
}

// Loads `model`'s weights from `path`; on any error the model is as before.
template <class Model>
void load_model(Model& model, const std::string& path, int step) {
  const switchmoe::io::SafetensorsReader reader(path);
  check_step(reader, step);
  const ParamList<float> own = model.own_parameters();
  std::vector<MatrixX<float>> staged;  // every own tensor read and checked before any changes
  staged.reserve(own.size());
  for (const auto& p : own)
    staged.push_back(read_tensor(reader, p.name, p.value->rows(), p.value->cols()));
  // The library layers load one by one, each with the strong guarantee; a later one failing
  // rolls the earlier ones back from this copy.
  const ParamList<float> all = model.parameters();
  std::vector<MatrixX<float>> before;
  before.reserve(all.size());
  for (const auto& p : all) before.push_back(*p.value);
  try {
    for (std::size_t i = 0; i < model.blocks().size(); ++i)
      model.blocks()[i].feed_forward().load(reader, Model::feed_forward_prefix(i));
  } catch (...) {
    for (std::size_t i = 0; i < all.size(); ++i) *all[i].value = before[i];
    throw;
  }
  for (std::size_t i = 0; i < own.size(); ++i) *own[i].value = std::move(staged[i]);
}

inline void save_adamw(const AdamW<float>& adamw, const ParamList<float>& params,
                       const std::string& path, int step) {
  switchmoe::io::SafetensorsWriter writer;
  const auto& m = adamw.first_moments();
  const auto& v = adamw.second_moments();
  if (!m.empty() && m.size() != params.size())
    throw std::logic_error("save_adamw: AdamW has " + std::to_string(m.size()) + " moments for " +
                           std::to_string(params.size()) + " tensors");
  for (std::size_t i = 0; i < m.size(); ++i) {
    writer.add(params[i].name + ".exp_avg", m[i]);
    writer.add(params[i].name + ".exp_avg_sq", v[i]);
  }
  writer.set_metadata(kStepKey, std::to_string(step));
  writer.set_metadata(kAdamWStepsKey, std::to_string(adamw.steps()));
  writer.write(path);
}

// AdamW's saved state, read and checked against `params` but not applied yet.
struct AdamWState {
  int steps = 0;
  std::vector<MatrixX<float>> m, v;
};

inline AdamWState read_adamw(const ParamList<float>& params, const std::string& path, int step) {
  const switchmoe::io::SafetensorsReader reader(path);
  check_step(reader, step);
  AdamWState state;
  const long long steps = metadata_integer(reader, kAdamWStepsKey);
  if (steps > 1000000000)
    throw switchmoe::io::FormatError(
        path, "AdamW step count " + std::to_string(steps) + " is out of range");
  state.steps = static_cast<int>(steps);
  if (state.steps == 0) return state;
  for (const auto& p : params) {
    state.m.push_back(read_tensor(reader, p.name + ".exp_avg", p.value->rows(), p.value->cols()));
    state.v.push_back(
        read_tensor(reader, p.name + ".exp_avg_sq", p.value->rows(), p.value->cols()));
  }
  return state;
}

// state.json, written through a temporary file in the same folder and a rename.
inline void write_state(const std::string& dir, const nlohmann::json& state) {
  const std::string path = state_file(dir);
  const std::string temporary = path + ".tmp." + std::to_string(::getpid());
  {
    std::ofstream out(temporary, std::ios::trunc);
    out << state.dump(1) << "\n";
    out.flush();
    if (!out) {
      std::remove(temporary.c_str());
      throw std::runtime_error("cannot write checkpoint state '" + temporary + "'");
    }
  }
  if (std::rename(temporary.c_str(), path.c_str()) != 0) {
    std::remove(temporary.c_str());
    throw std::runtime_error("cannot rename '" + temporary + "' to '" + path + "'");
  }
}

inline nlohmann::json read_state(const std::string& dir) {
  const std::string path = state_file(dir);
  std::ifstream in(path);
  if (!in)
    throw std::runtime_error("checkpoint '" + dir + "': cannot open " + path +
                             " (is it a folder written by switch_lm --save?)");
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  nlohmann::json state = nlohmann::json::parse(text, nullptr, false);
  if (state.is_discarded() || !state.is_object() || !state.contains("step") ||
      !state["step"].is_number_unsigned() || !state.contains("config") ||
      !state["config"].is_object() || !state.contains("runs") || !state["runs"].is_object())
    throw std::runtime_error(path +
                             ": not a switch_lm checkpoint state (expected a JSON object with "
                             "\"step\", \"config\" and \"runs\")");
  return state;
}

// Runs `body`, turning a malformed entry of state.json (nlohmann's type and range errors) into
// an error naming the file.
template <class Body>
auto with_state_errors(const std::string& dir, Body&& body) -> decltype(body()) {
  try {
    return body();
  } catch (const nlohmann::json::exception& e) {
    throw std::runtime_error(state_file(dir) + ": malformed entry: " + e.what());
  }
}

// FNV-1a of the training and validation text: a resumed run must see the same bytes.
template <class Data>
std::string text_checksum(const Data& data) {
  std::uint64_t h = 1469598103934665603ULL;
  for (const auto* part : {&data.train, &data.valid}) {
    for (const std::uint8_t byte : *part) h = (h ^ byte) * 1099511628211ULL;
    h = (h ^ 0xFF) * 1099511628211ULL;  // separates train from valid
  }
  char out[17];
  std::snprintf(out, sizeof out, "%016llx", static_cast<unsigned long long>(h));
  return out;
}

}  // namespace switch_lm
