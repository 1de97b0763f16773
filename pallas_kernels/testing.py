"""Shared test helpers: the one tolerance table every test in the project uses."""

from __future__ import annotations

import jax
import numpy as np

# (atol, rtol) against references computed in f32. Anything looser carries a comment at its use.
TOLERANCES: dict[str, tuple[float, float]] = {
    "float32": (1e-5, 1e-5),
    "bfloat16": (2e-2, 2e-2),
    "float16": (5e-3, 5e-3),
}
# Quantized KV: relative-norm error bound.
QUANTIZED_REL_NORM = 5e-2


def tolerance(dtype) -> tuple[float, float]:
    """(atol, rtol) for a dtype name or numpy/jax dtype."""
    return TOLERANCES[np.dtype(dtype).name]


def assert_close(actual, expected, dtype, *, scale: float = 1.0, err_msg: str = "") -> None:
    """Asserts allclose with the table's tolerance for `dtype`, multiplied by `scale`."""
    atol, rtol = tolerance(dtype)
    np.testing.assert_allclose(
        np.asarray(actual, np.float32),
        np.asarray(expected, np.float32),
        atol=atol * scale,
        rtol=rtol * scale,
        err_msg=err_msg,
    )


# Interpret-mode kernels unroll into large CPU programs; XLA's CPU optimizations triple their
# compile time and buy nothing for a test that runs them once.
_FAST_CPU_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def jit_for_tests(fn, **jit_kwargs):
    """jax.jit(fn), compiled with XLA optimizations off on CPU (the kernels' interpret mode)."""
    if jax.default_backend() == "cpu":
        jit_kwargs.setdefault("compiler_options", _FAST_CPU_COMPILE)
    return jax.jit(fn, **jit_kwargs)
