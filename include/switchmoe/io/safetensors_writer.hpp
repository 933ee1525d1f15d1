#pragma once
// SafetensorsWriter: collects tensors (converted to their file dtype when added) and writes them
// as one safetensors file, atomically: a temporary file in the destination's folder, written,
// flushed to the disk, then renamed over the destination. A crash or a full disk mid-save leaves
// the previous file (or none) under the final name, never half of a new one.

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "switchmoe/core/types.hpp"
#include "switchmoe/io/format.hpp"

namespace switchmoe::io {
namespace detail {
inline void write_atomically(const std::string& path, const unsigned char* data, std::size_t size);
}  // namespace detail

class SafetensorsWriter {
 public:
  /// Adds `value` [rows, cols] as a tensor of shape [rows, cols] stored as `dtype` ("F32",
  /// "BF16" or "F16"; the last two round to nearest even). A finite value that overflows the
  /// dtype (e.g. 70000 as F16) is refused rather than stored as an infinity.
  void add(const std::string& name, const Eigen::Ref<const Matrix<float>>& value,
           const std::string& dtype = "F32") {
    add(name, value, dtype, {value.rows(), value.cols()});
  }

  /// The same with an explicit `shape` whose element count is value.size(); the elements are
  /// taken in row-major order (e.g. a [1, n] bias stored as the 1-D shape [n]).
  void add(const std::string& name, const Eigen::Ref<const Matrix<float>>& value,
           const std::string& dtype, const std::vector<std::int64_t>& shape) {
    if (name.empty() || name == "__metadata__" || !detail::is_utf8(name)) {
      switchmoe::detail::fail("tensor name '", name,
                              "' is not allowed, expected a non-empty UTF-8 name other than "
                              "__metadata__");
    }
    if (index_.count(name) != 0) switchmoe::detail::fail("tensor '", name, "' was already added");
    if (dtype != "F32" && dtype != "BF16" && dtype != "F16") {
      switchmoe::detail::fail("dtype of tensor '", name, "' is '", dtype,
                              "', expected F32, BF16 or F16");
    }
    std::int64_t elements = 1;
    for (const std::int64_t extent : shape) {
      if (extent < 0) switchmoe::detail::fail("shape of tensor '", name, "' has extent ", extent);
      elements *= extent;
    }
    if (elements != value.size()) {
      switchmoe::detail::fail("shape of tensor '", name, "' holds ", elements,
                              " elements, the value has ", value.size());
    }
    Tensor tensor;
    tensor.name = name;
    tensor.dtype = dtype;
    tensor.shape = shape;
    const std::size_t size = detail::find_dtype(dtype)->size;
    tensor.bytes.resize(static_cast<std::size_t>(value.size()) * size);
    unsigned char* out = tensor.bytes.data();
    for (Eigen::Index r = 0; r < value.rows(); ++r) {
      for (Eigen::Index c = 0; c < value.cols(); ++c, out += size) {
        const float x = value(r, c);
        if (dtype == "F32") {
          std::memcpy(out, &x, sizeof x);
          continue;
        }
        const std::uint16_t bits = dtype == "BF16" ? detail::narrow_bf16(x) : detail::narrow_f16(x);
        const float stored = dtype == "BF16" ? detail::widen_bf16(bits) : detail::widen_f16(bits);
        if (std::isfinite(x) && !std::isfinite(stored)) {
          switchmoe::detail::fail("tensor '", name, "' (", r, ", ", c, ") is ", x,
                                  ", outside the range of ", dtype);
        }
        out[0] = static_cast<unsigned char>(bits & 0xFF);
        out[1] = static_cast<unsigned char>(bits >> 8);
      }
    }
    index_.emplace(name, tensors_.size());
    tensors_.push_back(std::move(tensor));
  }

