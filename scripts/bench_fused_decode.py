"""Per-kernel device time of the fused decode step's three stages, against the kernels of the
unfused path (paged decode attention, the GEMV), at one decode step of a model's shape.

Each kernel runs `--inner` times inside one jitted fori_loop (cache donated), so launch
overhead is included as it is in the real loop, and host dispatch is not.

GPU: PYTHONPATH=. python3 scripts/bench_fused_decode.py --model smollm2-135m --out $OUT
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jdecode.config import load_model_config_yaml
from jdecode.model.pallas_dispatch import dense_decode_pallas
from pallas_kernels.fused_decode import fused_attn, fused_mlp, fused_qkv


def time_loop(fn, carry, inner: int, reps: int = 7) -> float:
    """Seconds per call of carry -> fn(carry), run `inner` times in one fori_loop."""
    loop = jax.jit(lambda c: jax.lax.fori_loop(0, inner, lambda i, c: fn(c), c),
                   donate_argnums=0)
    carry = jax.tree_util.tree_map(jnp.copy, carry)  # donated: keep the caller's arrays
    carry = jax.block_until_ready(loop(carry))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        carry = jax.block_until_ready(loop(carry))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / inner


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=600)
    ap.add_argument("--inner", type=int, default=200)
    ap.add_argument("--out", default="out")
    args = ap.parse_args()
    cfg = load_model_config_yaml(f"configs/models/{args.model}.yaml")
    dt = jnp.bfloat16
    B, E, H, K, D, F = (args.batch, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
                        cfg.head_dim, cfg.intermediate_size)
    S = -(-(args.context + 64) // 256) * 256
    rng = np.random.default_rng(0)

    def rnd(*shape, scale=1.0, dtype=dt):
        return jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32).astype(dtype)

    x, norm = rnd(B, E), rnd(E, scale=0.1) + 1
    wqkv, wo = rnd(E, (H + 2 * K) * D, scale=E ** -0.5), rnd(H * D, E, scale=(H * D) ** -0.5)
    wgu, wd = rnd(E, 2 * F, scale=E ** -0.5), rnd(F, E, scale=F ** -0.5)
    kc, vc = rnd(B, S, K, D), rnd(B, S, K, D)
    pos = jnp.full((B,), args.context, jnp.int32)
    cos, sin = jnp.ones((B, D // 2)), jnp.zeros((B, D // 2))
    q = rnd(B, H, D)
    rows = []

    def record(name, fn, carry, **kw):
        try:
            us = 1e6 * time_loop(fn, carry, args.inner)
        except Exception as e:  # noqa: BLE001 - a variant that fails to compile is a result
            rows.append(dict(kernel=name, error=repr(e)[:300], **kw))
            print(f"{name:<40} {kw} ERROR {repr(e)[:200]}", flush=True)
            return
        rows.append(dict(kernel=name, us=us, **kw))
        print(f"{name:<40} {kw} {us:8.2f} us", flush=True)

    for n_parts in (None, 8, 24, 48):
        parts = None if n_parts is None else rnd(n_parts, B, E, scale=0.1, dtype=jnp.float32)
        for warps in (4, 8):
            def qkv_step(c, parts=parts, warps=warps):
                xx, kk, vv = c
                _, kk, vv, xx = fused_qkv(xx, parts, norm, wqkv, cos, sin, pos, kk, vv,
                                          num_heads=H, num_kv_heads=K, eps=1e-5,
                                          num_warps=warps)
                return xx, kk, vv
            record("fused_qkv", qkv_step, (x, kc, vc), parts=n_parts, num_warps=warps)
    for block_e in (64, 128, 576 if E % 576 == 0 else 256):
        for warps in (4, 8):
            if E % block_e:
                continue

            def attn_step(c, block_e=block_e, warps=warps):
                qq, kk, vv = c
                out = fused_attn(qq, kk, vv, pos, wo, block_e=block_e, num_warps=warps)
                return qq + out[0, :, :1, None].astype(dt) * 0, kk, vv
            record("fused_attn", attn_step, (q, kc, vc), block_e=block_e, num_warps=warps)

    def paged_step(c):
        qq, kk, vv = c
        out = dense_decode_pallas(qq[:, None], kk[None], vv[None], 0, pos[:, None])
        return out[:, 0], kk, vv
    record("paged_attention (unfused path)", paged_step, (q, kc, vc))
    attn_parts = rnd(K, B, E, scale=0.1, dtype=jnp.float32)
    for block_f in (32, 64, 128):
        for warps in (4, 8):
            def mlp_step(c, block_f=block_f, warps=warps):
                _, xx = fused_mlp(c, attn_parts, norm, wgu, wd, eps=1e-5, block_f=block_f,
                                  num_warps=warps)
                return xx
            record("fused_mlp", mlp_step, x, block_f=block_f, num_warps=warps)

    from pallas_kernels.gemv import gemv

    from jdecode.model.linear import gemv_blocks
    record("gemv qkv (unfused path)", lambda c: gemv(c, wqkv, **gemv_blocks(E, wqkv.shape[1]))[:, :E],
           x)
    record("xla gate_up+down (unfused path)",
           lambda c: (jax.nn.silu(c @ wgu[:, :F]) * (c @ wgu[:, F:])) @ wd, x)
    weights = {"qkv": wqkv.nbytes, "o": wo.nbytes, "mlp": wgu.nbytes + wd.nbytes}
    result = dict(device=jax.devices()[0].device_kind, jax_version=jax.__version__,
                  model=args.model, batch=B, context=args.context, cache_len=S,
                  weight_bytes=weights, rows=rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"bench_fused_decode_{args.model}_b{B}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
