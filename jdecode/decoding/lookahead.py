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


def pool_insert(pool: NgramPool, key: jax.Array, gram: jax.Array, valid: jax.Array
                ) -> NgramPool:
    """Inserts one n-gram per row: (key, gram) with key [B] and gram [B, N - 1] int32.

    A continuation already pooled under `key` is refreshed (it becomes the most recent);
    otherwise it takes an empty slot, or evicts the least recently inserted one. Rows with
    valid [B] False are left alone (their write goes to key V, which the scatter drops).
    """
    rows = jnp.arange(key.shape[0])
    slots = pool.entries[rows, key]  # [B, G, N]
    stamp = slots[..., -1]  # [B, G]
    same = jnp.all(slots[..., :-1] == gram[:, None, :], axis=-1) & (stamp >= 0)
    # argmin of the stamps: an empty slot (-1) first, else the least recently used.
    slot = jnp.where(same.any(-1), jnp.argmax(same, -1), jnp.argmin(stamp, -1))
    entry = jnp.concatenate([gram, pool.clock[:, None]], axis=1)  # [B, N]
    key = jnp.where(valid, key, pool.entries.shape[1])
    return NgramPool(pool.entries.at[rows, key, slot].set(entry, mode="drop"),
                     pool.clock + valid.astype(jnp.int32))


def pool_lookup(pool: NgramPool, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The pooled continuations of key [B]: grams [B, G, N - 1] int32 and valid [B, G] bool."""
    slots = pool.entries[jnp.arange(key.shape[0]), key]  # [B, G, N]
    return slots[..., :-1], slots[..., -1] >= 0


def insert_context_ngram(pool: NgramPool, ctx: jax.Array, end: jax.Array, valid: jax.Array
                         ) -> NgramPool:
    """Inserts the context n-gram ctx[end - N + 1 .. end] per row (ctx [B, S], end [B]); rows
    whose n-gram would start before position 0, or with valid False, insert nothing."""
    n = pool.ngram
    cols = end[:, None] - n + 1 + jnp.arange(n)  # [B, N]
    toks = jnp.take_along_axis(ctx, jnp.clip(cols, 0, ctx.shape[1] - 1), axis=1)
    return pool_insert(pool, toks[:, 0], toks[:, 1:], valid & (cols[:, 0] >= 0))


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
    cache: Any  # dense cache [L, B, S + T - 1, K, D] (T - 1 scratch slots for the tree)
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
    base = autoregressive(cfg, max_len + layout.num_nodes - 1, impl)
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

            def fill(end, pool):  # every n-gram of the prompt and the first token, in order
                return insert_context_ngram(pool, ctx, jnp.full((b,), end), end <= lengths)

            pool = jax.lax.fori_loop(ngram - 1, t + 1, fill, pool)
        aux = LookaheadAux(state.aux, win, pool, ctx, jnp.zeros((), jnp.int32))
        return state.replace(aux=aux)

    def step(params, state):
        aux, root, pos = state.aux, state.tokens, state.positions
        b = root.shape[0]
        grams, valid = pool_lookup(aux.pool, root)  # [B, G, N - 1], [B, G]
        win = aux.window.at[:, 0, 0].set(root)
        tokens = jnp.concatenate([win.reshape(b, -1), grams.reshape(b, -1)], axis=1)  # [B, T]
        logits, _, cache = phases.verify_tree(params, aux.cache, tokens, pos,
                                              batched(tree, b), cfg=cfg, impl=impl)
        vtree = batched(verify_tree, b)
        v_tokens, v_logits = tokens[:, verify_nodes], logits[:, verify_nodes]
        if state.sampling.all_greedy:  # static: no key split, no cond
            keys = state.keys
            # -1 matches no choice of the model: empty slots are never accepted.
            live = jnp.concatenate([jnp.ones((b, 1), bool), valid[:, guess_of]], axis=1)
            accepted = greedy_tree_accept(vtree, jnp.where(live, v_tokens, -1), v_logits)
        else:
            # Any candidate fixed before the rule runs keeps it lossless, empty slots included.
            keys, now = split_keys(state.keys)
            accepted = sampled_tree_accept(vtree, v_tokens, v_logits, None, state.sampling, now)
        cache = commit_path(cache, pos, verify_nodes[accepted.path])

        out = jnp.argmax(logits[:, layout.last_level], axis=-1).astype(jnp.int32)  # [B, W]
        keys_w, grams_w, next_window = window_ngrams(win, out)
        pool, warm = aux.pool, jnp.broadcast_to(aux.steps >= ngram - 2, (b,))
        for col in range(window):  # small and static: unrolled, in the reference's order
            pool = pool_insert(pool, keys_w[:, col], grams_w[:, col], warm)
        num, ctx = accepted.num_accepted, aux.ctx
        if pool_from_context:
            rows = jnp.arange(b)
            cols = pos[:, None] + 1 + jnp.arange(ngram)  # stale past num: rewritten later
            ctx = ctx.at[rows[:, None], cols].set(accepted.tokens, mode="drop")
            for j in range(ngram):  # the n-grams ending at each accepted token, in order
                pool = insert_context_ngram(pool, ctx, pos + 1 + j, j < num)
        state = state.replace(tokens=accepted.next_token, positions=pos + num, keys=keys,
                              aux=LookaheadAux(cache, next_window, pool, ctx, aux.steps + 1))
        return state, StepOutput(accepted.tokens, num)

    return Decoder(init=init, step=step, max_tokens_per_step=ngram)


@dataclasses.dataclass(frozen=True)
class LookaheadOptions:
    window: int = option(7, "W: Jacobi trajectories advanced in parallel (window columns)")
    ngram: int = option(5, "N: n-gram size; the window keeps N - 1 levels and a step emits at "
                        "most N tokens")
    guesses: int = option(7, "G: pooled n-grams verified per step (the pool keeps G per first "
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
