#!/usr/bin/env bash
# Issue 16 on the GPU: the fused decode step's tests compiled, then decode throughput and
# per-step kernel counts with the opt-in fused decode step (pallas-fused) and without it (pallas),
# in one run, for the default model's shape and the Llama-3.2-1B shape (random bf16 weights).
#   device: OUT=$OUT STAGE=tests|bench|profile|all bash scripts/gpu_fused_decode.sh
# Each stage has its own timeout so one slow stage cannot take the others' results with it.
set -u
export PYTHONPATH=.:${PYTHONPATH:-}
OUT=${OUT:-out}; STAGE=${STAGE:-all}; mkdir -p "$OUT"
# A config name that is not a registered model, so the benchmarks use random weights.
cp configs/models/smollm2-135m.yaml configs/models/smollm2-135m-shape.yaml
stage() { [ "$STAGE" = all ] || [[ ",$STAGE," == *",$1,"* ]]; }
if stage tests; then
  timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/model/test_fused_decode.py \
    tests/model/test_pallas_integration.py 2>&1 | tail -15
fi
if stage bench; then
  timeout 200 python3 scripts/bench_decode.py --model smollm2-135m-shape --dtype bfloat16 \
    --batch "${SMOL_BATCH:-1,4}" --impl pallas,pallas-fused --layers fused-unstacked \
    --new-tokens 128 --out "$OUT/smol" 2>&1 | tail -6
  timeout 200 python3 scripts/bench_decode.py --model llama-3.2-1b --dtype bfloat16 \
    --batch "${LLAMA_BATCH:-1}" --impl pallas,pallas-fused --layers fused-unstacked \
    --new-tokens 128 --out "$OUT/llama" 2>&1 | tail -6
fi
if stage profile; then
  for m in smollm2-135m-shape llama-3.2-1b; do
    for impl in pallas pallas-fused; do
      XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 120 python3 scripts/profile_decode.py --model $m --dtype bfloat16 --impl $impl \
        --prompt-len 512 --new-tokens 64 --top 14 --out "$OUT/profile" 2>&1 | head -16
    done
  done
fi
