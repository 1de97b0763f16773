"""Tree verification and the tree acceptance rules on tiny random models (f32): every node scores
as its path decoded token by token, the committed cache equals a fresh prefill, the rules match
brute force (greedy, typical) and the target's distribution (rejection sampling, chi-squared),
and a tree-speculative loop reproduces greedy decoding exactly."""

from __future__ import annotations

from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jdecode.cache.dense import init_cache
from jdecode.config import ModelConfig
from jdecode.decoding import phases
from jdecode.decoding.acceptance import (
    greedy_tree_accept,
    sampled_tree_accept,
    typical_tree_accept,
)
from jdecode.decoding.autoregressive import autoregressive
from jdecode.decoding.base import Decoder, DecodeState, StepOutput, sample_next
from jdecode.decoding.loop import init_loop, run_loop
from jdecode.decoding.sampling import SamplingArrays, SamplingParams
from jdecode.decoding.speculative import greedy_accept
from jdecode.decoding.tree import StaticTree, commit_path, path_to, tree_from_parents
from jdecode.model.layout import inference_layout
from jdecode.model.params import init_params
from pallas_kernels.testing import assert_close, jit_for_tests

CFG = ModelConfig(vocab_size=64, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=16, intermediate_size=128, max_position_embeddings=512)
MAX_LEN, T_BUCKET = 64, 24
N, DEPTH = 9, 3  # random trees: 9 nodes, depth <= 3
PROMPT_LENS = (5, 11, 17)  # rows with different prefix lengths


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(7))


# One jitted function per phase, shared by every test (the shapes below repeat).
prefill = jit_for_tests(partial(phases.prefill, cfg=CFG))
decode = jit_for_tests(partial(phases.decode_step, cfg=CFG))
verify_tree = {impl: jit_for_tests(partial(phases.verify_tree, cfg=CFG, impl=impl))
               for impl in ("xla", "pallas")}
commit = jit_for_tests(commit_path)


def random_parents(rng: np.random.Generator, b: int, n: int = N, max_depth: int = DEPTH
                   ) -> np.ndarray:
    """[B, N] parents of random trees in topological order, a different tree per row."""
    parents, depth = np.full((b, n), -1), np.zeros((b, n), int)
    for row in range(b):
        for i in range(1, n):
            parents[row, i] = rng.choice(np.flatnonzero(depth[row, :i] < max_depth))
            depth[row, i] = depth[row, parents[row, i]] + 1
    return parents


def node_paths(parents: np.ndarray) -> list[list[list[int]]]:
    """paths[b][i]: node indices from the root to node i."""
    def path(row, i):
        return [i] if i == 0 else path(row, row[i]) + [i]
    return [[path(row, i) for i in range(len(row))] for row in parents]


def prompts(rng: np.random.Generator, lens=PROMPT_LENS) -> tuple[jax.Array, jax.Array]:
    prompt = np.zeros((len(lens), T_BUCKET), np.int32)
    for i, n in enumerate(lens):
        prompt[i, :n] = rng.integers(0, CFG.vocab_size, n)
    return jnp.asarray(prompt), jnp.asarray(lens, jnp.int32)


def scored_tree(params, rng, impl="xla"):
    """Prefilled prompts, a random tree with random node tokens, and its verify_tree output."""
    prompt, lengths = prompts(rng)
    b = prompt.shape[0]
    _, _, cache = prefill(params, init_cache(CFG, b, MAX_LEN), prompt, lengths)
    parents = random_parents(rng, b)
    assert any(np.bincount(row[1:]).max() > 1 for row in parents), "want siblings"
    tree = tree_from_parents(jnp.asarray(parents), DEPTH)
    tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (b, N)), jnp.int32)
    logits, _, tree_cache = verify_tree[impl](params, cache, tokens, lengths, tree)
    return cache, lengths, parents, tree, tokens, logits, tree_cache


# -- tree verification ---------------------------------------------------------------------


