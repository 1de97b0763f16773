#!/usr/bin/env bash
# One GPU command for Medusa heads, blockwise parallel decoding and the EAGLE draft (issues 12
# and 13.3): train both parts on the shared self-distillation corpus (held-out per-head and
# per-step accuracy recorded), then run configs/experiments/medusa-eagle.yaml stage by stage
# within a wall budget, and derive the per-batch tree/chain/off plan from the measured rows.
#
#   MODEL=/tmp/m/model.gguf CORPUS=/tmp/corpus.npz OUT=/tmp/out bash scripts/gpu_medusa.sh
#
# Stages (STAGES, in this order; each a separate experiment invocation that resumes):
#   b1       bf16, batch 1, every method (the bars: Medusa >= 2.0x, EAGLE >= 2.5x)
#   batches  bf16, batch BATCHES, the tree methods at two sizes each (the >= 0.98x bar)
#   f32      f32, batch 1, medusa-64, eagle-60, blockwise-4
# (B1_METHODS, BATCH_METHODS, F32_METHODS: each stage's labels, in the order they run.)
# A stage that does not fit in what is left of TOTAL_S stops at its budget; the cells it
# finished are kept. A second call with PARTS=<an earlier OUT>/parts.tgz skips training and
# resumes nothing else: e.g. PARTS=... STAGES="batches f32" TOTAL_S=600 for the rest.
# Sizes come from the environment; a CPU smoke test shrinks them (see the variables below).
# Files under OUT (8, each < 16 MiB): run.log, train.json (both manifests and eval curves),
# parts.tgz (heads + draft, bf16), bf16.jsonl, f32.jsonl, plan.json, summary.md,
# speedup_vs_batch.png.
set -euo pipefail

MODEL=${MODEL:?set MODEL to the model file, e.g. /tmp/m/model.gguf}
OUT=${OUT:?set OUT to the output directory}
WORK=${WORK:-/tmp/medusa_work}
CORPUS=${CORPUS:-$WORK/corpus.npz}  # shared with scripts/gpu_speculative.sh when it exists
PARTS=${PARTS:-}                     # parts.tgz of an earlier run: skip training
STAGES=${STAGES:-b1 batches f32}
TOTAL_S=${TOTAL_S:-360}              # the whole script's wall budget
MEDUSA_S=${MEDUSA_S:-45}             # seconds of training (compilation and eval come on top)
EAGLE_S=${EAGLE_S:-70}
STEPS=${STEPS:-1500}
BATCH_SIZE=${BATCH_SIZE:-32}
SEQ_LEN=${SEQ_LEN:-256}              # corpus sizes: equal to gpu_speculative.sh's, so one
NEW_TOKENS=${NEW_TOKENS:-128}        # corpus file serves the draft, the heads and EAGLE
SAMPLES=${SAMPLES:-16}
GEN_BATCH=${GEN_BATCH:-512}
TRAIN_PROMPTS=${TRAIN_PROMPTS:-}     # empty: all training prompts
EVAL_EVERY=${EVAL_EVERY:-500}
PROMPTS_PER_SET=${PROMPTS_PER_SET:-6}  # bench prompts of each of chat, code, summarization
MAX_NEW=${MAX_NEW:-64}
BATCHES=${BATCHES:-64,16,4}          # the batches stage (batch 1 is the b1 stage)
# Each stage's methods (labels of configs/experiments/medusa-eagle.yaml), the bars' first.
B1_METHODS=${B1_METHODS:-medusa-64,eagle-60,blockwise-4,ngram-k4,draft-d2-k2,medusa-16,eagle-chain-4}
BATCH_METHODS=${BATCH_METHODS:-medusa-64,blockwise-4,eagle-60,eagle-chain-4,medusa-16}
F32_METHODS=${F32_METHODS:-medusa-64,eagle-60,blockwise-4}

export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
# Identical executables (e.g. greedy medusa and medusa-typical) compile once across stages.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$WORK/xla_cache}
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/run.log") 2>&1
run() { echo "+ $*  [t=${SECONDS}s]"; "$@"; }
left() { echo $((TOTAL_S - SECONDS)); }

echo "gpu_medusa: model $MODEL, out $OUT, stages '$STAGES', budget ${TOTAL_S}s"
run nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv || true

train() {  # KIND SECONDS
  run python -u -m jdecode.cli train "$1" --config "configs/train/$1.yaml" --model "$MODEL" \
    --out "$WORK/$1" --corpus "$CORPUS" --set time_budget_s="$2" --set steps="$STEPS" \
    --set batch_size="$BATCH_SIZE" --set eval_every="$EVAL_EVERY" --set seq_len="$SEQ_LEN" \
    --set new_tokens="$NEW_TOKENS" --set samples_per_prompt="$SAMPLES" \
    --set gen_batch="$GEN_BATCH" ${TRAIN_PROMPTS:+--num-prompts "$TRAIN_PROMPTS"} --json
}
if [[ -n $PARTS ]]; then
  run tar -xzf "$PARTS" -C "$WORK"
else
  train medusa "$MEDUSA_S"
  train eagle "$EAGLE_S"
fi
run tar -czf "$OUT/parts.tgz" -C "$WORK" medusa/params medusa/manifest.json \
  eagle/params eagle/manifest.json
