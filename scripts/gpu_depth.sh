#!/usr/bin/env bash
# One GPU command for dynamic depth (issue 14): train exit heads (with thresholds calibrated
# on held-out windows) and mixture-of-depths routers on the shared corpus, run the depth
# experiments at batch 1 and 32 beside autoregressive decoding, and summarize quality against
# cost with the bars.
#
#   MODEL=/tmp/m/model.gguf CORPUS=/tmp/corpus.npz OUT=/tmp/out scripts/gpu_depth.sh
#
# Sizes come from the environment (defaults: one H200, about 6 minutes with the corpus
# present). The corpus settings equal scripts/gpu_speculative.sh's, so its corpus is reused; a
# missing one is generated first. Each method compiles its own decode loop, so 6 minutes run
# the first rows of each grid (they are in priority order); running the script again with the
# same OUT and WORK (and a larger TOTAL_S) resumes: trained parts and finished cells are kept.
# CPU smoke test: shrink everything, e.g.
#   TRAIN_PROMPTS=8 SAMPLES=1 NEW_TOKENS=24 SEQ_LEN=64 GEN_BATCH=8 STEPS=3 BATCH_SIZE=2 \
#   CAL_ROWS=2 PROMPTS_PER_SET=1 MAX_NEW=4 DTYPE=float32 ...
# Files under OUT: run.log, train_exits.json, train_router.json, depth_exits.tgz and
# depth_router.tgz (the artifacts, bf16), depth_b1/ and depth_b32/ (and with CMDBUF_S > 0
# depth_cmdbuf/): results.jsonl, results.md, plots; depth_$TAG.{json,md,png}: the summary.
set -euo pipefail

MODEL=${MODEL:?set MODEL to the model file, e.g. /tmp/m/model.gguf}
OUT=${OUT:?set OUT to the output directory}
WORK=${WORK:-/tmp/depth_work}
CORPUS=${CORPUS:-$WORK/corpus.npz}

SAMPLES=${SAMPLES:-16}           # corpus: as scripts/gpu_speculative.sh, so it is shared
NEW_TOKENS=${NEW_TOKENS:-128}
SEQ_LEN=${SEQ_LEN:-256}
TEMPERATURE=${TEMPERATURE:-0.7}
GEN_BATCH=${GEN_BATCH:-512}
TRAIN_PROMPTS=${TRAIN_PROMPTS:-} # empty: all training prompts
EVERY=${EVERY:-3}                # an exit after every 3rd layer: depths 3, 6, ..., 27
RANK=${RANK:-64}                 # exit adapter rank
CAPACITY=${CAPACITY:-0.75}       # router training capacity
PENALTY=${PENALTY:-2.0}          # router compute penalty
STEPS=${STEPS:-3000}             # upper bounds; the time budgets stop training first
BATCH_SIZE=${BATCH_SIZE:-16}
EXITS_S=${EXITS_S:-45}           # seconds of training: exits + routers, within the 120 s
ROUTER_S=${ROUTER_S:-40}
CAL_ROWS=${CAL_ROWS:-64}         # held-out windows for threshold calibration
PROMPTS_PER_SET=${PROMPTS_PER_SET:-8}
MAX_NEW=${MAX_NEW:-64}
DTYPE=${DTYPE:-bfloat16}
TOTAL_S=${TOTAL_S:-355}          # wall budget: rows run in priority order until it is spent
B32_S=${B32_S:-70}               # seconds kept for the batch-32 grid
CMDBUF_S=${CMDBUF_S:-0}          # > 0: seconds for the per-batch exit under command buffers
CMDBUF_TYPES=${CMDBUF_TYPES:-FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,WHILE}
TAG=${TAG:-gpu}

export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
# Methods that differ only in a threshold or capacity compile to the same program: the
# persistent cache compiles it once.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$WORK/xla_cache}
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/run.log") 2>&1
run() { echo "+ $*  [t=${SECONDS}s]" >&2; "$@"; }

echo "gpu_depth: model $MODEL, corpus $CORPUS, out $OUT, budget ${TOTAL_S}s"
run nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv || true

