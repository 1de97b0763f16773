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
