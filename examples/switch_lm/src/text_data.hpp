#pragma once
// Training text: Debian's `fortunes` files by default, or any file. Bytes are the tokens.

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace switch_lm {

inline constexpr const char* kFortunesDir = "/usr/share/games/fortunes";

struct TextData {
  std::vector<std::uint8_t> train;
  std::vector<std::uint8_t> valid;
  std::string source;  // human-readable description
};

// Reads a whole file; throws std::runtime_error with the path and the reason.
inline std::vector<std::uint8_t> read_bytes(const std::filesystem::path& path) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec))
    throw std::runtime_error("data file '" + path.string() + "' does not exist");
  if (std::filesystem::is_directory(path, ec))
    throw std::runtime_error("data file '" + path.string() +
                             "' is a directory, expected a text file");
  std::ifstream in(path, std::ios::binary);
  if (!in)
    throw std::runtime_error("data file '" + path.string() + "' cannot be opened for reading");
  std::vector<std::uint8_t> bytes((std::istreambuf_iterator<char>(in)),
                                  std::istreambuf_iterator<char>());
  if (in.bad()) throw std::runtime_error("data file '" + path.string() + "' could not be read");
  return bytes;
}

// Appends the first (1 - valid_fraction) of `bytes` to train and the rest to valid.
inline void split_into(const std::vector<std::uint8_t>& bytes, double valid_fraction,
                       TextData& data) {
  const auto cut =
      static_cast<std::ptrdiff_t>(static_cast<double>(bytes.size()) * (1.0 - valid_fraction));
  data.train.insert(data.train.end(), bytes.begin(), bytes.begin() + cut);
  data.valid.insert(data.valid.end(), bytes.begin() + cut, bytes.end());
}

// One text file: the last valid_fraction of its bytes is the validation part.
inline TextData load_text_file(const std::string& path, double valid_fraction = 0.1) {
  TextData data;
  const auto bytes = read_bytes(path);
  if (bytes.empty()) throw std::runtime_error("data file '" + path + "' is empty");
  split_into(bytes, valid_fraction, data);
  data.source = path + " (" + std::to_string(bytes.size()) + " bytes)";
  return data;
}

// The regular files of a directory (symbolic links and hidden files skipped, so that aliases such
// as common-licenses' GPL -> GPL-3 count once), in name order, concatenated; the last
// valid_fraction of the concatenation is the validation part. A file path is load_text_file's.
inline TextData load_text_path(const std::string& path, double valid_fraction = 0.1) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::is_directory(path, ec)) return load_text_file(path, valid_fraction);
  std::vector<fs::path> files;
  for (const auto& entry : fs::directory_iterator(path, ec)) {
    if (entry.is_symlink(ec) || !entry.is_regular_file(ec)) continue;
    if (entry.path().filename().string().rfind('.', 0) == 0) continue;
    files.push_back(entry.path());
  }
  if (ec)
    throw std::runtime_error("data directory '" + path + "' cannot be listed: " + ec.message());
  std::sort(files.begin(), files.end());
  std::vector<std::uint8_t> bytes;
  for (const auto& file : files) {
    const auto b = read_bytes(file);
    bytes.insert(bytes.end(), b.begin(), b.end());
  }
  if (bytes.empty())
    throw std::runtime_error("data directory '" + path + "' holds no non-empty regular file");
  TextData data;
  split_into(bytes, valid_fraction, data);
  data.source = path + " (" + std::to_string(files.size()) + " files, " +
                std::to_string(bytes.size()) + " bytes)";
  return data;
}

// The plain-text fortune files of a directory (not the .dat indexes nor the .u8 variants), in
// name order. Each file contributes its last valid_fraction of bytes to validation, so that the
// validation text samples every topic rather than the alphabetically last ones.
inline TextData load_fortunes(const std::string& dir = kFortunesDir, double valid_fraction = 0.1) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::is_directory(dir, ec))
    throw std::runtime_error("fortune directory '" + dir +
                             "' not found: install the Debian package `fortunes` (bash "
                             "cmake/install_deps.sh) or give a text file with --data FILE");
  std::vector<fs::path> files;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    const auto ext = entry.path().extension().string();
    if (ext == ".dat" || ext == ".u8" || !entry.is_regular_file(ec)) continue;
    files.push_back(entry.path());
  }
  std::sort(files.begin(), files.end());
  TextData data;
  std::size_t total = 0;
  for (const auto& file : files) {
    const auto bytes = read_bytes(file);
    split_into(bytes, valid_fraction, data);
    total += bytes.size();
  }
  if (total == 0)
    throw std::runtime_error("no fortune text found in '" + dir +
                             "': install the Debian package `fortunes` or give --data FILE");
  data.source =
      dir + " (" + std::to_string(files.size()) + " files, " + std::to_string(total) + " bytes)";
  return data;
}

// Random training windows of seq + 1 bytes; the same seed gives the same batches in every run.
class BatchSampler {
 public:
  BatchSampler(const std::vector<std::uint8_t>& text, int batch, int seq, std::uint64_t seed)
      : text_(text), batch_(batch), seq_(seq), rng_(seed) {
    if (text.size() < static_cast<std::size_t>(seq) + 2)
      throw std::runtime_error("training text has " + std::to_string(text.size()) +
                               " bytes, fewer than context + 2 = " + std::to_string(seq + 2));
  }

  // inputs / targets: [batch * seq]; targets are the inputs shifted by one byte.
  void next(std::vector<int>& inputs, std::vector<int>& targets) {
    std::uniform_int_distribution<std::size_t> offset(
        0, text_.size() - static_cast<std::size_t>(seq_) - 1);
    inputs.resize(static_cast<std::size_t>(batch_) * seq_);
    targets.resize(inputs.size());
    for (int b = 0; b < batch_; ++b) {
      const std::size_t start = offset(rng_);
      for (int t = 0; t < seq_; ++t) {
        inputs[static_cast<std::size_t>(b) * seq_ + t] = text_[start + t];
        targets[static_cast<std::size_t>(b) * seq_ + t] = text_[start + t + 1];
      }
    }
  }

  // The position in the stream of batches: the generator's state as text (checkpoints keep it).
  std::string state() const {
    std::ostringstream out;
    out << rng_;
    return out.str();
  }
  void set_state(const std::string& state) {
    std::istringstream in(state);
    std::mt19937_64 rng;
    in >> rng;
    if (in.fail() || !(in >> std::ws).eof())
      throw std::runtime_error("batch sampler state '" + state.substr(0, 40) +
                               "...' is not a std::mt19937_64 state");
    rng_ = rng;
  }

 private:
  const std::vector<std::uint8_t>& text_;
  int batch_, seq_;
  std::mt19937_64 rng_;
};

// Fixed validation windows spread evenly over the validation text (at most max_tokens tokens).
inline std::vector<std::size_t> validation_offsets(std::size_t text_size, int seq,
                                                   std::size_t max_tokens) {
  if (text_size < static_cast<std::size_t>(seq) + 2)
    throw std::runtime_error("validation text has " + std::to_string(text_size) +
                             " bytes, fewer than context + 2 = " + std::to_string(seq + 2));
  const std::size_t available = (text_size - 1) / static_cast<std::size_t>(seq);
  const std::size_t windows = std::max<std::size_t>(1, std::min(available, max_tokens / seq));
  const std::size_t last_start = text_size - 1 - static_cast<std::size_t>(seq);
  std::vector<std::size_t> offsets(windows);
  for (std::size_t i = 0; i < windows; ++i)
    offsets[i] = windows == 1 ? 0 : i * last_start / (windows - 1);
  return offsets;
}

}  // namespace switch_lm
