"""Plain-jnp paged attention (decode and ragged) and the K/V page write: the spec for the kernels.

Page pool layout (one layer): k_pages, v_pages [P, page_size, K, D]. Token i of sequence b lives
at k_pages[block_tables[b, i // page_size], i % page_size].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.flash_attention.reference import attention_xla, flash_attention_reference


def gather_pages(pages: jax.Array, block_tables: jax.Array) -> jax.Array:
    """Dense per-sequence K or V: [P, page, K, D] through [B, max_pages] -> [B, max_pages*page, K, D].

    Table entries beyond a sequence's length may hold anything (padding): they are clipped into
    range here and masked by the caller's lengths.
    """
    num_pages, page_size, num_kv, d = pages.shape
    b, max_pages = block_tables.shape
    idx = jnp.clip(block_tables, 0, num_pages - 1)
    return pages[idx].reshape(b, max_pages * page_size, num_kv, d)


def paged_attention_reference(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    context_lens: jax.Array,
    *,
    sm_scale: float | None = None,
    soft_cap: float | None = None,
) -> jax.Array:
    """Decode attention (one query per sequence) over paged K/V. Same contract as the kernel.

    Args:
      q: [B, H, D] the new token's queries.
      k_pages, v_pages: [P, page_size, K, D] page pool of one layer.
      block_tables: [B, max_pages] int32 page ids per sequence.
      context_lens: [B] int32 keys per sequence, including the new token's own key.
      sm_scale: logit scale; defaults to 1/sqrt(D).
      soft_cap: optional logit soft cap.

    Returns:
      [B, H, D] in q.dtype; 0 for a sequence with context_len 0.
    """
    return _paged_dense(
        flash_attention_reference,
        q,
        k_pages,
        v_pages,
        block_tables,
        context_lens,
        sm_scale,
        soft_cap,
    )


def paged_attention_xla(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    context_lens: jax.Array,
    *,
    sm_scale: float | None = None,
    soft_cap: float | None = None,
) -> jax.Array:
    """Decode attention as plain XLA (page gather + dense attention in the input dtype): the
    non-Pallas fast path. Arguments as `paged_attention_reference`."""
    return _paged_dense(
        attention_xla, q, k_pages, v_pages, block_tables, context_lens, sm_scale, soft_cap
    )


def _paged_dense(dense, q, k_pages, v_pages, block_tables, context_lens, sm_scale, soft_cap):
    """Gathers each sequence's pages into a dense [B, S, K, D] cache and runs `dense` on it."""
    k = gather_pages(k_pages, block_tables)
    v = gather_pages(v_pages, block_tables)
    out = dense(
        q[:, None], k, v, causal=False, sm_scale=sm_scale, kv_lens=context_lens, soft_cap=soft_cap
    )
    return out[:, 0]  # [B, H, D]


def ragged_paged_attention_reference(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    context_lens: jax.Array,
    query_start_loc: jax.Array,
    *,
    sm_scale: float | None = None,
    soft_cap: float | None = None,
) -> jax.Array:
    """Mixed prefill-chunk / decode attention over paged K/V. Same contract as the kernel.

    Sequence b owns flat query rows [query_start_loc[b], query_start_loc[b+1]); its q_len
    queries are its last q_len tokens, so query i sits at position context_lens[b] - q_len + i
    and sees keys [0, that position]. Rows past query_start_loc[B] (padding) are 0.

    Args:
      q: [N, H, D] flat query tokens of all sequences.
      k_pages, v_pages: [P, page_size, K, D] page pool, already holding this step's K/V.
      block_tables: [B, max_pages] int32.
      context_lens: [B] int32 total keys per sequence including this step's tokens.
      query_start_loc: [B+1] int32 nondecreasing, query_start_loc[0] = 0.
      sm_scale: logit scale; defaults to 1/sqrt(D).
      soft_cap: optional logit soft cap.

    Returns:
      [N, H, D] in q.dtype.
    """
    seq, pos, valid = _ragged_rows(q.shape[0], block_tables.shape[0], context_lens, query_start_loc)
    out = _ragged_rows_attention(
        flash_attention_reference,
        q,
        k_pages,
        v_pages,
        block_tables,
        context_lens,
        seq,
        pos,
        sm_scale,
        soft_cap,
    )
    return jnp.where(valid[:, None, None], out, 0).astype(q.dtype)


