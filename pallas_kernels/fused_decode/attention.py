"""Decode attention for the fused step: one kernel writes the new K/V and attends, split-K.

Why a kernel of its own. The fused step first called the general path's paged decode kernel
over the dense cache. Around that kernel XLA ran ~7 more per layer: the K and V scatters (with
their selects), q's pad to 16 rows, the block-table iota, a convert, and the split combine.
On the SmolLM2 shape those neighbours cost about as much as the attention itself, ~6.5 us per
layer (benchmarks/fused_decode_h200.md). Here one kernel takes the step's qkv straight from
`qkv_rope`:

- the program of split 0 stores the token's K and V into its cache slot (the cache is aliased
  to the output, so nothing else moves);
- every program attends over its share of the past slots [0, position), read where they lie in
  the [B, S, K, D] cache: no block table, no gather;
- the new token takes part from registers (split 0 seeds its softmax with it), so no program
  reads the slot being written;
- each split leaves a normalized partial and its log-sum-exp; the O projection's prologue
  (`kernel.attn_o_residual`) merges them, so the combine costs no kernel of its own.

Grid: (rows, kv heads, splits). A program holds its kv head's G query heads as one
16-row tensor-core tile (rows past G masked) and walks blocks of `block_k` slots. The splits
share the row's past slots evenly whatever its length, as the paged kernel's do.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.flash_attention.kernel import (
    MASK_VALUE,
    dot_nt,
    online_softmax_step,
    scale_logits,
)
from pallas_kernels.flash_attention.tuning import resolve_interpret
from pallas_kernels.fused_decode.kernel import O_LARGE_TILES, default_tiles, whole_block
from pallas_kernels.fused_decode.reference import merge_splits
from pallas_kernels.paged_attention.kernel import split_blocks

f32 = jnp.float32
BLOCK_K = 64  # cache slots per loop step; the dense cache's length is a multiple of 64
MAX_SPLITS = 16
# Bytes of partials the O projection's programs re-read in all, at most (see default_splits).
MERGE_BUDGET = 20 << 20
# The hand-pipelined past loop (`attend_past_prefetched`) for decode_attention calls that do
# not say: off until a card times it. Compiled for sm_90a (triton 3.9), the default launch's
# K/V rings have one slot and each iteration waits for all copies (`deviceless.pipelining`),
# so no program overlaps its loads with its math. (At 3 stages Triton double-buffers them;
# timed at batch 64 of the 1B shape that was 1.5% faster, within the spread, stop 36 in
# benchmarks/fused_decode_h200.md: expect little there.) The A/B:
#   OUT=$OUT FILE=pallas_kernels/fused_decode/attention.py SED='s|^PREFETCH = False|PREFETCH
#   = True|' MODELS=llama-3.2-1b BATCH=64 IMPL=auto bash scripts/gpu_ab.sh
PREFETCH = False


def default_splits(max_len: int, rows: int = 1, hidden: int = 0, heads_dim: int = 0,
                   block_k: int = BLOCK_K) -> int:
    """Splits per (row, kv head), a power of two: as many as pay, by two costs.

    - Few programs: a step of a few rows has only rows x kv heads programs without splits
      (3 for SmolLM2 at batch 1), each walking the whole context alone: up to one split
      per block of a full cache.
    - The merge: every program of the O projection (`kernel.attn_o_residual`: hidden / 4
      of them on the CUDA-core path at 1-2 rows, hidden / 2 at MULTI_ROW_MIN..FMA_MAX_ROWS,
      hidden / 16 on tensor-core tiles past that, as `kernel.default_tiles` gives its
      columns) re-reads every row's
      partials, ~4 bytes x heads_dim per split. MERGE_BUDGET bounds that traffic (hidden
      and heads_dim 0: unbounded).

    On the H200 at 600 tokens of context in 1024 slots (benchmarks/fused_decode_h200.md, run
    8), attention + O per layer ranked 8 splits best on the SmolLM2 shape (15.6 us against
    21.6 at 4 and 19.8 at 16) and left 2-16 within 29-33 us on the Llama-3.2-1B shape, where
    run 7 (lse per element, twice the merge traffic) had 4 best. The rule then gave a split
    two blocks of a full cache, so the Generator's 768-slot cache of a 512-token prompt got 4
    splits. By device time on an H100 (2026-12-05, stop 45) the SmolLM2 pair ran 7.39 / 6.75
    / 6.52 us at 4 / 8 / 16 splits, and one split per block won in the model: the bare decode
    loop's device us per step 488.2 / 488.6 against 511.2 / 511.7 (8 vs 4 splits, 768 slots;
    Generator 1960 / 1958 against 1871 / 1875 tok/s) and 517.3 against 524.1 (16 vs 8, 1280
    slots); `scripts/gpu_ab.sh`, benchmarks/fused_decode_h200.md. The 1B shape stays at 4
    (MERGE_BUDGET).
    """
    ns = min(MAX_SPLITS, max(1, max_len // block_k))
    programs = hidden // default_tiles(heads_dim, rows, True, hidden, large=O_LARGE_TILES
                                       ).block_n if hidden else 0
    merge_per_split = programs * 4 * heads_dim * rows
    if merge_per_split:
        ns = min(ns, max(1, MERGE_BUDGET // merge_per_split))
    return 1 << (ns.bit_length() - 1)


def cache_lead(layer) -> tuple:
    """The index before a row's in a cache ref: () for one layer's [B, S, K, D] buffer,
    (layer,) for the stacked [L, B, S, K, D] one, which every layer's call takes whole and
    updates in place. Why stacked: each buffer is a leaf of the loop state that every call of
    the Generator's loop donates, ~8.5 us of host time apiece on an H100 (60 for SmolLM2's 30
    layers; benchmarks/fused_decode_h200.md, stop 49). layer: the int32 scalar the kernel
    read from its layer operand (`on_layer`), so that one compiled kernel serves every
    layer: as a constant of the kernel, each layer's call compiled as a kernel of its own,
    1-4 s more per Generator compile on an H200 (stop 50). As the operand, an H100 compiled
    the Generator 1.5-4 s faster for SmolLM2 at ~0.7% more step time (the scalar load ahead
    of the first cache address), the 1B's step unchanged (stop 51). Triton lowers one indexer
    per load, so the layer joins the row's index rather than a `.at` view."""
    return () if layer is None else (jnp.asarray(layer, jnp.int32),)


