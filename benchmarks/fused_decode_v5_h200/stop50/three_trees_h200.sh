#!/usr/bin/env bash
# Three trees, each run from its own temp copy (so no tree runs from the checkout's folder),
# orders A B C then C B A: A = this tree (per-layer weights, stacked cache for the plain
# method), B = A + out/stk (stacked weights, 45aafd2), C = A with the plain method's cache
# per layer.
set -u
RAW=$OUT/abc; mkdir -p $RAW
for t in A B C; do rm -rf /tmp/t$t; mkdir /tmp/t$t; cp -r jdecode pallas_kernels scripts configs pyproject.toml /tmp/t$t/; done
cp -r out/stk/. /tmp/tB/
sed -i 's|stacked_cache=True))|stacked_cache=False))|' /tmp/tC/jdecode/decoding/autoregressive.py
grep -c "stacked_cache=False))" /tmp/tC/jdecode/decoding/autoregressive.py
for m in $MODELS; do for order in "A B C" "C B A"; do for t in $order; do
  res=$RAW/${m}_${t}_$(echo $order | tr -d ' ')
  (cd /tmp/t$t && PYTHONPATH=/tmp/t$t JDECODE_GIT_SHA=e6b828a-$t timeout 200 python3 scripts/bench_decode.py --model configs/models/$m.yaml --dtype bfloat16 --batch 1 --prompt-len 512 --new-tokens 128 --impl auto --layers fused-unstacked --chunk-steps 0 --bare --out $res > $res.log 2>&1)
  python3 -c "
import json; r=json.load(open('$res/bench_decode.json'))['rows'][0]
print('$m', '$t', '$order', round(r['compile_s'],2), round(r['decode_tok_s'],1), round(r.get('bare_loop_device_step_us') or 0,2))" | tee -a $RAW/summary.txt
done; done; done
tar czf $OUT/abc.tgz -C $OUT abc && rm -rf $RAW
