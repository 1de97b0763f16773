"""The token-level speculative cascade (Narasimhan et al. 2025) on tiny random models, f32: the
pluggable acceptance rule reproduces speculative decoding exactly when it always defers, gives
the draft model's own output when it never does, and samples its mixture target exactly
(chi-squared on a small vocabulary)."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jdecode.config import ModelConfig
from jdecode.decoding import phases
from jdecode.decoding.autoregressive import autoregressive
from jdecode.decoding.deferral import token_deferral
from jdecode.decoding.drafters import model_drafter
from jdecode.decoding.loop import init_loop, run_loop
from jdecode.decoding.sampling import SamplingArrays, SamplingParams
from jdecode.decoding.speculative import deferral_accept, exact_accept, speculative
from jdecode.model.params import init_params
from pallas_kernels.testing import jit_for_tests

CFG = ModelConfig(vocab_size=64, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=16, intermediate_size=128, max_position_embeddings=512)
DRAFT_CFG = CFG.replace(num_layers=1, hidden_size=32, head_dim=8, intermediate_size=64)
MAX_LEN, MAX_NEW, K = 128, 24, 3
PROMPT_LENS = (4, 9, 15)


def always(q, p):
    return jnp.ones(q.shape[:-1], bool)


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(7)
    prompt = np.zeros((len(PROMPT_LENS), 16), np.int32)
    for i, n in enumerate(PROMPT_LENS):
        prompt[i, :n] = rng.integers(0, CFG.vocab_size, n)
    models = init_params(CFG, jax.random.key(11)), init_params(DRAFT_CFG, jax.random.key(12))
    return models, jnp.asarray(prompt), jnp.asarray(PROMPT_LENS, jnp.int32)


def run(decoder, params, prompt, lengths, temperatures=None, specialize=True):
    """Tokens [B, MAX_NEW] of the jitted loop (greedy unless temperatures are given)."""
    b = prompt.shape[0]
    temps = temperatures or [0.0] * b
    sp = SamplingArrays.from_params([SamplingParams(temperature=t) for t in temps],
                                    specialize_greedy=specialize)
    keys = jax.vmap(jax.random.key)(jnp.arange(b) + 5)
    init = jit_for_tests(partial(init_loop, decoder, max_out=MAX_NEW))
    ls = init(params, prompt, lengths, sp, keys, jnp.full((b,), MAX_NEW, jnp.int32),
              jnp.full((b, 1), -1, jnp.int32))
    ls = jit_for_tests(partial(run_loop, decoder))(params, ls, jnp.int32(1 << 20))
    assert bool(ls.done.all())
    return np.asarray(ls.out)


def test_token_rules_on_hand_made_distributions():
    q = jnp.asarray([[0.7, 0.2, 0.1], [0.4, 0.3, 0.3]])
    p = jnp.asarray([[0.9, 0.05, 0.05], [0.45, 0.45, 0.1]])
    # chow: max q < 1 - alpha; diff: max q < max p - alpha; opt: the margin net of alpha * TV.
    assert token_deferral("chow", 0.5)(q, p).tolist() == [False, True]
    assert token_deferral("diff", 0.1)(q, p).tolist() == [True, False]
    # TV(p, q) = 0.2 on both rows: opt's price is alpha * 0.2, so it defers on row 0 at
    # alpha 0.25 (0.7 < 0.85) where diff does not (0.7 < 0.65), and nowhere at alpha 1.5.
    assert token_deferral("diff", 0.25)(q, p).tolist() == [False, False]
    assert token_deferral("opt", 0.25)(q, p).tolist() == [True, False]
    assert token_deferral("opt", 1.5)(q, p).tolist() == [False, False]
    with pytest.raises(ValueError, match="token deferral rule 'typical': choose one of chow"):
        token_deferral("typical", 0.1)


def test_always_deferring_is_speculative_decoding_never_keeps_every_draft(setup):
    """Greedy, rows accepting different lengths: the cascade path with a rule that always
    defers gives exactly speculative decoding's (= autoregressive) tokens. One that never
    defers keeps all k drafts of every step (the draft model's argmax) and takes the bonus
    token, which has no draft, from the target."""
    (target, small), prompt, lengths = setup
    params = (target, small)
    reference = run(autoregressive(CFG, MAX_LEN), target, prompt, lengths)
    probs_drafter = model_drafter(DRAFT_CFG, MAX_LEN, with_probs=True)
    # Chow with alpha = -1 defers wherever max q < 2 (everywhere); alpha = 1 nowhere.
    chow_all = deferral_accept(token_deferral("chow", -1.0))
    chow_none = deferral_accept(token_deferral("chow", 1.0))
    np.testing.assert_array_equal(
        run(speculative(CFG, probs_drafter, K, MAX_LEN, accept=chow_all), params, prompt,
            lengths), reference)
    kept = run(speculative(CFG, probs_drafter, K, MAX_LEN, accept=chow_none), params, prompt,
               lengths)
    assert (kept != reference).any()
    # Teacher-forced on the output: generated token j >= 1 is the draft's argmax after its
    # prefix, except every (K + 1)-th (the bonus), which is the target's; token 0 is prefill's.
    full = np.zeros((len(PROMPT_LENS), prompt.shape[1] + MAX_NEW), np.int32)
    for i, n in enumerate(PROMPT_LENS):
        full[i, :n + MAX_NEW] = [*np.asarray(prompt[i, :n]), *kept[i]]
    argmax = {}
    for name, cfg, p in (("target", CFG, target), ("draft", DRAFT_CFG, small)):
        score = jit_for_tests(partial(phases.score, cfg=cfg))
        argmax[name] = np.asarray(jnp.argmax(score(p, jnp.asarray(full))[0], -1))
    for i, n in enumerate(PROMPT_LENS):
        for j in range(MAX_NEW):
            who = "target" if j % (K + 1) == 0 else "draft"
            assert kept[i, j] == argmax[who][i, n + j - 1], (i, j, who)


def test_greedy_rows_of_a_mixed_batch_match_the_all_greedy_batch(setup):
    """The device-branching path (a batch with a sampled row) gives greedy rows the tokens the
    static all-greedy path gives them, under a rule that defers at some tokens only."""
    (target, small), prompt, lengths = setup
    decoder = speculative(CFG, model_drafter(DRAFT_CFG, MAX_LEN, with_probs=True), K, MAX_LEN,
                          accept=deferral_accept(token_deferral("opt", 0.3)))
    greedy = run(decoder, (target, small), prompt, lengths)
    mixed = run(decoder, (target, small), prompt, lengths, [0.0, 1.0, 0.0], specialize=False)
    np.testing.assert_array_equal(mixed[[0, 2]], greedy[[0, 2]])
    assert mixed.min() >= 0 and mixed.max() < CFG.vocab_size


def _chi2_pvalue(samples: np.ndarray, probs: np.ndarray) -> float:
    counts = np.bincount(samples, minlength=probs.size)
    support = probs > 0
    assert counts[~support].sum() == 0, "a token of zero probability was drawn"
    expected = probs[support].astype(np.float64) / probs[support].sum()
    return stats.chisquare(counts[support], expected * samples.size).pvalue


@pytest.fixture(scope="module")
def bigram():
    """Bigram target P and a peaked, mostly wrong bigram draft Q over 8 tokens."""
    rng = np.random.default_rng(21)
    v = 8
    p = rng.dirichlet(np.full(v, 2.0), size=v).astype(np.float32)  # [V, V] P(next | prev)
    q = rng.dirichlet(np.full(v, 0.4), size=v).astype(np.float32)
    return jnp.asarray(p), jnp.asarray(q)


def _two_tokens(accept, P, Q, n, ctx=0, seed=0):
    """n samples of the first two emitted tokens: k = 2 drafts from Q, verified by `accept`
    against logits log P; a step that emits one token is followed by a step from it."""
    sp = SamplingArrays.from_params([SamplingParams(temperature=1.0)] * n)

    def step(key, ctx):  # ctx [n] -> tokens [n, 3], num [n], first draft [n]
        k_d1, k_d2, k_rule = jax.random.split(key, 3)
        d1 = jax.random.categorical(k_d1, jnp.log(Q[ctx])).astype(jnp.int32)
        d2 = jax.random.categorical(k_d2, jnp.log(Q[d1])).astype(jnp.int32)
        draft = jnp.stack([d1, d2], 1)
        q = jnp.stack([Q[ctx], Q[d1]], 1)
        logits = jnp.log(jnp.stack([P[ctx], P[d1], P[d2]], 1))
        toks, num = accept(draft, q, logits, sp, jax.random.split(k_rule, n))
        return toks, num, d1

    @jax.jit
    def sample(key):
        k1, k2 = jax.random.split(key)
        toks, num, d1 = step(k1, jnp.full((n,), ctx, jnp.int32))
        nxt, _, _ = step(k2, toks[:, 0])
        return toks[:, 0], jnp.where(num >= 2, toks[:, 1], nxt[:, 0]), d1, num

    return map(np.asarray, sample(jax.random.key(seed)))


def test_exact_rule_through_the_cascade_path_is_bitwise_speculative_sampling(bigram):
    """Same keys, same drafts: always deferring gives exactly `accept_tokens`' tokens."""
    P, Q = bigram
    n = 4096
    a1, b1, _, n1 = _two_tokens(deferral_accept(always), P, Q, n, seed=3)
    a2, b2, _, n2 = _two_tokens(exact_accept, P, Q, n, seed=3)  # = accept_tokens when sampling
    for x, y in ((a1, a2), (b1, b2), (n1, n2)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("rule", ["exact", "chow"])
def test_sampling_follows_the_cascade_target(bigram, rule):
    """The first two emitted tokens follow pi(a | c) pi(b | a), pi = p where the rule defers
    and q where it keeps the draft (for the exact rule pi = p: lossless)."""
    P, Q = bigram
    n, v = 60_000, P.shape[0]
    # Chow at the median confidence: the draft is kept in about half the contexts.
    defer = always if rule == "exact" else token_deferral(
        "chow", 1.0 - float(np.median(np.asarray(Q).max(-1))))
    deferred = np.asarray(defer(Q, P))  # [V] per context
    pi = np.where(deferred[:, None], np.asarray(P), np.asarray(Q))  # [V, V] row = context
    assert deferred.all() if rule == "exact" else 0 < deferred.sum() < v
    c = int(np.flatnonzero(deferred)[0])  # the first token comes from p, the second mixes
    a, b, d1, num = _two_tokens(deferral_accept(defer), P, Q, n, c, seed=1)
    joint = (pi[c][:, None] * pi).reshape(-1)
    assert _chi2_pvalue(a * v + b, joint) > 1e-3
    assert _chi2_pvalue(a, pi[c]) > 1e-3
    # Power: the drafts follow Q, not pi; rejections and full acceptances both happened.
    assert _chi2_pvalue(d1, pi[c]) < 1e-9
    assert len(np.unique(num)) > 1
