"""The fused decode step (five kernels per layer) against its references.

Each fused GEMV is checked against its plain-jnp reference on random data, in the Pallas
interpreter on CPU (compiled on the GPU); the whole step against the general forward's
`decode_step` with impl="xla"; and, on the GPU, greedy tokens of the real model in f32 against
the XLA path.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import spy_fused_verify

from jdecode.cache.dense import DenseKVCache, DenseMeta, dense_attend, init_cache
from jdecode.config import load_model_config_yaml
from jdecode.decoding import methods, phases
from jdecode.decoding.sampling import SamplingArrays, SamplingParams
from jdecode.decoding.tree import tree_from_parents
from jdecode.io.registry import Model
from jdecode.model.fused_decode import (
    ENV_SWITCH,
    block_visibility,
    fused_decode_reason,
    fused_hooks_reason,
    wants_decode_copies,
    with_decode_copies,
)
from jdecode.model.layout import inference_layout
from jdecode.model.params import init_params
from jdecode.model.transformer import LayerHooks, collect_hidden
from pallas_kernels.flash_attention.reference import MASK_VALUE
from pallas_kernels.fused_decode import (
    GemvTiles,
    attn_o_residual,
    decode_attention,
    gate_up_swiglu,
    gemv_residual,
    qkv_rope,
)
from pallas_kernels.fused_decode import reference as ref
from pallas_kernels.fused_decode.attention import default_splits
from pallas_kernels.fused_decode.block_attention import block_attention
from pallas_kernels.fused_decode.kernel import (
    F32_MAX_ROWS,
    FMA_MAX_ROWS,
    LARGE_GEMV,
    MAX_ROWS,
    MULTI_ROW_MIN,
    MULTI_ROW_TILES,
    default_tiles,
)
from pallas_kernels.fused_decode.paged_attention import paged_block_k, paged_decode_attention
from pallas_kernels.testing import assert_close, jit_for_tests

TINY = "configs/models/tiny.yaml"


@pytest.fixture
def fused_on(monkeypatch):
    """Switches the fused step on whatever the default (see jdecode.model.fused_decode)."""
    monkeypatch.setenv(ENV_SWITCH, "1")


@pytest.fixture(autouse=True)
def _exact_f32_matmuls():
    """GPU XLA runs f32 dots as TF32 by default; the f32 tolerance assumes true f32."""
    with jax.default_matmul_precision("highest"):
        yield


def _inputs(rng, dtype, rows, *, E=192, H=6, K=2, D=64, F=320):
    """Random inputs of the three kernels (GQA group 3 like SmolLM2's 9/3 heads; E and F not
    powers of two, like its 576 and 1536)."""
    def normal(*shape, scale=1.0):
        return jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32).astype(dtype)

    pos = jnp.asarray(rng.integers(0, 4096, rows), jnp.int32)
    ang = pos[:, None].astype(jnp.float32) * jnp.linspace(0.01, 1.0, D // 2)
    return {"x": normal(rows, E), "norm": (1 + normal(E, scale=0.1)).astype(dtype),
            "wqkv": normal(E, (H + 2 * K) * D, scale=E ** -0.5), "cos": jnp.cos(ang),
            "sin": jnp.sin(ang), "wo": normal(H * D, E, scale=(H * D) ** -0.5),
            "a": normal(rows, H * D), "wgu": normal(E, 2 * F, scale=E ** -0.5),
            "act": normal(rows, F), "wd": normal(F, E, scale=F ** -0.5), "H": H, "K": K, "D": D}


# (tiles, weights given [N, K], rows): the defaults at 1, 3 and 40 rows (a 64-row tile); then
# wider columns with an unrolled K loop, the narrowest K step, transposed weights (with a K
# step wider than K: one masked step), and the CUDA-core (fma) path, looped and unrolled (the
# transposed defaults are unrolled with `weights_first`: these matrices are small).
CASES = [(None, False, 1), (None, False, 3), (None, False, 40),
         (GemvTiles(block_n=32, block_k=64, unroll=True), False, 3),
         (GemvTiles(block_k=16), False, 3), (None, True, 3), (GemvTiles(block_k=256), True, 3),
         (GemvTiles(block_n=8, block_k=64, fma=True), True, 3),
         (GemvTiles(block_n=8, block_k=256, fma=True, unroll=True), True, 1),
         (default_tiles(8192, 1, True, 2048), True, 1)]
CASE_IDS = ["default-1", "default-3", "default-40", "wide-unrolled-3", "bk16-3", "transposed-3",
            "transposed-bk256-3", "fma-3", "fma-bk256-unrolled-1", "large-1"]


def _w(w, transposed):
    return w.T if transposed else w


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("tiles,transposed,rows", CASES, ids=CASE_IDS)
def test_qkv_rope_matches_reference(rng, dtype, tiles, transposed, rows):
    a = _inputs(rng, dtype, rows)
    args = (a["x"], a["norm"], a["wqkv"], a["cos"], a["sin"])
    kw = {"num_heads": a["H"], "num_kv_heads": a["K"], "eps": 1e-5}
    got = qkv_rope(a["x"], a["norm"], _w(a["wqkv"], transposed), a["cos"], a["sin"], **kw,
                   tiles=tiles, transposed=transposed)
    want = ref.qkv_rope_reference(*args, **kw)
    chex.assert_trees_all_equal_shapes_and_dtypes(got, want)
    assert_close(got, want, dtype)
    # The V heads are not rotated: with positions 0 (cos 1, sin 0) nothing turns at all.
    zero = ref.qkv_rope_reference(a["x"], a["norm"], a["wqkv"], jnp.ones_like(a["cos"]),
                                  jnp.zeros_like(a["sin"]), **kw)
    v_cols = slice((a["H"] + a["K"]) * a["D"], None)
    assert_close(got[:, v_cols], zero[:, v_cols], dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("tiles,transposed,rows", CASES, ids=CASE_IDS)
def test_gate_up_swiglu_matches_reference(rng, dtype, tiles, transposed, rows):
    a = _inputs(rng, dtype, rows)
    got = gate_up_swiglu(a["x"], a["norm"], _w(a["wgu"], transposed), eps=1e-5, tiles=tiles,
                         transposed=transposed)
    want = ref.gate_up_swiglu_reference(a["x"], a["norm"], a["wgu"], eps=1e-5)
    chex.assert_trees_all_equal_shapes_and_dtypes(got, want)
    # bf16: the kernel's silu runs in f32 and is rounded once; XLA's may round inside it.
    assert_close(got, want, dtype, scale=2.0 if dtype == "bfloat16" else 1.0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("tiles,transposed,rows", CASES, ids=CASE_IDS)
def test_gemv_residual_matches_reference(rng, dtype, tiles, transposed, rows):
    a = _inputs(rng, dtype, rows)
    for lhs, w in ((a["a"], a["wo"]), (a["act"], a["wd"])):  # the O and down projections
        got = gemv_residual(lhs, _w(w, transposed), a["x"], tiles=tiles, transposed=transposed)
        want = ref.gemv_residual_reference(lhs, w, a["x"])
        chex.assert_trees_all_equal_shapes_and_dtypes(got, want)
        assert_close(got, want, dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("tiles,transposed,rows", CASES, ids=CASE_IDS)
def test_attn_o_residual_matches_reference(rng, dtype, tiles, transposed, rows):
    a = _inputs(rng, dtype, rows)
    n = a["H"] * a["D"]
    parts = jnp.asarray(rng.standard_normal((rows, 3, n)), jnp.float32)
    lse = jnp.asarray(rng.standard_normal((rows, 3, a["H"])) * 4, jnp.float32)
    lse = lse.at[:, 1].set(MASK_VALUE)  # an empty split weighs nothing
    got = attn_o_residual(parts, lse, _w(a["wo"], transposed), a["x"], tiles=tiles,
                          transposed=transposed)
    want = ref.attn_o_residual_reference(parts, lse, a["wo"], a["x"])
    chex.assert_trees_all_equal_shapes_and_dtypes(got, want)
    assert_close(got, want, dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("rows,splits,block_k", [(1, None, 64), (2, 1, 64), (4, 3, 64),
                                                 (4, 8, 128)])
def test_decode_attention_matches_reference(rng, dtype, rows, splits, block_k):
    """Against f32 attention over [past | new token], at positions mid-cache, 0 (the new token
    alone), past the buffer (attends, writes nothing) and at a block boundary (64; mid-block
    for 128-slot blocks, with splits that see no block)."""
    H, K, D, S = 6, 2, 64, 256

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)

    qkv, kc, vc = normal(rows, (H + 2 * K) * D), normal(rows, S, K, D), normal(rows, S, K, D)
    positions = jnp.asarray([130, 0, S + 5, 64][:rows], jnp.int32)
    parts, lse, k_out, v_out = decode_attention(qkv, kc, vc, positions, num_heads=H,
                                                num_kv_heads=K, num_splits=splits,
                                                block_k=block_k)
    want, k_want, v_want = ref.decode_attention_reference(qkv, kc, vc, positions,
                                                          num_heads=H, num_kv_heads=K)
    ns = splits or default_splits(S, rows)
    chex.assert_shape(parts, (rows, ns, H * D))
    chex.assert_shape(lse, (rows, ns, H))
    assert_close(ref.merge_splits(parts, lse), want, dtype)
    chex.assert_trees_all_equal((k_out, v_out), (k_want, v_want))  # the write is a copy


@pytest.mark.parametrize("dtype,splits,block_k", [("bfloat16", 3, 64), ("float32", 8, 128)])
def test_decode_attention_prefetch_matches_reference(rng, dtype, splits, block_k):
    """The hand-pipelined past loop (`attend_past_prefetched`): the positions of
    test_decode_attention_matches_reference (mid-cache, 0, past the buffer, a block boundary;
    splits that see no block), with NaN in every slot at or past a row's position: masked
    loads read none of them, the next block's included."""
    H, K, D, S, rows = 6, 2, 64, 256, 4

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)

    qkv, kc, vc = normal(rows, (H + 2 * K) * D), normal(rows, S, K, D), normal(rows, S, K, D)
    positions = jnp.asarray([130, 0, S + 5, 64], jnp.int32)
    want = ref.decode_attention_reference(qkv, kc, vc, positions, num_heads=H,
                                          num_kv_heads=K)[0]
    stale = (jnp.arange(S)[None, :] >= positions[:, None])[:, :, None, None]  # [B, S, 1, 1]
    kc, vc = (jnp.where(stale, jnp.nan, c).astype(dtype) for c in (kc, vc))
    parts, lse, _, _ = decode_attention(qkv, kc, vc, positions, num_heads=H, num_kv_heads=K,
                                        num_splits=splits, block_k=block_k, prefetch=True)
    chex.assert_shape(parts, (rows, splits, H * D))
    assert_close(ref.merge_splits(parts, lse), want, dtype)