def ragged_paged_attention_xla(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    context_lens: jax.Array,
    query_start_loc: jax.Array,
    *,
    sm_scale: float | None = None,
    soft_cap: float | None = None,
    rows_per_chunk: int = 32,
) -> jax.Array:
    """The ragged attention as plain XLA in the input dtype, `rows_per_chunk` rows at a time.

    Each row gathers its own sequence's K/V, so memory stays at rows_per_chunk x S x K x D
    instead of the reference's N x S x K x D. Arguments as `ragged_paged_attention_reference`.
    """
    n, h, d = q.shape
    seq, pos, valid = _ragged_rows(n, block_tables.shape[0], context_lens, query_start_loc)
    pad = -n % rows_per_chunk
    chunks = [jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)) for x in (q, seq, pos)]
    chunks = [x.reshape(-1, rows_per_chunk, *x.shape[1:]) for x in chunks]

    def one_chunk(args):
        qc, sc, pc = args  # [R, H, D], [R], [R]
        return _ragged_rows_attention(
            attention_xla,
            qc,
            k_pages,
            v_pages,
            block_tables,
            context_lens,
            sc,
            pc,
            sm_scale,
            soft_cap,
        )

    out = jax.lax.map(one_chunk, chunks).reshape(-1, h, d)[:n]
    return jnp.where(valid[:, None, None], out, 0).astype(q.dtype)


def _ragged_rows(n: int, b: int, context_lens, query_start_loc):
    """Each flat row's sequence [N], absolute position [N] and whether it is a real row [N]."""
    rows = jnp.arange(n)
    # First b with end > row; compare_all avoids the default scan's XLA while loop (see
    # ragged.ragged_schedule).
    seq = jnp.searchsorted(query_start_loc[1:], rows, side="right", method="compare_all")
    valid = seq < b
    seq = jnp.minimum(seq, b - 1)
    q_len = query_start_loc[seq + 1] - query_start_loc[seq]
    # A sequence's q_len queries are its last q_len tokens.
    pos = context_lens[seq] - q_len + (rows - query_start_loc[seq])
    return seq.astype(jnp.int32), pos.astype(jnp.int32), valid


def _ragged_rows_attention(
    dense, q, k_pages, v_pages, block_tables, context_lens, seq, pos, sm_scale, soft_cap
):
    """Rows as a batch of one-query sequences: row r attends to seq[r]'s keys causally at pos[r]."""
    k = gather_pages(k_pages, block_tables[seq])  # [R, S, K, D]
    v = gather_pages(v_pages, block_tables[seq])
    out = dense(
        q[:, None],
        k,
        v,
        causal=True,
        sm_scale=sm_scale,
        q_offset=pos,
        kv_lens=context_lens[seq],
        soft_cap=soft_cap,
    )
    return out[:, 0]  # [R, H, D]


def write_kv_pages_reference(
    k_pages: jax.Array,
    v_pages: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    slot_mapping: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Scatters new K/V rows into the page pool (XLA scatter; in place when the pool is donated).

    Args:
      k_pages, v_pages: [P, page_size, K, D] page pool.
      k_new, v_new: [N, K, D] this step's keys and values.
      slot_mapping: [N] int32 slot = page * page_size + offset; negative = padding, skipped.

    Returns:
      The updated (k_pages, v_pages).
    """
    num_pages, page_size, num_kv, d = k_pages.shape
    total = num_pages * page_size
    # Negative slots go out of bounds, and mode="drop" skips them.
    slots = jnp.where(slot_mapping < 0, total, slot_mapping)

    def scatter(pages, new):
        flat = pages.reshape(total, num_kv, d)
        return flat.at[slots].set(new.astype(pages.dtype), mode="drop").reshape(pages.shape)

    return scatter(k_pages, k_new), scatter(v_pages, v_new)
