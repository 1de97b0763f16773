"""Plain-jnp references of the three fused decode stages (`pallas_kernels.fused_decode`).

Each reference computes what its kernel computes, in the model's own arithmetic: projections
accumulated in f32 and rounded to the model dtype, RMSNorm as HF does it, RoPE in f32 on the
rounded projections, attention with f32 scores and softmax. The split-K partial sums that the
kernels hand to each other are reproduced as such, so a test compares like with like.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

f32 = jnp.float32


def merge_residual(x: jax.Array, parts: jax.Array | None) -> jax.Array:
    """x [B, E] plus a projection given as partial sums parts [P, B, E] f32 (None: x as is).

    The projection is rounded to x.dtype before the add, as `x + linear(...)` rounds it.
    """
    if parts is None:
        return x
    return x + parts.sum(0).astype(x.dtype)


def rms_norm_rows(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """HF RMSNorm of x [B, E] (f32 statistics, rounded, then scaled in x.dtype)."""
    xf = x.astype(f32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def qkv_stage_reference(x, parts, norm_w, wqkv, cos, sin, positions, k_cache, v_cache, *,
                        num_heads: int, num_kv_heads: int, eps: float):
    """Residual merge, attention RMSNorm, the QKV projection, RoPE and the cache write.

    Args:
      x: [B, E] residual stream; parts: [P, B, E] f32 pending partial sums, or None.
      norm_w: [E]. wqkv: [E, (H + 2K) * D]. cos, sin: [B, D/2] f32 tables of `positions` [B].
      k_cache, v_cache: [B, S, K, D] this layer's cache; slot positions[b] receives row b's
        K/V (a position past S writes nothing).
    Returns:
      q [B, H, D] (RoPE applied), k_cache, v_cache, x [B, E] after the merge.
    """
    H, K = num_heads, num_kv_heads
    b, _ = x.shape
    D = wqkv.shape[1] // (H + 2 * K)
    x = merge_residual(x, parts)
    h = rms_norm_rows(x, norm_w, eps)
    y = jnp.dot(h, wqkv, preferred_element_type=f32,
                precision=jax.lax.Precision.HIGHEST).astype(x.dtype)
    y = y.reshape(b, H + 2 * K, D)

    def rope(t):  # [B, N, D] -> rotated, rotate_half layout
        t1, t2 = t[..., :D // 2].astype(f32), t[..., D // 2:].astype(f32)
        c, s = cos[:, None], sin[:, None]
        return jnp.concatenate([t1 * c - t2 * s, t2 * c + t1 * s], -1).astype(x.dtype)

    q, k, v = rope(y[:, :H]), rope(y[:, H:H + K]), y[:, H + K:]
    rows = jnp.arange(b)
    k_cache = k_cache.at[rows, positions].set(k.astype(k_cache.dtype), mode="drop")
    v_cache = v_cache.at[rows, positions].set(v.astype(v_cache.dtype), mode="drop")
    return q, k_cache, v_cache, x


def attn_stage_reference(q, k_cache, v_cache, positions, wo):
    """Decode attention of q [B, H, D] over slots [0, positions[b]], then the O projection.

    Returns:
      [K, B, E] f32: the O projection's partial sum over each kv head's group of query heads
      (their sum over K is attn_out @ wo, the rounding of attn_out included).
    """
    b, H, D = q.shape
    S, K = k_cache.shape[1], k_cache.shape[2]
    G = H // K
    qg = q.reshape(b, K, G, D).astype(f32)
    scores = jnp.einsum("bkgd,bskd->bkgs", qg, k_cache.astype(f32),
                        precision=jax.lax.Precision.HIGHEST) * D ** -0.5
    visible = jnp.arange(S)[None, :] <= positions[:, None]  # [B, S]
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgs,bskd->bkgd", probs, v_cache.astype(f32),
                     precision=jax.lax.Precision.HIGHEST).astype(q.dtype)  # [B, K, G, D]
    wo_k = wo.reshape(K, G * D, -1)  # rows of kv head k's query heads
    return jnp.einsum("bkf,kfe->kbe", out.reshape(b, K, G * D).astype(f32), wo_k.astype(f32),
                      precision=jax.lax.Precision.HIGHEST)


def mlp_stage_reference(x, parts, norm_w, w_gate_up, w_down, *, eps: float, block_f: int):
    """Residual merge, MLP RMSNorm, SwiGLU, and the down projection as F/block_f partials.

    Args:
      x: [B, E]; parts: [P, B, E] f32 (the attention's O-projection partials). w_gate_up:
        [E, 2F] (gate columns first). w_down: [F, E].
    Returns:
      partials [F/block_f, B, E] f32 of the down projection, and x [B, E] after the merge.
    """
    x = merge_residual(x, parts)
    h = rms_norm_rows(x, norm_w, eps)
    gu = jnp.dot(h, w_gate_up, preferred_element_type=f32,
                 precision=jax.lax.Precision.HIGHEST).astype(x.dtype)
    gate, up = jnp.split(gu, 2, axis=-1)
    act = (jax.nn.silu(gate) * up).astype(f32)  # [B, F]
    b, F = act.shape
    n = F // block_f
    down = jnp.einsum("bnf,nfe->nbe", act.reshape(b, n, block_f),
                      w_down.reshape(n, block_f, -1).astype(f32),
                      precision=jax.lax.Precision.HIGHEST)
    return down, x
