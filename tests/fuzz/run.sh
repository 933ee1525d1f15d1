#!/usr/bin/env bash
# Fuzzes SafetensorsReader with libFuzzer (clang-14, ASan + UBSan) for SECONDS seconds, starting
# from a seed corpus of valid and broken files written by tests/io/interop.py. The CI stage:
#
#   bash tests/fuzz/run.sh 60
#
# Installs what it needs itself, builds in ${SWITCHMOE_FUZZ_BUILD_DIR:-build-fuzz}, prints the
# executions reached, and fails when the fuzzer finds a crash, a leak or undefined behaviour.
set -euo pipefail

seconds=${1:?usage: tests/fuzz/run.sh SECONDS}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
build_dir=${SWITCHMOE_FUZZ_BUILD_DIR:-build-fuzz}

bash cmake/install_deps.sh clang-14 libfuzzer-14-dev libomp-14-dev
cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_COMPILER=clang++-14 -DSWITCHMOE_FUZZ=ON -DSWITCHMOE_IO=ON \
  -DSWITCHMOE_BUILD_TESTS=OFF -DSWITCHMOE_BUILD_EXAMPLES=OFF -DSWITCHMOE_BUILD_BENCHMARKS=OFF \
  -DSWITCHMOE_INSTALL=OFF
cmake --build "$build_dir" -j "${SWITCHMOE_JOBS:-2}" --target safetensors_fuzzer

# The seeds stay as written; the fuzzer adds what it finds to a corpus of its own.
python3=$(command -v /usr/bin/python3 || command -v python3)
rm -rf "$build_dir/fuzz-seeds" "$build_dir/fuzz-artifacts"
mkdir -p "$build_dir/fuzz-corpus" "$build_dir/fuzz-artifacts"
"$python3" tests/io/interop.py corpus "$build_dir/fuzz-seeds"

log="$build_dir/fuzz.log"
status=0
UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  "$build_dir/safetensors_fuzzer" -max_total_time="$seconds" -print_final_stats=1 \
  -max_len=4096 -timeout=10 -rss_limit_mb=2048 -artifact_prefix="$build_dir/fuzz-artifacts/" \
  "$build_dir/fuzz-corpus" "$build_dir/fuzz-seeds" >"$log" 2>&1 || status=$?
executions=$(sed -nE 's/^stat::number_of_executed_units: *([0-9]+).*/\1/p' "$log" | tail -n 1)
if [[ $status -ne 0 ]]; then
  tail -n 60 "$log"
  echo "fuzz: FAILED (exit $status) after ${executions:-?} executions; input in $build_dir/fuzz-artifacts/"
  exit 1
fi
corpus=$(find "$build_dir/fuzz-corpus" -type f | wc -l)
echo "fuzz: safetensors reader ran ${executions} executions in ${seconds} s, no crash" \
  "(corpus ${corpus} files)"