def test_node_logits_equal_decoding_the_path(params, rng):
    """Every node's logits equal those of feeding its root-to-node path one token at a time."""
    cache, lengths, parents, tree, tokens, logits, _ = scored_tree(params, rng)
    b = tokens.shape[0]
    chex.assert_shape(logits, (b, N, CFG.vocab_size))
    np.testing.assert_array_equal(tree.depths, [[len(p) - 1 for p in row]
                                                for row in node_paths(parents)])
    # All B * N paths at once: row b * N + i decodes node i's path from row b's prefix cache.
    path_tokens = np.zeros((b, N, DEPTH + 1), np.int32)
    for row, paths in enumerate(node_paths(parents)):
        for i, path in enumerate(paths):
            path = path + [path[-1]] * (DEPTH + 1 - len(path))  # past the node: ignored
            path_tokens[row, i] = np.asarray(tokens[row])[path]
    rep = jax.tree_util.tree_map(lambda x: jnp.repeat(x, N, axis=1), cache)  # [L, B*N, S, K, D]
    pos = jnp.repeat(lengths, N)
    step_logits = []
    for j in range(DEPTH + 1):
        out, _, rep = decode(params, rep, jnp.asarray(path_tokens[:, :, j].reshape(-1)), pos + j)
        step_logits.append(out.reshape(b, N, -1))
    ref = jnp.take_along_axis(jnp.stack(step_logits, 2), tree.depths[..., None, None], axis=2)
    # One [B, N] pass vs [B*N, 1] steps: the f32 sums run in another order; 10x the table.
    assert_close(logits, ref[:, :, 0], "float32", scale=10)


def _check_pallas_matches_xla(params, rng):
    cache, lengths, _, tree, tokens, logits, _ = scored_tree(params, rng)
    pallas_logits, _, _ = verify_tree["pallas"](params, cache, tokens, lengths, tree)
    # Flash attention sums the scores in tiles: 10x the table, as the path test allows.
    assert_close(pallas_logits, logits, "float32", scale=10)


def test_pallas_tree_verification_matches_xla(params, rng):
    """impl="pallas" routes the tree mask into the flash kernel (interpreted on CPU)."""
    _check_pallas_matches_xla(params, rng)


@pytest.mark.gpu
def test_pallas_tree_verification_matches_xla_compiled(params, rng):
    if jax.default_backend() != "gpu":
        pytest.skip("needs the GPU")
    with jax.default_matmul_precision("highest"):  # the f32 tolerance assumes true f32 dots
        _check_pallas_matches_xla(params, rng)


@pytest.mark.parametrize("layout", ["stacked", "per_layer"])
def test_commit_matches_fresh_prefill(params, rng, layout):
    """After committing a random path per row, the cache's live slots equal a fresh prefill
    of the accepted sequence, and so do the path's last logits and the next decode step."""
    if layout == "per_layer":
        params = inference_layout(params)
    prompt, lengths = prompts(rng)
    b = prompt.shape[0]
    per_layer = layout == "per_layer"
    _, _, cache = prefill(params, init_cache(CFG, b, MAX_LEN, per_layer=per_layer), prompt,
                          lengths)
    tree = tree_from_parents(jnp.asarray(random_parents(rng, b)), DEPTH)
    tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (b, N)), jnp.int32)
    logits, _, cache = verify_tree["xla"](params, cache, tokens, lengths, tree)
    last = jnp.asarray(rng.integers(1, N, b), jnp.int32)  # a random accepted node per row
    path, num = path_to(tree, last)
    cache = commit(cache, lengths, path)

    seq = np.asarray(prompt).copy()  # the accepted sequence: prompt, root, path tokens
    new_len = np.asarray(lengths + num)
    for row in range(b):
        n, m = int(lengths[row]), int(num[row])
        seq[row, n:n + m] = np.asarray(tokens[row])[np.asarray(path[row, :m])]
    fresh_logits, _, fresh = prefill(params, init_cache(CFG, b, MAX_LEN, per_layer=per_layer),
                                     jnp.asarray(seq), jnp.asarray(new_len))
    live = jnp.arange(MAX_LEN)[None, :] < new_len[:, None]  # [B, S] slots a query can see
    for got, want in zip(jax.tree_util.tree_leaves(cache), jax.tree_util.tree_leaves(fresh)):
        keep = live[:, :, None, None] if got.ndim == 4 else live[None, :, :, None, None]
        # K/V of a [B, N] tree pass vs a [B, T] prefill: other op shapes, 10x the table.
        assert_close(jnp.where(keep, got, 0), jnp.where(keep, want, 0), "float32", scale=10)
    rows = jnp.arange(b)
    assert_close(logits[rows, path[rows, num - 1]], fresh_logits, "float32", scale=10)
    nxt = jnp.asarray(rng.integers(0, CFG.vocab_size, b), jnp.int32)
    after, _, _ = decode(params, cache, nxt, lengths + num)
    want, _, _ = decode(params, fresh, nxt, lengths + num)
    assert_close(after, want, "float32", scale=10)


