"""Early exit on tiny random models: an unreachable threshold and an exit after the last layer
are the full model; propagated K/V of skipped layers equal a direct computation; per-row and
per-batch exits agree at batch 1; the Generator runs both layouts alike."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdecode.cache.dense import DenseMeta, init_cache, make_dense_attend
from jdecode.config import ModelConfig
from jdecode.decoding import phases
from jdecode.decoding.autoregressive import autoregressive
from jdecode.decoding.early_exit import (
    CRITERIA,
    NEVER,
    ExitHeads,
    calibrated_threshold,
    early_exit_decoder,
    exit_score,
    init_exits,
    layers_computed,
    row_exit_layers,
    score_early_exit,
    top2_margin,
)
from jdecode.decoding.generate import Generator
from jdecode.decoding.loop import init_loop, run_loop
from jdecode.decoding.sampling import SamplingArrays, SamplingParams
from jdecode.io.registry import Model
from jdecode.model.layers import apply_rope, rms_norm, rope_tables
from jdecode.model.linear import xla_linear
from jdecode.model.params import init_params
from jdecode.model.transformer import collect_hidden, run_layers
from pallas_kernels.testing import assert_close, jit_for_tests

CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=6, num_heads=4, num_kv_heads=2,
                  head_dim=8, intermediate_size=64, max_position_embeddings=256)
LAYERS = (1, 3)  # exits after layers 1 and 3; layer 5 is the model's own head
B, T = 3, 12


def random_heads(params, key, layers=LAYERS, rank=4) -> ExitHeads:
    """Exits with random norms, adapters and classifiers (an untrained exit would be too
    close to the final head to tell the two apart)."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    heads = init_exits(params, layers, rank, k1)
    n, e = len(layers), CFG.hidden_size
    return heads.replace(norm=1.0 + 0.3 * jax.random.normal(k2, (n, e)),
                         up=0.3 * jax.random.normal(k3, (n, rank, e)),
                         cls_w=jax.random.normal(k4, (n, e)), cls_b=jnp.zeros((n,)))


@pytest.fixture
def setup(rng):
    key = jax.random.key(int(rng.integers(2**31)))
    params = init_params(CFG, key)
    return params, random_heads(params, jax.random.fold_in(key, 1))


@pytest.fixture
def tokens(rng):
    return jnp.asarray(rng.integers(0, CFG.vocab_size, (B, T)), jnp.int32)


def test_unreachable_threshold_is_the_full_model(setup, tokens):
    params, heads = setup

    @jit_for_tests  # one program for the full model and every criterion
    def scores(params, heads, tokens):
        return phases.score(params, tokens, cfg=CFG)[0], [
            score_early_exit(params, heads, jnp.float32(NEVER[c]), tokens, cfg=CFG, criterion=c)
            for c in CRITERIA[:-1]]

    full, outs = scores(params, heads, tokens)
    for criterion, (logits, computed) in zip(CRITERIA, outs):
        np.testing.assert_array_equal(logits, full, err_msg=criterion)
        assert (computed == CFG.num_layers).all()


def test_exit_after_the_last_layer_is_the_full_model(setup, tokens):
    params = setup[0]
    last = init_exits(params, (CFG.num_layers - 1,), 0, jax.random.key(0))
    logits, computed, full = jit_for_tests(lambda p, h, t: (
        *score_early_exit(p, h, jnp.float32(0), t, cfg=CFG, criterion="fixed"),
        phases.score(p, t, cfg=CFG)[0]))(params, last, tokens)
    np.testing.assert_array_equal(logits, full)
    assert (computed == CFG.num_layers).all()


def test_scores_and_calibration_pick():
    assert NEVER["entropy"] < 0 and all(NEVER[c] > 1 for c in ("margin", "classifier"))
    x = jax.random.normal(jax.random.key(0), (1, 2, CFG.hidden_size))
    assert_close(exit_score("saturation", None, None, 0, x, 2.0 * x, 1e-5), np.ones((1, 2)),
                 "float32")
    curve = [{"threshold": 0.9, "top1": 0.99, "layer_share": 0.9},
             {"threshold": 0.5, "top1": 0.96, "layer_share": 0.7},
             {"threshold": 0.2, "top1": 0.90, "layer_share": 0.5}]
    manifest = {"metrics": {"calibration": {"margin": curve}}}
    assert calibrated_threshold(manifest, "margin", 0.95) == 0.5
    assert calibrated_threshold(manifest, "margin", 0.999) == 0.9  # none reaches: safest
    # The curve measured with K/V propagated wins where the artifact has it.
    propagated = [dict(p, top1=p["top1"] - 0.05) for p in curve]
    both = {"metrics": {"calibration": {"margin": curve},
                        "calibration_propagated": {"margin": propagated}}}
    assert calibrated_threshold(both, "margin", 0.95) == 0.9
    with pytest.raises(ValueError, match="no calibrated entropy threshold"):
        calibrated_threshold(manifest, "entropy", 0.95)


def exited_state_kv(params, x, layer):
    """K, V [B, T, K, D] that `layer` computes from the residual stream x (the reference)."""
    lp = jax.tree_util.tree_map(lambda a: a[layer], params.layers)
    h = rms_norm(x, lp.attn_norm, CFG.rms_norm_eps)
    k = xla_linear(h, lp.wk).reshape(*x.shape[:2], CFG.num_kv_heads, CFG.head_dim)
    v = xla_linear(h, lp.wv).reshape(*x.shape[:2], CFG.num_kv_heads, CFG.head_dim)
    cos, sin = rope_tables(jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2]), CFG)
    return apply_rope(k, cos, sin), v


