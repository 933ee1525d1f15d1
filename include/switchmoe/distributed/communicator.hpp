#pragma once
// The MPI pieces the distributed parts share: the wire type of an element, agreement on errors
// (so that no rank enters a collective another one has left), and a sum over ranks in a fixed
// rank order (MPI_Allreduce may pick any reduction tree, and float addition is not
// associative, so its result may depend on the algorithm and the process count).

#include <mpi.h>

#include <Eigen/Core>
#include <algorithm>
#include <cstdint>
#include <exception>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "switchmoe/core/types.hpp"

namespace switchmoe {
namespace detail {

/// The MPI datatype an element travels as: bfloat16 as its 16 raw bits (SEMANTICS 13, 21).
template <class T>
MPI_Datatype mpi_wire_type() {
  if constexpr (std::is_same_v<T, float>) {
    return MPI_FLOAT;
  } else if constexpr (std::is_same_v<T, Eigen::bfloat16>) {
    static_assert(sizeof(Eigen::bfloat16) == sizeof(std::uint16_t),
                  "bfloat16 must be 16 bits to travel as MPI_UINT16_T.");
    return MPI_UINT16_T;
  } else if constexpr (std::is_same_v<T, double>) {
    return MPI_DOUBLE;
  } else if constexpr (std::is_same_v<T, std::int64_t>) {
    return MPI_INT64_T;
  } else if constexpr (std::is_same_v<T, std::uint64_t>) {
    return MPI_UINT64_T;
  } else {
    static_assert(std::is_same_v<T, int>, "no MPI wire type for this element type");
    return MPI_INT;
  }
}

inline void check_mpi_initialized(const char* who) {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (!initialized || finalized) {
    fail(who, " needs MPI: call MPI_Init before and MPI_Finalize after using it");
  }
}

inline int mpi_rank(MPI_Comm comm) {
  int rank = 0;
  MPI_Comm_rank(comm, &rank);
  return rank;
}

inline int mpi_size(MPI_Comm comm) {
  int size = 0;
  MPI_Comm_size(comm, &size);
  return size;
}

/// The message of an exception_ptr's exception (what() of a std::exception).
inline std::string error_message(const std::exception_ptr& error) {
  try {
    std::rethrow_exception(error);
  } catch (const std::exception& e) {
    return e.what();
  } catch (...) {
    return "switchmoe: unknown exception";
  }
}

/// Throws, on every rank, std::invalid_argument with the message of rank `failing`'s error
/// (broadcast from it), tagged with that rank. Collective.
[[noreturn]] inline void throw_agreed(MPI_Comm comm, int failing, const std::exception_ptr& error) {
  const int rank = mpi_rank(comm), size = mpi_size(comm);
  std::string message;
  if (rank == failing) message = error_message(error);
  int length = static_cast<int>(message.size());
  MPI_Bcast(&length, 1, MPI_INT, failing, comm);
  message.resize(static_cast<std::size_t>(length));
  MPI_Bcast(message.data(), length, MPI_CHAR, failing, comm);
  if (size > 1) {
    message += " (on rank " + std::to_string(failing) + " of " + std::to_string(size) + ")";
  }
  throw std::invalid_argument(message);
}

/// Collective: if any rank has an error, every rank throws the first failing rank's message.
/// One MPI_Allreduce of an int when no rank failed.
inline void agree_on_error(MPI_Comm comm, const std::exception_ptr& error) {
  const int size = mpi_size(comm);
  const int mine = error ? mpi_rank(comm) : size;
  int first = size;
  MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, comm);
  if (first < size) throw_agreed(comm, first, error);
}

/// Collective: values[i] = sum over ranks, in rank order, of each rank's values[i]; the same
/// bits on every rank whatever MPI's reduction algorithms. `gathered` is scratch (grown to
/// ranks * min(count, chunk) elements; reused between calls). Every rank must pass the same
/// count.
template <class T>
void sum_in_rank_order(MPI_Comm comm, T* values, std::int64_t count, std::vector<T>& gathered) {
  constexpr std::int64_t kChunk = 1 << 20;  // bounds the scratch at ranks * 4 MiB for floats
  const int size = mpi_size(comm);
  if (size == 1 || count == 0) return;
  const std::int64_t chunk = std::min(count, kChunk);
  if (gathered.size() < static_cast<std::size_t>(chunk * size)) {
    gathered.resize(static_cast<std::size_t>(chunk * size));
  }
  for (std::int64_t begin = 0; begin < count; begin += chunk) {
    const int n = static_cast<int>(std::min(chunk, count - begin));
    MPI_Allgather(values + begin, n, mpi_wire_type<T>(), gathered.data(), n, mpi_wire_type<T>(),
                  comm);
    for (int i = 0; i < n; ++i) {
      T sum = gathered[static_cast<std::size_t>(i)];
      for (int r = 1; r < size; ++r) sum += gathered[static_cast<std::size_t>(r) * n + i];
      values[begin + i] = sum;
    }
  }
}

}  // namespace detail
}  // namespace switchmoe
