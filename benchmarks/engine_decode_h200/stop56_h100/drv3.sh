#!/usr/bin/env bash
# stop 56 call 3: the engine's 64-sequence 1B probe with its writing paged kernel on 64-token blocks, 2 warps.
# (call 4 ran it with MODELS=smollm2-135m, sed-edited in the command.)
export JDECODE_GIT_SHA=40115ad
nvidia-smi --query-gpu=name --format=csv,noheader
OUT=$OUT TREES="A B" FILE_B=jdecode/cache/paged.py \
  SED_B='s/block_k=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages,/block_k=64, num_warps=2, num_stages=2,/' \
  MODELS=llama-3.2-1b SERVING="--impl pallas --layout inference --policies continuous \
  --rates '' --num-pages 4096 --token-buckets 64 --max-num-batched-tokens 512 \
  --skip-offline --probe-steps 50 --num-scheduler-steps 4" timeout 480 bash scripts/gpu_trees.sh > $OUT/serving.log 2>&1
tail -4 $OUT/serving.log
tar xzf $OUT/trees.tgz -O ./summary.md 2>/dev/null
tar xzf $OUT/trees.tgz -O ./B.diff 2>/dev/null | head -20