def test_static_tree_from_medusa_paths():
    tree = StaticTree.from_paths([(1,), (0, 1), (0,), (0, 0), (1, 0), (0, 0, 0)])
    assert tree.paths == ((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0))
    assert tree.parents == (-1, 0, 0, 1, 1, 2, 3)
    assert tree.depths == (0, 1, 1, 2, 2, 2, 3) and tree.max_depth == 3
    assert tree.ranks == (0, 0, 1, 0, 1, 0, 0)
    arrays = tree.arrays(2)
    chex.assert_shape(arrays.ancestors, (2, 7, 7))
    np.testing.assert_array_equal(arrays.depths[1], tree.depths)
    assert np.flatnonzero(arrays.ancestors[0, 6]).tolist() == [0, 1, 3, 6]
    cands = jnp.arange(2 * 3 * 2).reshape(2, 3, 2)  # [B, depth, rank]
    np.testing.assert_array_equal(tree.fill(jnp.asarray([40, 50]), cands)[0],
                                  [40, 0, 1, 2, 3, 2, 4])
    with pytest.raises(ValueError, match=r"no parent \(2,\)"):
        StaticTree.from_paths([(0,), (2, 1)])


# -- acceptance rules ----------------------------------------------------------------------


def brute_force_accept(parents, tokens, ok, score=None):
    """Reference: enumerate root-to-node paths; keep the deepest whose nodes (but the root) all
    pass, ties to the higher score, then the lower index. Returns (path, length) per row."""
    out = []
    for row, paths in enumerate(node_paths(parents)):
        passing = [p for p in paths if all(ok[row, j] for j in p[1:])]
        best = max(passing, key=lambda p: (len(p), 0.0 if score is None else score[row, p[-1]],
                                           -p[-1]))
        out.append((best, len(best)))
    return out


def check_against(accepted, expected, tokens, bonus):
    for row, (path, m) in enumerate(expected):
        assert int(accepted.num_accepted[row]) == m
        assert np.asarray(accepted.path[row, :m]).tolist() == path
        emitted = [int(tokens[row, j]) for j in path[1:]] + [int(bonus[row])]
        assert np.asarray(accepted.tokens[row, :m]).tolist() == emitted


def likely_tokens(rng, parents, target, p_match=0.7):
    """Node tokens that copy the target's choice at the parent with probability p_match."""
    choice = np.take_along_axis(target, np.maximum(parents, 0), axis=1)
    noise = rng.integers(0, target.max() + 1, parents.shape)
    return np.where(rng.random(parents.shape) < p_match, choice, noise).astype(np.int32)


def test_greedy_accept_matches_brute_force(rng):
    b, v = 64, 5  # a small vocabulary: duplicate siblings happen and must tie-break as stated
    parents = random_parents(rng, b, n=12, max_depth=4)
    logits = rng.standard_normal((b, 12, v)).astype(np.float32)
    target = logits.argmax(-1)
    tokens = likely_tokens(rng, parents, target)
    tree = tree_from_parents(jnp.asarray(parents), 4)
    accepted = jit_for_tests(greedy_tree_accept)(tree, jnp.asarray(tokens), jnp.asarray(logits))
    ok = tokens == np.take_along_axis(target, np.maximum(parents, 0), axis=1)
    expected = brute_force_accept(parents, tokens, ok)
    check_against(accepted, expected, tokens, [target[r, p[-1]] for r, (p, _) in
                                                enumerate(expected)])
    assert len({m for _, m in expected}) > 2  # rows accepted different lengths


def test_chain_tree_reproduces_greedy_accept(rng):
    b, k, v = 32, 4, 4
    logits = jnp.asarray(rng.standard_normal((b, k + 1, v)), jnp.float32)
    draft = jnp.asarray(rng.integers(0, v, (b, k)), jnp.int32)
    chain = StaticTree.from_paths([(0,) * d for d in range(1, k + 1)])
    tokens = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), draft], axis=1)
    accepted = jit_for_tests(greedy_tree_accept)(chain.arrays(b), tokens, logits)
    want_tokens, want_num = jit_for_tests(greedy_accept)(draft, logits)
    np.testing.assert_array_equal(accepted.num_accepted, want_num)
    valid = np.arange(k + 1)[None] < np.asarray(want_num)[:, None]
    np.testing.assert_array_equal(np.where(valid, accepted.tokens, -1),
                                  np.where(valid, want_tokens, -1))


