#pragma once
// The MPI exchange (SEMANTICS 21): the exchange concept of dispatch/exchange.hpp over an MPI
// communicator of P ranks. Rank r owns experts [r E / P, (r + 1) E / P). Each trip sends the
// counts first (MPI_Alltoall of rows per (destination, local expert)), then the rows
// (MPI_Alltoallv of whole rows, one derived datatype per row). Rows travel in the policy's
// element type both ways: bfloat16 as 16-bit payloads under Bf16 (the forward input is
// bfloat16 already; the expert outputs and both gradients are rounded once per trip, even for
// rows a rank sends to itself, so results do not depend on where an expert lives), float32
// under Fp32 (every trip exact).
//
// Order: an owner receives, for each of its experts, the rows of rank 0 first, then rank 1's,
// ..., each in the sender's plan order. With groups per rank and tokens concatenated in rank
// order, that is exactly the order one process would give the expert's rows, so each expert's
// GEMMs see the same matrix and produce the same bits (SEMANTICS 21).
//
// Buffers grow to the largest call seen and are reused: no steady-state allocation.

#include <mpi.h>

#include <cstdint>
#include <exception>
#include <type_traits>
#include <vector>

#include "switchmoe/core/buffer.hpp"
#include "switchmoe/core/parameter.hpp"
#include "switchmoe/core/precision.hpp"
#include "switchmoe/dispatch/exchange.hpp"
#include "switchmoe/distributed/communicator.hpp"
#include "switchmoe/layers/stats.hpp"
#include "switchmoe/routing/options.hpp"

namespace switchmoe {

template <class Policy = Fp32>
class MpiExchange {
  static_assert(is_precision_v<Policy>,
                "MpiExchange's template argument must be a switchmoe precision policy.");

 public:
  using PolicyType = Policy;
  using Element = typename Policy::Element;  // the wire type of every row

  /// Not collective. Throws std::invalid_argument (on every rank alike, given the same
  /// arguments) if MPI is not initialized or `num_experts` is not a multiple of the ranks.
  MpiExchange(MPI_Comm comm, int num_experts) : comm_(comm), num_experts_(num_experts) {
    detail::check_mpi_initialized("MpiExchange");
    if (comm == MPI_COMM_NULL) detail::fail("MpiExchange: comm is MPI_COMM_NULL");
    rank_ = detail::mpi_rank(comm);
    size_ = detail::mpi_size(comm);
    if (num_experts < 1 || num_experts % size_ != 0) {
      detail::fail("num_experts is ", num_experts, ", expected a positive multiple of the ", size_,
                   " ranks (each rank owns E / P experts, SEMANTICS 21)");
    }
    local_ = num_experts / size_;
    const std::size_t p = static_cast<std::size_t>(size_);
    call_.resize(3 * p);
    losses_.resize(4 * p);
    send_expert_counts_.resize(static_cast<std::size_t>(num_experts));
    recv_expert_counts_.resize(static_cast<std::size_t>(num_experts));
    send_counts_.resize(p);
    send_displs_.resize(p);
    recv_counts_.resize(p);
    recv_displs_.resize(p);
    staged_start_.resize(static_cast<std::size_t>(num_experts));
    grouped_start_.resize(static_cast<std::size_t>(num_experts));
    local_offsets_.resize(static_cast<std::size_t>(local_) + 1);
  }

