"""Lowers every kernel to Triton IR for CUDA on any machine (no GPU needed).

Catches Triton-only failures (non-power-of-2 tiles, unsupported ops) in CPU CI, and pins the
f32 dots to IEEE: Triton's default for an f32 dot is TF32, which missed the f32 tolerance on
the H100. Uses a private JAX hook to read the Triton module, so it skips where that moved.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.fused_decode import (
    GemvTiles,
    attn_o_residual,
    decode_attention,
    gate_up_swiglu,
    gemv_residual,
    qkv_rope,
)
from pallas_kernels.fused_decode.block_attention import block_attention
from pallas_kernels.paged_attention import paged_attention, ragged_paged_attention, write_kv_pages
from pallas_kernels.testing import lower_for_cuda

registration = pytest.importorskip("jax._src.pallas.triton.pallas_call_registration")


@pytest.fixture
def triton_modules(monkeypatch):
    """Collects the Triton module text of every pallas_call lowered while the test runs."""
    lower = getattr(getattr(registration, "lowering", None), "lower_jaxpr_to_triton_module", None)
    if lower is None:
        pytest.skip("this jax lowers Pallas Triton kernels differently")
    modules = []

    def capture(*args, **kwargs):
        result = lower(*args, **kwargs)
        modules.append(result.module.operation.get_asm())
        return result

    monkeypatch.setattr(registration.lowering, "lower_jaxpr_to_triton_module", capture)
    jax.clear_caches()  # the wrappers' jit caches would skip the lowering
    return modules


def _kernels(dtype, *, page=16, block_k=None, rows=None):
    """(name, fn, args) for each kernel at a small shape; block sizes as the H100 tuning uses."""
    q4 = jnp.zeros((2, 64, 8, 128), dtype)
    kv4 = jnp.zeros((2, 96, 2, 128), dtype)
    pool = jnp.zeros((24, page, 2, 128), dtype)
    qd = jnp.zeros((3, 8, 128), dtype)
    tables = jnp.zeros((3, 8), jnp.int32)
    lens = jnp.ones((3,), jnp.int32)
    qsl = jnp.asarray([0, 1, 5, 9], jnp.int32)
    qr = jnp.zeros((12, 8, 128), dtype)
    new = jnp.zeros((5, 2, 128), dtype)
    slots = jnp.zeros((5,), jnp.int32)
    off = {"interpret": False}
    bk = block_k or 2 * page
    mask = jnp.zeros((2, 64, 64), bool)
    return [
        ("flash", functools.partial(flash_attention, block_q=64, block_k=64, **off), (q4, kv4, kv4)),
        ("flash_mask", lambda q, k, v, m: flash_attention(q, k, v, mask=m, block_q=64, block_k=64,
                                                          **off), (q4, kv4, kv4, mask)),
        ("decode", functools.partial(paged_attention, num_splits=2, block_k=bk, **off),
         (qd, pool, pool, tables, lens)),
        ("ragged", functools.partial(ragged_paged_attention, block_q=(rows or 32) // 4,
                                     block_k=bk, **off), (qr, pool, pool, tables, lens, qsl)),
        ("write", functools.partial(write_kv_pages, **off), (pool, pool, new, new, slots)),
    ]  # fmt: skip


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernels_lower_to_triton(triton_modules, dtype):
    for name, fn, args in _kernels(dtype, page=16, block_k=128, rows=64):
        triton_modules.clear()
        lower_for_cuda(fn, *args)
        assert triton_modules, f"{name}: no Triton module was lowered"
        dots = [d for m in triton_modules for d in re.findall(r"tt\.dot\b[^\n]*", m)]
        if dtype == jnp.float32:
            assert all("tf32" not in d for d in dots), f"{name}: f32 dot lowered as TF32"


# (weights given [N, K], tiles): tensor-core tiles on either layout, and the CUDA-core path.
FUSED_PATHS = {"kn-tensor": (False, GemvTiles()), "nk-tensor": (True, GemvTiles()),
               "nk-fma": (True, GemvTiles(block_n=4, block_k=1024, num_warps=8, fma=True,
                                          unroll=True))}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("path", list(FUSED_PATHS))
def test_fused_decode_kernels_lower_to_triton(triton_modules, dtype, path):
    """SmolLM2's shape: hidden 576 and 9/3 heads are not powers of two; only the tiles are."""
    transposed, tiles = FUSED_PATHS[path]
    E, H, K, D, F, rows = 576, 9, 3, 64, 1536, 3

    def w(k, n):  # a weight as the kernels take it
        return jnp.zeros((n, k) if transposed else (k, n), dtype)

    x, norm, half = jnp.zeros((rows, E), dtype), jnp.zeros(E, dtype), jnp.zeros((rows, D // 2))
    parts = jnp.zeros((rows, 4, H * D))  # attention's split partials, f32
    kw = {"transposed": transposed, "tiles": tiles, "interpret": False}
    kernels = [
        ("qkv_rope", functools.partial(qkv_rope, num_heads=H, num_kv_heads=K, eps=1e-5, **kw),
         (x, norm, w(E, (H + 2 * K) * D), half, half)),
        ("gate_up_swiglu", functools.partial(gate_up_swiglu, eps=1e-5, **kw),
         (x, norm, w(E, 2 * F))),
        ("gemv_residual", functools.partial(gemv_residual, **kw),
         (jnp.zeros((rows, F), dtype), w(F, E), x)),
        ("attn_o_residual", functools.partial(attn_o_residual, **kw),
         (parts, parts[..., :H], w(H * D, E), x)),
    ]
    for name, fn, args in kernels:
        triton_modules.clear()
        lower_for_cuda(fn, *args)
        assert triton_modules, f"{name}: no Triton module was lowered"
        dots = [d for m in triton_modules for d in re.findall(r"tt\.dot\b[^\n]*", m)]
        assert bool(dots) != tiles.fma, f"{name}: tensor-core dots {dots} on the {path} path"
        if dtype == jnp.float32:
            assert all("tf32" not in d for d in dots), f"{name}: f32 dot lowered as TF32"


@pytest.mark.parametrize("page", [32, 64])
def test_paged_kernels_lower_for_page_sizes(triton_modules, page):
    for name, fn, args in _kernels(jnp.bfloat16, page=page)[2:4]:
        lower_for_cuda(fn, *args)
        assert triton_modules, f"{name}: no Triton module was lowered"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("splits", [1, 8])
def test_decode_attention_lowers_to_triton(triton_modules, dtype, splits):
    """The fused step's attention at SmolLM2's heads (9/3, D 64) over a 1024-slot cache."""
    rows, H, K, D, S = 3, 9, 3, 64, 1024
    cache = jnp.zeros((rows, S, K, D), dtype)
    fn = functools.partial(decode_attention, num_heads=H, num_kv_heads=K, num_splits=splits,
                           interpret=False)
    lower_for_cuda(fn, jnp.zeros((rows, (H + 2 * K) * D), dtype), cache, cache,
                    jnp.zeros((rows,), jnp.int32))
    assert triton_modules, "decode_attention: no Triton module was lowered"
    dots = [d for m in triton_modules for d in re.findall(r"tt\.dot\b[^\n]*", m)]
    assert dots, "decode_attention: the scores and values should be tensor-core dots"
    if dtype == jnp.float32:
        assert all("tf32" not in d for d in dots), "decode_attention: f32 dot lowered as TF32"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("rows,tokens", [(1, 4), (2, 24)])
def test_block_attention_lowers_to_triton(triton_modules, dtype, rows, tokens):
    """The fused verify step's attention at SmolLM2's heads (9/3, D 64): a chain of 4 in one
    query tile, and 24 tokens per row in two (72 query rows)."""
    H, K, D, S = 9, 3, 64, 1024
    cache = jnp.zeros((rows, S, K, D), dtype)
    fn = functools.partial(block_attention, num_heads=H, num_kv_heads=K, num_splits=8,
                           interpret=False)
    slots = jnp.zeros((rows, tokens), jnp.int32)
    lower_for_cuda(fn, jnp.zeros((rows * tokens, (H + 2 * K) * D), dtype), cache, cache, slots,
                    slots[:, 0], jnp.ones((rows, tokens, tokens), bool))
    assert triton_modules, "block_attention: no Triton module was lowered"
    dots = [d for m in triton_modules for d in re.findall(r"tt\.dot\b[^\n]*", m)]
    assert dots, "block_attention: the scores and values should be tensor-core dots"
    if dtype == jnp.float32:
        assert all("tf32" not in d for d in dots), "block_attention: f32 dot lowered as TF32"


def test_layer_kernel_barriers_wait_in_loops(triton_modules):
    """Each of the layer kernel's PHASES - 1 grid barriers lowers to a polling loop (a poll
    loop that jax dropped, as one of volatile loads was on 2026-12-05, would leave a barrier
    that does not wait)."""
    from pallas_kernels.fused_decode.layer import PHASES, decode_layer, new_counters

    E, H, K, D, F, S = 64, 4, 2, 16, 128, 128
    z = functools.partial(jnp.zeros, dtype=jnp.float32)
    fn = functools.partial(decode_layer, num_heads=H, num_kv_heads=K, eps=1e-5, num_splits=2,
                           num_programs=8, interpret=False)
    lower_for_cuda(fn, z((1, E)), jnp.zeros((1,), jnp.int32), z((1, D // 2)), z((1, D // 2)),
                   z((1, S, K, D)), z((1, S, K, D)), new_counters(2), jnp.int32(0), z(E),
                   z(((H + 2 * K) * D, E)), z((E, H * D)), z(E), z((2 * F, E)), z((E, F)))
    (module,) = triton_modules
    assert module.count("scf.while") == PHASES - 1
    assert "globaltimer" not in module  # no clock reads unless traced


def test_a_traced_layer_kernel_reads_the_clock_at_each_stamp(triton_modules):
    """trace=True: one clock read per stamp (start, arrival and release at each barrier,
    end), and the stamps as a [P, TRACE_SLOTS] output."""
    from pallas_kernels.fused_decode.layer import TRACE_SLOTS, decode_layer, new_counters

    E, H, K, D, F, S = 64, 4, 2, 16, 128, 128
    z = functools.partial(jnp.zeros, dtype=jnp.float32)
    fn = functools.partial(decode_layer, num_heads=H, num_kv_heads=K, eps=1e-5, num_splits=2,
                           num_programs=8, trace=True, interpret=False)
    lowered = lower_for_cuda(fn, z((1, E)), jnp.zeros((1,), jnp.int32), z((1, D // 2)),
                             z((1, D // 2)), z((1, S, K, D)), z((1, S, K, D)), new_counters(2),
                             jnp.int32(0), z(E), z(((H + 2 * K) * D, E)), z((E, H * D)), z(E),
                             z((2 * F, E)), z((E, F)))
    (module,) = triton_modules
    assert module.count("globaltimer") == TRACE_SLOTS
    assert lowered.out_info[-1].shape == (8, TRACE_SLOTS)
