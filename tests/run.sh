#!/usr/bin/env bash
# Installs the dependencies, then configures, builds and runs every test of switchmoe.
#
#   bash tests/run.sh                                  # Release build in build/
#   SWITCHMOE_BUILD_DIR=build-asan bash tests/run.sh -DSWITCHMOE_SANITIZE=ON
#
# Extra arguments go to the CMake configure step (after -DCMAKE_BUILD_TYPE=Release, so they may
# override it). SWITCHMOE_JOBS (default 2) sets the build and test parallelism.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
build_dir=${SWITCHMOE_BUILD_DIR:-build}
jobs=${SWITCHMOE_JOBS:-2}

bash cmake/install_deps.sh
cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Release "$@"
cmake --build "$build_dir" -j "$jobs"
ctest --test-dir "$build_dir" --output-on-failure -j "$jobs"