  MpiExchange(const MpiExchange&) = delete;
  MpiExchange& operator=(const MpiExchange&) = delete;
  MpiExchange(MpiExchange&& other) noexcept { *this = std::move(other); }
  MpiExchange& operator=(MpiExchange&& other) noexcept {
    if (this != &other) {
      free_row_type();
      comm_ = other.comm_;
      rank_ = other.rank_;
      size_ = other.size_;
      num_experts_ = other.num_experts_;
      local_ = other.local_;
      row_type_ = other.row_type_;
      row_type_cols_ = other.row_type_cols_;
      other.row_type_ = MPI_DATATYPE_NULL;
      other.row_type_cols_ = -1;
      total_tokens_ = other.total_tokens_;
      positions_ = other.positions_;
      call_ = std::move(other.call_);
      losses_ = std::move(other.losses_);
      stats_ = std::move(other.stats_);
      merged_ = std::move(other.merged_);
      sum_scratch_ = std::move(other.sum_scratch_);
      send_expert_counts_ = std::move(other.send_expert_counts_);
      recv_expert_counts_ = std::move(other.recv_expert_counts_);
      send_counts_ = std::move(other.send_counts_);
      send_displs_ = std::move(other.send_displs_);
      recv_counts_ = std::move(other.recv_counts_);
      recv_displs_ = std::move(other.recv_displs_);
      staged_start_ = std::move(other.staged_start_);
      grouped_start_ = std::move(other.grouped_start_);
      local_offsets_ = std::move(other.local_offsets_);
      recv_keys_ = std::move(other.recv_keys_);
      staged_keys_ = std::move(other.staged_keys_);
      received_rows_ = std::move(other.received_rows_);
      staged_ = std::move(other.staged_);
      wire_ = std::move(other.wire_);
      expert_out_ = std::move(other.expert_out_);
      received_dy_ = std::move(other.received_dy_);
      expert_dx_ = std::move(other.expert_dx_);
      stash_ = std::move(other.stash_);
      replicated_ = std::move(other.replicated_);
      gathered_ = std::move(other.gathered_);
    }
    return *this;
  }
  ~MpiExchange() { free_row_type(); }

  MPI_Comm comm() const { return comm_; }
  int rank() const { return rank_; }
  int num_ranks() const { return size_; }
  int first_expert(int num_experts) const {
    check_experts(num_experts);
    return rank_ * local_;
  }
  int num_local_experts(int num_experts) const {
    check_experts(num_experts);
    return local_;
  }
  /// Tokens of all ranks in the current call (after begin_call).
  std::int64_t total_tokens() const { return total_tokens_; }

  /// Collective: agrees on the ranks' validation errors (every rank throws the first failing
  /// rank's message) and on the mode (training and evaluation calls run different collectives),
  /// and returns the global index of this rank's first token: the exclusive scan of the token
  /// counts in rank order. One MPI_Allgather.
  std::int64_t begin_call(Eigen::Index tokens, Mode mode, const std::exception_ptr& error) {
    const std::int64_t mine[3] = {error ? 1 : 0, static_cast<std::int64_t>(tokens),
                                  static_cast<std::int64_t>(mode)};
    MPI_Allgather(mine, 3, MPI_INT64_T, call_.data(), 3, MPI_INT64_T, comm_);
    for (int r = 0; r < size_; ++r) {
      if (call_[3 * r] != 0) detail::throw_agreed(comm_, r, error);
    }
    for (int r = 1; r < size_; ++r) {
      if (call_[3 * r + 2] != call_[2]) {
        detail::fail("mode differs between ranks: rank 0 calls with Mode(", call_[2], "), rank ", r,
                     " with Mode(", call_[3 * r + 2], "); every rank must call in the same mode");
      }
    }
    std::int64_t first = 0;
    total_tokens_ = 0;
    for (int r = 0; r < size_; ++r) {
      if (r == rank_) first = total_tokens_;
      total_tokens_ += call_[3 * r + 1];
    }
    return first;
  }

  /// The most rows this rank's experts can receive in the current call: every rank's most rows
  /// (`rows_for_tokens` of its token count, known since begin_call), all sent here.
  template <class RowsForTokens>
  Eigen::Index max_received_rows(Eigen::Index /*tokens*/,
                                 const RowsForTokens& rows_for_tokens) const {
    Eigen::Index most = 0;
    for (int r = 0; r < size_; ++r) most += rows_for_tokens(call_[3 * r + 1]);
    return most;
  }

  /// Collective: every rank throws the first failing rank's message if any rank failed.
  void agree(const std::exception_ptr& error) { detail::agree_on_error(comm_, error); }

