"""Inference layouts of the parameter pytree: unstacked layers and fused projections.

Both are pure re-arrangements made once, outside jit; the forward accepts every layout and
gives the same logits (a test checks it).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jdecode.model.params import LayerParams, Params


def unstack_layers(params: Params) -> Params:
    """Splits the stacked [L, ...] layers into a tuple of per-layer pytrees.

    The forward then unrolls a Python loop over layers. Under `lax.scan`, XLA copies each
    layer's weights out of the stacked buffer before its matmuls (a dynamic slice feeding a
    GEMM): an extra write and read of every weight per step, which halves batch-1 decode speed
    on the H100 (benchmarks/decode.md). Separate buffers avoid it; compile time then grows
    with depth.
    """
    if isinstance(params.layers, tuple):
        return params
    n = jax.tree_util.tree_leaves(params.layers)[0].shape[0]
    layers = tuple(jax.tree_util.tree_map(lambda a, i=i: a[i], params.layers) for i in range(n))
    return dataclasses.replace(params, layers=layers)


def fuse_projections(params: Params) -> Params:
    """Concatenates Q/K/V into `wqkv` and gate/up into `w_gate_up` (fewer, wider GEMMs).

    At batch 1 every matmul is a memory-bound GEMV whose launch costs as much as a few MB of
    streaming; fusing cuts seven weight matmuls per layer to four.
    """
    def fuse(lp: LayerParams) -> LayerParams:
        if lp.wqkv is not None:
            return lp
        bqkv = None if lp.bq is None else jnp.concatenate([lp.bq, lp.bk, lp.bv], axis=-1)
        return dataclasses.replace(
            lp, wqkv=jnp.concatenate([lp.wq, lp.wk, lp.wv], axis=-1), bqkv=bqkv,
            w_gate_up=jnp.concatenate([lp.w_gate, lp.w_up], axis=-1),
            wq=None, wk=None, wv=None, bq=None, bk=None, bv=None, w_gate=None, w_up=None)

    layers = params.layers
    layers = tuple(map(fuse, layers)) if isinstance(layers, tuple) else fuse(layers)
    return dataclasses.replace(params, layers=layers)


def inference_layout(params: Params, unstack: bool = True, fuse: bool = True) -> Params:
    """The fastest layout for decoding on GPU: fused projections, unstacked layers."""
    if fuse:
        params = fuse_projections(params)
    if unstack:
        params = unstack_layers(params)
    return params
