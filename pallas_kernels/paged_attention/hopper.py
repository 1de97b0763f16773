"""Ragged paged attention on Hopper in Pallas Mosaic GPU: the flash pipeline of
`flash_attention/hopper.py` reading K/V straight from the page pool.

A work item is up to `2 * block_q // Gp` consecutive query tokens of one sequence (Gp the query
heads per kv head, padded to a power of 2). A CTA serves one item for one kv head: its rows are
(head, token) pairs over the Gp query heads that share the kv head, so they share every K/V
load, and a decode (one token) is an item of Gp valid rows. Each compute warpgroup takes
block_q rows: its `block_q // Gp` tokens, head-major (row g * tokens + t), so that each head's
rows arrive by one TMA copy straight from q [N, H, D] (rows past N read 0), into an untiled
staging tile and from there through registers into the swizzled one: a TMA copy into a
swizzled tile needs a row offset provably a multiple of 8, and an item starts at any row
(run 18 of benchmarks/paged_attention_h200.md; Mosaic's layout inference). The producer fills
a ring slot of block_kv keys with one TMA copy per page (block_kv >= page) or one copy from
inside a page (block_kv <= page), all arriving on the slot's barrier.

The output leaves through an untiled tile in shared memory, each head's valid tokens in at most
log2(tokens) + 1 TMA copies of power-of-2 row counts: a copy of the whole tile would overwrite
the next item's rows. (Before, the wrapper gathered every item's rows into a packed copy of q
and scattered the outputs back: two XLA passes over q of ~13% of a mixed batch's time on an
H200, benchmarks/paged_attention_h200.md run 18. Without them the mixed batch ran 1.27x the
best separate calls at D128 and 1.07x at D64 on an H100, run 19.)

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


def _kernel(num_q_ref, pos0_ref, row0_ref, seq_ref, ctx_ref, table_ref, q_ref, k_ref, v_ref,
            o_ref, scr: Scratch, *, sm_scale, soft_cap, block_q, block_kv, stages, group, gp,
            page_size, pingpong, interpret, tweaks):
    """One CTA: item w for kv head kh.

    num_q/pos0/row0/seq/ctx_ref: [W] int32 (GMEM) the item's valid tokens, the position of its
    first token, that token's row of q, its sequence and that sequence's context.
    table_ref: [B, max_pages_pad] int32. q_ref/o_ref: [N, H, D]; k_ref/v_ref: [P, page, K, D]
    the pool.
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
        row = row0_ref[w] + first  # q's and o's row of this warpgroup's first token
        # Idle items (and a decode item's second warpgroup) move no query rows: an all-decode
        # step still launches this kernel over every item slot.
        has_rows = first < num_q
        q_smem = scr.q.at[wg]

        stage = scr.stage.at[wg]

        # A TMA copy into the swizzled query tile would tile q's GMEM rows by 8 too, and needs
        # the row offset provably a multiple of 8 (Mosaic's layout inference); an item starts
        # at any row. So each head's rows land in the untiled stage, and move into the tile
        # through registers once they are in.
        @pl.when(has_rows)
        def _load_q():
            for g in range(gp):  # a padded head repeats the group's last: finite rows, dropped
                head = kh * group + min(g, group - 1)
                plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(row, tokens), head],
                                        stage.at[pl.ds(g * tokens, tokens)],
                                        scr.q_ready.at[wg])

        def to_tile():
            if interpret:
                q_smem[...] = stage[...]
            else:
                # Bank conflicts: a one-off 16 KB move per tile.
                q_smem[...] = plgpu.load(stage, (), layout=plgpu.Layout.WGMMA, optimized=False)
            plgpu.commit_smem()  # the wgmma reads the tile through the async proxy

        def store(out):
            stage[...] = out.astype(stage.dtype)
            plgpu.commit_smem()
            n = jnp.clip(num_q - first, 0, tokens)  # this warpgroup's valid tokens
            for g in range(group):
                size = tokens
                while size:  # n's set bits, highest first: rows [off, off + size)
                    off = n & ~(2 * size - 1)
                    pl.when(n & size != 0)(functools.partial(
                        plgpu.copy_smem_to_gmem, stage.at[pl.ds(g * tokens + off, size)],
                        o_ref.at[pl.ds(row + off, size), kh * group + g]))
                    size //= 2
            plgpu.wait_smem_to_gmem(0)

        def q_pos(shape, iota):
            return pos0 + first + lax.rem(iota(shape, 0), tokens)  # row r is token r % tokens

        consume(scr, None, None, n_steps=n_steps, n_full=n_full, cta_steps=cta_steps,
                kv_len=ctx, q_pos=q_pos, sm_scale=sm_scale, soft_cap=soft_cap,
                block_kv=block_kv, stages=stages, pingpong=pingpong, interpret=interpret,
                tweaks=tweaks, has_rows=has_rows, q_loaded=True, store=store,
                on_q_ready=to_tile)

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


