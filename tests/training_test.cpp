// End-to-end training (issue #3): a SwitchLayer followed by a linear read-out, trained with plain
// SGD on inputs drawn from 4 clusters, each with its own target map. A single shared linear map
// cannot fit the task; experts that specialise per cluster can, so the loss must fall by a stated
// factor and the router must send different clusters to different experts.
// Fixed seeds, a fixed number of steps, no timing.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <set>
#include <vector>

#include "reference/layer_reference.hpp"
#include "switchmoe/switchmoe.hpp"

namespace {

using switchmoe::Bf16;
using switchmoe::Fp32;
using switchmoe::Gelu;
using switchmoe::Matrix;
using switchmoe::Mode;
using switchmoe::Relu;
using switchmoe::SwitchConfig;
using switchmoe::SwitchLayer;

constexpr int kClusters = 4, kDModel = 8, kDOut = 4;

struct Task {
  Matrix<float> centers;            // [clusters, d_model]
  std::vector<Matrix<float>> maps;  // [clusters] [d_model, d_out]
};

Task make_task(std::mt19937& gen) {
  Task task;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  task.centers.resize(kClusters, kDModel);
  for (int c = 0; c < kClusters; ++c) {
    // Well-separated centers: +-2 on two coordinates of their own.
    task.centers.row(c).setZero();
    task.centers(c, 2 * c) = 2.0f;
    task.centers(c, 2 * c + 1) = (c % 2) ? -2.0f : 2.0f;
    Matrix<float> m(kDModel, kDOut);
    for (int i = 0; i < m.size(); ++i) m.data()[i] = 0.5f * normal(gen);
    task.maps.push_back(m);
  }
  return task;
}

// tokens [n, d_model] from random clusters (label per token), targets [n, d_out].
void sample(const Task& task, int n, std::mt19937& gen, Matrix<float>& x, Matrix<float>& target,
            std::vector<int>& label) {
  std::normal_distribution<float> noise(0.0f, 0.3f);
  x.resize(n, kDModel);
  target.resize(n, kDOut);
  label.resize(n);
  for (int t = 0; t < n; ++t) {
    const int c = t % kClusters;  // balanced batches
    label[t] = c;
    for (int i = 0; i < kDModel; ++i) x(t, i) = task.centers(c, i) + noise(gen);
    target.row(t) = x.row(t) * task.maps[c];
  }
}

double mse(const Matrix<float>& pred, const Matrix<float>& target) {
  return (pred - target).squaredNorm() / static_cast<double>(pred.rows());
}

template <class Policy, class Act>
void train_and_check(double required_factor) {
  std::mt19937 gen(2024);
  const Task task = make_task(gen);
  SwitchConfig cfg;
  cfg.d_model = kDModel;
  cfg.d_ff = 16;
  cfg.routing.num_experts = 4;
  cfg.aux_loss_coef = 0.5f;  // strong balancing: without it the router collapses onto 2 experts
  cfg.init_scale = 1.0f;
  cfg.seed = 17;
  SwitchLayer<Policy, Act> layer(cfg);
  Matrix<float> readout(kDModel, kDOut);  // [d_model, d_out]
  {
    std::normal_distribution<float> normal(0.0f, 1.0f / std::sqrt(float(kDModel)));
    for (int i = 0; i < readout.size(); ++i) readout.data()[i] = normal(gen);
  }
  Matrix<float> x_eval, target_eval;
  std::vector<int> label_eval;
  sample(task, 256, gen, x_eval, target_eval, label_eval);
  auto eval_loss = [&] {
    const auto out = layer.forward(x_eval, Mode::kEval);
    return mse(out.y * readout, target_eval);
  };
  const double initial = eval_loss();
  auto params = layer.parameters();  // kept for the whole run, as an optimizer would
  const float lr = 0.05f;
  const int steps = 250, batch = 64;
  Matrix<float> x, target;
  std::vector<int> label;
  for (int step = 0; step < steps; ++step) {
    sample(task, batch, gen, x, target, label);
    const auto out = layer.forward(x, Mode::kTrain);
    const Matrix<float> pred = out.y * readout;                    // [batch, d_out]
    const Matrix<float> dpred = (2.0f / batch) * (pred - target);  // d mse / d pred
    const Matrix<float> grad_readout = out.y.transpose() * dpred;
    layer.zero_grad();
    layer.backward(dpred * readout.transpose());
    readout -= lr * grad_readout;
    for (auto& p : params) *p.value -= lr * *p.grad;
  }
  const double final_loss = eval_loss();
  if (std::getenv("TRAIN_VERBOSE")) std::printf("initial %g final %g\n", initial, final_loss);
  EXPECT_LT(final_loss * required_factor, initial)
      << "loss fell from " << initial << " to " << final_loss;
  // Majority expert of each cluster, in evaluation: all different.
  const auto out = layer.forward(x_eval, Mode::kEval);
  std::vector<std::vector<int>> votes(kClusters, std::vector<int>(cfg.routing.num_experts, 0));
  for (int t = 0; t < x_eval.rows(); ++t) ++votes[label_eval[t]][out.routing.expert(t, 0)];
  std::set<int> majority;
  for (int c = 0; c < kClusters; ++c) {
    const int e =
        static_cast<int>(std::max_element(votes[c].begin(), votes[c].end()) - votes[c].begin());
    majority.insert(e);
    // Specialised: the cluster's tokens go almost all to that expert.
    EXPECT_GE(votes[c][e], 0.7 * x_eval.rows() / kClusters) << "cluster " << c;
  }
  EXPECT_EQ(static_cast<int>(majority.size()), kClusters)
      << "clusters share experts: router did not separate them";
}

TEST(Training, SgdSeparatesClustersFp32Relu) { train_and_check<Fp32, Relu>(10.0); }
TEST(Training, SgdSeparatesClustersBf16Gelu) { train_and_check<Bf16, Gelu>(10.0); }

}  // namespace
