"""Orbax cache of converted params, so a second load skips GGUF dequantization."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import jax

from jdecode.config import ModelConfig
from jdecode.model.params import Params, abstract_params

# Bumped whenever the Params pytree changes, so an old cache is never restored into it.
PARAMS_FORMAT = 2


def cache_root() -> Path:
    return Path(os.environ.get("JDECODE_CACHE", Path.home() / ".cache" / "jdecode"))


def cache_dir_for(source: Path, dtype: str) -> Path:
    """One folder per (file path, size, mtime, dtype): a changed source never hits stale params."""
    st = source.stat()
    key = f"{source.resolve()}|{st.st_size}|{st.st_mtime_ns}|{dtype}|{PARAMS_FORMAT}"
    return cache_root() / "params" / hashlib.sha256(key.encode()).hexdigest()[:16]


def save_params(path: Path, params: Params) -> None:
    import orbax.checkpoint as ocp

    path.parent.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path.resolve(), params, force=True)


def restore_params(path: Path, cfg: ModelConfig) -> Params:
    """Restores into the abstract structure of `cfg` (the shapes are checked by orbax)."""
    import orbax.checkpoint as ocp

    abstract = abstract_params(cfg)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abstract)
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path.resolve(), target)


CACHE_README = """jdecode caches GGUF weights converted to float arrays here (orbax), so a second
load skips dequantization: one folder per (file, size, mtime, dtype) under params/, about
4 bytes per parameter in float32 (333 MB for SmolLM2-135M).

Clear it:  rm -rf {root}/params
Move it:   export JDECODE_CACHE=/some/other/dir
"""


def announce_once(cache_dir: Path) -> None:
    """Says, the first time anything is cached under the cache root, where it went and how to
    clear it (a README.txt there marks that it was said)."""
    root = cache_root()
    readme = root / "README.txt"
    if readme.exists():
        return
    readme.write_text(CACHE_README.format(root=root))
    size = sum(f.stat().st_size for f in cache_dir.rglob("*") if f.is_file())
    logging.getLogger("jdecode").warning(
        "cached the converted params (%.0f MB) in %s, so the next load is fast; clear the "
        "cache with `rm -rf %s` (see %s)", size / 1e6, cache_dir, root / "params", readme)
