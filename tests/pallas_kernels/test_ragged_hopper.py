"""The Hopper (Mosaic GPU) ragged kernel vs the f32 reference on random paged data.

On CPU it runs in the Mosaic GPU interpreter, whose cost grows with the CTAs (items x kv
heads), so the batches are small: a decode, a chunk over a cached prefix that ends inside a
page, and an idle sequence. Pages no sequence owns are NaN (stale pages): the kernel must not
read them. The two cases cover a ring slot filled by several page copies (page < block_kv) and
a slot cut from inside one page (page >= block_kv). With split_decodes="auto" the decode joins
the chunk's launch in the first, and in the second its context is past unified_max_context and
it goes to the split-K decode kernel. The second again with "short" (the caller's word that no
decode is that long, here broken): one launch serves every row and must still be right.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash_attention.hopper import mosaic_gpu_available
from pallas_kernels.paged_attention import ragged_paged_attention, ragged_paged_attention_reference
from pallas_kernels.paged_attention.tuning import ragged_backend
from pallas_kernels.testing import assert_close, jit_for_tests

pytestmark = pytest.mark.skipif(not mosaic_gpu_available(), reason="no Pallas Mosaic GPU")

# (page, block_kv, group, kv heads, unified_max_context, split_decodes)
CASES = [(16, 32, 2, 2, 4096, "auto"), (64, 32, 4, 1, 1, "auto"), (64, 32, 4, 1, 1, "short"),
         # 3 query heads per kv head (SmolLM2's 9/3), padded to 4: the padded head's rows are
         # loaded (a copy of the last head's) and never stored.
         (16, 32, 3, 1, 4096, "short")]


@pytest.fixture
def mode(interpret, fresh_gpu_interpreter):
    kind = jax.devices()[0].device_kind
    if not interpret and "H100" not in kind and "H200" not in kind:
        pytest.skip("the compiled Mosaic kernel needs a Hopper GPU")
    return interpret


@pytest.mark.parametrize("page,block_kv,group,kv_heads,unified_max_context,split_decodes",
                         CASES)
def test_hopper_ragged_matches_reference(rng, mode, page, block_kv, group, kv_heads,
                                         unified_max_context, split_decodes):
    d, dtype = 64, jnp.bfloat16
    if not mode:  # compiled: the P V wgmma takes block_kv in multiples of 64
        page, block_kv = 2 * page, 2 * block_kv
    # (q_len, context incl. this step's tokens): a decode one past a page boundary, a chunk
    # of page + 3 over a cached prefix of page tokens, an idle sequence; then 2 padding rows.
    q_lens, lens = (1, page + 3, 0), (page + 1, 2 * page + 3, 7)
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    n = int(qsl[-1]) + 2
    max_pages = 4 if page < block_kv else 3
    num_pages = 4 * max_pages
    owned = rng.permutation(num_pages)
    tables = np.full((len(lens), max_pages), -1, np.int32)
    start, used = 0, []
    for b, ctx in enumerate(lens):
        need = -(-ctx // page)
        tables[b, :need] = owned[start : start + need]
        used.extend(owned[start : start + need])
        start += need
    keep = np.zeros(num_pages, bool)
    keep[used] = True
    pools = []
    for _ in range(2):
        x = rng.standard_normal((num_pages, page, kv_heads, d))
        pools.append(jnp.asarray(np.where(keep[:, None, None, None], x, np.nan), dtype))
    q = jnp.asarray(rng.standard_normal((n, group * kv_heads, d)), dtype)
    args = (q, *pools, jnp.asarray(tables), jnp.asarray(lens, jnp.int32), jnp.asarray(qsl))
    out = ragged_paged_attention(*args, block_k=block_kv, interpret=mode, backend="mosaic",
                                 unified_max_context=unified_max_context,
                                 split_decodes=split_decodes)
    ref = jit_for_tests(ragged_paged_attention_reference)(*args)  # one executable, not op by op
    assert out.shape == q.shape and out.dtype == q.dtype
    assert not jnp.any(out[int(qsl[-1]) :]), "padding rows must come back 0"
    assert_close(out, ref, dtype)


def test_ragged_backend_choice_and_errors():
    q = jnp.zeros((4, 8, 64), jnp.float32)
    pool = jnp.zeros((4, 16, 2, 64), jnp.float32)
    args = (q, pool, pool, jnp.zeros((2, 2), jnp.int32), jnp.asarray([2, 2], jnp.int32),
            jnp.asarray([0, 2, 4], jnp.int32))
    with pytest.raises(ValueError, match=r"dtype float32 .*backend='triton'"):
        ragged_paged_attention(*args, backend="mosaic")
    with pytest.raises(ValueError, match=r"page_size 12"):
        bad = jnp.zeros((4, 12, 2, 64), jnp.bfloat16)
        ragged_paged_attention(q.astype(jnp.bfloat16), bad, bad, *args[3:], backend="mosaic")
    with pytest.raises(ValueError, match=r"16 query heads per kv head \(at most 8\)"):
        wide = jnp.zeros((4, 32, 64), jnp.bfloat16)
        ragged_paged_attention(wide, pool.astype(wide.dtype), pool.astype(wide.dtype),
                               *args[3:], backend="mosaic")
    with pytest.raises(ValueError, match="expected 'auto'"):
        ragged_paged_attention(*args, backend="cuda")
    with pytest.raises(ValueError, match="expected True, False, 'auto', 'short' or 'only'"):
        ragged_paged_attention(*args, split_decodes="yes")
    assert ragged_backend(128, jnp.bfloat16, kind="NVIDIA A100-SXM4-80GB") == "triton"
