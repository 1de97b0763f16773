#!/usr/bin/env bash
# One GPU command for speculative decoding (issue 6): distil a draft on a corpus large enough for
# fewer than 10 epochs (held-out KL and top-1 agreement reported), tar it, then bench n-gram and
# distilled drafts at several batch sizes with the calibrated choice of k, within a wall budget.
#
#   scripts/gpu_speculative.sh MODEL.gguf OUT_DIR
#
# Sizes come from the environment (defaults: one H200, about 8 minutes); a CPU smoke test
# shrinks them, e.g. STEPS=6 SAMPLES=2 TRAIN_PROMPTS=12 ... (see the variables below).
# Files under OUT_DIR (at most 8, each < 16 MiB, as the device tool brings back): run.log,
# train.json, drafts.tgz (bf16: 14 MB per 2 layers; split into drafts.tgz.NN past 15 MiB),
# speculative_$TAG.{json,md,png}.
set -euo pipefail

MODEL=${1:?usage: scripts/gpu_speculative.sh MODEL.gguf OUT_DIR}
OUT=${2:?usage: scripts/gpu_speculative.sh MODEL.gguf OUT_DIR}

LAYERS=${LAYERS:-2}              # draft depth(s): "2 4" trains two (then 8 files come back)
SAMPLES=${SAMPLES:-16}           # continuations per training prompt (1 greedy, rest sampled)
TEMPERATURE=${TEMPERATURE:-0.7}  # of the sampled continuations
NEW_TOKENS=${NEW_TOKENS:-128}    # tokens the target writes per continuation
SEQ_LEN=${SEQ_LEN:-256}          # training window: the whole prompt + answer fits
GEN_BATCH=${GEN_BATCH:-512}      # prompts per corpus generate call
TRAIN_PROMPTS=${TRAIN_PROMPTS:-} # empty: all training prompts
STEPS=${STEPS:-1500}             # 1500 x 32 rows = ~10 epochs over ~4800 training rows
BATCH_SIZE=${BATCH_SIZE:-32}
TRAIN_S=${TRAIN_S:-70}           # seconds of training per draft at most
EVAL_EVERY=${EVAL_EVERY:-250}
BENCH_PROMPTS=${BENCH_PROMPTS:-52}
MAX_NEW=${MAX_NEW:-64}
BATCHES=${BATCHES:-1,64,16,4}    # the bar's batch first, then the cost model's large batches
DRAFTS=${DRAFTS:-ngram:3/4/5,distilled:2/3/4}
COMPILE_WORKERS=${COMPILE_WORKERS:-4}
TOTAL_S=${TOTAL_S:-440}          # wall budget before the bench's hard stop (90 s later)
TAG=${TAG:-gpu}                  # file suffix of the bench results
WORK=${WORK:-/tmp/spec_work}

export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/run.log") 2>&1
run() { echo "+ $*  [t=${SECONDS}s]"; "$@"; }

echo "gpu_speculative: model $MODEL, out $OUT, layers '$LAYERS', budget ${TOTAL_S}s"
run nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv || true

dirs=()
for L in $LAYERS; do
  d="$WORK/d${L}"
  # Every draft trains on one shared corpus (same prompts, samples and held-out split).
  run python -u -m jdecode.cli train draft --model "$MODEL" --out "$d" --corpus "$WORK/corpus.npz" \
    --set num_layers="$L" --set save_dtype=bfloat16 \
    --set steps="$STEPS" --set batch_size="$BATCH_SIZE" --set seq_len="$SEQ_LEN" \
    --set new_tokens="$NEW_TOKENS" --set samples_per_prompt="$SAMPLES" \
    --set temperature="$TEMPERATURE" --set gen_batch="$GEN_BATCH" \
    ${TRAIN_PROMPTS:+--num-prompts "$TRAIN_PROMPTS"} --set val_fraction=0.1 \
    --set eval_every="$EVAL_EVERY" --set max_epochs=10 --set time_budget_s="$TRAIN_S" \
    --set checkpoint_every=100000 --json
  dirs+=("$d")
done
# Each draft's manifest and held-out curve in one file, readable without unpacking the tar.
run python -u -c '
import json, sys
from pathlib import Path
out = {Path(d).name: {"manifest": json.loads((Path(d) / "manifest.json").read_text()),
                      "eval": json.loads((Path(d) / "history.json").read_text())["eval"]}
       for d in sys.argv[2:]}
Path(sys.argv[1]).write_text(json.dumps(out, indent=1))' "$OUT/train.json" "${dirs[@]}"

# The draft artifacts without their corpus and optimizer checkpoints: one file (orbax writes
# many); each member directory is an artifact that `--set draft=DIR` loads.
members=()
for d in "${dirs[@]}"; do
  members+=("$(basename "$d")/params" "$(basename "$d")/manifest.json" \
            "$(basename "$d")/history.json" "$(basename "$d")/loss.png")
done
run tar -czf "$OUT/drafts.tgz" -C "$WORK" "${members[@]}"
if [[ $(stat -c %s "$OUT/drafts.tgz") -gt $((15 * 1024 * 1024)) ]]; then
  run split -b 15M -d "$OUT/drafts.tgz" "$OUT/drafts.tgz."  # cat drafts.tgz.* | tar -xz
  run rm "$OUT/drafts.tgz"
fi

left=$((TOTAL_S - SECONDS))
if [[ $left -lt 60 ]]; then
  echo "only ${left}s of the ${TOTAL_S}s budget left: the bench needs more; raise TOTAL_S"
  exit 1
fi
draft_dirs=$(IFS=,; echo "${dirs[*]}")
# --time-budget starts no batch size that would not fit; timeout is the hard stop 90 s later
# (results are written after every batch size, so a cut run keeps what it finished).
run timeout $((left + 90)) python -u scripts/bench_speculative.py --model "$MODEL" \
  --draft-dir "$draft_dirs" --drafts "$DRAFTS" --batch "$BATCHES" \
  --num-prompts "$BENCH_PROMPTS" --max-new-tokens "$MAX_NEW" \
  --compile-workers "$COMPILE_WORKERS" --time-budget "$left" --tag "$TAG" --out "$OUT" \
  --note "scripts/gpu_speculative.sh: drafts ${LAYERS} layers, ${SAMPLES} samples/prompt"
echo "done in ${SECONDS}s"
ls -l "$OUT"
