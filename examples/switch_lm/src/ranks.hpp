#pragma once
// The processes a run is split over (--expert-parallel, SEMANTICS 21): each Switch layer's experts
// are divided among the ranks, each rank takes a contiguous slice of every batch (in rank order,
// so the slices concatenated are the single-process batch), and every other weight is replicated
// with its gradient summed over the ranks in rank order. Without MPI (SWITCH_LM_EXPERT_PARALLEL
// undefined, set by CMake when switchmoe::distributed exists) only the single process exists and
// every reduction is the identity.

#include <cstddef>
#include <vector>

#ifdef SWITCH_LM_EXPERT_PARALLEL
#include <mpi.h>

#include <switchmoe/distributed.hpp>
#endif

#include "tensor.hpp"

namespace switch_lm {

struct Ranks {
  bool enabled = false;  // --expert-parallel: the Switch layers are ExpertParallelSwitchLayers
  int rank = 0;
  int size = 1;
#ifdef SWITCH_LM_EXPERT_PARALLEL
  MPI_Comm comm = MPI_COMM_NULL;
#endif

  // The contiguous share [begin, end) of `count` items that this rank takes (rank order).
  std::size_t begin(std::size_t count) const {
    return count * static_cast<std::size_t>(rank) / static_cast<std::size_t>(size);
  }
  std::size_t end(std::size_t count) const {
    return count * static_cast<std::size_t>(rank + 1) / static_cast<std::size_t>(size);
  }

  // Sums each entry over the ranks, in rank order (identical on every rank, run after run).
  void sum(std::vector<double>& values) const {
#ifdef SWITCH_LM_EXPERT_PARALLEL
    if (!enabled || size == 1) return;
    std::vector<double> all(values.size() * static_cast<std::size_t>(size));
    MPI_Allgather(values.data(), static_cast<int>(values.size()), MPI_DOUBLE, all.data(),
                  static_cast<int>(values.size()), MPI_DOUBLE, comm);
    for (std::size_t i = 0; i < values.size(); ++i) {
      double total = 0.0;
      for (int r = 0; r < size; ++r) total += all[static_cast<std::size_t>(r) * values.size() + i];
      values[i] = total;
    }
#else
    (void)values;
#endif
  }
  double sum(double value) const {
    std::vector<double> v{value};
    sum(v);
    return v[0];
  }

  // Sums the gradients of the replicated tensors over the ranks (switchmoe::allreduce_gradients,
  // rank order). The routers' gradients are already summed by their layers and each expert lives
  // on one rank only, so both are left out.
  void allreduce_replicated(const ParamList<float>& params) const {
#ifdef SWITCH_LM_EXPERT_PARALLEL
    if (!enabled || size == 1) return;
    std::vector<switchmoe::ParameterRef> replicated;
    for (const auto& p : params) {
      if (is_replicated(p)) {
        switchmoe::ParameterRef ref;
        ref.name = p.name;
        ref.value = p.value;
        ref.grad = p.grad;
        replicated.push_back(ref);
      }
    }
    switchmoe::allreduce_gradients(replicated, comm);
#else
    (void)params;
#endif
  }

  // The global gradient norm: replicated tensors counted once, each expert on its owner.
  double global_grad_norm_squared(const ParamList<float>& params) const {
    double replicated = 0.0, experts = 0.0;
    for (const auto& p : params) {
      const double s = p.grad->cast<double>().squaredNorm();
      (p.owner == switchmoe::ParameterOwner::kExpert ? experts : replicated) += s;
    }
    return replicated + sum(experts);
  }

  static bool is_replicated(const ParamRef<float>& p) {
    return p.owner != switchmoe::ParameterOwner::kRouter &&
           p.owner != switchmoe::ParameterOwner::kExpert;
  }
};

}  // namespace switch_lm
