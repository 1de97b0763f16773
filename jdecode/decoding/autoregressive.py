"""Plain autoregressive decoding over a dense KV cache: the first `Decoder`."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jdecode.config import ModelConfig
from jdecode.decoding import phases
from jdecode.decoding.base import Decoder, DecodeState, StepOutput, mark_seen, sample_next
from jdecode.decoding.methods import MethodBuild, register
from jdecode.io.registry import Model


def start_state(logits: jax.Array, prompt: jax.Array, lengths: jax.Array, sampling, keys,
                aux, track_seen: bool, vocab_size: int) -> DecodeState:
    """The state after prefill: the first token sampled from the prefill's logits [B, V].

    Args:
      prompt: [B, T] int32 (marks the seen tokens when track_seen). lengths: [B] int32.
      aux: the method's state (e.g. the prefilled cache).
    """
    b = prompt.shape[0]
    seen = None
    if track_seen:
        valid = jnp.arange(prompt.shape[1])[None] < lengths[:, None]
        seen = mark_seen(jnp.zeros((b, vocab_size), bool),
                         jnp.where(valid, prompt, vocab_size))  # padding is dropped
    state = DecodeState(tokens=jnp.zeros((b,), jnp.int32), positions=lengths, keys=keys,
                        sampling=sampling, seen=seen, aux=aux)
    first, state = sample_next(logits, state)
    return state.replace(tokens=first)


def autoregressive(cfg: ModelConfig, max_len: int, impl: str = "xla",
                   track_writes: bool = False, stacked_cache: bool = False) -> Decoder:
    """One token per step. `aux` is the dense cache [L, B, max_len, K, D].

    Args:
      cfg: model config. max_len: cache slots per sequence (prompt bucket + new tokens).
      impl: attention implementation ("xla" or "pallas"). track_writes: a cache that tracks
        which tokens stored K/V (for methods built on this one whose layers leave tokens out).
      stacked_cache: the cache `phases.decode_cache` picks (stacked where the fused step runs
        every step, fewer leaves for each loop call). Off, the cache follows the params'
        layout: methods built on this decoder run other passes over its cache (verify
        blocks, trees, hooks), whose paths were measured over per-layer buffers.
    """

    def init(params, prompt, lengths, sampling, keys, track_seen=False):
        b = prompt.shape[0]
        cache = (phases.decode_cache(params, cfg, b, max_len, impl, track_writes) if stacked_cache
                 else phases.layout_cache(params, cfg, b, max_len, track_writes))
        logits, _, cache = phases.prefill(params, cache, prompt, lengths, cfg=cfg, impl=impl)
        return start_state(logits, prompt, lengths, sampling, keys, cache, track_seen,
                           cfg.vocab_size)

    def step(params, state):
        # Clamp so rows that finished long ago keep writing inside the buffer.
        pos = jnp.minimum(state.positions, max_len - 1)
        logits, _, cache = phases.decode_step(params, state.aux, state.tokens, pos, cfg=cfg,
                                              impl=impl)
        nxt, state = sample_next(logits, state)
        # pos + 1, not positions + 1: the same for live rows (their positions are below
        # max_len), and XLA:GPU then forms both in one kernel instead of two every step.
        state = state.replace(tokens=nxt, positions=pos + 1, aux=cache)
        return state, StepOutput(nxt[:, None], jnp.ones_like(nxt))

    return Decoder(init=init, step=step)


@dataclasses.dataclass(frozen=True)
class AutoregressiveOptions:
    """Plain decoding takes no options."""


@register("autoregressive", AutoregressiveOptions, lossless=True,
          summary="one token per step over the dense KV cache (the baseline)")
def build_autoregressive(model: Model, opts: AutoregressiveOptions, impl: str) -> MethodBuild:
    return MethodBuild(model, lambda cfg, max_len: autoregressive(cfg, max_len, impl,
                                                                  stacked_cache=True))
