"""Dense KV cache: one contiguous [L, B, S, K, D] buffer, slot index = token position."""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp

from jdecode.config import ModelConfig
from jdecode.model.attention import attention
from jdecode.model.params import _register


@_register
@dataclasses.dataclass(frozen=True)
class DenseKVCache:
    k: jax.Array  # [L, B, S, K, D]
    v: jax.Array  # [L, B, S, K, D]

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


@_register
@dataclasses.dataclass(frozen=True)
class DenseMeta:
    positions: jax.Array  # [B, T] int32 absolute position of each query token


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: str | None = None
               ) -> DenseKVCache:
    """Zeroed cache (never jnp.empty: on jax 0.11 it returns uninitialized memory)."""
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    dt = jnp.dtype(dtype or cfg.dtype)
    return DenseKVCache(k=jnp.zeros(shape, dt), v=jnp.zeros(shape, dt))


def dense_attend(q: jax.Array, k: jax.Array, v: jax.Array, cache: DenseKVCache,
                 layer: jax.Array, meta: DenseMeta, *, impl: str = "xla",
                 sliding_window: int | None = None) -> tuple[jax.Array, DenseKVCache]:
    """Writes K/V of this step at their positions, then attends over the whole buffer.

    Stale slots (padding of a shorter prompt, tokens rolled back by speculative decoding) are
    never visible: a query at position p sees only slots <= p, and every slot <= p was written
    by this step or holds an accepted token.

    Args:
      q: [B, T, H, D]; k, v: [B, T, K, D] (RoPE applied). layer: int32 scalar.
    Returns:
      out [B, T, H, D] and the cache with this layer updated.
    """
    b = q.shape[0]
    rows = jnp.arange(b)[:, None]  # [B, 1] broadcasts against positions [B, T]
    # mode="drop": a padding query whose position lies past the buffer writes nothing.
    new_k = cache.k.at[layer, rows, meta.positions].set(k.astype(cache.k.dtype), mode="drop")
    new_v = cache.v.at[layer, rows, meta.positions].set(v.astype(cache.v.dtype), mode="drop")
    if impl == "pallas" and q.shape[1] == 1 and sliding_window is None:
        from jdecode.model.pallas_dispatch import dense_decode_pallas

        out = dense_decode_pallas(q, new_k, new_v, layer, meta.positions)
        return out, DenseKVCache(new_k, new_v)
    k_l, v_l = new_k[layer], new_v[layer]  # [B, S, K, D]
    kv_pos = jnp.broadcast_to(jnp.arange(cache.max_len, dtype=jnp.int32), (b, cache.max_len))
    out = attention(q, k_l, v_l, meta.positions, kv_pos, impl=impl,
                    sliding_window=sliding_window)
    return out, DenseKVCache(new_k, new_v)


def make_dense_attend(cfg: ModelConfig, impl: str = "xla"):
    """The model's AttendFn for a dense cache with a chosen attention implementation."""
    return partial(dense_attend, impl=impl, sliding_window=cfg.sliding_window)
