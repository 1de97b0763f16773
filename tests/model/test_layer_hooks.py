"""Layer hooks in the forward (`LayerHooks`, `run_layers`): no hook is bit for bit the model
as it was; hooks observe, replace and mask the residual stream, and leave tokens' K/V out, in
the stacked (scan) and the unrolled layouts alike."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdecode.cache.dense import DenseMeta, init_cache, make_dense_attend
from jdecode.config import ModelConfig
from jdecode.decoding import phases
from jdecode.model.layers import rms_norm, rope_tables
from jdecode.model.layout import fuse_projections, unstack_layers
from jdecode.model.params import init_params
from jdecode.model.transformer import (
    LayerControl,
    LayerHooks,
    collect_hidden,
    decoder_layer,
    forward,
    lm_head,
    run_layers,
)
from pallas_kernels.testing import assert_close, jit_for_tests

CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2,
                  head_dim=8, intermediate_size=64, max_position_embeddings=128)
B, T = 2, 9


def layout(params, name):
    return {"stacked": params, "unrolled": unstack_layers(params),
            "fused_unrolled": unstack_layers(fuse_projections(params))}[name]


@pytest.fixture
def params(rng):
    return init_params(CFG, jax.random.key(int(rng.integers(2**31))))


@pytest.fixture
def tokens(rng):
    return jnp.asarray(rng.integers(0, CFG.vocab_size, (B, T)), jnp.int32)


def positions_of(tokens):
    return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)


def run(params, tokens, hooks=None, track_writes=False, positions=None):
    """forward over a fresh cache sized to the tokens (per-layer for unstacked params)."""
    positions = positions_of(tokens) if positions is None else positions
    cache = init_cache(CFG, tokens.shape[0], 16, per_layer=isinstance(params.layers, tuple),
                       track_writes=track_writes)
    return forward(params, tokens, positions, cache, DenseMeta(positions), cfg=CFG,
                   attend=make_dense_attend(CFG), hooks=hooks)


def reference_forward(params, tokens):
    """The forward as it was before hooks: embed, every decoder_layer in turn, norm, head."""
    positions = positions_of(tokens)
    cache = init_cache(CFG, tokens.shape[0], 16, per_layer=isinstance(params.layers, tuple))
    x = params.embed[tokens]
    cos, sin = rope_tables(positions, CFG)
    attend, meta = make_dense_attend(CFG), DenseMeta(positions)
    if isinstance(params.layers, tuple):
        for layer, lp in enumerate(params.layers):
            x, cache = decoder_layer(x, lp, cos, sin, cache, layer, meta, cfg=CFG, attend=attend)
    else:
        def body(carry, xs):
            x, cache = carry
            lp, layer = xs
            return decoder_layer(x, lp, cos, sin, cache, layer, meta, cfg=CFG,
                                 attend=attend), None
        (x, cache), _ = jax.lax.scan(body, (x, cache),
                                     (params.layers, jnp.arange(CFG.num_layers)))
    hidden = rms_norm(x, params.final_norm, CFG.rms_norm_eps)
    return lm_head(params, hidden), hidden, cache


def do_nothing_hooks():
    def before(carry, x, layer):
        return carry + 1, x, LayerControl()

    def after(carry, x_in, x_out, layer):
        return carry, x_out

    return LayerHooks(init=lambda x: jnp.int32(0), before=before, after=after)


def all_true_hooks(write_kv: bool):
    """Hooks that mask nothing: every token computes (and writes its K/V)."""
    def before(carry, x, layer):
        on = jnp.ones(x.shape[:2], bool)
        return carry, x, LayerControl(compute=on, write_kv=on if write_kv else None)

    return LayerHooks(before=before)


@pytest.mark.parametrize("name", ["stacked", "fused_unrolled"])
def test_no_hook_and_idle_hooks_are_bit_identical(params, tokens, name):
    p = layout(params, name)
    ref_logits, ref_hidden, ref_cache = jit_for_tests(reference_forward)(p, tokens)
    logits, hidden, cache = jit_for_tests(run)(p, tokens)
    np.testing.assert_array_equal(logits, ref_logits)
    np.testing.assert_array_equal(hidden, ref_hidden)
    for a, b in zip(jax.tree_util.tree_leaves(cache), jax.tree_util.tree_leaves(ref_cache)):
        np.testing.assert_array_equal(a, b)

    @jit_for_tests
    def idle(p, t):
        return (run(p, t, do_nothing_hooks()), run(p, t, all_true_hooks(False))[0],
                run(p, t, all_true_hooks(True), track_writes=True)[0])

    (logits, _, _, count), masked, tracked = idle(p, tokens)
    np.testing.assert_array_equal(logits, ref_logits)
    assert int(count) == CFG.num_layers  # `before` ran once per layer
    np.testing.assert_array_equal(masked, ref_logits)
    # Tracked writes compute the same visibility with other ops, fused differently by XLA.
    assert_close(tracked, ref_logits, "float32")


def test_phases_pass_hooks_through(params, tokens):
    lengths = jnp.asarray([T, T - 3], jnp.int32)

    @jit_for_tests
    def both(p, t):
        cache = init_cache(CFG, B, 16)
        return (phases.prefill(p, cache, t, lengths, cfg=CFG),
                phases.prefill(p, cache, t, lengths, cfg=CFG, hooks=do_nothing_hooks()),
                phases.score(p, t, cfg=CFG), phases.score(p, t, cfg=CFG, hooks=do_nothing_hooks()))

    plain, hooked, score, score_hooked = both(params, tokens)
    assert len(plain) == 3 and len(hooked) == 4 and int(hooked[3]) == CFG.num_layers
    assert len(score) == 2 and len(score_hooked) == 3
    np.testing.assert_array_equal(plain[0], hooked[0])
    np.testing.assert_array_equal(score[0], score_hooked[0])


@pytest.mark.parametrize("name", ["stacked", "fused_unrolled"])
def test_collect_hidden_and_layer_ranges(params, tokens, name):
    """x after layer l, collected by a hook, equals running only layers [0, l + 1); running
    [0, m) then [m, L) equals running them all."""
    p = layout(params, name)
    want = (-1, 0, 2, 3)
    positions = positions_of(tokens)
    cos, sin = rope_tables(positions, CFG)
    kw = {"cfg": CFG, "attend": make_dense_attend(CFG)}
    per_layer = isinstance(p.layers, tuple)

    def fresh():
        return init_cache(CFG, B, 16, per_layer=per_layer)

    @jit_for_tests
    def outputs(p, tokens):
        feats = run(p, tokens, collect_hidden(want))[3]
        x0 = p.embed[tokens]
        alone = [run_layers(p, x0, cos, sin, fresh(), DenseMeta(positions), stop=layer + 1,
                            **kw)[0] for layer in want[1:]]
        x, cache, _ = run_layers(p, x0, cos, sin, fresh(), DenseMeta(positions), stop=1, **kw)
        split = run_layers(p, x, cos, sin, cache, DenseMeta(positions), start=1, **kw)[0]
        return feats, x0, alone, split

    feats, x0, alone, split = outputs(p, tokens)
    assert feats.shape == (len(want), B, T, CFG.hidden_size)
    assert_close(feats[0], x0, "float32")
    for i, x in enumerate(alone, 1):
        assert_close(feats[i], x, "float32")
    assert_close(split, feats[-1], "float32")
    with pytest.raises(ValueError, match=r"layer range \[3, 5\) is outside"):
        run_layers(p, x0, cos, sin, fresh(), DenseMeta(positions), start=3, stop=5, **kw)


def test_compute_mask_passes_the_residual_through(params, tokens, rng):
    """A token masked out of layer l leaves it with the x it came in with, in both layouts."""
    skip = jnp.asarray(rng.random((CFG.num_layers, B, T)) < 0.4)  # [L, B, T]

    def before(carry, x, layer):
        return carry, x, LayerControl(compute=~skip[layer])

    def after(carry, x_in, x_out, layer):  # records, per layer, whether x changed
        changed = jnp.any(x_in != x_out, axis=-1)  # [B, T]
        return carry.at[layer].set(changed), x_out

    hooks = LayerHooks(init=lambda x: jnp.zeros((CFG.num_layers, B, T), bool), before=before,
                       after=after)
    # A hook may also replace x: zeroing the residual stream before layer 0 is that model.
    zero = LayerHooks(before=lambda c, x, layer: (c, jnp.where(jnp.equal(layer, 0), 0.0, x),
                                                  LayerControl()))

    @jit_for_tests
    def outputs(p, pu, tokens):
        p0 = p.replace(embed=jnp.zeros_like(p.embed))
        return run(p, tokens, hooks), run(pu, tokens, hooks), run(p, tokens, zero)[0], \
            run(p0, tokens)[0]

    (logits, _, _, changed), (logits_u, _, _, changed_u), zeroed, ref = outputs(
        params, unstack_layers(params), tokens)
    np.testing.assert_array_equal(changed, ~skip)
    np.testing.assert_array_equal(changed_u, ~skip)
    assert_close(logits, logits_u, "float32")
    assert_close(zeroed, ref, "float32")


@pytest.mark.parametrize("name", ["stacked", "unrolled"])
def test_unwritten_tokens_are_invisible(params, tokens, rng, name):
    """A token that computes no layer and writes no K/V changes nothing for the tokens after it:
    they see what they see when the token is absent (its position left empty)."""
    p = layout(params, name)
    j = int(rng.integers(1, T - 2))
    absent = (jnp.arange(T) == j)[None].repeat(B, 0)  # [B, T]
    keep = np.arange(T) != j

    def before(carry, x, layer):
        return carry, x, LayerControl(compute=~absent, write_kv=~absent)

    @jit_for_tests
    def outputs(p, tokens):
        return (run(p, tokens, LayerHooks(before=before), track_writes=True),
                run(p, tokens[:, keep], track_writes=True,
                    positions=positions_of(tokens)[:, keep])[0])

    (logits, _, cache, _), ref = outputs(p, tokens)
    assert_close(logits[:, keep], ref, "float32")
    written = np.stack(cache.written) if isinstance(cache.written, tuple) else cache.written
    assert not written[:, :, j].any() and written[:, :, :T][:, :, keep].all()
    with pytest.raises(ValueError, match="track_writes=True"):
        run(p, tokens, LayerHooks(before=before))
