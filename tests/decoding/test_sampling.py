"""`sampling.sample` against distributions computed independently in numpy (chi-squared over
thousands of keys on a small vocabulary), and the repetition penalty against HF's processor."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy import stats

from jdecode.decoding.sampling import (
    SamplingArrays,
    SamplingParams,
    apply_repetition_penalty,
    sample,
)

VOCAB = 8
N_DRAWS = 20000
P_MIN = 1e-3  # reject the sampler when chi-squared says p < 0.001


@partial(jax.jit, static_argnames="n")
def draw_many(logits: jax.Array, sp: SamplingArrays, seed: jax.Array, n: int) -> jax.Array:
    """n independent draws from one row: vmap of `sample` (batch 1) over n keys -> [n]."""
    keys = jax.random.split(jax.random.key(seed), n)
    return jax.vmap(lambda k: sample(logits[None], sp, k[None])[0])(keys)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x[np.isfinite(x)].max())
    return e / e.sum()


def hf_pipeline(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> np.ndarray:
    """Expected distribution, written after HF's warpers in HF's order (numpy, f64)."""
    x = np.asarray(logits, np.float64) / temperature
    if top_k:
        x = np.where(x < np.sort(x)[-top_k], -np.inf, x)
    if top_p < 1.0:  # TopPLogitsWarper: drop the ascending prefix holding mass <= 1 - top_p
        order = np.argsort(x)
        cum = np.cumsum(softmax(x)[order])
        drop = order[cum <= 1 - top_p]
        x[drop[:len(order) - 1]] = -np.inf  # min_tokens_to_keep = 1
    if min_p > 0:  # MinPLogitsWarper: drop tokens below min_p * the top probability
        p = softmax(x)
        x = np.where(p < min_p * p.max(), -np.inf, x)
    return softmax(x)


def check_distribution(tokens: np.ndarray, expected: np.ndarray) -> None:
    counts = np.bincount(tokens, minlength=VOCAB)
    masked = expected == 0
    assert counts[masked].sum() == 0, f"sampled filtered-out tokens: {counts} vs {expected}"
    kept = ~masked
    chi2, p = stats.chisquare(counts[kept], expected[kept] * counts.sum())
    assert p > P_MIN, f"chi2={chi2:.1f} p={p:.2e}: counts {counts}, expected {expected}"


def midpoint_top_p(probs: np.ndarray, keep: int) -> float:
    """A top_p strictly inside the gap that keeps exactly `keep` tokens (no ties at the edge)."""
    cum = np.cumsum(np.sort(probs)[::-1])
    return float((cum[keep - 2] + cum[keep - 1]) / 2) if keep > 1 else float(cum[0] / 2)


def arrays(**kw) -> SamplingArrays:
    return SamplingArrays.from_params([SamplingParams(**kw)])


def random_logits(rng) -> np.ndarray:
    return (rng.standard_normal(VOCAB) * 1.5).astype(np.float32)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.5])
def test_temperature_samples_softmax_of_scaled_logits(rng, temperature):
    logits = random_logits(rng)
    tokens = draw_many(jnp.asarray(logits), arrays(temperature=temperature),
                       int(rng.integers(2**31)), N_DRAWS)
    check_distribution(np.asarray(tokens), hf_pipeline(logits, temperature))


def test_temperature_distribution_test_rejects_a_wrong_temperature(rng):
    # The chi-squared check has the power to catch a sampler that ignores the temperature.
    logits = random_logits(rng)
    tokens = draw_many(jnp.asarray(logits), arrays(temperature=1.0),
                       int(rng.integers(2**31)), N_DRAWS)
    with pytest.raises(AssertionError, match="chi2"):
        check_distribution(np.asarray(tokens), hf_pipeline(logits, 0.7))


@pytest.mark.parametrize("keep", [2, 5])
def test_top_p_samples_the_nucleus(rng, keep):
    logits = random_logits(rng)
    top_p = midpoint_top_p(softmax(logits / 0.8), keep)
    expected = hf_pipeline(logits, 0.8, top_p=top_p)
    assert (expected > 0).sum() == keep
    tokens = draw_many(jnp.asarray(logits), arrays(temperature=0.8, top_p=top_p),
                       int(rng.integers(2**31)), N_DRAWS)
    check_distribution(np.asarray(tokens), expected)


def test_min_p_drops_tokens_below_a_fraction_of_the_top(rng):
    logits = random_logits(rng)
    probs = np.sort(softmax(logits))[::-1]
    ratios = probs / probs[0]
    min_p = float((ratios[2] + ratios[3]) / 2)  # keeps exactly the top 3
    expected = hf_pipeline(logits, 1.0, min_p=min_p)
    assert (expected > 0).sum() == 3
    tokens = draw_many(jnp.asarray(logits), arrays(temperature=1.0, min_p=min_p),
                       int(rng.integers(2**31)), N_DRAWS)
    check_distribution(np.asarray(tokens), expected)


def test_top_k_top_p_min_p_compose_in_hf_order(rng):
    logits = random_logits(rng)
    # top-k 6, then top-p on the renormalized top 6 keeping 4, then min-p; temperature 1.3.
    x = np.sort(logits / 1.3)[::-1][:6]
    top_p = midpoint_top_p(softmax(x), 4)
    kept = softmax(x[:4])
    min_p = float((kept[2] / kept[0] + kept[3] / kept[0]) / 2)  # drops the 4th
    expected = hf_pipeline(logits, 1.3, top_k=6, top_p=top_p, min_p=min_p)
    assert (expected > 0).sum() == 3
    tokens = draw_many(jnp.asarray(logits),
                       arrays(temperature=1.3, top_k=6, top_p=top_p, min_p=min_p),
                       int(rng.integers(2**31)), N_DRAWS)
    check_distribution(np.asarray(tokens), expected)


def test_top_k_one_and_greedy_rows_give_the_argmax(rng):
    logits = rng.standard_normal((64, 300)).astype(np.float32)
    keys = jax.random.split(jax.random.key(int(rng.integers(2**31))), 64)
    rows = [SamplingParams(temperature=float(t), top_k=1) for t in rng.uniform(0.1, 3, 32)]
    rows += [SamplingParams()] * 32  # greedy rows in the same batch as sampled ones
    tokens = jax.jit(sample)(jnp.asarray(logits), SamplingArrays.from_params(rows), keys)
    np.testing.assert_array_equal(np.asarray(tokens), logits.argmax(-1))


def test_sampling_depends_only_on_the_row_key(rng):
    logits = jnp.asarray(rng.standard_normal((16, 50)).astype(np.float32))
    sp = SamplingArrays.from_params([SamplingParams(temperature=1.0)] * 16)
    keys = jax.random.split(jax.random.key(int(rng.integers(2**31))), 16)
    a = np.asarray(jax.jit(sample)(logits, sp, keys))
    b = np.asarray(jax.jit(sample)(logits, sp, keys))
    np.testing.assert_array_equal(a, b)
    # Same logits in every row with distinct keys: the draws are not all the same token.
    same = jnp.broadcast_to(logits[0], logits.shape)
    assert len(set(np.asarray(jax.jit(sample)(same, sp, keys)).tolist())) > 1


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_hf_processor(rng, penalty):
    from transformers import RepetitionPenaltyLogitsProcessor

    b, v = 4, 200
    logits = rng.standard_normal((b, v)).astype(np.float32) * 3
    history = rng.integers(0, v, (b, 30))  # repeated ids included
    seen = np.zeros((b, v), bool)
    seen[np.arange(b)[:, None], history] = True
    expected = RepetitionPenaltyLogitsProcessor(penalty)(
        torch.from_numpy(history), torch.from_numpy(logits.copy())).numpy()
    ours = apply_repetition_penalty(jnp.asarray(logits), jnp.asarray(seen),
                                    jnp.full((b,), penalty, jnp.float32))
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-6, atol=0)
    assert not np.allclose(expected, logits)


@pytest.mark.parametrize("kw, name", [
    ({"temperature": -0.5}, "temperature=-0.5"),
    ({"top_p": 0.0}, "top_p=0.0"),
    ({"top_p": 1.5}, "top_p=1.5"),
    ({"min_p": -0.1}, "min_p=-0.1"),
    ({"top_k": -1}, "top_k=-1"),
    ({"repetition_penalty": 0.0}, "repetition_penalty=0.0"),
    ({"max_new_tokens": 0}, "max_new_tokens=0"),
    ({"seed": -1}, "seed=-1"),  # seeds are uint32 key material
    ({"seed": 2**32}, "seed=4294967296"),
    ({"top_k": 2**31}, "top_k=2147483648"),  # an int32 array entry
    ({"temperature": float("nan")}, "temperature=nan"),
    ({"n": 0}, "n=0"),
])
def test_sampling_params_reject_out_of_range_values(kw, name):
    with pytest.raises(ValueError, match=f"{name} is out of range"):
        SamplingParams(**kw)


def _primitives(jaxpr) -> set[str]:
    """Every primitive name in a closed jaxpr, sub-jaxprs included."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for value in eqn.params.values():  # branches and bodies, as (Closed)Jaxprs
            for item in value if isinstance(value, tuple | list) else (value,):
                sub = getattr(item, "jaxpr", item)
                if hasattr(sub, "eqns"):
                    names |= _primitives(sub)
    return names


