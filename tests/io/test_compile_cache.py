"""The command line's persistent compilation cache (`jdecode.io.compile_cache`)."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from jdecode.io.compile_cache import ENV, KEEP, enable_compile_cache, prune

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_cache_dir():
    """jax's cache settings cleared for one test and put back after (the session's own
    cache, conftest's, must outlive it). Nothing compiles in between."""
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_compilation_cache_max_size")
    before = {k: getattr(jax.config, k) for k in keys}
    jax.config.update("jax_compilation_cache_dir", None)
    yield
    for k, v in before.items():
        jax.config.update(k, v)


def test_default_is_under_jdecode_cache(no_cache_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("JDECODE_CACHE", str(tmp_path))
    monkeypatch.delenv(ENV, raising=False)
    assert enable_compile_cache() == tmp_path / "xla"
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
    assert jax.config.jax_compilation_cache_max_size == -1  # bounded by `prune`, not per write


def test_env_names_the_directory_or_turns_it_off(no_cache_dir, monkeypatch, tmp_path):
    monkeypatch.setenv(ENV, str(tmp_path / "mine"))
    assert enable_compile_cache() == tmp_path / "mine"
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.setenv(ENV, "off")
    assert enable_compile_cache() is None
    assert jax.config.jax_compilation_cache_dir is None


def test_a_directory_already_set_wins(monkeypatch, tmp_path):
    # conftest set the session's cache: the command line must not move it
    current = jax.config.jax_compilation_cache_dir
    assert current
    monkeypatch.setenv(ENV, str(tmp_path / "other"))
    assert enable_compile_cache() == Path(current)
    assert jax.config.jax_compilation_cache_dir == current


def test_a_second_process_finds_the_executable(tmp_path):
    """A fresh process writes its compile to the cache; the next one reads it back."""
    code = (
        "import jax, jax.numpy as jnp\n"
        "from jdecode.io.compile_cache import enable_compile_cache\n"
        "enable_compile_cache()\n"
        "from jax._src import monitoring\n"
        "hits = []\n"
        "monitoring.register_event_listener("
        "lambda e, **kw: hits.append(e) if e.endswith('cache_hits') else None)\n"
        "print(float(jax.jit(lambda x: jnp.sin(x) * 2 + 1)(jnp.float32(3))), len(hits))\n")
    env = {**os.environ, "JDECODE_CACHE": str(tmp_path), "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(ROOT)}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env.pop(ENV, None)
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                           text=True, timeout=120) for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr
    assert any((tmp_path / "xla").iterdir()), "the first run wrote nothing"
    (v1, hits1), (v2, hits2) = (r.stdout.split() for r in runs)
    assert v1 == v2 and int(hits1) == 0 and int(hits2) >= 1


def test_prune_deletes_the_oldest_executables_past_the_bound(tmp_path):
    """Past the bound, the oldest-written executables go first (with jax's access-time files),
    down to KEEP of it; under it, nothing is deleted."""
    sizes = [100, 200, 300, 400]  # written in this order, one second apart
    for i, size in enumerate(sizes):
        f = tmp_path / f"k{i}-cache"
        f.write_bytes(b"x" * size)
        (tmp_path / f"k{i}-atime").write_bytes(b"t")
        os.utime(f, (1000 + i, 1000 + i))
    (tmp_path / "notes.txt").write_bytes(b"y" * 5000)  # not an executable: never counted
    assert prune(tmp_path, max_bytes=1000) == []  # 1000 bytes: at the bound, kept
    deleted = prune(tmp_path, max_bytes=900)  # over: down to KEEP * 900 = 675
    assert KEEP == 0.75
    # 1000 bytes -> 900 -> 700 -> 400: three go, the newest stays
    assert [p.name for p in deleted] == ["k0-cache", "k1-cache", "k2-cache"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k3-atime", "k3-cache", "notes.txt"]
    assert prune(tmp_path / "absent") == []
    assert prune(tmp_path / "notes.txt") == []  # not a directory: nothing to do, no error
