// SafetensorsReader and SafetensorsWriter: every validation check of the reader on a crafted
// file (bytes put together here by hand, not by the writer), exact widening of BF16/F16,
// round-to-nearest-even narrowing checked against hand-computed bit patterns, the writer's
// layout read back with a plain JSON parser, and the atomic write under failures.
#include <gtest/gtest.h>
#include <sys/resource.h>

#include <csignal>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <switchmoe/io/safetensors.hpp>
#include <vector>

namespace {

using switchmoe::Matrix;
using switchmoe::io::Finite;
using switchmoe::io::FormatError;
using switchmoe::io::IoError;
using switchmoe::io::SafetensorsReader;
using switchmoe::io::SafetensorsWriter;
using Bytes = std::vector<unsigned char>;
namespace fs = std::filesystem;

// A file: the 8-byte little-endian header length (`length`, or the header's own size), the
// header text, the data.
Bytes craft(const std::string& header, const Bytes& data = {},
            std::uint64_t length = std::numeric_limits<std::uint64_t>::max()) {
  if (length == std::numeric_limits<std::uint64_t>::max()) length = header.size();
  Bytes file;
  for (int i = 0; i < 8; ++i) file.push_back(static_cast<unsigned char>(length >> (8 * i)));
  file.insert(file.end(), header.begin(), header.end());
  file.insert(file.end(), data.begin(), data.end());
  return file;
}

Bytes f32_bytes(const std::vector<float>& values) {
  Bytes out(values.size() * 4);
  std::memcpy(out.data(), values.data(), out.size());
  return out;
}

Bytes u16_bytes(const std::vector<std::uint16_t>& values) {
  Bytes out;
  for (const std::uint16_t v : values) {
    out.push_back(static_cast<unsigned char>(v & 0xFF));
    out.push_back(static_cast<unsigned char>(v >> 8));
  }
  return out;
}

std::uint32_t bits_of(float x) {
  std::uint32_t b;
  std::memcpy(&b, &x, 4);
  return b;
}

// The FormatError message of reading `file`, which must be refused.
std::string refusal(const Bytes& file) {
  try {
    SafetensorsReader::from_memory(file, "crafted.safetensors");
  } catch (const FormatError& error) {
    EXPECT_NE(std::string(error.what()).find("crafted.safetensors"), std::string::npos)
        << error.what();
    return error.what();
  }
  ADD_FAILURE() << "the file was accepted";
  return "";
}

#define EXPECT_REFUSED(file, fragment) \
  EXPECT_NE(refusal(file).find(fragment), std::string::npos) << refusal(file)

// One F32 [2] tensor "w" at [0, 8) with a correct header, for mutations.
const std::string kOneTensor = R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";

class TempDir : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = ::testing::TempDir() + "switchmoe_io_XXXXXX";
    ASSERT_NE(::mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }
  std::vector<std::string> listing() const {
    std::vector<std::string> out;
    for (const auto& entry : fs::directory_iterator(dir_)) {
      out.push_back(entry.path().filename().string());
    }
    std::sort(out.begin(), out.end());
    return out;
  }
  void put(const std::string& name, const Bytes& bytes) const {
    std::ofstream(path(name), std::ios::binary)
        .write(reinterpret_cast<const char*>(bytes.data()),
               static_cast<std::streamsize>(bytes.size()));
  }
  Bytes get(const std::string& name) const {
    std::ifstream in(path(name), std::ios::binary);
    return Bytes(std::istreambuf_iterator<char>(in), {});
  }
  fs::path dir_;
};

// ---- reading valid files --------------------------------------------------------------------

