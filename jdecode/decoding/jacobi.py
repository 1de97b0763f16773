"""Jacobi decoding (Santilli et al. 2023): a block of n guessed future tokens is refined in
parallel, one forward pass per iteration, toward the fixed point that greedy decoding reaches
one token at a time; each iteration accepts the prefix that has converged.

The block slides: the positions freed by the accepted prefix get fresh guesses at its end, so
every iteration refines n positions. With n = the whole answer it is the fully
non-autoregressive case. `params` of the Decoder are the model's own.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import struct

from jdecode.cache.dense import DenseKVCache
from jdecode.config import ModelConfig
from jdecode.decoding import phases
from jdecode.decoding.autoregressive import autoregressive
from jdecode.decoding.base import Decoder, StepOutput, split_keys
from jdecode.decoding.drafters import ngram_match
from jdecode.decoding.methods import MethodBuild, register
from jdecode.decoding.speculative import accept_tokens, greedy_accept
from jdecode.io.registry import Model
from jdecode.model.params import Params
from jdecode.options import option


@struct.dataclass
class JacobiAux:
    cache: Any  # dense cache [L, B, S, K, D]; slots < positions hold accepted tokens
    block: jax.Array  # [B, n] int32 current guesses for positions + 1 .. positions + n
    ctx: jax.Array | None  # [B, S] int32 context tokens (slot = position), init="ngram" only


def jacobi_iteration(params: Params, cache: DenseKVCache, root: jax.Array, block: jax.Array,
                     positions: jax.Array, *, cfg: ModelConfig, impl: str = "xla"
                     ) -> tuple[jax.Array, jax.Array, DenseKVCache]:
    """One Jacobi iteration y <- f(y) over a block, in one forward pass.

    Args:
      root: [B] int32 the last emitted token, at `positions` (not yet in the cache).
      block: [B, n] int32 guesses y_1..y_n for positions + 1 .. positions + n.
      positions: [B] int32.
    Returns:
      next_block [B, n] int32 (next_block[:, j] = argmax after root, y_1..y_j), logits
      [B, n + 1, V] f32 (the last predicts the token after the block), and the cache with
      slots positions .. positions + n written.
    """
    seq = jnp.concatenate([root[:, None], block], axis=1)  # [B, n + 1]
    pos = positions[:, None] + jnp.arange(seq.shape[1])
    logits, _, cache = phases.verify(params, cache, seq, pos, cfg=cfg, impl=impl)
    return jnp.argmax(logits[:, :-1], axis=-1).astype(jnp.int32), logits, cache


def initial_guesses(init: str, n: int, root: jax.Array, ctx: jax.Array | None,
                    positions: jax.Array, pad_token: int, max_ngram: int) -> jax.Array:
    """Fresh guesses [B, n] int32 for positions + 1 .. positions + n.

    pad: `pad_token` everywhere. repeat: the root (the newest token) repeated. ngram: the tokens
    that followed the latest earlier occurrence of the context's longest suffix n-gram (prompt
    lookup, `drafters.ngram_match`), the root repeated where nothing matches.

    Args:
      root: [B] int32 token at `positions`. ctx: [B, S] int32 context up to `positions`
        (ngram only). positions: [B] int32.
    """
    if init == "pad":
        return jnp.full((root.shape[0], n), pad_token, jnp.int32)
    if init == "repeat":
        return jnp.broadcast_to(root[:, None], (root.shape[0], n)).astype(jnp.int32)
    return jax.vmap(lambda c, m: ngram_match(c, m, n, max_ngram)[0])(ctx, positions + 1)


def jacobi(cfg: ModelConfig, max_len: int, n: int, init: str = "repeat", pad_token: int = 0,
           max_ngram: int = 3, impl: str = "xla") -> Decoder:
    """Jacobi decoding with a sliding block of n guesses.

    A step feeds [root, y_1..y_n] (`jacobi_iteration`): y_j is accepted while it equals the
    model's choice after its predecessors, exactly the speculative rule, so greedy output is
    greedy decoding's, and each step emits the converged prefix plus the model's next token (1
    to n + 1 tokens). The rest of the iterate, shifted, stays the guess for the positions after;
    the freed positions at the end get `initial_guesses`. Sampling rows accept with the lossless
    rejection rule (`speculative.accept_tokens`, the guesses as deterministic drafts).

    Verified slots past the buffer are dropped by the cache write, and so are the tokens they
    would predict (past max_new_tokens): no extra cache slots are needed.

    Args:
      cfg: model config. max_len: cache slots per sequence. n: block size (guessed tokens).
      init: "pad", "repeat" or "ngram" (see `initial_guesses`). pad_token: the token "pad"
        guesses. max_ngram: the longest context suffix "ngram" matches. impl: attention.
    Returns:
      a Decoder emitting up to n + 1 tokens per step (one forward pass).
    """
    if n < 1:
        raise ValueError(f"block size n={n}: guess at least 1 token (n = 0 is autoregressive "
                         "decoding)")
    base = autoregressive(cfg, max_len, impl)
    use_ctx = init == "ngram"

    def init_fn(params, prompt, lengths, sampling, keys, track_seen=False):
        if track_seen:
            raise ValueError("repetition_penalty != 1 is not supported by Jacobi decoding (the "
                             "penalty would change inside one accepted block): set it to 1 or "
                             "use the autoregressive method")
        state = base.init(params, prompt, lengths, sampling, keys)
        ctx = None
        if use_ctx:
            rows = jnp.arange(prompt.shape[0])
            ctx = jnp.zeros((prompt.shape[0], max_len), jnp.int32)
            ctx = ctx.at[:, :prompt.shape[1]].set(prompt, mode="drop")
            # The first token overwrites padding at its position (slot = position).
            ctx = ctx.at[rows, lengths].set(state.tokens, mode="drop")
        block = initial_guesses(init, n, state.tokens, ctx, lengths, pad_token, max_ngram)
        return state.replace(aux=JacobiAux(state.aux, block, ctx))

    def step(params, state):
        aux, pos = state.aux, state.positions
        next_block, logits, cache = jacobi_iteration(params, aux.cache, state.tokens,
                                                     aux.block, pos, cfg=cfg, impl=impl)
        if state.sampling.all_greedy:  # static: no key split, no cond
            keys = state.keys
            tokens, num = greedy_accept(aux.block, logits)
        else:
            keys, now = split_keys(state.keys)
            tokens, num = accept_tokens(aux.block, None, logits, state.sampling, now)
        rows = jnp.arange(tokens.shape[0])
        root, new_pos = tokens[rows, num - 1], pos + num
        ctx = aux.ctx
        if use_ctx:
            # Slots past the accepted ones are stale until rewritten; lookup reads < new_pos+1.
            cols = pos[:, None] + 1 + jnp.arange(n + 1)
            ctx = ctx.at[rows[:, None], cols].set(tokens, mode="drop")
        # The iterate's guesses past the accepted prefix move to the front: out[j] is the guess
        # for position pos + j + 1, so the new block (positions new_pos + 1 ..) starts at
        # out[num]. argmax(logits) = [next_block, choice after y_n].
        out = jnp.concatenate([next_block, jnp.argmax(logits[:, -1:], -1).astype(jnp.int32)],
                              axis=1)  # [B, n + 1]
        src = num[:, None] + jnp.arange(n)  # [B, n] index into out
        kept = jnp.take_along_axis(out, jnp.minimum(src, n), axis=1)
        fresh = initial_guesses(init, n, root, ctx, new_pos, pad_token, max_ngram)
        # Fresh guesses are for new_pos + 1 + j: the tail past the kept part takes them.
        block = jnp.where(src <= n, kept, fresh)
        state = state.replace(tokens=root, positions=new_pos, keys=keys,
                              aux=JacobiAux(cache, block, ctx))
        return state, StepOutput(tokens, num)

    return Decoder(init=init_fn, step=step)


def iteration_stats(stats: dict) -> dict[str, float]:
    """Per-result figures from the loop's mean tokens per step: one step is one iteration."""
    tau = stats["mean_accepted"]
    return {"iterations_per_token": 1.0 / tau if tau else 0.0}


