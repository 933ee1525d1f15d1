// Gradients of SwitchLayer and DenseFFN (issue #3, SEMANTICS 8-10, 12): backward(dy) against
// central finite differences of the forward pass, plus hand-worked analytic cases.
//
// The finite-difference loss is L = sum(dy .* y) + aux_coef * aux + z_coef * z, evaluated in
// double from the float32 outputs of forward(x, Mode::kTrain) with jitter_eps = 0 and
// expert_dropout = 0 (both would make the forward pass random). backward(dy) claims to return
// exactly dL/dx and to accumulate dL/dparameter.
//
// Step and tolerance. Every perturbed entry is an O(1) number (weights in [-0.6, 0.6] or
// [-1.5, 1.5], x and dy in [-1, 1]) and the step is h = 5e-3 absolute (about 1% relative).
//  * Rounding: the outputs not touched by a perturbation are computed bitwise identically in
//    both evaluations and cancel exactly in L(+h) - L(-h). The touched ones (at most
//    tokens * d_model = 64 outputs here, each O(1) with a d_ff- or d_model-long float32 dot
//    product, error ~ 2^-24 * sum|terms| ~ 1e-7 each, random in sign) change L by
//    ~ sqrt(64) * 1e-7 ~ 1e-6; divided by 2h = 1e-2 that is ~ 1e-4 (a fully coherent worst
//    case would be 8 times that, which rounding does not produce).
//  * Truncation: |L'''| h^2 / 6 with |L'''| = O(10) for these O(1) smooth maps is ~ 4e-5, and
//    relative to the gradient it is ~ h^2 ~ 2.5e-5.
// So |fd - analytic| <= 5e-4 + 2e-3 * |analytic| is used (measured errors are ~ 1e-5). A
// missing term (a gate factor, the aux or z term with the coefficients 0.2 / 0.1 used below, a
// dropped choice leaking gradient, a wrong activation derivative) changes entries by 1e-2 .. 1.
//
// Routing is piecewise constant: the test inputs are chosen (by a deterministic search over
// seeds) so that no routing decision is within the step of a tie: for every token the gaps
// between its k+1 largest logits exceed twice the largest logit change a single step can cause,
// and with router-probability priority, top-1 probabilities of tokens in one group differ by
// more than a step can move them (|dp| <= 0.5 max|dlogit|). Every perturbed forward is also
// checked to reproduce the unperturbed expert/slot matrices. ReLU kinks: an entry is skipped
// when its step could move a kept pre-activation across 0 (counted and bounded below).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "reference/expert_reference.hpp"
#include "support/random_weights.hpp"
#include "switchmoe/switchmoe.hpp"

