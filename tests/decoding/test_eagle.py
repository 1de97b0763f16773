"""EAGLE drafting on a tiny random model (f32): the decoding-time draft agrees with its
training-time unroll (every drafted node's confidence equals the unrolled draft's along the
node's path), the dynamic tree is closed under parents and reranked by confidence, and greedy
EAGLE output is token-identical to autoregressive greedy (a tree at batch 1, a per-batch plan
choosing a chain at batch 3)."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import spy_fused_verify

from jdecode.config import ModelConfig
from jdecode.decoding import phases
from jdecode.decoding.autoregressive import autoregressive
from jdecode.decoding.eagle import EagleAux, TreeShape, catch_up, eagle_decoder, expand_tree
from jdecode.decoding.eagle_draft import (
    DraftKV,
    draft_config,
    draft_logits,
    eagle3_layers,
    features_of,
    init_draft,
)
from jdecode.decoding.heads import bundle
from jdecode.decoding.loop import init_loop, run_loop
from jdecode.decoding.sampling import SamplingArrays, SamplingParams
from jdecode.model.fused_decode import ENV_SWITCH, with_decode_copies
from jdecode.model.layout import inference_layout
from jdecode.model.params import init_params
from jdecode.model.transformer import collect_hidden
from jdecode.training.eagle import unrolled_outputs
from pallas_kernels.testing import assert_close, jit_for_tests

CFG = ModelConfig(vocab_size=32, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=16, intermediate_size=128, max_position_embeddings=512)
DCFG = draft_config(CFG)
MAX_LEN, T_BUCKET, MAX_NEW = 64, 24, 24
SHAPE = TreeShape(depth=3, width=2, top_k=3, nodes=13)  # 12 of the 15 drafted nodes
PLAN = {1: SHAPE, 2: TreeShape(depth=3, width=1, top_k=1, nodes=4)}  # batch >= 2: a chain
LAYERS = eagle3_layers(CFG.num_layers)


@pytest.fixture(scope="module")
def target():
    return init_params(CFG, jax.random.key(31))


def oracle(layers: tuple[int, ...], head_dim: int = CFG.head_dim):
    """A one-layer target and a draft that copies it: the draft reads the embedding of
    x_{j+1} (its feature input zeroed) through the target's only layer and final norm, so at
    input position j it computes about what the target computes at j + 1 (it lacks x_0 and
    normalizes the embedding first). A strong draft, so trees are accepted deep."""
    cfg = CFG.replace(num_layers=1, head_dim=head_dim)
    target = init_params(cfg, jax.random.key(34))
    draft = init_draft(target, cfg, jax.random.key(35), num_features=len(layers))
    e = CFG.hidden_size
    draft = draft.replace(w_in=jnp.concatenate([jnp.eye(e), jnp.zeros((e, e))]),
                          final_norm=target.final_norm)
    return bundle(target, draft)


@pytest.fixture(scope="module")
def noisy(target):
    """The target and a random EAGLE-3 draft (three fused features), far from the target's
    layers."""
    draft = init_draft(target, CFG, jax.random.key(32), num_features=3)
    leaves, treedef = jax.tree_util.tree_flatten(draft)
    keys = jax.random.split(jax.random.key(33), len(leaves))
    return bundle(target, treedef.unflatten([x + 0.05 * jax.random.normal(k, x.shape)
                                             for x, k in zip(leaves, keys)]))


def node_paths(parents: np.ndarray) -> list[list[int]]:
    def path(i):
        return [] if i == 0 else path(int(parents[i])) + [i]
    return [path(i) for i in range(len(parents))]


def test_drafted_tree_matches_the_training_unroll(noisy, rng):
    """Draft the tree after a random prefix; every node's cumulative log-probability equals the
    one the training-time unroll gives along that node's path, and the tree is the pool's most
    confident nodes, closed under parents."""
    b, p = 2, 9  # root at position p: the draft has read input positions < p
    seq = jnp.asarray(rng.integers(0, CFG.vocab_size, (b, p + 1)), jnp.int32)
    params = noisy
    _, _, carry = phases.score(params, seq, cfg=CFG, hooks=collect_hidden(LAYERS))
    hidden = features_of(carry)  # [B, p + 1, 3E]
    kv = DraftKV(*(jnp.zeros((b, MAX_LEN + SHAPE.scratch, CFG.num_kv_heads, CFG.head_dim)),) * 2)
    pos = jnp.full((b,), p, jnp.int32)
    kv, out, scores, tokens = jit_for_tests(partial(
        catch_up, dcfg=DCFG, max_len=MAX_LEN, top_k=SHAPE.top_k))(
        params.extra, params, kv, hidden[:, :p], seq[:, 1:], jnp.zeros((b,), jnp.int32), pos)
    aux = EagleAux(None, kv, out, scores, tokens)
    tree_tokens, parents, node_scores, _ = jit_for_tests(
        partial(expand_tree, shape=SHAPE, dcfg=DCFG, max_len=MAX_LEN))(
        params.extra, params, aux, seq[:, p], pos)
    tree_tokens, parents, node_scores = map(np.asarray, (tree_tokens, parents, node_scores))
    # Every node's path, unrolled in one batch: the prefix, then the path's tokens (padded).
    nodes, ext = [], []
    for row in range(b):
        assert parents[row, 0] == -1 and (parents[row, 1:] < np.arange(1, SHAPE.nodes)).all()
        paths = node_paths(parents[row])
        assert max(map(len, paths)) == SHAPE.depth, "the tree never reached full depth"
        for path in paths[1:]:
            nodes.append((row, path))
            toks = tree_tokens[row, path].tolist() + [0] * (SHAPE.depth - len(path))
            ext.append(np.asarray(seq[row]).tolist() + toks)
    feats = np.zeros((len(ext), p + 1 + SHAPE.depth, hidden.shape[-1]), np.float32)
    feats[:, :p] = np.asarray(hidden)[[row for row, _ in nodes], :p]  # only these are read
    outs = jit_for_tests(partial(unrolled_outputs, unroll=SHAPE.depth, dcfg=DCFG))(
        params.extra, params, jnp.asarray(ext, jnp.int32), jnp.asarray(feats))
    logp = [jax.nn.log_softmax(draft_logits(params.extra, params, o, CFG.rms_norm_eps), -1)
            for o in outs]  # [steps][M, T - 1, V]
    for m, (row, path) in enumerate(nodes):
        # The depth-(l + 1) node is read at input position p + l by unrolled step l + 2,
        # and its token's probability comes from step l + 1 at position p + l - 1.
        want = sum(float(logp[level][m, p + level - 1, tree_tokens[row, node]])
                   for level, node in enumerate(path))
        assert_close(node_scores[row, path[-1]], want, "float32", scale=10)
        assert node_scores[row, path[-1]] <= node_scores[row, parents[row, path[-1]]]


def run(decoder, params, prompt, lengths, max_new=MAX_NEW):
    b = prompt.shape[0]
    sampling = SamplingArrays.from_params([SamplingParams()] * b, specialize_greedy=True)
    keys = jax.vmap(jax.random.key)(jnp.arange(b))
    init = jit_for_tests(partial(init_loop, decoder, max_out=max_new))
    ls = init(params, prompt, lengths, sampling, keys, jnp.full((b,), max_new, jnp.int32),
              jnp.full((b, 1), -1, jnp.int32))
    ls = jit_for_tests(partial(run_loop, decoder))(params, ls, jnp.int32(1 << 20))
    assert bool(ls.done.all())
    return np.asarray(ls.out), ls


@pytest.mark.parametrize("layers, lens", [((0, 0, 0), (9,)), ((0,), (5, 11, 17))],
                         ids=["eagle3-batch1-tree", "final-batch3-chain"])
def test_greedy_is_autoregressive_greedy(rng, layers, lens):
    """Three fused feature layers at batch 1 (a tree), one at batch 3 (the plan's chain)."""
    params = oracle(layers)
    prompt = np.zeros((len(lens), T_BUCKET), np.int32)
    for i, n in enumerate(lens):
        prompt[i, :n] = rng.integers(0, CFG.vocab_size, n)
    prompt, lengths = jnp.asarray(prompt), jnp.asarray(lens, jnp.int32)
    cfg = CFG.replace(num_layers=1)
    want, _ = run(autoregressive(cfg, MAX_LEN), params, prompt, lengths)
    got, ls = run(eagle_decoder(cfg, MAX_LEN, PLAN, layers), params, prompt, lengths)
    np.testing.assert_array_equal(got, want)
    assert int(ls.accepted) > 1.5 * int(ls.live_steps), "the draft barely helped: weak test"


@pytest.mark.parametrize("lens", [(9,), (5, 11)], ids=["batch1-tree", "batch2-chain"])
def test_the_fused_verify_step_is_lossless(rng, lens, monkeypatch):
    """JDECODE_FUSED_DECODE=1 (opt-in): the target's verify steps (tree at batch 1, chain at
    batch 2) run the fused kernels over the [N, K] copies, with EAGLE-3's feature taps as
    hooks between them, and the output is autoregressive greedy decoding's. 32-wide heads:
    the kernels' smallest."""
    monkeypatch.setenv(ENV_SWITCH, "1")
    layers = (0, 0, 0)
    params = oracle(layers, head_dim=32)
    cfg = CFG.replace(num_layers=1, head_dim=32)
    calls = spy_fused_verify(monkeypatch)
    prompt = np.zeros((len(lens), T_BUCKET), np.int32)
    for i, n in enumerate(lens):
        prompt[i, :n] = rng.integers(0, CFG.vocab_size, n)
    prompt, lengths = jnp.asarray(prompt), jnp.asarray(lens, jnp.int32)
    want, _ = run(autoregressive(cfg, MAX_LEN), params, prompt, lengths)
    fast = with_decode_copies(inference_layout(params))
    got, ls = run(eagle_decoder(cfg, MAX_LEN, PLAN, layers, impl="pallas"), fast, prompt,
                  lengths)
    assert calls and all(h is not None for h in calls), "the verify steps were not fused"
    np.testing.assert_array_equal(got, want)
    assert int(ls.accepted) > 1.5 * int(ls.live_steps), "the draft barely helped: weak test"
