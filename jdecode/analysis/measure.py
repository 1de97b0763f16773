"""Measured mode: ceilings measured on the current device (`measure_ceilings`) and the model's
jitted phases timed beside them, reported as achieved TFLOP/s, TB/s and % of the roofline bound.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jdecode.analysis.costs import Phase, kv_cache_bytes, weight_bytes
from jdecode.analysis.hardware import Hardware
from jdecode.analysis.roofline import PhaseReport, analyze, memory_floor_tokens_per_s
from jdecode.config import ModelConfig

# Working-set sizes: the GPU figures in GPU.md use >= 4 GiB streams (far beyond L2) and an
# 8192^3 matmul; on CPU smaller sizes keep a test run to seconds.
GPU_SIZES = {"read_bytes": 4 << 30, "copy_bytes": 2 << 30, "matmul_n": 8192}
CPU_SIZES = {"read_bytes": 16 << 20, "copy_bytes": 8 << 20, "matmul_n": 256}


def time_fn(fn: Callable[[], object], repeats: int = 10, warmup: int = 2) -> float:
    """Median wall time in seconds of fn() with block_until_ready, after `warmup` calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# Streams are [rows, STREAM_COLS] so no dimension nears 2^31 elements (4 GiB of bf16 is 2^31).
STREAM_COLS = 8192


def _random_array(key: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
    """Random data, drawn in `dtype` (not zeros: some GPUs compress uniform data in flight)."""
    return jax.random.uniform(key, shape, jnp.dtype(dtype), -1.0, 1.0)


def _stream(key: jax.Array, nbytes: int, dtype) -> jax.Array:
    """A random [rows, STREAM_COLS] array of about `nbytes` bytes (at least one row)."""
    rows = max(1, nbytes // (STREAM_COLS * jnp.dtype(dtype).itemsize))
    return _random_array(key, (rows, STREAM_COLS), dtype)


def _time_on(fn: Callable[[jax.Array], object], x: jax.Array, repeats: int,
             back_to_back: int = 4) -> float:
    """Median time of one fn(x), timed over `back_to_back` queued calls so that the host's
    dispatch and sync latency is paid once per group, not per call."""
    def group():
        for _ in range(back_to_back - 1):
            fn(x)
        return fn(x)
    return time_fn(group, repeats) / back_to_back


def random_params(cfg: ModelConfig, seed: int = 0, dtype: str | None = None):
    """Random parameters from `abstract_params`, drawn by one jitted function.

    One uniform draw over all parameters, then sliced into leaves, compiles once (a per-leaf
    eager init compiles a random kernel per shape). Scaled like `init_params`: matrices
    U(-1, 1) * sqrt(3 / fan_in) (variance 1 / fan_in), norm weights 1 + 0.1 U(-1, 1).
    """
    from jdecode.model.params import abstract_params

    abstract = abstract_params(cfg, dtype)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    sizes = [int(np.prod(a.shape)) for _, a in leaves]

    @jax.jit
    def make(key):
        flat = jax.random.uniform(key, (sum(sizes),), jnp.float32, -1.0, 1.0)
        out, start = [], 0
        for (path, a), n in zip(leaves, sizes, strict=True):
            x = flat[start:start + n].reshape(a.shape)
            start += n
            name = jax.tree_util.keystr(path)
            if "norm" in name:
                x = 1.0 + 0.1 * x
            elif ".embed" not in name and len(a.shape) >= 2:
                x = x * np.sqrt(3.0 / a.shape[-2])
            out.append(x.astype(a.dtype))
        return jax.tree_util.tree_unflatten(treedef, out)

    return make(jax.random.key(seed))


def model_params(cfg: ModelConfig, seed: int = 0, layout: str = "auto"):
    """Random params in the layout the benchmarks run (`jdecode.model.layout`).

    layout: "inference" (fused projections, unrolled layers: the fast GPU path), "stacked"
    (scan over layers), or "auto" (inference on GPU, stacked elsewhere, as the generator does).
    """
    if layout == "auto":
        layout = "inference" if jax.default_backend() == "gpu" else "stacked"
    params = random_params(cfg, seed)
    if layout == "inference":
        from jdecode.model.layout import inference_layout

        return inference_layout(params)
    if layout != "stacked":
        raise ValueError(f"layout={layout!r}: choose auto, inference or stacked")
    return params


def device_kind() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', 'unknown')}"


def measure_ceilings(dtype: str = "bfloat16", *, read_bytes: int | None = None,
                     copy_bytes: int | None = None, matmul_n: int | None = None,
                     repeats: int = 10) -> Hardware:
    """Measures bandwidth and matmul FLOP/s on the default device.

    Bandwidth is the read-only stream (sum of a large array), the rate batch-1 decode can
    reach (GPU.md); the elementwise read+write copy rate is recorded beside it.

    Args:
      dtype: element type of the streams and the square matmul.
      read_bytes, copy_bytes, matmul_n: sizes; default by platform (GPU_SIZES / CPU_SIZES).
    Returns:
      A Hardware entry "measured:<device>" with peak_flops {dtype: matmul FLOP/s} and
      `measured` holding every raw figure.
    """
    sizes = dict(GPU_SIZES if jax.devices()[0].platform == "gpu" else CPU_SIZES)
    sizes.update({k: v for k, v in (("read_bytes", read_bytes), ("copy_bytes", copy_bytes),
                                     ("matmul_n", matmul_n)) if v is not None})
    dt = jnp.dtype(dtype)
    key = jax.random.key(0)

    x = _stream(key, sizes["read_bytes"], dt)
    read_bytes = x.size * dt.itemsize
    # Two reductions read every byte once; XLA schedules them differently, and which is faster
    # differs by card (3.63 vs 4.18 TB/s on one H200 for the two scripts that each used one).
    # The ceiling is the faster: the rate this device demonstrably reaches.
    reads = {
        "full_sum": jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32)),
        "row_sum": jax.jit(lambda a: jnp.sum(a, axis=1, dtype=jnp.float32)),
    }
    read_rates = {name: read_bytes / _time_on(f, x, repeats) for name, f in reads.items()}
    del x  # free the stream before allocating the next one
    read_method = max(read_rates, key=read_rates.get)

    y = _stream(key, sizes["copy_bytes"], dt)
    copy_bytes = 2 * y.size * dt.itemsize  # reads n, writes n
    scale = jax.jit(lambda a: a * jnp.asarray(1.5, dt))
    t_copy = _time_on(scale, y, repeats)
    del y

    n = sizes["matmul_n"]
    a, b = _random_array(key, (2, n, n), dt)
    matmul = jax.jit(jnp.matmul)
    t_mm = time_fn(lambda: matmul(a, b), repeats)

    read_bw = read_rates[read_method]
    copy_bw = copy_bytes / t_copy
    flops = 2 * n**3 / t_mm
    kind = device_kind()
    return Hardware(
        name=f"measured:{kind}", peak_flops={dtype: flops}, bandwidth_gbps=read_bw / 1e9,
        memory_gb=0.0, source=f"measured on {kind} with jax {jax.__version__}",
        measured={"read_bytes_per_s": read_bw,
                  "read_method": f"{read_method} of a [rows, {STREAM_COLS}] {dt.name} array "
                                 "(the faster of full_sum and row_sum)",
                  **{f"read_{k}_bytes_per_s": v for k, v in read_rates.items()},
                  "copy_bytes_per_s": copy_bw,
                  "matmul_flops_per_s": flops, "dtype": dtype, **sizes})


