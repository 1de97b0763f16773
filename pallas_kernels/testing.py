"""Shared test helpers: the one tolerance table every test in the project uses."""

from __future__ import annotations

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