  /// `__metadata__` entries; "format" is "pt" unless set otherwise (Hugging Face's loaders
  /// expect it).
  void set_metadata(const std::string& key, const std::string& value) {
    if (!detail::is_utf8(key) || !detail::is_utf8(value)) {
      switchmoe::detail::fail("metadata '", key, "' is not valid UTF-8");
    }
    metadata_[key] = value;
  }

  bool contains(const std::string& name) const { return index_.count(name) != 0; }

  /// Moves every tensor of `other` into this writer (its metadata too, overriding), or nothing
  /// when a name is in both.
  void merge(SafetensorsWriter&& other) {
    for (const Tensor& tensor : other.tensors_) {
      if (contains(tensor.name)) {
        switchmoe::detail::fail("tensor '", tensor.name, "' was already added");
      }
    }
    tensors_.reserve(tensors_.size() + other.tensors_.size());
    for (Tensor& tensor : other.tensors_) {
      index_.emplace(tensor.name, tensors_.size());
      tensors_.push_back(std::move(tensor));
    }
    for (auto& [key, value] : other.metadata_) metadata_[key] = value;
    other = SafetensorsWriter();
  }

  /// The whole file. Tensors are laid out as the reference implementation does: by dtype,
  /// largest alignment first, then by name; the header is padded with spaces to a multiple of 8
  /// bytes so the data starts aligned.
  std::vector<unsigned char> serialize() const {
    const std::vector<const Tensor*> order = layout_order();
    nlohmann::ordered_json header = nlohmann::ordered_json::object();
    nlohmann::ordered_json metadata = nlohmann::ordered_json::object();
    if (metadata_.count("format") == 0) metadata["format"] = "pt";
    for (const auto& [key, value] : metadata_) metadata[key] = value;
    header["__metadata__"] = metadata;
    std::uint64_t offset = 0;
    for (const Tensor* tensor : order) {
      header[tensor->name] = {{"dtype", tensor->dtype},
                              {"shape", tensor->shape},
                              {"data_offsets", {offset, offset + tensor->bytes.size()}}};
      offset += tensor->bytes.size();
    }
    std::string text = header.dump();
    text.append((8 - text.size() % 8) % 8, ' ');

    std::vector<unsigned char> file(8 + text.size() + offset);
    const std::uint64_t length = text.size();
    for (int i = 0; i < 8; ++i) file[i] = static_cast<unsigned char>(length >> (8 * i));
    std::memcpy(file.data() + 8, text.data(), text.size());
    unsigned char* data = file.data() + 8 + text.size();
    for (const Tensor* tensor : order) {
      std::copy(tensor->bytes.begin(), tensor->bytes.end(), data);
      data += tensor->bytes.size();
    }
    return file;
  }

