#!/usr/bin/env bash
# Reproduces the Switch Transformer paper's main tables at CPU scale (issue 13): builds switch_lm
# like run.sh, runs experiments 1-7 (two 1-thread runs at a time) and writes paper.md and PNGs.
#
#   bash examples/switch_lm/paper.sh           # the full suite (~35-40 min on 2 quiet cores):
#                                              # examples/switch_lm/results/paper.md + PNGs
#   bash examples/switch_lm/paper.sh --quick   # every experiment briefly (a few minutes), into
#                                              # $SWITCHMOE_BUILD_DIR/paper_quick; fails unless
#                                              # every run learns and the report is written
#   bash examples/switch_lm/paper.sh --report-only   # rewrite paper.md and the PNGs from the
#                                              # runs already done (after editing paper.py)
#   bash examples/switch_lm/paper.sh --resume   # rerun only what is missing or whose options
#                                              # changed since the last invocation
#
# SWITCHMOE_BUILD_DIR (default build/) is the CMake build tree; the runs' own outputs go to
# $SWITCHMOE_BUILD_DIR/paper_runs (paper_runs_quick). PAPER_JOBS (default 2) runs at once;
# PAPER_STEPS overrides the steps of experiments 1-4 (default 2000; 100 with --quick).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
build_dir=${SWITCHMOE_BUILD_DIR:-build}
jobs=${SWITCHMOE_JOBS:-2}
source examples/switch_lm/build.sh

mode=full
extra=()
for arg in "$@"; do
  case "$arg" in
    --quick) mode=quick ;;
    --report-only | --resume) extra+=("$arg") ;;
    *) echo "paper.sh: unknown argument '$arg' (expected --quick, --resume, --report-only or nothing)" >&2
      exit 2 ;;
  esac
done
if [[ $mode == quick ]]; then
  out=$build_dir/paper_quick
  runs=$build_dir/paper_runs_quick
else
  out=examples/switch_lm/results
  runs=$build_dir/paper_runs
fi
exec python3 examples/switch_lm/paper.py --exe "$exe" --mode "$mode" --out "$out" --runs "$runs" \
  --jobs "${PAPER_JOBS:-2}" "${extra[@]}"
