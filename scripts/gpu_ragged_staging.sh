#!/usr/bin/env bash
# patches/ragged-staging.patch on the card (issue 17, ragged mixed batches): the Hopper ragged
# kernel reading q and writing o in place through an untiled staging tile. It passed the CPU
# checks (interpreter, Mosaic lowering under jax 0.11.2) but Mosaic GPU's PTX is only made on a
# card, so the patch is not on main.
#
#   test   the patched tree's compiled Hopper ragged test (test_ragged_hopper.py), which must
#          pass before any figure of it counts.
#   bench  bench_kernels.py --only ragged,ragged_d64 on main and on the patched copy,
#          in the order main, patched, patched, main, each with its same-run anchors.
#
#   device: OUT=$OUT STAGE=test,bench bash scripts/gpu_ragged_staging.sh
set -u
export PYTHONPATH=.
export JDECODE_GIT_SHA=${JDECODE_GIT_SHA:-unknown}
OUT=$(realpath -m "${OUT:-out}"); STAGE=${STAGE:-test,bench}; mkdir -p "$OUT"
stage() { [[ ",$STAGE," == *",$1,"* ]]; }
patched=/tmp/jd_ragged_staging
rm -rf "$patched" && mkdir -p "$patched" && cp -r . "$patched" 2>/dev/null
(cd "$patched" && patch -p1 -s < patches/ragged-staging.patch) || exit 1
if stage test; then
  (cd "$patched" && timeout 150 python3 -m pytest -q -p no:cacheprovider \
    tests/pallas_kernels/test_ragged_hopper.py 2>&1 | tail -5) | tee "$OUT/test_patched.txt"
fi
if stage bench; then
  bench() {  # $1: tree, $2: tag
    (cd "$1" && timeout 110 python3 scripts/bench_kernels.py --only ragged,ragged_d64 \
      --out "$OUT/$2" > "$OUT/$2.log" 2>&1; tail -n 30 "$OUT/$2/kernels.md")
  }
  bench . main_1; bench "$patched" staging_1; bench "$patched" staging_2; bench . main_2
fi
