#!/usr/bin/env bash
# stop 56 call 2: the patch's verify A/B on the 1B shape, then the 1B engine kernel at 2000 past tokens.
export JDECODE_GIT_SHA=40115ad
OUT=$OUT/v TREES="A B" PATCH_B=patches/multi-row-tiles.patch MODELS=llama-3.2-1b \
  VERIFY="--tokens 2,3,5 --fma-rows ''" timeout 300 bash scripts/gpu_trees.sh > $OUT/trees.log 2>&1
tail -3 $OUT/trees.log
tar xzf $OUT/v/trees.tgz -O ./summary.md 2>/dev/null || tar tzf $OUT/v/trees.tgz
mkdir -p $OUT/t
PYTHONPATH=. timeout ${TUNE_S:-200} python3 scripts/tune_decode_attention.py --cache paged \
  --context 2000 --max-len 4096 --block-k 32,64,128,256 --warps 2,4 --stages 2 --splits 1,2 \
  --out $OUT/t > $OUT/t/tune.log 2>&1
tail -25 $OUT/t/tune.log
cd $OUT && tar czf t.tgz t && rm -rf t
