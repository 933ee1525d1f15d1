#pragma once
// Checkpoint I/O of switchmoe in the safetensors format (the optional target switchmoe::io, which
// brings nlohmann-json along; the core switchmoe::switchmoe target does not need it).
//
//   io::SafetensorsWriter writer;
//   writer.add("router.weight", layer.router_weight());  // [d_model, experts]
//   writer.write("layer.safetensors");                   // atomic
//   io::SafetensorsReader reader("layer.safetensors");   // validates the whole file
//   Matrix<float> w = reader.tensor("router.weight");

#include "switchmoe/io/format.hpp"
#include "switchmoe/io/safetensors_reader.hpp"
#include "switchmoe/io/safetensors_writer.hpp"
