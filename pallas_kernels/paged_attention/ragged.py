"""Ragged paged attention: one kernel for a mixed batch of prefill chunks and decode tokens.

Follows vLLM's unified attention: the flat query axis is cut into per-sequence work items of
`block_q` tokens, each program serves one item for all query heads of one kv head.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.flash_attention.hopper import wgmma_unsupported
from pallas_kernels.flash_attention.kernel import (
    MASK_VALUE,
    dot_nt,
    finish_softmax,
    online_softmax_step,
    scale_logits,
)
from pallas_kernels.flash_attention.tuning import hopper_config, resolve_interpret
from pallas_kernels.paged_attention.hopper import (
    hopper_max_group,
    hopper_ragged_rows,
    hopper_tokens_per_item,
)
from pallas_kernels.paged_attention.kernel import (
    check_paged_inputs,
    load_kv_block,
    pad_block_tables,
    paged_attention,
    token_rows,
)
from pallas_kernels.paged_attention.reference import (
    ragged_paged_attention_reference,
    ragged_paged_attention_xla,
)
from pallas_kernels.paged_attention.tuning import (
    UNIFIED_DECODE_MAX_CONTEXT,
    paged_config,
    ragged_backend,
)


def _ragged_kernel(
    row0_ref,  # [] int32 flat row of the item's first query
    num_q_ref,  # [] int32 valid queries in the item (0 = idle item)
    pos0_ref,  # [] int32 absolute position of the item's first query
    ctx_ref,  # [] int32 keys of the item's sequence (0 for idle items)
    table_ref,  # [max_pages_pad] int32 the sequence's block table
    q_ref,  # [N_pad, Gp, D] every query row, seen through this kv head
    k_ref,  # [P * page, D]: the pool through this kv head, a row per token slot
    v_ref,  # [P * page, D]
    o_ref,  # [N_pad, Gp, D]
    *,
    sm_scale: float,
    soft_cap: float | None,
    block_q: int,
    block_k: int,
    page_size: int,
):
    row0, num_q = row0_ref[()], num_q_ref[()]
    pos0, ctx = pos0_ref[()], ctx_ref[()]
    _, gp, d = q_ref.shape
    rows = block_q * gp
    # Rows are (token, head) pairs, token-major: row r is token r // gp of the item.
    q = q_ref[pl.ds(row0, block_q)].reshape(rows, d)  # [block_q * Gp, D]
    q_pos = pos0 + jnp.arange(rows) // gp  # [rows]

    # The item's last valid query (pos0 + num_q - 1) sees keys < pos0 + num_q.
    end = jnp.minimum(ctx, pos0 + num_q)
    num_blocks = (end + block_k - 1) // block_k
    # Unmasked blocks end at or before the first query's own key and inside ctx.
    num_full = jnp.minimum(jnp.minimum(ctx // block_k, (pos0 + 1) // block_k), num_blocks)

    def body(j, carry, masked):
        k = load_kv_block(k_ref, table_ref, j, block_k, page_size)  # [block_k, D]
        v = load_kv_block(v_ref, table_ref, j, block_k, page_size)
        s = scale_logits(dot_nt(q, k), sm_scale, soft_cap)  # [rows, block_k]
        mask = None
        if masked:
            k_pos = j * block_k + jnp.arange(block_k)
            in_ctx = k_pos < ctx
            # Stale/padding tokens past ctx: zero V so 0-probability * garbage stays 0.
            v = jnp.where(in_ctx[:, None], v, jnp.zeros_like(v))
            mask = in_ctx[None, :] & (k_pos[None, :] <= q_pos[:, None])
        return online_softmax_step(carry, s, v, mask)

    carry = (
        jnp.zeros((rows, d), jnp.float32),
        jnp.full((rows,), MASK_VALUE, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    carry = jax.lax.fori_loop(0, num_full, functools.partial(body, masked=False), carry)
    carry = jax.lax.fori_loop(num_full, num_blocks, functools.partial(body, masked=True), carry)
    acc, _, l = carry
    out = finish_softmax(acc, l).astype(o_ref.dtype).reshape(block_q, gp, d)
    # Only this item's own tokens are written: the next rows belong to another sequence.
    token_ok = jnp.arange(block_q) < num_q
    plgpu.store(o_ref.at[pl.ds(row0, block_q)], out, mask=token_ok[:, None, None])


def ragged_schedule(
    query_start_loc: jax.Array,
    context_lens: jax.Array,
    num_tokens: int,
    block_q: int,
    skip: jax.Array | None = None,
):
    """Cuts each sequence's queries into items of block_q tokens: per-item (row0, num_q, pos0, seq,
    ctx), each [W] int32 with W = cdiv(N, block_q) + B a static bound; idle items have num_q 0.
    Sequences where skip [B] bool is set get no items (another kernel serves them).
    """
    b = context_lens.shape[0]
    qsl = query_start_loc.astype(jnp.int32)
    q_lens = qsl[1:] - qsl[:-1]  # [B]
    if skip is not None:
        q_lens = jnp.where(skip, 0, q_lens)
    blocks = (q_lens + block_q - 1) // block_q  # [B]
    ends = jnp.cumsum(blocks)  # [B] items up to and including sequence b
    # sum_b cdiv(q_len_b, block_q) <= sum_b (q_len_b / block_q + 1) <= N / block_q + B.
    num_items = -(-num_tokens // block_q) + b
    w = jnp.arange(num_items, dtype=jnp.int32)
    # first b with ends[b] > w. compare_all, not the default scan: a scan is an XLA while loop
    # with per-iteration control costs, paid once per layer. On an H200 an all-decode step
    # through this entry point took 221 us with the scan and 154 with compare_all, against
    # 129-135 for the direct decode call (benchmarks/paged_attention_h200.md).
    seq = jnp.searchsorted(ends, w, side="right", method="compare_all").astype(jnp.int32)
    live = seq < b
    seq = jnp.minimum(seq, b - 1)
    first = (w - (ends[seq] - blocks[seq])) * block_q  # item's first query within its sequence
    num_q = jnp.where(live, jnp.clip(q_lens[seq] - first, 0, block_q), 0)
    row0 = jnp.where(live, qsl[seq] + first, 0)
    ctx = jnp.where(live, context_lens[seq], 0)
    pos0 = ctx - q_lens[seq] + first  # the sequence's queries are its last q_len tokens
    return row0, num_q, pos0, seq, ctx


def ragged_paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    context_lens: jax.Array,
    query_start_loc: jax.Array,
    *,
    sm_scale: float | None = None,
    soft_cap: float | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    num_splits: int | None = None,
    split_decodes: bool | str = "auto",
    interpret: bool | None = None,
    impl: str = "pallas",
    backend: str = "auto",
    unified_max_context: int | None = None,
) -> jax.Array:
    """Attention for a flat batch mixing prefill chunks and decode tokens over paged K/V.

    Sequence b owns flat rows [query_start_loc[b], query_start_loc[b+1]) (q_len_b >= 0). They are
    its last q_len_b tokens: query i sits at position context_lens[b] - q_len_b + i and attends
    causally to keys [0, position]. This step's K/V must already be in the pages
    (`write_kv_pages`). Rows from query_start_loc[B] to N are padding and come back 0.

    Args:
      q: [N, H, D] flat queries; H a multiple of K.
      k_pages, v_pages: [P, page_size, K, D] one layer's page pool.
      block_tables: [B, max_pages] int32.
      context_lens: [B] int32 keys per sequence including this step's tokens.
      query_start_loc: [B+1] int32 nondecreasing row offsets, query_start_loc[0] == 0.
      sm_scale: logit scale; defaults to 1/sqrt(D).
      soft_cap: if set, logits become soft_cap * tanh(logits / soft_cap).
      block_q: query tokens per program (power of 2); default block_rows // next_pow2(H/K).
      block_k: tokens per loop step, a power-of-2 multiple of page_size; default from tuning.
      num_warps, num_stages: Triton launch parameters; default from tuning.
      num_splits: split-K partitions of the decode kernel; default `tuning.decode_num_splits`.
      split_decodes: True: serve the sequences with q_len 1 by the split-K decode kernel (one
        launch over all B slots) and only the longer ones by the ragged kernel. False: one
        ragged launch serves all; a decode then reads its whole context in one program. "auto":
        True on the Triton backend; on the Mosaic one, decodes join the ragged launch when the
        step has a chunk (q_len > 1) to overlap them with and their context is at most
        `unified_max_context` (default `tuning.UNIFIED_DECODE_MAX_CONTEXT`), else split.
        "short": "auto" with the caller's word that the step has a chunk and that no
        sequence with q_len 1 has a context past `unified_max_context` (the engine knows both
        on the host). The Mosaic launch then serves every row, with no split-K launch beside
        it: "auto" cannot know this when tracing, so it always launches the decode kernel,
        idle or not, with a row gather and scatter (~8 us of a ~290 us mixed batch on an
        H200). A broken word costs speed, not correctness: a long decode is read by one CTA.
        "only": the caller promises a step of decodes only, laid out as the engine packs
        them: the first k slots have one query each, in rows 0..k-1 (query_start_loc[b] =
        min(b, k)), the other slots none. The decode kernel then reads q's rows as its slots
        and writes the output in place: no ragged launch, no gather or scatter of rows. Any
        other layout comes back wrong, so only a caller that planned the batch may say so.
      interpret: Pallas interpreter; None = interpret unless the backend is GPU.
      impl: "pallas"; "xla" (plain jnp in the input dtype, 32 rows at a time, each gathering
        its sequence's K/V); "reference" (the f32 spec: gathers [N, S, K, D] at once, tests only).
      backend: which kernel serves the items of impl="pallas": "triton" (`_ragged_kernel`),
        "mosaic" (the Hopper kernel of `hopper.py`: bf16/f16, D a multiple of 64 up to 256,
        pages a multiple of 8 tokens; interpret=True runs the Mosaic GPU interpreter; block_q,
        num_warps, num_stages do not apply, block_k is its block_kv) or "auto"
        (`tuning.ragged_backend`).

    Returns:
      [N, H, D] in q.dtype.
    """
    if q.ndim != 3:
        raise ValueError(f"q {q.shape} must be [num_tokens, num_heads, head_dim]")
    b = block_tables.shape[0] if block_tables.ndim == 2 else -1
    check_paged_inputs(
        q.shape[1], q.shape[2], q.shape, k_pages, v_pages, block_tables, context_lens, b
    )
    if tuple(query_start_loc.shape) != (b + 1,):
        raise ValueError(
            f"query_start_loc {tuple(query_start_loc.shape)} must be [{b + 1}] for block_tables "
            f"{block_tables.shape}"
        )
    if impl in ("reference", "xla"):
        dense = (
            ragged_paged_attention_reference if impl == "reference" else ragged_paged_attention_xla
        )
        return dense(
            q,
            k_pages,
            v_pages,
            block_tables,
            context_lens,
            query_start_loc,
            sm_scale=sm_scale,
            soft_cap=soft_cap,
        )
    if impl != "pallas":
        raise ValueError(f"impl={impl!r}; expected 'pallas', 'reference' or 'xla'")
    page_size, num_kv, d = k_pages.shape[1:]
    if backend not in ("auto", "triton", "mosaic"):
        raise ValueError(f"backend={backend!r}; expected 'auto', 'triton' or 'mosaic'")
    why_not = _mosaic_unsupported(q, k_pages)
    if backend == "mosaic" and why_not:
        raise ValueError(f"backend='mosaic' cannot run this call: {why_not}; use "
                         "backend='triton' (or 'auto', which picks it)")
    if split_decodes not in (True, False, "auto", "short", "only"):
        raise ValueError(f"split_decodes={split_decodes!r}; expected True, False, 'auto', "
                         "'short' or 'only'")
    interpret = resolve_interpret(interpret)
    if backend == "auto":  # a block_k the Hopper kernel cannot take picks Triton, no error
        hopper_block = block_k is None or block_k % 64 == 0
        backend = ("triton" if why_not or interpret or not hopper_block
                   else ragged_backend(d, q.dtype))
    if backend == "mosaic":
        hopper = hopper_config(d)
        if block_k is not None and (block_k % 64 and not interpret):
            raise ValueError(f"block_k {block_k}: the Hopper kernel's P V wgmma needs a "
                             "multiple of 64")
        if split_decodes == "short":
            split_decodes = False  # every row in the one launch
        elif split_decodes == "auto":
            split_decodes = ("auto", unified_max_context or UNIFIED_DECODE_MAX_CONTEXT)
        return _ragged_call(
            q, k_pages, v_pages, block_tables, context_lens, query_start_loc,
            sm_scale=d**-0.5 if sm_scale is None else float(sm_scale), soft_cap=soft_cap,
            block_q=hopper_tokens_per_item(q.shape[1], num_kv), block_k=block_k or hopper.block_kv,
            num_warps=0, num_stages=num_stages or hopper.stages, split_decodes=split_decodes,
            num_splits=num_splits, interpret=interpret, backend="mosaic",
        )
    cfg = paged_config(page_size, d, q.dtype)
    gp = pl.next_power_of_2(q.shape[1] // num_kv)
    block_q = block_q or max(1, cfg.block_rows // gp)
    block_k = block_k or cfg.ragged_block_k
    if block_q & (block_q - 1) or block_q * gp < 16:
        raise ValueError(
            f"block_q {block_q} must be a power of 2 with block_q * {gp} (padded group) >= 16"
        )
    if block_k % page_size or block_k & (block_k - 1):
        raise ValueError(
            f"block_k {block_k} must be a power-of-2 multiple of page_size {page_size}"
        )
    return _ragged_call(
        q,
        k_pages,
        v_pages,
        block_tables,
        context_lens,
        query_start_loc,
        sm_scale=d**-0.5 if sm_scale is None else float(sm_scale),
        soft_cap=soft_cap,
        block_q=block_q,
        block_k=block_k,
        num_warps=num_warps or cfg.num_warps,
        num_stages=num_stages or cfg.num_stages,
        # "auto" and "short" split on Triton; "only" passes through.
        split_decodes=split_decodes if split_decodes == "only" else split_decodes is not False,
        num_splits=num_splits,
        interpret=interpret,
        backend="triton",
    )


def _mosaic_unsupported(q: jax.Array, k_pages: jax.Array) -> str | None:
    """Why the Hopper ragged kernel cannot take this call, or None."""
    page_size, num_kv = k_pages.shape[1:3]
    if why := wgmma_unsupported(q.dtype, q.shape[-1]):
        return why
    if page_size % 8 or page_size & (page_size - 1):
        return f"page_size {page_size} (it needs a power of 2 of at least 8 tokens)"
    if pl.next_power_of_2(q.shape[1] // num_kv) > hopper_max_group():
        return f"{q.shape[1] // num_kv} query heads per kv head (at most {hopper_max_group()})"
    return None


@functools.partial(
    jax.jit,
    static_argnames=(
        "sm_scale",
        "soft_cap",
        "block_q",
        "block_k",
        "num_warps",
        "num_stages",
        "split_decodes",
        "num_splits",
        "interpret",
        "backend",
    ),
)
def _ragged_call(
    q,
    k_pages,
    v_pages,
    block_tables,
    context_lens,
    query_start_loc,
    *,
    sm_scale,
    soft_cap,
    block_q,
    block_k,
    num_warps,
    num_stages,
    split_decodes,
    num_splits,
    interpret,
    backend,
):
    """block_q: tokens per item; for backend "mosaic" block_k is the kernel's block_kv and
    num_stages its ring depth. split_decodes: True, False, "only" or ("auto", max_context)."""
    n, _, d = q.shape
    page_size = k_pages.shape[1]
    ctx_lens = jnp.clip(context_lens.astype(jnp.int32), 0, block_tables.shape[1] * page_size)
    qsl = query_start_loc.astype(jnp.int32)
    q_lens = qsl[1:] - qsl[:-1]  # [B]
    if split_decodes == "only":  # rows are slots: no ragged launch, no row gather or scatter
        m = min(n, block_tables.shape[0])
        out = paged_attention(
            q[:m], k_pages, v_pages, block_tables[:m], jnp.where(q_lens[:m] == 1, ctx_lens[:m], 0),
            sm_scale=sm_scale, soft_cap=soft_cap, num_splits=num_splits, interpret=interpret,
        )  # [m, H, D]; a slot with context 0 (no query) comes back 0
        return jnp.pad(out, ((0, n - m), (0, 0), (0, 0))) if n > m else out
    is_decode = None  # [B] the sequences the split-K decode kernel serves
    if isinstance(split_decodes, tuple):
        # Decodes overlap the chunks' compute inside one launch, but unsplit: a long context
        # would be one program's serial read, so those still go to the split-K kernel.
        has_chunk = jnp.any(q_lens > 1)
        is_decode = (q_lens == 1) & (~has_chunk | (ctx_lens > split_decodes[1]))
    elif split_decodes:
        is_decode = q_lens == 1
    row0, num_q, pos0, seq, ctx = ragged_schedule(qsl, ctx_lens, n, block_q, skip=is_decode)
    if backend == "mosaic":
        hopper = hopper_config(d)
        out = hopper_ragged_rows(
            q, k_pages, v_pages, block_tables, (row0, num_q, pos0, seq, ctx), qsl[-1],
            sm_scale=sm_scale,
            soft_cap=soft_cap, block_kv=block_k, stages=num_stages, pingpong=hopper.pingpong,
            interpret=interpret, tweaks=hopper.tweaks)
    else:
        out = _triton_rows(
            q, k_pages, v_pages, block_tables, (row0, num_q, pos0, seq, ctx), qsl[-1],
            sm_scale=sm_scale, soft_cap=soft_cap, block_q=block_q, block_k=block_k,
            num_warps=num_warps, num_stages=num_stages, interpret=interpret)
    if is_decode is None:
        return out
    # Decode rows: one split-K launch over all B slots, the others given context 0 (no reads).
    q_dec = q[jnp.clip(qsl[:-1], 0, n - 1)]  # [B, H, D] each slot's first (only) query
    o_dec = paged_attention(
        q_dec, k_pages, v_pages, block_tables, jnp.where(is_decode, ctx_lens, 0),
        sm_scale=sm_scale, soft_cap=soft_cap, num_splits=num_splits, interpret=interpret,
    )  # [B, H, D]
    # Non-decode slots scatter to row n: out of range, dropped.
    return out.at[jnp.where(is_decode, qsl[:-1], n)].set(o_dec, mode="drop")


def _triton_rows(q, k_pages, v_pages, block_tables, items, num_rows, *, sm_scale, soft_cap,
                 block_q, block_k, num_warps, num_stages, interpret):
    """The rows of `items` (`ragged_schedule`'s tuple) through `_ragged_kernel`: q [N, H, D] ->
    [N, H, D], rows from num_rows on 0."""
    row0, num_q, pos0, seq, ctx = items
    n, h, d = q.shape
    num_pages, page_size, num_kv, _ = k_pages.shape
    group = h // num_kv
    gp = pl.next_power_of_2(group)
    tables = pad_block_tables(block_tables, block_k // page_size)[seq]  # [W, max_pages_pad]
    # [N, H, D] -> [N + block_q, K, Gp, D]: the tail pad keeps every item's block_q-row load
    # and store in bounds.
    qg = jnp.pad(q.reshape(n, num_kv, group, d), ((0, block_q), (0, 0), (0, gp - group), (0, 0)))

    kernel = functools.partial(
        _ragged_kernel,
        sm_scale=sm_scale,
        soft_cap=soft_cap,
        block_q=block_q,
        block_k=block_k,
        page_size=page_size,
    )
    item = pl.BlockSpec((None,), lambda wi, ki: (wi,))
    rows_spec = pl.BlockSpec((qg.shape[0], None, gp, d), lambda wi, ki: (0, ki, 0, 0))
    pool_spec = pl.BlockSpec((num_pages * page_size, None, d), lambda wi, ki: (0, ki, 0))
    out = pl.pallas_call(
        kernel,
        grid=(row0.shape[0], num_kv),
        in_specs=[
            item,
            item,
            item,
            item,
            pl.BlockSpec((None, tables.shape[1]), lambda wi, ki: (wi, 0)),
            rows_spec,
            pool_spec,
            pool_spec,
        ],
        out_specs=rows_spec,
        out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="ragged_paged_attention",
    )(row0, num_q, pos0, ctx, tables, qg, token_rows(k_pages), token_rows(v_pages))
    out = out[:n, :, :group].reshape(n, h, d)
    # Rows no item wrote (padding after query_start_loc[B]) are uninitialized: zero them.
    used = jnp.arange(n) < num_rows
    return jnp.where(used[:, None, None], out, jnp.zeros_like(out))
