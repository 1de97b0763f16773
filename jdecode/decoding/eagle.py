"""EAGLE-2 decoding (Li et al. 2024): the feature draft (`eagle_draft`) grows a dynamic tree by
cumulative confidence, the top nodes are verified in one target pass, and the accepted path's
target features catch the draft up for the next step. The tree is built on device.

A step from root position p (the root x_p is the last emitted token; the draft has read every
input position < p):
  1. expand: level l's frontier (the `width` most likely depth-l nodes) runs one draft pass,
     each node's top_k children join a pool scored by cumulative log-probability;
  2. rerank: the pool's tree_nodes - 1 best form the tree (a child never outscores its parent,
     so the tree is closed under parents); the target verifies it (`phases.verify_tree`);
  3. accept with the rule, commit the path, and feed the draft the path's target features.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jdecode.cache.dense import with_scratch
from jdecode.config import ModelConfig
from jdecode.decoding import phases
from jdecode.decoding.acceptance import AcceptFn, accept_step, sampled_tree_accept
from jdecode.decoding.autoregressive import autoregressive
from jdecode.decoding.base import (
    Decoder,
    DecodeState,
    StepOutput,
    by_batch,
    parse_plan,
    plan_lookup,
    sample_next,
)
from jdecode.decoding.eagle_draft import (
    DraftKV,
    DraftMeta,
    EagleDraft,
    draft_config,
    draft_layer,
    draft_logits,
    features_of,
    fuse,
    load_draft,
    slot_attend,
    with_draft,
)
from jdecode.decoding.medusa import MEASURED_PLAN
from jdecode.decoding.methods import MethodBuild, register
from jdecode.decoding.tree import commit_path, tree_from_parents
from jdecode.io.registry import Model
from jdecode.model.params import Params
from jdecode.model.transformer import collect_hidden
from jdecode.options import option


@dataclasses.dataclass(frozen=True)
class TreeShape:
    """A dynamic tree's budget: `depth` draft levels, `width` nodes expanded per level, `top_k`
    children each, `nodes` verified (root included; 1 = plain decoding, no drafting)."""

    depth: int
    width: int
    top_k: int
    nodes: int

    @property
    def pool(self) -> int:
        """Candidate nodes drafted per step."""
        return self.top_k + (self.depth - 1) * self.width * self.top_k

    @property
    def scratch(self) -> int:
        """Draft-cache slots for the expanded frontiers (all but the last level)."""
        return (self.depth - 1) * self.width

    @property
    def chain(self) -> bool:
        """One child per level: the tree is a chain (verified without a mask)."""
        return self.width == 1 and self.top_k == 1


@struct.dataclass
class EagleAux:
    cache: Any  # target dense cache [L, B, max_len + N - 1, K, D]
    draft_kv: DraftKV | None  # [B, max_len + scratch, K, D]: slot = input position, then scratch
    root_out: jax.Array | None  # [B, E] the draft's output at positions - 1 (the root's feature)
    root_scores: jax.Array | None  # [B, top_k] f32 log-probs of the draft's children of the root
    root_tokens: jax.Array | None  # [B, top_k] int32


def catch_up(draft: EagleDraft, target: Params, kv: DraftKV, features: jax.Array,
             next_tokens: jax.Array, start: jax.Array, count: jax.Array, *, dcfg: ModelConfig,
             max_len: int, top_k: int) -> tuple[DraftKV, jax.Array, jax.Array, jax.Array]:
    """Feeds the draft input positions start .. start + count - 1 from target features.

    Args:
      features: [B, M, F] the target's features at those positions (rows past count: ignored).
      next_tokens: [B, M] int32 the token after each position. start, count: [B] int32.
    Returns:
      the draft cache, its output at the last position [B, E] (the next root's feature), and
      the top_k log-probs [B, top_k] f32 and tokens [B, top_k] int32 it gives the root's child.
    """
    positions = start[:, None] + jnp.arange(next_tokens.shape[1])  # [B, M]
    slots = jnp.arange(kv.k.shape[1])
    # Causal over the committed region; scratch slots (>= max_len) are never context. Slots of
    # this call past count hold positions no valid query reaches.
    visible = (slots <= positions[..., None]) & (slots < max_len)  # [B, M, S]
    out, kv = draft_layer(draft, target, next_tokens, fuse(draft, features), positions, kv,
                          DraftMeta(positions, visible), dcfg=dcfg, attend=slot_attend)
    last = jnp.take_along_axis(out, (count - 1)[:, None, None], axis=1)[:, 0]  # [B, E]
    logp = jax.nn.log_softmax(draft_logits(draft, target, last, dcfg.rms_norm_eps), axis=-1)
    scores, tokens = jax.lax.top_k(logp, top_k)
    return kv, last, scores, tokens.astype(jnp.int32)


def expand_tree(draft: EagleDraft, target: Params, aux: EagleAux, root: jax.Array,
                pos: jax.Array, shape: TreeShape, *, dcfg: ModelConfig, max_len: int
                ) -> tuple[jax.Array, jax.Array, DraftKV]:
    """EAGLE-2's expand and rerank, on device.

    Args:
      aux: the draft's state after the last catch-up. root: [B] int32 the root token.
      pos: [B] int32 the root's position. shape: the budget.
    Returns:
      tokens [B, N] int32 and parents [B, N] int32 of the tree (topological: the pool is built
      level by level and the selection keeps pool order), scores [B, N] f32 (each node's
      cumulative draft log-probability; 0 at the root) and the draft cache.
    """
    b, (k, w) = root.shape[0], (shape.top_k, shape.width)
    kv, rows = aux.draft_kv, jnp.arange(b)[:, None]
    scores, tokens = [aux.root_scores], [aux.root_tokens]
    parents = [jnp.full((b, k), -1, jnp.int32)]  # pool index of each node's parent; -1: root
    f_score, f_idx = jax.lax.top_k(aux.root_scores, w)  # the frontier [B, W]
    f_tok = jnp.take_along_axis(aux.root_tokens, f_idx, axis=1)
    f_feat = jnp.broadcast_to(aux.root_out[:, None], (b, w, aux.root_out.shape[-1]))
    f_anc = jnp.zeros((b, w, shape.scratch), bool)  # which scratch slots are ancestors
    offset, scratch = k, jnp.arange(shape.scratch)
    for level in range(1, shape.depth):  # unrolled: depth is small and static
        own = (level - 1) * w + jnp.arange(w)  # this level's scratch slots
        anc = f_anc | (scratch[None, None, :] == own[None, :, None])  # [B, W, scratch]
        committed = jnp.arange(max_len)[None, None, :] < pos[:, None, None]  # [B, 1, max_len]
        visible = jnp.concatenate([jnp.broadcast_to(committed, (b, w, max_len)), anc], -1)
        # A depth-l node's token sits at p + l; the draft reads it at input position p + l - 1.
        positions = jnp.broadcast_to(pos[:, None] + level - 1, (b, w))
        meta = DraftMeta(jnp.broadcast_to(max_len + own, (b, w)), visible)
        out, kv = draft_layer(draft, target, f_tok, f_feat, positions, kv, meta, dcfg=dcfg,
                              attend=slot_attend)
        logp = jax.nn.log_softmax(draft_logits(draft, target, out, dcfg.rms_norm_eps), -1)
        c_score, c_tok = jax.lax.top_k(logp, k)  # [B, W, K]
        c_score = (f_score[..., None] + c_score).reshape(b, w * k)
        c_tok = c_tok.reshape(b, w * k).astype(jnp.int32)
        scores.append(c_score)
        tokens.append(c_tok)
        parents.append(jnp.repeat(f_idx, k, axis=1))
        if level < shape.depth - 1:  # the next frontier: the W best children
            f_score, pick = jax.lax.top_k(c_score, w)
            src = pick // k  # the frontier node each comes from
            f_idx, f_tok = offset + pick, jnp.take_along_axis(c_tok, pick, axis=1)
            f_feat = jnp.take_along_axis(out, src[..., None], axis=1)
            f_anc = jnp.take_along_axis(anc, src[..., None], axis=1)
        offset += w * k
    pool_score = jnp.concatenate(scores, axis=1)  # [B, P]
    # Ties go to the lower pool index, so a parent always beats its equally scored child.
    sel = jnp.sort(jax.lax.top_k(pool_score, shape.nodes - 1)[1], axis=1)  # [B, N - 1]
    node_scores = jnp.take_along_axis(pool_score, sel, axis=1)
    node_of = jnp.zeros((b, shape.pool), jnp.int32).at[rows, sel].set(
        jnp.arange(1, shape.nodes, dtype=jnp.int32))
    par = jnp.take_along_axis(jnp.concatenate(parents, axis=1), sel, axis=1)
    par = jnp.where(par < 0, 0, jnp.take_along_axis(node_of, jnp.maximum(par, 0), axis=1))
    node_tokens = jnp.take_along_axis(jnp.concatenate(tokens, axis=1), sel, axis=1)
    return (jnp.concatenate([root[:, None], node_tokens], axis=1),
            jnp.concatenate([jnp.full((b, 1), -1, jnp.int32), par], axis=1),
            jnp.concatenate([jnp.zeros((b, 1), pool_score.dtype), node_scores], axis=1), kv)


def eagle_decoder(cfg: ModelConfig, max_len: int, shapes: Mapping[int, TreeShape],
                  feature_layers: tuple[int, ...], impl: str = "xla",
                  rule: AcceptFn = sampled_tree_accept) -> Decoder:
    """EAGLE-2 decoding; params = the target bundled with its `EagleDraft` (`with_draft`).

    Args:
      cfg: the target's config. max_len: cache slots before the trees' scratch slots.
      shapes: batch size -> the TreeShape used from that size up (chosen when traced).
      feature_layers: the target layers whose residual streams the draft reads (collected by
        layer hooks during the target's own passes). impl: attention. rule: the `AcceptFn`
        for batches that sample.
    """
    dcfg = draft_config(cfg)
    hooks = collect_hidden(tuple(feature_layers))

    def init(params, prompt, lengths, sampling, keys, track_seen=False):
        if track_seen:
            raise ValueError("repetition_penalty != 1 is not supported by tree decoding (the "
                             "penalty would change inside one verified path): set it to 1 or "
                             "use the autoregressive method")
        b, shape = prompt.shape[0], plan_lookup(shapes, prompt.shape[0])
        rows = jnp.arange(b)
        cache = phases.layout_cache(params, cfg, b, with_scratch(max_len, shape.nodes - 1))
        # Every prompt position's features feed the draft.
        logits, _, cache, carry = phases.prefill(params, cache, prompt, lengths, cfg=cfg,
                                                 impl=impl, hooks=hooks)
        state = DecodeState(tokens=jnp.zeros((b,), jnp.int32), positions=lengths, keys=keys,
                            sampling=sampling, seen=None, aux=None)
        first, state = sample_next(logits, state)
        kv_shape = (b, max_len + shape.scratch, cfg.num_kv_heads, cfg.head_dim)
        kv = DraftKV(jnp.zeros(kv_shape, params.embed.dtype),
                     jnp.zeros(kv_shape, params.embed.dtype))
        nxt = jnp.concatenate([prompt[:, 1:], prompt[:, :1]], axis=1).at[
            rows, lengths - 1].set(first)  # x_{j+1}: the prompt shifted, then `first`
        aux = EagleAux(cache, *catch_up(params.extra, params, kv, features_of(carry), nxt,
                                        jnp.zeros_like(lengths), lengths, dcfg=dcfg,
                                        max_len=max_len, top_k=shape.top_k))
        return state.replace(tokens=first, aux=aux)

    def step(params, state):
        aux, b = state.aux, state.tokens.shape[0]
        shape = plan_lookup(shapes, b)
        pos = jnp.minimum(state.positions, max_len - 1)  # finished rows stay in the buffer
        tokens, parents, _, kv = expand_tree(params.extra, params, aux, state.tokens, pos,
                                             shape, dcfg=dcfg, max_len=max_len)
        tree = tree_from_parents(parents, shape.depth)
        if shape.chain:  # slot = position already: no mask, no commit
            seq_pos = pos[:, None] + jnp.arange(shape.nodes)
            out = phases.verify(params, aux.cache, tokens, seq_pos, cfg=cfg, impl=impl,
                                hooks=hooks)
        else:
            out = phases.verify_tree(params, aux.cache, tokens, pos, tree, cfg=cfg, impl=impl,
                                     hooks=hooks)
        logits, cache = out[0], out[2]
        keys, accepted = accept_step(rule, tree, tokens, logits, state.sampling, state.keys)
        if not shape.chain:
            cache = commit_path(cache, pos, accepted.path)
        # The accepted path's features: [B, D + 1, F] from the hooks' [n, B, N, E].
        feats = jnp.take_along_axis(features_of(out[3]), accepted.path[..., None], axis=1)
        new_aux = EagleAux(cache, *catch_up(params.extra, params, kv, feats, accepted.tokens,
                                            pos, accepted.num_accepted, dcfg=dcfg,
                                            max_len=max_len, top_k=shape.top_k))
        state = state.replace(tokens=accepted.next_token,
                              positions=state.positions + accepted.num_accepted, keys=keys,
                              aux=new_aux)
        return state, StepOutput(accepted.tokens, accepted.num_accepted)

    # A batch size whose plan verifies the root alone decodes plainly: the autoregressive
    # decoder itself, with no draft state, so switching speculation off costs nothing extra.
    tree_decoder = Decoder(init=init, step=step)
    plain = autoregressive(cfg, max_len, impl)
    return by_batch(lambda b: plain if plan_lookup(shapes, b).nodes == 1 else tree_decoder)


@dataclasses.dataclass(frozen=True)
class EagleOptions:
    draft: str = option("artifacts/smollm2-135m-eagle.tgz", "the feature draft: a `jdecode "
                        "train eagle` artifact (directory or .tgz; the default model's is "
                        "committed)")
    depth: int = option(5, "draft levels per step (the tree's depth)")
    width: int = option(8, "nodes expanded per level (the most likely so far)")
    top_k: int = option(8, "children drafted per expanded node")
    tree_nodes: int = option(60, "nodes verified per step, root included: the pool's most "
                             "likely (EAGLE-2's rerank); 1 = plain decoding")
    nodes_by_batch: dict | None = option(  # noqa: RUF009 (`option` returns a field)
        None, "batch size -> tree_nodes from that size up, e.g. {16: 8, 64: 1} (the cost "
        "model's per-batch choice; 1 = plain decoding); null = the plan measured for the "
        "default model, plain decoding from batch 4 ({4: 1}); {} = the tree at every size")

    def __post_init__(self) -> None:
        if self.nodes_by_batch is None:
            object.__setattr__(self, "nodes_by_batch", dict(MEASURED_PLAN))
        for name in ("depth", "width", "top_k", "tree_nodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.width > self.top_k:
            raise ValueError(f"width={self.width} > top_k={self.top_k}: the first level has "
                             "only top_k nodes to expand; lower width or raise top_k")
        for nodes in parse_plan(self.nodes_by_batch, self.tree_nodes, "nodes_by_batch").values():
            shape = TreeShape(self.depth, self.width, self.top_k, nodes)
            if nodes - 1 > shape.pool:
                raise ValueError(f"tree_nodes={nodes} but depth {self.depth}, width "
                                 f"{self.width} and top_k {self.top_k} draft only {shape.pool} "
                                 "nodes: lower tree_nodes or draft more")


@register("eagle", EagleOptions, lossless=True,
          summary="EAGLE-2: a one-layer feature draft grows a dynamic tree by confidence, the "
                  "target verifies the top nodes in one pass (Li et al. 2024)")
def build_eagle(model: Model, opts: EagleOptions, impl: str) -> MethodBuild:
    draft, manifest = load_draft(opts.draft, model)
    layers = tuple(manifest["options"]["feature_layers"])
    shapes = {batch: TreeShape(opts.depth, opts.width, opts.top_k, nodes) for batch, nodes in
              parse_plan(opts.nodes_by_batch, opts.tree_nodes, "nodes_by_batch").items()}

    def describe(stats: dict) -> dict:
        shape = plan_lookup(shapes, int(stats.get("batch", 1)))
        return {"mean_accepted": stats["mean_accepted"], "tree_nodes": shape.nodes,
                "depth": shape.depth if shape.nodes > 1 else 0}

    return MethodBuild(with_draft(model, draft),
                       lambda cfg, max_len: eagle_decoder(cfg, max_len, shapes, layers, impl),
                       describe=describe)