def on_layer(kernel, inputs: tuple, aliases: dict, layer) -> tuple:
    """(kernel, inputs, input_output_aliases) of a pallas_call over layer `layer` (an int or
    int32 scalar) of a stacked cache: the layer goes first as a [1] int32 operand, whose value
    the wrapped kernel passes to `kernel` as `layer` (see `cache_lead`), so every input and
    each alias shifts by one. Unchanged where layer is None (one layer's buffers)."""
    if layer is None:
        return kernel, inputs, aliases

    def run(layer_ref, *refs):
        kernel(*refs, layer=layer_ref[0])
    return (run, (jnp.asarray(layer, jnp.int32).reshape(1), *inputs),
            {i + 1: o for i, o in aliases.items()})


def check_cache(k_cache, v_cache, layer, name: str) -> tuple:
    """(B, S, K, D) of one layer's cache: k_cache [B, S, K, D], or [L, B, S, K, D] with
    0 <= layer < L (checked where layer is a Python int; a traced one is not seen)."""
    want = 4 if layer is None else 5
    if k_cache.ndim != want or k_cache.shape != v_cache.shape or (
            isinstance(layer, int) and not 0 <= layer < k_cache.shape[0]):
        raise ValueError(f"{name}: k_cache {k_cache.shape} and v_cache {v_cache.shape} must be "
                         "one layer's [B, S, K, D], or [L, B, S, K, D] with 0 <= layer < L "
                         f"(layer={layer})")
    return k_cache.shape[-4:]


def check_rope(rope, rows: int, head_dim: int, name: str) -> None:
    """An optional rope table (`rope_table`) must be [rows, 2, head_dim]: one per query row."""
    if rope is not None and rope.shape != (rows, 2, head_dim):
        raise ValueError(f"{name}: rope {rope.shape} must be [B, 2, D] = [{rows}, 2, "
                         f"{head_dim}] (`rope_table` of the rows' cos and sin)")


