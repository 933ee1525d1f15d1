// libFuzzer target of SafetensorsReader (built with -DSWITCHMOE_FUZZ=ON and clang; run by
// tests/fuzz/run.sh). Any input must either be refused with FormatError or give a reader whose
// every answer is consistent; a file it accepts must survive a write and read back identically.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <switchmoe/io/safetensors.hpp>
#include <vector>

namespace {

void require(bool condition) {
  if (!condition) std::abort();  // libFuzzer reports the input
}

bool readable(const switchmoe::io::SafetensorsReader& reader, const std::string& name) {
  const std::string& dtype = reader.dtype(name);
  return reader.shape(name).size() <= 2 && (dtype == "F32" || dtype == "BF16" || dtype == "F16");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using switchmoe::io::Finite;
  using switchmoe::io::FormatError;
  using switchmoe::io::SafetensorsReader;
  std::vector<unsigned char> bytes(data, data + size);
  try {
    const SafetensorsReader reader = SafetensorsReader::from_memory(bytes, "fuzz");
    switchmoe::io::SafetensorsWriter writer;
    for (const std::string& name : reader.names()) {
      const auto [begin, end] = reader.file_offsets(name);
      require(begin <= end && end <= size);
      if (!readable(reader, name)) {
        bool refused = false;
        try {
          reader.tensor(name, Finite::kAllow);
        } catch (const FormatError&) {
          refused = true;
        }
        require(refused);
        continue;
      }
      const switchmoe::Matrix<float> value = reader.tensor(name, Finite::kAllow);
      try {
        reader.tensor(name);  // the finite check
      } catch (const FormatError& error) {
        require(error.offset() >= static_cast<std::int64_t>(begin) &&
                error.offset() < static_cast<std::int64_t>(end));
      }
      if (name.empty()) continue;  // a valid file may name a tensor "", the writer does not
      // Widened values narrow back to the same bits, so the copy must equal the original.
      writer.add(name, value, reader.dtype(name), reader.shape(name));
    }
    for (const auto& [key, value] : reader.metadata()) writer.set_metadata(key, value);
    const SafetensorsReader copy = SafetensorsReader::from_memory(writer.serialize(), "copy");
    for (const std::string& name : copy.names()) {
      require(reader.contains(name) && copy.dtype(name) == reader.dtype(name) &&
              copy.shape(name) == reader.shape(name));
      const auto [b0, e0] = reader.file_offsets(name);
      const auto [b1, e1] = copy.file_offsets(name);
      require(e1 - b1 == e0 - b0);
      // NaN payloads are not kept by a float round trip; every other element is bitwise equal.
      const switchmoe::Matrix<float> original = reader.tensor(name, Finite::kAllow);
      const switchmoe::Matrix<float> copied = copy.tensor(name, Finite::kAllow);
      for (Eigen::Index i = 0; i < original.size(); ++i) {
        const float a = original.data()[i];
        const float b = copied.data()[i];
        require((std::isnan(a) && std::isnan(b)) || std::memcmp(&a, &b, sizeof a) == 0);
      }
    }
  } catch (const FormatError&) {
    // Refused: the expected outcome for most inputs.
  }
  return 0;
}
