"""Early exit (CALM, Schuster et al. 2022): exit heads after some layers, a confidence measure
that decides per token whether to stop there, and the `early_exit` forward transform.

K/V rule for the layers a token skips: CALM's propagation. The exited hidden state is carried
unchanged through the remaining layers, and each skipped layer stores the K/V projections of
that state, so later tokens attend to a complete cache.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jdecode.cache.dense import DenseMeta, init_cache, make_dense_attend
from jdecode.config import ModelConfig
from jdecode.decoding.autoregressive import autoregressive
from jdecode.decoding.base import Decoder, StepOutput, sample_next
from jdecode.decoding.methods import MethodBuild, register
from jdecode.io import artifacts
from jdecode.io.registry import Model
from jdecode.model.layers import rms_norm, rope_tables
from jdecode.model.linear import make_linear
from jdecode.model.params import Params
from jdecode.model.transformer import LayerControl, LayerHooks, lm_head, run_layers
from jdecode.options import option

ARTIFACT_KIND = "exits"
# Exit when the measure passes the threshold: entropy <= threshold (nats); the others >= it.
# "fixed": every token leaves at one exit (LayerSkip's draft; the later layers are never run).
CRITERIA = ("entropy", "margin", "saturation", "classifier", "fixed")
BATCHING = ("row", "batch")
NEVER = {"entropy": -1.0, "margin": 2.0, "saturation": 2.0, "classifier": 2.0}


@struct.dataclass
class ExitHeads:
    """Exit points after `layers`: a norm and a low-rank adapter per exit feed the model's own
    LM head; a linear classifier per exit predicts whether exiting gives the full model's token.
    """

    norm: jax.Array  # [N, E] RMSNorm weight (starts as the final norm's)
    down: jax.Array  # [N, E, R] adapter h + (h @ down) @ up
    up: jax.Array  # [N, R, E] (starts at zero: an untrained exit is the final norm + head)
    cls_w: jax.Array  # [N, E] classifier over the exit's head input
    cls_b: jax.Array  # [N]
    layers: tuple[int, ...] = struct.field(pytree_node=False, default=())  # ascending


def exit_layers(num_layers: int, every: int) -> tuple[int, ...]:
    """Exits after layers every-1, 2*every-1, ... below the last layer (which is the model)."""
    if not 1 <= every < num_layers:
        raise ValueError(f"every={every}: place an exit every 1..{num_layers - 1} layers")
    return tuple(range(every - 1, num_layers - 1, every))


def init_exits(params: Params, layers: tuple[int, ...], rank: int, key: jax.Array
               ) -> ExitHeads:
    """Untrained exits: the final norm at every exit, a zero adapter and a neutral classifier."""
    n, e = len(layers), params.final_norm.shape[0]
    dt = params.final_norm.dtype
    return ExitHeads(norm=jnp.broadcast_to(params.final_norm, (n, e)).astype(dt),
                     down=(jax.random.normal(key, (n, e, rank)) / np.sqrt(e)).astype(dt),
                     up=jnp.zeros((n, rank, e), dt), cls_w=jnp.zeros((n, e), dt),
                     cls_b=jnp.zeros((n,), dt), layers=tuple(layers))


def adapted(x: jax.Array, norm: jax.Array, down: jax.Array, up: jax.Array, eps: float
            ) -> jax.Array:
    """An exit's head input: the norm, then the low-rank adapter. x [B, T, E] -> [B, T, E]."""
    h = rms_norm(x, norm, eps)
    return h + jnp.einsum("btr,re->bte", jnp.einsum("bte,er->btr", h, down), up)


def exit_hidden(heads: ExitHeads, j: int, x: jax.Array, eps: float) -> jax.Array:
    """The head input of exit j for x [B, T, E]."""
    return adapted(x, heads.norm[j], heads.down[j], heads.up[j], eps)


def exit_logits(params: Params, heads: ExitHeads, j: int, x: jax.Array, eps: float
                ) -> jax.Array:
    """Logits [B, T, V] f32 of exit j for the residual stream x [B, T, E]."""
    return lm_head(params, exit_hidden(heads, j, x, eps))