def test_decode_attention_prefetch_default_follows_PREFETCH(rng, monkeypatch):
    """prefetch=None takes the module's PREFETCH when called, not when first compiled: the
    same shapes traced with PREFETCH off and then on take the hand loop the second time."""
    from pallas_kernels.fused_decode import attention as attention_mod

    taken = []
    real = attention_mod.attend_past_prefetched

    def spy(*args, **kw):
        taken.append(True)
        return real(*args, **kw)

    monkeypatch.setattr(attention_mod, "attend_past_prefetched", spy)
    H, K, D, S, rows = 6, 2, 64, 128, 1
    qkv = jnp.asarray(rng.standard_normal((rows, (H + 2 * K) * D)), jnp.float32)
    kc, vc = (jnp.asarray(rng.standard_normal((rows, S, K, D)), jnp.float32) for _ in "kv")
    pos = jnp.asarray([70], jnp.int32)
    outs = []
    for flag in (False, True):
        monkeypatch.setattr(attention_mod, "PREFETCH", flag)
        outs.append(decode_attention(qkv, kc, vc, pos, num_heads=H, num_kv_heads=K,
                                     num_splits=1)[0])
        assert bool(taken) == flag
    assert_close(outs[1], outs[0], "float32")


def test_decode_attention_ignores_slots_past_the_position(rng):
    """Slots at or past a row's position may hold anything (a stale or unwritten cache): NaN
    there must not reach the output (the blocks over them are read masked)."""
    H, K, D, S, rows = 6, 2, 64, 256, 3
    qkv = jnp.asarray(rng.standard_normal((rows, (H + 2 * K) * D)), jnp.float32)
    kc, vc = (jnp.asarray(rng.standard_normal((rows, S, K, D)), jnp.float32) for _ in "kv")
    positions = jnp.asarray([130, 1, 64], jnp.int32)
    stale = (jnp.arange(S)[None, :] >= positions[:, None])[:, :, None, None]  # [B, S, 1, 1]
    want = ref.decode_attention_reference(qkv, kc, vc, positions, num_heads=H,
                                          num_kv_heads=K)[0]
    kc, vc = (jnp.where(stale, jnp.nan, c) for c in (kc, vc))
    parts, lse, _, _ = decode_attention(qkv, kc, vc, positions, num_heads=H, num_kv_heads=K,
                                        num_splits=2)
    assert_close(ref.merge_splits(parts, lse), want, "float32")


