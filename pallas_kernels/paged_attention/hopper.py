"""Ragged paged attention on Hopper in Pallas Mosaic GPU: the flash pipeline of
`flash_attention/hopper.py` reading K/V straight from the page pool.

A work item is up to `2 * block_q // Gp` consecutive query tokens of one sequence (Gp the query
heads per kv head, padded to a power of 2). A CTA serves one item for one kv head: its rows are
(token, head) pairs, token-major, so the Gp query heads that share a kv head share every K/V
load, and a decode (one token) is an item of Gp valid rows. Each compute warpgroup takes
block_q rows. The producer fills a ring slot of block_kv keys with one TMA copy per page
(block_kv >= page) or one copy from inside a page (block_kv <= page), all arriving on the slot's
barrier.

The wrapper packs each item's query rows into [W, K, 2 * block_q, D] (a gather of about
N * H * D elements) and scatters the outputs back: a TMA store of a whole tile would otherwise
overwrite the next sequence's rows.

Pages past a sequence's context are never read: a block's page slots past the context take the
sequence's first page instead. Rows past the context inside its last page are masked but still
enter the P V wgmma with probability 0, so they must hold finite values; the engine's pool is
zero-initialized and only ever holds written K/V.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.flash_attention.hopper import (
    COMPUTE_WGS,
    Scratch,
    Tweaks,
    block_steps,
    consume,
    launch,
    plgpu_module,
    produce,
    scratch_shapes,
)
from pallas_kernels.paged_attention.kernel import pad_block_tables


def _kernel(num_q_ref, pos0_ref, seq_ref, ctx_ref, table_ref, q_ref, k_ref, v_ref, o_ref,
            scr: Scratch, *, sm_scale, soft_cap, block_q, block_kv, stages, gp, page_size,
            pingpong, interpret, tweaks):
    """One CTA: item w for kv head kh.

    num_q/pos0/seq/ctx_ref: [W] int32 (GMEM) the item's valid tokens, the position of its first
    token, its sequence and that sequence's context. table_ref: [B, max_pages_pad] int32.
    q_ref/o_ref: [W, K, 2 * block_q, D]; k_ref/v_ref: [P, page, K, D] the pool.
    """
    plgpu = plgpu_module()
    w = lax.axis_index("items")
    kh = lax.axis_index("heads")
    wg = lax.axis_index("wg")
    num_q, pos0, ctx = num_q_ref[w], pos0_ref[w], ctx_ref[w]
    tokens = block_q // gp  # per compute warpgroup

    def steps_of(first):
        """(kv blocks, unmasked blocks) of the warpgroup whose tokens start at `first`."""
        last = jnp.minimum(num_q, first + tokens)  # its valid tokens are [first, last)
        end = jnp.where(last > first, jnp.minimum(ctx, pos0 + last), 0)
        return block_steps(end, jnp.minimum(ctx, pos0 + first + 1), block_kv)

    # A decode item's second warpgroup has no tokens; either may read more blocks.
    cta_steps = jnp.maximum(steps_of(0)[0], steps_of(tokens)[0])

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
        first = wg * tokens
        n_steps, n_full = steps_of(first)
        rows = (w, kh, pl.ds(wg * block_q, block_q))

        def q_pos(shape, iota):
            return pos0 + first + lax.div(iota(shape, 0), gp)  # row r is token r // Gp

        consume(scr, q_ref.at[rows], o_ref.at[rows], n_steps=n_steps, n_full=n_full,
                cta_steps=cta_steps, kv_len=ctx, q_pos=q_pos, sm_scale=sm_scale,
                soft_cap=soft_cap, block_kv=block_kv, stages=stages, pingpong=pingpong,
                interpret=interpret, tweaks=tweaks,
                # Idle items (and a decode item's second warpgroup) move no query rows: an
                # all-decode step still launches this kernel over every item slot.
                has_rows=first < num_q)

    @pl.when(wg == COMPUTE_WGS)
    def _producer():
        seq = seq_ref[w]
        if block_kv > page_size:  # several pages per block: the ones past ctx read page 0's
            first_page = table_ref[seq, 0]
            owned = (ctx + page_size - 1) // page_size  # the sequence's pages

        def issue(j, slot, which):
            pool, smem, ready = ((k_ref, scr.k, scr.k_ready), (v_ref, scr.v, scr.v_ready))[which]
            if block_kv <= page_size:
                tok = j * block_kv
                page = table_ref[seq, lax.div(tok, page_size)]
                plgpu.copy_gmem_to_smem(pool.at[page, pl.ds(lax.rem(tok, page_size), block_kv), kh],
                                        smem.at[slot], ready.at[slot])
                return
            per_block = block_kv // page_size
            for i in range(per_block):
                idx = j * per_block + i
                page = jnp.where(idx < owned, table_ref[seq, idx], first_page)
                plgpu.copy_gmem_to_smem(pool.at[page, :, kh],
                                        smem.at[slot, pl.ds(i * page_size, page_size)],
                                        ready.at[slot])

        produce(scr, issue, cta_steps=cta_steps, stages=stages)


def hopper_ragged_call(q_items, k_pages, v_pages, tables, num_q, pos0, seq, ctx, *, gp: int,
                       sm_scale: float, soft_cap: float | None, block_q: int, block_kv: int,
                       stages: int, pingpong: bool, interpret: bool,
                       tweaks: Tweaks | None = None):
    """q_items [W, K, 2 * block_q, D] (row r: token r // gp of the item, head r % gp of the kv
    head's group), pools [P, page, K, D], tables [B, max_pages_pad] (max_pages_pad * page a
    multiple of block_kv), item vectors [W] int32 -> [W, K, 2 * block_q, D]."""
    w, num_kv, _, d = q_items.shape
    page_size = k_pages.shape[1]
    kernel = functools.partial(
        _kernel, sm_scale=sm_scale, soft_cap=soft_cap, block_q=block_q, block_kv=block_kv,
        stages=stages, gp=gp, page_size=page_size, pingpong=pingpong, interpret=interpret,
        tweaks=tweaks or Tweaks())
    scratch = scratch_shapes(q_items.dtype, d, block_q=block_q, block_kv=block_kv,
                             stages=stages, copies_per_block=max(1, block_kv // page_size),
                             interpret=interpret)

    def entry(num_q_ref, pos0_ref, seq_ref, ctx_ref, table_ref, q_ref, k_ref, v_ref, o_ref):
        pl.run_scoped(
            lambda *refs: kernel(num_q_ref, pos0_ref, seq_ref, ctx_ref, table_ref, q_ref, k_ref,
                                 v_ref, o_ref, Scratch(*refs)),
            *scratch, collective_axes="wg")

    return launch(entry, jax.ShapeDtypeStruct(q_items.shape, q_items.dtype),
                  grid=(num_kv, w), grid_names=("heads", "items"), interpret=interpret)(
        num_q, pos0, seq, ctx, tables, q_items, k_pages, v_pages)


def hopper_tokens_per_item(num_heads: int, num_kv_heads: int, block_q: int = 64) -> int:
    """Query tokens per work item: two compute warpgroups of block_q (token, head) rows."""
    return COMPUTE_WGS * block_q // pl.next_power_of_2(num_heads // num_kv_heads)


def hopper_ragged_rows(q, k_pages, v_pages, block_tables, items, *, sm_scale: float,
                       soft_cap: float | None, block_kv: int, stages: int, pingpong: bool,
                       interpret: bool, tweaks: Tweaks | None = None, block_q: int = 64):
    """The rows of `items` (`ragged_schedule`'s (row0, num_q, pos0, seq, ctx), cut at
    `hopper_tokens_per_item` tokens) through the Hopper kernel: q [N, H, D] -> [N, H, D], rows
    no item covers 0."""
    row0, num_q, pos0, seq, ctx = items
    n, h, d = q.shape
    num_kv = k_pages.shape[2]
    group = h // num_kv
    gp = pl.next_power_of_2(group)
    tokens = hopper_tokens_per_item(h, num_kv, block_q)
    w = row0.shape[0]
    t = jnp.arange(tokens, dtype=jnp.int32)
    # Rows past an item's valid tokens belong to the next sequence (or are padding): they are
    # computed with this item's positions and dropped on the way back.
    idx = jnp.minimum(row0[:, None] + t, n - 1)  # [W, tokens]
    qg = q.reshape(n, num_kv, group, d)
    if gp > group:
        qg = jnp.pad(qg, ((0, 0), (0, 0), (0, gp - group), (0, 0)))
    q_items = qg[idx].transpose(0, 2, 1, 3, 4).reshape(w, num_kv, tokens * gp, d)
    page_size = k_pages.shape[1]
    tables = pad_block_tables(block_tables, max(1, block_kv // page_size))
    out = hopper_ragged_call(
        q_items, k_pages, v_pages, tables, num_q, pos0, seq, ctx, gp=gp, sm_scale=sm_scale,
        soft_cap=soft_cap, block_q=block_q, block_kv=block_kv, stages=stages, pingpong=pingpong,
        interpret=interpret, tweaks=tweaks)  # [W, K, tokens * Gp, D]
    out = out.reshape(w, num_kv, tokens, gp, d)[:, :, :, :group]
    out = out.transpose(0, 2, 1, 3, 4).reshape(w * tokens, h, d)
    dest = jnp.where(t[None, :] < num_q[:, None], row0[:, None] + t, n).reshape(-1)  # n: dropped
    return jnp.zeros_like(q).at[dest].set(out, mode="drop", unique_indices=True)
