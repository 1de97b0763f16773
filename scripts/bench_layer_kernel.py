"""The persistent layer kernel (`pallas_kernels.fused_decode.layer`) against the five fused
kernels it replaces, per layer of one batch-1 decode step, at several grid sizes and warps.

Every layer of the model's shape gets its own random weights and cache (so weights stream
from HBM, as in the model); one jit runs all layers, caches donated and threaded through, and
the time per layer is the median over repetitions divided by the layer count. On the GPU also
per layer: the device span (the jit's first kernel's start to its last one's end, launch gaps
included: `device_span_us`), which ranks variants where the wall time, dispatch included,
spreads, and the kernels' summed durations (`device_busy_us`, gaps not counted). Each variant is
first run once and checked: its output against the five kernels' and its barrier timeouts at
0 (a grid larger than fits on the device shows up there, and is not timed).

GPU: PYTHONPATH=. python3 scripts/bench_layer_kernel.py --model smollm2-135m --out $OUT
"""

from __future__ import annotations

import argparse
import json
import re
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jdecode.analysis.measure import time_fn
from jdecode.analysis.profile import device_busy_us, device_span_us
from jdecode.config import load_model_config_yaml
from jdecode.model.layers import rope_tables
from jdecode.provenance import environment
from pallas_kernels.fused_decode import (
    attn_o_residual,
    decode_attention,
    gate_up_swiglu,
    gemv_residual,
    qkv_rope,
)
from pallas_kernels.fused_decode.attention import default_splits
from pallas_kernels.fused_decode.layer import (
    barrier_timeouts,
    decode_layer,
    new_counters,
    phase_breakdown,
)
from pallas_kernels.testing import assert_close


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--context", type=int, default=600)
    ap.add_argument("--variants", default="1x8n,1x8,4x4n,4x4,2x8",
                    help="programs per SM x warps [b GEMV rows per item] [s attention "
                    "splits] [n: no prefetch] [t: traced, with each phase's and "
                    "barrier's time], comma-separated, e.g. 4x4s16t")
    ap.add_argument("--out", default="out")
    args = ap.parse_args()
    cfg = load_model_config_yaml(args.model if args.model.endswith(".yaml")
                                 else f"configs/models/{args.model}.yaml")
    dt = jnp.dtype(args.dtype)
    E, H, K, D, F = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                     cfg.intermediate_size)
    L, S, B, eps = cfg.num_layers, args.max_len, 1, cfg.rms_norm_eps
    keys = iter(jax.random.split(jax.random.key(0), 16 * L + 8))

    def rnd(*shape, scale=1.0):
        return (jax.random.normal(next(keys), shape, jnp.float32) * scale).astype(dt)

    layers = [{"attn_norm": 1 + rnd(E, scale=0.1), "mlp_norm": 1 + rnd(E, scale=0.1),
               "wqkv": rnd((H + 2 * K) * D, E, scale=E ** -0.5),
               "wo": rnd(E, H * D, scale=(H * D) ** -0.5), "wgu": rnd(2 * F, E, scale=E ** -0.5),
               "wd": rnd(E, F, scale=F ** -0.5)} for _ in range(L)]
    caches = [(rnd(B, S, K, D), rnd(B, S, K, D)) for _ in range(L)]
    x0 = rnd(B, E)
    pos = jnp.full((B,), args.context, jnp.int32)
    cos, sin = (t[:, 0] for t in rope_tables(pos[:, None], cfg))
    ns = default_splits(S, B, E, H * D)

    def five(caches, x, splits=None):
        new = []
        for w, (kc, vc) in zip(layers, caches):
            qkv = qkv_rope(x, w["attn_norm"], w["wqkv"], cos, sin, num_heads=H, num_kv_heads=K,
                           eps=eps, transposed=True)
            parts, lse, kc, vc = decode_attention(qkv, kc, vc, pos, num_heads=H,
                                                  num_kv_heads=K, num_splits=splits or ns)
            x = attn_o_residual(parts, lse, w["wo"], x, transposed=True)
            act = gate_up_swiglu(x, w["mlp_norm"], w["wgu"], eps=eps, transposed=True)
            x = gemv_residual(act, w["wd"], x, transposed=True)
            new.append((kc, vc))
        return new, (x, jnp.zeros((), jnp.int32))

    def persistent(caches, x, programs, warps, bn, prefetch, trace=False, splits=None):
        counters, new, stamps = new_counters(L), [], []
        for i, (w, (kc, vc)) in enumerate(zip(layers, caches)):
            x, kc, vc, counters, *st = decode_layer(
                x, pos, cos, sin, kc, vc, counters, i, w["attn_norm"], w["wqkv"], w["wo"],
                w["mlp_norm"], w["wgu"], w["wd"], num_heads=H, num_kv_heads=K, eps=eps,
                num_splits=splits or ns, num_programs=programs, num_warps=warps, block_n=bn,
                prefetch=prefetch, trace=trace)
            new.append((kc, vc))
            stamps += st
        out = (x, barrier_timeouts(counters))
        return new, out + ((jnp.stack(stamps),) if trace else ())

    def timed(fn) -> dict:
        """us per layer: wall (median, dispatch included), device span and busy (None off the
        GPU)."""
        step = jax.jit(fn, donate_argnums=0)
        state = [[(jnp.copy(k), jnp.copy(v)) for k, v in caches]]

        def call():
            state[0], out = step(state[0], x0)
            return out
        wall = time_fn(call, repeats=15, warmup=1) / L * 1e6
        span, busy = device_span_us(call, 5), device_busy_us(call, 5)
        return {"us_per_layer": wall,
                "span_us_per_layer": None if span is None else span / L,
                "busy_us_per_layer": None if busy is None else busy / L}

    sms = int(getattr(jax.devices()[0], "core_count", 0) or 132)
    wants = {}  # the five kernels' output at each split count: the reference a variant of
    # that many splits must match (other counts round differently, and 30 bf16 layers
    # amplify that past the tolerance)

    def want(splits):
        if splits not in wants:
            wants[splits] = jax.jit(lambda c: five(c, x0, splits)[1])(caches)[0]
        return wants[splits]

    rows = [{"variant": "five kernels", **timed(five)}]
    print(json.dumps(rows[0]), flush=True)
    for v in args.variants.split(","):
        parsed = re.fullmatch(r"(\d+)x(\d+)(?:b(\d+))?(?:s(\d+))?([nt]*)", v)
        if not parsed:
            raise SystemExit(f"--variants: {v!r} is not PxW[bN][sN][nt] (e.g. 4x4s16t)")
        per_sm, warps, bn, splits, flags = parsed.groups()
        warps, bn, splits = int(warps), int(bn or 4), int(splits or ns)
        prefetch, trace = "n" not in flags, "t" in flags
        programs = int(per_sm) * sms
        run = partial(persistent, programs=programs, warps=warps, bn=bn, prefetch=prefetch,
                      trace=trace, splits=splits)
        got, timeouts, *stamps = jax.jit(lambda c, run=run: run(c, x0)[1])(caches)
        row = {"variant": f"layer kernel, {programs} programs x {warps} warps, {bn} rows/item"
                          f", prefetch {'on' if prefetch else 'off'}"
                          f"{', traced' if trace else ''}"
                          f", {splits} splits",
               "barrier_timeouts": int(timeouts)}
        if stamps:  # where one call's time went, medians over the layers (`phase_breakdown`)
            row["phases_us"] = phase_breakdown(np.asarray(stamps[0]))
        try:
            assert_close(got, want(splits), dt.name, scale=2.0)
            row["matches_five_kernels"] = True
        except AssertionError as e:
            row["matches_five_kernels"] = False
            row["mismatch"] = str(e)[:300]
        if row["barrier_timeouts"] == 0 and row["matches_five_kernels"]:
            row.update(timed(run))
        print(json.dumps(row), flush=True)
        rows.append(row)
    weight_mb = sum(int(np.prod(a.shape)) * dt.itemsize for a in layers[0].values()) / 1e6
    result = {**environment(), "model": args.model, "dtype": args.dtype, "layers": L,
              "max_len": S, "context": args.context, "splits": ns, "sms": sms,
              "weight_mb_per_layer": weight_mb, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"bench_layer_kernel_{Path(args.model).stem}.json").write_text(
        json.dumps(result, indent=1))
    print(f"\n{args.model}: {weight_mb:.1f} MB of weights per layer, {ns} splits")

    def us(r, key):
        return "" if r.get(key) is None else f"{r[key]:.2f}"

    print("| variant | wall us / layer | device span us / layer | kernels' us / layer | "
          "timeouts | matches |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {us(r, 'us_per_layer')} | {us(r, 'span_us_per_layer')} | "
              f"{us(r, 'busy_us_per_layer')} | {r.get('barrier_timeouts', '')} | "
              f"{r.get('matches_five_kernels', '')} |")
    names = ("qkv", "attention", "o", "gate_up", "down")
    for r in rows:
        if "phases_us" not in r:
            continue
        b = r["phases_us"]
        print(f"\n{r['variant']}: ramp {b['ramp']:.2f} us, total {b['total']:.2f} us (medians "
              "over layers)\n| phase | work (median program) | critical | barrier after: "
              "release, skew |\n|---|---|---|---|")
        for k, name in enumerate(names):
            after = (f"{b['release'][k]:.2f}, {b['skew'][k]:.2f}" if k < len(b["release"])
                     else "")
            print(f"| {name} | {b['work'][k]:.2f} | {b['critical'][k]:.2f} | {after} |")


if __name__ == "__main__":
    main()
