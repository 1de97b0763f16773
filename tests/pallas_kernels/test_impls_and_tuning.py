"""The non-Pallas paths (impl="xla") against the spec, and the tuning tables' lookups."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash_attention import flash_attention, flash_attention_reference
from pallas_kernels.flash_attention.tuning import FlashConfig, flash_config
from pallas_kernels.paged_attention import (
    paged_attention,
    ragged_paged_attention_reference,
    ragged_paged_attention_xla,
)
from pallas_kernels.paged_attention.reference import paged_attention_reference
from pallas_kernels.paged_attention.tuning import decode_num_splits, paged_config
from pallas_kernels.testing import assert_close, jit_for_tests


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_flash_xla_impl_matches_reference(rng, dtype):
    q = jnp.asarray(rng.standard_normal((2, 12, 8, 64)), dtype)
    k, v = (jnp.asarray(rng.standard_normal((2, 30, 2, 64)), dtype) for _ in range(2))
    q_offset = jnp.asarray(rng.integers(0, 19, 2), jnp.int32)
    kv_lens = jnp.asarray(rng.integers(1, 31, 2), jnp.int32)

    def both(q, k, v, q_offset, kv_lens):
        kw = {"q_offset": q_offset, "kv_lens": kv_lens, "soft_cap": 4.0}
        return flash_attention(q, k, v, impl="xla", **kw), flash_attention_reference(q, k, v, **kw)

    out, ref = jit_for_tests(both)(q, k, v, q_offset, kv_lens)
    assert_close(out, ref, dtype)


def test_paged_xla_impl_matches_reference(rng):
    k_pages, v_pages = (
        jnp.asarray(rng.standard_normal((12, 16, 2, 64)), jnp.bfloat16) for _ in "kv"
    )
    tables = jnp.asarray(rng.permutation(12)[:9].reshape(3, 3), jnp.int32)
    q = jnp.asarray(rng.standard_normal((3, 8, 64)), jnp.bfloat16)
    ctx = jnp.asarray([1, 17, 48], jnp.int32)

    def both(*args):
        return paged_attention(*args, impl="xla"), paged_attention_reference(*args)

    out, ref = jit_for_tests(both)(q, k_pages, v_pages, tables, ctx)
    assert_close(out, ref, jnp.bfloat16)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_ragged_xla_impl_matches_reference(rng, dtype):
    """Chunked rows (5 per chunk, so chunks straddle sequences) vs the one-shot reference."""
    page, q_lens, lens = 16, [1, 7, 0, 3, 1], [9, 23, 4, 16, 40]
    qsl = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    k_pages, v_pages = (jnp.asarray(rng.standard_normal((16, page, 2, 64)), dtype) for _ in "kv")
    tables = jnp.asarray(rng.permutation(16)[:15].reshape(5, 3), jnp.int32)
    q = jnp.asarray(rng.standard_normal((sum(q_lens) + 2, 8, 64)), dtype)
    args = (q, k_pages, v_pages, tables, jnp.asarray(lens, jnp.int32), qsl)

    def both(*args):
        fast = ragged_paged_attention_xla(*args, rows_per_chunk=5)
        return fast, ragged_paged_attention_reference(*args)

    out, ref = jit_for_tests(both)(*args)
    assert not jnp.any(out[sum(q_lens) :])
    assert_close(out, ref, dtype)


def test_unknown_impl_is_rejected():
    x = jnp.zeros((1, 4, 2, 64))
    with pytest.raises(ValueError, match="impl='triton'"):
        flash_attention(x, x, x, impl="triton")


def test_tuning_tables():
    assert flash_config(128, jnp.bfloat16, "NVIDIA H100 80GB HBM3") == FlashConfig(128, 128, 8, 3)
    assert flash_config(128, np.float32, "cpu").block_q <= 64
    hopper = paged_config(16, 128, jnp.bfloat16, "NVIDIA H200")
    assert hopper.block_k % 16 == 0 and hopper.num_splits == 0
    assert paged_config(64, 128, jnp.bfloat16, "cpu").block_k == 64
    # f32 at D <= 64 on Hopper: 64-token blocks and a grid of about 4 programs an SM (2 splits
    # for SmolLM2's 64 rows x 3 KV heads, where bf16 takes 1); bf16 and f32 D128 keep theirs.
    f32 = paged_config(16, 64, jnp.float32, "NVIDIA H100 80GB HBM3")
    bf16 = paged_config(16, 64, jnp.bfloat16, "NVIDIA H100 80GB HBM3")
    assert (f32.block_k, f32.programs_per_sm, bf16.block_k, bf16.programs_per_sm) == (64, 4,
                                                                                       128, 2)
    assert paged_config(16, 128, jnp.float32, "NVIDIA H200") == hopper
    if (getattr(jax.devices()[0], "core_count", None) or 132) == 132:
        assert (decode_num_splits(64, 3, 32, f32), decode_num_splits(64, 3, 16, bf16)) == (2, 1)
    # Grid-size heuristic: few sequences get many splits, a full grid gets few, never more
    # than half the blocks.
    many = decode_num_splits(1, 8, 256, hopper)
    few = decode_num_splits(32, 8, 256, hopper)
    assert many > few >= 1 and decode_num_splits(1, 8, 4, hopper) <= 2
    # Powers of 2 only (the H200 grid: 5 splits at B8 ran at 3.13 TB/s, 4 at 3.81), and the
    # grid kept near two programs per SM of the device (132 when it does not say).
    sms = getattr(jax.devices()[0], "core_count", None) or 132
    for batch in (1, 2, 3, 8, 13, 32, 64):
        n = decode_num_splits(batch, 8, 1024, hopper)
        assert n & (n - 1) == 0, (batch, n)
        assert batch * 8 * n <= max(2 * sms, batch * 8) < batch * 8 * 2 * n or n == 64
