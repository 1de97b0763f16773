"""Medusa-1 heads (Cai et al. 2024, sec. 2.1.1): K residual SiLU blocks on the frozen target's
last hidden state, each feeding the target's own LM head; head k predicts the token k + 2 ahead.

The heads are a small pytree (K x [E, E] plus biases) saved as a "medusa" artifact
(`jdecode.io.artifacts`); training lives in `jdecode.training.medusa`, the decoders that use
them in `jdecode.decoding.medusa` and `jdecode.decoding.blockwise`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jdecode.io import artifacts
from jdecode.io.registry import Model
from jdecode.model.params import Params
from jdecode.model.transformer import lm_head

ARTIFACT_KIND = "medusa"


@struct.dataclass
class MedusaHeads:
    """K heads, stacked: head k maps h to h + silu(h @ w[k] + b[k]) before the LM head."""

    w: jax.Array  # [K, E, E]
    b: jax.Array  # [K, E]

    @property
    def num_heads(self) -> int:
        return self.w.shape[0]


@struct.dataclass
class BundledParams(Params):
    """The target's params carrying a method's trained part in `extra` (heads, a draft).

    One `Params` rather than a tuple: `Generator` converts every `Params` it finds to the
    inference layout and would hand a bare array of a tuple to that conversion; the forward
    reads only the target's fields, so the bundle goes wherever target params go.
    """

    extra: Any = None


def bundle(params: Params, extra: Any) -> BundledParams:
    """`params` (any layout) with `extra` attached."""
    fields = {f.name: getattr(params, f.name) for f in dataclasses.fields(Params)}
    return BundledParams(**fields, extra=extra)


def init_heads(hidden_size: int, num_heads: int, dtype: Any = jnp.float32) -> MedusaHeads:
    """Heads that start as the identity (Medusa's zero-initialized linear): each first predicts
    what the LM head does, and training moves it k + 1 tokens further.

    Args:
      hidden_size: the target's hidden size E. num_heads: K. dtype: the parameters' dtype.
    """
    if num_heads < 1:
        raise ValueError(f"num_heads={num_heads}: a Medusa model has at least 1 head")
    return MedusaHeads(w=jnp.zeros((num_heads, hidden_size, hidden_size), dtype),
                       b=jnp.zeros((num_heads, hidden_size), dtype))


def head_states(heads: MedusaHeads, hidden: jax.Array) -> jax.Array:
    """Each head's residual block: hidden [..., E] (final-normed) -> [..., K, E]."""
    z = jnp.einsum("...e,kef->...kf", hidden.astype(heads.w.dtype), heads.w) + heads.b
    return hidden[..., None, :].astype(z.dtype) + jax.nn.silu(z)


def head_logits(params: Params, heads: MedusaHeads, hidden: jax.Array) -> jax.Array:
    """The heads' next-token logits through the target's LM head.

    Args:
      params: the target's params (its LM head, tied or not). heads: the K heads.
      hidden: [..., E] the target's final-normed hidden state at position t.
    Returns:
      [..., K, V] f32: head k's distribution for the token at t + k + 2.
    """
    return lm_head(params, head_states(heads, hidden).astype(params.embed.dtype))


def load_heads(path: str | Path, target: Model) -> tuple[MedusaHeads, dict]:
    """Medusa heads trained for `target` (`jdecode train medusa`), in the target's dtype.

    Returns:
      (heads, manifest); manifest["metrics"]["rank_accuracy"][k][r] is the held-out rate at
      which head k's rank-r candidate was the target's greedy token (what trees are built from).
    """
    if not artifacts.is_artifact(path):
        raise ValueError(
            f"no Medusa heads at {str(path)!r}: train them with `jdecode train medusa --out "
            f"{path}` or pass heads=<artifact directory or .tgz>")

    def abstract(manifest):
        k, e = manifest["options"]["num_heads"], target.cfg.hidden_size
        dt = target.params.embed.dtype
        return MedusaHeads(w=jax.ShapeDtypeStruct((k, e, e), dt),
                           b=jax.ShapeDtypeStruct((k, e), dt))

    return artifacts.load_artifact(path, ARTIFACT_KIND, target, abstract)


def rank_accuracy(manifest: dict, path: str | Path) -> list[list[float]]:
    """The artifact's measured per-head, per-rank accuracy ([K][R] floats), or a ValueError
    naming the fix when it has none."""
    acc = manifest.get("metrics", {}).get("rank_accuracy")
    if not acc:
        raise ValueError(f"Medusa heads {str(path)!r} record no held-out rank_accuracy in their "
                         "manifest metrics, which the candidate tree is built from: train them "
                         "with `jdecode train medusa` (it evaluates them)")
    return [[float(a) for a in row] for row in acc]
