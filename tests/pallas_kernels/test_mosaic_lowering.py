"""Lowers the Hopper (Pallas Mosaic GPU) kernels for CUDA on any machine (no GPU needed).

The interpreter tests (`test_flash_hopper.py`, `test_ragged_hopper.py`) check what the kernels
compute; they do not run Mosaic GPU's lowering, whose checks (layout inference, TMA tiling of
GMEM offsets, wgmma shapes) only ran on the card before. Stop 37's ragged kernel passed the
interpreter and failed there, in layout inference; lowering for CUDA reproduces that failure
on a CPU (under jax 0.11.2; `scripts/deviceless_check.py`). These cases are the benchmarks'
shapes at a smaller batch: every launch configuration the defaults pick at those points.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.deviceless import mosaic_calls
from pallas_kernels.flash_attention import hopper_flash_attention
from pallas_kernels.flash_attention.hopper import mosaic_gpu_available
from pallas_kernels.paged_attention import ragged_paged_attention
from pallas_kernels.testing import lower_for_cuda

pytestmark = pytest.mark.skipif(not mosaic_gpu_available(), reason="no Pallas Mosaic GPU")


# (D, causal, T, S, split_tail): the persistent default at both head sizes, causal and not,
# the non-causal launch whose last round is split (tail_parts > 1), and D64's long-key tile.
FLASH = [
    (128, True, 1024, 1024, None),
    (128, False, 4096, 4096, True),
    (64, True, 2048, 2048, None),
    (64, False, 4096, 4096, None),
]


@pytest.mark.parametrize("d,causal,t,s,split_tail", FLASH)
def test_hopper_flash_lowers_for_cuda(d, causal, t, s, split_tail):
    q = jnp.zeros((1, t, 4, d), jnp.bfloat16)
    kv = jnp.zeros((1, s, 2, d), jnp.bfloat16)
    fn = functools.partial(hopper_flash_attention, causal=causal, interpret=False,
                           split_tail=split_tail)
    assert mosaic_calls(lower_for_cuda(fn, q, kv, kv).as_text()) > 0  # 0: it fell back


# (D, split_decodes): the engine's mixed step (decodes split out to the decode kernel) and
# one launch over decodes and chunks alike.
RAGGED = [(128, "auto"), (64, "auto"), (128, False)]


@pytest.mark.parametrize("d,split_decodes", RAGGED)
def test_hopper_ragged_lowers_for_cuda(d, split_decodes):
    """Six decodes and two chunks of 200 tokens (item starts at rows that are not multiples of
    8: what the TMA tiling of GMEM offsets has to allow), pages of 16, 128-key blocks."""
    q_lens = [1] * 6 + [200] * 2
    qsl = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    lens = jnp.asarray([1000] * 6 + [700] * 2, jnp.int32)
    page, heads, kv_heads = 16, 8, 2
    pool = jnp.zeros((8 * 64, page, kv_heads, d), jnp.bfloat16)
    tables = jnp.zeros((8, 64), jnp.int32)
    q = jnp.zeros((sum(q_lens), heads, d), jnp.bfloat16)
    fn = functools.partial(ragged_paged_attention, block_k=128, interpret=False,
                           backend="mosaic", split_decodes=split_decodes)
    assert mosaic_calls(lower_for_cuda(fn, q, pool, pool, tables, lens, qsl).as_text()) > 0
