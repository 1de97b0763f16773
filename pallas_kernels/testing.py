"""Shared test helpers: the one tolerance table every test in the project uses, and lowering
for CUDA without a GPU."""

from __future__ import annotations

import contextlib

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


def abstract_gpu(device_kind: str = "NVIDIA H200", num_cores: int = 132):
    """A context naming a GPU as the lowering target when none is attached.

    jax >= 0.11 asks the abstract mesh for the GPU's kind when it lowers a Pallas kernel for
    CUDA without a GPU (Triton wants the compute capability); jax 0.10 lowers without one, so
    there this is a no-op."""
    from jax._src import mesh as mesh_lib

    device = getattr(mesh_lib, "AbstractDevice", None)
    if device is None or not hasattr(jax.sharding, "use_abstract_mesh"):
        return contextlib.nullcontext()
    target = device(device_kind=device_kind, num_cores=num_cores, platform="gpu")
    return jax.sharding.use_abstract_mesh(
        jax.sharding.AbstractMesh((1,), ("x",), abstract_device=target))


def lower_for_cuda(fn, *args):
    """Lowers jit(fn)(*args) for CUDA on any machine (no GPU needed): a Pallas kernel that
    cannot lower (Triton's or Mosaic GPU's checks, layout inference) raises here."""
    with abstract_gpu():
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
