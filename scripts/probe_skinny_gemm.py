"""Probe: can a TMA-pipelined wgmma matmul stream decode-shaped weights faster than XLA?

Issue 16's decode steps read each projection's weights once per step with 1-64 rows of
activations. XLA's GEMMs at 64 rows read the 1B shape's QKV and O weights at 1.5-1.8 TB/s
(benchmarks/fused_decode_h200.md). This times, for the Llama-3.2-1B shape's four projections,
`jnp.dot` (XLA) at 1 and 64 rows against JAX's bundled Hopper matmul
(`jax.experimental.pallas.ops.gpu.hopper_matmul_mgpu`: persistent CTAs, TMA ring, two wgmma
warpgroups) at 64 rows over a grid of tiles. R distinct weight copies (>= 256 MB in all) are
multiplied in one jit, so the L2 does not serve them; a figure is device microseconds per
matmul (profiler) and the weight bytes over it.

    device: PYTHONPATH=. python3 scripts/probe_skinny_gemm.py --out $OUT
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os

import jax
import jax.numpy as jnp

from jdecode.analysis.profile import device_busy_us
from jdecode.provenance import git_sha

BF16 = jnp.bfloat16
# (name, K, N) of the Llama-3.2-1B shape's projections (gate and up side by side).
SHAPES = (("qkv", 2048, 3072), ("o", 2048, 2048), ("gate_up", 2048, 16384),
          ("down", 8192, 2048))


def time_matmuls(mm, xs, ws) -> dict:
    """Device us per matmul of mm(x, w) over the weight copies `ws`, and the TB/s of their
    weight bytes."""
    fn = jax.jit(lambda x, ws: [mm(x, w) for w in ws])
    jax.block_until_ready(fn(xs, ws))
    us = device_busy_us(lambda: jax.block_until_ready(fn(xs, ws)), repeats=5)
    if us is None:
        return {"error": "no device trace"}
    per = us / len(ws)
    nbytes = ws[0].size * ws[0].dtype.itemsize
    return {"us": per, "TBps": nbytes / per / 1e6}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm

    res = {"env": {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                   "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__,
                   "git": git_sha() or "unknown"}, "shapes": {}}
    for name, k, n in SHAPES:
        r = max(2, (256 << 20) // (k * n * 2))
        keys = jax.random.split(jax.random.key(0), r + 1)
        ws = [jax.random.normal(kk, (k, n), BF16) for kk in keys[1:]]
        row = {}
        for m in (1, 64):
            x = jax.random.normal(keys[0], (m, k), BF16)
            row[f"xla_m{m}"] = time_matmuls(jnp.dot, x, ws)
            print(name, f"xla m{m}", row[f"xla_m{m}"], flush=True)
        x = jax.random.normal(keys[0], (64, k), BF16)
        ref = jnp.dot(x, ws[0], preferred_element_type=jnp.float32)
        for tn, tk, steps in itertools.product((32, 64, 128), (64, 128), (4, 8)):
            if n % (2 * tn):
                continue
            cfg = hm.TuningConfig(tile_m=64, tile_n=tn, tile_k=tk, max_concurrent_steps=steps,
                                  epi_tile_n=min(64, tn), epi_tile_m=64)
            key = f"mgpu_n{tn}_k{tk}_s{steps}"
            try:
                def mm(x, w, cfg=cfg):
                    return hm.matmul(x, w, None, cfg)
                got = jax.jit(mm)(x, ws[0]).astype(jnp.float32)
                err = float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref)))
                row[key] = {**time_matmuls(mm, x, ws), "rel_err": err}
            except Exception as e:  # noqa: BLE001 - keep the other configs
                row[key] = {"error": repr(e)[:300]}
            print(name, key, row[key], flush=True)
        res["shapes"][name] = row
        with open(os.path.join(args.out, "skinny_gemm.json"), "w") as f:
            json.dump(res, f, indent=1)
    for name, row in res["shapes"].items():
        ok = {kk: v for kk, v in row.items() if "us" in v}
        best = min((kk for kk in ok if kk.startswith("mgpu")), key=lambda kk: ok[kk]["us"],
                   default=None)
        print(f"{name}: xla m1 {ok.get('xla_m1', {}).get('TBps', 0):.2f} TB/s, xla m64 "
              f"{ok.get('xla_m64', {}).get('TBps', 0):.2f}, best mgpu "
              f"{best} {ok[best]['TBps'] if best else 0:.2f}")


if __name__ == "__main__":
    main()
