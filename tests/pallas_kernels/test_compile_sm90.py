"""The fused steps' Triton kernels compile for sm_90a without register spills (no GPU needed).

The interpreter checks what a kernel computes, not how it compiles. The `triton` wheel
compiles the Triton IR that Pallas emits to a cubin for the H100/H200 (`pallas_kernels/
deviceless.py`), and ptxas reports its registers and spills. That is how the O projection's
split merge was found spilling 11-27 KB per thread at SmolLM2's verify steps of 5 and 2 x 4
tokens (benchmarks/deviceless_h200.md); these cases keep it from coming back. The steps are
those of `scripts/deviceless_check.py` that run on the fused path by default or under
JDECODE_FUSED_DECODE=1 for the methods' verify steps, on abstract params (nothing is
allocated). XLA compiles the same IR with its own Triton on the card: a proxy, not the card's
figures.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import pytest

from jdecode.analysis import deviceless_cases as cases
from jdecode.cache.paged import paged_attend
from pallas_kernels import deviceless

# (model, batch, tokens per row): the fused decode step at batch 1, and verify steps of 5
# tokens (n-gram k4), 2 x 4 (a chain at batch 2) and 16, all through the fused kernels.
STEPS = [("smollm2-135m", 1, 1), ("smollm2-135m", 1, 5), ("smollm2-135m", 2, 4),
         ("smollm2-135m", 1, 16), ("llama-3.2-1b", 1, 5)]


def _compile_distinct(fn, args, attention: str, where: str) -> None:
    """Lowers fn(*args) for an H200, checks that it launched the five fused kernels (with
    `attention` as its attention kernel), and compiles each distinct one for sm_90a: it must
    compile, and spill nothing."""
    pytest.importorskip("triton")
    try:
        capture = deviceless.TritonCapture()
    except ImportError as e:
        pytest.skip(str(e))
    with deviceless.as_gpu(), capture:
        deviceless.lower(fn, *args)
    names = {k["name"] for k in capture.kernels}
    assert {"qkv_rope", attention, "attn_o_residual", "gate_up_swiglu",
            "gemv_residual"} <= names, f"the step did not take the fused kernels: {names}"
    seen = set()
    for kernel in capture.kernels:
        key = (kernel["name"], kernel["ttir"])
        if key in seen:  # each layer lowers the same five kernels
            continue
        seen.add(key)
        got = deviceless.compile_triton(kernel)
        assert got["status"] == "compiled", (kernel["name"], got)
        assert got["spill_store_bytes"] == 0, (
            f"{kernel['name']} ({kernel['num_warps']} warps, {kernel['num_stages']} stages) "
            f"spills {got['spill_store_bytes']} bytes per thread at {got['registers']} "
            f"registers in {where}")


@pytest.mark.parametrize("model,batch,tokens", STEPS)
def test_fused_step_kernels_compile_without_spills(model, batch, tokens):
    cfg, params = cases.model_params(model)
    fn, args = cases.step_case(cfg, params, "pallas-fused", batch, tokens)
    _compile_distinct(fn, args, "decode_attention" if tokens == 1 else "block_attention",
                      f"{model}'s step of {batch} x {tokens} tokens")


@pytest.mark.parametrize("rows", [1, 4])
def test_engine_fused_decode_kernels_compile_without_spills(rows):
    """The engine's decode-only step over its page pool (`fused_paged_decode_step`, on by
    default for the runner's decode buckets), SmolLM2 shape, pages of 16 tokens."""
    cfg, params = cases.model_params("smollm2-135m")
    fn, args = cases.engine_fused_case(cfg, params, rows)
    _compile_distinct(fn, args, "paged_decode_attention", f"the engine's step of {rows} rows")


@pytest.mark.parametrize("model,dtype", [("smollm2-135m", "bfloat16"),
                                         ("llama-3.2-1b", "bfloat16"),
                                         ("smollm2-135m", "float32")])
def test_engine_general_decode_attention_compiles_without_spills(model, dtype):
    """The engine's decode-only step of 64 sequences on the general path: its attention
    kernel stores K/V too (`paged_decode_writing`, with the paged decode kernel's launch).
    SmolLM2 also in float32 (`--dtype float32`): its bf16 launch, 128-token blocks, held 255
    registers and spilled 272 bytes a thread at f32 (stop 56), its own 64-token one none."""
    pytest.importorskip("triton")
    cfg, _ = cases.model_params(model, dtype)
    n = 64
    pool, meta = cases.engine_pool(cfg, n, slots=n)
    z = partial(jax.ShapeDtypeStruct, dtype=jnp.dtype(dtype))
    H, K, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    args = (z((1, n, H, D)), z((1, n, K, D)), z((1, n, K, D)), pool, cases.i32(()), meta)
    try:
        capture = deviceless.TritonCapture()
    except ImportError as e:
        pytest.skip(str(e))
    with deviceless.as_gpu(), capture:
        deviceless.lower(partial(paged_attend, impl="pallas"), *args)
    assert [k["name"] for k in capture.kernels] == ["paged_decode_attention"]
    got = deviceless.compile_triton(capture.kernels[0])
    assert got["status"] == "compiled", got
    assert got["spill_store_bytes"] == 0, got


@pytest.mark.parametrize("model", ["smollm2-135m", "llama-3.2-1b"])
def test_generator_general_decode_attention_with_rope_compiles_without_spills(model):
    """The Generator's decode step of 64 rows on the general path: its attention kernel
    stores K/V and rotates q and k itself (`dense_attend` with `rope`)."""
    pytest.importorskip("triton")
    from jdecode.cache.dense import DenseMeta, dense_attend, init_cache
    from jdecode.model.layers import rope_tables

    cfg, _ = cases.model_params(model)
    n, H, K, D = 64, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    cache = cases.abstract(jax.eval_shape(partial(init_cache, cfg, n, 768, per_layer=True)))
    z = partial(jax.ShapeDtypeStruct, dtype=jnp.bfloat16)

    def step(q, k, v, cache, pos):
        return dense_attend(q, k, v, cache, 0, DenseMeta(pos), impl="pallas",
                            rope=rope_tables(pos, cfg))

    try:
        capture = deviceless.TritonCapture()
    except ImportError as e:
        pytest.skip(str(e))
    with deviceless.as_gpu(), capture:
        deviceless.lower(step, z((n, 1, H, D)), z((n, 1, K, D)), z((n, 1, K, D)), cache,
                         cases.i32((n, 1)))
    assert [k["name"] for k in capture.kernels] == ["decode_attention"]
    got = deviceless.compile_triton(capture.kernels[0])
    assert got["status"] == "compiled", got
    assert got["spill_store_bytes"] == 0, got


@pytest.mark.parametrize("registers,shared,warps,want", [
    (128, 106496, 4, 2),  # the paged decode kernel at 4 splits: shared memory binds
    (40, 4096, 8, 6),     # a one-row GEMV: registers bind (40 x 32 x 8 per CTA)
    (172, 148480, 4, 1),  # qkv_rope at 64 rows, 3 stages: one CTA per SM
    (32, 0, 1, 32),       # the cache write: the 32-CTA limit binds
])
def test_ctas_per_sm(registers, shared, warps, want):
    assert deviceless.ctas_per_sm(registers, shared, warps) == want
