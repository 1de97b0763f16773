set -x
export JDECODE_GIT_SHA=$(cat out/sha)
nvidia-smi --query-gpu=name --format=csv,noheader
T="timeout 150 python3 scripts/tune_decode_attention.py --cache paged --model smollm2-135m --warps 4 --stages 2 --repeats 2"
export PYTHONPATH=.
$T --dtype bfloat16 --context 328 --max-len 2048 --block-k 64,128 --splits 1,2,4 --out $OUT/t_bf16_328 2>&1 | grep -E "block_k|best"
$T --dtype float32 --context 2000 --max-len 4096 --block-k 64,128 --splits 1,2,4 --out $OUT/t_f32_2000 2>&1 | grep -E "block_k|best"
$T --dtype bfloat16 --context 2000 --max-len 4096 --block-k 64,128 --splits 1,2,4 --out $OUT/t_bf16_2000 2>&1 | grep -E "block_k|best"
timeout 150 python3 scripts/tune_decode_attention.py --cache paged --model llama-3.2-1b --warps 4 --stages 2 --repeats 2 --dtype bfloat16 --context 328 --max-len 2048 --block-k 64,128 --splits 1,2 --out $OUT/t_1b_bf16_328 2>&1 | grep -E "block_k|best"
(cd $OUT && tar czf tunes.tgz t_* && rm -rf t_*)
