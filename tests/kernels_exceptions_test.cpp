// Exceptions thrown inside the library's OpenMP regions (gemm's tile loop with a throwing
// epilogue, parallel_for with a throwing body) reach the caller instead of std::terminate, and
// the exception rethrown is the one of the lowest iteration, whatever the thread count.

#include <gtest/gtest.h>
#include <omp.h>

#include <Eigen/Core>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <new>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "switchmoe/core/parallel.hpp"
#include "switchmoe/kernels/gemm.hpp"
#include "switchmoe/kernels/packed_b.hpp"

namespace {

namespace kernels = switchmoe::kernels;
using kernels::PackedB;
using kernels::PackedGemmProblem;
using kernels::Transpose;

// A user exception that remembers where it was thrown.
struct EpilogueError : std::runtime_error {
  EpilogueError(int problem, int row)
      : std::runtime_error("epilogue"), problem(problem), row(row) {}
  int problem;
  int row;
};

class ThreadCount {
 public:
  explicit ThreadCount(int threads) : saved_(omp_get_max_threads()) {
    omp_set_num_threads(threads);
  }
  ~ThreadCount() { omp_set_num_threads(saved_); }

 private:
  int saved_;
};

// Packed problems of kN columns; by default five (one with k == 0), large enough for many tiles
// per problem.
struct Batch {
  static constexpr int kN = 530;
  std::vector<int> rows;
  std::vector<int> ks;
  std::vector<std::vector<float>> a, b, c;
  std::vector<PackedB<float>> packed;
  std::vector<PackedGemmProblem<float>> problems;