TEST(SafetensorsReader, ReadsHandMadeF32File) {
  const std::string header = R"({"__metadata__":{"format":"pt","note":"x"},)"
                             R"("m":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},)"
                             R"("v":{"dtype":"F32","shape":[2],"data_offsets":[24,32]},)"
                             R"("s":{"dtype":"F32","shape":[],"data_offsets":[32,36]},)"
                             R"("z":{"dtype":"F32","shape":[0,3],"data_offsets":[36,36]}}   )";
  const auto reader = SafetensorsReader::from_memory(
      craft(header, f32_bytes({1, 2, 3, 4, 5, 6, -1.5f, 0.25f, 42})));
  EXPECT_EQ(reader.names(), (std::vector<std::string>{"m", "s", "v", "z"}));
  EXPECT_TRUE(reader.contains("m"));
  EXPECT_FALSE(reader.contains("__metadata__"));
  EXPECT_EQ(reader.shape("m"), (std::vector<std::int64_t>{2, 3}));
  EXPECT_EQ(reader.dtype("v"), "F32");
  EXPECT_EQ(reader.metadata().at("note"), "x");
  const Matrix<float> m = reader.tensor("m");  // [2, 3]
  ASSERT_EQ(m.rows(), 2);
  ASSERT_EQ(m.cols(), 3);
  EXPECT_EQ(m(0, 0), 1.0f);
  EXPECT_EQ(m(0, 2), 3.0f);
  EXPECT_EQ(m(1, 0), 4.0f);                    // row-major
  const Matrix<float> v = reader.tensor("v");  // [1, 2]: a 1-D tensor is one row
  ASSERT_EQ(v.rows(), 1);
  ASSERT_EQ(v.cols(), 2);
  EXPECT_EQ(v(0, 1), 0.25f);
  const Matrix<float> s = reader.tensor("s");  // [1, 1]
  ASSERT_EQ(s.size(), 1);
  EXPECT_EQ(s(0, 0), 42.0f);
  const Matrix<float> z = reader.tensor("z");
  EXPECT_EQ(z.rows(), 0);
  EXPECT_EQ(z.cols(), 3);
}

TEST(SafetensorsReader, EmptyFileOfNoTensors) {
  const auto reader = SafetensorsReader::from_memory(craft("{}      "));
  EXPECT_TRUE(reader.names().empty());
  EXPECT_TRUE(reader.metadata().empty());
}

TEST(SafetensorsReader, WidensBf16AndF16Exactly) {
  // Expected values from the formats' definitions: bf16 is the top half of a float32; f16 has 5
  // exponent bits (bias 15) and 10 mantissa bits, denormals at 2^-24 steps.
  const std::vector<std::uint16_t> bf16 = {0x3F80, 0xC040, 0x0001, 0x7F7F, 0x8000, 0x3EAB};
  const std::vector<float> bf16_expected = {1.0f,
                                            -3.0f,
                                            std::ldexp(1.0f, -133),
                                            std::ldexp(255.0f, 120),
                                            -0.0f,
                                            std::ldexp(1.0f + 0x2B / 128.0f, -2)};
  const std::vector<std::uint16_t> f16 = {0x3C00, 0x0001, 0x7BFF, 0xC500, 0x03FF, 0x3555};
  const std::vector<float> f16_expected = {
      1.0f,  std::ldexp(1.0f, -24),    65504.0f,
      -5.0f, std::ldexp(1023.0f, -24), std::ldexp(1.0f + 0x155 / 1024.0f, -2)};
  const std::string header = R"({"b":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,12]},)"
                             R"("h":{"dtype":"F16","shape":[6],"data_offsets":[12,24]}})";
  Bytes data = u16_bytes(bf16);
  const Bytes f16_data = u16_bytes(f16);
  data.insert(data.end(), f16_data.begin(), f16_data.end());
  const auto reader = SafetensorsReader::from_memory(craft(header, data));
  const Matrix<float> b = reader.tensor("b");  // [2, 3]
  const Matrix<float> h = reader.tensor("h");  // [1, 6]
  for (int i = 0; i < 6; ++i) {
    EXPECT_EQ(bits_of(b.data()[i]), bits_of(bf16_expected[i])) << "bf16 element " << i;
    EXPECT_EQ(bits_of(h.data()[i]), bits_of(f16_expected[i])) << "f16 element " << i;
  }
}

// ---- every validation check --------------------------------------------------------------

TEST(SafetensorsValidation, FileShorterThanEightBytes) {
  for (std::size_t size = 0; size < 8; ++size) {
    EXPECT_REFUSED(Bytes(size, 0), "expected at least 8");
  }
}