def test_propagated_kv_equals_direct_computation(setup, tokens):
    """A token that exits after layer l stores, at every layer after l, the K/V projections of
    its exited (frozen) residual stream: CALM's propagation."""
    params, heads = setup
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    x0 = params.embed[tokens]
    cos, sin = rope_tables(positions, CFG)
    kw = {"cfg": CFG, "attend": make_dense_attend(CFG)}
    # A threshold at the median exit-0 saturation: about half the tokens leave there.
    feats = collect_hidden((LAYERS[0] - 1, LAYERS[0]))
    _, _, (x_in, x_out) = run_layers(params, x0, cos, sin, init_cache(CFG, B, T),
                                     DenseMeta(positions), hooks=feats, carry=feats.init(x0),
                                     stop=LAYERS[0] + 1, **kw)
    thr = jnp.median(exit_score("saturation", params, heads, 0, x_in, x_out, CFG.rms_norm_eps))
    x, cache, exit_id = jit_for_tests(lambda p, h, thr, x0: row_exit_layers(
        p, h, thr, x0, cos, sin, init_cache(CFG, B, T), DenseMeta(positions),
        criterion="saturation", linear=xla_linear, **kw))(params, heads, thr, x0)
    exit_layer = np.asarray(jnp.asarray((*LAYERS, CFG.num_layers - 1))[exit_id])  # [B, T]
    assert 0 < (exit_layer == LAYERS[0]).sum() < B * T  # some leave at exit 0, some go on
    for layer in range(LAYERS[0] + 1, CFG.num_layers):
        k, v = exited_state_kv(params, x, layer)
        skipped = exit_layer < layer  # [B, T] tokens that left before this layer
        assert_close(np.asarray(cache.k[layer])[skipped], np.asarray(k)[skipped], "float32")
        assert_close(np.asarray(cache.v[layer])[skipped], np.asarray(v)[skipped], "float32")
    np.testing.assert_array_equal(layers_computed(heads, exit_id, CFG.num_layers),
                                  exit_layer + 1)


def decode(decoder, params, prompt, lengths, max_new=12):
    """Greedy tokens [B, max_new] and the final LoopState through the jitted loop."""
    b = prompt.shape[0]
    init = jit_for_tests(partial(init_loop, decoder, max_out=max_new))
    ls = init(params, prompt, lengths, SamplingArrays.from_params([SamplingParams()] * b),
              jax.vmap(jax.random.key)(jnp.arange(b)), jnp.full((b,), max_new, jnp.int32),
              jnp.full((b, 1), -1, jnp.int32))
    ls = jit_for_tests(partial(run_loop, decoder))(params, ls, jnp.int32(1 << 20))
    return np.asarray(ls.out), ls


def test_decoding_rows_and_batch(setup, rng):
    """A batch of different prompts: an unreachable threshold decodes plain greedy decoding's
    tokens; a reachable one exits (fewer layers, other tokens). At batch 1 a row is the batch:
    the lax.cond skip gives the tokens, layer counts and caches of masked compute (the skip
    branch propagates K/V like the masked layers do)."""
    params, heads = setup
    lens = (5, 9, 13)
    prompt = np.zeros((3, 16), np.int32)
    for i, n in enumerate(lens):
        prompt[i, :n] = rng.integers(0, CFG.vocab_size, n)
    prompt, lengths = jnp.asarray(prompt), jnp.asarray(lens, jnp.int32)
    greedy, _ = decode(autoregressive(CFG, 64), params, prompt, lengths)
    row = early_exit_decoder(CFG, 64, criterion="margin")
    never, _ = decode(row, (params, heads, jnp.float32(NEVER["margin"])), prompt, lengths)
    np.testing.assert_array_equal(never, greedy)
    thr = jnp.float32(0.05)  # a margin most tokens of a random model pass at some exit
    exited, ls = decode(row, (params, heads, thr), prompt, lengths)
    assert (np.asarray(ls.dec.aux.computed) < np.asarray(ls.dec.aux.steps) * CFG.num_layers).all()
    assert (exited != greedy).any()
    # The Generator's GPU layout (fused, unrolled layers, per-layer cache) decodes the same.
    bundled = Model("tiny", CFG, (params, heads, thr), None)
    gen = Generator(bundled, decoder_fn=lambda cfg, n: early_exit_decoder(
        cfg, n, criterion="margin"), layout="inference")
    results = gen.generate([prompt[i, :n].tolist() for i, n in enumerate(lens)],
                           SamplingParams(max_new_tokens=exited.shape[1], ignore_eos=True))
    assert [r.token_ids for r in results] == exited.tolist()

    # Row 1 decoded alone with per-batch exits: what it decoded as one row of the batch.
    dec = early_exit_decoder(CFG, 64, criterion="margin", batching="batch")
    alone, one = decode(dec, (params, heads, thr), prompt[1:2], lengths[1:2])
    np.testing.assert_array_equal(alone, exited[1:2])
    np.testing.assert_array_equal(one.dec.aux.computed, ls.dec.aux.computed[1:2])
    assert_close(one.dec.aux.cache.k, ls.dec.aux.cache.k[:, 1:2], "float32")
    assert_close(one.dec.aux.cache.v, ls.dec.aux.cache.v[:, 1:2], "float32")


def test_top2_margin_matches_top_k(rng):
    p = jax.nn.softmax(jnp.asarray(rng.standard_normal((3, 5, 40)) * 3, jnp.float32), -1)
    top2 = jax.lax.top_k(p, 2)[0]
    np.testing.assert_allclose(top2_margin(p), top2[..., 0] - top2[..., 1], rtol=0, atol=0)
    tie = jnp.asarray([[0.4, 0.1, 0.4, 0.1]])
    assert float(top2_margin(tie)[0]) == 0.0
