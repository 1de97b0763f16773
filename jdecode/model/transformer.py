"""The Llama-family forward pass: `lax.scan` over stacked layers (or an unrolled loop over
unstacked ones), attention via a pluggable `attend` function so dense and paged caches share one
model, and optional layer hooks through which a decoding method acts between layers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jdecode.config import ModelConfig
from jdecode.model.attention import APPLIES_ROPE, AttendFn
from jdecode.model.layers import apply_rope, rms_norm, rope_tables, swiglu_mlp
from jdecode.model.linear import LinearFn, xla_linear
from jdecode.model.params import LayerParams, Params


class LayerControl(NamedTuple):
    """What a hook decides for one layer; a None field keeps the plain layer.

    compute: [B, T] bool, the tokens whose residual stream this layer updates. The others pass
      x through unchanged. The layer still runs on every token (masked compute), so the
      skipped tokens' K/V at this layer are the projections of the x they carry in.
    write_kv: [B, T] bool, the tokens whose K/V this layer stores. The others' slots become
      invisible to every later query at this layer. Needs a cache that tracks writes
      (`jdecode.cache.dense.init_cache(track_writes=True)`).
    """

    compute: jax.Array | None = None
    write_kv: jax.Array | None = None


def _no_carry(x: jax.Array) -> None:
    return None


class LayerHooks(NamedTuple):
    """Callbacks around every decoder layer, threading a carry (any pytree) through the stack.

    init(x [B, T, E]) -> carry: the carry before the first layer, from the embedded tokens.
    before(carry, x, layer) -> (carry, x, LayerControl): reads or replaces the x entering
      `layer` and decides which tokens the layer computes and which store their K/V.
    after(carry, x_in, x_out, layer) -> (carry, x): sees the layer's input and its output
      (after `compute` masking) and returns the x the next layer gets.

    `layer` is the absolute layer index: an int32 scalar under `lax.scan` (stacked params) and
    a Python int in the unrolled layout, where a hook may branch on it statically. With no
    hooks, or hooks that return x unchanged and an empty LayerControl, the forward computes
    exactly what it computes without them.
    """

    init: Callable[[jax.Array], Any] = _no_carry
    before: Callable[..., tuple[Any, jax.Array, LayerControl]] | None = None
    after: Callable[..., tuple[Any, jax.Array]] | None = None


def collect_hidden(layers: tuple[int, ...]) -> LayerHooks:
    """Hooks that collect the residual stream after each of `layers` (e.g. EAGLE-3 features).

    Returns:
      hooks whose final carry is [len(layers), B, T, E]: entry i is x after layer layers[i]
      (layer -1 is the embedding output).
    """
    order = jnp.asarray(layers, jnp.int32)

    def init(x):
        feats = jnp.zeros((len(layers), *x.shape), x.dtype)
        return jnp.where((order == -1)[:, None, None, None], x[None], feats)

    def after(feats, x_in, x_out, layer):
        if isinstance(layer, int):  # unrolled: a static update, nothing for other layers
            for i in (i for i, l in enumerate(layers) if l == layer):
                feats = feats.at[i].set(x_out)
            return feats, x_out
        hit = (order == layer)[:, None, None, None]  # [N, 1, 1, 1]
        return jnp.where(hit, x_out[None], feats), x_out

    return LayerHooks(init=init, after=after)


def _project(x: jax.Array, w: jax.Array, b: jax.Array | None, heads: int, d: int,
             linear: LinearFn = xla_linear) -> jax.Array:
    """[B, T, E] @ [E, N*D] (+ bias) -> [B, T, N, D]."""
    y = linear(x, w)
    if b is not None:
        y = y + b
    return y.reshape(*y.shape[:2], heads, d)


def _kv(h: jax.Array, lp: LayerParams, cfg: ModelConfig, linear: LinearFn
        ) -> tuple[jax.Array, jax.Array]:
    """K and V projections [B, T, K, D] of the normed h [B, T, E], without the Q projection."""
    H, K, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    if lp.wqkv is None:
        return _project(h, lp.wk, lp.bk, K, D, linear), _project(h, lp.wv, lp.bv, K, D, linear)
    b = None if lp.bqkv is None else lp.bqkv[H * D:]
    kv = _project(h, lp.wqkv[:, H * D:], b, 2 * K, D, linear)  # the K and V columns only
    return kv[:, :, :K], kv[:, :, K:]


def decoder_layer(x: jax.Array, lp: LayerParams, cos: jax.Array, sin: jax.Array, cache: Any,
                  layer: jax.Array, meta: Any, *, cfg: ModelConfig, attend: AttendFn,
                  linear: LinearFn = xla_linear, write_kv: jax.Array | None = None
                  ) -> tuple[jax.Array, Any]:
    """One pre-norm block: x + attn(norm(x)), then + mlp(norm(.)). x: [B, T, E].

    `linear` runs the attention projections (see `jdecode.model.linear`); the MLP matrices
    are big enough that XLA's own GEMM streams them at full rate. write_kv: optional [B, T]
    bool, the tokens whose K/V the cache keeps visible (see `LayerControl`).
    """
    H, K, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    with jax.named_scope("attn"):
        h = rms_norm(x, lp.attn_norm, cfg.rms_norm_eps)
        if lp.wqkv is not None:  # fused layout: one [E, (H+2K)D] matmul
            qkv = _project(h, lp.wqkv, lp.bqkv, H + 2 * K, D, linear)
            q, k, v = qkv[:, :, :H], qkv[:, :, H:H + K], qkv[:, :, H + K:]
        else:
            q = _project(h, lp.wq, lp.bq, H, D, linear)  # [B, T, H, D]
            k = _project(h, lp.wk, lp.bk, K, D, linear)  # [B, T, K, D]
            v = _project(h, lp.wv, lp.bv, K, D, linear)  # [B, T, K, D]
        kw = {} if write_kv is None else {"write": write_kv}
        if getattr(attend, APPLIES_ROPE, False):  # it rotates q and k, in its kernel if it can
            kw["rope"] = (cos, sin)
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out, cache = attend(q, k, v, cache, layer, meta, **kw)  # [B, T, H, D]
        with jax.named_scope("o_proj"):  # names the op for the profiler's attribution
            x = x + linear(out.reshape(*out.shape[:2], H * D), lp.wo)
    with jax.named_scope("mlp"):
        h = rms_norm(x, lp.mlp_norm, cfg.rms_norm_eps)
        if lp.w_gate_up is not None:  # fused layout: gate and up in one [E, 2F] matmul
            gate, up = jnp.split(jnp.einsum("bte,ef->btf", h, lp.w_gate_up), 2, axis=-1)
            x = x + jnp.einsum("btf,fe->bte", jax.nn.silu(gate) * up, lp.w_down)
        else:
            x = x + swiglu_mlp(h, lp.w_gate, lp.w_up, lp.w_down)
    return x, cache


def layer_kv(x: jax.Array, lp: LayerParams, cos: jax.Array, sin: jax.Array, cache: Any,
             layer: jax.Array, meta: Any, *, cfg: ModelConfig, attend: AttendFn,
             linear: LinearFn = xla_linear) -> Any:
    """Writes the K/V that `decoder_layer` would write for x [B, T, E], and nothing else.

    Only the layer's attention norm and its K/V columns are read: a skipped layer whose cache
    later tokens still attend to (early exit with CALM's propagation of the exited state).
    Returns the cache.
    """
    h = rms_norm(x, lp.attn_norm, cfg.rms_norm_eps)
    k, v = _kv(h, lp, cfg, linear)
    q = jnp.zeros((*x.shape[:2], cfg.num_heads, cfg.head_dim), x.dtype)
    # The attention output is unused, so XLA removes it; only the cache write remains.
    _, cache = attend(q, apply_rope(k, cos, sin), v, cache, layer, meta)
    return cache


def lm_head(params: Params, hidden: jax.Array) -> jax.Array:
    """[..., E] final-normed hidden -> [..., V] f32 logits (tied or untied head)."""
    if params.lm_head is None:  # tied: contract with embed [V, E] directly, no transpose op
        return jnp.einsum("...e,ve->...v", hidden, params.embed,
                          preferred_element_type=jnp.float32)
    return jnp.einsum("...e,ev->...v", hidden, params.lm_head,
                      preferred_element_type=jnp.float32)


def run_layers(params: Params, x: jax.Array, cos: jax.Array, sin: jax.Array, cache: Any,
               meta: Any, *, cfg: ModelConfig, attend: AttendFn, linear: LinearFn = xla_linear,
               hooks: LayerHooks | None = None, carry: Any = None, start: int = 0,
               stop: int | None = None, kv_only: bool = False) -> tuple[jax.Array, Any, Any]:
    """Runs layers [start, stop) over the residual stream x [B, T, E].

    Args:
      cos, sin: [B, T, D/2] RoPE tables (`rope_tables`). hooks, carry: layer hooks and their
        carry going in (see `LayerHooks`). start, stop: a static layer range (default: all),
        so a method can run the first layers of the model now and the rest later.
      kv_only: only write each layer's K/V of x (`layer_kv`); x passes through unchanged and
        the hooks are not called.
    Returns:
      x [B, T, E] after layer stop - 1, the cache, and the hooks' carry.
    """
    stop = cfg.num_layers if stop is None else stop
    if not 0 <= start <= stop <= cfg.num_layers:
        raise ValueError(f"layer range [{start}, {stop}) is outside the model's "
                         f"{cfg.num_layers} layers")
    kw = {"cfg": cfg, "attend": attend, "linear": linear}

    def layer_fn(x, lp, cache, carry, layer):
        if kv_only:
            return x, layer_kv(x, lp, cos, sin, cache, layer, meta, **kw), carry
        if hooks is None:
            x, cache = decoder_layer(x, lp, cos, sin, cache, layer, meta, **kw)
            return x, cache, carry
        control = LayerControl()
        if hooks.before is not None:
            carry, x, control = hooks.before(carry, x, layer)
        out, cache = decoder_layer(x, lp, cos, sin, cache, layer, meta,
                                   write_kv=control.write_kv, **kw)
        if control.compute is not None:
            out = jnp.where(control.compute[..., None], out, x)
        if hooks.after is not None:
            carry, out = hooks.after(carry, x, out, layer)
        return out, cache, carry

    if isinstance(params.layers, tuple):  # unstacked (see `unstack_layers`): unrolled loop
        for layer in range(start, stop):
            # `layer` stays a Python int: per-layer caches index their tuple with it.
            x, cache, carry = layer_fn(x, params.layers[layer], cache, carry, layer)
        return x, cache, carry
    if start == stop:
        return x, cache, carry
    layers = params.layers
    if (start, stop) != (0, cfg.num_layers):
        layers = jax.tree_util.tree_map(lambda a: a[start:stop], layers)

    def body(c, xs):
        x, cache, carry = c
        lp, layer = xs
        return layer_fn(x, lp, cache, carry, layer), None

    layer_ids = jnp.arange(start, stop, dtype=jnp.int32)
    (x, cache, carry), _ = jax.lax.scan(body, (x, cache, carry), (layers, layer_ids))
    return x, cache, carry


def forward(params: Params, tokens: jax.Array, positions: jax.Array, cache: Any, meta: Any,
            *, cfg: ModelConfig, attend: AttendFn, logits_at: jax.Array | None = None,
            linear: LinearFn = xla_linear, hooks: LayerHooks | None = None) -> tuple:
    """Runs the decoder over `tokens`, reading and writing `cache` through `attend`.

    Args:
      params: parameter pytree. tokens: [B, T] int32. positions: [B, T] int32 (RoPE angles).
      cache: any cache pytree (a leading layer axis, or per-layer buffers when the layers are
        unstacked); meta: what `attend` needs besides it.
      logits_at: optional [B, N] indices into T; logits are computed only there (prefill
        needs the last prompt token only, and the LM head is the biggest matmul).
      linear: the attention projections' matmul (`jdecode.model.linear.make_linear`).
      hooks: optional layer hooks (`LayerHooks`), called around every layer.
    Returns:
      logits [B, T or N, V] f32, hidden [B, T or N, E] (final-normed, pre-head), cache, and,
      only when hooks are given, the hooks' final carry.
    """
    x = params.embed[tokens]  # [B, T, E]
    cos, sin = rope_tables(positions, cfg)  # [B, T, D/2]
    carry = None if hooks is None else hooks.init(x)
    x, cache, carry = run_layers(params, x, cos, sin, cache, meta, cfg=cfg, attend=attend,
                                 linear=linear, hooks=hooks, carry=carry)
    if logits_at is not None:
        x = jnp.take_along_axis(x, logits_at[..., None], axis=1)  # [B, N, E]
    hidden = rms_norm(x, params.final_norm, cfg.rms_norm_eps)
    out = (lm_head(params, hidden), hidden, cache)
    return out if hooks is None else (*out, carry)
