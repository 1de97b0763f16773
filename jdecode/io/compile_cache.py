"""XLA's persistent compilation cache for the command line.

Why: a `jdecode generate` of the default model on a 2-core CPU spent ~1.2 s of its ~4.9 s
compiling the same executables as the run before it (benchmarks/cli_startup_cpu.md); a
server's warm-up compiles every step shape. With the cache, a later run of the same model,
shapes and jax version loads the executables from disk instead.

The command line turns it on under $JDECODE_CACHE/xla (beside the converted params,
`checkpoint.cache_root`). The Python API leaves jax's settings to its caller.
"""

from __future__ import annotations

import os
from pathlib import Path

from jdecode.io.checkpoint import cache_root

ENV = "JDECODE_COMPILE_CACHE"  # a directory, or 0 / off to leave the cache off
OFF = ("0", "off", "false", "no")
MAX_BYTES = 4 << 30  # the cache's size on disk at most, as each process finds it
KEEP = 0.75  # a cache past MAX_BYTES is cut to this share of it, oldest executables first
# jax's file names (jax._src.lru_cache): <key>-cache, the executable, and, where jax evicts by
# itself, <key>-atime beside it, its last use.
SUFFIX, ATIME_SUFFIX = "-cache", "-atime"


def enable_compile_cache() -> Path | None:
    """Points jax's persistent compilation cache at $JDECODE_COMPILE_CACHE, else
    $JDECODE_CACHE/xla, unless a cache directory is already set (JAX_COMPILATION_CACHE_DIR or
    `jax.config`: the caller's choice wins) or JDECODE_COMPILE_CACHE is 0 / off.

    Every executable is kept, whatever its compile time: jax's default floor (1 s) kept none
    of the CPU run's, whose compiles are shorter. Returns the directory in use, or None.
    """
    import jax

    current = jax.config.jax_compilation_cache_dir
    if current:
        return Path(current)
    setting = os.environ.get(ENV, "").strip()
    if setting.lower() in OFF:
        return None
    path = Path(setting) if setting else cache_root() / "xla"
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    # Bounded here, once per process (`prune`), not by jax: given a size (the config
    # jax_compilation_cache_max_size), jax stats and reads every entry's files at each write
    # to find what to evict, and locks the directory at each read (stop 65, 2-core machine:
    # 20 small compiles took 0.73 s into an empty cache, 7.5 s into one of 3000 entries; a
    # `generate` run writes ~8 entries, so the cost grew with use). -1: jax neither evicts
    # nor locks.
    jax.config.update("jax_compilation_cache_max_size", -1)
    prune(path)
    return path


def prune(path: Path, max_bytes: int = MAX_BYTES) -> list[Path]:
    """Deletes the oldest executables (by the time they were written) when the cache at `path`
    holds more than `max_bytes`, down to KEEP of it, with the access-time files jax writes
    beside them when it evicts by itself; returns the deleted executables. Another process
    reading one as it goes gets a cache miss and compiles. A cache it cannot read or an entry
    it cannot delete is left as it is: a cache is never a reason for a run to fail."""
    entries = []
    try:
        with os.scandir(path) as it:
            for e in it:
                if e.name.endswith(SUFFIX) and e.is_file():
                    st = e.stat()
                    entries.append((st.st_mtime, st.st_size, Path(e.path)))
    except OSError:  # not written yet, or not ours to read
        return []
    total = sum(size for _, size, _ in entries)
    if total <= max_bytes:
        return []
    deleted = []
    for _, size, file in sorted(entries, key=lambda e: e[0]):
        if total <= KEEP * max_bytes:
            break
        try:
            for f in (file, file.with_name(file.name.removesuffix(SUFFIX) + ATIME_SUFFIX)):
                f.unlink(missing_ok=True)
        except OSError:
            continue
        total -= size
        deleted.append(file)
    return deleted
