"""The Decoder protocol: an optax-style bundle of pure `init` and `step` functions.

Every decoding method (autoregressive, speculative, Medusa, ...) is a `Decoder`; the generate
loop runs any of them without knowing which. Method state lives in `DecodeState.aux`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from jdecode.decoding.sampling import SamplingArrays, sample


@struct.dataclass
class DecodeState:
    """What every method carries between steps; `aux` is the method's own pytree."""

    tokens: jax.Array  # [B] int32 last emitted token, not yet in the cache
    positions: jax.Array  # [B] int32 position `tokens` will occupy (= tokens in context)
    keys: jax.Array  # [B] typed PRNG keys, one stream per request
    sampling: SamplingArrays
    seen: jax.Array | None  # [B, V] bool tokens in prompt/output (repetition penalty), or None
    aux: Any  # method-specific: caches, draft state, ...


class StepOutput(NamedTuple):
    tokens: jax.Array  # [B, K] int32 tokens emitted this step (first num_accepted are valid)
    num_accepted: jax.Array  # [B] int32 in [1, K]


class Decoder(NamedTuple):
    """init(params, prompt [B, T], lengths [B], sampling, keys) -> DecodeState whose `tokens`
    holds the first generated token; step(params, state) -> (state, StepOutput).

    The most tokens a step can emit is the static width K of its `StepOutput.tokens`; the loop
    reads it from the traced step, so it may differ by batch size (see `by_batch`).
    """

    init: Callable[..., DecodeState]
    step: Callable[[Any, DecodeState], tuple[DecodeState, StepOutput]]


def by_batch(choose: Callable[[int], Decoder]) -> Decoder:
    """A decoder that is `choose(batch size)`, picked when init and step are traced.

    Why: a per-batch plan (`analysis/spec_cost.plan_by_batch`) may switch speculation off at
    large batch sizes; that branch must then cost exactly what plain decoding costs, state and
    all, which delegating the whole decoder guarantees. The batch size is static under jit, so
    init and step always pick the same decoder and the state's structure stays consistent.
    """

    def init(params, prompt, *args, **kwargs):
        return choose(prompt.shape[0]).init(params, prompt, *args, **kwargs)

    def step(params, state):
        return choose(state.tokens.shape[0]).step(params, state)

    return Decoder(init=init, step=step)


def plan_lookup(plan: Mapping[int, Any], batch: int) -> Any:
    """The entry of the largest batch key <= batch (the smallest key below it)."""
    keys = sorted(plan)
    return plan[max([k for k in keys if k <= batch], default=keys[0])]


def parse_plan(plan: Mapping | None, default: int, what: str) -> dict[int, int]:
    """A `{batch size: value}` option as ints, with `default` from batch 1 unless given."""
    out = {1: default}
    for key, value in (plan or {}).items():
        try:
            batch, value = int(key), int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{what}={dict(plan)}: give integer batch sizes and values, e.g. "
                             "{1: 64, 16: 8, 64: 1}") from None
        if batch < 1 or value < 1:
            raise ValueError(f"{what}={dict(plan)}: batch sizes and values must be >= 1")
        out[batch] = value
    return out


def parse_k_plan(plan: Mapping | None, default: int, what: str = "k_by_batch"
                 ) -> dict[int, int]:
    """A `{batch size: k}` option of a chain method (0 = plain decoding at that size) as
    ints, with `default` from batch 1 unless given."""
    for batch, k in (plan or {}).items():
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"{what}={dict(plan)}: batch {batch} maps to {k!r}; give k >= 0 "
                             "(0 = plain decoding)")
    nodes = parse_plan({b: k + 1 for b, k in (plan or {}).items()}, default + 1, what)
    return {batch: n - 1 for batch, n in nodes.items()}


def split_keys(keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-row key split: [B] keys -> (next state keys [B], keys to use now [B])."""
    pairs = jax.vmap(lambda k: jax.random.split(k, 2))(keys)  # [B, 2]
    return pairs[:, 0], pairs[:, 1]


def mark_seen(seen: jax.Array | None, tokens: jax.Array) -> jax.Array | None:
    """Adds tokens [B] (or [B, T]) to the per-row seen mask [B, V]."""
    if seen is None:
        return None
    rows = jnp.arange(seen.shape[0])
    if tokens.ndim == 2:
        rows = rows[:, None]
    return seen.at[rows, tokens].set(True, mode="drop")


def sample_next(logits: jax.Array, state: DecodeState) -> tuple[jax.Array, DecodeState]:
    """Samples [B] tokens from logits [B, V] with the state's parameters; advances keys."""
    if state.sampling.all_greedy:  # static: greedy rows never use their keys
        tokens = sample(logits, state.sampling, state.keys, state.seen)
        return tokens, state.replace(seen=mark_seen(state.seen, tokens))
    keys, now = split_keys(state.keys)
    tokens = sample(logits, state.sampling, now, state.seen)
    return tokens, state.replace(keys=keys, seen=mark_seen(state.seen, tokens))
