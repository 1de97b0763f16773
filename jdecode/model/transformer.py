"""The Llama-family forward pass: `lax.scan` over stacked layers, attention via a pluggable
`attend` function so dense and paged caches share one model."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jdecode.config import ModelConfig
from jdecode.model.attention import AttendFn
from jdecode.model.layers import apply_rope, rms_norm, rope_tables, swiglu_mlp
from jdecode.model.params import LayerParams, Params


def _project(x: jax.Array, w: jax.Array, b: jax.Array | None, heads: int, d: int) -> jax.Array:
    """[B, T, E] @ [E, N*D] (+ bias) -> [B, T, N, D]."""
    y = jnp.einsum("bte,ef->btf", x, w)
    if b is not None:
        y = y + b
    return y.reshape(*y.shape[:2], heads, d)


def decoder_layer(x: jax.Array, lp: LayerParams, cos: jax.Array, sin: jax.Array, cache: Any,
                  layer: jax.Array, meta: Any, *, cfg: ModelConfig, attend: AttendFn
                  ) -> tuple[jax.Array, Any]:
    """One pre-norm block: x + attn(norm(x)), then + mlp(norm(.)). x: [B, T, E]."""
    H, K, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    with jax.named_scope("attn"):
        h = rms_norm(x, lp.attn_norm, cfg.rms_norm_eps)
        q = apply_rope(_project(h, lp.wq, lp.bq, H, D), cos, sin)  # [B, T, H, D]
        k = apply_rope(_project(h, lp.wk, lp.bk, K, D), cos, sin)  # [B, T, K, D]
        v = _project(h, lp.wv, lp.bv, K, D)  # [B, T, K, D]
        out, cache = attend(q, k, v, cache, layer, meta)  # [B, T, H, D]
        x = x + jnp.einsum("btf,fe->bte", out.reshape(*out.shape[:2], H * D), lp.wo)
    with jax.named_scope("mlp"):
        h = rms_norm(x, lp.mlp_norm, cfg.rms_norm_eps)
        x = x + swiglu_mlp(h, lp.w_gate, lp.w_up, lp.w_down)
    return x, cache


def lm_head(params: Params, hidden: jax.Array) -> jax.Array:
    """[..., E] final-normed hidden -> [..., V] f32 logits (tied or untied head)."""
    w = params.embed.T if params.lm_head is None else params.lm_head  # [E, V]
    return jnp.einsum("...e,ev->...v", hidden, w, preferred_element_type=jnp.float32)


def forward(params: Params, tokens: jax.Array, positions: jax.Array, cache: Any, meta: Any,
            *, cfg: ModelConfig, attend: AttendFn, logits_at: jax.Array | None = None
            ) -> tuple[jax.Array, jax.Array, Any]:
    """Runs the decoder over `tokens`, reading and writing `cache` through `attend`.

    Args:
      params: parameter pytree. tokens: [B, T] int32. positions: [B, T] int32 (RoPE angles).
      cache: any cache pytree with a leading layer axis; meta: what `attend` needs besides it.
      logits_at: optional [B, N] indices into T; logits are computed only there (prefill
        needs the last prompt token only, and the LM head is the biggest matmul).
    Returns:
      logits [B, T or N, V] f32, hidden [B, T or N, E] (final-normed, pre-head), cache.
    """
    x = params.embed[tokens]  # [B, T, E]
    cos, sin = rope_tables(positions, cfg)  # [B, T, D/2]

    def body(carry, xs):
        x, cache = carry
        lp, layer = xs
        x, cache = decoder_layer(x, lp, cos, sin, cache, layer, meta, cfg=cfg, attend=attend)
        return (x, cache), None

    layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
    (x, cache), _ = jax.lax.scan(body, (x, cache), (params.layers, layer_ids))
    if logits_at is not None:
        x = jnp.take_along_axis(x, logits_at[..., None], axis=1)  # [B, N, E]
    hidden = rms_norm(x, params.final_norm, cfg.rms_norm_eps)
    return lm_head(params, hidden), hidden, cache
