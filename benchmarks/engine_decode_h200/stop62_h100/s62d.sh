export JDECODE_GIT_SHA="$(cat out/sha)+f32tune"
nvidia-smi --query-gpu=name --format=csv,noheader
date -u
OUT=$OUT TREES="A" OVERLAY_A=out/old MODELS=smollm2-135m SERVING="--impl pallas --layout inference --policies continuous --rates '' --num-pages 4096 --token-buckets 64 --max-num-batched-tokens 512 --skip-offline --probe-steps 50 --num-scheduler-steps 4" timeout 300 bash scripts/gpu_trees.sh > $OUT/serving.log 2>&1
tail -4 $OUT/serving.log
tar xzf $OUT/trees.tgz -O ./summary.md 2>/dev/null
date -u
date -u
