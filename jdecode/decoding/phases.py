"""The jitted phases over a dense cache: `prefill`, `decode_step`, `verify` and `verify_tree`.

Each is a pure function; callers jit it with `cfg`/`impl` static and the cache donated
(see `jdecode.decoding.generate`), so the cache is updated in place. Each takes optional layer
hooks (`jdecode.model.transformer.LayerHooks`) and then also returns their final carry.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jdecode.cache.dense import DenseKVCache, DenseMeta, init_cache, make_dense_attend
from jdecode.config import ModelConfig
from jdecode.decoding.tree import Tree
from jdecode.model.fused_decode import (
    fused_decode_reason,
    fused_decode_step,
    fused_hooks_reason,
    fused_verify_step,
)
from jdecode.model.linear import make_linear
from jdecode.model.params import Params
from jdecode.model.transformer import LayerHooks, forward


def layout_cache(params: Params, cfg: ModelConfig, rows: int, max_len: int,
                 track_writes: bool = False) -> DenseKVCache:
    """The zeroed dense cache laid out as the params are: stacked [L, ...] K and V for the
    scan layout, one buffer per layer for the unrolled one (so each layer's K/V is written and
    read in place). The cache of every pass but the plain method's fused decode loop
    (`decode_cache`): prefill, verify blocks, trees and hooked layers were measured over it."""
    return init_cache(cfg, rows, max_len, per_layer=isinstance(params.layers, tuple),
                      track_writes=track_writes)


def decode_cache(params: Params, cfg: ModelConfig, rows: int, max_len: int, impl: str = "xla",
                 track_writes: bool = False) -> DenseKVCache:
    """The zeroed dense cache of a decoder whose steps take `rows` rows one token at a time.

    The layout follows the params': stacked [L, ...] K and V for the scan layout, one buffer
    per layer for the unrolled one, except where `decode_step` will take the fused kernels:
    they index a stacked pair by layer, and the pair is two leaves where per-layer buffers
    are 2L. Each leaf of the loop state costs every call of the Generator's loop ~8.5 us of
    host time on an H100 (its donation and its output), with the device idle: ~0.5 ms a call
    for SmolLM2's 60 buffers (benchmarks/fused_decode_h200.md, stop 49). On an H200 the 1B
    shape then ran 1% faster and SmolLM2 level, and each compiled 1-4 s longer while the
    kernels took the layer as a constant (stop 50); they read it from an operand now, one
    compiled kernel for every layer (`attention.cache_lead`; stop 51).
    """
    if isinstance(params.layers, tuple) and impl == "pallas":
        stacked = jax.eval_shape(lambda: init_cache(cfg, rows, max_len,
                                                    track_writes=track_writes))
        if fused_decode_reason(params, stacked, cfg, rows) is None:
            return init_cache(cfg, rows, max_len, track_writes=track_writes)
    return layout_cache(params, cfg, rows, max_len, track_writes)


def prefill(params: Params, cache: DenseKVCache, tokens: jax.Array, lengths: jax.Array, *,
            cfg: ModelConfig, impl: str = "xla", hooks: LayerHooks | None = None) -> tuple:
    """Fills the cache from right-padded prompts.

    Args:
      tokens: [B, T] int32, prompt b occupies tokens[b, :lengths[b]] (T is the length bucket).
      lengths: [B] int32 true prompt lengths (>= 1).
    Returns:
      last_logits [B, V] f32 at position lengths-1, last_hidden [B, E], the cache (and, with
      hooks, their carry).

    The prompt starts at position 0, so with impl="xla" attention runs over the prompt's own
    keys in causal tiles (`causal_attention_tiled`): memory stays O(T), not O(T x cache).
    """
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    logits, hidden, *rest = forward(
        params, tokens, positions, cache, DenseMeta(positions), cfg=cfg,
        attend=make_dense_attend(cfg, impl, prompt=True), logits_at=(lengths - 1)[:, None],
        linear=make_linear(impl), hooks=hooks)
    return (logits[:, 0], hidden[:, 0], *rest)


def decode_step(params: Params, cache: DenseKVCache, tokens: jax.Array, positions: jax.Array,
                *, cfg: ModelConfig, impl: str = "xla", hooks: LayerHooks | None = None
                ) -> tuple:
    """One incremental step: tokens [B] at positions [B] -> logits [B, V], hidden [B, E],
    the cache (and, with hooks, their carry).

    With impl="pallas" and no hooks, steps of a few rows (up to 4 by default) over a dense
    cache (stacked or per-layer: `decode_cache`) with params in the inference layout run as
    fused kernels, five per layer (`jdecode.model.fused_decode`, which says when it is on).
    """
    if (impl == "pallas" and hooks is None
            and fused_decode_reason(params, cache, cfg, tokens.shape[0]) is None):
        return fused_decode_step(params, cache, tokens, positions, cfg=cfg)
    logits, hidden, *rest = verify(params, cache, tokens[:, None], positions[:, None],
                                   cfg=cfg, impl=impl, hooks=hooks)
    return (logits[:, 0], hidden[:, 0], *rest)


def verify(params: Params, cache: DenseKVCache, tokens: jax.Array, positions: jax.Array, *,
           cfg: ModelConfig, impl: str = "xla", hooks: LayerHooks | None = None) -> tuple:
    """Scores T tokens per sequence in one pass (speculative / Medusa verification).

    Args:
      tokens: [B, T] int32 candidate tokens. positions: [B, T] int32, their positions.
    Returns:
      logits [B, T, V] f32, hidden [B, T, E], and the cache with all T slots written (the
      caller rolls back simply by not advancing its lengths past the accepted tokens); with
      hooks, also their carry.

    With impl="pallas", JDECODE_FUSED_DECODE=1 and no `before` hooks, a step of up to 64
    tokens in all runs as fused kernels (`fused_verify_step`; `fused_decode_reason` says
    when).
    """
    if _fused_verify(params, cache, cfg, impl, hooks, tokens.shape):
        return fused_verify_step(params, cache, tokens, positions, positions, cfg=cfg,
                                 hooks=hooks)
    return forward(params, tokens, positions, cache, DenseMeta(positions), cfg=cfg,
                   attend=make_dense_attend(cfg, impl), linear=make_linear(impl), hooks=hooks)


def _fused_verify(params: Params, cache, cfg: ModelConfig, impl: str, hooks, shape) -> bool:
    """Whether a verify step of tokens `shape` [B, T] takes the fused kernels (T > 1: one
    token per row is `decode_step`'s, whose fused path is on by default). Hooks that only
    see each layer's output (EAGLE's feature taps) run between the kernels."""
    b, t = shape
    return (impl == "pallas" and fused_hooks_reason(hooks) is None and t > 1
            and fused_decode_reason(params, cache, cfg, b * t, tokens=t) is None)


def score(params: Params, tokens: jax.Array, *, cfg: ModelConfig, impl: str = "xla",
          hooks: LayerHooks | None = None, track_writes: bool = False) -> tuple:
    """Teacher-forced pass over whole sequences with a fresh cache (training, quality metrics).

    Args:
      tokens: [B, T] int32 (right-padded rows are fine: position t sees only tokens <= t).
      hooks: optional layer hooks. track_writes: a cache that tracks writes (for hooks that
        leave tokens' K/V out, see `LayerControl.write_kv`).
    Returns:
      logits [B, T, V] f32 (position t predicts token t+1) and hidden [B, T, E] (and, with
      hooks, their carry).
    """
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cache = init_cache(cfg, b, t, track_writes=track_writes)
    logits, hidden, _, *rest = verify(params, cache, tokens, positions, cfg=cfg, impl=impl,
                                      hooks=hooks)
    return (logits, hidden, *rest)


def verify_tree(params: Params, cache: DenseKVCache, tokens: jax.Array, positions: jax.Array,
                tree: Tree, *, cfg: ModelConfig, impl: str = "xla",
                hooks: LayerHooks | None = None) -> tuple:
    """Scores every node of a candidate tree per row in one pass (tree attention).

    Node i of row b is tokens[b, i] at position positions[b] + depths[b, i]. It attends to the
    committed cache (slots < positions[b]), its ancestors and itself, so its logits equal those
    of decoding its root-to-node path one token at a time. Its K/V go to the scratch slot
    positions[b] + i; `tree.commit_path` moves the accepted path into place (the layout, and
    the N - 1 extra cache slots it needs, are explained in `jdecode.decoding.tree`).

    Args:
      tokens: [B, N] int32 node tokens; node 0 is the root, the last emitted token (not yet in
        the cache). positions: [B] int32 the root's position (= tokens in the cache).
      tree: the rows' trees (`tree.tree_from_parents`, `tree.StaticTree.arrays`).
    Returns:
      logits [B, N, V] f32 (node i's distribution for its children), hidden [B, N, E], and the
      cache with node i's K/V at slot positions + i (and, with hooks, their carry).
    """
    if cfg.sliding_window is not None:
        raise ValueError(f"sliding_window={cfg.sliding_window}: tree verification measures "
                         "the window from scratch slots, not positions, so it is not supported "
                         "for sliding-window models; verify a chain with `verify` instead")
    slots = positions[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)  # [B, N]
    if _fused_verify(params, cache, cfg, impl, hooks, tokens.shape):
        return fused_verify_step(params, cache, tokens, positions[:, None] + tree.depths, slots,
                                 tree.ancestors, cfg=cfg, hooks=hooks)
    return forward(params, tokens, positions[:, None] + tree.depths, cache,
                   DenseMeta(slots, mask=tree.ancestors), cfg=cfg,
                   attend=make_dense_attend(cfg, impl), linear=make_linear(impl), hooks=hooks)
