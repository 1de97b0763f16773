#!/usr/bin/env bash
# Scratch: same-run A/B of the rows-as-slots decode-only path (this tree) against 7ab8d01's
# ragged.py (decode-only with the row gather and scatter), engine probe at batch 64.
set -u
OUT=${OUT:-out}; mkdir -p $OUT
rm -rf /tmp/b; mkdir -p /tmp/b; cp -r . /tmp/b/ 2>/dev/null; cp -r scratch/old/* /tmp/b/
probe() {  # dir tag
  (cd $1 && PYTHONPATH=. timeout 120 python3 scripts/bench_serving.py --model configs/models/llama-3.2-1b.yaml \
    --impl pallas --layout inference --skip-offline --rates '' --policies continuous --probe-steps 50 \
    --num-pages 4096 --out $OUT/$2 --tag $2 > /dev/null 2>&1
   grep -h "Full-batch\|Launching\|Device time" $OUT/$2/serving_$2.md | cut -c1-330 | sed "s/^/$2 /")
}
probe . rows
probe /tmp/b gather
