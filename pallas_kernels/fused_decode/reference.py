"""Plain-jnp references of the fused decode GEMVs (`pallas_kernels.fused_decode.kernel`).

Each computes what its kernel computes in the model's own arithmetic: HF's RMSNorm, the
projection accumulated in f32 (at HIGHEST precision) and rounded to the model dtype, then RoPE
in f32, SwiGLU, or the residual add in the model dtype, as `jdecode.model` does them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

f32 = jnp.float32


def rms_norm_rows(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """HF RMSNorm of x [B, E] (f32 statistics, rounded, then scaled in x.dtype)."""
    xf = x.astype(f32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def _project(h: jax.Array, w: jax.Array) -> jax.Array:
    """h @ w accumulated in f32 at full precision, rounded to h's dtype."""
    return jnp.dot(h, w, preferred_element_type=f32,
                   precision=jax.lax.Precision.HIGHEST).astype(h.dtype)


def qkv_rope_reference(x, norm_w, wqkv, cos, sin, *, num_heads: int, num_kv_heads: int,
                       eps: float) -> jax.Array:
    """RMSNorm, the QKV projection, and RoPE on the Q and K heads (not V).

    Args:
      x: [B, E]. norm_w: [E]. wqkv: [E, (H + 2K) * D]. cos, sin: [B, D/2] f32.
    Returns:
      [B, (H + 2K) * D] in x.dtype.
    """
    H, K = num_heads, num_kv_heads
    b = x.shape[0]
    D = wqkv.shape[1] // (H + 2 * K)
    y = _project(rms_norm_rows(x, norm_w, eps), wqkv).reshape(b, H + 2 * K, D)
    t1, t2 = y[..., :D // 2].astype(f32), y[..., D // 2:].astype(f32)
    c, s = cos[:, None], sin[:, None]
    rotated = jnp.concatenate([t1 * c - t2 * s, t2 * c + t1 * s], -1).astype(x.dtype)
    y = jnp.concatenate([rotated[:, :H + K], y[:, H + K:]], axis=1)
    return y.reshape(b, -1)


def gate_up_swiglu_reference(x, norm_w, w_gate_up, *, eps: float) -> jax.Array:
    """silu(gate) * up of RMSNorm(x): x [B, E], w_gate_up [E, 2F] (gate first) -> [B, F]."""
    gate, up = jnp.split(_project(rms_norm_rows(x, norm_w, eps), w_gate_up), 2, axis=-1)
    return jax.nn.silu(gate) * up


def gemv_residual_reference(a, w, residual) -> jax.Array:
    """residual + a @ w with the product rounded first: a [B, K], w [K, N] -> [B, N]."""
    return residual + _project(a, w).astype(residual.dtype)


def merge_splits(parts: jax.Array, lse: jax.Array) -> jax.Array:
    """Split-K attention partials merged: parts [B, splits, H * D] (each split's normalized
    output) with lse [B, splits, H] (their heads' base-2 log-sum-exps) -> [B, H * D] f32."""
    lse = jnp.repeat(lse, parts.shape[2] // lse.shape[2], axis=2)  # [B, splits, H * D]
    w = jnp.exp2(lse - jnp.max(lse, axis=1, keepdims=True))
    return jnp.sum(w * parts, axis=1) / jnp.sum(w, axis=1)


def attn_o_residual_reference(parts, lse, w, residual) -> jax.Array:
    """residual + merge(parts, lse) @ w, the merged attention rounded to the model dtype."""
    return gemv_residual_reference(merge_splits(parts, lse).astype(residual.dtype), w, residual)


def decode_attention_reference(qkv, k_cache, v_cache, positions, *, num_heads: int,
                               num_kv_heads: int):
    """Each row's query against its past slots [0, position) and its own new K/V, in f32.

    Args:
      qkv: [B, (H + 2K) * D] RoPE'd. k_cache, v_cache: [B, S, K, D]. positions: [B] int32.
    Returns:
      (out [B, H * D] f32, k_cache, v_cache) with the new K/V stored at each row's position
      (nothing where it is past the buffer, as the XLA path's mode="drop").
    """
    b = qkv.shape[0]
    _, S, K, D = k_cache.shape
    H, G = num_heads, num_heads // num_kv_heads
    y = qkv.reshape(b, H + 2 * K, D)
    q, k_new, v_new = y[:, :H], y[:, H:H + K], y[:, H + K:]
    rows = jnp.arange(b)
    k_out = k_cache.at[rows, positions].set(k_new.astype(k_cache.dtype), mode="drop")
    v_out = v_cache.at[rows, positions].set(v_new.astype(v_cache.dtype), mode="drop")
    keys = jnp.concatenate([k_cache, k_new[:, None].astype(k_cache.dtype)], 1)  # [B, S+1, K, D]
    vals = jnp.concatenate([v_cache, v_new[:, None].astype(v_cache.dtype)], 1)
    visible = jnp.concatenate([jnp.arange(S)[None] < positions[:, None],
                               jnp.ones((b, 1), bool)], 1)  # [B, S+1]
    qg = q.reshape(b, K, G, D).astype(f32)
    s = jnp.einsum("bkgd,bskd->bkgs", qg, keys.astype(f32),
                   precision=jax.lax.Precision.HIGHEST) * D ** -0.5
    s = jnp.where(visible[:, None, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    out = jnp.einsum("bkgs,bskd->bkgd", p, vals.astype(f32), precision=jax.lax.Precision.HIGHEST)
    return out.reshape(b, H * D), k_out, v_out


def last_writers(slots: jax.Array) -> jax.Array:
    """[B, T] bool: whether token t is the last of its step's tokens written to its slot.

    Why: a clamped draft window (the n-gram drafter near a sequence's start) puts several
    tokens at slot 0, and XLA's scatter keeps an unspecified one of repeated indices (the
    CPU, the last). Compiled on an H200 (2026-12-05), the fused verify step's tests failed
    only in their cases with repeated slots, against references that scattered them all
    (benchmarks/verify_h200.md). Steps write only their last writers, so every backend
    keeps the same one: the general path's scatters (`jdecode.cache.dense.dense_attend`),
    `block_attention`'s stores and the visibility `jdecode.model.fused_decode.block_visibility`
    gives its queries.

    slots: [B, T] int32.
    """
    t = slots.shape[1]
    later = jnp.arange(t)[None, :] > jnp.arange(t)[:, None]  # [u, u']: u' comes after u
    return ~jnp.any((slots[:, :, None] == slots[:, None, :]) & later, axis=2)


def block_attention_reference(qkv, k_cache, v_cache, slots, past, vis, *, num_heads: int,
                              num_kv_heads: int):
    """T new tokens per row against the committed slots [0, past) and the block's own K/V
    (token t sees token u where vis[b, t, u]), in f32.

    Args:
      qkv: [B * T, (H + 2K) * D] RoPE'd, token-major per row. k_cache, v_cache: [B, S, K, D].
      slots: [B, T] int32 where each token's K/V go. past: [B] int32. vis: [B, T, T] bool.
    Returns:
      (out [B * T, H * D] f32, k_cache, v_cache) with the block's K/V stored at their slots
      (nothing past the buffer, as the XLA path's mode="drop").
    """
    b, T = slots.shape
    _, S, K, D = k_cache.shape
    H, G = num_heads, num_heads // num_kv_heads
    y = qkv.reshape(b, T, H + 2 * K, D)
    q, k_new, v_new = y[:, :, :H], y[:, :, H:H + K], y[:, :, H + K:]
    rows = jnp.arange(b)[:, None]
    # Of tokens sharing a slot the last is stored: the others go past the buffer (dropped).
    stored = jnp.where(last_writers(slots), slots, S)
    k_out = k_cache.at[rows, stored].set(k_new.astype(k_cache.dtype), mode="drop")
    v_out = v_cache.at[rows, stored].set(v_new.astype(v_cache.dtype), mode="drop")
    keys = jnp.concatenate([k_cache, k_new.astype(k_cache.dtype)], 1)  # [B, S + T, K, D]
    vals = jnp.concatenate([v_cache, v_new.astype(v_cache.dtype)], 1)
    committed = jnp.arange(S)[None, None] < past[:, None, None]  # [B, 1, S]
    visible = jnp.concatenate([jnp.broadcast_to(committed, (b, T, S)), vis], 2)  # [B, T, S+T]
    qg = q.reshape(b, T, K, G, D).astype(f32)
    s = jnp.einsum("btkgd,bskd->btkgs", qg, keys.astype(f32),
                   precision=jax.lax.Precision.HIGHEST) * D ** -0.5
    s = jnp.where(visible[:, :, None, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    out = jnp.einsum("btkgs,bskd->btkgd", p, vals.astype(f32),
                     precision=jax.lax.Precision.HIGHEST)
    return out.reshape(b * T, H * D), k_out, v_out


def paged_decode_attention_reference(qkv, k_pages, v_pages, layer: int, context_lens,
                                     slot_mapping, block_tables, *, num_heads: int,
                                     num_kv_heads: int):
    """`paged_decode_attention`'s spec: each row's pages of layer `layer` gathered into a dense
    cache, then `decode_attention_reference` at position context_len - 1 (the past is the
    context less the new token), in f32.

    Args:
      qkv: [B, (H + 2K) * D] RoPE'd. k_pages, v_pages: [L, P, page, K, D]. context_lens,
        slot_mapping: [B] int32 (slot -1: nothing stored). block_tables: [B, W] int32.
    Returns:
      (out [B, H * D] f32, k_pages, v_pages) with each row's new K/V stored at its slot.
    """
    L, P, page, K, D = k_pages.shape
    b, W = block_tables.shape
    pages = jnp.clip(block_tables, 0, P - 1)

    def dense(pool):  # [B, W * page, K, D], the row's tokens in order
        return pool[layer][pages].reshape(b, W * page, K, D)

    positions = jnp.maximum(context_lens - 1, 0)
    out, _, _ = decode_attention_reference(qkv, dense(k_pages), dense(v_pages), positions,
                                           num_heads=num_heads, num_kv_heads=num_kv_heads)
    y = qkv.reshape(b, -1, K, D)
    k_new, v_new = y[:, num_heads // K], y[:, num_heads // K + 1]  # [B, K, D]
    slot = jnp.where(slot_mapping < 0, P * page, slot_mapping)  # past the pool: dropped

    def store(pool, new):
        rows = pool[layer].reshape(P * page, K, D).at[slot].set(new.astype(pool.dtype),
                                                                mode="drop")
        return pool.at[layer].set(rows.reshape(P, page, K, D))

    return out, store(k_pages, k_new), store(v_pages, v_new)
