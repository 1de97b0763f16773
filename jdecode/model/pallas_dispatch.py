"""Routes the dense cache's attention to the Pallas kernels.

Decode (one query per row) views the whole [L, B, S, K, D] cache as a page pool and reads it
through per-layer block tables: the reshape is free, so no per-layer copy of the cache is made
(a dynamic slice fed to a custom call would be materialized). Multi-token steps (prefill,
verify) use flash attention on the layer's slice, where the copy is small next to the compute.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.paged_attention import paged_attention

# Tokens per page when the dense buffer is viewed as pages; S (a multiple of 256) divides by it.
DENSE_PAGE = 64


def dense_decode_pallas(q: jax.Array, k_all: jax.Array, v_all: jax.Array, layer: jax.Array,
                        q_pos: jax.Array) -> jax.Array:
    """One-token attention of every row over its own cache slots [0, q_pos].

    Args:
      q: [B, 1, H, D]. k_all, v_all: [L, B, S, K, D] whole cache (this step already written).
      layer: int32 scalar. q_pos: [B, 1] int32.
    Returns:
      [B, 1, H, D].
    """
    L, B, S, K, D = k_all.shape
    pages_per_row = S // DENSE_PAGE
    k_pages = k_all.reshape(L * B * pages_per_row, DENSE_PAGE, K, D)
    v_pages = v_all.reshape(L * B * pages_per_row, DENSE_PAGE, K, D)
    # Row b of layer l owns pages [(l*B + b) * pages_per_row, ... + pages_per_row).
    first = (layer * B + jnp.arange(B, dtype=jnp.int32)) * pages_per_row  # [B]
    block_tables = first[:, None] + jnp.arange(pages_per_row, dtype=jnp.int32)[None]
    out = paged_attention(q[:, 0], k_pages, v_pages, block_tables, q_pos[:, 0] + 1)
    return out[:, None]


def attention_pallas(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array,
                     mask: jax.Array | None = None) -> jax.Array:
    """Flash attention for contiguous positions q_pos[b] = q_pos[b, 0] + t over slots = positions.

    Only for the dense cache, where slot s holds position s; sliding windows are not in the
    kernel (`jdecode.model.attention.attention` keeps those on the XLA path). mask: optional
    [B, T, T] bool over the queries' own keys (the kernel's tree-attention specialization).
    """
    return flash_attention(q, k, v, causal=True, q_offset=q_pos[:, 0],
                           kv_lens=q_pos[:, -1] + 1, mask=mask)