@dataclasses.dataclass(frozen=True)
class JacobiOptions:
    block_size: int = option(8, "guessed tokens refined per iteration (n); set it to "
                             "max_new_tokens for the fully non-autoregressive case")
    init: Literal["pad", "repeat", "ngram"] = option(
        "repeat", "guesses for new positions: pad (pad_token), repeat (the newest token) or "
        "ngram (the continuation of the context's suffix n-gram where it occurred before)")
    pad_token: int = option(0, "the token init=pad guesses")
    max_ngram: int = option(3, "longest context suffix init=ngram matches")

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size={self.block_size}: guess at least 1 token (0 is the "
                             "autoregressive method)")
        if self.max_ngram < 1:
            raise ValueError(f"max_ngram={self.max_ngram} must be >= 1")
        if self.pad_token < 0:
            raise ValueError(f"pad_token={self.pad_token} must be a token id >= 0")


def jacobi_decoder_fn(opts: JacobiOptions, impl: str):
    """decoder_fn(cfg, max_len) -> the Jacobi Decoder with `opts`."""
    def decoder_fn(cfg: ModelConfig, max_len: int) -> Decoder:
        if opts.pad_token >= cfg.vocab_size:
            raise ValueError(f"pad_token={opts.pad_token} is outside the vocabulary "
                             f"[0, {cfg.vocab_size}): choose a token id below it")
        return jacobi(cfg, max_len, opts.block_size, opts.init, opts.pad_token, opts.max_ngram,
                      impl)
    return decoder_fn


@register("jacobi", JacobiOptions, lossless=True,
          summary="a block of guessed tokens refined in parallel to the greedy fixed point, the "
                  "converged prefix accepted each iteration (Santilli et al. 2023)")
def build_jacobi(model: Model, opts: JacobiOptions, impl: str) -> MethodBuild:
    return MethodBuild(model, jacobi_decoder_fn(opts, impl), describe=iteration_stats)
