"""The decode step of a few rows as five fused Pallas kernels per layer, and nothing else.

`decode_step` (jdecode.decoding.phases) takes this path when impl="pallas" (the GPU default)
and `fused_decode_reason` finds nothing against it. A layer is (`pallas_kernels.fused_decode`):

  qkv_rope          RMSNorm + QKV + RoPE
  decode_attention  the K/V cache write + attention, split-K partials
  attn_o_residual   the partials' merge + O projection + residual
  gate_up_swiglu    RMSNorm + gate/up + SwiGLU
  gemv_residual     down projection + residual

The general forward runs the same layer as ~18 kernels at batch 1.

When it is on: by default for steps of up to 5 rows (`FMA_MAX_ROWS`) over params that carry
[N, K] copies of the four matrices (`with_decode_copies`; the Generator adds them on the GPU
for models up to 4 GiB). There the GEMVs run on CUDA cores and the step measured 2.15x the
general path on the real SmolLM2 (bf16, batch 1; 1.29x at batch 4 on its shape) and 1.15x on
the Llama-3.2-1B shape, on the H200 (benchmarks/fused_decode_h200.md, run 9). At more rows
its tensor-core tiles measured slower: at 64 rows of the 1B shape the best tiles of each
kernel summed to ~121 us of device time per layer against ~89 for the general path's kernels
(XLA's GEMMs and the paged kernel; fused_decode_h200.md, 2026-12-03). So
JDECODE_FUSED_DECODE=1 forces it on for 1-64 rows (experiments), and 0 turns it off.

JDECODE_FUSED_DECODE=layer runs each layer as one persistent kernel instead of five
(`pallas_kernels.fused_decode.layer`: the five kernels' code as phases between grid-wide
barriers), for steps of up to 5 rows over the [N, K] copies. It is opt-in: on the H200 it
measured slower than the five kernels (1194 vs 1778 tok/s on the SmolLM2 shape; see the
layer module's status).

A verify step (T tokens per row: speculative chains, Medusa / EAGLE / lookahead trees) runs
the same five kernels over its B x T tokens as rows, with `block_attention` in place of
`decode_attention` (`fused_verify_step`; `phases.verify` and `verify_tree` take it, with
layer hooks that only see each layer's output, such as EAGLE's feature taps). By default
it takes steps of up to 5 rows in all (batch x tokens: a speculative chain of 4 drafts at
batch 1), where the H200 measured it at 1.25-1.95 decode steps of device time against the
general path's 2.4 (SmolLM2 shape, batch 1; benchmarks/verify_h200.md). At 8-64 tokens it
cost 2.9-4.0 there, so Medusa's and EAGLE's trees keep the general path unless
JDECODE_FUSED_DECODE=1 forces it (up to 64 tokens in all).

The engine's decode-only steps of up to 5 rows run the same five kernels over its page pool
(`fused_paged_decode_step`, with `paged_attention.paged_decode_attention` reading each row's
past through its block table): the runner adds the copies and gives those steps buckets of
1, 2, 4 and 5 rows (`jdecode.engine.runner.ModelRunner.decode_buckets`). On an H100 a
128-token request through the engine took 0.075 s on the SmolLM2 shape and 0.144 on the 1B
shape with these steps, against 0.106 and 0.181 on the general path, level with the
Generator (benchmarks/engine_decode_h200.md, stop 43).

It computes the same function as the general path: the kernels keep the model's roundings
(the attention output is rounded to the model dtype, as the general path stores it), and tests
compare the two on random weights (tests/model/test_fused_decode.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jdecode.cache.dense import DenseKVCache
from jdecode.cache.paged import PagedKVCache, PagedMeta
from jdecode.config import ModelConfig
from jdecode.model.layers import rms_norm, rope_tables
from jdecode.model.params import Params
from jdecode.model.transformer import LayerHooks, lm_head
from pallas_kernels.fused_decode import (
    MAX_ROWS,
    attn_o_residual,
    decode_attention,
    gate_up_swiglu,
    gemv_residual,
    qkv_rope,
)
from pallas_kernels.fused_decode.attention import BLOCK_K, default_splits
from pallas_kernels.fused_decode.block_attention import block_attention
from pallas_kernels.fused_decode.kernel import F32_MAX_ROWS, FMA_MAX_ROWS
from pallas_kernels.fused_decode.layer import barrier_timeouts, decode_layer, new_counters
from pallas_kernels.fused_decode.paged_attention import paged_block_k, paged_decode_attention
from pallas_kernels.fused_decode.reference import last_writers

DTYPES = ("float32", "bfloat16", "float16")
# "1" turns the fused step on for 1..MAX_ROWS (64) rows, "0" off, "layer" on with one
# persistent kernel per layer. Unset ("auto"): on where it measured faster, i.e. steps of
# <= FMA_MAX_ROWS rows over params carrying the [N, K] copies, which the Generator makes by
# default for models of up to DEFAULT_COPY_LIMIT bytes of parameters.
ENV_SWITCH = "JDECODE_FUSED_DECODE"
# The copies double the four matrices' memory: past this size the default leaves them out.
DEFAULT_COPY_LIMIT = 4 << 30
# Benchmarks' impl names for the two decode paths under impl="pallas" (see `impl_variant`).
VARIANTS = {"pallas-fused": "1", "pallas-general": "0", "pallas-layer": "layer"}


@contextlib.contextmanager
def impl_variant(impl: str) -> Iterator[str]:
    """Benchmarks' impl names: "pallas-fused" / "pallas-general" are impl="pallas" with the
    fused step switched on / off while the context holds (traces made inside it follow the
    switch), so both are timed in one run; any other impl passes through unchanged."""
    if impl not in VARIANTS:
        yield impl
        return
    before = os.environ.get(ENV_SWITCH)
    os.environ[ENV_SWITCH] = VARIANTS[impl]
    try:
        yield "pallas"
    finally:
        if before is None:
            del os.environ[ENV_SWITCH]
        else:
            os.environ[ENV_SWITCH] = before


def fused_decode_switch() -> str:
    """JDECODE_FUSED_DECODE as "on", "off", "layer" or "auto" (unset); other values are an
    error."""
    value = os.environ.get(ENV_SWITCH)
    modes = {None: "auto", "": "auto", "1": "on", "0": "off", "layer": "layer"}
    if value not in modes:
        raise ValueError(f"{ENV_SWITCH}={value!r}: set it to 1 (on), 0 (off), layer (on, one "
                         "kernel per layer), or leave it unset (on where it measured faster)")
    return modes[value]


def wants_decode_copies(params: Params) -> bool:
    """Whether a Generator on the GPU should add `with_decode_copies` to these params."""
    mode = fused_decode_switch()
    if mode != "auto":
        return mode != "off"
    size = sum(a.nbytes for a in jax.tree_util.tree_leaves(params))
    return size <= DEFAULT_COPY_LIMIT


@struct.dataclass
class DecodeParams(Params):
    """Params plus [N, K] copies of each layer's four matrices, for the fused decode step.

    A subclass rather than a new field of `Params` or `LayerParams`: checkpoints (orbax) are
    saved and restored as plain Params, and an extra field would change their tree structure.
    Everything that takes Params takes these; rebuilding a plain Params drops the copies, and
    the step then falls back to the general path (see `fused_decode_reason`). Code that
    replaces the layers of a DecodeParams must call `with_decode_copies` on a plain Params
    again: copies of another layer count are ignored, but same-count copies are trusted.
    """

    decode_t: tuple = ()  # per layer: (wqkv, wo, w_gate_up, w_down) transposed to [N, K]
    # What a Params subclass carried besides the weights: `BundledParams.extra`, the Medusa
    # heads or EAGLE draft that a method reads as `params.extra`. Dropping it when the copies
    # are added broke those methods on the GPU (their default path adds the copies).
    extra: Any = None


def _fused_unstacked(params: Params) -> bool:
    """The inference layout the step reads: unstacked layers with fused QKV and gate/up."""
    layers = params.layers
    return (isinstance(layers, tuple) and layers[0].wqkv is not None
            and layers[0].w_gate_up is not None)


def with_decode_copies(params: Params) -> Params:
    """The inference layout plus its [N, K] copies (`DecodeParams`).

    The fused GEMVs' CUDA-core path reads a weight along K, which the [K, N] layout has
    strided. The copies cost a second copy of those matrices (about the model's size);
    params in another layout are returned unchanged.
    """
    if isinstance(params, DecodeParams) or not _fused_unstacked(params):
        return params
    copies = tuple(tuple(jnp.transpose(w) for w in (lp.wqkv, lp.wo, lp.w_gate_up, lp.w_down))
                   for lp in params.layers)
    fields = {f.name: getattr(params, f.name) for f in dataclasses.fields(Params)}
    extras = {f.name for f in dataclasses.fields(params)} - set(fields)
    if extras - {"extra"}:
        raise TypeError(f"with_decode_copies: {type(params).__name__} carries {sorted(extras)}, "
                        "which DecodeParams would drop; give DecodeParams those fields")
    return DecodeParams(**fields, decode_t=copies, extra=getattr(params, "extra", None))


def _has_copies(params: Params) -> bool:
    """Params carrying [N, K] copies, one per layer (a layer subset's stale copies do not)."""
    return (isinstance(params, DecodeParams) and isinstance(params.layers, tuple)
            and len(params.decode_t) == len(params.layers))


def fused_decode_reason(params: Params, cache, cfg: ModelConfig, rows: int,
                        tokens: int = 1) -> str | None:
    """Why the fused step cannot run here, or None when it can (all static checks).

    rows: the step's rows in all (batch x tokens); tokens: per batch row, > 1 for a verify
    step (`fused_verify_step`).
    """
    if tokens > 1 and fused_decode_switch() == "layer":
        return (f"{ENV_SWITCH}=layer covers one-token steps; set {ENV_SWITCH}=1 for the fused "
                "verify step")
    reason = _switch_reason(params, rows)
    if reason is not None:
        return reason
    if not isinstance(cache, DenseKVCache):
        return "needs a dense cache (init_cache)"
    if not cache.per_layer and fused_decode_switch() == "layer":
        return (f"{ENV_SWITCH}=layer needs a cache with per-layer buffers "
                "(init_cache(per_layer=True))")
    if cache.written is not None:
        return "the cache tracks writes (a method leaves some tokens' K/V out)"
    reason = _model_reason(params, cfg, rows)
    if reason is not None:
        return reason
    if cache.max_len % BLOCK_K:
        return f"cache length {cache.max_len} is not a multiple of {BLOCK_K}"
    return _cache_dtype_reason((cache.k[0] if cache.per_layer else cache.k).dtype, params)


def fused_paged_reason(params: Params, cache, meta, cfg: ModelConfig, rows: int
                       ) -> str | None:
    """Why `fused_paged_decode_step` cannot run the engine's step here, or None when it can.

    rows: the step's flat tokens (one per row). meta: its `PagedMeta`; only steps of decodes
    alone qualify, each slot's token in its row (the runner's packing).
    """
    if not isinstance(cache, PagedKVCache) or not isinstance(meta, PagedMeta):
        return "needs the engine's page pool (PagedKVCache) and its step's PagedMeta"
    if not meta.decodes_only:
        return "the step has prefill chunks: only steps of decodes alone (decodes_only)"
    if rows > meta.context_lens.shape[0]:
        return f"{rows} rows but {meta.context_lens.shape[0]} sequence slots"
    return _paged_reason(params, cfg, rows, cache.page_size, cache.k_pages.dtype)


def fused_paged_rows(params: Params, cfg: ModelConfig, page_size: int, cache_dtype,
                     slots: int) -> int:
    """The most rows (at most `slots`) of an engine's decode-only step that
    `fused_paged_decode_step` takes, 0 for none: the runner pads those steps to fewer rows
    than its token buckets."""
    fits = [r for r in range(1, min(slots, MAX_ROWS) + 1)
            if _paged_reason(params, cfg, r, page_size, cache_dtype) is None]
    return max(fits, default=0)


def _paged_reason(params: Params, cfg: ModelConfig, rows: int, page_size: int,
                  cache_dtype) -> str | None:
    """`fused_paged_reason`'s checks that the step's arrays do not change."""
    if fused_decode_switch() == "layer":
        return (f"{ENV_SWITCH}=layer runs the Generator's dense cache only; set "
                f"{ENV_SWITCH}=1 for the five kernels over pages")
    reason = _switch_reason(params, rows) or _model_reason(params, cfg, rows)
    if reason is not None:
        return reason
    if page_size & (page_size - 1):
        return f"page size {page_size} is not a power of 2"
    return _cache_dtype_reason(jnp.dtype(cache_dtype), params)


def _switch_reason(params: Params, rows: int) -> str | None:
    """What the switch and its default say against a step of `rows` rows."""
    mode = fused_decode_switch()
    if mode == "off":
        return f"off: {ENV_SWITCH}=0"
    if mode == "auto" and not _has_copies(params):
        return (f"no [N, K] weight copies (with_decode_copies): the step is on by default only "
                f"with them; set {ENV_SWITCH}=1 to force it")
    if mode == "auto" and rows > FMA_MAX_ROWS:
        # A verify step counts batch x tokens rows: on the H200 the fused one beat the general
        # path at 2-5 rows (1.25-1.95 decode steps against 2.4) and lost from 8 (2.9-4.0),
        # benchmarks/verify_h200.md.
        return (f"{rows} rows: by default only steps of <= {FMA_MAX_ROWS} rows, where it "
                f"measured faster; set {ENV_SWITCH}=1 to force it")
    if mode == "layer" and (not _has_copies(params) or rows > FMA_MAX_ROWS):
        return (f"{ENV_SWITCH}=layer needs the [N, K] weight copies (with_decode_copies) and "
                f"<= {FMA_MAX_ROWS} rows (got {rows}); set {ENV_SWITCH}=1 for five kernels")
    return None


def _model_reason(params: Params, cfg: ModelConfig, rows: int) -> str | None:
    """What the model's layout, shapes and dtype say against the kernels."""
    layers = params.layers
    if not _fused_unstacked(params):
        return "needs the fused, unstacked inference layout (layout.inference_layout)"
    if layers[0].bqkv is not None:
        return "QKV biases are not in the kernels"
    if cfg.sliding_window is not None:
        return "sliding-window attention is not in the kernels"
    if not 1 <= rows <= MAX_ROWS:
        return f"{rows} rows: the kernels take one tile of at most {MAX_ROWS}"
    if layers[0].wqkv.dtype.name not in DTYPES or params.embed.dtype != layers[0].wqkv.dtype:
        return f"dtype {layers[0].wqkv.dtype.name} is not one of {DTYPES}"
    if layers[0].wqkv.dtype.itemsize == 4 and rows > F32_MAX_ROWS:
        return (f"{rows} rows of float32: the kernels' tiles past {F32_MAX_ROWS} overflow "
                "the GPU's shared memory; use bfloat16 or fewer rows")
    D, E, F = cfg.head_dim, cfg.hidden_size, cfg.intermediate_size
    if D < 32 or D & (D - 1) or E % 16 or F % 16:
        return ("head_dim must be a power of two >= 32, hidden and intermediate sizes "
                "multiples of 16")
    return None


def _cache_dtype_reason(cache_dtype, params: Params) -> str | None:
    if cache_dtype != params.layers[0].wqkv.dtype:
        return (f"cache dtype {cache_dtype} differs from the model's "
                f"{params.layers[0].wqkv.dtype}: the attention kernel reads both as one")
    return None


def fused_decode_step(params: Params, cache: DenseKVCache, tokens: jax.Array,
                      positions: jax.Array, *, cfg: ModelConfig
                      ) -> tuple[jax.Array, jax.Array, DenseKVCache]:
    """One decode step: tokens [B] at positions [B] (= their cache slots).

    Returns:
      logits [B, V] f32, hidden [B, E] (final-normed), and the cache with this step written.
    """
    x = params.embed[tokens]  # [B, E]
    cos, sin = rope_tables(positions[:, None], cfg)  # [B, 1, D/2]
    cos, sin = cos[:, 0], sin[:, 0]
    splits = default_splits(cache.max_len, tokens.shape[0], cfg.hidden_size,
                            cfg.num_heads * cfg.head_dim)
    if fused_decode_switch() == "layer":  # `fused_decode_reason` checked copies, rows, layout
        ks, vs = list(cache.k), list(cache.v)
        x = _persistent_layers(params, x, ks, vs, positions, cos, sin, cfg=cfg, splits=splits)
        cache = DenseKVCache(k=tuple(ks), v=tuple(vs))
    else:
        # The token's K/V go to slot `position` (nothing past the buffer, as the general
        # path's mode="drop"); parts [B, splits, H * D] and lse [B, splits, H], f32.
        attend, written = _layer_attention(cache, lambda qkv, k, v, layer: decode_attention(
            qkv, k, v, positions, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
            num_splits=splits, layer=layer))
        x = _five_kernel_layers(params, x, cos, sin, attend, cfg=cfg)
        cache = written()
    hidden = rms_norm(x, params.final_norm, cfg.rms_norm_eps)
    return lm_head(params, hidden), hidden, cache


def _layer_attention(cache: DenseKVCache, kernel: Callable):
    """(attend, written): `attend(layer, qkv)` for `_five_kernel_layers` over the dense cache,
    and `written()`, the cache after the layers ran. kernel(qkv, k, v, layer) is one layer's
    attention, returning (parts, lse, k, v): over that layer's buffers (layer=None) for a
    per-layer cache, or over the stacked [L, ...] pair with `layer` an index into it, which
    each call updates in place (`attention.cache_lead`)."""
    if cache.per_layer:
        ks, vs = list(cache.k), list(cache.v)

        def attend(layer, qkv):
            parts, lse, ks[layer], vs[layer] = kernel(qkv, ks[layer], vs[layer], None)
            return parts, lse
        return attend, lambda: DenseKVCache(k=tuple(ks), v=tuple(vs))
    kv = [cache.k, cache.v]

    def attend_stacked(layer, qkv):
        parts, lse, kv[0], kv[1] = kernel(qkv, kv[0], kv[1], layer)
        return parts, lse
    return attend_stacked, lambda: DenseKVCache(k=kv[0], v=kv[1])


def fused_paged_decode_step(params: Params, cache: PagedKVCache, tokens: jax.Array,
                            positions: jax.Array, meta: PagedMeta, *, cfg: ModelConfig
                            ) -> tuple[jax.Array, PagedKVCache]:
    """The engine's decode-only step through the fused kernels: N rows, slot b's token in row
    b (`PagedMeta.decodes_only`), attention over the page pool (`paged_decode_attention`).

    Args:
      tokens, positions: [N] int32 (N <= the meta's B slots; padding rows: slot -1).
      meta: the step's PagedMeta; row b reads block_tables[b] and context_lens[b] (its keys
        after this step) and stores its K/V at slot_mapping[b].
    Returns:
      logits [N, V] f32 and the pool with this step's K/V stored.
    """
    n = tokens.shape[0]
    x = params.embed[tokens]  # [N, E]
    cos, sin = rope_tables(positions[:, None], cfg)  # [N, 1, D/2]
    cos, sin = cos[:, 0], sin[:, 0]
    ctx, tables = meta.context_lens[:n], meta.block_tables[:n]  # [N], [N, W]
    pool = [cache.k_pages, cache.v_pages]
    splits = default_splits(tables.shape[1] * cache.page_size, n, cfg.hidden_size,
                            cfg.num_heads * cfg.head_dim, block_k=paged_block_k(cache.page_size))

    def attend(layer, qkv):
        parts, lse, pool[0], pool[1] = paged_decode_attention(
            qkv, pool[0], pool[1], layer, ctx, meta.slot_mapping, tables,
            num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, num_splits=splits)
        return parts, lse

    x = _five_kernel_layers(params, x, cos, sin, attend, cfg=cfg)
    hidden = rms_norm(x, params.final_norm, cfg.rms_norm_eps)
    return lm_head(params, hidden), PagedKVCache(*pool)


def block_visibility(slots: jax.Array, mask: jax.Array | None) -> jax.Array:
    """[B, T, T] bool: whether token t of a step sees token u's K/V, as the general path's
    cache would show it (`dense_attend`): u's slot is at most t's, u is the last of the step's
    tokens written to that slot (a clamped draft window writes slot 0 more than once), and
    `mask` ([B, T, T] bool, a tree's ancestors) allows it.

    slots: [B, T] int32, where each token's K/V go.
    """
    causal = slots[:, None, :] <= slots[:, :, None]  # [B, query, key]
    vis = causal & last_writers(slots)[:, None, :]
    return vis if mask is None else vis & mask


def fused_verify_step(params: Params, cache: DenseKVCache, tokens: jax.Array,
                      positions: jax.Array, slots: jax.Array, mask: jax.Array | None = None,
                      *, cfg: ModelConfig, hooks: LayerHooks | None = None) -> tuple:
    """A verify step of T tokens per row through the fused kernels: the B x T tokens are the
    GEMVs' rows, and `block_attention` attends each token to its row's committed cache and to
    the step's own tokens.

    Args:
      tokens: [B, T] int32. positions: [B, T] int32, their positions (RoPE). slots: [B, T]
        int32, their cache slots (= positions for a chain; root + i for a tree's node i).
      mask: optional [B, T, T] bool, token t may see token u (a tree's ancestors).
      hooks: optional layer hooks without `before` (`fused_hooks_reason`): their `after` sees
        each layer's x [B, T, E] between the kernels, as in the general forward (EAGLE's
        feature taps).
    Returns:
      logits [B, T, V] f32, hidden [B, T, E] (final-normed), and the cache with the step's
      K/V written; with hooks, also their final carry.

    A row's committed cache is its slots below the step's lowest: the step's slots are
    assumed to start there without gaps (a chain at consecutive positions, a tree at root +
    i), as every method's are. Unlike the general path, a token whose slot lies past the
    buffer still sees its own K/V (from registers), as in `fused_decode_step`.
    """
    b, t = tokens.shape
    x = params.embed[tokens.reshape(-1)]  # [B * T, E], token-major per row
    cos, sin = rope_tables(positions.reshape(-1, 1), cfg)  # [B * T, 1, D/2]
    cos, sin = cos[:, 0], sin[:, 0]
    past = jnp.min(slots, axis=1)  # [B]
    vis = block_visibility(slots, mask)
    splits = default_splits(cache.max_len, b * t, cfg.hidden_size,
                            cfg.num_heads * cfg.head_dim)
    attend, written = _layer_attention(cache, lambda qkv, k, v, layer: block_attention(
        qkv, k, v, slots, past, vis, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
        num_splits=splits, layer=layer))

    carry = [None if hooks is None else hooks.init(x.reshape(b, t, -1))]

    def after(layer, x_in, x_out):  # the hooks see [B, T, E], the kernels take [B * T, E]
        carry[0], x_out = hooks.after(carry[0], x_in.reshape(b, t, -1),
                                      x_out.reshape(b, t, -1), layer)
        return x_out.reshape(b * t, -1)

    has_after = hooks is not None and hooks.after is not None
    x = _five_kernel_layers(params, x, cos, sin, attend, cfg=cfg,
                            after=after if has_after else None)
    hidden = rms_norm(x, params.final_norm, cfg.rms_norm_eps)
    logits = lm_head(params, hidden)
    out = (logits.reshape(b, t, -1), hidden.reshape(b, t, -1), written())
    return out if hooks is None else (*out, carry[0])


def fused_hooks_reason(hooks: LayerHooks | None) -> str | None:
    """Why the fused steps cannot run these layer hooks, or None when they can: hooks that
    only look at (or replace) each layer's output run between the kernels, but a `before`
    hook may skip a layer's tokens or their K/V writes (`LayerControl`), which the kernels
    do not take."""
    if hooks is not None and hooks.before is not None:
        return "layer hooks with `before` (per-token compute or K/V control)"
    return None


def _five_kernel_layers(params: Params, x, cos, sin, attend, *, cfg: ModelConfig,
                        after=None) -> jax.Array:
    """The layers as five kernels each over x [R, E]. attend(layer, qkv) -> (parts, lse) is
    the step's attention kernel, which also stores the layer's K/V in the cache it holds;
    after(layer, x_in, x_out) -> x, if given, sees each layer's input and output and returns
    what the next layer takes."""
    eps, H, K = cfg.rms_norm_eps, cfg.num_heads, cfg.num_kv_heads
    t = _has_copies(params)  # [N, K] copies (`with_decode_copies`): the CUDA-core GEMVs
    for layer, lp in enumerate(params.layers):
        wqkv, wo, w_gate_up, w_down = (params.decode_t[layer] if t else
                                       (lp.wqkv, lp.wo, lp.w_gate_up, lp.w_down))
        x_in = x
        qkv = qkv_rope(x, lp.attn_norm, wqkv, cos, sin, num_heads=H, num_kv_heads=K, eps=eps,
                       transposed=t)  # [R, (H + 2K) * D]
        parts, lse = attend(layer, qkv)
        x = attn_o_residual(parts, lse, wo, x, transposed=t)
        act = gate_up_swiglu(x, lp.mlp_norm, w_gate_up, eps=eps, transposed=t)  # [R, F]
        x_out = gemv_residual(act, w_down, x, transposed=t)
        x = x_out if after is None else after(layer, x_in, x_out)
    return x


def _persistent_layers(params: Params, x, ks: list, vs: list, positions, cos, sin, *,
                       cfg: ModelConfig, splits: int) -> jax.Array:
    """The layers as one persistent kernel each (`decode_layer`); ks / vs updated in place."""
    counters = new_counters(len(params.layers))  # the step's grid-barrier counters
    for layer, lp in enumerate(params.layers):
        wqkv, wo, w_gate_up, w_down = params.decode_t[layer]
        x, ks[layer], vs[layer], counters = decode_layer(
            x, positions, cos, sin, ks[layer], vs[layer], counters, layer, lp.attn_norm, wqkv,
            wo, lp.mlp_norm, w_gate_up, w_down, num_heads=cfg.num_heads,
            num_kv_heads=cfg.num_kv_heads, eps=cfg.rms_norm_eps, num_splits=splits)
    # A barrier that gave up (a grid not all resident, e.g. a GPU shared through MPS) left the
    # step's output wrong: make that visible as NaN logits, not plausible tokens.
    return jnp.where(barrier_timeouts(counters) > 0, jnp.nan, x)