def exit_score(criterion: str, params: Params, heads: ExitHeads, j: int, x_in: jax.Array,
               x_out: jax.Array, eps: float) -> jax.Array:
    """Confidence [B, T] f32 at exit j (after the layer mapping x_in to x_out), higher is more
    confident; compared with `score_threshold(criterion, threshold)`.

    entropy: minus the entropy of the exit's distribution (the lecture's rule). margin: top-1
    minus top-2 probability. saturation: cosine similarity of the layer's input and output
    (CALM's hidden-state saturation; needs no head). classifier: the trained probability that
    the exit's argmax is the full model's.
    """
    if criterion == "saturation":
        a, b = x_in.astype(jnp.float32), x_out.astype(jnp.float32)
        return jnp.sum(a * b, -1) * jax.lax.rsqrt(
            jnp.sum(a * a, -1) * jnp.sum(b * b, -1) + 1e-12)
    h = exit_hidden(heads, j, x_out, eps)
    if criterion == "classifier":
        return jax.nn.sigmoid(classifier_logit(heads, j, h))
    logp = jax.nn.log_softmax(lm_head(params, h), axis=-1)
    if criterion == "entropy":
        return jnp.sum(jnp.exp(logp) * logp, axis=-1)
    if criterion == "margin":
        return top2_margin(jnp.exp(logp))
    raise ValueError(f"criterion={criterion!r}: choose one of {', '.join(CRITERIA)}")


def top2_margin(p: jax.Array) -> jax.Array:
    """Largest minus second-largest of p [..., V] along V (0 on a tie for the top).

    Two max reductions rather than `lax.top_k`, which XLA:CPU lowers to a sort of the whole
    vocabulary per token and exit (minutes per calibration pass on the default model).
    """
    first = jnp.argmax(p, axis=-1)[..., None]
    others = jnp.where(jnp.arange(p.shape[-1]) == first, -jnp.inf, p)
    return jnp.max(p, axis=-1) - jnp.max(others, axis=-1)


def classifier_logit(heads: ExitHeads, j: int, h: jax.Array) -> jax.Array:
    """CALM's exit classifier: logit [B, T] f32 that exit j's token is the full model's."""
    return (jnp.einsum("bte,e->bt", h, heads.cls_w[j], preferred_element_type=jnp.float32)
            + heads.cls_b[j].astype(jnp.float32))


def score_threshold(criterion: str, threshold: float | jax.Array) -> float | jax.Array:
    """The threshold in `exit_score`'s units (exit where score >= it)."""
    return -threshold if criterion == "entropy" else threshold


def layers_computed(heads: ExitHeads, exit_id: jax.Array, num_layers: int) -> jax.Array:
    """Layers each token ran [B, T] int32: through its exit's layer, or all of them (N)."""
    depth = jnp.asarray([*(layer + 1 for layer in heads.layers), num_layers], jnp.int32)
    return depth[exit_id]


def segments(heads: ExitHeads, num_layers: int) -> tuple[int, ...]:
    """Layer bounds of the runs between exits: segment s is layers [b[s], b[s+1]), and exit
    s follows segment s."""
    return (0, *(layer + 1 for layer in heads.layers), num_layers)


# The hooks of a segment: masked compute for exited tokens ([B, T] bool carry), and the input
# of the segment's last layer kept for the saturation measure.
_MASK_EXITED = LayerHooks(
    before=lambda c, x, layer: (c, x, LayerControl(compute=~c[0])),
    after=lambda c, x_in, x_out, layer: ((c[0], x_in), x_out))


