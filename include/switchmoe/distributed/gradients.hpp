#pragma once
// Deterministic gradient reduction for replicated parameters (SEMANTICS 21): every rank ends
// with the same bits, the sum over ranks taken in rank order, whatever reduction tree
// MPI_Allreduce would have chosen.

#include <mpi.h>

#include <cstdint>
#include <vector>

#include "switchmoe/core/parameter.hpp"
#include "switchmoe/distributed/communicator.hpp"

namespace switchmoe {

/// Collective: replaces each gradient in `params` (skipping buffers, whose grad is nullptr) by
/// its sum over the ranks of `comm`, added in rank order, so every rank holds the same values.
/// Pass the replicated parameters only (e.g. everything but ParameterOwner::kExpert of an
/// expert-parallel layer): the lists must have the same shapes on every rank, which is checked
/// first (every rank throws the same std::invalid_argument otherwise). `scale` multiplies the
/// sums (e.g. 1 / ranks for a mean).
inline void allreduce_gradients(const std::vector<ParameterRef>& params, MPI_Comm comm,
                                float scale = 1.0f) {
  detail::check_mpi_initialized("allreduce_gradients");
  std::int64_t count = 0;
  std::uint64_t shapes = 1469598103934665603ull;  // FNV-1a over the shapes, in list order
  for (const ParameterRef& p : params) {
    if (p.grad == nullptr) continue;
    count += p.grad->size();
    for (const std::uint64_t v :
         {static_cast<std::uint64_t>(p.grad->rows()), static_cast<std::uint64_t>(p.grad->cols())}) {
      shapes = (shapes ^ v) * 1099511628211ull;
    }
  }
  const int size = detail::mpi_size(comm);
  std::vector<std::uint64_t> all(static_cast<std::size_t>(size));
  MPI_Allgather(&shapes, 1, MPI_UINT64_T, all.data(), 1, MPI_UINT64_T, comm);
  for (int r = 1; r < size; ++r) {
    if (all[r] != all[0]) {
      detail::fail("allreduce_gradients: the gradient shapes of rank ", r,
                   " differ from rank 0's; every rank must pass the same parameter list");
    }
  }
  std::vector<float> flat(static_cast<std::size_t>(count)), scratch;
  std::int64_t at = 0;
  for (const ParameterRef& p : params) {
    if (p.grad == nullptr) continue;
    std::copy_n(p.grad->data(), p.grad->size(), flat.data() + at);
    at += p.grad->size();
  }
  detail::sum_in_rank_order(comm, flat.data(), count, scratch);
  at = 0;
  for (const ParameterRef& p : params) {
    if (p.grad == nullptr) continue;
    float* g = p.grad->data();
    for (Eigen::Index i = 0; i < p.grad->size(); ++i) g[i] = scale * flat[at++];
  }
}

/// Collective: copies every value in `params` (parameters and buffers) from rank `root` to the
/// others, e.g. to start replicas from one initialization. Shapes must agree (checked as above).
inline void broadcast_parameters(const std::vector<ParameterRef>& params, MPI_Comm comm,
                                 int root = 0) {
  detail::check_mpi_initialized("broadcast_parameters");
  std::uint64_t shapes = 1469598103934665603ull;
  for (const ParameterRef& p : params) {
    for (const std::uint64_t v : {static_cast<std::uint64_t>(p.value->rows()),
                                  static_cast<std::uint64_t>(p.value->cols())}) {
      shapes = (shapes ^ v) * 1099511628211ull;
    }
  }
  const int size = detail::mpi_size(comm);
  // Like MPI_Bcast, every rank passes the same root: a root out of range fails on every rank,
  // before any collective.
  if (root < 0 || root >= size) {
    detail::fail("broadcast_parameters: root is ", root, ", expected in [0, ", size, ")");
  }
  // Like MPI_Bcast, every rank passes the same root: a root out of range fails on every rank,
  // before any collective.
  if (root < 0 || root >= size) {
    detail::fail("broadcast_parameters: root is ", root, ", expected in [0, ", size, ")");
  }
  std::vector<std::uint64_t> all(static_cast<std::size_t>(size));
  MPI_Allgather(&shapes, 1, MPI_UINT64_T, all.data(), 1, MPI_UINT64_T, comm);
  for (int r = 0; r < size; ++r) {
    if (all[r] != all[root]) {
      detail::fail("broadcast_parameters: the parameter shapes of rank ", r, " differ from rank ",
                   root, "'s; every rank must pass the same parameter list");
    }
  }
  for (const ParameterRef& p : params) {
    MPI_Bcast(p.value->data(), static_cast<int>(p.value->size()), MPI_FLOAT, root, comm);
  }
}

}  // namespace switchmoe