  /// Tensor names in the file's layout order.
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const Tensor* tensor : layout_order()) out.push_back(tensor->name);
    return out;
  }

  /// Bytes of tensor data (Hugging Face's "total_size" of a sharded checkpoint).
  std::uint64_t data_size() const {
    std::uint64_t size = 0;
    for (const Tensor& tensor : tensors_) size += tensor.bytes.size();
    return size;
  }

  /// The tensors split over `parts` writers (each with this writer's metadata): consecutive runs
  /// of the layout order, balanced by bytes, none empty. 1 <= parts <= the number of tensors.
  std::vector<SafetensorsWriter> split(int parts) const {
    if (parts < 1 || static_cast<std::size_t>(parts) > tensors_.size()) {
      switchmoe::detail::fail("parts is ", parts, ", expected 1 to the writer's ", tensors_.size(),
                              " tensors (no shard may be empty)");
    }
    std::vector<SafetensorsWriter> out(static_cast<std::size_t>(parts));
    const std::vector<const Tensor*> order = layout_order();
    const long double total = static_cast<long double>(data_size());
    std::size_t part = 0, in_part = 0;
    long double done = 0;  // bytes of the tensors before this one
    for (std::size_t i = 0; i < order.size(); ++i) {
      const std::size_t left = order.size() - i, parts_after = out.size() - 1 - part;
      // Move on once this part has its share, or when each later part needs one of the rest.
      if (in_part > 0 && parts_after > 0 &&
          (left == parts_after || done * parts >= total * static_cast<long double>(part + 1))) {
        ++part;
        in_part = 0;
      }
      SafetensorsWriter& target = out[part];
      target.index_.emplace(order[i]->name, target.tensors_.size());
      target.tensors_.push_back(*order[i]);
      done += static_cast<long double>(order[i]->bytes.size());
      ++in_part;
    }
    for (SafetensorsWriter& writer : out) writer.metadata_ = metadata_;
    return out;
  }

  /// Writes the file to `path` atomically; throws IoError (the destination untouched, the
  /// temporary file removed) when any step fails.
  void write(const std::string& path) const {
    const std::vector<unsigned char> file = serialize();
    detail::write_atomically(path, file.data(), file.size());
  }

 private:
  struct Tensor {
    std::string name;
    std::string dtype;
    std::vector<std::int64_t> shape;
    std::vector<unsigned char> bytes;  // little-endian, row-major
  };

  // The reference implementation's layout: by dtype, largest alignment first, then by name.
  std::vector<const Tensor*> layout_order() const {
    std::vector<const Tensor*> order;
    for (const Tensor& tensor : tensors_) order.push_back(&tensor);
    std::sort(order.begin(), order.end(), [](const Tensor* a, const Tensor* b) {
      const int rank_a = detail::find_dtype(a->dtype)->order;
      const int rank_b = detail::find_dtype(b->dtype)->order;
      if (rank_a != rank_b) return rank_a > rank_b;
      return a->name < b->name;
    });
    return order;
  }

  std::vector<Tensor> tensors_;
  std::map<std::string, std::size_t> index_;
  std::map<std::string, std::string> metadata_;
};

namespace detail {

inline std::string parent_folder(const std::string& path) {
  const std::size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

/// Writes `size` bytes to `path` atomically: a temporary file in the same folder, written,
/// flushed to the disk, renamed over `path`. Throws IoError (the destination untouched, the
/// temporary file removed) when any step fails.
inline void write_atomically(const std::string& path, const unsigned char* data, std::size_t size) {
  const std::string folder = parent_folder(path);
  std::string temporary;
  int fd = -1;
  static std::atomic<unsigned> counter{0};
  for (int attempt = 0; attempt < 100 && fd < 0; ++attempt) {
    temporary =
        path + ".tmp." + std::to_string(::getpid()) + "." + std::to_string(counter.fetch_add(1));
    // 0666 through the umask, as any new file: rename keeps these permissions.
    fd = ::open(temporary.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd < 0 && errno != EEXIST) break;
  }
  if (fd < 0) {
    throw IoError(path, std::string("cannot create a temporary file in ") + folder + ": " +
                            std::strerror(errno));
  }
  const auto abandon = [&](const std::string& step) {
    const int error = errno;
    if (fd >= 0) ::close(fd);
    ::unlink(temporary.c_str());
    throw IoError(path, step + " failed: " + std::strerror(error));
  };
  std::size_t written = 0;
  while (written < size) {
    const ssize_t n = ::write(fd, data + written, size - written);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      if (n == 0) errno = EIO;
      abandon("writing " + temporary);
    }
    written += static_cast<std::size_t>(n);
  }
  if (::fsync(fd) != 0) abandon("fsync of " + temporary);
  const int closing = fd;
  fd = -1;
  if (::close(closing) != 0) abandon("closing " + temporary);
  if (::rename(temporary.c_str(), path.c_str()) != 0) abandon("renaming " + temporary);
  // The rename itself reaches the disk with the folder's own fsync; a failure here leaves a
  // complete file in place, so it is not an error.
  const int dir = ::open(folder.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir >= 0) {
    ::fsync(dir);
    ::close(dir);
  }
}

}  // namespace detail
}  // namespace switchmoe::io
