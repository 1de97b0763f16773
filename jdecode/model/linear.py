"""The model's projection matmul, with a Pallas GEMV path for decode-sized inputs.

XLA:GPU turns a vector-times-matrix dot into a multiply + reduce fusion when the matrix has
fewer than about 10M elements (its dot strength reduction). For the attention projections of a
1B model at batch 1 those fusions read the weights at 0.6-1.2 TB/s on an H100 against ~2.5 for
a GEMM (scripts/profile_decode.py, benchmarks/decode.md). With `impl="pallas"` those matmuls
go to `pallas_kernels.gemv` instead; bigger matrices and many-row inputs stay with XLA.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

# x [..., E] @ w [E, F] -> [..., F]
LinearFn = Callable[[jax.Array, jax.Array], jax.Array]

GEMV_MAX_ROWS = 16  # the kernel pads rows to one 16-row tensor-core tile
GEMV_MAX_WEIGHT = 10_000_000  # elements: XLA's threshold for reducing a GEMV to multiply+reduce
GEMV_DTYPES = ("bfloat16", "float16")  # f32 stays with XLA (TF32 rounding would differ)


def xla_linear(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.einsum("...e,ef->...f", x, w)


def gemv_blocks(k: int, n: int) -> dict | None:
    """Kernel tiling for a [k, n] weight, or None when it does not tile (XLA takes it).

    bn 32, bk 256, 4 K-splits was the fastest tiling for the 1B model's 2048x3072 and
    2048x2048 projections on the H100 (scripts/bench_gemv.py).
    """
    for bn in (32, 64, 16):
        if n % bn:
            continue
        for bk, splits in ((256, 4), (128, 4), (128, 2), (64, 2), (64, 1)):
            if k % (bk * splits) == 0:
                return dict(block_n=bn, block_k=bk, splits=splits)
    return None


def pallas_linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """xla_linear, except decode-sized inputs on small bf16/f16 weights run the GEMV kernel."""
    rows = math.prod(x.shape[:-1])
    k, n = w.shape
    blocks = gemv_blocks(k, n)
    if (rows > GEMV_MAX_ROWS or k * n >= GEMV_MAX_WEIGHT or blocks is None
            or jnp.dtype(w.dtype).name not in GEMV_DTYPES or x.dtype != w.dtype):
        return xla_linear(x, w)
    from pallas_kernels.gemv import gemv

    return gemv(x.reshape(rows, k), w, **blocks).reshape(*x.shape[:-1], n)


def make_linear(impl: str) -> LinearFn:
    """The projection matmul for an attention `impl` ("pallas" also routes GEMVs to Pallas)."""
    return pallas_linear if impl == "pallas" else xla_linear
