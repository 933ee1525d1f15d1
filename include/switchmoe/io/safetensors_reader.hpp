#pragma once
// SafetensorsReader: reads a whole safetensors file into memory and validates all of it before
// anything can be asked of it, so a reader that exists holds a well-formed file.

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "switchmoe/core/types.hpp"
#include "switchmoe/io/format.hpp"

namespace switchmoe::io {

class SafetensorsReader {
 public:
  /// The reference implementation's limit: a larger header is refused before it is parsed.
  static constexpr std::uint64_t kMaxHeaderSize = 100'000'000;

  /// Reads and validates `path`; throws IoError when it cannot be read, FormatError when it is
  /// not a valid safetensors file.
  explicit SafetensorsReader(const std::string& path) : path_(path) {
    bytes_ = read_file(path);
    parse();
  }

  /// Validates bytes already in memory; `label` stands for the path in error messages.
  static SafetensorsReader from_memory(std::vector<unsigned char> bytes,
                                       const std::string& label = "<memory>") {
    return SafetensorsReader(std::move(bytes), label);
  }

  const std::string& path() const { return path_; }

  /// Tensor names, sorted.
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    out.reserve(tensors_.size());
    for (const auto& entry : tensors_) out.push_back(entry.first);
    return out;
  }
  bool contains(const std::string& name) const { return tensors_.count(name) != 0; }
  const std::vector<std::int64_t>& shape(const std::string& name) const { return find(name).shape; }
  const std::string& dtype(const std::string& name) const { return find(name).dtype; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  /// Byte range of a tensor's data in the file, [begin, end).
  std::pair<std::uint64_t, std::uint64_t> file_offsets(const std::string& name) const {
    const Entry& entry = find(name);
    return {data_start_ + entry.begin, data_start_ + entry.end};
  }

  /// The tensor as a float32 matrix: shape [a, b] as [a, b], [n] as [1, n], [] as [1, 1]. F32,
  /// BF16 and F16 are read (the last two widened exactly); other dtypes and ranks above 2 are a
  /// FormatError, as is a NaN or an infinity unless `finite` is Finite::kAllow.
  Matrix<float> tensor(const std::string& name, Finite finite = Finite::kRequire) const {
    const Entry& entry = find(name);
    if (entry.shape.size() > 2) {
      fail(name, "has rank " + std::to_string(entry.shape.size()) + " (shape " +
                     shape_string(entry.shape) + "), expected at most 2 for a matrix");
    }
    const Eigen::Index rows = entry.shape.size() == 2 ? entry.shape[0] : 1;
    const Eigen::Index cols = entry.shape.empty() ? 1 : entry.shape.back();
    Matrix<float> out(rows, cols);  // [rows, cols]
    const unsigned char* data = bytes_.data() + data_start_ + entry.begin;
    const std::size_t count = static_cast<std::size_t>(out.size());
    float* dst = out.data();
    if (entry.dtype == "F32") {
      if (count != 0) std::memcpy(dst, data, count * sizeof(float));  // dst is null when empty
    } else if (entry.dtype == "BF16" || entry.dtype == "F16") {
      const bool bf16 = entry.dtype == "BF16";
      for (std::size_t i = 0; i < count; ++i) {
        const std::uint16_t bits =
            static_cast<std::uint16_t>(data[2 * i] | (static_cast<unsigned>(data[2 * i + 1]) << 8));
        dst[i] = bf16 ? detail::widen_bf16(bits) : detail::widen_f16(bits);
      }
    } else {
      fail(name, "has dtype " + entry.dtype + ", expected F32, BF16 or F16 to read as float32");
    }
    if (finite == Finite::kRequire) {
      const std::size_t size = detail::find_dtype(entry.dtype)->size;
      for (std::size_t i = 0; i < count; ++i) {
        if (!std::isfinite(dst[i])) {
          std::ostringstream what;
          what << "element " << i << " is " << dst[i] << ", expected a finite weight";
          fail(name, what.str(), static_cast<std::int64_t>(data_start_ + entry.begin + i * size));
        }
      }
    }
    return out;
  }

 private:
  struct Entry {
    std::string dtype;
    std::vector<std::int64_t> shape;
    std::uint64_t begin = 0;  // offsets from the start of the data
    std::uint64_t end = 0;
  };

  SafetensorsReader(std::vector<unsigned char> bytes, const std::string& label)
      : path_(label), bytes_(std::move(bytes)) {
    parse();
  }

  [[noreturn]] void fail(const std::string& tensor, const std::string& what,
                         std::int64_t offset = FormatError::kNoOffset) const {
    throw FormatError(path_, what, tensor, offset);
  }

  const Entry& find(const std::string& name) const {
    const auto it = tensors_.find(name);
    if (it == tensors_.end()) {
      switchmoe::detail::fail(path_, ": no tensor named '", name, "' (the file has ",
                              tensors_.size(), " tensors)");
    }
    return it->second;
  }

  static std::string shape_string(const std::vector<std::int64_t>& shape) {
    std::string out = "[";
    for (std::size_t i = 0; i < shape.size(); ++i) {
      out += (i ? ", " : "") + std::to_string(shape[i]);
    }
    return out + "]";
  }

  static std::vector<unsigned char> read_file(const std::string& path) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw IoError(path, std::string("cannot open: ") + std::strerror(errno));
    std::vector<unsigned char> bytes;
    struct stat info;
    if (::fstat(fd, &info) != 0) {
      const int error = errno;
      ::close(fd);
      throw IoError(path, std::string("cannot stat: ") + std::strerror(error));
    }
    if (!S_ISREG(info.st_mode)) {
      ::close(fd);
      throw IoError(path, S_ISDIR(info.st_mode) ? "is a directory, expected a file"
                                                : "is not a regular file");
    }
    // The size is a hint only: the loop reads until end of file whatever it says.
    bytes.resize(static_cast<std::size_t>(info.st_size) + 1);
    std::size_t filled = 0;
    for (;;) {
      if (filled == bytes.size()) bytes.resize(bytes.size() * 2);
      const ssize_t got = ::read(fd, bytes.data() + filled, bytes.size() - filled);
      if (got < 0 && errno == EINTR) continue;
      if (got < 0) {
        const int error = errno;
        ::close(fd);
        throw IoError(path, std::string("read failed: ") + std::strerror(error));
      }
      if (got == 0) break;
      filled += static_cast<std::size_t>(got);
    }
    ::close(fd);
    bytes.resize(filled);
    return bytes;
  }

