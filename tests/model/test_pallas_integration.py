"""The model's attention dispatch: impl="pallas" gives the logits of impl="xla", in both
parameter layouts (stacked + scanned, and fused + unrolled with per-layer caches).

On CPU the kernels run in the Pallas interpreter; the `gpu` variant runs them compiled.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdecode.cache.dense import init_cache
from jdecode.config import load_model_config_yaml
from jdecode.decoding import phases
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