namespace {

using switchmoe::DenseConfig;
using switchmoe::DenseFFN;
using switchmoe::Fp32;
using switchmoe::Gelu;
using switchmoe::Matrix;
using switchmoe::Mode;
using switchmoe::Priority;
using switchmoe::Relu;
using switchmoe::SwitchConfig;
using switchmoe::SwitchLayer;
using switchmoe_test::ref::MatD;
using switchmoe_test::ref::MatI;
namespace ref = switchmoe_test::ref;

constexpr double kStep = 5e-3;
constexpr double kAbsTol = 5e-4;
constexpr double kRelTol = 2e-3;

struct GradCase {
  std::string name;
  int tokens = 16, d_model = 4, d_ff = 6, experts = 3, top_k = 1;
  int group_size = 0, expert_capacity = 0;
  Priority priority = Priority::kTokenOrder;
  bool bias = false, router_bias = false, renormalize = false, dropless = false;
  float aux_coef = 0.2f, z_coef = 0.1f;
  unsigned seed = 1;
};

SwitchConfig config_of(const GradCase& c) {
  SwitchConfig cfg;
  cfg.d_model = c.d_model;
  cfg.d_ff = c.d_ff;
  cfg.routing.num_experts = c.experts;
  cfg.routing.top_k = c.top_k;
  cfg.routing.group_size = c.group_size;
  cfg.routing.expert_capacity = c.expert_capacity;
  cfg.routing.min_capacity = 1;
  cfg.routing.priority = c.priority;
  cfg.routing.renormalize = c.renormalize;
  cfg.routing.dropless = c.dropless;
  cfg.expert_bias = c.bias;
  cfg.router_bias = c.router_bias;
  cfg.aux_loss_coef = c.aux_coef;
  cfg.z_loss_coef = c.z_coef;
  cfg.jitter_eps = 0.0f;
  cfg.expert_dropout = 0.0f;
  cfg.seed = c.seed;
  return cfg;
}

template <class Out>
double loss_of(const Out& out, const Matrix<float>& dy, const GradCase& c) {
  double l = 0.0;
  for (int t = 0; t < dy.rows(); ++t)
    for (int j = 0; j < dy.cols(); ++j) l += static_cast<double>(dy(t, j)) * out.y(t, j);
  return l + c.aux_coef * static_cast<double>(out.routing.aux_loss) +
         c.z_coef * static_cast<double>(out.routing.z_loss);
}

// Largest change of any logit from one step on one entry of x, the router weight or its bias.
template <class Layer>
double max_logit_step(Layer& layer, const Matrix<float>& x) {
  double m = 1.0;  // router bias entries move a logit by exactly the step
  for (int i = 0; i < x.size(); ++i) m = std::max(m, std::abs(static_cast<double>(x.data()[i])));
  const Matrix<float>& w = layer.router_weight();
  for (int i = 0; i < w.size(); ++i) m = std::max(m, std::abs(static_cast<double>(w.data()[i])));
  return m * kStep;
}

// True if no routing decision is within a step of a tie (see the header comment).
template <class Out>
bool routing_has_margin(const Out& out, const GradCase& c, double dl) {
  const Matrix<float>& logits = out.routing.logits;
  const int depth = std::min(c.top_k + 1, c.experts);
  for (int t = 0; t < logits.rows(); ++t) {
    std::vector<double> v(logits.row(t).data(), logits.row(t).data() + c.experts);
    std::sort(v.begin(), v.end(), std::greater<double>());
    for (int i = 0; i + 1 < depth; ++i)
      if (v[i] - v[i + 1] < 2.5 * dl) return false;
  }
  if (c.priority == Priority::kRouterProbability) {
    const int g = c.group_size > 0 ? c.group_size : c.tokens;
    for (int first = 0; first < c.tokens; first += g) {
      std::vector<double> top1;
      for (int t = first; t < first + g; ++t)
        top1.push_back(out.routing.probs(t, out.routing.expert(t, 0)));
      std::sort(top1.begin(), top1.end());
      for (std::size_t i = 0; i + 1 < top1.size(); ++i)
        if (top1[i + 1] - top1[i] < 1.25 * dl) return false;
    }
  }
  return true;
}

// Pre-activations of the kept (token, expert) pairs, used to skip entries whose step could move
// a pre-activation across the ReLU kink: a step h on w_in(e)(i, j) moves pre[e][t][j] by
// x(t, i) h, on x(t, i) by w_in(e)(i, j) h, on b_in(e)(j) by h.
struct KinkGuard {
  bool active = false;
  MatD x;                                             // [tokens, d_model]
  std::vector<MatD> w_in;                             // [expert] [d_model, d_ff]
  std::vector<std::vector<std::vector<double>>> pre;  // [expert][token][unit], NaN if not kept
};

template <class Layer, class Out>
KinkGuard kink_guard(Layer& layer, const Out& out, const Matrix<float>& x, const GradCase& c,
                     bool relu) {
  KinkGuard g;
  g.active = relu;
  if (!relu) return g;
  g.x = ref::to_double(x);
  g.pre.assign(c.experts, std::vector<std::vector<double>>(
                              c.tokens, std::vector<double>(c.d_ff, std::nan(""))));
  for (int e = 0; e < c.experts; ++e) g.w_in.push_back(ref::to_double(layer.w_in(e)));
  for (int t = 0; t < c.tokens; ++t)
    for (int k = 0; k < c.top_k; ++k) {
      if (out.routing.slot(t, k) < 0) continue;
      const int e = out.routing.expert(t, k);
      g.pre[e][t] = ref::ffn_pre_activation(g.x, t, ref::expert_of(layer, e, c.bias));
    }
  return g;
}

// |pre| within 1.5 times the move of a step: the step could cross the kink.
bool near_kink(double pre, double move) {
  return !std::isnan(pre) && std::abs(pre) < 1.5 * std::abs(move) * kStep;
}

// Could a step on parameter `name` entry `index` (or x entry when name == "x") cross a kink?
bool crosses_kink(const KinkGuard& g, const std::string& name, int index, const GradCase& c) {
  if (!g.active) return false;
  if (name == "x") {
    const int t = index / c.d_model, i = index % c.d_model;
    for (int e = 0; e < c.experts; ++e)
      for (int j = 0; j < c.d_ff; ++j)
        if (near_kink(g.pre[e][t][j], g.w_in[e](i, j))) return true;
    return false;
  }
  const bool w_in = name.size() > 5 && name.substr(name.size() - 5) == ".w_in";
  const bool b_in = name.size() > 5 && name.substr(name.size() - 5) == ".b_in";
  if (!w_in && !b_in) return false;
  const int e = std::stoi(name.substr(std::string("experts.").size()));
  const int i = index / c.d_ff, j = index % c.d_ff;
  for (int t = 0; t < c.tokens; ++t)
    if (near_kink(g.pre[e][t][j], w_in ? g.x(t, i) : 1.0)) return true;
  return false;
}

struct Comparison {
  int checked = 0, skipped = 0, failures = 0;
  double worst = 0;  // max |fd - an| / (kAbsTol + kRelTol |an|)
};

void compare_entry(Comparison& cmp, const std::string& what, int index, double fd, double an) {
  const double tol = kAbsTol + kRelTol * std::abs(an);
  cmp.worst = std::max(cmp.worst, std::abs(fd - an) / tol);
  ++cmp.checked;
  if (std::abs(fd - an) > tol) {
    ++cmp.failures;
    if (cmp.failures <= 12)
      ADD_FAILURE() << what << "[" << index << "]: finite difference " << fd << ", backward " << an;
  }
}

template <class Act>
void check_switch_gradients(GradCase c) {
  SCOPED_TRACE(c.name);
  constexpr bool kRelu = std::is_same_v<Act, Relu>;
  const SwitchConfig cfg = config_of(c);
  SwitchLayer<Fp32, Act> layer(cfg);
  Matrix<float> x(c.tokens, c.d_model), dy(c.tokens, c.d_model);
  // Deterministic search for inputs without near-ties in routing.
  bool found = false;
  for (int attempt = 0; attempt < 200 && !found; ++attempt) {
    std::mt19937 gen(c.seed * 1000 + attempt);
    ref::fill_uniform(layer.router_weight(), gen, -1.5, 1.5);
    if (c.router_bias) ref::fill_uniform(layer.router_bias(), gen, -0.5, 0.5);
    switchmoe_test::randomize_experts(layer, c.experts, c.bias, gen);
    ref::fill_uniform(x, gen, -1, 1);
    ref::fill_uniform(dy, gen, -1, 1);
    found = routing_has_margin(layer.forward(x, Mode::kTrain), c, max_logit_step(layer, x));
  }
  ASSERT_TRUE(found) << "no input without near-ties found";

  const auto base = layer.forward(x, Mode::kTrain);
  const MatI expert0 = base.routing.expert, slot0 = base.routing.slot;
  const KinkGuard guard = kink_guard(layer, base, x, c, kRelu);
  int kept = 0;
  for (int t = 0; t < c.tokens; ++t)
    for (int k = 0; k < c.top_k; ++k) kept += base.routing.slot(t, k) >= 0;

  // Central differences, one entry at a time.
  auto difference = [&](float& entry) {
    const float saved = entry;
    entry = static_cast<float>(saved + kStep);
    const auto plus = layer.forward(x, Mode::kTrain);
    entry = static_cast<float>(saved - kStep);
    const auto minus = layer.forward(x, Mode::kTrain);
    entry = saved;
    EXPECT_EQ(MatI(plus.routing.expert), expert0);
    EXPECT_EQ(MatI(plus.routing.slot), slot0);
    EXPECT_EQ(MatI(minus.routing.slot), slot0);
    return (loss_of(plus, dy, c) - loss_of(minus, dy, c)) / (2 * kStep);
  };
  auto params = layer.parameters();
  std::vector<MatD> fd_param;
  std::vector<bool> skip_param;
  Comparison cmp;
  std::vector<std::vector<bool>> skip(params.size());
  for (std::size_t p = 0; p < params.size(); ++p) {
    Matrix<float>& v = *params[p].value;
    MatD fd = MatD::Zero(v.rows(), v.cols());
    skip[p].assign(v.size(), false);
    for (int i = 0; i < v.size(); ++i) {
      if (crosses_kink(guard, params[p].name, i, c)) {
        skip[p][i] = true;
        continue;
      }
      fd.data()[i] = difference(v.data()[i]);
    }
    fd_param.push_back(fd);
  }
  MatD fd_x = MatD::Zero(c.tokens, c.d_model);
  std::vector<bool> skip_x(x.size(), false);
  for (int i = 0; i < x.size(); ++i) {
    if (crosses_kink(guard, "x", i, c)) {
      skip_x[i] = true;
      continue;
    }
    fd_x.data()[i] = difference(x.data()[i]);
  }

  // Analytic gradients of the same point.
  layer.zero_grad();
  const auto again = layer.forward(x, Mode::kTrain);
  EXPECT_NEAR(again.loss, c.aux_coef * again.routing.aux_loss + c.z_coef * again.routing.z_loss,
              1e-6);
  const Matrix<float> dx = layer.backward(dy);
  ASSERT_EQ(dx.rows(), c.tokens);
  ASSERT_EQ(dx.cols(), c.d_model);
  for (std::size_t p = 0; p < params.size(); ++p) {
    const Matrix<float>& g = *params[p].grad;
    ASSERT_EQ(g.rows(), fd_param[p].rows()) << params[p].name;
    ASSERT_EQ(g.cols(), fd_param[p].cols()) << params[p].name;
    for (int i = 0; i < g.size(); ++i) {
      if (skip[p][i]) {
        ++cmp.skipped;
        continue;
      }
      compare_entry(cmp, params[p].name, i, fd_param[p].data()[i], g.data()[i]);
    }
  }
  for (int i = 0; i < x.size(); ++i) {
    if (skip_x[i]) {
      ++cmp.skipped;
      continue;
    }
    compare_entry(cmp, "dx", i, fd_x.data()[i], dx.data()[i]);
  }
  EXPECT_EQ(cmp.failures, 0) << "worst error / tolerance " << cmp.worst;
  EXPECT_LE(cmp.skipped, cmp.checked / 5) << "too many entries next to a ReLU kink";
  // Rule 10: a dropped choice gives its expert nothing; an expert with no kept token has an
  // exactly zero gradient (the test's cases with drops must actually drop).
  const int group_tokens = c.group_size > 0 ? c.group_size : c.tokens;
  if (c.expert_capacity > 0 && !c.dropless &&
      c.expert_capacity * c.experts < group_tokens * c.top_k) {
    EXPECT_LT(kept, c.tokens * c.top_k) << "case meant to drop choices drops none";
  }
  for (int e = 0; e < c.experts; ++e) {
    bool used = false;
    for (int t = 0; t < c.tokens; ++t)
      for (int k = 0; k < c.top_k; ++k)
        used |= base.routing.expert(t, k) == e && base.routing.slot(t, k) >= 0;
    if (!used) {
      EXPECT_TRUE((layer.grad_w_in(e).array() == 0.0f).all()) << "unused expert " << e;
      EXPECT_TRUE((layer.grad_w_out(e).array() == 0.0f).all()) << "unused expert " << e;
    }
  }
}

std::vector<GradCase> gradient_cases() {
  std::vector<GradCase> cases;
  GradCase c;
  c.name = "top1 no drops aux z";
  c.expert_capacity = 16;
  cases.push_back(c);
  c = GradCase{};
  c.name = "top1 drops token order bias";
  c.expert_capacity = 3;
  c.bias = true;
  cases.push_back(c);
  c = GradCase{};
  c.name = "top1 drops probability priority groups";
  c.expert_capacity = 2;
  c.group_size = 8;
  c.priority = Priority::kRouterProbability;
  cases.push_back(c);
  c = GradCase{};
  c.name = "top2 drops groups probability priority bias";
  c.top_k = 2;
  c.expert_capacity = 4;
  c.group_size = 8;
  c.priority = Priority::kRouterProbability;
  c.bias = true;
  cases.push_back(c);
  c = GradCase{};
  c.name = "top2 token order drops, no aux no z";
  c.top_k = 2;
  c.experts = 4;
  c.expert_capacity = 3;
  c.aux_coef = 0;
  c.z_coef = 0;
  cases.push_back(c);
  c = GradCase{};
  c.name = "top2 aux only, capacity factor";
  c.top_k = 2;
  c.z_coef = 0;
  cases.push_back(c);
  c = GradCase{};
  c.name = "top2 z only renormalize dropless bias";
  c.top_k = 2;
  c.aux_coef = 0;
  c.renormalize = true;
  c.dropless = true;
  c.bias = true;
  cases.push_back(c);
  c = GradCase{};
  c.name = "top3 of 4 with drops and router bias";
  c.top_k = 3;
  c.experts = 4;
  c.expert_capacity = 6;
  c.router_bias = true;
  cases.push_back(c);
  return cases;
}

// One test per case and activation, so each stays a few seconds under the sanitizers. ReLU runs
// on the odd cases (its kinks are what it adds; every routing path is covered with GELU).
class GeluFiniteDifferences : public ::testing::TestWithParam<int> {};
class ReluFiniteDifferences : public ::testing::TestWithParam<int> {};

TEST_P(GeluFiniteDifferences, SwitchLayer) {
  GradCase c = gradient_cases()[GetParam()];
  c.seed = 10 + GetParam();
  check_switch_gradients<Gelu>(c);
}

TEST_P(ReluFiniteDifferences, SwitchLayer) {
  GradCase c = gradient_cases()[GetParam()];
  c.seed = 40 + GetParam();
  check_switch_gradients<Relu>(c);
}

INSTANTIATE_TEST_SUITE_P(Cases, GeluFiniteDifferences,
                         ::testing::Range(0, static_cast<int>(gradient_cases().size())));
INSTANTIATE_TEST_SUITE_P(Cases, ReluFiniteDifferences, ::testing::Values(1, 3, 5, 7));

// Rule 10: with dy non-zero only on tokens whose every choice was dropped, and no aux/z loss,
// nothing reaches any parameter or x.
TEST(SwitchLayerGradient, DroppedTokensPassNothing) {
  for (int top_k : {1, 2}) {
    GradCase c;
    c.top_k = top_k;
    c.expert_capacity = 1;
    c.aux_coef = 0;
    c.z_coef = 0;
    c.bias = true;
    SwitchLayer<Fp32, Gelu> layer(config_of(c));
    std::mt19937 gen(77);
    ref::fill_uniform(layer.router_weight(), gen, -1.5, 1.5);
    Matrix<float> x(c.tokens, c.d_model);
    ref::fill_uniform(x, gen, -1, 1);
    const auto out = layer.forward(x, Mode::kTrain);
    Matrix<float> dy = Matrix<float>::Zero(c.tokens, c.d_model);
    int dropped = 0;
    for (int t = 0; t < c.tokens; ++t) {
      bool any = false;
      for (int k = 0; k < top_k; ++k) any |= out.routing.slot(t, k) >= 0;
      if (!any) {
        dy.row(t).setConstant(1.0f + t);
        ++dropped;
      }
    }
    ASSERT_GT(dropped, 0);
    const Matrix<float> dx = layer.backward(dy);
    EXPECT_TRUE((dx.array() == 0.0f).all());
    for (auto& p : layer.parameters()) EXPECT_TRUE((p.grad->array() == 0.0f).all()) << p.name;
  }
}

// Rule 8 at perfectly uniform probabilities: W_r = 0, so p = 1/E everywhere and (ties to the
// lower index) every token picks experts 0..k-1: f_e = 1 for e < k. With dy = 0 and z off:
//   d aux / d p[t,e] = E f_e / T,  d aux / d logit[t,j] = p_j (g_j - sum_e p_e g_e)
//                    = (E f_j - k) / (E T),
//   grad W_r[i,j] = alpha * sum_t x[t,i] * (E f_j - k) / (E T),  aux = E * sum_e f_e / E = k.
TEST(SwitchLayerGradient, AuxLossAtUniformProbabilities) {
  for (int top_k : {1, 2, 4}) {
    GradCase c;
    c.tokens = 6;
    c.experts = 4;
    c.top_k = top_k;
    c.expert_capacity = 6;
    c.aux_coef = 0.5f;
    c.z_coef = 0.0f;
    SwitchLayer<Fp32, Relu> layer(config_of(c));
    layer.router_weight().setZero();
    std::mt19937 gen(5);
    Matrix<float> x(c.tokens, c.d_model);
    ref::fill_uniform(x, gen, -1, 1);
    const auto out = layer.forward(x, Mode::kTrain);
    EXPECT_NEAR(out.routing.aux_loss, top_k, 1e-6);
    EXPECT_NEAR(out.loss, 0.5 * top_k, 1e-6);
    for (int t = 0; t < c.tokens; ++t)
      for (int k = 0; k < top_k; ++k) EXPECT_EQ(out.routing.expert(t, k), k);
    const Matrix<float> dx = layer.backward(Matrix<float>::Zero(c.tokens, c.d_model));
    const Matrix<float>& g = layer.grad_router_weight();
    for (int i = 0; i < c.d_model; ++i) {
      double sx = 0;
      for (int t = 0; t < c.tokens; ++t) sx += x(t, i);
      for (int j = 0; j < c.experts; ++j) {
        const double f = j < top_k ? 1.0 : 0.0;
        const double expected = 0.5 * sx * (c.experts * f - top_k) / (c.experts * c.tokens);
        EXPECT_NEAR(g(i, j), expected, 1e-6) << "k=" << top_k << " i=" << i << " j=" << j;
      }
    }
    EXPECT_TRUE((dx.array() == 0.0f).all());  // dx = dlogits * W_r^T with W_r = 0
    for (int e = 0; e < c.experts; ++e) EXPECT_TRUE((layer.grad_w_in(e).array() == 0.0f).all());
  }
}

// Rule 9 on hand-worked logits: x = I, W_r = [[0, 0], [ln 3, 0]] gives logits [0, 0] and
// [ln 3, 0]; lse = ln 2 and ln 4; z = (ln^2 2 + 4 ln^2 2) / 2 = 2.5 ln^2 2;
// dz/dlogit[t] = (2 / N) lse_t softmax(logit[t]) = [ln2/2, ln2/2] and [1.5 ln2, 0.5 ln2];
// grad W_r = x^T dlogits = dlogits; dx = dlogits W_r^T = [[0, ln2 ln3 / 2], [0, 1.5 ln2 ln3]].
TEST(SwitchLayerGradient, ZLossHandWorked) {
  GradCase c;
  c.tokens = 2;
  c.d_model = 2;
  c.experts = 2;
  c.aux_coef = 0.0f;
  c.z_coef = 1.0f;
  SwitchLayer<Fp32, Relu> layer(config_of(c));
  const double ln2 = std::log(2.0), ln3 = std::log(3.0);
  layer.router_weight() << 0.0f, 0.0f, static_cast<float>(ln3), 0.0f;
  const Matrix<float> x = Matrix<float>::Identity(2, 2);
  const auto out = layer.forward(x, Mode::kTrain);
  EXPECT_NEAR(out.routing.z_loss, 2.5 * ln2 * ln2, 1e-6);
  EXPECT_NEAR(out.loss, 2.5 * ln2 * ln2, 1e-6);
  const Matrix<float> dx = layer.backward(Matrix<float>::Zero(2, 2));
  const Matrix<float>& g = layer.grad_router_weight();
  EXPECT_NEAR(g(0, 0), ln2 / 2, 1e-6);
  EXPECT_NEAR(g(0, 1), ln2 / 2, 1e-6);
  EXPECT_NEAR(g(1, 0), 1.5 * ln2, 1e-6);
  EXPECT_NEAR(g(1, 1), 0.5 * ln2, 1e-6);
  EXPECT_NEAR(dx(0, 0), 0.0, 1e-6);
  EXPECT_NEAR(dx(0, 1), ln2 * ln3 / 2, 1e-6);
  EXPECT_NEAR(dx(1, 0), 0.0, 1e-6);
  EXPECT_NEAR(dx(1, 1), 1.5 * ln2 * ln3, 1e-6);
}

// Gradients accumulate across backward calls until zero_grad().
TEST(SwitchLayerGradient, AccumulatesUntilZeroGrad) {
  GradCase c;
  c.top_k = 2;
  c.bias = true;
  SwitchLayer<Fp32, Gelu> layer(config_of(c));
  std::mt19937 gen(8);
  Matrix<float> x(c.tokens, c.d_model), dy(c.tokens, c.d_model);
  ref::fill_uniform(x, gen, -1, 1);
  ref::fill_uniform(dy, gen, -1, 1);
  layer.forward(x, Mode::kTrain);
  const Matrix<float> dx1 = layer.backward(dy);
  std::vector<Matrix<float>> once;
  for (auto& p : layer.parameters()) once.push_back(*p.grad);
  const Matrix<float> dx2 = layer.backward(dy);  // same forward, second backward
  EXPECT_EQ(dx1, dx2);
  auto params = layer.parameters();
  bool any_nonzero = false;
  for (std::size_t p = 0; p < params.size(); ++p) {
    EXPECT_EQ(*params[p].grad, Matrix<float>(2.0f * once[p])) << params[p].name;
    any_nonzero |= (once[p].array() != 0.0f).any();
  }
  EXPECT_TRUE(any_nonzero);
  // A new forward does not reset gradients either.
  layer.forward(x, Mode::kTrain);
  layer.backward(dy);
  for (std::size_t p = 0; p < params.size(); ++p)
    EXPECT_EQ(*params[p].grad, Matrix<float>(3.0f * once[p])) << params[p].name;
  layer.zero_grad();
  for (auto& p : layer.parameters()) EXPECT_TRUE((p.grad->array() == 0.0f).all()) << p.name;
  layer.forward(x, Mode::kTrain);
  layer.backward(dy);
  for (std::size_t p = 0; p < params.size(); ++p)
    EXPECT_EQ(*params[p].grad, once[p]) << params[p].name;
}

// Rule 12 backward: one expert (gate 1, nothing dropped, no router gradient since softmax over
// one expert is constant), identity weights and x > 0, so y = x .* s and dx = dy .* s with s
// the dropout scale (0 or 1/(1-p)) of each unit: backward must use the forward's mask.
TEST(SwitchLayerGradient, DropoutMaskReusedInBackward) {
  SwitchConfig cfg;
  cfg.d_model = cfg.d_ff = 16;
  cfg.routing.num_experts = 1;
  cfg.expert_dropout = 0.5f;
  cfg.seed = 3;
  SwitchLayer<Fp32, Relu> layer(cfg);
  layer.w_in(0).setIdentity();
  layer.w_out(0).setIdentity();
  Matrix<float> x(8, 16), dy(8, 16);
  std::mt19937 gen(2);
  ref::fill_uniform(x, gen, 0.5, 1.5);
  ref::fill_uniform(dy, gen, -1, 1);
  const auto out = layer.forward(x, Mode::kTrain);
  const Matrix<float> dx = layer.backward(dy);
  int zeros = 0;
  for (int t = 0; t < 8; ++t)
    for (int j = 0; j < 16; ++j) {
      const double s = out.y(t, j) / x(t, j);
      zeros += out.y(t, j) == 0.0f;
      EXPECT_NEAR(dx(t, j), dy(t, j) * s, 1e-5) << t << "," << j;
    }
  EXPECT_GT(zeros, 0);
  EXPECT_LT(zeros, 8 * 16);
}

TEST(SwitchLayerGradient, BadInput) {
  GradCase c;
  SwitchLayer<Fp32, Relu> layer(config_of(c));
  const Matrix<float> x = Matrix<float>::Ones(c.tokens, c.d_model);
  const Matrix<float> dy = Matrix<float>::Ones(c.tokens, c.d_model);
  EXPECT_THROW(layer.backward(dy), std::invalid_argument);  // no forward at all
  layer.forward(x, Mode::kEval);
  EXPECT_THROW(layer.backward(dy), std::invalid_argument);  // only an evaluation forward
  layer.forward(x, Mode::kTrain);
  try {
    layer.backward(Matrix<float>::Ones(c.tokens + 1, c.d_model));
    ADD_FAILURE() << "dy with too many rows accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("dy"), std::string::npos) << e.what();
  }
  EXPECT_THROW(layer.backward(Matrix<float>::Ones(c.tokens, c.d_model + 1)), std::invalid_argument);
  // A training forward followed by an evaluation forward: backward refers to nothing valid.
  layer.forward(x, Mode::kEval);
  EXPECT_THROW(layer.backward(dy), std::invalid_argument);
  for (float p : {1.0f, 1.5f, -0.01f}) {
    SwitchConfig cfg = config_of(c);
    cfg.expert_dropout = p;
    EXPECT_THROW((SwitchLayer<Fp32, Relu>(cfg)), std::invalid_argument) << p;
  }
}

// ---------------------------------------------------------------------------------------------
// DenseFFN

template <class Act>
void check_dense_gradients(bool bias, unsigned seed) {
  SCOPED_TRACE(std::string(Act::name()) + (bias ? " bias" : " no bias"));
  constexpr bool kRelu = std::is_same_v<Act, Relu>;
  DenseConfig cfg;
  cfg.d_model = 5;
  cfg.d_ff = 7;
  cfg.bias = bias;
  cfg.seed = seed;
  DenseFFN<Fp32, Act> ffn(cfg);
  std::mt19937 gen(seed);
  switchmoe_test::randomize_ffn(ffn, bias, gen);
  const int tokens = 9;
  Matrix<float> x(tokens, 5), dy(tokens, 5);
  ref::fill_uniform(x, gen, -1, 1);
  ref::fill_uniform(dy, gen, -1, 1);
  // Kink guard as for the Switch layer: |pre| of every unit versus the step's effect.
  ref::Ffn f{ref::to_double(ffn.w_in()), bias ? ref::to_double(ffn.b_in()) : MatD(),
             ref::to_double(ffn.w_out()), bias ? ref::to_double(ffn.b_out()) : MatD()};
  const MatD xd = ref::to_double(x);
  std::vector<std::vector<double>> pre;
  for (int t = 0; t < tokens; ++t) pre.push_back(ref::ffn_pre_activation(xd, t, f));
  auto loss = [&] {
    const Matrix<float> y = ffn.forward(x, Mode::kTrain);
    double l = 0;
    for (int i = 0; i < y.size(); ++i) l += static_cast<double>(dy.data()[i]) * y.data()[i];
    return l;
  };
  auto difference = [&](float& entry) {
    const float saved = entry;
    entry = static_cast<float>(saved + kStep);
    const double lp = loss();
    entry = static_cast<float>(saved - kStep);
    const double lm = loss();
    entry = saved;
    return (lp - lm) / (2 * kStep);
  };
  auto unit_near_kink = [&](int t, int j, double move) {
    return kRelu && std::abs(pre[t][j]) < 1.5 * std::abs(move) * kStep;
  };
  Comparison cmp;
  ffn.zero_grad();
  ffn.forward(x, Mode::kTrain);
  const Matrix<float> dx = ffn.backward(dy);
  for (auto& p : ffn.parameters()) {
    const Matrix<float> an = *p.grad;
    for (int i = 0; i < p.value->size(); ++i) {
      bool skip = false;
      if (p.name == "w_in" || p.name == "b_in")
        for (int t = 0; t < tokens; ++t)
          skip |= unit_near_kink(t, i % cfg.d_ff, p.name == "w_in" ? xd(t, i / cfg.d_ff) : 1.0);
      if (skip) {
        ++cmp.skipped;
        continue;
      }
      compare_entry(cmp, p.name, i, difference(p.value->data()[i]), an.data()[i]);
    }
  }
  for (int i = 0; i < x.size(); ++i) {
    bool skip = false;
    for (int j = 0; j < cfg.d_ff; ++j) skip |= unit_near_kink(i / 5, j, f.w_in(i % 5, j));
    if (skip) {
      ++cmp.skipped;
      continue;
    }
    compare_entry(cmp, "dx", i, difference(x.data()[i]), dx.data()[i]);
  }
  EXPECT_EQ(cmp.failures, 0) << "worst error / tolerance " << cmp.worst;
  EXPECT_LE(cmp.skipped, cmp.checked / 5);
}

TEST(DenseFFNGradient, MatchesFiniteDifferences) {
  check_dense_gradients<Gelu>(false, 1);
  check_dense_gradients<Gelu>(true, 2);
  check_dense_gradients<Relu>(false, 3);
  check_dense_gradients<Relu>(true, 4);
}

TEST(DenseFFNGradient, AccumulatesAndBadInput) {
  DenseConfig cfg;
  cfg.d_model = 3;
  cfg.d_ff = 4;
  cfg.bias = true;
  DenseFFN<Fp32, Gelu> ffn(cfg);
  const Matrix<float> x = Matrix<float>::Constant(2, 3, 0.5f);
  const Matrix<float> dy = Matrix<float>::Constant(2, 3, 1.0f);
  EXPECT_THROW(ffn.backward(dy), std::invalid_argument);  // before any forward
  ffn.forward(x, Mode::kEval);
  EXPECT_THROW(ffn.backward(dy), std::invalid_argument);  // after an evaluation forward only
  ffn.forward(x, Mode::kTrain);
  EXPECT_THROW(ffn.backward(Matrix<float>::Ones(3, 3)), std::invalid_argument);
  EXPECT_THROW(ffn.backward(Matrix<float>::Ones(2, 4)), std::invalid_argument);
  ffn.backward(dy);
  const Matrix<float> once = ffn.grad_w_in();
  ffn.backward(dy);
  EXPECT_EQ(ffn.grad_w_in(), Matrix<float>(2.0f * once));
  EXPECT_TRUE((ffn.grad_b_out().array() == 4.0f).all());  // 2 tokens * dy 1 * 2 calls
  ffn.zero_grad();
  EXPECT_TRUE((ffn.grad_w_in().array() == 0.0f).all());
  EXPECT_TRUE((ffn.grad_b_out().array() == 0.0f).all());
  for (float p : {1.0f, -0.2f}) {
    DenseConfig bad = cfg;
    bad.dropout = p;
    EXPECT_THROW((DenseFFN<Fp32, Gelu>(bad)), std::invalid_argument) << p;
  }
}

}  // namespace
