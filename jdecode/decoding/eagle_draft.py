"""The EAGLE draft network (Li et al. 2024, EAGLE; EAGLE-3, 2025): one decoder layer that runs
autoregressively over the target's hidden features, with the target's embeddings and LM head.

The draft at input position j reads the token x_{j+1} and a feature of position j: the
target's (fused through `fuse`) where the target has run, its own output at j - 1 elsewhere,
and predicts x_{j+2}. Decoding (`jdecode.decoding.eagle`) expands a tree with it; training
(`jdecode.training.eagle`) unrolls that feedback a few steps (EAGLE-3's training-time test)
with the same layer and the same attention.

Features (EAGLE-3): the target's residual stream after a low, a middle and a high layer,
collected by the forward's layer hooks in the same pass that scores the tokens, side by side
([B, T, 3E]) and fused to the draft's width. One layer, the last, is EAGLE-1's feature (its
final-normed hidden state up to the norm, which the draft's own RMSNorm absorbs).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jdecode.config import ModelConfig
from jdecode.decoding.heads import bundle
from jdecode.io import artifacts
from jdecode.io.registry import Model
from jdecode.model.layers import rms_norm, rope_tables
from jdecode.model.params import LayerParams, Params
from jdecode.model.transformer import decoder_layer, lm_head

ARTIFACT_KIND = "eagle"


@struct.dataclass
class EagleDraft:
    """The draft's weights; the token embeddings and the LM head are the target's (frozen)."""

    fuse: jax.Array  # [F, E] target features (F = num_features * E) -> the draft's width
    fuse_norm: jax.Array  # [E] RMSNorm of the fused (or fed-back) feature
    embed_norm: jax.Array  # [E] RMSNorm of the token embedding
    w_in: jax.Array  # [2E, E] concat(embedding, feature) -> the layer's input
    layer: LayerParams  # one decoder layer, unstacked ([E, H*D], ...)
    final_norm: jax.Array  # [E] before the target's LM head

    @property
    def num_features(self) -> int:
        return self.fuse.shape[0] // self.fuse.shape[1]


def eagle3_layers(num_layers: int) -> tuple[int, ...]:
    """EAGLE-3's low, middle and high layers (its reference code: 2, L // 2 and L - 3), kept
    inside a shallow model."""
    return (min(2, num_layers - 1), num_layers // 2, max(num_layers - 3, 0))


def features_of(carry: jax.Array) -> jax.Array:
    """`collect_hidden(layers)`'s carry [n, B, T, E] -> features [B, T, n * E], the layers
    side by side."""
    return jnp.concatenate(list(carry), axis=-1)


def draft_config(cfg: ModelConfig) -> ModelConfig:
    """The draft layer's shape: one of the target's layers."""
    return cfg.replace(num_layers=1)


def init_draft(target: Params, cfg: ModelConfig, key: jax.Array, num_features: int = 1,
               dtype: Any = jnp.float32) -> EagleDraft:
    """A draft whose layer starts as a copy of the target's last one and whose feature path
    starts as the identity (each of several fused features at 1 / num_features).

    Args:
      target: the target's params (stacked or unstacked layers). cfg: its config. key: PRNG
        key for w_in. num_features: target layers whose features are fused.
    """
    e = cfg.hidden_size
    layers = target.layers
    last = layers[-1] if isinstance(layers, tuple) else jax.tree_util.tree_map(
        lambda a: a[-1], layers)
    eye = jnp.tile(jnp.eye(e), (num_features, 1)) / num_features
    w_in = jax.random.normal(key, (2 * e, e), jnp.float32) / np.sqrt(2 * e)
    ones = jnp.ones((e,), jnp.float32)
    draft = EagleDraft(fuse=eye, fuse_norm=ones, embed_norm=ones, w_in=w_in, layer=last,
                       final_norm=ones)
    return jax.tree_util.tree_map(lambda a: a.astype(dtype), draft)


# -- the draft's attention: explicit visibility --------------------------------------------


@struct.dataclass
class DraftKV:
    """The draft's K/V: slot = input position for the committed context, then scratch slots for
    the tree's expanded nodes."""

    k: jax.Array  # [B, S, K, D]
    v: jax.Array  # [B, S, K, D]


@struct.dataclass
class DraftMeta:
    slots: jax.Array  # [B, T] int32 where each query's K/V go (past S: dropped)
    visible: jax.Array  # [B, T, S] bool the slots each query attends to, after the write


