"""The model's attention dispatch: impl="pallas" gives the logits of impl="xla", in both
parameter layouts (stacked + scanned, and fused + unrolled with per-layer caches).

On CPU the kernels run in the Pallas interpreter; the `gpu` variant runs them compiled.
"""

from __future__ import annotations

from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdecode.cache.dense import DenseMeta, dense_attend, init_cache
from jdecode.config import load_model_config_yaml
from jdecode.decoding import phases
from jdecode.model.layers import apply_rope, rope_tables
from jdecode.model.layout import inference_layout
from jdecode.model.params import init_params
from pallas_kernels.testing import assert_close, jit_for_tests

TINY = "configs/models/tiny.yaml"


def _run(params, cfg, impl, prompt, lengths, next_tokens):
    """Prefill, then one decode step per column of next_tokens [B, N] (the same tokens for
    every impl, so a near-tie argmax cannot send two paths down different sequences).

    Returns every step's logits [N+1, B, V].
    """
    cache = init_cache(cfg, prompt.shape[0], 256,
                       per_layer=isinstance(params.layers, tuple))
    prefill = jit_for_tests(partial(phases.prefill, cfg=cfg, impl=impl))
    decode = jit_for_tests(partial(phases.decode_step, cfg=cfg, impl=impl))
    logits, _, cache = prefill(params, cache, prompt, lengths)
    out, pos = [logits], lengths
    for i in range(next_tokens.shape[1]):
        logits, _, cache = decode(params, cache, next_tokens[:, i], pos)
        out.append(logits)
        pos = pos + 1
    return jnp.stack(out)


def _check(dtype: str, rng: np.random.Generator) -> None:
    # head_dim 16 is the kernels' smallest; 4 heads over 2 KV heads exercises GQA grouping.
    cfg = load_model_config_yaml(TINY).replace(dtype=dtype)
    params = init_params(cfg, jax.random.key(int(rng.integers(1 << 30))))
    prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, (3, 32)), jnp.int32)
    lengths = jnp.asarray([32, 7, 18], jnp.int32)  # ragged prompts in one bucket
    nxt = jnp.asarray(rng.integers(0, cfg.vocab_size, (3, 3)), jnp.int32)
    ref = _run(params, cfg, "xla", prompt, lengths, nxt)
    for layout in (params, inference_layout(params)):
        got = _run(layout, cfg, "pallas", prompt, lengths, nxt)
        # Logits are sums over hidden=64 of attention outputs within tolerance: allow 4x.
        assert_close(got, ref, dtype, scale=4.0)


def test_pallas_matches_xla_f32(rng):
    _check("float32", rng)


def test_pallas_matches_xla_bf16(rng):
    """bf16 also routes the attention projections through the GEMV kernel at decode."""
    _check("bfloat16", rng)


@pytest.mark.parametrize("batch", [1, 5])
def test_decode_writes_kv_in_kernel(batch, rng):
    """A per-layer cache's Pallas decode stores K/V inside the attention kernel: the output and
    both caches equal the XLA path's (scatter, then attend). A row past the buffer (a padding
    query) writes nothing, as the scatter's mode="drop"; its output is not compared (the
    kernel lets it see its own K/V, the XLA path does not, and nothing reads it)."""
    cfg = load_model_config_yaml(TINY)
    H, K, D, S = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, 128
    cache = init_cache(cfg, batch, S, per_layer=True)
    keys = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), 5)
    fill = [jax.random.normal(keys[i], (batch, S, K, D), jnp.float32) for i in (0, 1)]
    cache = cache.replace(k=(fill[0],) + cache.k[1:], v=(fill[1],) + cache.v[1:])
    q = jax.random.normal(keys[2], (batch, 1, H, D), jnp.float32)
    k = jax.random.normal(keys[3], (batch, 1, K, D), jnp.float32)
    v = jax.random.normal(keys[4], (batch, 1, K, D), jnp.float32)
    pos = rng.integers(0, S, (batch, 1))
    pos[-1] = S if batch > 1 else pos[-1]  # past the buffer: attends, writes nothing
    meta = DenseMeta(positions=jnp.asarray(pos, jnp.int32))

    def run(impl):
        out, new = jit_for_tests(partial(dense_attend, layer=0, impl=impl))(q, k, v, cache,
                                                                             meta=meta)
        return out, new.k[0], new.v[0]

    got, want = run("pallas"), run("xla")
    chex.assert_trees_all_equal_shapes_and_dtypes(got, want)
    live = slice(None, batch - 1) if batch > 1 else slice(None)
    assert_close(got[0][live], want[0][live], "float32")
    np.testing.assert_array_equal(got[1], want[1])  # the stores are exact copies
    np.testing.assert_array_equal(got[2], want[2])

    # q and k before RoPE, with the tables: the kernel rotates them, the XLA path first.
    cos, sin = rope_tables(meta.positions, cfg)  # [B, 1, D/2]
    rope_ = (cos, sin)

    def run_unrotated(impl):
        out, new = jit_for_tests(partial(dense_attend, layer=0, impl=impl))(
            q, k, v, cache, meta=meta, rope=rope_)
        return out, new.k[0], new.v[0]

    rotated = jit_for_tests(partial(dense_attend, layer=0, impl="xla"))(
        apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, cache, meta=meta)
    for impl in ("pallas", "xla"):
        got = run_unrotated(impl)
        assert_close(got[0][live], rotated[0][live], "float32")
        assert_close(got[1], rotated[1].k[0], "float32")  # 1 ulp: products may contract
        np.testing.assert_array_equal(got[2], rotated[1].v[0])


@pytest.fixture(autouse=True)
def _exact_f32_matmuls():
    """GPU XLA runs f32 dots as TF32 by default; the f32 tolerance assumes true f32."""
    with jax.default_matmul_precision("highest"):
        yield


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_pallas_matches_xla_compiled(dtype, rng):
    if jax.default_backend() != "gpu":
        pytest.skip("needs the GPU")
    _check(dtype, rng)