def row_exit_layers(params: Params, heads: ExitHeads, threshold: jax.Array, x: jax.Array,
                    cos: jax.Array, sin: jax.Array, cache: Any, meta: Any, *,
                    cfg: ModelConfig, attend: Any, linear: Any, criterion: str
                    ) -> tuple[jax.Array, Any, jax.Array]:
    """Per-token exits with masked compute over the residual stream x [B, T, E].

    The layers run in segments between exits; after each, every token still running checks its
    confidence, and one that passes keeps its residual stream unchanged through the remaining
    layers, which still store K/V projections of it (CALM's propagation).

    Returns:
      the final residual stream x (exited tokens: their exit's), the cache, and exit_id
      [B, T] int32 (N: no exit).
    """
    n, thr = len(heads.layers), score_threshold(criterion, threshold)
    bounds = segments(heads, cfg.num_layers)
    exited = jnp.zeros(x.shape[:2], bool)
    exit_id = jnp.full(x.shape[:2], n, jnp.int32)
    for s in range(n + 1):
        x, cache, (_, x_in) = run_layers(params, x, cos, sin, cache, meta, hooks=_MASK_EXITED,
                                         carry=(exited, x), start=bounds[s],
                                         stop=bounds[s + 1], cfg=cfg, attend=attend,
                                         linear=linear)
        if s < n:
            conf = exit_score(criterion, params, heads, s, x_in, x, cfg.rms_norm_eps)
            leave = ~exited & (conf >= thr)
            exited, exit_id = exited | leave, jnp.where(leave, s, exit_id)
    return x, cache, exit_id


def exit_output(params: Params, heads: ExitHeads, x: jax.Array, exit_id: jax.Array,
                eps: float) -> jax.Array:
    """Logits [B, T, V] f32: each token's exit head on its (frozen) residual stream x [B, T, E],
    or the model's final norm and head where exit_id [B, T] is N (no exit)."""
    # Every exit's head input at once ([N+1, B, T, E], the final norm as exit N: a few
    # kernels whatever N is), then one LM head for every token.
    norms = jnp.concatenate([heads.norm, params.final_norm[None]])  # [N+1, E]
    down = jnp.concatenate([heads.down, jnp.zeros_like(heads.down[:1])])  # [N+1, E, R]
    up = jnp.concatenate([heads.up, jnp.zeros_like(heads.up[:1])])
    h = jax.vmap(lambda n, d, u: adapted(x, n, d, u, eps))(norms, down, up)
    hidden = jnp.take_along_axis(h, exit_id[None, :, :, None], axis=0)[0]  # [B, T, E]
    return lm_head(params, hidden)


def early_exit(params: Params, heads: ExitHeads, threshold: jax.Array, tokens: jax.Array,
               positions: jax.Array, cache: Any, meta: Any, *, cfg: ModelConfig, attend: Any,
               linear: Any, criterion: str, batching: str = "row", exit_index: int = 0
               ) -> tuple[jax.Array, Any, jax.Array]:
    """The early-exit forward transform over any cache `attend` writes.

    Args:
      tokens, positions: [B, T] int32. threshold: f32 scalar (see `CRITERIA`).
      batching: "row": every token exits on its own, with masked compute (the weights of the
        remaining layers are still read). "batch": the whole batch exits at the first exit
        where every token passes, and the remaining layers are skipped under `lax.cond`: only
        their norm and K/V columns are read, to propagate K/V (one host sync per exit on
        XLA:GPU unless command buffers run the conditionals).
      exit_index: with criterion "fixed", the exit every token leaves at. The layers after it
        are not run and store no K/V: no token of a fixed-depth decode ever reads them.
    Returns:
      logits [B, T, V] f32, the cache, and computed [B, T] int32 (layers each token ran).
    """
    x = params.embed[tokens]  # [B, T, E]
    cos, sin = rope_tables(positions, cfg)
    kw = {"cfg": cfg, "attend": attend, "linear": linear}
    eps = cfg.rms_norm_eps
    if criterion == "fixed":
        depth = heads.layers[exit_index] + 1
        x, cache, _ = run_layers(params, x, cos, sin, cache, meta, stop=depth, **kw)
        return (exit_logits(params, heads, exit_index, x, eps), cache,
                jnp.full(tokens.shape, depth, jnp.int32))
    if batching == "row":
        x, cache, exit_id = row_exit_layers(params, heads, threshold, x, cos, sin, cache, meta,
                                            criterion=criterion, **kw)
        return (exit_output(params, heads, x, exit_id, eps), cache,
                layers_computed(heads, exit_id, cfg.num_layers))
    if batching != "batch":
        raise ValueError(f"batching={batching!r}: choose one of {', '.join(BATCHING)}")
    x, cache, exit_id = batch_exit_layers(params, heads, threshold, x, cos, sin, cache, meta,
                                          criterion=criterion, **kw)
    exit_ids = jnp.full(tokens.shape, exit_id)
    return (exit_output(params, heads, x, exit_ids, eps), cache,
            layers_computed(heads, exit_ids, cfg.num_layers))


