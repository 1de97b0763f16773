"""The Llama-family forward pass: `lax.scan` over stacked layers, attention via a pluggable
`attend` function so dense and paged caches share one model."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jdecode.config import ModelConfig
from jdecode.model.attention import AttendFn
from jdecode.model.layers import apply_rope, rms_norm, rope_tables, swiglu_mlp
from jdecode.model.linear import LinearFn, xla_linear
from jdecode.model.params import LayerParams, Params


def _project(x: jax.Array, w: jax.Array, b: jax.Array | None, heads: int, d: int,
             linear: LinearFn = xla_linear) -> jax.Array:
    """[B, T, E] @ [E, N*D] (+ bias) -> [B, T, N, D]."""
    y = linear(x, w)
    if b is not None:
        y = y + b
    return y.reshape(*y.shape[:2], heads, d)


def decoder_layer(x: jax.Array, lp: LayerParams, cos: jax.Array, sin: jax.Array, cache: Any,
                  layer: jax.Array, meta: Any, *, cfg: ModelConfig, attend: AttendFn,
                  linear: LinearFn = xla_linear) -> tuple[jax.Array, Any]:
    """One pre-norm block: x + attn(norm(x)), then + mlp(norm(.)). x: [B, T, E].

    `linear` runs the attention projections (see `jdecode.model.linear`); the MLP matrices
    are big enough that XLA's own GEMM streams them at full rate.
    """
    H, K, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    with jax.named_scope("attn"):
        h = rms_norm(x, lp.attn_norm, cfg.rms_norm_eps)
        if lp.wqkv is not None:  # fused layout: one [E, (H+2K)D] matmul
            qkv = _project(h, lp.wqkv, lp.bqkv, H + 2 * K, D, linear)
            q, k, v = qkv[:, :, :H], qkv[:, :, H:H + K], qkv[:, :, H + K:]
        else:
            q = _project(h, lp.wq, lp.bq, H, D, linear)  # [B, T, H, D]
            k = _project(h, lp.wk, lp.bk, K, D, linear)  # [B, T, K, D]
            v = _project(h, lp.wv, lp.bv, K, D, linear)  # [B, T, K, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out, cache = attend(q, k, v, cache, layer, meta)  # [B, T, H, D]
        with jax.named_scope("o_proj"):  # names the op for the profiler's attribution
            x = x + linear(out.reshape(*out.shape[:2], H * D), lp.wo)
    with jax.named_scope("mlp"):
        h = rms_norm(x, lp.mlp_norm, cfg.rms_norm_eps)
        if lp.w_gate_up is not None:  # fused layout: gate and up in one [E, 2F] matmul
            gate, up = jnp.split(jnp.einsum("bte,ef->btf", h, lp.w_gate_up), 2, axis=-1)
            x = x + jnp.einsum("btf,fe->bte", jax.nn.silu(gate) * up, lp.w_down)
        else:
            x = x + swiglu_mlp(h, lp.w_gate, lp.w_up, lp.w_down)
    return x, cache


def lm_head(params: Params, hidden: jax.Array) -> jax.Array:
    """[..., E] final-normed hidden -> [..., V] f32 logits (tied or untied head)."""
    if params.lm_head is None:  # tied: contract with embed [V, E] directly, no transpose op
        return jnp.einsum("...e,ve->...v", hidden, params.embed,
                          preferred_element_type=jnp.float32)
    return jnp.einsum("...e,ev->...v", hidden, params.lm_head,
                      preferred_element_type=jnp.float32)


def forward(params: Params, tokens: jax.Array, positions: jax.Array, cache: Any, meta: Any,
            *, cfg: ModelConfig, attend: AttendFn, logits_at: jax.Array | None = None,
            linear: LinearFn = xla_linear) -> tuple[jax.Array, jax.Array, Any]:
    """Runs the decoder over `tokens`, reading and writing `cache` through `attend`.

    Args:
      params: parameter pytree. tokens: [B, T] int32. positions: [B, T] int32 (RoPE angles).
      cache: any cache pytree (a leading layer axis, or per-layer buffers when the layers are
        unstacked); meta: what `attend` needs besides it.
      logits_at: optional [B, N] indices into T; logits are computed only there (prefill
        needs the last prompt token only, and the LM head is the biggest matmul).
      linear: the attention projections' matmul (`jdecode.model.linear.make_linear`).
    Returns:
      logits [B, T or N, V] f32, hidden [B, T or N, E] (final-normed, pre-head), cache.
    """
    x = params.embed[tokens]  # [B, T, E]
    cos, sin = rope_tables(positions, cfg)  # [B, T, D/2]

    if isinstance(params.layers, tuple):  # unstacked (see `unstack_layers`): unrolled loop
        for layer, lp in enumerate(params.layers):
            # `layer` stays a Python int: per-layer caches index their tuple with it.
            x, cache = decoder_layer(x, lp, cos, sin, cache, layer, meta, cfg=cfg,
                                     attend=attend, linear=linear)
    else:
        def body(carry, xs):
            x, cache = carry
            lp, layer = xs
            x, cache = decoder_layer(x, lp, cos, sin, cache, layer, meta, cfg=cfg,
                                     attend=attend, linear=linear)
            return (x, cache), None

        layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
        (x, cache), _ = jax.lax.scan(body, (x, cache), (params.layers, layer_ids))
    if logits_at is not None:
        x = jnp.take_along_axis(x, logits_at[..., None], axis=1)  # [B, N, E]
    hidden = rms_norm(x, params.final_norm, cfg.rms_norm_eps)
    return lm_head(params, hidden), hidden, cache