def _random_tokens(key: jax.Array, shape: tuple[int, ...], vocab: int) -> jax.Array:
    return jax.random.randint(key, shape, 0, vocab, jnp.int32)


def time_phase(cfg: ModelConfig, params, phase: Phase, repeats: int = 10, seed: int = 0,
               impl: str = "xla", breakdown_for: PhaseReport | None = None) -> dict:
    """Compiles and times one phase of the real model on random tokens.

    The dense cache is sized to phase.kv_len (the model attends over the whole buffer) and
    donated, so each call updates it in place and hands it to the next. Decode writes the
    last slot (position kv_len - 1), so every step attends over kv_len keys.

    Returns:
      {"compile_s", "step_s" (median), "xla_flops_one_layer", "xla_bytes_one_layer"} (XLA
      counts a scan body once; see xla_check), plus "breakdown" / "breakdown_note" from a
      profiler trace when `breakdown_for` (the phase's PhaseReport) is given.
    """
    from jdecode.analysis.xla_check import cost_analysis_dict, phase_fn
    from jdecode.cache.dense import init_cache

    b = phase.batch
    key = jax.random.key(seed)
    # unrolled (inference-layout) params pair with one cache buffer per layer
    cache = init_cache(cfg, b, phase.kv_len, per_layer=isinstance(params.layers, tuple))
    if phase.name == "prefill":
        inputs = (_random_tokens(key, (b, phase.q_len), cfg.vocab_size),
                  jnp.full((b,), phase.q_len, jnp.int32))
    elif phase.name == "decode":
        inputs = (_random_tokens(key, (b,), cfg.vocab_size),
                  jnp.full((b,), phase.kv_len - 1, jnp.int32))
    else:
        raise ValueError(f"phase {phase.name!r}: measured mode times prefill and decode")
    fn = jax.jit(phase_fn(cfg, phase.name, impl), donate_argnums=(1,))
    t0 = time.perf_counter()
    compiled = fn.lower(params, cache, *inputs).compile()
    compile_s = time.perf_counter() - t0
    cost = cost_analysis_dict(compiled)
    state = {"cache": cache}

    def step():
        logits, _, state["cache"] = compiled(params, state["cache"], *inputs)
        return logits

    step_s = time_fn(step, repeats)
    out = {"compile_s": compile_s, "step_s": step_s,
           "xla_flops_one_layer": float(cost.get("flops", np.nan)),
           "xla_bytes_one_layer": float(cost.get("bytes accessed", np.nan))}
    if breakdown_for is not None:
        from jdecode.analysis.profile import profile_breakdown

        try:
            rows, note = profile_breakdown(compiled, step, breakdown_for, cfg=cfg)
        except Exception as e:  # noqa: BLE001  (the profiler is optional: report, never fail)
            rows, note = None, f"profiler failed: {type(e).__name__}: {e}"
        out.update({"breakdown": rows, "breakdown_note": note})
    return out


