"""Llama building blocks: RMSNorm, rotary embeddings (with Llama-3 scaling), SwiGLU MLP."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jdecode.config import ModelConfig


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm as HF computes it: normalize in f32, cast back, then scale by the weight.

    Args:
      x: [..., E] activations. weight: [E]. eps: added to the mean square.
    Returns:
      [..., E] in x.dtype.
    """
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [D/2] in f32, with Llama-3 low/high-frequency scaling if configured."""
    d = cfg.head_dim
    # Same f32 arithmetic as HF (arange as int, then cast), so angles match to the last bit.
    inv_freq = 1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, d, 2).astype(np.float32) / d))
    inv_freq = inv_freq.astype(np.float32)
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * np.pi / inv_freq
    # Long wavelengths (low frequencies) are slowed by `factor`; short ones are kept; the band
    # between is interpolated linearly in 1/wavelen.
    scaled = np.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """cos, sin tables for `positions` [B, T] -> each [B, T, D/2] f32."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(cfg))
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates [B, T, N, D] by the tables [B, T, D/2] in HF's half-split (rotate_half) layout."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    c, s = cos[:, :, None, :], sin[:, :, None, :]  # broadcast over heads
    out = jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    return out.astype(x.dtype)


def swiglu_mlp(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array
               ) -> jax.Array:
    """down(silu(x @ gate) * (x @ up)): [B, T, E] -> [B, T, E]."""
    gate = jnp.einsum("bte,ef->btf", x, w_gate)
    up = jnp.einsum("bte,ef->btf", x, w_up)
    return jnp.einsum("btf,fe->bte", jax.nn.silu(gate) * up, w_down)
