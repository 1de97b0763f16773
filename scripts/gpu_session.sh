#!/usr/bin/env bash
# The GPU session for the decoding methods (issues 11-15) in phases, each one device call of at
# most 10 minutes on a warm machine (WORK survives between calls there):
#
#   PHASE=train  the shared self-distillation corpus, then every trained part at once (Medusa
#                heads, the EAGLE draft, exit heads, routers, the deferral classifier), each
#                into WORK/artifacts/KIND, where later phases use them in place of the
#                committed artifacts/smollm2-135m-KIND.tgz. KINDS picks some. OUT gets
#                parts.tgz (manifests and params, to commit) and train.json.
#   PHASE=b1     configs/experiments/all-methods-b1.yaml in bf16 at batch 1, its executables
#                compiled in parallel first (scripts/warm_experiment.py); B1_LABELS picks
#                rows. OUT gets b1.tgz.
#   PHASE=sweep  the batch sweeps within the budget, in the order SWEEP gives (default: all):
#                medusa (medusa-eagle.yaml's planned rows at 4/16/64), nar (nar.yaml at 4/16),
#                depth and depth-b32 (quality against cost at batch 1 and 32), cascade-b1 and
#                cascade-b32 (cascade.yaml in f32, the largest model's dtype). OUT gets
#                sweep.tgz.
#
#   MODEL=/tmp/m/model.gguf OUT=$OUT PHASE=train bash scripts/gpu_session.sh
#
# Bringing the model: a device call carries at most 64 MiB with the tree (~26 MB with the
# committed artifacts), so split the 98 MB GGUF in three (`split -n 3`), carry one part per
# call and `cat` them into /tmp/m/model.gguf on the warm machine. The machine is handed back
# about 30 s after a call ends (status: idle_release_s), taking /tmp with it: make the three
# carrying calls back to back, and give the last one the work. The 2026-12-02 run:
# benchmarks/all_methods_b1_gpu.md.
#
# CPU smoke test: SMOKE=1 shrinks every size (a few steps, 1 prompt per set, 4 new tokens).
set -euo pipefail

MODEL=${MODEL:?set MODEL to the model file, e.g. /tmp/m/model.gguf}
OUT=${OUT:?set OUT to the output directory}
PHASE=${PHASE:?set PHASE to train, b1 or sweep}
WORK=${WORK:-/tmp/jd_session}
TOTAL_S=${TOTAL_S:-540}          # this call's wall budget (a device call stops at 600 s)
TRAIN_S=${TRAIN_S:-50}           # seconds of optimizer steps per trained part (compile on top)
PROMPTS_PER_SET=${PROMPTS_PER_SET:-8}
CASCADE_PROMPTS=${CASCADE_PROMPTS:-24}  # per set in the cascade experiments
MAX_NEW=${MAX_NEW:-64}
BUCKET=${BUCKET:-128}            # smallest prompt bucket: fewer compiles per method
WORKERS=${WORKERS:-12}           # parallel compiles
SMOKE=${SMOKE:-0}

