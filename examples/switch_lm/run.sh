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

# Dependencies and the build of switch_lm (shared with paper.sh).
source examples/switch_lm/build.sh

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
