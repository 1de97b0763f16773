#!/usr/bin/env bash
# The persistent layer kernel (pallas_kernels/fused_decode/layer.py) on the card, issue 16:
#
#   layer  bench_layer_kernel.py (the SmolLM2 shape; LAYER_MODELS adds others): the five
#          kernels against the layer kernel's grids by device span per layer; "t" variants
#          trace where each phase's time goes, "s16" runs attention at 16 splits. An H100
#          ran it on 2026-12-05: benchmarks/fused_decode_h200.md.
#   attn   the fused step's attention + O at 4, 8 and 16 splits by device time, on the
#          SmolLM2 and 1B shapes (bench_fused_decode.py --part attention).
#   model  bench_decode.py at batch 1, the five kernels against the layer kernel in the model
#          (JDECODE_FUSED_DECODE=layer through --impl pallas-layer).
#   tests  the layer kernel's tests compiled (barriers on).
#
#   device: OUT=$OUT STAGE=layer,model bash scripts/gpu_layer_kernel.sh
# A device call brings back at most 8 files: everything goes into one archive.
set -u
export PYTHONPATH=.:${PYTHONPATH:-}
export JDECODE_GIT_SHA=${JDECODE_GIT_SHA:-unknown}
OUT=$(realpath -m "${OUT:-out}"); STAGE=${STAGE:-layer,model}; mkdir -p "$OUT"
VARIANTS=${VARIANTS:-1x8,4x4,1x8t,4x4t}
RAW=$(mktemp -d); trap 'tar czf "$OUT/gpu_layer_kernel.tgz" -C "$RAW" .' EXIT
stage() { [[ ",$STAGE," == *",$1,"* ]]; }
if stage tests; then
  timeout 240 python3 -m pytest -q -p no:cacheprovider tests/model/test_fused_decode.py \
    -k layer 2>&1 | tail -4
fi
if stage layer; then
  for m in ${LAYER_MODELS:-smollm2-135m}; do
    timeout ${LAYER_TIMEOUT:-240} python3 scripts/bench_layer_kernel.py --model $m \
      --variants "$VARIANTS" --out "$RAW/layer" 2>&1 | grep -E "^\| |^[a-z].*MB"
  done
fi
if stage attn; then
  for m in smollm2-135m llama-3.2-1b; do
    timeout 200 python3 scripts/bench_fused_decode.py --model $m --part attention \
      --splits 4,8,16 --out "$RAW/attn" 2>&1 \
      | grep -E "^attention|^fused|^general"
  done
fi
if stage model; then
  for m in ${MODEL_MODELS:-smollm2-135m}; do
    # A config path: random weights of the shape (the name would load the real model).
    timeout 200 python3 scripts/bench_decode.py --model configs/models/$m.yaml \
      --dtype bfloat16 --batch 1 \
      --impl pallas-fused,pallas-layer --layers fused-unstacked --new-tokens 128 \
      --out "$RAW/model_$m" 2>&1 | grep -E "^\| " | head -8
  done
fi
