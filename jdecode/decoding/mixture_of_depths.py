"""Mixture-of-depths (Raposo et al. 2024) on a frozen model: a router per layer scores every
token, and only the tokens it picks compute the layer; the others carry their residual
stream through unchanged. A token that skips a layer stores no K/V there, and no later token
attends to its slot at that layer (the dense cache's write tracking).

Two decoding modes: "token" (per layer, the top C rows of the batch by router score, C =
ceil(capacity * B); masked compute) and "sequence" (the layers with the highest mean router
score over the prompt are chosen once at prefill; the decode runs a compact model of those
layers, so the others' weights are never read). Routers come from `jdecode train router`.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jdecode.cache.dense import DenseKVCache
from jdecode.config import ModelConfig
from jdecode.decoding import phases
from jdecode.decoding.autoregressive import autoregressive, start_state
from jdecode.decoding.base import Decoder, StepOutput, sample_next
from jdecode.decoding.early_exit import heldout_layer_share
from jdecode.decoding.methods import MethodBuild, register
from jdecode.io import artifacts
from jdecode.io.registry import Model
from jdecode.model.params import Params
from jdecode.model.transformer import LayerControl, LayerHooks
from jdecode.options import option

ARTIFACT_KIND = "router"
MODES = ("token", "sequence")
RULES = ("top_c", "threshold")
QUANTILE_LEVELS = np.linspace(0.0, 1.0, 101)  # of the router logits stored per layer


@struct.dataclass
class Routers:
    """One linear router per layer over the RMS-normalized residual stream entering it."""

    w: jax.Array  # [L, E]
    b: jax.Array  # [L]
    # [L, Q] quantiles (at QUANTILE_LEVELS) of each layer's router logits over held-out
    # tokens of the full model: the threshold rule's per-layer cut for a capacity. None while
    # training.
    quantiles: jax.Array | None = None


def init_routers(cfg: ModelConfig, capacity: float, key: jax.Array) -> Routers:
    """Random routers whose logits are about N(b, 1), b chosen so that a share `capacity` of
    tokens computes each layer at the start (logit > 0)."""
    w = jax.random.normal(key, (cfg.num_layers, cfg.hidden_size)) / np.sqrt(cfg.hidden_size)
    p = float(np.clip(capacity, 0.01, 0.99))
    # The standard normal's quantile: b = sqrt(2) * erfinv(2p - 1).
    bias = float(np.sqrt(2.0) * jax.scipy.special.erfinv(2.0 * p - 1.0))
    dt = jnp.dtype(cfg.dtype)
    return Routers(w.astype(dt), jnp.full((cfg.num_layers,), bias, dt))


def router_logits(routers: Routers, layer: int | jax.Array, x: jax.Array) -> jax.Array:
    """Router logits [B, T] f32 of `layer` for the residual stream x [B, T, E] entering it."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + 1e-6)
    return (jnp.einsum("bte,e->bt", xf, routers.w[layer].astype(jnp.float32))
            + routers.b[layer].astype(jnp.float32))


def top_rows(scores: jax.Array, capacity: jax.Array) -> jax.Array:
    """The ceil(capacity * B) highest-scoring rows at each position (ties to the lower row).

    Args:
      scores: [B, T] f32. capacity: f32 scalar in (0, 1] (traced: one executable for all).
    Returns:
      [B, T] bool.
    """
    b = scores.shape[0]
    c = jnp.ceil(capacity * b - 1e-6)  # 1e-6: capacity 0.5 of 4 rows is 2, not 3
    rows = jnp.arange(b)
    s, o = scores[:, None], scores[None, :]  # [B, 1, T] vs [1, B, T]
    above = (o > s) | ((o == s) & (rows[None, :, None] < rows[:, None, None]))
    return jnp.sum(above, axis=1) < c  # rank < C