def test_decode_attention_single_split_in_the_model_dtype(rng):
    """One split's output stored in bf16 is the f32 partial rounded once (what the general
    path's convert made of it); split partials that a merge reads must stay f32."""
    H, K, D, S = 6, 2, 64, 256
    qkv = jnp.asarray(rng.standard_normal((2, (H + 2 * K) * D)), jnp.bfloat16)
    kc, vc = (jnp.asarray(rng.standard_normal((2, S, K, D)), jnp.bfloat16) for _ in "kv")
    pos = jnp.asarray([130, 7], jnp.int32)
    kw = {"num_heads": H, "num_kv_heads": K, "num_splits": 1}
    f32_parts = decode_attention(qkv, kc, vc, pos, **kw)[0]
    bf16_parts = decode_attention(qkv, kc, vc, pos, **kw, parts_dtype="bfloat16")[0]
    assert bf16_parts.dtype == jnp.bfloat16
    chex.assert_trees_all_equal(bf16_parts, f32_parts.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match="stay f32"):
        decode_attention(qkv, kc, vc, pos, num_heads=H, num_kv_heads=K, num_splits=2,
                         parts_dtype="bfloat16")


def _rotated_qkv(qkv, positions, num_heads: int, num_kv_heads: int):
    """(qkv [B, H + 2K, D] with its queries and keys rotated by `layers.apply_rope` at each
    row's position [B], and the rows' `rope_table`), for the kernels that rotate them."""
    from helpers import rope_at

    from jdecode.model.layers import apply_rope
    from pallas_kernels.fused_decode.attention import rope_table

    H, K, D = num_heads, num_kv_heads, qkv.shape[-1]
    cos, sin = (x[:, 0] for x in rope_at(positions[:, None], D))  # [B, D/2] each
    q, k = (apply_rope(x[:, None], cos[:, None], sin[:, None])[:, 0]
            for x in (qkv[:, :H], qkv[:, H:H + K]))
    return jnp.concatenate([q, k, qkv[:, H + K:]], axis=1), rope_table(cos, sin)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_attention_rotates_q_and_k_itself(rng, dtype):
    """With a rope table the kernel takes q and k before RoPE and rotates them as
    `layers.apply_rope` does (f32, rounded to the model dtype): the output and the stored key
    are those of the same call on rotated input. GQA groups of 3 (SmolLM2's) and a stacked
    cache's layer operand, so the swapped-halves load of a padded group is exercised."""
    L, rows, H, K, D, S = 2, 3, 6, 2, 64, 256

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)

    qkv, kc, vc = normal(rows, H + 2 * K, D), normal(L, rows, S, K, D), normal(L, rows, S, K, D)
    positions = jnp.asarray([130, 0, S + 5], jnp.int32)
    rotated, table = _rotated_qkv(qkv, positions, H, K)
    kw = {"num_heads": H, "num_kv_heads": K, "num_splits": 2, "layer": 1}
    want = decode_attention(rotated.reshape(rows, -1), kc, vc, positions, **kw)
    got = decode_attention(qkv.reshape(rows, -1), kc, vc, positions, **kw, rope=table)
    chex.assert_trees_all_equal_shapes_and_dtypes(got, want)
    # f32: the kernel's products may contract differently from XLA's (1 ulp); bf16 rounds.
    for g, w in zip(got, want):
        assert_close(g, w, dtype)
    with pytest.raises(ValueError, match=r"rope \(3, 2, 32\) must be \[B, 2, D\]"):
        decode_attention(qkv.reshape(rows, -1), kc, vc, positions, **kw,
                         rope=table[:, :, :32])


def test_decode_attention_names_bad_shapes():
    qkv, cache = jnp.zeros((1, 10 * 64)), jnp.zeros((1, 256, 2, 64))
    pos = jnp.zeros((1,), jnp.int32)
    with pytest.raises(ValueError, match="H=4 heads"):
        decode_attention(qkv, cache, cache, pos, num_heads=4, num_kv_heads=2)
    with pytest.raises(ValueError, match="block_k=64 divides"):
        decode_attention(qkv, cache[:, :100], cache[:, :100], pos, num_heads=6, num_kv_heads=2)


@pytest.mark.parametrize("dtype,splits,page,prefetch", [
    ("float32", None, 4, False), ("bfloat16", 3, 16, False), ("float32", 2, 128, False),
    ("bfloat16", 3, 16, True), ("float32", 2, 4, True)])