def attend_past(kc_ref, vc_ref, b, kv, q, carry, past, split, *, block_k: int, num_splits: int,
                sm_scale: float, layer: int | None = None, prefetch: bool = False):
    """The online softmax `carry` (acc [M, D], m [M], l [M] f32) of queries q [M, D] taken over
    split `split`'s share of row b's past slots [0, past), kv head kv, read where they lie in
    the [B, S, K, D] cache (or layer `layer` of an [L, B, S, K, D] one). Masked lanes are not
    read: no slot at or past `past` is loaded. prefetch: `attend_past_prefetched`'s loop."""
    lo, full_hi, hi = split_blocks(past, block_k, split, num_splits)
    lead = cache_lead(layer)
    if prefetch:
        return attend_past_prefetched(kc_ref, vc_ref, (*lead, b), kv, q, carry, past, lo, hi,
                                      block_k=block_k, sm_scale=sm_scale)

    def body(j, carry, masked):
        at = (*lead, b, pl.ds(j * block_k, block_k), kv, slice(None))
        if masked:
            valid = j * block_k + jnp.arange(block_k) < past  # [block_k]
            k = plgpu.load(kc_ref.at[at], mask=valid[:, None], other=0)
            v = plgpu.load(vc_ref.at[at], mask=valid[:, None], other=0)
        else:
            k = kc_ref[at]  # [block_k, D]
            v = vc_ref[at]
        s = scale_logits(dot_nt(q, k), sm_scale, None)  # [M, block_k]
        mask = jnp.broadcast_to(valid[None, :], s.shape) if masked else None
        return online_softmax_step(carry, s, v, mask)

    carry = jax.lax.fori_loop(lo, full_hi, functools.partial(body, masked=False), carry)
    return jax.lax.fori_loop(full_hi, hi, functools.partial(body, masked=True), carry)


def attend_past_prefetched(kc_ref, vc_ref, row, kv, q, carry, past, lo, hi, *, block_k: int,
                           sm_scale: float):
    """`attend_past` over blocks [lo, hi) with block j + 1's K and V loads issued before
    block j's math: a software pipeline through registers (the paged kernel's
    `paged_attention.kernel.attend_prefetched`, over the dense cache: no table).

    row: the cache index before the slot axis ((b,) or (layer, b)). A load's registers are
    read in the next iteration only, so the warp runs this block's math while they are in
    flight. Slots at or past `past`, and the block after the last, are masked off the load
    (nothing is read); their logits are masked and their V is 0. Run with num_stages=1.
    """
    slots = kc_ref.shape[-3]

    def load(j):  # [block_k, D] each; the block start stays in the cache (a masked block)
        valid = (j * block_k + jnp.arange(block_k) < past) & (j < hi)
        at = (*row, pl.ds(jnp.minimum(j * block_k, slots - block_k), block_k), kv,
              slice(None))
        return (plgpu.load(kc_ref.at[at], mask=valid[:, None], other=0),
                plgpu.load(vc_ref.at[at], mask=valid[:, None], other=0))

    def body(j, state):
        carry, k, v = state
        k_next, v_next = load(j + 1)  # in flight during this block's math below
        s = scale_logits(dot_nt(q, k), sm_scale, None)  # [M, block_k]
        valid = j * block_k + jnp.arange(block_k) < past  # [block_k]
        carry = online_softmax_step(carry, s, v, jnp.broadcast_to(valid[None, :], s.shape))
        return carry, k_next, v_next

    return jax.lax.fori_loop(lo, hi, body, (carry, *load(lo)))[0]


def split_output(acc, m, l):
    """A split's normalized output [M, D] and base-2 log-sum-exp [M]: o = 0 and lse =
    MASK_VALUE where the split saw no key, which gives it weight 0 in the merge."""
    seen = l > 0  # [M]
    o = acc / jnp.where(seen, l, 1.0)[:, None]
    lse = jnp.where(seen, m + jnp.log2(jnp.where(seen, l, 1.0)), MASK_VALUE)
    return o, lse


def check_parts_dtype(parts_dtype: str | None, splits: int) -> None:
    """Only one split's output may leave in the model dtype: partials that are merged stay
    f32 (a rounded partial would round the output twice)."""
    if parts_dtype is not None and splits > 1 and jnp.dtype(parts_dtype) != f32:
        raise ValueError(f"parts_dtype={parts_dtype} with {splits} splits: partials that are "
                         "merged stay f32 (a rounded partial would round the output twice); "
                         "pass num_splits=1 or leave parts_dtype unset")


def single_split_dtype(splits: int, dtype) -> str | None:
    """The `parts_dtype` a caller that wants its output in `dtype` asks for: `dtype` when one
    split (no merge, so no convert kernel after the attention kernel), else None (f32
    partials, merged by `merged_output`)."""
    return jnp.dtype(dtype).name if splits == 1 else None


