"""The decode step of a few rows as three fused Pallas kernels per layer.

`decode_step` (jdecode.decoding.phases) takes this path when impl="pallas" (the GPU default),
JDECODE_FUSED_DECODE=1 is set, and `fused_decode_reason` finds nothing against it; otherwise
the general forward runs. It is opt-in because it measured slower than the general path on
the H200 (2026-12-02, benchmarks/fused_decode_h200.md): its kernels run 11-21 us each
against the general path's ~2.3 us, so 115 kernels per step took longer than 535. Both
compute the same function: the kernels keep the model's roundings (projections rounded to the
model dtype before each residual add, HF's RMSNorm, RoPE in f32 on the rounded projections),
and tests compare them on random weights (tests/model/test_fused_decode.py).

Why a separate path: at batch 1 a small model's step is bound by its number of kernels, not by
its bytes (pallas_kernels/fused_decode/kernel.py says how many and why three per layer).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import jax

from jdecode.cache.dense import DenseKVCache
from jdecode.config import ModelConfig
from jdecode.model.layers import rms_norm, rope_tables
from jdecode.model.params import Params
from jdecode.model.transformer import lm_head
from pallas_kernels.fused_decode import MAX_ROWS, fused_attn, fused_mlp, fused_qkv
from pallas_kernels.fused_decode.kernel import ATTN_BLOCK
from pallas_kernels.fused_decode.reference import merge_residual

DTYPES = ("float32", "bfloat16", "float16")
# "1" turns the fused path on (see the module docstring for why it is not the default).
ENV_SWITCH = "JDECODE_FUSED_DECODE"
# Past this many down-projection partials, XLA sums them once instead of every program of the
# next layer's first kernel summing them again (the 1B shape's 8192 features make 128).
MAX_PROLOGUE_PARTS = 32


@contextlib.contextmanager
def impl_variant(impl: str) -> Iterator[str]:
    """Benchmarks' impl names: "pallas-fused" is impl="pallas" with the fused step switched on
    while the context holds (traces made inside it take the fused path), so both are timed in
    one run; any other impl passes through unchanged."""
    if impl != "pallas-fused":
        yield impl
        return
    before = os.environ.get(ENV_SWITCH)
    os.environ[ENV_SWITCH] = "1"
    try:
        yield "pallas"
    finally:
        if before is None:
            del os.environ[ENV_SWITCH]
        else:
            os.environ[ENV_SWITCH] = before


def fused_decode_reason(params: Params, cache, cfg: ModelConfig, rows: int) -> str | None:
    """Why the fused decode step cannot run here, or None when it can (all static checks)."""
    layers = params.layers
    if os.environ.get(ENV_SWITCH, "0") != "1":
        return f"off: set {ENV_SWITCH}=1 to use it"
    if not isinstance(cache, DenseKVCache) or not cache.per_layer:
        return "needs a dense cache with per-layer buffers (init_cache(per_layer=True))"
    if cache.written is not None:
        return "the cache tracks writes (a method leaves some tokens' K/V out)"
    if not isinstance(layers, tuple) or layers[0].wqkv is None or layers[0].w_gate_up is None:
        return "needs the fused, unstacked inference layout (layout.inference_layout)"
    if layers[0].bqkv is not None:
        return "QKV biases are not in the kernels"
    if cfg.sliding_window is not None:
        return "sliding-window attention is not in the kernels"
    if not 1 <= rows <= MAX_ROWS:
        return f"{rows} rows: the kernels unroll at most {MAX_ROWS}"
    if layers[0].wqkv.dtype.name not in DTYPES or params.embed.dtype != layers[0].wqkv.dtype:
        return f"dtype {layers[0].wqkv.dtype.name} is not one of {DTYPES}"
    D = cfg.head_dim
    if D < 16 or D & (D - 1) or cfg.hidden_size % 16 or cfg.intermediate_size % 16:
        return "head_dim must be a power of two >= 16, hidden and intermediate sizes multiples of 16"
    if cache.max_len % ATTN_BLOCK:
        return f"cache length {cache.max_len} is not a multiple of {ATTN_BLOCK}"
    return None


def fused_decode_step(params: Params, cache: DenseKVCache, tokens: jax.Array,
                      positions: jax.Array, *, cfg: ModelConfig
                      ) -> tuple[jax.Array, jax.Array, DenseKVCache]:
    """One decode step: tokens [B] at positions [B] (= their cache slots).

    Returns:
      logits [B, V] f32, hidden [B, E] (final-normed), and the cache with this step written.
    """
    eps = cfg.rms_norm_eps
    x = params.embed[tokens]  # [B, E]
    cos, sin = rope_tables(positions[:, None], cfg)  # [B, 1, D/2]
    cos, sin = cos[:, 0], sin[:, 0]
    ks, vs = list(cache.k), list(cache.v)
    parts = None  # [P, B, E] f32: the previous layer's down projection, not yet added to x
    for layer, lp in enumerate(params.layers):
        q, ks[layer], vs[layer], x = fused_qkv(
            x, parts, lp.attn_norm, lp.wqkv, cos, sin, positions, ks[layer], vs[layer],
            num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, eps=eps)
        attn_parts = fused_attn(q, ks[layer], vs[layer], positions, lp.wo)  # [K, B, E]
        parts, x = fused_mlp(x, attn_parts, lp.mlp_norm, lp.w_gate_up, lp.w_down, eps=eps)
        if parts.shape[0] > MAX_PROLOGUE_PARTS:
            parts = parts.sum(0, keepdims=True)
    x = merge_residual(x, parts)
    hidden = rms_norm(x, params.final_norm, eps)
    return lm_head(params, hidden), hidden, DenseKVCache(k=tuple(ks), v=tuple(vs))
