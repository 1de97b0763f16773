"""Lookahead decoding on tiny random models (f32): the n-gram pool's contents against a
reference LRU pool (a crafted sequence, and a whole decode replayed), the combined tree mask
(each node scores as its own context decoded token by token; each branch as if alone), and
greedy output equal to autoregressive decoding at batch 1 and 3."""

from __future__ import annotations

from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from nar_common import (
    CFG,
    MAX_LEN,
    decode_stepwise,
    greedy_reference,
    make_prompts,
    rows_differ,
    start,
)

from jdecode.cache.dense import init_cache
from jdecode.decoding import phases
from jdecode.decoding.lookahead import (
    LookaheadLayout,
    LookaheadOptions,
    batched,
    context_ngrams,
    empty_pool,
    lookahead,
    pool_insert,
    pool_lookup,
    window_ngrams,
)
from jdecode.decoding.tree import tree_from_parents
from jdecode.model.params import init_params
from pallas_kernels.testing import assert_close, jit_for_tests

W, N, G = 4, 3, 3  # the decoder the loop tests share


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(11))


class ReferencePool:
    """The reference implementation's `token_map` with GUESS_SET_SIZE = g: per first token, a
    list of continuations, oldest first; a re-inserted one moves to the end, a full list drops
    its oldest."""

    def __init__(self, g: int):
        self.g, self.map = g, {}

    def insert(self, key: int, gram: tuple[int, ...]) -> None:
        grams = self.map.setdefault(key, [])
        if gram in grams:
            grams.remove(gram)
        elif len(grams) == self.g:
            grams.pop(0)
        grams.append(gram)


def pool_contents(pool, row: int) -> dict[int, list[tuple[int, ...]]]:
    """Row `row` of a device pool as the reference's map: continuations oldest first."""
    entries = np.asarray(pool.entries[row])  # [V, G, N]
    out = {}
    for key in range(entries.shape[0]):
        live = [e for e in entries[key] if e[-1] >= 0]
        if live:
            out[key] = [tuple(int(t) for t in e[:-1]) for e in sorted(live, key=lambda e: e[-1])]
    return out


@pytest.mark.parametrize("per_call", [1, 4, 19])
def test_pool_matches_reference_lru_on_a_crafted_sequence(per_call):
    """Inserting every 3-gram of a repetitive sequence, one at a time or in batches (the same
    key several times in one batch, the whole sequence at once): refreshes (a repeated n-gram
    becomes the newest), evictions (a fourth continuation of one token drops the least recent),
    and a second row with other inserts and some invalid ones, independent of the first."""
    seq = [1, 2, 3, 1, 2, 4, 1, 2, 3, 1, 5, 6, 1, 7, 8, 1, 2, 4, 2, 3, 1]
    n, g = 3, 3
    pool = empty_pool(2, 10, g, n)
    insert = jax.jit(pool_insert)
    refs = [ReferencePool(g), ReferencePool(g)]
    rows = [[seq[i:i + n] for i in range(len(seq) - n + 1)]]
    rows.append([r[::-1] for r in rows[0][::-1]])  # row 1: the sequence reversed
    valid = np.array([[True] * len(rows[0]), [i % 3 != 1 for i in range(len(rows[0]))]])
    for first in range(0, len(rows[0]), per_call):
        part = [r[first:first + per_call] for r in rows]
        ok = valid[:, first:first + per_call]
        pool = insert(pool, jnp.asarray([[x[0] for x in r] for r in part]),
                      jnp.asarray([[x[1:] for x in r] for r in part]), jnp.asarray(ok))
        for ref, grams, oks in zip(refs, part, ok, strict=True):
            for gram, keep in zip(grams, oks, strict=True):
                if keep:
                    ref.insert(gram[0], tuple(gram[1:]))
        assert pool_contents(pool, 0) == refs[0].map
        assert pool_contents(pool, 1) == refs[1].map
    # What the sequence exercised: token 1 saw (2, 3) twice (a refresh), then 5 distinct
    # continuations in all (2 evicted), (2, 4) last of all (back after its eviction).
    assert refs[0].map[1] == [(5, 6), (7, 8), (2, 4)]
    grams, valid = pool_lookup(pool, jnp.asarray([1, 9]))
    chex.assert_shape(grams, (2, g, n - 1))
    assert sorted(map(tuple, np.asarray(grams[0]).tolist())) == sorted(refs[0].map[1])
    assert np.asarray(valid).tolist() == [[True] * g, [False] * g]  # nothing starts with 9