def test_specialized_batches_draw_the_same_tokens_without_a_cond(rng):
    """A host-decided branch (no lax.cond, which waits on the host on XLA:GPU) draws exactly
    what the device-decided one draws, for a mixed batch and an all-greedy one."""
    logits = jnp.asarray(rng.standard_normal((6, 50)) * 3, jnp.float32)
    keys = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), 6)
    for temps in ([0.0, 0.7, 0.0, 1.3, 0.5, 0.0], [0.0] * 6):
        params = [SamplingParams(temperature=t, top_k=20, top_p=0.9) for t in temps]
        dynamic = SamplingArrays.from_params(params)
        fixed = SamplingArrays.from_params(params, specialize_greedy=True)
        assert fixed.specialized and fixed.all_greedy == (max(temps) == 0)
        np.testing.assert_array_equal(sample(logits, fixed, keys), sample(logits, dynamic, keys))
        assert "cond" in _primitives(jax.make_jaxpr(sample)(logits, dynamic, keys).jaxpr)
        assert "cond" not in _primitives(jax.make_jaxpr(sample)(logits, fixed, keys).jaxpr)
    # The mixed batch really samples (a greedy-only answer would pass the equality above).
    mixed = SamplingArrays.from_params(
        [SamplingParams(temperature=5.0)] * 6, specialize_greedy=True)
    assert not np.array_equal(sample(logits, mixed, keys), jnp.argmax(logits, -1))
