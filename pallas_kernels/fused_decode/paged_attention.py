"""Decode attention for the fused step over the engine's page pool: `decode_attention`'s
kernel with the past read through a block table and the new K/V stored at a slot.

Why a variant. The engine keeps K/V in a stacked pool of pages [L, P, page, K, D]
(`jdecode.cache.paged`), not in the dense per-layer cache `decode_attention` reads in place.
Its decode steps ran the general path: XLA's or the Pallas GEMV's projections over a token
bucket of at least 16 rows, the cache write and the paged decode kernel. With this kernel a
decode-only step of a few rows runs the fused step's five kernels per layer as the
`Generator` does (`jdecode.model.fused_decode.fused_paged_decode_step`).

What differs from `decode_attention`, and nothing else:

- the pool is one array for all layers, seen as a row per token slot [L * P * page, K, D]
  (a free reshape, as the general path's `paged_attend` does), and a layer's pages start at
  row `base` (layer * P * page), an operand so that one compiled kernel serves every layer;
- past token t of row b is read from row base + table[b, t // page] * page + t % page, one
  gather of whole rows per block (`paged_attention.kernel.load_kv_block`'s layout);
- the program of split 0 stores the row's new K/V at its slot (page * page + offset, -1 for
  none: a padding row, or a multi-step row past its count), with the pool aliased to the
  output;
- a row's past is its context less the new token: slots [0, context_len - 1).

The splits, the seeding of split 0 with the new token, and the partials' layout are
`decode_attention`'s, so `kernel.attn_o_residual` merges them as it does there.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.flash_attention.kernel import dot_nt, online_softmax_step, scale_logits
from pallas_kernels.flash_attention.tuning import resolve_interpret
from pallas_kernels.fused_decode.attention import (
    BLOCK_K,
    check_parts_dtype,
    check_rope,
    default_splits,
    query_group,
    seed_carry,
    store_split,
    taking_rope,
)
from pallas_kernels.fused_decode.kernel import whole_block
from pallas_kernels.paged_attention.kernel import (
    attend_prefetched,
    load_kv_block,
    pad_block_tables,
    split_blocks,
)

f32 = jnp.float32


def paged_block_k(page_size: int) -> int:
    """Tokens per loop step: BLOCK_K, or a page when pages are larger (a block must hold
    whole pages)."""
    return max(BLOCK_K, page_size)


def _paged_attn_kernel(ctx_ref, slot_ref, base_ref, table_ref, qkv_ref, kc_ref, vc_ref, o_ref,
                       lse_ref, kc_out, vc_out, *, num_heads: int, group: int, block_k: int,
                       page_size: int, layer_pages: int, num_splits: int, sm_scale: float,
                       rope_ref=None, prefetch: bool = False):
    """ctx_ref, slot_ref [B] int32; base_ref [1] int32 (the layer's first row);
    table_ref [W_pad] row b's block table; qkv_ref [B, H + 2K, D]; kc_ref, vc_ref (and the
    aliased kc_out, vc_out) [L * P * page, D], the pool through kv head `kv`. rope_ref: see
    `query_group`."""
    b, kv, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    base = base_ref[0]
    slot = slot_ref[b]
    past = jnp.maximum(ctx_ref[b] - 1, 0)  # the new token is the context's last
    q, heads, k_new, v_new = query_group(qkv_ref, b, kv, num_heads=num_heads, group=group,
                                         cache_dtype=kc_ref.dtype, rope_ref=rope_ref)

    @pl.when((split == 0) & (slot >= 0))
    def _():
        kc_out[base + slot, :] = k_new
        vc_out[base + slot, :] = v_new

    load = functools.partial(load_kv_block, table_ref=table_ref, block_k=block_k,
                             page_size=page_size, first_row=base, num_pages=layer_pages)

    def body(j, carry, masked):
        k, v = load(kc_ref, j=j), load(vc_ref, j=j)  # [block_k, D], the layer's pages
        s = scale_logits(dot_nt(q, k), sm_scale, None)  # [Gp, block_k]
        mask = None
        if masked:
            valid = j * block_k + jnp.arange(block_k) < past  # [block_k]
            v = jnp.where(valid[:, None], v, jnp.zeros_like(v))  # 0 * stale garbage stays 0
            mask = jnp.broadcast_to(valid[None, :], s.shape)
        return online_softmax_step(carry, s, v, mask)

    lo, full_hi, hi = split_blocks(past, block_k, split, num_splits)
    carry = seed_carry(q, k_new, v_new, split, sm_scale)
    if prefetch:  # the loop pipelined by hand (see `attend_prefetched`)
        carry = attend_prefetched(q, kc_ref, vc_ref, table_ref, past, lo, hi, carry,
                                  sm_scale=sm_scale, soft_cap=None, block_k=block_k,
                                  page_size=page_size, first_row=base, num_pages=layer_pages)
    else:
        carry = jax.lax.fori_loop(lo, full_hi, functools.partial(body, masked=False), carry)
        carry = jax.lax.fori_loop(full_hi, hi, functools.partial(body, masked=True), carry)
    store_split(o_ref, lse_ref, carry, heads, b, kv, split, num_heads=num_heads, group=group,
                num_splits=num_splits)


@functools.partial(jax.jit, static_argnames=("num_heads", "num_kv_heads", "num_splits",
                                             "block_k", "num_warps", "num_stages", "interpret",
                                             "parts_dtype", "prefetch"))
def paged_decode_attention(qkv, k_pages, v_pages, layer, context_lens, slot_mapping,
                           block_tables, rope=None, *, num_heads: int, num_kv_heads: int,
                           num_splits: int | None = None, block_k: int | None = None,
                           num_warps: int = 4, num_stages: int | None = None,
                           interpret: bool | None = None, parts_dtype: str | None = None,
                           prefetch: bool = False):
    """One query per row against its pages of the pool, with the row's new K/V stored.

    Args:
      qkv: [B, (H + 2K) * D] this step's queries, keys and values, RoPE applied (`qkv_rope`),
        or, with `rope`, not yet.
      k_pages, v_pages: [L, P, page, K, D] the stacked pool, qkv's dtype. Aliased to the
        outputs: inside a jit that owns the pool (the engine's step donates it) the update is
        in place.
      layer: int32 scalar (or int), the layer whose pages are read and written.
      context_lens: [B] int32 keys of each row after this step, its new token included
        (0: a padding row; it attends to its own token only).
      slot_mapping: [B] int32 page * page_size + offset where the new K/V go, -1 for none.
      block_tables: [B, W] int32 page ids of each row (within the layer's P pages).
      rope: optional [B, 2, D] f32 (`attention.rope_table`): the kernel rotates the queries
        and the new key itself, as `decode_attention(rope=)` does, so that the engine's
        decode-only step runs no RoPE-and-pack kernel per layer before this one.
      num_splits: split-K partitions per (row, kv head); default `default_splits` over the
        table's W * page slots.
      block_k: tokens per loop step, a power-of-2 multiple of the page; default
        `paged_block_k` (the fused step's). The engine's general path passes the paged decode
        kernel's tuned launch (`paged_attention.tuning.paged_config`).
      parts_dtype: as `decode_attention`'s: one split's output may leave in the model dtype.
      prefetch: the loop pipelined by hand (`paged_attention.kernel.attend_prefetched`: the
        next block's K/V load during this block's math); off until timed on a card.
      num_stages: Triton's; default 2, or 1 with prefetch.

    Returns:
      (parts, lse, k_pages, v_pages) as `decode_attention`'s: parts [B, splits, H * D] f32,
      lse [B, splits, H] f32; merge with `reference.merge_splits` or `kernel.attn_o_residual`.
    """
    b, n = qkv.shape
    L, P, page, K, D = k_pages.shape
    H = num_heads
    if K != num_kv_heads or n != (H + 2 * K) * D or k_pages.shape != v_pages.shape:
        raise ValueError(f"qkv {qkv.shape} must be [B, (H + 2K) * D] for H={H} heads and the "
                         f"pool's K={K}, D={D} (k_pages {k_pages.shape}, v_pages "
                         f"{v_pages.shape}, num_kv_heads={num_kv_heads})")
    if H % K or page & (page - 1) or k_pages.dtype != qkv.dtype:
        raise ValueError(f"paged_decode_attention: heads {H} must be a multiple of kv heads "
                         f"{K}, the page size {page} a power of 2, and the pool's dtype "
                         f"{k_pages.dtype} qkv's {qkv.dtype}")
    if block_tables.ndim != 2 or block_tables.shape[0] != b or context_lens.shape != (b,) \
            or slot_mapping.shape != (b,):
        raise ValueError(f"block_tables {block_tables.shape} must be [{b}, W], context_lens "
                         f"{context_lens.shape} and slot_mapping {slot_mapping.shape} [{b}]: "
                         "one per row of qkv")
    check_rope(rope, b, D, "paged_decode_attention")
    block_k = block_k or paged_block_k(page)
    if block_k % page or block_k & (block_k - 1):
        raise ValueError(f"block_k {block_k} must be a power-of-2 multiple of the page size "
                         f"{page}")
    table = pad_block_tables(block_tables, block_k // page)  # [B, W_pad]
    splits = num_splits or default_splits(block_tables.shape[1] * page, b, block_k=block_k)
    check_parts_dtype(parts_dtype, splits)
    # Contexts past the table are clamped, as the paged decode kernel does under jit.
    ctx = jnp.clip(context_lens.astype(jnp.int32), 0, block_tables.shape[1] * page)
    base = (jnp.asarray(layer, jnp.int32) * (P * page)).reshape(1)
    num_stages = num_stages or (1 if prefetch else 2)
    kernel = functools.partial(_paged_attn_kernel, num_heads=H, group=H // K, block_k=block_k,
                               page_size=page, layer_pages=P, num_splits=splits,
                               sm_scale=D ** -0.5, prefetch=bool(prefetch))
    rows = L * P * page
    pool_spec = pl.BlockSpec((rows, None, D), lambda bi, ki, si: (0, ki, 0))
    inputs = (ctx, slot_mapping.astype(jnp.int32), base, table, qkv.reshape(b, H + 2 * K, D),
              k_pages.reshape(rows, K, D), v_pages.reshape(rows, K, D))
    out_shape = (jax.ShapeDtypeStruct((b, splits, H * D), parts_dtype or f32),
                 jax.ShapeDtypeStruct((b * splits * H,), f32),
                 jax.ShapeDtypeStruct((rows, K, D), k_pages.dtype),
                 jax.ShapeDtypeStruct((rows, K, D), v_pages.dtype))
    in_specs = [whole_block(ctx), whole_block(inputs[1]), whole_block(base),
                pl.BlockSpec((None, table.shape[1]), lambda bi, ki, si: (bi, 0)),
                whole_block(inputs[4]), pool_spec, pool_spec]
    if rope is not None:  # after the pool, so the aliases stand
        kernel, inputs = taking_rope(kernel, len(inputs)), (*inputs, rope.astype(f32))
        in_specs.append(whole_block(inputs[-1]))
    parts, lse, k_rows, v_rows = pl.pallas_call(
        kernel,
        grid=(b, K, splits),
        in_specs=in_specs,
        out_specs=[whole_block(out_shape[0]), whole_block(out_shape[1]), pool_spec,
                   pool_spec],
        out_shape=out_shape,
        input_output_aliases={5: 2, 6: 3},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=resolve_interpret(interpret),
        name="paged_decode_attention",
    )(*inputs)
    return (parts, lse.reshape(b, splits, H), k_rows.reshape(k_pages.shape),
            v_rows.reshape(v_pages.shape))
