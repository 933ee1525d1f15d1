// The variants inside SwitchLayer: the shared expert (SEMANTICS 16) and the layer shapes the
// examples use (Mixtral: SwiGLU, top-2 renormalized, dropless; DeepSeek-V3: sigmoid scores, bias
// balancing, top-k renormalized with routed scaling, a shared expert; Qwen2-MoE: a gated shared
// expert; expert choice), each against the double-precision reference layer of
// tests/reference/variants_reference.hpp: forward, finite-difference gradients (double, with
// the routing decisions checked unchanged), thread-count determinism and zero allocations.
#include <gtest/gtest.h>
#include <omp.h>

#include <string>
#include <vector>

#include "support/allocation_counter.hpp"  // first: configures Eigen
// (kept apart so that include sorting leaves it first)

#include "reference/variants_reference.hpp"
#include "support/matrices.hpp"
#include "switchmoe/switchmoe.hpp"

namespace {

using switchmoe::Fp32;
using switchmoe::Matrix;
using switchmoe::Mode;
using switchmoe::RoutingMethod;
using switchmoe::ScoreFunction;
using switchmoe::Silu;
using switchmoe::SwiGlu;
using switchmoe::SwitchConfig;
using switchmoe_test::random_matrix;
using switchmoe_test::SameBits;
namespace vref = switchmoe_test::vref;
using vref::MatD;

constexpr int kDModel = 6, kDff = 5, kExperts = 4, kTokens = 12;

SwitchConfig base_config() {
  SwitchConfig c;
  c.d_model = kDModel;
  c.d_ff = kDff;
  c.routing.num_experts = kExperts;
  c.jitter_eps = 0.0f;  // the reference has no jitter
  c.init_scale = 1.0f;  // confident routers
  c.seed = 3;
  return c;
}

SwitchConfig mixtral() {
  SwitchConfig c = base_config();
  c.routing.top_k = 2;
  c.routing.renormalize = true;
  c.routing.dropless = true;
  c.aux_loss_coef = 0.02f;
  c.z_loss_coef = 1e-3f;
  return c;
}

SwitchConfig deepseek() {
  SwitchConfig c = base_config();
  c.routing.top_k = 2;
  c.routing.score = ScoreFunction::kSigmoid;
  c.routing.renormalize = true;
  c.routing.routed_scaling = 2.5f;
  c.routing.bias_update_rate = 1e-3f;
  c.routing.expert_capacity = 5;  // some choices dropped
  c.aux_loss_coef = 0.01f;        // DeepSeek-V3 keeps a small sequence-wise loss
  c.shared_d_ff = 7;
  return c;
}

SwitchConfig qwen() {
  SwitchConfig c = base_config();
  c.routing.top_k = 2;
  c.routing.dropless = true;
  c.shared_d_ff = 8;
  c.shared_expert_gate = true;
  return c;
}

SwitchConfig expert_choice() {
  SwitchConfig c = base_config();
  c.routing.method = RoutingMethod::kExpertChoice;
  c.routing.capacity_factor = 1.0;
  c.routing.group_size = 6;
  c.routing.min_capacity = 0;
  c.z_loss_coef = 1e-2f;
  c.shared_d_ff = 4;
  return c;
}

template <class Layer>
vref::GatedFfn expert_of(Layer& layer, int e) {
  vref::GatedFfn f;
  if constexpr (switchmoe::is_gated_v<typename Layer::ActivationType>) {
    f.w_gate = vref::to_double(layer.w_gate(e));
  }
  f.w_in = vref::to_double(layer.w_in(e));
  f.w_out = vref::to_double(layer.w_out(e));
  return f;
}

template <class Layer>
vref::Layer reference_of(Layer& layer, const switchmoe::Routing& routing) {
  const SwitchConfig& c = layer.config();
  vref::Layer r;
  r.w_router = vref::to_double(layer.router_weight());
  for (int e = 0; e < kExperts; ++e) r.experts.push_back(expert_of(layer, e));
  r.gated = switchmoe::is_gated_v<typename Layer::ActivationType>;
  r.act = vref::Act::kSilu;
  r.has_shared = c.shared_d_ff > 0;
  if (r.has_shared) {
    if (r.gated) r.shared.w_gate = vref::to_double(layer.shared_w_gate());
    r.shared.w_in = vref::to_double(layer.shared_w_in());
    r.shared.w_out = vref::to_double(layer.shared_w_out());
    if (c.shared_expert_gate) r.w_shared_gate = vref::to_double(layer.shared_gate_weight());
  }
  r.expert_choice = c.routing.method == RoutingMethod::kExpertChoice;
  r.capacity = c.routing.dropless ? -1 : routing.capacity;
  r.routing.experts = kExperts;
  r.routing.k = c.routing.top_k;
  r.routing.score =
      c.routing.score == ScoreFunction::kSigmoid ? vref::Score::kSigmoid : vref::Score::kSoftmax;
  r.routing.renormalize = c.routing.renormalize;
  r.routing.scaling = c.routing.routed_scaling;
  r.routing.group_size = c.routing.group_size;
  r.aux_coef = c.aux_loss_coef;
  r.z_coef = c.z_loss_coef;
  return r;
}

// Forward and every gradient of a variant layer against the double reference.
template <class Act>
void check_layer(const SwitchConfig& config, unsigned seed) {
  switchmoe::SwitchLayer<Fp32, Act> layer(config);
  if (config.routing.bias_update_rate > 0.0f) {
    // A bias that changes the choice (rule 19), as after some training steps.
    layer.balancing_bias() << 0.3f, -0.2f, 0.1f, 0.0f;
  }
  const Matrix<float> x = random_matrix(kTokens, kDModel, seed);
  const Matrix<float> dy = random_matrix(kTokens, kDModel, seed + 1);
  const Matrix<float> bias_before = layer.balancing_bias();
  const switchmoe::SwitchOutput out = layer.forward(x, Mode::kTrain);
  const Matrix<float> dx = layer.backward(dy);
  vref::Layer ref = reference_of(layer, out.routing);
  ref.routing.bias.assign(bias_before.data(), bias_before.data() + kExperts);
  MatD xd = vref::to_double(x);
  const MatD dyd = vref::to_double(dy);
  const vref::LayerResult base = vref::layer_forward(xd, ref);
  EXPECT_LT(vref::relative_error(vref::to_double(out.y), base.y), 1e-5);
  EXPECT_NEAR(out.routing.aux_loss, base.aux, 1e-5);
  EXPECT_NEAR(out.loss, ref.aux_coef * base.aux + ref.z_coef * base.z, 1e-5);
  bool same = true;
  auto loss = [&] {
    const vref::LayerResult r = vref::layer_forward(xd, ref);
    same = same && (r.decisions.array() == base.decisions.array()).all();
    return (r.y.array() * dyd.array()).sum() + ref.aux_coef * r.aux + ref.z_coef * r.z;
  };
  auto check = [&](MatD& param, const Matrix<float>& grad, const std::string& name) {
    same = true;
    const MatD fd = vref::finite_difference(loss, param, 1e-6);
    EXPECT_TRUE(same) << name << ": a routing tie within the finite-difference step";
    EXPECT_LT(vref::relative_error(vref::to_double(grad), fd), 3e-4) << name;
  };
  check(xd, dx, "x");
  check(ref.w_router, layer.grad_router_weight(), "router weight");
  for (int e = 0; e < kExperts; ++e) {
    if constexpr (switchmoe::is_gated_v<Act>) {
      check(ref.experts[e].w_gate, layer.grad_w_gate(e), "w_gate " + std::to_string(e));
    }
    check(ref.experts[e].w_in, layer.grad_w_in(e), "w_in " + std::to_string(e));
    check(ref.experts[e].w_out, layer.grad_w_out(e), "w_out " + std::to_string(e));
  }
  if (config.shared_d_ff > 0) {
    if constexpr (switchmoe::is_gated_v<Act>) {
      check(ref.shared.w_gate, layer.grad_shared_w_gate(), "shared w_gate");
    }
    check(ref.shared.w_in, layer.grad_shared_w_in(), "shared w_in");
    check(ref.shared.w_out, layer.grad_shared_w_out(), "shared w_out");
    if (config.shared_expert_gate) {
      check(ref.w_shared_gate, layer.grad_shared_gate_weight(), "shared gate weight");
    }
  }
}

TEST(VariantLayer, MixtralShapedMatchesReference) { check_layer<SwiGlu>(mixtral(), 10); }
TEST(VariantLayer, DeepSeekShapedMatchesReference) { check_layer<SwiGlu>(deepseek(), 20); }
TEST(VariantLayer, QwenShapedGatedSharedExpertMatchesReference) { check_layer<SwiGlu>(qwen(), 30); }
TEST(VariantLayer, PlainSiluSharedExpertMatchesReference) { check_layer<Silu>(qwen(), 40); }
TEST(VariantLayer, ExpertChoiceWithSharedExpertMatchesReference) {
  check_layer<SwiGlu>(expert_choice(), 50);
}

// Rule 16: the shared expert is never dropped: with every routed choice dropped, y = s * Shared.
TEST(SharedExpert, TokensWithEveryChoiceDroppedStillGetIt) {
  SwitchConfig c = qwen();
  switchmoe::SwitchLayer<Fp32, SwiGlu> layer(c);
  const Matrix<float> x = random_matrix(kTokens, kDModel, 4);
  switchmoe::Routing routing = switchmoe::route(x * layer.router_weight(), c.routing, Mode::kEval);
  routing.slot.row(3).setConstant(-1);  // token 3: both choices dropped
  routing.gate.row(3).setZero();
  routing.slot.row(5).setConstant(-1);
  routing.gate.row(5).setZero();
  // Slots of the other tokens must stay dense: renumber them.
  std::vector<int> used(kExperts, 0);
  for (int c2 = 0; c2 < 2; ++c2)
    for (int t = 0; t < kTokens; ++t)
      if (routing.slot(t, c2) >= 0) routing.slot(t, c2) = used[routing.expert(t, c2)]++;
  const Matrix<float> y = layer.forward(x, routing);
  vref::Layer ref = reference_of(layer, routing);
  ref.experts.clear();  // the shared part alone, for the dropped tokens
  const MatD ys = vref::gated_ffn(vref::to_double(x), ref.shared, vref::Act::kSilu);
  for (int t : {3, 5}) {
    const double s = vref::sigmoid((vref::to_double(x).row(t) * ref.w_shared_gate)(0, 0));
    EXPECT_LT((vref::to_double(y.row(t)) - s * ys.row(t)).cwiseAbs().maxCoeff(), 1e-5) << t;
    EXPECT_GT(y.row(t).cwiseAbs().maxCoeff(), 0.0f);
  }
}

TEST(SharedExpert, ParametersAndBuffers) {
  SwitchConfig c = qwen();
  switchmoe::SwitchLayer<Fp32, SwiGlu> layer(c);
  std::vector<std::string> shared;
  for (const auto& p : layer.parameters()) {
    if (p.owner == switchmoe::ParameterOwner::kShared) shared.push_back(p.name);
  }
  const std::vector<std::string> expected = {"shared.w_gate", "shared.w_in", "shared.w_out",
                                             "shared.gate_weight"};
  EXPECT_EQ(shared, expected);
  EXPECT_EQ(layer.shared_w_in().rows(), kDModel);
  EXPECT_EQ(layer.shared_w_in().cols(), 8);
  EXPECT_EQ(layer.shared_w_out().rows(), 8);
  EXPECT_EQ(layer.shared_gate_weight().rows(), kDModel);
  EXPECT_EQ(layer.shared_gate_weight().cols(), 1);
  const auto buffers = layer.buffers();
  ASSERT_EQ(buffers.size(), 1u);
  EXPECT_EQ(buffers[0].name, "routing.balancing_bias");
  EXPECT_EQ(buffers[0].role, switchmoe::ParameterRole::kBuffer);
  EXPECT_EQ(buffers[0].value, &layer.balancing_bias());
  EXPECT_EQ(buffers[0].grad, nullptr);
  EXPECT_EQ(layer.balancing_bias().cols(), kExperts);
}

TEST(SharedExpert, AccessorsWithoutOneThrow) {
  switchmoe::SwitchLayer<Fp32, SwiGlu> plain(base_config());
  EXPECT_THROW(plain.shared_w_in(), std::invalid_argument);
  EXPECT_THROW(plain.grad_shared_w_out(), std::invalid_argument);
  EXPECT_THROW(plain.shared_gate_weight(), std::invalid_argument);
  SwitchConfig c = deepseek();  // shared, no gate
  switchmoe::SwitchLayer<Fp32, SwiGlu> ungated(c);
  try {
    ungated.shared_gate_weight();
    FAIL();
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("shared_expert_gate"), std::string::npos) << e.what();
  }
  switchmoe::SwitchLayer<Fp32, Silu> silu(c);
  EXPECT_THROW(silu.shared_w_gate(), std::invalid_argument);
  SwitchConfig bad = base_config();
  bad.shared_expert_gate = true;
  try {
    switchmoe::SwitchLayer<Fp32, SwiGlu> layer(bad);
    FAIL();
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("shared_expert_gate"), std::string::npos) << e.what();
  }
  bad = base_config();
  bad.shared_d_ff = -3;
  EXPECT_THROW(switchmoe::SwitchLayer<Fp32> layer(bad), std::invalid_argument);
}

