#pragma once
// AdamW (Loshchilov & Hutter: decoupled weight decay), global gradient-norm clipping, and the
// learning-rate schedule (linear warm-up, then cosine decay to a floor).

#include <cmath>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "tensor.hpp"

namespace switch_lm {

struct AdamWConfig {
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;
};

template <class T>
class AdamW {
 public:
  explicit AdamW(const AdamWConfig& config) : config_(config) {}

  // params must list the same tensors in the same order on every call.
  void step(const ParamList<T>& params, double lr) {
    if (m_.empty()) {
      for (const auto& p : params) {
        m_.push_back(MatrixX<T>::Zero(p.value->rows(), p.value->cols()));
        v_.push_back(MatrixX<T>::Zero(p.value->rows(), p.value->cols()));
      }
    }
    if (m_.size() != params.size())
      throw std::invalid_argument("AdamW::step: params has " + std::to_string(params.size()) +
                                  " tensors, expected " + std::to_string(m_.size()));
    ++t_;
    const double c1 = 1.0 - std::pow(config_.beta1, t_);
    const double c2 = 1.0 - std::pow(config_.beta2, t_);
    const T b1 = static_cast<T>(config_.beta1), b2 = static_cast<T>(config_.beta2);
    const T inv_c2 = static_cast<T>(1.0 / c2);
    const T eps = static_cast<T>(config_.eps);
    for (std::size_t i = 0; i < params.size(); ++i) {
      const double tensor_lr = lr * params[i].lr_scale;
      const T step_size = static_cast<T>(tensor_lr / c1);
      MatrixX<T>& w = *params[i].value;
      const MatrixX<T>& g = *params[i].grad;
      if (params[i].weight_decay) w *= static_cast<T>(1.0 - tensor_lr * config_.weight_decay);
      m_[i].array() = b1 * m_[i].array() + (T(1) - b1) * g.array();
      v_[i].array() = b2 * v_[i].array() + (T(1) - b2) * g.array().square();
      w.array() -= step_size * m_[i].array() / ((v_[i].array() * inv_c2).sqrt() + eps);
    }
  }

  // The state a checkpoint keeps: steps taken and the moments, one per tensor in the order of
  // the params lists (empty before the first step).
  int steps() const { return t_; }
  const std::vector<MatrixX<T>>& first_moments() const { return m_; }
  const std::vector<MatrixX<T>>& second_moments() const { return v_; }

  // Restores a saved state; the next step() must get params whose shapes match the moments.
  void restore(int steps, std::vector<MatrixX<T>> m, std::vector<MatrixX<T>> v) {
    if (steps < 0 || m.size() != v.size() || (steps == 0) != m.empty())
      throw std::invalid_argument("AdamW::restore: steps = " + std::to_string(steps) + " with " +
                                  std::to_string(m.size()) + " first and " +
                                  std::to_string(v.size()) +
                                  " second moments, expected as many of each, none iff steps = 0");
    for (std::size_t i = 0; i < m.size(); ++i)
      if (m[i].rows() != v[i].rows() || m[i].cols() != v[i].cols())
        throw std::invalid_argument("AdamW::restore: moments of tensor " + std::to_string(i) +
                                    " differ in shape");
    t_ = steps;
    m_ = std::move(m);
    v_ = std::move(v);
  }

 private:
  AdamWConfig config_;
  int t_ = 0;
  std::vector<MatrixX<T>> m_, v_;
};

// Scales all gradients so that their global L2 norm is at most max_norm; returns the norm before
// clipping (accumulated in double, in list order: deterministic).
template <class T>
double clip_grad_norm(const ParamList<T>& params, double max_norm) {
  double sum = 0.0;
  for (const auto& p : params) sum += p.grad->template cast<double>().squaredNorm();
  const double norm = std::sqrt(sum);
  if (max_norm > 0.0 && norm > max_norm) {
    const T scale = static_cast<T>(max_norm / (norm + 1e-12));
    for (const auto& p : params) *p.grad *= scale;
  }
  return norm;
}

struct LrSchedule {
  double peak = 1e-3;
  int warmup_steps = 100;
  int total_steps = 1000;
  double final_fraction = 0.1;  // the LR decays to final_fraction * peak at total_steps

  // step counts from 1.
  double at(int step) const {
    if (step <= warmup_steps) return peak * step / std::max(1, warmup_steps);
    const double progress = std::min(
        1.0, static_cast<double>(step - warmup_steps) / std::max(1, total_steps - warmup_steps));
    const double cosine = 0.5 * (1.0 + std::cos(M_PI * progress));
    return peak * (final_fraction + (1.0 - final_fraction) * cosine);
  }
};

}  // namespace switch_lm
