#pragma once
// Checkpoint I/O of switchmoe in the safetensors format: files, and layers saved to and loaded
// from them. The optional target switchmoe::io, which brings nlohmann-json along; the core
// target switchmoe::switchmoe does not need it.
//
//   io::SafetensorsWriter writer;
//   writer.add("router.weight", layer.router_weight());  // [d_model, experts]
//   writer.write("layer.safetensors");                   // atomic
//   io::SafetensorsReader reader("layer.safetensors");   // validates the whole file
//   Matrix<float> w = reader.tensor("router.weight");
//   save_weights(writer, layer, WeightNames::kHuggingFaceSwitch, "encoder.block.1.layer.1.mlp.");
//   load_weights(reader, layer, WeightNames::kHuggingFaceSwitch, "encoder.block.1.layer.1.mlp.");
//   io::write_sharded(writer, "ckpt", 3);  // Hugging Face shards + model.safetensors.index.json
//   io::ShardedSafetensorsReader shards("ckpt/model.safetensors.index.json");
//   load_weights(shards, layer, WeightNames::kHuggingFaceSwitch, "encoder.block.1.layer.1.mlp.");

#include "switchmoe/io/format.hpp"
#include "switchmoe/io/safetensors_reader.hpp"
#include "switchmoe/io/safetensors_writer.hpp"
#include "switchmoe/io/sharded.hpp"
#include "switchmoe/io/weights.hpp"
