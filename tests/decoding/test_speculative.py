"""Speculative decoding on tiny random models: greedy exactness for every drafter, per-row
acceptance in one batch, cache rollback, and the lossless sampling rule (chi-squared)."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jdecode.cache.dense import init_cache
from jdecode.config import ModelConfig
from jdecode.decoding import methods, phases
from jdecode.decoding.autoregressive import autoregressive
from jdecode.decoding.drafters import (
    Drafter,
    draw,
    filtered_probs,
    model_drafter,
    ngram_drafter,
    ngram_match,
    ngram_model_drafter,
)
from jdecode.decoding.loop import init_loop, run_loop
from jdecode.decoding.sampling import SamplingArrays, SamplingParams
from jdecode.decoding.speculative import (
    MEASURED_K_PLAN,
    SpeculativeOptions,
    accept_tokens,
    sampled_accept,
    speculative,
)
from jdecode.io.registry import Model
from jdecode.model.params import init_params
from pallas_kernels.testing import assert_close, jit_for_tests

CFG = ModelConfig(vocab_size=64, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=16, intermediate_size=128, max_position_embeddings=512)
DRAFT_CFG = CFG.replace(num_layers=1, hidden_size=32, head_dim=8, intermediate_size=64)
MAX_LEN, MAX_NEW, K = 128, 40, 3
PROMPT_LENS = (5, 11, 17)


@pytest.fixture(scope="module")
def models():
    return init_params(CFG, jax.random.key(0)), init_params(DRAFT_CFG, jax.random.key(1))


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    b, t = len(PROMPT_LENS), 32
    prompt = np.zeros((b, t), np.int32)
    for i, n in enumerate(PROMPT_LENS):
        prompt[i, :n] = rng.integers(0, CFG.vocab_size, n)
    return jnp.asarray(prompt), jnp.asarray(PROMPT_LENS, jnp.int32)


_EXECUTABLES: dict = {}


def _executables(name: str, decoder, max_new: int):
    """One jitted (init, loop) pair per decoder name: tests that share a decoder share its compile
    (sampling parameters and the step limit are arrays, so they never recompile)."""
    if name not in _EXECUTABLES:
        _EXECUTABLES[name] = (jit_for_tests(partial(init_loop, decoder, max_out=max_new)),
                              jit_for_tests(partial(run_loop, decoder)))
    return _EXECUTABLES[name]


def start(name, decoder, params, prompt, lengths, max_new=MAX_NEW, temperature=0.0, seed=0):
    """Prefill and first token through the jitted loop's init; returns (LoopState, loop fn)."""
    b = prompt.shape[0]
    sampling = SamplingArrays.from_params([SamplingParams(temperature=temperature)] * b)
    keys = jax.vmap(jax.random.key)(jnp.arange(b) + seed)
    stop = jnp.full((b, 1), -1, jnp.int32)
    init, loop = _executables(name, decoder, max_new)
    ls = init(params, prompt, lengths, sampling, keys, jnp.full((b,), max_new, jnp.int32), stop)
    return ls, partial(loop, params)


def generate(name, decoder, params, prompt, lengths, **kw):
    """Runs the jitted generation loop; returns tokens [B, max_new] and the final LoopState."""
    ls, loop = start(name, decoder, params, prompt, lengths, **kw)
    ls = loop(ls, jnp.int32(1 << 20))
    assert bool(ls.done.all())
    return np.asarray(ls.out), ls


@pytest.fixture(scope="module")
def greedy_reference(models, prompts):
    return generate("ar", autoregressive(CFG, MAX_LEN), models[0], *prompts)[0]


def oracle_drafter(script: jax.Array, wrong_at: jax.Array) -> Drafter:
    """A test drafter that proposes the known greedy continuation `script` [B, S] (indexed by
    position), corrupted wherever `wrong_at` [B, S] is set: each row's acceptance is chosen."""

    def init(params, prompt, lengths):
        return None

    def propose(params, aux, tokens, prev, positions, sampling, keys, k):
        cols = positions[:, None] + 1 + jnp.arange(k)  # [B, k]
        good = jnp.take_along_axis(script, cols, axis=1)
        bad = jnp.take_along_axis(wrong_at, cols, axis=1)
        return jnp.where(bad, (good + 1) % CFG.vocab_size, good), None, aux

    return Drafter(init, propose)


