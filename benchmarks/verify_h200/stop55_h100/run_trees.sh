#!/usr/bin/env bash
# stop 55 card call 1: trees A (HEAD), B (elementwise accumulation), C (rows stacked 3-D)
set -u
export JDECODE_GIT_SHA=0d66764+ab
T0=$(date +%s)
for t in ${TREES:-A B C D}; do
  rm -rf /tmp/t$t; mkdir -p /tmp/t$t
  cp -r jdecode pallas_kernels scripts configs pyproject.toml /tmp/t$t/
  cp patches/ab/kernel_$t.py /tmp/t$t/pallas_kernels/fused_decode/kernel.py
done
nvidia-smi --query-gpu=name --format=csv,noheader
for t in ${ORDER:-A B C D}; do
  echo "=== tree $t verify $(( $(date +%s) - T0 )) s"
  (cd /tmp/t$t && PYTHONPATH=. timeout ${VT:-150} python3 scripts/bench_verify.py --tokens ${TOKENS:-2,3,5} \
     --fma-rows "" --out $OUT/verify_$t > $OUT/verify_$t.log 2>&1; tail -12 $OUT/verify_$t/bench_verify.md)
done
if [ -n "${SWEEP:-}" ]; then
  echo "=== sweep ${SWT:-D} $(( $(date +%s) - T0 )) s"
  (cd /tmp/t${SWT:-D} && PYTHONPATH=. timeout ${ST:-200} python3 scripts/bench_fused_decode.py --batch ${SB:-5} --sweep fma \
     --kernels $SWEEP --out $OUT/sweep_B > $OUT/sweep_B.log 2>&1; tail -30 $OUT/sweep_B.log)
fi
echo "=== done $(( $(date +%s) - T0 )) s"
cd $OUT && tar czf ab.tgz verify_* sweep_* 2>/dev/null; ls $OUT