  void parse() {
    const std::uint64_t file_size = bytes_.size();
    if (file_size < 8) {
      fail("", "file has " + std::to_string(file_size) +
                   " bytes, expected at least 8 (the header length)");
    }
    std::uint64_t header_size = 0;
    for (int i = 7; i >= 0; --i) header_size = (header_size << 8) | bytes_[i];
    if (header_size > kMaxHeaderSize) {
      fail("",
           "header length " + std::to_string(header_size) + " exceeds the limit of " +
               std::to_string(kMaxHeaderSize) + " bytes",
           0);
    }
    if (header_size > file_size - 8) {
      fail("",
           "header length " + std::to_string(header_size) + " runs past the end of the " +
               std::to_string(file_size) + "-byte file",
           0);
    }
    data_start_ = 8 + header_size;
    const unsigned char* header = bytes_.data() + 8;
    const std::size_t bad = detail::invalid_utf8(header, header_size);
    if (bad != header_size) {
      fail("", "header is not valid UTF-8", static_cast<std::int64_t>(8 + bad));
    }
    // JSON has no raw NUL anywhere, and nlohmann would take one for the end of the input and
    // ignore whatever follows it.
    const void* nul = std::memchr(header, 0, header_size);
    if (nul != nullptr) {
      fail("", "header is not valid JSON: it contains a NUL byte",
           static_cast<std::int64_t>(8 + (static_cast<const unsigned char*>(nul) - header)));
    }
    const nlohmann::json root = parse_json(header, header_size);
    if (!root.is_object()) {
      fail("", std::string("header is a JSON ") + root.type_name() + ", expected an object", 8);
    }

    std::vector<std::pair<const Entry*, const std::string*>> by_offset;
    for (const auto& item : root.items()) {
      const std::string& name = item.key();
      const nlohmann::json& value = item.value();
      if (name == "__metadata__") {
        parse_metadata(value);
        continue;
      }
      tensors_.emplace(name, parse_entry(name, value));
    }
    for (const auto& entry : tensors_) by_offset.emplace_back(&entry.second, &entry.first);
    std::sort(by_offset.begin(), by_offset.end(), [](const auto& a, const auto& b) {
      return std::make_pair(a.first->begin, a.first->end) <
             std::make_pair(b.first->begin, b.first->end);
    });
    // Contiguity: sorted by offsets, each tensor starts where the previous one ended; the first
    // at 0, the last ends at the end of the file.
    std::uint64_t expected = 0;
    for (const auto& [entry, name] : by_offset) {
      if (entry->begin != expected) {
        fail(
            *name,
            std::string(entry->begin > expected ? "leaves a hole: data starts at "
                                                : "overlaps the previous tensor: data starts at ") +
                std::to_string(entry->begin) + ", expected " + std::to_string(expected),
            static_cast<std::int64_t>(data_start_ + std::min(entry->begin, expected)));
      }
      expected = entry->end;
    }
    // parse_entry keeps every end inside the file, so only trailing bytes are left to find.
    const std::uint64_t data_size = file_size - data_start_;
    if (expected != data_size) {
      fail("",
           std::to_string(data_size - expected) + " trailing bytes after the last tensor's data",
           static_cast<std::int64_t>(data_start_ + expected));
    }
  }

