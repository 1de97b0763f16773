"""Plain autoregressive decoding over a dense KV cache: the first `Decoder`."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jdecode.cache.dense import init_cache
from jdecode.config import ModelConfig
from jdecode.decoding import phases
from jdecode.decoding.base import Decoder, DecodeState, StepOutput, mark_seen, sample_next
from jdecode.decoding.methods import MethodBuild, register
from jdecode.io.registry import Model


def autoregressive(cfg: ModelConfig, max_len: int, impl: str = "xla") -> Decoder:
    """One token per step. `aux` is the dense cache [L, B, max_len, K, D].

    Args:
      cfg: model config. max_len: cache slots per sequence (prompt bucket + new tokens).
      impl: attention implementation ("xla" or "pallas").
    """

    def init(params, prompt, lengths, sampling, keys, track_seen=False):
        b = prompt.shape[0]
        cache = init_cache(cfg, b, max_len, per_layer=isinstance(params.layers, tuple))
        logits, _, cache = phases.prefill(params, cache, prompt, lengths, cfg=cfg, impl=impl)
        seen = None
        if track_seen:
            valid = jnp.arange(prompt.shape[1])[None] < lengths[:, None]
            seen = mark_seen(jnp.zeros((b, cfg.vocab_size), bool),
                             jnp.where(valid, prompt, cfg.vocab_size))  # padding is dropped
        state = DecodeState(tokens=jnp.zeros((b,), jnp.int32), positions=lengths, keys=keys,
                            sampling=sampling, seen=seen, aux=cache)
        first, state = sample_next(logits, state)
        return state.replace(tokens=first)

    def step(params, state):
        # Clamp so rows that finished long ago keep writing inside the buffer.
        pos = jnp.minimum(state.positions, max_len - 1)
        logits, _, cache = phases.decode_step(params, state.aux, state.tokens, pos, cfg=cfg,
                                              impl=impl)
        nxt, state = sample_next(logits, state)
        state = state.replace(tokens=nxt, positions=state.positions + 1, aux=cache)
        return state, StepOutput(nxt[:, None], jnp.ones_like(nxt))

    return Decoder(init=init, step=step, max_tokens_per_step=1)


@dataclasses.dataclass(frozen=True)
class AutoregressiveOptions:
    """Plain decoding takes no options."""


@register("autoregressive", AutoregressiveOptions, lossless=True,
          summary="one token per step over the dense KV cache (the baseline)")
def build_autoregressive(model: Model, opts: AutoregressiveOptions, impl: str) -> MethodBuild:
    return MethodBuild(model, lambda cfg, max_len: autoregressive(cfg, max_len, impl))
