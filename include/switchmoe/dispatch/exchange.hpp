#pragma once
// The exchange part of a Switch layer (SEMANTICS 21): it carries the gathered rows from the
// process that holds their tokens to the process that owns their expert and back, and combines
// the per-call quantities that are global under expert parallelism (token offsets, losses,
// statistics, the replicated router's gradient, errors). A layer calls it at fixed points of
// forward and backward; the exchange decides what crosses process boundaries.
//
// LocalExchange is the single-process exchange: every expert is local, every trip is the
// identity and costs nothing (the experts read the gathered buffer itself), every reduction is
// over one process. The MPI exchange (switchmoe/distributed.hpp) has the same members.
//
// Members a layer relies on (the exchange concept):
//   int rank(), num_ranks(); int first_expert(E), num_local_experts(E)
//   std::int64_t begin_call(tokens, mode, error)  collective: agree on errors, return the global
//                                           index of this process's first token
//   max_received_rows(tokens, bound)        the most rows the local experts can receive
//   void agree(error)                       collective: rethrow one process's error everywhere
//   void reduce_losses(Routing&, LossScale&) the global aux and z losses, and the factors that
//                                           turn their coefficients into this process's share
//   void reduce_stats(RoutingStats&)        the statistics of all processes' tokens
//   void sum(double*, n)                    a deterministic sum over processes (rank order)
//   dispatch / expert_output / return_output: the forward trips of the rows; received: the
//                                           rows of the last dispatch again, for backward
//   dispatch_gradient / expert_input_gradient / return_input_gradient: the backward trips
//   begin_replicated_backward / end_replicated_backward: sum the router's gradient over ranks

#include <cstdint>
#include <exception>
#include <vector>

#include "switchmoe/core/buffer.hpp"
#include "switchmoe/core/parameter.hpp"
#include "switchmoe/layers/stats.hpp"
#include "switchmoe/routing/options.hpp"

namespace switchmoe {

/// What the experts of this process receive for one call: rows grouped by local expert.
template <class T>
struct ExpertInput {
  Eigen::Map<const Matrix<T>> rows;                // [received rows, d_model]
  const std::vector<int>& offsets;                 // [local experts + 1] row blocks
  const std::vector<std::uint64_t>& dropout_keys;  // [received rows] (SEMANTICS 12, 21)
};

/// The denominators of the global losses (SEMANTICS 21): aux is a mean over all groups of all
/// processes, z a mean over all tokens, so each process's backward divides by those totals and
/// passes back exactly its share (bitwise what one process over all tokens computes). 0: this
/// call's own groups and tokens (one process).
struct LossScale {
  std::int64_t groups = 0;
  std::int64_t tokens = 0;
};

class LocalExchange {
 public:
  int rank() const { return 0; }
  int num_ranks() const { return 1; }
  int first_expert(int /*num_experts*/) const { return 0; }
  int num_local_experts(int num_experts) const { return num_experts; }

  /// Starts a call over `tokens` tokens in `mode`. `error` is the validation error of this
  /// process's input (null if valid): it is rethrown (on every process, for a distributed
  /// exchange, which also requires every process to call in the same mode), so that no process
  /// enters a collective that another one has left.
  std::int64_t begin_call(Eigen::Index /*tokens*/, Mode /*mode*/, const std::exception_ptr& error) {
    agree(error);
    return 0;
  }
  void agree(const std::exception_ptr& error) {
    if (error) std::rethrow_exception(error);
  }

  /// The most rows this process's experts can receive in the current call, given the most rows
  /// a process with `n` tokens can send (`rows_for_tokens(n)`): locally, its own.
  template <class RowsForTokens>
  Eigen::Index max_received_rows(Eigen::Index tokens, const RowsForTokens& rows_for_tokens) const {
    return rows_for_tokens(tokens);
  }

  void reduce_losses(Routing& /*routing*/, LossScale& scale) { scale = LossScale{}; }
  void reduce_stats(RoutingStats& /*stats*/) {}
  void sum(double* /*values*/, int /*count*/) {}

  /// Forward trip: `rows` [rows, d_model] in plan order, grouped by global expert with
  /// `offsets` [experts + 1], each with its dropout key. Locally the experts read them in place.
  template <class T>
  ExpertInput<T> dispatch(const detail::RowBuffer<T>& rows, const std::vector<int>& offsets,
                          const std::vector<std::uint64_t>& keys) {
    return ExpertInput<T>{Eigen::Map<const Matrix<T>>(rows.data(), rows.rows(), rows.cols()),
                          offsets, keys};
  }
  /// The rows the experts received in the last dispatch (for backward).
  template <class T>
  ExpertInput<T> received(const detail::RowBuffer<T>& rows, const std::vector<int>& offsets,
                          const std::vector<std::uint64_t>& keys) {
    return dispatch(rows, offsets, keys);
  }
  /// Where the experts write their output for the received rows; `output` is the layer's
  /// plan-order buffer, already [rows, d_model] (locally the experts write straight into it).
  Eigen::Map<Matrix<float>> expert_output(detail::RowBuffer<float>& output) {
    return Eigen::Map<Matrix<float>>(output.data(), output.rows(), output.cols());
  }
  /// Return trip: the experts' output back into `output` in plan order.
  void return_output(detail::RowBuffer<float>& /*output*/) {}

  /// Backward trips, mirroring the forward ones: the gradient of the expert outputs (plan order)
  /// to the experts, and the gradient of their inputs back.
  Eigen::Map<const Matrix<float>> dispatch_gradient(const detail::RowBuffer<float>& dy) {
    return Eigen::Map<const Matrix<float>>(dy.data(), dy.rows(), dy.cols());
  }
  Eigen::Map<Matrix<float>> expert_input_gradient(detail::RowBuffer<float>& dx) {
    return Eigen::Map<Matrix<float>>(dx.data(), dx.rows(), dx.cols());
  }
  void return_input_gradient(detail::RowBuffer<float>& /*dx*/) {}

  /// Around the backward of replicated parameters (the router): a distributed exchange sums
  /// this call's gradient over processes, so that every copy gets the same update.
  void begin_replicated_backward(const std::vector<ParameterRef>& /*params*/) {}
  void end_replicated_backward(const std::vector<ParameterRef>& /*params*/) {}
};

}  // namespace switchmoe
