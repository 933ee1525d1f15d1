// What paper.sh relies on in switch_lm: the directory loader (licence texts), summary.json written
// and parsed back, the router-entropy and loss-spike statistics, and the new options' checks.

#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "feed_forward.hpp"
#include "options.hpp"
#include "report.hpp"
#include "text_data.hpp"

namespace switch_lm {
namespace {

namespace fs = std::filesystem;

fs::path fresh_dir(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / ("switch_lm_paper_" + name);
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

void write(const fs::path& path, const std::string& text) { std::ofstream(path) << text; }

TEST(LoadTextPath, DirectoryIsItsRegularFilesInNameOrderWithoutLinks) {
  const fs::path dir = fresh_dir("dir");
  write(dir / "b", "BBBBBBBBBB");  // 10 bytes
  write(dir / "a", "AAAAAAAAAA");
  write(dir / ".hidden", "HHHHHHHHHH");
  fs::create_symlink(dir / "a", dir / "alias");  // like common-licenses' GPL -> GPL-3
  const TextData data = load_text_path(dir.string());
  // "AAAAAAAAAABBBBBBBBBB": the last 10% (2 bytes) is validation.
  EXPECT_EQ(std::string(data.train.begin(), data.train.end()), "AAAAAAAAAABBBBBBBB");
  EXPECT_EQ(std::string(data.valid.begin(), data.valid.end()), "BB");
  EXPECT_NE(data.source.find("2 files"), std::string::npos) << data.source;
}

TEST(LoadTextPath, AFileIsLoadedAsBeforeAndAnEmptyDirectoryIsAnError) {
  const fs::path dir = fresh_dir("file");
  write(dir / "t", std::string(100, 'x'));
  EXPECT_EQ(load_text_path((dir / "t").string()).valid.size(), 10u);
  const fs::path empty = fresh_dir("empty");
  try {
    load_text_path(empty.string());
    FAIL() << "an empty directory was accepted";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find(empty.string()), std::string::npos) << e.what();
  }
}

TEST(LoadTextPath, TheLicenceTextsAreThere) {
  // paper.sh's fine-tuning text (Debian base-files): several licences, the aliases once.
  const std::string dir = "/usr/share/common-licenses";
  if (!fs::is_directory(dir)) GTEST_SKIP() << dir << " not present";
  const TextData data = load_text_path(dir);
  std::size_t expected = 0;
  for (const auto& e : fs::directory_iterator(dir))
    if (!e.is_symlink() && e.is_regular_file()) expected += fs::file_size(e.path());
  EXPECT_EQ(data.train.size() + data.valid.size(), expected);
  EXPECT_GT(data.valid.size(), 1000u);
}

TEST(Summary, WrittenAndParsedBack) {
  RunSummary r;
  r.name = "switch";
  r.parameters = 1220736;
  r.active_parameters = 237696;
  r.flops_per_token = 495616.0;
  r.final_valid_bits = 2.375;
  r.tokens_per_second = 41000.5;
  r.train_seconds = 150.25;
  r.steps = 2000;
  r.dropped_fraction = 0.0625;
  r.router_entropy = 2.5;
  r.loss_spikes = 3;
  r.max_train_bits = 4.75;
  r.finite = false;
  r.curve = {{0, 0.0, 0.0, 0.0, 8.0}, {100, 204800.0, 5.5, 4.0, 3.5}};
  const fs::path dir = fresh_dir("summary");
  const std::string path = (dir / "summary.json").string();
  write_summary(path, {{"steps", 2000}}, {r}, {{"headline", {{"target_bits", 2.5}}}});
  std::ifstream in(path);
  const nlohmann::json j = nlohmann::json::parse(in);
  EXPECT_EQ(j.at("options").at("steps"), 2000);
  EXPECT_EQ(j.at("headline").at("target_bits"), 2.5);
  EXPECT_EQ(j.at("runs").at(0).at("initial_valid_bits"), 8.0);
  const RunSummary back = summary_from_json(j.at("runs").at(0));
  EXPECT_EQ(back.name, r.name);
  EXPECT_EQ(back.parameters, r.parameters);
  EXPECT_EQ(back.active_parameters, r.active_parameters);
  EXPECT_EQ(back.final_valid_bits, r.final_valid_bits);
  EXPECT_EQ(back.tokens_per_second, r.tokens_per_second);
  EXPECT_EQ(back.train_seconds, r.train_seconds);
  EXPECT_EQ(back.steps, r.steps);
  EXPECT_EQ(back.dropped_fraction, r.dropped_fraction);
  EXPECT_EQ(back.router_entropy, r.router_entropy);
  EXPECT_EQ(back.loss_spikes, r.loss_spikes);
  EXPECT_EQ(back.max_train_bits, r.max_train_bits);
  EXPECT_EQ(back.finite, r.finite);
  ASSERT_EQ(back.curve.size(), 2u);
  EXPECT_EQ(back.curve[1].step, 100);
  EXPECT_EQ(back.curve[1].tokens, 204800.0);
  EXPECT_EQ(back.curve[1].valid_bits, 3.5);
  EXPECT_FALSE(fs::exists(path + ".tmp"));
}

TEST(RouterEntropy, HandComputedRows) {
  switchmoe::Matrix<float> p(2, 4);  // [tokens, experts]
  p << 0.25f, 0.25f, 0.25f, 0.25f,   // uniform: log 4
      1.0f, 0.0f, 0.0f, 0.0f;        // one-hot: 0
  EXPECT_NEAR(FeedForward<switchmoe::Fp32>::mean_entropy(p), std::log(4.0) / 2.0, 1e-6);
  switchmoe::Matrix<float> q(1, 2);
  q << 0.5f, 0.5f;
  EXPECT_NEAR(FeedForward<switchmoe::Fp32>::mean_entropy(q), std::log(2.0), 1e-6);
}

TEST(TrainingStats, CountsSpikesAboveTheRunningMeanAfterWarmup) {
  TrainingStats s;
  for (int step = 1; step <= 100; ++step) s.add_step(step, 10, 3.0);
  EXPECT_EQ(s.loss_spikes, 0);
  s.add_step(101, 10, 3.0 + TrainingStats::kSpikeBits + 0.05);  // a spike
  s.add_step(102, 10, 3.2);                                     // within 0.3 of the mean
  EXPECT_EQ(s.loss_spikes, 1);
  EXPECT_NEAR(s.max_train_bits, 3.35, 1e-12);
  EXPECT_TRUE(s.finite);
  s.add_step(103, 10, std::nan(""));
  EXPECT_FALSE(s.finite);
}

Options parse(std::vector<std::string> args) {
  args.insert(args.begin(), "switch_lm");
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  return parse_options(static_cast<int>(argv.size()), argv.data());
}

std::string parse_error(std::vector<std::string> args) {
  try {
    parse(std::move(args));
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "";
}

TEST(PaperOptions, ParsedAndChecked) {
  const Options o =
      parse({"--top-k", "2", "--dropless", "--init-scale", "1.0", "--dropout", "0.1",
             "--expert-dropout", "0.4", "--only", "switch", "--precision", "bf16-router"});
  EXPECT_EQ(o.variant.top_k, 2);
  EXPECT_TRUE(o.variant.dropless);
  EXPECT_FLOAT_EQ(o.variant.init_scale, 1.0f);
  EXPECT_FLOAT_EQ(o.variant.dropout, 0.1f);
  EXPECT_FLOAT_EQ(o.variant.expert_dropout_or_default(), 0.4f);
  EXPECT_FLOAT_EQ(parse({"--dropout", "0.2"}).variant.expert_dropout_or_default(), 0.2f);
  EXPECT_EQ(o.only, "switch");
  EXPECT_EQ(o.precision, "bf16-router");
  EXPECT_NE(parse_error({"--only", "both"}).find("--only = 'both'"), std::string::npos);
  EXPECT_NE(parse_error({"--dropout", "1.5"}).find("--dropout"), std::string::npos);
  EXPECT_NE(parse_error({"--top-k", "3", "--experts", "2"}).find("--top-k = 3"), std::string::npos);
  EXPECT_NE(parse_error({"--distill", "--only", "dense"}).find("--distill"), std::string::npos);
  EXPECT_NE(parse_error({"--precision", "fp16"}).find("bf16-router"), std::string::npos);
}

}  // namespace
}  // namespace switch_lm
