#!/usr/bin/env bash
# ctest switch_lm.resume: checkpoints of switch_lm, on a tiny model trained for a few steps.
#   1. 8 steps in one run and 4 steps saved, resumed for 4 more end with bitwise identical files
#      (weights of both models, AdamW moments);
#   2. controls that the comparison can fail: the half-way checkpoint differs, and a resume whose
#      router jitter position was reset in state.json ends with other Switch weights;
#   3. --load DIR --generate samples exactly what the trained run sampled before it exited;
#   4. a differing training option or a truncated file is refused with a clear error;
#   5. --threads 2 (the runs step concurrently) ends with the same files as one thread.
# usage: resume_test.sh SWITCH_LM TEXT_FILE WORK_DIR
set -euo pipefail
exe=$1
data=$2
work=$3
rm -rf "$work"
mkdir -p "$work"
cd "$work"

fail() {
  echo "resume_test: FAILED: $*" >&2
  exit 1
}
files=(dense.safetensors switch.safetensors dense.adamw.safetensors switch.adamw.safetensors)

tiny=(--data "$data" --d-model 16 --layers 2 --heads 2 --d-ff 32 --context 16 --batch 4
  --experts 4 --steps 8 --warmup 2 --eval-interval 3 --eval-tokens 256 --sample-bytes 48)
"$exe" "${tiny[@]}" --out full.out --save full >full.log 2>&1 || fail "full run: $(tail -n 3 full.log)"
"$exe" "${tiny[@]}" --out half.out --save half --stop-at 4 >half.log 2>&1 ||
  fail "half run: $(tail -n 3 half.log)"
"$exe" --resume half --out resumed.out --save resumed >resumed.log 2>&1 ||
  fail "resumed run: $(tail -n 3 resumed.log)"

# 1. Identical weights and optimizer state after 8 steps.
for f in "${files[@]}"; do
  cmp "full/$f" "resumed/$f" || fail "$f after 8 steps differs between the full and the resumed run"
done
echo "8 steps = 4 steps + resume for 4: all ${#files[@]} files identical"
# ... and the same training statistics in summary.json (routing, spikes: kept in state.json).
python3 - full.out/summary.json resumed.out/summary.json <<'PY' || fail "summary.json's training statistics differ between the full and the resumed run"
import json, sys
keys = ("dropped_fraction", "router_entropy", "loss_spikes", "max_train_bits", "finite")
a, b = ([{k: r[k] for k in keys} for r in json.load(open(f))["runs"]] for f in sys.argv[1:])
if a != b:
    print(a, b, sep="\n")
    sys.exit(1)
PY
echo "the resumed run's training statistics equal the full run's"

# 2. The comparison can fail.
for f in "${files[@]}"; do
  ! cmp -s "full/$f" "half/$f" || fail "$f after 4 steps equals the one after 8"
done
cp -r half jitter_reset
grep -q '"jitter_calls": 4' jitter_reset/state.json || fail "state.json of step 4 has no jitter_calls 4"
sed -i 's/"jitter_calls": 4/"jitter_calls": 0/' jitter_reset/state.json
"$exe" --resume jitter_reset --out jitter.out --save jitter >jitter.log 2>&1 ||
  fail "resume with reset jitter: $(tail -n 3 jitter.log)"
cmp -s full/dense.safetensors jitter/dense.safetensors || fail "the dense run depends on jitter"
! cmp -s full/switch.safetensors jitter/switch.safetensors ||
  fail "resetting the router's jitter position changed nothing: is it restored at all?"
echo "controls: the step-4 files differ; a reset jitter position changes the Switch weights"

# 3. The loaded models sample what the trained ones did (same seed, prompt and temperature).
"$exe" --load full --generate --sample-bytes 48 >generate.log 2>&1 ||
  fail "--load --generate: $(tail -n 3 generate.log)"
sed -n '/^--- dense ---$/,$p' full.out/report.txt >expected_samples
sed -n '/^--- dense ---$/,$p' generate.log >loaded_samples
[[ -s expected_samples ]] || fail "no samples in full.out/report.txt"
diff expected_samples loaded_samples || fail "--load --generate samples other text than the run"
echo "--load --generate: the same samples as the trained run"

# 4. Bad resumes.
if "$exe" --resume half --d-model 32 --out bad.out >bad.log 2>&1; then
  fail "--resume with another --d-model was accepted"
fi
grep -q -- "--d-model = 32 differs from the checkpoint" bad.log || fail "unclear error: $(cat bad.log)"
cp -r half truncated
head -c 100 half/switch.safetensors >truncated/switch.safetensors
if "$exe" --resume truncated --out bad.out >truncated.log 2>&1; then
  fail "a truncated checkpoint was accepted"
fi
grep -q "truncated/switch.safetensors" truncated.log || fail "unclear error: $(cat truncated.log)"
echo "refused: another --d-model ($(head -n 1 bad.log | cut -c 1-60)...), a truncated file"

# 5. --threads 2 steps the two runs concurrently, one per thread (experiment.hpp, step_runs): the
#    same weights, optimizer state and validation curve as the one-thread run of step 1.
"$exe" "${tiny[@]}" --threads 2 --out concurrent.out --save concurrent >concurrent.log 2>&1 ||
  fail "--threads 2 run: $(tail -n 3 concurrent.log)"
for f in "${files[@]}"; do
  cmp "full/$f" "concurrent/$f" || fail "$f differs between --threads 2 (concurrent) and 1"
done
# Columns other than train_seconds (4th).
diff <(cut -d, -f1-3,5- full.out/curves.csv) <(cut -d, -f1-3,5- concurrent.out/curves.csv) ||
  fail "the validation curve of --threads 2 differs from that of one thread"
echo "--threads 2 (concurrent runs): the same ${#files[@]} files and curve as one thread"
