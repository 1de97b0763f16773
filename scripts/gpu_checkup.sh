#!/usr/bin/env bash
# One device call that does what a stop without a card leaves owed (issues 16 and 17): device
# machines came to few stops (none at 65, 66 and 68), and a fresh one costs ~5 minutes of a
# session's 30, so the checks a session wants first go in one call, each stage with its own
# timeout so one slow stage cannot take the others' results with it:
#
#   b8       paged decode at B8 S4096, the one point under issue 17's bar (80% of 85%):
#            bench_kernels.py --only ceilings,decode_b8_pf, the default launch against the
#            hand-pipelined loop's (`paged_attention(prefetch=True)`, PREFETCH_LAUNCHES),
#            Triton's own double-buffered one at 5 stages (DEEP_STAGE_LAUNCHES) and the
#            same-size read stream, each with its kernel's grid, registers and occupancy
#            (`parse_launch`). (decode_b8, the 20-launch grid of runs 15-17, is its own call.)
#   attn     the Generator's batch-64 attention of the Llama-3.2-1B shape (27-30 us of every
#            layer, ~26% of the step): the default (2 stages: one-slot rings), Triton's
#            double-buffered 3 stages, and the loop pipelined by hand
#            (`decode_attention(prefetch=True)`), by device time per layer
#            (tune_decode_attention.py --stages 2,3 --prefetch 0,1). If the hand loop wins,
#            the model-level A/B is: OUT=$OUT FILE=pallas_kernels/fused_decode/attention.py
#            SED='s|^PREFETCH = False|PREFETCH = True|' MODELS=llama-3.2-1b BATCH=64
#            IMPL=auto bash scripts/gpu_ab.sh (its own call).
#   attn_paged  the same for the engine's kernel (`paged_decode_attention`) at its 64-row
#            decode step (context 328, 16-token pages), where Triton double-buffers from 5
#            stages on. Not in the default STAGE.
#   profile  where the default decode step's time goes per kernel, the decode loop only
#            (profile_decode.py): the Llama-3.2-1B shape at batch 64, SmolLM2's at batch 1.
#   api      repeated `jdecode.generate` calls on one Model against fresh Generators
#            (bench_api_calls.py, SmolLM2 shape, bf16).
#
#   flash    issue 17's three flash misses (D128 non-causal, T 2048/4096/16384: 0.97-0.99x
#            cuDNN, within the two kernels' run-to-run swing) with the Hopper kernel and
#            cuDNN timed in turns, 7 rounds (bench_flash.py --rounds). Not in the default
#            STAGE: a call of its own, or in place of profile.
#   tests    `pytest -m gpu tests`: every kernel compiled against its reference (the two
#            server test files are left out where the image lacks `openai`; they hold no
#            GPU test). The real-model tests skip unless the model was brought. Not in the
#            default STAGE (stop 67 ran it on an H100 at 3dc3aa1): give it a call of its own
#            after a kernel changes.
#
#   device: OUT=$OUT JDECODE_GIT_SHA=$(cat out/sha) bash scripts/gpu_checkup.sh
#   (before the call, here: git rev-parse --short HEAD > out/sha, and carry ["out/sha"])
#
# The default stages' timeouts add up to 560 s of a call's 600, and a stage that could run
# past TOTAL_S (570) from where the call is is skipped, so the archive is always written (how
# long the stages take has not been seen yet). Results: $OUT/gpu_checkup.tgz (a device call
# brings back only a few files, so every stage writes under RAW and one archive goes to
# $OUT), and the log's tail.
set -u
export PYTHONPATH=.:${PYTHONPATH:-}
export JDECODE_GIT_SHA=${JDECODE_GIT_SHA:-unknown} BENCH_GIT_SHA=${JDECODE_GIT_SHA:-unknown}
OUT=$(realpath -m "${OUT:-out}"); STAGE=${STAGE:-b8,attn,api,profile}; mkdir -p "$OUT"
RAW=$(mktemp -d); trap 'tar czf "$OUT/gpu_checkup.tgz" -C "$RAW" .' EXIT
TOTAL_S=${TOTAL_S:-570}
# stage NAME SECONDS: asked for, and its timeout still fits the call's budget.
stage() {
  [[ ",$STAGE," == *",$1,"* ]] || return 1
  if [ $((SECONDS + $2)) -gt "$TOTAL_S" ]; then
    echo "$1: skipped, ${2}s would pass ${TOTAL_S}s at ${SECONDS}s"; return 1
  fi
}
card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
tag=$(case "$card" in *H200*) echo h200 ;; *H100*) echo h100 ;; *) echo gpu ;; esac)
echo "gpu_checkup: $card ($tag), sha $JDECODE_GIT_SHA, stages $STAGE" | tee "$RAW/card.txt"
python3 -c "import jax; print('jax', jax.__version__)" | tee -a "$RAW/card.txt"

