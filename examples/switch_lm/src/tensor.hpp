#pragma once
// Shared vocabulary of the switch_lm example: matrices, parameter references, initialization.

#include <Eigen/Core>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <switchmoe/core/parameter.hpp>
#include <vector>

namespace switch_lm {

// Row-major like switchmoe::Matrix<float>, so activations pass to the library without copies.
template <class T>
using MatrixX = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// One trainable tensor and its gradient accumulator, as seen by the optimizer and the tests.
template <class T>
struct ParamRef {
  std::string name;
  MatrixX<T>* value = nullptr;
  MatrixX<T>* grad = nullptr;
  bool weight_decay =
      false;              // AdamW decays matrices of linear maps only (not norms, biases, tables)
  double lr_scale = 1.0;  // multiplies the learning rate of this tensor
  // Which part of a feed-forward layer the tensor belongs to (kDense for the model's own
  // tensors), and the global expert index for routed experts' tensors (-1 otherwise).
  switchmoe::ParameterOwner owner = switchmoe::ParameterOwner::kDense;
  int expert = -1;
};

template <class T>
using ParamList = std::vector<ParamRef<T>>;

// Normal initialization truncated at two standard deviations, as the library does (SEMANTICS rule
// 11), drawn from one std::mt19937_64 stream so that a model's initialization depends only on its
// seed.
template <class T>
void init_truncated_normal(MatrixX<T>& m, double stddev, std::mt19937_64& rng) {
  std::normal_distribution<double> normal(0.0, 1.0);
  for (Eigen::Index i = 0; i < m.size(); ++i) {
    double z = normal(rng);
    while (std::abs(z) > 2.0) z = normal(rng);
    m.data()[i] = static_cast<T>(z * stddev);
  }
}

}  // namespace switch_lm
