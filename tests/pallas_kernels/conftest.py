"""Fixtures for kernel tests: a fresh seed per test, and the run mode (CPU interpret / GPU)."""

from __future__ import annotations

import os
import zlib

import jax
import numpy as np
import pytest

# One random seed per session (set PALLAS_TEST_SEED to replay a failure); each test mixes in its
# own id, so every test draws different data and every session draws new data.
_SESSION_SEED = int(os.environ.get("PALLAS_TEST_SEED", np.random.SeedSequence().entropy % 2**31))


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A numpy Generator unique to this test and session; the seed is printed on failure.

    numpy, not jax.random: drawing on the host costs no per-shape compile in CI.
    """
    seed = (_SESSION_SEED ^ zlib.crc32(request.node.nodeid.encode())) % 2**31
    print(f"PALLAS_TEST_SEED={_SESSION_SEED} (test seed {seed})")
    return np.random.default_rng(seed)


MODES = [
    pytest.param(True, id="interpret"),
    pytest.param(False, id="compiled", marks=pytest.mark.gpu),
]


@pytest.fixture(params=MODES)
def interpret(request) -> bool:
    """True: Pallas interpreter (CPU CI). False: compiled with Triton, needs a GPU."""
    if not request.param and jax.default_backend() != "gpu":
        pytest.skip("compiled Triton kernels need a GPU")
    if request.param and jax.default_backend() == "gpu":
        pytest.skip("interpret mode is covered by CPU CI; on the GPU run the compiled kernels")
    return request.param


@pytest.fixture
def fresh_gpu_interpreter():
    """A clean Mosaic GPU interpreter state: it keeps simulated memories in a global, and after
    an exception inside a kernel that state must be reset before the next one (its docs)."""
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

    gpu_callbacks.reset_gpu_interpret_mode_state()
