"""Plain-jnp attention with f32 accumulation: the spec the flash kernel is tested against."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Finite, so a fully masked row gives exp(0 - 0) instead of NaN; such rows are zeroed explicitly.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(
    t: int,
    s: int,
    *,
    causal: bool,
    q_offset: jax.Array,
    kv_lens: jax.Array,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Which keys each query may see: bool [B, T, S].

    Query t of sequence b sits at absolute position q_offset[b] + t; key s sits at position s.
    A key is visible when s < kv_lens[b] and, if causal, s <= q_offset[b] + t. A `mask`
    [B, T, T] further restricts the queries' own keys: key q_offset[b] + u is visible to query
    t only if mask[b, t, u] (keys outside [q_offset, q_offset + T) are not affected).
    """
    b = q_offset.shape[0]
    q_pos = q_offset[:, None, None] + jnp.arange(t)[None, :, None]  # [B, T, 1]
    k_pos = jnp.arange(s)[None, None, :]  # [1, 1, S]
    visible = k_pos < kv_lens[:, None, None]  # [B, 1, S]
    if causal:
        visible = visible & (k_pos <= q_pos)
    visible = jnp.broadcast_to(visible, (b, t, s))
    if mask is not None:
        u = k_pos - q_offset[:, None, None]  # [B, 1, S] index of the query that wrote key s
        own = (u >= 0) & (u < t)
        u = jnp.broadcast_to(jnp.clip(u, 0, t - 1), (b, t, s))
        visible = visible & (~own | jnp.take_along_axis(mask, u, axis=2))
    return visible


def flash_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    sm_scale: float | None = None,
    q_offset: jax.Array | None = None,
    kv_lens: jax.Array | None = None,
    soft_cap: float | None = None,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Reference multi-head / grouped-query attention in f32. Same contract as `flash_attention`.

    Args:
      q: [B, T, H, D] queries.
      k: [B, S, K, D] keys; H must be a multiple of K (GQA).
      v: [B, S, K, D] values.
      causal: mask keys after each query's absolute position.
      sm_scale: logit scale; defaults to 1/sqrt(D).
      q_offset: [B] int32 absolute position of query 0 (chunked prefill); defaults to 0.
      kv_lens: [B] int32 number of valid keys; defaults to S.
      soft_cap: if set, logits become soft_cap * tanh(logits / soft_cap).
      mask: optional [B, T, T] bool: key q_offset[b] + u (written by query u) is visible to
        query t only if mask[b, t, u] (tree attention over a block of new tokens).

    Returns:
      [B, T, H, D] in q.dtype. Rows that see no key are 0. K/V past kv_lens never matter.
    """
    return _dense_attention(
        q, k, v, causal, sm_scale, q_offset, kv_lens, soft_cap, mask, exact=True
    )


def attention_xla(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    sm_scale: float | None = None,
    q_offset: jax.Array | None = None,
    kv_lens: jax.Array | None = None,
    soft_cap: float | None = None,
    mask: jax.Array | None = None,
) -> jax.Array:
    """The same attention as plain XLA in the input dtype (f32 accumulation): the non-Pallas
    fast path. Materializes [B, K, G, T, S] logits. Arguments as `flash_attention_reference`."""
    return _dense_attention(
        q, k, v, causal, sm_scale, q_offset, kv_lens, soft_cap, mask, exact=False
    )


def _dense_attention(q, k, v, causal, sm_scale, q_offset, kv_lens, soft_cap, mask, *, exact):
    """exact: f32 operands at HIGHEST precision (the spec). Else native-dtype matmuls."""
    b, t, h, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    scale = d**-0.5 if sm_scale is None else sm_scale
    q_offset = jnp.zeros((b,), jnp.int32) if q_offset is None else q_offset
    kv_lens = jnp.full((b,), s, jnp.int32) if kv_lens is None else kv_lens
    # The spec upcasts and forbids TF32 on GPU; the fast path keeps bf16/f16 operands.
    hp = jax.lax.Precision.HIGHEST if exact else None
    if exact:
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    f32 = jnp.float32

    qg = q.reshape(b, t, kh, h // kh, d)  # [B, T, K, G, D]
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, precision=hp, preferred_element_type=f32)
    logits = logits * scale
    if soft_cap is not None:
        logits = soft_cap * jnp.tanh(logits / soft_cap)
    visible = attention_mask(t, s, causal=causal, q_offset=q_offset, kv_lens=kv_lens, mask=mask)
    visible = visible[:, None, None]  # [B, 1, 1, T, S]
    logits = jnp.where(visible, logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(visible, probs, 0.0)  # a row with no visible key averages nothing: output 0
    # Keys past kv_lens may be stale cache rows, even NaN: zero them so 0 * NaN cannot leak.
    key_ok = jnp.arange(s)[None, :, None, None] < kv_lens[:, None, None, None]  # [B, S, 1, 1]
    v = jnp.where(key_ok, v, jnp.zeros_like(v))
    out = jnp.einsum(
        "bkgts,bskd->btkgd", probs.astype(v.dtype), v, precision=hp, preferred_element_type=f32
    )
    return out.reshape(b, t, h, d).astype(q.dtype)
