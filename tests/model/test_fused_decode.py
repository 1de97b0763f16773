"""The fused decode step (three Pallas kernels per layer) against its references.

Each kernel is checked against its plain-jnp stage on random data, in the Pallas interpreter
on CPU; the whole step against the general forward's `decode_step` with impl="xla"; and, on
the GPU, greedy tokens of the real model in f32 against the XLA path.
"""

from __future__ import annotations

from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdecode.cache.dense import init_cache
from jdecode.config import load_model_config_yaml
from jdecode.decoding import phases
from jdecode.model.fused_decode import ENV_SWITCH, fused_decode_reason
from jdecode.model.layout import inference_layout
from jdecode.model.params import init_params
from pallas_kernels.fused_decode import fused_attn, fused_mlp, fused_qkv
from pallas_kernels.fused_decode import reference as ref
from pallas_kernels.testing import assert_close, jit_for_tests

TINY = "configs/models/tiny.yaml"


@pytest.fixture
def fused_on(monkeypatch):
    """The fused step is opt-in (see jdecode.model.fused_decode)."""
    monkeypatch.setenv(ENV_SWITCH, "1")


@pytest.fixture(autouse=True)
def _exact_f32_matmuls():
    """GPU XLA runs f32 dots as TF32 by default; the f32 tolerance assumes true f32."""
    with jax.default_matmul_precision("highest"):
        yield


def _stage_inputs(rng, dtype, rows, *, E=128, H=6, K=2, D=32, F=192, S=192, P=5):
    """Random inputs of all three stages (GQA group 3, like SmolLM2's 9/3 heads)."""
    def normal(*shape, scale=1.0, dt=dtype):
        return jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32).astype(dt)

    pos = jnp.asarray(rng.integers(0, S, rows), jnp.int32).at[0].set(S - 1)  # the last slot too
    ang = pos[:, None].astype(jnp.float32) * jnp.linspace(0.01, 1.0, D // 2)
    return {
        "x": normal(rows, E), "parts": normal(P, rows, E, scale=0.1, dt=jnp.float32),
        "norm": (1 + normal(E, scale=0.1)).astype(dtype), "wqkv": normal(E, (H + 2 * K) * D,
                                                                    scale=E ** -0.5),
        "cos": jnp.cos(ang), "sin": jnp.sin(ang), "pos": pos,
        "kc": normal(rows, S, K, D), "vc": normal(rows, S, K, D),
        "wo": normal(H * D, E, scale=(H * D) ** -0.5), "wgu": normal(E, 2 * F, scale=E ** -0.5),
        "wd": normal(F, E, scale=F ** -0.5), "H": H, "K": K, "D": D, "F": F, "E": E}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("with_parts", [True, False])
def test_qkv_stage_matches_reference(rng, dtype, rows, with_parts):
    a = _stage_inputs(rng, dtype, rows)
    parts = a["parts"] if with_parts else None
    args = (a["x"], parts, a["norm"], a["wqkv"], a["cos"], a["sin"], a["pos"], a["kc"], a["vc"])
    kw = {"num_heads": a["H"], "num_kv_heads": a["K"], "eps": 1e-5}
    got = fused_qkv(*args, **kw)
    want = ref.qkv_stage_reference(*args, **kw)
    chex.assert_trees_all_equal_shapes_and_dtypes(got, want)
    for g, w in zip(got, want):
        assert_close(g, w, dtype)
    # Only slot pos[b] of row b changed in the cache.
    changed = np.asarray(jnp.any(got[1] != a["kc"], axis=(2, 3)))  # [B, S]
    assert all(set(np.flatnonzero(changed[b])) <= {int(a["pos"][b])} for b in range(rows))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("rows", [1, 3])
def test_attn_stage_matches_reference(rng, dtype, rows):
    a = _stage_inputs(rng, dtype, rows)
    q = jnp.asarray(rng.standard_normal((rows, a["H"], a["D"])), jnp.float32).astype(dtype)
    got = fused_attn(q, a["kc"], a["vc"], a["pos"], a["wo"])
    want = ref.attn_stage_reference(q, a["kc"], a["vc"], a["pos"], a["wo"])
    chex.assert_shape(got, (a["K"], rows, a["E"]))
    assert_close(got, want, dtype)
    # Two column blocks per kv head must give the same partials as one.
    assert_close(fused_attn(q, a["kc"], a["vc"], a["pos"], a["wo"], block_e=64), got, "float32")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("rows", [1, 3])
def test_mlp_stage_matches_reference(rng, dtype, rows):
    a = _stage_inputs(rng, dtype, rows)
    got = fused_mlp(a["x"], a["parts"], a["norm"], a["wgu"], a["wd"], eps=1e-5, block_f=64)
    want = ref.mlp_stage_reference(a["x"], a["parts"], a["norm"], a["wgu"], a["wd"], eps=1e-5,
                                   block_f=64)
    chex.assert_trees_all_equal_shapes_and_dtypes(got, want)
    # bf16: the kernel's silu runs in f32 and is rounded once; XLA's may round inside it.
    assert_close(got[0], want[0], dtype, scale=2.0 if dtype == "bfloat16" else 1.0)
    assert_close(got[1], want[1], dtype)


def _steps(params, cfg, impl, prompt, lengths, next_tokens):
    """Prefill, then one decode step per column of next_tokens [B, N]: [N, B, V] logits."""
    cache = init_cache(cfg, prompt.shape[0], 256, per_layer=isinstance(params.layers, tuple))
    prefill = jit_for_tests(partial(phases.prefill, cfg=cfg, impl="xla"))
    decode = jit_for_tests(partial(phases.decode_step, cfg=cfg, impl=impl))
    _, _, cache = prefill(params, cache, prompt, lengths)
    out, pos = [], lengths
    for i in range(next_tokens.shape[1]):
        logits, _, cache = decode(params, cache, next_tokens[:, i], pos)
        out.append(logits)
        pos = pos + 1
    return jnp.stack(out), cache


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("rows", [1, 3])
def test_fused_step_matches_xla_step(rng, dtype, rows, fused_on):
    cfg = load_model_config_yaml(TINY).replace(dtype=dtype)
    params = inference_layout(init_params(cfg, jax.random.key(int(rng.integers(1 << 30)))))
    cache = init_cache(cfg, rows, 256, per_layer=True)
    assert fused_decode_reason(params, cache, cfg, rows) is None
    prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, (rows, 32)), jnp.int32)
    lengths = jnp.asarray(rng.integers(1, 33, rows), jnp.int32)
    nxt = jnp.asarray(rng.integers(0, cfg.vocab_size, (rows, 3)), jnp.int32)
    got, got_cache = _steps(params, cfg, "pallas", prompt, lengths, nxt)
    want, want_cache = _steps(params, cfg, "xla", prompt, lengths, nxt)
    # Logits sum over the hidden size of values within tolerance (as test_pallas_integration).
    assert_close(got, want, dtype, scale=4.0)
    assert_close(jnp.stack(got_cache.k), jnp.stack(want_cache.k), dtype)
    assert_close(jnp.stack(got_cache.v), jnp.stack(want_cache.v), dtype)