if stage tests 500; then
  ignore=()
  python3 -c "import openai" 2>/dev/null || ignore=(
    --ignore=tests/engine/test_server.py --ignore=tests/engine/test_server_hardening.py)
  timeout 500 python3 -m pytest -m gpu -q -p no:cacheprovider tests "${ignore[@]}" \
    > "$RAW/tests.log" 2>&1
  echo "tests rc=$?"; tail -4 "$RAW/tests.log"
fi
if stage b8 170; then
  timeout 170 python3 scripts/bench_kernels.py --out "$RAW/b8" --only ceilings,decode_b8_pf \
    > "$RAW/b8.log" 2>&1
  echo "b8 rc=$?"; grep -E "read_same_bytes|B8 ctx4096 ours|check .*FAILED" "$RAW/b8.log"
fi
if stage attn 150; then
  timeout 150 python3 scripts/tune_decode_attention.py --model llama-3.2-1b --batch 64 \
    --block-k 64,128 --warps 4 --stages 2,3 --prefetch 0,1 --out "$RAW/attn" \
    > "$RAW/attn.log" 2>&1
  echo "attn rc=$?"; grep -E "us device|best" "$RAW/attn.log"
fi
if stage attn_paged 150; then
  timeout 150 python3 scripts/tune_decode_attention.py --cache paged --model llama-3.2-1b \
    --batch 64 --context 328 --max-len 2048 --block-k 64,128 --warps 4 --stages 2,5 \
    --prefetch 0,1 --out "$RAW/attn_paged" > "$RAW/attn_paged.log" 2>&1
  echo "attn_paged rc=$?"; grep -E "us device|best" "$RAW/attn_paged.log"
fi
if stage api 70; then
  timeout 70 python3 scripts/bench_api_calls.py --model configs/models/smollm2-135m.yaml \
    --dtype bfloat16 --out "$RAW/api" --tag "$tag" > "$RAW/api.log" 2>&1
  echo "api rc=$?"; tail -4 "$RAW/api.log"
fi
if stage flash 200; then
  timeout 200 python3 scripts/bench_flash.py --dims 128 --causal 0 --seqs 2048,4096,16384 \
    --grid "" --rounds 7 --out "$RAW/flash" > "$RAW/flash.log" 2>&1
  echo "flash rc=$?"; grep -E "rounds in turns|mosaic:|cudnn:" "$RAW/flash.log"
fi
for spec in "llama-3.2-1b 64" "smollm2-135m 1"; do
  if stage profile 90; then
    set -- $spec
    timeout 90 python3 scripts/profile_decode.py --model "$1" --dtype bfloat16 --batch "$2" \
      --impl auto --new-tokens 64 --out "$RAW/profile" > "$RAW/profile_$1_b$2.log" 2>&1
    echo "profile $1 b$2 rc=$?"
    grep -E '"span_ms"|device stream kernels' "$RAW/profile_$1_b$2.log"
  fi
done
