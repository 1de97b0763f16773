"""Quality metrics of lossy methods, checked against direct computations on random data; the
task set's answer checker; the held-out text."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import log_softmax

from jdecode.analysis import quality
from jdecode.data.heldout import prose_paragraphs, text_id
from jdecode.data.tasks import Task, first_line, is_correct, tasks


def test_token_agreement_counts_positions_prefixes_and_exact_rows():
    refs = [[1, 2, 3, 4], [5, 6], [7, 8, 9]]
    outs = [[1, 2, 0, 4], [5, 6], [7]]  # one substitution, identical, truncated
    got = quality.token_agreement(outs, refs)
    assert got["agreement"] == pytest.approx((3 + 2 + 1) / 9)
    assert got["prefix"] == pytest.approx(np.mean([2 / 4, 1.0, 1 / 3]))
    assert got["exact"] == pytest.approx(1 / 3)
    assert quality.token_agreement(refs, refs) == {"agreement": 1.0, "prefix": 1.0,
                                                   "exact": 1.0}
    with pytest.raises(ValueError, match="2 outputs for 3 references"):
        quality.token_agreement(outs[:2], refs)


def test_teacher_forced_metrics_match_numpy(rng):
    p = rng.normal(size=(2, 5, 11)).astype(np.float32)
    q = p + rng.normal(scale=0.7, size=p.shape).astype(np.float32)
    mask = (rng.random((2, 5)) < 0.7).astype(np.float32)
    mask[0, 0] = 1.0
    lp, lq = log_softmax(p, -1), log_softmax(q, -1)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    top1 = (p.argmax(-1) == q.argmax(-1))
    got = quality.teacher_forced_metrics(p, q, mask)
    assert got["kl"] == pytest.approx((kl * mask).sum() / mask.sum(), rel=1e-5)
    assert got["top1"] == pytest.approx((top1 * mask).sum() / mask.sum())
    same = quality.teacher_forced_metrics(p, p, mask)
    assert same["kl"] == pytest.approx(0.0, abs=1e-6) and same["top1"] == 1.0


def test_perplexity_is_exp_mean_next_token_nll(rng):
    logits = rng.normal(size=(2, 6, 9)).astype(np.float32)
    tokens = rng.integers(0, 9, (2, 6)).astype(np.int32)
    mask = np.ones((2, 6), np.float32)
    mask[1, 4:] = 0.0  # row 1 has 4 real tokens: 3 predictions
    nll, n = quality.nll_sums(logits, tokens, mask)
    lp = log_softmax(logits, -1)
    want = [-lp[0, t, tokens[0, t + 1]] for t in range(5)] + \
        [-lp[1, t, tokens[1, t + 1]] for t in range(3)]
    assert n == 8 and nll == pytest.approx(sum(want), rel=1e-5)
    assert quality.perplexity(nll, n) == pytest.approx(np.exp(np.mean(want)), rel=1e-5)


def test_task_answers_are_checked_on_the_first_line():
    assert is_correct("42", "The answer is 42.")
    assert not is_correct("42", "142")
    assert not is_correct("42", "\n\nNo idea.\n42")  # only the first non-empty line counts
    assert is_correct("seven|7", "There are 7 days in a week.")
    assert is_correct("North Sea", "It flows into the north sea")
    assert first_line("\n  \nfirst\nsecond") == "first"
    every = tasks()
    assert len(every) == 48 and {t.kind for t in every} == {"arithmetic", "copy", "lookup",
                                                          "fact"}
    arith = [t for t in every if t.kind == "arithmetic"]
    assert all(str(eval(t.prompt.split("What is ")[1].split("?")[0])) == t.answer
               for t in arith)  # the answers are computed, not typed
    got = quality.task_accuracy(["Paris.", "no"], [Task("fact", "q", "Paris"),
                                                    Task("copy", "q", "blue")])
    assert got == {"accuracy": 0.5, "accuracy_fact": 1.0, "accuracy_copy": 0.0}


def test_held_out_text_is_prose():
    paras = prose_paragraphs(8)
    assert len(paras) == 8 and all(len(p) >= 200 and "\n" not in p for p in paras)
    assert "::=" not in " ".join(paras)  # no grammar rules
    assert text_id(paras).startswith("pydoc_data.topics (Python 3.")