# Both manifests (held-out per-head / per-step tables) and eval curves in one readable file.
run python -u - "$WORK" "$OUT/train.json" <<'PY'
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
out = {}
for kind in ("medusa", "eagle"):
    hist = work / kind / "history.json"
    out[kind] = {"manifest": json.loads((work / kind / "manifest.json").read_text()),
                 "eval": json.loads(hist.read_text())["eval"] if hist.exists() else None}
Path(sys.argv[2]).write_text(json.dumps(out, indent=1))
PY

# One experiment YAML per stage: the grid's methods and sizes, with the trained parts' paths.
stage_yaml() {  # STAGE DTYPE BATCHES LABELS(all|comma list) -> prints the YAML path
  python - "$WORK" "$MODEL" "$@" "$PROMPTS_PER_SET" "$MAX_NEW" <<'PY'
import sys
from pathlib import Path
import yaml
work, model, stage, dtype, batches, labels, per_set, max_new = sys.argv[1:]
cfg = yaml.safe_load(Path("configs/experiments/medusa-eagle.yaml").read_text())
keep = None if labels == "all" else labels.split(",")
methods = []
for m in cfg["methods"]:
    if keep is None or m["label"] in keep:
        opts = m.get("options") or {}
        for key, part in (("heads", "medusa"), ("draft", "eagle")):
            if opts.get(key) == f"artifacts/smollm2-135m-{part}.tgz":
                opts[key] = f"{work}/{part}"
        methods.append(m)
if keep is not None:  # the bars' methods first: a stage cut by its budget keeps them
    methods.sort(key=lambda m: keep.index(m["label"]))
cfg.update(model=model, dtype=dtype, batch_sizes=[int(b) for b in batches.split(",")],
           prompts_per_set=int(per_set), max_new_tokens=int(max_new), methods=methods)
path = Path(work) / f"{stage}.yaml"
path.write_text(yaml.safe_dump(cfg, sort_keys=False))
print(path)
PY
}
experiment() {  # STAGE DTYPE BATCHES LABELS
  local budget
  budget=$(left)
  if [[ $budget -lt 30 ]]; then
    echo "stage $1 skipped: ${budget}s of the ${TOTAL_S}s budget left (raise TOTAL_S)"
    return 0
  fi
  # timeout stops a stage at the budget; the runner has written every finished cell.
  run timeout "$budget" python -u -m jdecode.cli experiment "$(stage_yaml "$@")" \
    --out "$WORK/exp_$2" || echo "stage $1 stopped (exit $?): finished cells are kept"
}
for stage in $STAGES; do
  case $stage in
    b1) experiment b1 bfloat16 1 "$B1_METHODS" ;;
    batches) experiment batches bfloat16 "$BATCHES" "$BATCH_METHODS" ;;
    f32) experiment f32 float32 1 "$F32_METHODS" ;;
    *) echo "unknown stage $stage: choose b1, batches, f32"; exit 2 ;;
  esac
done

for dtype in bfloat16 float32; do
  short=$([[ $dtype == bfloat16 ]] && echo bf16 || echo f32)
  if [[ -f $WORK/exp_$dtype/results.jsonl ]]; then
    run cp "$WORK/exp_$dtype/results.jsonl" "$OUT/$short.jsonl"
  fi
done
[[ -f $WORK/exp_bfloat16/speedup_vs_batch.png ]] && cp "$WORK/exp_bfloat16/speedup_vs_batch.png" "$OUT/"
if [[ -f $OUT/bf16.jsonl ]]; then
  run python -u scripts/spec_plan.py "$OUT/bf16.jsonl" --out "$OUT/plan.json" || true
fi
# summary.md: the per-head / per-step accuracy tables, then each dtype's results table.
python - "$OUT" "$WORK" <<'PY'
import json, sys
from pathlib import Path
out, work = Path(sys.argv[1]), Path(sys.argv[2])
train = json.loads((out / "train.json").read_text())
split = {"held_out": "held-out rows", "train": "training rows: nothing was held out"}
medusa, eagle = (train[k]["manifest"]["metrics"] for k in ("medusa", "eagle"))
lines = ["# Medusa / blockwise / EAGLE on the GPU", "",
         f"## Medusa heads ({split[medusa['accuracy_split']]})", "",
         "| head | predicts | top-1 | top-5 | KL |", "|---|---|---|---|---|"]
for h in medusa["heads"]:
    lines.append(f"| {h['head']} | t+{h['head'] + 2} | {h['top1']:.3f} | {h['top5']:.3f} | "
                 f"{h['kl']:.3f} |")
lines += ["", f"## EAGLE draft, training-time-test steps ({split[eagle['accuracy_split']]})",
          "", "| step (tree depth) | top-1 | KL |", "|---|---|---|"]
for s in eagle["steps"]:
    lines.append(f"| {s['step']} | {s['top1']:.3f} | {s['kl']:.3f} |")
for dtype in ("bfloat16", "float32"):
    md = work / f"exp_{dtype}" / "results.md"
    if md.exists():
        lines += ["", f"## {dtype}", "", md.read_text()]
(out / "summary.md").write_text("\n".join(lines) + "\n")
PY
echo "done in ${SECONDS}s"
ls -l "$OUT"
