export JDECODE_GIT_SHA=$(cat out/sha)
nvidia-smi --query-gpu=name --format=csv,noheader
export PYTHONPATH=.
T="timeout 100 python3 scripts/tune_decode_attention.py --cache paged --model smollm2-135m --dtype float32 --context 328 --max-len 2048 --warps 4 --stages 2 --repeats 2 --block-k 64,128"
$T --batch 16 --splits 4,8 --out $OUT/b16 2>&1 | grep -E "block_k|best"
$T --batch 4 --splits 8,16 --out $OUT/b4 2>&1 | grep -E "block_k|best"
$T --batch 1 --splits 8,16 --out $OUT/b1 2>&1 | grep -E "block_k|best"
(cd $OUT && tar czf small_batches.tgz b16 b4 b1 && rm -rf b16 b4 b1)
