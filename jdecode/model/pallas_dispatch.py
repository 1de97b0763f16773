"""Routes the dense cache's attention to the Pallas kernels.

Decode (one query per row) on a per-layer cache runs the fused step's `decode_attention`,
which stores the token's K/V itself (`dense_decode_writing`): XLA's two scatters per layer
cost more than the attention's own launch at 64 rows. On a stacked [L, B, S, K, D] cache,
decode views the whole buffer as a page pool and reads it through per-layer block tables: the
reshape is free, so no per-layer copy of the cache is made (a dynamic slice fed to a custom
call would be materialized). Multi-token steps (prefill, verify) use flash attention on the
layer's slice, where the copy is small next to the compute.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.fused_decode.attention import (
    BLOCK_K,
    decode_attention,
    merged_output,
    rope_table,
    single_split_dtype,
)
from pallas_kernels.paged_attention import paged_attention
from pallas_kernels.paged_attention.tuning import grid_splits

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


def writes_in_kernel(q: jax.Array, k_cache: jax.Array) -> bool:
    """Whether `dense_decode_writing` takes this decode: one layer's [B, S, K, D] cache of
    q's dtype whose length the kernel's block divides."""
    return k_cache.dtype == q.dtype and k_cache.shape[1] % BLOCK_K == 0


def dense_decode_writing(q: jax.Array, k: jax.Array, v: jax.Array, k_cache: jax.Array,
                         v_cache: jax.Array, q_pos: jax.Array, rope: tuple | None = None
                         ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One-token attention that also stores the token's K/V in its slot, in one kernel.

    Args:
      q: [B, 1, H, D]; k, v: [B, 1, K, D] RoPE applied, or, with rope, not yet. k_cache,
        v_cache: [B, S, K, D] one layer's cache, not yet written this step (see
        `writes_in_kernel`). q_pos: [B, 1] int32, each token's slot; a slot past S writes
        nothing (the scatter's mode="drop").
      rope: optional (cos, sin), each [B, 1, D/2] (`layers.rope_tables`): the kernel rotates
        q and k itself. Then q, k and v, slices of one QKV projection's output, go to the
        kernel as that output is (XLA folds the concatenate of its own slices away), and the
        step has no RoPE-and-pack kernel before each layer's attention.
    Returns:
      out [B, 1, H, D] in q's dtype, k_cache, v_cache.
    """
    B, _, H, D = q.shape
    S, K = k_cache.shape[1], k_cache.shape[2]
    qkv = jnp.concatenate([q, k.astype(q.dtype), v.astype(q.dtype)], axis=2)  # [B, 1, H+2K, D]
    # Split-K only while the grid is small: one split needs no merge at all, and its output
    # leaves the kernel in q's dtype (no convert kernel after it).
    splits = grid_splits(B * K, S // BLOCK_K, max_splits=16)
    table = None if rope is None else rope_table(rope[0][:, 0], rope[1][:, 0])  # [B, 2, D]
    parts, lse, k_cache, v_cache = decode_attention(
        qkv.reshape(B, (H + 2 * K) * D), k_cache, v_cache, q_pos[:, 0], num_heads=H,
        num_kv_heads=K, num_splits=splits, parts_dtype=single_split_dtype(splits, q.dtype),
        rope=table)
    out = merged_output(parts, lse, q.dtype)  # [B, H * D]
    return out.reshape(B, 1, H, D), k_cache, v_cache


def attention_pallas(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array,
                     mask: jax.Array | None = None) -> jax.Array:
    """Flash attention for contiguous positions q_pos[b] = q_pos[b, 0] + t over slots = positions.

    Only for the dense cache, where slot s holds position s; sliding windows are not in the
    kernel (`jdecode.model.attention.attention` keeps those on the XLA path). mask: optional
    [B, T, T] bool over the queries' own keys (the kernel's tree-attention specialization).
    """
    return flash_attention(q, k, v, causal=True, q_offset=q_pos[:, 0],
                           kv_lens=q_pos[:, -1] + 1, mask=mask)