def test_typical_accept_matches_brute_force_and_greedy_rows(rng):
    """The typical rule against a numpy reference; temperature-0 rows take the greedy rule."""
    b, n, v, eps, alpha = 48, 10, 6, 0.2, 0.5
    parents = random_parents(rng, b, n=n, max_depth=3)
    logits = 2.0 * rng.standard_normal((b, n, v)).astype(np.float32)
    temp = np.where(np.arange(b) % 4 == 0, 0.0, rng.uniform(0.5, 2.0, b)).astype(np.float32)
    tokens = likely_tokens(rng, parents, logits.argmax(-1), p_match=0.5)
    sp = SamplingArrays.from_params([SamplingParams(temperature=float(t)) for t in temp])
    tree = tree_from_parents(jnp.asarray(parents), 3)
    keys = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), b)
    rule = jit_for_tests(partial(typical_tree_accept, epsilon=eps, alpha=alpha))
    accepted = rule(tree, jnp.asarray(tokens), jnp.asarray(logits), None, sp, keys)
    greedy = jit_for_tests(greedy_tree_accept)(tree, jnp.asarray(tokens), jnp.asarray(logits))

    z = logits / np.where(temp > 0, temp, 1.0)[:, None, None]
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)  # [B, N, V]
    threshold = np.minimum(eps, alpha * np.exp((p * np.log(p + 1e-5)).sum(-1)))
    par = np.maximum(parents, 0)
    p_tok = np.take_along_axis(np.take_along_axis(p, par[..., None], 1), tokens[..., None],
                               2)[..., 0]
    ok = p_tok > np.take_along_axis(threshold, par, 1)
    log_p = np.log(p_tok)
    log_p[:, 0] = 0
    score = np.array([[log_p[r, path].sum() for path in paths]
                      for r, paths in enumerate(node_paths(parents))])
    expected = brute_force_accept(parents, tokens, ok, score)
    sampled = temp > 0
    for r in np.flatnonzero(sampled):
        path, m = expected[r]
        assert int(accepted.num_accepted[r]) == m
        assert np.asarray(accepted.path[r, :m]).tolist() == path
        bonus = int(accepted.next_token[r])  # drawn from the passing tokens (or the argmax)
        assert p[r, path[-1], bonus] >= threshold[r, path[-1]] or bonus == p[r, path[-1]].argmax()
    for field in ("tokens", "num_accepted", "path"):
        np.testing.assert_array_equal(np.asarray(getattr(accepted, field))[~sampled],
                                      np.asarray(getattr(greedy, field))[~sampled])
    assert len({m for r, (_, m) in enumerate(expected) if sampled[r]}) > 1


def test_typical_accept_limits(rng):
    """epsilon -> 0 keeps the deepest path (the most likely among equals) with a bonus drawn
    from p; temperature -> 0 gives the greedy rule's answer."""
    b, v = 4000, 6
    tree = StaticTree.from_paths([(0,), (1,), (0, 0), (0, 1), (1, 0)]).arrays(b)
    # One random distribution everywhere: the bonus must follow it when epsilon is 0.
    logits = jnp.broadcast_to(jnp.asarray(rng.standard_normal(v), jnp.float32), (b, 6, v))
    tokens = jnp.asarray(rng.integers(0, v, (b, 6)), jnp.int32)
    keys = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), b)
    sp = SamplingArrays.from_params([SamplingParams(temperature=1.0)] * b)
    rule = jit_for_tests(partial(typical_tree_accept, epsilon=0.0))
    accepted = rule(tree, tokens, logits, None, sp, keys)
    np.testing.assert_array_equal(accepted.num_accepted, 3)
    p = np.asarray(jax.nn.softmax(logits[0, 0]))
    # Depth-2 candidates: nodes 3, 4 (under node 1) and 5 (under node 2); the most likely wins.
    lik = {i: p[tokens[:, parent]] * p[tokens[:, i]] for i, parent in ((3, 1), (4, 1), (5, 2))}
    np.testing.assert_array_equal(accepted.path[:, 2], np.array([3, 4, 5])[np.argmax(
        np.stack([lik[3], lik[4], lik[5]]), axis=0)])
    assert chi2_pvalue(np.asarray(accepted.next_token), p) > 1e-3
    cold = SamplingArrays.from_params([SamplingParams(temperature=1e-4)] * b)
    cool = jit_for_tests(typical_tree_accept)(tree, tokens, logits, None, cold, keys)  # defaults
    greedy = jit_for_tests(greedy_tree_accept)(tree, tokens, logits)
    for field in ("tokens", "num_accepted", "path"):
        np.testing.assert_array_equal(getattr(cool, field), getattr(greedy, field))


