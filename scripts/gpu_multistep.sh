#!/usr/bin/env bash
# Multi-step scheduling on the GPU (issue 16: the engine is on the default path), one device
# call per PHASE on a warm machine:
#
#   PHASE=probe    the Pallas engine's exactness tests (`pytest -m gpu`), then bench_serving's
#                  full-batch decode probe (64 sequences, Llama-3.2-1B shape, bf16 random
#                  weights) once per STEPS entry (num_scheduler_steps). OUT gets probe_S/.
#   PHASE=offline  bench_serving's offline run (NUM_REQUESTS requests at t=0, continuous
#                  policy) once per STEPS entry. OUT gets offline_S/.
#
#   OUT=$OUT PHASE=probe STEPS="1 4 8" bash scripts/gpu_multistep.sh
set -euo pipefail
: "${OUT:?set OUT}"
PHASE=${PHASE:-probe}
STEPS=${STEPS:-1 4 8}
MODEL=${MODEL:-configs/models/llama-3.2-1b.yaml}
COMMON=(--model "$MODEL" --impl pallas --layout inference --policies continuous --rates ''
        --num-pages 4096 ${DTYPE:+--dtype $DTYPE})
export PYTHONPATH=.
case "$PHASE" in
  probe)
    python3 -m pytest -q -m gpu tests/engine/test_exactness.py 2>&1 | tail -3
    for s in $STEPS; do
      python3 scripts/bench_serving.py "${COMMON[@]}" --skip-offline --probe-steps 50 \
        --num-scheduler-steps "$s" --out "$OUT/probe_$s" --tag "h200_probe_s$s" 2>&1 \
        | grep -E "probe:|warm" || true
      grep -h "Full-batch\|Launching\|Device time" "$OUT/probe_$s"/*.md | cut -c1-400
    done ;;
  offline)
    for s in $STEPS; do
      python3 scripts/bench_serving.py "${COMMON[@]}" --probe-steps 0 \
        --num-requests "${NUM_REQUESTS:-400}" --num-scheduler-steps "$s" \
        --out "$OUT/offline_$s" --tag "h200_offline_s$s" 2>&1 | grep -E "offline|warm" || true
    done ;;
  *) echo "PHASE=$PHASE: choose probe or offline" >&2; exit 2 ;;
esac