TEST(SafetensorsValidation, HeaderLengthOverTheLimit) {
  EXPECT_REFUSED(craft(kOneTensor, f32_bytes({1, 2}), 100'000'001), "exceeds the limit");
  EXPECT_REFUSED(craft("{}", {}, std::numeric_limits<std::uint64_t>::max() - 1),
                 "exceeds the limit");
}

TEST(SafetensorsValidation, HeaderLengthPastTheEndOfTheFile) {
  EXPECT_REFUSED(craft("{}", {}, 3), "past the end");
  EXPECT_REFUSED(craft("{}", {}, 100'000'000), "past the end");
}

TEST(SafetensorsValidation, HeaderNotUtf8) {
  // A stray continuation byte, an overlong '/', a UTF-16 surrogate, a code point over U+10FFFF.
  for (const std::string bad :
       {"\x80", "\xC0\xAF", "\xED\xA0\x80", "\xF4\x90\x80\x80", "\xE2\x82"}) {
    const std::string header = "{\"w" + bad + "\":{}}";
    try {
      SafetensorsReader::from_memory(craft(header));
      ADD_FAILURE() << "accepted";
    } catch (const FormatError& error) {
      EXPECT_NE(std::string(error.what()).find("not valid UTF-8"), std::string::npos);
      EXPECT_EQ(error.offset(), 8 + 3);  // the first bad byte, counted from the file's start
    }
  }
  // Well-formed multi-byte names are fine.
  const std::string name = "\xC3\xA9\xE2\x82\xAC\xF0\x9F\x98\x80";
  const auto reader = SafetensorsReader::from_memory(
      craft("{\"" + name + "\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[0,4]}}",
            f32_bytes({1})));
  EXPECT_TRUE(reader.contains(name));
}

TEST(SafetensorsValidation, HeaderNotJson) {
  EXPECT_REFUSED(craft(R"({"w":)"), "not valid JSON");
  EXPECT_REFUSED(craft(R"({'w':1})"), "not valid JSON");
  // A number nlohmann cannot hold (found by the fuzzer: it throws out_of_range, not parse_error).
  EXPECT_REFUSED(craft(R"({"__metadata__":{"a":"b"},"w":42974.269e2974})"), "not valid JSON");
  EXPECT_REFUSED(craft(R"({"w":{"dtype":"F32","shape":[1e999],"data_offsets":[0,0]}})"),
                 "not valid JSON");
  // A NUL byte, which nlohmann alone takes for the end of its input.
  EXPECT_REFUSED(craft(std::string("{}\0\0", 4)), "NUL byte");
  EXPECT_REFUSED(craft(std::string("{}\0{\"w\":1}  ", 12)), "NUL byte");
  EXPECT_REFUSED(craft(std::string("{\"w\0\":1}", 8)), "NUL byte");
}

TEST(SafetensorsValidation, HeaderNotAnObject) {
  EXPECT_REFUSED(craft("[1,2]   "), "is a JSON array, expected an object");
  EXPECT_REFUSED(craft(R"("text")"), "is a JSON string, expected an object");
  EXPECT_REFUSED(craft("7"), "is a JSON number, expected an object");
}

TEST(SafetensorsValidation, HeaderNestedTooDeeply) {
  EXPECT_REFUSED(craft(R"({"w":{"dtype":"F32","shape":[[2]],"data_offsets":[0,8]}})"),
                 "deeper than 3 levels");
  EXPECT_REFUSED(craft(std::string(100000, '[') + std::string(100000, ']')),
                 "deeper than 3 levels");
}

TEST(SafetensorsValidation, EntryMissingAFieldOrWithAnUnknownOne) {
  const Bytes data = f32_bytes({1, 2});
  EXPECT_REFUSED(craft(R"({"w":{"shape":[2],"data_offsets":[0,8]}})", data), "no \"dtype\"");
  EXPECT_REFUSED(craft(R"({"w":{"dtype":"F32","data_offsets":[0,8]}})", data), "no \"shape\"");
  EXPECT_REFUSED(craft(R"({"w":{"dtype":"F32","shape":[2]}})", data), "no \"data_offsets\"");
  EXPECT_REFUSED(craft(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":1}})", data),
                 "unknown field \"x\"");
  EXPECT_REFUSED(craft(R"({"w":[1]})", data), "tensor 'w': entry is a JSON array");
  EXPECT_REFUSED(craft(R"({"w":{"dtype":5,"shape":[2],"data_offsets":[0,8]}})", data),
                 "dtype is a JSON number");
  EXPECT_REFUSED(craft(R"({"w":{"dtype":"F32","shape":2,"data_offsets":[0,8]}})", data),
                 "shape is a JSON number");
}

