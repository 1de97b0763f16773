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
    drain,
    launch,
    persistent_schedule,
    plgpu_module,
    scratch_shapes,
    set_compute_registers,
    set_producer_registers,
    stream,
)
from pallas_kernels.paged_attention.kernel import pad_block_tables


def _kernel(num_q_ref, pos0_ref, seq_ref, ctx_ref, order_ref, table_ref, q_ref, k_ref, v_ref,
            o_ref, scr: Scratch, *, sm_scale, soft_cap, block_q, block_kv, stages, gp,
            page_size, num_kv, num_ctas, pingpong, interpret, tweaks):
    """CTA c serves tiles (item, kv head) ranked by `order_ref`: rank r is item
    order[r // K] for kv head r % K, dealt out as `persistent_schedule` says, so a CTA's K/V
    ring runs on across its tiles (and, with `Scratch.o`, each tile's query rows load during
    the one before).

    num_q/pos0/seq/ctx_ref: [W] int32 (GMEM) the item's valid tokens, the position of its first
    token, its sequence and that sequence's context. order_ref: [W] int32 the items heaviest
    first. table_ref: [B, max_pages_pad] int32. q_ref/o_ref: [W, K, 2 * block_q, D];
    k_ref/v_ref: [P, page, K, D] the pool.
    """
    plgpu = plgpu_module()
    wg = lax.axis_index("wg")
    num_tiles = order_ref.shape[0] * num_kv
    n_mine, rank = persistent_schedule(num_tiles, num_ctas)
    tokens = block_q // gp  # per compute warpgroup

    def tile_of(i):
        """(item, kv head, valid tokens, first position, context, the CTA's kv blocks)."""
        r = rank(i)
        w, kh = order_ref[lax.div(r, num_kv)], lax.rem(r, num_kv)
        num_q, pos0, ctx = num_q_ref[w], pos0_ref[w], ctx_ref[w]
        # A decode item's second warpgroup has no tokens; either may read more blocks.
        cta_steps = jnp.maximum(steps_of(0, num_q, pos0, ctx)[0],
                                steps_of(tokens, num_q, pos0, ctx)[0])
        return w, kh, num_q, pos0, ctx, cta_steps

    def steps_of(first, num_q, pos0, ctx):
        """(kv blocks, unmasked blocks) of the warpgroup whose tokens start at `first`."""
        last = jnp.minimum(num_q, first + tokens)  # its valid tokens are [first, last)
        end = jnp.where(last > first, jnp.minimum(ctx, pos0 + last), 0)
        return block_steps(end, jnp.minimum(ctx, pos0 + first + 1), block_kv)

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
        set_compute_registers()
        q_ahead = scr.o is not None
        first = wg * tokens

        def rows_of(w, kh):
            return w, kh, pl.ds(wg * block_q, block_q)

        def load_q(i):
            w, kh, num_q, *_ = tile_of(i)
            # Idle items (and a decode item's second warpgroup) move no query rows.
            pl.when(first < num_q)(lambda: plgpu.copy_gmem_to_smem(
                q_ref.at[rows_of(w, kh)], scr.q.at[wg], scr.q_ready.at[wg]))

        def one_tile(i, base):
            w, kh, num_q, pos0, ctx, cta_steps = tile_of(i)
            n_steps, n_full = steps_of(first, num_q, pos0, ctx)
            rows = rows_of(w, kh)

            def q_pos(shape, iota):
                return pos0 + first + lax.div(iota(shape, 0), gp)  # row r is token r // Gp

            def load_next_q():
                pl.when(i + 1 < n_mine)(lambda: load_q(i + 1))

            consume(scr, q_ref.at[rows], o_ref.at[rows], n_steps=n_steps, n_full=n_full,
                    cta_steps=cta_steps, kv_len=ctx, q_pos=q_pos, sm_scale=sm_scale,
                    soft_cap=soft_cap, block_kv=block_kv, stages=stages, pingpong=pingpong,
                    interpret=interpret, tweaks=tweaks, has_rows=first < num_q, base=base,
                    setup_registers=False, q_loaded=q_ahead,
                    load_next_q=load_next_q if q_ahead else None)
            return base + cta_steps

        if q_ahead:
            load_q(0)  # every CTA has at least one tile
        lax.fori_loop(0, n_mine, one_tile, jnp.int32(0))
        if q_ahead:
            plgpu.wait_smem_to_gmem(0)  # the last tile's store

    @pl.when(wg == COMPUTE_WGS)
    def _producer():
        set_producer_registers()

        def one_tile(i, base):
            w, kh, _, _, ctx, cta_steps = tile_of(i)
            seq = seq_ref[w]
            if block_kv > page_size:  # several pages per block: the ones past ctx read page 0's
                first_page = table_ref[seq, 0]
                owned = (ctx + page_size - 1) // page_size  # the sequence's pages

            def issue(j, slot, which):
                pool, smem, ready = ((k_ref, scr.k, scr.k_ready),
                                     (v_ref, scr.v, scr.v_ready))[which]
                if block_kv <= page_size:
                    tok = j * block_kv
                    page = table_ref[seq, lax.div(tok, page_size)]
                    plgpu.copy_gmem_to_smem(
                        pool.at[page, pl.ds(lax.rem(tok, page_size), block_kv), kh],
                        smem.at[slot], ready.at[slot])
                    return
                per_block = block_kv // page_size
                for p in range(per_block):
                    idx = j * per_block + p
                    page = jnp.where(idx < owned, table_ref[seq, idx], first_page)
                    plgpu.copy_gmem_to_smem(pool.at[page, :, kh],
                                            smem.at[slot, pl.ds(p * page_size, page_size)],
                                            ready.at[slot])

            stream(scr, issue, base=base, count=cta_steps, stages=stages)
            return base + cta_steps

        drain(scr, total=lax.fori_loop(0, n_mine, one_tile, jnp.int32(0)), stages=stages)