export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$WORK/xla_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-1}
export JDECODE_GIT_SHA=${JDECODE_GIT_SHA:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
mkdir -p "$OUT" "$WORK/artifacts"
exec > >(tee -a "$OUT/$PHASE.log") 2>&1
run() { echo "+ $*  [t=${SECONDS}s]"; "$@"; }
left() { echo $((TOTAL_S - SECONDS)); }
echo "gpu_session $PHASE: model $MODEL, work $WORK, budget ${TOTAL_S}s, sha $JDECODE_GIT_SHA"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv 2>/dev/null || true

# The committed artifacts are read from the checkout and parts trained in this session from
# WORK/artifacts (they replace the committed ones): the experiments run from a directory
# where artifacts/ joins both.
RUN_DIR=$WORK/run
mkdir -p "$RUN_DIR"
ln -sfn "$PWD/configs" "$RUN_DIR/configs"
for f in artifacts/*.tgz; do ln -sf "$PWD/$f" "$WORK/artifacts/"; done
ln -sfn "$WORK/artifacts" "$RUN_DIR/artifacts"

if [[ $SMOKE == 1 ]]; then
  small=(--num-prompts 4 --set samples_per_prompt=1 --set new_tokens=8 --set seq_len=32
         --set gen_batch=4 --set steps=2 --set batch_size=2 --set eval_every=100000)
  PROMPTS_PER_SET=1 MAX_NEW=4 CASCADE_PROMPTS=1
else
  small=()
fi

train_phase() {
  # One corpus for every part that reads one (their configs share the corpus section); built
  # first, so the parallel trainers load it instead of each generating it.
  run python -u - "$MODEL" "$WORK/corpus.npz" "${small[@]}" <<'PY'
import sys
from jdecode.data.prompts import train_prompts
from jdecode.io.registry import load
from jdecode.training.cli import read_train_config, resolve
from jdecode.training.corpus import load_or_build
model, path, *rest = sys.argv[1:]
n = None
if rest and rest[0] == "--num-prompts":
    n, rest = int(rest[1]), rest[2:]
sets = [v for k, v in zip(rest[::2], rest[1::2]) if k == "--set"]
_, _, tc, cc = resolve("medusa", read_train_config("configs/train/medusa.yaml"), sets)
prompts = train_prompts()
if n is not None:  # as `jdecode train --num-prompts`
    prompts = prompts[::max(1, len(prompts) // n)][:n]
corpus = load_or_build(load(model, dtype="float32"), prompts, cc, path, seed=tc.seed)
print("corpus", path, corpus.tokens.shape, corpus.val_tokens.shape)
PY
  local kinds=(${KINDS:-medusa eagle exits router deferral}) pids=() kind
  for kind in "${kinds[@]}"; do
    local extra=()
    [[ $kind != deferral ]] && extra=(--corpus "$WORK/corpus.npz")
    [[ $kind == deferral ]] && extra=(--set max_new_tokens="$MAX_NEW")
    # Five processes share the card: each takes a fifth of its memory, not the default 75%.
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.15 run python -u -m jdecode.cli train "$kind" \
      --config "configs/train/$kind.yaml" --model "$MODEL" --out "$WORK/artifacts/$kind" \
      --set time_budget_s="$TRAIN_S" "${extra[@]}" "${small[@]}" --json \
      > "$WORK/train_$kind.json" 2> "$WORK/train_$kind.err" &
    pids+=($!)
  done
  local i rc=0
  for i in "${!kinds[@]}"; do
    if ! wait "${pids[$i]}"; then
      echo "train ${kinds[$i]} failed:"; tail -20 "$WORK/train_${kinds[$i]}.err"; rc=1
    fi
  done
  python - "$WORK" "$OUT/train.json" medusa eagle exits router deferral <<'PY'
import json, sys
from pathlib import Path
work, out, kinds = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
rows = {}
for kind in kinds:
    art = work / "artifacts" / kind
    log = work / f"train_{kind}.json"
    text = log.read_text().strip() if log.exists() else ""
    rows[kind] = {"summary": json.loads(text.splitlines()[-1]) if text else None,
                  "manifest": json.loads((art / "manifest.json").read_text())
                  if (art / "manifest.json").exists() else None,
                  "eval": json.loads((art / "history.json").read_text()).get("eval")
                  if (art / "history.json").exists() else None}
out.write_text(json.dumps(rows, indent=1))
PY
  local parts=()
  for kind in medusa eagle exits router deferral; do
    [[ -f $WORK/artifacts/$kind/manifest.json ]] && parts+=("$kind/manifest.json" "$kind/params")
  done
  run tar -czf "$OUT/parts.tgz" -C "$WORK/artifacts" "${parts[@]}"
  return $rc
}

# An experiment YAML with the run's model, dtype and sizes (and, given labels, those rows only,
# in that order), run after its executables are compiled in parallel.
experiment() {  # NAME CONFIG DTYPE BATCHES LABELS(all|a,b,c) [extra --set items...]
  local name=$1 config=$2 dtype=$3 batches=$4 labels=$5 budget
  shift 5
  budget=$(left)
  if [[ $budget -lt 40 ]]; then
    echo "experiment $name skipped: ${budget}s of the ${TOTAL_S}s budget left"; return 0
  fi
  python - "$config" "$RUN_DIR/$name.yaml" "$labels" "$WORK/artifacts" <<'PY'
import sys
from pathlib import Path
import yaml
src, dst, labels, trained = sys.argv[1:]
cfg = yaml.safe_load(Path(src).read_text())
# Parts trained in this session (WORK/artifacts/KIND) replace the committed ones.
for kind in ("medusa", "eagle", "exits", "router", "deferral"):
    if (Path(trained) / kind / "manifest.json").exists():
        text = yaml.safe_dump(cfg, sort_keys=False).replace(
            f"artifacts/smollm2-135m-{kind}.tgz", f"artifacts/{kind}")
        cfg = yaml.safe_load(text)
if labels != "all":
    keep = labels.split(",")
    cfg["methods"] = sorted((m for m in cfg["methods"] if m["label"] in keep),
                            key=lambda m: keep.index(m["label"]))
Path(dst).write_text(yaml.safe_dump(cfg, sort_keys=False))
PY
  local sets=(--set model="$MODEL" --set dtype="$dtype" --set batch_sizes="[$batches]"
              --set max_new_tokens="$MAX_NEW" --set prompts_per_set="$PROMPTS_PER_SET" "$@")
  (cd "$RUN_DIR" && run timeout "$budget" python -u "$OLDPWD/scripts/warm_experiment.py" \
     "$name.yaml" "${sets[@]}" --workers "$WORKERS" --bucket "$BUCKET") \
    || echo "warm-up of $name stopped (rc $?)"
  budget=$(left)
  (cd "$RUN_DIR" && run timeout "$budget" python -u -c 'import sys
import jdecode.decoding.generate as g
g.MIN_PROMPT_BUCKET = int(sys.argv.pop(1))
from jdecode.cli import app
app(prog_name="jdecode")' "$BUCKET" experiment "$name.yaml" "${sets[@]}" --out "$WORK/exp/$name") \
    || echo "experiment $name stopped (rc $?): its finished cells are kept"
}

case $PHASE in
  train) train_phase ;;
  b1)
    experiment all-methods-b1 configs/experiments/all-methods-b1.yaml bfloat16 1 "${B1_LABELS:-all}"
    run tar -czf "$OUT/b1.tgz" -C "$WORK/exp" all-methods-b1 ;;
  sweep)
    # SWEEP picks experiments, in order; each call resumes the cells an earlier call finished
    # (WORK survives on a warm machine) and OUT gets sweep.tgz after every experiment, so a
    # call cut at its limit still returns what ran. 4/16/64 of medusa-64, eagle-60 and
    # blockwise-4 ran on 2026-12-02 (benchmarks/medusa_eagle_batches_h200.md); the planned
    # rows check the >= 0.98x bar.
    for item in ${SWEEP:-medusa nar depth depth-b32 cascade-b1 cascade-b32}; do
      case $item in
        medusa) experiment medusa-eagle-batches configs/experiments/medusa-eagle.yaml bfloat16 \
                  4,16,64 medusa-64-planned,eagle-60-planned,blockwise-4-planned ;;
        nar) experiment nar-batches configs/experiments/nar.yaml bfloat16 4,16 \
               lookahead-w3-n3-g3,lookahead-w7-n5-g7,jacobi-n16 ;;
        depth) experiment depth configs/experiments/depth.yaml bfloat16 1 all ;;
        depth-b32) experiment depth-b32 configs/experiments/depth-b32.yaml bfloat16 32 all ;;
        # Every task of the checkable set the prompt count allows (24 by default, 3x the
        # other experiments' 8): the cascade bar is read off task accuracy.
        cascade-b1|cascade-b32)
          experiment "$item" configs/experiments/cascade.yaml float32 "${item#cascade-b}" all \
            --set prompts="[tasks,chat]" --set prompts_per_set="$CASCADE_PROMPTS" ;;
        *) echo "unknown SWEEP item $item: choose medusa, nar, depth, depth-b32, cascade-b1" \
                "or cascade-b32"; exit 2 ;;
      esac
      run tar -czf "$OUT/sweep.tgz" -C "$WORK/exp" .
    done ;;
  *) echo "unknown PHASE $PHASE: choose train, b1 or sweep"; exit 2 ;;
esac
echo "gpu_session $PHASE done in ${SECONDS}s"
ls -l "$OUT"
