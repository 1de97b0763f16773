#!/usr/bin/env bash
# One GPU command for non-autoregressive decoding (issue 13): Jacobi and lookahead against
# autoregressive decoding at batch 1, 4 and 16 (configs/experiments/nar.yaml), consistency
# training of the default model (a NEW model, `cllm`), Jacobi before vs after at batch 1 with
# quality (configs/experiments/nar-cllm.yaml), and the fully non-autoregressive case (the block
# is the whole answer) before and after, within a wall budget.
#
#   MODEL=/tmp/m/model.gguf CORPUS=/tmp/corpus.npz OUT=/root/out bash scripts/gpu_nar.sh
#
# Sizes come from the environment (defaults: one H200, under 6 minutes). A CPU smoke test
# shrinks them, e.g. MODEL=smollm2-135m BATCHES=[1,2] PROMPTS_PER_SET=1 MAX_NEW=8 TRAIN_S=5
# STEPS=4 BATCH_SIZE=2 NUM_PROMPTS=12 NEW_TOKENS=24 SEQ_LEN=48 BLOCK=6 LAYERS=[29] LENGTHS=6
# CONV_PROMPTS=1 TOTAL_S=100000.
# The corpus settings are left at their defaults unless set, so a shared $CORPUS is reused.
# STAGES picks stages: nar (the experiment), cllm (training and before/after), whole.
# Files under OUT (7 with every stage): run.log, nar.md, nar-cllm.md, train_consistency.json,
# convergence.json, convergence.png, results.tgz (both experiment directories: results.jsonl,
# results.md, plots, outputs; and the fine-tune's manifest, history.json and loss.png, without
# its weights).
set -euo pipefail

MODEL=${MODEL:?set MODEL to the model file (e.g. /tmp/m/model.gguf) or name}
OUT=${OUT:?set OUT to the output directory}
WORK=${WORK:-/tmp/nar_work}
CORPUS=${CORPUS:-$WORK/corpus.npz}  # shared between trained parts of one target
BATCHES=${BATCHES:-[1,4,16]}        # the bar's batch first
PROMPTS_PER_SET=${PROMPTS_PER_SET:-}  # empty: all 52 (chat 18, code 16, summarization 18)
MAX_NEW=${MAX_NEW:-64}
BUCKET=${BUCKET:-128}               # one prompt-length bucket: one compile per method and batch
TRAIN_S=${TRAIN_S:-70}              # seconds of consistency training at most
STEPS=${STEPS:-3000}                # an upper bound; the time budget shortens the schedule
BATCH_SIZE=${BATCH_SIZE:-16}
LR=${LR:-5e-5}
BLOCK=${BLOCK:-16}                  # Jacobi block of the trajectories (decoding uses nar-cllm's)
LAYERS=${LAYERS:-}                  # layers fine-tuned, e.g. [29] (empty: all)
NUM_PROMPTS=${NUM_PROMPTS:-}        # training prompts (empty: all 332)
NEW_TOKENS=${NEW_TOKENS:-}          # corpus overrides (empty: the shared defaults)
SEQ_LEN=${SEQ_LEN:-}
LENGTHS=${LENGTHS:-16,32,64}        # whole-answer lengths of the fully non-autoregressive case
CONV_PROMPTS=${CONV_PROMPTS:-4}     # per prompt set, for the whole-answer runs
WORKERS=${WORKERS:-8}               # parallel compiles
TOTAL_S=${TOTAL_S:-340}             # later steps are skipped when this budget runs out
STAGES=${STAGES:-nar cllm whole}    # some of them: one device call each when the machine is
                                    # warm (WORK, with the fine-tune, survives between calls)

export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
# Executables compiled once are reused by later commands (XLA's persistent cache).
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$WORK/xla_cache}
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/run.log") 2>&1
run() { echo "+ $*  [t=${SECONDS}s]" >&2; "$@"; }
# `jdecode` with every prompt padded to one length bucket (as scripts/bench_speculative.py
# does): prefill is not timed, and decode reads the same cache length either way.
jdecode_bucketed() {
  python -u -c 'import sys
import jdecode.decoding.generate as g
g.MIN_PROMPT_BUCKET = int(sys.argv.pop(1))
from jdecode.cli import app
app(prog_name="jdecode")' "$BUCKET" "$@"
}
left() { echo $((TOTAL_S - SECONDS)); }
stage() { [[ " $STAGES " == *" $1 "* ]]; }