def spec_setup(models, draft: str, greedy: bool = False):
    """(decoder, params) for a named draft; the decoder is built per call, compiled once."""
    target, small = models
    drafter, params = {
        "self": (model_drafter(CFG, MAX_LEN), (target, target)),
        "other_model": (model_drafter(DRAFT_CFG, MAX_LEN), (target, small)),
        "ngram": (ngram_drafter(MAX_LEN), (target, None)),
        "ngram+model": (ngram_model_drafter(DRAFT_CFG, MAX_LEN), (target, small)),
        "ngram+self": (ngram_model_drafter(CFG, MAX_LEN), (target, target)),
    }[draft]
    return speculative(CFG, drafter, K, MAX_LEN, greedy=greedy), params


@pytest.mark.parametrize("greedy", [False, True], ids=["dynamic", "static_greedy"])
@pytest.mark.parametrize("draft", ["self", "other_model", "ngram", "ngram+model", "ngram+self"])
def test_greedy_matches_autoregressive(models, prompts, greedy_reference, draft, greedy):
    decoder, params = spec_setup(models, draft, greedy)
    out, ls = generate(f"{draft}-{greedy}", decoder, params, *prompts)
    np.testing.assert_array_equal(out, greedy_reference)
    accepted, live = int(ls.accepted), int(ls.live_steps)
    if draft == "self":  # the target drafting for itself is always right: alpha = 1 exactly
        assert accepted == (K + 1) * live
    elif draft == "ngram":  # random models repeat themselves: lookup is sometimes right
        assert live < accepted < (K + 1) * live
    elif draft == "ngram+self":  # lookup takes over somewhere, and is wrong somewhere
        assert accepted < (K + 1) * live


def test_ngram_model_drafter_uses_lookup_where_it_matches(models):
    """A context whose 2-gram suffix occurred before gets lookup's continuation; one without
    gets the model's argmax (a repeated unigram is below min_ngram = 2)."""
    _, small = models
    ctx = jnp.asarray([[3, 4, 9, 3, 4, 0, 0, 0], [3, 4, 9, 1, 2, 0, 0, 0]], jnp.int32)
    lengths = jnp.asarray([4, 4], jnp.int32)  # the newest token, 4 resp. 2, is fed below
    tokens, positions = jnp.asarray([4, 2], jnp.int32), lengths
    drafter = ngram_model_drafter(DRAFT_CFG, 16)
    model = model_drafter(DRAFT_CFG, 16)
    sp = SamplingArrays.from_params([SamplingParams()] * 2)
    aux = drafter.init(small, ctx, lengths)
    draft, q, _ = drafter.propose(small, aux, tokens, ctx[:, 3], positions, sp, None, 2)
    assert q is None
    assert draft[0].tolist() == [9, 3]  # after the earlier (3, 4)
    m_draft, _, _ = model.propose(small, model.init(small, ctx, lengths), tokens, ctx[:, 3],
                                  positions, sp, None, 2)
    np.testing.assert_array_equal(draft[1], m_draft[1])


