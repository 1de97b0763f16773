"""The skinny-matmul kernel against its f32-accumulated reference, and the model's routing
(`jdecode.model.linear`): which matmuls go to the kernel and which stay with XLA."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdecode.model import linear
from pallas_kernels.gemv import gemv, gemv_reference
from pallas_kernels.testing import assert_close, jit_for_tests


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("m,k,n,blocks", [
    (1, 256, 96, dict(block_n=32, block_k=64, splits=4)),  # one row, several K splits
    (5, 128, 64, dict(block_n=64, block_k=128, splits=1)),  # odd row count, one split
    (16, 512, 48, dict(block_n=16, block_k=128, splits=2)),  # a full 16-row tile
])
def test_gemv_matches_reference(interpret, dtype, m, k, n, blocks, rng):
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), dtype)
    f = jit_for_tests(lambda x, w: gemv(x, w, interpret=interpret, **blocks))
    got = f(x, w)
    assert got.shape == (m, n) and got.dtype == x.dtype
    with jax.default_matmul_precision("highest"):
        want = gemv_reference(x.astype(jnp.float32), w.astype(jnp.float32))
    # Inputs are O(1) and each output sums k products: compare at the dtype's tolerance.
    assert_close(got, want, dtype, scale=2.0)


def test_gemv_rejects_shapes_it_cannot_tile():
    x = jnp.ones((1, 100), jnp.bfloat16)
    with pytest.raises(ValueError, match="does not tile"):
        gemv(x, jnp.ones((100, 64), jnp.bfloat16), block_n=32, block_k=64, splits=1)


def test_routing_sends_only_small_decode_matmuls_to_the_kernel(monkeypatch):
    calls = []
    monkeypatch.setattr("pallas_kernels.gemv.gemv",
                        lambda x, w, **kw: calls.append((x.shape, w.shape, kw)) or
                        gemv_reference(x, w))
    bf = jnp.bfloat16
    w = jnp.ones((256, 128), bf)
    out = linear.pallas_linear(jnp.ones((2, 1, 256), bf), w)  # [B, T, E], 2 rows
    assert out.shape == (2, 1, 128) and len(calls) == 1
    assert calls[0][0] == (2, 256) and calls[0][2] == linear.gemv_blocks(256, 128)
    # Each of these stays with XLA: too many rows, f32, a weight over XLA's GEMV threshold,
    # a shape that does not tile.
    linear.pallas_linear(jnp.ones((3, 8, 256), bf), w)
    linear.pallas_linear(jnp.ones((1, 1, 256)), jnp.ones((256, 128)))
    big = jax.ShapeDtypeStruct((4096, 4096), bf)  # traced abstractly: no 32 MB allocation
    jax.eval_shape(linear.pallas_linear, jax.ShapeDtypeStruct((1, 1, 4096), bf), big)
    linear.pallas_linear(jnp.ones((1, 1, 100), bf), jnp.ones((100, 50), bf))
    assert len(calls) == 1
    assert linear.make_linear("xla") is linear.xla_linear
    assert linear.make_linear("pallas") is linear.pallas_linear
