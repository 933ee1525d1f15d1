#!/usr/bin/env bash
# Runs the MPI tests (ctest label "mpi": 1, 2, 3 and 4 ranks) of an existing build.
#
#   bash tests/distributed/run.sh [build-dir]     # default: build (or $SWITCHMOE_BUILD_DIR)
#
# Configure and build first (tests/run.sh does both, with Open MPI from cmake/install_deps.sh).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
build_dir=${1:-${SWITCHMOE_BUILD_DIR:-build}}
cd "$root"
cmake --build "$build_dir" -j "${SWITCHMOE_JOBS:-2}" --target expert_parallel_test expert_parallel_allocation_test
ctest --test-dir "$build_dir" --output-on-failure -L mpi
