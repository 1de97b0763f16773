"""Medusa and blockwise decoding on tiny random models (f32): the greedy tree construction
against brute force, the heads against a reference, greedy output token-identical to
autoregressive decoding (a tree at batch 1, a per-batch plan choosing a chain at batch 3), and
lossless tree sampling (chi-squared). Greedy rows inside a sampling batch take the greedy rule
for every AcceptFn (tests/decoding/test_tree.py)."""

from __future__ import annotations

import itertools
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import spy_fused_verify
from scipy import stats

from jdecode.analysis.spec_cost import expected_tokens_chain, expected_tokens_tree
from jdecode.config import ModelConfig
from jdecode.decoding import phases
from jdecode.decoding.autoregressive import autoregressive
from jdecode.decoding.base import parse_plan, plan_lookup
from jdecode.decoding.blockwise import MEASURED_K_PLAN, BlockwiseOptions
from jdecode.decoding.eagle import EagleOptions
from jdecode.decoding.heads import MedusaHeads, bundle, head_logits, init_heads
from jdecode.decoding.loop import init_loop, run_loop
from jdecode.decoding.medusa import (
    MEASURED_PLAN,
    MedusaOptions,
    chain_tree,
    heads_decoder,
    medusa_tree,
)
from jdecode.decoding.sampling import SamplingArrays, SamplingParams
from jdecode.model.fused_decode import ENV_SWITCH, with_decode_copies
from jdecode.model.layout import inference_layout
from jdecode.model.params import init_params
from jdecode.model.transformer import lm_head
from pallas_kernels.testing import assert_close, jit_for_tests

CFG = ModelConfig(vocab_size=32, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=16, intermediate_size=128, max_position_embeddings=512)
MAX_LEN, T_BUCKET, MAX_NEW = 64, 24, 24
PROMPT_LENS = (5, 11, 17)
ACCURACY = [[0.6, 0.2, 0.1], [0.45, 0.15, 0.1], [0.3, 0.1, 0.05]]
TREE = medusa_tree(ACCURACY, 8)
# Batch 1 verifies the tree, batch >= 2 a chain of depth 2: one decoder, two traced shapes.
PLAN = {1: TREE, 2: chain_tree(2)}


@pytest.fixture(scope="module")
def params():
    """The target with three random heads (not the identity: they propose their own tokens)."""
    target = init_params(CFG, jax.random.key(11))
    w = 0.5 * jax.random.normal(jax.random.key(12), (3, 64, 64)) / 8.0
    return bundle(target, MedusaHeads(w=w, b=jnp.zeros((3, 64))))


def prompts(rng, lens=PROMPT_LENS):
    prompt = np.zeros((len(lens), T_BUCKET), np.int32)
    for i, n in enumerate(lens):
        prompt[i, :n] = rng.integers(0, CFG.vocab_size, n)
    return jnp.asarray(prompt), jnp.asarray(lens, jnp.int32)


# -- the tree and the plan --------------------------------------------------------------------


def closed_subsets(nodes, size):
    """Every set of `size` rank paths that contains each member's parent."""
    for subset in itertools.combinations(nodes, size):
        chosen = set(subset)
        if all(len(p) == 1 or p[:-1] in chosen for p in subset):
            yield subset


def test_medusa_tree_maximizes_expected_length_by_brute_force(rng):
    depth, ranks = 2, 3
    # Random accuracies, decreasing with rank (a head's best guess is its most likely).
    acc = np.sort(rng.uniform(0.0, 0.6, (depth, ranks)), axis=1)[:, ::-1].tolist()
    nodes = [p for d in range(1, depth + 1) for p in itertools.product(range(ranks), repeat=d)]
    for n in range(1, 9):
        tree = medusa_tree(acc, n)
        assert tree.num_nodes == n
        best = max(expected_tokens_tree(s, acc) for s in closed_subsets(nodes, n - 1))
        assert expected_tokens_tree(tree.paths, acc) == pytest.approx(best)
    # Past the number of candidate nodes the tree is every node.
    assert medusa_tree(acc, 100).num_nodes == len(nodes) + 1


def test_tree_expectation_and_its_limits():
    chain = chain_tree(3)
    assert chain.paths == ((0,), (0, 0), (0, 0, 0))
    assert expected_tokens_tree(chain.paths, ACCURACY) == pytest.approx(
        expected_tokens_chain([0.6, 0.45, 0.3]))
    assert expected_tokens_tree((), ACCURACY) == 1.0
    assert medusa_tree(ACCURACY, 1).num_nodes == 1
    # Path probabilities 0.6, 0.27, 0.2, 0.1, 0.09, 0.09, 0.081; next would be 0.06.
    assert set(TREE.paths) == {(0,), (0, 0), (1,), (2,), (0, 1), (1, 0), (0, 0, 0)}
    with pytest.raises(ValueError, match="reaches past"):
        expected_tokens_tree([(0, 0, 0, 0)], ACCURACY)


