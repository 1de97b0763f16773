"""Paged KV cache on the device: a page pool per layer plus the metadata of one ragged step.

PagedAttention (Kwon et al., 2023): K/V live in fixed-size pages addressed through block tables;
the host-side allocator is `jdecode.engine.block_manager`. Attention math is the kernels' own
(`pallas_kernels.paged_attention`); this module only views the stacked pool per layer.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import struct

from jdecode.config import ModelConfig
from jdecode.model.attention import APPLIES_ROPE
from jdecode.model.layers import apply_rope
from pallas_kernels.fused_decode.attention import merged_output, rope_table, single_split_dtype
from pallas_kernels.fused_decode.paged_attention import paged_decode_attention
from pallas_kernels.paged_attention import ragged_paged_attention, write_kv_pages
from pallas_kernels.paged_attention.tuning import (
    UNIFIED_DECODE_MAX_CONTEXT,
    decode_num_splits,
    paged_config,
)

IMPLS = ("xla", "reference", "pallas")


@struct.dataclass
class PagedKVCache:
    k_pages: jax.Array  # [L, P, page_size, K, D]
    v_pages: jax.Array  # [L, P, page_size, K, D]

    @property
    def num_pages(self) -> int:
        return self.k_pages.shape[1]

    @property
    def page_size(self) -> int:
        return self.k_pages.shape[2]


@struct.dataclass
class PagedMeta:
    """One step's ragged batch: N flat tokens from B sequence slots (both padded)."""

    slot_mapping: jax.Array  # [N] int32 page * page_size + offset per token; -1 = padding
    block_tables: jax.Array  # [B, max_pages] int32 page ids per sequence slot
    context_lens: jax.Array  # [B] int32 keys per sequence after this step; 0 = empty slot
    query_start_loc: jax.Array  # [B+1] int32 flat row offsets; rows >= [B] are padding
    # Static: a step of decodes only, the first k slots one token each in rows 0..k-1 and the
    # other slots none (the runner's packing). Attention then runs the decode kernel on the
    # rows as they lie, with no ragged launch and no glue (`split_decodes="only"`).
    decodes_only: bool = struct.field(pytree_node=False, default=False)
    # Static: a step with a chunk (q_len > 1) whose one-token sequences all have contexts of
    # at most `UNIFIED_DECODE_MAX_CONTEXT`, so the Hopper ragged launch serves them beside the
    # chunks with no split-K decode launch (`split_decodes="short"`).
    short_decodes: bool = struct.field(pytree_node=False, default=False)

    @property
    def split_decodes(self) -> str:
        """The ragged kernel's split_decodes for this step's layout."""
        return "only" if self.decodes_only else "short" if self.short_decodes else "auto"


def decode_layout(all_one_token: bool, longest_decode: int) -> dict[str, bool]:
    """PagedMeta's static layout fields for a step the caller packed in slot order: decodes
    only, or chunks beside decodes (the longest with `longest_decode` keys after the step)
    short enough to share the chunks' Hopper launch."""
    if all_one_token:
        return {"decodes_only": True}
    return {"short_decodes": longest_decode <= UNIFIED_DECODE_MAX_CONTEXT}


