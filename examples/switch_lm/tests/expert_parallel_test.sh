#!/usr/bin/env bash
# ctest switch_lm.expert_parallel: `switch_lm --expert-parallel` under mpirun -np 2 (each Switch
# layer's experts split over the ranks, each rank half of every batch, the other weights
# replicated and all-reduced) against one process of the same settings, on a tiny model.
#   1. every validation point of both runs (dense: data parallel; switch: expert parallel) within
#      0.01 bits/byte of the single process's (only summation orders differ);
#   2. a control that the comparison can fail: another seed's curve is farther than that;
#   3. the split really happened (rank count and per-rank expert count in the log; the parameter
#      count is the whole model's, gathered from both ranks).
# usage: expert_parallel_test.sh SWITCH_LM MPIEXEC TEXT_FILE WORK_DIR
set -euo pipefail
exe=$1
mpiexec=$2
data=$3
work=$4
rm -rf "$work"
mkdir -p "$work"
cd "$work"

fail() {
  echo "expert_parallel_test: FAILED: $*" >&2
  exit 1
}
export OMP_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_btl_vader_single_copy_mechanism=none

# Routing groups of one rank's share (4 sequences x 16 tokens), so that both runs route alike.
tiny=(--data "$data" --d-model 16 --layers 2 --heads 2 --d-ff 32 --context 16 --batch 8
  --experts 4 --group-size 64 --steps 12 --warmup 2 --eval-interval 4 --eval-tokens 512
  --sample-bytes 0 --threads 1)
"$exe" "${tiny[@]}" --out one >one.log 2>&1 || fail "1 process: $(tail -n 3 one.log)"
"$exe" "${tiny[@]}" --seed 2 --out other >other.log 2>&1 || fail "seed 2: $(tail -n 3 other.log)"
"$mpiexec" -np 2 --oversubscribe --bind-to none "$exe" "${tiny[@]}" --expert-parallel --out two \
  >two.log 2>&1 || fail "2 ranks: $(tail -n 5 two.log)"

grep -q "expert parallel: 2 ranks, each with 2 of the 4 experts" two.log ||
  fail "the 2-rank run did not split the experts: $(head -n 5 two.log)"
params_one=$(grep '^parameters:' one.log)
params_two=$(grep '^parameters:' two.log)
[[ "$params_one" == "$params_two" ]] ||
  fail "parameter counts differ: '$params_one' vs '$params_two'"

# max |valid bpb difference| over the points of both runs; fails if the curves have other points.
max_diff() {
  python3 - "$1" "$2" <<'PY'
import csv, sys
def curve(path):
    with open(path) as f:
        return {(r["run"], int(r["step"])): float(r["valid_bits_per_byte"]) for r in csv.DictReader(f)}
a, b = curve(sys.argv[1]), curve(sys.argv[2])
if set(a) != set(b) or len(a) < 8:
    sys.exit("curves have different points: %s vs %s" % (sorted(a), sorted(b)))
print("%.6f" % max(abs(a[k] - b[k]) for k in a if k[1] > 0))
PY
}
diff_two=$(max_diff one/curves.csv two/curves.csv) || fail "$diff_two"
diff_other=$(max_diff one/curves.csv other/curves.csv) || fail "$diff_other"
echo "max |valid bpb(2 ranks) - valid bpb(1 process)| = $diff_two (control, another seed: $diff_other)"
python3 -c "import sys; sys.exit(0 if $diff_two <= 0.01 else 1)" ||
  fail "2-rank validation curve differs from the single process's by $diff_two > 0.01 bits/byte"
python3 -c "import sys; sys.exit(0 if $diff_other > 0.01 else 1)" ||
  fail "control: another seed's curve is within 0.01 ($diff_other); the check cannot fail"
echo "expert_parallel_test: passed"
