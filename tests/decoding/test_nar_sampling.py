"""Jacobi and lookahead decoding with sampling keep the target's distribution: over thousands
of rows of one prompt, the first three sampled tokens (the second and third come from the
method's steps, through its lossless acceptance rule) follow the model's exact joint law
(chi-squared on a vocabulary of 8)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from nar_common import start
from scipy import stats

from jdecode.config import ModelConfig
from jdecode.decoding import phases
from jdecode.decoding.jacobi import jacobi
from jdecode.decoding.lookahead import lookahead
from jdecode.model.params import init_params

V, ROWS, TEMPERATURE, MAX_LEN = 8, 6000, 0.8, 64
CFG = ModelConfig(vocab_size=V, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                  head_dim=16, intermediate_size=64, max_position_embeddings=256)
PROMPT = [1, 2, 3, 1, 2, 4, 1, 2]  # repeats: the pool and the n-gram guesses find matches


@pytest.fixture(scope="module")
def peaked():
    """A random model with a sharpened head: guesses are right often enough to be tested."""
    params = init_params(CFG, jax.random.key(21))
    return dataclasses.replace(params, lm_head=params.lm_head * 2.0)


def exact_joint(params) -> np.ndarray:
    """P(t1, t2, t3 | PROMPT) [V, V, V] at TEMPERATURE, by scoring every continuation."""
    pairs = np.stack(np.meshgrid(np.arange(V), np.arange(V), indexing="ij"), -1).reshape(-1, 2)
    seqs = np.concatenate([np.tile(PROMPT, (len(pairs), 1)), pairs], axis=1)  # [V*V, L + 2]
    logits, _ = phases.score(params, jnp.asarray(seqs, jnp.int32), cfg=CFG)
    p = np.asarray(jax.nn.softmax(logits / TEMPERATURE, axis=-1), np.float64)
    n = len(PROMPT)
    p1 = p[0, n - 1]  # [V]
    p2 = p[::V, n]  # [V] rows t1 = 0..V-1 (t2 = 0): P(t2 | t1)
    p3 = p[:, n + 1].reshape(V, V, V)  # P(t3 | t1, t2)
    return p1[:, None, None] * p2[:, :, None] * p3


def chi2_pvalue(samples: np.ndarray, probs: np.ndarray) -> float:
    counts = np.bincount(samples, minlength=probs.size)
    probs = probs / probs.sum()  # exactly 1 in f64 (scipy checks the totals agree)
    keep = probs * samples.size >= 5  # cells too rare to count are pooled into one
    obs = np.append(counts[keep], counts[~keep].sum())
    exp = np.append(probs[keep], probs[~keep].sum()) * samples.size
    return stats.chisquare(obs[exp > 0], exp[exp > 0]).pvalue


@pytest.mark.parametrize("method", ["jacobi", "lookahead"])
def test_sampled_tokens_follow_the_model(peaked, method):
    decoder = {"jacobi": lambda: jacobi(CFG, MAX_LEN, 3, "ngram"),
               "lookahead": lambda: lookahead(CFG, MAX_LEN, 3, 3, 3)}[method]()
    prompt = jnp.zeros((ROWS, 16), jnp.int32).at[:, :len(PROMPT)].set(jnp.asarray(PROMPT))
    lengths = jnp.full((ROWS,), len(PROMPT), jnp.int32)
    ls, loop = start(f"sampled-{method}", decoder, peaked, prompt, lengths, max_new=3,
                     temperature=TEMPERATURE, seed=1000)
    ls = loop(ls, jnp.int32(1 << 10))
    out = np.asarray(ls.out)[:, :3]
    # The method's rule ran: some rows took more than one token in a step.
    assert int(ls.accepted) > int(ls.live_steps)
    joint = exact_joint(peaked)
    assert chi2_pvalue(out[:, 0] * V * V + out[:, 1] * V + out[:, 2], joint.reshape(-1)) > 1e-3
    assert chi2_pvalue(out[:, 1] * V + out[:, 2], joint.sum(0).reshape(-1)) > 1e-3
