// Gated experts (SEMANTICS 15): SwiGlu and GeGlu banks, layers and dense FFNs against the
// double-precision reference of tests/reference/variants_reference.hpp, finite-difference
// gradients, thread-count determinism and the gated-only accessors.
#include <gtest/gtest.h>
#include <omp.h>

#include <random>
#include <string>
#include <vector>

#include "support/allocation_counter.hpp"  // first: configures Eigen
// (kept apart so that include sorting leaves it first)

#include "reference/variants_reference.hpp"
#include "support/matrices.hpp"
#include "switchmoe/switchmoe.hpp"

namespace {

using switchmoe::Bf16;
using switchmoe::FeedForwardBank;
using switchmoe::FeedForwardConfig;
using switchmoe::Fp32;
using switchmoe::GeGlu;
using switchmoe::Matrix;
using switchmoe::Mode;
using switchmoe::SwiGlu;
using switchmoe_test::random_matrix;
using switchmoe_test::SameBits;
namespace vref = switchmoe_test::vref;
using vref::MatD;

template <class Act>
constexpr vref::Act kRefAct = std::is_same_v<Act, SwiGlu> ? vref::Act::kSilu : vref::Act::kGelu;

static_assert(switchmoe::is_gated_v<SwiGlu> && switchmoe::is_gated_v<GeGlu>);
static_assert(!switchmoe::is_gated_v<switchmoe::Relu> && !switchmoe::is_gated_v<switchmoe::Silu>);

template <class Bank>
vref::GatedFfn ffn_of(Bank& bank, int e, bool bias) {
  vref::GatedFfn f;
  f.w_gate = vref::to_double(bank.w_gate(e));
  f.w_in = vref::to_double(bank.w_in(e));
  f.w_out = vref::to_double(bank.w_out(e));
  if (bias) {
    f.b_gate = vref::to_double(bank.b_gate(e));
    f.b_in = vref::to_double(bank.b_in(e));
    f.b_out = vref::to_double(bank.b_out(e));
  }
  return f;
}

template <class Bank>
void randomize(Bank& bank, int n, bool bias, unsigned seed) {
  for (int e = 0; e < n; ++e) {
    const int d_model = static_cast<int>(bank.w_in(e).rows());
    const int d_ff = static_cast<int>(bank.w_in(e).cols());
    bank.w_gate(e) = random_matrix(d_model, d_ff, seed + 10 * e + 1, 0.4f);
    bank.w_in(e) = random_matrix(d_model, d_ff, seed + 10 * e + 2, 0.4f);
    bank.w_out(e) = random_matrix(d_ff, d_model, seed + 10 * e + 3, 0.3f);
    if (bias) {
      bank.b_gate(e) = random_matrix(1, d_ff, seed + 10 * e + 4, 0.3f);
      bank.b_in(e) = random_matrix(1, d_ff, seed + 10 * e + 5, 0.3f);
      bank.b_out(e) = random_matrix(1, d_model, seed + 10 * e + 6, 0.3f);
    }
  }
}

FeedForwardConfig bank_config(int n, int d_model, int d_ff, bool bias) {
  FeedForwardConfig cfg;
  cfg.num_ffns = n;
  cfg.d_model = d_model;
  cfg.d_ff = d_ff;
  cfg.bias = bias;
  return cfg;
}

// Blocks of rows (one empty) through their own gated FFN; d_ff 70 gives 140 fused columns, an
// odd number of 32-wide panels, so tiles split between pairs would show.
template <class Act>
void bank_matches_reference(bool bias) {
  SCOPED_TRACE(std::string(Act::name()) + (bias ? " bias" : ""));
  const int n = 3, d_model = 40, d_ff = 70;
  FeedForwardBank<Fp32, Act> bank(bank_config(n, d_model, d_ff, bias));
  randomize(bank, n, bias, 7);
  const std::vector<int> offsets = {0, 29, 29, 50};
  const Matrix<float> x = random_matrix(50, d_model, 3);
  for (int threads : {1, 3}) {
    omp_set_num_threads(threads);
    Matrix<float> y;
    bank.forward(x, offsets, Mode::kEval, {}, y);
    for (int e = 0; e < n; ++e) {
      const int rows = offsets[e + 1] - offsets[e];
      if (rows == 0) continue;
      const MatD expected = vref::gated_ffn(vref::to_double(x.middleRows(offsets[e], rows)),
                                            ffn_of(bank, e, bias), kRefAct<Act>);
      EXPECT_LT(vref::relative_error(vref::to_double(y.middleRows(offsets[e], rows)), expected),
                2e-5)
          << "expert " << e << " threads " << threads;
    }
  }
  omp_set_num_threads(2);
}

TEST(GatedBank, SwiGluMatchesReference) { bank_matches_reference<SwiGlu>(false); }
TEST(GatedBank, SwiGluWithBiasMatchesReference) { bank_matches_reference<SwiGlu>(true); }
TEST(GatedBank, GeGluMatchesReference) { bank_matches_reference<GeGlu>(false); }
TEST(GatedBank, GeGluWithBiasMatchesReference) { bank_matches_reference<GeGlu>(true); }

// act applies to x W_gate only: with W_gate != W_in the swapped formula is far from the result.
TEST(GatedBank, GateAndUpAreNotSwapped) {
  FeedForwardBank<Fp32, SwiGlu> bank(bank_config(1, 3, 2, false));
  bank.w_gate(0) << 2.0f, -1.0f, 0.5f, 1.0f, 0.0f, 3.0f;
  bank.w_in(0) << 0.1f, 0.2f, -0.3f, 0.4f, 0.5f, 0.6f;
  bank.w_out(0) << 1.0f, 0.0f, 0.0f, 0.0f, 1.0f, 0.0f;  // y[:, :2] = h
  Matrix<float> x(1, 3);
  x << 1.0f, -2.0f, 0.5f;
  Matrix<float> y;
  bank.forward(x, {0, 1}, Mode::kEval, {}, y);
  // Hand-computed: g = x W_gate = (2 - 1 + 0, -1 - 2 + 1.5) = (1, -1.5),
  // u = x W_in = (0.1 + 0.6 + 0.25, 0.2 - 0.8 + 0.3) = (0.95, -0.3).
  const double h0 = 1.0 * vref::sigmoid(1.0) * 0.95;
  const double h1 = -1.5 * vref::sigmoid(-1.5) * -0.3;
  EXPECT_NEAR(y(0, 0), h0, 1e-6);
  EXPECT_NEAR(y(0, 1), h1, 1e-6);
  EXPECT_NEAR(y(0, 2), 0.0, 1e-7);
  const double swapped1 = -0.3 * vref::sigmoid(-0.3) * -1.5;
  EXPECT_GT(std::abs(swapped1 - h1), 0.05);  // the case tells the two apart
}

// Finite differences of L = sum(dy .* y) in double, against the bank's backward (fp32).
template <class Act>
void bank_gradients(bool bias, float dropout) {
  SCOPED_TRACE(std::string(Act::name()) + (bias ? " bias" : "") + (dropout > 0 ? " dropout" : ""));
  const int n = 2, d_model = 6, d_ff = 5;
  FeedForwardConfig cfg = bank_config(n, d_model, d_ff, bias);
  cfg.dropout = dropout;
  FeedForwardBank<Fp32, Act> bank(cfg);
  randomize(bank, n, bias, 21);
  const std::vector<int> offsets = {0, 4, 7};
  const Matrix<float> x = random_matrix(7, d_model, 5);
  const Matrix<float> dy = random_matrix(7, d_model, 6);
  Matrix<float> y, dx;
  bank.forward(x, offsets, Mode::kTrain, {}, y);
  bank.backward(x, offsets, dy, dx);
  if (dropout > 0.0f) {
    // The mask is not visible here; the finite differences run without dropout. With it,
    // gradients must still be finite and flow.
    EXPECT_TRUE(bank.grad_w_gate(0).allFinite());
    EXPECT_GT(bank.grad_w_gate(0).cwiseAbs().maxCoeff(), 0.0f);
    return;
  }
  const MatD dyd = vref::to_double(dy);
  for (int e = 0; e < n; ++e) {
    vref::GatedFfn f = ffn_of(bank, e, bias);
    MatD xe = vref::to_double(x.middleRows(offsets[e], offsets[e + 1] - offsets[e]));
    const MatD dye = dyd.middleRows(offsets[e], offsets[e + 1] - offsets[e]);
    auto loss = [&] { return (vref::gated_ffn(xe, f, kRefAct<Act>).array() * dye.array()).sum(); };
    auto check = [&](MatD& param, const Matrix<float>& grad, const char* name) {
      const MatD fd = vref::finite_difference(loss, param);
      EXPECT_LT(vref::relative_error(vref::to_double(grad), fd), 1e-4) << name << " expert " << e;
    };
    check(f.w_gate, bank.grad_w_gate(e), "w_gate");
    check(f.w_in, bank.grad_w_in(e), "w_in");
    check(f.w_out, bank.grad_w_out(e), "w_out");
    if (bias) {
      check(f.b_gate, bank.grad_b_gate(e), "b_gate");
      check(f.b_in, bank.grad_b_in(e), "b_in");
      check(f.b_out, bank.grad_b_out(e), "b_out");
    }
    const Matrix<float> dxe = dx.middleRows(offsets[e], offsets[e + 1] - offsets[e]);
    check(xe, dxe, "x");
  }
}

TEST(GatedBank, SwiGluGradientsMatchFiniteDifferences) { bank_gradients<SwiGlu>(false, 0.0f); }
TEST(GatedBank, SwiGluBiasGradientsMatchFiniteDifferences) { bank_gradients<SwiGlu>(true, 0.0f); }
TEST(GatedBank, GeGluBiasGradientsMatchFiniteDifferences) { bank_gradients<GeGlu>(true, 0.0f); }
TEST(GatedBank, DropoutGradientsFlow) { bank_gradients<SwiGlu>(false, 0.3f); }

// bf16 experts: within bf16 rounding of the reference.
TEST(GatedBank, Bf16GeGluMatchesReference) {
  const int d_model = 32, d_ff = 48;
  FeedForwardBank<Bf16, GeGlu> bank(bank_config(1, d_model, d_ff, true));
  randomize(bank, 1, true, 9);
  const Matrix<float> x = random_matrix(20, d_model, 4);
  Matrix<float> y;
  bank.forward(x.cast<Eigen::bfloat16>(), {0, 20}, Mode::kEval, {}, y);
  const MatD expected =
      vref::gated_ffn(vref::to_double(x), ffn_of(bank, 0, true), vref::Act::kGelu);
  EXPECT_LT(vref::relative_error(vref::to_double(y), expected), 3e-2);
}

// Results bitwise independent of the thread count, forward and backward, with dropout.
TEST(GatedBank, ThreadCountDoesNotChangeBits) {
  const int n = 3, d_model = 48, d_ff = 80;
  const std::vector<int> offsets = {0, 37, 40, 90};
  const Matrix<float> x = random_matrix(90, d_model, 8);
  const Matrix<float> dy = random_matrix(90, d_model, 9);
  std::vector<Matrix<float>> ys, dxs, grads;
  for (int threads : {1, 2, 3}) {
    omp_set_num_threads(threads);
    FeedForwardConfig cfg = bank_config(n, d_model, d_ff, true);
    cfg.dropout = 0.2f;
    cfg.seed = 5;
    FeedForwardBank<Fp32, SwiGlu> bank(cfg);
    randomize(bank, n, true, 3);
    Matrix<float> y, dx;
    bank.forward(x, offsets, Mode::kTrain, {}, y);
    bank.backward(x, offsets, dy, dx);
    ys.push_back(y);
    dxs.push_back(dx);
    grads.push_back(bank.grad_w_gate(2));
  }
  omp_set_num_threads(2);
  for (int i = 1; i < 3; ++i) {
    EXPECT_TRUE(SameBits(ys[i], ys[0]));
    EXPECT_TRUE(SameBits(dxs[i], dxs[0]));
    EXPECT_TRUE(SameBits(grads[i], grads[0]));
  }
}

TEST(GatedBank, ParametersListGateFirst) {
  FeedForwardBank<Fp32, SwiGlu> bank(bank_config(2, 4, 3, true));
  std::vector<switchmoe::ParameterRef> params;
  bank.append_parameters("experts.", false, params);
  std::vector<std::string> names;
  for (const auto& p : params) names.push_back(p.name);
  const std::vector<std::string> expected = {
      "experts.0.w_gate", "experts.0.b_gate", "experts.0.w_in",   "experts.0.b_in",
      "experts.0.w_out",  "experts.0.b_out",  "experts.1.w_gate", "experts.1.b_gate",
      "experts.1.w_in",   "experts.1.b_in",   "experts.1.w_out",  "experts.1.b_out"};
  EXPECT_EQ(names, expected);
  EXPECT_EQ(params[0].role, switchmoe::ParameterRole::kWeight);
  EXPECT_EQ(params[1].role, switchmoe::ParameterRole::kBias);
  // W_gate is initialized (rule 11), and differently from W_in.
  EXPECT_GT(bank.w_gate(0).cwiseAbs().maxCoeff(), 0.0f);
  EXPECT_GT((bank.w_gate(0) - bank.w_in(0)).cwiseAbs().maxCoeff(), 0.0f);
}

TEST(GatedBank, UngatedBankHasNoGateMatrix) {
  FeedForwardBank<Fp32, switchmoe::Relu> bank(bank_config(1, 4, 3, false));
  try {
    bank.w_gate(0);
    FAIL() << "expected std::invalid_argument";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("w_gate"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("not gated"), std::string::npos) << e.what();
  }
  switchmoe::SwitchConfig config;
  config.d_model = 4;
  config.d_ff = 3;
  config.routing.num_experts = 2;
  switchmoe::SwitchLayer<Fp32> layer(config);
  EXPECT_THROW(layer.w_gate(0), std::invalid_argument);
  EXPECT_THROW(layer.grad_w_gate(1), std::invalid_argument);
  switchmoe::DenseFFN<Fp32, switchmoe::Gelu> dense({4, 3});
  EXPECT_THROW(dense.w_gate(), std::invalid_argument);
}

// The layer under a given routing: y = sum of gates times the reference gated experts.
template <class Policy, class Act>
void layer_matches_reference(double tolerance) {
  switchmoe::SwitchConfig config;
  config.d_model = 16;
  config.d_ff = 24;
  config.expert_bias = true;
  config.routing.num_experts = 4;
  config.routing.top_k = 2;
  config.routing.dropless = true;
  config.routing.renormalize = true;
  switchmoe::SwitchLayer<Policy, Act> layer(config);
  for (int e = 0; e < 4; ++e) {
    layer.b_gate(e) = random_matrix(1, 24, 40 + e, 0.2f);
    layer.b_in(e) = random_matrix(1, 24, 50 + e, 0.2f);
  }
  const Matrix<float> x = random_matrix(12, 16, 11);
  const switchmoe::SwitchOutput out = layer.forward(x, Mode::kEval);
  std::vector<MatD> expert_y;
  for (int e = 0; e < 4; ++e) {
    expert_y.push_back(vref::gated_ffn(vref::to_double(x), ffn_of(layer, e, true), kRefAct<Act>));
  }
  MatD expected = MatD::Zero(12, 16);
  for (int t = 0; t < 12; ++t) {
    for (int c = 0; c < 2; ++c) {
      expected.row(t) += out.routing.gate(t, c) * expert_y[out.routing.expert(t, c)].row(t);
    }
  }
  EXPECT_LT(vref::relative_error(vref::to_double(out.y), expected), tolerance);
}

TEST(GatedLayer, Fp32SwiGluMatchesReference) { layer_matches_reference<Fp32, SwiGlu>(2e-5); }
TEST(GatedLayer, Bf16GeGluMatchesReference) { layer_matches_reference<Bf16, GeGlu>(3e-2); }

TEST(GatedDense, SwiGluMatchesReference) {
  switchmoe::DenseFFN<Fp32, SwiGlu> dense({8, 20, true});
  dense.b_gate() = random_matrix(1, 20, 1, 0.2f);
  const Matrix<float> x = random_matrix(5, 8, 2);
  vref::GatedFfn f{vref::to_double(dense.w_gate()), vref::to_double(dense.w_in()),
                   vref::to_double(dense.w_out()),  vref::to_double(dense.b_gate()),
                   vref::to_double(dense.b_in()),   vref::to_double(dense.b_out())};
  EXPECT_LT(vref::relative_error(vref::to_double(dense.forward(x)),
                                 vref::gated_ffn(vref::to_double(x), f, vref::Act::kSilu)),
            2e-5);
  const Matrix<float> dy = random_matrix(5, 8, 3);
  dense.forward(x, Mode::kTrain);
  const Matrix<float> dx = dense.backward(dy);
  MatD xd = vref::to_double(x);
  auto loss = [&] {
    return (vref::gated_ffn(xd, f, vref::Act::kSilu).array() * vref::to_double(dy).array()).sum();
  };
  EXPECT_LT(vref::relative_error(vref::to_double(dense.grad_w_gate()),
                                 vref::finite_difference(loss, f.w_gate)),
            1e-4);
  EXPECT_LT(vref::relative_error(vref::to_double(dx), vref::finite_difference(loss, xd)), 1e-4);
}

// Steady state: a gated layer's forward and backward allocate nothing after warm-up.
TEST(GatedLayer, SteadyStateAllocatesNothing) {
  switchmoe::SwitchConfig config;
  config.d_model = 16;
  config.d_ff = 40;
  config.routing.num_experts = 4;
  config.expert_dropout = 0.1f;
  switchmoe::SwitchLayer<Fp32, SwiGlu> layer(config);
  switchmoe::SwitchOutput out;
  Matrix<float> dx;
  for (int call = 0; call < 6; ++call) {
    const Matrix<float> x = random_matrix(32, 16, 70 + call);
    const Matrix<float> dy = random_matrix(32, 16, 80 + call);
    const auto count = switchmoe_test::count_allocations([&] {
      layer.forward(x, Mode::kTrain, out);
      layer.backward(dy, dx);
    });
    if (call >= 3) EXPECT_EQ(count.total(), 0) << "call " << call;
  }
}

}  // namespace