def capacity_threshold(routers: Routers, layer: int | jax.Array, capacity: jax.Array
                       ) -> jax.Array:
    """The router-logit cut of `layer` above which a share `capacity` of held-out tokens lies
    (-inf at capacity 1: every token computes)."""
    cut = jnp.interp(1.0 - capacity, jnp.asarray(QUANTILE_LEVELS, jnp.float32),
                     routers.quantiles[layer].astype(jnp.float32))
    return jnp.where(capacity >= 1.0, -jnp.inf, cut)


def token_hooks(routers: Routers, capacity: jax.Array, rule: str) -> LayerHooks:
    """Per-layer routing: the selected tokens compute the layer and store its K/V.

    rule: "top_c" (the top rows of the batch at each position) or "threshold" (tokens above
    the layer's cut for `capacity`, causal and batch-independent). The carry counts each
    token's computed layers, [B, T] int32.
    """
    if rule not in RULES:
        raise ValueError(f"rule={rule!r}: choose one of {', '.join(RULES)}")

    def before(computed, x, layer):
        scores = router_logits(routers, layer, x)
        chosen = (top_rows(scores, capacity) if rule == "top_c"
                  else scores > capacity_threshold(routers, layer, capacity))
        return computed + chosen, x, LayerControl(compute=chosen, write_kv=chosen)

    return LayerHooks(init=lambda x: jnp.zeros(x.shape[:2], jnp.int32), before=before)


def mean_router_probs(routers: Routers, valid: jax.Array, cfg: ModelConfig) -> LayerHooks:
    """Hooks (on the full model) whose carry sums each row's router probabilities over its
    valid tokens: [B, L] f32 (valid: [B, T] bool)."""

    def before(sums, x, layer):
        p = jax.nn.sigmoid(router_logits(routers, layer, x))  # [B, T]
        return sums.at[:, layer].add(jnp.sum(p * valid, axis=1)), x, LayerControl()

    return LayerHooks(init=lambda x: jnp.zeros((x.shape[0], cfg.num_layers), jnp.float32),
                      before=before)


def sequence_layers(capacity: float, num_layers: int) -> int:
    """Layers a sequence keeps: round(capacity * L), at least 1."""
    return max(1, min(num_layers, round(capacity * num_layers)))


def choose_layers(scores: jax.Array, keep: int) -> jax.Array:
    """The `keep` highest-scoring layers of scores [..., L], ascending: [..., keep] int32."""
    return jnp.sort(jax.lax.top_k(scores, keep)[1], axis=-1).astype(jnp.int32)


def gather_layers(params: Params, cache: DenseKVCache, idx: jax.Array
                  ) -> tuple[Any, DenseKVCache]:
    """The chosen layers' weights and cache, in the layout they came in (stacked, or tuples).

    idx: [C] int32. An unstacked layout is stacked first (one copy of the weights per
    sequence; each chosen layer then gets its own buffer, read in place by the decode).
    """
    if isinstance(params.layers, tuple):
        stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *params.layers)
        layers = tuple(jax.tree_util.tree_map(lambda a, j=j: a[idx[j]], stacked)
                       for j in range(idx.shape[0]))
        k, v = jnp.stack(cache.k), jnp.stack(cache.v)
        return layers, DenseKVCache(k=tuple(k[idx[j]] for j in range(idx.shape[0])),
                                    v=tuple(v[idx[j]] for j in range(idx.shape[0])))
    layers = jax.tree_util.tree_map(lambda a: a[idx], params.layers)
    return layers, DenseKVCache(k=cache.k[idx], v=cache.v[idx])


@struct.dataclass
class SequenceAux:
    layers: Any  # the chosen layers' weights ([C, ...] stacked or a C-tuple)
    cache: DenseKVCache  # their cache: C layers
    chosen: jax.Array  # [C] int32 layer indices