def batch_exit_layers(params: Params, heads: ExitHeads, threshold: jax.Array, x: jax.Array,
                      cos: jax.Array, sin: jax.Array, cache: Any, meta: Any, *,
                      cfg: ModelConfig, attend: Any, linear: Any, criterion: str
                      ) -> tuple[jax.Array, Any, jax.Array]:
    """Per-batch exits over the residual stream x [B, T, E]: the batch leaves at the first exit
    where every token passes, and each later segment runs under `lax.cond` as K/V propagation
    only (`run_layers(kv_only=True)`: the layers' norms and K/V columns are read, nothing else).

    Returns:
      the final residual stream, the cache and the exit, an int32 scalar (N: no exit).
    """
    n, thr = len(heads.layers), score_threshold(criterion, threshold)
    bounds = segments(heads, cfg.num_layers)
    kw = {"cfg": cfg, "attend": attend, "linear": linear}
    # The input of each segment's last layer, for the saturation measure.
    keep_in = LayerHooks(after=lambda c, x_in, x_out, layer: (x_in, x_out))

    def segment(s, x, cache):  # layers of segment s, then the check at exit s (if any)
        x, cache, x_in = run_layers(params, x, cos, sin, cache, meta, hooks=keep_in, carry=x,
                                    start=bounds[s], stop=bounds[s + 1], **kw)
        if s == n:
            return x, cache, jnp.int32(n)
        ok = jnp.all(exit_score(criterion, params, heads, s, x_in, x, cfg.rms_norm_eps) >= thr)
        return x, cache, jnp.where(ok, jnp.int32(s), jnp.int32(n))

    x, cache, exit_id = segment(0, x, cache)
    for s in range(1, n + 1):
        def skip(op, s=s):  # exited: only propagate K/V through this segment
            x, cache, e = op
            return x, run_layers(params, x, cos, sin, cache, meta, start=bounds[s],
                                 stop=bounds[s + 1], kv_only=True, **kw)[1], e

        def compute(op, s=s):
            return segment(s, op[0], op[1])

        # On XLA:GPU the predicate goes to the host, once per exit, unless command buffers
        # run the conditional on the device.
        x, cache, exit_id = jax.lax.cond(exit_id < n, skip, compute, (x, cache, exit_id))
    return x, cache, exit_id


def score_early_exit(params: Params, heads: ExitHeads, threshold: jax.Array, tokens: jax.Array,
                     *, cfg: ModelConfig, criterion: str, exit_index: int = 0
                     ) -> tuple[jax.Array, jax.Array]:
    """Teacher-forced per-token early exit over whole sequences with a fresh cache (quality
    metrics, calibration): what batch 1 decodes in either batching, token by token.

    Returns:
      logits [B, T, V] f32 and computed [B, T] int32 layers per token.
    """
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    logits, _, computed = early_exit(
        params, heads, threshold, tokens, positions, init_cache(cfg, b, t),
        DenseMeta(positions), cfg=cfg, attend=make_dense_attend(cfg), linear=make_linear("xla"),
        criterion=criterion, exit_index=exit_index)
    return logits, computed


@struct.dataclass
class ExitAux:
    cache: Any  # the dense cache; skipped layers hold propagated K/V
    computed: jax.Array  # [B] int32 layers computed by this row's decode steps so far
    steps: jax.Array  # [B] int32 decode steps so far