def test_rows_with_different_acceptance(models, prompts, greedy_reference):
    """Row 0's drafts are always right, row 1's always wrong, row 2's wrong at random slots:
    each row still gives its own greedy output, and the accepted counts are what was chosen."""
    prompt, lengths = prompts
    b = prompt.shape[0]
    script = jnp.zeros((b, MAX_LEN + 2 * K), jnp.int32)
    for i, n in enumerate(PROMPT_LENS):  # position of the j-th generated token is n + j
        script = script.at[i, n:n + MAX_NEW].set(greedy_reference[i])
    wrong_at = jnp.stack([jnp.zeros(script.shape[1], bool), jnp.ones(script.shape[1], bool),
                          jax.random.bernoulli(jax.random.key(3), 0.3, (script.shape[1],))])
    decoder = speculative(CFG, oracle_drafter(script, wrong_at), K, MAX_LEN)
    ls, loop = start("oracle", decoder, (models[0], None), prompt, lengths)
    nums: list[list[int]] = [[] for _ in range(b)]
    while not bool(ls.done.all()):
        before = np.asarray(ls.n_out)
        ls = loop(ls, jnp.int32(1))  # one step per call, to see each row's count
        after = np.asarray(ls.n_out)
        for i in np.flatnonzero(after < MAX_NEW):  # rows that max_new did not cut short
            nums[i].append(int(after[i] - before[i]))
    np.testing.assert_array_equal(np.asarray(ls.out), greedy_reference)
    assert set(nums[0]) == {K + 1} and set(nums[1]) == {1}
    assert len(set(nums[2])) > 1


@pytest.mark.parametrize("draft", ["other_model", "self"])
def test_rollback_matches_fresh_prefill(models, prompts, draft):
    """After a step (with rejections for the bad draft, all accepted for the self draft), the
    target's and the draft's next logits equal a fresh prefill of the accepted sequence."""
    decoder, params = spec_setup(models, draft)
    (target, dparams), dcfg = params, DRAFT_CFG if draft == "other_model" else CFG
    prompt, lengths = prompts
    b = prompt.shape[0]
    ls, loop = start(f"{draft}-False", decoder, params, prompt, lengths)
    ls = loop(ls, jnp.int32(1))
    state, n_out = ls.dec, np.asarray(ls.n_out)
    num = n_out - 1  # tokens of the one step (the first came from prefill)
    if draft == "other_model":
        assert (num < K + 1).any(), "the bad draft should be rejected somewhere"
    else:
        assert (num == K + 1).all()
    ctx = np.zeros((b, 64), np.int32)  # accepted context: prompt, then every emitted token
    ctx_len = np.asarray(lengths) + n_out
    for i in range(b):
        ctx[i, :ctx_len[i]] = [*np.asarray(prompt[i, :int(lengths[i])]),
                               *np.asarray(ls.out[i, :n_out[i]])]
    np.testing.assert_array_equal(np.asarray(state.positions), ctx_len - 1)

    @partial(jit_for_tests, static_argnums=0)
    def fresh(cfg, params):
        return phases.prefill(params, init_cache(cfg, b, MAX_LEN), jnp.asarray(ctx),
                              jnp.asarray(ctx_len), cfg=cfg)[0]

    @partial(jit_for_tests, static_argnums=0)
    def next_logits(cfg, params, cache, prev, tokens, positions):
        # What the drafter does next: [prev, token] at [p-1, p] (see model_drafter); for the
        # target the same call re-writes slot p-1 with the value it already holds.
        pos2 = jnp.stack([positions - 1, positions], 1)
        return phases.verify(params, cache, jnp.stack([prev, tokens], 1), pos2, cfg=cfg)[0][:, 1]

    aux = state.aux
    # Different op shapes (a [B, 2] query vs a [B, 64] prefill) reorder f32 sums: 10x the table.
    assert_close(next_logits(CFG, target, aux.cache, aux.prev, state.tokens, state.positions),
                 fresh(CFG, target), "float32", scale=10)
    assert_close(next_logits(dcfg, dparams, aux.draft, aux.prev, state.tokens, state.positions),
                 fresh(dcfg, dparams), "float32", scale=10)


