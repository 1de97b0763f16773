"""Tree verification on tiny random models (f32): every node scores as its path decoded token
by token, and the committed cache equals a fresh prefill."""

from __future__ import annotations

from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdecode.cache.dense import init_cache
from jdecode.config import ModelConfig
from jdecode.decoding import phases
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
