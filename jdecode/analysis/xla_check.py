"""Cross-check of the cost model against XLA's own count (`compiled.cost_analysis()`) for the
jitted `prefill` and `decode_step` of `jdecode.decoding.phases`.

XLA's HloCostAnalysis counts the body of a `while` loop once. The stacked layout runs its
layers with `lax.scan` (a while loop), so it is compared on a one-layer replica; the inference
layout (`jdecode.model.layout`: fused projections, unrolled layers) is compared whole.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from jdecode.analysis.costs import Phase, decode_phase, prefill_phase
from jdecode.analysis.hardware import get_hardware
from jdecode.analysis.roofline import analyze
from jdecode.config import ModelConfig


def cost_analysis_dict(compiled) -> dict[str, float]:
    """`compiled.cost_analysis()` as one dict (some jax versions return a list of dicts)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return dict(cost or {})


LAYOUTS = ("inference", "stacked")


def abstract_phase_args(cfg: ModelConfig, phase: Phase, dtype: str | None = None,
                        layout: str = "stacked") -> tuple:
    """ShapeDtypeStructs (params, cache, tokens, lengths|positions) for lowering a phase.

    The cache is sized to phase.kv_len: the dense cache attends over its whole buffer, so the
    buffer length is the s the cost model must use. layout: "stacked" (scan over layers) or
    "inference" (fused projections, unrolled layers).
    """
    from jdecode.cache.dense import init_cache
    from jdecode.model.params import abstract_params

    b = phase.batch
    params = abstract_params(cfg, dtype)
    if layout == "inference":
        from jdecode.model.layout import inference_layout

        params = jax.eval_shape(inference_layout, params)
    elif layout != "stacked":
        raise ValueError(f"layout={layout!r}: choose one of {', '.join(LAYOUTS)}")
    # unrolled layers pair with one cache buffer per layer (jdecode.cache.dense)
    per_layer = layout == "inference"
    cache = jax.eval_shape(lambda: init_cache(cfg, b, phase.kv_len, dtype, per_layer=per_layer))
    if phase.name == "prefill":
        return params, cache, jax.ShapeDtypeStruct((b, phase.q_len), jnp.int32), \
            jax.ShapeDtypeStruct((b,), jnp.int32)
    if phase.name == "decode":
        return params, cache, jax.ShapeDtypeStruct((b,), jnp.int32), \
            jax.ShapeDtypeStruct((b,), jnp.int32)
    raise ValueError(f"phase {phase.name!r}: the XLA cross-check covers prefill and decode")


def phase_fn(cfg: ModelConfig, phase_name: str, impl: str = "xla"):
    """The model's pure phase function with cfg and the attention impl bound (jit it; donate
    the cache to run it)."""
    from jdecode.decoding import phases

    fns = {"prefill": phases.prefill, "decode": phases.decode_step}
    if phase_name not in fns:
        raise ValueError(f"phase {phase_name!r}: choose prefill or decode")
    return partial(fns[phase_name], cfg=cfg, impl=impl)


def xla_cost(cfg: ModelConfig, phase: Phase, dtype: str | None = None,
             layout: str = "stacked") -> dict[str, float]:
    """Compiles the phase from abstract shapes (no allocation) and returns XLA's cost dict."""
    args = abstract_phase_args(cfg, phase, dtype, layout)
    compiled = jax.jit(phase_fn(cfg, phase.name)).lower(*args).compile()
    return cost_analysis_dict(compiled)


def cross_check(cfg: ModelConfig, batch: int, seq: int, dtype: str | None = None,
                layout: str = "inference") -> dict:
    """Our FLOPs vs XLA's for prefill (B, T=seq) and decode (B, context=seq).

    Returns:
      {phase: {"model_flops", "xla_flops", "flop_ratio" (xla / model), "model_bytes_full",
      "xla_bytes", "byte_ratio"}}: for the whole model with layout "inference", for a
      one-layer replica of `cfg` with layout "stacked".
    """
    one = cfg if layout == "inference" else cfg.replace(num_layers=1)
    dtype = dtype or cfg.dtype
    hw = get_hardware("h100-sxm")  # only FLOPs and bytes are compared; the ceilings do not matter
    out = {}
    for phase in (prefill_phase(batch, seq), decode_phase(batch, seq)):
        ours = analyze(one, phase, hw, dtype=dtype, convention="full")
        xla = xla_cost(one, phase, dtype, layout)
        out[phase.name] = {
            "model_flops": ours.flops, "xla_flops": xla.get("flops", float("nan")),
            "flop_ratio": xla.get("flops", float("nan")) / ours.flops,
            "model_bytes_full": ours.bytes, "xla_bytes": xla.get("bytes accessed", float("nan")),
            "byte_ratio": xla.get("bytes accessed", float("nan")) / ours.bytes,
        }
    return out


def xla_flops_scaled(cfg: ModelConfig, phase: Phase, dtype: str | None = None) -> float:
    """XLA's FLOPs for all layers: the one-layer count plus (L - 1) x our per-layer share of it.

    Our per-layer share is XLA's one-layer total minus our count of the embedding, final norm
    and LM head (the LM head is a plain matmul, counted the same way by both).
    """
    one = cfg.replace(num_layers=1)
    xla_one = xla_cost(one, phase, dtype, "stacked").get("flops", float("nan"))
    rep = analyze(one, phase, get_hardware("h100-sxm"), dtype=dtype or cfg.dtype)
    head = sum(r.op.flops for r in rep.rows if not r.op.per_layer)
    return xla_one + (cfg.num_layers - 1) * (xla_one - head)
