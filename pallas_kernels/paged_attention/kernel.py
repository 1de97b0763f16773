"""Paged decode attention (one query per sequence) as a Pallas Triton kernel.

vLLM's PagedAttention with GQA grouping (all query heads of a kv head share each K/V page read)
and split-K over the context (flash-decoding) with an XLA combine step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.flash_attention.kernel import (
    MASK_VALUE,
    dot_nt,
    finish_softmax,
    online_softmax_step,
    scale_logits,
)
from pallas_kernels.flash_attention.tuning import resolve_interpret
from pallas_kernels.paged_attention.reference import (
    paged_attention_reference,
    paged_attention_xla,
)
from pallas_kernels.paged_attention.tuning import decode_num_splits, paged_config


def load_kv_block(pages_ref, table_ref, j, block_k: int, page_size: int, first_row=None,
                  num_pages: int | None = None) -> jax.Array:
    """Gathers the j-th block of a sequence's tokens for one kv head: [block_k, D].

    pages_ref [P * page, D] is the pool seen through one kv head, one row per token slot;
    table_ref [max_pages_pad] the sequence's block table. Token t of the block lies in row
    table[t // page] * page + t % page: one 2-D gather of whole rows. Measured on an H200
    (benchmarks/paged_decode_tuning.md) it streams at 3.83 TB/s at B32 S4096 where the former
    [pages, page, D] gather reshaped to [block_k, D] reached 2.20 with the same launch
    parameters. Entries past the context may be padding (-1, stale ids): clipped into range so
    the load stays in bounds; the caller masks those tokens.

    first_row, num_pages: the pages the table indexes are those from row first_row on, that
    many (default: the whole ref, from row 0). The fused step's `paged_decode_attention`
    sees all layers' pools as one ref and reads one layer's.
    """
    rows = block_rows(table_ref, j, block_k, page_size,
                      num_pages or pages_ref.shape[0] // page_size)
    return pages_ref[rows if first_row is None else first_row + rows]


def block_rows(table_ref, j, block_k: int, page_size: int, num_pages: int) -> jax.Array:
    """[block_k] int32: the pool row of each token of the j-th block (`load_kv_block`'s
    addressing), page ids clipped into [0, num_pages)."""
    tok = jnp.arange(block_k)
    ids = table_ref[j * (block_k // page_size) + tok // page_size]  # page of each token
    return jnp.clip(ids, 0, num_pages - 1) * page_size + tok % page_size


def attend_prefetched(q, k_ref, v_ref, table_ref, ctx, lo, hi, carry, *, sm_scale: float,
                      soft_cap: float | None, block_k: int, page_size: int, first_row=None,
                      num_pages: int | None = None):
    """The online softmax over blocks [lo, hi) with block j + 1's K and V loads, and block
    j + 2's page ids, issued before block j's math: a software pipeline through registers.

    Why: Triton's own pipeliner (num_stages) does not overlap this loop's loads with its math.
    Compiled for sm_90a (triton 3.9, B8 S4096), the K/V copies of block j + 1 go out after
    block j's dots, into the one shared-memory buffer those dots read, and the loop's head
    waits for all of them, because their addresses come from a table load in the same
    iteration. So each program alternates loading and computing, and only its neighbours on
    the SM fill the gaps. Here a load's registers are not read until the next iteration, so
    the warp runs this block's math while they are in flight (the GPU stalls on a load's
    result, not its issue). Run with num_stages=1: nothing is left for Triton to pipeline.

    A block past hi (the last iteration's next, or the one after) reads pool row 0 for every
    token: one row, from cache after the first lane, where a clipped block would read a
    whole block's bytes again. Tokens at or past ctx are masked and their V zeroed, as in the
    two loops of `_decode_kernel`. first_row, num_pages: as `load_kv_block`'s (the pages the
    table indexes start at row first_row of the refs).
    """
    num_pages = num_pages or k_ref.shape[0] // page_size
    table_blocks = table_ref.shape[0] // (block_k // page_size)  # padded: a whole block each

    def rows_of(j):  # [block_k] rows of the refs; the first page's first row past the split
        rows = block_rows(table_ref, jnp.minimum(j, table_blocks - 1), block_k, page_size,
                          num_pages)
        rows = jnp.where(j < hi, rows, 0)
        return rows if first_row is None else first_row + rows

    def body(j, state):
        carry, k, v, rows_next = state
        k_next, v_next = k_ref[rows_next], v_ref[rows_next]  # block j + 1, in flight below
        rows_after = rows_of(j + 2)
        s = scale_logits(dot_nt(q, k), sm_scale, soft_cap)  # [Gp, block_k]
        valid = j * block_k + jnp.arange(block_k) < ctx  # [block_k]
        v = jnp.where(valid[:, None], v, jnp.zeros_like(v))  # 0 * stale values stays 0
        carry = online_softmax_step(carry, s, v, jnp.broadcast_to(valid[None, :], s.shape))
        return carry, k_next, v_next, rows_after

    rows = rows_of(lo)
    state = (carry, k_ref[rows], v_ref[rows], rows_of(lo + 1))
    return jax.lax.fori_loop(lo, hi, body, state)[0]


def token_rows(pages: jax.Array) -> jax.Array:
    """[P, page, K, D] -> [P * page, K, D]: the pool as one row per token slot, the view
    `load_kv_block` gathers from. Free (same bytes, a reshape)."""
    p, page, k, d = pages.shape
    return pages.reshape(p * page, k, d)


def split_blocks(ctx, block_k: int, split, num_splits: int):
    """Split `split`'s blocks of a ctx-token context: (lo, full_hi, hi), blocks [lo, full_hi)
    lying wholly inside ctx and [full_hi, hi) the masked rest. The context's blocks are cut
    into num_splits near-equal runs, so every sequence is split evenly whatever its length."""
    total = (ctx + block_k - 1) // block_k
    per_split = (total + num_splits - 1) // num_splits
    lo = jnp.minimum(split * per_split, total)
    hi = jnp.minimum(lo + per_split, total)
    return lo, jnp.clip(ctx // block_k, lo, hi), hi


def _decode_kernel(
    ctx_ref,  # [B] int32
    table_ref,  # [max_pages_pad] int32: this sequence's block table
    q_ref,  # [H, D]: this sequence's queries
    k_ref,  # [P * page, D]: the pool through this kv head, a row per token slot
    v_ref,  # [P * page, D]
    *out_refs,  # num_splits == 1: o [H, D]; else acc [splits, H, D] f32, m and l [splits, H]
    sm_scale: float,
    soft_cap: float | None,
    block_k: int,
    page_size: int,
    num_splits: int,
    group: int,
    prefetch: bool = False,
):
    b, kv, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    ctx = ctx_ref[b]
    # The kv head's G query heads as one tensor-core tile of Gp >= 16 rows; the rows past G
    # are masked on load and store, so q needs no padded copy and the output no slice.
    gp = max(16, pl.next_power_of_2(group))  # tl.dot needs >= 16 rows
    heads = jnp.arange(gp) < group  # [Gp]
    rows = pl.ds(kv * group, gp)
    q = plgpu.load(q_ref.at[rows, :], mask=heads[:, None], other=0)  # [Gp, D]

    lo, full_hi, hi = split_blocks(ctx, block_k, split, num_splits)

    def body(j, carry, masked):
        k = load_kv_block(k_ref, table_ref, j, block_k, page_size)  # [block_k, D]
        v = load_kv_block(v_ref, table_ref, j, block_k, page_size)
        s = scale_logits(dot_nt(q, k), sm_scale, soft_cap)  # [Gp, block_k]
        mask = None
        if masked:
            valid = j * block_k + jnp.arange(block_k) < ctx  # [block_k]
            # Tokens past ctx come from padding/stale pages: zero V so 0 * garbage stays 0.
            v = jnp.where(valid[:, None], v, jnp.zeros_like(v))
            mask = jnp.broadcast_to(valid[None, :], s.shape)
        return online_softmax_step(carry, s, v, mask)

    d = q.shape[1]
    carry = (
        jnp.zeros((gp, d), jnp.float32),
        jnp.full((gp,), MASK_VALUE, jnp.float32),
        jnp.zeros((gp,), jnp.float32),
    )
    if prefetch:
        acc, m, l = attend_prefetched(q, k_ref, v_ref, table_ref, ctx, lo, hi, carry,
                                      sm_scale=sm_scale, soft_cap=soft_cap, block_k=block_k,
                                      page_size=page_size)
    else:
        carry = jax.lax.fori_loop(lo, full_hi, functools.partial(body, masked=False), carry)
        acc, m, l = jax.lax.fori_loop(full_hi, hi, functools.partial(body, masked=True), carry)
    if num_splits == 1:
        (o_ref,) = out_refs
        plgpu.store(o_ref.at[rows, :], finish_softmax(acc, l).astype(o_ref.dtype),
                    mask=heads[:, None])
    else:
        acc_ref, m_ref, l_ref = out_refs
        plgpu.store(acc_ref.at[split, rows, :], acc, mask=heads[:, None])
        plgpu.store(m_ref.at[split, rows], m, mask=heads)
        plgpu.store(l_ref.at[split, rows], l, mask=heads)


def check_paged_inputs(
    q_heads: int, q_dim: int, q_shape, k_pages, v_pages, block_tables, context_lens, batch: int
) -> None:
    """Shape checks shared by the decode and ragged entry points; errors name the shapes."""
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(
            f"k_pages {k_pages.shape} and v_pages {v_pages.shape} must both be "
            "[num_pages, page_size, num_kv_heads, head_dim]"
        )
    _, page_size, num_kv, d = k_pages.shape
    if d != q_dim:
        raise ValueError(
            f"q {tuple(q_shape)} has head_dim {q_dim}; k_pages {k_pages.shape} has {d}"
        )
    if q_heads % num_kv:
        raise ValueError(
            f"q {tuple(q_shape)} has {q_heads} heads, not a multiple of the {num_kv} kv heads of "
            f"k_pages {k_pages.shape}"
        )
    if page_size & (page_size - 1) or not 1 <= page_size <= 256:
        raise ValueError(f"page_size {page_size} of k_pages {k_pages.shape} must be a power of 2")
    if d & (d - 1) or not 16 <= d <= 256:
        raise ValueError(
            f"head_dim {d} of k_pages {k_pages.shape} must be a power of 2 in [16, 256]"
        )
    if block_tables.ndim != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"block_tables {block_tables.shape} must be [{batch}, max_pages]")
    if tuple(context_lens.shape) != (batch,):
        raise ValueError(f"context_lens {tuple(context_lens.shape)} must be [{batch}]")
    try:
        lens = np.asarray(context_lens)
    except jax.errors.TracerArrayConversionError:
        return  # traced (under jit): not checkable here, the kernel clamps to the table instead
    capacity = block_tables.shape[1] * page_size
    longest = int(lens.max()) if lens.size else 0
    if longest > capacity:
        raise ValueError(
            f"a context of {longest} tokens does not fit block_tables {block_tables.shape} "
            f"of {page_size}-token pages ({capacity} tokens): widen the block table"
        )


def pad_block_tables(block_tables: jax.Array, multiple: int) -> jax.Array:
    """Pads the table's page axis so every block_k-sized load stays inside it."""
    pad = -block_tables.shape[1] % multiple
    bt = block_tables.astype(jnp.int32)
    return jnp.pad(bt, ((0, 0), (0, pad))) if pad else bt


def paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    context_lens: jax.Array,
    *,
    sm_scale: float | None = None,
    soft_cap: float | None = None,
    num_splits: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    prefetch: bool = False,
    interpret: bool | None = None,
    impl: str = "pallas",
) -> jax.Array:
    """Decode attention: one query token per sequence against its paged K/V.

    Args:
      q: [B, H, D] queries (f32 / bf16 / f16); H a multiple of K.
      k_pages, v_pages: [P, page_size, K, D] one layer's page pool, dtype of q.
      block_tables: [B, max_pages] int32 page ids; entries past a sequence's pages are ignored.
      context_lens: [B] int32 keys per sequence (including the new token's, already written).
        Must be <= max_pages * page_size (checked when concrete, clamped under jit).
      sm_scale: logit scale; defaults to 1/sqrt(D).
      soft_cap: if set, logits become soft_cap * tanh(logits / soft_cap).
      num_splits: split-K partitions per sequence (flash-decoding); default from the grid size
        (`tuning.decode_num_splits`).
      block_k: tokens per loop step, a power-of-2 multiple of page_size; default from tuning.
      num_warps, num_stages: Triton launch parameters; default from tuning (num_stages 1
        with prefetch).
      prefetch: pipeline the loop by hand (`attend_prefetched`: the next block's K/V load
        while this block's math runs) instead of by Triton's num_stages. Off by default: not
        yet timed on a card.
      interpret: Pallas interpreter; None = interpret unless the backend is GPU.
      impl: "pallas"; "xla" (gather the pages, dense attention in the input dtype);
        "reference" (the same in f32 at HIGHEST precision: the spec).

    Returns:
      [B, H, D] in q.dtype, f32 accumulation; 0 for a sequence with context_len 0.
    """
    if q.ndim != 3:
        raise ValueError(f"q {q.shape} must be [batch, num_heads, head_dim]")
    check_paged_inputs(
        q.shape[1], q.shape[2], q.shape, k_pages, v_pages, block_tables, context_lens, q.shape[0]
    )
    if impl in ("reference", "xla"):
        dense = paged_attention_reference if impl == "reference" else paged_attention_xla
        return dense(
            q, k_pages, v_pages, block_tables, context_lens, sm_scale=sm_scale, soft_cap=soft_cap
        )
    if impl != "pallas":
        raise ValueError(f"impl={impl!r}; expected 'pallas', 'reference' or 'xla'")
    page_size, d = k_pages.shape[1], k_pages.shape[3]
    cfg = paged_config(page_size, d, q.dtype)
    block_k = block_k or cfg.block_k
    if block_k % page_size or block_k & (block_k - 1):
        raise ValueError(
            f"block_k {block_k} must be a power-of-2 multiple of page_size {page_size}"
        )
    # No more splits than the table has blocks: the rest would be idle programs.
    max_blocks = -(-block_tables.shape[1] * page_size // block_k)
    if num_splits is None:
        num_splits = decode_num_splits(q.shape[0], k_pages.shape[2], max_blocks, cfg)
    num_splits = max(1, min(num_splits, max_blocks))
    return _paged_call(
        q,
        k_pages,
        v_pages,
        block_tables,
        context_lens,
        sm_scale=d**-0.5 if sm_scale is None else float(sm_scale),
        soft_cap=soft_cap,
        block_k=block_k,
        num_splits=num_splits,
        num_warps=num_warps or cfg.num_warps,
        num_stages=num_stages or (1 if prefetch else cfg.num_stages),
        prefetch=bool(prefetch),
        interpret=resolve_interpret(interpret),
    )


@functools.partial(
    jax.jit,
    static_argnames=(
        "sm_scale",
        "soft_cap",
        "block_k",
        "num_splits",
        "num_warps",
        "num_stages",
        "prefetch",
        "interpret",
    ),
)
def _paged_call(
    q,
    k_pages,
    v_pages,
    block_tables,
    context_lens,
    *,
    sm_scale,
    soft_cap,
    block_k,
    num_splits,
    num_warps,
    num_stages,
    prefetch,
    interpret,
):
    b, h, d = q.shape
    num_pages, page_size, num_kv, _ = k_pages.shape
    table = pad_block_tables(block_tables, block_k // page_size)  # [B, max_pages_pad]
    ctx = jnp.clip(context_lens.astype(jnp.int32), 0, block_tables.shape[1] * page_size)
    kernel = functools.partial(
        _decode_kernel,
        sm_scale=sm_scale,
        soft_cap=soft_cap,
        block_k=block_k,
        page_size=page_size,
        num_splits=num_splits,
        group=h // num_kv,
        prefetch=prefetch,
    )
    pool_spec = pl.BlockSpec((num_pages * page_size, None, d), lambda bi, ki, si: (0, ki, 0))
    in_specs = [
        pl.BlockSpec((b,), lambda bi, ki, si: (0,)),
        pl.BlockSpec((None, table.shape[1]), lambda bi, ki, si: (bi, 0)),
        pl.BlockSpec((None, h, d), lambda bi, ki, si: (bi, 0, 0)),
        pool_spec,
        pool_spec,
    ]
    if num_splits == 1:
        out_specs = pl.BlockSpec((None, h, d), lambda bi, ki, si: (bi, 0, 0))
        out_shape = jax.ShapeDtypeStruct((b, h, d), q.dtype)
    else:
        stats = pl.BlockSpec((None, num_splits, h), lambda bi, ki, si: (bi, 0, 0))
        out_specs = [pl.BlockSpec((None, num_splits, h, d), lambda bi, ki, si: (bi, 0, 0, 0)),
                     stats, stats]
        out_shape = [
            jax.ShapeDtypeStruct((b, num_splits, h, d), jnp.float32),
            jax.ShapeDtypeStruct((b, num_splits, h), jnp.float32),
            jax.ShapeDtypeStruct((b, num_splits, h), jnp.float32),
        ]
    out = pl.pallas_call(
        kernel,
        grid=(b, num_kv, num_splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="paged_attention_decode",
    )(ctx, table, q, token_rows(k_pages), token_rows(v_pages))
    if num_splits == 1:
        return out
    return combine_splits(*out).astype(q.dtype)


def combine_splits(acc: jax.Array, m: jax.Array, l: jax.Array) -> jax.Array:
    """Merges split-K partials (base-2 running max m, sum l, unnormalized acc) along axis 1.

    acc [B, splits, H, D], m and l [B, splits, H] -> [B, H, D] f32. Empty splits carry
    m = MASK_VALUE and l = 0, so their weight is 0 unless every split is empty.
    """
    m_max = jnp.max(m, axis=1, keepdims=True)
    w = jnp.exp2(m - m_max)  # [B, splits, H]
    l_tot = jnp.sum(w * l, axis=1)
    o = jnp.sum(w[..., None] * acc, axis=1)
    return o / jnp.where(l_tot == 0.0, 1.0, l_tot)[..., None]
