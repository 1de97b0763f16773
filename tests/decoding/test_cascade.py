"""The sequence-level cascade on tiny random models, f32: always deferring gives the last
model's output and never deferring the first's, a batched cascade gives each row what it gets
alone, the per-row cost records add up, answer statistics match a slow reference, and
thresholds calibrate exactly."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_model

from jdecode.config import ConfigError
from jdecode.decoding import deferral as dr
from jdecode.decoding import methods, phases
from jdecode.decoding.cascade import Deferral, SequenceCascade, cascade_summary
from jdecode.decoding.generate import Generator
from jdecode.decoding.sampling import SamplingParams

NEW = 8
SP = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
INF = math.inf


@pytest.fixture(scope="module")
def ladder():
    """Three tiny models of one vocabulary (the last has 3 layers), each with its Generator."""
    models = [tiny_model(31), tiny_model(32), tiny_model(33, num_layers=3)]
    return [Generator(m) for m in models]


@pytest.fixture
def prompts(rng):
    return [rng.integers(0, 256, n).tolist() for n in (3, 7, 12)]


def tokens(results):
    return [r.token_ids for r in results]


def test_always_defer_gives_the_last_model_and_never_the_first(ladder, prompts):
    alone = [tokens(g.generate(prompts, SP)) for g in ladder]
    assert alone[0] != alone[2]
    last = SequenceCascade(ladder, Deferral("mean-logprob", (INF, INF))).generate(prompts, SP)
    first = SequenceCascade(ladder, Deferral("quantile", (-INF, -INF))).generate(prompts, SP)
    assert tokens(last) == alone[2] and tokens(first) == alone[0]
    assert [r.stats["cascade"]["stage"] for r in last] == [2, 2, 2]
    assert [r.stats["cascade"]["stage"] for r in first] == [0, 0, 0]
    for r, i in zip(last, range(3)):  # the record holds every model's answer on the way
        assert r.stats["cascade"]["tokens"] == [a[i] for a in alone]
        assert r.stats["cascade"]["deferred"] == [True, True]


def test_batched_cascade_gives_each_row_what_it_gets_alone(ladder, prompts):
    """Thresholds between the rows' scores send one row to each model; run batched (rows
    re-batched after each deferral) or one by one, every row gets the same answer."""
    rec = [r.stats["cascade"] for r in SequenceCascade(
        ladder, Deferral("mean-logprob", (INF, INF))).generate(prompts, SP)]
    s0 = [c["scores"]["mean-logprob"][0] for c in rec]
    s1 = [c["scores"]["mean-logprob"][1] for c in rec]
    order = np.argsort(s0)  # the best row at model 0 stops there, the other two go on
    t0 = 0.5 * (s0[order[1]] + s0[order[2]])
    t1 = 0.5 * (s1[order[0]] + s1[order[1]])  # of those, the better at model 1 stops there
    casc = SequenceCascade(ladder, Deferral("mean-logprob", (t0, t1)))
    batched = casc.generate(prompts, SP)
    alone = [casc.generate([p], SP)[0] for p in prompts]
    stages = [r.stats["cascade"]["stage"] for r in batched]
    assert sorted(stages) == [0, 1, 2]
    assert stages == [r.stats["cascade"]["stage"] for r in alone]
    assert tokens(batched) == tokens(alone)
    for r, a in zip(batched, alone):
        assert r.stats["cascade"]["tokens"] == a.stats["cascade"]["tokens"]
        for rule, v in r.stats["cascade"]["scores"].items():
            np.testing.assert_allclose(v, a.stats["cascade"]["scores"][rule], rtol=1e-4)


def test_cost_records_and_summary(ladder, prompts):
    """Per row: forward passes (prefill + decode steps + the scoring pass before a deferral),
    time shares that add up to the batch's time; per cell: calls per model."""
    res = SequenceCascade(ladder[:2], Deferral("max-prob", (INF,))).generate(prompts, SP)
    for r in res:
        c = r.stats["cascade"]
        assert c["passes"] == [1 + (NEW - 1) + 1, 1 + (NEW - 1)]
        assert len(c["seconds"]) == 2 and min(c["seconds"]) > 0
    total = sum(sum(r.stats["cascade"]["seconds"]) for r in res)
    assert total == pytest.approx(res[0].stats["decode_s"] + res[0].stats["prefill_ms"] / 1e3)
    # Every row's new tokens were decoded twice: half a final token per row-step.
    assert res[0].stats["mean_accepted"] == pytest.approx(0.5)
    rows = [r.stats for r in res] + [{**res[0].stats, "cascade": {
        **res[0].stats["cascade"], "stage": 0, "seconds": [1.0], "passes": [9]}}]
    summary = cascade_summary({"rows": rows}, num_stages=2)
    assert summary["calls_s0"] == 1.0 and summary["calls_s1"] == summary["large_share"] == 0.75
    assert summary["mean_stage"] == 0.75
    assert cascade_summary({"mean_accepted": 1.0}, num_stages=2) == {}