def test_paged_decode_attention_matches_reference(rng, dtype, splits, page, prefetch):
    """Layer 1 of a 2-layer pool, rows with shuffled pages: a context mid-table, the new token
    alone (context 1), a context ending on a block boundary, a padding row (context 0, no
    slot) and a multi-step row past its count (its token already stored: no slot). Pages of 4
    and 16 tokens (several per 64-token block) and of 128 (a block of one page). prefetch: the
    loop pipelined by hand (`attend_prefetched`, reading layer 1's rows of the pool)."""
    H, K, D, W = 6, 2, 64, 256 // page
    L, P = 2, 5 * W

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)

    rows = 5
    qkv = normal(rows, (H + 2 * K) * D)
    kp, vp = normal(L, P, page, K, D), normal(L, P, page, K, D)
    tables = jnp.asarray(rng.permutation(P)[:rows * W].reshape(rows, W), jnp.int32)
    ctx = jnp.asarray([131, 1, 65, 0, 200], jnp.int32)
    pos = jnp.maximum(ctx - 1, 0)
    slots = tables[jnp.arange(rows), pos // page] * page + pos % page
    slots = jnp.where(jnp.asarray([True, True, True, False, False]), slots, -1)
    parts, lse, k_out, v_out = paged_decode_attention(
        qkv, kp, vp, 1, ctx, slots, tables, num_heads=H, num_kv_heads=K, num_splits=splits,
        prefetch=prefetch)
    want, k_want, v_want = ref.paged_decode_attention_reference(
        qkv, kp, vp, 1, ctx, slots, tables, num_heads=H, num_kv_heads=K)
    ns = splits or default_splits(W * page, rows, block_k=paged_block_k(page))
    chex.assert_shape(parts, (rows, ns, H * D))
    assert_close(ref.merge_splits(parts, lse), want, dtype)
    chex.assert_trees_all_equal((k_out, v_out), (k_want, v_want))  # the stores are copies
    assert not jnp.array_equal(k_out, kp)  # three rows stored their token
    chex.assert_trees_all_equal(k_out[0], kp[0])  # another layer's pages are untouched


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_paged_decode_attention_rotates_q_and_k_itself(rng, dtype):
    """With a rope table the paged kernel takes q and k before RoPE and rotates them as
    `layers.apply_rope` does: the output and the stored pages are those of the same call on
    rotated input. GQA groups of 3 (SmolLM2's), layer 1 of 2, a padding row (no slot)."""
    H, K, D, page, W = 6, 2, 64, 16, 8
    L, P, rows = 2, 4 * W, 3

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)

    qkv = normal(rows, H + 2 * K, D)
    kp, vp = normal(L, P, page, K, D), normal(L, P, page, K, D)
    tables = jnp.asarray(rng.permutation(P)[:rows * W].reshape(rows, W), jnp.int32)
    ctx = jnp.asarray([77, 1, 0], jnp.int32)
    pos = jnp.maximum(ctx - 1, 0)
    slots = tables[jnp.arange(rows), pos // page] * page + pos % page
    slots = jnp.where(ctx > 0, slots, -1)
    rotated, table = _rotated_qkv(qkv, pos, H, K)
    kw = {"num_heads": H, "num_kv_heads": K, "num_splits": 2}
    want = paged_decode_attention(rotated.reshape(rows, -1), kp, vp, 1, ctx, slots, tables,
                                  **kw)
    got = paged_decode_attention(qkv.reshape(rows, -1), kp, vp, 1, ctx, slots, tables,
                                 table, **kw)
    chex.assert_trees_all_equal_shapes_and_dtypes(got, want)
    # f32: the kernel's products may contract differently from XLA's (1 ulp); bf16 rounds.
    for g, w in zip(got, want):
        assert_close(g, w, dtype)
    assert not jnp.array_equal(got[2], kp)  # two rows stored their rotated key
    with pytest.raises(ValueError, match=r"rope \(3, 2, 32\) must be \[B, 2, D\]"):
        paged_decode_attention(qkv.reshape(rows, -1), kp, vp, 1, ctx, slots, tables,
                               table[:, :, :32], **kw)


def test_paged_decode_attention_names_bad_shapes():
    qkv, pool = jnp.zeros((2, 10 * 64)), jnp.zeros((1, 8, 16, 2, 64))
    ones, tables = jnp.ones((2,), jnp.int32), jnp.zeros((2, 4), jnp.int32)
    kw = {"num_heads": 6, "num_kv_heads": 2}
    with pytest.raises(ValueError, match="H=4 heads"):
        paged_decode_attention(qkv, pool, pool, 0, ones, ones, tables, num_heads=4,
                               num_kv_heads=2)
    with pytest.raises(ValueError, match="one per row of qkv"):
        paged_decode_attention(qkv, pool, pool, 0, ones, ones, tables[:1], **kw)
    with pytest.raises(ValueError, match="page size 12"):
        paged_decode_attention(qkv, pool[:, :, :12], pool[:, :, :12], 0, ones, ones, tables,
                               **kw)


# (rows, tokens, splits, dtype, kind): a chain of 4 at batch 2 (a row at position 0: the
# block alone), a tree, and a clamped draft window (slot 0 written three times) past a query
# tile (24 tokens x 3 heads: two tiles of 64), and a slot past the buffer.
BLOCK_CASES = [(2, 4, 3, "float32", "chain"), (1, 5, None, "bfloat16", "tree"),
               (1, 24, 2, "bfloat16", "window")]


@pytest.mark.parametrize("rows,tokens,splits,dtype,kind", BLOCK_CASES,
                         ids=[c[-1] for c in BLOCK_CASES])
def test_block_attention_matches_reference(rng, rows, tokens, splits, dtype, kind):
    H, K, D, S = 6, 2, 64, 256

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)

    qkv = normal(rows * tokens, (H + 2 * K) * D)
    kc, vc = normal(rows, S, K, D), normal(rows, S, K, D)
    first = jnp.asarray({"chain": [130, 0], "tree": [S - 3], "window": [0]}[kind],
                        jnp.int32)  # [B]: each row's first slot
    slots = first[:, None] + jnp.arange(tokens, dtype=jnp.int32)  # [B, T]
    mask = None
    if kind == "tree":  # node i's parent (i - 1) // 2: a binary tree; nodes 3, 4 past S
        parents = jnp.asarray([[-1, 0, 0, 1, 1]], jnp.int32)
        mask = tree_from_parents(parents, 2).ancestors
    if kind == "window":
        slots = jnp.maximum(slots - 2, 0)  # [[0, 0, 0, 1, ...]]
    vis = block_visibility(slots, mask)
    past = jnp.min(slots, axis=1)
    parts, lse, k_out, v_out = block_attention(qkv, kc, vc, slots, past, vis, num_heads=H,
                                               num_kv_heads=K, num_splits=splits)
    want, k_want, v_want = ref.block_attention_reference(qkv, kc, vc, slots, past, vis,
                                                         num_heads=H, num_kv_heads=K)
    ns = splits or default_splits(S, rows * tokens)
    chex.assert_shape(parts, (rows * tokens, ns, H * D))
    chex.assert_shape(lse, (rows * tokens, ns, H))
    assert_close(ref.merge_splits(parts, lse), want, dtype)
    chex.assert_trees_all_equal((k_out, v_out), (k_want, v_want))  # the write is a copy


def test_attention_kernels_on_a_stacked_cache_read_and_write_their_layer_only(rng):
    """`layer` indexes an [L, B, S, K, D] cache: the same outputs as the call on that layer's
    buffer alone, that layer written as that call writes it, the others as they were."""
    H, K, D, S, L, layer, rows = 6, 2, 64, 256, 3, 1, 2
    qkv = jnp.asarray(rng.standard_normal((rows * 2, (H + 2 * K) * D)), jnp.float32)
    kc, vc = (jnp.asarray(rng.standard_normal((L, rows, S, K, D)), jnp.float32) for _ in "kv")
    slots = jnp.asarray([[130, 131], [64, 65]], jnp.int32)
    vis = block_visibility(slots, None)
    calls = {
        "decode": lambda k, v, **kw: decode_attention(
            qkv[:rows], k, v, slots[:, 0], num_heads=H, num_kv_heads=K, num_splits=2, **kw),
        "block": lambda k, v, **kw: block_attention(
            qkv, k, v, slots, slots[:, 0], vis, num_heads=H, num_kv_heads=K, num_splits=2,
            **kw)}
    for name, call in calls.items():
        *out, k_one, v_one = call(kc[layer], vc[layer])
        *got, k_all, v_all = call(kc, vc, layer=layer)
        chex.assert_trees_all_equal(got, out)
        chex.assert_trees_all_equal((k_all, v_all), (kc.at[layer].set(k_one),
                                                     vc.at[layer].set(v_one)))
        assert not jnp.array_equal(k_one, kc[layer]), name  # the call wrote its slots
    with pytest.raises(ValueError, match="0 <= layer < L"):
        decode_attention(qkv[:rows], kc, vc, slots[:, 0], num_heads=H, num_kv_heads=K,
                         layer=L)


def test_block_visibility_is_what_the_cache_would_show():
    """Causal by slot, a tree's mask on top, and of tokens sharing a slot only the last."""
    slots = jnp.asarray([[0, 0, 1], [4, 5, 6]], jnp.int32)
    vis = block_visibility(slots, None)
    np.testing.assert_array_equal(vis[0], [[0, 1, 0], [0, 1, 0], [0, 1, 1]])
    np.testing.assert_array_equal(vis[1], np.tril(np.ones((3, 3))))
    tree = jnp.asarray([[[1, 0, 0], [1, 1, 0], [1, 0, 1]]] * 2, bool)  # node 2's parent is 0
    np.testing.assert_array_equal(block_visibility(slots, tree)[1], tree[0])