def merged_output(parts: jax.Array, lse: jax.Array, dtype) -> jax.Array:
    """The attention output [B, H * D] in `dtype` from a decode kernel's (parts, lse): one
    split's part as it left the kernel, else `reference.merge_splits` of the partials."""
    out = parts[:, 0] if parts.shape[1] == 1 else merge_splits(parts, lse)
    return out.astype(dtype)


def rope_table(cos: jax.Array, sin: jax.Array) -> jax.Array:
    """[B, 2, D] f32 from RoPE's tables cos, sin [B, D/2] (`layers.rope_tables`): row 0
    [cos, cos], row 1 [-sin, sin], so that rope(x) = x * row 0 + rotate(x) * row 1, where
    rotate(x) swaps x's halves (`_roped`)."""
    cos, sin = cos.astype(f32), sin.astype(f32)
    return jnp.stack([jnp.concatenate([cos, cos], -1), jnp.concatenate([-sin, sin], -1)], 1)


def _roped(x, x_swapped, cos, sin, dtype):
    """HF's rotate-half RoPE of x [..., D] in f32, given x with its halves swapped and a
    `rope_table`'s rows cos, sin [D], rounded to `dtype` as `layers.apply_rope` rounds it."""
    return (x.astype(f32) * cos + x_swapped.astype(f32) * sin).astype(dtype)


