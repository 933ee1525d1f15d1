#pragma once
// The library's single level of OpenMP parallelism for element-wise work. Every iteration is
// independent, so results never depend on the thread count.

#include <Eigen/Core>

namespace switchmoe {
namespace detail {

/// Runs body(i) for i in [0, n); in parallel when there is enough work and we are not already
/// inside a parallel region.
template <class Body>
void parallel_for(Eigen::Index n, Eigen::Index work_per_item, const Body& body) {
  constexpr Eigen::Index kMinParallelWork = 1 << 15;
  const bool parallel = n > 1 && n * work_per_item >= kMinParallelWork;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (parallel)
#endif
  for (Eigen::Index i = 0; i < n; ++i) body(i);
  (void)parallel;
}

}  // namespace detail
}  // namespace switchmoe
