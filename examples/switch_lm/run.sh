#!/usr/bin/env bash
# The language-model demonstration of switchmoe, from a fresh Debian 12 machine:
# installs what it needs, builds switch_lm (Release) and trains the dense and the Switch model.
#
#   bash examples/switch_lm/run.sh                 # default comparison (~7 minutes on 2 cores)
#   bash examples/switch_lm/run.sh --quick         # about a minute; what CI runs
#   bash examples/switch_lm/run.sh --distill       # any switch_lm option is passed on
#   bash examples/switch_lm/run.sh --quick --expert-parallel   # experts split over 2 MPI ranks
#
# --expert-parallel launches switch_lm under mpirun with SWITCHMOE_RANKS ranks (default 2) of
# OMP_NUM_THREADS threads each (default 1; keep ranks x threads <= cores), as root too.
#
# SWITCHMOE_BUILD_DIR (default build/) is the CMake build tree; the outputs (curves.csv,
# curves.png, report.txt) go to $SWITCHMOE_BUILD_DIR/switch_lm_out (switch_lm_quick with --quick)
# unless --out is given.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
build_dir=${SWITCHMOE_BUILD_DIR:-build}
jobs=${SWITCHMOE_JOBS:-2}

if [[ -f cmake/install_deps.sh ]]; then
  bash cmake/install_deps.sh
else
  need=(cmake make g++ libeigen3-dev fortunes gnuplot-nox)
  missing=()
  for p in "${need[@]}"; do
    dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null | grep -q '^ii' || missing+=("$p")
  done
  if [[ ${#missing[@]} -gt 0 ]]; then
    sudo=()
    [[ $(id -u) -eq 0 ]] || sudo=(sudo)
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      --no-install-recommends "${missing[@]}"
  fi
fi

# Configure only if needed (CI has already built the whole project into build/), and build only
# the demo's program.
if [[ ! -f "$build_dir/CMakeCache.txt" ]]; then
  cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Release -DSWITCHMOE_BUILD_TESTS=OFF \
    -DSWITCHMOE_BUILD_BENCHMARKS=OFF -DSWITCHMOE_BUILD_EXAMPLES=ON
elif grep -q '^SWITCHMOE_BUILD_EXAMPLES:BOOL=OFF' "$build_dir/CMakeCache.txt"; then
  cmake -S . -B "$build_dir" -DSWITCHMOE_BUILD_EXAMPLES=ON
fi
cmake --build "$build_dir" -j "$jobs" --target switch_lm
exe=$(find "$build_dir" -type f -name switch_lm -perm -u+x | head -n 1)
[[ -n "$exe" ]] || { echo "run.sh: switch_lm was not built in $build_dir" >&2; exit 1; }

out=("--out" "$build_dir/switch_lm_out")
for arg in "$@"; do
  [[ "$arg" == --quick ]] && out=("--out" "$build_dir/switch_lm_quick")
done
for arg in "$@"; do
  [[ "$arg" == --out || "$arg" == --out=* ]] && out=()
done
for arg in "$@"; do
  if [[ "$arg" == --expert-parallel ]]; then
    command -v mpirun >/dev/null || { echo "run.sh: --expert-parallel needs Open MPI (mpirun)" >&2; exit 1; }
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
    # Open MPI's shared-memory single copy needs ptrace rights that containers often lack.
    export OMPI_MCA_btl_vader_single_copy_mechanism=${OMPI_MCA_btl_vader_single_copy_mechanism:-none}
    exec mpirun -np "${SWITCHMOE_RANKS:-2}" --oversubscribe --bind-to none \
      "$exe" "${out[@]}" --threads "$OMP_NUM_THREADS" "$@"
  fi
done
exec "$exe" "${out[@]}" "$@"