# -- lossless tree sampling ----------------------------------------------------------------


def chi2_pvalue(samples: np.ndarray, probs: np.ndarray) -> float:
    """Goodness of fit of integer samples to probs; zero-probability cells must stay empty."""
    counts = np.bincount(samples, minlength=probs.size)
    probs = probs.astype(np.float64)
    support = probs > 0
    assert counts[~support].sum() == 0, "a token of zero target probability was drawn"
    probs = probs[support] / probs[support].sum()
    return stats.chisquare(counts[support], probs * samples.size).pvalue


@pytest.mark.parametrize("drafts", ["iid_from_q", "deterministic_top_k"])
def test_tree_rejection_sampling_draws_from_target(rng, drafts):
    """Bigram target P and a bad bigram draft Q over 6 tokens; tree root -> 3 children -> 2
    children each. The first two emitted tokens follow P(a | c) P(b | a)."""
    v, n, c = 6, 30_000, 0
    tree_spec = StaticTree.from_paths([(i,) for i in range(3)] +
                                      [(i, j) for i in range(3) for j in range(2)])
    p_tab = rng.dirichlet(np.full(v, 2.0), size=v).astype(np.float32)  # [V, V] P(next | prev)
    q_tab = rng.dirichlet(np.full(v, 0.3), size=v).astype(np.float32)  # peaked, mostly wrong
    P, Q = jnp.asarray(p_tab), jnp.asarray(q_tab)
    parents = tree_spec.parents
    tree = tree_spec.arrays(n)
    sp = SamplingArrays.from_params([SamplingParams(temperature=1.0)] * n, specialize_greedy=True)

    def draft(key, root):
        """Node tokens [N] and the distributions they were drawn from [N, V]."""
        toks = [root]
        for i in range(1, tree_spec.num_nodes):
            dist = Q[toks[parents[i]]]
            if drafts == "iid_from_q":
                toks.append(jax.random.categorical(jax.random.fold_in(key, i), jnp.log(dist)))
            else:  # siblings are the ranked top candidates of q
                toks.append(jnp.argsort(-dist)[tree_spec.ranks[i]])
        toks = jnp.stack(toks).astype(jnp.int32)
        return toks, Q[toks[jnp.maximum(jnp.asarray(parents), 0)]]

    @jit_for_tests
    def step(keys, roots):
        k_draft, k_rule = jax.vmap(jax.random.split, out_axes=1)(keys)
        tokens, q = jax.vmap(draft)(k_draft, roots)  # [n, N], [n, N, V]
        logits = jnp.log(P[tokens])  # the bigram target after every node
        q = q if drafts == "iid_from_q" else None
        accepted = sampled_tree_accept(tree, tokens, logits, q, sp, k_rule)
        return accepted.tokens, accepted.num_accepted, tokens[:, 1]

    keys = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), (2, n))
    toks, num, d1 = map(np.asarray, step(keys[0], jnp.full((n,), c, jnp.int32)))
    nxt, _, _ = step(keys[1], jnp.asarray(toks[:, 0]))  # the second token of 1-token rows
    a, b = toks[:, 0], np.where(num >= 2, toks[:, 1], np.asarray(nxt)[:, 0])
    assert chi2_pvalue(a, p_tab[c]) > 1e-3
    assert chi2_pvalue(a * v + b, (p_tab[c][:, None] * p_tab).reshape(-1)) > 1e-3
    assert set(np.unique(num).tolist()) == {1, 2, 3}  # every branch of the rule ran
    if drafts == "iid_from_q":  # the test has power: the drafts themselves are far from P
        assert chi2_pvalue(d1, p_tab[c]) < 1e-12


# -- end to end: a tree-speculative greedy loop ---------------------------------------------


DRAFT_TREE = StaticTree.from_paths([(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0)])
TOP_K, MAX_NEW = 3, 24
TREE_MAX_LEN = MAX_LEN + DRAFT_TREE.num_nodes - 1  # scratch slots for the tree's nodes


