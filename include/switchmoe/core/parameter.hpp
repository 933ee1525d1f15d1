#pragma once
// A named view of one trainable tensor, for optimizers and checkpoint writers.

#include <string>

#include "switchmoe/core/types.hpp"

namespace switchmoe {

/// `value` and `grad` point into the owning layer and have the same shape; they stay valid for
/// the layer's lifetime. Writing through `value` takes effect on the layer's next forward call.
struct ParameterRef {
  std::string name;
  Matrix<float>* value = nullptr;
  Matrix<float>* grad = nullptr;
};

}  // namespace switchmoe
