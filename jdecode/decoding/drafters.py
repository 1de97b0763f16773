"""Drafters for speculative decoding: a draft model with its own dense cache, and prompt lookup
(n-gram matching over the context, Saxena 2023), behind one `Drafter` protocol.

Rollback is free for both: each keeps position-indexed state, and a slot past the accepted length
is overwritten before any later read can see it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jdecode.config import ModelConfig
from jdecode.decoding import phases
from jdecode.decoding.sampling import SamplingArrays, filter_logits


class Drafter(NamedTuple):
    """init(draft_params, prompt [B, T], lengths [B]) -> aux.

    propose(draft_params, aux, tokens [B], prev [B], positions [B], sampling, keys [B], k)
      -> (draft [B, k] int32, q [B, k, V] f32 draft probabilities or None, aux).
    `tokens` is the last emitted token (at `positions`, not yet in any cache) and `prev` the
    token at `positions - 1`. q = None means a deterministic draft (q is one-hot on `draft`).
    keys = None says the batch is all greedy (static): draft the argmax, return q = None.

    draft_and_score, for a drafter that shares the target's cache (self-speculation, which
    writes the early layers' K/V there while drafting): (target_params, draft_params, aux,
    cache, tokens, prev, positions, sampling, keys, k) -> (draft, q, logits [B, k+1, V] f32 of
    the target at the k+1 verified positions, cache, aux). It replaces propose (then None)
    and the target's own verify pass.
    """

    init: Callable[..., Any]
    propose: Callable[..., tuple[jax.Array, jax.Array | None, Any]] | None
    draft_and_score: Callable[..., tuple] | None = None


def filtered_probs(logits: jax.Array, sp: SamplingArrays) -> jax.Array:
    """The distribution sampling draws from: softmax of `filter_logits`, for any leading shape.

    logits: [B, ..., V] f32; sp: [B] per-row parameters -> probs [B, ..., V] f32.
    """
    b, v = logits.shape[0], logits.shape[-1]
    per_row = logits[0].size // v  # positions per row
    flat = logits.reshape(b * per_row, v)
    sp_flat = jax.tree_util.tree_map(lambda a: jnp.repeat(a, per_row), sp)
    return jax.nn.softmax(filter_logits(flat, sp_flat), axis=-1).reshape(logits.shape)


def draw(logits: jax.Array, sp: SamplingArrays, keys: jax.Array | None
         ) -> tuple[jax.Array, jax.Array]:
    """Draft token and its distribution: argmax on greedy rows, a draw from q elsewhere.

    logits: [B, V]; keys: [B], or None for a batch known to be all greedy (static: no
    `lax.cond`, whose predicate costs a device-to-host sync on GPU) -> tokens [B] int32, q [B, V]
    (zeros when all rows are greedy: the greedy rule never reads q, and skipping the sort is the
    common fast path).
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if keys is None:
        return greedy, jnp.zeros_like(logits)

    def sampled(_):
        q = filtered_probs(logits, sp)
        drawn = jax.vmap(jax.random.categorical)(keys, jnp.log(q)).astype(jnp.int32)
        return jnp.where(sp.temperature > 0, drawn, greedy), q

    return jax.lax.cond(jnp.any(sp.temperature > 0), sampled,
                        lambda _: (greedy, jnp.zeros_like(logits)), None)


def model_drafter(cfg: ModelConfig, max_len: int, impl: str = "xla", with_probs: bool = False
                  ) -> Drafter:
    """A smaller model with the target's tokenizer drafts autoregressively from its own cache.

    Args:
      cfg: the draft model's config (vocab must equal the target's). max_len: cache slots.
      impl: attention implementation. with_probs: q on greedy rows too, their unscaled softmax
        (the greedy draw ignores it; a speculative cascade's deferral rule reads it).
    """

    def init(params, prompt, lengths):
        cache = phases.layout_cache(params, cfg, prompt.shape[0], max_len)
        _, _, cache = phases.prefill(params, cache, prompt, lengths, cfg=cfg, impl=impl)
        return cache

    def propose(params, cache, tokens, prev, positions, sampling, keys, k):
        # The first pass feeds [prev, tokens] at [p-1, p]: slot p-1 is missing from the draft
        # cache when the last step accepted all k drafts (the draft never fed its own d_k), and
        # rewriting it otherwise is harmless. One 2-token pass costs about one 1-token pass.
        pos2 = jnp.stack([positions - 1, positions], axis=1)  # [B, 2]
        logits, _, cache = phases.verify(params, cache, jnp.stack([prev, tokens], axis=1), pos2,
                                         cfg=cfg, impl=impl)
        logits = logits[:, 1]
        step_keys = [None] * k if keys is None else list(
            jnp.swapaxes(jax.vmap(lambda key: jax.random.split(key, k))(keys), 0, 1))
        toks, qs = [], []
        # Unrolled (k is small and static): a scan would be a while loop, whose trip test is a
        # device-to-host sync per draft token on GPU. The k-th draft is never fed (see above).
        for i in range(k):
            tok, q = draw(logits, sampling, step_keys[i])
            if with_probs:  # `draw` leaves q empty on greedy rows
                soft = jax.nn.softmax(logits, axis=-1)
                q = soft if keys is None else jnp.where(sampling.temperature[:, None] > 0, q,
                                                        soft)
            toks.append(tok)
            qs.append(q)
            if i < k - 1:
                logits, _, cache = phases.decode_step(params, cache, tok, positions + 1 + i,
                                                      cfg=cfg, impl=impl)
        draft = jnp.stack(toks, axis=1)  # [B, k]
        no_q = keys is None and not with_probs
        return draft, (None if no_q else jnp.stack(qs, axis=1)), cache  # q [B, k, V]

    return Drafter(init=init, propose=propose)