def test_plan_lookup_and_parse():
    plan = parse_plan({16: 8, "64": 1}, 64, "nodes_by_batch")
    assert plan == {1: 64, 16: 8, 64: 1}
    assert [plan_lookup(plan, b) for b in (1, 4, 16, 32, 64, 128)] == [64, 64, 8, 8, 1, 1]
    with pytest.raises(ValueError, match="integer batch sizes"):
        parse_plan({"x": 2}, 64, "nodes_by_batch")
    with pytest.raises(ValueError, match=">= 1"):
        parse_plan({4: 0}, 64, "nodes_by_batch")


# -- the heads ------------------------------------------------------------------------------


def test_heads_start_as_the_lm_head_and_match_a_reference(params, rng):
    hidden = jnp.asarray(rng.standard_normal((2, 5, CFG.hidden_size)), jnp.float32)
    target = params
    fresh = head_logits(target, init_heads(CFG.hidden_size, 3), hidden)  # [2, 5, 3, V]
    for k in range(3):
        assert_close(fresh[..., k, :], lm_head(target, hidden), "float32")
    heads = params.extra
    got = head_logits(target, heads, hidden)
    h = np.asarray(hidden, np.float64)
    for k in range(3):
        z = h @ np.asarray(heads.w[k], np.float64) + np.asarray(heads.b[k], np.float64)
        state = h + z / (1.0 + np.exp(-z))  # the residual SiLU block
        want = state @ np.asarray(target.lm_head, np.float64)
        assert_close(got[..., k, :], want, "float32", scale=10)


# -- decoding ---------------------------------------------------------------------------------


def run(decoder, params, prompt, lengths, sampling, keys, max_new=MAX_NEW):
    init = jit_for_tests(partial(init_loop, decoder, max_out=max_new))
    loop = jit_for_tests(partial(run_loop, decoder))
    b = prompt.shape[0]
    ls = init(params, prompt, lengths, sampling, keys, jnp.full((b,), max_new, jnp.int32),
              jnp.full((b, 1), -1, jnp.int32))
    ls = loop(params, ls, jnp.int32(1 << 20))
    assert bool(ls.done.all())
    return np.asarray(ls.out), ls


def greedy(b):
    return (SamplingArrays.from_params([SamplingParams()] * b, specialize_greedy=True),
            jax.vmap(jax.random.key)(jnp.arange(b)))


@pytest.mark.parametrize("lens", [(9,), PROMPT_LENS], ids=["batch1-tree", "batch3-chain"])
def test_greedy_is_autoregressive_greedy(params, rng, lens):
    prompt, lengths = prompts(rng, lens)
    want, _ = run(autoregressive(CFG, MAX_LEN), params, prompt, lengths, *greedy(len(lens)))
    got, ls = run(heads_decoder(CFG, MAX_LEN, PLAN), params, prompt, lengths,
                  *greedy(len(lens)))
    np.testing.assert_array_equal(got, want)
    assert int(ls.accepted) > int(ls.live_steps), "the heads never helped: the test is weak"


def test_heads_survive_the_fused_decode_copies(params, rng):
    """On the GPU a Generator adds the fused decode step's [N, K] weight copies to every
    Params (`with_decode_copies`); the heads (`params.extra`) must come along. Dropping them
    crashed Medusa and EAGLE there (stop 37's H200 run; blockwise reads the same heads)."""
    fast = with_decode_copies(inference_layout(params))
    assert fast.extra is params.extra and len(fast.decode_t) == CFG.num_layers
    prompt, lengths = prompts(rng, (9,))
    want, _ = run(autoregressive(CFG, MAX_LEN), params, prompt, lengths, *greedy(1))
    got, _ = run(heads_decoder(CFG, MAX_LEN, PLAN), fast, prompt, lengths, *greedy(1))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("lens", [(9,), (5, 11)], ids=["batch1-tree", "batch2-chain"])
def test_the_fused_verify_step_is_lossless(rng, lens, monkeypatch):
    """JDECODE_FUSED_DECODE=1 (opt-in): Medusa's tree (batch 1) and chain (batch 2) verified
    by the fused kernels over the [N, K] copies (`fused_verify_step`, here in the Pallas
    interpreter) emit autoregressive decoding's greedy tokens. 32-wide heads: the kernels'
    smallest."""
    monkeypatch.setenv(ENV_SWITCH, "1")
    cfg = CFG.replace(head_dim=32)
    w = 0.5 * jax.random.normal(jax.random.key(12), (3, 64, 64)) / 8.0
    params = bundle(init_params(cfg, jax.random.key(11)), MedusaHeads(w=w, b=jnp.zeros((3, 64))))
    calls = spy_fused_verify(monkeypatch)
    prompt, lengths = prompts(rng, lens)
    want, _ = run(autoregressive(cfg, MAX_LEN), params, prompt, lengths, *greedy(len(lens)))
    fast = with_decode_copies(inference_layout(params))
    got, ls = run(heads_decoder(cfg, MAX_LEN, PLAN, impl="pallas"), fast, prompt, lengths,
                  *greedy(len(lens)))
    assert calls, "the verify steps did not take the fused kernels"
    np.testing.assert_array_equal(got, want)
    assert int(ls.accepted) > int(ls.live_steps), "the heads never helped: the test is weak"