def test_only_the_last_writer_of_a_slot_stores():
    """Repeated slots (a clamped draft window) keep the last writer's K/V, whatever order a
    backend's scatter applies repeated indices in: the general path writes only the last
    writers (the CPU's scatter keeps the last anyway, so the check on the written indices is
    what this can see here; the compiled window cases check the kernel on the card)."""
    slots = jnp.asarray([[0, 0, 0, 1], [3, 5, 3, 7]], jnp.int32)
    np.testing.assert_array_equal(ref.last_writers(slots), [[0, 0, 1, 1], [0, 1, 1, 1]])
    cache = init_cache(_fusable_tiny(), 2, 64, per_layer=True)
    k = jnp.arange(2 * 4, dtype=jnp.float32).reshape(2, 4, 1, 1)
    k = jnp.broadcast_to(k, (2, 4) + cache.k[0].shape[2:]).astype(cache.k[0].dtype)
    q = jnp.zeros((2, 4, 2 * k.shape[2], k.shape[3]), k.dtype)
    _, new = dense_attend(q, k, k, cache, 0, DenseMeta(positions=slots))
    for b, want in ((0, {0: 2, 1: 3}), (1, {3: 2, 5: 1, 7: 3})):  # slot: its last writer
        for slot, token in want.items():
            assert float(new.k[0][b, slot, 0, 0]) == float(k[b, token, 0, 0]), (b, slot)


def test_block_attention_names_bad_shapes():
    qkv, cache = jnp.zeros((4, 10 * 64)), jnp.zeros((1, 256, 2, 64))
    slots, past = jnp.zeros((1, 4), jnp.int32), jnp.zeros((1,), jnp.int32)
    vis = jnp.ones((1, 4, 4), bool)
    with pytest.raises(ValueError, match="H=6 and the cache's K=2"):
        block_attention(qkv[:3], cache, cache, slots, past, vis, num_heads=6, num_kv_heads=2)
    with pytest.raises(ValueError, match="vis"):
        block_attention(qkv, cache, cache, slots, past, vis[:, :3], num_heads=6,
                        num_kv_heads=2)
    big = jnp.zeros((2, 40), jnp.int32)  # 80 tokens in all
    with pytest.raises(ValueError, match="exceed the fused step's 64 rows"):
        block_attention(jnp.zeros((80, 640)), jnp.zeros((2, 256, 2, 64)),
                        jnp.zeros((2, 256, 2, 64)), big, big[:, 0], jnp.ones((2, 40, 40), bool),
                        num_heads=6, num_kv_heads=2)


def test_fused_gemvs_name_what_does_not_tile(rng):
    a = _inputs(rng, "float32", 65)
    with pytest.raises(ValueError, match="65 rows"):
        gemv_residual(a["a"], a["wo"], a["x"])
    a = _inputs(rng, "float32", 1)
    with pytest.raises(ValueError, match="block_n=128"):  # E is 192
        gemv_residual(a["a"], a["wo"], a["x"], tiles=GemvTiles(block_n=128))
    with pytest.raises(ValueError, match="block_k=48"):
        gemv_residual(a["a"], a["wo"], a["x"], tiles=GemvTiles(block_k=48))
    with pytest.raises(ValueError, match="transposed=True"):
        gemv_residual(a["a"], a["wo"], a["x"], tiles=GemvTiles(block_n=8, fma=True))


def test_default_tiles_by_size_and_rows():
    """One row over a large matrix takes the narrow, long-K tiles; SmolLM2's sizes keep the
    4-column, 8-warp ones (the H200 sweep behind LARGE_GEMV), and so do steps of 2 rows;
    steps of MULTI_ROW_MIN..FMA_MAX_ROWS rows take MULTI_ROW_TILES (stop 55's sweep at 5 rows,
    stop 56's verify steps), the O projection's included."""
    large = default_tiles(2048, 1, True, LARGE_GEMV // 2048)
    assert (large.block_n, large.block_k, large.num_warps, large.fma) == (2, 2048, 4, True)
    assert default_tiles(8192, 1, True, 2048).unroll  # 4 steps of 2048
    for k, rows, n in ((576, 1, 3072), (2047, 1, 2048), (576, 2, 3072), (2048, 2, 16384)):
        few = default_tiles(k, rows, True, n)
        assert few.fma and (few.block_n, few.num_warps) == (4, 8), (k, rows, n)
    assert MULTI_ROW_MIN == 3 and MULTI_ROW_TILES != (4, 8)
    for k, rows, n, large_ in ((576, 3, 3072, True), (2048, FMA_MAX_ROWS, 16384, True),
                               (576, MULTI_ROW_MIN, 576, False)):
        multi = default_tiles(k, rows, True, n, large=large_)
        assert multi.fma and (multi.block_n, multi.num_warps) == MULTI_ROW_TILES, (k, rows, n)
    assert default_tiles(2048, 1, True, 2048, large=False).block_n == 4  # the O projection's
    assert not default_tiles(576, FMA_MAX_ROWS + 1, True, 3072).fma  # tensor cores past them


def _steps(params, cfg, impl, prompt, lengths, next_tokens, cache=None):
    """Prefill, then one decode step per column of next_tokens [B, N]: [N, B, V] logits."""
    if cache is None:
        cache = init_cache(cfg, prompt.shape[0], 256,
                           per_layer=isinstance(params.layers, tuple))
    prefill = jit_for_tests(partial(phases.prefill, cfg=cfg, impl="xla"))
    decode = jit_for_tests(partial(phases.decode_step, cfg=cfg, impl=impl))
    _, _, cache = prefill(params, cache, prompt, lengths)
    out, pos = [], lengths
    for i in range(next_tokens.shape[1]):
        logits, _, cache = decode(params, cache, next_tokens[:, i], pos)
        out.append(logits)
        pos = pos + 1
    return jnp.stack(out), cache


# Each dtype meets each row count and each weight layout once (the full product repeated
# the same kernels at ~10 s a case in CI).
@pytest.mark.parametrize("dtype,rows,copies,stacked", [
    ("float32", 1, False, False), ("bfloat16", 40, False, False), ("float32", 3, True, False),
    ("bfloat16", 1, True, False), ("float32", 2, True, True)])
def test_fused_step_matches_xla_step(rng, dtype, rows, copies, stacked, fused_on):
    """copies: the [N, K] weight copies, with which up to 4 rows take the CUDA-core GEMVs.
    stacked: the cache a decoder builds for the fused step (`phases.decode_cache`), one
    [L, ...] buffer per K and V, which each layer's attention kernel indexes."""
    cfg = _fusable_tiny().replace(dtype=dtype)
    params = inference_layout(init_params(cfg, jax.random.key(int(rng.integers(1 << 30)))))
    cache = (phases.decode_cache(params, cfg, rows, 256, "pallas") if stacked
             else init_cache(cfg, rows, 256, per_layer=True))
    assert cache.per_layer != stacked
    assert fused_decode_reason(params, cache, cfg, rows) is None
    prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, (rows, 32)), jnp.int32)
    lengths = jnp.asarray(rng.integers(1, 33, rows), jnp.int32)
    nxt = jnp.asarray(rng.integers(0, cfg.vocab_size, (rows, 3)), jnp.int32)
    fused = with_decode_copies(params) if copies else params
    if copies:
        lp = params.layers[0]
        chex.assert_trees_all_equal(tuple(w.T for w in fused.decode_t[0]),
                                    (lp.wqkv, lp.wo, lp.w_gate_up, lp.w_down))
    got, got_cache = _steps(fused, cfg, "pallas", prompt, lengths, nxt, cache)
    want, want_cache = _steps(params, cfg, "xla", prompt, lengths, nxt)
    # Logits sum over the hidden size of values within tolerance (as test_pallas_integration).
    assert_close(got, want, dtype, scale=4.0)
    # Past layer 0 the K/V come from activations that both paths round to bf16 after sums in
    # different orders; over 40 rows x 3 steps one element in a million lands ~1.2x past the
    # table's bf16 tolerance (seen once), hence 2x for the caches as for the logits' 4x.
    assert got_cache.per_layer != stacked  # the step kept the layout it was given
    assert_close(jnp.stack(got_cache.k), jnp.stack(want_cache.k), dtype, scale=2.0)
    assert_close(jnp.stack(got_cache.v), jnp.stack(want_cache.v), dtype, scale=2.0)


