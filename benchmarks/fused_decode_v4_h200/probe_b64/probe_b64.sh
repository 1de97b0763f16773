#!/usr/bin/env bash
# Scratch: the 1B shape at batch 64 under XLA flag variants, and an HLO dump of its step.
set -u
export PYTHONPATH=.:${PYTHONPATH:-} JDECODE_GIT_SHA=${JDECODE_GIT_SHA:-unknown}
OUT=${OUT:-out}; mkdir -p $OUT
nvidia-smi --query-gpu=name --format=csv,noheader
i=0
for f in "" "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,WHILE" "--xla_gpu_experimental_enable_triton_softmax_priority_fusion=true" "--xla_gpu_enable_triton_gemm=false"; do
  i=$((i+1)); echo "=== variant $i: XLA_FLAGS='$f'"
  XLA_FLAGS="$f" timeout 150 python3 scripts/bench_decode.py --model llama-3.2-1b --dtype bfloat16 \
    --batch 64 --impl pallas --layers fused-unstacked --new-tokens 128 --out $OUT/v$i 2>&1 | tail -2
done
echo "=== profile + dump"
XLA_FLAGS="--xla_gpu_enable_command_buffer= --xla_dump_to=$OUT/dump --xla_dump_hlo_as_text" \
  timeout 150 python3 scripts/profile_decode.py --model llama-3.2-1b --dtype bfloat16 --impl pallas \
  --batch 64 --prompt-len 512 --new-tokens 32 --top 40 --out $OUT/prof 2>&1 | tail -45
ls $OUT/dump | wc -l
# keep only the optimized step module(s)
mkdir -p $OUT/hlo; for f in $OUT/dump/*run_loop*after_optimizations.txt; do cp "$f" $OUT/hlo/; done
rm -rf $OUT/dump; du -sh $OUT
