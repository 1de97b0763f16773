"""Dense KV cache: slot index = token position, one [B, S, K, D] buffer per layer (stacked on
a leading L axis for `lax.scan`, or a tuple of per-layer buffers for the unrolled layout)."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import struct

from jdecode.config import ModelConfig
from jdecode.model.attention import APPLIES_ROPE, attention, causal_attention_tiled
from jdecode.model.layers import apply_rope
from jdecode.model.pallas_dispatch import (
    dense_decode_pallas,
    dense_decode_writing,
    writes_in_kernel,
)
from pallas_kernels.fused_decode.attention import BLOCK_K
from pallas_kernels.fused_decode.reference import last_writers


@struct.dataclass
class DenseKVCache:
    k: jax.Array | tuple[jax.Array, ...]  # [L, B, S, K, D], or L x [B, S, K, D]
    v: jax.Array | tuple[jax.Array, ...]
    # [L, B, S] bool (or L x [B, S]) per layer: the slot holds K/V its token stored, or None
    # (every written slot counts). Tracked when a layer may leave tokens out (`write` below:
    # mixture-of-depths), so later queries do not attend to the stale K/V left in their slots.
    written: jax.Array | tuple[jax.Array, ...] | None = None

    @property
    def per_layer(self) -> bool:
        return isinstance(self.k, tuple)

    @property
    def max_len(self) -> int:
        return self.k[0].shape[1] if self.per_layer else self.k.shape[2]


def with_scratch(max_len: int, scratch: int) -> int:
    """Cache slots for max_len tokens plus `scratch` more (a tree's nodes past the root),
    rounded up to whole BLOCK_K blocks: the fused step's attention walks the cache in them
    and declines other lengths."""
    return -(-(max_len + scratch) // BLOCK_K) * BLOCK_K


@struct.dataclass
class DenseMeta:
    positions: jax.Array  # [B, T] int32 slot each query token writes and attends from
    # [B, T, T] bool: query t may see the K/V query u wrote (tree attention), or None: causal.
    # The slots are positions, except where a caller places tokens elsewhere on purpose (tree
    # verification writes node i at root + i; see `jdecode.decoding.tree`).
    mask: jax.Array | None = None


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: str | None = None,
               per_layer: bool = False, track_writes: bool = False) -> DenseKVCache:
    """Zeroed cache (never jnp.empty: on jax 0.11 it returns uninitialized memory).

    per_layer: one buffer per layer (pairs with unstacked params). Then a layer's K/V is
    written and read in place; slicing layer l out of a stacked buffer would feed attention a
    copy of [B, S, K, D] per layer per step.
    track_writes: keep `written` flags, so a step may store K/V for some of its tokens only
    (`dense_attend`'s `write`); attention then runs on the XLA path.
    """
    dt = jnp.dtype(dtype or cfg.dtype)
    shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    if per_layer:
        zeros = tuple(jnp.zeros(shape, dt) for _ in range(cfg.num_layers))
        written = tuple(jnp.zeros((batch, max_len), bool) for _ in zeros)
        return DenseKVCache(k=zeros, v=tuple(jnp.zeros(shape, dt) for _ in zeros),
                            written=written if track_writes else None)
    written = jnp.zeros((cfg.num_layers, batch, max_len), bool)
    return DenseKVCache(k=jnp.zeros((cfg.num_layers, *shape), dt),
                        v=jnp.zeros((cfg.num_layers, *shape), dt),
                        written=written if track_writes else None)


def dense_attend(q: jax.Array, k: jax.Array, v: jax.Array, cache: DenseKVCache,
                 layer: jax.Array | int, meta: DenseMeta, *, impl: str = "xla",
                 sliding_window: int | None = None, write: jax.Array | None = None,
                 prompt: bool = False, rope: tuple | None = None
                 ) -> tuple[jax.Array, DenseKVCache]:
    """Writes K/V of this step at their positions, then attends over the whole buffer.

    Stale slots (padding of a shorter prompt, tokens rolled back by speculative decoding) are
    never visible: a query at position p sees only slots <= p, and every slot <= p was written
    by this step or holds an accepted token. `meta.mask`, if set, further restricts which of
    this step's own slots each query sees. A cache that tracks writes also hides every slot
    whose token did not store its K/V at this layer.

    Args:
      q: [B, T, H, D]; k, v: [B, T, K, D] (RoPE applied). layer: int32 scalar (a Python int
        for a per-layer cache). write: optional [B, T] bool, the tokens that store their K/V
        (the others' slots are marked unwritten; needs `init_cache(track_writes=True)`).
      prompt: the step is a whole prompt at positions 0..T-1 (prefill). Each query then sees
        only keys this step wrote, so the XLA path attends over them alone, tile by tile
        (`causal_attention_tiled`), instead of over the whole buffer.
      rope: (cos, sin) [B, T, D/2] when q and k are not yet rotated (`APPLIES_ROPE`): the
        writing decode kernel rotates them inside, every other path first, as the layer
        would have.
    Returns:
      out [B, T, H, D] and the cache with this layer updated.
    """
    if write is not None and cache.written is None:
        raise ValueError("a layer stored K/V for some tokens only, but this cache does not "
                         "track writes: build it with init_cache(..., track_writes=True)")
    b = q.shape[0]
    rows = jnp.arange(b)[:, None]  # [B, 1] broadcasts against positions [B, T]
    pos = meta.positions
    # mode="drop": a padding query whose position lies past the buffer writes nothing.
    # One token per row (decode) writes one slot per row: the indices are unique and sorted,
    # and saying so lets XLA:GPU store without atomics. Before, each scatter took 2.9 us at
    # 64 rows of the 1B shape on an H200 (2 x 16 per step: 94 us of a 1.58 ms step).
    one = q.shape[1] == 1
    if (impl == "pallas" and one and cache.per_layer and cache.written is None
            and sliding_window is None and meta.mask is None
            and writes_in_kernel(q, cache.k[layer])):
        # The kernel stores K/V itself, so the two scatters per layer go: +1.6% at batch 16
        # and 64 and +6% at batch 1 (general path) on the 1B shape, H200 (fused_decode_h200.md).
        out, k_l, v_l = dense_decode_writing(q, k, v, cache.k[layer], cache.v[layer], pos,
                                             rope)
        return out, DenseKVCache(k=_put(cache.k, layer, k_l), v=_put(cache.v, layer, v_l))
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    scatter = {"mode": "drop", "unique_indices": one, "indices_are_sorted": one}
    # The slots written: of repeated slots only the last writer's (the others past the
    # buffer, dropped). The queries keep their positions.
    wpos = pos if one else jnp.where(last_writers(pos), pos, cache.max_len)
    if cache.per_layer:
        k_l = cache.k[layer].at[rows, wpos].set(k.astype(cache.k[layer].dtype), **scatter)
        v_l = cache.v[layer].at[rows, wpos].set(v.astype(cache.v[layer].dtype), **scatter)
        new = DenseKVCache(k=_put(cache.k, layer, k_l), v=_put(cache.v, layer, v_l))
        k_all, v_all, page_layer = k_l[None], v_l[None], 0  # a free view for the paged kernel
    else:
        k_all = cache.k.at[layer, rows, wpos].set(k.astype(cache.k.dtype), **scatter)
        v_all = cache.v.at[layer, rows, wpos].set(v.astype(cache.v.dtype), **scatter)
        new = DenseKVCache(k_all, v_all)
        k_l, v_l, page_layer = k_all[layer], v_all[layer], layer  # [B, S, K, D]
    kv_pos = jnp.broadcast_to(jnp.arange(cache.max_len, dtype=jnp.int32), (b, cache.max_len))
    if cache.written is not None:
        flags = jnp.ones(pos.shape, bool) if write is None else write  # [B, T]
        if cache.per_layer:
            written_l = cache.written[layer].at[rows, wpos].set(flags, mode="drop")  # [B, S]
            new = new.replace(written=_put(cache.written, layer, written_l))
        else:
            written = cache.written.at[layer, rows, wpos].set(flags, mode="drop")
            new, written_l = new.replace(written=written), written[layer]
        # An unwritten slot holds -1, the empty-slot position: no query sees it.
        kv_pos = jnp.where(written_l, kv_pos, -1)
        impl = "xla"  # the Pallas kernels assume slot s holds position s
    if impl == "pallas" and q.shape[1] == 1 and sliding_window is None and meta.mask is None:
        return dense_decode_pallas(q, k_all, v_all, page_layer, pos), new
    if prompt and impl == "xla" and meta.mask is None and cache.written is None:
        # The keys as the cache stores them (its dtype may be narrower than the compute's).
        kv_dtype = k_l.dtype
        return causal_attention_tiled(q, k.astype(kv_dtype), v.astype(kv_dtype),
                                      sliding_window=sliding_window), new
    out = attention(q, k_l, v_l, pos, kv_pos, impl=impl, sliding_window=sliding_window,
                    mask=meta.mask)
    return out, new


def copy_slots(cache: DenseKVCache, src: jax.Array, dst: jax.Array) -> DenseKVCache:
    """Copies every layer's K/V from slots src[b, j] to slots dst[b, j], per row.

    All slots are read before any is written, so a source may also be a destination.

    Args:
      src, dst: [B, M] int32 slots (dst past the buffer is dropped; keep src inside it).
    Returns:
      the cache with the copies made (in place when the caller donates it).
    """
    rows = jnp.arange(src.shape[0])[:, None]  # [B, 1] broadcasts against [B, M]
    if cache.per_layer:
        def move(buf):  # [B, S, K, D] (or [B, S] write flags)
            return buf.at[rows, dst].set(buf[rows, src], mode="drop")
        written = None if cache.written is None else tuple(map(move, cache.written))
        return DenseKVCache(k=tuple(map(move, cache.k)), v=tuple(map(move, cache.v)),
                            written=written)

    def move_all(buf):  # [L, B, S, ...]: all layers in one gather and one scatter
        return buf.at[:, rows, dst].set(buf[:, rows, src], mode="drop")
    written = None if cache.written is None else move_all(cache.written)
    return DenseKVCache(k=move_all(cache.k), v=move_all(cache.v), written=written)


def _put(buffers: tuple, layer: int, value: jax.Array) -> tuple:
    return buffers[:layer] + (value,) + buffers[layer + 1:]


def make_dense_attend(cfg: ModelConfig, impl: str = "xla", prompt: bool = False):
    """The model's AttendFn for a dense cache with a chosen attention implementation
    (`prompt`: the step is a whole prompt from position 0, see `dense_attend`)."""
    attend = partial(dense_attend, impl=impl, sliding_window=cfg.sliding_window, prompt=prompt)
    setattr(attend, APPLIES_ROPE, True)  # see dense_attend's `rope`
    return attend