def test_ngram_match():
    ctx = jnp.asarray([5, 6, 7, 8, 1, 5, 6, 9, 9, 5, 6, 0, 0], jnp.int32)
    # Suffix (5, 6) at 9..10; the latest earlier match starts at 5 and continues with 9, 9, 5.
    draft, found = ngram_match(ctx, jnp.int32(11), 3)
    assert bool(found) and draft.tolist() == [9, 9, 5]
    # Suffix (1, 5, 6) has no earlier match but (5, 6) does; its continuation runs into the
    # end of the context after 5 tokens, and the last token pads the rest.
    draft, found = ngram_match(ctx, jnp.int32(7), 6, max_ngram=3)
    assert bool(found) and draft.tolist() == [7, 8, 1, 5, 6, 6]
    draft, found = ngram_match(ctx, jnp.int32(4), 2)  # 5 6 7 8: no repeats
    assert not bool(found) and draft.tolist() == [8, 8]


# -- the lossless sampling rule -----------------------------------------------------------


def _chi2_pvalue(samples: np.ndarray, probs: np.ndarray) -> float:
    """Goodness of fit of integer samples to probs; zero-probability cells must stay empty."""
    counts = np.bincount(samples, minlength=probs.size)
    probs = probs.astype(np.float64)
    support = probs > 0
    assert counts[~support].sum() == 0, "a token of zero target probability was drawn"
    probs = probs[support] / probs[support].sum()  # scipy wants sums equal to 1e-8
    return stats.chisquare(counts[support], probs * samples.size).pvalue


def test_sampled_accept_draws_from_target_joint():
    """Bigram target P and a deliberately bad bigram draft Q over 8 tokens, k = 2: the first two
    emitted tokens follow P(a | c) P(b | a), although the drafts clearly follow Q."""
    v, n, c = 8, 40_000, 0  # k = 2 drafts
    rng = np.random.default_rng(1)
    p_tab = rng.dirichlet(np.full(v, 2.0), size=v).astype(np.float32)  # [V, V] P(next | prev)
    q_tab = rng.dirichlet(np.full(v, 0.3), size=v).astype(np.float32)  # peaked, mostly wrong
    P, Q = jnp.asarray(p_tab), jnp.asarray(q_tab)

    def speculate(key, ctx):
        k_d, k_rule = jax.random.split(key)
        d1 = jax.random.categorical(k_d, jnp.log(Q[ctx]))
        d2 = jax.random.categorical(jax.random.fold_in(k_d, 1), jnp.log(Q[d1]))
        draft = jnp.stack([d1, d2]).astype(jnp.int32)
        toks, num = sampled_accept(k_rule, draft, jnp.stack([Q[ctx], Q[d1]]),
                                   jnp.stack([P[ctx], P[d1], P[d2]]))
        return toks, num, d1

    def two_tokens(key):
        k1, k2 = jax.random.split(key)
        toks, num, d1 = speculate(k1, c)
        nxt, _, _ = speculate(k2, toks[0])  # one token emitted: the next step continues
        return toks[0], jnp.where(num >= 2, toks[1], nxt[0]), d1, num

    a, b, d1, num = jax.jit(jax.vmap(two_tokens))(jax.random.split(jax.random.key(0), n))
    a, b, d1, num = map(np.asarray, (a, b, d1, num))
    joint = (p_tab[c][:, None] * p_tab).reshape(-1)  # P(a | c) P(b | a)
    assert _chi2_pvalue(a * v + b, joint) > 1e-3
    assert _chi2_pvalue(a, p_tab[c]) > 1e-3
    # The test has power: the draft's own tokens are far from P, and every branch of the rule
    # ran (rejection at the first draft, at the second, and the bonus token).
    assert _chi2_pvalue(d1, p_tab[c]) < 1e-12
    assert set(np.unique(num).tolist()) == {1, 2, 3}