def early_exit_decoder(cfg: ModelConfig, max_len: int, impl: str = "xla",
                       criterion: str = "entropy", batching: str = "row", exit_index: int = 0
                       ) -> Decoder:
    """Decoding with `early_exit` after a full prefill (prompt tokens run every layer).

    `params` is `(target_params, ExitHeads, threshold)`; the threshold is an f32 array, so
    decoders that differ only in it share one compiled executable. `aux` (`ExitAux`) counts
    each row's layer computations.
    """
    base = autoregressive(cfg, max_len, impl)
    attend, linear = make_dense_attend(cfg, impl), make_linear(impl)

    def init(params, prompt, lengths, sampling, keys, track_seen=False):
        target, _, _ = params
        state = base.init(target, prompt, lengths, sampling, keys, track_seen)
        zeros = jnp.zeros((prompt.shape[0],), jnp.int32)
        return state.replace(aux=ExitAux(state.aux, zeros, zeros))

    def step(params, state):
        target, heads, threshold = params
        # Clamp so rows that finished long ago keep writing inside the buffer.
        pos = jnp.minimum(state.positions, max_len - 1)[:, None]  # [B, 1]
        logits, cache, computed = early_exit(
            target, heads, threshold, state.tokens[:, None], pos, state.aux.cache,
            DenseMeta(pos), cfg=cfg, attend=attend, linear=linear, criterion=criterion,
            batching=batching, exit_index=exit_index)
        nxt, state = sample_next(logits[:, 0], state)
        aux = ExitAux(cache, state.aux.computed + computed[:, 0], state.aux.steps + 1)
        state = state.replace(tokens=nxt, positions=state.positions + 1, aux=aux)
        return state, StepOutput(nxt[:, None], jnp.ones_like(nxt))

    return Decoder(init=init, step=step)


def load_exits(spec: str | Path, target: Model) -> tuple[ExitHeads, dict]:
    """Exit heads for `target`: a `jdecode train exits` artifact, or "untrained:N" (the final
    norm after every N-th layer, no adapter: LayerSkip's shared head without training).

    Returns:
      (heads, manifest); the manifest is empty for untrained exits.
    """
    spec = str(spec)
    if spec.startswith("untrained:"):
        every = spec.split(":", 1)[1]
        if not every.isdigit():
            raise ValueError(f"exits={spec!r}: write untrained:N, N the layers between exits")
        layers = exit_layers(target.cfg.num_layers, int(every))
        return init_exits(target.params, layers, 0, jax.random.key(0)), {}

    def abstract(manifest):
        layers, rank = tuple(manifest["options"]["layers"]), manifest["options"]["rank"]
        return jax.eval_shape(lambda: init_exits(target.params, layers, rank,
                                                 jax.random.key(0)))

    return artifacts.load_artifact(spec, ARTIFACT_KIND, target, abstract)


def calibrated_threshold(manifest: dict, criterion: str, agreement: float) -> float:
    """The artifact's calibrated threshold for `criterion`: of the thresholds whose held-out
    top-1 agreement with the full model reaches `agreement`, the one computing fewest layers
    (the most conservative one when none does).

    The curve measured with the method itself (K/V propagated, "calibration_propagated") is
    used when the artifact has it; older artifacts have only the curve read off the full
    model's states ("calibration"), which overstates agreement.
    """
    metrics = manifest.get("metrics", {})
    curve = (metrics.get("calibration_propagated", {}).get(criterion)
             or metrics.get("calibration", {}).get(criterion))
    if not curve:
        raise ValueError(f"no calibrated {criterion} threshold in these exits: set threshold "
                         "explicitly, or train the exits with `jdecode train exits`")
    ok = [p for p in curve if p["top1"] >= agreement]
    best = min(ok, key=lambda p: p["layer_share"]) if ok else max(curve, key=lambda p: p["top1"])
    return float(best["threshold"])