corpus_args=(--corpus "$CORPUS" --set seq_len="$SEQ_LEN" --set new_tokens="$NEW_TOKENS"
             --set samples_per_prompt="$SAMPLES" --set temperature="$TEMPERATURE"
             --set gen_batch="$GEN_BATCH" --set val_fraction=0.1
             ${TRAIN_PROMPTS:+--num-prompts "$TRAIN_PROMPTS"})
train_args=(--set steps="$STEPS" --set batch_size="$BATCH_SIZE" --set eval_every=100000
            --set checkpoint_every=100000 --set max_epochs=100 --set save_dtype=bfloat16 --json)
run python -u -m jdecode.cli train exits --model "$MODEL" --out "$WORK/exits" \
  "${corpus_args[@]}" "${train_args[@]}" --set every="$EVERY" --set rank="$RANK" \
  --set learning_rate=3e-3 --set time_budget_s="$EXITS_S" --set calibration_rows="$CAL_ROWS" \
  > "$OUT/train_exits.json"
run python -u -m jdecode.cli train router --model "$MODEL" --out "$WORK/router" \
  "${corpus_args[@]}" "${train_args[@]}" --set capacity="$CAPACITY" \
  --set compute_penalty="$PENALTY" --set learning_rate=1e-2 --set time_budget_s="$ROUTER_S" \
  > "$OUT/train_router.json"
# Each artifact without its corpus and optimizer checkpoints, as one .tgz that `--set
# exits=`/`routers=` loads directly (how artifacts/ commits trained parts).
for d in exits router; do
  run tar -czf "$OUT/depth_$d.tgz" -C "$WORK" "$d/params" "$d/manifest.json" \
    "$d/history.json" "$d/loss.png"
done

# The experiment configs with the artifact paths of this run.
for f in depth depth-b32; do
  sed -e "s#artifacts/smollm2-135m-exits.tgz#$WORK/exits#g" \
    -e "s#artifacts/smollm2-135m-router.tgz#$WORK/router#g" "configs/experiments/$f.yaml" \
    > "$WORK/$f.yaml"
done
exp_args=(--set model="$MODEL" --set dtype="$DTYPE" --set prompts_per_set="$PROMPTS_PER_SET"
          --set max_new_tokens="$MAX_NEW")
for item in ${EXP_SET:-}; do exp_args+=(--set "$item"); done  # e.g. perplexity_paragraphs=2
left=$((TOTAL_S - SECONDS - B32_S - CMDBUF_S))
if [[ $left -gt 30 ]]; then
  # Results are written after every cell: a run cut by the timeout keeps its finished rows.
  run timeout "$left" python -u -m jdecode.cli experiment "$WORK/depth.yaml" "${exp_args[@]}" \
    --out "$OUT/depth_b1" || echo "batch-1 grid stopped at its budget (${left}s)"
fi
left=$((TOTAL_S - SECONDS - CMDBUF_S))
if [[ $left -gt 20 ]]; then
  run timeout "$left" python -u -m jdecode.cli experiment "$WORK/depth-b32.yaml" \
    "${exp_args[@]}" --out "$OUT/depth_b32" || echo "batch-32 grid stopped at its budget"
fi
# The per-batch exit skips layers under lax.cond, which XLA:GPU runs by copying the predicate
# to the host; with command buffers that include conditionals, the GPU decides by itself.
# Same exits, row and batch, with their own autoregressive baseline under that flag.
left=$((TOTAL_S - SECONDS))
ee="method: early_exit, options: {exits: $WORK/exits, criterion: classifier"
if [[ $CMDBUF_S -gt 0 && $left -gt 20 ]]; then
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=$CMDBUF_TYPES" run timeout "$left" \
    python -u -m jdecode.cli experiment "$WORK/depth.yaml" "${exp_args[@]}" \
    --set name=depth-cmdbuf --set "methods=[{label: exit-classifier, $ee}},
      {label: exit-classifier-batch, $ee, batching: batch}}]" \
    --out "$OUT/depth_cmdbuf" || echo "command-buffer run failed or stopped at its budget"
fi
run python -u scripts/depth_report.py --runs "$OUT/depth_b1,$OUT/depth_b32,$OUT/depth_cmdbuf" \
  --exits "$WORK/exits" --router "$WORK/router" --out "$OUT" --tag "$TAG"
echo "done in ${SECONDS}s"
ls -l "$OUT"
