#pragma once
// The safetensors format's vocabulary: the two error types of switchmoe::io, the element types
// (dtypes) a file may name, and the byte-level helpers the reader and the writer share.
//
// A safetensors file is: 8 bytes, the little-endian u64 length N of the header; N bytes of UTF-8
// JSON, an object mapping each tensor name to {"dtype", "shape", "data_offsets": [begin, end]}
// plus an optional "__metadata__" object of strings; then the data, every tensor's bytes
// row-major and little-endian at [begin, end) counted from the end of the header, with no hole,
// overlap or trailing byte.

#include <Eigen/Core>
#include <cstddef>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "switchmoe::io copies tensor bytes as they are: it needs a little-endian machine"
#endif

namespace switchmoe::io {

/// The operating system refused an operation (open, read, write, fsync, rename).
class IoError : public std::runtime_error {
 public:
  IoError(const std::string& path, const std::string& what)
      : std::runtime_error("switchmoe: " + path + ": " + what), path_(path) {}
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

/// A file that is not a valid safetensors file, or a tensor that cannot be used as asked. The
/// message names the file and, where they apply, the tensor and the byte offset in the file.
class FormatError : public std::runtime_error {
 public:
  static constexpr std::int64_t kNoOffset = -1;

  FormatError(const std::string& path, const std::string& what, const std::string& tensor = "",
              std::int64_t offset = kNoOffset)
      : std::runtime_error(message(path, what, tensor, offset)),
        path_(path),
        tensor_(tensor),
        offset_(offset) {}
  const std::string& path() const { return path_; }
  const std::string& tensor() const { return tensor_; }  // empty when no tensor is concerned
  std::int64_t offset() const { return offset_; }        // kNoOffset when none applies

 private:
  static std::string message(const std::string& path, const std::string& what,
                             const std::string& tensor, std::int64_t offset) {
    std::ostringstream out;
    out << "switchmoe: " << path << ": ";
    if (!tensor.empty()) out << "tensor '" << tensor << "': ";
    out << what;
    if (offset != kNoOffset) out << " (byte offset " << offset << ")";
    return out.str();
  }

  std::string path_;
  std::string tensor_;
  std::int64_t offset_;
};

/// What a reader does with NaN and infinite values: weights must be finite (the default).
enum class Finite { kRequire, kAllow };

namespace detail {

/// One dtype of the format. `order` is its position in the reference implementation's list,
/// which orders tensors in a file (SafetensorsWriter sorts by it, largest first, then by name).
struct DtypeInfo {
  const char* name;
  std::size_t size;  // bytes per element
  int order;
};

inline const DtypeInfo* find_dtype(const std::string& name) {
  static constexpr DtypeInfo kDtypes[] = {
      {"BOOL", 1, 0}, {"U8", 1, 1},   {"I8", 1, 2},   {"F8_E5M2", 1, 3}, {"F8_E4M3", 1, 4},
      {"I16", 2, 5},  {"U16", 2, 6},  {"F16", 2, 7},  {"BF16", 2, 8},    {"I32", 4, 9},
      {"U32", 4, 10}, {"F32", 4, 11}, {"F64", 8, 12}, {"I64", 8, 13},    {"U64", 8, 14},
  };
  for (const DtypeInfo& info : kDtypes) {
    if (name == info.name) return &info;
  }
  return nullptr;
}

/// `a * b`, or false when it does not fit in 64 bits.
inline bool multiply(std::uint64_t a, std::uint64_t b, std::uint64_t& product) {
  if (a != 0 && b > UINT64_MAX / a) return false;
  product = a * b;
  return true;
}

/// Offset of the first byte that is not well-formed UTF-8 (overlong forms, surrogates and code
/// points above U+10FFFF included), or `size` when all of it is.
inline std::size_t invalid_utf8(const unsigned char* s, std::size_t size) {
  std::size_t i = 0;
  while (i < size) {
    const unsigned char c = s[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    std::size_t length;
    std::uint32_t code;
    std::uint32_t least;
    if ((c & 0xE0) == 0xC0) {
      length = 2, code = c & 0x1F, least = 0x80;
    } else if ((c & 0xF0) == 0xE0) {
      length = 3, code = c & 0x0F, least = 0x800;
    } else if ((c & 0xF8) == 0xF0) {
      length = 4, code = c & 0x07, least = 0x10000;
    } else {
      return i;
    }
    if (size - i < length) return i;
    for (std::size_t k = 1; k < length; ++k) {
      if ((s[i + k] & 0xC0) != 0x80) return i;
      code = (code << 6) | (s[i + k] & 0x3F);
    }
    if (code < least || code > 0x10FFFF || (code >= 0xD800 && code <= 0xDFFF)) return i;
    i += length;
  }
  return size;
}

inline bool is_utf8(const std::string& s) {
  return invalid_utf8(reinterpret_cast<const unsigned char*>(s.data()), s.size()) == s.size();
}

/// Little-endian element bits <-> float32. Widening is exact; narrowing rounds to nearest even
/// (Eigen's conversions), so a float32 written as BF16 or F16 reads back as the nearest value.
inline float widen_bf16(std::uint16_t bits) {
  return static_cast<float>(Eigen::numext::bit_cast<Eigen::bfloat16>(bits));
}
inline float widen_f16(std::uint16_t bits) {
  return static_cast<float>(Eigen::numext::bit_cast<Eigen::half>(bits));
}
inline std::uint16_t narrow_bf16(float value) {
  return Eigen::numext::bit_cast<std::uint16_t>(static_cast<Eigen::bfloat16>(value));
}
inline std::uint16_t narrow_f16(float value) {
  return Eigen::numext::bit_cast<std::uint16_t>(static_cast<Eigen::half>(value));
}

}  // namespace detail
}  // namespace switchmoe::io