def mod_decoder(cfg: ModelConfig, max_len: int, impl: str = "xla", mode: str = "token",
                rule: str = "top_c", capacity: float = 1.0) -> Decoder:
    """Mixture-of-depths decoding after a full prefill (prompt tokens run every layer).

    `params` is `(target_params, Routers, capacity)`, capacity an f32 array (token mode reads
    it, so capacities share one executable; sequence mode's layer count is the static
    `capacity` argument, fixing the compact model's shape).
    """
    if mode == "token":
        base = autoregressive(cfg, max_len, impl, track_writes=True)

        def step(params, state):
            target, routers, cap = params
            pos = jnp.minimum(state.positions, max_len - 1)  # finished rows write in bounds
            logits, _, cache, _ = phases.decode_step(target, state.aux, state.tokens, pos,
                                                     cfg=cfg, impl=impl,
                                                     hooks=token_hooks(routers, cap, rule))
            nxt, state = sample_next(logits, state)
            state = state.replace(tokens=nxt, positions=state.positions + 1, aux=cache)
            return state, StepOutput(nxt[:, None], jnp.ones_like(nxt))

        return Decoder(init=lambda p, *a, **kw: base.init(p[0], *a, **kw), step=step)
    if mode != "sequence":
        raise ValueError(f"mode={mode!r}: choose one of {', '.join(MODES)}")
    keep = sequence_layers(capacity, cfg.num_layers)
    compact = cfg.replace(num_layers=keep)

    def init(params, prompt, lengths, sampling, keys, track_seen=False):
        target, routers, _ = params
        b, t = prompt.shape
        cache = phases.layout_cache(target, cfg, b, max_len)
        valid = jnp.arange(t)[None] < lengths[:, None]  # [B, T]
        logits, _, cache, sums = phases.prefill(target, cache, prompt, lengths, cfg=cfg,
                                                impl=impl,
                                                hooks=mean_router_probs(routers, valid, cfg))
        # One layer set for the batch (at batch 1: per sequence), so weights stay shared.
        chosen = choose_layers(sums.sum(0), keep)
        layers, cache = gather_layers(target, cache, chosen)
        return start_state(logits, prompt, lengths, sampling, keys,
                           SequenceAux(layers, cache, chosen), track_seen, cfg.vocab_size)

    def step(params, state):
        target = dataclasses.replace(params[0], layers=state.aux.layers)
        pos = jnp.minimum(state.positions, max_len - 1)
        logits, _, cache = phases.decode_step(target, state.aux.cache, state.tokens, pos,
                                              cfg=compact, impl=impl)
        nxt, state = sample_next(logits, state)
        aux = state.aux.replace(cache=cache)
        state = state.replace(tokens=nxt, positions=state.positions + 1, aux=aux)
        return state, StepOutput(nxt[:, None], jnp.ones_like(nxt))

    return Decoder(init=init, step=step)


def score_mod(params: Params, routers: Routers, capacity: jax.Array, tokens: jax.Array, *,
              cfg: ModelConfig, mode: str, keep: int = 0) -> tuple[jax.Array, jax.Array]:
    """Teacher-forced mixture-of-depths over whole sequences (quality metrics).

    Token mode routes every token by the causal threshold rule at `capacity` (what top-C
    routing of a large batch approaches). Sequence mode chooses each row's `keep` layers from
    its mean router probability over all its tokens (a full pass), then runs every token
    through those only.

    Returns:
      logits [B, T, V] f32 and computed [B, T] int32 layers per token.
    """
    if mode == "token":
        logits, _, computed = phases.score(params, tokens, cfg=cfg, track_writes=True,
                                           hooks=token_hooks(routers, capacity, "threshold"))
        return logits, computed
    valid = jnp.ones(tokens.shape, bool)
    *_, sums = phases.score(params, tokens, cfg=cfg, hooks=mean_router_probs(routers, valid, cfg))
    chosen = choose_layers(sums, keep)  # [B, C] per row
    on = jnp.zeros((tokens.shape[0], cfg.num_layers), bool).at[
        jnp.arange(tokens.shape[0])[:, None], chosen].set(True)  # [B, L]

    def before(c, x, layer):
        compute = jnp.broadcast_to(on[:, layer][:, None], x.shape[:2])
        return c, x, LayerControl(compute=compute)

    logits, _, _ = phases.score(params, tokens, cfg=cfg, hooks=LayerHooks(before=before))
    return logits, jnp.full(tokens.shape, keep, jnp.int32)