def hopper_ragged_call(q_items, k_pages, v_pages, tables, num_q, pos0, seq, ctx, *, gp: int,
                       sm_scale: float, soft_cap: float | None, block_q: int, block_kv: int,
                       stages: int, pingpong: bool, interpret: bool,
                       tweaks: Tweaks | None = None, num_ctas: int | None = None,
                       q_ahead: bool = False):
    """q_items [W, K, 2 * block_q, D] (row r: token r // gp of the item, head r % gp of the kv
    head's group), pools [P, page, K, D], tables [B, max_pages_pad] (max_pages_pad * page a
    multiple of block_kv), item vectors [W] int32 -> [W, K, 2 * block_q, D].

    num_ctas: how many CTAs share the W * K tiles (persistent: about one per SM), ranked by
    the item's context, longest first (a guess that a tile's time is about its kv blocks,
    whether it holds one decode or a chunk's 2 * block_q rows; idle items last). None launches
    one CTA per tile in the items' order. q_ahead: each tile's query rows load during the
    CTA's previous tile (persistent only).

    On an H200 the persistent launch lost (bench_kernels --only ragged, bb853f7: 326 us against
    293 for a CTA per tile on the mixed batch of 28 decodes and 4 chunks), so `ragged.py`
    launches a CTA per tile: the hardware's dynamic dealing beats this static ranking there."""
    w, num_kv, _, d = q_items.shape
    page_size = k_pages.shape[1]
    num_tiles = w * num_kv
    num_ctas = num_tiles if num_ctas is None else max(1, min(num_ctas, num_tiles))
    if num_ctas < num_tiles:
        order = jnp.argsort(-jnp.where(num_q > 0, ctx, -1)).astype(jnp.int32)  # [W]
    else:
        order = jnp.arange(w, dtype=jnp.int32)
    kernel = functools.partial(
        _kernel, sm_scale=sm_scale, soft_cap=soft_cap, block_q=block_q, block_kv=block_kv,
        stages=stages, gp=gp, page_size=page_size, num_kv=num_kv, num_ctas=num_ctas,
        pingpong=pingpong, interpret=interpret, tweaks=tweaks or Tweaks())
    scratch = scratch_shapes(q_items.dtype, d, block_q=block_q, block_kv=block_kv,
                             stages=stages, copies_per_block=max(1, block_kv // page_size),
                             interpret=interpret, out_tiles=q_ahead)

    def entry(num_q_ref, pos0_ref, seq_ref, ctx_ref, order_ref, table_ref, q_ref, k_ref, v_ref,
              o_ref):
        pl.run_scoped(
            lambda *refs: kernel(num_q_ref, pos0_ref, seq_ref, ctx_ref, order_ref, table_ref,
                                 q_ref, k_ref, v_ref, o_ref, Scratch(*refs)),
            *scratch, collective_axes="wg")

    return launch(entry, jax.ShapeDtypeStruct(q_items.shape, q_items.dtype),
                  grid=(num_ctas,), grid_names=("cta",), interpret=interpret)(
        num_q, pos0, seq, ctx, order, tables, q_items, k_pages, v_pages)


def hopper_tokens_per_item(num_heads: int, num_kv_heads: int, block_q: int = 64) -> int:
    """Query tokens per work item: two compute warpgroups of block_q (token, head) rows."""
    return COMPUTE_WGS * block_q // pl.next_power_of_2(num_heads // num_kv_heads)


def hopper_ragged_rows(q, k_pages, v_pages, block_tables, items, *, sm_scale: float,
                       soft_cap: float | None, block_kv: int, stages: int, pingpong: bool,
                       interpret: bool, tweaks: Tweaks | None = None, block_q: int = 64,
                       num_ctas: int | None = None, q_ahead: bool = False):
    """The rows of `items` (`ragged_schedule`'s (row0, num_q, pos0, seq, ctx), cut at
    `hopper_tokens_per_item` tokens) through the Hopper kernel: q [N, H, D] -> [N, H, D], rows
    no item covers 0. num_ctas / q_ahead: `hopper_ragged_call`'s."""
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
        interpret=interpret, tweaks=tweaks, num_ctas=num_ctas,
        q_ahead=q_ahead)  # [W, K, tokens * Gp, D]
    out = out.reshape(w, num_kv, tokens, gp, d)[:, :, :, :group]
    out = out.transpose(0, 2, 1, 3, 4).reshape(w * tokens, h, d)
    dest = jnp.where(t[None, :] < num_q[:, None], row0[:, None] + t, n).reshape(-1)  # n: dropped
    return jnp.zeros_like(q).at[dest].set(out, mode="drop", unique_indices=True)
