#!/usr/bin/env bash
# stop 56 call 1: the multi-row tile patch's verify A/B, then the paged decode launch sweep.
export JDECODE_GIT_SHA=40115ad
nvidia-smi --query-gpu=name --format=csv,noheader
OUT=$OUT/v TREES="A B" PATCH_B=patches/multi-row-tiles.patch MODELS="${MODELS:-smollm2-135m}" \
  VERIFY="--tokens 2,3,4,5 --fma-rows ''" timeout 330 bash scripts/gpu_trees.sh > $OUT/trees.log 2>&1
tail -3 $OUT/trees.log
tar xzf $OUT/v/trees.tgz -O ./summary.md 2>/dev/null || tar tzf $OUT/v/trees.tgz
[ -n "${NO_TUNE:-}" ] && exit 0
mkdir -p $OUT/t
PYTHONPATH=. timeout ${TUNE_S:-200} python3 scripts/tune_decode_attention.py --cache paged \
  --context 328 --max-len 2048 --block-k 32,64,128,256 --warps 2,4 --stages 2 --splits 1,2 \
  --out $OUT/t > $OUT/t/tune.log 2>&1
tail -25 $OUT/t/tune.log
cd $OUT && tar czf t.tgz t && rm -rf t
