#!/usr/bin/env bash
# The engine's decode on the GPU (issue 16: the engine is on the default path): the fused
# engine step, the write-in-kernel decode and the host's share (first run on a card on
# 2026-12-05, an H100: benchmarks/engine_decode_h200.md):
#
#   tests    the new kernels and paths compiled: paged_decode_attention against its
#            reference, the general path's decode-only write-in-kernel against XLA, the fused
#            engine's greedy against single-request greedy, the Pallas engine's exactness.
#   latency  one request's decode ms per token: the engine with the fused decode step (the
#            default for steps of up to 5 decodes) and without it, beside the Generator, on
#            the SmolLM2 and Llama-3.2-1B shapes (bf16, random weights).
#   probe    the 64-sequence decode probe (bench_serving.py, multi-step 4) of the 1B shape.
#            (Its A/B against the separate cache write ran on an H100 on 2026-12-05 and kept
#            the write in the kernel: benchmarks/engine_decode_h200.md.)
#   host     the engine's host work per decode step on this machine's CPU with no device work
#            (bench_engine_host.py, benchmarks/engine_host_cpu.md), and the 64-sequence probe
#            of the SmolLM2 shape, whose device step is short enough for the host to bound it.
#
#   ragged   the engine's mixed-batch attention against separate calls, D128 and D64
#            (bench_kernels.py --only ragged,ragged_d64; benchmarks/paged_attention_h200.md,
#            run 19 ran it on an H100 only). Not in the default STAGE.
#
#   device: OUT=$OUT STAGE=tests,latency,probe,host bash scripts/gpu_engine_fused.sh
# The four stages took ~13 min there: give each device call two at most. Each stage has its own timeout so one slow stage cannot take the others' results with it.
set -u
export PYTHONPATH=.:${PYTHONPATH:-}
export JDECODE_GIT_SHA=${JDECODE_GIT_SHA:-unknown}
OUT=$(realpath -m "${OUT:-out}"); STAGE=${STAGE:-tests,latency,probe,host}; mkdir -p "$OUT"
# A device call brings back only a few files from $OUT (2026-12-05: 8; the rest were left
# out), so every stage writes under RAW and one archive of it goes to $OUT at the end.
RAW=$(mktemp -d); trap 'tar czf "$OUT/gpu_engine_fused.tgz" -C "$RAW" .' EXIT
stage() { [[ ",$STAGE," == *",$1,"* ]]; }
if stage tests; then
  JAX_DEFAULT_MATMUL_PRECISION=highest timeout 420 python3 -m pytest -q -p no:cacheprovider \
    tests/model/test_fused_decode.py -k "paged or single_split or decode_attention" \
    tests/cache/test_paged.py tests/engine/test_fused_decode_engine.py \
    tests/engine/test_exactness.py 2>&1 | tail -8
fi
if stage latency; then
  for m in smollm2-135m llama-3.2-1b; do
    timeout 240 python3 scripts/bench_engine_latency.py --model configs/models/$m.yaml \
      --dtype bfloat16 --new-tokens 128 --repeats 3 \
      --engine-impls pallas-fused,pallas-general --out "$RAW/latency" --tag "$m" \
      2>&1 | grep -E "^\| "
  done
fi
if stage probe; then
  timeout 200 python3 scripts/bench_serving.py --model configs/models/llama-3.2-1b.yaml \
    --impl pallas --layout inference --policies continuous --rates '' --num-pages 4096 \
    --skip-offline --probe-steps 50 --num-scheduler-steps 4 --out "$RAW/probe" --tag probe \
    2>&1 | tail -4
fi
if stage host; then
  timeout 150 python3 scripts/bench_engine_host.py --model configs/models/smollm2-135m.yaml \
    --batch 64 --num-scheduler-steps 1,4 --output-len 0,1000 --out "$RAW/host" --tag host \
    2>&1 | grep -E "^\| "
  timeout 200 python3 scripts/bench_serving.py --model configs/models/smollm2-135m.yaml \
    --impl pallas --layout inference --policies continuous --rates '' --num-pages 4096 \
    --skip-offline --probe-steps 50 --num-scheduler-steps 4 --out "$RAW/probe_smol" \
    --tag smol_shape 2>&1 | tail -4
fi
if stage ragged; then
  timeout 240 python3 scripts/bench_kernels.py --only ragged,ragged_d64 --out "$RAW/ragged" \
    2>&1 | grep -E "ours_ragged_short|separate_decode_plus_gather_flash"
fi