echo "gpu_nar: model $MODEL, out $OUT, corpus $CORPUS, budget ${TOTAL_S}s"
run nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv || true

# 1. The lossless methods against autoregressive decoding: the bar is lookahead at batch 1.
# Every executable is compiled first, in parallel threads, into the persistent cache.
nar_set=(--set model="$MODEL" --set batch_sizes="$BATCHES" --set max_new_tokens="$MAX_NEW")
[[ -n "$PROMPTS_PER_SET" ]] && nar_set+=(--set prompts_per_set="$PROMPTS_PER_SET")
if stage nar; then
  run python -u scripts/warm_experiment.py configs/experiments/nar.yaml "${nar_set[@]}" \
    --bucket "$BUCKET" --workers "$WORKERS"
  run jdecode_bucketed experiment configs/experiments/nar.yaml --out "$OUT/nar" "${nar_set[@]}"
  cp "$OUT/nar/results.md" "$OUT/nar.md"
fi

# 2. Consistency training: a full fine-tune on the target's own Jacobi trajectories.
ft="$WORK/consistency"
if ! stage cllm; then
  echo "stage cllm not in STAGES=$STAGES"
elif [[ $(left) -lt 100 ]]; then
  echo "only $(left)s of ${TOTAL_S}s left: consistency training and its comparison skipped"
else
  run python -u -m jdecode.cli train consistency --model "$MODEL" --out "$ft" \
    --config configs/train/consistency.yaml --corpus "$CORPUS" \
    --set time_budget_s="$TRAIN_S" --set steps="$STEPS" --set batch_size="$BATCH_SIZE" \
    --set learning_rate="$LR" --set block_size="$BLOCK" ${LAYERS:+--set layers="$LAYERS"} \
    ${NEW_TOKENS:+--set new_tokens="$NEW_TOKENS"} ${SEQ_LEN:+--set seq_len="$SEQ_LEN"} \
    ${NUM_PROMPTS:+--num-prompts "$NUM_PROMPTS"} --json > "$OUT/train_consistency.json"
  cat "$OUT/train_consistency.json"; echo

  # 3. Before vs after at batch 1: iterations per token, and the new model's quality.
  # Its executables are nar's at batch 1 (the fine-tune has the target's shapes): cache hits.
  run jdecode_bucketed experiment configs/experiments/nar-cllm.yaml --out "$OUT/nar-cllm" \
    --set model="$MODEL" --set methods.1.options.weights="$ft" \
    --set max_new_tokens="$MAX_NEW" ${PROMPTS_PER_SET:+--set prompts_per_set="$PROMPTS_PER_SET"}
  cp "$OUT/nar-cllm/results.md" "$OUT/nar-cllm.md"
fi

# 4. The fully non-autoregressive case: iterations to converge the whole answer vs its length.
if ! stage whole; then
  echo "stage whole not in STAGES=$STAGES"
elif [[ $(left) -lt 30 ]]; then
  echo "only $(left)s of ${TOTAL_S}s left: the whole-answer runs are skipped"
else
  run timeout $(($(left) + 30)) python -u scripts/nar_convergence.py --model "$MODEL" \
    --lengths "$LENGTHS" --prompts-per-set "$CONV_PROMPTS" --workers "$WORKERS" --out "$OUT" \
    $([[ -f "$ft/manifest.json" ]] && echo --weights "$ft") || echo "whole-answer runs cut short"
fi

members=()
[[ -d "$OUT/nar" ]] && members+=(nar)
[[ -d "$OUT/nar-cllm" ]] && members+=(nar-cllm)
if [[ -f "$ft/manifest.json" ]]; then
  mkdir -p "$OUT/consistency"
  cp "$ft/manifest.json" "$ft/history.json" "$ft/loss.png" "$OUT/consistency/"
  members+=(consistency)
fi
if ((${#members[@]})); then
  run tar -czf "$OUT/results.tgz" -C "$OUT" "${members[@]}"
  rm -rf "${members[@]/#/$OUT/}"
fi
echo "done in ${SECONDS}s"
ls -l "$OUT"