  explicit Batch(std::vector<int> problem_rows = {300, 60, 200, 15, 143},
                 std::vector<int> problem_ks = {70, 40, 33, 0, 90})
      : rows(std::move(problem_rows)), ks(std::move(problem_ks)) {
    std::mt19937 rng(3);
    std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
    packed.resize(rows.size());
    for (std::size_t e = 0; e < rows.size(); ++e) {
      a.emplace_back(static_cast<std::size_t>(rows[e]) * ks[e] + 1);
      b.emplace_back(static_cast<std::size_t>(ks[e]) * kN + 1);
      c.emplace_back(static_cast<std::size_t>(rows[e]) * kN);
      for (float& x : a[e]) x = dist(rng);
      for (float& x : b[e]) x = dist(rng);
      packed[e].pack(b[e].data(), kN, Transpose::kNo, ks[e], kN);
    }
    for (std::size_t e = 0; e < rows.size(); ++e) {
      PackedGemmProblem<float> q;
      q.m = rows[e];
      q.a = a[e].data();
      q.lda = std::max(1, ks[e]);
      q.b = &packed[e];
      q.c = c[e].data();
      q.ldc = kN;
      q.beta = 0.0f;
      problems.push_back(q);
    }
  }
};

// An epilogue that throws in every block of the problems in `throwing` reaches the caller as
// that exception, from the lowest throwing problem (tiles run in (problem, row, column) order of
// precedence), with 1, 2 and 3 threads; the kernels stay usable afterwards.
TEST(KernelExceptions, ThrowingEpilogueReachesTheCallerLowestProblemFirst) {
  Batch batch;
  // Expected results of a call without exceptions.
  std::vector<std::vector<float>> expected;
  kernels::gemm_batch(batch.problems, [](int, int, int, int, int) {});
  expected = batch.c;
  const std::vector<std::vector<int>> cases = {{2, 4}, {4}, {3, 1}, {3}, {0, 1, 2, 3, 4}};
  for (int threads : {1, 2, 3}) {
    ThreadCount count(threads);
    for (const std::vector<int>& throwing : cases) {
      const int first = *std::min_element(throwing.begin(), throwing.end());
      std::atomic<int> calls_after{0};
      try {
        kernels::gemm_batch(batch.problems, [&](int problem, int i0, int, int, int) {
          if (std::find(throwing.begin(), throwing.end(), problem) != throwing.end()) {
            throw EpilogueError(problem, i0);
          }
          ++calls_after;
        });
        ADD_FAILURE() << "no exception, " << threads << " threads";
      } catch (const EpilogueError& e) {
        EXPECT_EQ(e.problem, first) << threads << " threads";
        EXPECT_EQ(e.row, 0) << "the first row tile of problem " << first << " throws first";
      }
      // A later call works and gives the usual bits.
      std::fill(batch.c[2].begin(), batch.c[2].end(), -1.0f);
      kernels::gemm_batch(batch.problems, [](int, int, int, int, int) {});
      for (std::size_t e = 0; e < expected.size(); ++e) {
        ASSERT_EQ(0, std::memcmp(expected[e].data(), batch.c[e].data(),
                                 expected[e].size() * sizeof(float)))
            << "problem " << e << " after an exception, " << threads << " threads";
      }
    }
  }
}

// A batch of two stages (the experts' up and down products, packed_b.hpp): an exception from
// the first stage reaches the caller as the lowest throwing problem's, and no epilogue of the
// second stage runs after it; an exception from the second stage only comes after every block
// of the first stage and its epilogue. Both on the thin path (at most 8 rows, one region for the
// two stages) and on the tile path (one call per stage), with 1, 2 and 3 threads; a later call
// gives the usual bits.
TEST(KernelExceptions, TwoStageBatchStopsAtTheFirstStagesException) {
  const std::vector<std::vector<int>> shapes = {{3, 8, 1, 5, 2}, {300, 60, 200, 15, 143}};
  const std::vector<int> ks = {70, 40, 33, 64, 90};
  constexpr std::size_t kSecondStage = 3;  // problems 3 and 4 are the second stage
  for (const std::vector<int>& rows : shapes) {
    Batch batch(rows, ks);
    const auto run = [&](const auto& epilogue) {
      kernels::detail::gemm_packed_problems(batch.problems.data(), batch.problems.size(), epilogue,
                                            kSecondStage);
    };
    run([](int, int, int, int, int) {});
    const std::vector<std::vector<float>> expected = batch.c;
    const std::vector<std::vector<int>> first_stage_cases = {{2}, {1, 2}, {0, 4}, {0, 1, 2, 3, 4}};
    const std::vector<std::vector<int>> second_stage_cases = {{4}, {3, 4}};
    for (int threads : {1, 2, 3}) {
      ThreadCount count(threads);
      const auto where = [&] {
        return std::to_string(rows[0]) + " rows, " + std::to_string(threads) + " threads";
      };
      for (const auto* cases : {&first_stage_cases, &second_stage_cases}) {
        for (const std::vector<int>& throwing : *cases) {
          const int first = *std::min_element(throwing.begin(), throwing.end());
          // Elements of each problem whose epilogue ran.
          std::vector<std::atomic<long long>> covered(batch.problems.size());
          try {
            run([&](int problem, int, int block_rows, int, int block_cols) {
              if (std::find(throwing.begin(), throwing.end(), problem) != throwing.end()) {
                throw EpilogueError(problem, 0);
              }
              covered[problem] += static_cast<long long>(block_rows) * block_cols;
            });
            ADD_FAILURE() << "no exception, " << where();
          } catch (const EpilogueError& e) {
            EXPECT_EQ(e.problem, first) << where();
          }
          if (first < static_cast<int>(kSecondStage)) {
            for (std::size_t e = kSecondStage; e < covered.size(); ++e) {
              EXPECT_EQ(covered[e].load(), 0) << "problem " << e << " ran after the first "
                                              << "stage threw, " << where();
            }
          } else {
            for (std::size_t e = 0; e < kSecondStage; ++e) {
              EXPECT_EQ(covered[e].load(), static_cast<long long>(rows[e]) * Batch::kN)
                  << "first-stage problem " << e << " before a second-stage exception, " << where();
            }
          }
          for (auto& c : batch.c) std::fill(c.begin(), c.end(), -1.0f);
          run([](int, int, int, int, int) {});
          for (std::size_t e = 0; e < expected.size(); ++e) {
            ASSERT_EQ(0, std::memcmp(expected[e].data(), batch.c[e].data(),
                                     expected[e].size() * sizeof(float)))
                << "problem " << e << " after an exception, " << where();
          }
        }
      }
    }
  }
}

// An exception thrown for one block only (not the first of its problem) is found as well.
TEST(KernelExceptions, SingleThrowingBlockReachesTheCaller) {
  Batch batch;
  for (int threads : {1, 2, 3}) {
    ThreadCount count(threads);
    try {
      kernels::gemm_batch(batch.problems, [&](int problem, int i0, int rows, int, int) {
        if (problem == 0 && i0 <= 250 && 250 < i0 + rows) throw std::bad_alloc();
      });
      ADD_FAILURE() << "no exception, " << threads << " threads";
    } catch (const std::bad_alloc&) {
    }
  }
}

// A custom exception from a parallel_for body (run in parallel: enough work) reaches the caller;
// with several throwing indices it is the lowest one's.
struct IndexError : std::runtime_error {
  explicit IndexError(Eigen::Index i) : std::runtime_error("index"), index(i) {}
  Eigen::Index index;
};

TEST(ParallelFor, LowestIndexExceptionIsRethrown) {
  const Eigen::Index n = 1000;
  const std::vector<std::vector<Eigen::Index>> cases = {{999}, {700, 10}, {500, 501, 999}, {0}};
  for (int threads : {1, 2, 3}) {
    ThreadCount count(threads);
    for (const auto& throwing : cases) {
      std::vector<int> visited(n, 0);
      try {
        switchmoe::detail::parallel_for(n, 1 << 15, [&](Eigen::Index i) {
          visited[i] = 1;
          if (std::find(throwing.begin(), throwing.end(), i) != throwing.end()) throw IndexError(i);
        });
        ADD_FAILURE() << "no exception";
      } catch (const IndexError& e) {
        const Eigen::Index first = *std::min_element(throwing.begin(), throwing.end());
        EXPECT_EQ(e.index, first) << threads << " threads";
        // Every index below the first failure ran.
        for (Eigen::Index i = 0; i < first; ++i) ASSERT_EQ(visited[i], 1) << "index " << i;
      }
    }
  }
}

TEST(ParallelFor, BadAllocReachesTheCaller) {
  for (int threads : {1, 2, 3}) {
    ThreadCount count(threads);
    // In parallel (1000 x 2^15 work) and serially (too little work for threads).
    for (Eigen::Index work : {Eigen::Index{1} << 15, Eigen::Index{1}}) {
      std::atomic<int> calls{0};
      EXPECT_THROW(switchmoe::detail::parallel_for(1000, work,
                                                   [&](Eigen::Index i) {
                                                     ++calls;
                                                     if (i % 100 == 37) throw std::bad_alloc();
                                                   }),
                   std::bad_alloc);
      EXPECT_GE(calls.load(), 38);
    }
  }
  // No exception: every index runs exactly once.
  std::vector<std::atomic<int>> hits(5000);
  switchmoe::detail::parallel_for(5000, 1 << 15, [&](Eigen::Index i) { ++hits[i]; });
  for (const auto& h : hits) ASSERT_EQ(h.load(), 1);
}

}  // namespace