# (dtype, rows, tokens, kind, copies): each kind of step once, each dtype and weight layout.
VERIFY_CASES = [("float32", 2, 4, "chain", True), ("bfloat16", 1, 5, "tree", False),
                ("float32", 2, 4, "window", False)]


@pytest.mark.parametrize("dtype,rows,tokens,kind,copies", VERIFY_CASES,
                         ids=[c[3] for c in VERIFY_CASES])
def test_fused_verify_step_matches_xla_verify(rng, dtype, rows, tokens, kind, copies,
                                              fused_on, monkeypatch):
    """`phases.verify` / `verify_tree` with impl="pallas" and the switch on run the fused
    verify step; logits, hidden states, cache and the carry of hooks that collect each
    layer's output (EAGLE's feature taps) equal the general path's. "window" is the n-gram
    drafter's window near the start of a sequence (positions clamped to 0, so slot 0 is
    written several times)."""
    cfg = _fusable_tiny().replace(dtype=dtype)
    params = inference_layout(init_params(cfg, jax.random.key(int(rng.integers(1 << 30)))))
    fused = with_decode_copies(params) if copies else params
    cache = init_cache(cfg, rows, 256, per_layer=True)
    assert fused_decode_reason(fused, cache, cfg, rows * tokens, tokens=tokens) is None
    prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, (rows, 32)), jnp.int32)
    lengths = jnp.asarray([20, 7][:rows], jnp.int32)
    if kind != "window":
        _, _, cache = jit_for_tests(partial(phases.prefill, cfg=cfg, impl="xla"))(
            params, cache, prompt, lengths)
    toks = jnp.asarray(rng.integers(0, cfg.vocab_size, (rows, tokens)), jnp.int32)

    hooks = collect_hidden((-1, 1, 0))  # the embedding and both layers' outputs

    def step(p, impl):
        if kind == "tree":
            tree = tree_from_parents(jnp.asarray([[-1, 0, 0, 1, 2]], jnp.int32), 3)
            fn = partial(phases.verify_tree, tree=tree, cfg=cfg, impl=impl, hooks=hooks)
            return jit_for_tests(fn)(p, cache, toks, lengths)
        pos = lengths[:, None] + jnp.arange(tokens)
        if kind == "window":
            pos = jnp.maximum(pos - 20, 0)  # [[0, 1, 2, 3], [0, 0, 0, 0]]
        fn = partial(phases.verify, cfg=cfg, impl=impl, hooks=hooks)
        return jit_for_tests(fn)(p, cache, toks, pos)

    calls = spy_fused_verify(monkeypatch)
    got = step(fused, "pallas")
    want = step(params, "xla")
    assert calls, "the verify step did not take the fused kernels"
    chex.assert_trees_all_equal_shapes_and_dtypes(got[:2], want[:2])
    assert_close(got[0], want[0], dtype, scale=4.0)
    assert_close(got[1], want[1], dtype, scale=4.0)
    assert_close(jnp.stack(got[2].k), jnp.stack(want[2].k), dtype, scale=2.0)
    assert_close(jnp.stack(got[2].v), jnp.stack(want[2].v), dtype, scale=2.0)
    chex.assert_trees_all_equal_shapes_and_dtypes(got[3], want[3])
    assert_close(got[3], want[3], dtype, scale=2.0)


@pytest.mark.parametrize("dtype,rows", [("bfloat16", 1)])
def test_layer_kernel_step_matches_xla_step(rng, dtype, rows, monkeypatch):
    """JDECODE_FUSED_DECODE=layer: each layer as one persistent kernel, over the copies."""
    monkeypatch.setenv(ENV_SWITCH, "layer")
    cfg = _fusable_tiny().replace(dtype=dtype)
    params = inference_layout(init_params(cfg, jax.random.key(int(rng.integers(1 << 30)))))
    cache = init_cache(cfg, rows, 256, per_layer=True)
    assert "with_decode_copies" in fused_decode_reason(params, cache, cfg, rows)
    fused = with_decode_copies(params)
    assert fused_decode_reason(fused, cache, cfg, rows) is None
    prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, (rows, 32)), jnp.int32)
    lengths = jnp.asarray(rng.integers(1, 33, rows), jnp.int32)
    nxt = jnp.asarray(rng.integers(0, cfg.vocab_size, (rows, 2)), jnp.int32)
    got, got_cache = _steps(fused, cfg, "pallas", prompt, lengths, nxt)
    want, want_cache = _steps(params, cfg, "xla", prompt, lengths, nxt)
    assert_close(got, want, dtype, scale=4.0)
    assert_close(jnp.stack(got_cache.k), jnp.stack(want_cache.k), dtype)


def _fusable_tiny():
    """The tiny test model with 32-wide heads: RoPE's halves are then one 16-column tile."""
    return load_model_config_yaml(TINY).replace(head_dim=32)


