"""Device time per call of the fused decode GEMVs (`pallas_kernels.fused_decode`) over a sweep
of their tiles, at one decode step of a model's shape, beside the general path's pieces.

Each variant runs once per layer of the model, unrolled in one jit with a distinct weight per
layer (so the weights stream from HBM, not L2, as in the model), and the time per call is the
median over repetitions of the whole jit divided by the layer count. Back-to-back kernels on
the stream are what the model's step pays for them; host dispatch is paid once per repetition.
Every variant is checked against the reference before it is timed. On the GPU each variant
also gets its device time per launch from a profile (`kernel_device_us`), which ranks the
variants: a 2-5 us kernel is smaller than the jit's dispatch that the wall time includes.

`--part attention` times (device time of all kernels per layer on the GPU, else wall) the
fused step's attention instead: `decode_attention` (cache write
+ split-K partials) with `attn_o_residual` (merge + O + residual) at each split count, beside
the path it replaced (XLA scatters, the paged decode kernel over the dense cache, O +
residual). Caches are donated and threaded through the calls, so no copy is timed.

GPU: PYTHONPATH=. python3 scripts/bench_fused_decode.py --model smollm2-135m --out $OUT
Writes bench_fused_decode_<model>_b<B>.json (or ..._attention_b<B>.json) and prints the best
tiles of each kernel (or each split count's time).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from jdecode.analysis.measure import time_fn
from jdecode.analysis.profile import device_busy_us, kernel_device_us
from jdecode.config import load_model_config_yaml
from jdecode.model.layers import rms_norm
from jdecode.model.pallas_dispatch import dense_decode_pallas
from jdecode.provenance import environment
from pallas_kernels.fused_decode import (
    GemvTiles,
    attn_o_residual,
    decode_attention,
    gate_up_swiglu,
    gemv_residual,
    qkv_rope,
)
from pallas_kernels.fused_decode import reference as ref
from pallas_kernels.fused_decode.kernel import default_tiles
from pallas_kernels.testing import assert_close


def per_call_us(fn, args, calls: int, reps: int = 15) -> float:
    """Median microseconds per call of a jitted fn(*args) that makes `calls` kernel calls."""
    return time_fn(lambda: fn(*args), repeats=reps, warmup=1) / calls * 1e6


def tile_sweep(k: int, n: int, rows: int, sweep: str = "full", model_n: int = 0
               ) -> list[tuple[GemvTiles, bool]]:
    """(tiles, transposed) variants of a [k, n]-column problem (model_n: the N the model's
    kernel passes `default_tiles`, when not n: the whole QKV or gate|up width).

    full: tensor-core tiles on weights as stored ([K, N]) and on [N, K] weights, then the
    CUDA-core (fma) path on [N, K] weights over columns x K step x warps (its K loop unrolled
    when it is short). weights-first: the default tiles with and without `weights_first`, and
    that flag on over columns x warps around them. tc: tensor-core tiles over columns x K step
    x warps on [K, N] weights, a few with 4 stages or on [N, K] weights (steps of many rows).
    """
    if sweep == "tc":  # tensor-core tiles for steps of many rows
        out = [(GemvTiles(block_n=bn, block_k=bk, num_warps=w), False)
               for bn, bk, w in itertools.product((16, 32, 64), (64, 128, 256), (4, 8))]
        out += [(GemvTiles(block_n=bn, block_k=128, num_warps=4, num_stages=4), False)
                for bn in (16, 32)]
        out += [(GemvTiles(block_n=bn, block_k=128), True) for bn in (16, 32)]
    elif sweep == "weights-first":  # around the default tiles (n: the large ones too)
        base = dataclasses.replace(default_tiles(k, rows, True, model_n or n),
                                   weights_first=False)
        out = [(base, True), (dataclasses.replace(base, weights_first=True), True)]
        for bn, warps in itertools.product((1, 2, 4, 8), (4, 8)):
            out.append((dataclasses.replace(base, block_n=bn, num_warps=warps,
                                            weights_first=True), True))
    elif sweep == "fma":  # the CUDA-core path only, wider: columns x K step x warps
        out = [(dataclasses.replace(default_tiles(k, rows, True, n), weights_first=False), True)]
        for bn, bk, warps in itertools.product((2, 4, 8), (256, 512, 1024, 2048), (4, 8, 16)):
            if bk <= max(512, pl.next_power_of_2(k)) and bk * bn >= 32 * warps:
                out.append((GemvTiles(block_n=bn, block_k=bk, num_warps=warps, fma=True,
                                      unroll=-(-k // bk) <= 4), True))
    else:
        out = [(GemvTiles(block_n=32, block_k=256), False), (GemvTiles(block_k=256), True)]
        widest = max(512, pl.next_power_of_2(k))
        for bn, bk, warps in itertools.product((4, 8, 16), (512, 1024, 2048), (4, 8)):
            if bk <= widest:
                out.append((GemvTiles(block_n=bn, block_k=bk, num_warps=warps, fma=True,
                                      unroll=-(-k // bk) <= 4), True))
    return [(t, tr) for t, tr in dict.fromkeys(out) if n % t.block_n == 0]


def attention_sweep(cfg, B: int, dt, L: int, max_len: int, context: int, splits: list[int],
                    o_block_n: list[int], rnd, launches: list[tuple[int, ...]] = ()
                    ) -> dict:
    """Microseconds per layer of the fused attention pair at each split count and O column
    tile (0: the default tiles), and of the general path's pieces, for one step at `context`
    past tokens in a max_len-slot cache. `launches`: (block_k, warps, stages) of
    `decode_attention` to time at each split count (default O tiles), with the attention
    kernel's own device time per launch beside the pair's."""
    E, H, K, D = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    x = rnd(B, E)
    qkvs = [rnd(B, (H + 2 * K) * D) for _ in range(L)]
    wo_t = [rnd(E, H * D, scale=(H * D) ** -0.5) for _ in range(L)]  # [N, K] copies
    pos = jnp.full((B,), context, jnp.int32)
    rows = jnp.arange(B)
    caches = [(rnd(B, max_len, K, D), rnd(B, max_len, K, D)) for _ in range(L)]

    def fused(caches, ns, tiles, launch=()):
        out, new = [], []
        kw = dict(zip(("block_k", "num_warps", "num_stages"), launch))
        for qkv, w, (kc, vc) in zip(qkvs, wo_t, caches):
            parts, lse, kc, vc = decode_attention(qkv, kc, vc, pos, num_heads=H,
                                                  num_kv_heads=K, num_splits=ns, **kw)
            out.append(attn_o_residual(parts, lse, w, x, tiles=tiles, transposed=True))
            new.append((kc, vc))
        return new, out

    def general(caches):
        out, new = [], []
        for qkv, w, (kc, vc) in zip(qkvs, wo_t, caches):
            y = qkv.reshape(B, H + 2 * K, D)
            kc = kc.at[rows, pos].set(y[:, H:H + K], mode="drop")
            vc = vc.at[rows, pos].set(y[:, H + K:], mode="drop")
            attn = dense_decode_pallas(y[:, None, :H], kc[None], vc[None], 0, pos[:, None])
            out.append(gemv_residual(attn.reshape(B, H * D), w, x, transposed=True))
            new.append((kc, vc))
        return new, out

    def timed(fn, kernel: str | None = None):
        step = jax.jit(fn, donate_argnums=0)
        state = [[(jnp.copy(k), jnp.copy(v)) for k, v in caches]]

        def call():
            state[0], out = step(state[0])
            return out
        us = per_call_us(call, (), L)
        busy = device_busy_us(call, 3)  # all kernels of a call, on the GPU
        us = us if busy is None else busy / L
        if kernel is None:
            return us
        return us, kernel_device_us(call, (kernel,), 3).get(kernel)

    # The reference answer: the merged output of every split count must agree with it.
    want = jax.jit(lambda c: general(c)[1])(caches)
    result = {"context": context, "max_len": max_len, "splits_us": {}, "variants": []}
    for ns in splits:
        for bn in o_block_n:  # the O projection's columns per program: each merges all
            tiles = None if bn == 0 else dataclasses.replace(
                default_tiles(H * D, B, True), block_n=bn)
            got = jax.jit(lambda c, ns=ns, t=tiles: fused(c, ns, t)[1])(caches)
            assert_close(got, want, dt.name, scale=2.0)
            us = timed(partial(fused, ns=ns, tiles=tiles))
            result["variants"].append({"splits": ns, "o_tiles": None if tiles is None else
                                       dataclasses.asdict(tiles), "us": us})
            if bn == 0:
                result["splits_us"][ns] = us
            print(f"fused attention + o, {ns:2d} splits, o block_n {bn or 'default'}: "
                  f"{us:7.2f} us", flush=True)
    result["launches"] = []
    for ns, (bk, warps, stages) in itertools.product(splits, launches):
        run = partial(fused, ns=ns, tiles=None, launch=(bk, warps, stages))
        got = jax.jit(lambda c, run=run: run(c)[1])(caches)
        assert_close(got, want, dt.name, scale=2.0)
        pair, attn = timed(run, "decode_attention")
        result["launches"].append({"splits": ns, "block_k": bk, "num_warps": warps,
                                   "num_stages": stages, "pair_us": pair, "attention_us": attn})
        print(f"attention {ns:2d} splits, block_k {bk:3d}, {warps} warps, {stages} stages: "
              f"pair {pair:7.2f} us, attention kernel "
              f"{'-' if attn is None else f'{attn:.2f}'} us", flush=True)
    result["general_us"] = us = timed(general)
    print(f"general scatter + paged + o      {us:7.2f} us", flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--layers", type=int, default=0, help="calls per jit (default: the model's)")
    ap.add_argument("--out", default="out")
    ap.add_argument("--part", choices=("gemv", "attention"), default="gemv")
    ap.add_argument("--kernels", default="",
                    help="gemv: only these (qkv_rope,gate_up_swiglu,o_residual,down_residual)")
    ap.add_argument("--sweep", choices=("full", "weights-first", "tc", "fma"), default="full",
                    help="gemv: which tiles (see tile_sweep)")
    ap.add_argument("--max-len", type=int, default=1024, help="attention: cache slots")
    ap.add_argument("--context", type=int, default=600, help="attention: past tokens")
    ap.add_argument("--splits", default="1,2,4,8,16", help="attention: split counts")
    ap.add_argument("--launches", default="",
                    help="attention: decode_attention launches to time, block_k:warps:stages, "
                    "comma-separated (e.g. 64:4:2,32:2:2)")
    ap.add_argument("--o-block-n", default="0",
                    help="attention: the O projection's block_n values (0: default tiles)")
    args = ap.parse_args()
    cfg = load_model_config_yaml(f"configs/models/{args.model}.yaml")
    dt = jnp.dtype(args.dtype)
    B, E, H, K, D, F, L = (args.batch, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
                           cfg.head_dim, cfg.intermediate_size, args.layers or cfg.num_layers)
    rng = np.random.default_rng(0)

    def rnd(*shape, scale=1.0, dtype=dt):
        return jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32).astype(dtype)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {**environment(), "command": " ".join(sys.argv), "model": args.model, "batch": B,
            "dtype": dt.name, "layers": L}
    if args.part == "attention":
        splits = [int(s) for s in args.splits.split(",")]
        o_bn = [int(s) for s in args.o_block_n.split(",")]
        launches = [tuple(int(v) for v in t.split(":")) for t in args.launches.split(",") if t]
        res = attention_sweep(cfg, B, dt, L, args.max_len, args.context, splits, o_bn, rnd,
                              launches)
        (out / f"bench_fused_decode_{args.model}_attention_b{B}.json").write_text(
            json.dumps({**meta, **res}, indent=2))
        return
    x, norm = rnd(B, E), rnd(E, scale=0.1) + 1
    ang = jnp.arange(B, dtype=jnp.float32)[:, None] * 600 * jnp.linspace(0.01, 1, D // 2)
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    wqkv = [rnd(E, (H + 2 * K) * D, scale=E ** -0.5) for _ in range(L)]
    wo = [rnd(H * D, E, scale=(H * D) ** -0.5) for _ in range(L)]
    wgu = [rnd(E, 2 * F, scale=E ** -0.5) for _ in range(L)]
    wd = [rnd(F, E, scale=F ** -0.5) for _ in range(L)]
    a_o, a_d = rnd(B, H * D), rnd(B, F)
    eps = cfg.rms_norm_eps
    # name: (K, N to tile, weights, run(w, tiles, transposed), reference(w)); the Pallas
    # kernel's name in a profile is the function's ("o" and "down" are gemv_residual).
    kernels = {
        "qkv_rope": (E, D // 2, wqkv,
                     lambda w, t, tr: qkv_rope(x, norm, w, cos, sin, num_heads=H,
                                               num_kv_heads=K, eps=eps, tiles=t, transposed=tr),
                     lambda w: ref.qkv_rope_reference(x, norm, w, cos, sin, num_heads=H,
                                                      num_kv_heads=K, eps=eps)),
        "gate_up_swiglu": (E, F, wgu, lambda w, t, tr: gate_up_swiglu(x, norm, w, eps=eps,
                                                                      tiles=t, transposed=tr),
                           lambda w: ref.gate_up_swiglu_reference(x, norm, w, eps=eps)),
        "o_residual": (H * D, E, wo,
                       lambda w, t, tr: gemv_residual(a_o, w, x, tiles=t, transposed=tr),
                       lambda w: ref.gemv_residual_reference(a_o, w, x)),
        "down_residual": (F, E, wd,
                          lambda w, t, tr: gemv_residual(a_d, w, x, tiles=t, transposed=tr),
                          lambda w: ref.gemv_residual_reference(a_d, w, x)),
    }
    rows = []
    best = {}
    only = set(filter(None, args.kernels.split(",")))
    if only - set(kernels):
        raise SystemExit(f"--kernels {args.kernels!r}: pick from {', '.join(kernels)}")
    for name, (k, n, ws, run, want) in kernels.items():
        if only and name not in only:
            continue
        with jax.default_matmul_precision("highest"):
            expect = jax.jit(want)(ws[0])
        ws_t = None
        model_n = {"qkv_rope": (H + 2 * K) * D, "gate_up_swiglu": 2 * F}.get(name, 0)
        for tiles, tr in tile_sweep(k, n, B, args.sweep, model_n):
            if tr and ws_t is None:
                ws_t = [w.T.copy() for w in ws]  # [N, K] copies, made once
            layer_ws = ws_t if tr else ws
            label = f"{tiles} transposed={tr}"
            try:
                assert_close(jax.jit(partial(run, t=tiles, tr=tr))(layer_ws[0]), expect,
                             dt.name, scale=2.0)
                fn = jax.jit(lambda ws, tiles=tiles, tr=tr, run=run: [run(w, tiles, tr)
                                                                       for w in ws])
                us = per_call_us(fn, (layer_ws,), L)
                kname = "gemv_residual" if name.endswith("_residual") else name
                dev = kernel_device_us(lambda fn=fn, ws=layer_ws: fn(ws), (kname,), 3)
            # A tiling Triton rejects, or a wrong result: recorded, not fatal.
            except (jax.errors.JaxRuntimeError, ValueError, AssertionError) as e:
                rows.append({"kernel": name, "tiles": dataclasses.asdict(tiles),
                             "transposed": tr, "error": str(e)[:300]})
                print(f"{name:15s} {label} ERROR {str(e)[:120]}")
                continue
            # Device time per launch where the profiler sees the kernel (the GPU), else wall.
            dev_us = dev.get(kname)
            rank = dev_us or us
            gbs = ws[0].nbytes / rank / 1e3
            rows.append({"kernel": name, "tiles": dataclasses.asdict(tiles), "transposed": tr,
                         "us": us, "device_us": dev_us, "gb_s": gbs})
            print(f"{name:15s} {label} {us:7.2f} us wall, {dev_us or float('nan'):6.2f} us "
                  f"device, {gbs:7.1f} GB/s", flush=True)
            if name not in best or rank < (best[name]["device_us"] or best[name]["us"]):
                best[name] = rows[-1]

    # The general path's pieces for the same work (XLA fusions and the Pallas GEMV).
    from jdecode.model.linear import pallas_linear

    def general_attn_in(ws):  # RMSNorm + QKV + RoPE as the general forward runs them
        out = []
        for w in ws:
            y = pallas_linear(rms_norm(x, norm, eps), w).reshape(B, H + 2 * K, D)
            y1, y2 = y[..., :D // 2].astype(jnp.float32), y[..., D // 2:].astype(jnp.float32)
            out.append(jnp.concatenate([y1 * cos[:, None] - y2 * sin[:, None],
                                        y2 * cos[:, None] + y1 * sin[:, None]], -1).astype(dt))
        return out

    def general_mlp(wgus, wds):
        out = []
        for g, d in zip(wgus, wds):
            gate, up = jnp.split(rms_norm(x, norm, eps) @ g, 2, axis=-1)
            out.append(x + (jax.nn.silu(gate) * up) @ d)
        return out

    pieces = {
        "general norm+qkv+rope": (jax.jit(general_attn_in), (wqkv,)),
        "general o+residual": (jax.jit(lambda ws: [x + pallas_linear(a_o, w) for w in ws]),
                               (wo,)),
        "general norm+mlp+residual": (jax.jit(general_mlp), (wgu, wd)),
    }
    general, general_device = {}, {}
    for k, (fn, fn_args) in pieces.items():
        general[k] = per_call_us(fn, fn_args, L)
        busy = device_busy_us(lambda fn=fn, fn_args=fn_args: fn(*fn_args), 3)
        general_device[k] = None if busy is None else busy / L  # all its kernels, per layer
        print(f"{k:30s} {general[k]:7.2f} us wall, {general_device[k] or float('nan'):6.2f} us "
              "device (all kernels)")
    for k, v in best.items():
        print(f"best {k}: {v['tiles']} transposed={v['transposed']} {v['us']:.2f} us wall, "
              f"{v['device_us']} us device")
    result = {**meta, "rows": rows, "best": best, "general_us": general,
              "general_device_us": general_device}
    tag = "" if args.sweep == "full" else f"_{args.sweep}"
    (out / f"bench_fused_decode_{args.model}_b{B}{tag}.json").write_text(
        json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
