"""Mixture-of-depths on tiny random models: top-C row selection, capacity 1 is the full model
in every mode, routed-out tokens store no K/V at the layer, and the per-sequence compact model
decodes what masked compute of the same layers decodes."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdecode.cache.dense import init_cache
from jdecode.config import ModelConfig
from jdecode.decoding import phases
from jdecode.decoding.autoregressive import autoregressive
from jdecode.decoding.loop import init_loop, run_loop
from jdecode.decoding.mixture_of_depths import (
    QUANTILE_LEVELS,
    Routers,
    mod_decoder,
    router_logits,
    score_mod,
    token_hooks,
    top_rows,
)
from jdecode.decoding.sampling import SamplingArrays, SamplingParams
from jdecode.model.params import init_params
from jdecode.model.transformer import LayerControl, LayerHooks
from pallas_kernels.testing import assert_close, jit_for_tests

CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=6, num_heads=4, num_kv_heads=2,
                  head_dim=8, intermediate_size=64, max_position_embeddings=256)


def random_routers(key) -> Routers:
    k1, k2 = jax.random.split(key)
    w = jax.random.normal(k1, (CFG.num_layers, CFG.hidden_size))
    q = jnp.sort(jax.random.normal(k2, (CFG.num_layers, len(QUANTILE_LEVELS))), axis=1)
    return Routers(w, jnp.zeros((CFG.num_layers,)), q)


@pytest.fixture
def setup(rng):
    key = jax.random.key(int(rng.integers(2**31)))
    return init_params(CFG, key), random_routers(jax.random.fold_in(key, 1))


def test_top_rows_is_a_rank_cut(rng):
    scores = rng.normal(size=(8, 3)).astype(np.float32)
    scores[5, 1] = scores[2, 1]  # a tie goes to the lower row
    for capacity, c in ((0.5, 4), (0.3, 3), (1.0, 8), (0.01, 1)):
        got = np.asarray(top_rows(jnp.asarray(scores), jnp.float32(capacity)))
        assert (got.sum(0) == c).all()
        for t in range(3):
            order = sorted(range(8), key=lambda b: (-scores[b, t], b))
            assert set(np.flatnonzero(got[:, t])) == set(order[:c])


def decode(decoder, params, prompt, lengths, max_new=10):
    """Greedy tokens [B, max_new] through the jitted loop."""
    b = prompt.shape[0]
    ls = jit_for_tests(partial(init_loop, decoder, max_out=max_new))(
        params, prompt, lengths, SamplingArrays.from_params([SamplingParams()] * b),
        jax.vmap(jax.random.key)(jnp.arange(b)), jnp.full((b,), max_new, jnp.int32),
        jnp.full((b, 1), -1, jnp.int32))
    return np.asarray(jit_for_tests(partial(run_loop, decoder))(params, ls, jnp.int32(99)).out)


def test_capacity_one_is_the_full_model(setup, rng):
    params, routers = setup
    lens = (5, 9, 13)
    prompt = np.zeros((3, 16), np.int32)
    for i, n in enumerate(lens):
        prompt[i, :n] = rng.integers(0, CFG.vocab_size, n)
    prompt, lengths = jnp.asarray(prompt), jnp.asarray(lens, jnp.int32)
    greedy = decode(autoregressive(CFG, 64), params, prompt, lengths)
    bundle = (params, routers, jnp.float32(1.0))
    for mode in ("token", "sequence"):  # top-C rows of the batch; all layers of the sequence
        got = decode(mod_decoder(CFG, 64, mode=mode, capacity=1.0), bundle, prompt, lengths)
        np.testing.assert_array_equal(got, greedy, err_msg=mode)
    tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (2, 12)), jnp.int32)

    @jit_for_tests
    def scores(params, routers, tokens):
        return phases.score(params, tokens, cfg=CFG)[0], [
            score_mod(params, routers, jnp.float32(1.0), tokens, cfg=CFG, mode=mode,
                      keep=CFG.num_layers) for mode in ("token", "sequence")]

    full, outs = scores(params, routers, tokens)
    for mode, (logits, computed) in zip(("token", "sequence"), outs):
        assert_close(logits, full, "float32", err_msg=mode)
        assert (computed == CFG.num_layers).all()


def test_routed_out_tokens_store_no_kv(setup, rng):
    """At capacity 0.5 of 4 rows, every layer computes exactly the 2 rows its router scores
    highest, and only those rows' K/V at this step's slot count as written."""
    params, routers = setup
    b, t = 4, 8
    prompt = jnp.asarray(rng.integers(0, CFG.vocab_size, (b, t)), jnp.int32)
    routed = token_hooks(routers, jnp.float32(0.5), "top_c")

    def before(carry, x, layer):  # routes as the decoder does, and logs scores and choices
        computed, log = carry
        computed, x, control = routed.before(computed, x, layer)
        scores = router_logits(routers, layer, x)[:, 0]
        return (computed, log.at[layer].set(jnp.stack([scores, control.compute[:, 0]]))), \
            x, control

    hooks = LayerHooks(init=lambda x: (jnp.zeros((b, 1), jnp.int32),
                                       jnp.zeros((CFG.num_layers, 2, b))), before=before)
    token = jnp.asarray(rng.integers(0, CFG.vocab_size, b), jnp.int32)

    @jit_for_tests
    def prefill_and_step(params, prompt, token):
        cache = init_cache(CFG, b, 32, track_writes=True)
        _, _, cache = phases.prefill(params, cache, prompt, jnp.full((b,), t, jnp.int32),
                                     cfg=CFG)
        return phases.decode_step(params, cache, token, jnp.full((b,), t, jnp.int32), cfg=CFG,
                                  hooks=hooks)

    _, _, cache, (computed, log) = prefill_and_step(params, prompt, token)
    log = np.asarray(log)
    for layer in range(CFG.num_layers):
        scores, chosen = log[layer, 0], log[layer, 1].astype(bool)
        assert set(np.flatnonzero(chosen)) == set(np.argsort(-scores, kind="stable")[:2])
        np.testing.assert_array_equal(cache.written[layer, :, t], chosen)
        assert cache.written[layer, :, :t].all()  # the prompt ran every layer
    assert (np.asarray(computed)[:, 0] == log[:, 1].sum(0)).all()


def test_sequence_mode_equals_masked_compute_of_its_layers(setup, rng):
    """The compact model of the chosen layers decodes what the full model decodes when every
    other layer is masked out (its weights read, its output discarded)."""
    params, routers = setup
    prompt = jnp.asarray(rng.integers(0, CFG.vocab_size, (1, 16)), jnp.int32)
    lengths = jnp.asarray([13], jnp.int32)
    dec = mod_decoder(CFG, 64, mode="sequence", capacity=0.5)
    bundle = (params, routers, jnp.float32(0.5))
    sampling = SamplingArrays.from_params([SamplingParams()])
    state = jit_for_tests(dec.init)(bundle, prompt, lengths, sampling,
                                    jax.vmap(jax.random.key)(jnp.arange(1)))
    chosen = np.asarray(state.aux.chosen)
    assert chosen.shape == (3,) and (np.diff(chosen) > 0).all()
    assert state.aux.cache.k.shape[0] == 3  # the compact cache: chosen layers only
    step = jit_for_tests(dec.step)
    got = [int(state.tokens[0])]
    for _ in range(8):
        state, _ = step(bundle, state)
        got.append(int(state.tokens[0]))

    on = jnp.isin(jnp.arange(CFG.num_layers), jnp.asarray(chosen))
    masked = LayerHooks(before=lambda c, x, layer: (
        c, x, LayerControl(compute=jnp.broadcast_to(on[layer], x.shape[:2]))))
    cache = init_cache(CFG, 1, 64)
    logits, _, cache = phases.prefill(params, cache, prompt, lengths, cfg=CFG)
    want, pos = [int(jnp.argmax(logits[0]))], int(lengths[0])
    ref_step = jit_for_tests(lambda c, tok, p: phases.decode_step(params, c, tok, p, cfg=CFG,
                                                                  hooks=masked))
    for _ in range(8):
        logits, _, cache, _ = ref_step(cache, jnp.asarray([want[-1]]), jnp.asarray([pos]))
        want.append(int(jnp.argmax(logits[0])))
        pos += 1
    assert got == want
