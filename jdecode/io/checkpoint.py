"""Orbax cache of converted params, so a second load skips GGUF dequantization."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

import jax

from jdecode.config import ModelConfig
from jdecode.io.tokenizer import Tokenizer
from jdecode.model.params import Params, abstract_params

# Bumped whenever the Params pytree changes, so an old cache is never restored into it.
PARAMS_FORMAT = 2
# Bumped whenever what meta.json holds changes; a cache of another format reads the GGUF.
META_FORMAT = 1


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


def save_meta(cache_dir: Path, source: Path, cfg: ModelConfig, tok: Tokenizer | None) -> None:
    """Writes the model's config and tokenizer beside its cached params (meta.json, and the
    tokenizer as tokenizers' own tokenizer.json), so a cached load skips the GGUF's metadata.

    Why: parsing the GGUF's metadata (SmolLM2's 49k-token vocabulary and merges, field by
    field through numpy memmaps) took 3.4 s of `jdecode generate`'s 8.3 s on a 2-core CPU,
    after the params themselves came from this cache.
    """
    meta: dict = {"source": str(source), "format": META_FORMAT,
                  "config": dataclasses.asdict(cfg), "tokenizer": None}
    if tok is not None:
        (cache_dir / "tokenizer.json").write_text(tok.backend.to_str())
        meta["tokenizer"] = {"bos_id": tok.bos_id, "eos_ids": list(tok.eos_ids),
                             "add_bos": tok.add_bos, "chat_template": tok.chat_template}
    (cache_dir / "meta.json").write_text(json.dumps(meta))


def restore_meta(cache_dir: Path) -> tuple[ModelConfig, Tokenizer | None] | None:
    """(config, tokenizer) that `save_meta` wrote, or None where the cache holds none (a cache
    of another format, or an unreadable one): the caller then reads the GGUF."""
    from tokenizers import Tokenizer as HFTokenizer

    try:
        meta = json.loads((cache_dir / "meta.json").read_text())
        if meta.get("format") != META_FORMAT or meta["config"].get("rope_scaling") is not None:
            return None
        cfg = ModelConfig(**meta["config"])
        t = meta["tokenizer"]
        tok = None if t is None else Tokenizer(
            HFTokenizer.from_str((cache_dir / "tokenizer.json").read_text()),
            bos_id=t["bos_id"], eos_ids=tuple(t["eos_ids"]), add_bos=t["add_bos"],
            chat_template=t["chat_template"])
    except Exception as e:  # a damaged or foreign cache (tokenizers raises plain Exception)
        logging.getLogger("jdecode").warning("ignoring the cached metadata in %s (%s)",
                                             cache_dir, str(e).splitlines()[0] if str(e) else
                                             type(e).__name__)
        return None
    return cfg, tok


CACHE_README = """jdecode caches GGUF weights converted to float arrays here (orbax), with the
model's config and tokenizer, so a second load skips dequantization and the GGUF's metadata:
one folder per (file, size, mtime, dtype) under params/, about 4 bytes per parameter in
float32 (333 MB for SmolLM2-135M).

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
