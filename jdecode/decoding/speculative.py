"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a drafter proposes k tokens,
the target scores all k+1 positions in one `verify` pass, and an acceptance rule keeps a prefix.

The rule is pluggable (`ChainAcceptFn`): `exact_accept` is the lossless one; `deferral_accept`
turns the same step into a token-level speculative cascade (Narasimhan et al. 2025), whose
target is the mixture of draft and target distributions that a deferral rule picks per token.
`params` of the resulting Decoder is the pytree `(target_params, draft_params)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jdecode.analysis.spec_cost import expected_tokens
from jdecode.config import ModelConfig
from jdecode.decoding import phases
from jdecode.decoding.autoregressive import autoregressive
from jdecode.decoding.base import (
    Decoder,
    StepOutput,
    by_batch,
    parse_k_plan,
    plan_lookup,
    split_keys,
)
from jdecode.decoding.draft_model import load_draft
from jdecode.decoding.drafters import (
    Drafter,
    filtered_probs,
    model_drafter,
    ngram_drafter,
    ngram_model_drafter,
)
from jdecode.decoding.methods import MethodBuild, register
from jdecode.decoding.sampling import SamplingArrays
from jdecode.decoding.self_speculative import build_self_draft
from jdecode.io.registry import Model
from jdecode.model.attention import resolve_impl
from jdecode.options import option


@struct.dataclass
class SpecAux:
    cache: Any  # target dense cache [L, B, S, K, D]; slots < positions hold accepted tokens
    draft: Any  # the drafter's own state (draft cache, n-gram context, ...)
    prev: jax.Array  # [B] int32 token at positions - 1 (the drafter re-feeds it)


def greedy_accept(draft: jax.Array, logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Longest prefix of the draft that matches the target's argmax, plus the target's next token.

    Args:
      draft: [B, k] int32. logits: [B, k+1, V] target logits at the k+1 verified positions.
    Returns:
      tokens [B, k+1] int32 (the target's argmax: equal to the draft on the accepted prefix)
      and num_accepted [B] int32 in [1, k+1] (accepted drafts + 1).
    """
    target = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, k+1]
    match = draft == target[:, :-1]  # [B, k]
    return target, 1 + jnp.cumprod(match, axis=1).sum(1).astype(jnp.int32)


def sampled_accept(key: jax.Array, draft: jax.Array, q: jax.Array, p: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
    """The lossless rule for one row: the emitted tokens are distributed exactly as the target's.

    Draft x_i is accepted with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection
    the token is drawn from norm(max(0, p_i - q_i)); if all k are accepted, from p_k.

    Args:
      key: one PRNG key. draft: [k] int32. q: [k, V] draft probabilities the draft was drawn
        from. p: [k+1, V] target probabilities (after the same temperature/top-k/top-p/min-p).
    Returns:
      tokens [k+1] int32 (first num_accepted valid) and num_accepted int32 in [1, k+1].
    """
    k = draft.shape[0]
    k_accept, k_resample = jax.random.split(key)
    u = jax.random.uniform(k_accept, (k,))
    idx = jnp.arange(k)
    # u < p/q written as u * q < p: no division, and q > 0 for any token the draft drew.
    accept = u * q[idx, draft] < p[idx, draft]  # [k]
    n = jnp.cumprod(accept).sum().astype(jnp.int32)  # accepted drafts, in [0, k]
    # Position k has q = 0, so its residual is p_k itself: the bonus token.
    q_ext = jnp.concatenate([q, jnp.zeros_like(q[:1])], axis=0)  # [k+1, V]
    residual = jnp.maximum(p[n] - q_ext[n], 0.0)  # [V]
    # p == q makes the residual all zero, but then rejection has probability 0; guard the
    # float case where rounding rejected anyway by falling back to p.
    residual = jnp.where(residual.sum() > 0, residual, p[n])
    x = jax.random.categorical(k_resample, jnp.log(residual)).astype(jnp.int32)
    pos = jnp.arange(k + 1)
    draft_ext = jnp.concatenate([draft, jnp.zeros((1,), jnp.int32)])
    return jnp.where(pos < n, draft_ext, x), n + 1


def accept_tokens(draft: jax.Array, q: jax.Array | None, logits: jax.Array, sp: SamplingArrays,
                  keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per row: the greedy rule where temperature == 0, the lossless sampling rule elsewhere.

    draft: [B, k]; q: [B, k, V] or None (one-hot on draft); logits: [B, k+1, V] target logits;
    sp: [B] sampling parameters; keys: [B]. Returns tokens [B, k+1] and num_accepted [B].
    """
    greedy = greedy_accept(draft, logits)

    def sampled(_):
        p = filtered_probs(logits, sp)  # [B, k+1, V]
        qq = jax.nn.one_hot(draft, logits.shape[-1], dtype=p.dtype) if q is None else q
        toks, num = jax.vmap(sampled_accept)(keys, draft, qq, p)
        is_sampled = sp.temperature > 0
        return (jnp.where(is_sampled[:, None], toks, greedy[0]),
                jnp.where(is_sampled, num, greedy[1]))

    # An all-greedy batch never sorts the vocabulary (the common benchmark case).
    return jax.lax.cond(jnp.any(sp.temperature > 0), sampled, lambda _: greedy, None)


# rule(draft [B, k], q [B, k, V] | None, logits [B, k+1, V], sampling, keys [B] | None)
#   -> (tokens [B, k+1] int32, num_accepted [B] int32 in [1, k+1]); keys None: every row is
#   greedy (static), so the rule must not branch on the device.
ChainAcceptFn = Callable[[jax.Array, jax.Array | None, jax.Array, SamplingArrays,
                          jax.Array | None], tuple[jax.Array, jax.Array]]


def exact_accept(draft: jax.Array, q: jax.Array | None, logits: jax.Array, sp: SamplingArrays,
                 keys: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """The lossless rule (a `ChainAcceptFn`): `greedy_accept` for a batch known to be greedy
    (keys None), else `accept_tokens` (greedy rows greedy, sampled rows by rejection)."""
    if keys is None:
        return greedy_accept(draft, logits)
    return accept_tokens(draft, q, logits, sp, keys)


def deferral_accept(defer: Callable[[jax.Array, jax.Array], jax.Array]) -> ChainAcceptFn:
    """The token-level speculative cascade (Narasimhan et al. 2025, Algorithm "SpecCascade").

    At drafted position i the target of verification is pi_i = q_i where defer(q_i, p_i) is
    False (the draft model's answer stands: its token is always accepted) and p_i where it is
    True (plain speculative decoding there); the bonus position has no draft and uses p. Then
    the usual rule runs on pi: greedy rows emit argmax pi, sampled rows keep the draft with
    probability min(1, pi/q) and resample from norm(max(0, pi - q)), so the output follows pi
    exactly. A rule that always defers gives exactly `exact_accept`. LOSSY otherwise.

    q and p are the distributions each row samples from (`filtered_probs`); greedy rows use
    the unscaled softmax, so the rule still sees each model's confidence.

    Args:
      defer: delta(q [..., V], p [..., V]) -> [...] bool (`deferral.token_deferral`).
    Returns:
      a `ChainAcceptFn`; it needs q on every row (`model_drafter(..., with_probs=True)`).
    """

    def accept(draft, q, logits, sp, keys):
        if q is None:
            raise ValueError("a speculative cascade's deferral rule reads the draft model's "
                             "distribution, and this drafter gives none (prompt lookup, or a "
                             "model drafter built without with_probs=True): draft with a model")
        soft = jax.nn.softmax(logits, axis=-1)  # [B, k+1, V] what greedy rows' rules read

        def mixture(p):  # p [B, k+1, V] -> (pi [B, k+1, V], defer [B, k])
            d = defer(q, p[:, :-1])
            pi = jnp.concatenate([jnp.where(d[..., None], p[:, :-1], q), p[:, -1:]], axis=1)
            return pi, d

        def greedy_rows(_):
            # argmax pi: the target's argmax where deferring, else the draft itself (the
            # draft's argmax, without trusting a softmax to keep its ties).
            _, d = mixture(soft)
            target = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, k+1]
            choice = jnp.where(d, target[:, :-1], draft)  # [B, k]
            tokens = jnp.concatenate([choice, target[:, -1:]], axis=1)
            return tokens, 1 + jnp.cumprod(choice == draft, axis=1).sum(1).astype(jnp.int32)

        if keys is None:
            return greedy_rows(None)

        def sampled(_):
            is_sampled = sp.temperature > 0
            p = jnp.where(is_sampled[:, None, None], filtered_probs(logits, sp), soft)
            pi, _ = mixture(p)
            toks, num = jax.vmap(sampled_accept)(keys, draft, q, pi)
            g_toks, g_num = greedy_rows(None)
            return (jnp.where(is_sampled[:, None], toks, g_toks),
                    jnp.where(is_sampled, num, g_num))

        if sp.specialized:  # known on the host: some row samples
            return sampled(None)
        return jax.lax.cond(jnp.any(sp.temperature > 0), sampled, greedy_rows, None)

    return accept


def speculative(cfg: ModelConfig, drafter: Drafter, k: int, max_len: int, impl: str = "xla",
                greedy: bool = False, accept: ChainAcceptFn = exact_accept) -> Decoder:
    """Speculative decoding of the target `cfg` with `drafter` proposing k tokens per step.

    Both caches roll back for free: `positions` advances only past accepted tokens, and the
    dense cache never shows a query a slot beyond its own position. Verified slots past the
    buffer end are dropped by the cache write, and so are the tokens they would predict (they
    lie past max_new_tokens), so the target cache needs no extra slots.

    Args:
      cfg: target model config. drafter: see `drafters.Drafter`. k: drafted tokens per step.
      max_len: cache slots per sequence. impl: attention implementation. greedy: promise that
        every row is greedy (temperature 0), so the step is specialized statically: no key
        splits and no `lax.cond` (each costs a device-to-host sync on GPU). A `SamplingArrays`
        marked `all_greedy` (static metadata) specializes the step the same way.
      accept: the acceptance rule (`exact_accept`: lossless; `deferral_accept`: a cascade).
    Returns:
      a Decoder whose `params` are `(target_params, draft_params)` and whose steps emit up to
      k+1 tokens.
    """
    if k < 1:
        raise ValueError(f"k={k}: speculative decoding drafts at least 1 token per step; use "
                         "the autoregressive method for k = 0")
    base = autoregressive(cfg, max_len, impl)

    def _split(params):
        if not (isinstance(params, tuple) and len(params) == 2):
            raise TypeError("speculative decoding takes params=(target_params, draft_params); "
                            f"got {type(params).__name__}: build the Model with "
                            "`speculative_model(...)`")
        return params

    def init(params, prompt, lengths, sampling, keys, track_seen=False):
        if track_seen:
            raise ValueError("repetition_penalty != 1 is not supported by speculative decoding "
                             "(the penalty would change inside one verified block): set it to "
                             "1 or use the autoregressive method")
        target_params, draft_params = _split(params)
        state = base.init(target_params, prompt, lengths, sampling, keys)
        prev = prompt[jnp.arange(prompt.shape[0]), lengths - 1]
        aux = SpecAux(state.aux, drafter.init(draft_params, prompt, lengths), prev)
        return state.replace(aux=aux)

    def step(params, state):
        target_params, draft_params = _split(params)
        aux = state.aux
        # Static: the caller's promise, or a batch the Generator marked all greedy.
        all_greedy = greedy or getattr(state.sampling, "all_greedy", False)
        if all_greedy:
            keys, draft_keys = state.keys, None
        else:
            keys, now = split_keys(state.keys)
            pairs = jax.vmap(lambda key: jax.random.split(key, 2))(now)  # [B, 2]
            draft_keys = pairs[:, 0]
        pos = state.positions[:, None] + jnp.arange(k + 1)  # [B, k+1]
        if drafter.draft_and_score is None:
            draft, q, draft_aux = drafter.propose(draft_params, aux.draft, state.tokens,
                                                  aux.prev, state.positions, state.sampling,
                                                  draft_keys, k)
            seq = jnp.concatenate([state.tokens[:, None], draft], axis=1)  # [B, k+1]
            logits, _, cache = phases.verify(target_params, aux.cache, seq, pos, cfg=cfg,
                                             impl=impl)
        else:  # self-speculation: the drafter shares the target's cache and scores the block
            draft, q, logits, cache, draft_aux = drafter.draft_and_score(
                target_params, draft_params, aux.draft, aux.cache, state.tokens, aux.prev,
                state.positions, state.sampling, draft_keys, k)
            seq = jnp.concatenate([state.tokens[:, None], draft], axis=1)
        tokens, num = accept(draft, q, logits, state.sampling,
                             None if all_greedy else pairs[:, 1])
        rows = jnp.arange(seq.shape[0])
        # The next token is the last emitted one; the one before it (now the newest context
        # token) is seq[num - 1]: the input token or the last accepted draft.
        state = state.replace(tokens=tokens[rows, num - 1], positions=state.positions + num,
                              keys=keys, aux=SpecAux(cache, draft_aux, seq[rows, num - 1]))
        return state, StepOutput(tokens, num)

    return Decoder(init=init, step=step)


def speculative_model(target: Model, draft_params: Any) -> Model:
    """The target `Model` with params `(target_params, draft_params)`, for `Generator`."""
    return dataclasses.replace(target, params=(target.params, draft_params))


DecoderFn = Callable[[ModelConfig, int], Decoder]


def build_speculative(target: Model, draft: str | Model, k: int, impl: str = "auto",
                      max_ngram: int = 3, greedy: bool = False, with_ngram: bool = False,
                      accept: ChainAcceptFn = exact_accept, draft_probs: bool = False
                      ) -> tuple[Model, DecoderFn]:
    """What `Generator` needs to decode `target` speculatively.

    Args:
      target: the loaded target model. draft: "ngram" (prompt lookup), "self:E[:EXITS]"
        (the target's first E layers and an exit head, `self_speculative`), a loaded `Model`,
        or a name/path: a trained draft artifact (`jdecode train draft`), an HF directory or
        a .gguf file. k: drafted tokens per step. max_ngram: longest n-gram prompt lookup matches.
      greedy: every request will be greedy (see `speculative`). with_ngram: a model draft
        gives way to prompt lookup where a 2+-gram matches (`ngram_model_drafter`).
      accept: the acceptance rule (see `speculative`). draft_probs: the draft model reports
        its distribution on greedy rows too (a `deferral_accept` rule reads it).
    Returns:
      (model, decoder_fn): pass both to `Generator(model, decoder_fn=...)`.
    """
    model, decoder_fn_for = speculative_parts(target, draft, impl, max_ngram, greedy,
                                              with_ngram, accept, draft_probs)
    return model, decoder_fn_for(k)


def speculative_parts(target: Model, draft: str | Model, impl: str = "auto",
                      max_ngram: int = 3, greedy: bool = False, with_ngram: bool = False,
                      accept: ChainAcceptFn = exact_accept, draft_probs: bool = False
                      ) -> tuple[Model, Callable[[int], DecoderFn]]:
    """`build_speculative` for any k: (model, decoder_fn_for(k)), the draft loaded and checked
    once (a per-batch plan's several k share it). Args as `build_speculative`'s."""
    impl = resolve_impl(impl)
    if isinstance(draft, str) and draft.startswith("self:"):
        heads, drafter_fn = build_self_draft(target, draft, impl)
        return speculative_model(target, heads), \
            lambda k: lambda cfg, max_len: speculative(cfg, drafter_fn(cfg, max_len), k,
                                                       max_len, impl, greedy)
    if isinstance(draft, str) and draft == "ngram":
        if draft_probs:
            raise ValueError("draft=ngram: prompt lookup has no distribution for a deferral "
                             "rule to read; draft with a model (a `jdecode train draft` "
                             "artifact, an HF directory or a .gguf)")
        return speculative_model(target, None), \
            lambda k: lambda cfg, max_len: speculative(cfg, ngram_drafter(max_len, max_ngram),
                                                       k, max_len, impl, greedy, accept)
    if isinstance(draft, str):
        draft = load_draft(draft, target)
    if draft.cfg.vocab_size != target.cfg.vocab_size:
        raise ValueError(f"draft {draft.name!r} has vocab_size {draft.cfg.vocab_size} but the "
                         f"target has {target.cfg.vocab_size}: the draft must share the "
                         "target's tokenizer (distil one with `jdecode train draft`)")
    if with_ngram and draft_probs:
        raise ValueError("with_ngram: a prompt-lookup draft has no distribution for a deferral "
                         "rule to read; turn with_ngram off")
    dcfg = draft.cfg

    def decoder_fn_for(k: int) -> DecoderFn:
        def decoder_fn(cfg: ModelConfig, max_len: int) -> Decoder:
            drafter = (ngram_model_drafter(dcfg, max_len, impl, max_ngram) if with_ngram
                       else model_drafter(dcfg, max_len, impl, draft_probs))
            return speculative(cfg, drafter, k, max_len, impl, greedy, accept)
        return decoder_fn

    return speculative_model(target, draft.params), decoder_fn_for


def acceptance_stats(mean_accepted: float, k: int) -> dict[str, float]:
    """Acceptance figures from the loop's mean tokens per verify step L (in [1, k+1]).

    Returns:
      mean_accepted L; acceptance_rate (L - 1) / k, the share of drafts accepted; alpha, the
      i.i.d. per-token rate whose expected tokens (1 - a^(k+1)) / (1 - a) equal L (Leviathan et
      al. 2023, eq. 1), inverted by bisection.
    """
    lo, hi = 0.0, 1.0
    for _ in range(50):  # expected_tokens increases with alpha
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if expected_tokens(mid, k) < mean_accepted else (lo, mid)
    return {"mean_accepted": mean_accepted, "acceptance_rate": (mean_accepted - 1.0) / k,
            "alpha": 0.5 * (lo + hi)}


# Plain decoding from batch 16 up, unless told otherwise (vLLM's "disable by batch size"): on
# the default model (f32) n-gram and distilled drafts ran at 0.99-1.03x of plain decoding at
# batch 16 and 0.73-0.77x at 64 on an H200 (2026-11-30), and 0.66-0.67x at 16 on an H100
# once the decode step was fast (2026-12-06; benchmarks/speculative.md). That run also lost
# at batch 1 (0.84-0.87x), where a larger model, whose step costs its bytes, is what
# speculation is for: the plan keeps batch 1-15 speculating. Measure a model's own plan
# (`scripts/bench_speculative.py` prints the cost model's k per batch size, 0 = off) and pass
# it, or {} for k at every batch size.
MEASURED_K_PLAN = {16: 0}


@dataclasses.dataclass(frozen=True)
class SpeculativeOptions:
    draft: str = option("ngram", "ngram (prompt lookup), self:E[:EXITS] (the target's first E "
                        "layers + an exit head, LayerSkip), a `jdecode train draft` artifact, "
                        "an HF directory or a .gguf of a model sharing the target's tokenizer")
    k: int = option(4, "tokens drafted per step")
    max_ngram: int = option(3, "longest context suffix prompt lookup matches")
    with_ngram: bool = option(False, "a model draft gives way to prompt lookup where a 2+-gram "
                              "matches")
    k_by_batch: dict | None = option(  # noqa: RUF009 (`option` returns a field)
        None, "batch size -> k from that size up, e.g. {4: 2, 16: 0} (0 = plain decoding); "
        "null = the plan measured for the default model, plain decoding from batch 16 "
        "({16: 0}); {} = k at every size")

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k={self.k}: draft at least 1 token per step (k = 0 is the "
                             "autoregressive method)")
        if self.max_ngram < 1:
            raise ValueError(f"max_ngram={self.max_ngram} must be >= 1")
        if self.k_by_batch is None:
            object.__setattr__(self, "k_by_batch", dict(MEASURED_K_PLAN))
        parse_k_plan(self.k_by_batch, self.k)


def on_target(decoder: Decoder) -> Decoder:
    """`decoder` (the target's own) taking a speculative model's params (target, draft): what
    a batch size whose plan says k = 0 runs, so that it costs what plain decoding does."""
    return Decoder(init=lambda params, *args, **kwargs: decoder.init(params[0], *args, **kwargs),
                   step=lambda params, state: decoder.step(params[0], state))


@register("speculative", SpeculativeOptions, lossless=True,
          summary="a draft (prompt lookup or a small model) proposes k tokens, the target "
                  "verifies them in one pass (Leviathan et al. 2023)")
def build_speculative_method(model: Model, opts: SpeculativeOptions, impl: str) -> MethodBuild:
    plan = parse_k_plan(opts.k_by_batch, opts.k)  # batch size -> k, 0 = plain decoding
    try:
        spec_model, decoder_fn_for = speculative_parts(model, opts.draft, impl, opts.max_ngram,
                                                       with_ngram=opts.with_ngram)
    except FileNotFoundError as e:  # neither "ngram" nor a loadable path
        raise ValueError(f"draft={opts.draft!r}: {e}") from None

    def decoder_fn(cfg: ModelConfig, max_len: int) -> Decoder:
        decoders = {k: decoder_fn_for(k)(cfg, max_len) for k in set(plan.values()) - {0}}
        plain = on_target(autoregressive(cfg, max_len, impl))
        return by_batch(lambda b: decoders[k] if (k := plan_lookup(plan, b)) else plain)

    def describe(stats: dict) -> dict:
        k = plan_lookup(plan, int(stats.get("batch", 1)))
        return {**acceptance_stats(stats["mean_accepted"], k), "k": k} if k else \
            {"mean_accepted": stats["mean_accepted"], "k": 0}

    return MethodBuild(spec_model, decoder_fn, describe=describe)