TEST(SafetensorsValidation, UnknownDtype) {
  EXPECT_REFUSED(
      craft(R"({"w":{"dtype":"F31","shape":[2],"data_offsets":[0,8]}})", f32_bytes({1, 2})),
      "tensor 'w': unknown dtype \"F31\"");
  EXPECT_REFUSED(
      craft(R"({"w":{"dtype":"f32","shape":[2],"data_offsets":[0,8]}})", f32_bytes({1, 2})),
      "unknown dtype");
}

TEST(SafetensorsValidation, ShapeEntriesNegativeOrNotIntegers) {
  const Bytes data = f32_bytes({1, 2});
  for (const std::string shape : {"[-2]", "[2.0]", "[2.5]", "[\"2\"]", "[true]", "[null]", "[2e0]",
                                  "[1,-1]", "[18446744073709551616]"}) {
    EXPECT_REFUSED(
        craft(R"({"w":{"dtype":"F32","shape":)" + shape + R"(,"data_offsets":[0,8]}})", data),
        "expected a non-negative integer");
  }
}

TEST(SafetensorsValidation, OffsetsNotContiguousFromZero) {
  const Bytes data = f32_bytes({1, 2, 3, 4});
  // A hole at the start, a hole between two tensors, an overlap.
  EXPECT_REFUSED(craft(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", data),
                 "leaves a hole");
  EXPECT_REFUSED(craft(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                       R"("b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
                       data),
                 "tensor 'b': leaves a hole");
  EXPECT_REFUSED(craft(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,12]},)"
                       R"("b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
                       f32_bytes({1, 2, 3})),
                 "overlaps the previous tensor");
  // The same range twice is an overlap too.
  EXPECT_REFUSED(craft(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                       R"("b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
                       f32_bytes({1, 2})),
                 "overlaps");
}

TEST(SafetensorsValidation, OffsetsMalformedOrBeginAfterEnd) {
  const Bytes data = f32_bytes({1, 2});
  EXPECT_REFUSED(craft(R"({"w":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", data),
                 "begin 8 > end 0");
  for (const std::string offsets :
       {"[0]", "[0,8,8]", "[-1,8]", "[0,8.0]", "\"0,8\"", "[0,\"8\"]"}) {
    EXPECT_REFUSED(
        craft(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":)" + offsets + "}}", data),
        "expected [begin, end] of non-negative integers");
  }
}

TEST(SafetensorsValidation, ByteLengthNotElementsTimesElementSize) {
  EXPECT_REFUSED(
      craft(R"({"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,12]}})", f32_bytes({1, 2, 3})),
      "span 12 bytes, expected 16");
  EXPECT_REFUSED(
      craft(R"({"w":{"dtype":"BF16","shape":[3],"data_offsets":[0,4]}})", u16_bytes({1, 2})),
      "span 4 bytes, expected 6");
}

TEST(SafetensorsValidation, HugeShapesOverflowCheckedNotWrapped) {
  // 2^32 * 2^32 elements wrap to 0 in 64 bits, 2^62 F32 elements to 0 bytes: both would match
  // an empty [0, 0) range if the products were not checked.
  EXPECT_REFUSED(craft(R"({"w":{"dtype":"F32","shape":[4294967296,4294967296],)"
                       R"("data_offsets":[0,0]}})"),
                 "more elements than 64 bits count");
  EXPECT_REFUSED(craft(R"({"w":{"dtype":"F32","shape":[4611686018427387904],)"
                       R"("data_offsets":[0,0]}})"),
                 "more bytes than 64 bits count");
  EXPECT_REFUSED(craft(R"({"w":{"dtype":"U8","shape":[9223372036854775808],)"
                       R"("data_offsets":[0,0]}})"),
                 "more elements than 64 bits count");
  // Consistent with its shape but far beyond the file.
  EXPECT_REFUSED(craft(R"({"w":{"dtype":"F32","shape":[1073741824,1024],)"
                       R"("data_offsets":[0,4398046511104]}})"),
                 "past the end");
}

