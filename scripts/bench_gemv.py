"""Batch-1 projection variants on the GPU: XLA's dot vs padded rows vs the Pallas GEMV.

  PYTHONPATH=. python3 scripts/bench_gemv.py --out $OUT
Times each variant over a ring of 16 weight matrices (so nothing stays in L2) and reports
TB/s of weight bytes read; checks each against the f32 reference first.
"""

from __future__ import annotations

import argparse
import itertools
import json
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp

from jdecode.analysis.measure import time_fn
from pallas_kernels.gemv import gemv, gemv_reference

SHAPES = {"qkv 1B": (2048, 3072), "o 1B": (2048, 2048), "gate_up 1B": (2048, 16384),
          "down 1B": (8192, 2048)}


def variants(grid: bool):
    yield "xla dot", lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)
    for rows in (8, 16):
        yield f"xla dot, x padded to {rows} rows", partial(_padded, rows=rows)
    configs = [(64, 256, 4, 4), (64, 128, 8, 4), (128, 256, 4, 4), (32, 256, 4, 4),
               (64, 256, 8, 4), (64, 512, 2, 4), (128, 128, 8, 8)]
    if grid:
        configs = list(itertools.product((32, 64, 128), (128, 256), (2, 4, 8), (4,)))
    for bn, bk, sp, nw in configs:
        yield f"pallas bn{bn} bk{bk} s{sp} w{nw}", partial(gemv, block_n=bn, block_k=bk,
                                                          splits=sp, num_warps=nw)


def _padded(x, w, rows):
    xp = jnp.pad(x, ((0, rows - x.shape[0]), (0, 0)))
    return jnp.dot(xp, w, preferred_element_type=jnp.float32)[:x.shape[0]].astype(x.dtype)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--grid", action="store_true")
    ap.add_argument("--out", default="out")
    args = ap.parse_args()
    rows = []
    for name, (k, n) in SHAPES.items():
        ws = [jax.random.normal(jax.random.key(i), (k, n), jnp.bfloat16) * 0.02
              for i in range(16)]
        x = jax.random.normal(jax.random.key(99), (args.rows, k), jnp.bfloat16)
        ref = gemv_reference(x, ws[0]).astype(jnp.float32)
        for vname, fn in variants(args.grid):
            try:
                f = jax.jit(lambda x, ws: [fn(x, w) for w in ws])
                got = f(x, ws)[0].astype(jnp.float32)
                err = float(jnp.max(jnp.abs(got - ref)))
                t = time_fn(lambda: f(x, ws), 20) / len(ws)
            except Exception as e:  # a config that does not tile this shape
                print(f"{name:12s} {vname:34s} failed: {str(e)[:100]}")
                continue
            r = dict(shape=name, k=k, n=n, variant=vname, us=1e6 * t, tb_s=k * n * 2 / t / 1e12,
                     max_abs_err=err)
            rows.append(r)
            print(f"{name:12s} {vname:34s} {1e6 * t:7.2f} us {r['tb_s']:5.2f} TB/s err {err:.2e}",
                  flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_gemv.json").write_text(json.dumps(dict(
        device=jax.devices()[0].device_kind, jax_version=jax.__version__, rows=rows), indent=2))


if __name__ == "__main__":
    main()
