"""Paged attend vs dense attention on random pools: ragged chunks, permuted pages, boundaries."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdecode.cache.paged import PagedKVCache, PagedMeta, copy_pages, paged_attend
from jdecode.model.attention import attention_xla
from pallas_kernels.testing import assert_close

L, P, PAGE, K, H, D = 2, 16, 4, 2, 4, 16


def random_case(seed: int, context_lens, q_lens, n_pad: int, b_pad: int, heads=(H, K)):
    h, kv = heads
    rng = np.random.default_rng(seed)
    kp = rng.standard_normal((L, P, PAGE, kv, D)).astype(np.float32)
    vp = rng.standard_normal((L, P, PAGE, kv, D)).astype(np.float32)
    max_pages = 5
    perm = rng.permutation(P)  # pages handed out in a random order
    tables = np.zeros((b_pad, max_pages), np.int32)
    slot_mapping = np.full(n_pad, -1, np.int32)
    qsl = np.zeros(b_pad + 1, np.int32)
    used = 0
    row = 0
    for b, (ctx, ql) in enumerate(zip(context_lens, q_lens, strict=True)):
        npages = -(-ctx // PAGE)
        tables[b, :npages] = perm[used:used + npages]
        used += npages
        for i, pos in enumerate(range(ctx - ql, ctx)):
            slot_mapping[row + i] = tables[b, pos // PAGE] * PAGE + pos % PAGE
        row += ql
        qsl[b + 1] = row
    qsl[len(context_lens) + 1:] = row
    ctx = np.zeros(b_pad, np.int32)
    ctx[:len(context_lens)] = context_lens
    q = rng.standard_normal((1, n_pad, h, D)).astype(np.float32)
    k = rng.standard_normal((1, n_pad, kv, D)).astype(np.float32)
    v = rng.standard_normal((1, n_pad, kv, D)).astype(np.float32)
    meta = PagedMeta(jnp.asarray(slot_mapping), jnp.asarray(tables), jnp.asarray(ctx),
                     jnp.asarray(qsl))
    return PagedKVCache(jnp.asarray(kp), jnp.asarray(vp)), meta, q, k, v


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("layer", [0, 1])
def test_paged_attend_matches_dense_attention_per_sequence(seed, layer):
    # Lengths around page boundaries (1, page-1, page, page+1) and a chunk that splits a page.
    context_lens, q_lens = [1, PAGE - 1, PAGE, PAGE + 1, 2 * PAGE + 3], [1, 3, 1, 2, 6]
    cache, meta, q, k, v = random_case(seed, context_lens, q_lens, n_pad=16, b_pad=7)
    out, new = jax.jit(paged_attend)(q, k, v, cache, jnp.int32(layer), meta)
    out = np.asarray(out[0])
    kp, vp = np.asarray(cache.k_pages[layer]), np.asarray(cache.v_pages[layer])
    row = 0
    for b, (ctx, ql) in enumerate(zip(context_lens, q_lens, strict=True)):
        pages = np.asarray(meta.block_tables[b, :-(-ctx // PAGE)])
        kd = kp[pages].reshape(-1, K, D)[:ctx].copy()
        vd = vp[pages].reshape(-1, K, D)[:ctx].copy()
        kd[ctx - ql:] = k[0, row:row + ql]  # this step's keys replace whatever was there
        vd[ctx - ql:] = v[0, row:row + ql]
        want = attention_xla(q[:, row:row + ql], kd[None], vd[None],
                             jnp.arange(ctx - ql, ctx)[None], jnp.arange(ctx)[None])
        assert_close(out[row:row + ql], want[0], "float32", err_msg=f"sequence {b}")
        # The pool now holds the new K/V at the sequence's slots, in this layer only.
        got_k = np.asarray(new.k_pages[layer][pages]).reshape(-1, K, D)[:ctx]
        np.testing.assert_array_equal(got_k[ctx - ql:], k[0, row:row + ql])
        row += ql
    np.testing.assert_array_equal(out[row:], 0)  # padding rows
    other = 1 - layer
    np.testing.assert_array_equal(new.k_pages[other], cache.k_pages[other])


def test_copy_pages_reads_all_sources_before_writing():
    rng = np.random.default_rng(3)
    kp = jnp.asarray(rng.standard_normal((L, P, PAGE, K, D)).astype(np.float32))
    cache = PagedKVCache(kp, -kp)
    # 2 -> 5, and 5 -> 7 in the same call: 7 gets the old page 5. -1 is padding.
    out = copy_pages(cache, jnp.array([2, 5, 0], jnp.int32), jnp.array([5, 7, -1], jnp.int32))
    want = np.asarray(kp).copy()
    want[:, 5], want[:, 7] = np.asarray(kp)[:, 2], np.asarray(kp)[:, 5]
    np.testing.assert_array_equal(out.k_pages, want)
    np.testing.assert_array_equal(out.v_pages, -want)


def test_unknown_impl_names_the_choices():
    cache, meta, q, k, v = random_case(0, [1], [1], n_pad=2, b_pad=1)
    with pytest.raises(ValueError, match="xla, reference, pallas"):
        paged_attend(q, k, v, cache, jnp.int32(0), meta, impl="cuda")


def _pallas_vs_xla(seed: int, heads=(H, K)) -> None:
    context_lens, q_lens = [1, PAGE - 1, PAGE, PAGE + 1, 2 * PAGE + 3], [1, 3, 1, 2, 6]
    cache, meta, q, k, v = random_case(seed, context_lens, q_lens, n_pad=16, b_pad=7,
                                       heads=heads)
    # XLA on the GPU runs f32 dots as TF32 by default (errors ~1e-3); the kernel's are true f32.
    with jax.default_matmul_precision("highest"):
        want, want_cache = jax.jit(paged_attend)(q, k, v, cache, jnp.int32(1), meta)
    got, got_cache = jax.jit(partial(paged_attend, impl="pallas"))(q, k, v, cache,
                                                                   jnp.int32(1), meta)
    assert_close(got, want, "float32")
    np.testing.assert_array_equal(got_cache.k_pages, want_cache.k_pages)


# SmolLM2's 3 kv heads (groups of 3): the write kernel's [K, D] row block wants a power of 2,
# so its K/V are written by XLA; the attention kernels pad the group.
HEADS = [(H, K), (9, 3)]


@pytest.mark.parametrize("heads", HEADS)
def test_pallas_impl_matches_xla_interpreted(heads):
    _pallas_vs_xla(4, heads)  # Pallas interpreter on CPU: the same kernels the GPU compiles


@pytest.mark.gpu
@pytest.mark.parametrize("heads", HEADS)
def test_pallas_impl_matches_xla_compiled(heads):
    if jax.default_backend() != "gpu":
        pytest.skip("needs the GPU")
    _pallas_vs_xla(5, heads)


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("heads", HEADS)
def test_decodes_only_step_writes_in_the_attention_kernel(monkeypatch, heads, splits):
    """A decode-only step (slot b's token in row b, `PagedMeta.decodes_only`) with impl
    "pallas" runs one kernel that stores the K/V and attends (`paged_decode_writing`): its
    rows and the pool equal the XLA path's, with one split (the output in the model dtype)
    and with three (merged). Rows past the four sequences are padding."""
    from jdecode.cache import paged

    context_lens = [1, PAGE - 1, PAGE + 1, 2 * PAGE + 3]
    cache, meta, q, k, v = random_case(6, context_lens, [1] * 4, n_pad=6, b_pad=7,
                                       heads=heads)
    meta = meta.replace(decodes_only=True)
    assert paged.writes_in_kernel(jnp.asarray(q), cache, meta)
    monkeypatch.setattr(paged, "decode_num_splits", lambda *a: splits)
    calls = []
    real = paged.paged_decode_attention
    monkeypatch.setattr(paged, "paged_decode_attention",
                        lambda *a, **kw: calls.append(kw["num_splits"]) or real(*a, **kw))
    with jax.default_matmul_precision("highest"):
        want, want_cache = jax.jit(paged_attend)(q, k, v, cache, jnp.int32(1), meta)
    got, got_cache = jax.jit(partial(paged_attend, impl="pallas"))(q, k, v, cache,
                                                                   jnp.int32(1), meta)
    assert calls == [splits]
    assert_close(got[:, :4], want[:, :4], "float32")
    np.testing.assert_array_equal(got_cache.k_pages, want_cache.k_pages)
    np.testing.assert_array_equal(got_cache.v_pages, want_cache.v_pages)


@pytest.mark.parametrize("heads", HEADS)
def test_paged_attend_rotates_unroped_q_and_k(heads):
    """`make_paged_attend` is marked `APPLIES_ROPE`: given q and k before RoPE with
    rope=(cos, sin), the decode-only kernel (which rotates them inside) and the XLA ragged path
    (which rotates them first) both equal the XLA path on rotated input."""
    from helpers import rope_at

    from jdecode.cache.paged import make_paged_attend
    from jdecode.model.attention import APPLIES_ROPE
    from jdecode.model.layers import apply_rope

    context_lens = [1, PAGE - 1, PAGE + 1, 2 * PAGE + 3]
    cache, meta, q, k, v = random_case(6, context_lens, [1] * 4, n_pad=6, b_pad=7,
                                       heads=heads)
    meta = meta.replace(decodes_only=True)
    positions = jnp.maximum(jnp.asarray(context_lens + [0, 0], jnp.int32) - 1, 0)  # [N]
    cos, sin = rope_at(positions[None], D)  # [1, N, D/2] each
    assert getattr(make_paged_attend("pallas"), APPLIES_ROPE)
    layer = jnp.int32(1)
    with jax.default_matmul_precision("highest"):
        want, want_cache = jax.jit(paged_attend)(
            apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, cache, layer, meta)
        for impl in ("xla", "pallas"):
            got, got_cache = jax.jit(partial(paged_attend, impl=impl))(
                q, k, v, cache, layer, meta, rope=(cos, sin))
            assert_close(got[:, :4], want[:, :4], "float32")
            assert_close(got_cache.k_pages, want_cache.k_pages, "float32")
            np.testing.assert_array_equal(got_cache.v_pages, want_cache.v_pages)