def test_context_ngrams_skip_positions_before_the_start():
    ctx = jnp.asarray([[4, 5, 6, 7, 0, 0]], jnp.int32)
    ends = jnp.arange(5)[None]  # n-grams ending at 0 and 1 would start before position 0
    keys, grams, valid = context_ngrams(ctx, ends, ends <= 3, 3)
    assert np.asarray(valid).tolist() == [[False, False, True, True, False]]
    pool = pool_insert(empty_pool(1, 8, 2, 3), keys, grams, valid)
    assert pool_contents(pool, 0) == {4: [(5, 6)], 5: [(6, 7)]}


def test_window_ngrams_are_the_columns():
    """Column c of [window; out] is one n-gram: key at level 0, then the levels above; the next
    window is every level moved down one."""
    window = jnp.asarray([[[90, 11, 12, 13], [21, 22, 23, 24], [31, 32, 33, 34]]])  # N - 1 = 3
    out = jnp.asarray([[41, 42, 43, 44]])
    keys, grams, nxt = window_ngrams(window, out)
    assert np.asarray(keys).tolist() == [[90, 11, 12, 13]]
    assert np.asarray(grams[0, 1]).tolist() == [22, 32, 42]
    np.testing.assert_array_equal(nxt[0], [[21, 22, 23, 24], [31, 32, 33, 34], out[0]])


def test_layout_gives_each_node_the_papers_context():
    """Level l column c sits at depth l + c and sees level 0 up to column c, then its own column
    up to itself; a guess sees the root and its own chain."""
    w, n, g = 4, 4, 2
    layout = LookaheadLayout(w, n, g)
    tree = layout.tree()
    assert tree.num_nodes == layout.num_nodes == (w + g) * (n - 1)
    depths, anc = np.asarray(tree.depths[0]), np.asarray(tree.ancestors[0])
    for level in range(n - 1):
        for col in range(w):
            node = level * w + col
            assert depths[node] == level + col
            sees = {c for c in range(col + 1)} | {lv * w + col for lv in range(1, level + 1)}
            assert set(np.flatnonzero(anc[node])) == sees
    for i, node in enumerate(range(layout.lookahead_nodes, layout.num_nodes)):
        chain = range(node - i % (n - 1), node + 1)
        assert depths[node] == i % (n - 1) + 1
        assert set(np.flatnonzero(anc[node])) == {0, *chain}
    vt = layout.verify_tree()
    np.testing.assert_array_equal(vt.depths[0], depths[layout.verify_nodes])


def test_combined_mask_scores_each_branch_as_if_alone(params, rng):
    """One pass over the combined tree gives every node the logits of decoding its context
    token by token, and each branch the logits of scoring that branch alone."""
    w, n, g = 3, 4, 2
    layout = LookaheadLayout(w, n, g)
    prompt, lengths = make_prompts(rng)
    b, t = prompt.shape[0], layout.num_nodes
    prefill = jit_for_tests(partial(phases.prefill, cfg=CFG))
    verify_tree = jit_for_tests(partial(phases.verify_tree, cfg=CFG))
    decode = jit_for_tests(partial(phases.decode_step, cfg=CFG))
    _, _, cache = prefill(params, init_cache(CFG, b, MAX_LEN), prompt, lengths)
    tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (b, t)), jnp.int32)
    tree = batched(layout.tree(), b)
    logits, _, _ = verify_tree(params, cache, tokens, lengths, tree)

    la = layout.lookahead_nodes
    la_tree = batched(tree_from_parents(jnp.asarray(layout.parents()[None, :la]), w + n - 3), b)
    alone, _, _ = verify_tree(params, cache, tokens[:, :la], lengths, la_tree)
    assert_close(logits[:, :la], alone, "float32")
    vn = layout.verify_nodes
    alone, _, _ = verify_tree(params, cache, tokens[:, vn], lengths,
                              batched(layout.verify_tree(), b))
    assert_close(logits[:, vn], alone, "float32")

    # Every node's context in order (its ancestors by depth), decoded from the prefix cache.
    depth = w + n - 2  # the longest context
    anc, depths = np.asarray(tree.ancestors[0]), np.asarray(tree.depths[0])
    paths = np.zeros((b, t, depth), np.int32)
    for node in range(t):
        path = sorted(np.flatnonzero(anc[node]), key=lambda j: depths[j])
        path += [path[-1]] * (depth - len(path))
        paths[:, node] = np.asarray(tokens)[:, path]
    rep = jax.tree_util.tree_map(lambda x: jnp.repeat(x, t, axis=1), cache)
    pos = jnp.repeat(lengths, t)
    steps = []
    for j in range(depth):
        out, _, rep = decode(params, rep, jnp.asarray(paths[:, :, j].reshape(-1)), pos + j)
        steps.append(out.reshape(b, t, -1))
    ref = jnp.take_along_axis(jnp.stack(steps, 2), jnp.asarray(depths)[None, :, None, None],
                              axis=2)[:, :, 0]
    # One [B, T] tree pass vs [B*T, 1] steps: the f32 sums run in another order (as the tree
    # verification tests allow).
    assert_close(logits, ref, "float32", scale=10)


