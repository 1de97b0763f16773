#!/usr/bin/env bash
# A same-run A/B of one source edit in the decode step, on the card: the tree as committed
# ("base") against a copy with `sed -e "$SED" "$FILE"` applied ("edit"), or against the same
# tree run with EDIT_ENV's assignments in its environment, or against a copy with OVERLAY's
# files laid over it (e.g. the previous commit's version of a rewritten file; any of these
# together), alternating ROUNDS times, each a bench_decode.py run with the bare-loop anchor,
# whose device us per step (one dispatch for all steps: no host time) resolves 1-2% where
# the Generator's wall tok/s spreads by ~5% between runs. The sed must change FILE, and the
# overlay some file (checked), or nothing is timed.
#
#   device: OUT=$OUT FILE=pallas_kernels/fused_decode/attention.py \
#     SED='s|max_len // block_k // 2|max_len // block_k|' MODELS=smollm2-135m bash scripts/gpu_ab.sh
#   device: OUT=$OUT EDIT_ENV='XLA_FLAGS=--xla_gpu_enable_triton_gemm=false' \
#     MODELS=llama-3.2-1b BATCH=64 IMPL=auto bash scripts/gpu_ab.sh
#   here: mkdir -p out/old/jdecode/decoding && git show HEAD~1:jdecode/decoding/loop.py \
#     > out/old/jdecode/decoding/loop.py
#   device (carry out/old, which git ignores): OUT=$OUT OVERLAY=out/old bash scripts/gpu_ab.sh
#     (where the edit is outside the step, as here, the Generator's tok/s is the figure:
#     the bare loop runs the step alone)
#
# Env: MODELS (configs/models/<m>.yaml, random weights of the shape), IMPL (pallas-fused),
# LAYERS (fused-unstacked), BATCH (1), NEW (128), PROMPT (512), ROUNDS (2), CHUNK (0: the
# Generator decodes in one dispatch; 8: in chunks from 8 steps up, as `jdecode generate`).
# Writes one archive, gpu_ab.tgz (a device call brings back a few files only), with each
# run's bench_decode.{json,md} and summary.md: device us per step per run.
set -u
export PYTHONPATH=.:${PYTHONPATH:-}
export JDECODE_GIT_SHA=${JDECODE_GIT_SHA:-unknown}
OUT=$(realpath -m "${OUT:-out}"); mkdir -p "$OUT"
EDIT_ENV=${EDIT_ENV:-}  # e.g. 'XLA_FLAGS=--xla_gpu_enable_triton_gemm=false', words of NAME=VALUE
OVERLAY=${OVERLAY:-}  # a folder of files laid over the edit tree by relative path
if [ -z "$EDIT_ENV" ] && [ -z "${SED:-}" ] && [ -z "$OVERLAY" ]; then
  echo "gpu_ab.sh: give FILE= and SED= (a source edit), OVERLAY= (a folder of replacement" \
    "files) or EDIT_ENV= (an environment edit)" >&2
  exit 2
fi
for a in $EDIT_ENV; do
  case $a in [A-Za-z_]*=*) ;; *) echo "gpu_ab.sh: EDIT_ENV word '$a' is not NAME=VALUE" >&2
    exit 2 ;; esac
done
RAW=$(mktemp -d); trap 'tar czf "$OUT/gpu_ab.tgz" -C "$RAW" .' EXIT
ALT=$(mktemp -d)
cp -r jdecode pallas_kernels scripts configs pyproject.toml "$ALT"/
if [ -n "${SED:-}" ]; then
  : "${FILE:?FILE= the source file that SED edits}"
  sed -i -e "$SED" "$ALT/$FILE"
  if cmp -s "$FILE" "$ALT/$FILE"; then
    echo "gpu_ab.sh: SED left $FILE unchanged; nothing to compare" | tee "$RAW/summary.md"
    exit 2
  fi
  diff -u "$FILE" "$ALT/$FILE" | tee "$RAW/edit.diff"
fi
if [ -n "$OVERLAY" ]; then
  [ -d "$OVERLAY" ] || { echo "gpu_ab.sh: OVERLAY=$OVERLAY is not a folder" >&2; exit 2; }
  cp -r "$OVERLAY"/. "$ALT"/
  for f in $(cd "$OVERLAY" && find . -type f); do diff -u "$f" "$ALT/$f"; done \
    | tee -a "$RAW/edit.diff"
  if [ ! -s "$RAW/edit.diff" ]; then
    echo "gpu_ab.sh: OVERLAY matches the tree; nothing to compare" | tee "$RAW/summary.md"
    exit 2
  fi
fi
[ -z "$EDIT_ENV" ] || echo "edit env: $EDIT_ENV" | tee -a "$RAW/edit.diff"
echo "| model | round | tree | bare loop device us/step | bare loop tok/s | Generator tok/s |" \
  > "$RAW/summary.md"
echo "|---|---|---|---|---|---|" >> "$RAW/summary.md"
for m in ${MODELS:-smollm2-135m}; do
  for r in $(seq "${ROUNDS:-2}"); do
    for tree in base edit; do
      dir=$([ $tree = base ] && pwd || echo "$ALT")
      env=$([ $tree = base ] || echo "$EDIT_ENV")
      res="$RAW/${m}_${tree}_$r"
      # shellcheck disable=SC2086  # env: NAME=VALUE words, split on purpose
      (cd "$dir" && env $env timeout 240 python3 scripts/bench_decode.py \
        --model "configs/models/$m.yaml" --dtype bfloat16 --batch "${BATCH:-1}" \
        --prompt-len "${PROMPT:-512}" --new-tokens "${NEW:-128}" --impl "${IMPL:-pallas-fused}" \
        --layers "${LAYERS:-fused-unstacked}" --chunk-steps "${CHUNK:-0}" --bare \
        --out "$res" > "$res.log" 2>&1)
      python3 - "$res/bench_decode.json" "$m" "$r" "$tree" >> "$RAW/summary.md" <<'EOF'
import json, sys
path, m, r, tree = sys.argv[1:]
try:
    row = json.load(open(path))["rows"][0]
    step = row.get("bare_loop_device_step_us")
    print(f"| {m} | {r} | {tree} | {'-' if step is None else f'{step:.2f}'} | "
          f"{row['bare_loop_tok_s']:.1f} | {row['decode_tok_s']:.1f} |")
except (OSError, KeyError, IndexError, ValueError) as e:
    print(f"| {m} | {r} | {tree} | failed: {type(e).__name__} | | |")
EOF
    done
  done
done
cat "$RAW/summary.md"
