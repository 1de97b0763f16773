#!/usr/bin/env bash
# Issue 16 on the GPU: the fused decode GEMVs' tests compiled, their tile sweep, then decode
# throughput and per-step kernel counts with the fused step (pallas-fused) and without it
# (pallas-general), in one run, for the default model's shape and the Llama-3.2-1B shape
# (random weights).
#   device: OUT=$OUT STAGE=tests,kernels,attention,bench,profile bash scripts/gpu_fused_decode.sh
#   kernels: the full tile sweep at batch 1; weights: the default tiles with and without
#   `weights_first` (device time per launch); b64: the tensor-core tiles and the attention at
#   64 rows of the 1B shape (benchmarks/fused_decode_h200.md, 2026-12-03 evening).
#   attention: the fused step's attention at each split count (ATTN_BATCH, default 1).
#   SMOL_BATCH / LLAMA_BATCH: batch sizes of the bench stage (default 1).
# Each stage has its own timeout so one slow stage cannot take the others' results with it.
set -u
export PYTHONPATH=.:${PYTHONPATH:-}
OUT=${OUT:-out}; STAGE=${STAGE:-tests,kernels,bench,profile}; mkdir -p "$OUT"
DTYPE=${DTYPE:-bfloat16}
# A config name that is not a registered model, so the benchmarks use random weights.
cp configs/models/smollm2-135m.yaml configs/models/smollm2-135m-shape.yaml
stage() { [[ ",$STAGE," == *",$1,"* ]]; }
if stage tests; then
  timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests/model/test_fused_decode.py \
    tests/model/test_pallas_integration.py tests/pallas_kernels/test_triton_lowering.py 2>&1 \
    | tail -8
fi
if stage kernels; then
  for m in smollm2-135m llama-3.2-1b; do
    timeout 240 python3 scripts/bench_fused_decode.py --model $m --dtype $DTYPE \
      --out "$OUT/kernels" 2>&1 | tail -7
  done
fi
if stage weights; then
  for m in smollm2-135m llama-3.2-1b; do
    timeout 120 python3 scripts/bench_fused_decode.py --model $m --dtype $DTYPE \
      --sweep weights-first --out "$OUT/weights_first" 2>&1 | grep -E "^best"
  done
fi
if stage b64; then
  timeout 240 python3 scripts/bench_fused_decode.py --model llama-3.2-1b --dtype $DTYPE \
    --batch 64 --sweep tc --out "$OUT/b64" 2>&1 | grep -E "^best|^general"
  timeout 120 python3 scripts/bench_fused_decode.py --model llama-3.2-1b --dtype $DTYPE \
    --part attention --batch 64 --splits 1,2,4 --out "$OUT/b64" 2>&1 | tail -4
fi
if stage attention; then
  for m in smollm2-135m llama-3.2-1b; do
    timeout 240 python3 scripts/bench_fused_decode.py --model $m --dtype $DTYPE --part attention \
      --batch "${ATTN_BATCH:-1}" --out "$OUT/attention" 2>&1 | tail -7
  done
fi
if stage bench; then
  timeout 240 python3 scripts/bench_decode.py --model smollm2-135m-shape --dtype $DTYPE \
    --batch "${SMOL_BATCH:-1}" --impl pallas-general,pallas-fused --layers fused-unstacked \
    --new-tokens 128 --out "$OUT/smol" 2>&1 | tail -6
  timeout 240 python3 scripts/bench_decode.py --model llama-3.2-1b --dtype $DTYPE \
    --batch "${LLAMA_BATCH:-1}" --impl pallas-general,pallas-fused --layers fused-unstacked \
    --new-tokens 128 --out "$OUT/llama" 2>&1 | tail -6
fi
if stage profile; then
  for m in ${PROFILE_MODELS:-smollm2-135m-shape llama-3.2-1b}; do
    for impl in ${PROFILE_IMPLS:-pallas-general pallas-fused}; do
      XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 120 python3 scripts/profile_decode.py \
        --model $m --dtype $DTYPE --impl $impl --prompt-len 512 --new-tokens 64 --top 14 \
        --out "$OUT/profile" 2>&1 | head -16
    done
  done
fi