// Bitwise identical results for 1, 2 and 3 threads, with dropout, random second choice and bias
// updates on, over a few training steps.
template <class Act>
void check_threads(SwitchConfig c) {
  c.expert_dropout = 0.2f;
  c.jitter_eps = 0.05f;
  c.d_model = 48;
  c.d_ff = 72;
  if (c.shared_d_ff > 0) c.shared_d_ff = 80;
  std::vector<Matrix<float>> ys, dxs, grads, biases;
  for (int threads : {1, 2, 3}) {
    omp_set_num_threads(threads);
    switchmoe::SwitchLayer<Fp32, Act> layer(c);
    Matrix<float> dx;
    switchmoe::SwitchOutput out;
    for (int step = 0; step < 3; ++step) {
      const Matrix<float> x = random_matrix(96, 48, 60 + step);
      layer.forward(x, Mode::kTrain, out);
      layer.backward(random_matrix(96, 48, 70 + step), dx);
    }
    ys.push_back(out.y);
    dxs.push_back(dx);
    grads.push_back(c.shared_d_ff > 0 ? layer.grad_shared_w_in() : layer.grad_w_in(1));
    biases.push_back(layer.balancing_bias());
  }
  omp_set_num_threads(2);
  for (int i = 1; i < 3; ++i) {
    EXPECT_TRUE(SameBits(ys[i], ys[0]));
    EXPECT_TRUE(SameBits(dxs[i], dxs[0]));
    EXPECT_TRUE(SameBits(grads[i], grads[0]));
    EXPECT_TRUE(SameBits(biases[i], biases[0]));
  }
}

