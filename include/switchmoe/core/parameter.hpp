#pragma once
// A named view of one tensor of a layer's state, for optimizers and checkpoint writers. Each
// view says what the tensor is (its role and owner, and the expert it belongs to), so that an
// optimizer (weight decay on matrices only) or a checkpoint writer (SEMANTICS 22) never has to
// match names.

#include <string>

#include "switchmoe/core/types.hpp"

namespace switchmoe {

/// What a tensor is: a weight matrix, a bias vector, or a buffer (layer state that is not
/// trained by gradient, e.g. rule 19's balancing bias; `grad` is nullptr).
enum class ParameterRole { kWeight, kBias, kBuffer };

/// Which part of the layer a tensor belongs to.
enum class ParameterOwner {
  kRouter,  // the router (replicated across ranks under expert parallelism)
  kExpert,  // one routed expert; ParameterRef::expert is its global index
  kShared,  // the always-on shared expert (SEMANTICS 16) or its gate
  kDense,   // a dense FFN
};

inline const char* to_string(ParameterRole role) {
  switch (role) {
    case ParameterRole::kWeight:
      return "weight";
    case ParameterRole::kBias:
      return "bias";
    case ParameterRole::kBuffer:
      return "buffer";
  }
  return "unknown";
}

inline const char* to_string(ParameterOwner owner) {
  switch (owner) {
    case ParameterOwner::kRouter:
      return "router";
    case ParameterOwner::kExpert:
      return "expert";
    case ParameterOwner::kShared:
      return "shared";
    case ParameterOwner::kDense:
      return "dense";
  }
  return "unknown";
}

/// `value` and `grad` point into the owning layer and have the same shape; they stay valid for
/// the layer's lifetime. Writing through `value` takes effect on the layer's next forward call.
/// A parameter's shape is fixed by the layer's configuration: resizing `*value` or `*grad` makes
/// the next forward or backward throw std::invalid_argument naming the tensor.
struct ParameterRef {
  std::string name;
  Matrix<float>* value = nullptr;  // [rows, cols], float32 master
  Matrix<float>* grad = nullptr;   // same shape; nullptr for buffers
  ParameterRole role = ParameterRole::kWeight;
  ParameterOwner owner = ParameterOwner::kRouter;
  int expert = -1;  // global expert index when owner is kExpert, -1 otherwise

  /// Matrices are the tensors that weight decay applies to.
  bool is_weight() const { return role == ParameterRole::kWeight; }
};

}  // namespace switchmoe