TEST(SafetensorsValidation, TensorEndsPastTheEndOfTheFile) {
  EXPECT_REFUSED(craft(kOneTensor, f32_bytes({1})), "past the end of the 4 bytes of data");
}

TEST(SafetensorsValidation, TrailingBytesAfterTheLastTensor) {
  Bytes data = f32_bytes({1, 2});
  data.push_back(0);
  EXPECT_REFUSED(craft(kOneTensor, data), "1 trailing bytes");
  EXPECT_REFUSED(craft("{}", {0, 0, 0, 0}), "4 trailing bytes");
}

TEST(SafetensorsValidation, DuplicateNames) {
  // nlohmann alone would keep the second entry silently.
  EXPECT_REFUSED(craft(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                       R"("w":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
                       f32_bytes({1, 2, 3, 4})),
                 "tensor 'w': appears twice");
  EXPECT_REFUSED(craft(R"({"w":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
                       f32_bytes({1, 2})),
                 "'dtype' twice");
  EXPECT_REFUSED(craft(R"({"__metadata__":{"a":"x"},"__metadata__":{"a":"y"}})"), "twice");
  EXPECT_REFUSED(craft(R"({"__metadata__":{"a":"x","a":"y"}})"), "'a' twice");
}

TEST(SafetensorsValidation, MetadataNotStrings) {
  EXPECT_REFUSED(craft(R"({"__metadata__":{"format":"pt","step":3}})"),
                 "value of 'step' is a JSON number, expected a string");
  EXPECT_REFUSED(craft(R"({"__metadata__":{"a":null}})"), "expected a string");
  EXPECT_REFUSED(craft(R"({"__metadata__":["pt"]})"), "__metadata__ is a JSON array");
}

TEST(SafetensorsValidation, NonFiniteWeightsRefusedByDefault) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  const std::string header = R"({"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},)"
                             R"("b":{"dtype":"BF16","shape":[2],"data_offsets":[16,20]},)"
                             R"("c":{"dtype":"F16","shape":[2],"data_offsets":[20,24]}})";
  Bytes data = f32_bytes({1, 2, 3, nan});
  for (const Bytes& more : {u16_bytes({0x3F80, 0xFF80}), u16_bytes({0x7C00, 0x3C00})}) {
    data.insert(data.end(), more.begin(), more.end());
  }
  const auto reader = SafetensorsReader::from_memory(craft(header, data), "weights.safetensors");
  const std::int64_t start = 8 + static_cast<std::int64_t>(header.size());
  const std::vector<std::pair<std::string, std::int64_t>> cases = {
      {"a", start + 12}, {"b", start + 16 + 2}, {"c", start + 20}};
  for (const auto& [name, offset] : cases) {
    try {
      reader.tensor(name);
      ADD_FAILURE() << name << " accepted";
    } catch (const FormatError& error) {
      EXPECT_EQ(error.tensor(), name);
      EXPECT_EQ(error.offset(), offset) << error.what();
      EXPECT_NE(std::string(error.what()).find("weights.safetensors: tensor '" + name + "'"),
                std::string::npos)
          << error.what();
    }
  }
  EXPECT_TRUE(std::isnan(reader.tensor("a", Finite::kAllow)(1, 1)));
  EXPECT_EQ(reader.tensor("b", Finite::kAllow)(0, 1), -inf);
  EXPECT_EQ(reader.tensor("c", Finite::kAllow)(0, 0), inf);
}