def init_paged_cache(cfg: ModelConfig, num_pages: int, page_size: int,
                     dtype: str | None = None) -> PagedKVCache:
    """Zeroed page pool (never jnp.empty: on jax 0.11 it returns uninitialized memory).

    Zeros matter: attention masks stale slots, but 0 * NaN from garbage would still be NaN.
    """
    shape = (cfg.num_layers, num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
    dt = jnp.dtype(dtype or cfg.dtype)
    return PagedKVCache(k_pages=jnp.zeros(shape, dt), v_pages=jnp.zeros(shape, dt))


def copy_pages(cache: PagedKVCache, src: jax.Array, dst: jax.Array) -> PagedKVCache:
    """Copy-on-write: page dst[i] <- page src[i] in every layer; dst < 0 is padding.

    All sources are read before any destination is written, so a page freed and reused as
    another copy's destination in the same step is still read intact.

    Args:
      cache: the pool. src, dst: [C] int32 page ids.
    """
    num_pages = cache.num_pages
    # Out-of-range destinations are dropped by the scatter.
    dst = jnp.where(dst < 0, num_pages, dst)
    src = jnp.clip(src, 0, num_pages - 1)

    def copy(pages):  # [L, P, page, K, D]
        return pages.at[:, dst].set(pages[:, src], mode="drop")

    return PagedKVCache(copy(cache.k_pages), copy(cache.v_pages))


def paged_attend(q: jax.Array, k: jax.Array, v: jax.Array, cache: PagedKVCache,
                 layer: jax.Array, meta: PagedMeta, *, impl: str = "xla",
                 rope: tuple | None = None) -> tuple[jax.Array, PagedKVCache]:
    """The model's AttendFn over a paged cache: write this step's K/V, then ragged attention.

    The stacked pool [L, P, ...] is viewed as one pool of L * P pages (a free reshape), and
    layer l's pages are ids [l * P, (l + 1) * P): slicing out a layer inside the scan would copy
    it, while offsetting the slots and block tables costs nothing.

    Args:
      q: [1, N, H, D]; k, v: [1, N, K, D] flat tokens (RoPE applied, or, with rope, not yet).
      layer: int32 scalar. cache: the stacked pool. meta: this step's ragged batch.
      impl: "xla"/"reference" (plain jnp) or "pallas" (the kernels).
      rope: (cos, sin) [1, N, D/2] when q and k are not yet rotated (`APPLIES_ROPE`): the
        writing decode kernel rotates them inside, every other path first.
    Returns:
      out [1, N, H, D] (padding rows 0, or their own token's value in a decode-only step:
      `paged_decode_writing`) and the cache with this layer's new K/V.
    """
    if impl not in IMPLS:
        raise ValueError(f"paged attention impl={impl!r}; choose one of {', '.join(IMPLS)}")
    L, P, page, K, D = cache.k_pages.shape
    if impl == "pallas" and writes_in_kernel(q, cache, meta):
        return paged_decode_writing(q, k, v, cache, layer, meta, rope)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    offset = layer * P
    slots = jnp.where(meta.slot_mapping < 0, -1, meta.slot_mapping + offset * page)  # [N]
    # The write kernel's row block is [K, D]: Triton wants powers of 2 (SmolLM2 has K = 3).
    write_impl = "pallas" if impl == "pallas" and not K & (K - 1) else "xla"
    k_pool, v_pool = write_kv_pages(cache.k_pages.reshape(L * P, page, K, D),
                                    cache.v_pages.reshape(L * P, page, K, D),
                                    k[0], v[0], slots, impl=write_impl)
    tables = meta.block_tables + offset  # [B, max_pages]
    out = ragged_paged_attention(q[0], k_pool, v_pool, tables, meta.context_lens,
                                 meta.query_start_loc, impl=impl,
                                 split_decodes=meta.split_decodes)
    cache = PagedKVCache(k_pool.reshape(L, P, page, K, D), v_pool.reshape(L, P, page, K, D))
    return out[None], cache


def writes_in_kernel(q: jax.Array, cache: PagedKVCache, meta: PagedMeta) -> bool:
    """Whether `paged_decode_writing` takes this step: decodes only (slot b's token in row
    b), no more rows than sequence slots, q in the pool's dtype, head_dim a power of 2."""
    n, D = q.shape[1], q.shape[3]
    return (meta.decodes_only and n <= meta.context_lens.shape[0]
            and q.dtype == cache.k_pages.dtype and 16 <= D <= 256 and not D & (D - 1))


def paged_decode_writing(q: jax.Array, k: jax.Array, v: jax.Array, cache: PagedKVCache,
                         layer: jax.Array, meta: PagedMeta, rope: tuple | None = None
                         ) -> tuple[jax.Array, PagedKVCache]:
    """A decode-only step's attention that also stores the tokens' K/V, in one kernel per
    layer (`paged_decode_attention`), with the paged decode kernel's tuned launch.

    Why: the general path otherwise runs, per layer, q's and k's RoPE'd copies, v's slice,
    the cache write and the decode kernel; here one concatenate feeds one kernel (XLA:GPU
    for an H200, deviceless: 217 -> 167 kernels per decode step of 64 rows at the
    Llama-3.2-1B shape, benchmarks/deviceless_kernels_h200.md). The same change in the
    Generator's dense cache measured +1.6% at batch 64 (benchmarks/fused_decode_h200.md).

    Args: as `paged_attend`'s, for a step `writes_in_kernel` accepts. A padding row (slot
    -1, context 0) attends to its own token alone, where the ragged path leaves it 0. With
    rope the kernel rotates q and k itself (`paged_decode_attention(rope=)`): q, k and v are
    then slices of the QKV projection's output, and the kernel reads that output as it is.
    """
    _, n, H, D = q.shape
    page, K = cache.page_size, cache.k_pages.shape[3]
    # Joined on the heads axis before dropping the leading 1: XLA folds a concatenate of its
    # operand's own slices in order away, but not once each slice is bitcast (`q[0]`), so the
    # kernel reads the QKV projection's output itself instead of a packed copy.
    qkv = jnp.concatenate([q, k.astype(q.dtype), v.astype(q.dtype)], axis=2)  # [1, N, H+2K, D]
    cfg = paged_config(page, D, q.dtype)
    tables = meta.block_tables[:n]  # [N, W]: row b is slot b's
    splits = decode_num_splits(n, K, -(-tables.shape[1] * page // cfg.block_k), cfg)
    table = None if rope is None else rope_table(rope[0][0], rope[1][0])  # [N, 2, D]
    parts, lse, k_pool, v_pool = paged_decode_attention(
        qkv.reshape(n, -1), cache.k_pages, cache.v_pages, layer, meta.context_lens[:n],
        meta.slot_mapping, tables, table, num_heads=H, num_kv_heads=K, num_splits=splits,
        block_k=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        parts_dtype=single_split_dtype(splits, q.dtype))
    out = merged_output(parts, lse, q.dtype)  # [N, H * D]
    return out.reshape(1, n, H, D), PagedKVCache(k_pool, v_pool)


def make_paged_attend(impl: str = "xla"):
    """The model's AttendFn for a paged cache with a chosen implementation."""
    attend = partial(paged_attend, impl=impl)
    setattr(attend, APPLIES_ROPE, True)  # see paged_attend's `rope`
    return attend
