"""Tiled causal attention for prompts (`causal_attention_tiled`) against the unfused XLA
attention it replaces in prefill, and the prefill phase against the whole-buffer path."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdecode.cache.dense import DenseMeta, init_cache, make_dense_attend
from jdecode.config import load_model_config_yaml
from jdecode.decoding import phases
from jdecode.model.attention import attention_xla, causal_attention_tiled
from jdecode.model.params import init_params
from jdecode.model.transformer import forward
from pallas_kernels.testing import assert_close


def qkv(rng, b, t, h, k, d, dtype="float32"):
    return tuple(jnp.asarray(rng.normal(size=(b, t, n, d)), dtype) for n in (h, k, k))


# (T, tile, heads, kv heads, window): one tile, several tiles, a ragged last tile (padded),
# MHA, and sliding windows shorter than a tile and spanning several.
CASES = [(16, 16, 4, 2, None), (72, 16, 6, 2, None), (50, 16, 4, 4, None),
         (64, 16, 4, 1, 5), (80, 16, 4, 2, 37)]


@pytest.mark.parametrize("t,tile,h,k,window", CASES)
def test_tiled_matches_unfused(rng, t, tile, h, k, window):
    q, key, v = qkv(rng, 2, t, h, k, 16)
    pos = jnp.broadcast_to(jnp.arange(t), (2, t))
    ref = attention_xla(q, key, v, pos, pos, sliding_window=window)
    got = jax.jit(partial(causal_attention_tiled, sliding_window=window, tile=tile))(q, key, v)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert_close(got, ref, "float32")


def test_tiled_bfloat16(rng):
    q, key, v = qkv(rng, 1, 48, 4, 2, 16, "bfloat16")
    pos = jnp.arange(48)[None]
    ref = attention_xla(q.astype(jnp.float32), key.astype(jnp.float32),
                        v.astype(jnp.float32), pos, pos)
    got = causal_attention_tiled(q, key, v, tile=16)
    assert got.dtype == jnp.bfloat16
    assert_close(got, ref, "bfloat16")


@pytest.mark.parametrize("window", [None, 40])
def test_prefill_matches_whole_buffer_attention(rng, window):
    """phases.prefill (tiled, over the prompt's keys) = attention over the whole cache buffer:
    the same last logits and the same cache, for ragged prompts longer than one tile."""
    cfg = load_model_config_yaml("configs/models/tiny.yaml").replace(sliding_window=window)
    params = init_params(cfg, jax.random.key(int(rng.integers(1 << 30))))
    t, max_len = 512, 640  # two tiles of PROMPT_TILE
    prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, t)), jnp.int32)
    lengths = jnp.asarray([t, 301], jnp.int32)
    logits, _, cache = jax.jit(partial(phases.prefill, cfg=cfg))(
        params, init_cache(cfg, 2, max_len), prompt, lengths)

    def whole_buffer(params, cache, tokens):
        pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), tokens.shape)
        return forward(params, tokens, pos, cache, DenseMeta(pos), cfg=cfg,
                       attend=make_dense_attend(cfg, "xla"), logits_at=(lengths - 1)[:, None])

    ref_logits, _, ref_cache = jax.jit(whole_buffer)(params, init_cache(cfg, 2, max_len), prompt)
    assert_close(logits, ref_logits[:, 0], "float32")
    # Layer 0's K/V are bit-identical; later layers' inherit attention's rounding.
    np.testing.assert_array_equal(np.asarray(cache.k[0]), np.asarray(ref_cache.k[0]))
    assert_close(cache.k, ref_cache.k, "float32")
    assert_close(cache.v, ref_cache.v, "float32")
