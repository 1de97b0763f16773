set -x
export JDECODE_GIT_SHA=$(cat out/sha)
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -c "import jax; print(jax.__version__, jax.devices())"
PYTHONPATH=. timeout 520 python3 scripts/tune_decode_attention.py --cache paged --model smollm2-135m --dtype float32 --context 328 --max-len 2048 --block-k 64,128 --warps 2,4,8 --stages 2,3 --splits 1,2,4 --repeats 2 --out $OUT/tune 2>&1 | tee $OUT/tune.log | tail -45
(cd $OUT && tar czf tune.tgz tune && rm -rf tune)