def test_accept_tokens_with_filtering_draws_from_filtered_target():
    """The batched path: drafts drawn with `draw` (temperature, top-k), verified by
    `accept_tokens`; the first emitted token follows the target's filtered distribution."""
    v, k, n = 8, 3, 20_000
    key_t, key_d = jax.random.split(jax.random.key(5))
    # Position-independent logits are enough: only the first token is checked, and it is
    # emitted on every branch of the rule.
    t_logits = 2.0 * jax.random.normal(key_t, (1, k + 1, v))
    d_logits = 2.0 * jax.random.normal(key_d, (1, k, v))
    sp = SamplingArrays.from_params([SamplingParams(temperature=0.8, top_k=5)] * n)
    keys = jax.random.split(jax.random.key(6), (k + 1, n))

    @jax.jit  # arguments, not closed-over constants: XLA would constant-fold the sorts
    def run(t_logits, d_logits, sp, keys):
        t_logits = jnp.broadcast_to(t_logits, (n, k + 1, v))
        drafts, qs = zip(*[draw(jnp.broadcast_to(d_logits[:, i], (n, v)), sp, keys[i])
                           for i in range(k)])
        return accept_tokens(jnp.stack(drafts, 1), jnp.stack(qs, 1), t_logits, sp, keys[k])

    toks, num = run(t_logits, d_logits, sp, keys)
    p0 = np.asarray(filtered_probs(t_logits[:, 0], jax.tree_util.tree_map(lambda a: a[:1], sp)))
    p0 = p0[0]
    assert (p0 == 0).sum() == v - 5  # top-k really filtered
    first = np.asarray(toks[:, 0])
    assert p0[first].min() > 0
    assert _chi2_pvalue(first, p0) > 1e-3
    assert len(np.unique(np.asarray(num))) > 1


@pytest.mark.parametrize("draft", ["other_model", "ngram+model"])
def test_sampling_generation_runs(models, prompts, draft):
    """End to end with temperature > 0: valid tokens, and rows get their own acceptance."""
    decoder, params = spec_setup(models, draft)
    out, ls = generate(f"{draft}-False", decoder, params, *prompts, temperature=1.0)
    assert out.min() >= 0 and out.max() < CFG.vocab_size
    assert int(ls.live_steps) < int(ls.accepted)


def test_the_plan_decodes_plainly_where_it_says_k_0(models, prompts, greedy_reference):
    """`k_by_batch` (the method's per-batch plan): batch 3 under {3: 0} runs the target's own
    decoder, one token a step, and batch 1 speculates; both give the greedy tokens."""
    model = Model("tiny-spec", CFG, models[0], None)
    built = methods.build("speculative", model, {"draft": "ngram", "k": K,
                                                 "k_by_batch": {3: 0}}, impl="xla")
    decoder = built.decoder_fn(CFG, MAX_LEN)
    got, ls = generate("plan-b3", decoder, built.model.params, *prompts)
    np.testing.assert_array_equal(got, greedy_reference)
    assert int(ls.accepted) == int(ls.live_steps)  # one token per row-step

    ls1, _ = start("plan-b1", decoder, built.model.params, prompts[0][:1], prompts[1][:1])
    _, out = jax.eval_shape(decoder.step, built.model.params, ls1.dec)
    assert out.tokens.shape == (1, K + 1)  # batch 1: a draft of K and the bonus token
    ls3, _ = start("plan-b3", decoder, built.model.params, *prompts)
    _, out = jax.eval_shape(decoder.step, built.model.params, ls3.dec)
    assert out.tokens.shape == (3, 1)
    got1 = generate("plan-b1", decoder, built.model.params, prompts[0][:1], prompts[1][:1])[0]
    np.testing.assert_array_equal(got1, greedy_reference[:1])

    assert built.describe({"batch": 3, "mean_accepted": 1.0}) == {"mean_accepted": 1.0, "k": 0}
    one = built.describe({"batch": 1, "mean_accepted": 2.0})
    assert one["k"] == K and one["acceptance_rate"] == pytest.approx(1 / K)


def test_the_default_plan_and_bad_plans():
    assert SpeculativeOptions().k_by_batch == MEASURED_K_PLAN == {16: 0}
    assert SpeculativeOptions(k_by_batch={}).k_by_batch == {}  # k at every batch size
    with pytest.raises(ValueError, match=r"batch 4 maps to -1; give k >= 0"):
        SpeculativeOptions(k_by_batch={4: -1})
    with pytest.raises(ValueError, match="integer batch sizes"):
        SpeculativeOptions(k_by_batch={"many": 0})