  /// Collective: the global losses (SEMANTICS 21: aux the mean over all groups of all ranks, z
  /// the mean over all tokens) into `routing`, and this rank's share of them into `scale`, so
  /// that backward passes back d(global loss)/d(this rank's logits).
  void reduce_losses(Routing& routing, LossScale& scale) {
    positions_ = static_cast<int>(routing.top_k());  // rows per token at most, for reserve()
    const double groups = static_cast<double>(routing.num_groups());
    const double tokens = static_cast<double>(routing.num_tokens());
    const double mine[4] = {static_cast<double>(routing.aux_loss) * groups,
                            static_cast<double>(routing.z_loss) * tokens, groups, tokens};
    MPI_Allgather(mine, 4, MPI_DOUBLE, losses_.data(), 4, MPI_DOUBLE, comm_);
    double aux = 0.0, z = 0.0, all_groups = 0.0, all_tokens = 0.0;
    for (int r = 0; r < size_; ++r) {  // rank order: the same bits on every rank
      aux += losses_[4 * r];
      z += losses_[4 * r + 1];
      all_groups += losses_[4 * r + 2];
      all_tokens += losses_[4 * r + 3];
    }
    routing.aux_loss = all_groups > 0 ? static_cast<float>(aux / all_groups) : 0.0f;
    routing.z_loss = all_tokens > 0 ? static_cast<float>(z / all_tokens) : 0.0f;
    scale.groups = static_cast<std::int64_t>(all_groups);
    scale.tokens = static_cast<std::int64_t>(all_tokens);
  }

  /// Collective: the statistics of all ranks' tokens, merged in rank order. The losses in
  /// `stats` are already the global ones (reduce_losses ran first) and are kept.
  void reduce_stats(RoutingStats& stats) {
    const std::size_t e = stats.tokens_per_expert.size();
    const std::size_t n = 2 * e + 7;  // per-expert counts, then the scalar counts
    stats_.resize(n * static_cast<std::size_t>(size_ + 1));
    double* mine = stats_.data() + n * static_cast<std::size_t>(size_);
    for (std::size_t i = 0; i < e; ++i) {
      mine[i] = stats.tokens_per_expert[i];
      mine[e + i] = stats.kept_tokens_per_expert[i];
    }
    double* scalars = mine + 2 * e;
    scalars[0] = static_cast<double>(stats.tokens);
    scalars[1] = static_cast<double>(stats.choices);
    scalars[2] = static_cast<double>(stats.kept_choices);
    scalars[3] = static_cast<double>(stats.dropped_tokens);
    scalars[4] = static_cast<double>(stats.groups);
    scalars[5] = stats.slots;
    scalars[6] = stats.gate_sum;
    MPI_Allgather(mine, static_cast<int>(n), MPI_DOUBLE, stats_.data(), static_cast<int>(n),
                  MPI_DOUBLE, comm_);
    const float aux = stats.aux_loss, z = stats.z_loss;
    merged_.tokens_per_expert.assign(e, 0);
    merged_.kept_tokens_per_expert.assign(e, 0);
    merged_.tokens = merged_.choices = merged_.kept_choices = merged_.dropped_tokens = 0;
    merged_.groups = 0;
    merged_.slots = merged_.gate_sum = 0.0;
    merged_.aux_loss = merged_.z_loss = 0.0f;
    for (int r = 0; r < size_; ++r) {
      const double* part = stats_.data() + n * static_cast<std::size_t>(r);
      for (std::size_t i = 0; i < e; ++i) {
        stats.tokens_per_expert[i] = static_cast<int>(part[i]);
        stats.kept_tokens_per_expert[i] = static_cast<int>(part[e + i]);
      }
      const double* s = part + 2 * e;
      stats.tokens = static_cast<std::int64_t>(s[0]);
      stats.choices = static_cast<std::int64_t>(s[1]);
      stats.kept_choices = static_cast<std::int64_t>(s[2]);
      stats.dropped_tokens = static_cast<std::int64_t>(s[3]);
      stats.groups = static_cast<std::int64_t>(s[4]);
      stats.slots = s[5];
      stats.gate_sum = s[6];
      merged_.merge(stats);
    }
    stats.tokens_per_expert.swap(merged_.tokens_per_expert);
    stats.kept_tokens_per_expert.swap(merged_.kept_tokens_per_expert);
    stats.tokens = merged_.tokens;
    stats.choices = merged_.choices;
    stats.kept_choices = merged_.kept_choices;
    stats.dropped_tokens = merged_.dropped_tokens;
    stats.groups = merged_.groups;
    stats.slots = merged_.slots;
    stats.gate_sum = merged_.gate_sum;
    stats.aux_loss = aux;
    stats.z_loss = z;
    stats.update_fractions();
  }

  /// Collective: values[i] = the sum over ranks, in rank order (the same bits everywhere).
  void sum(double* values, int count) {
    detail::sum_in_rank_order(comm_, values, count, sum_scratch_);
  }

