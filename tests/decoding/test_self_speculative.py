"""Self-speculative decoding (speculative with draft="self:E"): greedy output equals plain
greedy decoding at batch 1 and in a batch whose rows accept different lengths; verification
runs only the layers the draft skipped; the shared cache ends as plain decoding leaves it."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdecode
from jdecode.config import ModelConfig
from jdecode.decoding import self_speculative
from jdecode.decoding.autoregressive import autoregressive
from jdecode.decoding.early_exit import init_exits
from jdecode.decoding.loop import init_loop, run_loop
from jdecode.decoding.sampling import SamplingArrays, SamplingParams
from jdecode.decoding.self_speculative import layerskip_drafter
from jdecode.decoding.speculative import build_speculative, speculative
from jdecode.io.registry import Model
from jdecode.model.params import init_params
from pallas_kernels.testing import assert_close, jit_for_tests

CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=6, num_heads=4, num_kv_heads=2,
                  head_dim=8, intermediate_size=64, max_position_embeddings=256)
DEPTH, K, MAX_LEN, MAX_NEW = 5, 3, 64, 20


def decode(decoder, params, prompt, lengths):
    b = prompt.shape[0]
    init = jit_for_tests(partial(init_loop, decoder, max_out=MAX_NEW))
    ls = init(params, prompt, lengths, SamplingArrays.from_params([SamplingParams()] * b),
              jax.vmap(jax.random.key)(jnp.arange(b)), jnp.full((b,), MAX_NEW, jnp.int32),
              jnp.full((b, 1), -1, jnp.int32))
    return jit_for_tests(partial(run_loop, decoder))(params, ls, jnp.int32(1 << 20))


@pytest.fixture
def setup(rng):
    params = init_params(CFG, jax.random.key(int(rng.integers(2**31))))
    lens = (7, 12, 16)
    prompt = np.zeros((len(lens), 16), np.int32)
    for i, n in enumerate(lens):
        prompt[i, :n] = rng.integers(0, CFG.vocab_size, n)
    heads = init_exits(params, (DEPTH - 1,), 0, jax.random.key(0))  # untrained: final norm
    return params, heads, jnp.asarray(prompt), jnp.asarray(lens, jnp.int32)


def test_lossless_at_batch_1_and_3(setup, monkeypatch):
    """Plain greedy decoding's tokens at batch 1 and in a batch whose rows accept different
    lengths; a step runs k + 1 draft passes over layers [0, E) and one verify pass over
    [E, L), never [0, L); the shared cache ends as plain decoding leaves it."""
    params, heads, prompt, lengths = setup
    calls = []
    real = self_speculative.run_layers

    def spy(*args, start=0, stop=None, **kw):  # records the layer ranges a step traces
        calls.append((start, CFG.num_layers if stop is None else stop))
        return real(*args, start=start, stop=stop, **kw)

    monkeypatch.setattr(self_speculative, "run_layers", spy)
    spec = speculative(CFG, layerskip_drafter(CFG, DEPTH, 0), K, MAX_LEN)
    ar = autoregressive(CFG, MAX_LEN)
    for b in (1, 3):
        want = decode(ar, params, prompt[:b], lengths[:b])
        got = decode(spec, (params, heads), prompt[:b], lengths[:b])
        np.testing.assert_array_equal(got.out, want.out)
        assert int(got.accepted) > int(got.live_steps)  # drafts were accepted
        # The early layers' K/V the drafts wrote are what plain decoding writes, in every slot
        # plain decoding fed: the prompt and all generated tokens but the last.
        for row in range(b):
            end = int(lengths[row]) + MAX_NEW - 1
            assert_close(got.dec.aux.cache.k[:, row, :end], want.dec.aux.k[:, row, :end],
                         "float32")
            assert_close(got.dec.aux.cache.v[:, row, :end], want.dec.aux.v[:, row, :end],
                         "float32")
    # Every row took the same steps; the tokens each accepted in them differ.
    advanced = np.asarray(got.dec.positions - lengths)
    assert len(set(advanced.tolist())) > 1, advanced
    one_step = [(0, DEPTH)] * (K + 1) + [(DEPTH, CFG.num_layers)]
    assert calls == one_step * 2  # one traced step per batch size


def test_draft_spec_errors(setup):
    params, *_ = setup
    model = Model("tiny", CFG, params, None)
    with pytest.raises(ValueError, match=r"E=6 must lie in 1..5"):
        build_speculative(model, "self:6", k=2)
    with pytest.raises(ValueError, match="write self:E or self:E:EXITS"):
        build_speculative(model, "self:x", k=2)


def test_real_model_is_lossless(smol, smol_generator):
    sp = SamplingParams(max_new_tokens=12, ignore_eos=True)
    prompt = "Write a Python function that returns the square of a number."
    (want,) = smol_generator.generate(prompt, sp, chat=True)
    (got,) = jdecode.generate(smol, prompt, sp, chat=True, method="speculative",
                              draft="self:28", k=2)
    assert got.token_ids == want.token_ids
    assert got.stats["mean_accepted"] > 1.0