TEST(VariantDeterminism, DeepSeekShapedThreadCountDoesNotChangeBits) {
  check_threads<SwiGlu>(deepseek());
}
TEST(VariantDeterminism, QwenShapedThreadCountDoesNotChangeBits) { check_threads<SwiGlu>(qwen()); }
TEST(VariantDeterminism, ExpertChoiceThreadCountDoesNotChangeBits) {
  check_threads<SwiGlu>(expert_choice());
}
TEST(VariantDeterminism, RandomSecondChoiceThreadCountDoesNotChangeBits) {
  SwitchConfig c = mixtral();
  c.routing.renormalize = false;
  c.routing.random_second_choice = true;
  check_threads<SwiGlu>(c);
}

// Steady state: once warmed up, training forward + backward and evaluation forward allocate
// nothing on every new path.
template <class Act>
void check_no_allocations(SwitchConfig c) {
  c.d_model = 32;
  c.d_ff = 48;
  c.expert_dropout = 0.1f;
  c.jitter_eps = 0.01f;
  if (c.routing.group_size > 0) c.routing.group_size = 16;  // a divisor of the 64 tokens
  switchmoe::SwitchLayer<Fp32, Act> layer(c);
  switchmoe::SwitchOutput out, eval_out;
  Matrix<float> dx;
  for (int call = 0; call < 7; ++call) {
    const Matrix<float> x = random_matrix(64, 32, 90 + call);
    const Matrix<float> dy = random_matrix(64, 32, 95 + call);
    const auto count = switchmoe_test::count_allocations([&] {
      layer.forward(x, Mode::kTrain, out);
      layer.backward(dy, dx);
      layer.forward(x, Mode::kEval, eval_out);
    });
    if (call >= 4) {
      EXPECT_EQ(count.operator_new, 0) << "call " << call;
      EXPECT_EQ(count.eigen, 0) << "call " << call;
    }
  }
}

TEST(VariantAllocation, DeepSeekShapedSteadyStateAllocatesNothing) {
  check_no_allocations<SwiGlu>(deepseek());
}
TEST(VariantAllocation, QwenShapedSteadyStateAllocatesNothing) {
  check_no_allocations<SwiGlu>(qwen());
}
TEST(VariantAllocation, ExpertChoiceSteadyStateAllocatesNothing) {
  check_no_allocations<SwiGlu>(expert_choice());
}
TEST(VariantAllocation, RandomSecondChoiceSteadyStateAllocatesNothing) {
  SwitchConfig c = mixtral();
  c.routing.random_second_choice = true;
  check_no_allocations<SwiGlu>(c);
}

}  // namespace