def test_fused_step_declines_what_it_does_not_cover(monkeypatch):
    cfg = load_model_config_yaml(TINY)
    monkeypatch.delenv(ENV_SWITCH, raising=False)
    ready = (inference_layout(init_params(cfg, jax.random.key(0))),
             init_cache(cfg, 1, 256, per_layer=True), cfg, 1)
    assert ENV_SWITCH in fused_decode_reason(*ready)  # opt-in
    monkeypatch.setenv(ENV_SWITCH, "1")
    assert fused_decode_reason(*ready) is None
    params = init_params(cfg, jax.random.key(0))
    fast = inference_layout(params)
    per_layer = init_cache(cfg, 1, 256, per_layer=True)
    assert "inference layout" in fused_decode_reason(params, per_layer, cfg, 1)
    assert "per-layer" in fused_decode_reason(fast, init_cache(cfg, 1, 256), cfg, 1)
    assert "tracks writes" in fused_decode_reason(
        fast, init_cache(cfg, 1, 256, per_layer=True, track_writes=True), cfg, 1)
    assert "rows" in fused_decode_reason(fast, init_cache(cfg, 9, 256, per_layer=True), cfg, 9)
    windowed = cfg.replace(sliding_window=64)
    assert "sliding" in fused_decode_reason(fast, per_layer, windowed, 1)


@pytest.mark.gpu
@pytest.mark.slow
def test_fused_greedy_equals_xla_on_the_real_model_f32(request, fused_on):
    """Acceptance of issue 16: f32 greedy tokens of the fast path equal the XLA path's."""
    if jax.default_backend() != "gpu":
        pytest.skip("needs the GPU")
    smol = request.getfixturevalue("smol")
    from jdecode.decoding.generate import Generator
    from jdecode.decoding.sampling import SamplingParams

    questions = ["What is the capital of France?", "Name three primary colors.",
                 "Write a haiku about the sea.", "What is 12 times 12?"]
    prompts = [smol.tokenizer.encode(smol.tokenizer.apply_chat_template(
        [{"role": "user", "content": q}])) for q in questions]
    sp = SamplingParams(max_new_tokens=32)
    fast = Generator(smol, impl="pallas", layout="inference")
    slow = Generator(smol, impl="xla", layout="inference")
    for batch in ([p] for p in prompts):  # batch 1, then all four at once
        assert [r.token_ids for r in fast.generate(batch, sp)] == \
            [r.token_ids for r in slow.generate(batch, sp)]
    assert [r.token_ids for r in fast.generate(prompts, sp)] == \
        [r.token_ids for r in slow.generate(prompts, sp)]
