#!/usr/bin/env bash
# Scratch: same-run A/B of the engine's decode-only steps (this tree) against HEAD's files.
set -u
export JDECODE_GIT_SHA=${JDECODE_GIT_SHA:-unknown}
OUT=${OUT:-out}; mkdir -p $OUT
rm -rf /tmp/b; mkdir -p /tmp/b; cp -r . /tmp/b/ 2>/dev/null; cp -r scratch/old/* /tmp/b/
probe() {  # dir tag
  (cd $1 && PYTHONPATH=. timeout 150 python3 scripts/bench_serving.py --model configs/models/llama-3.2-1b.yaml \
    --impl pallas --layout inference --skip-offline --rates '' --policies continuous --probe-steps 50 \
    --num-pages 4096 --out $OUT/$2 --tag $2 2>&1 | grep -E "probe:|^  " | head -14 | sed "s/^/$2 /"
   grep -h "Full-batch\|Launching\|Device time" $OUT/$2/serving_$2.md | cut -c1-400 | sed "s/^/$2 /")
}
probe . new1
probe /tmp/b old1
probe . new2