def ngram_match(ctx: jax.Array, length: jax.Array, k: int, max_ngram: int = 3,
                min_ngram: int = 1) -> tuple[jax.Array, jax.Array]:
    """Prompt lookup for one row: the k tokens after the latest earlier match of the longest
    suffix n-gram (n = max_ngram down to min_ngram) of ctx[:length].

    Args:
      ctx: [S] int32 context (slots >= length are stale). length: int32 tokens in context.
      min_ngram: shortest suffix that counts as a match.
    Returns:
      draft [k] int32 (the last token repeated where there is no match or the continuation
      runs out) and found: bool.
    """
    s = ctx.shape[0]
    starts = jnp.arange(s)
    last = ctx[jnp.maximum(length - 1, 0)]
    draft, found = jnp.full((k,), last, jnp.int32), jnp.bool_(False)
    for n in range(min_ngram, max_ngram + 1):  # later (longer) n-grams override shorter ones
        suffix = jax.lax.dynamic_slice(ctx, (jnp.maximum(length - n, 0),), (n,))
        match = jnp.ones((s,), bool)
        for j in range(n):
            match &= jnp.roll(ctx, -j)[starts] == suffix[j]
        # A match must end before the suffix itself starts and leave a continuation.
        match &= starts + n < length
        start = jnp.max(jnp.where(match, starts, -1))  # latest match
        cont = start + n + jnp.arange(k)
        cand = jnp.where(cont < length, ctx[jnp.clip(cont, 0, s - 1)], last)
        ok = start >= 0
        draft, found = jnp.where(ok, cand, draft), found | ok
    return draft, found


def ngram_drafter(max_len: int, max_ngram: int = 3) -> Drafter:
    """Prompt lookup decoding: no model, `aux` is the context [B, max_len] (slot = position).

    Args:
      max_len: context slots (the target cache length). max_ngram: longest suffix matched.
    """

    def init(params, prompt, lengths):
        ctx = jnp.zeros((prompt.shape[0], max_len), jnp.int32)
        return ctx.at[:, :prompt.shape[1]].set(prompt, mode="drop")

    def propose(params, ctx, tokens, prev, positions, sampling, keys, k):
        rows = jnp.arange(ctx.shape[0])
        ctx = ctx.at[rows, positions].set(tokens, mode="drop")
        draft, _ = jax.vmap(lambda c, n: ngram_match(c, n, k, max_ngram))(ctx, positions + 1)
        # Write the drafts too: the accepted ones become context, the rest are overwritten
        # (slot = position, like the dense cache) before the next match reads them.
        cols = positions[:, None] + 1 + jnp.arange(k)
        ctx = ctx.at[rows[:, None], cols].set(draft, mode="drop")
        return draft, None, ctx

    return Drafter(init=init, propose=propose)


def ngram_model_drafter(cfg: ModelConfig, max_len: int, impl: str = "xla", max_ngram: int = 3,
                        min_ngram: int = 2) -> Drafter:
    """Prompt lookup where an n-gram of at least `min_ngram` tokens matches, the draft model
    elsewhere (per row). `aux` is (draft cache, context [B, max_len]).

    The model always drafts (its cost is paid either way; choosing costs no sync). Its cache can
    then hold the model's tokens where lookup's were accepted, so each step re-feeds the last
    k context tokens from `ctx` (one (k+1)-token pass, about the cost of the 2-token one).

    Args:
      cfg: the draft model's config. max_len: cache and context slots. impl: attention.
      max_ngram, min_ngram: longest and shortest suffix n-gram that lookup matches.
    """
    model = model_drafter(cfg, max_len, impl)
    lookup = ngram_drafter(max_len, max_ngram)

    def init(params, prompt, lengths):
        return model.init(params, prompt, lengths), lookup.init(params, prompt, lengths)

    def propose(params, aux, tokens, prev, positions, sampling, keys, k):
        cache, ctx = aux
        rows = jnp.arange(ctx.shape[0])
        ctx = ctx.at[rows, positions].set(tokens, mode="drop")
        # Window [p-k, p]: positions below 0 clamp to 0 and re-feed token 0 there (a duplicate
        # write of the value slot 0 already holds).
        win = jnp.maximum(positions[:, None] + jnp.arange(-k, 1), 0)  # [B, k+1]
        seq = jnp.take_along_axis(ctx, win, axis=1)
        logits, _, cache = phases.verify(params, cache, seq, win, cfg=cfg, impl=impl)
        step_keys = [None] * k if keys is None else list(
            jnp.swapaxes(jax.vmap(lambda key: jax.random.split(key, k))(keys), 0, 1))
        logits, toks, qs = logits[:, -1], [], []
        for i in range(k):  # unrolled, as in `model_drafter`
            tok, q = draw(logits, sampling, step_keys[i])
            toks.append(tok)
            qs.append(q)
            if i < k - 1:
                logits, _, cache = phases.decode_step(params, cache, tok, positions + 1 + i,
                                                      cfg=cfg, impl=impl)
        ng, found = jax.vmap(lambda c, n: ngram_match(c, n, k, max_ngram, min_ngram))(
            ctx, positions + 1)
        draft = jnp.where(found[:, None], ng, jnp.stack(toks, axis=1))  # [B, k]
        q = None
        if keys is not None:  # a lookup draft is deterministic: q is one-hot on it
            one_hot = jax.nn.one_hot(ng, cfg.vocab_size, dtype=jnp.float32)
            q = jnp.where(found[:, None, None], one_hot, jnp.stack(qs, axis=1))  # [B, k, V]
        cols = positions[:, None] + 1 + jnp.arange(k)
        ctx = ctx.at[rows[:, None], cols].set(draft, mode="drop")
        return draft, q, (cache, ctx)

    return Drafter(init=init, propose=propose)
