#!/usr/bin/env bash
# One GPU command for cascades (issue 15): train the deferral classifiers and calibration tables
# of the ladder (distilled 2-layer draft -> SmolLM2-135M bf16 -> f32) on the training prompts
# and synthetic checkable tasks, then run configs/experiments/cascade.yaml (sequence cascades
# of every rule, the single models, token-level speculative cascades) at batch 1 and 32, and
# draw the FrugalGPT-style quality-cost figure.
#
#   scripts/gpu_cascade.sh MODEL.gguf OUT_DIR      (or MODEL=... OUT=... in the environment)
#
# Sizes come from the environment (defaults: one H200, about 6 minutes; a rerun with the same
# WORK resumes the experiment's unfinished cells); a CPU smoke test shrinks them, e.g.
# TRAIN_PROMPTS=4 NUM_TASKS=4 STEPS=5 MAX_NEW=8 PROMPTS_PER_SET=1 BATCHES=[1,4] TOTAL_S=3000.
# Files under OUT_DIR (at most 8, as the device tool brings back): run.log, train.json,
# deferral.tgz (the artifact: `tar -xzf` gives deferral/), experiment.tgz (results.jsonl,
# results.md, outputs/), cascade_$TAG.{json,md,png}.
set -euo pipefail

MODEL=${1:-${MODEL:?usage: scripts/gpu_cascade.sh MODEL.gguf OUT_DIR}}
OUT=${2:-${OUT:?usage: scripts/gpu_cascade.sh MODEL.gguf OUT_DIR}}

TRAIN_PROMPTS=${TRAIN_PROMPTS:-}  # empty: all 332 training prompts
NUM_TASKS=${NUM_TASKS:-192}       # synthetic checkable tasks beside them
GEN_BATCH=${GEN_BATCH:-128}       # rows per ladder generate call
STEPS=${STEPS:-300}               # classifier steps per ladder step (x batch 32: ~25 epochs)
TRAIN_S=${TRAIN_S:-40}            # seconds of classifier training, all steps together
PROMPTS=${PROMPTS:-[tasks,chat,code]}    # all 48 tasks; summarization's long prompts add
                                          # compile buckets the 6-minute budget cannot afford
PROMPTS_PER_SET=${PROMPTS_PER_SET:-null}  # null: every prompt of each set (82)
MAX_NEW=${MAX_NEW:-64}
BATCHES=${BATCHES:-[32,1]}        # batch 32 first: its cells are quick, batch 1's are not
TOTAL_S=${TOTAL_S:-340}           # wall budget before the experiment's hard stop
TAG=${TAG:-gpu}
WORK=${WORK:-/tmp/cascade_work}

export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
# Cells of one experiment compile the same stage executables: keep them across processes too.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$WORK/jax_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-1}
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/run.log") 2>&1
run() { echo "+ $*  [t=${SECONDS}s]"; "$@"; }

echo "gpu_cascade: model $MODEL, out $OUT, budget ${TOTAL_S}s"
run nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv || true

run python -u -m jdecode.cli train deferral --model "$MODEL" --out "$WORK/deferral" \
  ${TRAIN_PROMPTS:+--num-prompts "$TRAIN_PROMPTS"} --set num_tasks="$NUM_TASKS" \
  --set max_new_tokens="$MAX_NEW" --set gen_batch="$GEN_BATCH" --set val_fraction=0.25 \
  --set steps="$STEPS" --set batch_size=32 --set learning_rate=3e-3 --set weight_decay=0.01 \
  --set max_epochs=40 --set eval_every=100 --set checkpoint_every=100000 --set time_budget_s="$TRAIN_S" --json | tee "$OUT/train.json"
run tar -czf "$OUT/deferral.tgz" -C "$WORK" deferral/manifest.json deferral/params

# The experiment reads the freshly trained artifact in place of the committed one.
sed "s#artifacts/smollm2-135m-deferral.tgz#$WORK/deferral#g" \
  configs/experiments/cascade.yaml > "$WORK/cascade.yaml"
left=$((TOTAL_S - SECONDS))
if [[ $left -lt 60 ]]; then
  echo "only ${left}s of the ${TOTAL_S}s budget left: the experiment needs more; raise TOTAL_S"
  exit 1
fi
# A cut run keeps every finished cell (results.jsonl is written after each); the report
# reads whatever finished.
run timeout "$left" python -u -m jdecode.cli experiment "$WORK/cascade.yaml" \
  --set model="$MODEL" --set batch_sizes="$BATCHES" --set max_new_tokens="$MAX_NEW" \
  --set prompts="$PROMPTS" --set prompts_per_set="$PROMPTS_PER_SET" \
  --out "$WORK/experiment" || \
  echo "experiment stopped at the budget (rc $?): reporting the finished cells"
run python -u scripts/cascade_report.py "$WORK/experiment" --out "$OUT" --tag "$TAG"
run tar -czf "$OUT/experiment.tgz" -C "$WORK" experiment
echo "done in ${SECONDS}s"
ls -l "$OUT"