  /// Forward trip: the plan-order rows [rows, d_model] (grouped by global expert by `offsets`
  /// [E + 1]) and their dropout keys to the experts' owners. Collective.
  template <class T>
  ExpertInput<T> dispatch(const detail::RowBuffer<T>& rows, const std::vector<int>& offsets,
                          const std::vector<std::uint64_t>& keys) {
    static_assert(std::is_same_v<T, Element>, "rows must be in the policy's element type");
    const int d = static_cast<int>(rows.cols());
    exchange_counts(offsets, d);
    reserve(d);
    const Eigen::Index received = local_offsets_.back();
    received_rows_.resize(received, d);
    to_owners(rows.data(), received_rows_.data(), d);
    // The keys follow the rows (one per row: counts in rows, MPI_UINT64_T).
    recv_keys_.resize(static_cast<std::size_t>(received));
    staged_keys_.resize(static_cast<std::size_t>(received));
    MPI_Alltoallv(keys.data(), send_counts_.data(), send_displs_.data(), MPI_UINT64_T,
                  staged_keys_.data(), recv_counts_.data(), recv_displs_.data(), MPI_UINT64_T,
                  comm_);
    for_each_block([&](Eigen::Index staged, Eigen::Index grouped, int count) {
      std::copy_n(staged_keys_.data() + staged, count, recv_keys_.data() + grouped);
    });
    return received_input();
  }

  /// The rows the experts received in the last dispatch (for backward).
  template <class T>
  ExpertInput<T> received(const detail::RowBuffer<T>& /*rows*/, const std::vector<int>& /*offsets*/,
                          const std::vector<std::uint64_t>& /*keys*/) {
    static_assert(std::is_same_v<T, Element>, "rows must be in the policy's element type");
    return received_input();
  }

  /// Where the experts write their float output for the received rows [received, d_model].
  Eigen::Map<Matrix<float>> expert_output(detail::RowBuffer<float>& output) {
    auto view = expert_out_.resize(local_offsets_.back(), output.cols());
    return Eigen::Map<Matrix<float>>(view.data(), view.rows(), view.cols());
  }
  /// Return trip: the experts' output back to the senders, into `output` [rows, d_model] in
  /// plan order. Collective.
  void return_output(detail::RowBuffer<float>& output) {
    to_senders(expert_out_.data(), output.data(), static_cast<int>(output.cols()));
  }

  /// Backward trip out: dy of the plan-order rows [rows, d_model] to the owners; returns the
  /// received rows' dy [received, d_model] grouped by local expert. Collective.
  Eigen::Map<const Matrix<float>> dispatch_gradient(const detail::RowBuffer<float>& dy) {
    const int d = static_cast<int>(dy.cols());
    received_dy_.resize(local_offsets_.back(), d);
    to_owners(dy.data(), received_dy_.data(), d);
    return Eigen::Map<const Matrix<float>>(received_dy_.data(), received_dy_.rows(), d);
  }
  /// Where the experts write dx of the received rows [received, d_model].
  Eigen::Map<Matrix<float>> expert_input_gradient(detail::RowBuffer<float>& dx) {
    auto view = expert_dx_.resize(local_offsets_.back(), dx.cols());
    return Eigen::Map<Matrix<float>>(view.data(), view.rows(), view.cols());
  }
  /// Backward trip back: dx of the received rows to the senders, into `dx` in plan order.
  void return_input_gradient(detail::RowBuffer<float>& dx) {
    to_senders(expert_dx_.data(), dx.data(), static_cast<int>(dx.cols()));
  }

  /// Around the router's backward: keep what its gradients held, let the router accumulate this
  /// call's gradient alone, then sum that over ranks in rank order and add the kept values
  /// back, so every rank holds the same router gradient.
  void begin_replicated_backward(const std::vector<ParameterRef>& params) {
    std::size_t n = 0;
    for (const ParameterRef& p : params) {
      if (p.grad != nullptr) n += static_cast<std::size_t>(p.grad->size());
    }
    stash_.resize(n);
    std::size_t at = 0;
    for (const ParameterRef& p : params) {
      if (p.grad == nullptr) continue;
      std::copy_n(p.grad->data(), p.grad->size(), stash_.data() + at);
      at += static_cast<std::size_t>(p.grad->size());
      p.grad->setZero();
    }
  }
  void end_replicated_backward(const std::vector<ParameterRef>& params) {
    replicated_.resize(stash_.size());
    std::size_t at = 0;
    for (const ParameterRef& p : params) {
      if (p.grad == nullptr) continue;
      std::copy_n(p.grad->data(), p.grad->size(), replicated_.data() + at);
      at += static_cast<std::size_t>(p.grad->size());
    }
    detail::sum_in_rank_order(comm_, replicated_.data(), static_cast<std::int64_t>(at), gathered_);
    at = 0;
    for (const ParameterRef& p : params) {
      if (p.grad == nullptr) continue;
      float* g = p.grad->data();
      for (Eigen::Index i = 0; i < p.grad->size(); ++i, ++at) g[i] = stash_[at] + replicated_[at];
    }
  }