class PoolReplay:
    """After each step, replays the pool's inserts with the reference pool from what the step
    exposed (the window before and after it, the accepted context) and compares every live
    row's pool exactly."""

    def __init__(self, ls, lengths, ngram: int, guesses: int):
        self.ngram, self.step = ngram, 0
        self.refs = [ReferencePool(guesses) for _ in range(len(lengths))]
        ctx = np.asarray(ls.dec.aux.ctx)
        for row, ref in enumerate(self.refs):  # the prompt and the first token, in order
            seq = ctx[row, :int(lengths[row]) + 1].tolist()
            for i in range(len(seq) - ngram + 1):
                ref.insert(seq[i], tuple(seq[i + 1:i + ngram]))
        for row, ref in enumerate(self.refs):
            assert pool_contents(ls.dec.aux.pool, row) == ref.map

    def __call__(self, before, after):
        n = self.ngram
        window = np.asarray(before.dec.aux.window).copy()
        window[:, 0, 0] = np.asarray(before.dec.tokens)
        top = np.asarray(after.dec.aux.window)[:, -1]  # the new top level: the model's outputs
        full = np.concatenate([window, top[:, None]], axis=1)  # [B, N, W]
        pos = np.asarray(before.dec.positions)
        num = np.asarray(after.dec.positions) - pos
        ctx = np.asarray(after.dec.aux.ctx)
        for row, ref in enumerate(self.refs):
            if self.step >= n - 2:  # the window is warm
                for col in range(full.shape[2]):
                    ref.insert(int(full[row, 0, col]), tuple(full[row, 1:, col].tolist()))
            for j in range(num[row]):
                end = pos[row] + 1 + j
                gram = ctx[row, end - n + 1:end + 1].tolist()
                ref.insert(gram[0], tuple(gram[1:]))
            if not bool(before.done[row]):
                assert pool_contents(after.dec.aux.pool, row) == ref.map, (self.step, row)
        self.step += 1


def test_greedy_matches_autoregressive_batch3_and_the_pool_replays(params, rng):
    prompt, lengths = make_prompts(rng)
    want = greedy_reference(params, prompt, lengths)
    decoder = lookahead(CFG, MAX_LEN, W, N, G)
    ls, _ = start("lookahead", decoder, params, prompt, lengths)
    got, emitted = decode_stepwise("lookahead", decoder, params, prompt, lengths,
                                   on_step=PoolReplay(ls, lengths, N, G))
    np.testing.assert_array_equal(got, want)
    assert rows_differ(emitted), "rows never accepted different lengths"
    assert emitted.max() == N, "no step accepted a whole n-gram: the test has little power"


def test_greedy_matches_autoregressive_batch1(params, rng):
    """Batch 1 with other shapes: N = 2 (the window is one level, a step's n-grams are 2-grams)
    and a pool fed by the window alone (no prompt or output n-grams)."""
    prompt, lengths = make_prompts(rng, lens=(13,))
    want = greedy_reference(params, prompt, lengths)
    decoder = lookahead(CFG, MAX_LEN, 6, 2, 4, pool_from_context=False)
    ls, loop = start("lookahead-b1", decoder, params, prompt, lengths)
    ls = loop(ls, jnp.int32(1 << 20))
    np.testing.assert_array_equal(np.asarray(ls.out), want)
    assert int(ls.accepted) > int(ls.live_steps), "no guess was ever accepted"


def test_options_errors_name_the_value():
    with pytest.raises(ValueError, match="ngram=1 must be >= 2"):
        LookaheadOptions(ngram=1)
    with pytest.raises(ValueError, match="guesses=0 must be >= 1"):
        LookaheadOptions(guesses=0)