def test_a_decoder_stacks_its_cache_where_the_fused_step_takes_it(fused_on):
    """`phases.decode_cache`: [L, ...] K and V where the fused step will run (fewer leaves
    for the loop state), one buffer per layer where the general path runs over unrolled
    params, and the scan layout's stacked cache as ever."""
    cfg = _fusable_tiny()
    params = init_params(cfg, jax.random.key(0))
    fast = inference_layout(params)
    assert not phases.decode_cache(fast, cfg, 2, 256, "pallas").per_layer
    assert phases.decode_cache(fast, cfg, 2, 256, "xla").per_layer
    assert phases.decode_cache(fast, cfg, MAX_ROWS + 1, 256, "pallas").per_layer
    assert phases.decode_cache(fast, cfg, 2, 256, "pallas", track_writes=True).per_layer
    assert not phases.decode_cache(params, cfg, 2, 256, "pallas").per_layer
    # The plain method's decoder takes it; a method's own passes keep per-layer buffers.
    sp = SamplingArrays.from_params([SamplingParams()] * 2, 2, specialize_greedy=True)
    args = (jnp.ones((2, 8), jnp.int32), jnp.full((2,), 8, jnp.int32), sp,
            jax.vmap(jax.random.key)(jnp.zeros((2,), jnp.uint32)))
    fast_model = Model("tiny", cfg, with_decode_copies(fast), None)
    for method, per_layer in (("autoregressive", False), ("speculative", True)):
        built = methods.build(method, fast_model, impl="pallas")
        state = jax.eval_shape(built.decoder_fn(cfg, 256).init, built.model.params, *args)
        (cache,) = [c for c in jax.tree.leaves(state.aux, is_leaf=lambda c: isinstance(
            c, DenseKVCache)) if isinstance(c, DenseKVCache)]
        assert cache.per_layer == per_layer, method


def test_fused_step_declines_what_it_does_not_cover(monkeypatch):
    cfg = _fusable_tiny()
    ready = (inference_layout(init_params(cfg, jax.random.key(0))),
             init_cache(cfg, 1, 256, per_layer=True), cfg, 1)
    monkeypatch.setenv(ENV_SWITCH, "0")
    assert ENV_SWITCH in fused_decode_reason(*ready)  # switched off
    monkeypatch.setenv(ENV_SWITCH, "yes")
    with pytest.raises(ValueError, match="'yes'"):
        fused_decode_reason(*ready)
    # Unset: on only where it measured faster, <= FMA_MAX_ROWS (5) rows over the [N, K]
    # copies, a verify step's batch x tokens rows included.
    monkeypatch.delenv(ENV_SWITCH)
    assert "copies" in fused_decode_reason(*ready)
    copied = with_decode_copies(ready[0])
    assert fused_decode_reason(copied, *ready[1:]) is None
    assert "rows" in fused_decode_reason(copied, init_cache(cfg, 8, 256, per_layer=True), cfg, 8)
    one = init_cache(cfg, 1, 256, per_layer=True)
    assert fused_decode_reason(copied, one, cfg, FMA_MAX_ROWS, tokens=FMA_MAX_ROWS) is None
    assert "rows" in fused_decode_reason(copied, one, cfg, FMA_MAX_ROWS + 1,
                                         tokens=FMA_MAX_ROWS + 1)
    assert "copies" in fused_decode_reason(ready[0], one, cfg, 4, tokens=4)
    subset = dataclasses.replace(copied, layers=copied.layers[:1])  # stale copies: ignored
    assert "copies" in fused_decode_reason(subset, *ready[1:])
    assert wants_decode_copies(ready[0])  # a tiny model is far under the default size limit
    monkeypatch.setenv(ENV_SWITCH, "1")
    assert fused_decode_reason(*ready) is None
    assert fused_decode_reason(copied, init_cache(cfg, 8, 256, per_layer=True), cfg, 8) is None
    monkeypatch.setenv(ENV_SWITCH, "0")
    assert not wants_decode_copies(ready[0])
    monkeypatch.setenv(ENV_SWITCH, "1")
    params = init_params(cfg, jax.random.key(0))
    fast = inference_layout(params)
    per_layer = init_cache(cfg, 1, 256, per_layer=True)
    assert "inference layout" in fused_decode_reason(params, per_layer, cfg, 1)
    stacked = init_cache(cfg, 1, 256)  # [L, ...]: the five kernels index it by layer
    assert fused_decode_reason(fast, stacked, cfg, 1) is None
    assert "tracks writes" in fused_decode_reason(
        fast, init_cache(cfg, 1, 256, per_layer=True, track_writes=True), cfg, 1)
    assert "rows" in fused_decode_reason(fast, init_cache(cfg, 65, 256, per_layer=True), cfg,
                                         65)
    # f32 past F32_MAX_ROWS rows: the tiles would overflow the card's shared memory.
    assert fast.layers[0].wqkv.dtype == jnp.float32
    wide = init_cache(cfg, 1, 256, per_layer=True)
    assert fused_decode_reason(fast, wide, cfg, F32_MAX_ROWS, tokens=F32_MAX_ROWS) is None
    assert "float32" in fused_decode_reason(fast, wide, cfg, F32_MAX_ROWS + 1,
                                            tokens=F32_MAX_ROWS + 1)
    half = jax.tree.map(lambda a: a.astype(jnp.bfloat16), fast)
    wide16 = init_cache(cfg.replace(dtype="bfloat16"), 1, 256, per_layer=True)
    assert fused_decode_reason(half, wide16, cfg, MAX_ROWS, tokens=MAX_ROWS) is None
    narrow = load_model_config_yaml(TINY)  # 16-wide heads
    assert "head_dim" in fused_decode_reason(
        inference_layout(init_params(narrow, jax.random.key(0))),
        init_cache(narrow, 1, 256, per_layer=True), narrow, 1)
    # Hooks with `before` (per-token control) stay on the general path; `after` alone runs.
    assert "before" in fused_hooks_reason(LayerHooks(before=lambda c, x, layer: None))
    assert fused_hooks_reason(collect_hidden((0,))) is None
    # A verify step (tokens > 1): forced at any rows, by default over the copies at
    # <= FMA_MAX_ROWS rows (above), and not by the layer kernel.
    assert fused_decode_reason(fast, per_layer, cfg, 4, tokens=4) is None
    assert fused_decode_reason(fast, per_layer, cfg, 16, tokens=16) is None
    monkeypatch.setenv(ENV_SWITCH, "layer")
    assert "one-token" in fused_decode_reason(copied, per_layer, cfg, 4, tokens=4)
    assert "per-layer" in fused_decode_reason(copied, stacked, cfg, 1)
    monkeypatch.setenv(ENV_SWITCH, "1")
    windowed = cfg.replace(sliding_window=64)
    assert "sliding" in fused_decode_reason(fast, per_layer, windowed, 1)