TEST(SafetensorsValidation, MatrixReadsNeedRankAtMostTwoAndAFloatDtype) {
  const std::string header = R"({"t":{"dtype":"F32","shape":[2,1,2],"data_offsets":[0,16]},)"
                             R"("i":{"dtype":"I32","shape":[1],"data_offsets":[16,20]}})";
  const auto reader = SafetensorsReader::from_memory(craft(header, f32_bytes({1, 2, 3, 4, 5})));
  EXPECT_EQ(reader.shape("t"), (std::vector<std::int64_t>{2, 1, 2}));
  EXPECT_EQ(reader.dtype("i"), "I32");
  EXPECT_THROW(
      {
        try {
          reader.tensor("t");
        } catch (const FormatError& error) {
          EXPECT_NE(std::string(error.what()).find("rank 3 (shape [2, 1, 2])"), std::string::npos);
          throw;
        }
      },
      FormatError);
  EXPECT_THROW(reader.tensor("i"), FormatError);
  EXPECT_THROW(reader.tensor("absent"), std::invalid_argument);
  EXPECT_THROW(reader.shape("absent"), std::invalid_argument);
}

TEST_F(TempDir, ErrorsFromFilesNameThePath) {
  put("broken.safetensors", craft(kOneTensor, f32_bytes({1, 2, 3})));
  try {
    SafetensorsReader reader(path("broken.safetensors"));
    ADD_FAILURE() << "accepted";
  } catch (const FormatError& error) {
    EXPECT_EQ(error.path(), path("broken.safetensors"));
    EXPECT_NE(std::string(error.what()).find(path("broken.safetensors")), std::string::npos);
  }
  EXPECT_THROW(SafetensorsReader(path("missing.safetensors")), IoError);
  EXPECT_THROW(SafetensorsReader(dir_.string()), IoError);
  put("good.safetensors", craft(kOneTensor, f32_bytes({1, 2})));
  EXPECT_EQ(SafetensorsReader(path("good.safetensors")).tensor("w")(0, 1), 2.0f);
}

// ---- writer -------------------------------------------------------------------------------

TEST(SafetensorsWriter, LayoutIsTheReferenceOne) {
  SafetensorsWriter writer;
  Matrix<float> a(1, 3);  // [1, 3]
  a << 1, 2, 3;
  Matrix<float> b(2, 1);  // [2, 1]
  b << 4, 5;
  Matrix<float> c(1, 1);  // [1, 1]
  c << 6;
  writer.add("b_f32", b);
  writer.add("a_bf16", a, "BF16");
  writer.add("c_f16", a, "F16");
  writer.add("a_f32", c, "F32", {});
  writer.set_metadata("step", "7");
  const Bytes file = writer.serialize();

  std::uint64_t length = 0;
  for (int i = 7; i >= 0; --i) length = (length << 8) | file[i];
  ASSERT_LE(8 + length, file.size());
  EXPECT_EQ(length % 8, 0u);
  const std::string text(file.begin() + 8, file.begin() + 8 + static_cast<long>(length));
  const std::size_t end = text.find_last_not_of(' ');
  EXPECT_EQ(text[end], '}');
  EXPECT_LT(text.size() - end - 1, 8u);  // padded with fewer than 8 spaces
  const auto header = nlohmann::json::parse(text);
  EXPECT_EQ(header["__metadata__"], (nlohmann::json{{"format", "pt"}, {"step", "7"}}));
  // F32 (largest alignment) first, by name; then BF16, then F16 (the reference's dtype order).
  EXPECT_EQ(header["a_f32"]["data_offsets"], (nlohmann::json{0, 4}));
  EXPECT_EQ(header["a_f32"]["shape"], nlohmann::json::array());
  EXPECT_EQ(header["b_f32"]["data_offsets"], (nlohmann::json{4, 12}));
  EXPECT_EQ(header["b_f32"]["shape"], (nlohmann::json{2, 1}));
  EXPECT_EQ(header["a_bf16"]["data_offsets"], (nlohmann::json{12, 18}));
  EXPECT_EQ(header["c_f16"]["data_offsets"], (nlohmann::json{18, 24}));
  EXPECT_EQ(header["c_f16"]["dtype"], "F16");
  ASSERT_EQ(file.size(), 8 + length + 24);
  const unsigned char* data = file.data() + 8 + length;
  EXPECT_EQ(Bytes(data, data + 12), f32_bytes({6, 4, 5}));
  EXPECT_EQ(Bytes(data + 12, data + 18), u16_bytes({0x3F80, 0x4000, 0x4040}));
  EXPECT_EQ(Bytes(data + 18, data + 24), u16_bytes({0x3C00, 0x4000, 0x4200}));
}