def tree_speculative(draft_cfg: ModelConfig) -> Decoder:
    """A minimal Medusa-style greedy decoder (a test helper, not a method): a draft model's
    top-k along its own greedy chain fills a static tree, the target verifies it in one pass,
    the greedy rule accepts a path, and the path is committed. params = (target, draft);
    aux = (target cache, context [B, MAX_LEN], steps [B] that accepted a node off the draft's
    own chain, i.e. where the tree beat a chain); the draft re-reads the whole context."""
    spec = DRAFT_TREE
    ranks = jnp.asarray(spec.ranks)

    def init(params, prompt, lengths, sampling, keys, track_seen=False):
        b = prompt.shape[0]
        cache = init_cache(CFG, b, TREE_MAX_LEN)
        logits, _, cache = phases.prefill(params[0], cache, prompt, lengths, cfg=CFG)
        ctx = jnp.zeros((b, MAX_LEN), jnp.int32).at[:, :prompt.shape[1]].set(prompt)
        aux = (cache, ctx, jnp.zeros_like(lengths))
        state = DecodeState(tokens=jnp.zeros((b,), jnp.int32), positions=lengths, keys=keys,
                            sampling=sampling, seen=None, aux=aux)
        first, state = sample_next(logits, state)
        return state.replace(tokens=first)

    def step(params, state):
        target, draft = params
        cache, ctx, off_chain = state.aux
        b, pos = ctx.shape[0], state.positions
        rows = jnp.arange(b)
        ctx = ctx.at[rows, pos].set(state.tokens, mode="drop")
        # The draft: a fresh prefill of the context (cheap at this size), then its chain.
        seen = jnp.minimum(pos + 1, MAX_LEN)  # finished rows run on; keep them in bounds
        dlogits, _, dcache = phases.prefill(draft, init_cache(draft_cfg, b, MAX_LEN), ctx, seen,
                                            cfg=draft_cfg)
        cands = []
        for d in range(spec.max_depth):
            cands.append(jax.lax.top_k(dlogits, TOP_K)[1])  # [B, K]
            if d < spec.max_depth - 1:
                dlogits, _, dcache = phases.decode_step(draft, dcache, cands[-1][:, 0],
                                                        seen + d, cfg=draft_cfg)
        tokens = spec.fill(state.tokens, jnp.stack(cands, axis=1).astype(jnp.int32))
        tree = spec.arrays(b)
        logits, _, cache = phases.verify_tree(target, cache, tokens, pos, tree, cfg=CFG)
        accepted = greedy_tree_accept(tree, tokens, logits)
        cache = commit_path(cache, pos, accepted.path)
        on_path = jnp.arange(spec.max_depth + 1) < accepted.num_accepted[:, None]
        off_chain = off_chain + jnp.any(on_path & (ranks[accepted.path] > 0), axis=1)
        cols = pos[:, None] + 1 + jnp.arange(spec.max_depth + 1)  # stale past num: rewritten
        ctx = ctx.at[rows[:, None], cols].set(accepted.tokens, mode="drop")
        state = state.replace(tokens=accepted.next_token, positions=pos + accepted.num_accepted,
                              aux=(cache, ctx, off_chain))
        return state, StepOutput(accepted.tokens, accepted.num_accepted)

    return Decoder(init=init, step=step)


def run_greedy(decoder, params, prompt, lengths):
    b = prompt.shape[0]
    sampling = SamplingArrays.from_params([SamplingParams()] * b, specialize_greedy=True)
    keys = jax.vmap(jax.random.key)(jnp.arange(b))
    init = jit_for_tests(partial(init_loop, decoder, max_out=MAX_NEW))
    loop = jit_for_tests(partial(run_loop, decoder))
    ls = init(params, prompt, lengths, sampling, keys, jnp.full((b,), MAX_NEW, jnp.int32),
              jnp.full((b, 1), -1, jnp.int32))
    ls = loop(params, ls, jnp.int32(1 << 20))
    assert bool(ls.done.all())
    return np.asarray(ls.out), ls


@pytest.mark.parametrize("lens", [(9,), PROMPT_LENS], ids=["batch1", "batch3"])
def test_tree_speculative_loop_is_greedy(params, rng, lens):
    """Token-identical to autoregressive greedy at batch 1 and 3, with a draft that is the
    target plus noise: > 1 token per step, and some accepted paths leave the draft's chain."""
    prompt, lengths = prompts(rng, lens)
    noise = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), 64)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    draft = treedef.unflatten([x + 0.02 * jax.random.normal(k, x.shape, x.dtype)
                               for x, k in zip(leaves, noise)])
    want, _ = run_greedy(autoregressive(CFG, MAX_LEN), params, prompt, lengths)
    got, ls = run_greedy(tree_speculative(CFG), (params, draft), prompt, lengths)
    np.testing.assert_array_equal(got, want)
    assert int(ls.accepted) > int(ls.live_steps), "the draft never helped"
    assert int(ls.dec.aux[2].sum()) > 0, "no sibling was accepted: the tree went untested"
