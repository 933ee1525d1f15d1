// Batch invariance of the Switch layer (issue 15): with nothing dropped (dropless routing,
// evaluation mode), a token's output is bitwise the same whether it is computed alone or among
// many other tokens, and whatever the thread count. The sub-batch sizes cross the switch between
// the GEMM's thin-row (decode) path, taken when every expert sees at most 16 rows, and its tile
// path: 1, 2 and 16 tokens always take the thin path, 17 tokens on one expert and 512 tokens
// take the tile path. The full batch is the reference; it is also checked against a
// double-precision evaluation of the same routing.

#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <vector>

#include "support/matrices.hpp"
#include "switchmoe/switchmoe.hpp"

namespace {

using switchmoe::Matrix;
using switchmoe::Mode;
using switchmoe_test::random_matrix;
using switchmoe_test::SameBits;

template <class Policy>
void check_batch_invariance(int experts) {
  switchmoe::SwitchConfig config;
  // k of the second product (d_ff) spans several k blocks of every kernel (256 to 1024 k
  // values by path) with a partial one; the first product's k (d_model) stays inside one
  // block (kernels_thin_test and kernels_gemm_test cross blocks at every shape class); both k
  // are even (the bf16 thin kernel takes whole pairs); d_model has a partial column panel.
  config.d_model = 300;
  config.d_ff = 2100;
  config.routing.num_experts = experts;
  config.routing.dropless = true;
  config.seed = 5;
  switchmoe::SwitchLayer<Policy> layer(config);
  const int pool = 512;
  const Matrix<float> x = random_matrix(pool, config.d_model, 9);
  switchmoe::SwitchOutput full;
  layer.forward(x, Mode::kEval, full);
  // The reference itself against double precision for a few tokens (gate * FFN_e(x)), with a
  // tolerance for bf16 rounding of x and the hidden layer in the Bf16 policy.
  const bool bf16 = std::is_same_v<Policy, switchmoe::Bf16>;
  for (int t : {0, 200, 511}) {
    const int e = full.routing.expert(t, 0);
    const float gate = full.routing.gate(t, 0);
    Eigen::RowVectorXd h = x.row(t).cast<double>() * layer.w_in(e).template cast<double>();
    h = h.cwiseMax(0.0);
    const Eigen::RowVectorXd y = gate * h * layer.w_out(e).template cast<double>();
    const double scale = y.cwiseAbs().maxCoeff() + 1e-3;
    EXPECT_LT((full.y.row(t).cast<double>() - y).cwiseAbs().maxCoeff() / scale, bf16 ? 3e-2 : 1e-4)
        << "token " << t;
  }
  layer.sync_weights();  // w_in(e) above exposed the weights; repacking gives the same copies
  const int saved = omp_get_max_threads();
  for (int threads : {1, 2, 3}) {
    omp_set_num_threads(threads);
    for (int size : {1, 2, 16, 17, 512}) {
      for (int first : {0, 101, pool - size}) {
        if (first + size > pool) continue;
        switchmoe::SwitchOutput part;
        layer.forward(x.middleRows(first, size), Mode::kEval, part);
        EXPECT_TRUE(SameBits(part.y, full.y.middleRows(first, size)))
            << size << " tokens from " << first << ", " << threads << " threads, " << experts
            << " experts";
      }
    }
  }
  omp_set_num_threads(saved);
}

TEST(BatchInvariance, Fp32OneExpert) { check_batch_invariance<switchmoe::Fp32>(1); }
TEST(BatchInvariance, Fp32FourExperts) { check_batch_invariance<switchmoe::Fp32>(4); }
TEST(BatchInvariance, Bf16OneExpert) { check_batch_invariance<switchmoe::Bf16>(1); }
TEST(BatchInvariance, Bf16FourExperts) { check_batch_invariance<switchmoe::Bf16>(4); }

}  // namespace