def attention_visible(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array
                      ) -> jax.Array:
    """GQA attention over keys chosen per query.

    The model's `attention` derives visibility from positions and a mask over the step's own
    keys; the draft's queries see keys no position rule describes (a tree node's ancestors in
    scratch slots, or training's unrolled steps), so visibility is given outright.

    Args:
      q: [B, T, H, D]. k, v: [B, S, K, D]. visible: [B, T, S] bool.
    Returns:
      [B, T, H, D] in q.dtype (scores and softmax in f32; a query that sees nothing gets 0).
    """
    b, t, h, d = q.shape
    kvh = k.shape[2]
    qg = q.reshape(b, t, kvh, h // kvh, d)  # [B, T, K, G, D]
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = jnp.where(visible[:, None, None], scores * d**-0.5, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(visible.any(-1)[:, None, None, :, None], probs, 0.0)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(q.dtype)


def slot_attend(q, k, v, kv: DraftKV, layer, meta: DraftMeta) -> tuple[jax.Array, DraftKV]:
    """The decoding AttendFn: writes this step's K/V at meta.slots, then attends."""
    rows = jnp.arange(q.shape[0])[:, None]
    kv = DraftKV(k=kv.k.at[rows, meta.slots].set(k.astype(kv.k.dtype), mode="drop"),
                 v=kv.v.at[rows, meta.slots].set(v.astype(kv.v.dtype), mode="drop"))
    return attention_visible(q, kv.k, kv.v, meta.visible), kv


def draft_layer(draft: EagleDraft, target: Params, tokens: jax.Array, feature: jax.Array,
                positions: jax.Array, kv: Any, meta: Any, *, dcfg: ModelConfig, attend
                ) -> tuple[jax.Array, Any]:
    """One draft pass.

    Args:
      draft, target: the draft's and the target's params. tokens: [B, T] int32 x_{j+1}.
      feature: [B, T, E] the (fused) feature of position j, or the draft's own output at j - 1.
      positions: [B, T] int32 j (RoPE). kv, meta, attend: the draft's cache, where its K/V go
        and what each query sees (`slot_attend` when decoding; training unrolls its own).
    Returns:
      out [B, T, E] (pre-norm: fed back as the next position's feature; `draft_logits` gives
      its prediction of x_{j+2}) and the cache.
    """
    emb = target.embed[tokens].astype(draft.w_in.dtype)
    x = jnp.concatenate([rms_norm(emb, draft.embed_norm, dcfg.rms_norm_eps),
                         rms_norm(feature.astype(emb.dtype), draft.fuse_norm, dcfg.rms_norm_eps)],
                        axis=-1) @ draft.w_in
    cos, sin = rope_tables(positions, dcfg)
    return decoder_layer(x, draft.layer, cos, sin, kv, 0, meta, cfg=dcfg, attend=attend)


def draft_logits(draft: EagleDraft, target: Params, out: jax.Array, eps: float) -> jax.Array:
    """The draft's next-token logits [..., V] f32 from its outputs [..., E]."""
    return lm_head(target, rms_norm(out, draft.final_norm, eps).astype(target.embed.dtype))


def fuse(draft: EagleDraft, features: jax.Array) -> jax.Array:
    """Target features [..., F] -> the draft's feature input [..., E]."""
    return features.astype(draft.fuse.dtype) @ draft.fuse


# -- the artifact -----------------------------------------------------------------------------


def abstract_draft(cfg: ModelConfig, num_features: int, dtype: Any) -> EagleDraft:
    """The draft's shapes and dtypes (ShapeDtypeStructs) for a target of config cfg."""
    e, hd, kd, f = (cfg.hidden_size, cfg.num_heads * cfg.head_dim,
                    cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size)

    def s(*shape):
        return jax.ShapeDtypeStruct(shape, dtype)

    bias = cfg.qkv_bias
    layer = LayerParams(attn_norm=s(e), wq=s(e, hd), wk=s(e, kd), wv=s(e, kd), wo=s(hd, e),
                        mlp_norm=s(e), w_gate=s(e, f), w_up=s(e, f), w_down=s(f, e),
                        bq=s(hd) if bias else None, bk=s(kd) if bias else None,
                        bv=s(kd) if bias else None)
    return EagleDraft(fuse=s(num_features * e, e), fuse_norm=s(e), embed_norm=s(e),
                      w_in=s(2 * e, e), layer=layer, final_norm=s(e))


def load_draft(path: str, target: Model) -> tuple[EagleDraft, dict]:
    """An EAGLE draft trained for `target` (`jdecode train eagle`), in the target's dtype;
    manifest["options"]["feature_layers"] names the target layers it reads."""
    if not artifacts.is_artifact(path):
        raise ValueError(f"no EAGLE draft at {path!r}: train one with `jdecode train eagle "
                         f"--out {path}` or pass draft=<artifact directory or .tgz>")
    dtype = target.params.embed.dtype
    return artifacts.load_artifact(
        path, ARTIFACT_KIND, target,
        lambda manifest: abstract_draft(target.cfg, len(manifest["options"]["feature_layers"]),
                                        dtype))


def with_draft(model: Model, draft: EagleDraft) -> Model:
    """`model` whose params carry the draft (`heads.bundle`)."""
    return dataclasses.replace(model, params=bundle(model.params, draft))
