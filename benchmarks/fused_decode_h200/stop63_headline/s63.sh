#!/usr/bin/env bash
# stop 63: the -m gpu suite at HEAD on the card, in three calls (the real model's parts ride along).
set -u
export PYTHONPATH=$PWD:/tmp/pkgs:${PYTHONPATH:-}
echo "sha $(cat out/sha)"; nvidia-smi --query-gpu=name --format=csv,noheader
python3 -c "import jax; print(jax.__version__, jax.devices())"
python3 -c "import os,sys; sys.path.insert(0,'tests'); import conftest; print('conftest: plugin', conftest._gpu_plugin_installed(), 'XLA_FLAGS', repr(os.environ.get('XLA_FLAGS')))"
case "$1" in
h) mkdir -p $OUT/h; python3 scripts/bench_decode.py --model llama-3.2-1b --dtype bfloat16 --batch 1,64 --impl auto --layers fused-unstacked --new-tokens 128 --bare --out $OUT/h/1b 2>&1 | tail -30
   python3 scripts/bench_decode.py --model configs/models/smollm2-135m.yaml --dtype bfloat16 --batch 1 --impl auto --layers fused-unstacked --new-tokens 128 --bare --out $OUT/h/smol 2>&1 | tail -20 ;;
1) timeout 540 python3 -m pytest -m gpu -q -p no:cacheprovider tests/pallas_kernels --durations=10 2>&1 | tail -25 ;;
2) timeout 540 python3 -m pytest -m gpu -q -p no:cacheprovider tests/cache tests/decoding/test_generate.py tests/decoding/test_tree.py tests/engine/test_exactness.py tests/engine/test_step_options.py tests/model/test_pallas_integration.py --durations=5 2>&1 | tail -15 ;;
3) timeout 300 python3 -m pytest -m gpu -q -p no:cacheprovider -rs tests/model/test_fused_decode.py 2>&1 | tail -15
   mkdir -p $OUT/cli; P="Write a long story about a robot who learns to paint. Describe every painting in detail."
   for i in 1 2; do for d in auto float32; do timeout 100 python3 -m jdecode.cli generate "$P" --chat --max-new-tokens 256 --ignore-eos --json --dtype $d > $OUT/cli/${d}_$i.json 2> $OUT/cli/${d}_$i.err; echo "$d $i rc=$?"; python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print({k: v for k, v in d.items() if k != 'text'})" $OUT/cli/${d}_$i.json; done; done ;;
esac
