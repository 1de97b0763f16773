"""Attention of a block of new tokens per row, for the fused verify step: one kernel writes the
block's K/V and attends, split-K.

Why. Speculative methods score T tokens of a row per step (a draft chain, or a tree of
candidates). The fused decode step (`attention.decode_attention`) takes one token per row, so
their verify steps ran the general forward, ~18 kernels per layer, and at batch 1 on the H200
every method lost to plain decoding once that got its fused step
(benchmarks/all_methods_b1_h200.md). This kernel is the attention of a fused step over B rows
of T tokens each, whose GEMVs see B x T rows.

What a query sees, per row b:

- the committed cache, slots [0, past[b]), read where they lie in the [B, S, K, D] cache;
- the block's own keys u where vis[b, t, u]: they take part from the step's qkv, so no
  program reads a slot being written. The caller builds vis: causal order for a chain, a
  tree's ancestors, and only the last of several tokens written to one slot (what the
  general path's cache would hold).

The program of (row, kv head, query block 0, split 0) stores the block's K/V at their slots
(nothing past the buffer, as the general path's mode="drop"; of tokens sharing a slot, the
last: `reference.last_writers`). Every slot it writes is >= past, which no program reads.

Grid: (rows, kv heads, query blocks, splits). A row's T x G queries of one kv head (token
major: query r is token r // G, head r % G) form tiles of up to 64 rows; the splits share the
past slots as in `decode_attention`, and split 0 of each query block seeds its softmax with
the block's keys. Outputs are laid out as the O projection's merge reads them, one row per
token (`kernel.attn_o_residual`).
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
from pallas_kernels.fused_decode.attention import (
    BLOCK_K,
    attend_past,
    cache_lead,
    check_cache,
    default_splits,
    on_layer,
    split_output,
)
from pallas_kernels.fused_decode.kernel import MAX_ROWS, whole_block

f32 = jnp.float32
MAX_QUERY_ROWS = 64  # query rows (tokens x heads of a group) per program tile


def query_tile(tokens: int, group: int) -> tuple[int, int]:
    """(rows per program tile, tiles per (row, kv head)) for T tokens of G heads each: a power
    of two of 16 (tl.dot's least) to MAX_QUERY_ROWS rows."""
    rows = tokens * group
    tile = min(MAX_QUERY_ROWS, max(16, pl.next_power_of_2(rows)))
    return tile, -(-rows // tile)


def _block_kernel(past_ref, slots_ref, vis_ref, qkv_ref, kc_ref, vc_ref, o_ref, lse_ref, kc_out,
                  vc_out, *, num_heads: int, group: int, tokens: int, tile: int, block_k: int,
                  num_splits: int, sm_scale: float, layer: int | None = None):
    """qkv_ref [B * T * (H + 2K) * D] flat; slots_ref [B * T], vis_ref [B * T * T] int32 flat;
    o_ref [B * T * splits * H * D] and lse_ref [B * T * splits * H] f32 flat (a row per token).
    Flat refs take [rows, cols] index arrays: each query row gathers its token's head."""
    b, kv, qb, split = (pl.program_id(i) for i in range(4))
    H, T, G = num_heads, tokens, group
    S, K, D = kc_ref.shape[-3:]
    lead = cache_lead(layer)
    width = (H + 2 * K) * D  # one token's qkv
    tp = max(16, pl.next_power_of_2(T))  # the block's keys as one dot tile

    # The program's query rows; rows past the T x G real ones repeat the last real row, so they
    # compute and store its very values. (Masking them instead would leave them addressing the
    # real rows, and the Pallas interpreter stores a masked lane's old value: a race.)
    r = jnp.minimum(qb * tile + jnp.arange(tile), T * G - 1)  # [tile]
    t = r // G  # [tile] each row's token
    head = kv * G + r % G  # [tile]
    d = jnp.arange(D)
    q = qkv_ref[((b * T + t) * width + head * D)[:, None] + d[None, :]]  # [tile, D], RoPE'd

    u = jnp.arange(tp)  # the block's tokens as keys
    u_real = u < T
    u_in = jnp.minimum(u, T - 1)  # [tp]: padding keys address the last token (masked)
    kv_cols = ((b * T + u_in) * width)[:, None] + d[None, :]  # [tp, D]
    k_blk = plgpu.load(qkv_ref.at[kv_cols + (H + kv) * D], mask=u_real[:, None], other=0)
    v_blk = plgpu.load(qkv_ref.at[kv_cols + (H + K + kv) * D], mask=u_real[:, None], other=0)

    # The block's K/V into their slots, by one program per (row, kv head). A slot past the
    # buffer takes nothing (the general path's mode="drop"). Unrolled, 8 tokens' loads ahead
    # of their guarded stores: independent loads can be in flight together, where a loop
    # would wait out each one's latency in turn (8 bounds the registers they hold).
    def load(i):  # token i's slot and its K and V, [D] each
        src = (b * T + i) * width + (H + kv) * D
        return slots_ref[b * T + i], qkv_ref[pl.ds(src, D)], qkv_ref[pl.ds(src + K * D, D)]

    # Of tokens sharing a slot only the last stores (a clamped draft window repeats slot 0):
    # one store per slot, so which one lands does not depend on the order the stores of
    # different warps reach memory.
    row_slots = plgpu.load(slots_ref.at[b * T + u_in], mask=u_real, other=-1)  # [tp]

    def store(i, slot, k_i, v_i):
        # (a sum, not jnp.any: Pallas Triton does not lower reduce_or)
        last = jnp.sum(((row_slots == slot) & (u > i)).astype(jnp.int32)) == 0

        @pl.when((slot < S) & last)
        def _():
            kc_out[(*lead, b, slot, kv, slice(None))] = k_i
            vc_out[(*lead, b, slot, kv, slice(None))] = v_i

    @pl.when((qb == 0) & (split == 0))
    def _():
        for first in range(0, T, 8):
            tokens = range(first, min(T, first + 8))
            for i, token in zip(tokens, [load(i) for i in tokens], strict=True):
                store(i, *token)

    # Split 0 seeds its softmax with the block's visible keys; the other splits start empty.
    # Every real query sees at least itself, so split 0 leaves it l > 0.
    empty = (jnp.zeros((tile, D), f32), jnp.full((tile,), MASK_VALUE, f32),
             jnp.zeros((tile,), f32))
    seen_u = plgpu.load(vis_ref.at[((b * T + t) * T)[:, None] + u_in[None, :]],
                        mask=jnp.broadcast_to(u_real[None, :], (tile, tp)),
                        other=0) != 0  # [tile, tp]
    s_blk = scale_logits(dot_nt(q, k_blk), sm_scale, None)  # [tile, tp]
    seeded = online_softmax_step(empty, s_blk, v_blk, seen_u & (split == 0))

    past = jnp.minimum(past_ref[b], S)  # slots [0, past) hold the row's committed tokens
    acc, m, l = attend_past(kc_ref, vc_ref, b, kv, q, seeded, past, split, block_k=block_k,
                            num_splits=num_splits, sm_scale=sm_scale, layer=layer)
    o, lse = split_output(acc, m, l)
    out_row = (b * T + t) * num_splits + split  # [tile]
    o_ref[(out_row * H + head)[:, None] * D + d[None, :]] = o
    lse_ref[out_row * H + head] = lse


def block_attention(qkv, k_cache, v_cache, slots, past, vis, *, layer=None, **kw):
    """`_block_attention`, with a Python int `layer` checked against the stacked cache first
    (inside the jit it is an operand, whose value the checks do not see)."""
    check_cache(k_cache, v_cache, layer, "block_attention")
    return _block_attention(qkv, k_cache, v_cache, slots, past, vis, layer, **kw)


@functools.partial(jax.jit, static_argnames=("num_heads", "num_kv_heads", "num_splits",
                                             "block_k", "num_warps", "num_stages", "interpret"))
def _block_attention(qkv, k_cache, v_cache, slots, past, vis, layer=None, *, num_heads: int,
                     num_kv_heads: int, num_splits: int | None = None, block_k: int = BLOCK_K,
                     num_warps: int = 4, num_stages: int = 2, interpret: bool | None = None):
    """T new tokens per row against the row's committed cache and each other, with the tokens'
    K/V written in place.

    Args:
      qkv: [B * T, (H + 2K) * D] the step's queries, keys and values, token-major per row,
        RoPE applied (`qkv_rope` over B * T rows).
      k_cache, v_cache: [B, S, K, D] one layer's cache, qkv's dtype; S a multiple of block_k.
        Or, with `layer`, the stacked [L, B, S, K, D] cache (`attention.cache_lead`). Aliased
        to the outputs (in place inside a jit that owns them).
      slots: [B, T] int32, the slot each token's K/V goes to (>= past; past the buffer: none;
        of tokens sharing a slot, the last's).
      past: [B] int32, the row's committed slots [0, past) every token sees.
      vis: [B, T, T] bool, token t sees the K/V of token u (itself included).
      num_splits: split-K partitions of the past; default `default_splits(S, B * T)`.

    Returns:
      (parts, lse, k_cache, v_cache): parts [B * T, splits, H * D] f32, each split's normalized
      output per token; lse [B * T, splits, H] f32 (base 2, MASK_VALUE where a split saw no
      key). Merge as `decode_attention`'s (`kernel.attn_o_residual`).
    """
    b, T = slots.shape
    rows, S, K, D = check_cache(k_cache, v_cache, layer, "block_attention")
    H = num_heads
    if (qkv.shape != (b * T, (H + 2 * K) * D) or K != num_kv_heads
            or past.shape != (b,) or vis.shape != (b, T, T)):
        raise ValueError(f"block_attention: qkv {qkv.shape} must be [B * T, (H + 2K) * D] for "
                         f"slots {slots.shape} = [B, T], H={H} and the cache's K={K}, D={D} "
                         f"(num_kv_heads={num_kv_heads}, v_cache {v_cache.shape}); past "
                         f"{past.shape} must be [B] and vis {vis.shape} [B, T, T]")
    if H % K or S % block_k or rows != b or k_cache.dtype != qkv.dtype:
        raise ValueError(f"block_attention: heads {H} must be a multiple of kv heads {K}, the "
                         f"cache {k_cache.shape} {k_cache.dtype} must have {b} rows, qkv's "
                         f"dtype {qkv.dtype} and a length that block_k={block_k} divides")
    if b * T > MAX_ROWS:
        raise ValueError(f"block_attention: {b} rows x {T} tokens exceed the fused step's "
                         f"{MAX_ROWS} rows: verify larger blocks through the general forward")
    splits = num_splits or default_splits(S, b * T, block_k=block_k)
    tile, q_blocks = query_tile(T, H // K)
    kernel = functools.partial(_block_kernel, num_heads=H, group=H // K, tokens=T, tile=tile,
                               block_k=block_k, num_splits=splits, sm_scale=D ** -0.5)
    inputs = (past.astype(jnp.int32), slots.reshape(-1).astype(jnp.int32),
              vis.reshape(-1).astype(jnp.int32), qkv.reshape(-1), k_cache, v_cache)
    kernel, inputs, aliases = on_layer(kernel, inputs, {4: 2, 5: 3}, layer)
    out_shape = (jax.ShapeDtypeStruct((b * T * splits * H * D,), f32),
                 jax.ShapeDtypeStruct((b * T * splits * H,), f32),
                 jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                 jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype))
    parts, lse, k_cache, v_cache = pl.pallas_call(
        kernel,
        grid=(b, K, q_blocks, splits),
        in_specs=[whole_block(a) for a in inputs],
        out_specs=[whole_block(s) for s in out_shape],
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=resolve_interpret(interpret),
        name="block_attention",
    )(*inputs)
    return (parts.reshape(b * T, splits, H * D), lse.reshape(b * T, splits, H), k_cache,
            v_cache)
