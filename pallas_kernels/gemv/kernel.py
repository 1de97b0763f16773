"""x [M, K] @ w [K, N] for small M (decode-time projections) as a Pallas Triton kernel.

Why: XLA:GPU rewrites a vector-times-matrix dot whose matrix is under ~10M elements into a
multiply + reduce fusion (its "dot strength reduction"). At batch 1 that is every attention
projection of a 1B model, and those fusions read the weights at 0.6-1.2 TB/s on an H100
(benchmarks/decode.md), a third to a half of the streaming rate. This kernel reads each weight
block once with coalesced rows, accumulates in f32 and splits K across programs so that a
3072-column matrix still keeps every SM busy; an XLA sum merges the splits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.flash_attention.tuning import resolve_interpret


def gemv_reference(x: jax.Array, w: jax.Array) -> jax.Array:
    """f32-accumulated x @ w in x.dtype: [M, K] x [K, N] -> [M, N]."""
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def _kernel(x_ref, w_ref, o_ref, *, block_k: int, steps: int):
    # x_ref [Mp, K/splits]; w_ref [K/splits, block_n]; o_ref [1, Mp, block_n] f32 partial.
    def body(i, acc):
        xs = x_ref[:, pl.ds(i * block_k, block_k)]  # [Mp, block_k]
        ws = w_ref[pl.ds(i * block_k, block_k), :]  # [block_k, block_n]
        # f32 inputs ask for true f32 products (Triton would otherwise use TF32).
        precision = jax.lax.Precision.HIGHEST if xs.dtype == jnp.float32 else None
        return acc + jnp.dot(xs, ws, preferred_element_type=jnp.float32, precision=precision)

    acc = jnp.zeros((x_ref.shape[0], w_ref.shape[1]), jnp.float32)
    o_ref[0] = jax.lax.fori_loop(0, steps, body, acc)


@functools.partial(jax.jit, static_argnames=("block_n", "block_k", "splits", "num_warps",
                                             "num_stages", "interpret"))
def gemv(x: jax.Array, w: jax.Array, *, block_n: int = 64, block_k: int = 256,
         splits: int = 4, num_warps: int = 4, num_stages: int = 3,
         interpret: bool | None = None) -> jax.Array:
    """x [M, K] @ w [K, N] -> [M, N] in x.dtype, f32 accumulation; M small (<= 16 is the aim).

    N must divide by block_n and K by splits * block_k (the projection shapes of Llama-family
    models do); M is padded to 16 rows, the smallest tensor-core tile.
    """
    m, k = x.shape
    k2, n = w.shape
    if k != k2 or n % block_n or k % (splits * block_k):
        raise ValueError(f"gemv: x {x.shape} @ w {w.shape} does not tile by block_n={block_n}, "
                         f"splits*block_k={splits * block_k}: use jnp.dot for this shape")
    mp = max(16, -(-m // 16) * 16)
    xp = jnp.pad(x, ((0, mp - m), (0, 0)))
    kps = k // splits
    out = pl.pallas_call(
        functools.partial(_kernel, block_k=block_k, steps=kps // block_k),
        grid=(n // block_n, splits),
        in_specs=[pl.BlockSpec((mp, kps), lambda j, s: (0, s)),
                  pl.BlockSpec((kps, block_n), lambda j, s: (s, j))],
        out_specs=pl.BlockSpec((1, mp, block_n), lambda j, s: (s, 0, j)),
        out_shape=jax.ShapeDtypeStruct((splits, mp, n), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=resolve_interpret(interpret),
        name="gemv",
    )(xp, w)
    return out.sum(0)[:m].astype(x.dtype)
