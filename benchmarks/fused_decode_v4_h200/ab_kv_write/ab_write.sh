#!/usr/bin/env bash
# Scratch: same-run A/B of the in-kernel K/V write (this tree) against the scatters (old dense.py).
set -u
export JDECODE_GIT_SHA=${JDECODE_GIT_SHA:-unknown}
OUT=${OUT:-out}; mkdir -p $OUT
rm -rf /tmp/b; mkdir -p /tmp/b; cp -r . /tmp/b/ 2>/dev/null; cp scratch/old_dense.py /tmp/b/jdecode/cache/dense.py
bench() {  # dir label batch impl [xla flags]
  (cd $1 && XLA_FLAGS="${5:-}" PYTHONPATH=. timeout 120 python3 scripts/bench_decode.py --model llama-3.2-1b \
    --dtype bfloat16 --batch $3 --impl $4 --layers fused-unstacked --new-tokens 128 --out $OUT/$2 2>&1 \
    | tail -1 | sed "s/^/$2 /")
}
for r in 1 2; do
  bench . new_b64_r$r 64 pallas
  bench /tmp/b old_b64_r$r 64 pallas
done
bench . new_b64_cublas 64 pallas --xla_gpu_enable_triton_gemm=false
bench /tmp/b old_b64_cublas 64 pallas --xla_gpu_enable_triton_gemm=false
bench . new_b16 16 pallas
bench /tmp/b old_b16 16 pallas
bench . new_b1 1 pallas-general
bench /tmp/b old_b1 1 pallas-general
