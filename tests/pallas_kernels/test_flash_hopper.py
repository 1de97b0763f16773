"""The Hopper (Mosaic GPU) flash kernel vs the f32 reference on random data.

On CPU it runs in the Mosaic GPU interpreter (threads, barriers and TMA copies simulated; the
two matmuls as plain dots, see `hopper.py`). Compiled, it needs a Hopper GPU. Each interpreted
call costs seconds, so the cases are few and small; each mixes the features (GQA, ragged T
and S, q_offset, kv_lens with NaN past them, soft cap, both schedules).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.flash_attention import (
    flash_attention,
    flash_attention_reference,
    hopper_flash_attention,
)
from pallas_kernels.flash_attention.hopper import (
    MIN_SHARE_BLOCKS,
    Tweaks,
    mosaic_gpu_available,
    tail_parts,
)
from pallas_kernels.flash_attention.tuning import flash_backend
from pallas_kernels.testing import assert_close, jit_for_tests

pytestmark = pytest.mark.skipif(not mosaic_gpu_available(), reason="no Pallas Mosaic GPU")

# (group, D, dtype, causal, T, S, soft_cap, pingpong, block_kv, tweaks, (ctas, q_ahead)); 2 kv
# heads each. The interpreter runs every CTA's three warpgroups as threads: group 2 keeps the
# GQA mapping checked at about half the interpreter time of group 4 (43 s here).
# - The first case is the default on Hopper: persistent, 3 CTAs sharing its 8 tiles (2
#   sequences x 4 heads), so the K/V ring runs on across tiles of different lengths and each
#   tile's queries load during the one before (q_ahead); every instruction-order tweak on.
# - The second launches a CTA per tile and overlaps the blocks (each Q K^T issued with the
#   previous block's P V; measured slower, off by default) without ping-pong; its soft cap
#   bypasses fma. The third overlaps them with ping-pong, on a small persistent batch.
# - The fourth is D64's tile for long key ranges (`tuning.LONG_KV_D64`): 256-key blocks, no
#   q_ahead, persistent; its last block is part padding.
# - The fifth splits the last round (`hopper.tail_parts`) with q_ahead: 4 tiles on 3 CTAs, the
#   tail tile's 12 key blocks in 3 shares of 4 (kv_lens are random, so a share may be short,
#   or empty).
DEFAULT_TWEAKS = Tweaks(fma=True, fence=True, early_k=True)
CASES = [
    (2, 64, jnp.bfloat16, True, 100, 300, None, True, 64, DEFAULT_TWEAKS, (3, True)),
    (2, 128, jnp.float16, False, 70, 129, 20.0, False, 64, Tweaks(overlap=True), (0, False)),
    (1, 64, jnp.bfloat16, True, 64, 200, None, True, 64, Tweaks(fma=True, overlap=True),
     (3, True)),
    (1, 64, jnp.bfloat16, False, 100, 600, None, True, 256, DEFAULT_TWEAKS, (3, False)),
    (1, 64, jnp.bfloat16, False, 128, 768, None, True, 64, DEFAULT_TWEAKS, (3, True)),
]


@pytest.fixture
def mode(interpret, fresh_gpu_interpreter):
    if not interpret and "H100" not in jax.devices()[0].device_kind and (
            "H200" not in jax.devices()[0].device_kind):
        pytest.skip("the compiled Mosaic kernel needs a Hopper GPU")
    return interpret


@pytest.mark.parametrize("group,d,dtype,causal,t,s,cap,pingpong,block_kv,tweaks,launch", CASES)
def test_hopper_matches_reference(rng, mode, group, d, dtype, causal, t, s, cap, pingpong,
                                  block_kv, tweaks, launch):
    b, kv = 2, 2
    shapes = [(b, t, group * kv, d), (b, s, kv, d), (b, s, kv, d)]
    q, k, v = (jnp.asarray(rng.standard_normal(x), dtype) for x in shapes)
    q_offset = jnp.asarray(rng.integers(0, s - t + 1, b), jnp.int32)
    kv_lens = jnp.asarray(rng.integers(1, s + 1, b), jnp.int32)
    stale = (jnp.arange(s)[None, :] >= kv_lens[:, None])[:, :, None, None]
    k, v = (jnp.where(stale, jnp.nan, x).astype(dtype) for x in (k, v))
    out = hopper_flash_attention(q, k, v, q_offset, kv_lens, causal=causal, soft_cap=cap,
                                 interpret=mode, block_kv=block_kv, pingpong=pingpong,
                                 tweaks=tweaks, ctas=launch[0], q_ahead=launch[1])
    # One executable: run op by op, the reference compiled each of its ops on CPU (slower).
    ref = jit_for_tests(partial(flash_attention_reference, causal=causal, soft_cap=cap))(
        q, k, v, q_offset=q_offset, kv_lens=kv_lens)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, ref, dtype)


def test_tail_parts():
    # Issue 17's long non-causal D128 points: 4096 tiles on 132 CTAs leave 4 in the last round.
    assert tail_parts(4096, 132, 32) == 32 // MIN_SHARE_BLOCKS  # shares of >= 4 blocks
    assert tail_parts(4096, 132, 256) == 33
    assert tail_parts(2048, 132, 32) == 1  # 68 left over: more than half a round
    assert tail_parts(100, 132, 32) == 1  # one partial round, nothing to split into
    assert tail_parts(264, 132, 32) == 1  # no tail


def test_hopper_empty_sequence_gives_zeros(mode):
    """kv_len 0 (a padded batch slot) gives 0, not NaN, as the Triton kernel does."""
    q = jnp.ones((2, 8, 2, 64), jnp.bfloat16)
    k = jnp.full((2, 64, 1, 64), jnp.nan, jnp.bfloat16)
    kv_lens = jnp.asarray([0, 64], jnp.int32)
    k = k.at[1].set(1.0)
    out = hopper_flash_attention(q, k, k, None, kv_lens, causal=False, interpret=mode)
    assert bool(jnp.all(out[0] == 0)) and bool(jnp.all(out[1] == 1))


def test_backend_choice_and_errors():
    q = jnp.zeros((1, 256, 4, 64), jnp.float32)
    with pytest.raises(ValueError, match="backend='triton'"):
        flash_attention(q, q, q, backend="mosaic")
    with pytest.raises(ValueError, match="expected 'auto'"):
        flash_attention(q, q, q, backend="cuda")
    # Off Hopper, and for short query blocks, auto keeps the Triton kernel.
    assert flash_backend(64, 4096, jnp.bfloat16, kind="NVIDIA A100-SXM4-80GB") == "triton"
    assert flash_backend(64, 16, jnp.bfloat16, kind="NVIDIA H200") == "triton"
    assert flash_backend(128, 4096, jnp.bfloat16, kind="NVIDIA H200") == "mosaic"