def load_routers(spec: str | Path, target: Model) -> Routers:
    """Routers for `target`: a `jdecode train router` artifact, or "untrained" (zero
    routers: every score ties, so top-C keeps the first rows and sequence mode the first
    layers; for smoke tests)."""
    if str(spec) == "untrained":
        cfg = target.cfg
        return Routers(jnp.zeros((cfg.num_layers, cfg.hidden_size)), jnp.zeros((cfg.num_layers,)),
                       jnp.zeros((cfg.num_layers, len(QUANTILE_LEVELS))))

    def abstract(manifest):
        cfg = target.cfg
        dt = jnp.dtype(cfg.dtype)
        return Routers(jax.ShapeDtypeStruct((cfg.num_layers, cfg.hidden_size), dt),
                       jax.ShapeDtypeStruct((cfg.num_layers,), dt),
                       jax.ShapeDtypeStruct((cfg.num_layers, len(QUANTILE_LEVELS)), dt))

    return artifacts.load_artifact(spec, ARTIFACT_KIND, target, abstract)[0]


@dataclasses.dataclass(frozen=True)
class MixtureOfDepthsOptions:
    routers: str = option("untrained", "a `jdecode train router` artifact (untrained: zero "
                          "routers, for smoke tests)")
    capacity: float = option(0.75, "share of tokens (token mode) or of layers (sequence "
                             "mode) that compute")
    mode: Literal["token", "sequence"] = option(
        "token", "token: per layer the routers pick tokens; sequence: layers chosen once at "
        "prefill, the others' weights never read")
    rule: Literal["top_c", "threshold"] = option(
        "top_c", "token mode: top_c (the top ceil(capacity * B) rows of the batch) or threshold "
        "(tokens above the layer's cut for capacity)")
    share_tokens: int = option(1024, "held-out prose tokens the reported layer_share of the "
                               "threshold rule is measured on (0: not measured)")

    def __post_init__(self) -> None:
        if not 0.0 < self.capacity <= 1.0:
            raise ValueError(f"capacity={self.capacity} must lie in (0, 1]")
        if self.share_tokens < 0:
            raise ValueError(f"share_tokens={self.share_tokens} must be >= 0")


@register("mixture_of_depths", MixtureOfDepthsOptions, lossless=False,
          summary="trained routers pick which tokens compute each layer (top-C rows per "
                  "layer), or which layers a sequence runs (Raposo et al. 2024)")
def build_mod(model: Model, opts: MixtureOfDepthsOptions, impl: str) -> MethodBuild:
    routers = load_routers(opts.routers, model)
    params = (model.params, routers, jnp.float32(opts.capacity))
    kw = {"cfg": model.cfg, "mode": opts.mode,
          "keep": sequence_layers(opts.capacity, model.cfg.num_layers)}

    def score(p, tokens):
        return score_mod(*p, tokens, **kw)[0]

    measured: dict[str, Any] = {}

    def describe(stats: dict) -> dict:
        if opts.mode == "sequence":
            return {"layer_share": kw["keep"] / model.cfg.num_layers}
        if opts.rule == "top_c":  # exact: ceil(capacity * B) of B rows compute every layer
            b = max(int(stats.get("batch", 1)), 1)
            return {"layer_share": math.ceil(opts.capacity * b - 1e-6) / b}
        if "layer_share" not in measured:
            measured["layer_share"] = heldout_layer_share(
                model, lambda p, t: score_mod(*p, t, **kw)[1], params, opts.share_tokens)
        return {} if measured["layer_share"] is None else dict(measured)

    return MethodBuild(
        dataclasses.replace(model, params=params),
        lambda cfg, max_len: mod_decoder(cfg, max_len, impl, opts.mode, opts.rule,
                                         opts.capacity),
        describe=describe, score=score)
