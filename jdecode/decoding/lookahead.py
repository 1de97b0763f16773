"""Lookahead decoding (Fu et al. 2024): a W x N window of Jacobi trajectories feeds an n-gram
pool, and up to G pooled n-grams that start with the newest token are verified in the same
forward pass, under one tree attention mask over both branches.

The window is itself a tree hanging off the root: level 0 is a chain (the root, then W - 1
guesses), and column c of level l (l = 1 .. N - 2) is the child of column c one level down, so
each token sees exactly the causal context the paper's mask gives it (level 0 up to its column,
then its own column), at position root + c + l. The G guesses are chains of N - 1 nodes from the
root. `phases.verify_tree` scores the combined tree; `acceptance` rules over the guess branch
keep a lossless path; `tree.commit_path` moves it into place.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jdecode.cache.dense import with_scratch
from jdecode.config import ModelConfig
from jdecode.decoding import phases
from jdecode.decoding.acceptance import greedy_tree_accept, sampled_tree_accept
from jdecode.decoding.autoregressive import autoregressive
from jdecode.decoding.base import Decoder, StepOutput, split_keys
from jdecode.decoding.methods import MethodBuild, register
from jdecode.decoding.tree import Tree, commit_path, tree_from_parents
from jdecode.io.registry import Model
from jdecode.options import option

# -- the n-gram pool ------------------------------------------------------------------------

FILL_CHUNK = 64  # prompt n-grams inserted per vectorized update at init ([B, 64, G + 64] work)


@struct.dataclass
class NgramPool:
    """Per row, up to G continuations (N - 1 tokens) for every first token, least recently used
    evicted first (the reference's `token_map` with GUESS_SET_SIZE = G)."""

    entries: jax.Array  # [B, V, G, N] int32: [..., :N-1] a continuation, [..., N-1] its stamp
    #                     (the row's clock when last inserted; -1 = empty slot)
    clock: jax.Array  # [B] int32 the next stamp

    @property
    def ngram(self) -> int:
        return self.entries.shape[-1]


def empty_pool(batch: int, vocab: int, guesses: int, ngram: int) -> NgramPool:
    """A pool with every slot empty: entries [B, V, G, N] (stamps -1), clock 0."""
    entries = jnp.zeros((batch, vocab, guesses, ngram), jnp.int32).at[..., -1].set(-1)
    return NgramPool(entries, jnp.zeros((batch,), jnp.int32))


def pool_insert(pool: NgramPool, keys: jax.Array, grams: jax.Array, valid: jax.Array
                ) -> NgramPool:
    """Inserts M n-grams per row, in order, in one vectorized update: the pool that M
    sequential LRU inserts would leave.

    An LRU pool of capacity G holds, per key, the G distinct continuations touched last, so
    the update needs no loop: per key, the pooled continuations (re-stamped when the batch
    touches them again) and the batch's new ones compete by stamp, the top G stay. Insert m
    of a row gets stamp clock + (valid inserts before it); only the last insert of each key
    writes that key's slots, so no two writes meet.

    Args:
      keys: [B, M] int32 first tokens. grams: [B, M, N - 1] int32 continuations.
      valid: [B, M] bool; invalid inserts are skipped.
    Returns:
      the updated pool (in place when donated).
    """
    b, m = keys.shape
    g, v = pool.entries.shape[2], pool.entries.shape[1]
    rows = jnp.arange(b)[:, None]
    stamps = pool.clock[:, None] + jnp.cumsum(valid, axis=1) - 1  # [B, M]
    old = pool.entries[rows, keys]  # [B, M, G, N] the slots of each insert's key
    old_grams, old_stamp = old[..., :-1], old[..., -1]
    # pair[b, i, j]: insert j is valid and has insert i's key; later: j comes after i.
    pair = (keys[:, :, None] == keys[:, None, :]) & valid[:, None, :]  # [B, M, M]
    later = jnp.arange(m)[None, :] > jnp.arange(m)[:, None]  # [M, M]
    same_gram = jnp.all(grams[:, :, None] == grams[:, None, :], axis=-1)  # [B, M, M]
    # An existing continuation touched again takes its latest touch's stamp.
    touch = pair[:, :, None, :] & jnp.all(
        old_grams[:, :, :, None, :] == grams[:, None, None, :, :], axis=-1)  # [B, M, G, M]
    touch &= (old_stamp >= 0)[..., None]
    old_stamp = jnp.maximum(old_stamp, jnp.max(
        jnp.where(touch, stamps[:, None, None, :], -1), axis=-1))
    # A batch continuation is new unless pooled already or inserted again later in the batch.
    pooled = jnp.any(jnp.all(old_grams == grams[:, :, None, :], axis=-1)
                     & (old[..., -1] >= 0), axis=-1)  # [B, M]
    again = jnp.any(pair & same_gram & later[None], axis=-1)  # [B, M]
    new = valid & ~pooled & ~again
    new_stamp = jnp.where(pair & new[:, None, :], stamps[:, None, :], -1)  # [B, M, M]
    cand_stamp = jnp.concatenate([old_stamp, new_stamp], axis=-1)  # [B, M, G + M]
    cand_grams = jnp.concatenate(
        [old_grams, jnp.broadcast_to(grams[:, None], (b, m, *grams.shape[1:]))], axis=2)
    top_stamp, top = jax.lax.top_k(cand_stamp, g)  # [B, M, G]; stamps are unique but -1
    top_grams = jnp.take_along_axis(cand_grams, top[..., None], axis=2)  # [B, M, G, N - 1]
    slots = jnp.concatenate([top_grams, top_stamp[..., None]], axis=-1)  # [B, M, G, N]
    last = valid & ~jnp.any(pair & later[None], axis=-1)  # the key's last insert writes
    keys = jnp.where(last, keys, v)  # key V is past the table: the scatter drops it
    return NgramPool(pool.entries.at[rows, keys].set(slots, mode="drop"),
                     pool.clock + valid.sum(axis=1, dtype=jnp.int32))


def pool_lookup(pool: NgramPool, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The pooled continuations of key [B]: grams [B, G, N - 1] int32 and valid [B, G] bool."""
    slots = pool.entries[jnp.arange(key.shape[0]), key]  # [B, G, N]
    return slots[..., :-1], slots[..., -1] >= 0


def context_ngrams(ctx: jax.Array, ends: jax.Array, valid: jax.Array, n: int
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The context n-grams ctx[e - n + 1 .. e] for every e in ends [B, M] (ctx [B, S]): keys
    [B, M], grams [B, M, n - 1] and valid [B, M] (False where the n-gram would start before
    position 0), ready for `pool_insert`."""
    cols = ends[..., None] - n + 1 + jnp.arange(n)  # [B, M, N]
    toks = jnp.take_along_axis(ctx[:, None, :], jnp.clip(cols, 0, ctx.shape[1] - 1), axis=2)
    return toks[..., 0], toks[..., 1:], valid & (cols[..., 0] >= 0)


# -- the static layout of one step's tree ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LookaheadLayout:
    """Node numbering of the combined tree: the window's N - 1 levels of W nodes row by row
    (node 0 is the root, at level 0 column 0), then G guess chains of N - 1 nodes each."""

    window: int  # W
    ngram: int  # N
    guesses: int  # G

    @property
    def lookahead_nodes(self) -> int:
        return self.window * (self.ngram - 1)

    @property
    def num_nodes(self) -> int:
        return (self.window + self.guesses) * (self.ngram - 1)

    def parents(self) -> np.ndarray:
        """[num_nodes] int: level 0 is a chain; level l column c hangs below level l - 1 column
        c; each guess is a chain from the root."""
        w, n = self.window, self.ngram
        parents = []
        for level in range(n - 1):
            for col in range(w):
                parents.append(col - 1 if level == 0 else (level - 1) * w + col)
        for g in range(self.guesses):
            first = self.lookahead_nodes + g * (n - 1)
            parents += [0, *range(first, first + n - 2)]
        return np.asarray(parents)

    @property
    def verify_nodes(self) -> np.ndarray:
        """[1 + G (N - 1)] node indices of the verification branch: the root, then the guesses."""
        return np.concatenate([[0], np.arange(self.lookahead_nodes, self.num_nodes)])

    @property
    def last_level(self) -> np.ndarray:
        """[W] nodes of the window's top level, whose outputs become the new level."""
        return np.arange(self.lookahead_nodes - self.window, self.lookahead_nodes)

    def tree(self) -> Tree:
        """The combined tree, for one row (`batched` broadcasts it)."""
        return tree_from_parents(jnp.asarray(self.parents()[None], jnp.int32),
                                 self.window + self.ngram - 3)

    def verify_tree(self) -> Tree:
        """The verification branch alone (nodes `verify_nodes`, renumbered), for one row."""
        sub = {int(node): i for i, node in enumerate(self.verify_nodes)}
        parents = [-1] + [sub[int(p)] for p in self.parents()[self.verify_nodes[1:]]]
        return tree_from_parents(jnp.asarray([parents], jnp.int32), self.ngram - 1)


def batched(tree: Tree, batch: int) -> Tree:
    """A one-row tree broadcast over `batch` rows."""
    grow = lambda a: jnp.broadcast_to(a, (batch, *a.shape[1:]))
    return Tree(grow(tree.parents), grow(tree.depths), grow(tree.ancestors), tree.max_depth)


def window_ngrams(window: jax.Array, out: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The window's n-grams after a step and the window of the next step.

    Args:
      window: [B, N - 1, W] int32 this step's window, root at [:, 0, 0]. out: [B, W] int32 the
        model's choices after the top level's nodes (the new top level).
    Returns:
      keys [B, W] (level 0), grams [B, W, N - 1] (levels 1 .. N - 2, then out: column c is the
      trajectory that starts at window[:, 0, c]), and the next window [B, N - 1, W]: every
      level moves down one (the next root overwrites [:, 0, 0], the old level 1 column 0).
    """
    full = jnp.concatenate([window, out[:, None]], axis=1)  # [B, N, W]
    return full[:, 0], jnp.swapaxes(full[:, 1:], 1, 2), full[:, 1:]


# -- the decoder -----------------------------------------------------------------------------


@struct.dataclass
class LookaheadAux:
    cache: Any  # dense cache [L, B, S + T - 1 (rounded up, `with_scratch`), K, D]
    window: jax.Array  # [B, N - 1, W] int32 the 2-D window ([:, 0, 0] unused: the root)
    pool: NgramPool
    ctx: jax.Array | None  # [B, S] int32 context (slot = position), pool_from_context only
    steps: jax.Array  # [] int32 steps taken: the window's n-grams are pooled after N - 2


def lookahead(cfg: ModelConfig, max_len: int, window: int, ngram: int, guesses: int,
              pool_from_context: bool = True, impl: str = "xla") -> Decoder:
    """Lookahead decoding: one `verify_tree` pass per step over the window and the guesses.

    A step: look up the pooled continuations of the root (the newest token); score the combined
    tree; accept the longest guess path the rule keeps (greedy: the longest guess prefix equal
    to the model's choices, then its next token; sampling rows: lossless multi-draft rejection
    sampling with the guesses as deterministic candidates); commit it; pool the window's W
    column n-grams (once the window is warm, after N - 2 steps: the paper's warm-up) and, with
    pool_from_context, the context n-grams ending at the accepted tokens; the top level's
    outputs become the new top level and every level moves down one.

    Empty pool slots are still scored (static shapes) but never accepted by the greedy rule.

    Args:
      cfg: model config. max_len: cache slots per sequence (the decoder adds T - 1 scratch
        slots, T = (W + G)(N - 1) nodes per step). window: W. ngram: N (>= 2; a step emits at
        most N tokens). guesses: G. pool_from_context: pool the n-grams of the prompt (at init)
        and of the accepted output. impl: attention implementation.
    Returns:
      a Decoder emitting up to N tokens per step.
    """
    if window < 1 or ngram < 2 or guesses < 1:
        raise ValueError(f"window={window}, ngram={ngram}, guesses={guesses}: lookahead needs "
                         "window >= 1, ngram >= 2 and guesses >= 1")
    layout = LookaheadLayout(window, ngram, guesses)
    with jax.ensure_compile_time_eval():  # constants, even when built inside a trace
        tree, verify_tree = layout.tree(), layout.verify_tree()
    base = autoregressive(cfg, with_scratch(max_len, layout.num_nodes - 1), impl)
    verify_nodes = jnp.asarray(layout.verify_nodes, jnp.int32)
    # Which verification nodes belong to guess g: an empty slot's chain is never accepted.
    guess_of = np.repeat(np.arange(guesses), ngram - 1)

    def init(params, prompt, lengths, sampling, keys, track_seen=False):
        if track_seen:
            raise ValueError("repetition_penalty != 1 is not supported by lookahead decoding "
                             "(the penalty would change inside one accepted n-gram): set it to 1 "
                             "or use the autoregressive method")
        state = base.init(params, prompt, lengths, sampling, keys)
        b, t = prompt.shape
        rows = jnp.arange(b)
        # The window starts as tokens copied from the prompt (the reference's initialization),
        # from a fixed key: the same prompt always decodes the same way.
        picks = jax.random.randint(jax.random.key(0), (b, ngram - 1, window), 0,
                                   lengths[:, None, None])
        win = prompt[rows[:, None, None], picks]  # [B, N - 1, W]
        pool = empty_pool(b, cfg.vocab_size, guesses, ngram)
        ctx = None
        if pool_from_context:
            ctx = jnp.zeros((b, max_len), jnp.int32).at[:, :t].set(prompt, mode="drop")
            ctx = ctx.at[rows, lengths].set(state.tokens, mode="drop")

            def fill(chunk, pool):  # the n-grams ending at the prompt's tokens and the first
                ends = chunk * FILL_CHUNK + jnp.arange(FILL_CHUNK)
                ends = jnp.broadcast_to(ends, (b, FILL_CHUNK))
                return pool_insert(pool, *context_ngrams(ctx, ends, ends <= lengths[:, None],
                                                         ngram))

            pool = jax.lax.fori_loop(0, -(-(t + 1) // FILL_CHUNK), fill, pool)
        aux = LookaheadAux(state.aux, win, pool, ctx, jnp.zeros((), jnp.int32))
        return state.replace(aux=aux)

    def step(params, state):
        aux, root, pos = state.aux, state.tokens, state.positions
        b = root.shape[0]
        grams, pooled = pool_lookup(aux.pool, root)  # [B, G, N - 1], [B, G]
        win = aux.window.at[:, 0, 0].set(root)
        tokens = jnp.concatenate([win.reshape(b, -1), grams.reshape(b, -1)], axis=1)  # [B, T]
        logits, _, cache = phases.verify_tree(params, aux.cache, tokens, pos,
                                              batched(tree, b), cfg=cfg, impl=impl)
        vtree = batched(verify_tree, b)
        v_tokens, v_logits = tokens[:, verify_nodes], logits[:, verify_nodes]
        if state.sampling.all_greedy:  # static: no key split, no cond
            keys = state.keys
            # -1 matches no choice of the model: empty slots are never accepted.
            live = jnp.concatenate([jnp.ones((b, 1), bool), pooled[:, guess_of]], axis=1)
            accepted = greedy_tree_accept(vtree, jnp.where(live, v_tokens, -1), v_logits)
        else:
            # Any candidate fixed before the rule runs keeps it lossless, empty slots included.
            keys, now = split_keys(state.keys)
            accepted = sampled_tree_accept(vtree, v_tokens, v_logits, None, state.sampling, now)
        cache = commit_path(cache, pos, verify_nodes[accepted.path])

        out = jnp.argmax(logits[:, layout.last_level], axis=-1).astype(jnp.int32)  # [B, W]
        # The reference's order: the window's column n-grams (once warm), then the context's.
        first, grams_w, next_window = window_ngrams(win, out)
        valid = jnp.broadcast_to(aux.steps >= ngram - 2, first.shape)
        num, ctx = accepted.num_accepted, aux.ctx
        if pool_from_context:
            rows = jnp.arange(b)
            ends = pos[:, None] + 1 + jnp.arange(ngram)  # [B, N]; stale past num: rewritten
            ctx = ctx.at[rows[:, None], ends].set(accepted.tokens, mode="drop")
            ck, cg, cv = context_ngrams(ctx, ends, jnp.arange(ngram) < num[:, None], ngram)
            first, grams_w = jnp.concatenate([first, ck], 1), jnp.concatenate([grams_w, cg], 1)
            valid = jnp.concatenate([valid, cv], 1)
        pool = pool_insert(aux.pool, first, grams_w, valid)
        state = state.replace(tokens=accepted.next_token, positions=pos + num, keys=keys,
                              aux=LookaheadAux(cache, next_window, pool, ctx, aux.steps + 1))
        return state, StepOutput(accepted.tokens, num)

    return Decoder(init=init, step=step)


# Defaults: W = N = G = 3, the fastest of configs/experiments/lookahead-grid.yaml on the H200
# with the default model (benchmarks/nar_h200.md): 12 tokens per forward, tau 1.36. The paper's
# 7B settings (W 7-15, N 5) accept more per step (tau 1.52 at W7 N5 G7) but each of their
# 56-120-token forwards costs more than the tokens it saves on a 135M model.
@dataclasses.dataclass(frozen=True)
class LookaheadOptions:
    window: int = option(3, "W: Jacobi trajectories advanced in parallel (window columns)")
    ngram: int = option(3, "N: n-gram size; the window keeps N - 1 levels and a step emits at "
                        "most N tokens")
    guesses: int = option(3, "G: pooled n-grams verified per step (the pool keeps G per first "
                          "token)")
    pool_from_context: bool = option(True, "also pool the n-grams of the prompt and of the "
                                     "accepted output")

    def __post_init__(self) -> None:
        for name, least in (("window", 1), ("ngram", 2), ("guesses", 1)):
            if getattr(self, name) < least:
                raise ValueError(f"{name}={getattr(self, name)} must be >= {least}")


@register("lookahead", LookaheadOptions, lossless=True,
          summary="a W x N window of Jacobi trajectories builds an n-gram pool; up to G pooled "
                  "n-grams are verified in the same pass (Fu et al. 2024)")
def build_lookahead(model: Model, opts: LookaheadOptions, impl: str) -> MethodBuild:
    layout = LookaheadLayout(opts.window, opts.ngram, opts.guesses)

    def decoder_fn(cfg: ModelConfig, max_len: int) -> Decoder:
        return lookahead(cfg, max_len, opts.window, opts.ngram, opts.guesses,
                         opts.pool_from_context, impl)

    return MethodBuild(model, decoder_fn, describe=lambda stats: {
        "tokens_per_forward": float(layout.num_nodes)})