def hopper_ragged_call(q, k_pages, v_pages, tables, num_q, pos0, row0, seq, ctx, *,
                       sm_scale: float, soft_cap: float | None, block_q: int, block_kv: int,
                       stages: int, pingpong: bool, interpret: bool,
                       tweaks: Tweaks | None = None):
    """q [N, H, D], pools [P, page, K, D], tables [B, max_pages_pad] (max_pages_pad * page a
    multiple of block_kv), item vectors [W] int32 -> [N, H, D]: the items' valid rows; rows no
    item covers are left as they come (uninitialized)."""
    h, d = q.shape[1:]
    num_kv, page_size = k_pages.shape[2], k_pages.shape[1]
    group = h // num_kv
    gp = pl.next_power_of_2(group)
    w = row0.shape[0]
    kernel = functools.partial(
        _kernel, sm_scale=sm_scale, soft_cap=soft_cap, block_q=block_q, block_kv=block_kv,
        stages=stages, group=group, gp=gp, page_size=page_size, pingpong=pingpong,
        interpret=interpret, tweaks=tweaks or Tweaks())
    scratch = scratch_shapes(q.dtype, d, block_q=block_q, block_kv=block_kv,
                             stages=stages, copies_per_block=max(1, block_kv // page_size),
                             interpret=interpret, q_copies=gp, stage_tiles=True)

    def entry(num_q_ref, pos0_ref, row0_ref, seq_ref, ctx_ref, table_ref, q_ref, k_ref, v_ref,
              o_ref):
        pl.run_scoped(
            lambda *refs: kernel(num_q_ref, pos0_ref, row0_ref, seq_ref, ctx_ref, table_ref,
                                 q_ref, k_ref, v_ref, o_ref, Scratch(*refs[:9], stage=refs[9])),
            *scratch, collective_axes="wg")

    return launch(entry, jax.ShapeDtypeStruct(q.shape, q.dtype),
                  grid=(num_kv, w), grid_names=("heads", "items"), interpret=interpret)(
        num_q, pos0, row0, seq, ctx, tables, q, k_pages, v_pages)


def hopper_max_group(block_q: int = 64) -> int:
    """The most query heads per kv head (after padding to a power of 2) the kernel takes: each
    head's rows of a warpgroup are one TMA copy into the [block_q, D] tile, at least 8 rows."""
    return block_q // 8


def hopper_tokens_per_item(num_heads: int, num_kv_heads: int, block_q: int = 64) -> int:
    """Query tokens per work item: two compute warpgroups of block_q (token, head) rows."""
    return COMPUTE_WGS * block_q // pl.next_power_of_2(num_heads // num_kv_heads)


def hopper_ragged_rows(q, k_pages, v_pages, block_tables, items, num_rows, *, sm_scale: float,
                       soft_cap: float | None, block_kv: int, stages: int, pingpong: bool,
                       interpret: bool, tweaks: Tweaks | None = None, block_q: int = 64):
    """The rows of `items` (`ragged_schedule`'s (row0, num_q, pos0, seq, ctx), cut at
    `hopper_tokens_per_item` tokens) through the Hopper kernel: q [N, H, D] -> [N, H, D], rows
    from num_rows on 0. Rows below num_rows that no item covers (decodes the caller serves
    elsewhere) are left unwritten."""
    row0, num_q, pos0, seq, ctx = items
    n, h = q.shape[:2]
    gp = pl.next_power_of_2(h // k_pages.shape[2])
    if gp > hopper_max_group(block_q):
        raise ValueError(f"{gp} query heads per kv head (padded): the Hopper ragged kernel "
                         f"takes at most {hopper_max_group(block_q)}; use backend='triton'")
    tokens = hopper_tokens_per_item(h, k_pages.shape[2], block_q)
    # The compiled kernel's TMA reads rows past N as 0; the interpreter would clamp the slice
    # instead, so it gets the rows.
    q_in = jnp.pad(q, ((0, tokens), (0, 0), (0, 0))) if interpret else q
    page_size = k_pages.shape[1]
    tables = pad_block_tables(block_tables, max(1, block_kv // page_size))
    out = hopper_ragged_call(
        q_in, k_pages, v_pages, tables, num_q, pos0, row0, seq, ctx, sm_scale=sm_scale,
        soft_cap=soft_cap, block_q=block_q, block_kv=block_kv, stages=stages, pingpong=pingpong,
        interpret=interpret, tweaks=tweaks)[:n]
    # Padding rows past the last sequence's tokens were never written. A scatter of zeros into
    # them writes only those rows, where a select would read and write all of them.
    rows = jnp.arange(n, dtype=jnp.int32)
    return out.at[jnp.where(rows >= num_rows, rows, n)].set(0, mode="drop",
                                                            unique_indices=True)
