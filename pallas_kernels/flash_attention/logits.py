"""Logit scaling shared by every attention kernel: base-2 logits, so the softmax uses exp2."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

LOG2E = math.log2(math.e)


def scale_logits(s: jax.Array, sm_scale: float, soft_cap: float | None) -> jax.Array:
    """Raw q.k logits -> base-2 logits (so the softmax can use exp2), with optional soft cap."""
    if soft_cap is None:
        return s * (sm_scale * LOG2E)
    return jnp.tanh(s * (sm_scale / soft_cap)) * (soft_cap * LOG2E)
