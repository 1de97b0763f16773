"""Flash attention kernel vs the plain-jnp reference on random data."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash_attention import flash_attention, flash_attention_reference
from pallas_kernels.testing import assert_close, jit_for_tests


def _run(fn, *args, **static):
    """Calls fn(*args, **static) under jit (static kwargs bound, array args traced)."""
    return jit_for_tests(lambda *a: fn(*a, **static))(*args)


def _qkv(rng, b, t, s, h, kv, d, dtype):
    shapes = [(b, t, h, d), (b, s, kv, d), (b, s, kv, d)]
    return tuple(jnp.asarray(x, dtype) for x in map(rng.standard_normal, shapes))


# (group, head_dim, dtype, causal, T, S): GQA ratios 1/4/8, head dims 64/128, f32/bf16/f16.
# T and S are not block multiples, so the ragged tails are exercised too.
CASES = [
    (1, 64, jnp.float32, True, 40, 40),
    (4, 128, jnp.bfloat16, True, 24, 72),
    (8, 64, jnp.bfloat16, False, 17, 50),
    (4, 64, jnp.float32, False, 33, 33),
    (1, 128, jnp.float16, True, 16, 48),
]


@pytest.mark.parametrize("group,d,dtype,causal,t,s", CASES)
def test_flash_matches_reference(rng, interpret, group, d, dtype, causal, t, s):
    kv_heads, b = 2 if group < 8 else 1, 2
    q, k, v = _qkv(rng, b, t, s, group * kv_heads, kv_heads, d, dtype)
    # Chunked prefill: queries start at a random offset; padding: random valid lengths (1..S).
    q_offset = jnp.asarray(rng.integers(0, s - t + 1, b), jnp.int32)
    kv_lens = jnp.asarray(rng.integers(1, s + 1, b), jnp.int32)
    # Keys past kv_lens are stale cache rows: poison them, they must not reach the output.
    stale = (jnp.arange(s)[None, :] >= kv_lens[:, None])[:, :, None, None]
    k, v = (jnp.where(stale, jnp.nan, x).astype(dtype) for x in (k, v))

    def kernel(q, k, v, q_offset, kv_lens):
        return flash_attention(
            q,
            k,
            v,
            causal=causal,
            q_offset=q_offset,
            kv_lens=kv_lens,
            block_q=16,
            block_k=16,
            interpret=interpret,
        )

    def reference(q, k, v, q_offset, kv_lens):
        return flash_attention_reference(q, k, v, causal=causal, q_offset=q_offset, kv_lens=kv_lens)

    out = _run(kernel, q, k, v, q_offset, kv_lens)
    ref = _run(reference, q, k, v, q_offset, kv_lens)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, ref, dtype)


def test_flash_defaults_soft_cap_and_scale(rng, interpret):
    """Default blocks from tuning.py, full lengths, no offset, a soft cap and a custom scale."""
    q, k, v = _qkv(rng, 1, 64, 64, 4, 2, 64, jnp.float32)
    kwargs = {"causal": True, "soft_cap": 3.0, "sm_scale": 0.3}
    out = _run(flash_attention, q, k, v, interpret=interpret, **kwargs)
    assert_close(out, _run(flash_attention_reference, q, k, v, **kwargs), jnp.float32)


def test_flash_rows_without_keys_are_zero(rng, interpret):
    """kv_len 0 (an empty padded sequence) gives 0, not NaN."""
    q, k, v = _qkv(rng, 2, 16, 32, 2, 2, 64, jnp.float32)
    kv_lens = jnp.array([0, 32], jnp.int32)
    kernel = functools.partial(flash_attention, block_q=16, block_k=16, interpret=interpret)
    out = _run(lambda q, k, v, n: kernel(q, k, v, kv_lens=n), q, k, v, kv_lens)
    assert not jnp.any(out[0])
    ref = _run(lambda q, k, v, n: flash_attention_reference(q, k, v, kv_lens=n), q, k, v, kv_lens)
    assert_close(out, ref, jnp.float32)


@pytest.mark.parametrize(
    "q_shape,k_shape,v_shape,kwargs,needle",
    [
        ((1, 8, 4, 64), (1, 8, 2, 64), (1, 8, 2, 32), {}, "(1, 8, 2, 32)"),
        ((1, 8, 6, 64), (1, 8, 4, 64), (1, 8, 4, 64), {}, "not a multiple"),
        ((2, 8, 4, 64), (1, 8, 4, 64), (1, 8, 4, 64), {}, "(2, 8, 4, 64)"),
        ((1, 8, 4, 48), (1, 8, 4, 48), (1, 8, 4, 48), {}, "head_dim 48"),
        ((2, 8, 4, 64), (2, 8, 4, 64), (2, 8, 4, 64), {"kv_lens": (3,)}, "kv_lens has shape (3,)"),
    ],
)
def test_flash_bad_input_names_shapes(q_shape, k_shape, v_shape, kwargs, needle):
    q, k, v = (jnp.ones(s, jnp.float32) for s in (q_shape, k_shape, v_shape))
    kwargs = {name: jnp.ones(shape, jnp.int32) for name, shape in kwargs.items()}
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        flash_attention(q, k, v, **kwargs)


def _tree_mask(rng, b: int, t: int) -> jnp.ndarray:
    """[B, T, T] ancestor-or-self masks of random trees in topological order (parent < child)."""
    mask = np.zeros((b, t, t), bool)
    for row in mask:
        for i in range(t):
            row[i, i] = True
            if i:
                row[i] |= row[rng.integers(0, i)]  # a random earlier node is the parent
    return jnp.asarray(mask)


# (T, q_offsets, mask kind, causal, dtype) with 16 x 16 blocks: the own keys start at a tile
# boundary, one before it, or in the middle, and cover one tile, exactly one, or spill into 2-3.
MASK_CASES = [
    (5, (0, 15), "tree", True, jnp.float32),
    (16, (16, 7), "tree", True, jnp.float32),
    (17, (31, 40), "tree", True, jnp.bfloat16),
    (33, (1, 48), "random", True, jnp.float32),
    (12, (20, 3), "random", False, jnp.float32),
]


@pytest.mark.parametrize("t,offsets,kind,causal,dtype", MASK_CASES)
def test_flash_mask_matches_reference(rng, interpret, t, offsets, kind, causal, dtype):
    """Tree attention: each query sees the prefix and the own keys its mask row allows."""
    b, kv_heads, group, d = len(offsets), 2, 2, 64
    q_offset = jnp.asarray(offsets, jnp.int32)
    s = max(offsets) + t + 9  # a stale tail past every row's keys
    q, k, v = _qkv(rng, b, t, s, group * kv_heads, kv_heads, d, dtype)
    if kind == "tree":  # verification: the cache holds exactly the prefix and the T new keys
        mask, kv_lens = _tree_mask(rng, b, t), q_offset + t
    else:  # any mask, and lengths that cut into (or stop short of) the own keys
        mask = jnp.asarray(rng.random((b, t, t)) < 0.5)
        kv_lens = jnp.asarray(rng.integers(1, s + 1, b), jnp.int32)
    stale = (jnp.arange(s)[None, :] >= kv_lens[:, None])[:, :, None, None]
    k, v = (jnp.where(stale, jnp.nan, x).astype(dtype) for x in (k, v))
    kwargs = {"causal": causal, "q_offset": q_offset, "kv_lens": kv_lens, "mask": mask}
    out = _run(
        lambda *a: flash_attention(*a, **kwargs, block_q=16, block_k=16, interpret=interpret),
        q,
        k,
        v,
    )
    ref = _run(lambda *a: flash_attention_reference(*a, **kwargs), q, k, v)
    assert_close(out, ref, dtype)
    if kind == "tree":  # the mask changed the answer: plain causal attention differs
        plain = _run(
            lambda *a: flash_attention_reference(*a, causal=True, q_offset=q_offset), q, k, v
        )
        assert not np.allclose(np.asarray(plain, np.float32), np.asarray(ref, np.float32))