TEST(SafetensorsWriter, RoundsToNearestEven) {
  // bf16 keeps 7 mantissa bits: 1 + 2^-8 is halfway between 1 and 1 + 2^-7 and goes to the even
  // 1 (0x3F80); 1 + 3 * 2^-8 is halfway between 0x3F81 and 0x3F82 and goes to 0x3F82; anything
  // above halfway rounds up. f16 keeps 10 bits: 1 + 2^-11 -> 1 (0x3C00), 1 + 3 * 2^-11 ->
  // 0x3C02, 65519 -> 65504 (0x7BFF), 2^-25 (half the smallest denormal) -> 0.
  Matrix<float> x(1, 4);  // [1, 4]
  x << 1 + std::ldexp(1.0f, -8), 1 + 3 * std::ldexp(1.0f, -8),
      1 + std::ldexp(1.0f, -8) + std::ldexp(1.0f, -20), -(1 + 3 * std::ldexp(1.0f, -8));
  Matrix<float> y(1, 4);  // [1, 4]
  y << 1 + std::ldexp(1.0f, -11), 1 + 3 * std::ldexp(1.0f, -11), 65519.0f, std::ldexp(1.0f, -25);
  SafetensorsWriter writer;
  writer.add("x", x, "BF16");
  writer.add("y", y, "F16");
  const Bytes file = writer.serialize();
  const auto reader = SafetensorsReader::from_memory(file);
  const auto [xb, xe] = reader.file_offsets("x");
  EXPECT_EQ(Bytes(file.begin() + static_cast<long>(xb), file.begin() + static_cast<long>(xe)),
            u16_bytes({0x3F80, 0x3F82, 0x3F81, 0xBF82}));
  const auto [yb, ye] = reader.file_offsets("y");
  EXPECT_EQ(Bytes(file.begin() + static_cast<long>(yb), file.begin() + static_cast<long>(ye)),
            u16_bytes({0x3C00, 0x3C02, 0x7BFF, 0x0000}));
}

TEST(SafetensorsWriter, RoundTripsRandomValues) {
  std::mt19937 random(12);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  Matrix<float> big(37, 19);  // [37, 19]
  for (Eigen::Index i = 0; i < big.size(); ++i) big.data()[i] = normal(random);
  big(0, 0) = -0.0f;
  big(0, 1) = std::numeric_limits<float>::denorm_min();
  big(0, 2) = std::numeric_limits<float>::max();
  SafetensorsWriter writer;
  writer.add("f32", big);
  writer.add("bf16", big.block(1, 2, 30, 10), "BF16");  // a strided view
  writer.add("vector", big.row(3), "F32", {19});
  const auto reader = SafetensorsReader::from_memory(writer.serialize());
  const Matrix<float> f32 = reader.tensor("f32");
  ASSERT_EQ(f32.rows(), 37);
  for (Eigen::Index i = 0; i < big.size(); ++i) {
    ASSERT_EQ(bits_of(f32.data()[i]), bits_of(big.data()[i])) << i;
  }
  // bf16: round to nearest even on the float32 bits (no NaN among the inputs).
  const Matrix<float> bf16 = reader.tensor("bf16");
  for (int r = 0; r < 30; ++r) {
    for (int c = 0; c < 10; ++c) {
      const std::uint32_t b = bits_of(big(1 + r, 2 + c));
      const std::uint32_t rounded = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16;
      ASSERT_EQ(bits_of(bf16(r, c)), rounded) << r << ", " << c;
    }
  }
  EXPECT_EQ(reader.shape("vector"), (std::vector<std::int64_t>{19}));
  EXPECT_EQ(reader.tensor("vector"), big.row(3));
}

