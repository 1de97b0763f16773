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