 private:
  void check_experts(int num_experts) const {
    if (num_experts != num_experts_) {
      detail::fail("MpiExchange serves ", num_experts_, " experts, asked about ", num_experts);
    }
  }

  ExpertInput<Element> received_input() const {
    return ExpertInput<Element>{
        Eigen::Map<const Matrix<Element>>(received_rows_.data(), received_rows_.rows(),
                                          received_rows_.cols()),
        local_offsets_, recv_keys_};
  }

  /// The datatype of one row of d elements on the wire (created when d changes).
  MPI_Datatype row_type(int d) {
    if (d != row_type_cols_) {
      free_row_type();
      MPI_Type_contiguous(d, detail::mpi_wire_type<Element>(), &row_type_);
      MPI_Type_commit(&row_type_);
      row_type_cols_ = d;
    }
    return row_type_;
  }
  void free_row_type() {
    if (row_type_ == MPI_DATATYPE_NULL) return;
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Type_free(&row_type_);
    row_type_ = MPI_DATATYPE_NULL;
    row_type_cols_ = -1;
  }

  /// Room for the most rows any call with this many tokens can bring (every token of every
  /// rank with all its positions kept, all to this rank), so that the buffers stop growing.
  void reserve(int d) {
    const Eigen::Index most = static_cast<Eigen::Index>(total_tokens_) * positions_;
    for (detail::RowBuffer<Element>* b : {&received_rows_, &staged_, &wire_}) b->reserve(most * d);
    for (detail::RowBuffer<float>* b : {&expert_out_, &received_dy_, &expert_dx_}) {
      b->reserve(most * d);
    }
    recv_keys_.reserve(static_cast<std::size_t>(most));
    staged_keys_.reserve(static_cast<std::size_t>(most));
  }

  /// Counts first: rows per (destination, local expert) with MPI_Alltoall, then the send and
  /// receive layouts of the row trips (kept for the return and backward trips).
  void exchange_counts(const std::vector<int>& offsets, int d) {
    for (int e = 0; e < num_experts_; ++e) send_expert_counts_[e] = offsets[e + 1] - offsets[e];
    MPI_Alltoall(send_expert_counts_.data(), local_, MPI_INT, recv_expert_counts_.data(), local_,
                 MPI_INT, comm_);
    for (int r = 0; r < size_; ++r) {
      send_displs_[r] = offsets[r * local_];
      send_counts_[r] = offsets[(r + 1) * local_] - offsets[r * local_];
    }
    // Received rows arrive source-major (rank 0's rows of each local expert, then rank 1's);
    // the experts want them expert-major, source order within each expert.
    int staged = 0;
    for (int s = 0; s < size_; ++s) {
      recv_displs_[s] = staged;
      for (int l = 0; l < local_; ++l) {
        staged_start_[s * local_ + l] = staged;
        staged += recv_expert_counts_[s * local_ + l];
      }
      recv_counts_[s] = staged - recv_displs_[s];
    }
    int grouped = 0;
    for (int l = 0; l < local_; ++l) {
      local_offsets_[l] = grouped;
      for (int s = 0; s < size_; ++s) {
        grouped_start_[s * local_ + l] = grouped;
        grouped += recv_expert_counts_[s * local_ + l];
      }
    }
    local_offsets_[local_] = grouped;
    row_type(d);
  }

  /// Calls f(staged row, grouped row, count) for every (source rank, local expert) block.
  template <class F>
  void for_each_block(const F& f) const {
    for (int b = 0; b < size_ * local_; ++b) {
      if (recv_expert_counts_[b] > 0)
        f(staged_start_[b], grouped_start_[b], recv_expert_counts_[b]);
    }
  }