  nlohmann::json parse_json(const unsigned char* header, std::size_t size) const {
    // nlohmann keeps the last of duplicate keys silently; the callback sees every key first, so
    // a duplicate (a tensor named twice, a field given twice) is refused. The format nests three
    // levels deep (header, entry, shape), so deeper input is refused before it costs anything.
    std::vector<std::set<std::string>> keys;
    constexpr int kMaxDepth = 3;
    const auto callback = [&](int depth, nlohmann::json::parse_event_t event,
                              nlohmann::json& parsed) {
      using Event = nlohmann::json::parse_event_t;
      if (event == Event::object_start || event == Event::array_start) {
        if (depth >= kMaxDepth) fail("", "header nests JSON deeper than 3 levels", 8);
        if (event == Event::object_start) keys.emplace_back();
      } else if (event == Event::object_end) {
        keys.pop_back();
      } else if (event == Event::key) {
        const std::string& key = parsed.get_ref<const std::string&>();
        if (!keys.back().insert(key).second) {
          fail(depth == 1 ? key : "",
               depth == 1 ? "appears twice in the header"
                          : "header has the key '" + key + "' twice in one object",
               8);
        }
      }
      return true;
    };
    try {
      return nlohmann::json::parse(header, header + size, callback);
    } catch (const nlohmann::json::parse_error& error) {  // syntax, UTF-8 in strings
      fail("", std::string("header is not valid JSON: ") + error.what(),
           static_cast<std::int64_t>(8 + (error.byte > 0 ? error.byte - 1 : 0)));
    } catch (const nlohmann::json::exception& error) {  // e.g. a number beyond double's range
      fail("", std::string("header is not valid JSON: ") + error.what(), 8);
    }
  }

  void parse_metadata(const nlohmann::json& value) {
    if (!value.is_object()) {
      fail("", std::string("__metadata__ is a JSON ") + value.type_name() + ", expected an object");
    }
    for (const auto& item : value.items()) {
      if (!item.value().is_string()) {
        fail("", "__metadata__ value of '" + item.key() + "' is a JSON " +
                     item.value().type_name() + ", expected a string");
      }
      metadata_.emplace(item.key(), item.value().get<std::string>());
    }
  }

