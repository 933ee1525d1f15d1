// FeedForwardBank: E independent FFNs over contiguous row blocks (SEMANTICS 1, 11, 12, 13).
#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

#include "reference/expert_reference.hpp"
#include "support/random_weights.hpp"
#include "switchmoe/switchmoe.hpp"

namespace {

using switchmoe::Bf16;
using switchmoe::FeedForwardBank;
using switchmoe::FeedForwardConfig;
using switchmoe::Fp32;
using switchmoe::Gelu;
using switchmoe::Matrix;
using switchmoe::Mode;
using switchmoe::Relu;
using switchmoe_test::ref::MatD;
namespace ref = switchmoe_test::ref;

// Block e of the rows goes through FFN e only; empty blocks are fine.
template <class Act>
void blocks_match_reference(bool bias) {
  constexpr ref::Act kAct = std::is_same_v<Act, Gelu> ? ref::Act::kGelu : ref::Act::kRelu;
  SCOPED_TRACE(std::string(Act::name()) + (bias ? " bias" : ""));
  FeedForwardConfig cfg;
  cfg.num_ffns = 4;
  cfg.d_model = 5;
  cfg.d_ff = 9;
  cfg.bias = bias;
  FeedForwardBank<Fp32, Act> bank(cfg);
  std::mt19937 gen(4);
  switchmoe_test::randomize_experts(bank, 4, bias, gen);
  const std::vector<int> offsets = {0, 3, 3, 10, 11};  // expert 1 has no rows
  Matrix<float> xg(11, 5);
  ref::fill_uniform(xg, gen, -1, 1);
  Matrix<float> yg;
  bank.forward(xg, offsets, Mode::kEval, {}, yg);
  ASSERT_EQ(yg.rows(), 11);
  ASSERT_EQ(yg.cols(), 5);
  const MatD xd = ref::to_double(xg);
  for (int e = 0; e < 4; ++e) {
    const ref::Ffn f = ref::expert_of(bank, e, bias);
    for (int r = offsets[e]; r < offsets[e + 1]; ++r) {
      const auto row = ref::ffn_row(xd, r, f, kAct);
      for (int k = 0; k < 5; ++k) EXPECT_NEAR(yg(r, k), row[k], 2e-6) << "row " << r;
    }
  }
}

TEST(FeedForwardBank, BlocksMatchReference) {
  blocks_match_reference<Relu>(false);
  blocks_match_reference<Relu>(true);
  blocks_match_reference<Gelu>(false);
  blocks_match_reference<Gelu>(true);
}

// Dropout masks are named by row keys, not by row position: the same keys in another layout
// give the same per-row output; in evaluation there is no dropout.
TEST(FeedForwardBank, DropoutKeyedByRow) {
  FeedForwardConfig cfg;
  cfg.num_ffns = 1;
  cfg.d_model = cfg.d_ff = 24;
  cfg.dropout = 0.5f;
  cfg.seed = 12;
  FeedForwardBank<Fp32, Relu> a(cfg), b(cfg);
  a.w_in(0).setIdentity();
  a.w_out(0).setIdentity();
  b.w_in(0).setIdentity();
  b.w_out(0).setIdentity();
  Matrix<float> x = Matrix<float>::Constant(3, 24, 1.0f);
  Matrix<float> ya, yb;
  a.forward(x, {0, 3}, Mode::kTrain, {7, 8, 9}, ya);
  b.forward(x, {0, 3}, Mode::kTrain, {9, 7, 8}, yb);
  EXPECT_EQ(ya.row(0), yb.row(1));
  EXPECT_EQ(ya.row(1), yb.row(2));
  EXPECT_EQ(ya.row(2), yb.row(0));
  EXPECT_NE(ya.row(0), ya.row(1));
  for (int i = 0; i < ya.size(); ++i)
    EXPECT_TRUE(ya.data()[i] == 0.0f || ya.data()[i] == 2.0f) << ya.data()[i];
  Matrix<float> ye;
  a.forward(x, {0, 3}, Mode::kEval, {7, 8, 9}, ye);
  EXPECT_EQ(ye, x);
}

// Gradients of sum(dyg .* yg) by central differences, with an empty block (whose gradients
// must stay exactly zero). GELU (smooth); tolerance as in gradient_test.cpp.
TEST(FeedForwardBank, BackwardMatchesFiniteDifferences) {
  FeedForwardConfig cfg;
  cfg.num_ffns = 3;
  cfg.d_model = 4;
  cfg.d_ff = 6;
  cfg.bias = true;
  FeedForwardBank<Fp32, Gelu> bank(cfg);
  std::mt19937 gen(6);
  switchmoe_test::randomize_experts(bank, 3, true, gen);
  const std::vector<int> offsets = {0, 4, 4, 7};
  Matrix<float> xg(7, 4), dyg(7, 4);
  ref::fill_uniform(xg, gen, -1, 1);
  ref::fill_uniform(dyg, gen, -1, 1);
  auto loss = [&] {
    Matrix<float> yg;
    bank.forward(xg, offsets, Mode::kTrain, {}, yg);
    double l = 0;
    for (int i = 0; i < yg.size(); ++i) l += double(dyg.data()[i]) * yg.data()[i];
    return l;
  };
  const double h = 5e-3;
  auto fd = [&](float& v) {
    const float s = v;
    v = float(s + h);
    const double lp = loss();
    v = float(s - h);
    const double lm = loss();
    v = s;
    return (lp - lm) / (2 * h);
  };
  std::vector<switchmoe::ParameterRef> params;
  bank.append_parameters("e.", false, params);
  std::vector<MatD> numeric;
  for (auto& p : params) {
    MatD n(p.value->rows(), p.value->cols());
    for (int i = 0; i < p.value->size(); ++i) n.data()[i] = fd(p.value->data()[i]);
    numeric.push_back(n);
  }
  MatD numeric_x(7, 4);
  for (int i = 0; i < xg.size(); ++i) numeric_x.data()[i] = fd(xg.data()[i]);
  bank.zero_grad();
  Matrix<float> yg, dxg;
  bank.forward(xg, offsets, Mode::kTrain, {}, yg);
  bank.backward(xg, offsets, dyg, dxg);
  for (std::size_t p = 0; p < params.size(); ++p)
    for (int i = 0; i < params[p].grad->size(); ++i) {
      const double an = params[p].grad->data()[i];
      EXPECT_NEAR(an, numeric[p].data()[i], 5e-4 + 2e-3 * std::abs(an)) << params[p].name << i;
    }
  for (int i = 0; i < xg.size(); ++i)
    EXPECT_NEAR(dxg.data()[i], numeric_x.data()[i], 5e-4 + 2e-3 * std::abs(dxg.data()[i]));
  EXPECT_TRUE((bank.grad_w_in(1).array() == 0.0f).all());
  EXPECT_TRUE((bank.grad_w_out(1).array() == 0.0f).all());
  EXPECT_TRUE((bank.grad_b_in(1).array() == 0.0f).all());
  EXPECT_TRUE((bank.grad_b_out(1).array() == 0.0f).all());
}

// Bf16 compute copies follow the float32 masters after every edit.
TEST(FeedForwardBank, Bf16CopiesFollowEdits) {
  FeedForwardConfig cfg;
  cfg.num_ffns = 2;
  cfg.d_model = 2;
  cfg.d_ff = 2;
  FeedForwardBank<Bf16, Relu> bank(cfg);
  for (int e = 0; e < 2; ++e) {
    bank.w_in(e).setIdentity();
    bank.w_out(e).setIdentity();
  }
  Matrix<Eigen::bfloat16> x = Matrix<float>::Constant(2, 2, 1.0f).cast<Eigen::bfloat16>();
  Matrix<float> y;
  bank.forward(x, {0, 1, 2}, Mode::kEval, {}, y);
  EXPECT_EQ(y, Matrix<float>::Ones(2, 2));
  bank.w_out(1) *= 3.0f;
  bank.forward(x, {0, 1, 2}, Mode::kEval, {}, y);
  EXPECT_EQ(y.row(0), Matrix<float>::Ones(1, 2));
  EXPECT_EQ(y.row(1), Matrix<float>::Constant(1, 2, 3.0f));
}

// ParameterRef (core/parameter.hpp): "Writing through `value` takes effect on the layer's next
// forward call" -- also for a ParameterRef kept across forward calls, as optimizers do.
TEST(FeedForwardBank, Bf16CopiesFollowCachedParameterRefEdits) {
  FeedForwardConfig cfg;
  cfg.num_ffns = 2;
  cfg.d_model = 2;
  cfg.d_ff = 2;
  FeedForwardBank<Bf16, Relu> bank(cfg);
  for (int e = 0; e < 2; ++e) {
    bank.w_in(e).setIdentity();
    bank.w_out(e).setIdentity();
  }
  Matrix<Eigen::bfloat16> x = Matrix<float>::Constant(2, 2, 1.0f).cast<Eigen::bfloat16>();
  Matrix<float> y;
  std::vector<switchmoe::ParameterRef> params;
  bank.append_parameters("e.", false, params);
  bank.forward(x, {0, 1, 2}, Mode::kEval, {}, y);
  for (auto& p : params)
    if (p.name == "e.0.w_in") *p.value *= 2.0f;
  bank.forward(x, {0, 1, 2}, Mode::kEval, {}, y);
  EXPECT_EQ(y.row(0), Matrix<float>::Constant(1, 2, 2.0f)) << "cached ParameterRef edit ignored";
}

TEST(FeedForwardBank, BadInput) {
  FeedForwardConfig cfg;
  cfg.num_ffns = 2;
  cfg.d_model = 3;
  cfg.d_ff = 4;
  FeedForwardBank<Fp32, Relu> bank(cfg);
  Matrix<float> x = Matrix<float>::Ones(4, 3), y;
  EXPECT_THROW(bank.forward(x, {0, 4}, Mode::kEval, {}, y), std::invalid_argument);
  EXPECT_THROW(bank.forward(x, {0, 2, 3}, Mode::kEval, {}, y), std::invalid_argument);
  EXPECT_THROW(bank.forward(Matrix<float>::Ones(4, 2), {0, 2, 4}, Mode::kEval, {}, y),
               std::invalid_argument);
  EXPECT_THROW(bank.w_in(2), std::invalid_argument);
  EXPECT_THROW(bank.w_out(-1), std::invalid_argument);
  Matrix<float> dx;
  EXPECT_THROW(bank.backward(x, {0, 2, 4}, Matrix<float>::Ones(4, 3), dx),
               std::invalid_argument);  // no training forward yet
  bank.forward(x, {0, 2, 4}, Mode::kTrain, {}, y);
  EXPECT_THROW(bank.backward(x, {0, 2, 4}, Matrix<float>::Ones(3, 3), dx), std::invalid_argument);
  cfg.dropout = 1.0f;
  EXPECT_THROW((FeedForwardBank<Fp32, Relu>(cfg)), std::invalid_argument);
}

}  // namespace
