// Data loading: clear errors for bad files, the train/validation split, deterministic batches.

#include "text_data.hpp"

#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <fstream>

namespace switch_lm {
namespace {

std::string temp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() / ("switch_lm_" + name)).string();
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::runtime_error& e) {
    return e.what();
  }
  return "";
}

TEST(TextDataTest, MissingFileGivesMessageWithPath) {
  const std::string message = error_of([] { load_text_file("/nonexistent/switch_lm.txt"); });
  EXPECT_NE(message.find("/nonexistent/switch_lm.txt"), std::string::npos) << message;
  EXPECT_NE(message.find("does not exist"), std::string::npos) << message;
}

TEST(TextDataTest, EmptyFileAndDirectoryAreRejected) {
  const std::string empty = temp_path("empty.txt");
  std::ofstream(empty).close();
  EXPECT_NE(error_of([&] { load_text_file(empty); }).find("is empty"), std::string::npos);
  EXPECT_NE(error_of([] {
              load_text_file(std::filesystem::temp_directory_path().string());
            }).find("directory"),
            std::string::npos);
  std::remove(empty.c_str());
}

TEST(TextDataTest, LastTenPercentIsValidation) {
  const std::string path = temp_path("split.txt");
  {
    std::ofstream out(path, std::ios::binary);
    for (int i = 0; i < 1000; ++i) out.put(static_cast<char>('a' + i % 26));
  }
  const TextData data = load_text_file(path);
  EXPECT_EQ(data.train.size(), 900u);
  EXPECT_EQ(data.valid.size(), 100u);
  EXPECT_EQ(data.valid.front(), static_cast<std::uint8_t>('a' + 900 % 26));
  std::remove(path.c_str());
}

TEST(TextDataTest, MissingFortuneDirectoryNamesThePackage) {
  const std::string message = error_of([] { load_fortunes("/nonexistent/fortunes"); });
  EXPECT_NE(message.find("fortunes"), std::string::npos) << message;
  EXPECT_NE(message.find("--data"), std::string::npos) << message;
}

TEST(BatchSamplerTest, SameSeedSameBatchesAndTargetsAreShiftedInputs) {
  std::vector<std::uint8_t> text(500);
  for (std::size_t i = 0; i < text.size(); ++i) text[i] = static_cast<std::uint8_t>(i * 7 % 251);
  BatchSampler a(text, 3, 16, 42), b(text, 3, 16, 42);
  std::vector<int> in_a, tgt_a, in_b, tgt_b;
  for (int k = 0; k < 5; ++k) {
    a.next(in_a, tgt_a);
    b.next(in_b, tgt_b);
    EXPECT_EQ(in_a, in_b);
    EXPECT_EQ(tgt_a, tgt_b);
  }
  for (int row = 0; row < 3; ++row)
    for (int t = 0; t + 1 < 16; ++t) EXPECT_EQ(tgt_a[row * 16 + t], in_a[row * 16 + t + 1]);
}

TEST(BatchSamplerTest, TooShortTextIsRejected) {
  const std::vector<std::uint8_t> text(10, 'x');
  EXPECT_THROW(BatchSampler(text, 1, 16, 1), std::runtime_error);
  EXPECT_THROW(validation_offsets(10, 16, 1000), std::runtime_error);
}

TEST(ValidationOffsetsTest, WindowsStayInsideTheText) {
  const auto offsets = validation_offsets(1000, 64, 512);
  EXPECT_EQ(offsets.size(), 8u);
  EXPECT_EQ(offsets.front(), 0u);
  EXPECT_EQ(offsets.back(), 1000u - 1u - 64u);
}

}  // namespace
}  // namespace switch_lm