def measure_phase(cfg: ModelConfig, params, phase: Phase, hw: Hardware, *,
                  convention: str = "full", repeats: int = 10, impl: str = "xla",
                  breakdown: bool = False) -> dict:
    """Times one phase and places it against the roofline of `hw` (measured ceilings).

    Returns:
      The timing plus predicted step time (sum of per-operator bounds; attention is costed as
      flash in prefill and with impl "pallas", else as unfused with f32 scores), achieved
      TFLOP/s and TB/s (our FLOPs and bytes / measured time; masked scores count as FLOPs, as
      the seed counts them), % of the bound,
      and for decode the GPU.md floor (weights + live KV) / read-stream rate. With
      `breakdown`, per-category measured time from a profiler trace (see profile.py).
    """
    dtype = cfg.dtype
    # Prefill attends tile by tile on either path (the Pallas kernel, or the XLA path's
    # `causal_attention_tiled`): scores never reach memory. XLA decode writes and reads its
    # [B, H, 1, S] scores in f32 (jdecode.model.attention).
    tiled = impl == "pallas" or phase.name == "prefill"
    rep = analyze(cfg, phase, hw, dtype=dtype, convention=convention,
                  attention="flash" if tiled else "unfused",
                  score_bytes=None if tiled else 4)
    timing = time_phase(cfg, params, phase, repeats, impl=impl,
                        breakdown_for=rep if breakdown else None)
    t = timing["step_s"]
    out = {
        "phase": phase.name, "impl": impl, "batch": phase.batch, "q_len": phase.q_len,
        "kv_len": phase.kv_len, **timing,
        "model_flops": rep.flops, "model_bytes": rep.bytes, "convention": convention,
        "predicted_step_s": rep.step_time_s, "predicted_fused_step_s": rep.fused_time_s,
        "achieved_tflops": rep.flops / t / 1e12, "achieved_tbps": rep.bytes / t / 1e12,
        "pct_of_bound": 100.0 * rep.step_time_s / t,
        "pct_of_fused_bound": 100.0 * rep.fused_time_s / t,
        "tokens_per_s": phase.new_tokens / t, "predicted_tokens_per_s": rep.tokens_per_s,
        "bound": "compute" if rep.intensity > rep.ridge else "memory",
    }
    if phase.name == "decode":
        floor = memory_floor_tokens_per_s(cfg, phase.batch, phase.kv_len, hw.bandwidth, dtype)
        unavoidable = weight_bytes(cfg, dtype) + kv_cache_bytes(cfg, phase.batch, phase.kv_len,
                                                                dtype)
        out.update({"floor_tokens_per_s": floor,
                    "pct_of_floor": 100.0 * out["tokens_per_s"] / floor,
                    "weights_plus_kv_tbps": unavoidable / t / 1e12})
    return out


def run_measured(cfg: ModelConfig, phases: list[Phase], *, hw: Hardware | None = None,
                 convention: str = "full", repeats: int = 10, seed: int = 0, impl: str = "xla",
                 layout: str = "auto", breakdown: bool = False,
                 progress: Callable[[str], None] | None = None) -> dict:
    """Measured mode end to end: ceilings (unless given), random params, every phase.

    Returns:
      {"device", "jax_version", "ceilings": hw.to_dict(), "phases": [measure_phase(...)]}.
    """
    say = progress or (lambda _msg: None)
    if hw is None:
        say("measuring ceilings (read stream, copy, matmul)")
        hw = measure_ceilings(cfg.dtype)
    say(f"initialising random {cfg.dtype} params ({layout} layout)")
    params = model_params(cfg, seed, layout)
    results = []
    for phase in phases:
        say(f"timing {phase.name} B={phase.batch} t={phase.q_len} s={phase.kv_len} ({impl})")
        results.append(measure_phase(cfg, params, phase, hw, convention=convention,
                                     repeats=repeats, impl=impl, breakdown=breakdown))
    return {"device": device_kind(), "jax_version": jax.__version__, "layout": layout,
            "ceilings": hw.to_dict(), "phases": results}