  Entry parse_entry(const std::string& name, const nlohmann::json& value) const {
    if (!value.is_object()) {
      fail(name, std::string("entry is a JSON ") + value.type_name() + ", expected an object");
    }
    for (const char* field : {"dtype", "shape", "data_offsets"}) {
      if (!value.contains(field)) fail(name, std::string("entry has no \"") + field + "\"");
    }
    for (const auto& item : value.items()) {
      if (item.key() != "dtype" && item.key() != "shape" && item.key() != "data_offsets") {
        fail(name, "entry has an unknown field \"" + item.key() + "\"");
      }
    }
    const std::uint64_t data_size = bytes_.size() - data_start_;
    Entry entry;
    const nlohmann::json& dtype = value["dtype"];
    if (!dtype.is_string()) fail(name, std::string("dtype is a JSON ") + dtype.type_name());
    entry.dtype = dtype.get<std::string>();
    const detail::DtypeInfo* info = detail::find_dtype(entry.dtype);
    if (info == nullptr) fail(name, "unknown dtype \"" + entry.dtype + "\"");

    const nlohmann::json& shape = value["shape"];
    if (!shape.is_array()) fail(name, std::string("shape is a JSON ") + shape.type_name());
    std::uint64_t elements = 1;
    for (std::size_t i = 0; i < shape.size(); ++i) {
      // number_unsigned: nlohmann's type of a non-negative integer literal; negative integers,
      // fractions and exponents are other types.
      if (!shape[i].is_number_unsigned()) {
        fail(name, "shape entry " + std::to_string(i) + " is " + shape[i].dump() +
                       ", expected a non-negative integer");
      }
      const std::uint64_t extent = shape[i].get<std::uint64_t>();
      if (extent > static_cast<std::uint64_t>(INT64_MAX) ||
          !detail::multiply(elements, extent, elements)) {
        fail(name, "shape " + shape.dump() + " has more elements than 64 bits count");
      }
      entry.shape.push_back(static_cast<std::int64_t>(extent));
    }
    std::uint64_t expected_bytes = 0;
    if (!detail::multiply(elements, info->size, expected_bytes)) {
      fail(name,
           "shape " + shape.dump() + " of " + entry.dtype + " has more bytes than 64 bits count");
    }

    const nlohmann::json& offsets = value["data_offsets"];
    if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() ||
        !offsets[1].is_number_unsigned()) {
      fail(name, "data_offsets is " + offsets.dump() +
                     ", expected [begin, end] of non-negative integers");
    }
    entry.begin = offsets[0].get<std::uint64_t>();
    entry.end = offsets[1].get<std::uint64_t>();
    if (entry.begin > entry.end) {
      fail(name, "data_offsets begin " + std::to_string(entry.begin) + " > end " +
                     std::to_string(entry.end));
    }
    if (entry.end - entry.begin != expected_bytes) {
      fail(name,
           "data_offsets span " + std::to_string(entry.end - entry.begin) + " bytes, expected " +
               std::to_string(expected_bytes) + " (" + std::to_string(elements) + " elements of " +
               entry.dtype + ", shape " + shape.dump() + ")",
           static_cast<std::int64_t>(data_start_ + std::min(entry.begin, data_size)));
    }
    if (entry.end > data_size) {
      fail(name,
           "data_offsets end " + std::to_string(entry.end) + " is past the end of the " +
               std::to_string(data_size) + " bytes of data",
           static_cast<std::int64_t>(bytes_.size()));
    }
    return entry;
  }

  std::string path_;
  std::vector<unsigned char> bytes_;
  std::uint64_t data_start_ = 0;  // 8 + header length
  std::map<std::string, Entry> tensors_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace switchmoe::io
