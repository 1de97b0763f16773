"""Jacobi decoding on tiny random models (f32): the iteration reaches greedy decoding's fixed
point and stays there, and the sliding-block decoder reproduces greedy decoding exactly at
batch 1 (the whole answer as the block) and with rows that accept different lengths, for every
initialization of the guesses."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from nar_common import (
    CFG,
    MAX_LEN,
    decode_stepwise,
    greedy_reference,
    make_prompts,
    rows_differ,
)

from jdecode.cache.dense import init_cache
from jdecode.decoding import phases
from jdecode.decoding.jacobi import JacobiOptions, jacobi, jacobi_iteration
from jdecode.model.params import init_params
from pallas_kernels.testing import jit_for_tests

N = 5


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(3))


@pytest.mark.parametrize("init", ["repeat", "ngram"])
def test_greedy_matches_autoregressive_batch3(params, rng, init):
    """Rows of different prompt lengths accept different numbers of tokens in one step, and
    every row's output is greedy decoding's (padding guesses: the whole-answer test)."""
    prompt, lengths = make_prompts(rng)
    want = greedy_reference(params, prompt, lengths)
    got, emitted = decode_stepwise(f"jacobi-{init}", jacobi(CFG, MAX_LEN, N, init),
                                   params, prompt, lengths)
    np.testing.assert_array_equal(got, want)
    assert emitted.max() > 1, "no guess was ever accepted: the test has no power"
    assert rows_differ(emitted), "rows never accepted different lengths"


def test_greedy_matches_autoregressive_batch1_whole_answer(params, rng):
    """The fully non-autoregressive case: the block is the whole answer (padding guesses)."""
    answer = 16
    prompt, lengths = make_prompts(rng, lens=(9,))
    want = greedy_reference(params, prompt, lengths)[:, :answer]
    got, emitted = decode_stepwise("jacobi-whole", jacobi(CFG, MAX_LEN, answer, "pad", 7),
                                   params, prompt, lengths, max_new=answer)
    np.testing.assert_array_equal(got, want)
    assert len(emitted) <= answer - 1  # never more iterations than tokens after the first


def test_iteration_reaches_the_greedy_fixed_point(params, rng):
    """From guesses drawn at random, Jacobi iteration converges within n iterations to greedy
    decoding's next n tokens, with at least one more token fixed per iteration; one more
    iteration then changes nothing."""
    n = 12
    prompt, lengths = make_prompts(rng)
    b = prompt.shape[0]
    want = greedy_reference(params, prompt, lengths)  # want[:, 0] comes from the prefill
    prefill = jit_for_tests(partial(phases.prefill, cfg=CFG))
    iterate = jit_for_tests(partial(jacobi_iteration, cfg=CFG))
    _, _, cache = prefill(params, init_cache(CFG, b, MAX_LEN), prompt, lengths)
    root = jnp.asarray(want[:, 0])
    block = jnp.asarray(rng.integers(0, CFG.vocab_size, (b, n)), jnp.int32)
    for i in range(1, n + 1):
        nxt, _, cache = iterate(params, cache, root, block, lengths)
        # The first i tokens have a correct context by now: they are greedy's.
        np.testing.assert_array_equal(np.asarray(nxt)[:, :i], want[:, 1:i + 1])
        if bool((nxt == block).all()):
            break
        block = nxt
    np.testing.assert_array_equal(np.asarray(block), want[:, 1:n + 1])
    again, _, _ = iterate(params, cache, root, block, lengths)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(block))


def test_options_errors_name_the_value_and_the_fix():
    with pytest.raises(ValueError, match="block_size=0: guess at least 1 token"):
        JacobiOptions(block_size=0)
    with pytest.raises(ValueError, match="max_ngram=0 must be >= 1"):
        JacobiOptions(max_ngram=0)
    with pytest.raises(ValueError, match="block size n=0"):
        jacobi(CFG, MAX_LEN, 0)