def _real_prompts(smol) -> list[list[int]]:
    """The real-model tests' four chat prompts, as token ids."""
    questions = ["What is the capital of France?", "Name three primary colors.",
                 "Write a haiku about the sea.", "What is 12 times 12?"]
    return [smol.tokenizer.encode(smol.tokenizer.apply_chat_template(
        [{"role": "user", "content": q}])) for q in questions]


@pytest.mark.gpu
@pytest.mark.slow
def test_fused_greedy_equals_xla_on_the_real_model_f32(request, fused_on):
    """Acceptance of issue 16: f32 greedy tokens of the fast path equal the XLA path's."""
    if jax.default_backend() != "gpu":
        pytest.skip("needs the GPU")
    smol = request.getfixturevalue("smol")
    from jdecode.decoding.generate import Generator
    from jdecode.decoding.sampling import SamplingParams

    prompts = _real_prompts(smol)
    sp = SamplingParams(max_new_tokens=32)
    fast = Generator(smol, impl="pallas", layout="inference")
    slow = Generator(smol, impl="xla", layout="inference")
    for batch in ([p] for p in prompts):  # batch 1, then all four at once
        assert [r.token_ids for r in fast.generate(batch, sp)] == \
            [r.token_ids for r in slow.generate(batch, sp)]
    assert [r.token_ids for r in fast.generate(prompts, sp)] == \
        [r.token_ids for r in slow.generate(prompts, sp)]


@pytest.mark.gpu
@pytest.mark.slow
def test_cublas_loop_greedy_equals_xla_on_the_real_model_f32(request, monkeypatch):
    """The same acceptance at 64 rows, where the Generator's loop compiles for cuBLAS
    (`compile_options.step_compiler_options`): against the XLA path with XLA's own GEMMs."""
    if jax.default_backend() != "gpu":
        pytest.skip("needs the GPU")
    smol = request.getfixturevalue("smol")
    from jdecode.decoding import generate as generate_mod
    from jdecode.decoding.sampling import SamplingParams
    from jdecode.model import compile_options

    prompts = _real_prompts(smol)
    rows = 16 * prompts  # 64 rows; each prompt at several batch positions
    sp = SamplingParams(max_new_tokens=32)
    assert compile_options.step_compiler_options(len(rows), "gpu"), "64 rows: the cuBLAS loop"
    fast = generate_mod.Generator(smol, impl="pallas", layout="inference").generate(rows, sp)
    monkeypatch.setattr(compile_options, "CUBLAS_MIN_ROWS", None)
    slow = generate_mod.Generator(smol, impl="xla", layout="inference").generate(rows, sp)
    assert [r.token_ids for r in fast] == [r.token_ids for r in slow]


@pytest.mark.parametrize("dtype,rows", [("float32", 3)])
def test_decode_layer_matches_the_five_kernels(rng, dtype, rows):
    """The persistent layer kernel (interpreter: its phases in order, no barriers) against the
    five kernels run one after another, on the same random layer; the cache write too. The
    same arithmetic in one XLA program instead of five may contract differently (1e-7 in f32),
    hence a tolerance, also for the cache (the written K/V are computed)."""
    from pallas_kernels.fused_decode.layer import barrier_timeouts, decode_layer, new_counters

    a = _inputs(rng, dtype, rows)
    H, K, D, S = a["H"], a["K"], a["D"], 256
    E, F = a["x"].shape[1], a["wd"].shape[0]
    mlp_norm = a["norm"][::-1]
    kc = jnp.asarray(rng.standard_normal((rows, S, K, D)), jnp.float32).astype(dtype)
    vc = jnp.asarray(rng.standard_normal((rows, S, K, D)), jnp.float32).astype(dtype)
    positions = jnp.asarray([130, 0, 64][:rows], jnp.int32)
    ns = 2
    w = {"wqkv": a["wqkv"].T, "wo": a["wo"].T, "wgu": a["wgu"].T, "wd": a["wd"].T}

    qkv = qkv_rope(a["x"], a["norm"], w["wqkv"], a["cos"], a["sin"], num_heads=H,
                   num_kv_heads=K, eps=1e-5, transposed=True)
    parts, lse, k_want, v_want = decode_attention(qkv, kc, vc, positions, num_heads=H,
                                                  num_kv_heads=K, num_splits=ns)
    mid = attn_o_residual(parts, lse, w["wo"], a["x"], transposed=True)
    act = gate_up_swiglu(mid, mlp_norm, w["wgu"], eps=1e-5, transposed=True)
    want = gemv_residual(act, w["wd"], mid, transposed=True)

    counters = new_counters(2)
    got, k_got, v_got, counters = jit_for_tests(partial(
        decode_layer, num_heads=H, num_kv_heads=K, eps=1e-5, num_splits=ns))(
        a["x"], positions, a["cos"], a["sin"], kc, vc, counters, 1, a["norm"], w["wqkv"],
        w["wo"], mlp_norm, w["wgu"], w["wd"])
    chex.assert_shape(got, (rows, E))
    assert F == act.shape[1]
    for out, expected in ((got, want), (k_got, k_want), (v_got, v_want)):
        assert_close(out, expected, dtype)
    assert int(barrier_timeouts(counters)) == 0


def test_phase_breakdown_reads_a_layer_kernels_stamps():
    """Two programs' stamps (ns, low 32 bits, one wrapping past 2**32): start, (arrival,
    release) at each of the 4 barriers, end; the breakdown in us, and medians over layers."""
    from pallas_kernels.fused_decode.layer import TRACE_SLOTS, decode_layer, phase_breakdown

    a = [0, 1000, 1500, 2000, 2600, 3000, 3500, 4000, 4500, 6000]
    b = [200, 1200, 1600, 2400, 2700, 3100, 3600, 4200, 4600, 5000]
    trace = np.asarray([a, b], np.int64) + (1 << 32) - 300  # b's stamps wrap
    got = phase_breakdown(trace % (1 << 32))
    assert len(a) == TRACE_SLOTS
    np.testing.assert_allclose(got["work"], [1.0, 0.65, 0.4, 0.55, 0.95])
    np.testing.assert_allclose(got["critical"], [1.2, 0.9, 0.5, 0.7, 1.5])
    np.testing.assert_allclose(got["release"], [0.35, 0.25, 0.45, 0.35])
    np.testing.assert_allclose(got["skew"], [0.1, 0.2, 0.05, 0.1])
    assert got["ramp"] == pytest.approx(0.2) and got["total"] == pytest.approx(6.0)
    layers = phase_breakdown(np.stack([trace, trace]) % (1 << 32))
    assert layers["total"] == pytest.approx(6.0) and layers["work"][0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="the interpreter has none"):
        decode_layer(*[None] * 14, num_heads=4, num_kv_heads=2, eps=1e-5, num_splits=2,
                     trace=True, interpret=True)
