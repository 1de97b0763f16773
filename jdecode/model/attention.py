"""Attention dispatch point: every cache layout calls `attention` here with `impl` chosen.

`impl="xla"` is plain jnp (f32 scores and softmax); `impl="pallas"` routes to the kernels in
`pallas_kernels/` through `jdecode.model.pallas_dispatch`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from jdecode.model.pallas_dispatch import attention_pallas

IMPLS = ("xla", "pallas", "reference")


def resolve_impl(impl: str) -> str:
    """"auto" -> the Pallas kernels on GPU, XLA elsewhere (where kernels would only run in the
    interpreter); any other value must be one of IMPLS."""
    if impl == "auto":
        return "pallas" if jax.default_backend() == "gpu" else "xla"
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is unknown; choose auto or one of {', '.join(IMPLS)}")
    return impl

# attend(q [B,T,H,D], k [B,T,K,D], v [B,T,K,D], cache, layer int32[], meta)
#   -> (out [B,T,H,D], cache): writes this layer's new K/V into `cache` and attends.
AttendFn = Callable[[jax.Array, jax.Array, jax.Array, Any, jax.Array, Any], tuple[jax.Array, Any]]
# An AttendFn with this attribute set true also takes q and k before RoPE, with
# rope=(cos, sin) ([B, T, D/2], `layers.rope_tables`), and rotates them itself: where its
# kernel can do it inside (`dense_attend`'s and `paged_attend`'s one-token writing kernels),
# the step runs no RoPE kernel of its own.
APPLIES_ROPE = "applies_rope"


class HasPositions(Protocol):
    positions: jax.Array  # [B, T]


def restrict_own_keys(visible: jax.Array, mask: jax.Array, q_pos: jax.Array,
                      kv_pos: jax.Array) -> jax.Array:
    """Applies a [B, T, T] mask to the keys the T queries wrote themselves.

    The queries' own K/V sit at the slots holding positions q_pos[b, 0] + u (contiguous, as the
    dense cache writes a step); key u is then visible to query t only if mask[b, t, u]. Slots
    outside that range keep `visible` as it is.

    Args:
      visible: [B, T, S] bool. mask: [B, T, T] bool. q_pos: [B, T] int32. kv_pos: [B, S] int32.
    Returns:
      [B, T, S] bool.
    """
    b, t, s = visible.shape
    u = kv_pos - q_pos[:, :1]  # [B, S] which query wrote slot s, if any
    own = (u >= 0) & (u < t)
    u = jnp.broadcast_to(jnp.clip(u, 0, t - 1)[:, None, :], (b, t, s))
    return visible & (~own[:, None, :] | jnp.take_along_axis(mask, u, axis=2))


def attention_xla(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array,
                  kv_pos: jax.Array, *, sliding_window: int | None = None,
                  sm_scale: float | None = None, mask: jax.Array | None = None) -> jax.Array:
    """Masked GQA attention over a contiguous K/V buffer, without repeating K/V heads.

    Key s is visible to query t iff 0 <= kv_pos[s] <= q_pos[t] (causal; slots holding a
    negative position are empty) and, with a sliding window W, q_pos - kv_pos < W (HF Mistral).
    A `mask` further restricts the keys the queries wrote themselves (`restrict_own_keys`).

    Args:
      q: [B, T, H, D] queries. k, v: [B, S, K, D] keys/values, H % K == 0.
      q_pos: [B, T] int32 absolute positions of the queries.
      kv_pos: [B, S] int32 absolute positions held in each K/V slot (-1 = empty).
      mask: optional [B, T, T] bool, query t may see the key of query u (tree attention).
    Returns:
      [B, T, H, D] in q.dtype; scores and softmax in f32.
    """
    b, t, h, d = q.shape
    kvh = k.shape[2]
    scale = d ** -0.5 if sm_scale is None else sm_scale
    qg = q.reshape(b, t, kvh, h // kvh, d)  # [B, T, K, G, D]: group query heads per KV head
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    visible = (kv_pos[:, None, :] <= q_pos[:, :, None]) & (kv_pos[:, None, :] >= 0)  # [B,T,S]
    if sliding_window is not None:
        visible &= (q_pos[:, :, None] - kv_pos[:, None, :]) < sliding_window
    if mask is not None:
        visible = restrict_own_keys(visible, mask, q_pos, kv_pos)
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
    # A fully masked row (a padding query) would give NaN; zero it instead.
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(visible.any(-1)[:, None, None, :, None], probs, 0.0)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(q.dtype)


# Query and key tile of `causal_attention_tiled`. Measured on a 2-core CPU (SmolLM2 shape,
# CPU time per layer): 256 beats 128 by ~5-8% at 8k tokens and ties at 2k; smaller tiles pay
# XLA's per-op overhead, and non-square ones (128x512, 256x1024) were slower.
PROMPT_TILE = 256


def causal_attention_tiled(q: jax.Array, k: jax.Array, v: jax.Array, *,
                           sliding_window: int | None = None, tile: int = PROMPT_TILE
                           ) -> jax.Array:
    """Causal self-attention of a prompt at positions 0..T-1, tile by tile (flash-style).

    Query tile i attends to key tiles 0..i with an online softmax, so only a [tile, tile] score
    block per KV head exists at a time (the unfused path materializes [T, S] scores in f32,
    which on CPU costs more in page faults and memory traffic than in FLOPs), and tiles above
    the diagonal are never computed. Both loops are `lax` loops: compile time does not grow
    with T. The key loop's trip count depends on the query tile, which XLA:GPU would sync on
    every iteration; the GPU prefill runs the Pallas flash kernel instead.

    Args:
      q: [B, T, H, D]; k, v: [B, T, K, D] (H % K == 0), the prompt's own keys and values.
      sliding_window: query t sees keys s with t - s < sliding_window (HF Mistral), or None.
    Returns:
      [B, T, H, D] in q.dtype; scores, softmax and accumulation in f32.
    """
    b, t, h, d = q.shape
    kvh = k.shape[2]
    g = h // kvh
    tile = min(tile, t)
    pad = -t % tile  # padded keys lie after every real query (causally invisible)
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
    n = (t + pad) // tile
    f32, scale = jnp.float32, d ** -0.5
    qt = q.reshape(b, n, tile, kvh, g, d).transpose(1, 0, 3, 4, 2, 5)  # [N, B, K, G, tile, D]
    kt = k.reshape(b, n, tile, kvh, d).transpose(1, 0, 3, 2, 4)  # [N, B, K, tile, D]
    vt = v.reshape(b, n, tile, kvh, d).transpose(1, 0, 3, 2, 4)
    offs = jnp.arange(tile)

    def tile_mask(i, j):  # [tile, tile] bool: query tile i may see key tile j
        dist = (i - j) * tile + offs[:, None] - offs[None, :]  # query pos - key pos
        vis = dist >= 0
        return vis if sliding_window is None else vis & (dist < sliding_window)

    def tile_scores(qi, j):  # [B, K, G, tile, tile] f32, unscaled
        return jnp.einsum("bkgqd,bksd->bkgqs", qi, kt[j], preferred_element_type=f32)

    def tile_values(p, j):  # probabilities [B, K, G, tile, tile] x values -> [B, K, G, tile, D] f32
        return jnp.einsum("bkgqs,bksd->bkgqd", p.astype(v.dtype), vt[j],
                          preferred_element_type=f32)

    # The running max m is of the unscaled scores; softmax(scale * s) = exp(scale * (s - m)) /
    # sum, so the scale rides in the exp (one pass over a tile) instead of a pass of its own.
    def query_tile(i):
        qi = qt[i]
        # The diagonal tile first: every query sees itself, so the running max is finite.
        s = jnp.where(tile_mask(i, i), tile_scores(qi, i), -jnp.inf)
        m = s.max(-1)  # [B, K, G, tile]
        p = jnp.exp((s - m[..., None]) * scale)
        acc = tile_values(p, i)

        def key_tile(j, carry):  # online softmax: rescale what was summed under the old max
            m, l, acc = carry
            s = tile_scores(qi, j)
            if sliding_window is not None:
                s = jnp.where(tile_mask(i, j), s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(-1))
            shrink = jnp.exp((m - m_new) * scale)
            p = jnp.exp((s - m_new[..., None]) * scale)
            return m_new, l * shrink + p.sum(-1), acc * shrink[..., None] + tile_values(p, j)

        # Key tiles wholly outside the window are skipped; tiles before the diagonal need no
        # causal mask.
        first = 0 if sliding_window is None else jnp.maximum(
            0, (i * tile - sliding_window + 1) // tile)
        _, l, acc = jax.lax.fori_loop(first, i, key_tile, (m, p.sum(-1), acc))
        return acc / l[..., None]

    out = jax.lax.map(query_tile, jnp.arange(n))  # [N, B, K, G, tile, D]
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(b, n * tile, h, d)
    return out[:, :t].astype(q.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, kv_pos: jax.Array,
              *, impl: str = "xla", sliding_window: int | None = None,
              mask: jax.Array | None = None) -> jax.Array:
    """Dispatches contiguous-cache attention to an implementation (see `attention_xla`).

    The Pallas path assumes the dense cache's slots (kv_pos[b, s] == s) and has no sliding
    window, so windowed models stay on XLA. `mask` ([B, T, T] bool, or None) restricts the
    keys the queries wrote themselves on either path.
    """
    if impl in ("xla", "reference") or (impl == "pallas" and sliding_window is not None):
        return attention_xla(q, k, v, q_pos, kv_pos, sliding_window=sliding_window, mask=mask)
    if impl == "pallas":
        return attention_pallas(q, k, v, q_pos, mask)
    raise ValueError(f"attention impl={impl!r} is unknown; choose one of {', '.join(IMPLS)}")
