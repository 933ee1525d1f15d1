#pragma once
// The MPI-aware GoogleTest harness of the distributed tests (mpi_main.cpp is their main).
//
// Every rank runs every test. A rank's failed assertions are recorded by a listener, and the
// fixture's TearDown (collective) gathers them to rank 0, which reports them as its own, so one
// output shows every rank's failures and the exit code is the worst over ranks. Only rank 0
// prints. Rules for test bodies: make every collective call unconditionally (all ranks, same
// order) and assert after the collectives with EXPECT_* (an ASSERT_* that returns early on one
// rank would leave the others waiting in the next collective).

#include <gtest/gtest.h>
#include <mpi.h>

#include <stdexcept>
#include <string>
#include <vector>

namespace switchmoe_test {

/// This rank's failure messages of the running test (kept by the harness's listener).
std::string& rank_failures();

inline int world_rank() {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

inline int world_size() {
  int size = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  return size;
}

/// Base fixture of the MPI tests: see above.
class MpiTest : public ::testing::Test {
 protected:
  void TearDown() override {
    const std::string mine = rank_failures();
    const int rank = world_rank(), size = world_size();
    int length = static_cast<int>(mine.size());
    std::vector<int> lengths(static_cast<std::size_t>(size)), displs(lengths.size());
    MPI_Gather(&length, 1, MPI_INT, lengths.data(), 1, MPI_INT, 0, MPI_COMM_WORLD);
    int total = 0;
    for (int r = 0; r < size; ++r) {
      displs[r] = total;
      total += lengths[r];
    }
    std::string all(static_cast<std::size_t>(rank == 0 ? total : 0), '\0');
    MPI_Gatherv(mine.data(), length, MPI_CHAR, all.data(), lengths.data(), displs.data(), MPI_CHAR,
                0, MPI_COMM_WORLD);
    if (rank != 0) return;
    for (int r = 1; r < size; ++r) {
      if (lengths[r] > 0) {
        ADD_FAILURE() << "rank " << r << " of " << size << " failed:\n"
                      << all.substr(static_cast<std::size_t>(displs[r]),
                                    static_cast<std::size_t>(lengths[r]));
      }
    }
  }
};

/// The message of the std::invalid_argument f throws ("" if none, a marker for another type),
/// so that tests can compare what every rank threw.
template <class F>
std::string thrown(const F& f) {
  try {
    f();
  } catch (const std::invalid_argument& e) {
    return e.what();
  } catch (...) {
    return "<not std::invalid_argument>";
  }
  return "";
}

}  // namespace switchmoe_test