def query_group(qkv_ref, b, kv, *, num_heads: int, group: int, cache_dtype, rope_ref=None):
    """Row b's queries of kv head kv as one tensor-core tile, and the row's new K/V.

    qkv_ref [B, H + 2K, D], RoPE applied, or, with rope_ref ([B, 2, D] f32, `rope_table`),
    not yet: then the queries and the new key are rotated here, as `layers.apply_rope` does
    (f32, rounded to qkv's dtype), so that no kernel before this one has to. Returns q [Gp, D]
    (Gp = max(16, the group rounded up to a power of 2): tl.dot needs >= 16 rows; rows past
    the group are 0), heads [Gp] bool (the group's real query heads), and k_new, v_new [D] in
    the cache's dtype, as it will hold them."""
    K = (qkv_ref.shape[1] - num_heads) // 2
    gp = max(16, pl.next_power_of_2(group))
    heads = jnp.arange(gp) < group  # [Gp]
    q = plgpu.load(qkv_ref.at[b, pl.ds(kv * group, gp), :], mask=heads[:, None],
                   other=0)  # [Gp, D]
    k_new = qkv_ref[b, num_heads + kv, :]  # [D]
    if rope_ref is not None:
        D = q.shape[1]
        # The halves swapped: a second load of the same row with its columns rotated by D/2
        # (an index array: Triton gathers it lane by lane from L1).
        swap = (jnp.arange(D) + D // 2) % D  # [D]
        head = jnp.minimum(kv * group + jnp.arange(gp), num_heads - 1)  # [Gp], in range
        q_swapped = plgpu.load(qkv_ref.at[b, head[:, None], swap[None, :]],
                               mask=heads[:, None], other=0)  # [Gp, D]
        cos, sin = rope_ref[b, 0, :], rope_ref[b, 1, :]  # [D] each
        q = _roped(q, q_swapped, cos, sin, q.dtype)
        k_new = _roped(k_new, qkv_ref[b, num_heads + kv, swap], cos, sin, k_new.dtype)
    v_new = qkv_ref[b, num_heads + K + kv, :].astype(cache_dtype)
    return q, heads, k_new.astype(cache_dtype), v_new


def seed_carry(q, k_new, v_new, split, sm_scale: float):
    """The online softmax's start (acc [Gp, D], m [Gp], l [Gp] f32): split 0 starts from the
    new token alone (m = its logit, l = 1, acc = its value), the others from nothing. The
    new token takes part from registers, so no program reads the slot being written. The
    logit is q . k_new in f32, like the dot's accumulation."""
    s_new = scale_logits(jnp.sum(q.astype(f32) * k_new.astype(f32)[None, :], axis=1),
                         sm_scale, None)  # [Gp]
    first = jnp.full(s_new.shape, split == 0)  # [Gp]
    acc0 = jnp.broadcast_to(v_new.astype(f32)[None, :], q.shape)  # [Gp, D]
    return (jnp.where(first[:, None], acc0, jnp.zeros_like(acc0)),
            jnp.where(first, s_new, jnp.full_like(s_new, MASK_VALUE)),
            jnp.where(first, jnp.ones_like(s_new), jnp.zeros_like(s_new)))


def store_split(o_ref, lse_ref, carry, heads, b, kv, split, *, num_heads: int, group: int,
                num_splits: int):
    """A split's normalized output and lse into o_ref [B, splits, H * D] (f32, or the model
    dtype for a single split that no merge reads) and lse_ref [B * splits * H] f32, the
    layouts the O projection's merge reads."""
    o, lse = split_output(*carry)
    o = o.astype(o_ref.dtype)
    D = o.shape[1]
    head = kv * group + jnp.arange(o.shape[0])  # [Gp]
    cols = head[:, None] * D + jnp.arange(D)[None, :]  # [Gp, D]: each row's head's columns
    plgpu.store(o_ref.at[b, split, cols], o, mask=jnp.broadcast_to(heads[:, None], o.shape))
    plgpu.store(lse_ref.at[(b * num_splits + split) * num_heads + head], lse, mask=heads)


def _attn_kernel(pos_ref, qkv_ref, kc_ref, vc_ref, o_ref, lse_ref, kc_out, vc_out, *,
                 num_heads: int, group: int, block_k: int, num_splits: int, sm_scale: float,
                 item=None, layer: int | None = None, rope_ref=None, prefetch: bool = False):
    """qkv_ref [B, H + 2K, D]; o_ref [B, splits, H * D] and lse_ref [B * splits * H] f32,
    the layouts the O projection's merge reads. item: (row, kv head, split) when a persistent
    kernel runs this (`layer`), else the program's ids. layer: see `cache_lead`. rope_ref:
    see `query_group`."""
    if item is None:
        b, kv, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    else:
        b, kv, split = item
    lead = cache_lead(layer)
    S = kc_ref.shape[-3]
    pos = pos_ref[b]
    past = jnp.minimum(pos, S)  # slots [0, past) hold the row's earlier tokens
    q, heads, k_new, v_new = query_group(qkv_ref, b, kv, num_heads=num_heads, group=group,
                                         cache_dtype=kc_ref.dtype, rope_ref=rope_ref)

    # A position past the buffer writes nothing (the XLA path's mode="drop").
    @pl.when((split == 0) & (pos < S))
    def _():
        kc_out[(*lead, b, pos, kv, slice(None))] = k_new
        vc_out[(*lead, b, pos, kv, slice(None))] = v_new

    carry = attend_past(kc_ref, vc_ref, b, kv, q, seed_carry(q, k_new, v_new, split, sm_scale),
                        past, split, block_k=block_k, num_splits=num_splits, sm_scale=sm_scale,
                        layer=layer, prefetch=prefetch)
    store_split(o_ref, lse_ref, carry, heads, b, kv, split, num_heads=num_heads, group=group,
                num_splits=num_splits)


def taking_rope(kernel, num_inputs: int):
    """A kernel taking a rope table (`query_group`'s rope_ref) after its `num_inputs` inputs:
    its refs (*inputs, rope, *outputs), the table passed on as `rope_ref`. After the inputs, so
    the caches' aliases stand."""
    def run(*refs, **kw):
        kernel(*refs[:num_inputs], *refs[num_inputs + 1:], rope_ref=refs[num_inputs], **kw)
    return run


def decode_attention(qkv, k_cache, v_cache, positions, *, layer=None, rope=None,
                     prefetch: bool | None = None, **kw):
    """`_decode_attention`, with a Python int `layer` checked against the stacked cache
    first (inside the jit it is an operand, whose value the checks do not see), and
    prefetch=None read as PREFETCH here, outside the jit: a static argument, so a changed
    PREFETCH compiles anew instead of hitting the jit's cache."""
    check_cache(k_cache, v_cache, layer, "decode_attention")
    prefetch = PREFETCH if prefetch is None else bool(prefetch)
    return _decode_attention(qkv, k_cache, v_cache, positions, layer, rope, prefetch=prefetch,
                             **kw)


@functools.partial(jax.jit, static_argnames=("num_heads", "num_kv_heads", "num_splits",
                                             "block_k", "num_warps", "num_stages", "interpret",
                                             "parts_dtype", "prefetch"))
def _decode_attention(qkv, k_cache, v_cache, positions, layer=None, rope=None, *,
                      num_heads: int,
                      num_kv_heads: int, num_splits: int | None = None, block_k: int = BLOCK_K,
                      num_warps: int = 4, num_stages: int | None = None,
                      interpret: bool | None = None, parts_dtype: str | None = None,
                      prefetch: bool = False):
    """One query per row against its dense cache, with the row's new K/V written in place.

    Args:
      qkv: [B, (H + 2K) * D] this step's queries, keys and values, RoPE applied (`qkv_rope`),
        or, with `rope`, not yet.
      k_cache, v_cache: [B, S, K, D] one layer's cache, qkv's dtype; S a multiple of block_k.
        Or, with `layer` (an int or int32 scalar, an operand of the kernel: one compiled
        kernel for every layer), the stacked [L, B, S, K, D] cache, of which this call reads
        and writes layer `layer` only. Aliased to the outputs: inside a jit that owns them (the
        decode step does) the update is in place, otherwise XLA copies them first.
      positions: [B] int32 slot of each row's token; slots [0, position) are its past.
      rope: optional [B, 2, D] f32 (`rope_table`): the kernel rotates the queries and the new
        key itself (f32, rounded to qkv's dtype, as `layers.apply_rope`), so that qkv can be
        the QKV projection's output as it is: the general path's step at many rows otherwise
        runs a kernel per layer that applies RoPE and packs q, k and v for this one.
      num_splits: split-K partitions per (row, kv head); default `default_splits(S, B)`
        (the fused step passes the model's sizes too).
      prefetch: the past loop pipelined by hand (`attend_past_prefetched`); `decode_attention`
        passes PREFETCH for None.
      num_stages: Triton's; default 2, or 1 with prefetch (nothing left to pipeline).
      parts_dtype: the partials' dtype, f32 by default. With one split the partial is the
        attention's output, and the general path rounds it to the model dtype: stored so, it
        needs no convert kernel after this one (one per layer of the general step at batch
        64, `pallas_dispatch.dense_decode_writing`). Partials that a merge reads stay f32.

    Returns:
      (parts, lse, k_cache, v_cache): parts [B, splits, H * D] f32 (or parts_dtype), each
      split's normalized output; lse [B, splits, H] f32, each head's base-2 log-sum-exp in
      it (MASK_VALUE where a split saw no key). Merge with `reference.merge_splits` or,
      fused with the O projection, `kernel.attn_o_residual`.
    """
    b, n = qkv.shape
    rows, S, K, D = check_cache(k_cache, v_cache, layer, "decode_attention")
    H = num_heads
    if K != num_kv_heads or n != (H + 2 * K) * D:
        raise ValueError(f"qkv {qkv.shape} must be [B, (H + 2K) * D] for H={H} heads and the "
                         f"cache's K={K}, D={D} (k_cache {k_cache.shape}, v_cache "
                         f"{v_cache.shape}, num_kv_heads={num_kv_heads})")
    check_rope(rope, b, D, "decode_attention")
    if H % K or S % block_k or rows != b or k_cache.dtype != qkv.dtype:
        raise ValueError(f"decode_attention: heads {H} must be a multiple of kv heads {K}, the "
                         f"cache {k_cache.shape} {k_cache.dtype} must have qkv's rows {b} and "
                         f"dtype {qkv.dtype} and a length that block_k={block_k} divides")
    splits = num_splits or default_splits(S, b, block_k=block_k)
    check_parts_dtype(parts_dtype, splits)
    num_stages = num_stages or (1 if prefetch else 2)
    kernel = functools.partial(_attn_kernel, num_heads=H, group=H // K, block_k=block_k,
                               num_splits=splits, sm_scale=D ** -0.5, prefetch=prefetch)
    inputs = (positions.astype(jnp.int32), qkv.reshape(b, H + 2 * K, D), k_cache, v_cache)
    if rope is not None:  # after the caches, so the aliases stand
        kernel, inputs = taking_rope(kernel, len(inputs)), (*inputs, rope.astype(f32))
    kernel, inputs, aliases = on_layer(kernel, inputs, {2: 2, 3: 3}, layer)
    out_shape = (jax.ShapeDtypeStruct((b, splits, H * D), parts_dtype or f32),
                 jax.ShapeDtypeStruct((b * splits * H,), f32),
                 jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                 jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype))
    parts, lse, k_cache, v_cache = pl.pallas_call(
        kernel,
        grid=(b, K, splits),
        in_specs=[whole_block(a) for a in inputs],
        out_specs=[whole_block(s) for s in out_shape],
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=resolve_interpret(interpret),
        name="decode_attention",
    )(*inputs)
    return parts, lse.reshape(b, splits, H), k_cache, v_cache