def heldout_layer_share(model: Model, computed_fn: Callable[[Any, jax.Array], jax.Array],
                        params: Any, n_tokens: int, row_len: int = 128) -> float | None:
    """Share of the model's layer computations a lossy depth method runs per token, measured
    teacher-forced on held-out prose (`jdecode.data.heldout`), the text perplexity uses.

    Args:
      computed_fn: (params, tokens [B, T]) -> layers computed per token [B, T] (jitted here;
        params go in as an argument, not baked into the program). n_tokens: about this many
        tokens, in rows of row_len. Returns None without a tokenizer or with n_tokens 0.
    """
    from jdecode.data.heldout import prose_paragraphs

    if model.tokenizer is None or n_tokens <= 0:
        return None
    rows = [model.tokenizer.encode(p)[:row_len]
            for p in prose_paragraphs(max(1, -(-n_tokens // row_len)))]
    tokens = np.zeros((len(rows), row_len), np.int32)
    mask = np.zeros((len(rows), row_len), np.float32)
    for i, r in enumerate(rows):
        tokens[i, :len(r)], mask[i, :len(r)] = r, 1.0
    computed = np.asarray(jax.jit(computed_fn)(params, jnp.asarray(tokens)), np.float32)
    return float((computed * mask).sum() / mask.sum() / model.cfg.num_layers)


@dataclasses.dataclass(frozen=True)
class EarlyExitOptions:
    exits: str = option("untrained:3", "a `jdecode train exits` artifact, or untrained:N (the "
                        "model's final norm and head after every N-th layer)")
    criterion: Literal["entropy", "margin", "saturation", "classifier", "fixed"] = option(
        "entropy", "classifier is CALM's trained one; fixed: every token leaves at exit_layer")
    threshold: float | None = option(None, "exit where entropy <= threshold (nats), or margin / "
                                     "saturation / classifier >= threshold; null: the "
                                     "artifact's threshold calibrated for `agreement`")
    agreement: float = option(0.95, "held-out top-1 agreement with the full model that picks "
                              "the calibrated threshold")
    batching: Literal["row", "batch"] = option(
        "row", "row: each token exits alone, masked compute; batch: the batch exits together and "
        "skips the rest under lax.cond")
    exit_layer: int | None = option(None, "with criterion fixed: layers every token runs "
                                    "(an exit must follow layer exit_layer - 1)")
    share_tokens: int = option(1024, "held-out prose tokens the reported layer_share is "
                               "measured on (0: not measured)")

    def __post_init__(self) -> None:
        if not 0.0 < self.agreement <= 1.0:
            raise ValueError(f"agreement={self.agreement} must lie in (0, 1]")
        if self.criterion == "fixed" and self.exit_layer is None:
            raise ValueError("criterion=fixed needs exit_layer: the layers every token runs")
        if self.share_tokens < 0:
            raise ValueError(f"share_tokens={self.share_tokens} must be >= 0")


def resolve_exit(heads: ExitHeads, exit_layer: int) -> int:
    """The index of the exit after layer exit_layer - 1 (the first exit_layer layers)."""
    if exit_layer - 1 not in heads.layers:
        depths = ", ".join(str(layer + 1) for layer in heads.layers)
        raise ValueError(f"exit_layer={exit_layer}: these exits follow {depths} layers; "
                         "choose one of them")
    return heads.layers.index(exit_layer - 1)


@register("early_exit", EarlyExitOptions, lossless=False,
          summary="exit heads after some layers; a token stops at the first whose confidence "
                  "passes a threshold, skipped layers' K/V propagated (CALM, Schuster et al. "
                  "2022)")
def build_early_exit(model: Model, opts: EarlyExitOptions, impl: str) -> MethodBuild:
    heads, manifest = load_exits(opts.exits, model)
    exit_index, threshold = 0, 0.0
    if opts.criterion == "fixed":
        exit_index = resolve_exit(heads, opts.exit_layer)
    elif opts.threshold is not None:
        threshold = opts.threshold
    else:
        threshold = calibrated_threshold(manifest, opts.criterion, opts.agreement)
    kw = {"cfg": model.cfg, "criterion": opts.criterion, "exit_index": exit_index}
    params = (model.params, heads, jnp.float32(threshold))

    def score(p, tokens):
        return score_early_exit(*p, tokens, **kw)[0]

    measured: dict[str, Any] = {}

    def describe(stats: dict) -> dict:
        if "layer_share" not in measured:
            measured["layer_share"] = heldout_layer_share(
                model, lambda p, t: score_early_exit(*p, t, **kw)[1], params,
                opts.share_tokens)
        out = {"threshold": threshold, "exits": len(heads.layers)}
        if measured["layer_share"] is not None:
            out["layer_share"] = measured["layer_share"]
        return out

    return MethodBuild(
        dataclasses.replace(model, params=params),
        lambda cfg, max_len: early_exit_decoder(cfg, max_len, impl, opts.criterion,
                                                opts.batching, exit_index),
        describe=describe, score=score)
