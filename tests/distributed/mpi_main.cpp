// main() of the MPI test binaries: MPI_Init, GoogleTest with a listener recording each rank's
// failures (harness.hpp's fixture gathers them to rank 0), only rank 0 printing, and the worst
// exit code of all ranks.
#include <gtest/gtest.h>
#include <mpi.h>

#include <string>

#include "distributed/harness.hpp"

namespace switchmoe_test {

std::string& rank_failures() {
  static std::string failures;
  return failures;
}

namespace {

class FailureRecorder : public ::testing::EmptyTestEventListener {
  void OnTestStart(const ::testing::TestInfo& /*info*/) override { rank_failures().clear(); }
  void OnTestPartResult(const ::testing::TestPartResult& result) override {
    if (!result.failed()) return;
    std::string& out = rank_failures();
    out += result.file_name() ? result.file_name() : "?";
    out += ":" + std::to_string(result.line_number()) + ": " + result.summary() + "\n";
  }
};

}  // namespace
}  // namespace switchmoe_test

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  ::testing::TestEventListeners& listeners = ::testing::UnitTest::GetInstance()->listeners();
  if (switchmoe_test::world_rank() != 0)
    delete listeners.Release(listeners.default_result_printer());
  listeners.Append(new switchmoe_test::FailureRecorder);
  const int result = RUN_ALL_TESTS();
  int worst = 0;
  MPI_Allreduce(&result, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();
  return worst;
}