  /// Plan-order rows `send` (S: Element or float) to the owners; they land grouped by local
  /// expert in `grouped` (G: Element or float), through the wire type.
  template <class S, class G>
  void to_owners(const S* send, G* grouped, int d) {
    const Eigen::Index sent = send_displs_[size_ - 1] + send_counts_[size_ - 1];
    const Element* wire_send;
    if constexpr (std::is_same_v<S, Element>) {
      wire_send = send;
    } else {  // float rows under Bf16: one rounding (SEMANTICS 13)
      auto w = wire_.resize(sent, d);
      convert(send, w.data(), w.size());
      wire_send = w.data();
    }
    const Eigen::Index received = local_offsets_.back();
    Element* staged = staged_.resize(received, d).data();
    MPI_Alltoallv(wire_send, send_counts_.data(), send_displs_.data(), row_type_, staged,
                  recv_counts_.data(), recv_displs_.data(), row_type_, comm_);
    for_each_block([&](Eigen::Index from, Eigen::Index to, int count) {
      convert(staged + from * d, grouped + to * d, static_cast<Eigen::Index>(count) * d);
    });
  }

  /// The reverse: float rows grouped by local expert back to their senders, into `plan_order`
  /// (float, [sent rows, d]).
  void to_senders(const float* grouped, float* plan_order, int d) {
    const Eigen::Index received = local_offsets_.back();
    Element* staged = staged_.resize(received, d).data();
    for_each_block([&](Eigen::Index to, Eigen::Index from, int count) {
      convert(grouped + from * d, staged + to * d, static_cast<Eigen::Index>(count) * d);
    });
    const Eigen::Index sent = send_displs_[size_ - 1] + send_counts_[size_ - 1];
    Element* wire_recv;
    if constexpr (std::is_same_v<Element, float>) {
      wire_recv = plan_order;
    } else {
      wire_recv = wire_.resize(sent, d).data();
    }
    MPI_Alltoallv(staged, recv_counts_.data(), recv_displs_.data(), row_type_, wire_recv,
                  send_counts_.data(), send_displs_.data(), row_type_, comm_);
    if constexpr (!std::is_same_v<Element, float>) convert(wire_recv, plan_order, sent * d);
  }

  template <class From, class To>
  static void convert(const From* from, To* to, Eigen::Index n) {
    for (Eigen::Index i = 0; i < n; ++i) to[i] = static_cast<To>(from[i]);
  }

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1, num_experts_ = 0, local_ = 0;
  MPI_Datatype row_type_ = MPI_DATATYPE_NULL;
  int row_type_cols_ = -1;
  std::int64_t total_tokens_ = 0;
  int positions_ = 1;               // choice positions per token of the current routing (top_k)
  std::vector<std::int64_t> call_;  // [ranks * 3] error flag, token count and mode of each rank
  std::vector<double> losses_;      // [ranks * 4] aux * groups, z * tokens, groups, tokens
  std::vector<double> stats_;       // [(ranks + 1) * (2 E + 7)] packed statistics
  RoutingStats merged_;
  std::vector<double> sum_scratch_;
  // Layout of the last dispatch, reused by the return and backward trips.
  std::vector<int> send_expert_counts_;  // [E] rows this rank sends to each global expert
  std::vector<int> recv_expert_counts_;  // [ranks * local] rows from rank s for local expert l
  std::vector<int> send_counts_, send_displs_;          // [ranks] rows to each rank, plan order
  std::vector<int> recv_counts_, recv_displs_;          // [ranks] rows from each rank, source-major
  std::vector<int> staged_start_, grouped_start_;       // [ranks * local] block starts, in rows
  std::vector<int> local_offsets_;                      // [local + 1] received rows of each expert
  std::vector<std::uint64_t> recv_keys_, staged_keys_;  // [received] dropout keys
  detail::RowBuffer<Element> received_rows_;  // [received, d_model] grouped by local expert
  detail::RowBuffer<Element> staged_;         // [received, d_model] source-major, wire type
  detail::RowBuffer<Element> wire_;           // [sent, d_model] plan order, wire type (Bf16)
  detail::RowBuffer<float> expert_out_;       // [received, d_model] the experts' output
  detail::RowBuffer<float> received_dy_;      // [received, d_model] dy of the received rows
  detail::RowBuffer<float> expert_dx_;        // [received, d_model] dx of the received rows
  std::vector<float> stash_, replicated_, gathered_;  // replicated gradients (router)
};

}  // namespace switchmoe