TEST(SafetensorsWriter, RefusesBadArguments) {
  SafetensorsWriter writer;
  const Matrix<float> x = Matrix<float>::Ones(2, 2);  // [2, 2]
  writer.add("w", x);
  EXPECT_THROW(writer.add("w", x), std::invalid_argument);
  EXPECT_THROW(writer.add("", x), std::invalid_argument);
  EXPECT_THROW(writer.add("__metadata__", x), std::invalid_argument);
  EXPECT_THROW(writer.add("bad\xFF", x), std::invalid_argument);
  EXPECT_THROW(writer.add("v", x, "F64"), std::invalid_argument);
  EXPECT_THROW(writer.add("v", x, "F32", {3}), std::invalid_argument);
  EXPECT_THROW(writer.add("v", x, "F32", {-2, -2}), std::invalid_argument);
  Matrix<float> large(1, 2);  // [1, 2]
  large << 1.0f, 65520.0f;    // rounds to infinity as F16
  EXPECT_THROW(writer.add("v", large, "F16"), std::invalid_argument);
  large << 1.0f, std::numeric_limits<float>::max();
  EXPECT_THROW(writer.add("v", large, "BF16"), std::invalid_argument);
  EXPECT_FALSE(writer.contains("v"));  // a refused add adds nothing
  EXPECT_THROW(writer.set_metadata("k", "\xC0\xAF"), std::invalid_argument);
  const auto reader = SafetensorsReader::from_memory(writer.serialize());
  EXPECT_EQ(reader.names(), (std::vector<std::string>{"w"}));
}

TEST_F(TempDir, WriteReplacesTheFileAndLeavesNoTemporary) {
  SafetensorsWriter first;
  first.add("w", Matrix<float>::Constant(2, 2, 1.0f));
  first.write(path("model.safetensors"));
  SafetensorsWriter second;
  second.add("w", Matrix<float>::Constant(3, 1, 2.0f));
  second.write(path("model.safetensors"));
  EXPECT_EQ(listing(), (std::vector<std::string>{"model.safetensors"}));
  const SafetensorsReader reader(path("model.safetensors"));
  EXPECT_EQ(reader.tensor("w"), Matrix<float>::Constant(3, 1, 2.0f));
  EXPECT_EQ(reader.metadata().at("format"), "pt");
}

TEST_F(TempDir, FailedWritesThrowAndLeaveNothingBehind) {
  SafetensorsWriter writer;
  writer.add("w", Matrix<float>::Ones(4, 4));
  EXPECT_THROW(writer.write(path("no/such/folder/model.safetensors")), IoError);
  // The rename fails when the destination is a non-empty folder: the temporary must go.
  fs::create_directories(path("taken/inside"));
  EXPECT_THROW(writer.write(path("taken")), IoError);
  EXPECT_EQ(listing(), (std::vector<std::string>{"taken"}));
}

TEST_F(TempDir, FullDiskMidWriteKeepsThePreviousFile) {
  // RLIMIT_FSIZE makes write() fail with EFBIG past the limit, as a full disk does with ENOSPC.
  // The test runs in its own process (ctest runs each test alone), so the limit touches no other.
  SafetensorsWriter small;
  small.add("w", Matrix<float>::Constant(2, 2, 3.0f));
  small.write(path("model.safetensors"));
  const Bytes before = get("model.safetensors");

  SafetensorsWriter large;
  large.add("w", Matrix<float>::Ones(256, 256));  // 256 KiB
  const auto previous_handler = std::signal(SIGXFSZ, SIG_IGN);
  rlimit saved;
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &saved), 0);
  rlimit limited = saved;
  limited.rlim_cur = 64 * 1024;
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &limited), 0);
  bool threw = false;
  try {
    large.write(path("model.safetensors"));
  } catch (const IoError& error) {
    threw = true;
    EXPECT_NE(std::string(error.what()).find("writing"), std::string::npos) << error.what();
  }
  ::setrlimit(RLIMIT_FSIZE, &saved);
  std::signal(SIGXFSZ, previous_handler);
  EXPECT_TRUE(threw);
  EXPECT_EQ(listing(), (std::vector<std::string>{"model.safetensors"}));
  EXPECT_EQ(get("model.safetensors"), before);
}

}  // namespace