def test_a_root_only_plan_is_the_autoregressive_decoder(params, rng):
    """Where the plan verifies the root alone, the traced init and step are plain decoding's,
    op for op (no heads, no tree bookkeeping, no scratch slots): speculation switched off by
    the plan costs exactly what autoregressive decoding costs. Below that batch size the tree
    still runs."""
    prompt, lengths = prompts(rng)  # batch 3
    sampling, keys = greedy(3)
    plain = autoregressive(CFG, MAX_LEN)
    planned = heads_decoder(CFG, MAX_LEN, {1: TREE, 3: medusa_tree(ACCURACY, 1)})
    args = (params, prompt, lengths, sampling, keys)
    assert str(jax.make_jaxpr(planned.init)(*args)) == str(jax.make_jaxpr(plain.init)(*args))
    state = jax.jit(plain.init)(*args)
    assert str(jax.make_jaxpr(planned.step)(params, state)) == str(
        jax.make_jaxpr(plain.step)(params, state))
    want, _ = run(plain, params, prompt, lengths, sampling, keys)
    got, ls = run(planned, params, prompt, lengths, sampling, keys)
    np.testing.assert_array_equal(got, want)
    assert int(ls.accepted) == int(ls.live_steps)  # one token per row-step
    one, _ = prompts(rng, (9,))
    tree_init = jax.make_jaxpr(planned.init)(params, one, lengths[:1], *greedy(1))
    assert str(tree_init) != str(jax.make_jaxpr(plain.init)(params, one, lengths[:1],
                                                            *greedy(1)))


def test_default_plans_switch_trees_off_where_they_were_measured_to_lose():
    assert MedusaOptions().nodes_by_batch == MEASURED_PLAN == {4: 1}
    assert MedusaOptions(nodes_by_batch={}).nodes_by_batch == {}  # the tree at every size
    assert EagleOptions().nodes_by_batch == MEASURED_PLAN
    assert BlockwiseOptions().k_by_batch == MEASURED_K_PLAN == {16: 0}
    assert BlockwiseOptions(k_by_batch={}).k_by_batch == {}


def pooled_chi2_pvalue(samples: np.ndarray, probs: np.ndarray, min_expected: float = 5.0
                       ) -> float:
    """Goodness of fit of integer samples to probs, cells expecting < min_expected pooled into
    one; a sample in a zero-probability cell fails outright."""
    counts = np.bincount(samples, minlength=probs.size)
    assert counts[probs == 0].sum() == 0, "a token of zero target probability was drawn"
    expected = probs / probs.sum() * samples.size
    small = expected < min_expected
    obs, exp = counts[~small], expected[~small]
    if small.any():
        obs, exp = np.append(obs, counts[small].sum()), np.append(exp, expected[small].sum())
    return stats.chisquare(obs, exp).pvalue


def test_tree_sampling_follows_the_target(params, rng):
    """One Medusa step on many copies of one prompt: the first two sampled tokens (prefill's,
    then the tree step's first) follow the target's joint distribution (chi-squared)."""
    n, v = 2000, CFG.vocab_size
    prompt, lengths = prompts(rng, (7,))
    sampling = SamplingArrays.from_params([SamplingParams(temperature=1.0)] * n,
                                          specialize_greedy=True)
    keys = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), n)
    decoder = heads_decoder(CFG, MAX_LEN, {1: TREE})
    state = jit_for_tests(decoder.init)(params, jnp.repeat(prompt, n, 0),
                                        jnp.repeat(lengths, n), sampling, keys)
    first = np.asarray(state.tokens)
    _, out = jit_for_tests(decoder.step)(params, state)
    second, num = np.asarray(out.tokens[:, 0]), np.asarray(out.num_accepted)
    assert {1, 2, 3} <= set(num.tolist()), "the tree's branches were not all exercised"

    # The exact joint: p(a | prompt) p(b | prompt, a), from a teacher-forced pass per a.
    seqs = np.concatenate([np.repeat(np.asarray(prompt[:, :7]), v, 0),
                           np.arange(v)[:, None]], axis=1)  # [V, 8]: the prompt, then a
    logits, _ = phases.score(params, jnp.asarray(seqs, jnp.int32), cfg=CFG)
    z = np.asarray(logits, np.float64)
    probs = np.exp(z - z.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    joint = probs[0, 6][:, None] * probs[:, 7]  # [a, b]
    assert pooled_chi2_pvalue(first, joint.sum(1)) > 1e-3
    assert pooled_chi2_pvalue(first * v + second, joint.reshape(-1)) > 1e-3
