"""The jitted generation loop around any `Decoder`: output buffer, stop ids, max tokens.

`run_loop` runs up to `limit` decoder steps inside one `lax.while_loop`, so a whole generation
(or a streaming chunk of it) is one dispatch.
"""

from __future__ import annotations

import collections
import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from jdecode.decoding.base import Decoder, DecodeState

# Incremented at trace time only: tests use it to prove steady-state decoding never retraces.
TRACE_COUNTS: collections.Counter = collections.Counter()


@struct.dataclass
class LoopState:
    dec: DecodeState
    out: jax.Array  # [B, N] int32 generated tokens (row b valid up to n_out[b])
    n_out: jax.Array  # [B] int32
    done: jax.Array  # [B] bool
    max_new: jax.Array  # [B] int32 per-request max_new_tokens
    stop_ids: jax.Array  # [B, S] int32 stop token ids, -1 padded
    # [3] int32: decoder steps taken, tokens emitted by live rows' steps, row-steps of live
    # rows (accepted / live_steps = mean length). One array, not three scalars: XLA:GPU
    # updates each loop-carried scalar in a kernel of its own, every step.
    counts: jax.Array

    @property
    def steps(self) -> jax.Array:  # [] int32
        return self.counts[0]

    @property
    def accepted(self) -> jax.Array:  # [] int32
        return self.counts[1]

    @property
    def live_steps(self) -> jax.Array:  # [] int32
        return self.counts[2]


def _record(ls: LoopState, tokens: jax.Array, num: jax.Array) -> LoopState:
    """Appends the first `num[b]` of tokens [B, K] to each live row, stopping at a stop id."""
    out, n_out, done = ls.out, ls.n_out, ls.done
    cols = jnp.arange(out.shape[1])[None, :]  # [1, N]
    for j in range(tokens.shape[1]):  # K is small and static: unrolled
        tok = tokens[:, j]
        valid = (j < num) & ~done
        # A select over the buffer, not a scatter: on XLA:GPU one small kernel, where a
        # scatter with dropped out-of-range writes became three (bounds, select, update).
        out = jnp.where(valid[:, None] & (cols == n_out[:, None]), tok[:, None], out)
        n_out = n_out + valid
        is_stop = (tok[:, None] == ls.stop_ids).any(-1)
        done = done | (valid & (is_stop | (n_out >= ls.max_new)))
    return dataclasses.replace(ls, out=out, n_out=n_out, done=done)


def init_loop(decoder: Decoder, params, prompt, lengths, sampling, keys, max_new, stop_ids,
              max_out: int, track_seen: bool = False) -> LoopState:
    """Prefills, samples the first token and records it. prompt: [B, T]; lengths: [B]."""
    TRACE_COUNTS["init"] += 1
    dec = decoder.init(params, prompt, lengths, sampling, keys, track_seen=track_seen)
    b = prompt.shape[0]
    ls = LoopState(dec=dec, out=jnp.zeros((b, max_out), jnp.int32),
                   n_out=jnp.zeros((b,), jnp.int32), done=jnp.zeros((b,), bool),
                   max_new=max_new, stop_ids=stop_ids, counts=jnp.zeros((3,), jnp.int32))
    return _record(ls, dec.tokens[:, None], jnp.ones((b,), jnp.int32))


def run_loop(decoder: Decoder, params, ls: LoopState, limit: jax.Array, block: int = 1
             ) -> LoopState:
    """Runs decoder steps until every row is done or `limit` more steps were taken.

    block > 1 runs steps in groups of `block` inside a fixed-trip-count `fori_loop`, and checks
    "all done" once per group. Why: XLA:GPU runs a `while_loop` whose trip count it cannot
    prove by copying the predicate to the host and waiting, every iteration; a fixed trip
    count needs no sync, so the host runs ahead and the GPU never idles between steps. A group
    starts only while some live row still wants >= block * K tokens (K: the most one step
    emits, the static width of its output at this batch size), so max-token endings waste
    nothing; a row that stops on EOS mid-group costs at most block - 1 idle steps. The
    remainder runs one checked step at a time. The tokens are identical for every `block`
    (finished rows record nothing).
    """
    TRACE_COUNTS["loop"] += 1
    stop_at = ls.steps + limit

    def cond(ls):
        return (ls.steps < stop_at) & ~jnp.all(ls.done)

    def body(ls):
        dec, so = decoder.step(params, ls.dec)
        live = ~ls.done
        ls = _record(dataclasses.replace(ls, dec=dec), so.tokens, so.num_accepted)
        step_counts = jnp.stack([jnp.ones((), jnp.int32),
                                 jnp.where(live, so.num_accepted, 0).sum(dtype=jnp.int32),
                                 live.sum(dtype=jnp.int32)])
        return dataclasses.replace(ls, counts=ls.counts + step_counts)

    if block > 1:
        width = jax.eval_shape(decoder.step, params, ls.dec)[1].tokens.shape[1]
        need = block * width

        def group_cond(ls):
            wanted = jnp.where(ls.done, 0, ls.max_new - ls.n_out).max()
            return (ls.steps + block <= stop_at) & (wanted >= need)

        ls = jax.lax.while_loop(
            group_cond, lambda ls: jax.lax.fori_loop(0, block, lambda _, s: body(s), ls), ls)
    return jax.lax.while_loop(cond, body, ls)
