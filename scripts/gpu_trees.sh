#!/usr/bin/env bash
# The decode benchmark over several versions of the tree in one run, each from its own copy:
# compile time, Generator tok/s and the bare loop's device us per step, side by side.
#
# Why beside gpu_ab.sh: that runs its base from the checkout and its edit from a copy, always
# base first; a change that moves compile time (static per-layer kernels, say) needs every
# tree run the same way. Here each tree runs from a fresh copy under /tmp, in the order
# given and then reversed (ROUNDS times), so neither place nor order favours one.
#
#   here: mkdir -p out/stk/jdecode/model && git show <rev>:jdecode/model/fused_decode.py \
#     > out/stk/jdecode/model/fused_decode.py
#   device (carry out/stk, which git ignores):
#     OUT=$OUT TREES="A B C" OVERLAY_B=out/stk FILE_C=jdecode/decoding/autoregressive.py \
#       SED_C='s|stacked_cache=True))|stacked_cache=False))|' \
#       MODELS="smollm2-135m llama-3.2-1b" bash scripts/gpu_trees.sh
#
# Env: TREES (names, "A B"); per tree X: PATCH_X (patches applied to its copy in order with
# `patch -p1`, e.g. of patches/; space-separated), OVERLAY_X (a folder laid over its copy by relative
# path), FILE_X and SED_X (`sed -e "$SED_X"` on one file, which must change), applied in that
# order; a tree with none is the checkout as it is. ENV_X: environment settings for tree X's
# runs, shell words (`VAR=value ...`; quote a value with spaces: ENV_B='XLA_FLAGS="--a --b"'):
# a tree may be the same code under other flags. They are recorded in its diff file. MODELS (configs/models/<m>.yaml, random weights of the
# shape), IMPL (auto), LAYERS (fused-unstacked), BATCH (1), NEW (128), PROMPT (512), CHUNK
# (0: one dispatch), ROUNDS (1: one pass in order and one reversed), BARE (1: time the bare
# loop too). Writes trees.tgz (every run's bench_decode.{json,md} and log, the edits, and
# summary.md) under OUT.
#
# SERVING (bench_serving.py's arguments but --model, --out and --tag): each run is the
# engine's serving benchmark instead, and the summary reads its probe (engine step, device
# busy) and its offline continuous run (output tok/s, TTFT). E.g. the engine's 16-sequence
# decode probe of a patched tree against this one, A B then B A:
#   OUT=$OUT TREES="A B" PATCH_B=patches/x.patch MODELS="llama-3.2-1b" SERVING="--impl pallas \
#     --layout inference --policies continuous --rates '' --num-pages 4096 --max-num-seqs 16 \
#     --token-buckets 16,64 --skip-offline --probe-steps 50 --num-scheduler-steps 4" \
#     bash scripts/gpu_trees.sh
#
# VERIFY (bench_verify.py's arguments but --model and --out): each run is the verify-step
# benchmark instead (random weights of the shape, batch 1 unless given), and the summary
# gives the default path's (pallas-auto) device us per step at each tokens-per-row T, with
# its multiple of the same run's decode step. E.g. a patch's verify steps against this tree:
#   OUT=$OUT TREES="A B" PATCH_B=patches/x.patch VERIFY="--tokens 2,3,5 \
#     --fma-rows ''" bash scripts/gpu_trees.sh
set -u
OUT=$(realpath -m "${OUT:-out}"); mkdir -p "$OUT"
export JDECODE_GIT_SHA=${JDECODE_GIT_SHA:-unknown}
RAW=$(mktemp -d); trap 'tar czf "$OUT/trees.tgz" -C "$RAW" .' EXIT
read -r -a trees <<< "${TREES:-A B}"
for t in "${trees[@]}"; do
  dir="/tmp/jdecode-tree-$t"; rm -rf "$dir"; mkdir -p "$dir"
  cp -r jdecode pallas_kernels scripts configs tests pyproject.toml "$dir"/
  overlay=$(eval echo "\${OVERLAY_$t:-}"); file=$(eval echo "\${FILE_$t:-}")
  sed_expr=$(eval echo "\"\${SED_$t:-}\""); patch_=$(eval echo "\${PATCH_$t:-}")
  for p in $patch_; do
    patch -d "$dir" -p1 -s -t < "$p" || { echo "gpu_trees.sh: PATCH_$t's $p does not apply" >&2
      exit 2; }
  done
  if [ -n "$overlay" ]; then
    [ -d "$overlay" ] || { echo "gpu_trees.sh: OVERLAY_$t=$overlay is not a folder" >&2; exit 2; }
    cp -r "$overlay"/. "$dir"/
  fi
  if [ -n "$sed_expr" ]; then
    : "${file:?FILE_$t= the file that SED_$t edits}"
    sed -i -e "$sed_expr" "$dir/$file"
  fi
  diff -ru jdecode "$dir/jdecode" > "$RAW/$t.diff"; diff -ru pallas_kernels \
    "$dir/pallas_kernels" >> "$RAW/$t.diff"
  env_name="ENV_$t"
  if [ -n "${!env_name:-}" ]; then echo "# ENV_$t: ${!env_name}" >> "$RAW/$t.diff"; fi
  if [ -n "$patch_$overlay$sed_expr" ] && [ ! -s "$RAW/$t.diff" ]; then
    echo "gpu_trees.sh: tree $t's edits change nothing" >&2; exit 2
  fi
