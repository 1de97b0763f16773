"""Parameter pytree of a Llama-family decoder, layers stacked on a leading axis.

One abstract description (`abstract_params`) drives random init, loading and byte counts.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jdecode.config import ModelConfig


@struct.dataclass
class LayerParams:
    """All decoder layers, stacked: every array has a leading L axis."""

    attn_norm: jax.Array  # [L, E]
    wq: jax.Array | None  # [L, E, H*D]
    wk: jax.Array | None  # [L, E, K*D]
    wv: jax.Array | None  # [L, E, K*D]
    wo: jax.Array  # [L, H*D, E]
    mlp_norm: jax.Array  # [L, E]
    w_gate: jax.Array | None  # [L, E, F]
    w_up: jax.Array | None  # [L, E, F]
    w_down: jax.Array  # [L, F, E]
    bq: jax.Array | None = None  # [L, H*D] (Qwen2 only)
    bk: jax.Array | None = None  # [L, K*D]
    bv: jax.Array | None = None  # [L, K*D]
    # Fused inference layout (see `jdecode.model.layout`): when set, wq/wk/wv (and bq/bk/bv)
    # or w_gate/w_up are None and one wider matmul replaces three (two).
    wqkv: jax.Array | None = None  # [L, E, (H+2K)*D]
    bqkv: jax.Array | None = None  # [L, (H+2K)*D]
    w_gate_up: jax.Array | None = None  # [L, E, 2F]


@struct.dataclass
class Params:
    embed: jax.Array  # [V, E]
    layers: LayerParams
    final_norm: jax.Array  # [E]
    lm_head: jax.Array | None = None  # [E, V]; None when tied to `embed`


def jnp_dtype(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def abstract_params(cfg: ModelConfig, dtype: str | None = None) -> Params:
    """Shapes and dtypes of every parameter, as `jax.ShapeDtypeStruct`s."""
    dt = jnp_dtype(dtype or cfg.dtype)
    L, E, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    HD, KD = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim

    def s(*shape):
        return jax.ShapeDtypeStruct(shape, dt)

    bias = cfg.qkv_bias
    layers = LayerParams(
        attn_norm=s(L, E), wq=s(L, E, HD), wk=s(L, E, KD), wv=s(L, E, KD), wo=s(L, HD, E),
        mlp_norm=s(L, E), w_gate=s(L, E, F), w_up=s(L, E, F), w_down=s(L, F, E),
        bq=s(L, HD) if bias else None, bk=s(L, KD) if bias else None,
        bv=s(L, KD) if bias else None)
    return Params(embed=s(V, E), layers=layers, final_norm=s(E),
                  lm_head=None if cfg.tie_word_embeddings else s(E, V))


def param_bytes(cfg: ModelConfig, dtype: str | None = None) -> int:
    """Bytes of all parameters (what one batch-1 decode step must stream from HBM)."""
    return sum(math.prod(a.shape) * a.dtype.itemsize
               for a in jax.tree_util.tree_leaves(abstract_params(cfg, dtype)))


def init_params(cfg: ModelConfig, key: jax.Array, dtype: str | None = None) -> Params:
    """Random parameters for tests and benchmarks.

    Matrices are N(0, 1/fan_in) so activations keep unit scale through depth; norm weights are
    1 + N(0, 0.1) rather than exactly ones, so a test cannot pass with the norm weight ignored.
    """
    abstract = abstract_params(cfg, dtype)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    keys = jax.random.split(key, len(leaves))
    out = []
    for (path, a), k in zip(leaves, keys):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            x = 1.0 + 0.1 * jax.random.normal(k, a.shape, jnp.float32)
        elif name.endswith((".bq", ".bk", ".bv")):
            x = 0.1 * jax.random.normal(k, a.shape, jnp.float32)
        elif ".embed" in name:
            x = jax.random.normal(k, a.shape, jnp.float32)
        else:
            fan_in = a.shape[-2]
            x = jax.random.normal(k, a.shape, jnp.float32) / np.sqrt(fan_in)
        out.append(x.astype(a.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def cast_params(params: Params, dtype: str) -> Params:
    """Casts every floating-point leaf to `dtype` (f32, bf16 or f16)."""
    dt = jnp_dtype(dtype)
    return jax.tree_util.tree_map(lambda x: x.astype(dt), params)