def test_answer_stats_match_a_full_teacher_forced_pass(rng):
    """The LM head on answer steps only: log-probs, top-1 probabilities, entropies and the
    pooled hidden state equal those of `phases.score` over the whole sequence."""
    model = tiny_model(34)
    cfg = model.cfg
    plens, alens = np.array([3, 9, 5]), np.array([6, 2, 10])
    tokens = np.zeros((3, 24), np.int32)
    for i in range(3):
        tokens[i, :plens[i] + alens[i]] = rng.integers(0, cfg.vocab_size, plens[i] + alens[i])
    stats = jax.jit(lambda t, p, a: dr.answer_stats(model.params, t, p, a, cfg=cfg, n=16))(
        tokens, plens, alens)
    logits, hidden = phases.score(model.params, jnp.asarray(tokens), cfg=cfg)
    logp = np.asarray(jax.nn.log_softmax(logits, -1))
    hidden = np.asarray(hidden)
    for i in range(3):
        steps = np.arange(plens[i] - 1, plens[i] + alens[i] - 1)  # each predicts the next
        want_lp = logp[i, steps, tokens[i, steps + 1]]
        n = alens[i]
        np.testing.assert_allclose(stats.logprob[i, :n], want_lp, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(stats.max_prob[i, :n], np.exp(logp[i, steps].max(-1)),
                                   rtol=1e-5)
        ent = -(np.exp(logp[i, steps]) * logp[i, steps]).sum(-1)
        np.testing.assert_allclose(stats.entropy[i, :n], ent, rtol=1e-5)
        np.testing.assert_allclose(stats.pooled[i], hidden[i, steps].mean(0), rtol=1e-4,
                                   atol=1e-5)
        assert float(stats.mask[i].sum()) == n and float(abs(stats.logprob[i, n:]).sum()) == 0
        scores = dr.rule_scores(stats, 0.25)
        assert float(scores["max-prob"][i]) == pytest.approx(want_lp.sum(), rel=1e-5)
        assert float(scores["mean-logprob"][i]) == pytest.approx(want_lp.mean(), rel=1e-5)
        assert float(scores["quantile"][i]) == pytest.approx(
            np.quantile(want_lp, 0.25, method="lower"), rel=1e-5)
    assert dr.answer_features(stats).shape == (3, len(dr.STAT_FEATURES) + cfg.hidden_size)


def test_calibrated_thresholds(rng):
    scores = rng.permutation(np.arange(10.0))
    for rate in (0.0, 0.3, 0.55, 1.0):
        t = dr.threshold_for_rate(scores, rate)
        assert (scores < t).sum() == round(rate * 10)
    with pytest.raises(ValueError, match="defer_rate=1.5 must lie in"):
        dr.threshold_for_rate(scores, 1.5)
    # Keeping a row is right where its score is >= 4; deferring is always right.
    keep = (scores >= 4).astype(float)
    defer = np.ones(10)
    assert dr.threshold_for_quality(scores, keep, defer, 1.0) == 4.0  # defer exactly 0..3
    assert dr.threshold_for_quality(scores, keep, defer, 0.8) == 2.0  # 8 of 10 right
    assert dr.threshold_for_quality(scores, keep, defer, 0.6) == -INF  # keeping all is enough
    # Out of reach: every row is deferred (the next model's quality is the best there is).
    assert dr.threshold_for_quality(scores, np.zeros(10), np.zeros(10), 0.5) == INF
    # Ties cannot be split by a threshold: deferring only the wrong one of three rows that
    # share the score 1 is not a threshold, so all three go.
    tied = np.array([1.0, 1.0, 1.0, 2.0])
    assert dr.threshold_for_quality(tied, np.array([0, 1, 1, 1.0]), np.ones(4), 0.8) == 2.0


def test_the_method_runs_through_generator_and_checks_its_options(ladder, prompts):
    model = ladder[2].model
    opts = {"models": ["target", "target"], "rule": "quantile", "threshold": -INF}
    res = Generator(model, method="cascade", options=opts).generate(prompts, SP)
    assert tokens(res) == tokens(ladder[2].generate(prompts, SP))
    assert [r.stats["cascade"]["stage"] for r in res] == [0, 0, 0]
    with pytest.raises(ConfigError, match="threshold and defer_rate are both set"):
        methods.build("cascade", model, {"threshold": 1.0, "defer_rate": 0.5})
    with pytest.raises(ConfigError, match="need calibration="):
        methods.build("cascade", model, {"rule": "classifier"})
    with pytest.raises(ConfigError, match="threshold has 1 values for 3 models"):
        methods.build("cascade", model, {"threshold": [1.0]})
    with pytest.raises(ValueError, match="models: .*nowhere"):
        methods.build("cascade", model, {"models": ["nowhere.gguf", "target"]})