done
order=("${trees[@]}")
reversed=(); for ((i = ${#trees[@]} - 1; i >= 0; i--)); do reversed+=("${trees[i]}"); done
if [ -n "${VERIFY:-}" ]; then
  echo "| model | tree | pass | pallas-auto device us per step at T tokens per row (x decode) |" \
    > "$RAW/summary.md"
  echo "|---|---|---|---|" >> "$RAW/summary.md"
elif [ -n "${SERVING:-}" ]; then
  echo "| model | tree | pass | warmup s | probe engine step ms | probe device busy ms |\
 offline output tok/s | offline TTFT p50 / p99 s |" > "$RAW/summary.md"
  echo "|---|---|---|---|---|---|---|---|" >> "$RAW/summary.md"
else
  echo "| model | tree | pass | compile s | prefill ms | Generator tok/s |\
 bare loop device us/step |" > "$RAW/summary.md"
  echo "|---|---|---|---|---|---|---|" >> "$RAW/summary.md"
fi
bare=$([ "${BARE:-1}" = 1 ] && echo --bare)
for m in ${MODELS:-smollm2-135m}; do
  for r in $(seq "${ROUNDS:-1}"); do
    for pass in forward reversed; do
      if [ $pass = forward ]; then seq_=("${order[@]}"); else seq_=("${reversed[@]}"); fi
      for t in "${seq_[@]}"; do
        dir="/tmp/jdecode-tree-$t"; res="$RAW/${m}_${t}_${r}_$pass"
        # shellcheck disable=SC2086  # $bare: one word or none
        env_name="ENV_$t"; eval "tree_env=(${!env_name:-})"
        if [ -n "${VERIFY:-}" ]; then
          eval "verify_args=($VERIFY)"  # shell words, as ENV_X
          (cd "$dir" && env "${tree_env[@]}" PYTHONPATH="$dir" timeout 300 python3 \
            scripts/bench_verify.py --model "$m" "${verify_args[@]}" --out "$res" \
            > "$res.log" 2>&1)
          json="$res/bench_verify.json"
        elif [ -n "${SERVING:-}" ]; then
          tag="${m}_${t}_${r}_$pass"
          eval "serving_args=($SERVING)"  # shell words, as ENV_X
          (cd "$dir" && env "${tree_env[@]}" PYTHONPATH="$dir" timeout 500 python3 \
            scripts/bench_serving.py --model "configs/models/$m.yaml" "${serving_args[@]}" \
            --out "$res" --tag "$tag" > "$res.log" 2>&1)
          json="$res/serving_$tag.json"
        else
          (cd "$dir" && env "${tree_env[@]}" PYTHONPATH="$dir" timeout 300 python3 \
            scripts/bench_decode.py --model "configs/models/$m.yaml" --dtype bfloat16 \
            --batch "${BATCH:-1}" --prompt-len "${PROMPT:-512}" --new-tokens "${NEW:-128}" \
            --impl "${IMPL:-auto}" --layers "${LAYERS:-fused-unstacked}" \
            --chunk-steps "${CHUNK:-0}" $bare --out "$res" > "$res.log" 2>&1)
          json="$res/bench_decode.json"
        fi
        python3 - "$json" "$m" "$t" "$r $pass" >> "$RAW/summary.md" <<'EOF'
import json, sys
path, m, t, p = sys.argv[1:]
def f(x, fmt):
    return "-" if x is None else format(x, fmt)
try:
    res = json.load(open(path))
    if "rows" in res and res["rows"] and "x_decode_device" in res["rows"][0]:  # bench_verify
        cells = [f"T={r['tokens']}: {f(r['device_us'], '.1f')}"
                 + ("" if r["tokens"] == 1 else f" ({f(r['x_decode_device'], '.2f')})")
                 for r in res["rows"] if r["variant"] == "pallas-auto" and r["batch"] == 1]
        print(f"| {m} | {t} | {p} | {'; '.join(cells)} |")
    elif "rows" in res:  # bench_decode
        row = res["rows"][0]
        print(f"| {m} | {t} | {p} | {row['compile_s']:.2f} | {row['prefill_ms']:.2f} | "
              f"{row['decode_tok_s']:.1f} | {f(row.get('bare_loop_device_step_us'), '.2f')} |")
    else:  # bench_serving
        pr, off = res.get("probe") or {}, res["offline"].get("continuous", {})
        warm = sum(v for k, v in res["setup"].items() if k.startswith("warmup"))
        ttft = (f"{off['ttft_p50_s']:.3f} / {off['ttft_p99_s']:.3f}" if "ttft_p50_s" in off
                else "-")
        print(f"| {m} | {t} | {p} | {warm:.1f} | {f(pr.get('engine_step_ms'), '.4f')} | "
              f"{f(pr.get('device_busy_ms'), '.4f')} | {f(off.get('output_tok_s'), '.0f')} | "
              f"{ttft} |")
except (OSError, KeyError, IndexError, ValueError) as e:
    print(f"| {m} | {t} | {p} | failed: {type(e).__name__} | | |")
EOF
      done
    done
  done
done
cat "$RAW/summary.md"
