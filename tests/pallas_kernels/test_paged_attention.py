"""Paged decode attention, ragged mixed batches and the K/V page write vs their references."""

from __future__ import annotations

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.paged_attention import (
    paged_attention,
    paged_attention_reference,
    ragged_paged_attention,
    ragged_paged_attention_reference,
    write_kv_pages,
    write_kv_pages_reference,
)
from pallas_kernels.testing import assert_close, jit_for_tests


def _pool(rng, num_pages, page, kv, d, dtype):
    k, v = (rng.standard_normal((num_pages, page, kv, d)) for _ in range(2))
    return jnp.asarray(k, dtype), jnp.asarray(v, dtype)


def _tables(rng, lens, page, max_pages, num_pages):
    """Random disjoint pages per sequence (a permuted pool); unused entries are -1 padding.

    Pages no sequence owns are poisoned with NaN by the caller: they stand for stale pages.
    """
    perm = rng.permutation(num_pages)
    tables = np.full((len(lens), max_pages), -1, np.int32)
    used, start = [], 0
    for b, n in enumerate(lens):
        need = -(-n // page)
        tables[b, :need] = perm[start : start + need]
        used.extend(perm[start : start + need])
        start += need
    return jnp.asarray(tables), np.asarray(used, np.int64)


def _poison_unused(pages, used):
    """NaN in every page no sequence owns, and past each context inside owned pages is left
    random: the kernels must mask both."""
    keep = np.zeros(pages.shape[0], bool)
    keep[used] = True
    return jnp.where(jnp.asarray(keep)[:, None, None, None], pages, jnp.nan).astype(pages.dtype)


def _decode_batch(rng, lens_of, page, group, d, dtype):
    """(q, k_pages, v_pages, tables, ctx) of one decode step: a sequence per length of
    lens_of(max_pages) on random disjoint pages of 4-page tables, 2 kv heads (1 for GQA 8),
    pages no sequence owns poisoned with NaN."""
    kv_heads, max_pages = 2 if group < 8 else 1, 4
    lens = lens_of(max_pages)
    num_pages = 2 * max_pages * len(lens)
    tables, used = _tables(rng, lens, page, max_pages, num_pages)
    k_pages, v_pages = (
        _poison_unused(x, used) for x in _pool(rng, num_pages, page, kv_heads, d, dtype)
    )
    q = jnp.asarray(rng.standard_normal((len(lens), group * kv_heads, d)), dtype)
    return q, k_pages, v_pages, tables, jnp.asarray(lens, jnp.int32)


# (page_size, group, head_dim, dtype, num_splits): page sizes 16/32/64, GQA 1/4/8, both head
# dims, f32/bf16, with and without split-K (3 splits do not divide the blocks evenly).
DECODE_CASES = [
    (16, 1, 64, jnp.float32, 1),
    (32, 4, 128, jnp.bfloat16, 3),
    (64, 8, 64, jnp.bfloat16, 2),
    (16, 4, 128, jnp.float32, 4),
]


@pytest.mark.parametrize("page,group,d,dtype,num_splits", DECODE_CASES)
def test_paged_decode_matches_reference(rng, interpret, page, group, d, dtype, num_splits):
    # Lengths at every page boundary: 1, page-1, page, page+1, and a full table.
    q, k_pages, v_pages, tables, ctx = _decode_batch(
        rng, lambda max_pages: [1, page - 1, page, page + 1, max_pages * page], page, group, d,
        dtype)

    def kernel(*args):
        return paged_attention(*args, num_splits=num_splits, block_k=page, interpret=interpret)

    out = jit_for_tests(kernel)(q, k_pages, v_pages, tables, ctx)
    ref = jit_for_tests(paged_attention_reference)(q, k_pages, v_pages, tables, ctx)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("page,group,d,dtype,num_splits,block_k", [
    (16, 4, 64, jnp.float32, 1, 16),  # one split: every block of the table, one per loop step
    (16, 4, 128, jnp.bfloat16, 3, 32),  # uneven splits, two pages a block
    (32, 8, 64, jnp.float32, 2, 32),  # GQA 8, one page a block
])
def test_paged_decode_prefetch_matches_reference(rng, interpret, page, group, d, dtype,
                                                 num_splits, block_k):
    """The hand-pipelined loop (`attend_prefetched`): at every page boundary, with splits
    that hold no block (context 1), the last iteration's and the one-after's blocks read past
    the split, and stale pages poisoned with NaN, it equals the reference (and the default
    loop)."""
    q, k_pages, v_pages, tables, ctx = _decode_batch(
        rng, lambda max_pages: [1, page - 1, page, page + 1, 2 * page + 3, max_pages * page],
        page, group, d, dtype)

    def kernel(*args, prefetch):
        return paged_attention(*args, num_splits=num_splits, block_k=block_k,
                               prefetch=prefetch, soft_cap=30.0, interpret=interpret)

    out = jit_for_tests(lambda *a: kernel(*a, prefetch=True))(q, k_pages, v_pages, tables, ctx)
    ref = jit_for_tests(lambda *a: paged_attention_reference(*a, soft_cap=30.0))(
        q, k_pages, v_pages, tables, ctx)
    chex.assert_shape(out, q.shape)
    chex.assert_type(out, dtype)
    assert_close(out, ref, dtype)
    plain = jit_for_tests(lambda *a: kernel(*a, prefetch=False))(q, k_pages, v_pages, tables, ctx)
    assert_close(out, plain, dtype)


def test_paged_decode_default_tuning_and_soft_cap(rng, interpret):
    """Default block_k / num_splits from tuning.py, multi-page blocks, a soft cap."""
    page, lens = 16, [3, 70, 128]
    tables, _ = _tables(rng, lens, page, 8, 32)
    k_pages, v_pages = _pool(rng, 32, page, 2, 64, jnp.float32)
    q = jnp.asarray(rng.standard_normal((3, 8, 64)), jnp.float32)
    ctx = jnp.asarray(lens, jnp.int32)
    out = jit_for_tests(lambda *a: paged_attention(*a, soft_cap=2.0, interpret=interpret))(
        q, k_pages, v_pages, tables, ctx
    )
    ref = jit_for_tests(lambda *a: paged_attention_reference(*a, soft_cap=2.0))(
        q, k_pages, v_pages, tables, ctx
    )
    assert_close(out, ref, jnp.float32)


def _ragged_batch(rng, page, max_pages):
    """A mixed batch: decodes at page-boundary contexts, a fresh prefill chunk, a chunk over a
    cached prefix, an idle sequence (q_len 0), then 3 padding rows."""
    # (q_len, context_len incl. this step's tokens)
    seqs = [(1, 1), (1, page - 1), (page + 1, page + 1), (1, page + 1), (5, 2 * page + 3),
            (0, 7), (1, max_pages * page)]  # fmt: skip
    q_lens, lens = zip(*seqs)
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    return list(lens), jnp.asarray(qsl), int(qsl[-1]) + 3


RAGGED_CASES = [
    (16, 1, 64, jnp.float32),
    (16, 4, 128, jnp.bfloat16),
    (32, 8, 64, jnp.float32),
]


@pytest.mark.parametrize("split_decodes", [True, False])
@pytest.mark.parametrize("page,group,d,dtype", RAGGED_CASES)
def test_ragged_matches_reference(rng, interpret, page, group, d, dtype, split_decodes):
    kv_heads, max_pages = 2 if group < 8 else 1, 3
    lens, qsl, n = _ragged_batch(rng, page, max_pages)
    num_pages = 2 * max_pages * len(lens)
    tables, used = _tables(rng, lens, page, max_pages, num_pages)
    k_pages, v_pages = (
        _poison_unused(x, used) for x in _pool(rng, num_pages, page, kv_heads, d, dtype)
    )
    q = jnp.asarray(rng.standard_normal((n, group * kv_heads, d)), dtype)
    ctx = jnp.asarray(lens, jnp.int32)
    args = (q, k_pages, v_pages, tables, ctx, qsl)
    out = jit_for_tests(
        lambda *a: ragged_paged_attention(
            *a, block_k=page, split_decodes=split_decodes, interpret=interpret
        )
    )(*args)
    ref = jit_for_tests(ragged_paged_attention_reference)(*args)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert not jnp.any(out[int(qsl[-1]) :]), "padding rows must come back 0"
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("idle", [2, 5])  # rows past the slots (7 rows, 6 slots), or fewer
@pytest.mark.parametrize("page,group,d,dtype", RAGGED_CASES[:2])
def test_ragged_decodes_only_matches_reference(rng, interpret, page, group, d, dtype, idle):
    """split_decodes="only" (the engine's all-decode steps, its layout: decodes in the first
    slots, row b = slot b): the reference's rows, idle slots (q_len 0, one with a context) and
    padding rows included."""
    kv_heads, max_pages = 2, 3
    seqs = [(1, 1), (1, page - 1), (1, page + 1), (1, max_pages * page)]
    seqs += [(0, 7), (0, 0), (0, 3), (0, 0), (0, 5)][:idle]
    q_lens, lens = zip(*seqs)
    qsl = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    n = int(qsl[-1]) + 3
    num_pages = 2 * max_pages * len(lens)
    tables, used = _tables(rng, list(lens), page, max_pages, num_pages)
    k_pages, v_pages = (
        _poison_unused(x, used) for x in _pool(rng, num_pages, page, kv_heads, d, dtype)
    )
    q = jnp.asarray(rng.standard_normal((n, group * kv_heads, d)), dtype)
    args = (q, k_pages, v_pages, tables, jnp.asarray(lens, jnp.int32), qsl)
    out = jit_for_tests(
        lambda *a: ragged_paged_attention(*a, split_decodes="only", interpret=interpret)
    )(*args)
    ref = jit_for_tests(ragged_paged_attention_reference)(*args)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert not jnp.any(out[int(qsl[-1]) :]), "padding rows must come back 0"
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_write_kv_pages_matches_scatter(rng, interpret, dtype):
    num_pages, page, kv, d, n = 6, 16, 2, 64, 9
    k_pages, v_pages = _pool(rng, num_pages, page, kv, d, dtype)
    slots = rng.choice(num_pages * page, n, replace=False).astype(np.int32)
    slots[[2, 5]] = -1  # padding rows
    k_new, v_new = (jnp.asarray(rng.standard_normal((n, kv, d)), dtype) for _ in range(2))
    args = (k_pages, v_pages, k_new, v_new, jnp.asarray(slots))
    got = jit_for_tests(lambda *a: write_kv_pages(*a, interpret=interpret))(*args)
    want = write_kv_pages_reference(*args)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
    written = np.asarray(want[0]).reshape(-1, kv, d)[slots[slots >= 0]]
    np.testing.assert_array_equal(written, np.asarray(k_new)[slots >= 0])


def _paged_args(q_shape=(2, 8, 64), pool=(8, 16, 2, 64), v_pool=None, table=(2, 4), lens=(5, 9)):
    q = jnp.zeros(q_shape, jnp.float32)
    k = jnp.zeros(pool, jnp.float32)
    v = jnp.zeros(v_pool or pool, jnp.float32)
    return q, k, v, jnp.zeros(table, jnp.int32), jnp.asarray(lens, jnp.int32)


@pytest.mark.parametrize(
    "overrides,needle",
    [
        ({"v_pool": (8, 16, 2, 32)}, r"v_pages \(8, 16, 2, 32\)"),
        ({"q_shape": (2, 6, 64), "pool": (8, 16, 4, 64)}, r"6 heads, not a multiple of the 4"),
        ({"q_shape": (2, 8, 128)}, r"q \(2, 8, 128\) has head_dim 128"),
        ({"lens": (5, 65)}, r"65 tokens does not fit block_tables \(2, 4\)"),
        ({"table": (3, 4)}, r"block_tables \(3, 4\) must be \[2, max_pages\]"),
        ({"pool": (8, 12, 2, 64)}, r"page_size 12"),
    ],
)
def test_paged_bad_input_names_shapes(overrides, needle):
    with pytest.raises(ValueError, match=needle):
        paged_attention(*_paged_args(**overrides))


def test_ragged_and_write_bad_input_names_shapes():
    q, k, v, table, lens = _paged_args()
    with pytest.raises(ValueError, match=r"query_start_loc \(2,\) must be \[3\]"):
        ragged_paged_attention(q, k, v, table, lens, jnp.zeros((2,), jnp.int32))
    with pytest.raises(ValueError, match=r"k_new \(3, 2, 32\)"):
        write_kv_pages(k, v, jnp.zeros((3, 2, 32)), jnp.zeros((3, 2, 32)), jnp.zeros(3, jnp.int32))
